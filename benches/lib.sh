# Shared by the benchmark scripts that start their own processes (p2p.sh, volumes.sh):
# source it, then call `bench_scratch NAME`.
#
# bench_scratch NAME  cd to the workspace root; sets root, target_dir and scratch (a fresh
#                     directory under $CACHEMESH_BENCH_DIR, default <target>/bench-scratch),
#                     and arranges that at exit every process recorded with `bench_track`
#                     is stopped (SIGTERM, then SIGKILL after BENCH_STOP_TIMEOUT_SECONDS)
#                     and the scratch directory is removed.
# bench_track PID     records a process to stop at exit.
# bench_stop PID      stops one process now (same way).

BENCH_STOP_TIMEOUT_SECONDS=30
bench_pids=()

bench_scratch() {
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    cd "$root"
    target_dir=${CARGO_TARGET_DIR:-$root/target}
    local scratch_root=${CACHEMESH_BENCH_DIR:-$target_dir/bench-scratch}
    mkdir -p "$scratch_root"
    scratch=$(mktemp -d "$scratch_root/$1.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bench_track() {
    bench_pids+=("$1")
}

bench_stop() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || {
        wait "$pid" 2>/dev/null || true
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((BENCH_STOP_TIMEOUT_SECONDS * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

bench_cleanup() {
    local status=$?
    for pid in "${bench_pids[@]}"; do
        bench_stop "$pid"
    done
    rm -rf "$scratch"
    exit "$status"
}
