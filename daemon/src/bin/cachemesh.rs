//! `cachemesh`: the command line for a local cachemeshd.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use cachemesh_daemon::client::{Client, ClientError};
use cachemesh_daemon::output::DirectFile;
use cachemesh_proto::ObjectId;
use cachemesh_proto::api::{FileEntry, PrefetchResponse};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Talk to the cachemesh daemon on this host.
#[derive(Debug, Parser)]
#[command(name = "cachemesh", version, propagate_version = true)]
struct Cli {
    /// The daemon's API socket (default: the daemon's default for this user).
    #[arg(long, env = "CACHEMESH_SOCKET", value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store a file as an object; prints its object id.
    Put {
        /// The file to store (`-` for standard input).
        file: PathBuf,
        /// Print the full answer as JSON instead of the bare id.
        #[arg(long)]
        json: bool,
    },
    /// Write an object's bytes to a file or standard output.
    Get {
        /// The object id.
        id: String,
        #[command(flatten)]
        save: SaveArgs,
    },
    /// Show the daemon's status.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the live members of this node's datacenter, as this node sees them.
    Peers {
        /// Print the peers as JSON (the `GET /v1/peers` answer).
        #[arg(long)]
        json: bool,
    },
    /// Fetch an object into the local cache and keep it there until unpinned.
    Pin {
        /// The object id.
        id: String,
    },
    /// Let a pinned object be evicted again.
    Unpin {
        /// The object id.
        id: String,
    },
    /// Files of a volume: list, upload, download, move, remove, stat.
    Files {
        /// The volume (before or after the files command); required.
        #[arg(long, global = true, env = "CACHEMESH_VOLUME", value_name = "VOLUME")]
        volume: Option<String>,
        #[command(subcommand)]
        command: FilesCommand,
    },
    /// Warm files or directories of a volume into the local cache, in parallel.
    Prefetch {
        /// The volume.
        #[arg(long, env = "CACHEMESH_VOLUME", value_name = "VOLUME")]
        volume: String,
        /// Files or directories (every file under them) to warm.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
        /// Print the totals as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage the cluster credential that admits nodes to the mesh.
    ClusterKey {
        #[command(subcommand)]
        command: ClusterKeyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum FilesCommand {
    /// List the files under a directory (every file of the volume without one), with sizes
    /// and modification times.
    Ls {
        /// A directory (or a file) of the volume.
        path: Option<String>,
        /// Print the entries as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Store a local file (`-` for standard input) at a path of the volume.
    Upload {
        /// The local file.
        file: PathBuf,
        /// The path in the volume.
        path: String,
        /// Print the full answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a file of the volume to a local file or standard output.
    Download {
        /// The path in the volume.
        path: String,
        #[command(flatten)]
        save: SaveArgs,
    },
    /// Rename a file atomically; a file at the target is replaced.
    Mv {
        /// The file.
        from: String,
        /// Its new path.
        to: String,
    },
    /// Remove a file.
    Rm {
        /// The file.
        path: String,
    },
    /// Show a file's size, object, time and sequence number.
    Stat {
        /// The file.
        path: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterKeyCommand {
    /// Create a new random cluster key file (mode 0600; an existing file is never overwritten).
    /// Copy it to every node of the cluster and start them with --cluster-key FILE.
    New {
        /// Where to write the key.
        file: PathBuf,
    },
}

/// Bytes per read of a file being put.
const PUT_READ_BYTES: usize = 1024 * 1024;
/// Body frames received but not yet written to the output; with frames of up to a chunk,
/// at most a few tens of MiB in memory.
const OUTPUT_QUEUE_FRAMES: usize = 16;
/// Small frames are gathered into writes of this size.
const OUTPUT_BUFFER_BYTES: usize = 1024 * 1024;

fn progress(length: Option<u64>, message: &'static str) -> ProgressBar {
    let bar = match length {
        Some(length) => ProgressBar::new(length),
        None => ProgressBar::new_spinner(),
    };
    // Drawn on stderr only when it is a terminal, so scripts see clean output.
    bar.set_draw_target(if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let template = if length.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"
    } else {
        "{msg} {spinner} {bytes} {binary_bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    bar
}

fn parse_id(text: &str) -> anyhow::Result<ObjectId> {
    text.parse().with_context(|| format!("{text:?} is not an object id"))
}

type UploadBody = StreamBody<
    futures::stream::Map<
        tokio_util::io::ReaderStream<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
        Box<dyn FnMut(std::io::Result<Bytes>) -> std::io::Result<hyper::body::Frame<Bytes>> + Send>,
    >,
>;

/// A streaming body of `file` (`-` for standard input) that advances a progress bar.
async fn upload_body(file: &Path, label: &'static str) -> anyhow::Result<(UploadBody, ProgressBar)> {
    let (reader, length): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Option<u64>) = if file == Path::new("-") {
        (Box::new(tokio::io::stdin()), None)
    } else {
        let opened = tokio::fs::File::open(file).await.with_context(|| format!("cannot open {}", file.display()))?;
        let length = opened.metadata().await.ok().map(|metadata| metadata.len());
        (Box::new(opened), length)
    };
    let bar = progress(length, label);
    let counted = bar.clone();
    let count: Box<dyn FnMut(std::io::Result<Bytes>) -> std::io::Result<hyper::body::Frame<Bytes>> + Send> =
        Box::new(move |frame| {
            frame.map(|bytes: Bytes| {
                counted.inc(bytes.len() as u64);
                hyper::body::Frame::data(bytes)
            })
        });
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, PUT_READ_BYTES).map(count);
    Ok((StreamBody::new(stream), bar))
}

async fn put(client: &Client, file: &Path, json: bool) -> anyhow::Result<()> {
    let (body, bar) = upload_body(file, "put").await?;
    let answer = client.put_object(body).await;
    bar.finish_and_clear();
    let answer = answer?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!("{}", answer.object_id);
    }
    Ok(())
}

/// Where and how `get` and `files download` write what they receive.
#[derive(Debug, Args)]
struct SaveArgs {
    /// Output file (default: standard output).
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Only these bytes, as an HTTP range: `0-1023`, `4096-` or `-512`.
    #[arg(long, value_name = "RANGE")]
    range: Option<String>,
    /// Write the output file through the page cache (by default a new file is written
    /// past it, where the filesystem allows, so a large download does not evict what
    /// the host has cached).
    #[arg(long)]
    buffered: bool,
}

impl SaveArgs {
    /// The `Range` header value asked for, if any.
    fn http_range(&self) -> Option<String> {
        self.range.as_ref().map(|range| format!("bytes={range}"))
    }
}

async fn get(client: &Client, id: &str, args: &SaveArgs) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let response = client.get_object(&id, args.http_range().as_deref()).await?;
    save(response, args.output.as_deref(), args.buffered, "get").await
}

/// Where `save` writes: a new regular file, past the page cache where the filesystem
/// allows (`output::DirectFile`), or anything else (a device, a FIFO, standard output)
/// through a buffer.
enum Sink {
    Direct(DirectFile),
    Plain(Box<dyn std::io::Write + Send>),
}

/// Writes a streaming answer to `output` (a temp file renamed at the end; special files in
/// place) or standard output, with a progress bar.
///
/// The output is written by a blocking thread fed through a bounded queue of the body's
/// frames, so receiving and writing overlap. A regular file is written past the page cache
/// in 4 MiB blocks (`output::DirectFile`) unless `buffered`; anything else through
/// [`OUTPUT_BUFFER_BYTES`] writes (large frames go straight through).
async fn save(
    response: http::Response<hyper::body::Incoming>,
    output: Option<&Path>,
    buffered: bool,
    label: &'static str,
) -> anyhow::Result<()> {
    let length =
        response.headers().get(http::header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse().ok());
    let bar = progress(length, label);
    // Special files (/dev/null, a FIFO, a terminal) are written in place: renaming a temp
    // file over them would replace the device itself.
    let special = output.is_some_and(|path| std::fs::metadata(path).is_ok_and(|metadata| !metadata.is_file()));
    let (sink, temp): (Sink, Option<PathBuf>) = match output {
        Some(path) if special => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            (Sink::Plain(Box::new(file)), None)
        }
        Some(path) => {
            // Write beside the target and rename at the end: no half-written file appears.
            let temp = path.with_file_name(format!(
                ".{}.cachemesh-partial",
                path.file_name().and_then(|n| n.to_str()).unwrap_or("object")
            ));
            let sink = if buffered {
                let file = std::fs::File::create(&temp);
                Sink::Plain(Box::new(file.with_context(|| format!("cannot create {}", temp.display()))?))
            } else {
                let file = DirectFile::create(&temp);
                Sink::Direct(file.with_context(|| format!("cannot create {}", temp.display()))?)
            };
            (sink, Some(temp))
        }
        None => (Sink::Plain(Box::new(std::io::stdout())), None),
    };
    let (frames, mut queue) = tokio::sync::mpsc::channel::<Bytes>(OUTPUT_QUEUE_FRAMES);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        match sink {
            Sink::Plain(sink) => {
                let mut out = std::io::BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, sink);
                while let Some(data) = queue.blocking_recv() {
                    std::io::Write::write_all(&mut out, &data)?;
                }
                std::io::Write::flush(&mut out)
            }
            Sink::Direct(mut file) => {
                while let Some(data) = queue.blocking_recv() {
                    file.write_all(&data)?;
                }
                file.finish()
            }
        }
    });
    let mut body = response.into_body();
    let mut received = 0u64;
    let received_all: anyhow::Result<()> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the daemon broke off the transfer")?;
            if let Ok(data) = frame.into_data() {
                received += data.len() as u64;
                bar.inc(data.len() as u64);
                if frames.send(data).await.is_err() {
                    // The writer stopped: its error is reported below.
                    break;
                }
            }
        }
        if let Some(length) = length
            && received != length
        {
            bail!("the transfer ended after {received} of {length} bytes");
        }
        Ok(())
    }
    .await;
    drop(frames);
    let written = match writer.await {
        Ok(result) => result.context("writing the output failed"),
        Err(error) => Err(anyhow::anyhow!("the output writer failed: {error}")),
    };
    bar.finish_and_clear();
    let copied = written.and(received_all);
    match (copied, temp, output) {
        (Ok(()), Some(temp), Some(path)) => tokio::fs::rename(&temp, path)
            .await
            .with_context(|| format!("cannot move the download to {}", path.display())),
        (Err(error), Some(temp), _) => {
            let _ = tokio::fs::remove_file(temp).await;
            Err(error)
        }
        (result, _, _) => result,
    }
}

fn human_bytes(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

async fn status(client: &Client, json: bool) -> anyhow::Result<()> {
    let status = client.status().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let store = &status.store;
    println!("cachemeshd {} (up {} s)", status.version, status.uptime_seconds);
    println!("origin:      {}", status.origin);
    println!("data dir:    {}", store.data_dir);
    println!("io backend:  {} ({})", store.io_backend, store.io_backend_reason);
    let direct = if store.direct_writes { "yes" } else { "no" };
    println!("direct writes: {direct} ({})", store.direct_writes_reason);
    println!(
        "cache:       {} of {} used, {} chunks, {} pinned",
        human_bytes(store.used_bytes),
        human_bytes(store.budget_bytes),
        store.chunk_count,
        store.pinned_chunk_count
    );
    println!("objects:     {} manifests held", store.manifest_count);
    println!("evicted:     {} chunks since start", store.evicted_chunks);
    println!("verify:      {}", if store.verify_reads { "every read" } else { "off" });
    match &status.mesh {
        None => println!("mesh:        off (single node; start with --cluster-key to join a datacenter)"),
        Some(mesh) => {
            println!("node id:     {}", mesh.node_id);
            println!("dc:          {}", mesh.dc);
            println!("p2p listen:  {}", mesh.p2p_listen.join(", "));
            println!("data listen: {}", mesh.data_listen);
            println!("members:     {} other nodes (`cachemesh peers` lists them)", mesh.members);
            println!("provides:    {} objects", mesh.provided_objects);
        }
    }
    Ok(())
}

async fn peers(client: &Client, json: bool) -> anyhow::Result<()> {
    let peers = client.peers().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&peers)?);
        return Ok(());
    }
    if peers.peers.is_empty() {
        println!("no peers (a single node, or no other member of its datacenter is live)");
        return Ok(());
    }
    println!(
        "{:<52}  {:<21}  {:>9}  {:>9}  {:>7}  {:>9}  {:<9}",
        "node id", "data address", "last seen", "in flight", "corrupt", "penalised", "link rate"
    );
    for peer in &peers.peers {
        let link_rate = peer.link_rate.map_or_else(|| "-".to_string(), |rate| format!("{}/s", human_bytes(rate)));
        println!(
            "{:<52}  {:<21}  {:>8.1}s  {:>9}  {:>7}  {:>9}  {}",
            peer.node_id,
            peer.data_addr,
            peer.last_seen_seconds_ago,
            peer.requests_in_flight,
            peer.corrupt_chunks,
            if peer.penalised { "yes" } else { "no" },
            link_rate
        );
    }
    Ok(())
}

async fn pin(client: &Client, id: &str, pin: bool) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let method = if pin { http::Method::PUT } else { http::Method::DELETE };
    let (status, body) = client.send_bytes(method, &format!("/v1/objects/{id}/pin"), Bytes::new()).await?;
    if !status.is_success() {
        return Err(cachemesh_daemon::client::api_error(status, &body).into());
    }
    println!("{id} {}", if pin { "pinned" } else { "unpinned" });
    Ok(())
}

/// `2026-01-02T03:04:05Z` for milliseconds since the Unix epoch (UTC).
fn format_time_ms(ms: u64) -> String {
    let seconds = ms / 1000;
    let (days, rest) = ((seconds / 86_400) as i64, seconds % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

fn print_entry(entry: &FileEntry) {
    println!("{:>15}  {}  {}", entry.size, format_time_ms(entry.modified_at_ms), entry.path);
}

/// The files a path names: the file itself, or every file under it as a directory.
async fn files_named(client: &Client, volume: &str, path: &str) -> anyhow::Result<Vec<FileEntry>> {
    let path = path.trim_end_matches('/');
    let prefix = if path.is_empty() { String::new() } else { format!("{path}/") };
    let mut entries = client.list_all_files(volume, &prefix).await?;
    if entries.is_empty() && !path.is_empty() {
        entries.push(client.stat_file(volume, path).await?);
    }
    Ok(entries)
}

async fn files(client: &Client, volume: &str, command: FilesCommand) -> anyhow::Result<()> {
    match command {
        FilesCommand::Ls { path, json } => {
            let entries = files_named(client, volume, path.as_deref().unwrap_or("")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                entries.iter().for_each(print_entry);
            }
        }
        FilesCommand::Upload { file, path, json } => {
            let (body, bar) = upload_body(&file, "upload").await?;
            let answer = client.put_file(volume, &path, body).await;
            bar.finish_and_clear();
            let answer = answer?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                println!("{} {} bytes, object {}, seq {}", answer.path, answer.size, answer.object_id, answer.seq);
            }
        }
        FilesCommand::Download { path, save: args } => {
            let response = client.get_file(volume, &path, args.http_range().as_deref()).await?;
            save(response, args.output.as_deref(), args.buffered, "download").await?;
        }
        FilesCommand::Mv { from, to } => {
            let answer = client.rename_file(volume, &from, &to).await?;
            println!("{from} -> {to}, seq {}", answer.seq);
        }
        FilesCommand::Rm { path } => {
            let answer = client.delete_file(volume, &path).await?;
            println!("removed {path}, seq {}", answer.seq);
        }
        FilesCommand::Stat { path, json } => {
            let entry = client.stat_file(volume, &path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entry)?);
            } else {
                println!("path:      {}", entry.path);
                println!("size:      {} ({})", entry.size, human_bytes(entry.size));
                println!("modified:  {}", format_time_ms(entry.modified_at_ms));
                println!("object:    {}", entry.object_id);
                println!("seq:       {}", entry.seq);
            }
        }
    }
    Ok(())
}

/// Files warmed at once by `prefetch` (each one request; the daemon fetches its chunks in
/// parallel too).
const PREFETCH_FILES_PARALLEL: usize = 4;

async fn prefetch(client: &Client, volume: &str, paths: &[String], json: bool) -> anyhow::Result<()> {
    let mut files = std::collections::BTreeMap::new();
    for path in paths {
        for entry in files_named(client, volume, path).await? {
            files.insert(entry.path.clone(), entry.size);
        }
    }
    let started = std::time::Instant::now();
    let bar = progress(Some(files.values().sum()), "prefetch");
    let mut total = PrefetchResponse { files: 0, bytes: 0, chunks: 0, chunks_local: 0, chunks_fetched: 0 };
    let mut warming = futures::stream::iter(files)
        .map(|(path, size)| async move { (client.prefetch(volume, vec![path]).await, size) })
        .buffer_unordered(PREFETCH_FILES_PARALLEL);
    while let Some((answer, size)) = warming.next().await {
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => {
                bar.finish_and_clear();
                return Err(error.into());
            }
        };
        bar.inc(size);
        total.files += answer.files;
        total.bytes += answer.bytes;
        total.chunks += answer.chunks;
        total.chunks_local += answer.chunks_local;
        total.chunks_fetched += answer.chunks_fetched;
    }
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&total)?);
    } else {
        println!(
            "warmed {} files, {} in {:.1} s ({} chunks fetched, {} already cached)",
            total.files,
            human_bytes(total.bytes),
            started.elapsed().as_secs_f64(),
            total.chunks_fetched,
            total.chunks_local
        );
    }
    Ok(())
}

fn cluster_key_new(file: &Path) -> anyhow::Result<()> {
    let key = cachemesh_daemon::identity::ClusterKey::generate(file)?;
    println!("wrote a new cluster key to {} (fingerprint {})", file.display(), key.fingerprint());
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::ClusterKey { command: ClusterKeyCommand::New { file } } = &cli.command {
        return cluster_key_new(file);
    }
    let socket = cli.socket.unwrap_or_else(cachemesh_daemon::config::default_api_socket);
    let client = Client::new(socket);
    match cli.command {
        Command::Put { file, json } => put(&client, &file, json).await,
        Command::Get { id, save } => get(&client, &id, &save).await,
        Command::Status { json } => status(&client, json).await,
        Command::Peers { json } => peers(&client, json).await,
        Command::Pin { id } => pin(&client, &id, true).await,
        Command::Unpin { id } => pin(&client, &id, false).await,
        Command::Files { volume, command } => {
            let Some(volume) = volume else {
                bail!("which volume? give --volume VOLUME or set CACHEMESH_VOLUME");
            };
            files(&client, &volume, command).await
        }
        Command::Prefetch { volume, paths, json } => prefetch(&client, &volume, &paths, json).await,
        Command::ClusterKey { command: ClusterKeyCommand::New { file } } => cluster_key_new(&file),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One readable line; the API error already says what and why.
            let message = match error.downcast_ref::<ClientError>() {
                Some(client_error) => client_error.to_string(),
                None => format!("{error:#}"),
            };
            eprintln!("error: {}", message.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
