//! Putting the trial's object and reading it back from many nodes at once, every byte hashed.
//!
//! A read ([`get_all`]) starts one task per node, all at the same instant; each streams
//! `GET /v1/objects/{id}` through the node's socket, hashes every byte, and records time to
//! first byte and to the last. A read may be told to begin a set time after the common
//! start (staggered joins). Progress of the reads that count towards the fleet is
//! published on a watch channel so that a scenario can act at a point of the transfer
//! (the peer-killed scenario kills a node when the fleet is part-way), without sleeping.
//!
//! Non-goals: retries. A read that fails is reported as failed; the daemon is the one that
//! must recover from peers going away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cachemesh_daemon::client::Client;
use cachemesh_proto::ObjectId;
use http_body_util::BodyExt;
use tokio::sync::watch;

use crate::data::{Digest, Pattern, pattern_body};

/// What one node's read gave.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The node.
    pub node: usize,
    /// Seconds from the common start to the first body byte.
    pub first_byte_seconds: Option<f64>,
    /// Seconds from the common start to the last byte (only when the read completed).
    pub seconds: Option<f64>,
    /// Digest of the bytes received.
    pub digest: Digest,
    /// Why the read failed, if it did.
    pub error: Option<String>,
}

/// What the put gave.
#[derive(Debug, Clone)]
pub struct Put {
    /// The object's id.
    pub object_id: ObjectId,
    /// Digest of the bytes sent.
    pub digest: Digest,
    /// Seconds the put took.
    pub seconds: f64,
    /// Chunks the object has, by the daemon's answer.
    pub chunk_count: u64,
    /// Chunks uploaded to the origin, by the daemon's answer.
    pub chunks_uploaded: u64,
}

/// Why the put failed.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The daemon refused or failed the put.
    #[error("PUT /v1/objects on node {node}: {detail}")]
    Failed {
        /// The node.
        node: usize,
        /// What went wrong.
        detail: String,
    },
    /// The put did not finish in time.
    #[error("PUT /v1/objects on node {node} did not finish within {timeout:?}")]
    Timeout {
        /// The node.
        node: usize,
        /// How long we waited.
        timeout: Duration,
    },
}

/// Puts the first `length` bytes of `pattern` on `client` (node `node`).
pub async fn put(
    client: &Client,
    node: usize,
    pattern: Pattern,
    length: u64,
    timeout: Duration,
) -> Result<Put, PutError> {
    let started = Instant::now();
    let (body, generator) = pattern_body(pattern, length);
    let answer = tokio::time::timeout(timeout, client.put_object(body))
        .await
        .map_err(|_| PutError::Timeout { node, timeout })?
        .map_err(|error| PutError::Failed { node, detail: error.to_string() })?;
    let digest = generator
        .await
        .ok()
        .flatten()
        .ok_or_else(|| PutError::Failed { node, detail: "the daemon answered before reading the whole body".into() })?;
    if answer.length != length {
        return Err(PutError::Failed {
            node,
            detail: format!("the answer says {} bytes, {length} were sent", answer.length),
        });
    }
    Ok(Put {
        object_id: answer.object_id,
        digest,
        seconds: started.elapsed().as_secs_f64(),
        chunk_count: answer.chunk_count,
        chunks_uploaded: answer.chunks_uploaded,
    })
}

/// One read to start.
#[derive(Debug, Clone)]
pub struct Reader {
    /// The node.
    pub node: usize,
    /// Its API client.
    pub client: Client,
    /// Whether its bytes count towards the published fleet progress.
    pub counts_towards_progress: bool,
    /// How long after the common start this read begins (zero: at once). Its times are
    /// still counted from the common start; the timeout runs from its own start.
    pub start_delay: Duration,
}

/// Starts every read at once; returns the progress channel (bytes received so far by the
/// readers that count) and the join of all reads, in `readers` order. The channel closes
/// when every read has ended.
pub fn get_all(
    readers: Vec<Reader>,
    object_id: ObjectId,
    timeout: Duration,
) -> (watch::Receiver<u64>, impl Future<Output = Vec<Transfer>>) {
    let (sender, receiver) = watch::channel(0u64);
    let sender = Arc::new(sender);
    let start = Instant::now();
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|reader| {
            let progress = reader.counts_towards_progress.then(|| sender.clone());
            let node = reader.node;
            let task = tokio::spawn(async move {
                let mut transfer =
                    Transfer { node, first_byte_seconds: None, seconds: None, digest: Digest::new(), error: None };
                tokio::time::sleep(reader.start_delay).await;
                let read = read_one(&reader.client, &object_id, start, progress, &mut transfer);
                match tokio::time::timeout(timeout, read).await {
                    Ok(Ok(())) => transfer.seconds = Some(start.elapsed().as_secs_f64()),
                    Ok(Err(error)) => transfer.error = Some(error),
                    Err(_) => {
                        transfer.error = Some(format!(
                            "did not finish within {timeout:?} ({} bytes received)",
                            transfer.digest.length()
                        ))
                    }
                }
                transfer
            });
            (node, task)
        })
        .collect();
    drop(sender);
    let joined = async move {
        let mut out = Vec::with_capacity(tasks.len());
        for (node, task) in tasks {
            out.push(task.await.unwrap_or_else(|error| Transfer {
                node,
                first_byte_seconds: None,
                seconds: None,
                digest: Digest::new(),
                error: Some(format!("the read task failed: {error}")),
            }));
        }
        out
    };
    (receiver, joined)
}

async fn read_one(
    client: &Client,
    object_id: &ObjectId,
    start: Instant,
    progress: Option<Arc<watch::Sender<u64>>>,
    transfer: &mut Transfer,
) -> Result<(), String> {
    let response = client.get_object(object_id, None).await.map_err(|error| error.to_string())?;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| format!("the body broke off: {error}"))?;
        if let Ok(data) = frame.into_data() {
            if transfer.first_byte_seconds.is_none() {
                transfer.first_byte_seconds = Some(start.elapsed().as_secs_f64());
            }
            transfer.digest.update(&data);
            if let Some(progress) = &progress {
                progress.send_modify(|total| *total += data.len() as u64);
            }
        }
    }
    Ok(())
}
