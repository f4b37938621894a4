#!/usr/bin/env bash
# Online backups under load: loadgen B=32 on 4 queues for 20 s against a
# fresh server (periodic durability), with backups every 2 s (on) or none
# (off); prints throughput, server CPU per message, loss checks and each
# backup's time (docs/benchmarks.md, "Online backups under load").
#
#   scripts/backup-under-load.sh on|off PORT     # e.g. alternate off/on twice
# Needs the release build (queueberd, loadgen). Uses /tmp/bkl-*.
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -uo pipefail
mode=${1:?on or off}; PORT=${2:?a free port}
target=${CARGO_TARGET_DIR:-$HOME/.cache/queueber/target}/release
rm -rf /tmp/bkl-data /tmp/bkl-backups
extra=()
[ "$mode" = on ] && extra=(--backup-dir /tmp/bkl-backups --backup-interval-ms 2000 --backup-keep 2)
"$target/queueberd" --listen 127.0.0.1:$PORT --data-dir /tmp/bkl-data --metrics-listen off --durability periodic "${extra[@]}" > /tmp/bkl-$mode.log 2>&1 &
SP=$!
sleep 1.5
timeout 60 "$target/loadgen" --addr 127.0.0.1:$PORT -B 32 -Q 4 --duration 20 --warmup 2 --server-pid $SP --label $mode 2>/dev/null | tail -1 | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$mode', round(r['removed_per_s']), 'msg/s', round(r['server_cpu_us_per_msg'],2), 'us/msg', 'lost', r['lost'], 'dup', r['duplicates'], 'err', r['errors'], 'rss', r['server_peak_rss_kib']//1024, 'MiB')"
kill -TERM $SP; wait $SP
grep -c "backup written" /tmp/bkl-$mode.log | sed "s/^/backups written: /"
grep "backup written" /tmp/bkl-$mode.log | grep -o 'took_ms=[0-9]*' | tr '\n' ' '; echo
grep -i "backup failed\|error" /tmp/bkl-$mode.log | head -3
