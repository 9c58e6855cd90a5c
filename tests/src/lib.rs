//! End-to-end test harness: real `cachemeshd` processes driven through their socket and
//! binaries, real origins (a directory, or moto for S3), seeded data.
//!
//! What it deliberately does not do: reach into the daemon's modules. Everything a test
//! checks goes through a boundary the daemon promises: the API, `/metrics`, the CLI, the
//! documented data-dir and origin layouts, and `cachemeshd check`.
//!
//! Invariants: every test's randomness comes from [`support::test_seed`] (printed, and
//! settable with `CACHEMESH_TEST_SEED`); every wait is a poll with a deadline; no object is
//! held in memory whole; a failing test prints the daemon's log tails.

pub mod body;
pub mod daemon;
pub mod data;
pub mod metrics;
pub mod moto;
pub mod raw;
pub mod support;
pub mod throttle;

use cachemesh_proto::ObjectId;
use cachemesh_proto::api::PutObjectResponse;

pub use crate::body::{PatternBodyOptions, ReadBack, pattern_body, read_streamed};
pub use crate::daemon::{Daemon, DaemonOptions, OriginSpec};
pub use crate::data::{CHUNK, Pattern, StreamDigest};
pub use crate::support::{poll_until, test_seed};
pub use cachemesh_daemon::client::{Client, ClientError};

/// Puts the first `length` bytes of `pattern` (chunked encoding); returns the answer and
/// the digest of what was sent. Panics when the put fails.
pub async fn put_pattern(client: &Client, pattern: Pattern, length: u64) -> (PutObjectResponse, StreamDigest) {
    let (body, producer) = pattern_body(pattern, length, PatternBodyOptions::default());
    let answer = client.put_object(body).await;
    let digest = producer.await.unwrap();
    let answer =
        answer.unwrap_or_else(|error| panic!("put of {length} bytes (seed {}) failed: {error}", pattern.seed()));
    let digest = digest.unwrap_or_else(|sent| panic!("body dropped after {sent} bytes but the put succeeded"));
    (answer, digest)
}

/// Puts and checks the answer against the digest: id, length, chunk count.
pub async fn put_checked(client: &Client, pattern: Pattern, length: u64) -> (ObjectId, StreamDigest) {
    let (answer, digest) = put_pattern(client, pattern, length).await;
    assert_eq!(answer.object_id, digest.object_id(), "object id of {length} bytes (seed {})", pattern.seed());
    assert_eq!(answer.length, length, "length in the put answer");
    assert_eq!(answer.chunk_count, digest.chunks().len() as u64, "chunk_count in the put answer");
    (answer.object_id, digest)
}

/// `GET /v1/objects/{id}` (with an optional `Range`), streamed and hashed.
pub async fn get_streamed(client: &Client, id: &ObjectId, range: Option<&str>) -> Result<ReadBack, ClientError> {
    let response = client.get_object(id, range).await?;
    Ok(read_streamed(response).await?)
}

/// Sends one request with an empty body and these headers; returns status, headers and
/// the whole body.
pub async fn request(
    client: &Client,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::StatusCode, http::HeaderMap, bytes::Bytes) {
    use http_body_util::BodyExt;
    let mut builder = http::Request::builder().method(method.clone()).uri(path).header("host", "cachemesh");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
    let response = client.send(request).await.unwrap_or_else(|error| panic!("{method} {path} failed: {error}"));
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

/// The error code of a JSON error body (panics with the body when it is not one).
pub fn error_code(body: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("error body is not JSON: {:?}", String::from_utf8_lossy(body)));
    value["error"]["code"].as_str().unwrap_or_else(|| panic!("error body has no error.code: {value}")).to_string()
}

/// Asserts that the object reads back whole and identical to `expected`.
pub async fn assert_reads_back(client: &Client, id: &ObjectId, expected: &StreamDigest) {
    let read = get_streamed(client, id, None).await.unwrap_or_else(|error| panic!("GET {id} failed: {error}"));
    assert_eq!(read.status, http::StatusCode::OK, "GET {id}");
    assert_eq!(read.digest.length(), expected.length(), "length of GET {id}");
    assert_eq!(read.digest.hash(), expected.hash(), "BLAKE3 of GET {id}");
}
