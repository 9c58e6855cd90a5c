//! The scenarios: what each sets up, does, measures and checks.
//!
//! Every scenario puts one seeded object of the chosen size on node 0 (through node 0's
//! counting proxy into the origin), reads node metrics before the reads, runs its reads
//! (all streamed and hashed by the client), reads the metrics again, and turns the
//! differences and the proxies' counts into rows and checks. A scenario never fails by
//! panicking: setup errors end the trial with `Report::error` set, check failures are
//! `Check`s that did not pass.
//!
//! cold-start also sets the report's Kumar-Ross figure when the links were emulated with
//! rates: the put node, which holds the object once it has put it, is a seed beside the
//! origin, and the other nodes are the downloaders.
//!
//! Choices made from the seed (the object's bytes, which node is killed or faulty) are
//! recorded in the report, so `--seed` repeats a trial exactly as far as the testnet
//! decides it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cachemesh_proto::ObjectId;
use tokio_util::sync::CancellationToken;

use crate::data::{Digest, Pattern};
use crate::metrics::{Metrics, counter_deltas};
use crate::network::{NetMode, NetworkReport, Place};
use crate::node::{Binaries, Node, NodeError};
use crate::processes::Processes;
use crate::report::{BySource, Check, KumarRossReport, NodeRow, OriginReport, Parameters, Report};
use crate::shaping::{Downloader, Rate, RatePlan, kumar_ross};
use crate::testbed::{Layout, SetupError, Testbed};
use crate::transfer::{PutError, Reader, Transfer, get_all, put};

/// Origin egress allowed per DC, as a multiple of the object size: one copy plus 2%
/// (retries of a chunk whose answer broke off, and error bodies, are counted too).
pub const EGRESS_RATIO_PER_DC_MAX: f64 = 1.02;
/// In peer-killed, the victim is killed once the fleet's reads (node 0's excluded) have
/// received this fraction of their bytes.
pub const KILL_AT_PROGRESS_FRACTION: f64 = 0.3;
/// How long a killed node may take to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The node that puts the object.
const PUT_NODE: usize = 0;
/// The DC of single-DC scenarios, and the first DC of two-dcs.
const DC_A: &str = "dc-a";
/// The second DC of two-dcs.
const DC_B: &str = "dc-b";

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// N nodes read a fresh object at once: time, sources, and origin egress of one copy.
    ColdStart,
    /// Like cold-start, but one node (not node 0) is SIGKILLed while the reads run.
    PeerKilled,
    /// One node serves corrupt chunks to its peers; no bad byte may reach a client.
    CorruptPeer,
    /// Nodes split into dc-a and dc-b; DCs never mesh and each pulls about one copy.
    TwoDcs,
}

impl Scenario {
    /// Every scenario, in help order.
    pub const ALL: [Scenario; 4] = [Self::ColdStart, Self::PeerKilled, Self::CorruptPeer, Self::TwoDcs];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ColdStart => "cold-start",
            Self::PeerKilled => "peer-killed",
            Self::CorruptPeer => "corrupt-peer",
            Self::TwoDcs => "two-dcs",
        }
    }

    /// What the scenario is for and what it does.
    pub fn goal(self) -> &'static str {
        match self {
            Self::ColdStart => {
                "Goal: N hosts that all need the same fresh object at once get it quickly and pull it from \
                 the origin about once. Node 0 puts an object of --object-size; then all N nodes GET it at \
                 the same instant. Reports per node the completion time and the bytes by source \
                 (local/peer/home/origin)."
            }
            Self::PeerKilled => {
                "Goal: a node dying mid-transfer costs the others time, never bytes. Like cold-start, but one \
                 node other than node 0 (chosen by the seed) is SIGKILLed once the readers (node 0 excluded) \
                 have received 30% of their bytes."
            }
            Self::CorruptPeer => {
                "Goal: a peer serving corrupt chunks cannot get a bad byte to any client. Node 0 puts; one other \
                 node (chosen by the seed) runs with the test-only --fault-corrupt-served-chunks true and first \
                 reads the object itself, so that it holds it and is asked for it; then the remaining nodes \
                 (not node 0, not the faulty one) GET at once."
            }
            Self::TwoDcs => {
                "Goal: datacenters stay apart and each pulls about one copy from the shared origin. The first \
                 ceil(N/2) nodes form dc-a and the rest dc-b (same cluster key, same origin), each DC \
                 bootstrapped from its own first node; node 0 (dc-a) puts; all nodes GET at once."
            }
        }
    }

    /// The checks, in words.
    pub fn checks(self) -> &'static str {
        match self {
            Self::ColdStart => {
                "Checks: every node got byte-identical data (length and BLAKE3 of the source); origin egress \
                 (chunk GET body bytes counted by the proxy, whole run) / object size <= 1.02."
            }
            Self::PeerKilled => {
                "Checks: the kill happened while reads were in flight; every surviving node's GET completes \
                 with byte-identical data."
            }
            Self::CorruptPeer => {
                "Checks: every read (the faulty node's own included) has the right bytes, i.e. zero bad bytes \
                 reached a client; cachemesh_verify_failures_total{source=\"peer\"} > 0 on some node (the fault \
                 was exercised)."
            }
            Self::TwoDcs => {
                "Checks: every node got byte-identical data; no dc-b node lists a dc-a node among its peers \
                 (GET /v1/peers), nor the reverse; every node's mesh.members is its own DC's size - 1; no dc-b node's peer/home bytes came from dc-a (no DC \
                 received more data-plane bytes than its own nodes sent); origin egress per DC <= 1.02 x and in \
                 total <= 2.04 x the object size."
            }
        }
    }

    /// The fewest nodes the scenario makes sense with.
    pub fn min_nodes(self) -> usize {
        match self {
            Self::ColdStart => 1,
            Self::TwoDcs => 2,
            Self::PeerKilled | Self::CorruptPeer => 3,
        }
    }
}

/// The scenario list for `--help`.
pub fn help_text() -> String {
    let mut out = String::from("Scenarios:\n");
    for scenario in Scenario::ALL {
        out.push_str(&format!(
            "  {} (at least {} node{})\n      {}\n      {}\n",
            scenario.name(),
            scenario.min_nodes(),
            if scenario.min_nodes() == 1 { "" } else { "s" },
            scenario.goal(),
            scenario.checks()
        ));
    }
    out
}

/// A trial's inputs.
#[derive(Debug, Clone)]
pub struct Params {
    /// The scenario.
    pub scenario: Scenario,
    /// Nodes.
    pub nodes: usize,
    /// Object size in bytes.
    pub object_size: u64,
    /// The seed.
    pub seed: u64,
    /// `--upload-limit` as given.
    pub upload_limit: Option<String>,
    /// `--upload-limit` of each node (the one given, or its link rate on loopback).
    pub upload_limits: Vec<Option<String>>,
    /// `--net` as given.
    pub net: NetMode,
    /// The rates as given.
    pub rates: RatePlan,
    /// Each node's link rate, each way.
    pub host_rates: Vec<Option<Rate>>,
    /// Where each node runs and listens.
    pub places: Vec<Place>,
    /// Where the origin's proxies listen.
    pub origin_address: Ipv4Addr,
    /// The network, as the report describes it.
    pub network: NetworkReport,
    /// How long the put, and each read phase, may take.
    pub timeout: Duration,
    /// The binaries.
    pub binaries: Binaries,
    /// Where they came from.
    pub bin_dir: PathBuf,
    /// The output directory.
    pub out: PathBuf,
    /// The command line that repeats this trial.
    pub repeat: String,
}

impl Params {
    /// A node chosen by the seed among 1..N (never the put node).
    fn chosen_node(&self) -> usize {
        1 + (self.seed % (self.nodes as u64 - 1)) as usize
    }
}

/// Why a trial stopped before its checks.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    /// Setting up failed.
    #[error("setup failed: {0}")]
    Setup(#[from] SetupError),
    /// Talking to a node failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The put failed.
    #[error(transparent)]
    Put(#[from] PutError),
    /// Killing the victim failed.
    #[error("cannot kill node {node}: {detail}")]
    Kill {
        /// The node.
        node: usize,
        /// What went wrong.
        detail: String,
    },
}

/// Runs the trial; always returns a report (with `error` set when it could not finish).
pub async fn run(params: &Params, processes: &Processes, root: &Path, shutdown: CancellationToken) -> Report {
    let mut report = Report {
        testnet_version: env!("CARGO_PKG_VERSION").to_string(),
        parameters: Parameters {
            scenario: params.scenario.name().to_string(),
            nodes: params.nodes,
            object_size: params.object_size,
            seed: params.seed,
            upload_limit: params.upload_limit.clone(),
            net: params.net.name().to_string(),
            host_rate: params.rates.host,
            origin_rate: params.rates.origin,
            slow_hosts: params.rates.slow.map(|_| params.rates.slow_hosts_fraction),
            slow_rate: params.rates.slow,
            timeout_seconds: params.timeout.as_secs(),
            bin_dir: params.bin_dir.display().to_string(),
            repeat: params.repeat.clone(),
        },
        goal: format!("{} {}", params.scenario.goal(), params.scenario.checks()),
        object_id: None,
        put_seconds: None,
        mesh_formed_seconds: None,
        network: params.network.clone(),
        kumar_ross: None,
        rows: Vec::new(),
        origin: OriginReport::default(),
        checks: Vec::new(),
        notes: Vec::new(),
        error: None,
        passed: false,
    };
    if let Err(error) = run_trial(params, processes, root, shutdown, &mut report).await {
        report.error = Some(error.to_string());
    }
    report.finish();
    report
}

/// What the shared steps left for the scenario-specific part.
struct Trial {
    testbed: Testbed,
    object_id: ObjectId,
    expected: Digest,
    before: Vec<Option<Metrics>>,
}

async fn run_trial(
    params: &Params,
    processes: &Processes,
    root: &Path,
    shutdown: CancellationToken,
    report: &mut Report,
) -> Result<(), TrialError> {
    let nodes = params.nodes;
    let faulty = (params.scenario == Scenario::CorruptPeer).then(|| params.chosen_node());
    let dcs: Vec<String> = match params.scenario {
        Scenario::TwoDcs => {
            (0..nodes).map(|index| if index < nodes.div_ceil(2) { DC_A } else { DC_B }.into()).collect()
        }
        _ => vec![DC_A.to_string(); nodes],
    };
    let layout = Layout {
        dcs,
        upload_limits: params.upload_limits.clone(),
        places: params.places.clone(),
        origin_address: params.origin_address,
        faulty,
    };
    eprintln!("testnet: starting moto and {nodes} nodes in {}", root.display());
    let testbed = Testbed::start(processes, &params.binaries, root, &layout, shutdown).await?;
    report.mesh_formed_seconds = Some(testbed.mesh_formed_seconds);
    eprintln!("testnet: mesh formed in {:.2} s", testbed.mesh_formed_seconds);
    report.rows = testbed
        .nodes
        .iter()
        .map(|node| NodeRow {
            node: node.index(),
            dc: node.spec.dc.clone(),
            node_id: node.mesh.node_id.clone(),
            link_rate: params.host_rates.get(node.index()).copied().flatten(),
            result: "-".into(),
            ..NodeRow::default()
        })
        .collect();
    report.rows[PUT_NODE].role = "put".into();
    if let Some(faulty) = faulty {
        report.rows[faulty].role = "faulty".into();
        report.notes.push(format!("node {faulty} serves corrupt chunks (chosen by the seed)"));
    }

    eprintln!("testnet: putting {} bytes on node {PUT_NODE}", params.object_size);
    let put_node = &testbed.nodes[PUT_NODE];
    let pattern = Pattern::new(params.seed);
    let put = put(put_node.client(), PUT_NODE, pattern, params.object_size, params.timeout).await?;
    report.object_id = Some(put.object_id.to_string());
    report.put_seconds = Some(put.seconds);
    report.notes.push(format!("put: {} chunks, {} uploaded to the origin", put.chunk_count, put.chunks_uploaded));
    let before = snapshot(&testbed.nodes).await;
    let mut trial = Trial { testbed, object_id: put.object_id, expected: put.digest, before };

    match params.scenario {
        Scenario::ColdStart => cold_start(params, &mut trial, report).await?,
        Scenario::PeerKilled => peer_killed(params, processes, &mut trial, report).await?,
        Scenario::CorruptPeer => corrupt_peer(params, &mut trial, report, faulty.unwrap_or(1)).await?,
        Scenario::TwoDcs => two_dcs(params, &mut trial, report).await?,
    }
    Ok(())
}

fn readers(trial: &Trial, nodes: impl IntoIterator<Item = usize>) -> Vec<Reader> {
    nodes
        .into_iter()
        .map(|node| Reader {
            node,
            client: trial.testbed.nodes[node].client().clone(),
            counts_towards_progress: node != PUT_NODE,
        })
        .collect()
}

async fn read_all(params: &Params, trial: &Trial, nodes: impl IntoIterator<Item = usize>) -> Vec<Transfer> {
    let readers = readers(trial, nodes);
    eprintln!("testnet: {} nodes read the object at once", readers.len());
    let (_progress, joined) = get_all(readers, trial.object_id, params.timeout);
    joined.await
}

/// Reads every node's metrics (None for a node that does not answer).
async fn snapshot(nodes: &[Node]) -> Vec<Option<Metrics>> {
    let mut out = Vec::with_capacity(nodes.len());
    for node in nodes {
        out.push(node.metrics().await.ok().map(|(_, metrics)| metrics));
    }
    out
}

fn by_source(metrics: &Metrics, name: &str) -> BySource {
    let source = |label: &str| metrics.count(name, &[("source", label)]);
    BySource { local: source("local"), peer: source("peer"), home: source("home"), origin: source("origin") }
}

fn by_source_delta(before: &Metrics, after: &Metrics, name: &str) -> BySource {
    let (b, a) = (by_source(before, name), by_source(after, name));
    BySource {
        local: a.local.saturating_sub(b.local),
        peer: a.peer.saturating_sub(b.peer),
        home: a.home.saturating_sub(b.home),
        origin: a.origin.saturating_sub(b.origin),
    }
}

fn bytes_match(digest: &Digest, expected: &Digest) -> bool {
    digest.length() == expected.length() && digest.hex() == expected.hex()
}

/// Fills rows from the reads, the metrics now, and the proxies; saves each node's final
/// metrics in `OUT/metrics/`; returns the metrics read now.
async fn finish_rows(
    params: &Params,
    trial: &Trial,
    transfers: &[Transfer],
    gone: &[usize],
    report: &mut Report,
) -> Vec<Option<Metrics>> {
    let metrics_dir = params.out.join("metrics");
    let _ = std::fs::create_dir_all(&metrics_dir);
    let mut after = Vec::with_capacity(trial.testbed.nodes.len());
    for node in &trial.testbed.nodes {
        if gone.contains(&node.index()) {
            after.push(None);
            continue;
        }
        match node.metrics().await {
            Ok((text, metrics)) => {
                let _ = std::fs::write(metrics_dir.join(format!("node-{}.prom", node.index())), text);
                after.push(Some(metrics));
            }
            Err(error) => {
                report.notes.push(format!("cannot read the metrics of node {}: {error}", node.index()));
                after.push(None);
            }
        }
    }
    let origin = trial.testbed.origin_figures();
    for row in &mut report.rows {
        let index = row.node;
        row.origin = origin[index];
        if let (Some(before), Some(now)) = (&trial.before[index], &after[index]) {
            row.bytes_served = Some(by_source_delta(before, now, "cachemesh_bytes_served_total"));
            row.chunk_fetches = Some(by_source_delta(before, now, "cachemesh_chunk_fetches_total"));
            let failures = |m: &Metrics| m.count("cachemesh_verify_failures_total", &[("source", "peer")]);
            row.verify_failures_peer = Some(failures(now).saturating_sub(failures(before)));
            row.counter_deltas = counter_deltas(before, now);
            row.sent_to_peers =
                Some(now.count(DATA_PLANE_SENT, &[]).saturating_sub(before.count(DATA_PLANE_SENT, &[])));
        }
        if gone.contains(&index) {
            row.result = "killed".into();
        }
        let Some(transfer) = transfers.iter().rev().find(|transfer| transfer.node == index) else {
            continue;
        };
        row.bytes_received = transfer.digest.length();
        row.first_byte_seconds = transfer.first_byte_seconds;
        if let Some(error) = &transfer.error {
            row.error = Some(error.clone());
            if !gone.contains(&index) {
                row.result = "failed".into();
            }
            continue;
        }
        let matches = bytes_match(&transfer.digest, &trial.expected);
        row.blake3 = Some(transfer.digest.hex());
        row.bytes_match = Some(matches);
        row.seconds = transfer.seconds;
        row.mb_per_second = transfer.seconds.map(|s| params.object_size as f64 / s.max(f64::MIN_POSITIVE) / 1e6);
        if !gone.contains(&index) {
            row.result = if matches { "ok" } else { "wrong bytes" }.into();
        }
    }
    let size = params.object_size.max(1) as f64;
    let mut per_dc: BTreeMap<String, u64> = BTreeMap::new();
    for row in &report.rows {
        *per_dc.entry(row.dc.clone()).or_default() += row.origin.chunk_get_bytes;
    }
    let totals = trial.testbed.origin_total(|_| true);
    report.origin = OriginReport {
        chunk_get_bytes: totals.chunk_get_bytes,
        egress_ratio: totals.chunk_get_bytes as f64 / size,
        chunk_get_bytes_per_dc: per_dc,
        totals,
    };
    after
}

/// The check that every read of `nodes` completed with the source's bytes.
fn identical_bytes_check(name: &str, report: &Report, nodes: &[usize]) -> Check {
    let bad: Vec<String> = report
        .rows
        .iter()
        .filter(|row| nodes.contains(&row.node))
        .filter(|row| row.bytes_match != Some(true))
        .map(|row| match &row.error {
            Some(error) => format!("node {}: {error}", row.node),
            None => format!(
                "node {}: {} bytes, BLAKE3 {}",
                row.node,
                row.bytes_received,
                row.blake3.as_deref().unwrap_or("-")
            ),
        })
        .collect();
    let detail = if bad.is_empty() {
        format!("{} of {} reads returned the object's exact bytes", nodes.len(), nodes.len())
    } else {
        format!("{} of {} reads did not: {}", bad.len(), nodes.len(), bad.join("; "))
    };
    Check::new(name, bad.is_empty(), detail)
}

fn egress_check(name: &str, bytes: u64, object_size: u64, copies: f64) -> Check {
    let ratio = bytes as f64 / object_size.max(1) as f64;
    let limit = EGRESS_RATIO_PER_DC_MAX * copies;
    Check::new(
        name,
        ratio <= limit,
        format!(
            "{bytes} chunk bytes left the origin for a {object_size}-byte object: {ratio:.3} x (limit {limit:.2} x)"
        ),
    )
}

async fn cold_start(params: &Params, trial: &mut Trial, report: &mut Report) -> Result<(), TrialError> {
    let all: Vec<usize> = (0..params.nodes).collect();
    let transfers = read_all(params, trial, all.clone()).await;
    finish_rows(params, trial, &transfers, &[], report).await;
    report.checks.push(identical_bytes_check("identical_bytes", report, &all));
    report.checks.push(egress_check("origin_egress_one_copy", report.origin.chunk_get_bytes, params.object_size, 1.0));
    report.kumar_ross = kumar_ross_figure(params, report);
    Ok(())
}

/// The measured fleet time beside the Kumar-Ross minimum, when the links were emulated with
/// rates. The put node holds the whole object once its put is done, so it is a seed beside
/// the origin; the other nodes are the downloaders, and the measured time is the slowest
/// of their reads (None when one failed).
fn kumar_ross_figure(params: &Params, report: &mut Report) -> Option<KumarRossReport> {
    if report.network.mode != "emulated" || !params.rates.any() {
        if params.rates.any() {
            report.notes.push(
                "no Kumar-Ross figure: on loopback the rates only cap each daemon's uploads to peers".to_string(),
            );
        }
        return None;
    }
    let downloaders: Vec<Downloader> = (0..params.nodes)
        .filter(|index| *index != PUT_NODE)
        .map(|index| Downloader { upload: params.host_rates[index], download: params.host_rates[index] })
        .collect();
    let minimum = kumar_ross(params.object_size, &[params.rates.origin, params.host_rates[PUT_NODE]], &downloaders)?;
    let times: Option<Vec<f64>> =
        report.rows.iter().filter(|row| row.node != PUT_NODE).map(|row| row.seconds).collect();
    let measured_seconds = times?.into_iter().reduce(f64::max)?;
    Some(KumarRossReport {
        file_bytes: params.object_size,
        seeds: format!("the origin and node {PUT_NODE} (which put the object)"),
        downloaders: downloaders.len(),
        measured_seconds,
        ratio: measured_seconds / minimum.seconds,
        minimum,
    })
}

async fn peer_killed(
    params: &Params,
    processes: &Processes,
    trial: &mut Trial,
    report: &mut Report,
) -> Result<(), TrialError> {
    let victim = params.chosen_node();
    report.rows[victim].role = "victim".into();
    let all: Vec<usize> = (0..params.nodes).collect();
    let readers = readers(trial, all.clone());
    let counted: u64 = readers.iter().filter(|reader| reader.counts_towards_progress).count() as u64;
    let threshold = (counted as f64 * params.object_size as f64 * KILL_AT_PROGRESS_FRACTION) as u64;
    eprintln!("testnet: {} nodes read the object at once; node {victim} dies at {threshold} bytes received", all.len());
    let started = std::time::Instant::now();
    let (mut progress, joined) = get_all(readers, trial.object_id, params.timeout);
    let mut joined = std::pin::pin!(joined);
    let mut early = None;
    let killed_at = tokio::select! {
        reached = progress.wait_for(|received| *received >= threshold) => reached.ok().map(|received| *received),
        transfers = &mut joined => {
            early = Some(transfers);
            None
        }
    };
    let kill_seconds = started.elapsed().as_secs_f64();
    let handle = trial.testbed.nodes[victim].handle();
    processes.kill(handle).map_err(|error| TrialError::Kill { node: victim, detail: error.to_string() })?;
    match processes.wait_exit(handle, KILL_TIMEOUT).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(TrialError::Kill {
                node: victim,
                detail: format!("still running {KILL_TIMEOUT:?} after SIGKILL"),
            });
        }
        Err(error) => return Err(TrialError::Kill { node: victim, detail: error.to_string() }),
    }
    let transfers = match early {
        Some(transfers) => transfers,
        None => joined.await,
    };
    match killed_at {
        Some(received) => report.notes.push(format!(
            "node {victim} SIGKILLed at {kill_seconds:.3} s, when the readers had {received} of {} bytes",
            counted * params.object_size
        )),
        None => report.notes.push(format!("node {victim} SIGKILLed after every read had ended ({kill_seconds:.3} s)")),
    }
    finish_rows(params, trial, &transfers, &[victim], report).await;
    let slowest = transfers.iter().filter(|transfer| transfer.node != victim).filter_map(|transfer| transfer.seconds);
    if let Some(slowest) = slowest.reduce(f64::max) {
        report.notes.push(format!(
            "the slowest survivor finished {:.3} s after the kill (a dead holder's cost in time)",
            slowest - kill_seconds
        ));
    }
    let survivors: Vec<usize> = all.iter().copied().filter(|node| *node != victim).collect();
    let in_flight: Vec<usize> = transfers
        .iter()
        .filter(|transfer| transfer.node != victim && transfer.node != PUT_NODE)
        .filter(|transfer| transfer.seconds.is_none_or(|seconds| seconds > kill_seconds))
        .map(|transfer| transfer.node)
        .collect();
    report.checks.push(Check::new(
        "killed_while_in_flight",
        killed_at.is_some() && !in_flight.is_empty(),
        if in_flight.is_empty() {
            "no surviving reader was still reading when the victim died (object too small to catch in flight?)"
                .to_string()
        } else {
            format!("node {victim} died at {kill_seconds:.3} s while nodes {in_flight:?} were still reading")
        },
    ));
    report.checks.push(identical_bytes_check("survivors_identical_bytes", report, &survivors));
    report.notes.push(format!(
        "origin egress {:.3} x the object size (not a check here: chunks the victim was fetching may leave the origin again)",
        report.origin.egress_ratio
    ));
    Ok(())
}

async fn corrupt_peer(
    params: &Params,
    trial: &mut Trial,
    report: &mut Report,
    faulty: usize,
) -> Result<(), TrialError> {
    eprintln!("testnet: faulty node {faulty} reads the object first");
    let mut transfers = read_all(params, trial, [faulty]).await;
    let rest: Vec<usize> = (0..params.nodes).filter(|node| *node != PUT_NODE && *node != faulty).collect();
    transfers.extend(read_all(params, trial, rest.clone()).await);
    finish_rows(params, trial, &transfers, &[], report).await;
    let mut readers = vec![faulty];
    readers.extend(&rest);
    report.checks.push(identical_bytes_check("no_bad_bytes_reached_a_client", report, &readers));
    let failures: Vec<(usize, u64)> = report
        .rows
        .iter()
        .filter_map(|row| row.verify_failures_peer.filter(|count| *count > 0).map(|count| (row.node, count)))
        .collect();
    let total: u64 = failures.iter().map(|(_, count)| count).sum();
    report.checks.push(Check::new(
        "fault_exercised",
        total > 0,
        if total > 0 {
            format!("{total} peer chunks failed verification, (node, count): {failures:?}")
        } else {
            format!(
                "no node counted cachemesh_verify_failures_total{{source=\"peer\"}}: nobody fetched from faulty node {faulty}"
            )
        },
    ));
    let faulty_id = trial.testbed.nodes[faulty].mesh.node_id.clone();
    for node in &trial.testbed.nodes {
        if node.index() == faulty {
            continue;
        }
        if let Ok(peers) = node.peers().await
            && let Some(peer) = peers.peers.iter().find(|peer| peer.node_id == faulty_id)
            && (peer.corrupt_chunks > 0 || peer.penalised)
        {
            report.notes.push(format!(
                "node {} lists faulty node {faulty} with {} corrupt chunks, penalised: {}",
                node.index(),
                peer.corrupt_chunks,
                peer.penalised
            ));
        }
    }
    Ok(())
}

async fn two_dcs(params: &Params, trial: &mut Trial, report: &mut Report) -> Result<(), TrialError> {
    let all: Vec<usize> = (0..params.nodes).collect();
    let transfers = read_all(params, trial, all.clone()).await;
    let after = finish_rows(params, trial, &transfers, &[], report).await;
    report.checks.push(identical_bytes_check("identical_bytes", report, &all));

    let nodes = &trial.testbed.nodes;
    let ids_of = |dc: &str| -> Vec<String> {
        nodes.iter().filter(|node| node.spec.dc == dc).map(|node| node.mesh.node_id.clone()).collect()
    };
    for (from, to) in [(DC_B, DC_A), (DC_A, DC_B)] {
        let foreign = ids_of(to);
        let mut crossings = Vec::new();
        let mut unreadable = Vec::new();
        for node in nodes.iter().filter(|node| node.spec.dc == from) {
            match node.peers().await {
                Ok(peers) => {
                    for peer in peers.peers.iter().filter(|peer| foreign.contains(&peer.node_id)) {
                        let other = nodes.iter().find(|n| n.mesh.node_id == peer.node_id).map_or(0, Node::index);
                        crossings.push(format!("node {} lists node {other} ({to})", node.index()));
                    }
                }
                Err(error) => unreadable.push(error.to_string()),
            }
        }
        let passed = crossings.is_empty() && unreadable.is_empty();
        let detail = if passed {
            format!("no {from} node lists a {to} node among its peers")
        } else {
            [crossings, unreadable].concat().join("; ")
        };
        report.checks.push(Check::new(&format!("no_{from}_peer_in_{to}").replace('-', "_"), passed, detail));
    }
    let mut wrong_members = Vec::new();
    for node in nodes {
        let expected = nodes.iter().filter(|other| other.spec.dc == node.spec.dc).count() as u64 - 1;
        match node.status().await.map(|status| status.mesh.map(|mesh| mesh.members)) {
            Ok(Some(members)) if members == expected => {}
            Ok(members) => wrong_members.push(format!(
                "node {} ({}) sees {} members, its DC has {expected} others",
                node.index(),
                node.spec.dc,
                members.map_or("no".to_string(), |members| members.to_string())
            )),
            Err(error) => wrong_members.push(error.to_string()),
        }
    }
    report.checks.push(Check::new(
        "members_only_within_dc",
        wrong_members.is_empty(),
        if wrong_members.is_empty() {
            "every node's mesh.members is the size of its own DC minus one".to_string()
        } else {
            wrong_members.join("; ")
        },
    ));
    let balance = data_plane_balance_check(trial, &after, report);
    report.checks.push(balance);

    let per_dc = report.origin.chunk_get_bytes_per_dc.clone();
    for dc in [DC_A, DC_B] {
        let bytes = per_dc.get(dc).copied().unwrap_or(0);
        report.checks.push(egress_check(
            &format!("origin_egress_{}_one_copy", dc.replace('-', "_")),
            bytes,
            params.object_size,
            1.0,
        ));
    }
    report.checks.push(egress_check(
        "origin_egress_total_two_copies",
        report.origin.chunk_get_bytes,
        params.object_size,
        2.0,
    ));
    Ok(())
}

/// Chunk bytes a node wrote to peers on the data plane.
const DATA_PLANE_SENT: &str = "cachemesh_peer_upload_bytes_total";
/// Chunk bytes a node received whole from peers on the data plane.
const DATA_PLANE_RECEIVED: &str = "cachemesh_peer_download_bytes_total";

/// During the reads, no DC received more data-plane bytes than its own nodes sent: bytes
/// that came from the other DC would show up as a DC receiving more than it sent. (Sent can
/// exceed received within a DC: an upload counts as it is written, a download only when
/// the whole chunk has arrived, so a cancelled or hedged request counts on one side only.)
fn data_plane_balance_check(trial: &Trial, after: &[Option<Metrics>], report: &mut Report) -> Check {
    let name = "no_cross_dc_data_plane_bytes";
    let mut lines = Vec::new();
    let mut passed = true;
    let mut exposed = false;
    for dc in [DC_A, DC_B] {
        let (mut sent, mut received) = (0u64, 0u64);
        for node in trial.testbed.nodes.iter().filter(|node| node.spec.dc == dc) {
            let (Some(before), Some(now)) = (&trial.before[node.index()], &after[node.index()]) else {
                return Check::new(name, false, format!("the metrics of node {} could not be read", node.index()));
            };
            exposed |= now.has(DATA_PLANE_SENT) || now.has(DATA_PLANE_RECEIVED);
            sent += now.count(DATA_PLANE_SENT, &[]).saturating_sub(before.count(DATA_PLANE_SENT, &[]));
            received += now.count(DATA_PLANE_RECEIVED, &[]).saturating_sub(before.count(DATA_PLANE_RECEIVED, &[]));
        }
        passed &= received <= sent;
        lines.push(format!("{dc} nodes received {received} and sent {sent} data-plane bytes"));
    }
    let from_peers: u64 = report.rows.iter().filter_map(|row| row.bytes_served).map(|s| s.peer + s.home).sum();
    if !exposed && from_peers > 0 {
        report.notes.push(format!("no node exposes {DATA_PLANE_SENT} or {DATA_PLANE_RECEIVED}"));
        return Check::new(name, false, "nodes served peer/home bytes but expose no data-plane byte counters");
    }
    Check::new(name, passed, lines.join("; "))
}
