//! A full disk under the cache loses nothing: puts and gets go on through the origin.

use std::path::{Path, PathBuf};
use std::process::Command;

use cachemesh_tests::*;

/// Size of the small filesystem the data directory lives on.
const TMPFS_MIB: u64 = 24;
/// How long chunk writes still in flight after the reads may take to fail or land.
const SETTLE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// A tmpfs mounted for the test's lifetime (needs root, as CI has).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size_mib: u64) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m,mode=0700"), "tmpfs"])
            .arg(path)
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a {size_mib} MiB tmpfs at {} failed: this test needs root", path.display());
        Self(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a daemon still holding files (after a failed assertion) must not block it.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_under_the_cache_loses_nothing() {
    // Goal: with the data directory on a 24 MiB filesystem and a 1 GiB budget (so the budget
    // never triggers eviction and writes hit ENOSPC), puts of 64 MiB objects still succeed
    // because the origin holds every chunk; every object reads back identical; the daemon
    // counts the chunks it could not keep; and after a stop the store checks clean with no
    // temp file left behind.
    let seed = test_seed();
    let mut daemon = Daemon::new(DaemonOptions::default().with_cache_size("1GiB"));
    let tmpfs = Tmpfs::mount(daemon.data_dir(), TMPFS_MIB);
    daemon.start_again().await;
    let client = daemon.client();
    let mut objects = Vec::new();
    for index in 0..3u64 {
        objects.push(put_checked(&client, Pattern::new(seed.wrapping_add(index)), 16 * CHUNK + 123).await);
    }
    for (id, digest) in &objects {
        assert_reads_back(&client, id, digest).await;
    }
    let metrics = daemon.metrics().await;
    let write_errors = metrics.sum("cachemesh_store_write_errors_total", &[]);
    assert!(write_errors > 0.0, "expected chunks the full disk could not keep\n{}", metrics.text);
    // `used_bytes` counts space reserved by writes still in flight: a read answers before
    // the chunks it fetched are stored, so the last ones may still be on their way to a
    // full disk. Once they have failed or landed, what is held fits the filesystem.
    poll_until("the store's used bytes to fit the filesystem", SETTLE_DEADLINE, || async {
        (daemon.status().await.store.used_bytes <= TMPFS_MIB << 20).then_some(())
    })
    .await;

    let exit = daemon.stop().await;
    assert!(exit.success(), "cachemeshd should exit cleanly on SIGTERM, got {exit}");
    let check = daemon.check().await;
    assert!(check.status.success(), "store check failed: {}", String::from_utf8_lossy(&check.stdout));
    let temp_files = std::fs::read_dir(daemon.data_dir().join("tmp")).unwrap().count();
    assert_eq!(temp_files, 0, "temp files left in the data directory");
    drop(tmpfs);
}
