//! Both chunk I/O backends serve the same bytes and say which one is in use.

use cachemesh_tests::*;

async fn round_trip_on(backend_flag: &str, reported: &str, seed: u64) {
    let mut daemon = Daemon::start_with(DaemonOptions::default().with_args(&["--io-backend", backend_flag])).await;
    let status = daemon.status().await;
    assert_eq!(
        status.store.io_backend, reported,
        "--io-backend {backend_flag} (reason: {})",
        status.store.io_backend_reason
    );
    let client = daemon.client();
    let (id, digest) = put_checked(&client, Pattern::new(seed), 10 * CHUNK / 4 + 1).await;
    assert_reads_back(&client, &id, &digest).await;
    // After a restart the bytes can only come from the chunk files, through this backend.
    daemon.restart().await;
    assert_eq!(daemon.status().await.store.io_backend, reported, "after restart");
    assert_reads_back(&client, &id, &digest).await;
    let read = get_streamed(&client, &id, Some(&format!("bytes={}-{}", CHUNK - 3, 2 * CHUNK + 2))).await.unwrap();
    assert_eq!(
        read.digest.hash(),
        blake3::hash(&Pattern::new(seed).bytes(CHUNK - 3..2 * CHUNK + 3)),
        "range across chunks"
    );
    let metrics = daemon.metrics().await;
    assert!(
        metrics.sum("cachemesh_bytes_served_total", &[("source", "local")]) >= digest.length() as f64,
        "{}",
        metrics.text
    );
    assert_eq!(metrics.sum("cachemesh_bytes_served_total", &[("source", "origin")]), 0.0, "{}", metrics.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portable_backend_reports_portable_and_round_trips() {
    // Goal: `--io-backend portable` is reported as "portable" and serves identical bytes
    // from its chunk files, before and after a restart.
    round_trip_on("portable", "portable", test_seed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_backend_reports_io_uring_and_round_trips() {
    // Goal: `--io-backend io-uring` (io_uring works on this machine) is reported as
    // "io_uring" and serves identical bytes from its chunk files, before and after a restart.
    round_trip_on("io-uring", "io_uring", test_seed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_backend_picks_one_and_says_why() {
    // Goal: `--io-backend auto` settles on one of the two backends and gives a reason.
    let daemon = Daemon::start_with(DaemonOptions::default().with_args(&["--io-backend", "auto"])).await;
    let status = daemon.status().await;
    assert!(
        ["io_uring", "portable"].contains(&status.store.io_backend.as_str()),
        "io_backend {:?}",
        status.store.io_backend
    );
    assert!(!status.store.io_backend_reason.is_empty(), "io_backend_reason is empty");
}

/// A directory on the disk the build is on: a real filesystem for data dirs whose direct
/// writes are under test (the system's temporary directory may be a tmpfs).
fn on_disk() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// How long fetched chunks may take to reach the store after their reader has them.
const STORED_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// A reader that takes an object of three full chunks and a short one from the origin
/// stores all four, three of them with direct writes when `direct_flag` allows them (the
/// short one is not whole blocks), and serves it all from its disk after a restart.
async fn origin_chunks_are_stored(backend: &str, direct_flag: &str, expect_direct: bool) {
    let seed = test_seed();
    let writer = Daemon::start_with(DaemonOptions::default().in_dir(&on_disk())).await;
    let (id, digest) = put_checked(&writer.client(), Pattern::new(seed), 3 * CHUNK + CHUNK / 2 + 1).await;
    let mut reader = Daemon::start_with(
        DaemonOptions::default().in_dir(&on_disk()).with_origin_url(writer.origin_url()).with_args(&[
            "--io-backend",
            backend,
            "--direct-writes",
            direct_flag,
        ]),
    )
    .await;
    let store = reader.status().await.store;
    assert_eq!(store.direct_writes, expect_direct, "direct writes: {}", store.direct_writes_reason);
    assert!(!store.direct_writes_reason.is_empty());
    assert_reads_back(&reader.client(), &id, &digest).await;
    poll_until("the four fetched chunks to be stored", STORED_DEADLINE, || async {
        (reader.status().await.store.chunk_count == 4).then_some(())
    })
    .await;
    let metrics = reader.metrics().await;
    let direct = metrics.sum("cachemesh_store_direct_writes_total", &[]);
    assert_eq!(direct, if expect_direct { 3.0 } else { 0.0 }, "{}", metrics.text);
    // After a restart the bytes can only come from the chunk files (hash-checked on read).
    reader.restart().await;
    assert_reads_back(&reader.client(), &id, &digest).await;
    let metrics = reader.metrics().await;
    assert_eq!(metrics.sum("cachemesh_bytes_served_total", &[("source", "origin")]), 0.0, "{}", metrics.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_chunks_from_the_origin_are_written_past_the_page_cache_with_io_uring() {
    // Goal: on a filesystem that takes O_DIRECT, full chunks fetched from the origin are
    // written with it through the io_uring backend, and read back intact after a restart.
    origin_chunks_are_stored("io-uring", "true", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_chunks_from_the_origin_are_written_past_the_page_cache_with_the_portable_backend() {
    // Goal: the same through the portable backend.
    origin_chunks_are_stored("portable", "true", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_can_be_turned_off() {
    // Goal: `--direct-writes false` writes every chunk through the page cache, says so in
    // the status, and loses nothing.
    origin_chunks_are_stored("auto", "false", false).await;
}
