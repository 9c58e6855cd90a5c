//! The trial's network: plain loopback, or one network namespace per node on a bridge, with
//! each link shaped by `tc tbf`.
//!
//! Emulated layout (all names start with `cmt<PID>`, the testnet's process id, so that two
//! runs never clash and a leftover's owner can be told; interface names stay within the
//! kernel's 15 bytes):
//!
//! ```text
//!  root namespace                                   namespace cmt<PID>n<K>, one per node
//!  moto 127.0.0.1 <- proxies on 198.18.S.1          cachemeshd on 198.18.S.(10+K)
//!        cmt<PID>oh ==veth== cmt<PID>ob -+          cmt<PID>n<K> ==veth== cmt<PID>h<K> -+
//!                                         +-- bridge cmt<PID>b --------------------------+
//! ```
//!
//! The subnet is a free /24 of 198.18.0.0/15 (set aside for benchmarking by RFC 2544, so it
//! does not collide with real networks), chosen from the process id and checked against the
//! host's routes. The origin (moto and the counting proxies, which run in the testnet
//! itself) stays in the root namespace behind its own veth; the daemons' API sockets are
//! filesystem paths, reachable from the root namespace as before.
//!
//! Shaping: a `tbf` qdisc on the egress of both ends of a veth shapes both directions of
//! that link: the node's end is its upload, the bridge's end its download; `cmt<PID>oh` is
//! the origin's upload, `cmt<PID>ob` its download.
//!
//! Latency (`--latency D`): every packet a node sends waits D before its link, so a round
//! trip between two hosts takes 2D more, and one between a host and the origin D more. An
//! `iptables` rule in each node's namespace queues the node's outgoing packets (`NFQUEUE`)
//! and [`crate::delay::Delayer`] lets each go after D: many kernels (this project's CI
//! among them) have no `netem`, which would otherwise do it. The round trip is measured
//! with the delay in place and reported, with how late the delay thread's releases were.
//!
//! Invariants: everything created is recorded (under a `std` mutex never held across an
//! `.await`) before the next step, and [`Emulation::teardown`] removes it all, whether the
//! trial ended, failed or was interrupted (and on drop, as a last resort); leftovers of runs
//! whose testnet died (SIGKILL) are removed by [`remove_stale`] when the next run starts.
//!
//! Non-goals: IPv6, routing between namespaces and the outside world, jitter and loss.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::process::Command;

use crate::delay::{DelayFigures, Delayer, Queue, in_namespace};
use crate::shaping::{Rate, RatePlan};

/// The first bytes of every namespace and link name a run creates.
pub const NAME_PREFIX: &str = "cmt";
/// How long one `ip` or `tc` command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The most nodes an emulated run takes: hosts .10 to .249 of its /24.
pub const NODES_EMULATED_MAX: usize = 240;
/// The last octet of node 0's address; node K gets this plus K.
const NODE_HOST_OFFSET: u8 = 10;
/// The last octet of the origin's address.
const ORIGIN_HOST: u8 = 1;
/// /24 subnets in 198.18.0.0/15.
const SUBNET_COUNT: u32 = 512;
/// A tbf bucket holds this many milliseconds of the link's rate ...
const TBF_BURST_MS: u64 = 5;
/// ... and at least this many bytes (one full GSO segment and change).
const TBF_BURST_BYTES_MIN: u64 = 96 * 1024;
/// How long a packet may wait in a tbf queue before it is dropped, in milliseconds.
const TBF_QUEUE_MS: u64 = 50;
/// Round trips measured between two hosts once the delay is in place.
const RTT_SAMPLES: usize = 20;
/// How long one measured round trip may take before the measurement fails.
const RTT_TIMEOUT: Duration = Duration::from_secs(1);
/// `arp_ignore` of the bridge: do not answer ARP for any local address.
const BRIDGE_ARP_IGNORE: &str = "8";

const _: () = assert!(NODES_EMULATED_MAX + NODE_HOST_OFFSET as usize <= 250);

/// Which network a trial runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetMode {
    /// Emulated when running as root and namespaces, veth and bridges work; else loopback.
    Auto,
    /// Each node in its own network namespace on a bridge, links shaped by tc; fails when
    /// that cannot be set up.
    Emulated,
    /// Every node on 127.0.0.1 (rates become the daemons' --upload-limit).
    Loopback,
}

impl NetMode {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Emulated => "emulated",
            Self::Loopback => "loopback",
        }
    }
}

/// Why the emulated network could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A command failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr, or why it could not run.
        detail: String,
    },
    /// Too many nodes for one /24.
    #[error("an emulated network takes at most {NODES_EMULATED_MAX} nodes, not {nodes}")]
    TooManyNodes {
        /// Nodes asked for.
        nodes: usize,
    },
    /// Every /24 of 198.18.0.0/15 overlaps a route of this host.
    #[error("no free /24 in 198.18.0.0/15: every one overlaps a route of this host")]
    NoFreeSubnet,
}

/// Where each node and the origin are, as the testbed needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The address to listen on and to be reached at.
    pub address: Ipv4Addr,
    /// The namespace to run in (None: the root namespace).
    pub namespace: Option<String>,
}

/// What the report says about the network.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetworkReport {
    /// `emulated` or `loopback`.
    pub mode: String,
    /// One line: the mode and why (`loopback (not root)`, `emulated (namespaces, tc tbf)`).
    pub summary: String,
    /// The `--net` asked for.
    pub requested: String,
    /// Why the trial runs on loopback when emulation was possible to ask for.
    pub reason: Option<String>,
    /// The emulated subnet.
    pub subnet: Option<String>,
    /// The name prefix of namespaces and links.
    pub name_prefix: Option<String>,
    /// Whether the kernel has the netem qdisc (None: not probed, on loopback).
    pub netem_available: Option<bool>,
    /// Latency emulation: how, or why not, in words.
    pub latency: String,
    /// The one-way delay added to every packet a host sends, in microseconds (None: none).
    pub delay_us: Option<f64>,
    /// Round trips measured between two hosts before the trial (None: on loopback).
    pub rtt: Option<RttFigures>,
    /// How the delay thread did over the trial (None: no delay emulated).
    pub delayer: Option<DelayFigures>,
    /// Node 0's link MTU in bytes as the kernel reports it (every emulated link is set to
    /// `--mtu`; None: on loopback).
    pub mtu: Option<u32>,
    /// How rates are applied: `tc tbf ...`, `--upload-limit ...`, or `none`.
    pub rates_applied_by: String,
    /// Every host's link rate, each way.
    pub host_rate: Option<Rate>,
    /// The origin's link rate, each way.
    pub origin_rate: Option<Rate>,
    /// How many hosts are slow.
    pub slow_hosts: usize,
    /// The slow hosts' link rate.
    pub slow_rate: Option<Rate>,
}

/// Round trips of UDP datagrams between two places, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RttFigures {
    /// Between which places.
    pub between: String,
    /// Round trips measured.
    pub samples: usize,
    /// The shortest.
    pub min_us: f64,
    /// The median.
    pub median_us: f64,
    /// The longest.
    pub max_us: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Created {
    Namespace(String),
    Link(String),
}

/// A running emulated network.
#[derive(Debug)]
pub struct Emulation {
    prefix: String,
    subnet: u32,
    netem_available: bool,
    created: Mutex<Vec<Created>>,
    /// The delay thread when latency is emulated (stopped at teardown, kept for its figures).
    delayer: Mutex<Option<Delayer>>,
}

/// Runs `program args` and fails with its stderr.
async fn run(program: &str, args: &[&str]) -> Result<String, NetworkError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program);
    child.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let output = match tokio::time::timeout(COMMAND_TIMEOUT, child.output()).await {
        Err(_) => {
            return Err(NetworkError::Command {
                command,
                detail: format!("did not finish within {COMMAND_TIMEOUT:?}"),
            });
        }
        Ok(Err(error)) => {
            return Err(NetworkError::Command { command, detail: format!("cannot run {program}: {error}") });
        }
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        let detail = format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
        return Err(NetworkError::Command { command, detail });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `program args` synchronously (teardown may run where no runtime is left).
fn run_blocking(program: &str, args: &[&str]) -> Result<(), String> {
    let output = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run {program}: {error}"))?;
    if output.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&output.stderr).trim().to_string()) }
}

/// Whether this process runs as root (the owner of `/proc/self` is the effective user).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|metadata| metadata.uid() == 0)
}

/// The tbf arguments for `rate` on `device`.
fn tbf_args(device: &str, rate: Rate) -> Vec<String> {
    let burst = (rate.bytes_per_second() * TBF_BURST_MS / 1000).max(TBF_BURST_BYTES_MIN);
    ["qdisc", "replace", "dev", device, "root", "tbf", "rate", &rate.tc(), "burst", &burst.to_string()]
        .iter()
        .map(|arg| arg.to_string())
        .chain(["latency".to_string(), format!("{TBF_QUEUE_MS}ms")])
        .collect()
}

impl Emulation {
    /// The name prefix of this process's runs.
    pub fn prefix_for(pid: u32) -> String {
        format!("{NAME_PREFIX}{pid}")
    }

    /// The subnet's first three octets.
    fn octets(&self) -> (u8, u8) {
        (18 + (self.subnet / 256) as u8, (self.subnet % 256) as u8)
    }

    /// `198.18.S.0/24`.
    pub fn subnet_text(&self) -> String {
        let (second, third) = self.octets();
        format!("198.{second}.{third}.0/24")
    }

    fn address(&self, host: u8) -> Ipv4Addr {
        let (second, third) = self.octets();
        Ipv4Addr::new(198, second, third, host)
    }

    /// The origin's place: its address in the root namespace.
    pub fn origin(&self) -> Place {
        Place { address: self.address(ORIGIN_HOST), namespace: None }
    }

    /// Node `index`'s place.
    pub fn node(&self, index: usize) -> Place {
        Place { address: self.address(NODE_HOST_OFFSET + index as u8), namespace: Some(self.namespace(index)) }
    }

    fn namespace(&self, index: usize) -> String {
        format!("{}n{index}", self.prefix)
    }

    /// The name prefix of this network's namespaces and links.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether `tc ... netem` works on this kernel.
    pub fn netem_available(&self) -> bool {
        self.netem_available
    }

    fn record(&self, created: Created) {
        self.created.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(created);
    }

    /// Creates the bridge, the origin's link and one namespace per node, each link shaped
    /// at its rate (None: unshaped). On error, whatever was created is removed.
    pub async fn create(
        prefix: String,
        host_rates: &[Option<Rate>],
        origin_rate: Option<Rate>,
        delay: Option<Duration>,
        mtu: u32,
    ) -> Result<Self, NetworkError> {
        if host_rates.len() > NODES_EMULATED_MAX {
            return Err(NetworkError::TooManyNodes { nodes: host_rates.len() });
        }
        let subnet = free_subnet(std::process::id()).await?;
        let mut emulation =
            Self { prefix, subnet, netem_available: false, created: Mutex::new(Vec::new()), delayer: Mutex::new(None) };
        let built = match emulation.build(host_rates, origin_rate, delay.is_some(), mtu).await {
            Ok(netem_available) => {
                emulation.netem_available = netem_available;
                match delay {
                    Some(delay) => emulation.start_delay(host_rates.len(), delay).await,
                    None => Ok(()),
                }
            }
            Err(error) => Err(error),
        };
        match built {
            Ok(()) => Ok(emulation),
            Err(error) => {
                for problem in emulation.teardown() {
                    eprintln!("cachemesh-testnet: while undoing a failed network setup: {problem}");
                }
                Err(error)
            }
        }
    }

    /// The MTU of node `index`'s link, as its namespace's kernel reports it.
    pub async fn link_mtu(&self, index: usize) -> Result<u32, NetworkError> {
        let (namespace, inside) = (self.namespace(index), format!("{}n{index}", self.prefix));
        let shown = run("ip", &["-n", &namespace, "-o", "link", "show", "dev", &inside]).await?;
        let mut words = shown.split_whitespace();
        words.find(|word| *word == "mtu").and_then(|_| words.next()).and_then(|mtu| mtu.parse().ok()).ok_or_else(|| {
            NetworkError::Command {
                command: format!("ip -n {namespace} -o link show dev {inside}"),
                detail: format!("no mtu in {shown:?}"),
            }
        })
    }

    /// Opens every node namespace's packet queue and starts the thread that delays them.
    async fn start_delay(&self, nodes: usize, delay: Duration) -> Result<(), NetworkError> {
        let namespaces: Vec<String> = (0..nodes).map(|index| self.namespace(index)).collect();
        let opened = tokio::task::spawn_blocking(move || -> Result<Vec<Queue>, NetworkError> {
            namespaces
                .iter()
                .map(|namespace| {
                    in_namespace(namespace, Queue::open_here).map_err(|error| NetworkError::Command {
                        command: format!("open netfilter queue 0 in namespace {namespace}"),
                        detail: error.to_string(),
                    })
                })
                .collect()
        })
        .await
        .map_err(|error| NetworkError::Command {
            command: "open netfilter queues".into(),
            detail: error.to_string(),
        })??;
        let delayer = Delayer::start(opened, delay).map_err(|error| NetworkError::Command {
            command: "start the delay thread".into(),
            detail: error.to_string(),
        })?;
        *self.delayer.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(delayer);
        Ok(())
    }

    /// What the delay thread reported, once the network is torn down (None: no delay).
    pub fn delay_figures(&self) -> Option<DelayFigures> {
        self.delayer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref()?.figures().cloned()
    }

    async fn build(
        &self,
        host_rates: &[Option<Rate>],
        origin_rate: Option<Rate>,
        delayed: bool,
        mtu: u32,
    ) -> Result<bool, NetworkError> {
        let prefix = &self.prefix;
        let mtu = mtu.to_string();
        let bridge = format!("{prefix}b");
        // Each item is recorded before the command that makes it, so that an interruption
        // half-way leaves nothing unrecorded (removing what does not exist is not an error).
        self.record(Created::Link(bridge.clone()));
        run("ip", &["link", "add", &bridge, "type", "bridge"]).await?;
        // The root namespace would otherwise answer ARP for the origin's address on the
        // bridge itself, and the nodes' origin traffic would skip the origin's shaped veth.
        let arp_ignore = format!("/proc/sys/net/ipv4/conf/{bridge}/arp_ignore");
        std::fs::write(&arp_ignore, BRIDGE_ARP_IGNORE).map_err(|error| NetworkError::Command {
            command: format!("echo {BRIDGE_ARP_IGNORE} > {arp_ignore}"),
            detail: error.to_string(),
        })?;
        run("ip", &["link", "set", &bridge, "up"]).await?;

        // The origin's end stays in the root namespace with the origin's address; its peer
        // is the origin's port on the bridge.
        let (origin_end, origin_port) = (format!("{prefix}oh"), format!("{prefix}ob"));
        self.record(Created::Link(origin_end.clone()));
        run(
            "ip",
            &["link", "add", &origin_end, "mtu", &mtu, "type", "veth", "peer", "name", &origin_port, "mtu", &mtu],
        )
        .await?;
        run("ip", &["link", "set", &origin_port, "master", &bridge, "up"]).await?;
        let origin_address = format!("{}/24", self.address(ORIGIN_HOST));
        run("ip", &["addr", "add", &origin_address, "dev", &origin_end]).await?;
        run("ip", &["link", "set", &origin_end, "up"]).await?;
        let netem_available = probe_netem(&origin_port).await;
        if let Some(rate) = origin_rate {
            for device in [&origin_end, &origin_port] {
                let args = tbf_args(device, rate);
                run("tc", &args.iter().map(String::as_str).collect::<Vec<_>>()).await?;
            }
        }

        for (index, rate) in host_rates.iter().enumerate() {
            let namespace = self.namespace(index);
            let (port, inside) = (format!("{prefix}h{index}"), format!("{prefix}n{index}"));
            self.record(Created::Namespace(namespace.clone()));
            run("ip", &["netns", "add", &namespace]).await?;
            self.record(Created::Link(port.clone()));
            run(
                "ip",
                &[
                    "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name", &inside, "netns", &namespace,
                    "mtu", &mtu,
                ],
            )
            .await?;
            run("ip", &["link", "set", &port, "master", &bridge, "up"]).await?;
            let address = format!("{}/24", self.address(NODE_HOST_OFFSET + index as u8));
            run("ip", &["-n", &namespace, "addr", "add", &address, "dev", &inside]).await?;
            run("ip", &["-n", &namespace, "link", "set", &inside, "up"]).await?;
            run("ip", &["-n", &namespace, "link", "set", "lo", "up"]).await?;
            if delayed {
                // Packets leaving the node's link wait in queue 0 of its namespace; with
                // --queue-bypass they pass undelayed when no delay thread is bound.
                let queue = crate::delay::QUEUE_NUMBER.to_string();
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &namespace,
                        "iptables",
                        "-t",
                        "mangle",
                        "-A",
                        "POSTROUTING",
                        "-o",
                        &inside,
                        "-j",
                        "NFQUEUE",
                        "--queue-num",
                        &queue,
                        "--queue-bypass",
                    ],
                )
                .await?;
            }
            if let Some(rate) = rate {
                let download = tbf_args(&port, *rate);
                run("tc", &download.iter().map(String::as_str).collect::<Vec<_>>()).await?;
                let mut upload = vec!["-n".to_string(), namespace.clone()];
                upload.extend(tbf_args(&inside, *rate));
                run("tc", &upload.iter().map(String::as_str).collect::<Vec<_>>()).await?;
            }
        }
        Ok(netem_available)
    }

    /// Removes every namespace and link this network created (their qdiscs go with them);
    /// returns what could not be removed. Safe to call more than once.
    pub fn teardown(&self) -> Vec<String> {
        // The delay thread first: it lets every packet it holds go before its queues close.
        if let Some(delayer) = self.delayer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_mut() {
            delayer.stop();
        }
        let created: Vec<Created> =
            std::mem::take(&mut *self.created.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let mut problems = Vec::new();
        // Links first (a veth pair goes with either end), then namespaces, then the bridge,
        // which was created first.
        let mut ordered: Vec<&Created> = created.iter().rev().filter(|item| matches!(item, Created::Link(_))).collect();
        if let Some(bridge) = ordered.pop() {
            ordered.extend(created.iter().filter(|item| matches!(item, Created::Namespace(_))));
            ordered.push(bridge);
        }
        for item in ordered {
            let result = match item {
                Created::Link(name) => run_blocking("ip", &["link", "del", name]),
                Created::Namespace(name) => run_blocking("ip", &["netns", "del", name]),
            };
            if let Err(detail) = result
                && !detail.contains("Cannot find device")
                && !detail.contains("No such file")
            {
                problems.push(format!("{item:?}: {detail}"));
            }
        }
        problems
    }
}

impl Drop for Emulation {
    fn drop(&mut self) {
        for problem in self.teardown() {
            eprintln!("cachemesh-testnet: cannot remove {problem}");
        }
    }
}

/// Cuts the emulated network into groups, or heals it: with `cut`, each node's namespace
/// gets a `blackhole` route to the address of every node in another group (so nothing it
/// sends reaches them, and their packets get no answer), and without it those routes are
/// removed. `group[K]` is node K's group. The origin's address is never cut off. Only for
/// nodes in namespaces: a partition of loopback would need a firewall the testnet does not
/// set up, so the caller refuses it earlier.
pub async fn set_partition(places: &[Place], group: &[usize], cut: bool) -> Result<(), NetworkError> {
    for (index, place) in places.iter().enumerate() {
        let Some(namespace) = &place.namespace else { continue };
        for (other, other_place) in places.iter().enumerate() {
            if group[other] == group[index] {
                continue;
            }
            let destination = format!("{}/32", other_place.address);
            let action = if cut { "replace" } else { "del" };
            run("ip", &["-n", namespace, "route", action, "blackhole", &destination]).await?;
        }
    }
    Ok(())
}

/// Sets `net.ipv4.tcp_retries2` in every node's namespace (each namespace has its own):
/// how many retransmissions TCP makes before it gives a connection up. Linux's default, 15,
/// gives up after about 15 minutes; a low value lets a cut of seconds break the daemons'
/// control-plane connections the way a long cut does. Nodes on loopback are left alone.
pub async fn set_tcp_retries(places: &[Place], retries: u32) -> Result<(), NetworkError> {
    let setting = format!("net.ipv4.tcp_retries2={retries}");
    for namespace in places.iter().filter_map(|place| place.namespace.as_deref()) {
        run("ip", &["netns", "exec", namespace, "sysctl", "-qw", &setting]).await?;
    }
    Ok(())
}

/// The network a trial runs on, decided at start.
#[derive(Debug)]
pub struct Network {
    /// The emulated network, when there is one.
    pub emulation: Option<Emulation>,
    /// What the report says about it.
    pub report: NetworkReport,
}

impl Network {
    /// Decides and, when emulated, builds the network for `host_rates.len()` nodes: `Auto`
    /// falls back to loopback (with the reason in the report) where `Emulated` fails.
    pub async fn prepare(
        mode: NetMode,
        host_rates: &[Option<Rate>],
        plan: &RatePlan,
        slow_hosts: usize,
        delay: Option<Duration>,
        mtu: u32,
    ) -> Result<Self, NetworkError> {
        let mut report = NetworkReport {
            requested: mode.name().to_string(),
            latency: match delay {
                Some(_) => "not emulated (loopback: --latency needs the emulated network)".into(),
                None => "not emulated (loopback)".into(),
            },
            host_rate: plan.host,
            origin_rate: plan.origin,
            slow_hosts,
            slow_rate: if slow_hosts > 0 { plan.slow } else { None },
            ..NetworkReport::default()
        };
        let loopback = |mut report: NetworkReport, reason: String| {
            report.mode = "loopback".into();
            report.summary = format!("loopback ({reason})");
            report.reason = Some(reason);
            report.rates_applied_by = if host_rates.iter().any(Option::is_some) {
                "each daemon's --upload-limit (its uploads to peers only; origin and downloads unshaped)".into()
            } else {
                "none".into()
            };
            Self { emulation: None, report }
        };
        match mode {
            NetMode::Loopback => return Ok(loopback(report, "--net loopback".into())),
            NetMode::Auto if !is_root() => return Ok(loopback(report, "not root".into())),
            NetMode::Auto | NetMode::Emulated => {}
        }
        let emulation =
            match Emulation::create(Emulation::prefix_for(std::process::id()), host_rates, plan.origin, delay, mtu)
                .await
            {
                Ok(emulation) => emulation,
                Err(error) if mode == NetMode::Auto => {
                    return Ok(loopback(report, format!("network namespaces unavailable: {error}")));
                }
                Err(error) => return Err(error),
            };
        report.mode = "emulated".into();
        report.summary = format!("emulated (a network namespace per node on bridge {}b, tc tbf)", emulation.prefix());
        report.subnet = Some(emulation.subnet_text());
        report.name_prefix = Some(emulation.prefix().to_string());
        report.netem_available = Some(emulation.netem_available());
        // What the kernel says node 0's link carries, not what was asked for.
        report.mtu = match emulation.link_mtu(0).await {
            Ok(mtu) => Some(mtu),
            Err(error) => {
                eprintln!("cachemesh-testnet: cannot read node 0's link MTU back: {error}");
                None
            }
        };
        let (to, between) = if host_rates.len() > 1 {
            (emulation.node(1), "node 0 and node 1")
        } else {
            (emulation.origin(), "node 0 and the origin")
        };
        let (from, between) = (emulation.node(0), between.to_string());
        // A failed measurement is reported, not fatal: the trial does not depend on it.
        let rtt = match tokio::task::spawn_blocking(move || measure_rtt(&from, &to, between)).await {
            Ok(Ok(rtt)) => Ok(rtt),
            Ok(Err(error)) => Err(error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let measured = match &rtt {
            Ok(rtt) => format!(
                "round trip between {}: min {:.0} us, median {:.0} us, max {:.0} us over {} datagrams",
                rtt.between, rtt.min_us, rtt.median_us, rtt.max_us, rtt.samples
            ),
            Err(error) => format!("round trip not measured ({error})"),
        };
        report.latency = match delay {
            None => format!("not emulated (no --latency); {measured}"),
            Some(delay) => {
                report.delay_us = Some(delay.as_secs_f64() * 1e6);
                format!(
                    "{} us one-way on every host's egress (NFQUEUE and a delay thread{}); {measured}",
                    delay.as_micros(),
                    if emulation.netem_available() { "" } else { "; this kernel has no netem" },
                )
            }
        };
        report.rtt = rtt.ok();
        report.rates_applied_by = if plan.any() {
            "tc tbf on the egress of both ends of each veth (each link shaped both ways)".into()
        } else {
            "none (links unshaped)".into()
        };
        Ok(Self { emulation: Some(emulation), report })
    }

    /// Where node `index` runs and listens.
    pub fn node(&self, index: usize) -> Place {
        match &self.emulation {
            Some(emulation) => emulation.node(index),
            None => Place { address: Ipv4Addr::LOCALHOST, namespace: None },
        }
    }

    /// Where the origin's proxies listen.
    pub fn origin(&self) -> Place {
        match &self.emulation {
            Some(emulation) => emulation.origin(),
            None => Place { address: Ipv4Addr::LOCALHOST, namespace: None },
        }
    }

    /// Whether links are emulated.
    pub fn emulated(&self) -> bool {
        self.emulation.is_some()
    }

    /// Removes the emulated network, if any; returns what could not be removed.
    pub fn teardown(&self) -> Vec<String> {
        self.emulation.as_ref().map(Emulation::teardown).unwrap_or_default()
    }

    /// What the delay thread reported (after [`Network::teardown`]; None: no delay).
    pub fn delay_figures(&self) -> Option<DelayFigures> {
        self.emulation.as_ref().and_then(Emulation::delay_figures)
    }
}

/// A UDP socket bound to `place`'s address, in its namespace.
fn udp_socket(place: &Place) -> std::io::Result<std::net::UdpSocket> {
    let address = place.address;
    let bind = move || {
        let socket = std::net::UdpSocket::bind((address, 0))?;
        socket.set_read_timeout(Some(RTT_TIMEOUT))?;
        Ok(socket)
    };
    match &place.namespace {
        Some(namespace) => in_namespace(namespace, bind),
        None => bind(),
    }
}

/// Measures [`RTT_SAMPLES`] round trips of a small UDP datagram from `from` to `to` and
/// back (one thread plays both ends, so the figure is the network's, plus two system calls).
fn measure_rtt(from: &Place, to: &Place, between: String) -> std::io::Result<RttFigures> {
    let (near, far) = (udp_socket(from)?, udp_socket(to)?);
    let far_address = far.local_addr()?;
    let mut buffer = [0u8; 64];
    let mut samples = Vec::with_capacity(RTT_SAMPLES);
    for round in 0..RTT_SAMPLES as u32 {
        let started = std::time::Instant::now();
        near.send_to(&round.to_be_bytes(), far_address)?;
        let (read, sender) = far.recv_from(&mut buffer)?;
        far.send_to(&buffer[..read], sender)?;
        loop {
            let (read, sender) = near.recv_from(&mut buffer)?;
            if sender == far_address && buffer[..read] == round.to_be_bytes() {
                break;
            }
        }
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    Ok(RttFigures {
        between,
        samples: samples.len(),
        min_us: samples[0],
        median_us: samples[samples.len() / 2],
        max_us: samples[samples.len() - 1],
    })
}

/// Whether the netem qdisc can be attached (it is removed again at once).
async fn probe_netem(device: &str) -> bool {
    let added = run("tc", &["qdisc", "add", "dev", device, "root", "netem", "delay", "1ms"]).await.is_ok();
    if added {
        let _ = run("tc", &["qdisc", "del", "dev", device, "root"]).await;
    }
    added
}

/// An IPv4 prefix as (network, length).
fn parse_prefix(text: &str) -> Option<(u32, u32)> {
    let (address, length) = match text.split_once('/') {
        Some((address, length)) => (address, length.parse::<u32>().ok()?),
        None => (text, 32),
    };
    let address: Ipv4Addr = address.parse().ok()?;
    (length <= 32).then_some((u32::from(address), length))
}

/// Whether two prefixes share an address.
fn overlaps(a: (u32, u32), b: (u32, u32)) -> bool {
    let length = a.1.min(b.1);
    let mask = if length == 0 { 0 } else { u32::MAX << (32 - length) };
    a.0 & mask == b.0 & mask
}

/// The index of the first /24 of 198.18.0.0/15, from `start` on, that overlaps none of `taken`.
fn pick_subnet(start: u32, taken: &[(u32, u32)]) -> Option<u32> {
    (0..SUBNET_COUNT).map(|step| (start + step) % SUBNET_COUNT).find(|index| {
        let network = u32::from(Ipv4Addr::new(198, 18 + (index / 256) as u8, (index % 256) as u8, 0));
        !taken.iter().any(|prefix| overlaps(*prefix, (network, 24)))
    })
}

/// A /24 no route of this host touches, starting from one chosen by `pid` so that runs
/// started together try different ones.
async fn free_subnet(pid: u32) -> Result<u32, NetworkError> {
    let routes = run("ip", &["-o", "-4", "route", "show", "table", "all"]).await?;
    let addresses = run("ip", &["-o", "-4", "addr", "show"]).await?;
    let mut taken: Vec<(u32, u32)> = routes
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            // `local 1.2.3.4 ...` and `broadcast ...` lines of the local table name the address second.
            let destination = match words.first() {
                Some(&"local" | &"broadcast" | &"unicast" | &"multicast") => words.get(1),
                _ => words.first(),
            };
            destination.and_then(|text| parse_prefix(text))
        })
        .filter(|prefix| prefix.1 > 0)
        .collect();
    taken.extend(addresses.lines().filter_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|word| *word == "inet")?;
        parse_prefix(words.get(at + 1)?)
    }));
    pick_subnet(pid % SUBNET_COUNT, &taken).ok_or(NetworkError::NoFreeSubnet)
}

/// The process id in a name this testnet made (`cmt<PID><role>...`), if it is one.
fn owner_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    let role = rest[digits..].chars().next()?;
    if digits == 0 || !matches!(role, 'b' | 'o' | 'h' | 'n') {
        return None;
    }
    rest[..digits].parse().ok()
}

/// Whether the process that made a name may still run. Any live process with that id
/// counts (it may be a testnet under another file name): a leftover whose id was reused
/// waits for a later run rather than risk a live run's network.
pub fn owner_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces and links left by testnet runs that are no longer running (killed
/// with SIGKILL, or a crash); returns what was removed and what could not be.
pub fn remove_stale() -> (Vec<String>, Vec<String>) {
    let mut removed = Vec::new();
    let mut problems = Vec::new();
    let links = std::process::Command::new("ip").args(["-o", "link", "show"]).output();
    let namespaces = std::process::Command::new("ip").args(["netns", "list"]).output();
    let link_names: Vec<String> = links
        .map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter_map(|line| line.split(": ").nth(1))
                .map(|name| name.split('@').next().unwrap_or(name).to_string())
                .collect()
        })
        .unwrap_or_default();
    let namespace_names: Vec<String> = namespaces
        .map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter_map(|line| line.split_whitespace().next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let stale = |name: &String| owner_of(name).is_some_and(|pid| pid != std::process::id() && !owner_alive(pid));
    // Veth ends first (the bridge last, so that its ports are gone), then namespaces.
    let mut ordered: Vec<&String> = link_names.iter().filter(|name| stale(name) && !name.ends_with('b')).collect();
    ordered.extend(link_names.iter().filter(|name| stale(name) && name.ends_with('b')));
    for name in ordered {
        match run_blocking("ip", &["link", "del", name]) {
            Ok(()) => removed.push(format!("link {name}")),
            Err(detail) if detail.contains("Cannot find device") => {}
            Err(detail) => problems.push(format!("link {name}: {detail}")),
        }
    }
    for name in namespace_names.iter().filter(|name| stale(name)) {
        match run_blocking("ip", &["netns", "del", name]) {
            Ok(()) => removed.push(format!("namespace {name}")),
            Err(detail) => problems.push(format!("namespace {name}: {detail}")),
        }
    }
    (removed, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_owner() {
        // Goal: only names this testnet makes are ever taken for leftovers, with their owner's pid.
        assert_eq!(owner_of("cmt4242b"), Some(4242));
        assert_eq!(owner_of("cmt4242h17"), Some(4242));
        assert_eq!(owner_of("cmt7n0"), Some(7));
        assert_eq!(owner_of("cmt4242oh"), Some(4242));
        assert_eq!(owner_of("cmt4242"), None);
        assert_eq!(owner_of("cmtb"), None);
        assert_eq!(owner_of("cmt12x"), None);
        assert_eq!(owner_of("eth0"), None);
        // The longest name fits the kernel's 15 bytes: pid_max is at most 2^22 (7 digits).
        assert!(format!("{}h{}", Emulation::prefix_for(4_194_304), NODES_EMULATED_MAX - 1).len() <= 15);
    }

    #[test]
    fn subnets_skip_routes_that_overlap() {
        // Goal: a /24 is chosen only when no route or address of the host touches it.
        let prefix = |text: &str| parse_prefix(text).unwrap();
        assert!(overlaps(prefix("198.18.0.0/15"), prefix("198.18.7.0/24")));
        assert!(!overlaps(prefix("10.0.0.0/8"), prefix("198.18.7.0/24")));
        assert!(overlaps(prefix("198.18.7.9"), prefix("198.18.7.0/24")));
        assert_eq!(pick_subnet(5, &[prefix("192.0.2.0/24")]), Some(5));
        assert_eq!(pick_subnet(5, &[prefix("198.18.5.0/24"), prefix("198.18.6.1")]), Some(7));
        assert_eq!(pick_subnet(511, &[prefix("198.19.255.0/24")]), Some(0));
        assert_eq!(pick_subnet(0, &[prefix("198.16.0.0/12")]), None);
    }

    #[test]
    fn tbf_buckets_hold_a_few_milliseconds() {
        // Goal: the bucket holds TBF_BURST_MS of the rate, never less than TBF_BURST_BYTES_MIN.
        let args = tbf_args("x", Rate::from_bits_per_second(8_000_000_000));
        let burst = args[args.iter().position(|arg| arg == "burst").unwrap() + 1].parse::<u64>().unwrap();
        assert_eq!(burst, 1_000_000_000 * TBF_BURST_MS / 1000);
        let args = tbf_args("x", Rate::from_bits_per_second(8_000_000));
        assert!(args.contains(&TBF_BURST_BYTES_MIN.to_string()), "{args:?}");
    }
}
