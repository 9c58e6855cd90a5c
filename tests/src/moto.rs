//! A real S3 server for origin tests: moto's standalone server on a loopback port.
//!
//! moto keeps everything in memory, so [`Moto::restart`] loses every object; it recreates
//! the bucket so the origin is reachable again (and empty). Buckets are created and
//! inspected with boto3, the client moto is tested against, not with our own code.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::support::{poll_until, tail};

/// How long moto may take to start answering.
pub const MOTO_READY_TIMEOUT: Duration = Duration::from_secs(60);

const INSTALL_HINT: &str = "moto is needed for the S3 tests: pip install 'moto[s3]' flask flask-cors";

/// A running moto server with one bucket.
#[derive(Debug)]
pub struct Moto {
    root: TempDir,
    port: u16,
    bucket: String,
    child: Option<Child>,
}

impl Moto {
    /// Starts moto on a free port and creates `bucket`. Fails (does not skip) when moto or
    /// boto3 is not installed.
    pub async fn start(bucket: &str) -> Self {
        let probe = Command::new("python3").args(["-c", "import moto.server, boto3, flask, flask_cors"]).output();
        match probe {
            Ok(output) if output.status.success() => {}
            Ok(output) => panic!("{INSTALL_HINT}\n(python3 says: {})", String::from_utf8_lossy(&output.stderr).trim()),
            Err(error) => panic!("{INSTALL_HINT}\n(python3 cannot run: {error})"),
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let root = tempfile::Builder::new().prefix("cachemesh-moto-").tempdir().unwrap();
        let mut moto = Self { root, port, bucket: bucket.to_string(), child: None };
        moto.start_again().await;
        moto
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The origin URL for a daemon: `s3://BUCKET/PREFIX`.
    pub fn origin_url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Environment for a daemon (or boto3) to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("moto.log")
    }

    async fn start_again(&mut self) {
        assert!(self.child.is_none(), "moto is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("{INSTALL_HINT}\n(cannot start python3: {error})"));
        self.child = Some(child);
        let script = format!("c.create_bucket(Bucket={:?})", self.bucket);
        let this = &*self;
        poll_until("moto to answer and create the bucket", MOTO_READY_TIMEOUT, || {
            let script = script.clone();
            async move { this.boto3(&script).await.ok() }
        })
        .await;
    }

    /// Runs python with `c` bound to a boto3 S3 client of this server; returns stdout.
    pub async fn boto3(&self, script: &str) -> Result<Vec<u8>, String> {
        let program = format!(
            "import sys, boto3\nc = boto3.client('s3', endpoint_url={:?}, aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n{script}\n",
            self.endpoint()
        );
        let output =
            tokio::process::Command::new("python3").args(["-c", &program]).kill_on_drop(true).output().await.unwrap();
        if output.status.success() {
            Ok(output.stdout)
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Keys in the bucket under `prefix`.
    pub async fn list_keys(&self, prefix: &str) -> Vec<String> {
        let script = format!(
            "p = c.get_paginator('list_objects_v2')\nfor page in p.paginate(Bucket={:?}, Prefix={prefix:?}):\n    for o in page.get('Contents', []):\n        print(o['Key'])",
            self.bucket
        );
        let stdout = self.boto3(&script).await.unwrap_or_else(|error| panic!("listing the bucket failed: {error}"));
        String::from_utf8(stdout).unwrap().lines().map(str::to_string).collect()
    }

    /// The bytes of one object.
    pub async fn get(&self, key: &str) -> Vec<u8> {
        let script =
            format!("sys.stdout.buffer.write(c.get_object(Bucket={:?}, Key={key:?})['Body'].read())", self.bucket);
        self.boto3(&script).await.unwrap_or_else(|error| panic!("reading {key} failed: {error}"))
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// Starts moto again on the same port (empty: moto is in-memory) and recreates the bucket.
    pub async fn restart(&mut self) {
        self.kill();
        self.start_again().await;
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- moto log (tail) ---\n{}\n---", tail(&self.log_path(), 40));
        }
    }
}
