//! Objects of every size go in and come back out identical, streamed both ways.

use cachemesh_tests::body::file_body;
use cachemesh_tests::data::PIECE_BYTES;
use cachemesh_tests::*;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

const GIB: u64 = 1024 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gib_object_round_trips_streamed_from_and_to_files() {
    // Goal: a 2 GiB + 12345 byte object streamed from a file comes back byte-identical
    // (streamed into a file, compared by BLAKE3 of the whole stream), under the id its
    // chunks imply, and no part of it is ever held in memory whole.
    let seed = test_seed();
    let daemon = Daemon::start_with(DaemonOptions::default().with_cache_size("8GiB")).await;
    let client = daemon.client();
    let length = 2 * GIB + 12345;
    let source = daemon.root().join("source.bin");
    let expected = {
        let source = source.clone();
        tokio::task::spawn_blocking(move || Pattern::new(seed).write_file(&source, length)).await.unwrap()
    };

    let (body, producer) = file_body(&source);
    let answer = client.put_object(body).await.unwrap();
    let sent = producer.await.unwrap().unwrap();
    assert_eq!(sent.hash(), expected.hash(), "the body sent is the file");
    assert_eq!(answer.object_id, expected.object_id(), "object id");
    assert_eq!(answer.length, length);
    assert_eq!(answer.chunk_count, length.div_ceil(CHUNK));
    assert_eq!(answer.chunks_uploaded, answer.chunk_count, "every chunk of new data is uploaded");
    std::fs::remove_file(&source).unwrap();

    let response = client.get_object(&answer.object_id, None).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(response.headers()["content-length"].to_str().unwrap(), length.to_string());
    let target = daemon.root().join("readback.bin");
    let mut file = tokio::io::BufWriter::with_capacity(PIECE_BYTES, tokio::fs::File::create(&target).await.unwrap());
    let mut received = StreamDigest::new();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received.update(&data);
            file.write_all(&data).await.unwrap();
        }
    }
    file.flush().await.unwrap();
    assert_eq!(received.length(), length, "bytes read back");
    assert_eq!(received.hash(), expected.hash(), "BLAKE3 of the bytes read back");
    assert_eq!(std::fs::metadata(&target).unwrap().len(), length);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_at_chunk_size_edges_round_trip() {
    // Goal: empty, 1-byte, and chunk-size +-1 objects round trip with the ids and chunk
    // counts their chunks imply, sent with Content-Length or chunked; putting the same bytes
    // again gives the same id and uploads nothing.
    let seed = test_seed();
    let daemon = Daemon::start().await;
    let client = daemon.client();
    for (index, length) in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK].into_iter().enumerate() {
        let pattern = Pattern::new(seed.wrapping_add(index as u64));
        let options = PatternBodyOptions { content_length: index % 2 == 0, ..Default::default() };
        let (body, producer) = pattern_body(pattern, length, options);
        let answer = client.put_object(body).await.unwrap_or_else(|error| panic!("put of {length} bytes: {error}"));
        let digest = producer.await.unwrap().unwrap();
        assert_eq!(answer.object_id, digest.object_id(), "id of {length} bytes");
        assert_eq!(answer.length, length);
        assert_eq!(answer.chunk_count, length.div_ceil(CHUNK), "chunk count of {length} bytes");
        assert_reads_back(&client, &answer.object_id, &digest).await;
    }

    // A 4 KiB tail: a 1-byte tail could be the very chunk of an object put above (1 in
    // 128 seeds), which the origin already holds, and the first put would upload one chunk.
    let pattern = Pattern::new(seed.wrapping_add(100));
    let (first, _) = put_pattern(&client, pattern, CHUNK + 4096).await;
    let (second, digest) = put_pattern(&client, pattern, CHUNK + 4096).await;
    assert_eq!(first.object_id, second.object_id);
    assert_eq!(first.chunks_uploaded, 2);
    assert_eq!(second.chunks_uploaded, 0, "a second put of the same bytes uploads no chunk");
    assert_reads_back(&client, &second.object_id, &digest).await;
}
