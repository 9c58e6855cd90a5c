//! Putting the trial's object and reading it back from many nodes at once, every byte hashed.
//!
//! A read ([`get_all`]) starts one task per node, all at the same instant; each streams
//! `GET /v1/objects/{id}` through the node's socket, hashes every byte, and records time to
//! first byte and to the last. A read may be told to begin a set time after the common
//! start (staggered joins). Progress of the reads that count towards the fleet is
//! published on a watch channel so that a scenario can act at a point of the transfer
//! (the peer-killed scenario kills a node when the fleet is part-way), without sleeping.
//!
//! Each read also keeps a compact progress series ([`ProgressSamples`]): cumulative bytes at
//! most every [`PROGRESS_SAMPLE_INTERVAL`] (plus the first and the last byte), never more
//! than [`PROGRESS_SAMPLES_MAX`] samples; a long read thins its series and doubles the
//! interval rather than grow it. The report's throughput chart is drawn from these.
//!
//! Non-goals: retries. A read that fails is reported as failed; the daemon is the one that
//! must recover from peers going away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachemesh_daemon::client::Client;
use cachemesh_proto::ObjectId;
use http_body_util::BodyExt;
use tokio::sync::watch;

use crate::data::{Digest, Pattern, pattern_body};

/// The least time between two progress samples of one read (the first and last byte are
/// always sampled).
pub const PROGRESS_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);
/// The most progress samples one read keeps; past it every other sample is dropped and the
/// interval doubles.
pub const PROGRESS_SAMPLES_MAX: usize = 1000;
/// Sample times are rounded to this many per second, to keep `report.json` small.
const PROGRESS_TIME_STEPS_PER_SECOND: f64 = 10_000.0;
const _: () = assert!(PROGRESS_SAMPLES_MAX >= 4);

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
    /// Cumulative bytes received over time, on the same clock as `first_byte_seconds`.
    pub progress: ProgressSamples,
}

impl Transfer {
    fn new(node: usize) -> Self {
        Self {
            node,
            first_byte_seconds: None,
            seconds: None,
            digest: Digest::new(),
            error: None,
            progress: ProgressSamples::default(),
        }
    }

    /// The progress series as `(seconds from the common start, cumulative bytes)`, moved so
    /// that its first sample sits at `first_byte_seconds`: a scenario that shifts a read's
    /// times onto the common start (churn's second reads) shifts `first_byte_seconds`, and
    /// the series follows.
    pub fn progress_series(&self) -> Vec<(f64, u64)> {
        let samples = self.progress.samples();
        let shift = match (self.first_byte_seconds, samples.first()) {
            (Some(first_byte), Some(&(first, _))) => first_byte - first,
            _ => 0.0,
        };
        samples.iter().map(|&(seconds, bytes)| (round_seconds(seconds + shift), bytes)).collect()
    }
}

/// A read's cumulative bytes over time, thinned to at most [`PROGRESS_SAMPLES_MAX`] samples.
///
/// Invariants: times and byte counts never decrease; the first sample is the first byte;
/// after [`ProgressSamples::finish`] the last sample is the last byte received.
#[derive(Debug, Clone, Default)]
pub struct ProgressSamples {
    /// `(seconds, cumulative bytes)`, kept.
    samples: Vec<(f64, u64)>,
    /// The latest point not kept (closer than the interval to the last kept one).
    pending: Option<(f64, u64)>,
    /// The current least interval between kept samples, in seconds (0: not started).
    interval_seconds: f64,
}

impl ProgressSamples {
    /// Notes that `bytes` had been received in all at `seconds`.
    pub fn record(&mut self, seconds: f64, bytes: u64) {
        let Some(&(last_seconds, _)) = self.samples.last() else {
            self.samples.push((seconds, bytes));
            self.interval_seconds = PROGRESS_SAMPLE_INTERVAL.as_secs_f64();
            return;
        };
        if seconds - last_seconds < self.interval_seconds {
            self.pending = Some((seconds, bytes));
            return;
        }
        self.pending = None;
        self.samples.push((seconds, bytes));
        if self.samples.len() >= PROGRESS_SAMPLES_MAX {
            // Keep every other one from the first byte on; the rest come half as often. The
            // latest, if dropped, waits as pending so that the series still ends at it.
            let latest = self.samples.len().is_multiple_of(2).then(|| self.samples[self.samples.len() - 1]);
            self.samples = self.samples.iter().step_by(2).copied().collect();
            self.pending = latest;
            self.interval_seconds *= 2.0;
        }
    }

    /// Keeps the last point seen, so that the series ends at the last byte.
    pub fn finish(&mut self) {
        if let Some(pending) = self.pending.take() {
            self.samples.push(pending);
        }
    }

    /// The samples kept, `(seconds, cumulative bytes)`.
    pub fn samples(&self) -> &[(f64, u64)] {
        &self.samples
    }
}

fn round_seconds(seconds: f64) -> f64 {
    (seconds * PROGRESS_TIME_STEPS_PER_SECOND).round() / PROGRESS_TIME_STEPS_PER_SECOND
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
    /// Pin the object first (`PUT /v1/objects/{id}/pin`: the node warms its cache in the
    /// order it chooses), then read it, from the cache by then.
    pub pin_first: bool,
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
                let mut transfer = Transfer::new(node);
                tokio::time::sleep(reader.start_delay).await;
                let read = read_one(&reader.client, &object_id, reader.pin_first, start, progress, &mut transfer);
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
                transfer.progress.finish();
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
                error: Some(format!("the read task failed: {error}")),
                ..Transfer::new(node)
            }));
        }
        out
    };
    (receiver, joined)
}

async fn read_one(
    client: &Client,
    object_id: &ObjectId,
    pin_first: bool,
    start: Instant,
    progress: Option<Arc<watch::Sender<u64>>>,
    transfer: &mut Transfer,
) -> Result<(), String> {
    if pin_first {
        let path = format!("/v1/objects/{object_id}/pin");
        let (status, body) =
            client.send_bytes(http::Method::PUT, &path, Bytes::new()).await.map_err(|error| error.to_string())?;
        if !status.is_success() {
            return Err(format!("pin: {status}: {}", String::from_utf8_lossy(&body)));
        }
    }
    let response = client.get_object(object_id, None).await.map_err(|error| error.to_string())?;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| format!("the body broke off: {error}"))?;
        if let Ok(data) = frame.into_data() {
            let seconds = start.elapsed().as_secs_f64();
            if transfer.first_byte_seconds.is_none() {
                transfer.first_byte_seconds = Some(seconds);
            }
            transfer.digest.update(&data);
            transfer.progress.record(seconds, transfer.digest.length());
            if let Some(progress) = &progress {
                progress.send_modify(|total| *total += data.len() as u64);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_read_keeps_a_bounded_series_from_first_to_last_byte() {
        // Goal: however long the read, the series stays within PROGRESS_SAMPLES_MAX, keeps
        // the first and the last byte, and never goes back in time or bytes.
        let mut progress = ProgressSamples::default();
        let frames = 200_000u64;
        for frame in 1..=frames {
            progress.record(0.25 + frame as f64 * 0.003, frame * 16_384);
        }
        progress.finish();
        let samples = progress.samples();
        assert!(samples.len() <= PROGRESS_SAMPLES_MAX, "{} samples", samples.len());
        assert!(samples.len() >= PROGRESS_SAMPLES_MAX / 4, "{} samples", samples.len());
        assert!((samples[0].0 - 0.253).abs() < 1e-9 && samples[0].1 == 16_384, "{:?}", samples[0]);
        assert_eq!(samples[samples.len() - 1].1, frames * 16_384);
        assert!(samples.windows(2).all(|pair| pair[0].0 < pair[1].0 && pair[0].1 <= pair[1].1));
    }

    #[test]
    fn the_series_follows_a_shift_of_the_first_byte_time() {
        // Goal: a read whose times were moved onto the common start (churn's second reads)
        // reports its progress on that clock too.
        let mut transfer = Transfer::new(3);
        transfer.first_byte_seconds = Some(0.1);
        transfer.progress.record(0.1, 10);
        transfer.progress.record(0.12, 20);
        transfer.progress.record(0.2, 30);
        transfer.progress.finish();
        assert_eq!(transfer.progress_series(), vec![(0.1, 10), (0.2, 30)]);
        transfer.first_byte_seconds = Some(5.1);
        assert_eq!(transfer.progress_series(), vec![(5.1, 10), (5.2, 30)]);
    }
}
