//! `cachemesh-testnet`: multi-node trials of real `cachemeshd` processes, on emulated
//! datacenter links or on loopback.
//!
//! One run sets up its network (`network.rs`: a network namespace per node on a bridge,
//! links shaped with `tc tbf`, when run as root; else loopback), starts a real
//! S3-compatible origin (moto) behind counting proxies, N daemons meshed through a fresh
//! cluster key, plays one scenario against them through their API sockets, and reports per
//! node (time, bytes by source, origin egress counted at the origin) with pass/fail checks
//! and, on shaped links, the Kumar-Ross minimum beside the measured time, as a table on
//! stdout and `report.json`/`report.md`.
//!
//! What it deliberately does not do: reach into the daemon's modules (everything goes
//! through the daemon's binaries, socket API and metrics; only the API client and the
//! API's types are shared), or retry anything on the daemon's behalf.
//!
//! Invariants: every child process, every namespace and link it made, and the temporary
//! root are gone when the testnet exits, whether the trial ended, failed, or was
//! interrupted (SIGINT, SIGTERM, SIGHUP; the handlers are installed before the network is
//! made); the processes are stopped before the network is removed; leftovers of a run that
//! was SIGKILLed (namespaces, links, its temporary root) are removed by the next run; every
//! wait is a poll or an event with a deadline; the seed and the command that repeats the
//! trial are printed first and written into the report.
//!
//! Exit status: 0 when every check passed, 1 when a check failed, 2 when the trial could
//! not be set up or run to its end (bad arguments, missing binaries or moto, a node that
//! would not start or mesh), 130/143/129 when interrupted by SIGINT/SIGTERM/SIGHUP.

mod charts;
mod cpu;
mod data;
mod delay;
mod links;
mod metrics;
mod network;
mod node;
mod origin;
mod processes;
mod proxy;
mod report;
mod scenario;
mod shaping;
mod testbed;
mod transfer;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use cachemesh_daemon::config::ByteSize;
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::network::{NetMode, Network};
use crate::node::Binaries;
use crate::processes::Processes;
use crate::scenario::{Params, Scenario};
use crate::shaping::{Rate, RatePlan};

/// The temporary root's name starts with this.
const ROOT_PREFIX: &str = "cachemesh-testnet-";
/// The file in a temporary root that holds the owning testnet's process id.
const ROOT_OWNER_FILE: &str = "testnet.pid";
/// The emulated links' MTU unless `--mtu` says otherwise: a jumbo-frame datacenter fabric.
const DEFAULT_MTU: u32 = 9000;
/// Smallest `--mtu`: the least an IPv6 link may carry.
const MTU_MIN: i64 = 1280;
/// Largest `--mtu`: the most a veth takes.
const MTU_MAX: i64 = 65_535;
/// How long the children may take to be gone once killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs multi-node trials of real cachemeshd processes on emulated links or loopback, and
/// reports on them.
///
/// Each run sets up its network (as root: each node in its own network namespace on a
/// bridge, links shaped with tc tbf per --host-rate/--origin-rate/--slow-rate; otherwise,
/// or with --net loopback, every node on 127.0.0.1), starts an S3-compatible origin (moto,
/// which must be installed: pip install 'moto[s3]' flask flask-cors boto3) behind a
/// counting HTTP proxy per node (so origin egress is counted at the origin), creates a
/// cluster key with `cachemesh cluster-key new`, starts N cachemeshd nodes, runs one
/// scenario through their API sockets, prints a table (node, dc, link, seconds, bytes by
/// source, MB/s) with the origin egress ratio, the Kumar-Ross minimum on shaped links and
/// the checks, and writes report.json and report.md. Every process, namespace, link and
/// temporary directory is removed at the end and on Ctrl-C; leftovers of runs that were
/// SIGKILLed are removed when the next run starts. Latency is not emulated. See
/// docs/testnet.md.
///
/// Exit status: 0 all checks passed, 1 a check failed, 2 the trial could not be set up or
/// finished, 130/143/129 interrupted by SIGINT/SIGTERM/SIGHUP.
#[derive(Debug, Parser)]
#[command(name = "cachemesh-testnet", version, after_help = scenario::help_text())]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one scenario with N nodes and write its report into --out.
    #[command(after_help = scenario::help_text())]
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The scenario to run (each is explained below).
    #[arg(value_enum, value_name = "SCENARIO")]
    scenario: Scenario,
    /// How many cachemeshd nodes to start, each with its own data dir, API socket, p2p and
    /// data-plane ports (on its own address when emulated, else 127.0.0.1) and a 4GiB
    /// cache budget.
    #[arg(long, value_name = "N")]
    nodes: usize,
    /// Size of the object node 0 puts and the others read, e.g. 24MiB, 1GiB or 1000000.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    object_size: u64,
    /// Output directory (created when missing): report.json, report.md, logs/ (every
    /// node's and moto's log) and metrics/ (every node's /metrics at the end).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Seed of the object's bytes and of the testnet's own choices (which node is killed or
    /// faulty). Random when not given; printed either way, so a run can be repeated.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Upload budget for serving peers, per node per second (e.g. 200MiB or 1GB/s); passed
    /// to every node as --upload-limit. Unlimited when not given (but see --host-rate).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    upload_limit: Option<String>,
    /// The network: `emulated` runs each node in its own network namespace (veth pair into
    /// one bridge, its own address in a free /24 of 198.18.0.0/15) with the origin behind
    /// its own link, and shapes links with tc tbf (needs root, ip and tc); `loopback` runs
    /// every node on 127.0.0.1; `auto` is emulated when running as root and the setup works,
    /// else loopback. The report says which, and why.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = NetMode::Auto)]
    net: NetMode,
    /// Every host's link rate, each way, in bits per second: 200Mbit, 1Gbit, 1.5Gbit,
    /// 800kbit (byte units are refused). Emulated: tc tbf on both ends of the node's veth.
    /// Loopback: becomes each node's --upload-limit (its uploads to peers only), unless
    /// --upload-limit is given. Unshaped when not given.
    #[arg(long, value_name = "RATE")]
    host_rate: Option<Rate>,
    /// The origin's link rate, each way, in bits per second (as --host-rate); shapes the
    /// link of the origin's proxies (emulated only). Unshaped when not given.
    #[arg(long, value_name = "RATE")]
    origin_rate: Option<Rate>,
    /// One-way latency between hosts, e.g. 200us, 0.2ms or 5ms (at most 1s): every packet a
    /// host sends waits this long before its link, so a round trip between two hosts takes
    /// twice it (and one between a host and the origin once). Emulated network only: an
    /// iptables NFQUEUE rule in each node's namespace and a delay thread in the testnet (no
    /// netem needed); needs iptables. The report gives the round trip measured with it.
    #[arg(long, value_name = "DURATION", value_parser = delay::parse_delay)]
    latency: Option<Duration>,
    /// Every emulated link's MTU in bytes (1280 to 65535), hosts' and origin's alike. The
    /// default, 9000, is the jumbo frame datacenter fabrics for GPU hosts usually carry (a
    /// cloud VPC's default is 9001 on some providers); 1500 models a plain Ethernet path. The
    /// daemons' QUIC finds the path's MTU by itself (up to 6550-byte packets). Emulated
    /// network only (loopback has its own MTU).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MTU, value_parser = clap::value_parser!(u32).range(MTU_MIN..=MTU_MAX))]
    mtu: u32,
    /// The fraction of hosts that are slow (0 to 1; the last round(F x N) nodes, so node 0
    /// stays at --host-rate unless every node is slow). Needs --slow-rate.
    #[arg(long, value_name = "FRACTION", requires = "slow_rate", value_parser = parse_fraction)]
    slow_hosts: Option<f64>,
    /// The slow hosts' link rate, each way, in bits per second (as --host-rate).
    #[arg(long, value_name = "RATE", requires = "slow_hosts")]
    slow_rate: Option<Rate>,
    /// cold-start only: once node 0 has put the object, it is restarted on an empty data
    /// dir, so the origin is the only seed and node 0 reads like every other node. With
    /// --nodes 1 this is the one-host time that a fleet's warm time is compared against.
    #[arg(long)]
    origin_only: bool,
    /// cold-start only: each node pins the object (PUT /v1/objects/{id}/pin: its cache is
    /// warmed in the order the node chooses, chunks its peers hold first, rarest first),
    /// then reads it from its cache; the time is the warm plus that read. Without it, each
    /// node reads the object in order as it arrives.
    #[arg(long)]
    pin: bool,
    /// partition only: hold the cut at least this long (counted from the moment it is made)
    /// before healing it. A long cut outlasts the control plane's TCP connections and
    /// retransmissions, so healing must redial rather than resume. 0: heal as soon as the
    /// reads while cut are done.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    cut_seconds: u64,
    /// Keep the temporary root (nodes' data dirs, sockets, logs, the cluster key) instead
    /// of removing it at the end; its path is printed.
    #[arg(long)]
    keep: bool,
    /// Directory holding the cachemeshd and cachemesh binaries. Default: the directory of
    /// this executable (target/<profile>/, where cargo builds all three).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// How long the put, and each phase of reads, may take before it counts as failed.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    timeout: u64,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let size: ByteSize = text.parse()?;
    if size.0 == 0 {
        return Err("the object size must be above zero".into());
    }
    Ok(size.0)
}

fn parse_rate(text: &str) -> Result<String, String> {
    let size: ByteSize = text.trim().strip_suffix("/s").unwrap_or(text.trim()).parse()?;
    if size.0 == 0 {
        return Err("an upload limit must be above zero".into());
    }
    Ok(text.trim().to_string())
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(fraction) if (0.0..=1.0).contains(&fraction) => Ok(fraction),
        _ => Err(format!("{text:?} is not a fraction between 0 and 1 (e.g. 0.5)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Run(args) = cli.command;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("testnet").build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cachemesh-testnet: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    // The trial runs on this (the main) thread: children spawned from here die with the
    // testnet even if it is SIGKILLed (see `processes::die_with_parent`).
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("cachemesh-testnet: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn binaries(bin_dir: &Path) -> anyhow::Result<Binaries> {
    let find = |name: &str| {
        let path = bin_dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            bail!(
                "{} is missing: build it (`cargo build --workspace`, or `cargo build -p cachemesh-daemon` for the \
                 same profile) or pass --bin-dir",
                path.display()
            )
        }
    };
    Ok(Binaries { daemon: find("cachemeshd")?, cli: find("cachemesh")? })
}

fn repeat_command(args: &RunArgs, seed: u64) -> String {
    let mut line = format!(
        "cachemesh-testnet run {} --nodes {} --object-size {} --out {} --seed {seed} --timeout {}",
        args.scenario.name(),
        args.nodes,
        args.object_size,
        args.out.display(),
        args.timeout
    );
    if let Some(rate) = &args.upload_limit {
        line.push_str(&format!(" --upload-limit {rate}"));
    }
    line.push_str(&format!(" --net {}", args.net.name()));
    if let Some(rate) = args.host_rate {
        line.push_str(&format!(" --host-rate {rate}"));
    }
    if let Some(rate) = args.origin_rate {
        line.push_str(&format!(" --origin-rate {rate}"));
    }
    if let Some(delay) = args.latency {
        line.push_str(&format!(" --latency {}us", delay.as_micros()));
    }
    if args.mtu != DEFAULT_MTU {
        line.push_str(&format!(" --mtu {}", args.mtu));
    }
    if let (Some(fraction), Some(rate)) = (args.slow_hosts, args.slow_rate) {
        line.push_str(&format!(" --slow-hosts {fraction} --slow-rate {rate}"));
    }
    if args.origin_only {
        line.push_str(" --origin-only");
    }
    if args.pin {
        line.push_str(" --pin");
    }
    if args.cut_seconds > 0 {
        line.push_str(&format!(" --cut-seconds {}", args.cut_seconds));
    }
    if let Some(dir) = &args.bin_dir {
        line.push_str(&format!(" --bin-dir {}", dir.display()));
    }
    line
}

/// SIGINT, SIGTERM and SIGHUP, handled from the moment this is made (before anything is
/// created that a signal would otherwise leave behind).
struct Interrupts {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            hangup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }

    /// The first signal to arrive; returns the exit code it calls for.
    async fn interrupted(&mut self) -> u8 {
        tokio::select! {
            _ = self.interrupt.recv() => 130,
            _ = self.terminate.recv() => 143,
            _ = self.hangup.recv() => 129,
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    if args.nodes < args.scenario.min_nodes() {
        bail!("{} needs at least {} nodes (--nodes {})", args.scenario.name(), args.scenario.min_nodes(), args.nodes);
    }
    if args.origin_only && args.scenario != Scenario::ColdStart {
        bail!("--origin-only is for cold-start only, not {}", args.scenario.name());
    }
    if args.pin && args.scenario != Scenario::ColdStart {
        bail!("--pin is for cold-start only, not {}", args.scenario.name());
    }
    if args.latency.is_some() && args.net == NetMode::Loopback {
        bail!("--latency needs the emulated network (--net emulated, or auto as root), not --net loopback");
    }
    if args.cut_seconds > 0 && args.scenario != Scenario::Partition {
        bail!("--cut-seconds is for partition only, not {}", args.scenario.name());
    }
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable's path")?
            .parent()
            .map(Path::to_path_buf)
            .context("this executable has no parent directory")?,
    };
    let binaries = binaries(&bin_dir)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let repeat = repeat_command(&args, seed);
    let rates = RatePlan {
        host: args.host_rate,
        origin: args.origin_rate,
        slow_hosts_fraction: args.slow_hosts.unwrap_or(0.0),
        slow: args.slow_rate,
    };
    let host_rates = shaping::host_rates(&rates, args.nodes);
    let slow_hosts =
        if rates.slow.is_some() { shaping::slow_host_count(rates.slow_hosts_fraction, args.nodes) } else { 0 };
    eprintln!(
        "cachemesh-testnet: scenario {}, {} nodes, object {} bytes, seed {seed}, upload limit {}, binaries from {}",
        args.scenario.name(),
        args.nodes,
        args.object_size,
        args.upload_limit.as_deref().unwrap_or("none"),
        bin_dir.display()
    );
    eprintln!("cachemesh-testnet: repeat with: {repeat}");
    // Handled from here on, so that a signal during the network's setup is not missed.
    let mut interrupts = Interrupts::install()?;
    if network::is_root() && args.net != NetMode::Loopback {
        let (removed, problems) = network::remove_stale();
        if !removed.is_empty() {
            eprintln!("cachemesh-testnet: removed leftovers of dead runs: {}", removed.join(", "));
        }
        for problem in problems {
            eprintln!("cachemesh-testnet: cannot remove a leftover {problem}");
        }
    }
    let network = tokio::select! {
        network = Network::prepare(args.net, &host_rates, &rates, slow_hosts, args.latency, args.mtu) => {
            network.context("cannot set up the emulated network (--net emulated)")?
        }
        code = interrupts.interrupted() => {
            eprintln!("cachemesh-testnet: interrupted while setting up the network; what was made is removed");
            return Ok(ExitCode::from(code));
        }
    };
    eprintln!("cachemesh-testnet: network {}; latency {}", network.report.summary, network.report.latency);
    // On loopback the link rate becomes the daemon's own upload budget (unless one is given).
    let upload_limits: Vec<Option<String>> = host_rates
        .iter()
        .map(|rate| {
            args.upload_limit.clone().or_else(|| {
                (!network.emulated()).then_some(*rate).flatten().map(|rate| rate.bytes_per_second().to_string())
            })
        })
        .collect();
    for removed in remove_stale_roots() {
        eprintln!("cachemesh-testnet: removed the temporary root of a dead run: {}", removed.display());
    }
    let root = tempfile::Builder::new().prefix(ROOT_PREFIX).tempdir().context("cannot create a temporary root")?;
    std::fs::write(root.path().join(ROOT_OWNER_FILE), std::process::id().to_string())
        .context("cannot write the temporary root's owner file")?;
    let params = Params {
        scenario: args.scenario,
        nodes: args.nodes,
        object_size: args.object_size,
        seed,
        upload_limit: args.upload_limit.clone(),
        upload_limits,
        net: args.net,
        rates,
        host_rates,
        places: (0..args.nodes).map(|index| network.node(index)).collect(),
        origin_address: network.origin().address,
        network: network.report.clone(),
        timeout: Duration::from_secs(args.timeout),
        origin_only: args.origin_only,
        pin: args.pin,
        cut: Duration::from_secs(args.cut_seconds),
        binaries,
        bin_dir,
        out: args.out.clone(),
        repeat,
    };
    let processes = Processes::new();
    let shutdown = CancellationToken::new();
    let outcome = tokio::select! {
        report = scenario::run(&params, &processes, root.path(), shutdown.clone()) => Ok(report),
        code = interrupts.interrupted() => Err(code),
    };
    shutdown.cancel();
    let stuck = processes.kill_all(STOP_TIMEOUT).await;
    if !stuck.is_empty() {
        eprintln!("cachemesh-testnet: these children did not exit after SIGKILL: {}", stuck.join(", "));
    }
    // After the processes: a namespace goes when its last process has gone.
    for problem in network.teardown() {
        eprintln!("cachemesh-testnet: cannot remove {problem}");
    }
    copy_logs(root.path(), &args.out.join("logs"));
    if args.keep {
        // A kept root has no owner file, so that no later run takes it for a leftover.
        let _ = std::fs::remove_file(root.path().join(ROOT_OWNER_FILE));
        let kept = root.keep();
        eprintln!("cachemesh-testnet: kept the temporary root {}", kept.display());
    } else if let Err(error) = root.close() {
        eprintln!("cachemesh-testnet: cannot remove the temporary root: {error}");
    }
    match outcome {
        Ok(mut report) => {
            if let Some(figures) = network.delay_figures() {
                report.network.latency.push_str(&format!(
                    "; the delay thread held {} packets and released them late by {:.0} us on average, {:.0} us at most{}",
                    figures.packets,
                    figures.late_mean_us,
                    figures.late_max_us,
                    if figures.realtime { "" } else { " (without real-time priority)" }
                ));
                report.network.delayer = Some(figures);
            }
            print!("{}", report.text());
            report.write(&args.out).with_context(|| format!("cannot write the report into {}", args.out.display()))?;
            eprintln!("cachemesh-testnet: wrote {}/report.json, report.md and the charts (*.svg)", args.out.display());
            Ok(if report.error.is_some() {
                ExitCode::from(2)
            } else if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(code) => {
            eprintln!(
                "cachemesh-testnet: interrupted; every child stopped, the network and the temporary root removed"
            );
            Ok(ExitCode::from(code))
        }
    }
}

/// Removes temporary roots whose owning testnet is gone (it was SIGKILLed, so it could not
/// clean up); returns them. Only directories with an owner file are touched.
fn remove_stale_roots() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(ROOT_PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(entry.path().join(ROOT_OWNER_FILE));
        let Some(pid) = owner.ok().and_then(|text| text.trim().parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !network::owner_alive(pid) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// Copies every node's log and moto's log into `dir` (best effort: a missing log is noted).
fn copy_logs(root: &Path, dir: &Path) {
    if let Err(error) = std::fs::create_dir_all(dir) {
        eprintln!("cachemesh-testnet: cannot create {}: {error}", dir.display());
        return;
    }
    let mut copies = vec![(root.join("moto.log"), dir.join("moto.log"))];
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("node-") {
                copies.push((entry.path().join("cachemeshd.log"), dir.join(format!("{name}.log"))));
                copies.push((entry.path().join("command-line"), dir.join(format!("{name}.command-line"))));
            }
        }
    }
    for (from, to) in copies {
        if from.exists()
            && let Err(error) = std::fs::copy(&from, &to)
        {
            eprintln!("cachemesh-testnet: cannot copy {} to {}: {error}", from.display(), to.display());
        }
    }
}
