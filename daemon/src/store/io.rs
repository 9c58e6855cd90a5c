//! Chunk file I/O behind one interface, with two backends.
//!
//! - `portable`: positional reads and writes with `std::fs` on tokio's blocking pool. Works
//!   everywhere.
//! - `io_uring`: tokio-uring runtimes on dedicated threads (its types are not `Send`), fed
//!   by a bounded channel of [`Command`]s. Container seccomp profiles and
//!   `kernel.io_uring_disabled` forbid it, so it is probed at start-up and `auto` falls
//!   back to `portable` with the reason recorded for `status`.
//!
//! Both backends write a chunk durably the same way: write a temp file, `fsync` it, rename
//! it into place, `fsync` the directory. A reader therefore sees a whole chunk or none.
//!
//! Non-goals: O_DIRECT and registered buffers. Buffered reads of 4 MiB are what the page
//! cache serves best; `docs/architecture.md` has the measurements behind the default.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// Threads running an io_uring runtime each.
pub const URING_THREADS: usize = 2;
/// Commands queued per io_uring thread before senders wait.
pub const URING_QUEUE_COMMANDS: usize = 64;

/// Which backend to use, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IoBackendChoice {
    /// io_uring when the probe succeeds, else portable.
    Auto,
    /// io_uring, or fail to start.
    IoUring,
    /// Positional I/O on the blocking pool.
    Portable,
}

/// The backend running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackendKind {
    /// io_uring through tokio-uring.
    IoUring,
    /// Positional I/O on the blocking pool.
    Portable,
}

impl IoBackendKind {
    /// Name shown in `status`.
    pub fn name(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::Portable => "portable",
        }
    }
}

enum Command {
    Read { path: PathBuf, reply: oneshot::Sender<io::Result<Bytes>> },
    Write { temp: PathBuf, destination: PathBuf, data: Bytes, reply: oneshot::Sender<io::Result<()>> },
}

/// Reads and writes chunk files.
#[derive(Clone)]
pub struct ChunkIo {
    kind: IoBackendKind,
    reason: Arc<str>,
    uring: Option<Arc<UringPool>>,
}

impl std::fmt::Debug for ChunkIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkIo").field("kind", &self.kind).field("reason", &self.reason).finish()
    }
}

struct UringPool {
    senders: Vec<mpsc::Sender<Command>>,
    next: AtomicUsize,
}

fn backend_gone() -> io::Error {
    io::Error::other("io_uring thread stopped")
}

impl ChunkIo {
    /// Chooses and starts a backend; `probe_dir` is a writable directory for the probe.
    pub async fn start(choice: IoBackendChoice, probe_dir: &Path) -> io::Result<Self> {
        match choice {
            IoBackendChoice::Portable => Ok(Self::portable("forced by configuration (io_backend = portable)")),
            IoBackendChoice::IoUring => {
                let uring = UringPool::start(probe_dir).await?;
                Ok(Self {
                    kind: IoBackendKind::IoUring,
                    reason: "forced by configuration (io_backend = io-uring)".into(),
                    uring: Some(Arc::new(uring)),
                })
            }
            IoBackendChoice::Auto => match UringPool::start(probe_dir).await {
                Ok(uring) => Ok(Self {
                    kind: IoBackendKind::IoUring,
                    reason: "auto: io_uring probe succeeded".into(),
                    uring: Some(Arc::new(uring)),
                }),
                Err(error) => {
                    tracing::warn!(%error, "io_uring is not available; using the portable backend");
                    Ok(Self::portable(&format!("auto: io_uring probe failed ({error})")))
                }
            },
        }
    }

    fn portable(reason: &str) -> Self {
        Self { kind: IoBackendKind::Portable, reason: reason.into(), uring: None }
    }

    /// The backend running.
    pub fn kind(&self) -> IoBackendKind {
        self.kind
    }

    /// Why this backend runs.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Reads a whole file.
    pub async fn read(&self, path: PathBuf) -> io::Result<Bytes> {
        match &self.uring {
            Some(pool) => {
                let (reply, answer) = oneshot::channel();
                pool.send(Command::Read { path, reply }).await?;
                answer.await.map_err(|_| backend_gone())?
            }
            None => tokio::task::spawn_blocking(move || read_portable(&path)).await.map_err(io::Error::other)?,
        }
    }

    /// Writes `data` to `temp`, syncs it, renames it to `destination` and syncs the directory.
    pub async fn write_durable(&self, temp: PathBuf, destination: PathBuf, data: Bytes) -> io::Result<()> {
        match &self.uring {
            Some(pool) => {
                let (reply, answer) = oneshot::channel();
                pool.send(Command::Write { temp, destination, data, reply }).await?;
                answer.await.map_err(|_| backend_gone())?
            }
            None => tokio::task::spawn_blocking(move || write_portable(&temp, &destination, &data))
                .await
                .map_err(io::Error::other)?,
        }
    }
}

fn read_portable(path: &Path) -> io::Result<Bytes> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    let length = usize::try_from(length).map_err(io::Error::other)?;
    let mut buffer = vec![0u8; length];
    file.read_exact_at(&mut buffer, 0)?;
    Ok(Bytes::from(buffer))
}

fn write_portable(temp: &Path, destination: &Path, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(temp)?;
    let written = file.write_all_at(data, 0).and_then(|()| file.sync_data());
    drop(file);
    if let Err(error) = written {
        let _ = std::fs::remove_file(temp);
        return Err(error);
    }
    std::fs::rename(temp, destination)?;
    sync_parent(destination)
}

/// Makes a rename into `path`'s directory durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

impl UringPool {
    async fn start(probe_dir: &Path) -> io::Result<Self> {
        let mut senders = Vec::with_capacity(URING_THREADS);
        for index in 0..URING_THREADS {
            let (sender, receiver) = mpsc::channel(URING_QUEUE_COMMANDS);
            std::thread::Builder::new()
                .name(format!("cachemesh-uring-{index}"))
                .spawn(move || run_uring_thread(receiver))?;
            senders.push(sender);
        }
        let pool = Self { senders, next: AtomicUsize::new(0) };
        pool.probe(probe_dir).await?;
        Ok(pool)
    }

    /// Writes, syncs and reads back a small file through every thread: a ring that cannot
    /// be created, or an operation that seccomp forbids, fails here rather than later.
    async fn probe(&self, probe_dir: &Path) -> io::Result<()> {
        for (index, sender) in self.senders.iter().enumerate() {
            let data = Bytes::from(format!("cachemesh io_uring probe {index}").repeat(64));
            let temp = probe_dir.join(format!("uring-probe-{index}.tmp"));
            let destination = probe_dir.join(format!("uring-probe-{index}"));
            let _ = std::fs::remove_file(&temp);
            let (reply, answer) = oneshot::channel();
            let command = Command::Write { temp, destination: destination.clone(), data: data.clone(), reply };
            sender.send(command).await.map_err(|_| io::Error::other("io_uring runtime failed to start"))?;
            answer.await.map_err(|_| io::Error::other("io_uring runtime failed to start"))??;
            let (reply, answer) = oneshot::channel();
            sender.send(Command::Read { path: destination.clone(), reply }).await.map_err(|_| backend_gone())?;
            let read = answer.await.map_err(|_| backend_gone())??;
            let _ = std::fs::remove_file(&destination);
            if read != data {
                return Err(io::Error::other("io_uring probe read back different bytes"));
            }
        }
        Ok(())
    }

    async fn send(&self, command: Command) -> io::Result<()> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        self.senders[index].send(command).await.map_err(|_| backend_gone())
    }
}

fn run_uring_thread(mut receiver: mpsc::Receiver<Command>) {
    // tokio_uring::start panics when the kernel refuses a ring (seccomp, io_uring_disabled).
    // The panic is caught so the daemon falls back instead of dying; the receiver drops,
    // and the probe sees the channel closed.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        tokio_uring::start(async move {
            while let Some(command) = receiver.recv().await {
                tokio_uring::spawn(handle_uring(command));
            }
        })
    }));
    if outcome.is_err() {
        tracing::warn!("io_uring runtime could not start");
    }
}

async fn handle_uring(command: Command) {
    match command {
        Command::Read { path, reply } => {
            let _ = reply.send(read_uring(&path).await);
        }
        Command::Write { temp, destination, data, reply } => {
            let _ = reply.send(write_uring(&temp, &destination, data).await);
        }
    }
}

async fn read_uring(path: &Path) -> io::Result<Bytes> {
    let file = tokio_uring::fs::File::open(path).await?;
    let length = file.statx().await?.stx_size;
    let length = usize::try_from(length).map_err(io::Error::other)?;
    let (result, buffer) = file.read_exact_at(Vec::with_capacity(length), 0).await;
    let closed = file.close().await;
    result?;
    closed?;
    Ok(Bytes::from(buffer))
}

async fn write_uring(temp: &Path, destination: &Path, data: Bytes) -> io::Result<()> {
    let file = tokio_uring::fs::OpenOptions::new().write(true).create_new(true).open(temp).await?;
    let (result, _) = file.write_all_at(data, 0).await;
    let synced = match result {
        Ok(()) => file.sync_data().await,
        Err(error) => Err(error),
    };
    let closed = file.close().await;
    if let Err(error) = synced.and(closed) {
        let _ = tokio_uring::fs::remove_file(temp).await;
        return Err(error);
    }
    tokio_uring::fs::rename(temp, destination).await?;
    let directory = destination.parent().unwrap_or(Path::new("."));
    let directory = tokio_uring::fs::File::open(directory).await?;
    let synced = directory.sync_all().await;
    directory.close().await?;
    synced
}
