//! The `cachemesh` command line: output formats, round trips, error lines, `--help`.

use std::process::Output;

use cachemesh_proto::ObjectId;
use cachemesh_proto::api::{PutObjectResponse, StatusResponse};
use cachemesh_tests::daemon::{run_cli, run_daemon_binary};
use cachemesh_tests::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_ok(output: &Output, what: &str) {
    assert!(output.status.success(), "{what}: exit {}; stderr {}", output.status, text(&output.stderr));
}

fn assert_one_error_line(output: &Output, what: &str) {
    assert!(!output.status.success(), "{what} should fail; stdout {}", text(&output.stdout));
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "{what}: stderr should be one `error: ` line, got {stderr:?}"
    );
    assert!(output.stdout.is_empty(), "{what}: nothing on stdout, got {:?}", text(&output.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_put_prints_only_the_id_and_get_round_trips() {
    // Goal: `put FILE` and `put -` print exactly the object id and a newline, `put --json`
    // prints the PutObjectResponse, and `get ID -o FILE` and `get ID` (stdout) return the
    // bytes; CACHEMESH_SOCKET works in place of --socket.
    let seed = test_seed();
    let daemon = Daemon::start().await;
    let length = 9 * CHUNK / 4 + 5;
    let source = daemon.root().join("source.bin");
    let expected = Pattern::new(seed).write_file(&source, length);
    let source_text = source.display().to_string();
    let id = expected.object_id();

    let put = daemon.cli(&["put", &source_text]).await;
    assert_ok(&put, "put FILE");
    assert_eq!(text(&put.stdout), format!("{id}\n"), "put prints the id and a newline only");

    let mut args = vec!["--socket".to_string(), daemon.socket().display().to_string(), "put".into(), "-".into()];
    let from_stdin = run_cli(&args, Some(&source), &[]).await;
    assert_ok(&from_stdin, "put -");
    assert_eq!(text(&from_stdin.stdout), format!("{id}\n"), "put - prints the same id");

    let json = daemon.cli(&["put", "--json", &source_text]).await;
    assert_ok(&json, "put --json");
    let answer: PutObjectResponse = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|error| panic!("put --json: {error}: {}", text(&json.stdout)));
    assert_eq!((answer.object_id, answer.length, answer.chunk_count, answer.chunks_uploaded), (id, length, 3, 0));

    let target = daemon.root().join("out.bin");
    let get = daemon.cli(&["get", &id.to_string(), "-o", &target.display().to_string()]).await;
    assert_ok(&get, "get -o");
    let written = std::fs::read(&target).unwrap();
    assert_eq!(written.len() as u64, length);
    assert_eq!(blake3::hash(&written), expected.hash(), "get -o FILE content");

    // Through the page cache on request, over a longer partial file an earlier attempt
    // left behind: the same bytes, nothing of the stale file's tail.
    let buffered_target = daemon.root().join("buffered.bin");
    let partial = daemon.root().join(".buffered.bin.cachemesh-partial");
    std::fs::write(&partial, vec![0xAA; length as usize + 4096]).unwrap();
    let buffered =
        daemon.cli(&["get", &id.to_string(), "--buffered", "-o", &buffered_target.display().to_string()]).await;
    assert_ok(&buffered, "get --buffered -o");
    assert_eq!(std::fs::read(&buffered_target).unwrap(), written, "get --buffered -o FILE content");
    assert!(!partial.exists(), "the partial file became the target");

    let to_stdout = daemon.cli(&["get", &id.to_string()]).await;
    assert_ok(&to_stdout, "get to stdout");
    assert_eq!(to_stdout.stdout.len() as u64, length);
    assert_eq!(blake3::hash(&to_stdout.stdout), expected.hash(), "get to stdout content");

    args = vec!["get".into(), id.to_string()];
    let env = [("CACHEMESH_SOCKET".to_string(), daemon.socket().display().to_string())];
    let by_env = run_cli(&args, None, &env).await;
    assert_ok(&by_env, "get with CACHEMESH_SOCKET");
    assert_eq!(blake3::hash(&by_env.stdout), expected.hash());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_status_prints_text_and_parseable_json() {
    // Goal: `status` succeeds with some text, and `status --json` prints a StatusResponse
    // matching the API's.
    let daemon = Daemon::start().await;
    let plain = daemon.cli(&["status"]).await;
    assert_ok(&plain, "status");
    assert!(!plain.stdout.is_empty(), "status prints something");
    assert!(text(&plain.stdout).contains("mesh:        off"), "a single node says so: {}", text(&plain.stdout));
    let peers = daemon.cli(&["peers"]).await;
    assert_ok(&peers, "peers");
    assert!(text(&peers.stdout).starts_with("no peers"), "{}", text(&peers.stdout));
    let json = daemon.cli(&["status", "--json"]).await;
    assert_ok(&json, "status --json");
    let status: StatusResponse = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|error| panic!("status --json: {error}: {}", text(&json.stdout)));
    let api = daemon.status().await;
    assert_eq!(status.store.budget_bytes, api.store.budget_bytes);
    assert_eq!(status.store.data_dir, api.store.data_dir);
    assert_eq!(status.origin, api.origin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_failures_print_one_error_line_and_exit_nonzero() {
    // Goal: an unknown id, a malformed id, a missing input file and an unreachable daemon
    // each make the CLI exit non-zero with exactly one `error: ` line on stderr.
    let daemon = Daemon::start().await;
    let unknown = ObjectId::of(b"never stored").to_string();
    assert_one_error_line(&daemon.cli(&["get", &unknown]).await, "get of an unknown id");
    let target = daemon.root().join("never.bin");
    assert_one_error_line(
        &daemon.cli(&["get", &unknown, "-o", &target.display().to_string()]).await,
        "get -o of an unknown id",
    );
    assert_one_error_line(&daemon.cli(&["get", "not-an-id"]).await, "get of a malformed id");
    assert_one_error_line(&daemon.cli(&["put", "/nonexistent/file"]).await, "put of a missing file");
    let nowhere = daemon.root().join("nobody-listens.sock").display().to_string();
    let args = vec!["--socket".to_string(), nowhere, "status".into()];
    assert_one_error_line(&run_cli(&args, None, &[]).await, "status with no daemon");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_works_for_every_command() {
    // Goal: `--help` succeeds and prints usage for cachemeshd and its subcommands,
    // cachemesh, and each cachemesh subcommand.
    for args in [vec!["--help"], vec!["run", "--help"], vec!["check", "--help"]] {
        let output = run_daemon_binary(&args).await;
        assert_ok(&output, &format!("cachemeshd {args:?}"));
        assert!(text(&output.stdout).contains("Usage"), "cachemeshd {args:?}: {}", text(&output.stdout));
    }
    for args in [
        ["--help"].as_slice(),
        &["put", "--help"],
        &["get", "--help"],
        &["status", "--help"],
        &["pin", "--help"],
        &["unpin", "--help"],
    ] {
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        let output = run_cli(&args, None, &[]).await;
        assert_ok(&output, &format!("cachemesh {args:?}"));
        assert!(text(&output.stdout).contains("Usage"), "cachemesh {args:?}: {}", text(&output.stdout));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_get_into_a_special_file_writes_through_it_and_leaves_it_in_place() {
    // Goal (regression: `get -o /dev/null` as root renamed a temp file over the device):
    // `get -o FIFO` writes the object's bytes through the FIFO and the FIFO is still a FIFO
    // afterwards, with no temp file left beside it.
    use std::os::unix::fs::FileTypeExt;
    let seed = test_seed();
    let daemon = Daemon::start().await;
    let length = 3 * CHUNK / 2;
    let (id, expected) = put_checked(&daemon.client(), Pattern::new(seed), length).await;
    let fifo = daemon.root().join("out.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("running mkfifo");
    assert!(made.success(), "mkfifo failed");
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || std::fs::read(reader_path).expect("reading the fifo"));
    let output = daemon.cli(&["get", &id.to_string(), "-o", &fifo.display().to_string()]).await;
    assert_ok(&output, "get -o FIFO");
    let received = reader.join().expect("the fifo reader");
    let mut digest = StreamDigest::new();
    digest.update(&received);
    assert_eq!(digest.object_id(), expected.object_id(), "bytes through the fifo");
    let kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(kind.is_fifo(), "the fifo was replaced by {kind:?}");
    let leftovers: Vec<_> = std::fs::read_dir(daemon.root())
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().contains("cachemesh-partial"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}
