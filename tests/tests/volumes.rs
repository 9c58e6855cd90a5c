//! Volumes: paths over objects, kept as a log of create-only records in the origin.
//!
//! Rename is atomic under readers, concurrent writers are ordered and told the truth, two
//! daemons sharing an origin see each other's writes, restarts and fresh nodes replay the
//! log (from a snapshot when there is one), bad names and paths get documented errors,
//! interrupted uploads resume, prefetch warms a cold cache, and multi-GiB files stream.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cachemesh_proto::api::{ErrorCode, FileEntry, PutFileResponse};
use cachemesh_proto::volume::{Op, Record};
use cachemesh_tests::body::channel_body;
use cachemesh_tests::moto::Moto;
use cachemesh_tests::*;
use http::{Method, StatusCode};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// How long a write on one daemon may take to become visible on another in these tests
/// (the documented bound is about VOLUME_READ_STALENESS_MAX; this is generous for slow CI).
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(20);

async fn put_file(
    client: &Client,
    volume: &str,
    path: &str,
    pattern: Pattern,
    length: u64,
) -> (PutFileResponse, StreamDigest) {
    let (body, producer) = pattern_body(pattern, length, PatternBodyOptions::default());
    let answer = client.put_file(volume, path, body).await;
    let digest = producer.await.unwrap();
    let answer = answer.unwrap_or_else(|error| panic!("put of {volume}/{path} failed: {error}"));
    let digest = digest.unwrap_or_else(|sent| panic!("body dropped after {sent} bytes but the put succeeded"));
    assert_eq!(answer.object_id, digest.object_id(), "object id of {path}");
    assert_eq!(answer.size, length, "size of {path}");
    (answer, digest)
}

async fn read_file(client: &Client, volume: &str, path: &str, range: Option<&str>) -> Result<ReadBack, ClientError> {
    let response = client.get_file(volume, path, range).await?;
    Ok(read_streamed(response).await?)
}

fn api_code(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Api { code, .. }) => code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Waits until `daemon` reports `path` at sequence `seq` or later; returns the entry.
async fn wait_for_seq(client: &Client, volume: &str, path: &str, seq: u64) -> FileEntry {
    poll_until(&format!("{volume}/{path} to reach seq {seq}"), VISIBLE_TIMEOUT, || async {
        client.stat_file(volume, path).await.ok().filter(|entry| entry.seq >= seq)
    })
    .await
}

async fn wait_for_absence(client: &Client, volume: &str, path: &str) {
    poll_until(&format!("{volume}/{path} to disappear"), VISIBLE_TIMEOUT, || async {
        matches!(client.stat_file(volume, path).await, Err(ClientError::Api { code: ErrorCode::FileNotFound, .. }))
            .then_some(())
    })
    .await
}

fn log_record(origin_dir: &std::path::Path, volume: &str, seq: u64) -> Record {
    let path = origin_dir.join(format!("volumes/{volume}/log/{seq:020}"));
    let bytes = std::fs::read(&path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    Record::decode(&bytes).unwrap()
}

fn listing(entries: &[FileEntry]) -> BTreeMap<String, (String, u64, u64, u64)> {
    entries
        .iter()
        .map(|entry| (entry.path.clone(), (entry.object_id.to_string(), entry.size, entry.modified_at_ms, entry.seq)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_replaces_atomically_under_concurrent_readers() {
    // Goal: while a writer repeatedly uploads a new version to a staging path and renames it
    // over the live path, readers of the live path only ever see a complete version (never
    // a 404, never a mix), and never an older version after a newer one.
    let seed = test_seed();
    let daemon = Daemon::start().await;
    let client = daemon.client();
    let versions: Vec<(Pattern, u64)> =
        (0..6u64).map(|i| (Pattern::new(seed.wrapping_add(i)), 2 * CHUNK + 1000 * i + 1)).collect();
    let hashes: Vec<blake3::Hash> = versions.iter().map(|(pattern, length)| pattern.digest(*length).hash()).collect();
    put_file(&client, "v", "live/model", versions[0].0, versions[0].1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (client, stop, reads, hashes) = (client.clone(), stop.clone(), reads.clone(), hashes.clone());
            tokio::spawn(async move {
                let mut newest = 0;
                // At least one read after the last rename, so every reader sees the end state.
                loop {
                    let stopping = stop.load(Ordering::SeqCst);
                    let read = read_file(&client, "v", "live/model", None)
                        .await
                        .unwrap_or_else(|error| panic!("a read of the live path failed: {error}"));
                    assert_eq!(read.status, StatusCode::OK);
                    let version = hashes.iter().position(|hash| *hash == read.digest.hash()).unwrap_or_else(|| {
                        panic!("a read returned bytes of no version ({} bytes)", read.digest.length())
                    });
                    assert!(version >= newest, "read version {version} after version {newest}");
                    newest = version;
                    reads.fetch_add(1, Ordering::SeqCst);
                    if stopping {
                        return newest;
                    }
                }
            })
        })
        .collect();

    let mut last_seq = 0;
    for (index, (pattern, length)) in versions.iter().enumerate().skip(1) {
        let staging = format!("staging/model-{index}");
        let (put, _) = put_file(&client, "v", &staging, *pattern, *length).await;
        assert!(put.seq > last_seq);
        let renamed = client.rename_file("v", &staging, "live/model").await.unwrap();
        assert_eq!(renamed.seq, put.seq + 1, "nobody else writes this volume");
        last_seq = renamed.seq;
    }
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        assert_eq!(reader.await.unwrap(), versions.len() - 1, "the last read sees the last version");
    }
    eprintln!("{} reads during {} renames", reads.load(Ordering::SeqCst), versions.len() - 1);
    let entries = client.list_all_files("v", "").await.unwrap();
    assert_eq!(entries.iter().map(|entry| entry.path.as_str()).collect::<Vec<_>>(), ["live/model"]);
    assert_eq!(entries[0].seq, last_seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_streaming_the_old_object_survives_replace_and_delete() {
    // Goal: a GET that has started streaming a file finishes with the old bytes although the
    // path is replaced and then deleted meanwhile; afterwards the path is file_not_found.
    let seed = test_seed();
    let daemon = Daemon::start().await;
    let client = daemon.client();
    let (_, old) = put_file(&client, "v", "f", Pattern::new(seed), 40 * MIB + 7).await;
    let response = client.get_file("v", "f", None).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.headers()["etag"].to_str().unwrap(), format!("\"{}\"", old.object_id()));
    let mut body = response.into_body();
    let mut digest = StreamDigest::new();
    use http_body_util::BodyExt;
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    digest.update(&first);

    put_file(&client, "v", "f", Pattern::new(seed.wrapping_add(1)), 5 * MIB).await;
    client.delete_file("v", "f").await.unwrap();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            digest.update(&data);
        }
    }
    assert_eq!(digest.length(), old.length());
    assert_eq!(digest.hash(), old.hash(), "the streaming read finished with the old bytes");
    assert_eq!(api_code(read_file(&client, "v", "f", None).await), ErrorCode::FileNotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_writers_to_one_path_last_record_wins() {
    // Goal: eight writers on two daemons sharing an origin put different files at one path at
    // once. Each is told a distinct sequence number, and the log record at that number is
    // exactly its put (no writer is lied to); both daemons end with the file of the highest
    // sequence, whole (no torn file).
    let seed = test_seed();
    let first = Daemon::start().await;
    let second = Daemon::start_with(DaemonOptions::default().with_origin_url(first.origin_url())).await;
    let clients = [first.client(), second.client()];
    let writers: Vec<_> = (0..8u64)
        .map(|i| {
            let client = clients[i as usize % 2].clone();
            tokio::spawn(async move {
                let pattern = Pattern::new(seed.wrapping_add(i));
                let (answer, digest) = put_file(&client, "shared", "one/file", pattern, CHUNK + 777 * i).await;
                (answer, digest)
            })
        })
        .collect();
    let mut results = Vec::new();
    for writer in writers {
        results.push(writer.await.unwrap());
    }
    let seqs: HashSet<u64> = results.iter().map(|(answer, _)| answer.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<HashSet<u64>>(), "each writer got its own sequence number");
    for (answer, _) in &results {
        let record = log_record(first.origin_dir(), "shared", answer.seq);
        match record.op {
            Op::Put { path, object, size } => {
                assert_eq!((path.as_str(), object, size), ("one/file", answer.object_id, answer.size));
            }
            other => panic!("record {} is {other:?}, not the writer's put", answer.seq),
        }
    }
    let (winner, winner_digest) = results.iter().max_by_key(|(answer, _)| answer.seq).unwrap();
    for client in &clients {
        let entry = wait_for_seq(client, "shared", "one/file", 8).await;
        assert_eq!((entry.seq, entry.object_id, entry.size), (8, winner.object_id, winner.size));
        let read = read_file(client, "shared", "one/file", None).await.unwrap();
        assert_eq!(read.digest.hash(), winner_digest.hash(), "the file is the last writer's, whole");
    }
    let conflicts = first.metrics().await.sum("cachemesh_volume_append_conflicts_total", &[])
        + second.metrics().await.sum("cachemesh_volume_append_conflicts_total", &[]);
    eprintln!("lost races retried: {conflicts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_sharing_an_origin_see_each_others_writes() {
    // Goal: puts, renames and deletes on one daemon become visible on another daemon with
    // the same origin (no mesh), both ways, and listings agree once both are caught up.
    let seed = test_seed();
    let a = Daemon::start().await;
    let b = Daemon::start_with(DaemonOptions::default().with_origin_url(a.origin_url())).await;
    let (ca, cb) = (a.client(), b.client());

    let (put, digest) = put_file(&ca, "team", "docs/readme", Pattern::new(seed), 3 * MIB + 5).await;
    let seen = wait_for_seq(&cb, "team", "docs/readme", put.seq).await;
    assert_eq!(seen.object_id, put.object_id);
    assert_eq!(read_file(&cb, "team", "docs/readme", None).await.unwrap().digest.hash(), digest.hash());

    let renamed = cb.rename_file("team", "docs/readme", "docs/README").await.unwrap();
    wait_for_seq(&ca, "team", "docs/README", renamed.seq).await;
    wait_for_absence(&ca, "team", "docs/readme").await;

    let (other, _) = put_file(&cb, "team", "data/x", Pattern::new(seed.wrapping_add(1)), 10).await;
    wait_for_seq(&ca, "team", "data/x", other.seq).await;
    let deleted = ca.delete_file("team", "docs/README").await.unwrap();
    assert_eq!(deleted.seq, other.seq + 1);
    wait_for_absence(&cb, "team", "docs/README").await;

    let from_a = ca.list_all_files("team", "").await.unwrap();
    let from_b = cb.list_all_files("team", "").await.unwrap();
    assert_eq!(listing(&from_a), listing(&from_b));
    assert_eq!(from_a.iter().map(|entry| entry.path.as_str()).collect::<Vec<_>>(), ["data/x"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_replays_the_log_and_a_fresh_node_starts_from_a_snapshot() {
    // Goal: with a snapshot every 5 records, a daemon restarted after 12 changes lists
    // exactly what it listed before; a fresh daemon on the same origin, with log records
    // 1 to 10 removed, rebuilds the same table from the snapshot at 10 plus records 11-12,
    // serves the files, and its next write gets sequence 13, which the first one then sees.
    let seed = test_seed();
    let options = DaemonOptions::default().with_args(&["--volume-snapshot-interval", "5"]);
    let mut a = Daemon::start_with(options.clone()).await;
    let client = a.client();
    for i in 0..8u64 {
        put_file(&client, "data", &format!("d/f{i}"), Pattern::new(seed.wrapping_add(i)), 1000 + i).await;
    }
    assert_eq!(client.rename_file("data", "d/f0", "d/g").await.unwrap().seq, 9);
    assert_eq!(client.delete_file("data", "d/f1").await.unwrap().seq, 10);
    let (replaced, replaced_digest) = put_file(&client, "data", "d/f2", Pattern::new(seed.wrapping_add(99)), 77).await;
    assert_eq!(replaced.seq, 11);
    assert_eq!(client.rename_file("data", "d/f3", "d/f4").await.unwrap().seq, 12);
    let before = listing(&client.list_all_files("data", "").await.unwrap());
    assert_eq!(before.keys().collect::<Vec<_>>(), ["d/f2", "d/f4", "d/f5", "d/f6", "d/f7", "d/g"]);

    let snapshots = a.origin_dir().join("volumes/data/snapshots");
    poll_until("snapshots at 5 and 10 in the origin", VISIBLE_TIMEOUT, || {
        let snapshots = snapshots.clone();
        async move {
            let present = |seq: u64| snapshots.join(format!("{seq:020}")).is_file();
            (present(5) && present(10)).then_some(())
        }
    })
    .await;

    a.restart().await;
    let client = a.client();
    assert_eq!(listing(&client.list_all_files("data", "").await.unwrap()), before, "after a restart");

    for seq in 1..=10u64 {
        std::fs::remove_file(a.origin_dir().join(format!("volumes/data/log/{seq:020}"))).unwrap();
    }
    let b = Daemon::start_with(options.with_origin_url(a.origin_url())).await;
    let fresh = b.client();
    assert_eq!(listing(&fresh.list_all_files("data", "").await.unwrap()), before, "a fresh node from the snapshot");
    assert_eq!(b.metrics().await.sum("cachemesh_volume_snapshots_loaded_total", &[]), 1.0);
    let read = read_file(&fresh, "data", "d/f2", None).await.unwrap();
    assert_eq!(read.digest.hash(), replaced_digest.hash());
    let (next, _) = put_file(&fresh, "data", "d/new", Pattern::new(seed.wrapping_add(7)), 5).await;
    assert_eq!(next.seq, 13);
    wait_for_seq(&client, "data", "d/new", 13).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_volume_names_paths_and_missing_files_get_clear_errors() {
    // Goal: malformed paths (`..`, `.`, empty segments, NUL, over-long) answer 400 bad_path,
    // malformed volume names 400 bad_volume_name, missing files 404 file_not_found, writes
    // that collide with the file tree 409 path_conflict, bad bodies 400 bad_request; none
    // writes a record, and the daemon stays up.
    let daemon = Daemon::start().await;
    let client = daemon.client();
    let long_segment = "x".repeat(256);
    let long_path = vec!["y".repeat(255); 5].join("/");
    let bad_paths = [
        "a//b",
        "./a",
        "a/./b",
        "a/..",
        "..",
        "%2E%2E/x",
        "a%00b",
        "a%0Ab",
        "a/",
        "/a",
        &long_segment,
        &long_path,
        "%FF",
    ];
    for bad in bad_paths {
        for method in [Method::GET, Method::PUT, Method::DELETE] {
            let uri = format!("/v1/volumes/v/files/{bad}");
            let (status, _, body) = request(&client, method.clone(), &uri, &[]).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {uri}: {}", String::from_utf8_lossy(&body));
            assert_eq!(error_code(&body), "bad_path", "{method} {uri}");
        }
        let (status, _, body) = request(&client, Method::GET, &format!("/v1/volumes/v/stat/{bad}"), &[]).await;
        assert_eq!((status, error_code(&body).as_str()), (StatusCode::BAD_REQUEST, "bad_path"), "stat {bad}");
    }
    let (status, _, body) = request(&client, Method::GET, "/v1/volumes/v/files/", &[]).await;
    assert_eq!((status, error_code(&body).as_str()), (StatusCode::BAD_REQUEST, "bad_path"));
    for bad in ["V", "-v", ".v", "..", "v%2Fw", "v%20w", &"a".repeat(64)] {
        for uri in [format!("/v1/volumes/{bad}/files/a"), format!("/v1/volumes/{bad}/files")] {
            let (status, _, body) = request(&client, Method::GET, &uri, &[]).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {}", String::from_utf8_lossy(&body));
            assert_eq!(error_code(&body), "bad_volume_name", "{uri}");
        }
    }
    let (status, _, body) = request(&client, Method::GET, "/v1/volumes/v/files?limit=0", &[]).await;
    assert_eq!((status, error_code(&body).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    let (status, _, body) = request(&client, Method::GET, "/v1/volumes/v/files?prefix=a%00", &[]).await;
    assert_eq!((status, error_code(&body).as_str()), (StatusCode::BAD_REQUEST, "bad_path"));

    assert_eq!(api_code(client.stat_file("v", "nope").await), ErrorCode::FileNotFound);
    assert_eq!(api_code(read_file(&client, "v", "nope", None).await), ErrorCode::FileNotFound);
    let (status, _, _) = request(&client, Method::HEAD, "/v1/volumes/v/files/nope", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(api_code(client.delete_file("v", "nope").await), ErrorCode::FileNotFound);
    assert_eq!(api_code(client.rename_file("v", "nope", "other").await), ErrorCode::FileNotFound);
    assert_eq!(api_code(client.prefetch("v", vec!["nope".into()]).await), ErrorCode::FileNotFound);
    assert_eq!(api_code(client.prefetch("v", vec!["a/../b".into()]).await), ErrorCode::BadPath);
    assert_eq!(api_code(client.rename_file("v", "a", "b/../c").await), ErrorCode::BadPath);

    let seed = test_seed();
    put_file(&client, "v", "a", Pattern::new(seed), 10).await;
    put_file(&client, "v", "d/x", Pattern::new(seed), 10).await;
    let small = |n: u64| pattern_body(Pattern::new(seed), n, PatternBodyOptions::default()).0;
    assert_eq!(api_code(client.put_file("v", "a/b", small(10)).await), ErrorCode::PathConflict);
    assert_eq!(api_code(client.put_file("v", "d", small(10)).await), ErrorCode::PathConflict);
    assert_eq!(api_code(client.rename_file("v", "a", "d").await), ErrorCode::PathConflict);
    assert_eq!(api_code(client.rename_file("v", "a", "a/b").await), ErrorCode::PathConflict);
    assert_eq!(api_code(client.put_file("v", "x/../y", small(MIB)).await), ErrorCode::BadPath);

    let (status, body) = client
        .send_bytes(Method::POST, "/v1/volumes/v/rename", Bytes::from_static(b"{\"from\": \"a\"}"))
        .await
        .unwrap();
    assert_eq!((status, error_code(&body).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    let (status, body) =
        client.send_bytes(Method::POST, "/v1/volumes/v/prefetch", Bytes::from_static(b"not json")).await.unwrap();
    assert_eq!((status, error_code(&body).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));

    let log = daemon.origin_dir().join("volumes/v/log");
    let records = std::fs::read_dir(&log).unwrap().count();
    assert_eq!(records, 2, "only the two good puts wrote records");
    daemon.status().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_volume_upload_resumes_without_resending_chunks() {
    // Goal: an upload broken off after 40 MiB publishes nothing (the path stays absent), and
    // uploading the whole 64 MiB file again sends only the 6 chunks the origin lacks: the
    // answer's chunks_uploaded and the origin upload byte counter both show it.
    let seed = test_seed();
    let daemon = Daemon::start().await;
    let client = daemon.client();
    let pattern = Pattern::new(seed);
    let length = 64 * MIB;
    let (body, sender) = channel_body(None);
    let upload = tokio::spawn({
        let client = client.clone();
        async move { client.put_file("v", "big/file", body).await }
    });
    for offset in (0..40 * MIB).step_by(MIB as usize) {
        sender.send(Bytes::from(pattern.bytes(offset..offset + MIB))).await.unwrap();
    }
    let uploaded_before = poll_until("the first 10 chunks in the origin", Duration::from_secs(60), || async {
        let uploaded = daemon.metrics().await.sum("cachemesh_origin_bytes_total", &[("direction", "upload")]);
        (uploaded >= (40 * MIB) as f64).then_some(uploaded)
    })
    .await;
    sender.abort().await;
    assert!(upload.await.unwrap().is_err(), "the broken-off upload must fail");
    assert_eq!(api_code(client.stat_file("v", "big/file").await), ErrorCode::FileNotFound);

    let (answer, digest) = put_file(&client, "v", "big/file", pattern, length).await;
    assert_eq!(answer.chunks_uploaded, 6, "only the chunks after the break are sent");
    let uploaded_after =
        daemon.metrics().await.sum("cachemesh_origin_bytes_total", &[("direction", "upload")]) - uploaded_before;
    eprintln!("origin upload bytes: {uploaded_before} before the break, {uploaded_after} for the resumed upload");
    assert!(uploaded_after < (24 * MIB + MIB) as f64, "the resumed upload sent {uploaded_after} bytes");
    assert!(uploaded_after >= (24 * MIB) as f64);
    assert_eq!(read_file(&client, "v", "big/file", None).await.unwrap().digest.hash(), digest.hash());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_warms_a_directory_from_the_origin_into_a_cold_cache() {
    // Goal: prefetch of a directory on a daemon with an empty cache fetches every chunk of
    // every file under it (and nothing else) into the cache without streaming them; reads
    // afterwards are served locally; a second prefetch finds everything cached.
    let seed = test_seed();
    let writer = Daemon::start().await;
    let mut expected_chunks = 0;
    for i in 0..3u64 {
        let length = 2 * CHUNK + 100 * i + 1;
        put_file(&writer.client(), "m", &format!("warm/f{i}"), Pattern::new(seed.wrapping_add(i)), length).await;
        expected_chunks += length.div_ceil(CHUNK);
    }
    put_file(&writer.client(), "m", "warmer/other", Pattern::new(seed.wrapping_add(1000)), CHUNK).await;
    let cold = Daemon::start_with(DaemonOptions::default().with_origin_url(writer.origin_url())).await;
    let client = cold.client();
    let warmed = client.prefetch("m", vec!["warm".into()]).await.unwrap();
    assert_eq!(
        (warmed.files, warmed.chunks, warmed.chunks_fetched, warmed.chunks_local),
        (3, expected_chunks, expected_chunks, 0)
    );
    assert_eq!(cold.status().await.store.chunk_count, expected_chunks, "only the directory's chunks are cached");
    assert_eq!(cold.metrics().await.sum("cachemesh_bytes_served_total", &[]), 0.0, "nothing was streamed");
    for i in 0..3 {
        read_file(&client, "m", &format!("warm/f{i}"), None).await.unwrap();
    }
    let metrics = cold.metrics().await;
    assert_eq!(metrics.sum("cachemesh_bytes_served_total", &[("source", "origin")]), 0.0, "{}", metrics.text);
    let again = client.prefetch("m", vec!["warm/f1".into(), "".into()]).await.unwrap();
    assert_eq!((again.files, again.chunks_fetched), (4, 1), "the whole volume: only warmer/other is fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_work_over_an_s3_origin_with_concurrent_writers() {
    // Goal: over a real S3-compatible origin (conditional puts with If-None-Match), four
    // writers on two daemons get distinct sequence numbers and both daemons converge on
    // the last one; the records sit at the documented keys.
    let seed = test_seed();
    let moto = Moto::start("cachemesh-volumes").await;
    let options = DaemonOptions::default().with_origin_url(moto.origin_url("vol")).with_env(&moto.env());
    let a = Daemon::start_with(options.clone()).await;
    let b = Daemon::start_with(options).await;
    let clients = [a.client(), b.client()];
    let writers: Vec<_> = (0..4u64)
        .map(|i| {
            let client = clients[i as usize % 2].clone();
            tokio::spawn(
                async move { put_file(&client, "s3v", "p", Pattern::new(seed.wrapping_add(i)), 1000 + i).await },
            )
        })
        .collect();
    let mut answers = Vec::new();
    for writer in writers {
        answers.push(writer.await.unwrap().0);
    }
    let seqs: HashSet<u64> = answers.iter().map(|answer| answer.seq).collect();
    assert_eq!(seqs, (1..=4).collect::<HashSet<u64>>());
    let winner = answers.iter().max_by_key(|answer| answer.seq).unwrap();
    for client in &clients {
        assert_eq!(wait_for_seq(client, "s3v", "p", 4).await.object_id, winner.object_id);
    }
    let keys = moto.list_keys("vol/volumes/s3v/log/").await;
    let expected: Vec<String> = (1..=4u64).map(|seq| format!("vol/volumes/s3v/log/{seq:020}")).collect();
    assert_eq!(keys, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_files_and_prefetch_commands_work() {
    // Goal: `files upload|ls|stat|download|mv|rm` and `prefetch` work against a daemon with
    // --volume or CACHEMESH_VOLUME; `--json` output parses; a missing file is one error line.
    let seed = test_seed();
    let daemon = Daemon::start().await;
    let source = daemon.root().join("source.bin");
    let expected = Pattern::new(seed).write_file(&source, 2 * CHUNK + 3);
    let source_text = source.display().to_string();
    let run = |args: Vec<&str>| {
        let daemon = &daemon;
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let output = daemon.cli(&refs).await;
            assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8(output.stdout).unwrap()
        }
    };
    run(vec!["files", "--volume", "cli", "upload", &source_text, "dir/a.bin"]).await;
    let ls: Vec<FileEntry> =
        serde_json::from_str(&run(vec!["files", "--volume", "cli", "ls", "dir", "--json"]).await).unwrap();
    assert_eq!(ls.len(), 1);
    assert_eq!((ls[0].path.as_str(), ls[0].object_id, ls[0].size), ("dir/a.bin", expected.object_id(), 2 * CHUNK + 3));
    let text = run(vec!["files", "ls", "--volume", "cli"]).await;
    assert!(text.contains("dir/a.bin") && text.contains(&(2 * CHUNK + 3).to_string()), "{text}");
    let stat: FileEntry =
        serde_json::from_str(&run(vec!["files", "--volume", "cli", "stat", "dir/a.bin", "--json"]).await).unwrap();
    assert_eq!(stat, ls[0]);
    run(vec!["files", "--volume", "cli", "mv", "dir/a.bin", "dir/b.bin"]).await;
    let target: PathBuf = daemon.root().join("out.bin");
    run(vec!["files", "--volume", "cli", "download", "dir/b.bin", "-o", &target.display().to_string()]).await;
    assert_eq!(blake3::hash(&std::fs::read(&target).unwrap()), expected.hash());
    let warmed = run(vec!["prefetch", "--volume", "cli", "dir", "--json"]).await;
    let warmed: serde_json::Value = serde_json::from_str(&warmed).unwrap();
    assert_eq!(warmed["files"], 1);

    let socket = daemon.socket().display().to_string();
    let env = [("CACHEMESH_VOLUME".to_string(), "cli".to_string())];
    let args: Vec<String> = ["--socket", &socket, "files", "rm", "dir/b.bin"].iter().map(|s| s.to_string()).collect();
    let removed = daemon::run_cli(&args, None, &env).await;
    assert!(removed.status.success(), "rm with CACHEMESH_VOLUME: {}", String::from_utf8_lossy(&removed.stderr));
    let missing = daemon.cli(&["files", "--volume", "cli", "download", "dir/b.bin"]).await;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.lines().count() == 1 && stderr.contains("file_not_found"), "{stderr:?}");
    let no_volume = daemon.cli(&["files", "ls"]).await;
    assert!(!no_volume.status.success(), "files without a volume must fail");
    let stderr = String::from_utf8_lossy(&no_volume.stderr);
    assert!(stderr.lines().count() == 1 && stderr.contains("--volume"), "{stderr:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_file_of_2_gib_streams_through_a_path() {
    // Goal: a file of 2 GiB + 4321 bytes uploads through a volume path as a stream and reads
    // back whole and by range, identical, without being held in memory.
    let seed = test_seed();
    let daemon = Daemon::start_with(DaemonOptions::default().with_cache_size("8GiB")).await;
    let client = daemon.client();
    let pattern = Pattern::new(seed);
    let length = 2 * GIB + 4321;
    let (answer, digest) = put_file(&client, "big", "models/weights.bin", pattern, length).await;
    assert_eq!(answer.chunks_uploaded, length.div_ceil(CHUNK));
    let read = read_file(&client, "big", "models/weights.bin", None).await.unwrap();
    assert_eq!(read.digest.length(), length);
    assert_eq!(read.digest.hash(), digest.hash());
    let (first, last) = (2 * GIB - 1000, 2 * GIB + 999);
    let range = format!("bytes={first}-{last}");
    let partial = client.get_file("big", "models/weights.bin", Some(&range)).await.unwrap();
    assert_eq!(partial.status(), StatusCode::PARTIAL_CONTENT);
    let partial = read_streamed(partial).await.unwrap();
    let mut expected = StreamDigest::new();
    expected.update(&pattern.bytes(first..last + 1));
    assert_eq!(partial.digest.hash(), expected.hash());
    assert_eq!(client.stat_file("big", "models/weights.bin").await.unwrap().size, length);
}
