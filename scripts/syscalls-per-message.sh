#!/usr/bin/env bash
# Syscalls per message of a queueberd binary under peerbench's closed-loop
# workload, counted with `perf trace -s` (far less slow-down than strace,
# whose ptrace stops change the server's timing too much to be useful).
#
#   scripts/syscalls-per-message.sh --bin BIN [--batch 32] [--rounds 2]
#                                   [--rate N] [--peerbench PATH] [--port 17860]
#
# --rate N runs peerbench's open loop at N msg/s instead of its closed loop.
#
# Each round starts BIN (1 shard, periodic durability, 127.0.0.1:PORT),
# runs peerbench against it for 8 s, counts the server's syscalls over 3 s
# in the middle, stops the server by PID, and prints the count divided by
# the messages acknowledged in that window, with the largest syscalls.
# Needs perf (Debian's linux-perf) and root or perf_event_paranoid <= 1.
source "$(dirname "$0")/help.sh"
source "$(dirname "$0")/measured-server.sh"
set -euo pipefail
bin="" batch=32 rounds=2 port=17860 rate_flag=()
peerbench="${PEERBENCH_BIN:-$HOME/.cache/peerbench/target/release/peerbench}"
while [ $# -gt 0 ]; do
  measured_flag "$1" "${2:-}" || { echo "unknown flag $1" >&2; exit 2; }
  shift 2
done
[ -n "$bin" ] || { echo "--bin is required" >&2; exit 2; }
work=$(mktemp -d /tmp/queueber-syscalls.XXXXXX)
pid=""
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
for round in $(seq "$rounds"); do
  measured_server_start "$bin" "$port" "$work/data"
  measured_peerbench_start "$peerbench" "$port" "$work/result.json" -B "$batch" "${rate_flag[@]}"
  sleep 2.5
  timeout 10 perf trace -s -p "$pid" -o "$work/trace.txt" -- sleep 3 >/dev/null 2>&1 || true
  wait "$bench" || true
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  rate=$(grep -o '"acked_per_sec":[0-9.]*' "$work/result.json" | cut -d: -f2)
  python3 - "$round" "${rate:-0}" "$work/trace.txt" <<'PY'
import re, sys
round_, rate, path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
counts = {}
for line in open(path):
    m = re.match(r"\s+(\w+)\s+(\d+)\s+\d+\s", line)
    if m:
        counts[m.group(1)] = counts.get(m.group(1), 0) + int(m.group(2))
messages = rate * 3
if messages == 0:
    sys.exit(f"round {round_}: peerbench acknowledged nothing")
top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
print(f"round {round_}: {rate:,.0f} msg/s, {sum(counts.values()) / messages:.3f} syscalls per message; "
      + ", ".join(f"{name} {n / messages:.3f}" for name, n in top))
PY
done
