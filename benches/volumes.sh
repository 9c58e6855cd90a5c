#!/usr/bin/env bash
# Volume figures, printed (never asserted):
#  1. visibility: time from a write acknowledged by daemon A to the first successful stat of
#     the path on daemon B, two single-node release daemons sharing one file:// origin,
#     B polled as fast as curl allows; N writes, min / median / p90 / max.
#  2. directory warm-up: 8 files x 256 MiB written through A; on a fresh daemon C (empty
#     cache, same origin) `cachemesh prefetch DIR`, against a fresh daemon D reading the
#     same files one after the other (`files download -o /dev/null`). Ratio = sequential
#     time / prefetch time (above 1: prefetch is faster).
#
# The origin is a local directory on the same disk (and mostly in the page cache), so the
# "origin" here is far faster than S3; the figures show the daemon's own overheads.
# Scratch data goes to a fresh directory under $CACHEMESH_BENCH_DIR (default
# <workspace>/target/bench-scratch) and is removed at exit with the daemons started here.
# Usage: benches/volumes.sh [WRITES (default 40)] [FILES (default 8)] [FILE_MIB (default 256)]
set -euo pipefail

writes=${1:-40}
files=${2:-8}
file_mib=${3:-256}

# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
bench_scratch volumes

echo "=== git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), scratch $scratch"
cargo build --release --bins
bin=$target_dir/release
origin=$scratch/origin
mkdir -p "$origin"

now_ns() { date +%s%N; }

# start NAME [extra args]: a release daemon with its own data dir and socket on the shared origin.
start() {
    local name=$1
    shift
    "$bin/cachemeshd" --data-dir "$scratch/$name/data" --api-socket "$scratch/$name/api.sock" \
        --origin "file://$origin" --cache-size 8GiB "$@" >"$scratch/$name.log" 2>&1 &
    bench_track "$!"
    for _ in $(seq 1 300); do
        if curl -sf --unix-socket "$scratch/$name/api.sock" http://x/v1/status >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.05
    done
    echo "daemon $name did not start; log:" >&2
    cat "$scratch/$name.log" >&2
    exit 1
}

cli() {
    local name=$1
    shift
    "$bin/cachemesh" --socket "$scratch/$name/api.sock" "$@"
}

stats() {
    # reads numbers (ms) on stdin; prints min median p90 max mean
    sort -n | awk '{ v[NR] = $1; s += $1 } END {
        if (NR == 0) { print "no samples"; exit }
        p50 = v[int((NR + 1) / 2)]; p90 = v[int(NR * 0.9 + 0.999)]
        printf "n=%d min=%.1f ms median=%.1f ms p90=%.1f ms max=%.1f ms mean=%.1f ms\n", NR, v[1], p50, p90, v[NR], s / NR }'
}

echo
echo "=== 1. write on A -> visible on B ($writes writes, B polled by curl in a loop)"
start a
start b
head -c 1024 /dev/urandom >"$scratch/small"
cli a files --volume bench upload "$scratch/small" warm-up >/dev/null
samples=$scratch/visibility.txt
: >"$samples"
for i in $(seq 1 "$writes"); do
    cli a files --volume bench upload "$scratch/small" "vis/$i" >/dev/null
    acknowledged=$(now_ns)
    until curl -sf --unix-socket "$scratch/b/api.sock" "http://x/v1/volumes/bench/stat/vis/$i" >/dev/null; do :; done
    visible=$(now_ns)
    echo "scale=3; ($visible - $acknowledged) / 1000000" | bc >>"$samples"
    # Spread the writes over the read-staleness window so they do not align with it.
    sleep "0.$((RANDOM % 300 + 50))"
done
echo "visibility on B after A's answer: $(stats <"$samples")"

echo
echo "=== 2. directory warm-up: $files files x $file_mib MiB"
for i in $(seq 0 $((files - 1))); do
    head -c "$((file_mib * 1024 * 1024))" /dev/urandom >"$scratch/file"
    cli a files --volume bench upload "$scratch/file" "dir/f$i" >/dev/null
done
rm -f "$scratch/file"
sync
start c
start d
started=$(now_ns)
cli c prefetch --volume bench dir
prefetch_ns=$(($(now_ns) - started))
started=$(now_ns)
for i in $(seq 0 $((files - 1))); do
    cli d files --volume bench download "dir/f$i" -o /dev/null
done
sequential_ns=$(($(now_ns) - started))
started=$(now_ns)
for i in $(seq 0 $((files - 1))); do
    cli c files --volume bench download "dir/f$i" -o /dev/null
done
warm_read_ns=$(($(now_ns) - started))
total_mib=$((files * file_mib))
rate() { echo "scale=1; $total_mib * 1000000000 / $1" | bc; }
printf "prefetch on a cold node:          %6.2f s  (%s MiB/s)\n" "$(echo "scale=3; $prefetch_ns / 1000000000" | bc)" "$(rate $prefetch_ns)"
printf "sequential reads on a cold node:  %6.2f s  (%s MiB/s)\n" "$(echo "scale=3; $sequential_ns / 1000000000" | bc)" "$(rate $sequential_ns)"
printf "sequential reads after prefetch:  %6.2f s  (%s MiB/s)\n" "$(echo "scale=3; $warm_read_ns / 1000000000" | bc)" "$(rate $warm_read_ns)"
echo "ratio sequential cold / prefetch: $(echo "scale=2; $sequential_ns / $prefetch_ns" | bc)"
