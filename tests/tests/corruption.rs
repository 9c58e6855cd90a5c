//! A damaged chunk file is caught by read verification, served correctly anyway from the
//! origin, counted, and repaired.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use cachemesh_tests::data::chunk_path;
use cachemesh_tests::*;
use rand::{Rng, SeedableRng};

fn file_is_chunk(path: &std::path::Path, chunk: &cachemesh_proto::ChunkId) -> bool {
    std::fs::read(path).is_ok_and(|bytes| chunk.matches(&bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_chunk_file_is_detected_served_right_and_repaired() {
    // Goal: after one byte of a cached chunk file is flipped, GET still returns the right
    // bytes, cachemesh_verify_failures_total{source="local"} counts the failure, and the
    // chunk file holds the right bytes again afterwards.
    let seed = test_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let daemon = Daemon::start_with(DaemonOptions::default().with_args(&["--verify-reads", "true"])).await;
    let client = daemon.client();
    assert!(daemon.status().await.store.verify_reads, "--verify-reads true is reported");
    let (id, digest) = put_checked(&client, Pattern::new(seed), 2 * CHUNK + 777).await;
    let chunks = digest.chunks();
    let victim = chunks[rng.random_range(0..chunks.len())];
    let path = chunk_path(daemon.data_dir(), &victim);
    assert!(file_is_chunk(&path, &victim), "chunk file {} holds the chunk after the put", path.display());

    let length = std::fs::metadata(&path).unwrap().len();
    let offset = rng.random_range(0..length);
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&[byte[0] ^ 0x5a]).unwrap();
    file.sync_all().unwrap();
    drop(file);
    eprintln!("flipped byte {offset} of chunk {victim}");

    assert_reads_back(&client, &id, &digest).await;
    let metrics = daemon.metrics().await;
    let failures = metrics.sum("cachemesh_verify_failures_total", &[("source", "local")]);
    assert!(failures >= 1.0, "verify_failures_total{{source=\"local\"}} = {failures}\n{}", metrics.text);
    poll_until("the corrupt chunk file to be rewritten with the right bytes", Duration::from_secs(30), || {
        let repaired = file_is_chunk(&path, &victim);
        async move { repaired.then_some(()) }
    })
    .await;
    assert_reads_back(&client, &id, &digest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_chunk_file_is_served_right_and_repaired() {
    // Goal: a cached chunk file cut short (as a disk fault would leave it) does not make GET
    // return short or wrong bytes; the object reads back identical and the file is repaired.
    let seed = test_seed();
    let daemon = Daemon::start_with(DaemonOptions::default().with_args(&["--verify-reads", "true"])).await;
    let client = daemon.client();
    let (id, digest) = put_checked(&client, Pattern::new(seed), 2 * CHUNK + 777).await;
    let victim = digest.chunks()[0];
    let path = chunk_path(daemon.data_dir(), &victim);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(CHUNK / 2).unwrap();
    drop(file);

    assert_reads_back(&client, &id, &digest).await;
    poll_until("the truncated chunk file to be rewritten with the right bytes", Duration::from_secs(30), || {
        let repaired = file_is_chunk(&path, &victim);
        async move { repaired.then_some(()) }
    })
    .await;
    daemon.status().await;
}
