//! One real `cachemeshd` process in temporary directories, for a test to drive and break.
//!
//! The daemon is spawned from the built binary with its output captured to files in its
//! temporary root; when a test panics, dropping the [`Daemon`] prints the tails of those
//! files. Readiness is `GET /v1/status` answering, polled with a deadline.
//!
//! Inherited `CACHEMESH_*` and `AWS_*` variables are removed so that the machine's
//! environment cannot change what a test runs; a test passes the ones it means.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use cachemesh_proto::api::StatusResponse;
use http::{Method, StatusCode};
use tempfile::TempDir;

use crate::metrics::Metrics;
use crate::support::{binary, poll_until, tail};
use cachemesh_daemon::client::Client;

/// How long a daemon may take to answer its first status request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a one-shot command (`cachemesh ...`, `cachemeshd check`) may run.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the daemon's origin is.
#[derive(Debug, Clone)]
pub enum OriginSpec {
    /// A fresh directory in the daemon's temporary root (`file:///...`).
    TempDir,
    /// This URL (for S3, or another daemon's origin directory).
    Url(String),
}

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The origin.
    pub origin: OriginSpec,
    /// `--cache-size`, when passed.
    pub cache_size: Option<String>,
    /// Pass `--data-dir`, `--api-socket` and `--origin` as flags (a config test turns this
    /// off and names them in a config file instead).
    pub path_flags: bool,
    /// More arguments, after the others.
    pub args: Vec<String>,
    /// Environment variables to set.
    pub env: Vec<(String, String)>,
    /// Where the daemon's root directory (data dir, socket, file origin) is made; the
    /// system's temporary directory when `None`.
    pub root_parent: Option<PathBuf>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            origin: OriginSpec::TempDir,
            cache_size: Some("1GiB".into()),
            path_flags: true,
            args: Vec::new(),
            env: Vec::new(),
            root_parent: None,
        }
    }
}

impl DaemonOptions {
    /// Options with the daemon's root directory made under `parent`.
    pub fn in_dir(mut self, parent: &Path) -> Self {
        self.root_parent = Some(parent.to_path_buf());
        self
    }

    /// Options with this cache size.
    pub fn with_cache_size(mut self, size: &str) -> Self {
        self.cache_size = Some(size.into());
        self
    }

    /// Options with these extra arguments.
    pub fn with_args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|arg| arg.to_string()));
        self
    }

    /// Options with these environment variables.
    pub fn with_env(mut self, env: &[(String, String)]) -> Self {
        self.env.extend(env.iter().cloned());
        self
    }

    /// Options with this origin URL.
    pub fn with_origin_url(mut self, url: impl Into<String>) -> Self {
        self.origin = OriginSpec::Url(url.into());
        self
    }
}

/// A running (or stopped) `cachemeshd` and its directories.
#[derive(Debug)]
pub struct Daemon {
    root: TempDir,
    data_dir: PathBuf,
    origin_dir: Option<PathBuf>,
    origin_url: String,
    socket: PathBuf,
    options: DaemonOptions,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon with default options (file origin, 1 GiB cache).
    pub async fn start() -> Self {
        Self::start_with(DaemonOptions::default()).await
    }

    /// Starts a daemon and waits until it answers.
    pub async fn start_with(options: DaemonOptions) -> Self {
        let mut daemon = Self::new(options);
        daemon.start_again().await;
        daemon
    }

    /// Prepares directories without starting (for tests that write a config file first).
    pub fn new(options: DaemonOptions) -> Self {
        let mut builder = tempfile::Builder::new();
        builder.prefix("cachemesh-test-");
        let root = match &options.root_parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .unwrap();
        let data_dir = root.path().join("data");
        let socket = root.path().join("api.sock");
        let (origin_dir, origin_url) = match &options.origin {
            OriginSpec::TempDir => {
                let dir = root.path().join("origin");
                std::fs::create_dir_all(&dir).unwrap();
                let url = format!("file://{}", dir.display());
                (Some(dir), url)
            }
            OriginSpec::Url(url) => {
                let dir = url.strip_prefix("file://").map(PathBuf::from);
                (dir, url.clone())
            }
        };
        Self { root, data_dir, origin_dir, origin_url, socket, options, child: None }
    }

    /// The options, to change before the next start.
    pub fn options_mut(&mut self) -> &mut DaemonOptions {
        &mut self.options
    }

    /// The temporary root (logs, socket, and whatever a test wants to keep there).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The origin directory (file origins only).
    pub fn origin_dir(&self) -> &Path {
        self.origin_dir.as_deref().expect("this daemon's origin is not a directory")
    }

    /// The origin URL.
    pub fn origin_url(&self) -> &str {
        &self.origin_url
    }

    /// The API socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A client of the API socket.
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn stdout_path(&self) -> PathBuf {
        self.root.path().join("cachemeshd.stdout")
    }

    fn stderr_path(&self) -> PathBuf {
        self.root.path().join("cachemeshd.stderr")
    }

    /// The command line this daemon runs with (without the program).
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.options.path_flags {
            args.extend(["--data-dir".into(), self.data_dir.display().to_string()]);
            args.extend(["--api-socket".into(), self.socket.display().to_string()]);
            args.extend(["--origin".into(), self.origin_url.clone()]);
        }
        if let Some(size) = &self.options.cache_size {
            args.extend(["--cache-size".into(), size.clone()]);
        }
        args.extend(self.options.args.iter().cloned());
        args
    }

    /// Starts the process again (same directories and options) and waits until it answers.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the daemon is already running");
        let log = |path: PathBuf| OpenOptions::new().create(true).append(true).open(path).unwrap();
        let mut command = Command::new(binary("cachemeshd"));
        command.args(self.args()).stdin(Stdio::null()).stdout(log(self.stdout_path())).stderr(log(self.stderr_path()));
        clean_env(&mut command);
        command.env("RUST_BACKTRACE", "1");
        for (key, value) in &self.options.env {
            command.env(key, value);
        }
        eprintln!("starting cachemeshd {}", self.args().join(" "));
        self.child = Some(command.spawn().unwrap());
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let client = self.client();
        let child = self.child.as_mut().unwrap();
        poll_until("cachemeshd to answer GET /v1/status", READY_TIMEOUT, || {
            let exited = child.try_wait().unwrap();
            let client = client.clone();
            async move {
                if let Some(status) = exited {
                    panic!("cachemeshd exited before it was ready: {status}");
                }
                client.status().await.ok()
            }
        })
        .await;
    }

    /// Whether the process is still running (reaps it when it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then wait (at most [`STOP_TIMEOUT`]) for the process to exit.
    pub async fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the daemon is not running");
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM failed");
        poll_until("cachemeshd to exit after SIGTERM", STOP_TIMEOUT, || {
            let exited = child.try_wait().unwrap();
            async move { exited }
        })
        .await
    }

    /// Stops the daemon gracefully and starts it again on the same directories.
    pub async fn restart(&mut self) -> ExitStatus {
        let status = self.stop().await;
        self.start_again().await;
        status
    }

    /// `GET /v1/status` (panics on error).
    pub async fn status(&self) -> StatusResponse {
        self.client().status().await.unwrap()
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> Metrics {
        let (status, body) = self.client().send_bytes(Method::GET, "/metrics", Bytes::new()).await.unwrap();
        assert_eq!(status, StatusCode::OK, "GET /metrics: {}", String::from_utf8_lossy(&body));
        Metrics::parse(std::str::from_utf8(&body).unwrap())
    }

    /// Runs the `cachemesh` CLI against this daemon's socket (`--socket` first).
    pub async fn cli(&self, args: &[&str]) -> Output {
        let mut full = vec!["--socket".to_string(), self.socket.display().to_string()];
        full.extend(args.iter().map(|arg| arg.to_string()));
        run_cli(&full, None, &[]).await
    }

    /// `cachemeshd check --data-dir DATA --json` (the daemon must be stopped).
    pub async fn check(&self) -> Output {
        let mut command = tokio::process::Command::new(binary("cachemeshd"));
        command.args(["check", "--data-dir", &self.data_dir.display().to_string(), "--json"]).kill_on_drop(true);
        clean_env_tokio(&mut command);
        tokio::time::timeout(CHILD_TIMEOUT, command.output())
            .await
            .unwrap_or_else(|_| panic!("cachemeshd check did not finish within {CHILD_TIMEOUT:?}"))
            .unwrap()
    }

    /// The tails of the daemon's stdout and stderr.
    pub fn log_tails(&self) -> String {
        format!(
            "--- cachemeshd stderr (tail) ---\n{}\n--- cachemeshd stdout (tail) ---\n{}\n---",
            tail(&self.stderr_path(), 80),
            tail(&self.stdout_path(), 40)
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let keep = std::env::var_os("CACHEMESH_TEST_KEEP").is_some();
        if keep {
            self.root.disable_cleanup(true);
        }
        if std::thread::panicking() {
            let kept = if keep { "kept" } else { "removed; set CACHEMESH_TEST_KEEP=1 to keep it" };
            eprintln!("daemon root {} ({kept})\n{}", self.root.path().display(), self.log_tails());
        }
    }
}

fn is_foreign_var(key: &str) -> bool {
    key.starts_with("CACHEMESH_") || key.starts_with("AWS_")
}

/// Removes inherited `CACHEMESH_*` and `AWS_*` variables.
pub fn clean_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(is_foreign_var) {
            command.env_remove(key);
        }
    }
}

/// Removes inherited `CACHEMESH_*` and `AWS_*` variables.
pub fn clean_env_tokio(command: &mut tokio::process::Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(is_foreign_var) {
            command.env_remove(key);
        }
    }
}

/// Runs `cachemesh ARGS` with optional stdin bytes and extra environment.
pub async fn run_cli(args: &[String], stdin: Option<&Path>, env: &[(String, String)]) -> Output {
    let mut command = tokio::process::Command::new(binary("cachemesh"));
    command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    clean_env_tokio(&mut command);
    for (key, value) in env {
        command.env(key, value);
    }
    match stdin {
        Some(path) => command.stdin(std::fs::File::open(path).unwrap()),
        None => command.stdin(Stdio::null()),
    };
    command.kill_on_drop(true);
    tokio::time::timeout(CHILD_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("cachemesh {args:?} did not finish within {CHILD_TIMEOUT:?}"))
        .unwrap()
}

/// Runs `cachemeshd ARGS` to completion (for `--help` and `check`).
pub async fn run_daemon_binary(args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(binary("cachemeshd"));
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    clean_env_tokio(&mut command);
    tokio::time::timeout(CHILD_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("cachemeshd {args:?} did not finish within {CHILD_TIMEOUT:?}"))
        .unwrap()
}
