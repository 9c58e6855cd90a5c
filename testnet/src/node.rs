//! One `cachemeshd` of a trial: its directories, command line, process and API client.
//!
//! A node lives in `ROOT/node-K/` (data dir, API socket, log) and listens on its
//! [`Place`]'s address (127.0.0.1, or its own address inside its network namespace; the
//! API socket is a path, reachable from the root namespace either way). Its process
//! belongs to the [`Processes`] registry; the node keeps only the handle. Everything the testnet learns
//! about a node comes through its API socket: `GET /v1/status`, `GET /v1/peers`,
//! `GET /metrics`.
//!
//! Inherited `CACHEMESH_*` and `AWS_*` variables are removed so that the machine's
//! environment cannot change a trial, except `CACHEMESH_LOG` (the daemon's log filter),
//! which is passed on so that a run can be repeated with more logging.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachemesh_daemon::client::{Client, ClientError};
use cachemesh_proto::api::{MeshStatus, PeersResponse, StatusResponse};
use http::{Method, StatusCode};
use tokio::process::Command;

use crate::metrics::Metrics;
use crate::network::Place;
use crate::processes::{ProcessHandle, Processes};

/// How long a node may take to answer its first status request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness and membership are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of a node's log quoted when it exits unexpectedly.
const LOG_TAIL_LINES: usize = 12;
/// Each node's chunk cache budget.
pub const CACHE_SIZE: &str = "4GiB";
/// The data dir's name inside a node's directory.
const DATA_DIR_NAME: &str = "data";

/// Why talking to a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Starting the process failed.
    #[error("node {index}: cannot start {program}: {source}")]
    Spawn {
        /// The node.
        index: usize,
        /// The binary.
        program: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file of the node could not be made.
    #[error("node {index}: {what}: {source}")]
    Io {
        /// The node.
        index: usize,
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The process exited before it was expected to.
    #[error("node {index} exited ({status}); its log {log} ends with:\n{tail}")]
    Exited {
        /// The node.
        index: usize,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// The node did not answer in time.
    #[error("node {index} did not {what} within {timeout:?}; last error: {last}; its log is {log}")]
    Timeout {
        /// The node.
        index: usize,
        /// What it did not do.
        what: String,
        /// How long we waited.
        timeout: Duration,
        /// The last error seen.
        last: String,
        /// Its log file.
        log: PathBuf,
    },
    /// The API answered with an error.
    #[error("node {index}: {request}: {source}")]
    Api {
        /// The node.
        index: usize,
        /// The request.
        request: String,
        /// The cause.
        source: ClientError,
    },
    /// The API answered something that is not what it documents.
    #[error("node {index}: {request}: unexpected answer: {detail}")]
    Unexpected {
        /// The node.
        index: usize,
        /// The request.
        request: String,
        /// What was wrong.
        detail: String,
    },
}

/// How to start one node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Its index in the trial.
    pub index: usize,
    /// Its datacenter.
    pub dc: String,
    /// `--bootstrap` addresses.
    pub bootstrap: Vec<String>,
    /// The origin endpoint it reaches (its own counting proxy).
    pub origin_endpoint: String,
    /// `--upload-limit`, when set.
    pub upload_limit: Option<String>,
    /// `--link-rate` (bytes per second): its link's rate, when the trial sets one.
    pub link_rate: Option<u64>,
    /// Where it listens (p2p and data plane) and which namespace it runs in.
    pub place: Place,
    /// Serve peers corrupt chunks (the test-only fault switch).
    pub corrupt_served_chunks: bool,
    /// Wait this many milliseconds before serving each chunk to a peer (the test-only
    /// fault switch `--fault-slow-served-chunks-ms`).
    pub slow_served_chunks_ms: Option<u64>,
}

/// A started node.
#[derive(Debug)]
pub struct Node {
    /// How it was started.
    pub spec: NodeSpec,
    dir: PathBuf,
    handle: ProcessHandle,
    client: Client,
    /// Its mesh status when it became ready.
    pub mesh: MeshStatus,
}

/// What is needed to start nodes.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `cachemeshd`.
    pub daemon: PathBuf,
    /// `cachemesh` (the CLI).
    pub cli: PathBuf,
}

impl Node {
    /// Starts a node in `ROOT/node-K` and waits until it answers with a mesh status that
    /// has a p2p listen address.
    pub async fn start(
        processes: &Processes,
        binaries: &Binaries,
        root: &Path,
        cluster_key: &Path,
        spec: NodeSpec,
    ) -> Result<Self, NodeError> {
        let index = spec.index;
        let dir = root.join(format!("node-{index}"));
        let io = |what: &str| {
            let what = what.to_string();
            move |source| NodeError::Io { index, what, source }
        };
        std::fs::create_dir_all(&dir).map_err(io("cannot create its directory"))?;
        let socket = dir.join("api.sock");
        let log_path = dir.join("cachemeshd.log");
        // Appended to, so that a node restarted on the same directory keeps its first life's log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("cannot create its log"))?;
        let log_err = log.try_clone().map_err(io("cannot duplicate its log"))?;
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            dir.join(DATA_DIR_NAME).display().to_string(),
            "--api-socket".into(),
            socket.display().to_string(),
            "--origin".into(),
            crate::origin::Moto::origin_url(),
            "--cache-size".into(),
            CACHE_SIZE.into(),
            "--cluster-key".into(),
            cluster_key.display().to_string(),
            "--dc".into(),
            spec.dc.clone(),
            "--p2p-listen".into(),
            format!("{}:0", spec.place.address),
            "--data-listen".into(),
            format!("{}:0", spec.place.address),
        ];
        for address in &spec.bootstrap {
            args.extend(["--bootstrap".into(), address.clone()]);
        }
        if let Some(rate) = &spec.upload_limit {
            args.extend(["--upload-limit".into(), rate.clone()]);
        }
        if let Some(rate) = spec.link_rate {
            args.extend(["--link-rate".into(), rate.to_string()]);
        }
        if spec.corrupt_served_chunks {
            args.extend(["--fault-corrupt-served-chunks".into(), "true".into()]);
        }
        if let Some(delay_ms) = spec.slow_served_chunks_ms {
            args.extend(["--fault-slow-served-chunks-ms".into(), delay_ms.to_string()]);
        }
        // In an emulated network the daemon runs in its namespace through `ip netns exec`,
        // which execs it: the child's pid is the daemon's, as on loopback.
        let mut program: Vec<String> = Vec::new();
        if let Some(namespace) = &spec.place.namespace {
            program.extend(["ip".into(), "netns".into(), "exec".into(), namespace.clone()]);
        }
        program.push(binaries.daemon.display().to_string());
        let mut command = Command::new(&program[0]);
        command.args(&program[1..]).args(&args).stdin(Stdio::null()).stdout(log).stderr(log_err);
        clean_env(&mut command);
        command.env("RUST_BACKTRACE", "1");
        for (key, value) in crate::origin::daemon_env(&spec.origin_endpoint) {
            command.env(key, value);
        }
        let command_line = format!("{} {}\n", program.join(" "), args.join(" "));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("command-line"))
            .and_then(|mut file| std::io::Write::write_all(&mut file, command_line.as_bytes()))
            .map_err(io("cannot record its command line"))?;
        let handle = processes.spawn(&format!("node-{index}"), command).map_err(|source| NodeError::Spawn {
            index,
            program: binaries.daemon.clone(),
            source,
        })?;
        let client = Client::new(&socket);
        let mut node = Self {
            spec,
            dir,
            handle,
            client,
            mesh: MeshStatus {
                node_id: String::new(),
                dc: String::new(),
                p2p_listen: Vec::new(),
                data_listen: String::new(),
                members: 0,
                provided_objects: 0,
            },
        };
        node.mesh = node.wait_ready(processes).await?;
        Ok(node)
    }

    async fn wait_ready(&self, processes: &Processes) -> Result<MeshStatus, NodeError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = match self.status().await {
                Ok(StatusResponse { mesh: Some(mesh), .. }) if !mesh.p2p_listen.is_empty() => return Ok(mesh),
                Ok(StatusResponse { mesh: Some(_), .. }) => "no p2p listen address yet".to_string(),
                Ok(StatusResponse { mesh: None, .. }) => "status has no mesh part".to_string(),
                Err(error) => error.to_string(),
            };
            self.check_running(processes)?;
            if Instant::now() >= deadline {
                return Err(NodeError::Timeout {
                    index: self.spec.index,
                    what: "answer GET /v1/status with a mesh listen address".into(),
                    timeout: READY_TIMEOUT,
                    last,
                    log: self.log_path(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Its data dir (`ROOT/node-K/data`): the cache, the index and its identity.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(DATA_DIR_NAME)
    }

    /// An error when the process has exited.
    pub fn check_running(&self, processes: &Processes) -> Result<(), NodeError> {
        match processes.try_wait(self.handle) {
            Ok(Some(status)) => Err(NodeError::Exited {
                index: self.spec.index,
                status,
                log: self.log_path(),
                tail: log_tail(&self.log_path(), LOG_TAIL_LINES),
            }),
            _ => Ok(()),
        }
    }

    /// The trial index.
    pub fn index(&self) -> usize {
        self.spec.index
    }

    /// The process handle.
    pub fn handle(&self) -> ProcessHandle {
        self.handle
    }

    /// The API client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The node's log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("cachemeshd.log")
    }

    /// `HOST:PORT` of its first IPv4 p2p listen address (`/ip4/HOST/tcp/PORT/...`).
    pub fn p2p_address(&self) -> Option<String> {
        self.mesh.p2p_listen.iter().find_map(|multiaddr| multiaddr_host_port(multiaddr))
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<StatusResponse, NodeError> {
        self.client.status().await.map_err(|source| NodeError::Api {
            index: self.spec.index,
            request: "GET /v1/status".into(),
            source,
        })
    }

    async fn get_bytes(&self, path: &str) -> Result<Bytes, NodeError> {
        let request = format!("GET {path}");
        let (status, body) = self
            .client
            .send_bytes(Method::GET, path, Bytes::new())
            .await
            .map_err(|source| NodeError::Api { index: self.spec.index, request: request.clone(), source })?;
        if status != StatusCode::OK {
            return Err(NodeError::Unexpected {
                index: self.spec.index,
                request,
                detail: format!(
                    "status {status}: {}",
                    String::from_utf8_lossy(&body).chars().take(300).collect::<String>()
                ),
            });
        }
        Ok(body)
    }

    /// `GET /v1/peers`.
    pub async fn peers(&self) -> Result<PeersResponse, NodeError> {
        let body = self.get_bytes("/v1/peers").await?;
        serde_json::from_slice(&body).map_err(|error| NodeError::Unexpected {
            index: self.spec.index,
            request: "GET /v1/peers".into(),
            detail: error.to_string(),
        })
    }

    /// `GET /metrics`, as text and parsed.
    pub async fn metrics(&self) -> Result<(String, Metrics), NodeError> {
        let body = self.get_bytes("/metrics").await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        let metrics = Metrics::parse(&text).map_err(|error| NodeError::Unexpected {
            index: self.spec.index,
            request: "GET /metrics".into(),
            detail: error.to_string(),
        })?;
        Ok((text, metrics))
    }
}

/// The last `lines` lines of a log file (or why it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

/// `HOST:PORT` of a `/ip4/HOST/tcp/PORT/...` or `/ip4/HOST/udp/PORT/...` multiaddr.
pub fn multiaddr_host_port(multiaddr: &str) -> Option<String> {
    let parts: Vec<&str> = multiaddr.split('/').collect();
    match parts.as_slice() {
        ["", "ip4", host, "tcp" | "udp", port, ..] if port.parse::<u16>().is_ok() => Some(format!("{host}:{port}")),
        _ => None,
    }
}

/// Removes inherited `CACHEMESH_*` (but `CACHEMESH_LOG`) and `AWS_*` variables.
pub fn clean_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && ((key.starts_with("CACHEMESH_") && key != "CACHEMESH_LOG") || key.starts_with("AWS_"))
        {
            command.env_remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_host_and_port_of_multiaddrs() {
        // Goal: the p2p port comes out of the address forms libp2p prints.
        let id = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
        assert_eq!(
            multiaddr_host_port(&format!("/ip4/127.0.0.1/tcp/4001/p2p/{id}")).as_deref(),
            Some("127.0.0.1:4001")
        );
        assert_eq!(multiaddr_host_port("/ip4/127.0.0.1/udp/9/quic-v1").as_deref(), Some("127.0.0.1:9"));
        assert_eq!(multiaddr_host_port("/ip6/::1/tcp/4001"), None);
        assert_eq!(multiaddr_host_port("/ip4/127.0.0.1/tcp/x"), None);
    }
}
