#!/usr/bin/env bash
# Runs every load-test scenario of docs/benchmarks.md (each against fresh
# servers, 1 and 2 shards, --runs times) and prints Markdown tables of medians.
# Bounded: every run has a fixed duration; about 15 minutes in all.
#
#   scripts/bench-all.sh [--runs 3] [--duration 5]
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
duration=5
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
out="${BENCH_OUT:-$(mktemp -d /tmp/queueber-bench.XXXXXX)}"
echo "results in $out" >&2
common=(--duration "$duration" --warmup 1)

scenario() {  # name durability loadgen-args...
  local name="$1" durability="$2"; shift 2
  LOADGEN_OUT="$out/$name" bash scripts/loadgen.sh --shards "1 2" --runs "$runs" --durability "$durability" \
    -- "$@" > "$out/$name.table" 2> "$out/$name.log" || echo "scenario $name failed (see $out/$name.log)" >&2
}
mkdir -p "$out"
for b in 1 32; do
  scenario "one-queue-b$b" periodic -B "$b" -P 2 -C 2 -Q 1 "${common[@]}"
  scenario "64-queues-b$b" periodic -B "$b" -P 2 -C 2 -Q 64 --per-shard "${common[@]}"
done
scenario open-loop-5000 periodic -B 1 -P 2 -C 2 -Q 1 --rate 5000 "${common[@]}"
for d in fsync periodic wal; do
  scenario "durability-$d" "$d" -B 32 -P 2 -C 2 -Q 1 "${common[@]}"
done
scenario deep-queue-1m periodic -B 32 -P 2 -C 2 -Q 1 --preload 1000000 --duration 60 --warmup 0

python3 scripts/bench_tables.py "$out"
