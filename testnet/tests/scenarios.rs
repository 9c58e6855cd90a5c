//! The testnet's scenarios, small: N=4 nodes and a 24 MiB object, through the built binary,
//! plus a shaped cold-start of 3 nodes on emulated links.
//!
//! Each test runs `cachemesh-testnet run SCENARIO` as a user would (real cachemeshd
//! processes from the same target directory, moto as the origin, `--net auto`: emulated
//! links when run as root, as CI does, loopback otherwise) and checks its exit status and
//! `report.json`; timings are printed, never asserted. A failing test prints the testnet's output, its report and
//! where the nodes' logs were copied. The seed comes from `CACHEMESH_TEST_SEED` when set,
//! is random otherwise, and is printed.

// Test code: a failed unwrap is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const NODES: &str = "4";
const OBJECT_SIZE: &str = "24MiB";
/// Seconds the testnet may spend on the put and on each phase of reads.
const PHASE_TIMEOUT_SECONDS: &str = "120";
/// How long a cleanup after SIGINT may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

fn testnet() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cachemesh-testnet"));
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|key| key.starts_with("AWS_") || key.starts_with("CACHEMESH_")) {
            command.env_remove(key);
        }
    }
    command
}

fn seed() -> u64 {
    let seed = match std::env::var("CACHEMESH_TEST_SEED") {
        Ok(text) => text.parse().expect("CACHEMESH_TEST_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("seed = {seed} (repeat with CACHEMESH_TEST_SEED={seed})");
    seed
}

fn run_scenario(
    scenario: &str,
    nodes: &str,
    object_size: &str,
    extra: &[&str],
) -> (Output, serde_json::Value, tempfile::TempDir) {
    let out = tempfile::Builder::new().prefix("cachemesh-testnet-out-").tempdir().unwrap();
    let seed = seed().to_string();
    let args = [
        "run",
        scenario,
        "--nodes",
        nodes,
        "--object-size",
        object_size,
        "--out",
        out.path().to_str().unwrap(),
        "--seed",
        &seed,
        "--timeout",
        PHASE_TIMEOUT_SECONDS,
    ];
    let output = testnet().args(args).args(extra).stdin(Stdio::null()).output().unwrap();
    let report = std::fs::read_to_string(out.path().join("report.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(serde_json::Value::Null);
    (output, report, out)
}

fn explain(output: &Output, out: &Path) -> String {
    let markdown =
        std::fs::read_to_string(out.join("report.md")).unwrap_or_else(|error| format!("(no report.md: {error})"));
    format!(
        "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- report.md ---\n{markdown}\n(node logs were in {}/logs)",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        out.display()
    )
}

/// Runs the scenario with N=4 and a 24 MiB object and asserts that it passed, every check by
/// name included.
fn assert_scenario_passes(scenario: &str, expected_checks: &[&str]) -> serde_json::Value {
    assert_run_passes(scenario, NODES, OBJECT_SIZE, &[], expected_checks)
}

/// Runs the scenario and asserts that it passed, every check by name included, with one row
/// per node.
fn assert_run_passes(
    scenario: &str,
    nodes: &str,
    object_size: &str,
    extra: &[&str],
    expected_checks: &[&str],
) -> serde_json::Value {
    let (output, report, out) = run_scenario(scenario, nodes, object_size, extra);
    let out = out.keep();
    let explanation = explain(&output, &out);
    assert!(output.status.success(), "{scenario} failed:\n{explanation}");
    assert_eq!(report["passed"], true, "{scenario}: report says not passed:\n{explanation}");
    let checks = report["checks"].as_array().unwrap();
    for name in expected_checks {
        let check = checks.iter().find(|check| check["name"] == *name);
        let check = check.unwrap_or_else(|| panic!("{scenario}: no check {name}:\n{explanation}"));
        assert_eq!(check["passed"], true, "{scenario}: {name}:\n{explanation}");
    }
    let rows = report["rows"].as_array().unwrap().len();
    assert_eq!(rows.to_string(), nodes, "one row per node");
    assert!(out.join("report.md").is_file());
    for chart in ["completion-cdf.svg", "bytes-by-source.svg", "throughput.svg"] {
        let svg =
            std::fs::read_to_string(out.join(chart)).unwrap_or_else(|error| panic!("{scenario}: no {chart}: {error}"));
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{scenario}: {chart} is not an SVG document"
        );
    }
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        markdown.contains("![completion CDF](completion-cdf.svg)"),
        "{scenario}: report.md does not show the charts"
    );
    std::fs::remove_dir_all(&out).unwrap();
    report
}

#[test]
fn cold_start_every_node_gets_the_object_and_the_origin_sends_one_copy() {
    // Goal: four nodes reading a fresh object at once all get its exact bytes, and the
    // origin's chunk egress stays within one copy; since node 0 put the object and holds all
    // of it, the origin sends none.
    let report = assert_scenario_passes(
        "cold-start",
        &["identical_bytes", "origin_egress_one_copy", "origin_egress_none_with_a_seed"],
    );
    assert!(report["origin"]["egress_ratio"].as_f64().unwrap() <= 0.02, "node 0 was a seed");
    // Each read's progress series (behind the throughput chart) ends at its last byte.
    for row in report["rows"].as_array().unwrap().iter().filter(|row| row["result"] == "ok") {
        let last = row["progress"].as_array().unwrap().last().expect("an ok read has progress samples");
        assert_eq!(last[1].as_u64(), report["parameters"]["object_size"].as_u64(), "progress ends at the last byte");
    }
}

/// Namespaces and links of the testnet run with process id `pid` that still exist.
fn network_left_by(pid: u32) -> Vec<String> {
    let prefix = format!("cmt{pid}");
    let mut left = Vec::new();
    for args in [&["netns", "list"][..], &["-o", "link", "show"][..]] {
        let Ok(output) = Command::new("ip").args(args).output() else { continue };
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            // `ip netns list` starts a line with the name, `ip -o link` puts it second.
            let name = if args[0] == "netns" { line.split_whitespace().next() } else { line.split(": ").nth(1) };
            let Some(name) = name.map(|name| name.split('@').next().unwrap_or(name)) else { continue };
            // The role letter after the pid keeps `cmt12` from matching `cmt123b`.
            if name.strip_prefix(&prefix).and_then(|rest| rest.chars().next()).is_some_and(|c| c.is_ascii_lowercase()) {
                left.push(name.to_string());
            }
        }
    }
    left
}

/// Makes a namespace and a bridge named as a testnet with a dead process id would; returns
/// that id.
fn make_leftover() -> u32 {
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let pid = gone.id();
    for args in
        [vec!["netns", "add", &format!("cmt{pid}n0")], vec!["link", "add", &format!("cmt{pid}b"), "type", "bridge"]]
    {
        let status = Command::new("ip").args(&args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    }
    pid
}

/// Makes a temporary root as a testnet with a dead process id would leave it.
fn make_leftover_root() -> PathBuf {
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let root = std::env::temp_dir().join(format!("cachemesh-testnet-leftover-{}", gone.id()));
    std::fs::create_dir_all(root.join("node-0")).unwrap();
    std::fs::write(root.join("testnet.pid"), gone.id().to_string()).unwrap();
    root
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

/// Whether this machine lets us make network namespaces and veth pairs: root, `ip` present,
/// and the kernel and container allow it (checked by making and removing one of each).
fn can_emulate() -> bool {
    if !running_as_root() {
        return false;
    }
    let probe = format!("cmtprobe{}", std::process::id());
    let ip = |args: &[&str]| Command::new("ip").args(args).output().is_ok_and(|output| output.status.success());
    let namespace = ip(&["netns", "add", &probe]);
    if namespace {
        ip(&["netns", "delete", &probe]);
    }
    let veth = ip(&["link", "add", &probe, "type", "veth", "peer", "name", &format!("{probe}p")]);
    if veth {
        ip(&["link", "delete", &probe]);
    }
    namespace && veth
}

/// The report's notes that say the links have no slack.
fn no_slack_notes(report: &serde_json::Value) -> Vec<String> {
    report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|note| note.as_str())
        .filter(|note| note.starts_with("no slack in the links"))
        .map(str::to_string)
        .collect()
}

#[test]
fn shaped_cold_start_gets_every_node_the_object_within_one_origin_copy() {
    // Goal: with host, slow-host and origin rates set, three nodes cold-start a 32 MiB object
    // on emulated links (each node in its own network namespace, tc-shaped) when run as
    // root, or on loopback otherwise, and then the report says loopback; every node gets
    // the exact bytes, the origin sends at most one copy, and the network is gone at the end.
    // The Kumar-Ross figure is printed beside the measured time, never asserted.
    // As root, a leftover of a run that died (a namespace and a bridge named for a dead
    // process) must be removed when this run starts.
    let emulated = can_emulate();
    let leftover = emulated.then(make_leftover);
    let dead_root = make_leftover_root();
    let extra =
        ["--host-rate", "200Mbit", "--origin-rate", "100Mbit", "--slow-hosts", "0.34", "--slow-rate", "100Mbit"];
    let (output, report, out) = run_scenario("cold-start", "3", "32MiB", &extra);
    let out = out.keep();
    let explanation = explain(&output, &out);
    assert!(output.status.success(), "shaped cold-start failed:\n{explanation}");
    assert_eq!(report["passed"], true, "{explanation}");
    for name in ["identical_bytes", "origin_egress_one_copy"] {
        let check = report["checks"].as_array().unwrap().iter().find(|check| check["name"] == name);
        assert_eq!(check.unwrap_or_else(|| panic!("no check {name}:\n{explanation}"))["passed"], true, "{name}");
    }
    assert!(report["origin"]["egress_ratio"].as_f64().unwrap() <= 1.02, "{explanation}");
    // How busy the machine was during the reads is reported (never checked against a limit).
    let cpu = &report["machine_cpu"];
    assert!(cpu["cores"].as_u64().is_some_and(|cores| cores >= 1), "{cpu}");
    assert!(cpu["busy_fraction"].as_f64().is_some_and(|busy| (0.0..=1.0).contains(&busy)), "{cpu}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("machine CPU during the reads"), "{explanation}");
    let network = &report["network"];
    if emulated {
        assert_eq!(network["mode"], "emulated", "root runs on emulated links:\n{explanation}");
        assert!(network["subnet"].as_str().unwrap().starts_with("198.1"), "{network}");
        assert!(network["netem_available"].is_boolean(), "netem is probed: {network}");
        assert_eq!(network["mtu"], 9000, "links carry jumbo frames unless --mtu says otherwise: {network}");
        let links: Vec<u64> =
            report["rows"].as_array().unwrap().iter().map(|row| row["link_rate"].as_u64().unwrap()).collect();
        assert_eq!(links, [200_000_000, 200_000_000, 100_000_000], "the last third of the hosts is slow");
        let figure = &report["kumar_ross"];
        assert!(figure["minimum"]["seconds"].as_f64().is_some_and(f64::is_finite), "{explanation}");
        assert!(figure["ratio"].as_f64().is_some(), "{explanation}");
        eprintln!(
            "shaped cold-start: measured {} s, Kumar-Ross minimum {} s, ratio {}",
            figure["measured_seconds"], figure["minimum"]["seconds"], figure["ratio"]
        );
        let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(markdown.contains("Kumar-Ross"), "{markdown}");
        // The slow host's downlink bounds the minimum with room on every other term.
        assert_eq!(no_slack_notes(&report), Vec::<String>::new(), "links with slack get no such note");
    } else {
        assert_eq!(network["mode"], "loopback", "{explanation}");
        // Root where namespaces or veth pairs are refused (a container without
        // CAP_NET_ADMIN, no `ip`): the report says why it fell back.
        let why = if running_as_root() { "unavailable" } else { "not root" };
        assert!(network["summary"].as_str().unwrap().contains(why), "{network}");
        assert!(report["kumar_ross"].is_null(), "no Kumar-Ross figure on loopback");
    }
    let named = String::from_utf8_lossy(&output.stderr).lines().any(|line| line.contains("network "));
    assert!(named, "the testnet names its network on stderr:\n{explanation}");
    if let Some(pid) = leftover {
        assert_eq!(network_left_by(pid), Vec::<String>::new(), "the dead run's leftovers are removed at start");
    }
    assert!(!dead_root.exists(), "the dead run's temporary root {} is removed at start", dead_root.display());
    if let Some(prefix) = network["name_prefix"].as_str() {
        let pid: u32 = prefix.trim_start_matches("cmt").parse().unwrap();
        assert_eq!(network_left_by(pid), Vec::<String>::new(), "the run's namespaces and links are gone");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn latency_is_added_to_every_host_and_the_measured_round_trip_includes_it() {
    // Goal: `--latency 2ms` delays every packet a host sends by 2 ms (an NFQUEUE rule per
    // namespace and the testnet's delay thread, no netem needed), so the round trip between
    // two hosts, measured with the delay in place, is at least 4 ms (a lower bound: a busy
    // machine only adds to it); the run passes and leaves no namespace behind; --mtu 1500
    // gives links a plain Ethernet MTU (read back from the kernel). Without
    // emulation the testnet refuses --latency on loopback rather than ignore it.
    let (refused, _, _) = run_scenario("cold-start", "2", "1MiB", &["--net", "loopback", "--latency", "1ms"]);
    assert!(!refused.status.success(), "--latency on loopback must be refused");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--latency needs the emulated network"), "{stderr}");
    if !can_emulate() {
        eprintln!("not root or no namespaces here: only the refusal on loopback was checked");
        return;
    }
    let report = assert_run_passes(
        "cold-start",
        "3",
        "8MiB",
        &["--host-rate", "200Mbit", "--latency", "2ms", "--mtu", "1500"],
        &["identical_bytes", "origin_egress_one_copy"],
    );
    let network = &report["network"];
    assert_eq!(network["mode"], "emulated", "{network}");
    assert_eq!(network["mtu"], 1500, "--mtu sets the links' MTU: {network}");
    assert_eq!(network["delay_us"].as_f64(), Some(2000.0), "{network}");
    let rtt = &network["rtt"];
    assert_eq!(rtt["between"], "node 0 and node 1", "{network}");
    assert!(rtt["min_us"].as_f64().unwrap() >= 4000.0, "each way waits 2 ms: {network}");
    let delayer = &network["delayer"];
    assert!(delayer["packets"].as_u64().unwrap() > 1000, "the trial's packets went through the delay: {network}");
    assert!(delayer["error"].is_null(), "{network}");
    assert!(network["latency"].as_str().unwrap().contains("2000 us one-way"), "{network}");
    let pid: u32 = network["name_prefix"].as_str().unwrap().trim_start_matches("cmt").parse().unwrap();
    assert_eq!(network_left_by(pid), Vec::<String>::new(), "the run's namespaces and links are gone");
}

#[test]
fn peer_killed_survivors_complete_with_identical_bytes() {
    // Goal: a node SIGKILLed mid-transfer does not stop the survivors' reads or corrupt them.
    assert_scenario_passes("peer-killed", &["killed_while_in_flight", "survivors_identical_bytes"]);
}

#[test]
fn corrupt_peer_no_bad_byte_reaches_a_client() {
    // Goal: a peer serving corrupt chunks is caught by verification and no client sees its bytes.
    assert_scenario_passes("corrupt-peer", &["no_bad_bytes_reached_a_client", "fault_exercised"]);
}

#[test]
fn two_dcs_stay_apart_and_each_pulls_one_copy() {
    // Goal: two DCs sharing a cluster key and an origin never peer, and each pulls about one copy.
    assert_scenario_passes(
        "two-dcs",
        &[
            "identical_bytes",
            "no_dc_b_peer_in_dc_a",
            "no_dc_a_peer_in_dc_b",
            "members_only_within_dc",
            "no_cross_dc_data_plane_bytes",
            "origin_egress_dc_a_one_copy",
            "origin_egress_dc_b_one_copy",
            "origin_egress_total_two_copies",
        ],
    );
}

#[test]
fn churn_survivors_and_restarted_nodes_complete_with_identical_bytes() {
    // Goal: a quarter of the readers SIGKILLed mid-transfer, and half of them restarted on
    // their data directories, cost no bytes: every survivor and every restarted node reads
    // the exact object, and the origin sends at most 1.3 copies.
    let report = assert_scenario_passes(
        "churn",
        &["killed_while_in_flight", "survivors_and_restarted_identical_bytes", "origin_egress_churn"],
    );
    let roles: Vec<&str> = report["rows"].as_array().unwrap().iter().map(|row| row["role"].as_str().unwrap()).collect();
    assert!(roles.contains(&"restarted"), "a killed node is restarted: {roles:?}");
    assert!(report["origin"]["egress_ratio"].as_f64().unwrap() <= 1.3);
}

#[test]
fn origin_outage_cached_objects_served_unknown_ones_fail_clearly_and_puts_recover() {
    // Goal: with the origin unreachable, every node still serves the object it has cached,
    // answers a GET of an object only the origin could know with an API error, and does
    // not exit; once the origin is back a new put and its reads succeed.
    assert_scenario_passes(
        "origin-outage",
        &[
            "first_reads_identical_bytes",
            "cached_object_served_during_outage",
            "unknown_object_fails_clearly",
            "no_node_exited_during_outage",
            "recovered_put_and_read",
        ],
    );
}

#[test]
fn slow_peer_reads_complete_with_identical_bytes_and_hedging_is_reported() {
    // Goal: a peer that answers each chunk request a second late costs no bytes; the
    // fleet's hedged requests and hedge wins are reported.
    let report = assert_scenario_passes("slow-peer", &["identical_bytes"]);
    let notes = report["notes"].as_array().unwrap();
    assert!(
        notes.iter().any(|note| note.as_str().unwrap().contains("hedged requests")),
        "the hedging counters are reported: {notes:?}"
    );
}

#[test]
fn staggered_joins_every_node_gets_the_object_and_the_origin_sends_one_copy() {
    // Goal: nodes starting their reads at seeded, different times all get the exact bytes,
    // and the origin still sends at most one copy.
    let report = assert_scenario_passes("staggered-joins", &["identical_bytes", "origin_egress_one_copy"]);
    let notes = report["notes"].as_array().unwrap();
    assert!(
        notes.iter().any(|note| note.as_str().unwrap().contains("start offsets")),
        "the start offsets are reported: {notes:?}"
    );
}

#[test]
fn partition_halves_go_on_alone_and_heal_into_one_mesh() {
    // Goal: a DC cut in two keeps serving on both sides without a byte crossing the cut,
    // each half pulls at most one copy from the origin, and once healed the halves form one
    // mesh again (a fresh object leaves the origin at most once for the whole fleet). The
    // cut needs the emulated network; elsewhere the testnet must refuse clearly (exit 2).
    if can_emulate() {
        assert_scenario_passes(
            "partition",
            &[
                "halves_drop_each_other",
                "identical_bytes_while_cut",
                "no_data_plane_bytes_across_the_cut",
                "origin_egress_half_a_one_copy",
                "origin_egress_half_b_one_copy",
                "mesh_heals",
                "identical_bytes_after_healing",
                "origin_egress_after_healing_one_copy",
            ],
        );
    } else {
        let (output, report, out) = run_scenario("partition", NODES, OBJECT_SIZE, &[]);
        let explanation = explain(&output, out.path());
        assert_eq!(output.status.code(), Some(2), "{explanation}");
        assert!(report["error"].as_str().unwrap().contains("needs the emulated network"), "{explanation}");
    }
}

#[test]
fn partition_heals_after_a_cut_long_enough_to_break_every_connection_across_it() {
    // Goal: a cut that outlasts TCP (here made to give up within seconds) closes the
    // control-plane connections between the halves; once healed, the nodes dial the peers
    // they lost and form one mesh again. Ten nodes, so that each node keeps four peers in
    // its half: with fewer, its bootstrap redials alone would heal the mesh and the test
    // could not tell. Elsewhere the testnet refuses (exit 2).
    if can_emulate() {
        assert_run_passes(
            "partition",
            "10",
            "8MiB",
            &["--cut-seconds", "30"],
            &["halves_drop_each_other", "identical_bytes_while_cut", "mesh_heals", "identical_bytes_after_healing"],
        );
    } else {
        let (output, _, out) = run_scenario("partition", "10", "8MiB", &["--cut-seconds", "30"]);
        assert_eq!(output.status.code(), Some(2), "{}", explain(&output, out.path()));
    }
}

#[test]
fn rolling_restart_keeps_every_cache_and_nodes_advertise_again() {
    // Goal: every node stopped with SIGTERM and started again in turn exits cleanly,
    // rejoins, publishes its provider records again, and afterwards serves the whole object
    // from its own store with nothing from the origin.
    assert_scenario_passes(
        "rolling-restart",
        &[
            "first_reads_identical_bytes",
            "graceful_stops",
            "readvertised",
            "one_mesh_after_the_roll",
            "second_reads_identical_bytes",
            "caches_survived",
        ],
    );
}

#[test]
fn mixed_workload_every_object_arrives_intact_and_leaves_the_origin_once() {
    // Goal: objects from a few bytes to many chunks, put on different nodes and read by
    // different subsets at once, all arrive with their exact bytes; the last node forgets
    // what it put, so those objects come from the origin, and no object leaves it more than
    // about once.
    let report = assert_scenario_passes(
        "mixed-workload",
        &["identical_bytes", "origin_egress_one_copy_per_object", "origin_only_objects_came_from_the_origin"],
    );
    let notes = report["notes"].as_array().unwrap();
    assert!(
        notes.iter().any(|note| note.as_str().unwrap().contains("distinct sizes")),
        "the objects are listed: {notes:?}"
    );
    let last = &report["rows"][NODES.parse::<usize>().unwrap() - 1];
    assert!(last["role"].as_str().unwrap().contains("(then emptied)"), "the last node forgot its objects: {last}");
    assert!(report["origin"]["chunk_get_bytes"].as_u64().unwrap() > 0, "some objects came from the origin");
}

#[test]
fn origin_only_cold_start_pulls_the_object_from_the_origin_once() {
    // Goal: with --origin-only the put node forgets the object, so the fleet (the put node
    // included) must take it from the origin: exactly one copy leaves it, and the put node
    // reads it like the others. Hosts as fast as the origin leave the links no slack, and
    // on emulated links the report says so.
    let report = assert_run_passes(
        "cold-start",
        "2",
        OBJECT_SIZE,
        &["--origin-only", "--host-rate", "400Mbit", "--origin-rate", "400Mbit"],
        &["identical_bytes", "origin_egress_one_copy"],
    );
    let no_slack = no_slack_notes(&report);
    if report["network"]["mode"] == "emulated" {
        assert_eq!(no_slack.len(), 1, "{:?}", report["notes"]);
        assert!(no_slack[0].contains("seeds_upload") && no_slack[0].contains("slowest_download"), "{no_slack:?}");
    } else {
        assert_eq!(no_slack, Vec::<String>::new(), "no Kumar-Ross figure on loopback, so no note on it");
    }
    let egress = report["origin"]["egress_ratio"].as_f64().unwrap();
    assert!((0.99..=1.02).contains(&egress), "one copy from the origin, not {egress}");
    let put_row = &report["rows"][0];
    assert_eq!(put_row["role"], "put, then emptied");
    assert_eq!(put_row["bytes_served"]["local"], 0, "the put node held nothing: {put_row}");
}

#[test]
fn pinned_cold_start_warms_every_node_with_one_copy_from_the_origin_at_most() {
    // Goal: with --pin every node warms its cache in its own order and then reads the
    // object from it: all bytes right, the object leaves the origin at most once, and the
    // by-source columns show where each reader's pin took the object's bytes from.
    let report =
        assert_run_passes("cold-start", NODES, OBJECT_SIZE, &["--pin"], &["identical_bytes", "origin_egress_one_copy"]);
    let notes = report["notes"].as_array().unwrap();
    assert!(notes.iter().any(|note| note.as_str().unwrap().starts_with("--pin")), "{notes:?}");
    let size = report["parameters"]["object_size"].as_u64().unwrap();
    for row in report["rows"].as_array().unwrap().iter().skip(1) {
        let by_source = row["bytes_served"].as_object().unwrap();
        let warmed: u64 = by_source.values().map(|bytes| bytes.as_u64().unwrap()).sum();
        assert_eq!(warmed, size, "a reader's pin warmed the whole object once: {row}");
        // Some chunks may be local already: a node fetches a chunk as its home for a peer.
        assert!(by_source["local"].as_u64().unwrap() < size, "the reader fetched something: {row}");
    }
}

#[test]
fn help_lists_every_scenario_and_parameter() {
    // Goal: `--help` and `run --help` explain every scenario and every parameter.
    for args in [&["--help"][..], &["run", "--help"][..]] {
        let output = testnet().args(args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
        let text = String::from_utf8(output.stdout).unwrap();
        for word in [
            "cold-start",
            "peer-killed",
            "corrupt-peer",
            "two-dcs",
            "churn",
            "origin-outage",
            "slow-peer",
            "staggered-joins",
            "partition",
            "rolling-restart",
            "mixed-workload",
            "Checks:",
        ] {
            assert!(text.contains(word), "{args:?} does not mention {word}:\n{text}");
        }
        if args[0] == "run" {
            for flag in [
                "--nodes",
                "--object-size",
                "--out",
                "--seed",
                "--upload-limit",
                "--keep",
                "--bin-dir",
                "--timeout",
                "--net",
                "--host-rate",
                "--origin-rate",
                "--slow-hosts",
                "--slow-rate",
                "--origin-only",
                "--pin",
                "--cut-seconds",
                "--latency",
            ] {
                assert!(text.contains(flag), "run --help does not mention {flag}:\n{text}");
            }
        }
    }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// Process ids whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn interrupt_stops_every_child_and_removes_the_temporary_root() {
    // Goal: Ctrl-C (SIGINT) while the nodes run leaves no child process, no namespace or
    // link, and no temporary directory behind, and exits 130.
    assert_signal_cleans_up("-INT", 130);
}

#[test]
fn terminate_stops_every_child_and_removes_the_network() {
    // Goal: SIGTERM while the nodes run cleans up as Ctrl-C does, and exits 143.
    assert_signal_cleans_up("-TERM", 143);
}

fn assert_signal_cleans_up(signal: &str, expected_exit: i32) {
    let out = tempfile::tempdir().unwrap();
    let mut child = testnet()
        .args(["run", "cold-start", "--nodes", "2", "--object-size", "4MiB", "--out"])
        .arg(out.path())
        .args(["--seed", &seed().to_string(), "--timeout", PHASE_TIMEOUT_SECONDS])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut root: Option<PathBuf> = None;
    let mut seen = String::new();
    let mut line = String::new();
    // The testnet prints its temporary root when it starts the origin, and a line when the
    // mesh has formed: interrupt it then, with every child running.
    while stderr.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("testnet: starting moto and 2 nodes in ") {
            root = Some(PathBuf::from(rest));
        }
        if line.contains("mesh formed") {
            break;
        }
        line.clear();
    }
    let root = root.unwrap_or_else(|| panic!("the testnet never printed its root:\n{seen}"));
    assert!(seen.contains("mesh formed"), "the mesh never formed:\n{seen}");
    let root_text = root.display().to_string();
    assert!(!processes_mentioning(&root_text).is_empty(), "no node runs under {root_text}");
    let children = children_of(child.id());
    assert!(children.len() >= 3, "moto and two nodes should be running: {children:?}");
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the testnet did not exit within {CLEANUP_TIMEOUT:?} of kill {signal}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    assert_eq!(exit.code(), Some(expected_exit), "exit after kill {signal}:\n{seen}{rest}");
    assert!(!root.exists(), "{} is still there", root.display());
    let left = processes_mentioning(&root_text);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let alive: Vec<u32> = children.into_iter().filter(|pid| Path::new(&format!("/proc/{pid}")).exists()).collect();
    assert!(alive.is_empty(), "children of the testnet still alive: {alive:?}");
    let network = network_left_by(child.id());
    assert!(network.is_empty(), "namespaces and links left behind: {network:?}");
}
