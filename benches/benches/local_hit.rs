//! Goal: show what the daemon costs over the plain file system on one host, as ratios
//! taken in one run, with the real release `cachemeshd` as a child process:
//!
//! - group `get_1GiB_local_hit`: a plain `std` read of a 1 GiB file (page cache, reused
//!   1 MiB buffer) against `GET /v1/objects/{id}` of the same bytes, already in the
//!   daemon's store, over the unix socket with the body discarded; the GET runs with the
//!   io_uring backend, the portable backend, and io_uring with `--verify-reads false`, so
//!   the cost of the backend and of read verification are both visible.
//! - group `put_1GiB`: `std::fs::copy` of the file (and the same followed by `fsync`, since
//!   a put is durable) against `PUT /v1/objects` with the file streamed from disk in 1 MiB
//!   frames, as the CLI does. Content addressing would turn a repeated put of the same
//!   bytes into a no-op, so each iteration first rewrites 8 bytes of every chunk (outside
//!   the timing) and every put stores and uploads 1 GiB of new chunks. The origin is a
//!   local directory (`file://`), so a put writes the bytes twice: store and origin.
//!
//! The client side runs on a current-thread tokio runtime, like a simple consumer would.
//! The release binaries must exist: `cargo build --release --bins` (benches/run.sh does it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cachemesh_benches::{
    BUFFER_BYTES, Daemon, DaemonConfig, make_chunks_unique, plain_read, process_cpu_seconds, release_binary,
    scratch_dir, write_pseudorandom_file,
};
use cachemesh_daemon::client::Client;
use cachemesh_proto::ObjectId;
use cachemesh_proto::api::PutObjectResponse;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};

const OBJECT_BYTES: u64 = 1 << 30;
const GIB: f64 = (1u64 << 30) as f64;

/// CPU seconds of this process and of the daemon (if any) spent inside measured
/// iterations, to print CPU per GiB moved (criterion's own analysis is left out).
struct CpuMeter {
    daemon_pid: Option<u32>,
    bench_cpu_s: f64,
    daemon_cpu_s: f64,
    bytes: u64,
}

impl CpuMeter {
    fn new(daemon: Option<&Daemon>) -> Self {
        Self { daemon_pid: daemon.map(Daemon::pid), bench_cpu_s: 0.0, daemon_cpu_s: 0.0, bytes: 0 }
    }

    /// Runs one iteration that moves `bytes`, adding the CPU both processes used meanwhile.
    fn measure<T>(&mut self, bytes: u64, iteration: impl FnOnce() -> T) -> T {
        let bench_before = process_cpu_seconds(std::process::id());
        let daemon_before = self.daemon_pid.map_or(0.0, process_cpu_seconds);
        let result = iteration();
        self.bench_cpu_s += process_cpu_seconds(std::process::id()) - bench_before;
        self.daemon_cpu_s += self.daemon_pid.map_or(0.0, process_cpu_seconds) - daemon_before;
        self.bytes += bytes;
        result
    }

    /// One line for benches/run.sh: CPU seconds per GiB of the bench process (the client,
    /// or the plain baseline) and of the daemon, over every iteration including warm-up.
    fn report(&self, bench: &str, extra: &str) {
        let gib = self.bytes as f64 / GIB;
        eprintln!(
            "cpu_per_gib bench={bench} gib_moved={gib:.0} bench_process_cpu_s_per_gib={:.3} daemon_cpu_s_per_gib={:.3} {extra}",
            self.bench_cpu_s / gib,
            self.daemon_cpu_s / gib
        );
    }
}

/// GET variants: (bench name, --io-backend, --verify-reads).
const GET_VARIANTS: [(&str, &str, bool); 3] = [
    ("socket_get_io_uring", "io-uring", true),
    ("socket_get_portable", "portable", true),
    ("socket_get_io_uring_no_verify", "io-uring", false),
];

async fn put_file(client: &Client, path: &Path) -> PutObjectResponse {
    let file = tokio::fs::File::open(path).await.unwrap();
    let stream =
        tokio_util::io::ReaderStream::with_capacity(file, BUFFER_BYTES).map(|read| read.map(hyper::body::Frame::data));
    client.put_object(StreamBody::new(stream)).await.unwrap()
}

async fn get_discard(client: &Client, id: &ObjectId) -> u64 {
    let response = client.get_object(id, None).await.unwrap();
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.unwrap().data_ref() {
            received += data.len() as u64;
        }
    }
    received
}

fn daemon_config(directory: &Path, io_backend: &str, verify_reads: bool, cache_size: &str) -> DaemonConfig {
    DaemonConfig {
        data_dir: directory.join("data"),
        origin_dir: directory.join("origin"),
        cache_size: cache_size.to_string(),
        io_backend: io_backend.to_string(),
        verify_reads,
    }
}

fn local_hit(c: &mut Criterion) {
    // Fail before generating a GiB if the daemon is not built.
    release_binary("cachemeshd");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let scratch = scratch_dir("local-hit-");
    let source = scratch.path().join("object.bin");
    write_pseudorandom_file(&source, OBJECT_BYTES, 2);

    // Put once; later daemons reuse the data directory, so the object is a local hit.
    let get_directory = scratch.path().join("get");
    let object_id = {
        let daemon = Daemon::start(&daemon_config(&get_directory, "io-uring", true, "8GiB"), &runtime);
        let answer = runtime.block_on(put_file(&daemon.client(), &source));
        assert_eq!(answer.length, OBJECT_BYTES);
        answer.object_id
    };

    let mut group = c.benchmark_group("get_1GiB_local_hit");
    group.throughput(Throughput::Bytes(OBJECT_BYTES));
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    let mut buffer = vec![0u8; BUFFER_BYTES];
    let mut meter = CpuMeter::new(None);
    group.bench_function("plain_read_std", |b| {
        b.iter(|| assert_eq!(meter.measure(OBJECT_BYTES, || plain_read(&source, &mut buffer)), OBJECT_BYTES));
    });
    meter.report("plain_read_std", "");
    for (name, io_backend, verify_reads) in GET_VARIANTS {
        let daemon = Daemon::start(&daemon_config(&get_directory, io_backend, verify_reads, "8GiB"), &runtime);
        let client = daemon.client();
        let mut meter = CpuMeter::new(Some(&daemon));
        group.bench_function(name, |b| {
            b.iter(|| {
                let received = meter.measure(OBJECT_BYTES, || runtime.block_on(get_discard(&client, &object_id)));
                assert_eq!(received, OBJECT_BYTES);
            });
        });
        // Evidence that every GET was a local hit: no chunk came from the origin.
        let counters = daemon.chunk_fetch_counters(&runtime).replace(' ', "");
        meter.report(name, &format!("fetch_counters={counters}"));
    }
    group.finish();

    let put_directory = scratch.path().join("put");
    let copy_destination: PathBuf = scratch.path().join("copy.bin");
    let mut group = c.benchmark_group("put_1GiB");
    group.throughput(Throughput::Bytes(OBJECT_BYTES));
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    for fsync in [false, true] {
        let name = if fsync { "plain_copy_std_fsync" } else { "plain_copy_std" };
        let mut meter = CpuMeter::new(None);
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iterations {
                    let started = Instant::now();
                    meter.measure(OBJECT_BYTES, || {
                        std::fs::copy(&source, &copy_destination).unwrap();
                        if fsync {
                            std::fs::File::open(&copy_destination).unwrap().sync_all().unwrap();
                        }
                    });
                    elapsed += started.elapsed();
                    std::fs::remove_file(&copy_destination).unwrap();
                }
                elapsed
            });
        });
        meter.report(name, "");
    }
    {
        // A budget no run of this bench fills: eviction is not what is measured here.
        let config = daemon_config(&put_directory, "io-uring", true, "32GiB");
        let daemon = Daemon::start(&config, &runtime);
        let client = daemon.client();
        let mut generation = 0u64;
        let mut meter = CpuMeter::new(Some(&daemon));
        group.bench_function("socket_put", |b| {
            b.iter_custom(|iterations| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iterations {
                    generation += 1;
                    make_chunks_unique(&source, generation);
                    let started = Instant::now();
                    let answer = meter.measure(OBJECT_BYTES, || runtime.block_on(put_file(&client, &source)));
                    elapsed += started.elapsed();
                    assert_eq!(answer.length, OBJECT_BYTES);
                    assert_eq!(answer.chunks_uploaded, answer.chunk_count, "a put deduplicated: content not unique");
                    // Keep the disk use bounded: the origin copy of old generations is not needed.
                    std::fs::remove_dir_all(config.origin_dir.join("chunks")).unwrap();
                }
                elapsed
            });
        });
        meter.report("socket_put", "");
    }
    group.finish();
}

criterion_group!(benches, local_hit);
criterion_main!(benches);
