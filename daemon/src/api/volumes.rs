//! The volume routes of the local API: files by path, listing, stat, rename, prefetch.
//!
//! Every volume name and path is parsed into `VolumeName` / `VolumePath` before anything
//! else happens, so a bad one is a 400 (`bad_volume_name`, `bad_path`) and never reaches
//! the origin. A file's bytes are served by the object code path (`object_response`), so
//! ranges, headers and failure behaviour are the object route's.

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cachemesh_proto::api::{
    ChangeResponse, ErrorCode, FileEntry, ListFilesResponse, PrefetchRequest, PutFileResponse, RenameRequest,
};
use cachemesh_proto::limits::{
    VOLUME_LIST_ENTRIES_MAX, VOLUME_PATH_BYTES_MAX, VOLUME_PREFETCH_PATHS_MAX, VOLUME_REQUEST_BODY_BYTES_MAX,
};
use cachemesh_proto::volume::{FileInfo, Op, VolumeName, VolumePath};
use serde::Deserialize;

use super::{ApiError, ApiState, drain_briefly, object_response, origin_error};
use crate::objects::PutError;
use crate::volume::VolumeError;

/// Header naming the sequence number of the record that last changed a file.
pub const FILE_SEQ_HEADER: &str = "x-cachemesh-seq";
/// Header naming the object a file's bytes are.
pub const FILE_OBJECT_HEADER: &str = "x-cachemesh-object-id";

impl From<VolumeError> for ApiError {
    fn from(error: VolumeError) -> Self {
        let code = match &error {
            VolumeError::NotFound { .. } => ErrorCode::FileNotFound,
            VolumeError::PathConflict { .. } => ErrorCode::PathConflict,
            VolumeError::Full(_) => ErrorCode::VolumeFull,
            VolumeError::Contended { .. } => ErrorCode::VolumeConflict,
            VolumeError::TooManyVolumes => ErrorCode::TooManyVolumes,
            VolumeError::Corrupt { .. } => ErrorCode::OriginCorrupt,
            VolumeError::Origin(origin) => return origin_error(origin),
            VolumeError::Open(_) | VolumeError::Fetch(_) => {
                return match error {
                    VolumeError::Open(open) => open.into(),
                    VolumeError::Fetch(fetch) => fetch.into(),
                    _ => Self::new(ErrorCode::Internal, "unreachable"),
                };
            }
            VolumeError::View(_) | VolumeError::Task(_) => ErrorCode::Internal,
        };
        Self::new(code, error.to_string())
    }
}

/// The volume routes.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/volumes/{volume}/files", get(list_files))
        .route("/v1/volumes/{volume}/files/", get(empty_path).put(empty_path).delete(empty_path))
        .route("/v1/volumes/{volume}/files/{*path}", get(get_file).put(put_file).delete(delete_file))
        .route("/v1/volumes/{volume}/stat/{*path}", get(stat_file))
        .route("/v1/volumes/{volume}/rename", post(rename_file))
        .route("/v1/volumes/{volume}/prefetch", post(prefetch))
}

fn parse_volume(text: &str) -> Result<VolumeName, ApiError> {
    VolumeName::parse(text)
        .map_err(|error| ApiError::new(ErrorCode::BadVolumeName, format!("bad volume name {text:?}: {error}")))
}

fn parse_path(text: &str) -> Result<VolumePath, ApiError> {
    VolumePath::parse(text).map_err(|error| ApiError::new(ErrorCode::BadPath, format!("bad path {text:?}: {error}")))
}

fn volume_and_path(
    params: Result<UrlPath<(String, String)>, PathRejection>,
) -> Result<(VolumeName, VolumePath), ApiError> {
    let UrlPath((volume, path)) = params.map_err(|rejection| {
        ApiError::new(ErrorCode::BadPath, format!("the volume or path is not valid percent-encoded UTF-8: {rejection}"))
    })?;
    Ok((parse_volume(&volume)?, parse_path(&path)?))
}

fn volume_only(params: Result<UrlPath<String>, PathRejection>) -> Result<VolumeName, ApiError> {
    let UrlPath(volume) = params.map_err(|rejection| {
        ApiError::new(ErrorCode::BadVolumeName, format!("the volume is not valid percent-encoded UTF-8: {rejection}"))
    })?;
    parse_volume(&volume)
}

fn entry(path: String, info: &FileInfo) -> FileEntry {
    FileEntry { path, object_id: info.object, size: info.size, modified_at_ms: info.modified_at_ms, seq: info.seq }
}

async fn json_body<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, VOLUME_REQUEST_BODY_BYTES_MAX).await.map_err(|error| {
        ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("the request body is unreadable or over VOLUME_REQUEST_BODY_BYTES_MAX: {error}"),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|error| {
        ApiError::new(ErrorCode::BadRequest, format!("the request body is not the expected JSON: {error}"))
    })
}

async fn empty_path(params: Result<UrlPath<String>, PathRejection>) -> Result<Response, ApiError> {
    volume_only(params)?;
    Err(ApiError::new(ErrorCode::BadPath, "bad path \"\": a path is not empty"))
}

async fn get_file(
    State(state): State<ApiState>,
    method: Method,
    params: Result<UrlPath<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (volume, path) = volume_and_path(params)?;
    let info = state.volumes.stat(&volume, &path).await?;
    let mut response = object_response(&state, &method, info.object, &headers).await?;
    let headers = response.headers_mut();
    // The path may name another object tomorrow: clients revalidate (the ETag is the object id).
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(&info.object.to_string()) {
        headers.insert(FILE_OBJECT_HEADER, value);
    }
    headers.insert(FILE_SEQ_HEADER, HeaderValue::from(info.seq));
    Ok(response)
}

async fn put_file(
    State(state): State<ApiState>,
    params: Result<UrlPath<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::new(ErrorCode::ShuttingDown, "the daemon is shutting down"));
    }
    let mut body = body.into_data_stream();
    let checked = async {
        let (volume, path) = volume_and_path(params)?;
        // Refuse a path that cannot be written before the (maybe huge) body is uploaded.
        state.volumes.precheck_put(&volume, &path).await?;
        Ok::<_, ApiError>((volume, path))
    }
    .await;
    let (volume, path) = match checked {
        Ok(checked) => checked,
        Err(error) => {
            drain_briefly(&mut body).await;
            return Err(error);
        }
    };
    let object = match state.objects.put(&mut body).await {
        Ok(object) => object,
        Err(error) => {
            if !matches!(error, PutError::BodyIncomplete { .. }) {
                drain_briefly(&mut body).await;
            }
            return Err(error.into());
        }
    };
    let op = Op::Put { path: path.clone(), object: object.object_id, size: object.length };
    let appended = state.volumes.append(&volume, op).await?;
    tracing::info!(volume = %volume, path = %path, object = %object.object_id, seq = appended.seq, "file put");
    let answer = PutFileResponse {
        volume: volume.to_string(),
        path: path.to_string(),
        object_id: object.object_id,
        size: object.length,
        seq: appended.seq,
        chunks_uploaded: object.chunks_uploaded,
    };
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

async fn delete_file(
    State(state): State<ApiState>,
    params: Result<UrlPath<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (volume, path) = volume_and_path(params)?;
    let appended = state.volumes.append(&volume, Op::Delete { path }).await?;
    Ok(axum::Json(ChangeResponse { volume: volume.to_string(), seq: appended.seq }).into_response())
}

async fn stat_file(
    State(state): State<ApiState>,
    params: Result<UrlPath<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (volume, path) = volume_and_path(params)?;
    let info = state.volumes.stat(&volume, &path).await?;
    Ok(axum::Json(entry(path.to_string(), &info)).into_response())
}

async fn rename_file(
    State(state): State<ApiState>,
    params: Result<UrlPath<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let volume = volume_only(params)?;
    let request: RenameRequest = json_body(body).await?;
    let op = Op::Rename { from: parse_path(&request.from)?, to: parse_path(&request.to)? };
    let appended = state.volumes.append(&volume, op).await?;
    Ok(axum::Json(ChangeResponse { volume: volume.to_string(), seq: appended.seq }).into_response())
}

/// Query of a listing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    prefix: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

fn check_prefix(name: &str, text: &str) -> Result<(), ApiError> {
    if text.len() > VOLUME_PATH_BYTES_MAX || text.chars().any(char::is_control) {
        return Err(ApiError::new(
            ErrorCode::BadPath,
            format!("bad {name}: at most VOLUME_PATH_BYTES_MAX bytes and no control characters"),
        ));
    }
    Ok(())
}

async fn list_files(
    State(state): State<ApiState>,
    params: Result<UrlPath<String>, PathRejection>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let volume = volume_only(params)?;
    let Query(query) =
        query.map_err(|rejection| ApiError::new(ErrorCode::BadRequest, format!("bad listing query: {rejection}")))?;
    let prefix = query.prefix.unwrap_or_default();
    check_prefix("prefix", &prefix)?;
    if let Some(after) = &query.after {
        check_prefix("after", after)?;
    }
    let limit = match query.limit {
        None => VOLUME_LIST_ENTRIES_MAX,
        Some(0) => return Err(ApiError::new(ErrorCode::BadRequest, "limit must be at least 1")),
        Some(limit) => limit.min(VOLUME_LIST_ENTRIES_MAX),
    };
    let listing = state.volumes.list(&volume, &prefix, query.after.as_deref(), limit).await?;
    let next_after = if listing.page.more { listing.page.entries.last().map(|(path, _)| path.clone()) } else { None };
    let entries = listing.page.entries.into_iter().map(|(path, info)| entry(path, &info)).collect();
    Ok(axum::Json(ListFilesResponse { volume: volume.to_string(), seq: listing.seq, entries, next_after })
        .into_response())
}

async fn prefetch(
    State(state): State<ApiState>,
    params: Result<UrlPath<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let volume = volume_only(params)?;
    let request: PrefetchRequest = json_body(body).await?;
    if request.paths.len() > VOLUME_PREFETCH_PATHS_MAX {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("a prefetch names at most VOLUME_PREFETCH_PATHS_MAX ({VOLUME_PREFETCH_PATHS_MAX}) paths"),
        ));
    }
    for path in &request.paths {
        if !path.is_empty() {
            parse_path(path)?;
        }
    }
    let answer = state.volumes.prefetch(&volume, &request.paths).await?;
    Ok(axum::Json(answer).into_response())
}
