#!/usr/bin/env bash
# Open-loop latency of queueber against same-machine baselines, interleaved:
# every round runs each configuration once, in turn, so that the machine's
# drift hits all of them alike. Prints every run and the medians.
#
#   scripts/latency-baseline.sh [--runs 3] [--floor-bin PATH] [-- loadgen flags]
#
# Configurations: queueber (1 shard, periodic), Redis with AOF everysec,
# Redis memory-only; with --floor-bin, also a queueberd built with
# docs/experiments/storage-free-floor.patch, run with its store replaced by
# the in-memory model, through the offload (model) and inline (inline).
# Default workload: docs/benchmarks.md section 3.
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

runs=3
floor_bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --floor-bin) floor_bin="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
loadgen_args=("$@")
[ ${#loadgen_args[@]} -gt 0 ] || loadgen_args=(-B 1 -P 2 -C 2 -Q 1 --rate 5000 --duration 5 --warmup 1)

out="${LOADGEN_OUT:-$(mktemp -d /tmp/queueber-baseline.XXXXXX)}"
mkdir -p "$out"
bin="$CARGO_TARGET_DIR/release"
port=17530

floor_pid=""
stop_floor() {
  if [ -n "$floor_pid" ] && kill -0 "$floor_pid" 2>/dev/null; then
    kill -TERM "$floor_pid"
    wait "$floor_pid" 2>/dev/null || true
  fi
  floor_pid=""
}
trap stop_floor EXIT

via_loadgen_sh() {  # name run extra-args...
  local name="$1" run="$2"; shift 2
  LOADGEN_OUT="$out/$name-$run" scripts/loadgen.sh --shards 1 --runs 1 --port "$port" "$@" \
    -- "${loadgen_args[@]}" > /dev/null 2>&1
  cat "$out/$name-$run/results.jsonl" >> "$out/$name.jsonl"
}

floor_run() {  # mode run
  local mode="$1" run="$2" data="$out/floor-data"
  rm -rf "$data"
  QUEUEBER_FLOOR="$mode" "$floor_bin" --listen "127.0.0.1:$port" --data-dir "$data" --shards 1 \
    --durability periodic --log warn > "$out/floor-$mode-$run.log" 2>&1 &
  floor_pid=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  timeout 600 "$bin/loadgen" --addr "127.0.0.1:$port" --server-pid "$floor_pid" \
    --label "floor=$mode run=$run" "${loadgen_args[@]}" | tail -n 1 >> "$out/floor-$mode.jsonl"
  stop_floor
}

configs=(queueber redis-aof redis-memory)
[ -z "$floor_bin" ] || configs+=(floor-model floor-inline)
for run in $(seq 1 "$runs"); do
  echo "round $run of $runs" >&2
  via_loadgen_sh queueber "$run"
  via_loadgen_sh redis-aof "$run" --backend redis
  via_loadgen_sh redis-memory "$run" --backend redis --server-args "--appendonly no"
  if [ -n "$floor_bin" ]; then
    floor_run model "$run"
    floor_run inline "$run"
  fi
done

python3 - "$out" "${configs[@]}" <<'PY'
import json, statistics, sys
out, configs = sys.argv[1], sys.argv[2:]
print(f"{'server':<14} {'e2e p50 µs (runs)':<24} {'e2e p99 µs (runs)':<24} {'p50':>6} {'p99':>6} {'cpu µs/msg':>10} {'dup+lost+err':>12}")
for c in configs:
    rows = [json.loads(l) for l in open(f"{out}/{c}.jsonl") if l.strip()]
    p50 = [r["end_to_end"]["p50_us"] for r in rows]
    p99 = [r["end_to_end"]["p99_us"] for r in rows]
    cpu = [r["server_cpu_us_per_msg"] for r in rows if r["server_cpu_us_per_msg"] is not None]
    bad = sum(r["duplicates"] + r["lost"] + r["errors"] for r in rows)
    print(f"{c:<14} {', '.join(map(str, p50)):<24} {', '.join(map(str, p99)):<24} "
          f"{statistics.median(p50):>6.0f} {statistics.median(p99):>6.0f} "
          f"{statistics.median(cpu) if cpu else float('nan'):>10.1f} {bad:>12}")
PY
echo "results: $out" >&2
