#!/usr/bin/env bash
# Builds the release binaries, runs the criterion benches (chunk_io, local_hit) one after
# the other, then rss.sh, and prints the ratios each taken within this run:
#   socket GET / plain read, PUT / plain copy, io_uring / portable (read, write), peak RSS.
# Ratios are of throughputs (criterion means): above 1 the subject is faster than its
# baseline, below 1 it is slower.
#
# Scratch data goes to a fresh directory under $CACHEMESH_BENCH_DIR (default
# <workspace>/target/bench-scratch, on the same disk as the sources, not tmpfs) and is
# removed at exit, with any daemon still running from it.
# Takes about 5-8 minutes on 2 cores once the release build is done.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$root"
target_dir=${CARGO_TARGET_DIR:-$root/target}
scratch_root=${CACHEMESH_BENCH_DIR:-$target_dir/bench-scratch}
mkdir -p "$scratch_root"
scratch=$(mktemp -d "$scratch_root/run.XXXXXX")
export CACHEMESH_BENCH_DIR=$scratch

cleanup() {
    local status=$?
    # Daemons are started with --data-dir inside $scratch: stop exactly those.
    for proc in /proc/[0-9]*; do
        if tr '\0' ' ' <"$proc/cmdline" 2>/dev/null | grep -qF -- "--data-dir $scratch/"; then
            kill -TERM "${proc#/proc/}" 2>/dev/null || true
        fi
    done
    rm -rf "$scratch"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

run_started=$(date +%s)
phase() {
    echo
    echo "=== $1 ($(($(date +%s) - run_started)) s into the run, load $(cut -d' ' -f1-3 /proc/loadavg))"
}

phase "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- 2>/dev/null || echo ' (working tree differs from HEAD)'), $(nproc) cores, kernel $(uname -r), scratch $scratch ($(df -T "$scratch" | awk 'NR == 2 { print $2 }'))"

echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg) (other work on these cores adds noise to every figure)"

phase "cargo build --release --bins"
if ! cargo build --release --bins; then
    echo "run.sh: the release build failed (see above); nothing was measured" >&2
    exit 1
fi

# The benches compile before the marker, so the summary reads only results written by
# this run's bench executions.
phase "cargo bench --no-run"
cargo bench -p cachemesh-benches --no-run
marker=$(date +%s)

phase "cargo bench --bench chunk_io"
cargo bench -p cachemesh-benches --bench chunk_io

phase "cargo bench --bench local_hit"
cargo bench -p cachemesh-benches --bench local_hit 2>&1 | tee "$scratch/local_hit.out"

phase "benches/rss.sh"
"$here/rss.sh" 2>&1 | tee "$scratch/rss.out"
rss_line=$(grep '^rss_result ' "$scratch/rss.out" || true)
cpu_lines=$(grep '^cpu_per_gib ' "$scratch/local_hit.out" || true)

phase "summary"
python3 - "$target_dir/criterion" "$marker" "$rss_line" "$cpu_lines" <<'EOF'
import json, os, sys

criterion_dir, marker, rss_line, cpu_lines = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
GIB = 1 << 30

def estimate(group, bench):
    path = os.path.join(criterion_dir, group, bench, "new", "estimates.json")
    if not os.path.exists(path) or os.path.getmtime(path) < marker:
        return None
    with open(path) as file:
        mean = json.load(file)["mean"]
    return mean["point_estimate"], mean["confidence_interval"]["lower_bound"], mean["confidence_interval"]["upper_bound"]

def rate(group, bench, size):
    found = estimate(group, bench)
    if found is None:
        return None
    point, low, high = found
    # Times in ns per iteration -> GiB/s (the slow bound of the time is the low rate).
    return size / point * 1e9 / GIB, size / high * 1e9 / GIB, size / low * 1e9 / GIB

CHUNK = 4 << 20
OBJECT = 1 << 30
rows = [
    ("socket GET (io_uring, verify) / plain read", ("get_1GiB_local_hit", "socket_get_io_uring", OBJECT), ("get_1GiB_local_hit", "plain_read_std", OBJECT)),
    ("socket GET (portable, verify) / plain read", ("get_1GiB_local_hit", "socket_get_portable", OBJECT), ("get_1GiB_local_hit", "plain_read_std", OBJECT)),
    ("socket GET (io_uring, no verify) / plain read", ("get_1GiB_local_hit", "socket_get_io_uring_no_verify", OBJECT), ("get_1GiB_local_hit", "plain_read_std", OBJECT)),
    ("socket GET verify / no verify (io_uring)", ("get_1GiB_local_hit", "socket_get_io_uring", OBJECT), ("get_1GiB_local_hit", "socket_get_io_uring_no_verify", OBJECT)),
    ("socket GET io_uring / portable", ("get_1GiB_local_hit", "socket_get_io_uring", OBJECT), ("get_1GiB_local_hit", "socket_get_portable", OBJECT)),
    ("PUT / plain copy (std::fs::copy)", ("put_1GiB", "socket_put", OBJECT), ("put_1GiB", "plain_copy_std", OBJECT)),
    ("PUT / plain copy + fsync", ("put_1GiB", "socket_put", OBJECT), ("put_1GiB", "plain_copy_std_fsync", OBJECT)),
    ("chunk read 4 MiB: io_uring / portable", ("chunk_read_4MiB_page_cache", "io_uring", CHUNK), ("chunk_read_4MiB_page_cache", "portable", CHUNK)),
    ("chunk read 4 MiB io_uring / its BLAKE3 verify", ("chunk_read_4MiB_page_cache", "io_uring", CHUNK), ("chunk_verify_4MiB", "blake3_one_thread", CHUNK)),
    ("chunk durable write 4 MiB: io_uring / portable", ("chunk_write_durable_4MiB", "io_uring", CHUNK), ("chunk_write_durable_4MiB", "portable", CHUNK)),
]

def cell(found):
    if found is None:
        return "missing"
    point, low, high = found
    return f"{point:6.2f} [{low:.2f}-{high:.2f}]"

print("Throughputs in GiB/s, criterion mean [95% CI]; ratio = subject / baseline throughput.")
header = f"{'comparison':<48} {'subject GiB/s':>22} {'baseline GiB/s':>22} {'ratio':>7}"
print(header)
print("-" * len(header))
for label, subject, baseline in rows:
    s, b = rate(*subject), rate(*baseline)
    ratio = f"{s[0] / b[0]:7.3f}" if s and b else "    n/a"
    print(f"{label:<48} {cell(s):>22} {cell(b):>22} {ratio}")

cpu = {}
for line in cpu_lines.splitlines():
    parts = dict(part.split("=", 1) for part in line.split()[1:])
    cpu[parts["bench"]] = parts
if cpu:
    print()
    print("CPU seconds per GiB moved, inside measured iterations (less disturbed by other load than wall time):")
    print(f"{'bench':<32} {'GiB':>5} {'bench process':>14} {'cachemeshd':>11} {'total':>7}  local hits")
    for name, parts in cpu.items():
        bench_cpu, daemon_cpu = float(parts["bench_process_cpu_s_per_gib"]), float(parts["daemon_cpu_s_per_gib"])
        print(f"{name:<32} {parts['gib_moved']:>5} {bench_cpu:>14.3f} {daemon_cpu:>11.3f} {bench_cpu + daemon_cpu:>7.3f}  "
              f"{parts.get('fetch_counters', '')}")

fields = dict(part.split("=", 1) for part in rss_line.split()[1:]) if rss_line else {}
if fields:
    print()
    print(f"cachemeshd peak RSS, {fields['object_mib']} MiB object via the CLI: {fields['peak_mib']} MiB "
          f"(put {fields['put_peak_mib']} MiB, get {fields['get_peak_mib']} MiB, idle {fields['idle_mib']} MiB, "
          f"sampled max {fields['sampled_max_mib']} MiB); CLI put {fields['put_seconds']} s, get {fields['get_seconds']} s")
else:
    print("\npeak RSS: missing (rss.sh did not report)")
EOF
phase "done"
