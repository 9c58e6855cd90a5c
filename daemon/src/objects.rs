//! Objects: cutting a byte stream into chunks and publishing it, and reading objects back.
//!
//! Put: the body is cut into `CHUNK_BYTES_MAX` chunks; each chunk is hashed, kept in the
//! local store and uploaded to the origin by its own task, at most [`PUT_WINDOW_CHUNKS`] at
//! once, so memory stays bounded whatever the body's size. The manifest is published to the
//! origin only after every chunk is there: a failed or abandoned put publishes nothing.
//! The answer is sent only after the manifest is written, so an acknowledged put survives
//! any crash of this node.
//!
//! Get: the manifest is found locally or in the origin (and checked against its id), then
//! the chunks covering the requested range are fetched with [`read_window`] chunks in
//! flight (one per host of the DC, 8 to 16) and returned in order, cut to the range; chunks
//! that arrive before an earlier one wait, up to twice the window held in all (at most
//! [`READ_HELD_CHUNKS_MAX`]), while the fetches go on.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cachemesh_proto::api::PutObjectResponse;
use cachemesh_proto::limits::{CHUNK_BYTES_MAX, OBJECT_BYTES_MAX};
use cachemesh_proto::{ChunkId, Manifest, ObjectId};
use futures::stream::{FuturesOrdered, FuturesUnordered, Stream, StreamExt};

use crate::chunk::VerifiedChunk;
use crate::fetch::{FetchError, Fetcher, ObjectContext, Source};
use crate::origin::OriginError;
use crate::picker::{Pick, Picker};
use crate::placement::PLACEMENT_SPAN_CHUNKS;
use crate::store::StoreError;
use crate::window;

/// Chunks of one put being hashed, stored and uploaded at once.
pub const PUT_WINDOW_CHUNKS: usize = 8;
/// Chunks of one read in flight at once, at least (see [`read_window`]); and of a pin.
pub const FETCH_WINDOW_CHUNKS: usize = 8;
/// Chunks of one read in flight at once, at most: one per home of a placement span, whose
/// chunks have as many different homes up to this many members.
pub const FETCH_WINDOW_CHUNKS_MAX: usize = PLACEMENT_SPAN_CHUNKS;
/// Chunks of one read held at once, at most: in flight, or arrived and waiting for an
/// earlier chunk (see `window`), twice the window. Bounds a read's memory: 128 MiB of 4 MiB
/// chunks in a DC of 16 hosts or more, 64 MiB alone.
pub const READ_HELD_CHUNKS_MAX: usize = 2 * FETCH_WINDOW_CHUNKS_MAX;

const _: () = assert!(FETCH_WINDOW_CHUNKS <= FETCH_WINDOW_CHUNKS_MAX);

/// Chunks a read keeps in flight in a DC of `hosts` hosts (this one included): one per
/// host, within [`FETCH_WINDOW_CHUNKS`]..=[`FETCH_WINDOW_CHUNKS_MAX`].
///
/// Why: when every host reads an object at once, each chunk reaches the others mostly
/// from its home, and homes are balanced over spans of consecutive chunks. A window of
/// fewer chunks than hosts asks, at each moment, only some of the homes, whose upload lines
/// then hold every reader's requests while other hosts' uploads idle. Measured with 16
/// hosts at 100 Mbit (docs/benchmarks.md): with a window of 16, 256 MiB from the origin
/// took 30.6-31.4 s against 34.5-36.1 s with 8; at 1 GiB 114.7-118.5 s against 117.6 s
/// (within the spread of single runs) and 127 s from a seed against 132 s; windows of 24
/// and 32 were slower again (more chunks asked of the origin at once, each arriving later).
pub fn read_window(hosts: usize) -> usize {
    hosts.clamp(FETCH_WINDOW_CHUNKS, FETCH_WINDOW_CHUNKS_MAX)
}

/// Chunks of a pin in flight at once that no peer still fetching the object holds, per
/// peer holding all of it (or for the origin, when none does): those chunks come from the
/// whole holders or the origin, through the chunks' homes, whose upload every node warming
/// the object shares.
pub const WARM_FRESH_CHUNKS_PER_SOURCE: usize = 2;
/// How often a pin with a free slot and nothing to start looks again at what peers hold.
pub const WARM_AVAILABILITY_POLL: Duration = Duration::from_millis(250);

/// Why a put failed. Nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The client's body broke off.
    #[error("the request body broke off after {received} bytes: {detail}")]
    BodyIncomplete {
        /// Bytes received.
        received: u64,
        /// The cause.
        detail: String,
    },
    /// The body is larger than `OBJECT_BYTES_MAX`.
    #[error("the object is larger than OBJECT_BYTES_MAX")]
    TooLarge,
    /// The origin failed.
    #[error(transparent)]
    Origin(#[from] OriginError),
    /// A chunk task died.
    #[error("a chunk upload task failed: {0}")]
    Task(String),
}

/// Why an object cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Neither the store nor the origin has it.
    #[error("object {0} not found")]
    NotFound(ObjectId),
    /// The origin failed.
    #[error(transparent)]
    Origin(OriginError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why pinning failed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The object could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A chunk could not be fetched.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The store could not keep every chunk.
    #[error("the store cannot hold every chunk of object {0}: pinned bytes would exceed the cache budget")]
    NoRoom(ObjectId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Puts and reads objects.
#[derive(Debug, Clone)]
pub struct Objects {
    fetcher: Fetcher,
}

struct ChunkDone {
    id: ChunkId,
    uploaded: bool,
}

impl Objects {
    /// Objects over this fetcher's tiers.
    pub fn new(fetcher: Fetcher) -> Self {
        Self { fetcher }
    }

    /// The fetcher.
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    fn spawn_chunk(&self, data: Bytes) -> tokio::task::JoinHandle<Result<ChunkDone, OriginError>> {
        let fetcher = self.fetcher.clone();
        tokio::spawn(async move {
            let chunk = VerifiedChunk::hash(data);
            let (id, data) = (chunk.id(), chunk.bytes().clone());
            let (stored, uploaded) =
                tokio::join!(fetcher.store().write_chunk(chunk), fetcher.origin().put_chunk(&id, data));
            if let Err(error) = stored {
                // The origin holds the chunk; the local copy is only a cache.
                tracing::warn!(chunk = %id, %error, "could not keep an uploaded chunk in the local store");
                metrics::counter!("cachemesh_store_write_errors_total").increment(1);
            }
            Ok(ChunkDone { id, uploaded: uploaded? })
        })
    }

    /// Cuts `body` into chunks, stores and uploads them, then publishes the manifest.
    ///
    /// On error the body may be left partly read; the caller decides whether to drain it.
    pub async fn put<S, E>(&self, body: &mut S) -> Result<PutObjectResponse, PutError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let chunk_bytes = CHUNK_BYTES_MAX as usize;
        let mut buffer = BytesMut::new();
        let mut received: u64 = 0;
        let mut in_flight = FuturesOrdered::new();
        let mut chunks = Vec::new();
        let mut chunks_uploaded = 0u64;
        let mut collect =
            |done: Result<Result<ChunkDone, OriginError>, tokio::task::JoinError>| -> Result<(), PutError> {
                let done = done.map_err(|error| PutError::Task(error.to_string()))??;
                chunks.push(done.id);
                chunks_uploaded += u64::from(done.uploaded);
                Ok(())
            };
        while let Some(frame) = body.next().await {
            let frame = frame.map_err(|error| PutError::BodyIncomplete { received, detail: error.to_string() })?;
            received += frame.len() as u64;
            if received > OBJECT_BYTES_MAX {
                return Err(PutError::TooLarge);
            }
            let mut frame = frame;
            while !frame.is_empty() {
                if buffer.is_empty() && frame.len() >= chunk_bytes {
                    // A whole chunk inside one frame: no copy.
                    in_flight.push_back(self.spawn_chunk(frame.split_to(chunk_bytes)));
                } else {
                    if buffer.capacity() == 0 {
                        buffer.reserve(chunk_bytes);
                    }
                    let take = frame.len().min(chunk_bytes - buffer.len());
                    buffer.extend_from_slice(&frame.split_to(take));
                    if buffer.len() == chunk_bytes {
                        in_flight.push_back(self.spawn_chunk(buffer.split().freeze()));
                    }
                }
                while in_flight.len() >= PUT_WINDOW_CHUNKS {
                    if let Some(done) = in_flight.next().await {
                        collect(done)?;
                    }
                }
            }
        }
        if !buffer.is_empty() {
            in_flight.push_back(self.spawn_chunk(buffer.split().freeze()));
        }
        while let Some(done) = in_flight.next().await {
            collect(done)?;
        }
        let manifest =
            Manifest::new(received, CHUNK_BYTES_MAX, chunks).map_err(|error| PutError::Task(error.to_string()))?;
        let object_id = self.fetcher.origin().put_manifest(&manifest).await?;
        if let Err(error) = self.fetcher.store().put_manifest(&manifest).await {
            tracing::warn!(object = %object_id, %error, "could not keep a manifest in the local store");
        }
        if let Some(mesh) = self.fetcher.mesh() {
            mesh.provide(object_id).await;
        }
        tracing::info!(object = %object_id, length = received, chunks_uploaded, "object put");
        Ok(PutObjectResponse {
            object_id,
            length: received,
            chunk_count: manifest.chunks().len() as u64,
            chunks_uploaded,
        })
    }

    /// The manifest of `id`, from the store or else the origin (verified, then kept).
    pub async fn open(&self, id: &ObjectId) -> Result<Manifest, OpenError> {
        if let Some(manifest) = self.fetcher.store().manifest(id).await? {
            return Ok(manifest);
        }
        let manifest = match self.fetcher.origin().get_manifest(id).await {
            Ok(manifest) => manifest,
            Err(OriginError::NotFound { .. }) => return Err(OpenError::NotFound(*id)),
            Err(error) => return Err(OpenError::Origin(error)),
        };
        if let Err(error) = self.fetcher.store().put_manifest(&manifest).await {
            tracing::warn!(object = %id, %error, "could not keep a manifest in the local store");
        }
        Ok(manifest)
    }

    /// The bytes of `range` of object `object`, in order, as a stream of verified pieces.
    ///
    /// Each chunk is fetched by its own task, so hashing runs on every core.
    pub fn read(
        &self,
        object: ObjectId,
        manifest: Arc<Manifest>,
        range: Range<u64>,
    ) -> impl Stream<Item = Result<Bytes, FetchError>> + Send + 'static {
        let fetcher = self.fetcher.clone();
        let indexes = manifest.chunks_covering(&range);
        let context = Arc::new(ObjectContext::new(object, &manifest));
        let fetch_one = move |index: usize| {
            let (fetcher, manifest, range, context) =
                (fetcher.clone(), manifest.clone(), range.clone(), context.clone());
            async move { (index, read_piece(fetcher, &manifest, &range, context, index).await) }
        };
        let hosts = self.fetcher.mesh().map_or(1, |mesh| mesh.discovery().members().len() + 1);
        let in_flight = read_window(hosts);
        window::ordered(indexes, in_flight, 2 * in_flight, fetch_one)
    }

    /// Fetches every chunk of `id` into the store and pins it there.
    pub async fn pin(&self, id: &ObjectId) -> Result<Manifest, PinError> {
        let manifest = self.open(id).await?;
        let store = self.fetcher.store();
        // Pin first so that chunks fetched below cannot be evicted before the pin holds.
        store.pin_object(id, &manifest).await?;
        let fetched = self.fetch_all(*id, &manifest).await;
        let resident = manifest.chunks().iter().all(|chunk| store.contains(chunk));
        if let Err(error) = fetched {
            store.unpin_object(id, &manifest).await?;
            return Err(error.into());
        }
        if !resident {
            store.unpin_object(id, &manifest).await?;
            return Err(PinError::NoRoom(*id));
        }
        Ok(manifest)
    }

    /// Fetches every chunk of `object` into the store, [`FETCH_WINDOW_CHUNKS`] at a time: in
    /// a mesh in the order a [`Picker`] chooses (chunks peers hold, rarest first, and at most
    /// [`WARM_FRESH_CHUNKS_PER_SOURCE`] per whole holder that no fetching peer holds
    /// yet), else in index order.
    async fn fetch_all(&self, object: ObjectId, manifest: &Manifest) -> Result<(), FetchError> {
        let context = Arc::new(ObjectContext::new(object, manifest));
        let warm = |index: usize| {
            let (fetcher, context, id) = (self.fetcher.clone(), context.clone(), manifest.chunks()[index]);
            async move { fetcher.warm(id, Some((&context, index))).await }
        };
        let Some(mesh) = self.fetcher.mesh().cloned() else {
            let mut fetches =
                futures::stream::iter(0..manifest.chunks().len()).map(warm).buffer_unordered(FETCH_WINDOW_CHUNKS);
            while let Some(result) = fetches.next().await {
                let _source: Source = result?;
            }
            return Ok(());
        };
        let count = manifest.chunks().len();
        let store = self.fetcher.store();
        let pending = (0..count).filter(|&index| !store.contains(&manifest.chunks()[index]));
        let mut picker = Picker::new(count, pending, mesh.spread_start(&object, count));
        let mut in_flight = FuturesUnordered::new();
        let mut fresh_in_flight = 0;
        loop {
            // One view of what peers hold per round of picks: the picks leave the pending
            // set, so the view need not change between them.
            let availability = mesh.availability(object, count).await;
            // The fresh limit protects the sources of chunks nobody warming holds yet
            // (whole holders' upload, or the origin's link when there is none), which the
            // members warming the object share; at the start of a storm none holds anything
            // yet, so there is no telling who else is warming. Alone in the DC, the window
            // is the limit.
            let fresh_max = if mesh.discovery().members().is_empty() {
                FETCH_WINDOW_CHUNKS
            } else {
                WARM_FRESH_CHUNKS_PER_SOURCE * availability.whole_holders.max(1)
            };
            let mut waiting = false;
            while in_flight.len() < FETCH_WINDOW_CHUNKS {
                let (index, fresh) = match picker.next(&availability.holders, fresh_in_flight, fresh_max) {
                    Pick::Held(index) => (index, false),
                    Pick::Fresh(index) => (index, true),
                    Pick::Wait => {
                        waiting = true;
                        break;
                    }
                    Pick::Done => break,
                };
                fresh_in_flight += usize::from(fresh);
                let fetch = warm(index);
                in_flight.push(async move { (fresh, fetch.await) });
            }
            if in_flight.is_empty() {
                return Ok(());
            }
            tokio::select! {
                Some((fresh, result)) = in_flight.next() => {
                    fresh_in_flight -= usize::from(fresh);
                    let _source: Source = result?;
                }
                // With a slot free but nothing to start, look again for chunks peers gained.
                () = tokio::time::sleep(WARM_AVAILABILITY_POLL), if waiting => {}
            }
        }
    }

    /// Removes the pin of `id`; false when it was not pinned.
    pub async fn unpin(&self, id: &ObjectId) -> Result<bool, PinError> {
        let manifest = self.open(id).await?;
        Ok(self.fetcher.store().unpin_object(id, &manifest).await?)
    }
}

/// The part of chunk `index` of `manifest` that `range` covers, fetched across the tiers.
async fn read_piece(
    fetcher: Fetcher,
    manifest: &Manifest,
    range: &Range<u64>,
    context: Arc<ObjectContext>,
    index: usize,
) -> Result<Bytes, FetchError> {
    let id = manifest.chunks()[index];
    // Its own task: a fetch keeps going (and is coalesced with) while this read waits.
    let fetched = tokio::spawn(async move { fetcher.chunk(id, Some((&context, index))).await }).await;
    let (bytes, source) = fetched.map_err(|_| FetchError::Interrupted(id))??;
    let chunk_range = manifest.chunk_range(index).unwrap_or(0..0);
    let start = range.start.max(chunk_range.start) - chunk_range.start;
    let end = range.end.min(chunk_range.end) - chunk_range.start;
    let piece = bytes.slice(start as usize..end as usize);
    metrics::counter!("cachemesh_bytes_served_total", "source" => source.label()).increment(piece.len() as u64);
    Ok(piece)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_window_has_a_chunk_per_host_within_bounds() {
        // Goal: alone or in a small DC a read keeps the old window; in larger DCs one chunk
        // per host, so every home of a span has a request from each reader; never beyond
        // what READ_HELD_CHUNKS_MAX bounds.
        assert_eq!(read_window(1), FETCH_WINDOW_CHUNKS);
        assert_eq!(read_window(FETCH_WINDOW_CHUNKS), FETCH_WINDOW_CHUNKS);
        assert_eq!(read_window(12), 12);
        assert_eq!(read_window(FETCH_WINDOW_CHUNKS_MAX), FETCH_WINDOW_CHUNKS_MAX);
        assert_eq!(read_window(1000), FETCH_WINDOW_CHUNKS_MAX);
        assert!(2 * read_window(usize::MAX) <= READ_HELD_CHUNKS_MAX);
    }
}
