//! The store holds its byte budget under a stream of puts and gets, and refetches what it
//! evicted.

use cachemesh_tests::*;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1024 * 1024;

async fn assert_within_budget(daemon: &Daemon, after: &str) -> u64 {
    let status = daemon.status().await;
    assert_eq!(status.store.budget_bytes, 64 * MIB, "budget from --cache-size 64MiB");
    assert!(
        status.store.used_bytes <= status.store.budget_bytes,
        "after {after}: used_bytes {} > budget_bytes {} ({:?})",
        status.store.used_bytes,
        status.store.budget_bytes,
        status.store
    );
    status.store.evicted_chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_used_bytes_within_budget_and_refetches_from_origin() {
    // Goal: with a 64 MiB cache, a seeded stream of puts and gets of ~600 MiB of distinct
    // objects never leaves used_bytes above budget_bytes after an operation; chunks get
    // evicted; and every object still reads back identical (evicted chunks refetched).
    let seed = test_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let daemon = Daemon::start_with(DaemonOptions::default().with_cache_size("64MiB")).await;
    let client = daemon.client();
    let mut objects = Vec::new();
    let mut total = 0;
    while total < 600 * MIB {
        let length = rng.random_range(1..=24 * MIB);
        let pattern = Pattern::new(seed.wrapping_add(1 + objects.len() as u64));
        let (id, digest) = put_checked(&client, pattern, length).await;
        total += length;
        assert_within_budget(&daemon, &format!("put #{} of {length} bytes", objects.len())).await;
        objects.push((id, digest));
        if rng.random_bool(0.5) {
            let pick = rng.random_range(0..objects.len());
            let (id, digest) = &objects[pick];
            assert_reads_back(&client, id, digest).await;
            assert_within_budget(&daemon, &format!("get of object #{pick}")).await;
        }
    }
    eprintln!("{} objects, {total} bytes put", objects.len());
    for (index, (id, digest)) in objects.iter().enumerate() {
        assert_reads_back(&client, id, digest).await;
        assert_within_budget(&daemon, &format!("final get of object #{index}")).await;
    }
    let evicted = assert_within_budget(&daemon, "the final gets").await;
    assert!(evicted > 0, "600 MiB through a 64 MiB cache evicted no chunk");
    let metrics = daemon.metrics().await;
    assert!(metrics.sum("cachemesh_evicted_chunks_total", &[]) > 0.0, "evicted_chunks_total\n{}", metrics.text);
    assert!(
        metrics.sum("cachemesh_bytes_served_total", &[("source", "origin")]) > 0.0,
        "evicted chunks were read back without a single byte from the origin\n{}",
        metrics.text
    );
    assert!(
        metrics.sum("cachemesh_cache_used_bytes", &[]) <= metrics.sum("cachemesh_cache_budget_bytes", &[]),
        "gauges: used above budget\n{}",
        metrics.text
    );
}
