//! Volumes: shared file namespaces mapping paths to immutable objects.
//!
//! A volume's path table lives in the origin as an append-only log of records (put,
//! rename, delete) at `volumes/<volume>/log/<seq, 20 digits>`, sequence numbers from 1 and
//! dense, plus snapshots of the whole table at `volumes/<volume>/snapshots/<seq>` written
//! every `snapshot_interval_records` records. Each node folds the log into its own view
//! (`view`, redb) and answers reads from it.
//!
//! Appending is compare-and-append: under the volume's lock, catch up to the log's head `n`,
//! check the op against the view at `n` (`table::check`), then write record `n + 1` with a
//! create-only put. Success means no one else wrote `n + 1`, so the outcome is exactly the
//! one checked: the record is folded into the view and the writer answered with its
//! sequence number (a writer reads its own writes). A lost race catches up and tries again,
//! at most [`VOLUME_APPEND_RETRIES_MAX`] times.
//!
//! Freshness: a background tailer catches up every followed volume every
//! [`VOLUME_POLL_INTERVAL`]; a read first catches up when the last attempt is older than
//! [`VOLUME_READ_STALENESS_MAX`], so a write on another host is visible to a read here
//! within about that bound plus one origin round trip. In a mesh, a writer also announces
//! the volume's new head to its DC (gossip, see `discovery`), and [`Volumes::nudge`] makes
//! every node that follows the volume catch up at once, before any read asks.
//!
//! Invariants:
//! - Every node folds the same records in the same order with the same pure rules, so all
//!   views of a volume at sequence `n` are equal.
//! - An acknowledged change is in the origin's log before the answer is sent.
//! - Reads resolve a path to an object id once; objects are immutable, so replacing or
//!   deleting the path never disturbs a read already streaming.
//! - A node that cannot reach the origin answers reads from its view (possibly stale) and
//!   refuses writes with `origin_unavailable`.
//!
//! Non-goals: deleting old log records or snapshots (compaction), directory renames,
//! garbage-collecting objects no path names, access control per volume.

mod table;
mod view;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cachemesh_proto::ObjectId;
use cachemesh_proto::api::PrefetchResponse;
use cachemesh_proto::limits::{VOLUME_RECORD_BYTES_MAX, VOLUME_SNAPSHOT_BYTES_MAX};
use cachemesh_proto::volume::{FileInfo, Op, Record, Snapshot, VolumeCodecError, VolumeName, VolumePath};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::fetch::{FetchError, ObjectContext};
use crate::objects::{FETCH_WINDOW_CHUNKS, Objects, OpenError};
use crate::origin::{Created, Origin, OriginError};

pub use table::Rejection;
pub use view::{Page, ViewError};

/// How often the tailer catches up every volume this node follows.
pub const VOLUME_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A read catches up first when the volume's last catch-up is older than this.
pub const VOLUME_READ_STALENESS_MAX: Duration = Duration::from_millis(250);
/// Lost races for the next sequence number before an append gives up (`volume_conflict`).
pub const VOLUME_APPEND_RETRIES_MAX: usize = 32;
/// Default records between snapshots.
pub const VOLUME_SNAPSHOT_INTERVAL_RECORDS_DEFAULT: u64 = 1000;
/// Most volumes one node follows (views kept, tailed).
pub const VOLUMES_OPEN_MAX: usize = 10_000;
/// Most log records read from the origin at once while catching up (the window doubles
/// from 1 while every read finds a record, so an idle poll costs one request).
pub const VOLUME_CATCH_UP_WINDOW_RECORDS_MAX: usize = 64;
/// Volumes the tailer catches up at once.
pub const VOLUME_TAIL_PARALLEL: usize = 8;
/// Files one prefetch warms at once (each with `FETCH_WINDOW_CHUNKS` chunks in flight).
pub const VOLUME_PREFETCH_FILES_PARALLEL: usize = 4;

/// Errors of volume operations, each naming the volume concerned.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No file at the path.
    #[error("volume {volume}: no file at {path:?}")]
    NotFound {
        /// The volume.
        volume: VolumeName,
        /// The path.
        path: String,
    },
    /// The op breaks the file tree.
    #[error("volume {volume}: {detail}")]
    PathConflict {
        /// The volume.
        volume: VolumeName,
        /// What collides.
        detail: String,
    },
    /// The volume holds `VOLUME_FILES_MAX` files.
    #[error("volume {0} holds VOLUME_FILES_MAX files already")]
    Full(VolumeName),
    /// Other writers kept winning the race for the next record.
    #[error("volume {volume}: lost the race for the next log record {attempts} times; retry later")]
    Contended {
        /// The volume.
        volume: VolumeName,
        /// Attempts made.
        attempts: usize,
    },
    /// This node follows `VOLUMES_OPEN_MAX` volumes.
    #[error("this node follows VOLUMES_OPEN_MAX ({VOLUMES_OPEN_MAX}) volumes already")]
    TooManyVolumes,
    /// A log record or snapshot in the origin is not valid.
    #[error("volume {volume}: {key} in the origin is corrupt: {detail}")]
    Corrupt {
        /// The volume.
        volume: VolumeName,
        /// The key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// The origin failed.
    #[error(transparent)]
    Origin(#[from] OriginError),
    /// The view database failed.
    #[error(transparent)]
    View(#[from] ViewError),
    /// An object a path names could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A chunk could not be fetched.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A blocking task died.
    #[error("volume task failed: {0}")]
    Task(String),
}

impl VolumeError {
    fn from_rejection(volume: &VolumeName, rejection: Rejection) -> Self {
        match rejection {
            Rejection::NotFound(path) => Self::NotFound { volume: volume.clone(), path: path.to_string() },
            Rejection::FileInTheWay { path, file } => Self::PathConflict {
                volume: volume.clone(),
                detail: format!("cannot write {:?}: {file:?} is a file, not a directory", path.as_str()),
            },
            Rejection::IsDirectory(path) => Self::PathConflict {
                volume: volume.clone(),
                detail: format!("cannot write {:?}: it is a directory (files exist under it)", path.as_str()),
            },
            Rejection::Full => Self::Full(volume.clone()),
        }
    }

    /// Whether this is the origin (or its data) failing, as opposed to a rule or a local fault.
    fn is_origin_failure(&self) -> bool {
        matches!(self, Self::Origin(_) | Self::Corrupt { .. })
    }
}

/// Volume settings.
#[derive(Debug, Clone)]
pub struct VolumeSettings {
    /// A writer that appends a record whose sequence is a multiple of this writes a snapshot.
    pub snapshot_interval_records: u64,
}

/// The answer to a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The record's sequence number.
    pub seq: u64,
    /// Its timestamp.
    pub written_at_ms: u64,
}

/// What a listing holds.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The view's head when listed.
    pub seq: u64,
    /// The page.
    pub page: Page,
}

/// One volume's in-memory state.
struct VolumeState {
    name: VolumeName,
    /// Serialises catch-ups and appends of this volume within the node. A tokio mutex: it
    /// is held across origin requests.
    tail: tokio::sync::Mutex<Tail>,
    /// When the last catch-up was attempted. A std mutex, never held across an `.await`.
    attempted_at: Mutex<Option<Instant>>,
    /// Whether the last catch-up failed (to log transitions, not every failure).
    failing: AtomicBool,
    /// Whether the view holds any record of this volume. The tailer skips empty volumes
    /// (a read of a name nobody wrote must not cost an origin request a second forever);
    /// reads still catch them up on demand.
    has_records: AtomicBool,
}

struct Tail {
    /// Whether the origin's latest snapshot was considered since this process started.
    snapshot_checked: bool,
}

impl VolumeState {
    fn stale(&self, bound: Duration) -> bool {
        let attempted = self.attempted_at.lock().map(|at| *at).unwrap_or(None);
        attempted.is_none_or(|at| at.elapsed() >= bound)
    }

    fn mark_attempted(&self) {
        if let Ok(mut at) = self.attempted_at.lock() {
            *at = Some(Instant::now());
        }
    }
}

struct Inner {
    origin: Arc<Origin>,
    objects: Objects,
    view: Arc<view::View>,
    settings: VolumeSettings,
    /// A std mutex, never held across an `.await`.
    volumes: Mutex<HashMap<VolumeName, Arc<VolumeState>>>,
    announcer: std::sync::OnceLock<Announcer>,
}

/// Called with a volume and the sequence of a record this node just appended to it.
pub type Announcer = Arc<dyn Fn(&VolumeName, u64) + Send + Sync>;

/// The volumes this node serves.
#[derive(Clone)]
pub struct Volumes {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Volumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volumes").field("settings", &self.inner.settings).finish()
    }
}

/// Origin key of record `seq` of `volume`.
pub fn log_key(volume: &VolumeName, seq: u64) -> String {
    format!("volumes/{volume}/log/{seq:020}")
}

/// Origin key of the snapshot of `volume` at `seq`.
pub fn snapshot_key(volume: &VolumeName, seq: u64) -> String {
    format!("volumes/{volume}/snapshots/{seq:020}")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Describes the volume metrics.
pub fn describe_metrics() {
    use metrics::describe_counter;
    describe_counter!("cachemesh_volume_records_appended_total", "Volume log records this node appended.");
    describe_counter!(
        "cachemesh_volume_append_conflicts_total",
        "Appends that lost the race for a sequence number to another writer and retried."
    );
    describe_counter!("cachemesh_volume_records_folded_total", "Volume log records folded into this node's view.");
    describe_counter!(
        "cachemesh_volume_records_skipped_total",
        "Volume log records that broke the path-table rules and were skipped."
    );
    describe_counter!("cachemesh_volume_snapshots_written_total", "Volume snapshots this node wrote to the origin.");
    describe_counter!("cachemesh_volume_snapshots_loaded_total", "Volume snapshots this node started a view from.");
    describe_counter!(
        "cachemesh_volume_nudges_total",
        "Volume head announcements from other nodes handled, by outcome (caught_up, current, not_followed, failed)."
    );
    describe_counter!(
        "cachemesh_volume_catch_up_errors_total",
        "Catch-ups of a volume that failed (origin unreachable or a corrupt record)."
    );
}

impl Volumes {
    /// Opens the view at `<data_dir>/volumes.redb` and follows the volumes it holds.
    pub async fn open(
        data_dir: &Path,
        origin: Arc<Origin>,
        objects: Objects,
        settings: VolumeSettings,
    ) -> Result<Self, VolumeError> {
        let path = data_dir.join("volumes.redb");
        let view = tokio::task::spawn_blocking(move || view::View::open(&path))
            .await
            .map_err(|error| VolumeError::Task(error.to_string()))??;
        let view = Arc::new(view);
        let volumes = Self {
            inner: Arc::new(Inner {
                origin,
                objects,
                view: view.clone(),
                settings: VolumeSettings { snapshot_interval_records: settings.snapshot_interval_records.max(1) },
                volumes: Mutex::new(HashMap::new()),
                announcer: std::sync::OnceLock::new(),
            }),
        };
        let known = volumes.blocking(|view| view.volumes()).await?;
        for (name, head) in known {
            match VolumeName::parse(&name) {
                Ok(name) => match volumes.state(&name) {
                    Ok(state) => state.has_records.store(head > 0, Ordering::Relaxed),
                    Err(error) => tracing::warn!(volume = %name, %error, "not following a volume held in the view"),
                },
                Err(error) => tracing::warn!(volume = name, %error, "the view holds a badly named volume; ignored"),
            }
        }
        Ok(volumes)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        task: impl FnOnce(&view::View) -> Result<T, ViewError> + Send + 'static,
    ) -> Result<T, VolumeError> {
        let view = self.inner.view.clone();
        Ok(tokio::task::spawn_blocking(move || task(&view))
            .await
            .map_err(|error| VolumeError::Task(error.to_string()))??)
    }

    fn state(&self, volume: &VolumeName) -> Result<Arc<VolumeState>, VolumeError> {
        let mut volumes = self.inner.volumes.lock().map_err(|_| VolumeError::Task("volume table poisoned".into()))?;
        if let Some(state) = volumes.get(volume) {
            return Ok(state.clone());
        }
        if volumes.len() >= VOLUMES_OPEN_MAX {
            return Err(VolumeError::TooManyVolumes);
        }
        let state = Arc::new(VolumeState {
            name: volume.clone(),
            tail: tokio::sync::Mutex::new(Tail { snapshot_checked: false }),
            attempted_at: Mutex::new(None),
            failing: AtomicBool::new(false),
            has_records: AtomicBool::new(false),
        });
        volumes.insert(volume.clone(), state.clone());
        Ok(state)
    }

    async fn fetch_record(&self, volume: &VolumeName, seq: u64) -> Result<Option<Record>, VolumeError> {
        let key = log_key(volume, seq);
        let bytes = match self.inner.origin.get_value(&key, VOLUME_RECORD_BYTES_MAX as u64).await {
            Ok(bytes) => bytes,
            Err(OriginError::NotFound { .. }) => return Ok(None),
            Err(OriginError::TooLarge { size, .. }) => {
                return Err(VolumeError::Corrupt {
                    volume: volume.clone(),
                    key,
                    detail: format!("{size} bytes, more than VOLUME_RECORD_BYTES_MAX"),
                });
            }
            Err(error) => return Err(error.into()),
        };
        let record = Record::decode(&bytes).map_err(|error: VolumeCodecError| VolumeError::Corrupt {
            volume: volume.clone(),
            key: key.clone(),
            detail: error.to_string(),
        })?;
        if record.seq != seq {
            return Err(VolumeError::Corrupt {
                volume: volume.clone(),
                key,
                detail: format!("the record says it is number {}", record.seq),
            });
        }
        Ok(Some(record))
    }

    /// Starts the view from the origin's latest snapshot when it is ahead of the view.
    async fn load_latest_snapshot(&self, volume: &VolumeName) -> Result<(), VolumeError> {
        let prefix = format!("volumes/{volume}/snapshots/");
        let Some(key) = self.inner.origin.last_key(&prefix).await? else {
            return Ok(());
        };
        let Some(seq) = key.rsplit('/').next().and_then(|name| name.parse::<u64>().ok()) else {
            tracing::warn!(volume = %volume, key, "ignoring a snapshot key that is not a sequence number");
            return Ok(());
        };
        let name = volume.as_str().to_string();
        let head = self.blocking(move |view| view.head(&name)).await?;
        if seq <= head {
            return Ok(());
        }
        let bytes = match self.inner.origin.get_value(&key, VOLUME_SNAPSHOT_BYTES_MAX as u64).await {
            Ok(bytes) => bytes,
            Err(OriginError::TooLarge { size, .. }) => {
                let detail = format!("{size} bytes, more than VOLUME_SNAPSHOT_BYTES_MAX");
                return Err(VolumeError::Corrupt { volume: volume.clone(), key, detail });
            }
            Err(error) => return Err(error.into()),
        };
        let snapshot = Snapshot::decode(&bytes).map_err(|error| VolumeError::Corrupt {
            volume: volume.clone(),
            key: key.clone(),
            detail: error.to_string(),
        })?;
        if snapshot.seq != seq {
            let detail = format!("the snapshot says it is at {}", snapshot.seq);
            return Err(VolumeError::Corrupt { volume: volume.clone(), key, detail });
        }
        let name = volume.as_str().to_string();
        let files = snapshot.entries.len();
        self.blocking(move |view| view.load_snapshot(&name, &snapshot)).await?;
        metrics::counter!("cachemesh_volume_snapshots_loaded_total").increment(1);
        tracing::info!(volume = %volume, seq, files, previous_head = head, "volume view started from a snapshot");
        Ok(())
    }

    /// Folds every record after the view's head into the view; returns the new head. The
    /// caller holds the volume's lock.
    async fn catch_up(&self, state: &VolumeState, tail: &mut Tail) -> Result<u64, VolumeError> {
        let result = self.catch_up_inner(state, tail).await;
        state.mark_attempted();
        match &result {
            Ok(head) => {
                if *head > 0 {
                    state.has_records.store(true, Ordering::Relaxed);
                }
                if state.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(volume = %state.name, "volume catch-up works again");
                }
            }
            Err(error) => {
                metrics::counter!("cachemesh_volume_catch_up_errors_total").increment(1);
                if !state.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(volume = %state.name, %error, "volume catch-up failed; serving the view as it is");
                }
            }
        }
        result
    }

    async fn catch_up_inner(&self, state: &VolumeState, tail: &mut Tail) -> Result<u64, VolumeError> {
        let volume = &state.name;
        if !tail.snapshot_checked {
            self.load_latest_snapshot(volume).await?;
            tail.snapshot_checked = true;
        }
        let name = volume.as_str().to_string();
        let mut head = self.blocking(move |view| view.head(&name)).await?;
        let mut window = 1usize;
        loop {
            let fetches = (1..=window as u64).map(|offset| self.fetch_record(volume, head + offset));
            let results = futures::future::join_all(fetches).await;
            let mut records = Vec::new();
            let mut failure = None;
            let mut at_end = false;
            for result in results {
                match result {
                    Ok(Some(record)) => records.push(record),
                    Ok(None) => {
                        at_end = true;
                        break;
                    }
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            if !records.is_empty() {
                head = self.fold(volume, head, records).await?;
            }
            if let Some(error) = failure {
                return Err(error);
            }
            if at_end {
                return Ok(head);
            }
            window = (window * 2).min(VOLUME_CATCH_UP_WINDOW_RECORDS_MAX);
        }
    }

    async fn fold(&self, volume: &VolumeName, head: u64, records: Vec<Record>) -> Result<u64, VolumeError> {
        let name = volume.as_str().to_string();
        let count = records.len() as u64;
        let folded = self.blocking(move |view| view.fold(&name, head, &records)).await?;
        metrics::counter!("cachemesh_volume_records_folded_total").increment(count);
        for (seq, rejection) in &folded.skipped {
            metrics::counter!("cachemesh_volume_records_skipped_total").increment(1);
            tracing::warn!(volume = %volume, seq, ?rejection, "skipped a volume log record that breaks the rules");
        }
        Ok(folded.head)
    }

    /// Appends `op` to the log of `volume` (compare-and-append, see the module notes).
    pub async fn append(&self, volume: &VolumeName, op: Op) -> Result<Appended, VolumeError> {
        let state = self.state(volume)?;
        let mut tail = state.tail.lock().await;
        for _ in 0..VOLUME_APPEND_RETRIES_MAX {
            let head = self.catch_up(&state, &mut tail).await?;
            let name = volume.as_str().to_string();
            let checked_op = op.clone();
            if let Err(rejection) = self.blocking(move |view| view.check(&name, &checked_op)).await? {
                return Err(VolumeError::from_rejection(volume, rejection));
            }
            let record = Record { seq: head + 1, written_at_ms: now_ms(), nonce: rand::random(), op: op.clone() };
            let encoded = Bytes::from(record.encode());
            let key = log_key(volume, record.seq);
            let ours = match self.inner.origin.create(&key, encoded.clone()).await? {
                Created::Written => true,
                // A retried request may have written our record before its answer was lost.
                Created::AlreadyExists => match self.inner.origin.get_value(&key, VOLUME_RECORD_BYTES_MAX as u64).await
                {
                    Ok(existing) => existing == encoded,
                    Err(OriginError::NotFound { .. } | OriginError::TooLarge { .. }) => false,
                    Err(error) => return Err(error.into()),
                },
            };
            if !ours {
                metrics::counter!("cachemesh_volume_append_conflicts_total").increment(1);
                tracing::debug!(volume = %volume, seq = record.seq, "lost the race for a volume record; retrying");
                continue;
            }
            metrics::counter!("cachemesh_volume_records_appended_total").increment(1);
            let appended = Appended { seq: record.seq, written_at_ms: record.written_at_ms };
            let name = volume.as_str().to_string();
            let folded = self.blocking(move |view| view.fold(&name, head, &[record])).await?;
            if let Some((seq, rejection)) = folded.skipped.first() {
                // Checked against the same head under the lock: this cannot happen.
                return Err(VolumeError::Task(format!("own record {seq} was rejected when folded: {rejection:?}")));
            }
            state.mark_attempted();
            if let Some(announce) = self.inner.announcer.get() {
                announce(volume, appended.seq);
            }
            if appended.seq.is_multiple_of(self.inner.settings.snapshot_interval_records) {
                self.write_snapshot(volume).await;
            }
            return Ok(appended);
        }
        Err(VolumeError::Contended { volume: volume.clone(), attempts: VOLUME_APPEND_RETRIES_MAX })
    }

    /// Writes the view of `volume` (at the head just appended, under the lock) as a
    /// snapshot. The upload runs in the background; a lost race or a failure only costs a
    /// longer replay later.
    async fn write_snapshot(&self, volume: &VolumeName) {
        let name = volume.as_str().to_string();
        let snapshot = match self.blocking(move |view| view.snapshot(&name)).await {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(volume = %volume, %error, "could not build a volume snapshot");
                return;
            }
        };
        let origin = self.inner.origin.clone();
        let key = snapshot_key(volume, snapshot.seq);
        let volume = volume.clone();
        tokio::spawn(async move {
            let seq = snapshot.seq;
            let files = snapshot.entries.len();
            match origin.create(&key, Bytes::from(snapshot.encode())).await {
                Ok(Created::Written) => {
                    metrics::counter!("cachemesh_volume_snapshots_written_total").increment(1);
                    tracing::info!(volume = %volume, seq, files, "volume snapshot written");
                }
                Ok(Created::AlreadyExists) => {}
                Err(error) => tracing::warn!(volume = %volume, seq, %error, "could not write a volume snapshot"),
            }
        });
    }

    /// The state of `volume`, caught up first when the last catch-up is older than
    /// [`VOLUME_READ_STALENESS_MAX`]. When the origin fails the view answers as it is.
    async fn fresh(&self, volume: &VolumeName) -> Result<Arc<VolumeState>, VolumeError> {
        let state = self.state(volume)?;
        if state.stale(VOLUME_READ_STALENESS_MAX) {
            let mut tail = state.tail.lock().await;
            // Another reader may have caught up while this one waited for the lock.
            if state.stale(VOLUME_READ_STALENESS_MAX)
                && let Err(error) = self.catch_up(&state, &mut tail).await
                && !error.is_origin_failure()
            {
                return Err(error);
            }
        }
        Ok(state)
    }

    /// The file at `path`.
    pub async fn stat(&self, volume: &VolumeName, path: &VolumePath) -> Result<FileInfo, VolumeError> {
        self.fresh(volume).await?;
        let (name, text) = (volume.as_str().to_string(), path.as_str().to_string());
        self.blocking(move |view| view.file(&name, &text))
            .await?
            .ok_or_else(|| VolumeError::NotFound { volume: volume.clone(), path: path.to_string() })
    }

    /// Checks, against the current view, that a put of `path` would be accepted, so that a
    /// large upload is not made in vain. The append checks again at the log's head.
    pub async fn precheck_put(&self, volume: &VolumeName, path: &VolumePath) -> Result<(), VolumeError> {
        self.fresh(volume).await?;
        let name = volume.as_str().to_string();
        let op = Op::Put { path: path.clone(), object: ObjectId::from_bytes([0; 32]), size: 0 };
        match self.blocking(move |view| view.check(&name, &op)).await? {
            Ok(()) => Ok(()),
            Err(rejection) => Err(VolumeError::from_rejection(volume, rejection)),
        }
    }

    /// Up to `limit` files whose path starts with `prefix`, after `after`.
    pub async fn list(
        &self,
        volume: &VolumeName,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Listing, VolumeError> {
        self.fresh(volume).await?;
        let (name, prefix, after) = (volume.as_str().to_string(), prefix.to_string(), after.map(str::to_string));
        let (seq, page) = self.blocking(move |view| view.list(&name, &prefix, after.as_deref(), limit)).await?;
        Ok(Listing { seq, page })
    }

    /// Every file named by `paths` (a file, or every file under a directory; `""` is the
    /// whole volume). A path that names nothing is [`VolumeError::NotFound`].
    async fn resolve(&self, volume: &VolumeName, paths: &[String]) -> Result<BTreeMap<String, FileInfo>, VolumeError> {
        let mut files = BTreeMap::new();
        for path in paths {
            let directory = if path.is_empty() { String::new() } else { format!("{path}/") };
            let mut found = false;
            if !path.is_empty() {
                let (name, text) = (volume.as_str().to_string(), path.clone());
                if let Some(info) = self.blocking(move |view| view.file(&name, &text)).await? {
                    files.insert(path.clone(), info);
                    found = true;
                }
            }
            let mut after: Option<String> = None;
            loop {
                let (name, prefix, from) = (volume.as_str().to_string(), directory.clone(), after.clone());
                let (_, page) = self
                    .blocking(move |view| {
                        view.list(&name, &prefix, from.as_deref(), cachemesh_proto::limits::VOLUME_LIST_ENTRIES_MAX)
                    })
                    .await?;
                found |= !page.entries.is_empty();
                after = page.entries.last().map(|(path, _)| path.clone());
                files.extend(page.entries);
                if !page.more {
                    break;
                }
            }
            if !found {
                return Err(VolumeError::NotFound { volume: volume.clone(), path: path.clone() });
            }
        }
        Ok(files)
    }

    /// Fetches every chunk of every file named by `paths` into the local store, through the
    /// fetcher (peers, home node, origin), without sending the bytes anywhere.
    pub async fn prefetch(&self, volume: &VolumeName, paths: &[String]) -> Result<PrefetchResponse, VolumeError> {
        self.fresh(volume).await?;
        let files = self.resolve(volume, paths).await?;
        let mut total = PrefetchResponse { files: 0, bytes: 0, chunks: 0, chunks_local: 0, chunks_fetched: 0 };
        let mut warming = futures::stream::iter(files.into_values())
            .map(|info| self.warm(info.object))
            .buffer_unordered(VOLUME_PREFETCH_FILES_PARALLEL);
        while let Some(warmed) = warming.next().await {
            let warmed = warmed?;
            total.files += 1;
            total.bytes += warmed.bytes;
            total.chunks += warmed.chunks;
            total.chunks_local += warmed.chunks_local;
            total.chunks_fetched += warmed.chunks_fetched;
        }
        Ok(total)
    }

    async fn warm(&self, object: ObjectId) -> Result<PrefetchResponse, VolumeError> {
        let manifest = self.inner.objects.open(&object).await?;
        let fetcher = self.inner.objects.fetcher().clone();
        let context = Arc::new(ObjectContext::new(object, &manifest));
        let mut warmed = PrefetchResponse {
            files: 1,
            bytes: manifest.length(),
            chunks: manifest.chunks().len() as u64,
            chunks_local: 0,
            chunks_fetched: 0,
        };
        let missing: Vec<(usize, cachemesh_proto::ChunkId)> = manifest
            .chunks()
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, chunk)| !fetcher.store().contains(chunk))
            .collect();
        warmed.chunks_local = warmed.chunks - missing.len() as u64;
        let mut fetches = futures::stream::iter(missing)
            .map(|(index, chunk)| {
                let fetcher = fetcher.clone();
                let context = context.clone();
                // Each chunk on its own task, so hashing runs on every core.
                async move {
                    tokio::spawn(async move { fetcher.warm(chunk, Some((&context, index))).await.map(|_| ()) })
                        .await
                        .map_err(|_| FetchError::Interrupted(chunk))?
                }
            })
            .buffer_unordered(FETCH_WINDOW_CHUNKS);
        while let Some(fetched) = fetches.next().await {
            fetched?;
            warmed.chunks_fetched += 1;
        }
        Ok(warmed)
    }

    /// The faster path than polling: another node announced that `volume` has a record
    /// `seq`. When this node follows the volume and its view is behind, it catches up at
    /// once (in the background). Volumes this node never used are not followed because of
    /// a nudge.
    pub fn nudge(&self, volume: &VolumeName, seq: u64) {
        let state = match self.inner.volumes.lock() {
            Ok(volumes) => volumes.get(volume).cloned(),
            Err(_) => None,
        };
        let Some(state) = state else {
            metrics::counter!("cachemesh_volume_nudges_total", "outcome" => "not_followed").increment(1);
            return;
        };
        let volumes = self.clone();
        tokio::spawn(async move {
            // Under the lock, so a burst of nudges costs one catch-up, not one each.
            let mut tail = state.tail.lock().await;
            let name = state.name.as_str().to_string();
            let head = volumes.blocking(move |view| view.head(&name)).await.unwrap_or(0);
            let outcome = if head >= seq {
                "current"
            } else {
                match volumes.catch_up(&state, &mut tail).await {
                    Ok(_) => "caught_up",
                    Err(_) => "failed",
                }
            };
            metrics::counter!("cachemesh_volume_nudges_total", "outcome" => outcome).increment(1);
        });
    }

    /// Sets what is called with every record this node appends (once; later calls are
    /// ignored): in a mesh, the announcement of the volume's new head to the DC.
    pub fn set_announcer(&self, announcer: Announcer) {
        let _ = self.inner.announcer.set(announcer);
    }

    /// Catches up every followed volume every [`VOLUME_POLL_INTERVAL`] until `shutdown`.
    pub async fn run_tailer(self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(VOLUME_POLL_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            let states: Vec<Arc<VolumeState>> = match self.inner.volumes.lock() {
                Ok(volumes) => volumes.values().cloned().collect(),
                Err(_) => return,
            };
            let this = &self;
            let round = futures::stream::iter(states)
                .map(|state| async move {
                    // A read that caught up within half a poll interval made this round's work.
                    if state.has_records.load(Ordering::Relaxed) && state.stale(VOLUME_POLL_INTERVAL / 2) {
                        let mut tail = state.tail.lock().await;
                        let _ = this.catch_up(&state, &mut tail).await;
                    }
                })
                .buffer_unordered(VOLUME_TAIL_PARALLEL)
                .collect::<Vec<()>>();
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = round => {}
            }
        }
    }
}
