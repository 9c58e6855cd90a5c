//! kill -9 in the middle of puts never loses or corrupts an acknowledged object.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cachemesh_proto::api::ErrorCode;
use cachemesh_tests::data::files_under;
use cachemesh_tests::*;
use rand::{Rng, SeedableRng};

const ROUNDS: u64 = 8;
const PUTS_PER_ROUND: u64 = 4;

/// When a round's SIGKILL lands.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// Once this many body bytes (over all puts) were handed to the socket.
    BytesSent(u64),
    /// Once every body was sent, while the daemon still uploads and publishes.
    BodiesSent,
    /// Once this many puts were answered (the others are still in flight).
    Answered(u64),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_concurrent_puts_loses_no_acknowledged_object() {
    // Goal: over 8 rounds of several concurrent puts cut short by SIGKILL at a seeded point
    // (bytes sent, all bodies sent, or some puts answered), every put that was acknowledged reads back identical after
    // each restart, an unacknowledged put is either absent or whole, DATA/tmp is empty
    // after each restart, and `cachemeshd check` finds the store clean at the end.
    let seed = test_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut daemon = Daemon::start().await;
    let client = daemon.client();
    let mut acknowledged = Vec::new();
    let mut unacknowledged = Vec::new();
    for round in 0..ROUNDS {
        let lengths: Vec<u64> = (0..PUTS_PER_ROUND)
            .map(|_| match rng.random_range(0..4) {
                0 => CHUNK - 1,
                1 => CHUNK,
                2 => CHUNK + 1,
                _ => rng.random_range(1..3 * CHUNK),
            })
            .collect();
        let total: u64 = lengths.iter().sum();
        // Kill modes cycle by round so every run has rounds with acknowledged puts; their
        // parameters come from the seed.
        let kill = match round % 4 {
            0 => KillPoint::BytesSent(rng.random_range(0..total)),
            1 | 3 => KillPoint::Answered(rng.random_range(1..PUTS_PER_ROUND)),
            _ => KillPoint::BodiesSent,
        };
        let sent = Arc::new(AtomicU64::new(0));
        let mut puts = Vec::new();
        for (index, &length) in lengths.iter().enumerate() {
            let pattern = Pattern::new(seed.wrapping_add(1 + round * PUTS_PER_ROUND + index as u64));
            let options = PatternBodyOptions {
                content_length: rng.random_bool(0.5),
                progress: Some(sent.clone()),
                ..Default::default()
            };
            let (body, producer) = pattern_body(pattern, length, options);
            let client = client.clone();
            puts.push((pattern, length, tokio::spawn(async move { client.put_object(body).await }), producer));
        }
        poll_until("the seeded kill point", Duration::from_secs(120), || {
            let answered = puts.iter().filter(|(_, _, put, _)| put.is_finished()).count() as u64;
            let sent = sent.load(Ordering::SeqCst);
            let reached = answered == PUTS_PER_ROUND
                || match kill {
                    KillPoint::BytesSent(bytes) => sent >= bytes,
                    KillPoint::BodiesSent => sent >= total,
                    KillPoint::Answered(count) => answered >= count,
                };
            async move { reached.then_some(()) }
        })
        .await;
        daemon.kill9();

        let mut answered = 0;
        for (pattern, length, put, producer) in puts {
            let answer =
                tokio::time::timeout(Duration::from_secs(60), put).await.expect("put not over after kill -9").unwrap();
            let _ = producer.await.unwrap();
            let expected = pattern.digest(length);
            match answer {
                Ok(answer) => {
                    assert_eq!(answer.object_id, expected.object_id(), "acknowledged id (round {round})");
                    acknowledged.push((answer.object_id, expected));
                    answered += 1;
                }
                Err(_) => unacknowledged.push((expected.object_id(), expected)),
            }
        }
        eprintln!("round {round}: lengths {lengths:?} ({total} bytes), killed at {kill:?}, {answered} acknowledged");

        daemon.start_again().await;
        let leftovers = files_under(&daemon.data_dir().join("tmp"));
        assert!(leftovers.is_empty(), "round {round}: files left in DATA/tmp after restart: {leftovers:?}");
        for (id, digest) in &acknowledged {
            assert_reads_back(&client, id, digest).await;
        }
        for (id, digest) in &unacknowledged {
            match get_streamed(&client, id, None).await {
                Ok(read) => {
                    assert_eq!(
                        read.digest.hash(),
                        digest.hash(),
                        "round {round}: an unacknowledged object {id} is readable but wrong"
                    );
                }
                Err(ClientError::Api { code: ErrorCode::ObjectNotFound, .. }) => {}
                Err(error) => panic!("round {round}: GET of unacknowledged {id}: {error}"),
            }
        }
    }
    assert!(!acknowledged.is_empty(), "no put was ever acknowledged; the kill points are too early to test anything");

    let exit = daemon.stop().await;
    assert!(exit.success(), "cachemeshd exit on SIGTERM: {exit}");
    let check = daemon.check().await;
    let stdout = String::from_utf8_lossy(&check.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        panic!("check --json printed {stdout:?}; stderr {}", String::from_utf8_lossy(&check.stderr))
    });
    eprintln!("check: {report}");
    assert_eq!(report["corrupt_chunks"], 0, "{report}");
    assert_eq!(report["missing_files"], 0, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["chunks_checked"].as_u64().unwrap() > 0, "{report}");
    assert!(check.status.success(), "check exit status {} with {report}", check.status);
}
