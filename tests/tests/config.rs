//! Configuration sources and their precedence: flag > environment > config file > default.

use std::time::Duration;

use cachemesh_tests::daemon::clean_env_tokio;
use cachemesh_tests::support::binary;
use cachemesh_tests::*;

const MIB: u64 = 1024 * 1024;

/// A daemon whose paths and settings come from a config file (`extra` adds TOML lines),
/// started with `--config` or `CACHEMESH_CONFIG`, plus these options.
async fn daemon_from_config(cache_size: &str, extra: &str, by_env: bool, mut options: DaemonOptions) -> Daemon {
    options.path_flags = false;
    let mut daemon = Daemon::new(options);
    let config = daemon.root().join("cachemeshd.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\napi_socket = {:?}\norigin = {:?}\ncache_size = {cache_size:?}\n{extra}",
            daemon.data_dir().display().to_string(),
            daemon.socket().display().to_string(),
            daemon.origin_url(),
        ),
    )
    .unwrap();
    let options = daemon.options_mut();
    if by_env {
        options.env.push(("CACHEMESH_CONFIG".into(), config.display().to_string()));
    } else {
        options.args.splice(0..0, ["--config".to_string(), config.display().to_string()]);
    }
    daemon.start_again().await;
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_size_comes_from_flag_then_env_then_config_file() {
    // Goal: cache_size set in a config file is used; CACHEMESH_CACHE_SIZE overrides it; the
    // --cache-size flag overrides both (seen in status.store.budget_bytes); the file is
    // found by --config and by CACHEMESH_CONFIG; and its paths are used.
    let none = DaemonOptions { cache_size: None, ..Default::default() };
    let file_only = daemon_from_config("100MiB", "", false, none.clone()).await;
    let status = file_only.status().await;
    assert_eq!(status.store.budget_bytes, 100 * MIB, "config file cache_size");
    assert_eq!(std::path::Path::new(&status.store.data_dir), file_only.data_dir(), "config file data_dir");

    let by_env_config = daemon_from_config("100MiB", "", true, none.clone()).await;
    assert_eq!(by_env_config.status().await.store.budget_bytes, 100 * MIB, "config file named by CACHEMESH_CONFIG");

    let env = none.clone().with_env(&[("CACHEMESH_CACHE_SIZE".into(), "200MiB".into())]);
    let env_over_file = daemon_from_config("100MiB", "", false, env.clone()).await;
    assert_eq!(env_over_file.status().await.store.budget_bytes, 200 * MIB, "env over config file");

    let flag = env.with_cache_size("300MiB");
    let flag_over_both = daemon_from_config("100MiB", "", false, flag).await;
    assert_eq!(flag_over_both.status().await.store.budget_bytes, 300 * MIB, "flag over env and config file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_settings_follow_the_same_precedence() {
    // Goal: verify_reads and io_backend from a config file are used, and the environment
    // overrides them; sizes are read in MiB, GiB and plain bytes.
    let none = DaemonOptions { cache_size: None, ..Default::default() };
    let from_file =
        daemon_from_config("1GiB", "verify_reads = false\nio_backend = \"portable\"\n", false, none.clone()).await;
    let status = from_file.status().await;
    assert_eq!(status.store.budget_bytes, 1024 * MIB, "1GiB");
    assert!(!status.store.verify_reads, "verify_reads = false from the file");
    assert_eq!(status.store.io_backend, "portable", "io_backend from the file");

    let env = none.with_env(&[
        ("CACHEMESH_VERIFY_READS".into(), "true".into()),
        ("CACHEMESH_CACHE_SIZE".into(), "123456789".into()),
    ]);
    let from_env = daemon_from_config("1GiB", "verify_reads = false\nio_backend = \"portable\"\n", false, env).await;
    let status = from_env.status().await;
    assert!(status.store.verify_reads, "CACHEMESH_VERIFY_READS over the file");
    assert_eq!(status.store.budget_bytes, 123_456_789, "plain bytes");

    let by_flags =
        Daemon::start_with(DaemonOptions::default().with_cache_size("64MiB").with_args(&["--verify-reads", "false"]))
            .await;
    let status = by_flags.status().await;
    assert_eq!(status.store.budget_bytes, 64 * MIB);
    assert!(!status.store.verify_reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_cache_size_is_refused_at_start() {
    // Goal: cachemeshd given a cache size it cannot read exits non-zero with a message
    // instead of starting with some other budget.
    let root = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(binary("cachemeshd"));
    command
        .args(["--data-dir", &root.path().join("data").display().to_string()])
        .args(["--api-socket", &root.path().join("api.sock").display().to_string()])
        .args(["--origin", &format!("file://{}", root.path().display())])
        .args(["--cache-size", "lots"])
        .kill_on_drop(true);
    clean_env_tokio(&mut command);
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("cachemeshd --cache-size lots is still running after 30 s")
        .unwrap();
    assert!(!output.status.success(), "cachemeshd --cache-size lots exited {}", output.status);
    assert!(!output.stderr.is_empty(), "no message on stderr");
}
