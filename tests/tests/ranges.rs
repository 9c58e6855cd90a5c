//! `Range` reads: every accepted form, at and across chunk boundaries, and the 416 cases.

use cachemesh_proto::ObjectId;
use cachemesh_tests::*;
use http::{Method, StatusCode};

/// Three whole chunks and a short fourth one.
const LENGTH: u64 = 3 * CHUNK + 1000;

async fn daemon_with_object(seed: u64) -> (Daemon, ObjectId, Pattern) {
    let daemon = Daemon::start().await;
    let pattern = Pattern::new(seed);
    let (id, _) = put_checked(&daemon.client(), pattern, LENGTH).await;
    (daemon, id, pattern)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_at_and_across_chunk_boundaries_return_exact_bytes() {
    // Goal: every satisfiable range form (first-last, first-, -suffix), starting and ending
    // at and across 4 MiB chunk boundaries and clamped at the end, answers 206 with the
    // right Content-Range, Content-Length and bytes.
    let (daemon, id, pattern) = daemon_with_object(test_seed()).await;
    let client = daemon.client();
    let c = CHUNK;
    let l = LENGTH;
    let cases: Vec<(String, u64, u64)> = vec![
        ("bytes=0-0".into(), 0, 0),
        (format!("bytes=0-{}", c - 1), 0, c - 1),
        (format!("bytes={}-{}", c - 1, c), c - 1, c),
        (format!("bytes={}-{}", c, 2 * c - 1), c, 2 * c - 1),
        (format!("bytes={}-{}", c, c), c, c),
        (format!("bytes={}-{}", c - 10, 2 * c + 10), c - 10, 2 * c + 10),
        (format!("bytes=1-{}", l - 2), 1, l - 2),
        (format!("bytes={}-{}", 3 * c, l - 1), 3 * c, l - 1),
        (format!("bytes={}-", c), c, l - 1),
        ("bytes=12345-".into(), 12345, l - 1),
        ("bytes=0-".into(), 0, l - 1),
        (format!("bytes={}-", l - 1), l - 1, l - 1),
        ("bytes=-1".into(), l - 1, l - 1),
        ("bytes=-1000".into(), 3 * c, l - 1),
        ("bytes=-1001".into(), 3 * c - 1, l - 1),
        (format!("bytes=-{}", l), 0, l - 1),
        (format!("bytes=-{}", l + 5), 0, l - 1),
        (format!("bytes={}-{}", l - 5, l + 100), l - 5, l - 1),
        (format!("bytes={}-{}", c, u64::MAX), c, l - 1),
    ];
    for (range, first, last) in cases {
        let read =
            get_streamed(&client, &id, Some(&range)).await.unwrap_or_else(|error| panic!("GET {range}: {error}"));
        assert_eq!(read.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(read.header("content-range"), format!("bytes {first}-{last}/{l}"), "Content-Range of {range}");
        assert_eq!(read.header("content-length"), (last - first + 1).to_string(), "Content-Length of {range}");
        let expected = blake3::hash(&pattern.bytes(first..last + 1));
        assert_eq!(read.digest.length(), last - first + 1, "bytes of {range}");
        assert_eq!(read.digest.hash(), expected, "content of {range}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_ranges_answer_416_with_the_length() {
    // Goal: ranges that miss the object answer 416 range_not_satisfiable with
    // `Content-Range: bytes */LENGTH`, and the daemon keeps serving.
    let (daemon, id, _) = daemon_with_object(test_seed()).await;
    let client = daemon.client();
    let path = format!("/v1/objects/{id}");
    for range in [
        format!("bytes={LENGTH}-"),
        format!("bytes={LENGTH}-{}", LENGTH + 10),
        format!("bytes={}-", LENGTH + 4 * CHUNK),
        "bytes=-0".to_string(),
        format!("bytes={}-", u64::MAX),
    ] {
        let (status, headers, body) = request(&client, Method::GET, &path, &[("range", &range)]).await;
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}: {}", String::from_utf8_lossy(&body));
        assert_eq!(
            headers.get("content-range").map(|value| value.to_str().unwrap()),
            Some(format!("bytes */{LENGTH}").as_str()),
            "Content-Range of {range}"
        );
        assert_eq!(error_code(&body), "range_not_satisfiable", "{range}");
    }
    daemon.status().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_head_report_length_etag_and_accept_ranges() {
    // Goal: a plain GET answers 200 with Content-Length, `Accept-Ranges: bytes` and
    // `ETag: "<id>"`; HEAD answers the same headers and no body.
    let (daemon, id, pattern) = daemon_with_object(test_seed()).await;
    let client = daemon.client();
    let read = get_streamed(&client, &id, None).await.unwrap();
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.header("content-length"), LENGTH.to_string());
    assert_eq!(read.header("accept-ranges"), "bytes");
    assert_eq!(read.header("etag"), format!("\"{id}\""));
    assert_eq!(read.digest.hash(), pattern.digest(LENGTH).hash());

    let (status, headers, body) = request(&client, Method::HEAD, &format!("/v1/objects/{id}"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let header = |name: &str| headers.get(name).map(|value| value.to_str().unwrap().to_string());
    assert_eq!(header("content-length"), Some(LENGTH.to_string()), "HEAD Content-Length");
    assert_eq!(header("accept-ranges").as_deref(), Some("bytes"), "HEAD Accept-Ranges");
    assert_eq!(header("etag"), Some(format!("\"{id}\"")), "HEAD ETag");
    assert!(body.is_empty(), "HEAD has no body");

    let unknown = ObjectId::of(b"never stored");
    let (status, _, body) = request(&client, Method::HEAD, &format!("/v1/objects/{unknown}"), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "HEAD of an unknown id");
    assert!(body.is_empty(), "HEAD has no body");
}
