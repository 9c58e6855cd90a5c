//! partition: the DC cut into two halves that each go on alone, then healed.
//!
//! The cut is made in the emulated network (a `blackhole` route in each node's namespace to
//! every node of the other half, see [`crate::network::set_partition`]): the daemons are
//! not told, and find out the way they would in a real DC, by connections and
//! announcements that stop arriving. Both halves still reach the origin.
//!
//! What it shows: each half drops the other from its membership (so home nodes are chosen
//! within the half and each half pulls about one copy from the origin), reads on both
//! sides complete, no byte crosses the cut, and after healing the halves find each other
//! again by themselves and behave as one DC (a fresh object put on the second half leaves
//! the origin once for the whole fleet).
//!
//! Non-goals: asymmetric or partial cuts, cuts that isolate the origin (origin-outage), and
//! loopback runs: cutting loopback needs a firewall, so the scenario refuses to run there.

use std::time::Duration;

use crate::data::Pattern;
use crate::network::{set_partition, set_tcp_retries};
use crate::report::Report;
use crate::transfer::{get_all, put};

use super::{
    EGRESS_RATIO_PER_DC_MAX, Params, Trial, TrialError, data_plane_balance_check, egress_check, finish_rows,
    identical_bytes_check, membership_check, read_all, readers, transfers_check, wait_for_members,
};

/// How long the halves may take to drop each other from their membership once cut, and to
/// see each other again once healed. A member is dropped when its connection breaks or
/// its announcements stop for the daemon's `MEMBER_EXPIRY`; healing waits for a redial.
pub const PARTITION_MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(90);
/// `net.ipv4.tcp_retries2` in the nodes' namespaces when `--cut-seconds` is given: TCP
/// gives a connection up after about 3 s of unanswered retransmissions (with the default,
/// 15, after about 15 minutes), so a cut held for tens of seconds breaks every
/// control-plane connection across it, as a long cut in a real DC does.
pub const LONG_CUT_TCP_RETRIES: u32 = 3;
/// Added to the seed for the object put after healing.
const HEALED_SEED_OFFSET: u64 = 1;

pub(super) async fn partition(params: &Params, trial: &mut Trial, report: &mut Report) -> Result<(), TrialError> {
    if report.network.mode != "emulated" {
        return Err(TrialError::Unsupported {
            scenario: "partition",
            what: "the emulated network (run as root with ip and tc; --net emulated or auto)",
            have: report.network.summary.clone(),
        });
    }
    let nodes = params.nodes;
    let first_half = nodes.div_ceil(2);
    let group: Vec<usize> = (0..nodes).map(|index| usize::from(index >= first_half)).collect();
    let halves: [Vec<usize>; 2] = [(0..first_half).collect(), (first_half..nodes).collect()];
    for row in &mut report.rows {
        row.role = if row.node == 0 { "put, half a".into() } else { format!("half {}", ["a", "b"][group[row.node]]) };
    }
    if !params.cut.is_zero() {
        set_tcp_retries(&params.places, LONG_CUT_TCP_RETRIES).await?;
        report.notes.push(format!(
            "long cut: net.ipv4.tcp_retries2 = {LONG_CUT_TCP_RETRIES} in every node's namespace, so TCP gives the \
             control-plane connections across the cut up within it"
        ));
    }
    eprintln!("testnet: cutting the DC into {:?} and {:?}", halves[0], halves[1]);
    set_partition(&params.places, &group, true).await?;
    let cut_at = std::time::Instant::now();
    let half_size = |index: usize| halves[group[index]].len() as u64;
    let all: Vec<usize> = (0..nodes).collect();
    let cut = wait_for_members(
        &trial.testbed,
        &all,
        |index, members| members == half_size(index) - 1,
        PARTITION_MEMBERSHIP_TIMEOUT,
    )
    .await;
    let reached = "every node's membership was its own half";
    report.checks.push(membership_check("halves_drop_each_other", &cut, reached, PARTITION_MEMBERSHIP_TIMEOUT));

    let transfers = read_all(params, trial, all.clone()).await;
    let after = finish_rows(params, trial, &transfers, &[], report).await;
    report.checks.push(identical_bytes_check("identical_bytes_while_cut", report, &all));
    let groups = [("half a", halves[0].clone()), ("half b", halves[1].clone())];
    let balance = data_plane_balance_check("no_data_plane_bytes_across_the_cut", &groups, trial, &after, report);
    report.checks.push(balance);
    for (name, members) in &groups {
        let bytes: u64 =
            report.rows.iter().filter(|row| members.contains(&row.node)).map(|row| row.origin.chunk_get_bytes).sum();
        report.checks.push(egress_check(
            &format!("origin_egress_{}_one_copy", name.replace(' ', "_")),
            bytes,
            params.object_size,
            1.0,
        ));
    }

    let hold = params.cut.saturating_sub(cut_at.elapsed());
    if !hold.is_zero() {
        eprintln!(
            "testnet: holding the cut for {:.0} s more (--cut-seconds {})",
            hold.as_secs_f64(),
            params.cut.as_secs()
        );
        tokio::time::sleep(hold).await;
    }
    let held = cut_at.elapsed();
    eprintln!("testnet: healing the cut after {:.1} s", held.as_secs_f64());
    set_partition(&params.places, &group, false).await?;
    let everyone = nodes as u64 - 1;
    let healed =
        wait_for_members(&trial.testbed, &all, |_, members| members >= everyone, PARTITION_MEMBERSHIP_TIMEOUT).await;
    let reached = format!("every node saw all {everyone} others once the cut was healed");
    report.checks.push(membership_check("mesh_heals", &healed, &reached, PARTITION_MEMBERSHIP_TIMEOUT));
    report.notes.push(format!("the cut was held {:.1} s before healing", held.as_secs_f64()));

    // The first node of the second half puts a fresh object; the whole fleet reads it. Were
    // the halves still apart, the first half would pull its own copy from the origin.
    let putter = first_half.min(nodes - 1);
    let egress_before = trial.testbed.origin_total(|_| true).chunk_get_bytes;
    let pattern = Pattern::new(params.seed.wrapping_add(HEALED_SEED_OFFSET));
    let client = trial.testbed.nodes[putter].client().clone();
    eprintln!("testnet: node {putter} puts a fresh object; all nodes read it");
    let fresh = put(&client, putter, pattern, params.object_size, params.timeout).await?;
    let (_progress, joined) = get_all(readers(trial, all.clone()), fresh.object_id, params.timeout);
    let reads = joined.await;
    report.checks.push(transfers_check("identical_bytes_after_healing", "reads after healing", &reads, &fresh.digest));
    let egress = trial.testbed.origin_total(|_| true).chunk_get_bytes.saturating_sub(egress_before);
    report.checks.push(egress_check("origin_egress_after_healing_one_copy", egress, params.object_size, 1.0));
    let slowest = reads.iter().filter(|read| read.node != putter).filter_map(|read| read.seconds).reduce(f64::max);
    report.notes.push(format!(
        "after healing: node {putter} put a fresh object, the fleet read it in {} s, origin egress {:.3} x \
         (limit {EGRESS_RATIO_PER_DC_MAX:.2} x)",
        slowest.map_or("-".to_string(), |seconds| format!("{seconds:.3}")),
        egress as f64 / params.object_size.max(1) as f64
    ));
    Ok(())
}
