//! Goal: say which chunk I/O backend is faster on this machine, as a ratio taken in one
//! run: io_uring vs portable for (1) a whole 4 MiB chunk read whose file is in the page
//! cache and (2) a 4 MiB durable write (create_new temp, write, fdatasync, rename, fsync of
//! the directory), both through `cachemesh_daemon::store::ChunkIo`, the API the store uses.
//!
//! The write group times each backend twice: with the chunk's bytes where a buffer from a
//! file read leaves them (not aligned: through the page cache), and aligned as the daemon
//! receives chunks from peers and the origin (written with `O_DIRECT` when the filesystem
//! takes it; the bench says which).
//!
//! A third group times the daemon's read verification (BLAKE3 of 4 MiB on one thread), the
//! yardstick for what `verify_reads` costs next to the read itself.
//!
//! Scratch files live under `CACHEMESH_BENCH_DIR` (default `target/bench-scratch`): a real
//! disk, so fdatasync costs what it costs in production.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use cachemesh_benches::{CHUNK_BYTES, scratch_dir, write_pseudorandom_file};
use cachemesh_daemon::store::{ChunkIo, IoBackendChoice, aligned_vec, direct_eligible};
use cachemesh_proto::ChunkId;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};

const BACKENDS: [(&str, IoBackendChoice); 2] =
    [("io_uring", IoBackendChoice::IoUring), ("portable", IoBackendChoice::Portable)];

fn chunk_io(c: &mut Criterion) {
    // The daemon runs its store on a multi-thread runtime; so does the bench. Two workers:
    // the machine has two cores.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let scratch = scratch_dir("chunk-io-");
    let chunk_path = scratch.path().join("chunk-read");
    write_pseudorandom_file(&chunk_path, CHUNK_BYTES, 1);
    let data = Bytes::from(std::fs::read(&chunk_path).unwrap());
    let aligned = {
        let (mut buffer, start) = aligned_vec(data.len());
        buffer.extend_from_slice(&data);
        Bytes::from(buffer).slice(start..)
    };
    assert!(direct_eligible(&aligned) && !direct_eligible(&data[1..]));

    let backends: Vec<(&str, ChunkIo)> = BACKENDS
        .iter()
        .map(|(name, choice)| {
            let probe = scratch.path().join(format!("probe-{name}"));
            std::fs::create_dir_all(&probe).unwrap();
            let io = runtime
                .block_on(ChunkIo::start(*choice, true, &probe))
                .unwrap_or_else(|error| panic!("cannot start the {name} backend: {error}"));
            // Both backends must return the same bytes, or the comparison is meaningless.
            assert_eq!(runtime.block_on(io.read(chunk_path.clone())).unwrap(), data, "{name} read back other bytes");
            (*name, io)
        })
        .collect();

    let mut group = c.benchmark_group("chunk_read_4MiB_page_cache");
    group.throughput(Throughput::Bytes(CHUNK_BYTES));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(3));
    for (name, io) in &backends {
        group.bench_function(*name, |b| {
            b.iter(|| runtime.block_on(io.read(chunk_path.clone())).unwrap());
        });
    }
    group.finish();

    // What `verify_reads` adds to every local read: the daemon's own hash check, on one
    // thread. Not a backend comparison; the yardstick for the read figures above.
    let mut group = c.benchmark_group("chunk_verify_4MiB");
    group.throughput(Throughput::Bytes(CHUNK_BYTES));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(2));
    let id = ChunkId::of(&data);
    group.bench_function("blake3_one_thread", |b| b.iter(|| assert!(id.matches(std::hint::black_box(&data)))));
    group.finish();

    let mut group = c.benchmark_group("chunk_write_durable_4MiB");
    group.throughput(Throughput::Bytes(CHUNK_BYTES));
    group.warm_up_time(Duration::from_secs(1));
    // fdatasync makes an iteration milliseconds long: flat sampling with fewer samples keeps
    // the run short.
    group.sample_size(20);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(5));
    for (name, io) in &backends {
        let direct = if io.direct_writes().is_ok() { "direct" } else { "buffered_no_o_direct_here" };
        for (bytes, label) in [(&data, "unaligned".to_string()), (&aligned, format!("aligned_{direct}"))] {
            let label = format!("{name}_{label}");
            let directory = scratch.path().join(format!("write-{label}"));
            std::fs::create_dir_all(&directory).unwrap();
            // The rename moves the temp away every time, so one temp name satisfies
            // create_new; the destination is replaced, as a re-stored chunk would be.
            let temp: PathBuf = directory.join("chunk.tmp");
            let destination = directory.join("chunk");
            group.bench_function(&label, |b| {
                b.iter(|| {
                    runtime.block_on(io.write_durable(temp.clone(), destination.clone(), bytes.clone())).unwrap()
                });
            });
            // Absent when a filter skipped this bench.
            if destination.exists() {
                assert_eq!(std::fs::read(&destination).unwrap(), data, "{label} wrote other bytes");
            }
        }
    }
    group.finish();
}

criterion_group!(benches, chunk_io);
criterion_main!(benches);
