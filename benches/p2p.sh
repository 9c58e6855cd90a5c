#!/usr/bin/env bash
# Peer-to-peer fetch of one object between two cachemeshd on loopback, side by side in the
# same run with `sendme` (iroh: BLAKE3-verified transfer over QUIC) and a plain TCP copy of
# the same bytes. Goals: cachemesh at least 5x sendme's throughput and at least 0.5 of the
# plain TCP copy. Prints the figures and the two ratios with PASS/MISS; exits 0 either way
# (a benchmark reports, it does not assert). A leg that fails to run or delivers wrong bytes
# stops the script with exit 1.
#
# Legs (each timed as the wall time of the receiving command, sender already running):
#   cachemesh -o FILE   node B: `cachemesh get ID -o FILE`; B fetches every chunk from node A,
#                       checks it against its BLAKE3 id, stores it durably in its cache (one
#                       fdatasync per chunk) and streams it to the CLI, which writes FILE
#                       (no fsync). A fresh B (empty cache) for every timed get.
#   cachemesh -o null   the same with `-o /dev/null`: verified and stored, not written out.
#   sendme              `sendme receive --relay disabled TICKET` from a running
#                       `sendme send --relay disabled --ticket-type addresses FILE`
#                       (verified, stored in its temp store, exported to a file).
#   tcp -> file         tcp_copy (benches/src/bin/tcp_copy.rs): one TCP connection, read/write
#                       with 4 MiB buffers, received into a file (page cache, no fsync).
#   tcp -> file+fsync   the same, fsync of the file before the clock stops.
#   tcp -> file+blake3  the same as tcp -> file, hashing the bytes on receipt (one thread).
# Every output file is compared with the source (cmp) after its leg, outside the timing.
# Before each timed leg: `sync` (the previous leg's dirty pages are written back first) and
# the sender's files are read once, so every sender reads from the page cache (warm), unless
# P2P_DROP_CACHES=1 (then the page cache is dropped instead and every leg starts cold).
#
# Environment:
#   P2P_BYTES          object size in bytes (default 1073741824 = 1 GiB)
#   P2P_ROUNDS         how many times each leg runs, legs interleaved; the table shows the
#                      median (default 3)
#   P2P_SKIP_SENDME=1  run without the sendme leg (no sendme ratio then)
#   P2P_DROP_CACHES=1  drop the page cache before each leg (root only; affects the machine)
#   P2P_BUILD=0        do not run `cargo build --release --bins` first
#   SENDME             the sendme binary (default: `sendme` on PATH, else ~/.cargo/bin/sendme)
#   CACHEMESH_BIN_DIR  where cachemeshd, cachemesh, tcp_copy are (default <target>/release)
#   CACHEMESH_BENCH_DIR  scratch root on a real disk (default <target>/bench-scratch)
#   CACHEMESH_LOG      the daemons' log filter (default warn)
# Scratch data (the object, both daemons, origin, outputs) goes to a fresh directory under
# the scratch root and is removed at exit, with every process the script started.
# Takes about 1 minute per round for 1 GiB once the release build is done.
set -euo pipefail

# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
bench_scratch p2p
bin_dir=${CACHEMESH_BIN_DIR:-$target_dir/release}
object_bytes=${P2P_BYTES:-1073741824}
rounds=${P2P_ROUNDS:-3}
skip_sendme=${P2P_SKIP_SENDME:-0}
drop_caches=${P2P_DROP_CACHES:-0}
build=${P2P_BUILD:-1}
daemon_log_filter=${CACHEMESH_LOG:-warn}

# Time limits, in seconds.
DAEMON_READY_TIMEOUT_SECONDS=60
MEMBERSHIP_TIMEOUT_SECONDS=60
SENDME_TICKET_TIMEOUT_SECONDS=300

die() {
    echo "p2p.sh: $*" >&2
    exit 1
}

[[ $object_bytes =~ ^[0-9]+$ && $object_bytes -gt 0 ]] || die "P2P_BYTES must be a positive byte count, not '$object_bytes'"
[[ $rounds =~ ^[0-9]+$ && $rounds -gt 0 ]] || die "P2P_ROUNDS must be a positive count, not '$rounds'"

for tool in python3 curl cmp; do
    command -v "$tool" >/dev/null || die "needs $tool on PATH"
done

sendme_bin=""
if [[ $skip_sendme != 1 ]]; then
    if [[ -n ${SENDME:-} ]]; then
        sendme_bin=$SENDME
    elif command -v sendme >/dev/null; then
        sendme_bin=$(command -v sendme)
    elif [[ -x $HOME/.cargo/bin/sendme ]]; then
        sendme_bin=$HOME/.cargo/bin/sendme
    fi
    if [[ -z $sendme_bin || ! -x $sendme_bin ]]; then
        cat >&2 <<'EOF'
p2p.sh: the `sendme` tool is not installed (looked at $SENDME, PATH and ~/.cargo/bin).
  Install it with:   cargo install sendme        (builds from source, several minutes)
  or run without that leg (and without the sendme ratio):   P2P_SKIP_SENDME=1 benches/p2p.sh
EOF
        exit 2
    fi
fi

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
load_at_start=$(loadavg)
run_started=$(date +%s)
phase() {
    echo
    echo "=== $1 ($(($(date +%s) - run_started)) s into the run, load $(loadavg))"
}

phase "p2p.sh: git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- 2>/dev/null || echo ' (working tree differs from HEAD)'), $(nproc) cores, kernel $(uname -r)"
echo "load average at start: $load_at_start"

if [[ $build == 1 ]]; then
    phase "cargo build --release --bins (waits while another build holds the target directory)"
    cargo build --release --bins || die "the release build failed (see above); nothing was measured"
fi

daemon_bin=$bin_dir/cachemeshd
cli_bin=$bin_dir/cachemesh
tcp_bin=$bin_dir/tcp_copy
for binary in "$daemon_bin" "$cli_bin" "$tcp_bin"; do
    [[ -x $binary ]] || die "$binary is missing; build it first: cargo build --release --bins"
done
if [[ -n $sendme_bin ]]; then
    echo "sendme: $sendme_bin ($("$sendme_bin" --version 2>/dev/null || echo 'version unknown'))"
fi


echo "scratch: $scratch ($(df -T "$scratch" | awk 'NR == 2 { print $2 }'))"

# Only the settings given here: no inherited CACHEMESH_* setting or machine config file.
for name in $(compgen -e); do
    if [[ $name == CACHEMESH_* ]]; then
        unset "$name"
    fi
done
export CACHEMESH_LOG=$daemon_log_filter
: >"$scratch/empty-config.toml"

# CPU seconds (user + system, all threads) a running process has used so far.
cpu_seconds() {
    local ticks
    ticks=$(getconf CLK_TCK)
    sed 's/.*) //' "/proc/$1/stat" | awk -v ticks="$ticks" '{ printf "%.3f", ($12 + $13) / ticks }'
}

subtract() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
add() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a + b }'; }

# "idle total" jiffies of the whole machine (idle + iowait; user .. steal).
machine_jiffies() {
    awk '$1 == "cpu" { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat
}

# Runs a command with its output in $scratch/NAME.{out,err}; sets timed_seconds,
# timed_cpu_seconds (user + system of the command and its children) and timed_machine_busy
# (percent of all cores' time not idle while it ran, whoever used it: near 100 means the
# leg was CPU-bound on a shared machine).
run_timed() {
    local name=$1
    shift
    local TIMEFORMAT='%R %U %S' idle_before total_before idle_after total_after
    read -r idle_before total_before < <(machine_jiffies)
    if ! { time "$@" >"$scratch/$name.out" 2>"$scratch/$name.err"; } 2>"$scratch/$name.time"; then
        echo "p2p.sh: leg '$name' failed: $*" >&2
        tail -n 20 "$scratch/$name.err" "$scratch/$name.out" >&2 || true
        exit 1
    fi
    read -r idle_after total_after < <(machine_jiffies)
    read -r timed_seconds user_seconds system_seconds <"$scratch/$name.time"
    timed_cpu_seconds=$(add "$user_seconds" "$system_seconds")
    timed_machine_busy=$(awk -v i="$((idle_after - idle_before))" -v t="$((total_after - total_before))" \
        'BEGIN { printf "%.0f", (t > 0 ? 100 * (1 - i / t) : 0) }')
}

results=$scratch/results.txt
: >"$results"
record() {
    # leg round seconds sender_cpu receiver_cpu (machine busy % of the last run_timed)
    echo "$1 $2 $3 $4 $5 $timed_machine_busy" >>"$results"
    printf '  %-16s %8.3f s %8.1f MB/s  sender CPU %5.2f s  receiver CPU %5.2f s  machine busy %3s%%  (load %s)\n' \
        "$1" "$3" "$(awk -v b="$object_bytes" -v s="$3" 'BEGIN { print b / s / 1e6 }')" "$4" "$5" \
        "$timed_machine_busy" "$(loadavg)"
}

same_bytes() {
    cmp -s "$source_file" "$1" || die "$2 delivered bytes that differ from the source ($1)"
}

# Called before every timed leg with the sender's files (or directories) as arguments.
prepare_leg() {
    sync
    if [[ $drop_caches == 1 ]]; then
        echo 3 >/proc/sys/vm/drop_caches
    else
        find "$@" -type f -exec cat {} + >/dev/null
    fi
}

phase "generating the object: $object_bytes bytes of pseudorandom data"
source_dir=$scratch/source
mkdir -p "$source_dir"
source_file=$source_dir/object.bin
if command -v openssl >/dev/null; then
    # AES-CTR keystream: incompressible, several GB/s.
    openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass pass:cachemesh-p2p </dev/zero 2>/dev/null |
        head -c "$object_bytes" >"$source_file" || true
else
    head -c "$object_bytes" /dev/urandom >"$source_file"
fi
[[ $(stat -c %s "$source_file") -eq $object_bytes ]] || die "generated $(stat -c %s "$source_file") bytes, wanted $object_bytes"

if [[ $drop_caches == 1 ]]; then
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || die "P2P_DROP_CACHES=1 but /proc/sys/vm/drop_caches is not writable"
    cache_state="every leg starts with the page cache dropped (senders read from disk: cold)"
else
    cache_state="every sender reads its source from the page cache (warm; P2P_DROP_CACHES=1 for cold)"
fi
echo "cache state: $cache_state"

# ---------------------------------------------------------------------------------------
# The two cachemesh nodes.

# Field of `cachemesh status --json` (a Python expression over `s`), or empty.
status_field() {
    "$cli_bin" --socket "$1" status --json 2>/dev/null |
        python3 -c 'import json, sys; s = json.load(sys.stdin); print(eval(sys.argv[1]))' "$2" 2>/dev/null || true
}

# Sum of a metric's samples whose labels include LABEL="VALUE" (or all, without a label).
metric() {
    curl -s --unix-socket "$1" http://cachemesh/metrics | python3 -c '
import re, sys
name, label = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
total = 0.0
for line in sys.stdin:
    match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
    if match and match.group(1) == name and (not label or label in (match.group(2) or "")):
        total += float(match.group(3))
print("%.0f" % total)' "$2" "${3:-}"
}

cluster_key=$scratch/cluster.key
"$cli_bin" cluster-key new "$cluster_key" >/dev/null
origin_dir=$scratch/origin
mkdir -p "$origin_dir"
cache_size_bytes=$((object_bytes * 2 + (1 << 30)))

# start_node NAME [BOOTSTRAP]: starts a node in $scratch/NAME and waits until it answers
# with a p2p listen address; sets node_pid and node_socket.
start_node() {
    local name=$1 bootstrap=${2:-}
    local dir=$scratch/$name
    mkdir -p "$dir"
    local args=(--config "$scratch/empty-config.toml" --data-dir "$dir/data" --api-socket "$dir/api.sock"
        --origin "file://$origin_dir" --cache-size "$cache_size_bytes" --cluster-key "$cluster_key"
        --dc bench --p2p-listen 127.0.0.1:0 --data-listen 127.0.0.1:0)
    if [[ -n $bootstrap ]]; then
        args+=(--bootstrap "$bootstrap")
    fi
    "$daemon_bin" "${args[@]}" </dev/null >"$dir/cachemeshd.log" 2>&1 &
    node_pid=$!
    bench_track "$node_pid"
    node_socket=$dir/api.sock
    for _ in $(seq $((DAEMON_READY_TIMEOUT_SECONDS * 10))); do
        if ! kill -0 "$node_pid" 2>/dev/null; then
            tail -n 20 "$dir/cachemeshd.log" >&2
            die "node $name exited during start-up (log above)"
        fi
        if [[ -n $(status_field "$node_socket" "s['mesh']['p2p_listen'][0]") ]]; then
            return 0
        fi
        sleep 0.1
    done
    die "node $name did not report a p2p listen address within $DAEMON_READY_TIMEOUT_SECONDS s; log: $dir/cachemeshd.log"
}

# wait_members SOCKET COMPARISON NUMBER (e.g. ">= 1"): polls mesh.members.
wait_members() {
    local socket=$1 comparison=$2 number=$3 seen=""
    for _ in $(seq $((MEMBERSHIP_TIMEOUT_SECONDS * 10))); do
        seen=$(status_field "$socket" "s['mesh']['members']")
        if [[ -n $seen ]] && python3 -c "import sys; sys.exit(0 if $seen $comparison $number else 1)"; then
            return 0
        fi
        sleep 0.1
    done
    die "$socket: mesh.members stayed at '${seen}', wanted $comparison $number within $MEMBERSHIP_TIMEOUT_SECONDS s"
}

phase "cachemesh: node A, put"
start_node a
a_pid=$node_pid
a_socket=$node_socket
a_multiaddr=$(status_field "$a_socket" "s['mesh']['p2p_listen'][0]")
a_bootstrap=$(python3 -c 'import sys; p = sys.argv[1].split("/"); print(p[2] + ":" + p[4])' "$a_multiaddr")
echo "node A: pid $a_pid, p2p $a_multiaddr, data plane $(status_field "$a_socket" "s['mesh']['data_listen']")"
put_started=$(date +%s.%N)
object_id=$("$cli_bin" --socket "$a_socket" put "$source_file" 2>"$scratch/put.err") || {
    cat "$scratch/put.err" >&2
    die "cachemesh put failed"
}
echo "put $object_bytes bytes in $(subtract "$(date +%s.%N)" "$put_started") s (store + file:// origin): $object_id"
for _ in $(seq $((MEMBERSHIP_TIMEOUT_SECONDS * 10))); do
    [[ $(status_field "$a_socket" "s['mesh']['provided_objects']") -ge 1 ]] && break
    sleep 0.1
done
echo "node A provides $(status_field "$a_socket" "s['mesh']['provided_objects']") object(s)"

# One timed get on a fresh node B (empty cache), then B is stopped and A is left with no
# members, so that the next B sees no stale peer.
b_count=0
cachemesh_leg() {
    local leg=$1 round=$2 output=$3
    b_count=$((b_count + 1))
    local name=b$b_count
    start_node "$name" "$a_bootstrap"
    local b_pid=$node_pid b_socket=$node_socket
    wait_members "$b_socket" ">=" 1
    wait_members "$a_socket" ">=" 1
    prepare_leg "$scratch/a/data"
    local a_cpu_before b_cpu_before upload_before
    a_cpu_before=$(cpu_seconds "$a_pid")
    b_cpu_before=$(cpu_seconds "$b_pid")
    upload_before=$(metric "$a_socket" cachemesh_peer_upload_bytes_total)
    run_timed "$leg-$round" "$cli_bin" --socket "$b_socket" get "$object_id" -o "$output"
    local a_cpu b_cpu
    a_cpu=$(subtract "$(cpu_seconds "$a_pid")" "$a_cpu_before")
    b_cpu=$(subtract "$(cpu_seconds "$b_pid")" "$b_cpu_before")
    record "$leg" "$round" "$timed_seconds" "$a_cpu" "$(add "$b_cpu" "$timed_cpu_seconds")"
    echo "    receiver CPU = node B $b_cpu s + CLI $timed_cpu_seconds s"
    local served_peer served_home served_origin served_local origin_download peer_download uploaded
    served_local=$(metric "$b_socket" cachemesh_bytes_served_total 'source="local"')
    served_peer=$(metric "$b_socket" cachemesh_bytes_served_total 'source="peer"')
    served_home=$(metric "$b_socket" cachemesh_bytes_served_total 'source="home"')
    served_origin=$(metric "$b_socket" cachemesh_bytes_served_total 'source="origin"')
    origin_download=$(metric "$b_socket" cachemesh_origin_bytes_total 'direction="download"')
    peer_download=$(metric "$b_socket" cachemesh_peer_download_bytes_total)
    uploaded=$(awk -v a="$(metric "$a_socket" cachemesh_peer_upload_bytes_total)" -v b="$upload_before" 'BEGIN { printf "%.0f", a - b }')
    echo "    node B bytes served by source: peer $served_peer, home $served_home, origin $served_origin, local $served_local"
    echo "    node B received from peers $peer_download bytes, from the origin $origin_download bytes (manifest included); node A sent $uploaded bytes"
    echo "    node B chunk fetches: peer $(metric "$b_socket" cachemesh_chunk_fetches_total 'source="peer"'), home $(metric "$b_socket" cachemesh_chunk_fetches_total 'source="home"'), origin $(metric "$b_socket" cachemesh_chunk_fetches_total 'source="origin"'), local $(metric "$b_socket" cachemesh_chunk_fetches_total 'source="local"'); cache $(status_field "$b_socket" "s['store']['used_bytes']") bytes in $(status_field "$b_socket" "s['store']['chunk_count']") chunks"
    if [[ $served_origin != 0 || $origin_download -gt 1048576 ]]; then
        echo "    !!! WARNING: node B took $served_origin object bytes ($origin_download bytes downloaded) from the ORIGIN, not from node A:"
        echo "    !!! this leg did not measure a pure peer-to-peer fetch."
        echo "origin $leg $round" >>"$scratch/origin-warnings.txt"
    fi
    if [[ $((served_peer + served_home)) -ne $object_bytes ]]; then
        echo "    note: bytes from node A (peer + home) = $((served_peer + served_home)), object = $object_bytes"
    fi
    if [[ $output != /dev/null ]]; then
        same_bytes "$output" "cachemesh get"
        rm -f "$output"
    fi
    bench_stop "$b_pid"
    rm -rf "${scratch:?}/$name/data"
    wait_members "$a_socket" "==" 0
}

# ---------------------------------------------------------------------------------------
# The baselines' senders run for the whole run.

phase "tcp_copy server"
"$tcp_bin" serve "$source_file" --listen 127.0.0.1:0 >"$scratch/tcp-serve.out" 2>"$scratch/tcp-serve.err" &
tcp_pid=$!
bench_track "$tcp_pid"
tcp_address=""
for _ in $(seq 100); do
    tcp_address=$(awk '$1 == "listening" { print $2 }' "$scratch/tcp-serve.out")
    [[ -n $tcp_address ]] && break
    sleep 0.1
done
[[ -n $tcp_address ]] || die "tcp_copy serve did not start: $(cat "$scratch/tcp-serve.err")"
echo "tcp_copy serving on $tcp_address"

sendme_pid=""
if [[ -n $sendme_bin ]]; then
    phase "sendme send (imports the file: hashes it and builds its BLAKE3 outboard, not timed)"
    mkdir -p "$scratch/sendme-send"
    (cd "$scratch/sendme-send" && exec "$sendme_bin" send --relay disabled --ticket-type addresses --no-progress \
        "$source_file" >"$scratch/sendme-send.out" 2>"$scratch/sendme-send.err" </dev/null) &
    sendme_pid=$!
    bench_track "$sendme_pid"
    ticket=""
    for _ in $(seq $((SENDME_TICKET_TIMEOUT_SECONDS * 10))); do
        ticket=$(awk '$1 == "sendme" && $2 == "receive" { print $3 }' "$scratch/sendme-send.out")
        [[ -n $ticket ]] && break
        kill -0 "$sendme_pid" 2>/dev/null || die "sendme send exited: $(cat "$scratch/sendme-send.err")"
        sleep 0.1
    done
    [[ -n $ticket ]] || die "sendme send printed no ticket within $SENDME_TICKET_TIMEOUT_SECONDS s"
    head -n 1 "$scratch/sendme-send.out"
fi

tcp_leg() {
    local leg=$1 round=$2
    shift 2
    local output=$scratch/tcp-output.bin
    prepare_leg "$source_file"
    local server_before
    server_before=$(cpu_seconds "$tcp_pid")
    run_timed "$leg-$round" "$tcp_bin" fetch "$tcp_address" --output "$output" "$@"
    record "$leg" "$round" "$timed_seconds" "$(subtract "$(cpu_seconds "$tcp_pid")" "$server_before")" "$timed_cpu_seconds"
    echo "    $(cat "$scratch/$leg-$round.out")"
    same_bytes "$output" "tcp_copy"
    rm -f "$output"
}

sendme_leg() {
    local round=$1
    local dir=$scratch/sendme-receive-$round
    mkdir -p "$dir"
    prepare_leg "$source_file"
    local sender_before
    sender_before=$(cpu_seconds "$sendme_pid")
    run_timed "sendme-$round" bash -c 'cd "$1" && exec "$2" receive --relay disabled --no-progress "$3"' \
        receive "$dir" "$sendme_bin" "$ticket"
    record sendme "$round" "$timed_seconds" "$(subtract "$(cpu_seconds "$sendme_pid")" "$sender_before")" \
        "$timed_cpu_seconds"
    same_bytes "$dir/$(basename "$source_file")" "sendme receive"
    rm -rf "$dir"
}

for round in $(seq "$rounds"); do
    phase "round $round of $rounds"
    tcp_leg tcp-file "$round"
    tcp_leg tcp-file-fsync "$round" --fsync
    tcp_leg tcp-file-blake3 "$round" --blake3
    if [[ -n $sendme_bin ]]; then
        sendme_leg "$round"
    fi
    cachemesh_leg cachemesh-file "$round" "$scratch/cachemesh-output.bin"
    cachemesh_leg cachemesh-null "$round" /dev/null
done

load_at_end=$(loadavg)
phase "summary"
python3 - "$results" "$object_bytes" "$rounds" "$load_at_start" "$load_at_end" "$cache_state" \
    "$([[ -f $scratch/origin-warnings.txt ]] && cat "$scratch/origin-warnings.txt" || true)" <<'EOF'
import statistics, sys

results_path, object_bytes, rounds, load_start, load_end, cache_state, origin_warnings = sys.argv[1:8]
object_bytes = int(object_bytes)
legs = {}
for line in open(results_path):
    leg, _round, seconds, sender_cpu, receiver_cpu, machine_busy = line.split()
    legs.setdefault(leg, []).append((float(seconds), float(sender_cpu), float(receiver_cpu), float(machine_busy)))

labels = [
    ("cachemesh-file", "cachemesh get -o FILE (verified, stored, written)"),
    ("cachemesh-null", "cachemesh get -o /dev/null (verified, stored)"),
    ("sendme", "sendme receive (verified, stored, exported)"),
    ("tcp-file", "plain TCP copy -> file (page cache)"),
    ("tcp-file-fsync", "plain TCP copy -> file + fsync"),
    ("tcp-file-blake3", "plain TCP copy -> file + BLAKE3 on receipt"),
]
def median(leg, index):
    return statistics.median(sample[index] for sample in legs[leg])

subject = median("cachemesh-file", 0)
print(f"object: {object_bytes} bytes ({object_bytes / 2**20:.0f} MiB); {rounds} round(s), medians shown"
      + (" [min-max seconds]" if int(rounds) > 1 else ""))
print(f"cache state: {cache_state}")
print("MB/s = 10^6 bytes per second of wall time of the receiving command; ratio = cachemesh -o FILE")
print("throughput / the leg's throughput. CPU = user + system seconds (sender: the serving process;")
print("receiver: the receiving process(es), for cachemesh node B + the CLI). Busy = share of both")
print("cores' time in use during the leg by any process (other work on the machine included).")
print()
header = (f"{'leg':<50} {'seconds':>8} {'MB/s':>8} {'cachemesh/leg':>14} {'sender CPU s':>13} "
          f"{'receiver CPU s':>15} {'busy %':>7}")
print(header)
print("-" * len(header))
for leg, label in labels:
    if leg not in legs:
        print(f"{label:<50} {'skipped':>8}")
        continue
    seconds = median(leg, 0)
    spread = ""
    if len(legs[leg]) > 1:
        spread = f"  [{min(s[0] for s in legs[leg]):.3f}-{max(s[0] for s in legs[leg]):.3f}]"
    print(f"{label:<50} {seconds:8.3f} {object_bytes / seconds / 1e6:8.1f} {seconds / subject:14.3f} "
          f"{median(leg, 1):13.2f} {median(leg, 2):15.2f} {median(leg, 3):7.0f}{spread}")
print()

def goal(name, leg, target):
    if leg not in legs:
        print(f"{name}: not measured (leg skipped)")
        return "n/a"
    ratio = median(leg, 0) / subject
    verdict = "PASS" if ratio >= target else "MISS"
    print(f"{name}: cachemesh / {leg} throughput = {ratio:.3f} (goal >= {target}): {verdict}")
    return f"{ratio:.3f}"

sendme_ratio = goal("goal 1, cachemesh vs sendme", "sendme", 5)
tcp_ratio = goal("goal 2, cachemesh vs plain TCP copy to a file", "tcp-file", 0.5)
if "tcp-file-fsync" in legs:
    print(f"        (against the TCP copy + fsync: {median('tcp-file-fsync', 0) / subject:.3f}; "
          f"+ BLAKE3: {median('tcp-file-blake3', 0) / subject:.3f})")
if origin_warnings.strip():
    print()
    print("!!! WARNING: some cachemesh legs took bytes from the ORIGIN, not only from the peer:")
    for line in origin_warnings.strip().splitlines():
        print(f"!!!   {line}")
print()
print(f"load average: start {load_start}, end {load_end}")
print(f"p2p_result bytes={object_bytes} rounds={rounds} "
      + " ".join(f"{leg}_seconds={median(leg, 0):.3f}" for leg, _ in labels if leg in legs)
      + f" ratio_sendme={sendme_ratio} ratio_tcp={tcp_ratio}")
EOF
phase "done"
