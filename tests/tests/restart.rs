//! A graceful restart keeps the local cache: cached objects are served without the origin.

use cachemesh_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_cached_objects_locally_after_origin_is_emptied() {
    // Goal: objects put before a SIGTERM restart read back identical afterwards even though
    // the origin directory has been emptied, and /metrics counts those bytes as served from
    // the local store, none from the origin.
    let seed = test_seed();
    let mut daemon = Daemon::start().await;
    let client = daemon.client();
    let mut objects = Vec::new();
    for (index, length) in [10 * CHUNK / 4 + 7, 1, 2 * CHUNK].into_iter().enumerate() {
        objects.push(put_checked(&client, Pattern::new(seed.wrapping_add(index as u64)), length).await);
    }
    let before = daemon.status().await;
    assert!(before.store.chunk_count >= 4, "chunks held before the restart: {:?}", before.store);

    let exit = daemon.stop().await;
    assert!(exit.success(), "cachemeshd should exit cleanly on SIGTERM, got {exit}");
    for entry in std::fs::read_dir(daemon.origin_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { std::fs::remove_dir_all(&path).unwrap() } else { std::fs::remove_file(&path).unwrap() }
    }
    daemon.start_again().await;

    let after = daemon.status().await;
    assert_eq!(after.store.chunk_count, before.store.chunk_count, "chunks held after the restart");
    assert_eq!(after.store.used_bytes, before.store.used_bytes, "bytes held after the restart");
    let mut total = 0;
    for (id, digest) in &objects {
        assert_reads_back(&client, id, digest).await;
        total += digest.length();
    }
    let metrics = daemon.metrics().await;
    let local = metrics.sum("cachemesh_bytes_served_total", &[("source", "local")]);
    let origin = metrics.sum("cachemesh_bytes_served_total", &[("source", "origin")]);
    assert!(local >= total as f64, "bytes served locally {local} < {total}\n{}", metrics.text);
    assert_eq!(origin, 0.0, "bytes served from the (empty) origin\n{}", metrics.text);
}
