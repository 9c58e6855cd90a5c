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
//! Direct writes: a chunk whose bytes start on a [`DIRECT_IO_ALIGN`] boundary and fill
//! whole blocks (every full chunk received from a peer: `transport` receives into such a
//! buffer) is written with `O_DIRECT`, past the page cache. The page cache copy of a
//! buffered write was half of a fetching node's CPU (measured in `docs/benchmarks.md`), and
//! the chunk would otherwise take page cache from the host's other work for as long as it
//! stays there; the chunk was already handed to its readers from memory. A filesystem that
//! refuses `O_DIRECT` (tmpfs on older kernels, some FUSE filesystems) is found by a probe at
//! start-up, and then every write is buffered. Reads stay buffered: a chunk read by peers
//! is read many times, which the page cache serves best.
//!
//! Non-goal: registered buffers.

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
/// Alignment of a direct write's memory, length and file offset: the largest logical block
/// size of the devices in use (4096; 512 on older disks divides it).
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Whether `data` can be written with `O_DIRECT`: it starts on a [`DIRECT_IO_ALIGN`]
/// boundary and is a non-zero whole number of blocks.
pub fn direct_eligible(data: &[u8]) -> bool {
    !data.is_empty() && data.as_ptr().align_offset(DIRECT_IO_ALIGN) == 0 && data.len().is_multiple_of(DIRECT_IO_ALIGN)
}

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
    Write { temp: PathBuf, destination: PathBuf, data: Bytes, direct: bool, reply: oneshot::Sender<io::Result<()>> },
}

/// Reads and writes chunk files.
#[derive(Clone)]
pub struct ChunkIo {
    kind: IoBackendKind,
    reason: Arc<str>,
    uring: Option<Arc<UringPool>>,
    /// Whether the filesystem takes `O_DIRECT` writes, and why not when it does not.
    direct: Result<(), Arc<str>>,
}

impl std::fmt::Debug for ChunkIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkIo")
            .field("kind", &self.kind)
            .field("reason", &self.reason)
            .field("direct", &self.direct)
            .finish()
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
    /// `direct` asks for direct writes; they are used if a probe write in `probe_dir` succeeds.
    pub async fn start(choice: IoBackendChoice, direct: bool, probe_dir: &Path) -> io::Result<Self> {
        let mut chunk_io = Self::start_backend(choice, probe_dir).await?;
        chunk_io.direct = if direct {
            chunk_io.probe_direct(probe_dir).await.map_err(|error| {
                tracing::warn!(%error, dir = %probe_dir.display(), "the filesystem refuses O_DIRECT; chunk writes go through the page cache");
                Arc::from(format!("probe failed: {error}"))
            })
        } else {
            Err(Arc::from("off by configuration (direct_writes = false)"))
        };
        Ok(chunk_io)
    }

    /// Writes one aligned block with `O_DIRECT` through the chosen backend and reads it back.
    async fn probe_direct(&self, probe_dir: &Path) -> io::Result<()> {
        let (mut buffer, start) = aligned_vec(DIRECT_IO_ALIGN);
        buffer.extend((0..DIRECT_IO_ALIGN).map(|at| (at % 251) as u8));
        let data = Bytes::from(buffer).slice(start..);
        let temp = probe_dir.join("direct-probe.tmp");
        let destination = probe_dir.join("direct-probe");
        let _ = std::fs::remove_file(&temp);
        self.write(temp, destination.clone(), data.clone(), true).await?;
        let read = self.read(destination.clone()).await;
        let _ = std::fs::remove_file(&destination);
        if read? != data {
            return Err(io::Error::other("a direct write read back different bytes"));
        }
        Ok(())
    }

    async fn start_backend(choice: IoBackendChoice, probe_dir: &Path) -> io::Result<Self> {
        match choice {
            IoBackendChoice::Portable => Ok(Self::portable("forced by configuration (io_backend = portable)")),
            IoBackendChoice::IoUring => {
                let uring = UringPool::start(probe_dir).await?;
                Ok(Self {
                    kind: IoBackendKind::IoUring,
                    reason: "forced by configuration (io_backend = io-uring)".into(),
                    uring: Some(Arc::new(uring)),
                    direct: Ok(()),
                })
            }
            IoBackendChoice::Auto => match UringPool::start(probe_dir).await {
                Ok(uring) => Ok(Self {
                    kind: IoBackendKind::IoUring,
                    reason: "auto: io_uring probe succeeded".into(),
                    uring: Some(Arc::new(uring)),
                    direct: Ok(()),
                }),
                Err(error) => {
                    tracing::warn!(%error, "io_uring is not available; using the portable backend");
                    Ok(Self::portable(&format!("auto: io_uring probe failed ({error})")))
                }
            },
        }
    }

    fn portable(reason: &str) -> Self {
        Self { kind: IoBackendKind::Portable, reason: reason.into(), uring: None, direct: Ok(()) }
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

    /// Whether writes of aligned chunks bypass the page cache; the reason when they do not.
    pub fn direct_writes(&self) -> Result<(), &str> {
        self.direct.as_ref().map(|_| ()).map_err(|reason| &**reason)
    }

    /// Writes `data` to `temp`, syncs it, renames it to `destination` and syncs the directory.
    /// With `O_DIRECT` when the filesystem takes it and `data` is [`direct_eligible`].
    pub async fn write_durable(&self, temp: PathBuf, destination: PathBuf, data: Bytes) -> io::Result<()> {
        let direct = self.direct.is_ok() && direct_eligible(&data);
        self.write(temp, destination, data, direct).await?;
        if direct {
            metrics::counter!("cachemesh_store_direct_writes_total").increment(1);
        }
        Ok(())
    }

    async fn write(&self, temp: PathBuf, destination: PathBuf, data: Bytes, direct: bool) -> io::Result<()> {
        match &self.uring {
            Some(pool) => {
                let (reply, answer) = oneshot::channel();
                pool.send(Command::Write { temp, destination, data, direct, reply }).await?;
                answer.await.map_err(|_| backend_gone())?
            }
            None => tokio::task::spawn_blocking(move || write_portable(&temp, &destination, &data, direct))
                .await
                .map_err(io::Error::other)?,
        }
    }
}

/// An empty vector with room for `length` bytes after `start` padding bytes, `start` chosen
/// so that byte `start` lies on a [`DIRECT_IO_ALIGN`] boundary. The padding is zeroed and
/// already in the vector: append the payload, then take `Bytes::from(vec).slice(start..)`
/// (no reallocation while the payload fits the room asked for).
pub fn aligned_vec(length: usize) -> (Vec<u8>, usize) {
    let mut buffer: Vec<u8> = Vec::with_capacity(length + DIRECT_IO_ALIGN - 1);
    let start = buffer.as_ptr().align_offset(DIRECT_IO_ALIGN).min(DIRECT_IO_ALIGN - 1);
    buffer.resize(start, 0);
    (buffer, start)
}

fn direct_flags(direct: bool) -> i32 {
    if direct { libc::O_DIRECT } else { 0 }
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

fn write_portable(temp: &Path, destination: &Path, data: &[u8], direct: bool) -> io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file =
        std::fs::OpenOptions::new().write(true).create_new(true).custom_flags(direct_flags(direct)).open(temp)?;
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
            let command =
                Command::Write { temp, destination: destination.clone(), data: data.clone(), direct: false, reply };
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
        Command::Write { temp, destination, data, direct, reply } => {
            let _ = reply.send(write_uring(&temp, &destination, data, direct).await);
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

async fn write_uring(temp: &Path, destination: &Path, data: Bytes, direct: bool) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = tokio_uring::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(direct_flags(direct))
        .open(temp)
        .await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_vec_starts_on_a_block_boundary_and_keeps_it_as_bytes() {
        // Goal: the payload appended to an `aligned_vec` starts on a block boundary, is not
        // moved by a reallocation, and stays there once sliced as `Bytes`.
        for length in [0, 1, DIRECT_IO_ALIGN - 1, DIRECT_IO_ALIGN, 3 * DIRECT_IO_ALIGN + 7, 4 << 20] {
            let (mut buffer, start) = aligned_vec(length);
            buffer.extend(std::iter::repeat_n(7u8, length));
            let bytes = Bytes::from(buffer).slice(start..);
            assert_eq!(bytes.len(), length);
            assert!(bytes.iter().all(|&byte| byte == 7));
            assert_eq!(bytes.as_ptr().align_offset(DIRECT_IO_ALIGN), 0, "length {length}");
            assert_eq!(direct_eligible(&bytes), length > 0 && length.is_multiple_of(DIRECT_IO_ALIGN));
        }
    }

    #[test]
    fn only_whole_aligned_blocks_are_direct_eligible() {
        // Goal: O_DIRECT is asked only for memory it accepts: aligned start, whole blocks.
        let (mut buffer, start) = aligned_vec(2 * DIRECT_IO_ALIGN + 1);
        buffer.extend((0..=2 * DIRECT_IO_ALIGN).map(|at| at as u8));
        let bytes = Bytes::from(buffer).slice(start..);
        assert!(direct_eligible(&bytes[..DIRECT_IO_ALIGN]));
        assert!(direct_eligible(&bytes[..2 * DIRECT_IO_ALIGN]));
        assert!(!direct_eligible(&bytes[1..=DIRECT_IO_ALIGN]), "misaligned start");
        assert!(!direct_eligible(&bytes[..=DIRECT_IO_ALIGN]), "not whole blocks");
        assert!(!direct_eligible(&bytes[..0]), "empty");
    }
}
