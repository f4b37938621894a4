#!/usr/bin/env bash
# The floor under the design card, measured through peerbench: the real
# server, the same server with a free in-memory store behind its storage
# thread, that store on the executor with no hand-off (which the card
# forbids: a measurement only), beanstalkd and Redis, interleaved, medians.
#
# Build the floor binary first (docs/benchmarks.md, "The floor under the
# card"):
#   git apply docs/experiments/storage-free-floor.patch
#   cargo build --release --features server --bin queueberd
#   cp "$CARGO_TARGET_DIR/release/queueberd" /tmp/qb-floor
#   git checkout src && git clean -f src/storage/floor.rs
#
# Usage: scripts/floor.sh --bin /tmp/qb-floor [--rounds 3] [-- peerbench flags, e.g. -B 1 --rate 5000]
# Needs peerbench built (PEERBENCH_BIN, default ~/.cache/peerbench/target/release/peerbench),
# redis-server and beanstalkd. Each run is bounded (--duration 6 --warmup 2).
set -euo pipefail

bin=""
rounds=3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ -x "$bin" ]] || { echo "--bin must name the floor build of queueberd (see the header of $0)" >&2; exit 2; }
pb="${PEERBENCH_BIN:-$HOME/.cache/peerbench/target/release/peerbench}"
[[ -x "$pb" ]] || { echo "peerbench not found at $pb (build it as ../shared/peerbench/README.md says)" >&2; exit 2; }
# peerbench runs from its own directory when it is beside the repository.
peerbench_dir="$(cd "$(dirname "$0")/.." && pwd)/../shared/peerbench"
[[ -d "$peerbench_dir" ]] || peerbench_dir="$PWD"

out="$(mktemp /tmp/queueber-floor.XXXXXX.jsonl)"
trap 'rm -f "$out"' EXIT

run() {
  local who="$1"; shift
  local line
  line="$(cd "$peerbench_dir" && "$@" --duration 6 --warmup 2 2>/dev/null | grep '^RESULT' | sed 's/^RESULT //' || true)"
  if [[ -z "$line" ]]; then
    echo "$who: no result" >&2
    return
  fi
  printf '{"who":"%s","res":%s}\n' "$who" "$line" >> "$out"
}

for round in $(seq 1 "$rounds"); do
  for who in real free inline beanstalkd redis; do
    case "$who" in
      real) run "$who" "$pb" --target queueber --server-bin "$bin" "$@" ;;
      free|inline) run "$who" env QUEUEBER_FLOOR="$who" "$pb" --target queueber --server-bin "$bin" "$@" ;;
      *) run "$who" "$pb" --target "$who" "$@" ;;
    esac
  done
  echo "round $round of $rounds done" >&2
done

python3 - "$out" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'server':12s} {'msg/s':>8s} {'CPU µs/msg':>11s} {'p50 µs':>9s}  runs (CPU)  bad")
for who in ["real", "free", "inline", "beanstalkd", "redis"]:
    rs = [r["res"] for r in rows if r["who"] == who]
    if not rs:
        continue
    med = lambda k: st.median(r[k] for r in rs)
    runs = " ".join(f"{r['server_cpu_us_per_msg']:.1f}" for r in rs)
    bad = sum(r["duplicates"] + r["lost"] + r["errors"] for r in rs)
    print(f"{who:12s} {med('acked_per_sec'):8.0f} {med('server_cpu_us_per_msg'):11.1f} {med('lat_p50_us'):9.0f}  [{runs}]  {bad}")
PY
