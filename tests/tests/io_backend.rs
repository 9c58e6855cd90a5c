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
