//! Hand-written HTTP/1.1 exchanges on the API socket, for requests a well-behaved client
//! cannot send (oversized heads, broken-off bodies, early disconnects).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long a raw exchange may take.
pub const RAW_TIMEOUT: Duration = Duration::from_secs(30);

/// A response read off the socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body bytes (as far as the connection delivered them).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header of this (lowercase) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// The body as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Connects to the socket.
pub async fn connect(socket: &Path) -> UnixStream {
    UnixStream::connect(socket).await.unwrap()
}

/// Reads one response head from `stream`; returns it and any body bytes read past it.
pub async fn read_head(stream: &mut UnixStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut buffer = Vec::new();
    let mut piece = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end;
        }
        let read = tokio::time::timeout(RAW_TIMEOUT, stream.read(&mut piece))
            .await
            .expect("no answer within RAW_TIMEOUT")
            .unwrap();
        assert!(read > 0, "connection closed before a full response head; got {:?}", String::from_utf8_lossy(&buffer));
        buffer.extend_from_slice(&piece[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    (status, headers, buffer[head_end + 4..].to_vec())
}

/// Sends `request` (which should say `Connection: close`) and reads the answer: the body up
/// to its `Content-Length`, or to the end of the connection.
pub async fn exchange(socket: &Path, request: &[u8]) -> RawResponse {
    let mut stream = connect(socket).await;
    stream.write_all(request).await.unwrap();
    let (status, headers, mut body) = read_head(&mut stream).await;
    let length: Option<usize> =
        headers.iter().find(|(key, _)| key == "content-length").and_then(|(_, value)| value.parse().ok());
    let mut piece = [0u8; 8192];
    while length.is_none_or(|length| body.len() < length) {
        match tokio::time::timeout(RAW_TIMEOUT, stream.read(&mut piece))
            .await
            .expect("body not finished within RAW_TIMEOUT")
        {
            Ok(0) | Err(_) => break,
            Ok(read) => body.extend_from_slice(&piece[..read]),
        }
    }
    RawResponse { status, headers, body }
}
