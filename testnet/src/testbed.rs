//! A trial's world: the origin (moto behind counting proxies), a cluster key, and N nodes
//! split into datacenters, each DC bootstrapped from its first node, up and meshed.
//!
//! Start order: moto and the bucket; one proxy per node, listening on the origin's address;
//! `cachemesh cluster-key new`; the first node of each DC (no bootstrap); read its p2p
//! address from `GET /v1/status` (`mesh.p2p_listen`); the other nodes of that DC with
//! `--bootstrap HOST:PORT`, in parallel; then poll every node until it sees every other
//! member of its own DC (`mesh.members >= DC size - 1`), with a deadline.
//!
//! Non-goals: making the network. The [`Layout`] says where each node and the origin are
//! (loopback, or the namespaces and addresses of `network.rs`, set up before this runs).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::network::Place;
use crate::node::{Binaries, Node, NodeError, NodeSpec, POLL_INTERVAL};
use crate::origin::{Moto, OriginError};
use crate::processes::Processes;
use crate::proxy::{Proxy, ProxyFigures};

/// How long the mesh may take to form once every node runs: a base plus a share per node.
pub const MEMBERSHIP_TIMEOUT_BASE: Duration = Duration::from_secs(60);
/// See [`MEMBERSHIP_TIMEOUT_BASE`].
pub const MEMBERSHIP_TIMEOUT_PER_NODE: Duration = Duration::from_secs(2);
/// How long `cachemesh cluster-key new` may run.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the testbed could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The origin failed.
    #[error(transparent)]
    Origin(#[from] OriginError),
    /// A node failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// `cachemesh cluster-key new` failed.
    #[error("cachemesh cluster-key new {file}: {detail}")]
    ClusterKey {
        /// The key file.
        file: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The first node of a DC reported no IPv4 p2p address.
    #[error("node {index} reports no /ip4/HOST/tcp/PORT p2p address to bootstrap from: {addresses:?}")]
    NoBootstrapAddress {
        /// The node.
        index: usize,
        /// What it reported.
        addresses: Vec<String>,
    },
    /// cachemeshd lacks the test-only fault switch a scenario needs.
    #[error(
        "{daemon} was built without the test-faults feature (it refuses {switch}): \
         rebuild it with `cargo build --workspace` (the testnet turns the feature on) or \
         `cargo build -p cachemesh-daemon --features test-faults`"
    )]
    NoFaultSwitch {
        /// The binary.
        daemon: PathBuf,
        /// The switch it refused.
        switch: String,
    },
    /// The mesh did not form.
    #[error("the mesh did not form within {timeout:?}: {detail}")]
    MeshNotFormed {
        /// How long we waited.
        timeout: Duration,
        /// Per node: members seen / expected.
        detail: String,
    },
}

/// How to lay the testbed out.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The DC of each node (its length is the node count).
    pub dcs: Vec<String>,
    /// `--upload-limit` of each node.
    pub upload_limits: Vec<Option<String>>,
    /// `--link-rate` of each node (bytes per second), when its link has a rate.
    pub link_rates: Vec<Option<u64>>,
    /// Where each node runs and listens.
    pub places: Vec<Place>,
    /// The address the origin's proxies listen on.
    pub origin_address: Ipv4Addr,
    /// The node that serves peers corrupt chunks.
    pub faulty: Option<usize>,
    /// The node that serves peers slowly, and its delay per chunk in milliseconds.
    pub slow: Option<(usize, u64)>,
}

/// The running testbed.
#[derive(Debug)]
pub struct Testbed {
    /// One counting proxy per node (same index).
    pub proxies: Vec<Proxy>,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Seconds from starting the first node until the mesh had formed.
    pub mesh_formed_seconds: f64,
    /// The cluster key file every node was started with.
    pub cluster_key: PathBuf,
}

impl Testbed {
    /// Starts everything and waits until every node sees its whole DC.
    pub async fn start(
        processes: &Processes,
        binaries: &Binaries,
        root: &Path,
        layout: &Layout,
        shutdown: CancellationToken,
    ) -> Result<Self, SetupError> {
        if layout.faulty.is_some() {
            check_fault_switch(binaries, &["--fault-corrupt-served-chunks", "true"]).await?;
        }
        if layout.slow.is_some() {
            check_fault_switch(binaries, &["--fault-slow-served-chunks-ms", "1"]).await?;
        }
        let moto = Moto::start(processes, root).await?;
        let mut proxies = Vec::with_capacity(layout.dcs.len());
        for _ in &layout.dcs {
            proxies.push(moto.proxy(layout.origin_address, shutdown.clone()).await?);
        }
        let cluster_key = root.join("cluster.key");
        make_cluster_key(binaries, &cluster_key).await?;
        let started = Instant::now();
        let spec = |index: usize, bootstrap: Vec<String>| NodeSpec {
            index,
            dc: layout.dcs[index].clone(),
            bootstrap,
            origin_endpoint: proxies[index].endpoint(),
            upload_limit: layout.upload_limits[index].clone(),
            link_rate: layout.link_rates[index],
            place: layout.places[index].clone(),
            corrupt_served_chunks: layout.faulty == Some(index),
            slow_served_chunks_ms: layout.slow.filter(|(slow, _)| *slow == index).map(|(_, delay_ms)| delay_ms),
        };
        let mut nodes: Vec<Option<Node>> = (0..layout.dcs.len()).map(|_| None).collect();
        for dc in distinct(&layout.dcs) {
            let members: Vec<usize> = (0..layout.dcs.len()).filter(|index| layout.dcs[*index] == dc).collect();
            let Some((&first, rest)) = members.split_first() else { continue };
            let seed = Node::start(processes, binaries, root, &cluster_key, spec(first, Vec::new())).await?;
            let address = seed.p2p_address().ok_or_else(|| SetupError::NoBootstrapAddress {
                index: first,
                addresses: seed.mesh.p2p_listen.clone(),
            })?;
            nodes[first] = Some(seed);
            let starts = rest
                .iter()
                .map(|&index| Node::start(processes, binaries, root, &cluster_key, spec(index, vec![address.clone()])));
            for node in futures::future::try_join_all(starts).await? {
                let index = node.index();
                nodes[index] = Some(node);
            }
        }
        let nodes: Vec<Node> = nodes.into_iter().flatten().collect();
        wait_for_mesh(processes, &nodes, &layout.dcs).await?;
        let mesh_formed_seconds = started.elapsed().as_secs_f64();
        // Refresh each node's mesh status (ids, addresses) now that it is meshed.
        let mut meshed = Vec::with_capacity(nodes.len());
        for mut node in nodes {
            if let Some(mesh) = node.status().await?.mesh {
                node.mesh = mesh;
            }
            meshed.push(node);
        }
        Ok(Self { proxies, nodes: meshed, mesh_formed_seconds, cluster_key })
    }

    /// Starts node `index` again (after it stopped) on the same directory, data dir and
    /// origin proxy, bootstrapped from `bootstrap_from` (None: from nothing, for a lone
    /// node), and waits until it answers and sees at least `members` other members;
    /// replaces the old node in [`Testbed::nodes`].
    pub async fn restart_node(
        &mut self,
        processes: &Processes,
        binaries: &Binaries,
        root: &Path,
        index: usize,
        bootstrap_from: Option<usize>,
        members: u64,
    ) -> Result<(), SetupError> {
        let mut spec = self.nodes[index].spec.clone();
        spec.bootstrap = match bootstrap_from {
            Some(from) => vec![self.nodes[from].p2p_address().ok_or_else(|| SetupError::NoBootstrapAddress {
                index: from,
                addresses: self.nodes[from].mesh.p2p_listen.clone(),
            })?],
            None => Vec::new(),
        };
        let mut node = Node::start(processes, binaries, root, &self.cluster_key, spec).await?;
        let timeout = MEMBERSHIP_TIMEOUT_BASE;
        let deadline = Instant::now() + timeout;
        loop {
            node.check_running(processes)?;
            let seen = node.status().await.ok().and_then(|status| status.mesh);
            if let Some(mesh) = seen {
                if mesh.members >= members {
                    node.mesh = mesh;
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(SetupError::MeshNotFormed {
                        timeout,
                        detail: format!("restarted node {index} sees {} of {members}", mesh.members),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(SetupError::MeshNotFormed {
                    timeout,
                    detail: format!("restarted node {index} does not answer GET /v1/status"),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        self.nodes[index] = node;
        Ok(())
    }

    /// Starts (`true`) or ends (`false`) an origin outage: every proxy closes the
    /// connections it is given and the requests on connections it already has.
    pub fn set_origin_outage(&self, outage: bool) {
        for proxy in &self.proxies {
            proxy.set_outage(outage);
        }
    }

    /// Origin figures per node, read now.
    pub fn origin_figures(&self) -> Vec<ProxyFigures> {
        self.proxies.iter().map(Proxy::figures).collect()
    }

    /// Origin figures summed over the nodes whose index passes `filter`.
    pub fn origin_total(&self, filter: impl Fn(usize) -> bool) -> ProxyFigures {
        let mut total = ProxyFigures::default();
        for (index, proxy) in self.proxies.iter().enumerate() {
            if filter(index) {
                total.add(proxy.figures());
            }
        }
        total
    }
}

/// The distinct values in first-seen order.
fn distinct(values: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for value in values {
        if !out.contains(value) {
            out.push(value.clone());
        }
    }
    out
}

async fn make_cluster_key(binaries: &Binaries, file: &Path) -> Result<(), SetupError> {
    let error = |detail: String| SetupError::ClusterKey { file: file.to_path_buf(), detail };
    let mut command = Command::new(&binaries.cli);
    command.args(["cluster-key", "new"]).arg(file).stdin(Stdio::null()).kill_on_drop(true);
    crate::node::clean_env(&mut command);
    let output = tokio::time::timeout(CLI_TIMEOUT, command.output())
        .await
        .map_err(|_| error(format!("did not finish within {CLI_TIMEOUT:?}")))?
        .map_err(|source| error(format!("cannot run {}: {source}", binaries.cli.display())))?;
    if !output.status.success() {
        return Err(error(format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim())));
    }
    Ok(())
}

/// Whether cachemeshd accepts the fault switch: a binary built by `cargo build -p
/// cachemesh-daemon` lacks it, and it is the last build that decides what is in target/.
async fn check_fault_switch(binaries: &Binaries, switch: &[&str]) -> Result<(), SetupError> {
    let mut command = Command::new(&binaries.daemon);
    command.args(switch).arg("--help").stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(CLI_TIMEOUT, command.output()).await;
    match output {
        Ok(Ok(output)) if output.status.success() => Ok(()),
        _ => Err(SetupError::NoFaultSwitch { daemon: binaries.daemon.clone(), switch: switch[0].to_string() }),
    }
}

/// Polls every node until it sees every other member of its DC.
async fn wait_for_mesh(processes: &Processes, nodes: &[Node], dcs: &[String]) -> Result<(), SetupError> {
    let timeout = MEMBERSHIP_TIMEOUT_BASE + MEMBERSHIP_TIMEOUT_PER_NODE * nodes.len() as u32;
    let deadline = Instant::now() + timeout;
    loop {
        let mut missing = Vec::new();
        for node in nodes {
            node.check_running(processes)?;
            let expected = dcs.iter().filter(|dc| **dc == node.spec.dc).count() as u64 - 1;
            match node.status().await {
                Ok(status) => {
                    let seen = status.mesh.map(|mesh| mesh.members).unwrap_or(0);
                    // More than expected is left to the scenario's checks (two-dcs looks for
                    // members across DCs); waiting for it here would only turn it into a timeout.
                    if seen < expected {
                        missing.push(format!("node {} sees {seen} of {expected}", node.index()));
                    }
                }
                Err(error) => missing.push(error.to_string()),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(SetupError::MeshNotFormed { timeout, detail: missing.join("; ") });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
