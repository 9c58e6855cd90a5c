#!/usr/bin/env bash
# Peak resident memory of cachemeshd while a large object (4 GiB by default) is put through
# the CLI and read back through the CLI to /dev/null. A streaming daemon stays near its
# windows (PUT_WINDOW_CHUNKS / FETCH_WINDOW_CHUNKS chunks); one that buffers an object
# grows with it.
#
# Builds nothing: needs the release binaries (cargo build --release --bins).
# Environment:
#   CACHEMESH_BIN_DIR    where cachemeshd and cachemesh are (default <target>/release)
#   CACHEMESH_BENCH_DIR  scratch root on a real disk (default <workspace>/target/bench-scratch)
#   RSS_OBJECT_MIB       object size in MiB (default 4096)
#   RSS_IO_BACKEND       --io-backend for the daemon (default io-uring)
# Prints human-readable lines, then one machine-readable line:
#   rss_result idle_mib=.. put_peak_mib=.. get_peak_mib=.. peak_mib=.. sampled_max_mib=.. put_seconds=.. get_seconds=..
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
bin_dir=${CACHEMESH_BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/release}
object_mib=${RSS_OBJECT_MIB:-4096}
io_backend=${RSS_IO_BACKEND:-io-uring}
daemon_bin=$bin_dir/cachemeshd
cli_bin=$bin_dir/cachemesh

for binary in "$daemon_bin" "$cli_bin"; do
    if [[ ! -x $binary ]]; then
        echo "rss.sh: $binary is missing; build it first: cargo build --release --bins" >&2
        exit 2
    fi
done

scratch_root=${CACHEMESH_BENCH_DIR:-$root/target/bench-scratch}
mkdir -p "$scratch_root"
scratch=$(mktemp -d "$scratch_root/rss.XXXXXX")
daemon_pid=""
sampler_pid=""

cleanup() {
    local status=$?
    if [[ -n $sampler_pid ]]; then
        kill "$sampler_pid" 2>/dev/null || true
        wait "$sampler_pid" 2>/dev/null || true
    fi
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        for _ in $(seq 300); do
            kill -0 "$daemon_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    rm -rf "$scratch"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Field of /proc/PID/status in MiB (the kernel reports kB).
status_mib() {
    awk -v field="$1:" '$1 == field { printf "%.1f", $2 / 1024 }' "/proc/$daemon_pid/status"
}

echo "rss.sh: generating a ${object_mib} MiB pseudorandom file in $scratch"
source_file=$scratch/object.bin
if command -v openssl >/dev/null; then
    # AES-CTR keystream: incompressible, unique per chunk, several GB/s.
    openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass pass:cachemesh-rss </dev/zero 2>/dev/null |
        head -c "$((object_mib * 1024 * 1024))" >"$source_file" || true
else
    head -c "$((object_mib * 1024 * 1024))" /dev/urandom >"$source_file"
fi
actual=$(stat -c %s "$source_file")
if [[ $actual -ne $((object_mib * 1024 * 1024)) ]]; then
    echo "rss.sh: generated $actual bytes, wanted $((object_mib * 1024 * 1024))" >&2
    exit 1
fi

socket=$scratch/data/api.sock
mkdir -p "$scratch/data" "$scratch/origin"
CACHEMESH_LOG=warn "$daemon_bin" --data-dir "$scratch/data" --api-socket "$socket" \
    --origin "file://$scratch/origin" --cache-size 8GiB --io-backend "$io_backend" \
    >"$scratch/daemon.log" 2>&1 &
daemon_pid=$!

ready=0
for _ in $(seq 600); do
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
        echo "rss.sh: cachemeshd exited during start-up; its log:" >&2
        cat "$scratch/daemon.log" >&2
        exit 1
    fi
    if "$cli_bin" --socket "$socket" status >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.1
done
if [[ $ready -ne 1 ]]; then
    echo "rss.sh: cachemeshd did not answer on $socket within 60 s" >&2
    exit 1
fi

# VmHWM is the kernel's exact peak; the sampler is a cross-check that also shows the
# peak was not a start-up artefact.
(
    max=0
    while kill -0 "$daemon_pid" 2>/dev/null; do
        rss=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$daemon_pid/status" 2>/dev/null || echo 0)
        if [[ -n $rss && $rss -gt $max ]]; then
            max=$rss
            echo "$max" >"$scratch/sampled_max_kb"
        fi
        sleep 0.05
    done
) &
sampler_pid=$!

idle_mib=$(status_mib VmRSS)
echo "rss.sh: daemon pid $daemon_pid ready, VmRSS ${idle_mib} MiB"

started=$(date +%s.%N)
object_id=$("$cli_bin" --socket "$socket" put "$source_file")
put_seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
put_peak_mib=$(status_mib VmHWM)
echo "rss.sh: put ${object_mib} MiB in ${put_seconds} s -> $object_id; VmHWM ${put_peak_mib} MiB, VmRSS $(status_mib VmRSS) MiB"

# Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the get's
# peak is seen on its own.
reset=0
if echo 5 >"/proc/$daemon_pid/clear_refs" 2>/dev/null; then
    reset=1
fi

started=$(date +%s.%N)
"$cli_bin" --socket "$socket" get "$object_id" >/dev/null
get_seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
get_peak_mib=$(status_mib VmHWM)
if [[ $reset -ne 1 ]]; then
    get_peak_mib="n/a(cannot-reset-VmHWM)"
fi
echo "rss.sh: got ${object_mib} MiB to /dev/null in ${get_seconds} s; VmHWM since put ${get_peak_mib} MiB, VmRSS $(status_mib VmRSS) MiB"

sleep 0.2
sampled_max_mib=$(awk '{ printf "%.1f", $1 / 1024 }' "$scratch/sampled_max_kb" 2>/dev/null || echo "n/a")
peak_mib=$(awk -v a="$put_peak_mib" -v b="$get_peak_mib" 'BEGIN { if (b + 0 > a + 0) print b; else print a }')
echo "rss.sh: peak RSS of cachemeshd: ${peak_mib} MiB (sampled max VmRSS ${sampled_max_mib} MiB) for a ${object_mib} MiB object"
echo "rss_result idle_mib=$idle_mib put_peak_mib=$put_peak_mib get_peak_mib=$get_peak_mib peak_mib=$peak_mib sampled_max_mib=$sampled_max_mib put_seconds=$put_seconds get_seconds=$get_seconds object_mib=$object_mib"
