//! Types of the local API (HTTP/1.1 over a unix socket), shared by the daemon and clients.
//!
//! Every error answer has the body [`ErrorBody`]; its [`ErrorCode`] strings are stable and
//! documented in `docs/api.md`. Adding a code is fine; renaming one breaks clients.

use serde::{Deserialize, Serialize};

use crate::ObjectId;

/// Path prefix of version 1 of the API.
pub const API_PREFIX: &str = "/v1";

/// Stable machine-readable error codes of the local API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The path is not an API route.
    RouteNotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// An object id in the path is not 64 lowercase hex digits.
    BadObjectId,
    /// No object with this id exists in the cache or the origin.
    ObjectNotFound,
    /// The `Range` header is malformed or names several ranges.
    BadRange,
    /// The range does not overlap the object.
    RangeNotSatisfiable,
    /// The request body is larger than the limit for its route.
    BodyTooLarge,
    /// The request head is larger than `API_HEADER_BYTES_MAX`.
    HeadersTooLarge,
    /// The request is malformed in some other way (bad header, bad query).
    BadRequest,
    /// The client's body ended early or broke off.
    BodyIncomplete,
    /// The origin could not be reached or refused the request.
    OriginUnavailable,
    /// The origin returned bytes that do not match their id.
    OriginCorrupt,
    /// The local store has no room left (every chunk pinned or in use, or the disk is full).
    InsufficientStorage,
    /// The daemon is shutting down.
    ShuttingDown,
    /// A fault inside the daemon; details are in its log.
    Internal,
    /// A volume name is not `[a-z0-9][a-z0-9._-]*` of at most `VOLUME_NAME_BYTES_MAX` bytes.
    BadVolumeName,
    /// A path inside a volume is malformed (empty, `.`/`..`/empty segments, NUL, too long).
    BadPath,
    /// No file at this path in the volume.
    FileNotFound,
    /// The path collides with the file tree: a file is where a directory is needed, or
    /// the path is a directory (other files are under it).
    PathConflict,
    /// Other writers kept winning the race for the volume's next record; retry later.
    VolumeConflict,
    /// The volume holds `VOLUME_FILES_MAX` files already.
    VolumeFull,
    /// This node follows as many volumes as it may (`VOLUMES_OPEN_MAX`).
    TooManyVolumes,
}

impl ErrorCode {
    /// The HTTP status this code is sent with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::RouteNotFound | Self::ObjectNotFound | Self::FileNotFound => 404,
            Self::BadVolumeName | Self::BadPath => 400,
            Self::PathConflict | Self::VolumeConflict | Self::VolumeFull => 409,
            Self::TooManyVolumes => 503,
            Self::MethodNotAllowed => 405,
            Self::BadObjectId | Self::BadRange | Self::BadRequest | Self::BodyIncomplete => 400,
            Self::RangeNotSatisfiable => 416,
            Self::BodyTooLarge => 413,
            Self::HeadersTooLarge => 431,
            Self::OriginUnavailable | Self::OriginCorrupt => 502,
            Self::InsufficientStorage => 507,
            Self::ShuttingDown => 503,
            Self::Internal => 500,
        }
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BadObjectId => "bad_object_id",
            Self::ObjectNotFound => "object_not_found",
            Self::BadRange => "bad_range",
            Self::RangeNotSatisfiable => "range_not_satisfiable",
            Self::BodyTooLarge => "body_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::BadRequest => "bad_request",
            Self::BodyIncomplete => "body_incomplete",
            Self::OriginUnavailable => "origin_unavailable",
            Self::OriginCorrupt => "origin_corrupt",
            Self::InsufficientStorage => "insufficient_storage",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
            Self::BadVolumeName => "bad_volume_name",
            Self::BadPath => "bad_path",
            Self::FileNotFound => "file_not_found",
            Self::PathConflict => "path_conflict",
            Self::VolumeConflict => "volume_conflict",
            Self::VolumeFull => "volume_full",
            Self::TooManyVolumes => "too_many_volumes",
        }
    }
}

/// Body of every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The code and human-readable message of an error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code.
    pub code: ErrorCode,
    /// One readable sentence; not stable, not for parsing.
    pub message: String,
}

impl ErrorBody {
    /// An error body with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { error: ErrorDetail { code, message: message.into() } }
    }
}

/// Answer to `PUT /v1/objects`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutObjectResponse {
    /// The new object's id.
    pub object_id: ObjectId,
    /// Its length in bytes.
    pub length: u64,
    /// How many chunks it has.
    pub chunk_count: u64,
    /// How many of its chunks the origin did not have yet and were uploaded.
    pub chunks_uploaded: u64,
}

/// Answer to `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The daemon's version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_seconds: u64,
    /// The origin URL (credentials never included).
    pub origin: String,
    /// The chunk store.
    pub store: StoreStatus,
    /// The mesh, when this node is part of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshStatus>,
}

/// The mesh's part of [`StatusResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStatus {
    /// This node's id (its libp2p peer id).
    pub node_id: String,
    /// Its datacenter.
    pub dc: String,
    /// p2p (DHT) listen addresses, each ending in `/p2p/<node id>`.
    pub p2p_listen: Vec<String>,
    /// The QUIC data plane's address.
    pub data_listen: String,
    /// Live members of the DC seen by this node, itself excluded.
    pub members: u64,
    /// Objects this node announces as held.
    pub provided_objects: u64,
}

/// One entry of `GET /v1/peers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's node id.
    pub node_id: String,
    /// Its data-plane address.
    pub data_addr: String,
    /// Seconds since it was last heard from.
    pub last_seen_seconds_ago: f64,
    /// Requests from this node to it in flight.
    pub requests_in_flight: u64,
    /// Corrupt chunks it has sent this node.
    pub corrupt_chunks: u64,
    /// Whether this node is avoiding it.
    pub penalised: bool,
    /// Its announced link rate in bytes per second (`--link-rate`), when it set one.
    #[serde(default)]
    pub link_rate: Option<u64>,
}

/// Answer to `GET /v1/peers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeersResponse {
    /// The peers, when in a mesh (empty for a single node).
    pub peers: Vec<PeerStatus>,
}

/// The chunk store's part of [`StatusResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// Data directory.
    pub data_dir: String,
    /// I/O backend in use: `io_uring` or `portable`.
    pub io_backend: String,
    /// Why the backend was chosen (probe result, or forced by configuration).
    pub io_backend_reason: String,
    /// Whether full chunks are written past the page cache (`O_DIRECT`).
    #[serde(default)]
    pub direct_writes: bool,
    /// The probe's result: why the filesystem refuses direct writes, when it does.
    #[serde(default)]
    pub direct_writes_reason: String,
    /// Whether every chunk read is hash-checked before it is served.
    pub verify_reads: bool,
    /// Bytes of chunks held.
    pub used_bytes: u64,
    /// The byte budget.
    pub budget_bytes: u64,
    /// Chunks held.
    pub chunk_count: u64,
    /// Chunks that may not be evicted (pinned, or not yet in the origin).
    pub pinned_chunk_count: u64,
    /// Manifests held.
    pub manifest_count: u64,
    /// Chunks evicted since start.
    pub evicted_chunks: u64,
}

/// Answer to `PUT /v1/volumes/{volume}/files/{path}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFileResponse {
    /// The volume.
    pub volume: String,
    /// The path written.
    pub path: String,
    /// The object the path now names.
    pub object_id: ObjectId,
    /// Its length in bytes.
    pub size: u64,
    /// The sequence number of the log record that made the change.
    pub seq: u64,
    /// How many of the object's chunks the origin did not have yet and were uploaded.
    pub chunks_uploaded: u64,
}

/// One file of a volume (answer to `GET /v1/volumes/{volume}/stat/{path}`, and an entry of
/// a listing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The path.
    pub path: String,
    /// The object it names.
    pub object_id: ObjectId,
    /// Its length in bytes.
    pub size: u64,
    /// When its content was written, in milliseconds since the Unix epoch (kept by renames).
    pub modified_at_ms: u64,
    /// The sequence number of the record that last changed this path.
    pub seq: u64,
}

/// Answer to `GET /v1/volumes/{volume}/files?prefix=P&after=A&limit=N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilesResponse {
    /// The volume.
    pub volume: String,
    /// The last record this node's view of the volume holds.
    pub seq: u64,
    /// Files whose path starts with the prefix, in byte order of path.
    pub entries: Vec<FileEntry>,
    /// When more entries follow: pass it as `after` to get the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// Body of `POST /v1/volumes/{volume}/rename`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    /// The file to move (must exist).
    pub from: String,
    /// Where it goes (a file there is replaced).
    pub to: String,
}

/// Answer to a rename or a delete: the record that made the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeResponse {
    /// The volume.
    pub volume: String,
    /// The sequence number of the log record.
    pub seq: u64,
}

/// Body of `POST /v1/volumes/{volume}/prefetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchRequest {
    /// Files or directories (every file under them); `""` is the whole volume.
    pub paths: Vec<String>,
}

/// Answer to `POST /v1/volumes/{volume}/prefetch`, once every chunk is in the local cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchResponse {
    /// Files warmed.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Their chunks.
    pub chunks: u64,
    /// Chunks that were already in the local cache.
    pub chunks_local: u64,
    /// Chunks fetched (from peers, home nodes or the origin).
    pub chunks_fetched: u64,
}
