//! rolling-restart: every node stopped and started again in turn, as an upgrade does.
//!
//! Each node is stopped with SIGTERM (what a service manager sends), must exit 0 within
//! [`STOP_TIMEOUT`], and is started again on the same data dir, bootstrapped from the next
//! node. Before the next node goes, the restarted one must see every other member and
//! publish its provider records again (the DHT gauges `cachemesh_dht_provided_keys` >= 1 and
//! `cachemesh_dht_provide_queue` = 0; what it holds comes from its persistent store).
//! After the whole roll every node reads the object again: it must come entirely from its
//! own store, with nothing from the origin.
//!
//! Non-goals: restarts under load (churn kills nodes mid-transfer) and upgrades across
//! versions (both sides run the same binary here).

use std::time::Duration;

use crate::report::{Check, Report};

use super::{
    Params, Processes, Trial, TrialError, finish_rows, identical_bytes_check, membership_check, problems_check,
    read_all, snapshot, transfers_check, wait_for_members,
};

/// How long a node may take to exit after SIGTERM: its graceful shutdown (leaving the
/// mesh, flushing writes) is bounded well below this.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a restarted node may take to advertise its objects again.
pub const READVERTISE_TIMEOUT: Duration = Duration::from_secs(90);

pub(super) async fn rolling_restart(
    params: &Params,
    processes: &Processes,
    root: &std::path::Path,
    trial: &mut Trial,
    report: &mut Report,
) -> Result<(), TrialError> {
    let nodes = params.nodes;
    let all: Vec<usize> = (0..nodes).collect();
    let first = read_all(params, trial, all.clone()).await;
    report.checks.push(transfers_check("first_reads_identical_bytes", "first reads", &first, &trial.expected));

    let mut unclean = Vec::new();
    let mut not_advertising = Vec::new();
    let mut steps = Vec::new();
    for index in 0..nodes {
        let started = std::time::Instant::now();
        let handle = trial.testbed.nodes[index].handle();
        processes.terminate(handle).map_err(|error| TrialError::Stop { node: index, detail: error.to_string() })?;
        match processes.wait_exit(handle, STOP_TIMEOUT).await {
            Ok(Some(status)) if status.success() => {}
            Ok(Some(status)) => unclean.push(format!("node {index} exited with {status}")),
            Ok(None) => {
                unclean.push(format!("node {index} still ran {STOP_TIMEOUT:?} after SIGTERM"));
                super::kill_node(processes, trial, index).await?;
            }
            Err(error) => return Err(TrialError::Stop { node: index, detail: error.to_string() }),
        }
        let stopped = started.elapsed().as_secs_f64();
        let bootstrap = (nodes > 1).then(|| (index + 1) % nodes);
        trial.testbed.restart_node(processes, &params.binaries, root, index, bootstrap, nodes as u64 - 1).await?;
        let rejoined = started.elapsed().as_secs_f64();
        let advertised = wait_for_provided(trial, index).await;
        if let Err(seen) = &advertised {
            not_advertising.push(format!("node {index}: {seen}"));
        }
        steps.push(format!(
            "node {index}: stopped in {stopped:.2} s, meshed again at {rejoined:.2} s, advertising at {}",
            advertised.map_or("-".to_string(), |_| format!("{:.2} s", started.elapsed().as_secs_f64()))
        ));
    }
    report.notes.push(format!("the roll, each step from its SIGTERM: {}", steps.join("; ")));
    let stopped = format!("all {nodes} nodes exited 0 within {STOP_TIMEOUT:?} of SIGTERM");
    report.checks.push(problems_check("graceful_stops", &unclean, stopped));
    let advertised = format!("every restarted node republished its provider records within {READVERTISE_TIMEOUT:?}");
    report.checks.push(problems_check("readvertised", &not_advertising, advertised));
    // A node that went last may not yet be heard by all (the others dropped it when it
    // stopped and hear it again with its next announcement).
    let members =
        wait_for_members(&trial.testbed, &all, |_, members| members >= nodes as u64 - 1, READVERTISE_TIMEOUT).await;
    let reached = format!("every node sees the {} others", nodes - 1);
    report.checks.push(membership_check("one_mesh_after_the_roll", &members, &reached, READVERTISE_TIMEOUT));

    trial.before = snapshot(&trial.testbed.nodes).await;
    let egress_before = trial.testbed.origin_total(|_| true).chunk_get_bytes;
    let second = read_all(params, trial, all.clone()).await;
    finish_rows(params, trial, &second, &[], report).await;
    report.checks.push(identical_bytes_check("second_reads_identical_bytes", report, &all));
    let not_local: Vec<String> = report
        .rows
        .iter()
        .filter(|row| row.bytes_served.is_none_or(|served| served.local != params.object_size))
        .map(|row| match row.bytes_served {
            Some(served) => format!(
                "node {}: local {} peer {} home {} origin {}",
                row.node, served.local, served.peer, served.home, served.origin
            ),
            None => format!("node {}: metrics unreadable", row.node),
        })
        .collect();
    let egress = trial.testbed.origin_total(|_| true).chunk_get_bytes.saturating_sub(egress_before);
    report.checks.push(Check::new(
        "caches_survived",
        not_local.is_empty() && egress == 0,
        if not_local.is_empty() && egress == 0 {
            format!("every node served all {} bytes from its own store; no origin egress", params.object_size)
        } else {
            format!("{}; origin egress {egress} bytes", not_local.join("; "))
        },
    ));
    let records: u64 = super::snapshot(&trial.testbed.nodes)
        .await
        .iter()
        .flatten()
        .map(|metrics| metrics.count(DHT_PROVIDER_RECORDS, &[]))
        .sum();
    report.notes.push(format!(
        "provider records stored across the fleet after the roll ({DHT_PROVIDER_RECORDS}, summed over the \
         nodes): {records}"
    ));
    Ok(())
}

/// The gauge of provider records a node stores, its own included.
const DHT_PROVIDER_RECORDS: &str = "cachemesh_dht_provider_records";
/// The gauge of objects a node announces in the DHT.
const DHT_PROVIDED_KEYS: &str = "cachemesh_dht_provided_keys";
/// The gauge of objects waiting to be announced.
const DHT_PROVIDE_QUEUE: &str = "cachemesh_dht_provide_queue";

/// Waits until `index` has published its provider records again: it announces at least
/// one object in the DHT ([`DHT_PROVIDED_KEYS`]) and none waits to be published
/// ([`DHT_PROVIDE_QUEUE`]); returns the seconds it took.
async fn wait_for_provided(trial: &Trial, index: usize) -> Result<f64, String> {
    let started = std::time::Instant::now();
    loop {
        let seen = trial.testbed.nodes[index]
            .metrics()
            .await
            .map(|(_, metrics)| (metrics.count(DHT_PROVIDED_KEYS, &[]), metrics.count(DHT_PROVIDE_QUEUE, &[])));
        match seen {
            Ok((provided, 0)) if provided >= 1 => return Ok(started.elapsed().as_secs_f64()),
            _ if started.elapsed() >= READVERTISE_TIMEOUT => {
                return Err(match seen {
                    Ok((provided, queued)) => format!(
                        "{DHT_PROVIDED_KEYS} {provided}, {DHT_PROVIDE_QUEUE} {queued} after {READVERTISE_TIMEOUT:?}"
                    ),
                    Err(error) => error.to_string(),
                });
            }
            _ => tokio::time::sleep(crate::node::POLL_INTERVAL).await,
        }
    }
}
