#!/usr/bin/env bash
# Context switches per message of a server under peerbench's workload, per
# thread: what a hand-off between threads costs, which neither callgrind
# (user-space instructions) nor a syscall count shows.
#
#   scripts/context-switches-per-message.sh --bin BIN [--batch 1] [--rounds 2]
#       [--rate N] [--peerbench PATH] [--port 17880]
#   scripts/context-switches-per-message.sh --target beanstalkd|redis [...]
#
# With --bin, starts BIN (1 shard, periodic durability, 127.0.0.1:PORT) and
# stops it by PID after each round; with --target, peerbench starts and
# stops that peer itself (its own default durability, as in the matrix).
# Each round runs peerbench for 8 s (--rate N: its open loop at N msg/s),
# reads every thread's voluntary and involuntary switches from
# /proc/PID/task/*/status 3 s apart in the middle, and prints them divided
# by the messages acknowledged in those 3 s: per thread (those above 0.01)
# and in total. A voluntary switch is a thread that slept (a park, a
# futex wait); an involuntary one a thread that was preempted or yielded.
source "$(dirname "$0")/help.sh"
source "$(dirname "$0")/measured-server.sh"
set -euo pipefail
bin="" target="" batch=1 rounds=2 port=17880 rate_flag=()
peerbench="${PEERBENCH_BIN:-$HOME/.cache/peerbench/target/release/peerbench}"
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target="$2" ;;
    *) measured_flag "$1" "${2:-}" || { echo "unknown flag $1" >&2; exit 2; } ;;
  esac
  shift 2
done
case "$target" in
  "") [ -n "$bin" ] || { echo "--bin or --target is required" >&2; exit 2; } ;;
  beanstalkd) process=beanstalkd ;;
  redis) process=redis-server ;;
  *) echo "--target must be beanstalkd or redis" >&2; exit 2 ;;
esac
work=$(mktemp -d /tmp/queueber-switches.XXXXXX)
pid="" bench=""
cleanup() {
  [ -n "$bench" ] && wait "$bench" 2>/dev/null
  [ -n "$pid" ] && [ -n "$bin" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
# One line per thread: name, voluntary, involuntary.
snapshot() {
  for task in /proc/"$1"/task/*; do
    printf '%s %s %s\n' "$(tr ' ' _ <"$task/comm")" \
      "$(awk '/^voluntary_ctxt_switches/ {print $2}' "$task/status")" \
      "$(awk '/^nonvoluntary_ctxt_switches/ {print $2}' "$task/status")"
  done 2>/dev/null || true
}
for round in $(seq "$rounds"); do
  if [ -n "$bin" ]; then
    measured_server_start "$bin" "$port" "$work/data"
    measured_peerbench_start "$peerbench" "$port" "$work/result.txt" -B "$batch" "${rate_flag[@]}"
  else
    timeout 60 "$peerbench" --target "$target" -B "$batch" "${rate_flag[@]}" \
      --duration 7 --warmup 1 >"$work/result.txt" 2>/dev/null &
    bench=$!
  fi
  sleep 2.5
  [ -n "$bin" ] || pid=$(pgrep -n -x "$process" || true)
  [ -n "$pid" ] || { echo "round $round: no $process process found" >&2; exit 1; }
  snapshot "$pid" >"$work/before"
  sleep 3
  snapshot "$pid" >"$work/after"
  wait "$bench" || true
  bench=""
  if [ -n "$bin" ]; then
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  fi
  pid=""
  rate=$(grep -o '"acked_per_sec":[0-9.]*' "$work/result.txt" | cut -d: -f2)
  python3 - "$round" "${rate:-0}" "$work/before" "$work/after" <<'PY'
import collections, sys
round_, rate, before, after = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
def read(path):
    counts = collections.defaultdict(lambda: [0, 0])
    for line in open(path):
        name, vol, invol = line.split()
        counts[name][0] += int(vol)
        counts[name][1] += int(invol)
    return counts
a, b = read(before), read(after)
messages = rate * 3
if messages == 0:
    sys.exit(f"round {round_}: peerbench acknowledged nothing")
rows, total = [], [0, 0]
for name, (vol, invol) in b.items():
    dv, di = (vol - a[name][0]) / messages, (invol - a[name][1]) / messages
    total[0] += dv
    total[1] += di
    if dv + di > 0.01:
        rows.append(f"{name} {dv:.2f} + {di:.2f}")
print(f"round {round_}: {rate:,.0f} msg/s, {sum(total):.2f} switches per message "
      f"({total[0]:.2f} voluntary + {total[1]:.2f} involuntary); " + ", ".join(rows))
PY
done
