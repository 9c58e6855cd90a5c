//! `cachemesh`: the command line for a local cachemeshd.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use cachemesh_daemon::client::{Client, ClientError};
use cachemesh_proto::ObjectId;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::AsyncWriteExt;

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
        /// Output file (default: standard output).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Only these bytes, as an HTTP range: `0-1023`, `4096-` or `-512`.
        #[arg(long, value_name = "RANGE")]
        range: Option<String>,
    },
    /// Show the daemon's status.
    Status {
        /// Print the status as JSON.
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
    /// Manage the cluster credential that admits nodes to the mesh.
    ClusterKey {
        #[command(subcommand)]
        command: ClusterKeyCommand,
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

async fn put(client: &Client, file: &Path, json: bool) -> anyhow::Result<()> {
    let (reader, length): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Option<u64>) = if file == Path::new("-") {
        (Box::new(tokio::io::stdin()), None)
    } else {
        let opened = tokio::fs::File::open(file).await.with_context(|| format!("cannot open {}", file.display()))?;
        let length = opened.metadata().await.ok().map(|metadata| metadata.len());
        (Box::new(opened), length)
    };
    let bar = progress(length, "put");
    let counted = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, PUT_READ_BYTES).map(move |frame| {
        frame.map(|bytes: Bytes| {
            counted.inc(bytes.len() as u64);
            hyper::body::Frame::data(bytes)
        })
    });
    let answer = client.put_object(StreamBody::new(stream)).await;
    bar.finish_and_clear();
    let answer = answer?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!("{}", answer.object_id);
    }
    Ok(())
}

async fn get(client: &Client, id: &str, output: Option<&Path>, range: Option<&str>) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let range = range.map(|range| format!("bytes={range}"));
    let response = client.get_object(&id, range.as_deref()).await?;
    let length =
        response.headers().get(http::header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse().ok());
    let bar = progress(length, "get");
    // Special files (/dev/null, a FIFO, a terminal) are written in place: renaming a temp
    // file over them would replace the device itself.
    let special = output.is_some_and(|path| std::fs::metadata(path).is_ok_and(|metadata| !metadata.is_file()));
    let (mut writer, temp): (Box<dyn tokio::io::AsyncWrite + Unpin>, Option<PathBuf>) = match output {
        Some(path) if special => {
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            (Box::new(file), None)
        }
        Some(path) => {
            // Write beside the target and rename at the end: no half-written file appears.
            let temp = path.with_file_name(format!(
                ".{}.cachemesh-partial",
                path.file_name().and_then(|n| n.to_str()).unwrap_or("object")
            ));
            let file =
                tokio::fs::File::create(&temp).await.with_context(|| format!("cannot create {}", temp.display()))?;
            (Box::new(tokio::io::BufWriter::with_capacity(PUT_READ_BYTES, file)), Some(temp))
        }
        None => (Box::new(tokio::io::stdout()), None),
    };
    let mut body = response.into_body();
    let mut received = 0u64;
    let copied: anyhow::Result<()> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the daemon broke off the transfer")?;
            if let Ok(data) = frame.into_data() {
                received += data.len() as u64;
                bar.inc(data.len() as u64);
                writer.write_all(&data).await.context("writing the output failed")?;
            }
        }
        writer.flush().await.context("writing the output failed")?;
        if let Some(length) = length
            && received != length
        {
            bail!("the transfer ended after {received} of {length} bytes");
        }
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    drop(writer);
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
        Command::Get { id, output, range } => get(&client, &id, output.as_deref(), range.as_deref()).await,
        Command::Status { json } => status(&client, json).await,
        Command::Pin { id } => pin(&client, &id, true).await,
        Command::Unpin { id } => pin(&client, &id, false).await,
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
