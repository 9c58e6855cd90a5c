//! A client of the local API: HTTP/1.1 over the daemon's unix socket.
//!
//! The `cachemesh` command line is built on it, and so are the end-to-end tests. One
//! connection per request keeps it simple and is cheap on a unix socket.
//!
//! Non-goals: retries, connection pooling. A caller that wants them wraps this.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use cachemesh_proto::ObjectId;
use cachemesh_proto::api::{
    ChangeResponse, ErrorBody, ErrorCode, FileEntry, ListFilesResponse, PeersResponse, PrefetchRequest,
    PrefetchResponse, PutFileResponse, PutObjectResponse, RenameRequest, StatusResponse,
};
use cachemesh_proto::limits::API_SOCKET_BUFFER_BYTES;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Most bytes the client's HTTP layer reads at once.
pub const CLIENT_READ_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// What went wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to the daemon at {socket}: {source} (is cachemeshd running?)")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("talking to the daemon failed: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
    /// The daemon answered with an error.
    #[error("{message} ({code})", code = code.as_str())]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Stable code.
        code: ErrorCode,
        /// Message.
        message: String,
    },
    /// The daemon answered something that is not the documented JSON.
    #[error("unexpected answer from the daemon (status {status}): {detail}")]
    Unexpected {
        /// HTTP status.
        status: StatusCode,
        /// What was wrong.
        detail: String,
    },
}

/// A client of one daemon's API socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into() }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the response head with its streaming body.
    pub async fn send<B>(&self, request: Request<B>) -> Result<Response<Incoming>, ClientError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect { socket: self.socket.clone(), source })?;
        let socket = socket2::SockRef::from(&stream);
        let _ = socket.set_send_buffer_size(API_SOCKET_BUFFER_BYTES);
        let _ = socket.set_recv_buffer_size(API_SOCKET_BUFFER_BYTES);
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            // Read bodies in large pieces: the default adaptive buffer starts at 8 KiB.
            .max_buf_size(CLIENT_READ_BUFFER_BYTES)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            // The connection ends when the response body is dropped; its error, if any, has
            // already reached the caller through the response.
            let _ = connection.await;
        });
        Ok(sender.send_request(request).await?)
    }

    /// Sends a request with a small in-memory body and collects the whole answer.
    pub async fn send_bytes(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let request = Request::builder().method(method).uri(path).header("host", "cachemesh").body(Full::new(body))?;
        let response = self.send(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        let (status, body) = self.send_bytes(Method::GET, "/v1/status", Bytes::new()).await?;
        parse_json(status, &body)
    }

    /// `GET /v1/peers`.
    pub async fn peers(&self) -> Result<PeersResponse, ClientError> {
        let (status, body) = self.send_bytes(Method::GET, "/v1/peers", Bytes::new()).await?;
        parse_json(status, &body)
    }

    /// `PUT /v1/objects` with a streaming body.
    pub async fn put_object<B>(&self, body: B) -> Result<PutObjectResponse, ClientError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let request =
            Request::builder().method(Method::PUT).uri("/v1/objects").header("host", "cachemesh").body(body)?;
        let response = self.send(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        parse_json(status, &body)
    }

    /// `GET /v1/objects/{id}`, optionally with a `Range` header value; the body streams.
    pub async fn get_object(&self, id: &ObjectId, range: Option<&str>) -> Result<Response<Incoming>, ClientError> {
        self.get_streaming(format!("/v1/objects/{id}"), range).await
    }

    /// A `GET` of `uri` with an optional `Range` header value; a success streams its body,
    /// anything else becomes the API error it carries.
    async fn get_streaming(&self, uri: String, range: Option<&str>) -> Result<Response<Incoming>, ClientError> {
        let mut request = Request::builder().method(Method::GET).uri(uri).header("host", "cachemesh");
        if let Some(range) = range {
            request = request.header(http::header::RANGE, range);
        }
        let response = self.send(request.body(Full::new(Bytes::new()))?).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Err(api_error(status, &body))
    }
}

/// Percent-encodes `text` for a URL: every byte but ASCII letters, digits, `-._~` (and
/// `/` when `keep_slash`) becomes `%XX`, so any volume path survives the trip intact.
pub fn percent_encode(text: &str, keep_slash: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) || (keep_slash && byte == b'/') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
    out
}

fn file_uri(volume: &str, route: &str, path: &str) -> String {
    format!("/v1/volumes/{}/{route}/{}", percent_encode(volume, false), percent_encode(path, true))
}

impl Client {
    async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        uri: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        let (status, body) = self.send_bytes(method, uri, body).await?;
        parse_json(status, &body)
    }

    /// `PUT /v1/volumes/{volume}/files/{path}` with a streaming body.
    pub async fn put_file<B>(&self, volume: &str, path: &str, body: B) -> Result<PutFileResponse, ClientError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let request = Request::builder()
            .method(Method::PUT)
            .uri(file_uri(volume, "files", path))
            .header("host", "cachemesh")
            .body(body)?;
        let response = self.send(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        parse_json(status, &body)
    }

    /// `GET /v1/volumes/{volume}/files/{path}`, optionally with a `Range` header value; the
    /// body streams.
    pub async fn get_file(
        &self,
        volume: &str,
        path: &str,
        range: Option<&str>,
    ) -> Result<Response<Incoming>, ClientError> {
        self.get_streaming(file_uri(volume, "files", path), range).await
    }

    /// `GET /v1/volumes/{volume}/stat/{path}`.
    pub async fn stat_file(&self, volume: &str, path: &str) -> Result<FileEntry, ClientError> {
        self.send_json(Method::GET, &file_uri(volume, "stat", path), Bytes::new()).await
    }

    /// `DELETE /v1/volumes/{volume}/files/{path}`.
    pub async fn delete_file(&self, volume: &str, path: &str) -> Result<ChangeResponse, ClientError> {
        self.send_json(Method::DELETE, &file_uri(volume, "files", path), Bytes::new()).await
    }

    /// `POST /v1/volumes/{volume}/rename`.
    pub async fn rename_file(&self, volume: &str, from: &str, to: &str) -> Result<ChangeResponse, ClientError> {
        let body = serde_json::to_vec(&RenameRequest { from: from.to_string(), to: to.to_string() })
            .map_err(|error| ClientError::Unexpected { status: StatusCode::OK, detail: error.to_string() })?;
        let uri = format!("/v1/volumes/{}/rename", percent_encode(volume, false));
        self.send_json(Method::POST, &uri, Bytes::from(body)).await
    }

    /// One page of `GET /v1/volumes/{volume}/files?prefix=..&after=..`.
    pub async fn list_files(
        &self,
        volume: &str,
        prefix: &str,
        after: Option<&str>,
    ) -> Result<ListFilesResponse, ClientError> {
        let mut uri =
            format!("/v1/volumes/{}/files?prefix={}", percent_encode(volume, false), percent_encode(prefix, false));
        if let Some(after) = after {
            uri.push_str(&format!("&after={}", percent_encode(after, false)));
        }
        self.send_json(Method::GET, &uri, Bytes::new()).await
    }

    /// Every file under `prefix`, following pages.
    pub async fn list_all_files(&self, volume: &str, prefix: &str) -> Result<Vec<FileEntry>, ClientError> {
        let mut entries = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.list_files(volume, prefix, after.as_deref()).await?;
            entries.extend(page.entries);
            match page.next_after {
                Some(next) => after = Some(next),
                None => return Ok(entries),
            }
        }
    }

    /// `POST /v1/volumes/{volume}/prefetch`: answers once every chunk is in the local cache.
    pub async fn prefetch(&self, volume: &str, paths: Vec<String>) -> Result<PrefetchResponse, ClientError> {
        let body = serde_json::to_vec(&PrefetchRequest { paths })
            .map_err(|error| ClientError::Unexpected { status: StatusCode::OK, detail: error.to_string() })?;
        let uri = format!("/v1/volumes/{}/prefetch", percent_encode(volume, false));
        self.send_json(Method::POST, &uri, Bytes::from(body)).await
    }
}

/// Turns an error answer into [`ClientError::Api`] (or `Unexpected` when it is not JSON).
pub fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => ClientError::Api { status, code: error.error.code, message: error.error.message },
        Err(_) => ClientError::Unexpected { status, detail: String::from_utf8_lossy(body).chars().take(200).collect() },
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(status: StatusCode, body: &[u8]) -> Result<T, ClientError> {
    if !status.is_success() {
        return Err(api_error(status, body));
    }
    serde_json::from_slice(body).map_err(|error| ClientError::Unexpected { status, detail: error.to_string() })
}
