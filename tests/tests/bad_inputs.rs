//! Bad requests get documented 4xx answers, and no client behaviour (garbage, oversized
//! heads, hanging up mid-transfer) takes the daemon down or publishes anything.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use bytes::Bytes;
use cachemesh_proto::ObjectId;
use cachemesh_proto::limits::API_HEADER_BYTES_MAX;
use cachemesh_tests::data::{PIECE_BYTES, files_under};
use cachemesh_tests::raw::{connect, exchange, read_head};
use cachemesh_tests::*;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;

async fn assert_error(
    client: &Client,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    status: StatusCode,
    code: &str,
) {
    let (got, _, body) = request(client, method.clone(), path, headers).await;
    assert_eq!(got, status, "{method} {path} {headers:?}: {}", String::from_utf8_lossy(&body));
    if method != Method::HEAD {
        assert_eq!(error_code(&body), code, "{method} {path} {headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_object_ids_are_bad_object_id() {
    // Goal: object ids that are not 64 lowercase hex digits answer 400 bad_object_id.
    let daemon = Daemon::start().await;
    let client = daemon.client();
    let valid = ObjectId::of(b"x").to_string();
    for bad in [
        "xyz".to_string(),
        valid.to_uppercase(),
        valid[..63].to_string(),
        format!("{valid}0"),
        "g".repeat(64),
        format!("{}%20", &valid[..61]),
        "0".repeat(1000),
    ] {
        assert_error(
            &client,
            Method::GET,
            &format!("/v1/objects/{bad}"),
            &[],
            StatusCode::BAD_REQUEST,
            "bad_object_id",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_object_is_object_not_found() {
    // Goal: a well-formed id that neither the cache nor the origin holds answers 404
    // object_not_found, for GET with and without a Range.
    let daemon = Daemon::start().await;
    let client = daemon.client();
    let path = format!("/v1/objects/{}", ObjectId::of(b"never stored"));
    assert_error(&client, Method::GET, &path, &[], StatusCode::NOT_FOUND, "object_not_found").await;
    assert_error(&client, Method::GET, &path, &[("range", "bytes=0-9")], StatusCode::NOT_FOUND, "object_not_found")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_wrong_methods_are_refused() {
    // Goal: paths outside the API answer 404 route_not_found; known paths with a method
    // they do not take answer 405 method_not_allowed.
    let daemon = Daemon::start().await;
    let client = daemon.client();
    let id = ObjectId::of(b"x");
    for path in ["/", "/v2/status", "/v1", "/v1/nothing", &format!("/v1/objects/{id}/extra"), "/v1/status/extra"] {
        assert_error(&client, Method::GET, path, &[], StatusCode::NOT_FOUND, "route_not_found").await;
    }
    for (method, path) in [
        (Method::DELETE, format!("/v1/objects/{id}")),
        (Method::PUT, format!("/v1/objects/{id}")),
        (Method::POST, "/v1/objects".to_string()),
        (Method::GET, "/v1/objects".to_string()),
        (Method::POST, "/v1/status".to_string()),
        (Method::PUT, "/v1/status".to_string()),
        (Method::DELETE, "/metrics".to_string()),
    ] {
        assert_error(&client, method, &path, &[], StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_range_headers_are_bad_range() {
    // Goal: Range headers outside the accepted single-range grammar answer 400 bad_range,
    // including multiple ranges and an over-long value.
    let daemon = Daemon::start().await;
    let client = daemon.client();
    let (id, _) = put_checked(&client, Pattern::new(test_seed()), 1000).await;
    let path = format!("/v1/objects/{id}");
    let long = format!("bytes=0-{}", "1".repeat(300));
    for range in [
        "bytes=a-b",
        "items=0-1",
        "bytes=5-1",
        "bytes=0-1,4-5",
        "bytes=",
        "bytes=-",
        "bytes=+1-2",
        "bytes=99999999999999999999-",
        &long,
    ] {
        assert_error(&client, Method::GET, &path, &[("range", range)], StatusCode::BAD_REQUEST, "bad_range").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_is_refused_with_431_and_the_daemon_keeps_serving() {
    // Goal: a request head over API_HEADER_BYTES_MAX answers 431 and the daemon
    // keeps answering; a head well under the limit is served normally.
    let mut daemon = Daemon::start().await;
    for header_bytes in [API_HEADER_BYTES_MAX + 1024, 4 * API_HEADER_BYTES_MAX] {
        let request = format!(
            "GET /v1/status HTTP/1.1\r\nHost: cachemesh\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(header_bytes)
        );
        let response = exchange(daemon.socket(), request.as_bytes()).await;
        assert_eq!(response.status, 431, "head with a {header_bytes}-byte header: {}", response.body_text());
        assert!(daemon.is_running(), "cachemeshd exited after an oversized head");
        daemon.status().await;
    }
    let request = format!(
        "GET /v1/status HTTP/1.1\r\nHost: cachemesh\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(API_HEADER_BYTES_MAX / 2)
    );
    let response = exchange(daemon.socket(), request.as_bytes()).await;
    assert_eq!(
        response.status,
        200,
        "a head of half API_HEADER_BYTES_MAX is within the limit: {}",
        response.body_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_hanging_up_mid_get_do_not_disturb_other_clients() {
    // Goal: clients that hang up part-way through GETs of a 64 MiB object leave the daemon
    // serving: a concurrent full GET and later requests read the object identical.
    let seed = test_seed();
    let mut daemon = Daemon::start().await;
    let client = daemon.client();
    let (id, digest) = put_checked(&client, Pattern::new(seed), 64 * MIB).await;
    let full = tokio::spawn({
        let client = client.clone();
        async move { get_streamed(&client, &id, None).await }
    });
    for read_before_hangup in [0, 1, 64 * 1024, 5 * MIB as usize, 20 * MIB as usize] {
        let mut stream = connect(daemon.socket()).await;
        let request = format!("GET /v1/objects/{id} HTTP/1.1\r\nHost: cachemesh\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let (status, _, mut already) = read_head(&mut stream).await;
        assert_eq!(status, 200);
        let mut buffer = vec![0u8; PIECE_BYTES];
        while already.len() < read_before_hangup {
            let read = stream.read(&mut buffer).await.unwrap();
            assert!(read > 0, "daemon closed the GET early");
            already.extend_from_slice(&buffer[..read]);
        }
        drop(stream);
    }
    let read = full.await.unwrap().unwrap();
    assert_eq!(read.digest.hash(), digest.hash(), "the concurrent full GET");
    assert!(daemon.is_running(), "cachemeshd exited");
    assert_reads_back(&client, &id, &digest).await;
    daemon.status().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_hanging_up_mid_put_publish_nothing() {
    // Goal: a put whose client hangs up part-way (Content-Length or chunked) publishes no
    // object: neither the whole body's id nor the id of the bytes sent is retrievable, the
    // manifest count and the origin's objects/ are unchanged, nothing stays pinned, and the
    // same body put whole afterwards succeeds.
    let seed = test_seed();
    let mut daemon = Daemon::start().await;
    let client = daemon.client();
    put_checked(&client, Pattern::new(seed.wrapping_add(9)), 5 * MIB).await;
    let before = daemon.status().await;
    let origin_objects = files_under(&daemon.origin_dir().join("objects"));
    let pattern = Pattern::new(seed);
    let whole = 40 * MIB;
    let sent_before_hangup = 10 * MIB + 123;

    for chunked in [false, true] {
        let mut stream = connect(daemon.socket()).await;
        let head = if chunked {
            "PUT /v1/objects HTTP/1.1\r\nHost: cachemesh\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
        } else {
            format!("PUT /v1/objects HTTP/1.1\r\nHost: cachemesh\r\nContent-Length: {whole}\r\n\r\n")
        };
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut offset = 0;
        while offset < sent_before_hangup {
            let piece = (sent_before_hangup - offset).min(PIECE_BYTES as u64);
            let bytes = Bytes::from(pattern.bytes(offset..offset + piece));
            if chunked {
                stream.write_all(format!("{piece:x}\r\n").as_bytes()).await.unwrap();
                stream.write_all(&bytes).await.unwrap();
                stream.write_all(b"\r\n").await.unwrap();
            } else {
                stream.write_all(&bytes).await.unwrap();
            }
            offset += piece;
        }
        drop(stream);
        poll_until("the aborted put's chunks to be unpinned", Duration::from_secs(30), || {
            let client = client.clone();
            async move { client.status().await.ok().filter(|status| status.store.pinned_chunk_count == 0) }
        })
        .await;
    }

    for (what, id) in [
        ("whole body", pattern.digest(whole).object_id()),
        ("bytes sent", pattern.digest(sent_before_hangup).object_id()),
    ] {
        let (status, _, body) = request(&client, Method::GET, &format!("/v1/objects/{id}"), &[]).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "object of the {what} of an aborted put: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let after = daemon.status().await;
    assert_eq!(after.store.manifest_count, before.store.manifest_count, "manifests after aborted puts");
    assert_eq!(files_under(&daemon.origin_dir().join("objects")), origin_objects, "origin objects/ after aborted puts");
    assert!(daemon.is_running());

    let (id, digest) = put_checked(&client, pattern, whole).await;
    assert_reads_back(&client, &id, &digest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_socket_is_a_socket_only_its_owner_may_use() {
    // Goal: the API socket is created with mode 0600.
    let daemon = Daemon::start().await;
    let metadata = std::fs::metadata(daemon.socket()).unwrap();
    assert!(metadata.file_type().is_socket(), "{} is not a socket", daemon.socket().display());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600, "socket mode {:o}", metadata.permissions().mode() & 0o777);
}
