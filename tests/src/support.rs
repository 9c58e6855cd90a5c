//! Seeds, polling with a deadline, and locating the built binaries.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often [`poll_until`] looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The seed of this test run: `CACHEMESH_TEST_SEED` when set, otherwise random. Printed, so
/// a failing run's output says how to repeat it.
pub fn test_seed() -> u64 {
    let seed = match std::env::var("CACHEMESH_TEST_SEED") {
        Ok(text) => text.parse().expect("CACHEMESH_TEST_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("seed = {seed} (repeat with CACHEMESH_TEST_SEED={seed})");
    seed
}

/// Calls `check` until it returns `Some`, or panics after `timeout` saying what never
/// happened. Waiting is by polling a condition, never by sleeping a guessed time.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `target/debug` (or whichever profile dir this test binary was built into).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    if deps.file_name().is_some_and(|name| name == "deps") {
        deps.parent().unwrap().to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Path of a workspace binary; panics with the build command when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build -p cachemesh-daemon`, or run the tests with `cargo nextest run --workspace`)",
        path.display()
    );
    path
}

/// The last `lines` lines of a file (or a note that it cannot be read).
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}
