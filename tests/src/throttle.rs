//! A TCP proxy in front of a server (moto, say) whose answers a test can slow to a trickle
//! or stop, to play an origin on a thin or broken link. Requests pass unchanged.
//!
//! Dropping the proxy closes every connection through it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// How the server's answers are passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// As they come.
    Free,
    /// `bytes` at a time, one such piece per `every`.
    Trickle {
        /// Bytes per piece.
        bytes: usize,
        /// Pause after each piece.
        every: Duration,
    },
    /// Held back (connections stay open) until the pace changes.
    Stopped,
    /// Each connection passes its first `bytes` of answers as they come, then is held back
    /// like [`Pace::Stopped`]: a connection that stops for good while new ones are served
    /// (a TCP flow backing off on a busy link).
    StopEachAfter {
        /// Answer bytes each connection passes.
        bytes: usize,
    },
}

/// Bytes read from the server at once.
const READ_BYTES: usize = 64 * 1024;
/// How often a stopped connection looks whether it may go on.
const STOPPED_POLL: Duration = Duration::from_millis(50);

/// The proxy; see the module docs.
#[derive(Debug)]
pub struct ThrottleProxy {
    addr: SocketAddr,
    pace: Arc<Mutex<Pace>>,
    accept: JoinHandle<()>,
}

impl ThrottleProxy {
    /// Listens on a free loopback port and forwards to `upstream`, at [`Pace::Free`].
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pace = Arc::new(Mutex::new(Pace::Free));
        let accept = tokio::spawn({
            let pace = pace.clone();
            async move {
                // Dropped (and its connections aborted) when the proxy aborts this task.
                let mut connections = JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    connections.spawn(forward(client, upstream, pace.clone()));
                }
            }
        });
        Self { addr, pace, accept }
    }

    /// `http://` and the proxy's address, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the pace of every answer from now on.
    pub fn set(&self, pace: Pace) {
        *self.pace.lock().unwrap_or_else(PoisonError::into_inner) = pace;
    }
}

impl Drop for ThrottleProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, pace: Arc<Mutex<Pace>>) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    let answers = async {
        let mut buffer = vec![0u8; READ_BYTES];
        let mut passed = 0usize;
        loop {
            let read = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            let mut at = 0;
            while at < read {
                let current = *pace.lock().unwrap_or_else(PoisonError::into_inner);
                match current {
                    Pace::Free => {
                        if client_write.write_all(&buffer[at..read]).await.is_err() {
                            return;
                        }
                        at = read;
                    }
                    Pace::Trickle { bytes, every } => {
                        let end = read.min(at + bytes.max(1));
                        if client_write.write_all(&buffer[at..end]).await.is_err() {
                            return;
                        }
                        at = end;
                        tokio::time::sleep(every).await;
                    }
                    Pace::StopEachAfter { bytes } if passed < bytes => {
                        let end = read.min(at + (bytes - passed));
                        if client_write.write_all(&buffer[at..end]).await.is_err() {
                            return;
                        }
                        passed += end - at;
                        at = end;
                    }
                    Pace::Stopped | Pace::StopEachAfter { .. } => tokio::time::sleep(STOPPED_POLL).await,
                }
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(requests, answers);
}
