//! Shared set-up for the cachemesh benches: scratch directories on the work disk,
//! deterministic incompressible test files, and a real release `cachemeshd` run as a child
//! process and stopped on drop.
//!
//! Every figure the benches produce is a ratio against a baseline taken in the same run
//! (conventions rule 14); `benches/run.sh` computes the ratios from criterion's output.
//!
//! Non-goals: building the binaries (run `cargo build --release --bins` first; `run.sh` does)
//! and asserting speeds. Set-up failures panic with a message: a bench that cannot set up
//! must stop, not measure something else.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cachemesh_daemon::client::Client;

/// Bytes per write when generating test files, and per read of the plain-read baseline.
pub const BUFFER_BYTES: usize = 1024 * 1024;
/// Chunk size of the daemon; unique-content puts rewrite a few bytes of every chunk.
pub const CHUNK_BYTES: u64 = cachemesh_proto::limits::CHUNK_BYTES_MAX as u64;
/// Longest wait for a daemon to answer `GET /v1/status` after it is spawned.
pub const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a daemon to exit after SIGTERM before it is killed.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("benches/ has a parent").to_path_buf()
}

/// Where scratch data goes: `$CACHEMESH_BENCH_DIR`, else `<workspace>/target/bench-scratch`.
/// It must be a real disk (the one under /work), not tmpfs, for the durable-write figures
/// to mean anything.
pub fn scratch_root() -> PathBuf {
    let root = std::env::var_os("CACHEMESH_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("bench-scratch"));
    std::fs::create_dir_all(&root).unwrap_or_else(|error| panic!("cannot create {}: {error}", root.display()));
    root
}

/// A fresh scratch directory, removed when dropped.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let root = scratch_root();
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&root)
        .unwrap_or_else(|error| panic!("cannot create a scratch directory in {}: {error}", root.display()))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// The release binary `name` (`cachemeshd` or `cachemesh`): `$CACHEMESH_BIN_DIR/name`, else
/// `<target>/release/name`. Panics with the command to run when it is missing.
pub fn release_binary(name: &str) -> PathBuf {
    let directory =
        std::env::var_os("CACHEMESH_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| target_dir().join("release"));
    let path = directory.join(name);
    if !path.is_file() {
        panic!(
            "\n\nthe release binary {} is missing.\nBuild it first, from the workspace root:\n\n    cargo build --release --bins\n\n(or run benches/run.sh, which does that)\n",
            path.display()
        );
    }
    path
}

/// Fills `buffer` with the pseudorandom bytes found at `offset` of the stream named by
/// `seed` (BLAKE3 in XOF mode): incompressible, so no layer can shortcut it, and
/// repeatable.
pub fn fill_pseudorandom(buffer: &mut [u8], seed: u64, offset: u64) {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"cachemesh bench data");
    hasher.update(&seed.to_le_bytes());
    let mut reader = hasher.finalize_xof();
    reader.set_position(offset);
    reader.fill(buffer);
}

/// Writes `length` pseudorandom bytes to `path` (truncating it). The file stays in the page
/// cache if memory allows, which is what the page-cache figures want.
pub fn write_pseudorandom_file(path: &Path, length: u64, seed: u64) {
    let mut file = File::create(path).unwrap_or_else(|error| panic!("cannot create {}: {error}", path.display()));
    let mut buffer = vec![0u8; BUFFER_BYTES];
    let mut written = 0u64;
    while written < length {
        let take = (length - written).min(BUFFER_BYTES as u64) as usize;
        fill_pseudorandom(&mut buffer[..take], seed, written);
        file.write_all(&buffer[..take]).unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
        written += take as u64;
    }
}

/// Makes every `CHUNK_BYTES` chunk of the file differ from any earlier generation by
/// writing `generation` into its first 8 bytes. Content addressing dedups a repeated put to
/// nearly nothing; a put benchmark therefore needs new content every iteration.
pub fn make_chunks_unique(path: &Path, generation: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|error| panic!("cannot open {}: {error}", path.display()));
    let length = file.metadata().expect("metadata").len();
    let mut offset = 0;
    while offset < length {
        file.write_all_at(&generation.to_le_bytes(), offset).expect("rewrite a chunk head");
        offset += CHUNK_BYTES;
    }
}

/// Reads the whole file with `std` into a reused buffer; returns the bytes read. This is the
/// page-cache baseline the socket GET is compared with.
pub fn plain_read(path: &Path, buffer: &mut [u8]) -> u64 {
    use std::io::Read;
    let mut file = File::open(path).expect("open the source file");
    let mut total = 0u64;
    loop {
        let read = file.read(buffer).expect("read the source file");
        if read == 0 {
            return total;
        }
        total += read as u64;
        std::hint::black_box(&buffer[..read]);
    }
}

/// CPU time (user + system, all threads, in seconds) that process `pid` has used, from
/// `/proc/PID/stat`. CPU per GiB moved is far less disturbed by other work on the machine
/// than wall time, so the benches print it next to criterion's throughputs.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may contain spaces) start with the state, field 3.
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// How to run a benchmark daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Data directory (kept across daemons, so a later daemon starts with a warm store).
    pub data_dir: PathBuf,
    /// Origin directory.
    pub origin_dir: PathBuf,
    /// `--cache-size`.
    pub cache_size: String,
    /// `--io-backend`: `io-uring`, `portable` or `auto`.
    pub io_backend: String,
    /// `--verify-reads`.
    pub verify_reads: bool,
}

/// A release `cachemeshd` child process; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Spawns the daemon and waits until `GET /v1/status` answers.
    pub fn start(config: &DaemonConfig, runtime: &tokio::runtime::Runtime) -> Self {
        let binary = release_binary("cachemeshd");
        std::fs::create_dir_all(&config.data_dir).expect("create the data directory");
        std::fs::create_dir_all(&config.origin_dir).expect("create the origin directory");
        let socket = config.data_dir.join("api.sock");
        let log = config.data_dir.with_extension(format!("{}.log", std::process::id()));
        let log_file = File::create(&log).expect("create the daemon log");
        let child = Command::new(&binary)
            .arg("--data-dir")
            .arg(&config.data_dir)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--origin")
            .arg(format!("file://{}", config.origin_dir.display()))
            .arg("--cache-size")
            .arg(&config.cache_size)
            .arg("--io-backend")
            .arg(&config.io_backend)
            .arg("--verify-reads")
            .arg(config.verify_reads.to_string())
            .env("CACHEMESH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot spawn {}: {error}", binary.display()));
        let mut daemon = Self { child, socket, log };
        daemon.wait_ready(runtime);
        daemon
    }

    fn wait_ready(&mut self, runtime: &tokio::runtime::Runtime) {
        let client = self.client();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the daemon") {
                panic!("cachemeshd exited during start-up ({status}); its log:\n{}", self.log_text());
            }
            if runtime.block_on(client.status()).is_ok() {
                return;
            }
            if started.elapsed() > DAEMON_READY_TIMEOUT {
                panic!(
                    "cachemeshd did not answer on {} within {DAEMON_READY_TIMEOUT:?}; its log:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client of this daemon's socket.
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// The daemon's process id (for /proc sampling).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The `cachemesh_chunk_fetches_total` lines of `/metrics`: which tier served chunks.
    pub fn chunk_fetch_counters(&self, runtime: &tokio::runtime::Runtime) -> String {
        let (_, body) = runtime
            .block_on(self.client().send_bytes(hyper::Method::GET, "/metrics", bytes::Bytes::new()))
            .expect("GET /metrics");
        String::from_utf8_lossy(&body)
            .lines()
            .filter(|line| line.starts_with("cachemesh_chunk_fetches_total"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let started = Instant::now();
        while started.elapsed() < DAEMON_STOP_TIMEOUT {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.log);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = io::stderr().write_all(b"cachemeshd did not stop after SIGTERM; killing it\n");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
