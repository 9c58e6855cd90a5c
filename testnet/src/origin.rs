//! The trial's origin: a real S3-compatible server (moto) on a free loopback port, with a
//! bucket made by boto3, and a counting proxy per node in front of it.
//!
//! moto always runs in the root namespace on 127.0.0.1; the proxies listen where the nodes
//! reach the origin (127.0.0.1, or the origin's end of its own shaped link when the network
//! is emulated), so that the origin's bandwidth is that link's.
//!
//! moto is the server boto3 is tested against; creating the bucket with boto3 keeps our
//! own S3 code out of the setup. Nodes never talk to moto directly: each gets its own
//! [`Proxy`] endpoint, so origin egress is counted at the origin, per node.
//!
//! Non-goals: persistence (moto keeps everything in memory), restarts.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::processes::{ProcessHandle, Processes};
use crate::proxy::Proxy;

/// How long moto may take to start answering and create the bucket.
pub const MOTO_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often moto's readiness is tried.
const MOTO_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long one boto3 helper may run.
const BOTO3_TIMEOUT: Duration = Duration::from_secs(30);

/// The bucket every trial uses.
pub const BUCKET: &str = "cachemesh-testnet";
/// The key prefix inside the bucket (the daemons' origin is `s3://BUCKET/PREFIX`).
pub const PREFIX: &str = "testnet";

const INSTALL_HINT: &str = "the testnet's origin is moto: pip install 'moto[s3]' flask flask-cors boto3";

/// Why the origin could not be started.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// python3, moto or boto3 is missing.
    #[error("{INSTALL_HINT} ({detail})")]
    NotInstalled {
        /// What python said.
        detail: String,
    },
    /// A local resource (port, file, process) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// moto did not become ready in time.
    #[error(
        "moto did not answer and create bucket {BUCKET} within {MOTO_READY_TIMEOUT:?}; last error: {last}; log: {log}"
    )]
    NotReady {
        /// The last boto3 error.
        last: String,
        /// moto's log file.
        log: PathBuf,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OriginError {
    let what = what.into();
    move |source| OriginError::Io { what, source }
}

/// A running moto server with the trial's bucket.
#[derive(Debug)]
pub struct Moto {
    address: SocketAddr,
    handle: ProcessHandle,
    log: PathBuf,
}

impl Moto {
    /// Starts moto on a free port with its log in `dir`, and creates the bucket.
    pub async fn start(processes: &Processes, dir: &Path) -> Result<Self, OriginError> {
        let probe = Command::new("python3")
            .args(["-c", "import moto.server, boto3, flask, flask_cors"])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|error| OriginError::NotInstalled { detail: format!("cannot run python3: {error}") })?;
        if !probe.status.success() {
            return Err(OriginError::NotInstalled {
                detail: String::from_utf8_lossy(&probe.stderr).trim().to_string(),
            });
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(io_error("cannot find a free port for moto"))?
            .port();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.join("moto.log");
        let file = std::fs::File::create(&log).map_err(io_error(format!("cannot create {}", log.display())))?;
        let stderr = file.try_clone().map_err(io_error("cannot duplicate the moto log"))?;
        let mut command = Command::new("python3");
        command
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr);
        let handle = processes.spawn("moto", command).map_err(io_error("cannot start python3 -m moto.server"))?;
        let moto = Self { address, handle, log };
        moto.create_bucket(processes).await?;
        Ok(moto)
    }

    async fn create_bucket(&self, processes: &Processes) -> Result<(), OriginError> {
        let deadline = Instant::now() + MOTO_READY_TIMEOUT;
        let script = format!("c.create_bucket(Bucket={BUCKET:?})");
        loop {
            let last = match self.boto3(&script).await {
                Ok(_) => return Ok(()),
                Err(error) => error,
            };
            if let Ok(Some(status)) = processes.try_wait(self.handle) {
                return Err(OriginError::NotReady {
                    last: format!("moto exited ({status}); {last}"),
                    log: self.log.clone(),
                });
            }
            if Instant::now() >= deadline {
                return Err(OriginError::NotReady { last, log: self.log.clone() });
            }
            tokio::time::sleep(MOTO_POLL_INTERVAL).await;
        }
    }

    /// Runs python with `c` bound to a boto3 S3 client of moto; returns stdout or stderr.
    pub async fn boto3(&self, script: &str) -> Result<Vec<u8>, String> {
        let program = format!(
            "import sys, boto3\nc = boto3.client('s3', endpoint_url='http://{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n{script}\n",
            self.address
        );
        let mut command = Command::new("python3");
        command.args(["-c", &program]).stdin(Stdio::null()).kill_on_drop(true);
        match tokio::time::timeout(BOTO3_TIMEOUT, command.output()).await {
            Err(_) => Err(format!("boto3 did not finish within {BOTO3_TIMEOUT:?}")),
            Ok(Err(error)) => Err(format!("cannot run python3: {error}")),
            Ok(Ok(output)) if output.status.success() => Ok(output.stdout),
            Ok(Ok(output)) => Err(String::from_utf8_lossy(&output.stderr).trim().to_string()),
        }
    }

    /// Starts a counting proxy in front of moto, listening on `bind` (the origin's address
    /// as the nodes see it: loopback, or the origin's end of its emulated link).
    pub async fn proxy(&self, bind: Ipv4Addr, shutdown: CancellationToken) -> Result<Proxy, OriginError> {
        Proxy::start(self.address, bind, shutdown)
            .await
            .map_err(io_error(format!("cannot bind a proxy port on {bind}")))
    }

    /// The daemons' origin URL.
    pub fn origin_url() -> String {
        format!("s3://{BUCKET}/{PREFIX}")
    }
}

/// Environment for a daemon to reach the origin through `endpoint`.
pub fn daemon_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value.to_string()))
    .collect()
}
