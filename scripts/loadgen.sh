#!/usr/bin/env bash
# Runs the load generator against fresh queueber servers, one run per shard
# count, and prints a results table (plus every run's JSON line).
#
#   scripts/loadgen.sh [--shards "1 2"] [--durability periodic] [--runs 3]
#                      [--server-args "extra queueberd flags"]
#                      [--addr HOST:PORT (use a running server instead)]
#                      [--backend queueber|redis]
#                      [-- loadgen flags...]
#
# --backend redis runs the same workload against a fresh redis-server (the
# baseline in docs/benchmarks.md): its AOF is the WAL, with appendfsync
# always / everysec / no standing in for --durability fsync / periodic / wal.
#
# Every server it starts listens on 127.0.0.1 with a fresh data directory and
# is stopped by PID when its run ends; every run is bounded by --duration.
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

shard_counts="1 2"
durability="periodic"
runs=1
addr=""
server_args=""
backend="queueber"
port=17500
out_dir="${LOADGEN_OUT:-$(mktemp -d /tmp/queueber-loadgen.XXXXXX)}"
mkdir -p "$out_dir"
while [ $# -gt 0 ]; do
  case "$1" in
    --shards) shard_counts="$2"; shift 2 ;;
    --durability) durability="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --addr) addr="$2"; shift 2 ;;
    --server-args) server_args="$2"; shift 2 ;;
    --backend) backend="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
loadgen_args=("$@")

case "$backend" in
  queueber) ;;
  redis)
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    case "$durability" in
      fsync) appendfsync=always ;;
      periodic) appendfsync=everysec ;;
      wal) appendfsync=no ;;
      *) echo "unknown durability $durability" >&2; exit 2 ;;
    esac
    ;;
  *) echo "unknown backend $backend (queueber or redis)" >&2; exit 2 ;;
esac

cargo build --release --bin queueberd --bin loadgen >&2
bin="$CARGO_TARGET_DIR/release"
results="$out_dir/results.jsonl"
: > "$results"

server_pid=""
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$server_pid" 2>/dev/null && kill -KILL "$server_pid"
    wait "$server_pid" 2>/dev/null || true
  fi
  server_pid=""
}
trap stop_server EXIT

run_one() {  # shards run label
  local shards="$1" run="$2"
  local target pid_args=()
  if [ -n "$addr" ]; then
    target="$addr"
  else
    local data="$out_dir/data-$backend-$shards-$run"
    rm -rf "$data"
    if [ "$backend" = redis ]; then
      # Redis has one event loop: it runs as "1 shard" whatever --shards says.
      mkdir -p "$data"
      redis-server --bind 127.0.0.1 --port "$port" --dir "$data" --save "" \
        --appendonly yes --appendfsync "$appendfsync" $server_args \
        > "$out_dir/server-$backend-$shards-$run.log" 2>&1 &
    else
      "$bin/queueberd" --listen "127.0.0.1:$port" --data-dir "$data" --shards "$shards" \
        --durability "$durability" --log warn $server_args > "$out_dir/server-$backend-$shards-$run.log" 2>&1 &
    fi
    server_pid=$!
    target="127.0.0.1:$port"
    for _ in $(seq 1 100); do
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
      sleep 0.1
    done
    pid_args=(--server-pid "$server_pid")
  fi
  timeout 600 "$bin/loadgen" --backend "$backend" --addr "$target" "${pid_args[@]}" \
    --label "backend=$backend shards=$shards durability=$durability run=$run" "${loadgen_args[@]}" \
    | tee "$out_dir/loadgen-$backend-$shards-$run.txt" >&2
  tail -n 1 "$out_dir/loadgen-$backend-$shards-$run.txt" >> "$results"
  stop_server
}

for shards in $shard_counts; do
  for run in $(seq 1 "$runs"); do
    run_one "$shards" "$run"
  done
done

# Medians per shard count.
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["shards"], []).append(r)
def med(rs, f):
    vals = [f(r) for r in rs if f(r) is not None]
    return statistics.median(vals) if vals else None
print(f"{'shards':>6} {'runs':>4} {'removed/s':>10} {'e2e p50 µs':>10} {'e2e p99 µs':>10} {'cpu µs/msg':>10} {'rss MiB':>8} {'dup':>4} {'lost':>4} {'err':>4}")
for shards, rs in sorted(by.items()):
    cpu = med(rs, lambda r: r["server_cpu_us_per_msg"])
    rss = med(rs, lambda r: r["server_peak_rss_kib"])
    print(f"{shards:>6} {len(rs):>4} {med(rs, lambda r: r['removed_per_s']):>10.0f} "
          f"{med(rs, lambda r: r['end_to_end']['p50_us']):>10.0f} {med(rs, lambda r: r['end_to_end']['p99_us']):>10.0f} "
          f"{cpu if cpu is None else round(cpu, 2)!s:>10} {rss if rss is None else int(rss // 1024)!s:>8} "
          f"{sum(r['duplicates'] for r in rs):>4} {sum(r['lost'] for r in rs):>4} {sum(r['errors'] for r in rs):>4}")
PY
echo "results: $results" >&2
