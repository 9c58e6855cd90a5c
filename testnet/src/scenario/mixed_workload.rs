//! mixed-workload: many objects of different sizes, put on different nodes, read at once
//! by different subsets of the fleet.
//!
//! Besides the trial's object (node 0's, of `--object-size`), [`MIXED_OBJECTS_PER_NODE`]
//! objects per node (at most [`MIXED_OBJECTS_MAX`]) are put, object K on node K mod N. Their
//! sizes come from the seed: every [`CHUNK_MULTIPLE_EVERY`]th is a whole number of chunks,
//! the rest are log-uniform between 1 byte and `--object-size`, so that tiny objects, objects
//! just off a chunk boundary and many-chunk objects all meet in one run. Each node reads
//! each object it did not put with probability 1/2 (at least one reader per object), all
//! reads at once, so the daemons interleave many objects' fetch windows, home requests and
//! provider lookups.
//!
//! With at least 3 nodes, the last node is then restarted on an empty data dir (a new
//! identity), so the objects it put are held by the origin alone: their readers must take
//! them from the origin, while the others have a live seed in the mesh.
//!
//! The table's row per node sums its reads: bytes received, and the time its last read
//! ended from the common start.
//!
//! Non-goals: objects read while they are still being put, and deletes or evictions under
//! load.

use std::collections::BTreeSet;
use std::path::Path;

use cachemesh_proto::ObjectId;

use crate::data::{Digest, Pattern};
use crate::processes::Processes;
use crate::report::{Check, Report};
use crate::transfer::{Reader, Transfer, get_all, put};

use super::{
    PUT_NODE, Params, Trial, TrialError, bytes_match, egress_check, finish_rows, forget_copies, readers,
    seeded_fraction,
};

/// Objects put per node besides the trial's object ...
pub const MIXED_OBJECTS_PER_NODE: usize = 4;
/// ... and at most this many in all.
pub const MIXED_OBJECTS_MAX: usize = 32;
/// Every this many objects, one is a whole number of chunks.
const CHUNK_MULTIPLE_EVERY: usize = 4;
/// The daemon's chunk size, for the sizes on a chunk boundary.
const CHUNK_BYTES: u64 = cachemesh_proto::limits::CHUNK_BYTES_MAX as u64;
/// Fewest nodes for one of them to forget its objects: with two, the emptied node would
/// be every other object's only reader and the put node every one of its objects' reader.
const FORGETTING_NODES_MIN: usize = 3;
/// Added to the seed for the pattern of object K (plus K), away from the offsets that
/// other scenarios use for their second objects.
const OBJECT_SEED_OFFSET: u64 = 1000;
/// Seeded choices are drawn with this stride per object, so that object and node choices
/// never share an index.
const CHOICE_STRIDE: u64 = 1 << 20;

/// One object of the workload.
struct Object {
    id: ObjectId,
    digest: Digest,
    size: u64,
    putter: usize,
    readers: Vec<usize>,
}

/// The size of extra object `k` (1-based), from the seed.
fn object_size(params: &Params, k: usize) -> u64 {
    let largest = params.object_size.max(1);
    let draw = seeded_fraction(params.seed, k as u64);
    if k.is_multiple_of(CHUNK_MULTIPLE_EVERY) && largest >= CHUNK_BYTES {
        let chunks = 1 + (draw * (largest / CHUNK_BYTES) as f64) as u64;
        return (chunks * CHUNK_BYTES).min(largest / CHUNK_BYTES * CHUNK_BYTES);
    }
    // Log-uniform in [1, largest].
    ((largest as f64).powf(draw).round() as u64).clamp(1, largest)
}

/// The readers of object `k` put by `putter`: each other node with probability 1/2, and at
/// least the node after the putter.
fn object_readers(params: &Params, k: usize, putter: usize) -> Vec<usize> {
    let mut chosen: Vec<usize> = (0..params.nodes)
        .filter(|&node| node != putter)
        .filter(|&node| seeded_fraction(params.seed, CHOICE_STRIDE * (k as u64 + 1) + node as u64) < 0.5)
        .collect();
    if chosen.is_empty() {
        chosen.push((putter + 1) % params.nodes);
    }
    chosen
}

pub(super) async fn mixed_workload(
    params: &Params,
    processes: &Processes,
    root: &Path,
    trial: &mut Trial,
    report: &mut Report,
) -> Result<(), TrialError> {
    let nodes = params.nodes;
    let extra = (MIXED_OBJECTS_PER_NODE * nodes).min(MIXED_OBJECTS_MAX);
    let mut objects = vec![Object {
        id: trial.object_id,
        digest: trial.expected.clone(),
        size: params.object_size,
        putter: PUT_NODE,
        readers: object_readers(params, 0, PUT_NODE),
    }];
    let started = std::time::Instant::now();
    eprintln!("testnet: putting {extra} more objects across the nodes");
    for k in 1..=extra {
        let putter = k % nodes;
        let size = object_size(params, k);
        let pattern = Pattern::new(params.seed.wrapping_add(OBJECT_SEED_OFFSET + k as u64));
        let client = trial.testbed.nodes[putter].client().clone();
        let answer = put(&client, putter, pattern, size, params.timeout).await?;
        objects.push(Object {
            id: answer.object_id,
            digest: answer.digest,
            size,
            putter,
            readers: object_readers(params, k, putter),
        });
    }
    let put_seconds = started.elapsed().as_secs_f64();
    let emptied = (nodes >= FORGETTING_NODES_MIN).then_some(nodes - 1);
    if let Some(node) = emptied {
        eprintln!("testnet: node {node} forgets what it put (restarted on an empty data dir)");
        forget_copies(params, processes, root, &mut trial.testbed, node).await?;
    }
    trial.before = super::snapshot(&trial.testbed.nodes).await;
    let egress_before = trial.testbed.origin_total(|_| true).chunk_get_bytes;
    let read_count: usize = objects.iter().map(|object| object.readers.len()).sum();
    eprintln!("testnet: {read_count} reads of {} objects at once", objects.len());
    let reads = objects.iter().map(|object| {
        let mut chosen: Vec<Reader> = readers(trial, object.readers.iter().copied());
        for reader in &mut chosen {
            reader.counts_towards_progress = false;
        }
        let (_progress, joined) = get_all(chosen, object.id, params.timeout);
        joined
    });
    let results: Vec<Vec<Transfer>> = futures::future::join_all(reads).await;
    finish_rows(params, trial, &[], &[], report).await;

    let mut bad = Vec::new();
    for (row_index, row) in report.rows.iter_mut().enumerate() {
        let mine: Vec<(&Object, &Transfer)> = objects
            .iter()
            .zip(&results)
            .flat_map(|(object, transfers)| transfers.iter().filter(|t| t.node == row_index).map(move |t| (object, t)))
            .collect();
        let puts = objects.iter().filter(|object| object.putter == row_index).count();
        let forgot = if emptied == Some(row_index) { " (then emptied)" } else { "" };
        row.role = format!("put {puts}{forgot}, read {}", mine.len());
        if mine.is_empty() {
            continue;
        }
        row.bytes_received = mine.iter().map(|(_, transfer)| transfer.digest.length()).sum();
        row.first_byte_seconds = mine.iter().filter_map(|(_, transfer)| transfer.first_byte_seconds).reduce(f64::min);
        let mut node_ok = true;
        for (object, transfer) in &mine {
            let good = transfer.error.is_none() && bytes_match(&transfer.digest, &object.digest);
            if !good {
                node_ok = false;
                bad.push(format!(
                    "node {row_index}, object {} ({} bytes): {}",
                    object.id,
                    object.size,
                    transfer.error.as_deref().unwrap_or("wrong bytes")
                ));
            }
        }
        row.bytes_match = Some(node_ok);
        row.progress = merged_progress(mine.iter().map(|(_, transfer)| *transfer));
        let times: Option<Vec<f64>> = mine.iter().map(|(_, transfer)| transfer.seconds).collect();
        row.seconds = times.and_then(|times| times.into_iter().reduce(f64::max));
        row.mb_per_second = row.seconds.map(|seconds| row.bytes_received as f64 / seconds.max(f64::MIN_POSITIVE) / 1e6);
        row.result = if node_ok {
            "ok".into()
        } else if mine.iter().any(|(_, transfer)| transfer.error.is_some()) {
            "failed".into()
        } else {
            "wrong bytes".into()
        };
    }
    report.checks.push(Check::new(
        "identical_bytes",
        bad.is_empty(),
        if bad.is_empty() {
            format!("all {read_count} reads of {} objects had their object's exact bytes", objects.len())
        } else {
            format!("{} of {read_count} reads did not: {}", bad.len(), bad.join("; "))
        },
    ));
    let read_bytes: u64 = objects.iter().filter(|object| !object.readers.is_empty()).map(|object| object.size).sum();
    // Each object leaves the origin at most about once; the emptied node's objects, held
    // by the origin alone, must have left it (at least once each), so the origin path is
    // exercised under the mixed load rather than skipped by live seeds.
    let origin_only: Vec<&Object> = objects.iter().filter(|object| Some(object.putter) == emptied).collect();
    let origin_only_bytes: u64 = origin_only.iter().map(|object| object.size).sum();
    let egress = trial.testbed.origin_total(|_| true).chunk_get_bytes.saturating_sub(egress_before);
    report.checks.push(egress_check("origin_egress_one_copy_per_object", egress, read_bytes, 1.0));
    if emptied.is_some() {
        report.checks.push(Check::new(
            "origin_only_objects_came_from_the_origin",
            egress >= origin_only_bytes,
            format!(
                "{egress} chunk bytes left the origin; the {} objects held only by the origin have {origin_only_bytes} \
                 bytes (at least that much must leave it)",
                origin_only.len()
            ),
        ));
    }
    // The summary's ratio is against everything the fleet read, not node 0's object alone.
    report.origin.egress_ratio = report.origin.chunk_get_bytes as f64 / read_bytes.max(1) as f64;
    let sizes: BTreeSet<u64> = objects.iter().map(|object| object.size).collect();
    report.notes.push(format!(
        "{} objects ({} distinct sizes from {} to {} bytes, {} bytes in all) put in {put_seconds:.2} s; {}{read_count} \
         reads at once; per object (size, putter, readers): {}",
        objects.len(),
        sizes.len(),
        sizes.first().copied().unwrap_or(0),
        sizes.last().copied().unwrap_or(0),
        read_bytes,
        emptied.map_or(String::new(), |node| format!(
            "node {node} then forgot its {} objects ({origin_only_bytes} bytes, held by the origin alone); ",
            origin_only.len()
        )),
        objects
            .iter()
            .map(|object| format!("{} {} {:?}", object.size, object.putter, object.readers))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(())
}

/// One cumulative series for all of a node's reads: each read's samples turned into the
/// bytes added since its previous sample, merged by time and summed up again.
fn merged_progress<'a>(transfers: impl Iterator<Item = &'a Transfer>) -> Vec<(f64, u64)> {
    let mut steps: Vec<(f64, u64)> = Vec::new();
    for transfer in transfers {
        let mut previous = 0;
        for (seconds, bytes) in transfer.progress_series() {
            steps.push((seconds, bytes - previous));
            previous = bytes;
        }
    }
    steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0;
    steps
        .into_iter()
        .map(|(seconds, added)| {
            total += added;
            (seconds, total)
        })
        .collect()
}
