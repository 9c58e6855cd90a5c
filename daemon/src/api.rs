//! The local API: HTTP/1.1 over a unix socket, for runtimes and the `cachemesh` CLI.
//!
//! Every route is listed in `docs/api.md`. Every error answer is a 4xx/5xx status with the
//! JSON body `{"error": {"code", "message"}}` whose codes are `cachemesh_proto::api::ErrorCode`.
//!
//! Invariants:
//! - Nothing a client sends can crash the daemon: ids, ranges and paths are parsed into
//!   typed errors; request heads are capped at `API_HEADER_BYTES_MAX`; object bodies stream
//!   through bounded windows; a client that disconnects only drops its own streams.
//! - The socket is created mode 0600 inside a directory we create mode 0700.
//! - The server takes its listener as an argument, so tests and callers choose the path.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use cachemesh_proto::ObjectId;
use cachemesh_proto::api::{ErrorBody, ErrorCode, StatusResponse};
use cachemesh_proto::limits::{API_HEADER_BYTES_MAX, API_READ_BUFFER_BYTES, API_SOCKET_BUFFER_BYTES};
use cachemesh_proto::range::{ByteRangeSpec, RangeError};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fetch::FetchError;
use crate::objects::{Objects, OpenError, PinError, PutError};
use crate::origin::OriginError;
use crate::store::StoreError;
use crate::volume::Volumes;

mod volumes;

/// Most bytes of a failed put's body read and discarded before answering.
pub const PUT_ERROR_DRAIN_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Longest time spent discarding a failed put's body before answering.
pub const PUT_ERROR_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    content_range_length: Option<u64>,
}

impl ApiError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), content_range_length: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(code = self.code.as_str(), message = %self.message, "request failed");
        }
        metrics::counter!("cachemesh_api_errors_total", "code" => self.code.as_str()).increment(1);
        let body = serde_json::to_vec(&ErrorBody::new(self.code, self.message)).unwrap_or_default();
        let mut response =
            (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response();
        if let Some(length) = self.content_range_length
            && let Ok(value) = HeaderValue::from_str(&format!("bytes */{length}"))
        {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
        response
    }
}

fn origin_error(error: &OriginError) -> ApiError {
    match error {
        OriginError::Corrupt { .. } | OriginError::TooLarge { .. } => {
            ApiError::new(ErrorCode::OriginCorrupt, error.to_string())
        }
        _ => ApiError::new(ErrorCode::OriginUnavailable, error.to_string()),
    }
}

fn store_error(error: &StoreError) -> ApiError {
    match error {
        StoreError::NoRoom { .. } => ApiError::new(ErrorCode::InsufficientStorage, error.to_string()),
        _ => ApiError::new(ErrorCode::Internal, error.to_string()),
    }
}

impl From<OpenError> for ApiError {
    fn from(error: OpenError) -> Self {
        match &error {
            OpenError::NotFound(_) => Self::new(ErrorCode::ObjectNotFound, error.to_string()),
            OpenError::Origin(origin) => origin_error(origin),
            OpenError::Store(store) => store_error(store),
        }
    }
}

impl From<FetchError> for ApiError {
    fn from(error: FetchError) -> Self {
        match &error {
            FetchError::Origin(origin) => origin_error(origin),
            FetchError::Store(store) => store_error(store),
            // The manifest exists but a chunk is gone from every tier: the origin lost data.
            FetchError::NotFound(_) => Self::new(ErrorCode::OriginUnavailable, error.to_string()),
            FetchError::Interrupted(_) => Self::new(ErrorCode::Internal, error.to_string()),
        }
    }
}

impl From<PutError> for ApiError {
    fn from(error: PutError) -> Self {
        match &error {
            PutError::BodyIncomplete { .. } => Self::new(ErrorCode::BodyIncomplete, error.to_string()),
            PutError::TooLarge => Self::new(ErrorCode::BodyTooLarge, error.to_string()),
            PutError::Origin(origin) => origin_error(origin),
            PutError::Task(_) => Self::new(ErrorCode::Internal, error.to_string()),
        }
    }
}

impl From<PinError> for ApiError {
    fn from(error: PinError) -> Self {
        match error {
            PinError::Open(open) => open.into(),
            PinError::Fetch(fetch) => fetch.into(),
            PinError::Store(store) => store_error(&store),
            PinError::NoRoom(_) => Self::new(ErrorCode::InsufficientStorage, error.to_string()),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Objects over the store and origin.
    pub objects: Objects,
    /// The volumes (path tables over objects).
    pub volumes: Volumes,
    /// When the daemon started.
    pub started: Instant,
    /// The metrics registry.
    pub metrics: PrometheusHandle,
    /// Cancelled when the daemon is shutting down.
    pub shutdown: CancellationToken,
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/objects", put(put_object))
        .route("/v1/objects/{id}", get(get_object))
        .route("/v1/objects/{id}/pin", put(pin_object).delete(unpin_object))
        .route("/v1/pins", get(list_pins))
        .route("/v1/peers", get(list_peers))
        .route("/metrics", get(render_metrics))
        .merge(volumes::routes())
        .fallback(|| async { ApiError::new(ErrorCode::RouteNotFound, "no such route; see docs/api.md") })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(ErrorCode::MethodNotAllowed, format!("method {method} is not allowed on this route"))
        })
        .layer(axum::middleware::from_fn(check_head_size))
        .with_state(state)
}

/// Refuses requests whose head exceeds `API_HEADER_BYTES_MAX`, with a JSON error.
async fn check_head_size(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let uri = request.uri().to_string().len();
    // "METHOD URI HTTP/1.1\r\n" and "name: value\r\n" per header.
    let head = request.method().as_str().len()
        + uri
        + 11
        + request.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>();
    if head > API_HEADER_BYTES_MAX {
        return ApiError::new(
            ErrorCode::HeadersTooLarge,
            format!("the request head has {head} bytes, more than API_HEADER_BYTES_MAX ({API_HEADER_BYTES_MAX})"),
        )
        .into_response();
    }
    next.run(request).await
}

fn parse_object_id(text: &str) -> Result<ObjectId, ApiError> {
    text.parse().map_err(|error| ApiError::new(ErrorCode::BadObjectId, format!("bad object id: {error}")))
}

async fn status(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let store = state.objects.fetcher().store().status().await.map_err(|error| store_error(&error))?;
    let body = StatusResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: state.started.elapsed().as_secs(),
        origin: state.objects.fetcher().origin().description().to_string(),
        store,
        mesh: match state.objects.fetcher().mesh() {
            Some(mesh) => Some(mesh.status().await),
            None => None,
        },
    };
    Ok(axum::Json(body).into_response())
}

async fn render_metrics(State(state): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn put_object(State(state): State<ApiState>, body: Body) -> Result<Response, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::new(ErrorCode::ShuttingDown, "the daemon is shutting down"));
    }
    let mut body = body.into_data_stream();
    match state.objects.put(&mut body).await {
        Ok(answer) => Ok((StatusCode::CREATED, axum::Json(answer)).into_response()),
        Err(error) => {
            if !matches!(error, PutError::BodyIncomplete { .. }) {
                drain_briefly(&mut body).await;
            }
            Err(error.into())
        }
    }
}

/// Reads and discards what is left of a failed put's body, within bounds, so that a client
/// still writing sees our error answer instead of a broken pipe. Past the bounds the
/// connection is closed and the client sees that.
async fn drain_briefly(body: &mut axum::body::BodyDataStream) {
    let mut drained = 0u64;
    let drain = async {
        while let Some(Ok(frame)) = body.next().await {
            drained += frame.len() as u64;
            if drained > PUT_ERROR_DRAIN_BYTES_MAX {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(PUT_ERROR_DRAIN_TIMEOUT, drain).await;
}

async fn get_object(
    State(state): State<ApiState>,
    method: Method,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_object_id(&id)?;
    object_response(&state, &method, id, &headers).await
}

/// The answer to a GET or HEAD of object `id` (with its `Range`, if any), streaming. Shared
/// by the object and volume file routes.
async fn object_response(
    state: &ApiState,
    method: &Method,
    id: ObjectId,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let manifest = Arc::new(state.objects.open(&id).await?);
    let length = manifest.length();
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(value) => {
            let value = value.to_str().map_err(|_| ApiError::new(ErrorCode::BadRange, "Range header is not ASCII"))?;
            let resolved = ByteRangeSpec::parse(value).and_then(|spec| spec.resolve(length));
            match resolved {
                Ok(range) => Some(range),
                Err(RangeError::Unsatisfiable { .. }) => {
                    let mut error = ApiError::new(
                        ErrorCode::RangeNotSatisfiable,
                        format!("range {value:?} is outside the object's {length} bytes"),
                    );
                    error.content_range_length = Some(length);
                    return Err(error);
                }
                Err(error) => return Err(ApiError::new(ErrorCode::BadRange, error.to_string())),
            }
        }
    };
    let (status, byte_range) = match range.clone() {
        Some(range) => (StatusCode::PARTIAL_CONTENT, range),
        None => (StatusCode::OK, 0..length),
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, byte_range.end - byte_range.start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{id}\""))
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable");
    if let Some(range) = &range {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {}-{}/{length}", range.start, range.end - 1));
    }
    let body = if *method == Method::HEAD || byte_range.is_empty() {
        Body::empty()
    } else {
        let mut pieces = Box::pin(state.objects.read(id, manifest, byte_range));
        // Fetch the first piece before answering, so that the common failures (origin down,
        // data lost) get a proper error status instead of a truncated 200.
        let first = match pieces.next().await {
            Some(first) => first?,
            None => bytes::Bytes::new(),
        };
        let rest = pieces.map(|piece| {
            piece.map_err(|error| {
                tracing::warn!(%error, "object read failed mid-stream; closing the connection");
                error
            })
        });
        Body::from_stream(futures::stream::once(async move { Ok::<_, FetchError>(first) }).chain(rest))
    };
    builder.body(body).map_err(|error| ApiError::new(ErrorCode::Internal, error.to_string()))
}

async fn pin_object(State(state): State<ApiState>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let id = parse_object_id(&id)?;
    let manifest = state.objects.pin(&id).await?;
    Ok(axum::Json(serde_json::json!({ "object_id": id, "pinned": true, "length": manifest.length() })).into_response())
}

async fn unpin_object(State(state): State<ApiState>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let id = parse_object_id(&id)?;
    let was_pinned = state.objects.unpin(&id).await?;
    Ok(axum::Json(serde_json::json!({ "object_id": id, "pinned": false, "was_pinned": was_pinned })).into_response())
}

async fn list_peers(State(state): State<ApiState>) -> Response {
    let peers = state.objects.fetcher().mesh().map(|mesh| mesh.peers()).unwrap_or_default();
    axum::Json(cachemesh_proto::api::PeersResponse { peers }).into_response()
}

async fn list_pins(State(state): State<ApiState>) -> Response {
    axum::Json(serde_json::json!({ "pinned_objects": state.objects.fetcher().store().pinned_objects() }))
        .into_response()
}

/// Binds the API socket: creates its directory (mode 0700) if missing, removes a stale
/// socket file left by a crash, and makes the socket mode 0600.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
    }
    if path.exists() {
        // A live daemon answers on it; a dead one left a file that blocks bind.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running daemon", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `router` on `listener` until `shutdown` is cancelled; connections are tracked
/// by `tracker` and told to finish gracefully on shutdown.
pub async fn serve(listener: UnixListener, router: Router, shutdown: CancellationToken, tracker: TaskTracker) {
    let mut http = hyper::server::conn::http1::Builder::new();
    // The read buffer bounds a head's memory before parsing (hyper answers 431 past it);
    // `check_head_size` then applies the API's own, smaller, head limit.
    http.max_buf_size(API_READ_BUFFER_BYTES);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: log, back off briefly, keep serving.
                tracing::warn!(%error, "accepting an API connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Larger socket buffers let a 4 MiB chunk cross in fewer wake-ups of both sides.
        let socket = socket2::SockRef::from(&stream);
        let _ = socket.set_send_buffer_size(API_SOCKET_BUFFER_BYTES);
        let _ = socket.set_recv_buffer_size(API_SOCKET_BUFFER_BYTES);
        let service = TowerToHyperService::new(router.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "API connection ended with an error");
                    }
                }
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}
