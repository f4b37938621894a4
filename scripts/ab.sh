#!/usr/bin/env bash
# Interleaved A/B of two queueberd binaries through one load generator:
# every round runs A then B (fresh data directory and server each time), so
# the machine's drift hits both alike; prints every run and the medians of
# throughput and server CPU per message.
#
#   scripts/ab.sh --a BIN --b BIN [--runs 3] [--shards 1] [--durability periodic]
#                 [--loadgen BIN] [--a-flags "..."] [--b-flags "..."]
#                 [--a-loadgen-flags "..."] [--b-loadgen-flags "..."]
#                 [-- loadgen flags...]
#
# --a-flags/--b-flags add server flags to one side only, and
# --a-loadgen-flags/--b-loadgen-flags loadgen flags (split on spaces): the
# same binary with and without a feature, e.g. --b-flags "--auth-file F"
# --b-loadgen-flags "--token T".
#
# Default loadgen flags: -B 32 -P 2 -C 2 -Q 1 --duration 5 --warmup 1.
# Servers listen on 127.0.0.1 and are stopped by PID after each run.
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
a="" b="" runs=3 shards=1 durability=periodic
a_flags="" b_flags="" a_loadgen_flags="" b_loadgen_flags=""
loadgen="${CARGO_TARGET_DIR:-$HOME/.cache/queueber/target}/release/loadgen"
while [ $# -gt 0 ]; do
  case "$1" in
    --a) a="$2"; shift 2 ;;
    --b) b="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --shards) shards="$2"; shift 2 ;;
    --durability) durability="$2"; shift 2 ;;
    --loadgen) loadgen="$2"; shift 2 ;;
    --a-flags) a_flags="$2"; shift 2 ;;
    --b-flags) b_flags="$2"; shift 2 ;;
    --a-loadgen-flags) a_loadgen_flags="$2"; shift 2 ;;
    --b-loadgen-flags) b_loadgen_flags="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
[ -n "$a" ] && [ -n "$b" ] || { echo "--a and --b are required" >&2; exit 2; }
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-B 32 -P 2 -C 2 -Q 1 --duration 5 --warmup 1)
work=$(mktemp -d /tmp/queueber-ab.XXXXXX)
port=17650
pid=""
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; rm -rf "$work"' EXIT
for round in $(seq 1 "$runs"); do
  for side in a b; do
    bin=$a flags=$a_flags lg_flags=$a_loadgen_flags
    [ "$side" = b ] && { bin=$b flags=$b_flags lg_flags=$b_loadgen_flags; }
    rm -rf "$work/data"
    # shellcheck disable=SC2086 # the extra flags are split on purpose
    "$bin" --listen "127.0.0.1:$port" --data-dir "$work/data" --shards "$shards" \
      --durability "$durability" --log warn $flags &
    pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    # shellcheck disable=SC2086
    "$loadgen" --addr "127.0.0.1:$port" --server-pid "$pid" --label "$side" "${args[@]}" $lg_flags \
      2>/dev/null | tail -1 | sed "s/^/$side $round /" | tee -a "$work/results"
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  done
done
python3 - "$work/results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    side, _, js = line.split(" ", 2)
    rows.setdefault(side, []).append(json.loads(js))
def pick(r, *keys):
    for k in keys:
        cur = r
        for part in k.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
    return None
for side in ("a", "b"):
    rs = rows.get(side, [])
    tput = [pick(r, "removed_per_s") for r in rs]
    cpu = [pick(r, "server_cpu_us_per_msg") for r in rs]
    tput = [t for t in tput if t is not None]
    cpu = [c for c in cpu if c is not None]
    print(f"{side}: runs {len(rs)}  throughput median {statistics.median(tput):,.0f} msg/s {['%.0f' % t for t in tput]}"
          + (f"  server CPU median {statistics.median(cpu):.2f} us/msg {['%.2f' % c for c in cpu]}" if cpu else ""))
PY
