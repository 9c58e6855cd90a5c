//! An S3 origin (moto): objects reach the bucket in the documented layout, a cold cache
//! reads them back from it, an origin that dies mid-put publishes nothing, and a slow origin
//! is waited for while it moves.

use std::sync::Arc;
use std::time::Duration;

use cachemesh_proto::Manifest;
use cachemesh_proto::api::ErrorCode;
use cachemesh_tests::moto::Moto;
use cachemesh_tests::throttle::{Pace, ThrottleProxy};
use cachemesh_tests::*;

const MIB: u64 = 1024 * 1024;

fn s3_daemon(moto: &Moto, prefix: &str) -> DaemonOptions {
    DaemonOptions::default().with_origin_url(moto.origin_url(prefix)).with_env(&moto.env())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_origin_holds_chunks_and_manifest_and_serves_a_cold_cache() {
    // Goal: a put through a daemon with an S3 origin leaves `PREFIX/chunks/<id>` for every
    // chunk and `PREFIX/objects/<id>` holding the manifest; a second daemon with an empty
    // cache on the same origin serves the object identical, with its bytes from the origin.
    let seed = test_seed();
    let moto = Moto::start("cachemesh-e2e").await;
    let writer = Daemon::start_with(s3_daemon(&moto, "cold/cache")).await;
    let length = 10 * MIB + 3;
    let (id, digest) = put_checked(&writer.client(), Pattern::new(seed), length).await;

    let keys = moto.list_keys("cold/cache/").await;
    for chunk in digest.chunks() {
        assert!(
            keys.contains(&format!("cold/cache/chunks/{chunk}")),
            "chunk {chunk} missing from the bucket: {keys:?}"
        );
    }
    let manifest_key = format!("cold/cache/objects/{id}");
    assert!(keys.contains(&manifest_key), "manifest missing from the bucket: {keys:?}");
    let manifest = Manifest::decode(&moto.get(&manifest_key).await).unwrap();
    assert_eq!(manifest, digest.manifest(), "manifest in the bucket");
    let uploads = writer.metrics().await;
    assert!(
        uploads.sum("cachemesh_origin_bytes_total", &[("direction", "upload")]) >= length as f64,
        "{}",
        uploads.text
    );
    assert!(uploads.sum("cachemesh_origin_requests_total", &[("op", "put")]) >= 4.0, "{}", uploads.text);

    let reader = Daemon::start_with(s3_daemon(&moto, "cold/cache")).await;
    assert_eq!(reader.status().await.store.chunk_count, 0, "the second daemon starts with an empty cache");
    assert_reads_back(&reader.client(), &id, &digest).await;
    let metrics = reader.metrics().await;
    assert!(metrics.sum("cachemesh_bytes_served_total", &[("source", "origin")]) >= length as f64, "{}", metrics.text);
    assert!(metrics.sum("cachemesh_origin_requests_total", &[("op", "get")]) >= 3.0, "{}", metrics.text);
    assert!(
        metrics.sum("cachemesh_origin_bytes_total", &[("direction", "download")]) >= length as f64,
        "{}",
        metrics.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_origin_killed_mid_put_publishes_nothing_and_the_retry_succeeds() {
    // Goal: when the S3 server dies while a 200 MiB put is streaming, the client gets an
    // error (origin_unavailable, or a broken connection), the daemon stays up, the object is
    // not retrievable once S3 is back (no manifest), and the same put then succeeds and
    // reads back identical through a cold cache.
    let seed = test_seed();
    let mut moto = Moto::start("cachemesh-e2e").await;
    let daemon = Daemon::start_with(s3_daemon(&moto, "killed")).await;
    let client = daemon.client();
    let length = 200 * MIB;
    let pattern = Pattern::new(seed);
    let expected = pattern.digest(length);

    // The body pauses after 40 MiB until moto is dead, so the kill lands mid-put whatever
    // the speeds.
    let gate = Arc::new(tokio::sync::Notify::new());
    let options =
        PatternBodyOptions { content_length: true, gate: Some((40 * MIB, gate.clone())), ..Default::default() };
    let (body, producer) = pattern_body(pattern, length, options);
    let put = tokio::spawn({
        let client = client.clone();
        async move { client.put_object(body).await }
    });
    poll_until("the daemon to upload a chunk to S3", Duration::from_secs(60), || {
        let daemon = &daemon;
        async move { (daemon.metrics().await.sum("cachemesh_origin_requests_total", &[("op", "put")]) >= 1.0).then_some(()) }
    })
    .await;
    moto.kill();
    gate.notify_one();

    let answer = tokio::time::timeout(Duration::from_secs(300), put)
        .await
        .expect("put still running 300 s after S3 died")
        .unwrap();
    let _ = producer.await.unwrap();
    match answer {
        Ok(answer) => panic!("the put succeeded although S3 died in the middle: {answer:?}"),
        Err(ClientError::Api { status, code, message }) => {
            assert_eq!((status.as_u16(), code), (502, ErrorCode::OriginUnavailable), "error answer: {message}");
        }
        Err(error) => eprintln!("the put broke off: {error}"),
    }
    daemon.status().await;

    moto.restart().await;
    match get_streamed(&client, &expected.object_id(), None).await {
        Err(ClientError::Api { code: ErrorCode::ObjectNotFound, .. }) => {}
        Ok(read) => panic!("the failed put's object is retrievable ({} bytes)", read.digest.length()),
        Err(error) => panic!("GET of the failed put's object: expected object_not_found, got {error}"),
    }
    let manifests = moto.list_keys("killed/objects/").await;
    assert!(manifests.is_empty(), "manifests in the bucket after the failed put: {manifests:?}");

    let (id, _) = put_checked(&client, pattern, length).await;
    assert_eq!(id, expected.object_id());
    let cold = Daemon::start_with(s3_daemon(&moto, "killed")).await;
    assert_reads_back(&cold.client(), &id, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_s3_origin_is_waited_for_while_it_moves_and_given_up_when_it_stops() {
    // Goal: reads from an S3 origin end on a stall, not on a deadline. A cold daemon reads
    // through a proxy in front of moto:
    // - trickled at 64 KiB per 0.8 s, a 2.5 MiB object takes about 32 s to arrive: longer
    //   than the origin's stall limit (15 s) and than the S3 client's default deadline for a
    //   whole request (30 s); it still arrives, identical;
    // - stopped (fresh requests too), a read fails with origin_unavailable saying the read
    //   stalled (after one resume: two stall limits), and the daemon stays up;
    // - moving again, the same read succeeds.
    let seed = test_seed();
    let moto = Moto::start("cachemesh-e2e").await;
    let writer = Daemon::start_with(s3_daemon(&moto, "slow")).await;
    let length = 5 * MIB / 2;
    let (trickled, trickled_digest) = put_checked(&writer.client(), Pattern::new(seed), length).await;
    let (stalled, stalled_digest) = put_checked(&writer.client(), Pattern::new(seed ^ 1), length).await;

    let proxy = ThrottleProxy::start(moto.addr()).await;
    let endpoint = [("AWS_ENDPOINT_URL".to_string(), proxy.endpoint())];
    let reader = Daemon::start_with(s3_daemon(&moto, "slow").with_env(&endpoint)).await;
    let client = reader.client();

    proxy.set(Pace::Trickle { bytes: 64 * 1024, every: Duration::from_millis(800) });
    assert_reads_back(&client, &trickled, &trickled_digest).await;

    proxy.set(Pace::Stopped);
    match get_streamed(&client, &stalled, None).await {
        Err(ClientError::Api { status, code, message }) => {
            assert_eq!((status.as_u16(), code), (502, ErrorCode::OriginUnavailable), "error answer: {message}");
            assert!(message.contains("stalled"), "the error does not say the origin stalled: {message}");
        }
        Ok(read) => panic!("a read from a stopped origin returned {} bytes", read.digest.length()),
        Err(error) => panic!("a read from a stopped origin: expected origin_unavailable, got {error}"),
    }
    reader.status().await;

    proxy.set(Pace::Free);
    assert_reads_back(&client, &stalled, &stalled_digest).await;
    let metrics = reader.metrics().await;
    assert!(metrics.sum("cachemesh_origin_errors_total", &[("op", "get")]) >= 1.0, "{}", metrics.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_read_whose_connection_stops_is_resumed_where_it_stopped() {
    // Goal: a chunk download whose connection stops for good mid-body, while fresh
    // connections are served (a TCP flow backing off on a busy link), is resumed on a fresh
    // request for the bytes not yet received: the read completes identical, and the origin
    // sends the bytes that had arrived only once. Each connection through the proxy passes
    // 1.5 MiB, so a 2.5 MiB chunk needs one resume (after the 15 s stall limit).
    let seed = test_seed();
    let moto = Moto::start("cachemesh-e2e").await;
    let writer = Daemon::start_with(s3_daemon(&moto, "resume")).await;
    let length = 5 * MIB / 2;
    let (id, digest) = put_checked(&writer.client(), Pattern::new(seed), length).await;

    let proxy = ThrottleProxy::start(moto.addr()).await;
    let endpoint = [("AWS_ENDPOINT_URL".to_string(), proxy.endpoint())];
    let reader = Daemon::start_with(s3_daemon(&moto, "resume").with_env(&endpoint)).await;
    proxy.set(Pace::StopEachAfter { bytes: 3 * MIB as usize / 2 });
    assert_reads_back(&reader.client(), &id, &digest).await;

    let metrics = reader.metrics().await;
    assert!(metrics.sum("cachemesh_origin_stall_resumes_total", &[]) >= 1.0, "no read was resumed: {}", metrics.text);
    let downloaded = metrics.sum("cachemesh_origin_bytes_total", &[("direction", "download")]);
    // The chunk and a small manifest; a restart from the first byte would add 1.5 MiB.
    assert!(
        downloaded >= length as f64 && downloaded < (length + 64 * 1024) as f64,
        "{downloaded} bytes downloaded from the origin for a {length}-byte object"
    );
}
