//! The chunk store on local NVMe: chunk files, a redb index, LRU eviction, pins.
//!
//! Layout under the data directory:
//! - `chunks/<first two hex digits>/<chunk id>`: one file per chunk, exactly its bytes;
//! - `tmp/`: writes in progress (emptied at start-up);
//! - `index.redb`: chunk -> (size, last use), object -> manifest, pinned objects;
//! - `lock`: held (`flock`) by the one process using the directory.
//!
//! Invariants:
//! - A chunk's bytes are hash-checked before they are written and, unless `verify_reads`
//!   is off, after every read; a chunk that fails is deleted and reported as absent, so the
//!   caller refetches it. Nothing unverified leaves this module.
//! - A chunk file appears under `chunks/` only by an atomic rename of a synced temp file,
//!   and the index names a chunk only after its file is durable. After a crash the index
//!   may lack a file (adopted at start-up if its hash checks) but never names a partial one.
//! - `used_bytes` never exceeds the budget once writes complete: space is reserved before
//!   a write and victims are evicted first. Pinned chunks and chunks being read are never
//!   evicted.
//! - The recency order lives in memory; last-use times are written back in batches, so a
//!   crash loses recency information only, never data.
//!
//! Non-goals: manifests do not count against the budget and are never evicted (they are
//! 32 bytes per 4 MiB chunk); chunk reads are whole-chunk (ranges are cut in memory).

mod io;
pub mod residency;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cachemesh_proto::api::StoreStatus;
use cachemesh_proto::limits::CHUNK_BYTES_MAX;
use cachemesh_proto::{ChunkId, Manifest, ObjectId};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::chunk::VerifiedChunk;
pub use io::{ChunkIo, DIRECT_IO_ALIGN, IoBackendChoice, IoBackendKind, aligned_vec, direct_eligible};
use residency::Residency;

const CHUNKS: TableDefinition<[u8; 32], (u32, u64)> = TableDefinition::new("chunks");
const MANIFESTS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("manifests");
const PINS: TableDefinition<[u8; 32], ()> = TableDefinition::new("pinned_objects");

/// Most last-use updates kept before they are written back.
pub const TOUCHED_CHUNKS_MAX: usize = 65_536;

/// Errors of the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("store I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The index database failed.
    #[error("store index: {0}")]
    Index(#[from] redb::Error),
    /// A chunk larger than `CHUNK_BYTES_MAX` was offered.
    #[error("chunk {id} has {size} bytes, more than CHUNK_BYTES_MAX")]
    ChunkTooLarge {
        /// The chunk.
        id: ChunkId,
        /// Its size.
        size: usize,
    },
    /// No room: every chunk is pinned or being read, or the disk is full.
    #[error("no room in the chunk store for {needed} more bytes ({detail})")]
    NoRoom {
        /// Bytes needed.
        needed: u64,
        /// Why.
        detail: String,
    },
    /// Another process holds the data directory.
    #[error("data directory {0} is in use by another cachemeshd")]
    Locked(PathBuf),
    /// A blocking task panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::StorageFull {
            StoreError::NoRoom { needed: 0, detail: format!("disk full writing {}", path.display()) }
        } else {
            StoreError::Io { path: path.to_path_buf(), source }
        }
    }
}

fn index_error(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Index(error.into())
}

/// How the store is set up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The byte budget for chunks.
    pub budget_bytes: u64,
    /// Whether every read is hash-checked.
    pub verify_reads: bool,
    /// Which I/O backend to use.
    pub io_backend: IoBackendChoice,
    /// Whether to write full chunks past the page cache when the filesystem takes it.
    pub direct_writes: bool,
}

#[derive(Debug, Default)]
struct Counters {
    evicted_chunks: AtomicU64,
}

struct State {
    residency: Residency,
    /// Chunks read since the last write-back, with the time they were read.
    touched: HashMap<ChunkId, u64>,
    pinned_objects: HashSet<ObjectId>,
}

struct Inner {
    config: StoreConfig,
    io: ChunkIo,
    index: redb::Database,
    /// A std mutex: it is never held across an `.await`.
    state: Mutex<State>,
    counters: Counters,
    _lock: std::fs::File,
}

/// The chunk store. Cheap to clone; clones share the store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("data_dir", &self.inner.config.data_dir).finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Where chunk `id` lives under `data_dir`.
pub fn chunk_path(data_dir: &Path, id: &ChunkId) -> PathBuf {
    let name = id.to_string();
    data_dir.join("chunks").join(&name[..2]).join(name)
}

fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = data_dir.join("lock");
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_error(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(data_dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Io { path, source }),
    }
}

async fn blocking<T: Send + 'static>(
    task: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(task).await.map_err(|error| StoreError::Task(error.to_string()))?
}

impl Store {
    /// Opens (creating if needed) the store, reconciling index and files after a crash.
    pub async fn open(config: StoreConfig) -> Result<Self, StoreError> {
        let data_dir = config.data_dir.clone();
        for dir in [data_dir.clone(), data_dir.join("chunks"), data_dir.join("tmp")] {
            std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        let lock = lock_data_dir(&data_dir)?;
        let temp_dir = data_dir.join("tmp");
        clear_dir(&temp_dir)?;
        let io =
            ChunkIo::start(config.io_backend, config.direct_writes, &temp_dir).await.map_err(io_error(&temp_dir))?;
        tracing::info!(
            backend = io.kind().name(),
            reason = io.reason(),
            direct_writes = io.direct_writes().is_ok(),
            "chunk I/O backend chosen"
        );
        let budget_bytes = config.budget_bytes;
        let (index, residency, pinned_objects) = blocking(move || {
            let index_path = data_dir.join("index.redb");
            let index = redb::Database::create(&index_path).map_err(index_error)?;
            let reconciled = reconcile(&data_dir, &index, budget_bytes)?;
            Ok((index, reconciled.0, reconciled.1))
        })
        .await?;
        let store = Self {
            inner: Arc::new(Inner {
                config,
                io,
                index,
                state: Mutex::new(State { residency, touched: HashMap::new(), pinned_objects }),
                counters: Counters::default(),
                _lock: lock,
            }),
        };
        // The budget may have shrunk since the last run.
        store.evict_to_budget().await?;
        store.publish_gauges();
        Ok(store)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock is a bug elsewhere; the state itself stays
        // consistent between statements, so keep serving.
        self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The I/O backend running.
    pub fn io_backend(&self) -> IoBackendKind {
        self.inner.io.kind()
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.state().residency.contains(id)
    }

    /// Reads a chunk; `Ok(None)` when it is not held or failed verification (then it has
    /// been deleted and should be fetched again).
    pub async fn read_chunk(&self, id: &ChunkId) -> Result<Option<Bytes>, StoreError> {
        {
            let mut state = self.state();
            if !state.residency.lease(id) {
                return Ok(None);
            }
            if state.touched.len() < TOUCHED_CHUNKS_MAX {
                state.touched.insert(*id, now_ms());
            }
        }
        let path = chunk_path(&self.inner.config.data_dir, id);
        let read = self.inner.io.read(path.clone()).await;
        self.state().residency.release(id);
        let data = match read {
            Ok(data) => data,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(chunk = %id, "indexed chunk file is missing; dropping it");
                self.drop_chunk(id).await?;
                return Ok(None);
            }
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        if self.inner.config.verify_reads && !id.matches(&data) {
            tracing::warn!(chunk = %id, path = %path.display(), "chunk failed verification on read; dropping it");
            metrics::counter!("cachemesh_verify_failures_total", "source" => "local").increment(1);
            self.drop_chunk(id).await?;
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// Stores a chunk durably; an existing chunk is a no-op. The bytes were hash-checked
    /// where they entered the node (that is what a [`VerifiedChunk`] is), so they are not
    /// hashed again here.
    pub async fn write_chunk(&self, chunk: VerifiedChunk) -> Result<(), StoreError> {
        let id = chunk.id();
        let data = chunk.into_bytes();
        if data.len() > CHUNK_BYTES_MAX as usize {
            return Err(StoreError::ChunkTooLarge { id, size: data.len() });
        }
        let size = data.len() as u32;
        let victims = {
            let mut state = self.state();
            if state.residency.contains(&id) {
                return Ok(());
            }
            state.residency.reserve(size).map_err(|no_room| StoreError::NoRoom {
                needed: no_room.needed,
                detail: format!("only {} bytes are evictable; the rest is pinned or being read", no_room.evictable),
            })?
        };
        let written = self.write_reserved(id, data, victims).await;
        match written {
            Ok(()) => {
                self.state().residency.commit(id, size);
                self.publish_gauges();
                Ok(())
            }
            Err(error) => {
                self.state().residency.abort(size);
                self.publish_gauges();
                Err(error)
            }
        }
    }

    async fn write_reserved(&self, id: ChunkId, data: Bytes, victims: Vec<(ChunkId, u32)>) -> Result<(), StoreError> {
        self.delete_evicted(victims).await?;
        let data_dir = &self.inner.config.data_dir;
        let destination = chunk_path(data_dir, &id);
        if let Some(parent) = destination.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io_error(parent))?;
        }
        let temp = data_dir.join("tmp").join(format!("{id}.{:016x}", rand::random::<u64>()));
        // The caller checked the length against CHUNK_BYTES_MAX.
        let size = data.len() as u32;
        self.inner.io.write_durable(temp, destination.clone(), data).await.map_err(io_error(&destination))?;
        let store = self.clone();
        blocking(move || {
            let transaction = store.inner.index.begin_write().map_err(index_error)?;
            {
                let mut chunks = transaction.open_table(CHUNKS).map_err(index_error)?;
                chunks.insert(*id.as_bytes(), (size, now_ms())).map_err(index_error)?;
            }
            transaction.commit().map_err(index_error)
        })
        .await
    }

    async fn delete_evicted(&self, victims: Vec<(ChunkId, u32)>) -> Result<(), StoreError> {
        if victims.is_empty() {
            return Ok(());
        }
        let count = victims.len() as u64;
        self.inner.counters.evicted_chunks.fetch_add(count, Ordering::Relaxed);
        metrics::counter!("cachemesh_evicted_chunks_total").increment(count);
        tracing::debug!(count, "evicting chunks");
        let store = self.clone();
        blocking(move || {
            // Index first, then files: a crash in between leaves orphan files, which start-up
            // adopts or deletes; never an index entry without its file.
            let transaction = store.inner.index.begin_write().map_err(index_error)?;
            {
                let mut chunks = transaction.open_table(CHUNKS).map_err(index_error)?;
                for (id, _) in &victims {
                    chunks.remove(*id.as_bytes()).map_err(index_error)?;
                }
            }
            transaction.commit().map_err(index_error)?;
            for (id, _) in &victims {
                let path = chunk_path(&store.inner.config.data_dir, id);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(StoreError::Io { path, source }),
                }
            }
            Ok(())
        })
        .await
    }

    /// Deletes a chunk that failed verification or lost its file.
    async fn drop_chunk(&self, id: &ChunkId) -> Result<(), StoreError> {
        if !self.state().residency.remove(id) {
            return Ok(());
        }
        self.delete_evicted_quietly(*id).await?;
        self.publish_gauges();
        Ok(())
    }

    async fn delete_evicted_quietly(&self, id: ChunkId) -> Result<(), StoreError> {
        let store = self.clone();
        blocking(move || {
            let transaction = store.inner.index.begin_write().map_err(index_error)?;
            {
                let mut chunks = transaction.open_table(CHUNKS).map_err(index_error)?;
                chunks.remove(*id.as_bytes()).map_err(index_error)?;
            }
            transaction.commit().map_err(index_error)?;
            let path = chunk_path(&store.inner.config.data_dir, &id);
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(StoreError::Io { path, source }),
            }
        })
        .await
    }

    async fn evict_to_budget(&self) -> Result<(), StoreError> {
        let victims = {
            let mut state = self.state();
            if state.residency.used_bytes() <= state.residency.budget_bytes() {
                return Ok(());
            }
            match state.residency.reserve(0) {
                Ok(victims) => victims,
                Err(_) => {
                    tracing::warn!("the store holds more pinned bytes than its budget");
                    return Ok(());
                }
            }
        };
        self.delete_evicted(victims).await
    }

    /// The manifest of `id`, when held.
    pub async fn manifest(&self, id: &ObjectId) -> Result<Option<Manifest>, StoreError> {
        let store = self.clone();
        let id = *id;
        blocking(move || {
            let transaction = store.inner.index.begin_read().map_err(index_error)?;
            let manifests = match transaction.open_table(MANIFESTS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(error) => return Err(index_error(error)),
            };
            let Some(bytes) = manifests.get(*id.as_bytes()).map_err(index_error)? else {
                return Ok(None);
            };
            let bytes = bytes.value();
            // Our own invariant, checked in pair with the check in `put_manifest`.
            if ObjectId::of(bytes) != id {
                tracing::error!(object = %id, "stored manifest does not match its id; ignoring it");
                return Ok(None);
            }
            Ok(Manifest::decode(bytes).ok())
        })
        .await
    }

    /// Ids of every manifest held.
    pub async fn manifest_ids(&self) -> Result<Vec<ObjectId>, StoreError> {
        let store = self.clone();
        blocking(move || {
            let transaction = store.inner.index.begin_read().map_err(index_error)?;
            let manifests = match transaction.open_table(MANIFESTS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(error) => return Err(index_error(error)),
            };
            let mut ids = Vec::new();
            for entry in manifests.iter().map_err(index_error)? {
                let (key, _) = entry.map_err(index_error)?;
                ids.push(ObjectId::from_bytes(key.value()));
            }
            Ok(ids)
        })
        .await
    }

    /// Stores a manifest (already verified against its id by the caller).
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<ObjectId, StoreError> {
        let encoded = manifest.encode();
        let id = ObjectId::of(&encoded);
        let store = self.clone();
        blocking(move || {
            let transaction = store.inner.index.begin_write().map_err(index_error)?;
            {
                let mut manifests = transaction.open_table(MANIFESTS).map_err(index_error)?;
                manifests.insert(*id.as_bytes(), encoded.as_slice()).map_err(index_error)?;
            }
            transaction.commit().map_err(index_error)
        })
        .await?;
        Ok(id)
    }

    /// Pins an object: its chunks are never evicted until it is unpinned. Persistent.
    pub async fn pin_object(&self, id: &ObjectId, manifest: &Manifest) -> Result<(), StoreError> {
        let store = self.clone();
        let key = *id.as_bytes();
        blocking(move || {
            let transaction = store.inner.index.begin_write().map_err(index_error)?;
            transaction.open_table(PINS).map_err(index_error)?.insert(key, ()).map_err(index_error)?;
            transaction.commit().map_err(index_error)
        })
        .await?;
        let mut state = self.state();
        if state.pinned_objects.insert(*id) {
            for chunk in manifest.chunks() {
                state.residency.pin(*chunk);
            }
        }
        Ok(())
    }

    /// Removes an object's pin; false when it was not pinned.
    pub async fn unpin_object(&self, id: &ObjectId, manifest: &Manifest) -> Result<bool, StoreError> {
        let store = self.clone();
        let key = *id.as_bytes();
        blocking(move || {
            let transaction = store.inner.index.begin_write().map_err(index_error)?;
            transaction.open_table(PINS).map_err(index_error)?.remove(key).map_err(index_error)?;
            transaction.commit().map_err(index_error)
        })
        .await?;
        let mut state = self.state();
        if !state.pinned_objects.remove(id) {
            return Ok(false);
        }
        for chunk in manifest.chunks() {
            state.residency.unpin(chunk);
        }
        Ok(true)
    }

    /// Objects pinned.
    pub fn pinned_objects(&self) -> Vec<ObjectId> {
        self.state().pinned_objects.iter().copied().collect()
    }

    /// Writes recent last-use times back to the index (done periodically and at shutdown).
    pub async fn flush_recency(&self) -> Result<(), StoreError> {
        let touched = std::mem::take(&mut self.state().touched);
        if touched.is_empty() {
            return Ok(());
        }
        let store = self.clone();
        blocking(move || {
            let transaction = store.inner.index.begin_write().map_err(index_error)?;
            {
                let mut chunks = transaction.open_table(CHUNKS).map_err(index_error)?;
                for (id, last_use) in touched {
                    let size = chunks.get(*id.as_bytes()).map_err(index_error)?.map(|entry| entry.value().0);
                    if let Some(size) = size {
                        chunks.insert(*id.as_bytes(), (size, last_use)).map_err(index_error)?;
                    }
                }
            }
            transaction.commit().map_err(index_error)
        })
        .await
    }

    fn publish_gauges(&self) {
        let state = self.state();
        metrics::gauge!("cachemesh_cache_used_bytes").set(state.residency.used_bytes() as f64);
        metrics::gauge!("cachemesh_cache_budget_bytes").set(state.residency.budget_bytes() as f64);
        metrics::gauge!("cachemesh_cache_chunks").set(state.residency.chunk_count() as f64);
    }

    /// The store's part of `status`.
    pub async fn status(&self) -> Result<StoreStatus, StoreError> {
        let store = self.clone();
        let manifest_count = blocking(move || {
            let transaction = store.inner.index.begin_read().map_err(index_error)?;
            match transaction.open_table(MANIFESTS) {
                Ok(table) => Ok(redb::ReadableTableMetadata::len(&table).map_err(index_error)?),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(error) => Err(index_error(error)),
            }
        })
        .await?;
        let state = self.state();
        Ok(StoreStatus {
            data_dir: self.inner.config.data_dir.display().to_string(),
            io_backend: self.inner.io.kind().name().to_string(),
            io_backend_reason: self.inner.io.reason().to_string(),
            direct_writes: self.inner.io.direct_writes().is_ok(),
            direct_writes_reason: match self.inner.io.direct_writes() {
                Ok(()) => "probe succeeded".to_string(),
                Err(reason) => reason.to_string(),
            },
            verify_reads: self.inner.config.verify_reads,
            used_bytes: state.residency.used_bytes(),
            budget_bytes: state.residency.budget_bytes(),
            chunk_count: state.residency.chunk_count(),
            pinned_chunk_count: state.residency.pinned_resident_count(),
            manifest_count,
            evicted_chunks: self.inner.counters.evicted_chunks.load(Ordering::Relaxed),
        })
    }
}

fn clear_dir(dir: &Path) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        std::fs::remove_file(&path).map_err(io_error(&path))?;
    }
    Ok(())
}

/// Chunk files under `chunks/`, with their sizes; names that are not chunk ids included
/// as `None` so that the caller can remove them.
fn chunk_files(data_dir: &Path) -> Result<Vec<(PathBuf, Option<ChunkId>, u64)>, StoreError> {
    let root = data_dir.join("chunks");
    let mut files = Vec::new();
    for shard in std::fs::read_dir(&root).map_err(io_error(&root))? {
        let shard = shard.map_err(io_error(&root))?.path();
        if !shard.is_dir() {
            files.push((shard, None, 0));
            continue;
        }
        for entry in std::fs::read_dir(&shard).map_err(io_error(&shard))? {
            let entry = entry.map_err(io_error(&shard))?;
            let path = entry.path();
            let size = entry.metadata().map_err(io_error(&path))?.len();
            let id = entry.file_name().to_str().and_then(|name| name.parse::<ChunkId>().ok());
            let id = id.filter(|id| chunk_path(data_dir, id) == path);
            files.push((path, id, size));
        }
    }
    Ok(files)
}

/// Brings index and files into agreement after any stop, clean or not.
fn reconcile(
    data_dir: &Path,
    index: &redb::Database,
    budget_bytes: u64,
) -> Result<(Residency, HashSet<ObjectId>), StoreError> {
    let files: HashMap<ChunkId, (PathBuf, u64)> = {
        let mut by_id = HashMap::new();
        for (path, id, size) in chunk_files(data_dir)? {
            match id {
                Some(id) => {
                    by_id.insert(id, (path, size));
                }
                None => {
                    tracing::warn!(path = %path.display(), "removing a stray file from the chunk directory");
                    std::fs::remove_file(&path).map_err(io_error(&path))?;
                }
            }
        }
        by_id
    };
    let transaction = index.begin_write().map_err(index_error)?;
    let mut entries: Vec<(ChunkId, u32, u64)> = Vec::new();
    let mut pinned_objects = HashSet::new();
    let mut pinned_chunks = Vec::new();
    {
        let mut chunks = transaction.open_table(CHUNKS).map_err(index_error)?;
        let mut stale = Vec::new();
        for entry in chunks.iter().map_err(index_error)? {
            let (key, value) = entry.map_err(index_error)?;
            let id = ChunkId::from_bytes(key.value());
            let (size, last_use) = value.value();
            match files.get(&id) {
                Some((_, file_size)) if *file_size == u64::from(size) => entries.push((id, size, last_use)),
                Some((path, _)) => {
                    tracing::warn!(chunk = %id, "chunk file size disagrees with the index; removing both");
                    std::fs::remove_file(path).map_err(io_error(path))?;
                    stale.push(id);
                }
                None => stale.push(id),
            }
        }
        for id in &stale {
            chunks.remove(*id.as_bytes()).map_err(index_error)?;
        }
        // Files without an index entry: a crash between rename and index commit, or between
        // eviction's index commit and unlink. Adopt those whose bytes check; remove the rest.
        let indexed: HashSet<ChunkId> = entries.iter().map(|(id, _, _)| *id).collect();
        for (id, (path, size)) in &files {
            if indexed.contains(id) || stale.contains(id) {
                continue;
            }
            let bytes = std::fs::read(path).map_err(io_error(path))?;
            if *size <= u64::from(CHUNK_BYTES_MAX) && id.matches(&bytes) {
                chunks.insert(*id.as_bytes(), (*size as u32, 0)).map_err(index_error)?;
                entries.push((*id, *size as u32, 0));
            } else {
                tracing::warn!(chunk = %id, "removing an unindexed chunk file that fails verification");
                std::fs::remove_file(path).map_err(io_error(path))?;
            }
        }
        let pins = transaction.open_table(PINS).map_err(index_error)?;
        let manifests = transaction.open_table(MANIFESTS).map_err(index_error)?;
        for entry in pins.iter().map_err(index_error)? {
            let (key, _) = entry.map_err(index_error)?;
            let object = ObjectId::from_bytes(key.value());
            if let Some(bytes) = manifests.get(key.value()).map_err(index_error)?
                && let Ok(manifest) = Manifest::decode(bytes.value())
            {
                pinned_chunks.extend_from_slice(manifest.chunks());
                pinned_objects.insert(object);
            }
        }
    }
    transaction.commit().map_err(index_error)?;
    entries.sort_by_key(|(_, _, last_use)| *last_use);
    let mut residency = Residency::new(budget_bytes);
    for (id, size, _) in entries {
        residency.load(id, size);
    }
    for chunk in pinned_chunks {
        residency.pin(chunk);
    }
    Ok((residency, pinned_objects))
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Indexed chunks read and hashed.
    pub chunks_checked: u64,
    /// Indexed chunks whose bytes do not match their id.
    pub corrupt_chunks: u64,
    /// Indexed chunks whose file is missing or has the wrong size.
    pub missing_files: u64,
    /// Chunk files with no index entry.
    pub orphan_files: u64,
    /// Files left in `tmp/`.
    pub temp_files: u64,
    /// Whether nothing was found.
    pub ok: bool,
}

/// Checks a stopped store without changing it: every indexed chunk is read and hashed.
pub fn check(data_dir: &Path) -> Result<CheckReport, StoreError> {
    let _lock = lock_data_dir(data_dir)?;
    let index = redb::Database::open(data_dir.join("index.redb")).map_err(index_error)?;
    let transaction = index.begin_read().map_err(index_error)?;
    let mut report = CheckReport::default();
    let mut indexed = HashSet::new();
    match transaction.open_table(CHUNKS) {
        Ok(chunks) => {
            for entry in chunks.iter().map_err(index_error)? {
                let (key, value) = entry.map_err(index_error)?;
                let id = ChunkId::from_bytes(key.value());
                indexed.insert(id);
                report.chunks_checked += 1;
                match std::fs::read(chunk_path(data_dir, &id)) {
                    Ok(bytes) if bytes.len() as u64 != u64::from(value.value().0) => report.missing_files += 1,
                    Ok(bytes) if !id.matches(&bytes) => report.corrupt_chunks += 1,
                    Ok(_) => {}
                    Err(_) => report.missing_files += 1,
                }
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(error) => return Err(index_error(error)),
    }
    for (_, id, _) in chunk_files(data_dir)? {
        if !id.is_some_and(|id| indexed.contains(&id)) {
            report.orphan_files += 1;
        }
    }
    let temp_dir = data_dir.join("tmp");
    if temp_dir.exists() {
        report.temp_files = std::fs::read_dir(&temp_dir).map_err(io_error(&temp_dir))?.count() as u64;
    }
    report.ok = report.corrupt_chunks == 0 && report.missing_files == 0;
    Ok(report)
}
