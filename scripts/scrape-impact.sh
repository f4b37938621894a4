#!/usr/bin/env bash
# What metrics scrapes do to other requests: starts queueberd (1 shard,
# periodic) with a metrics endpoint, adds one message to each of QUEUES idle
# queues (the Python client), times 10 scrapes of /metrics and the server's
# CPU for them, then runs ROUNDS rounds of a B=1 load on another queue,
# alternating no scrapes and a scrape every second, and prints each round's
# add p99 / p99.9, throughput and server CPU per message.
#
#   scripts/scrape-impact.sh [--bin QUEUEBERD] [--loadgen LOADGEN]
#                            [--queues 10000] [--rounds 6]
#                            [--scraper-nice N] [--max-queues N]
#                            [--scrape-path /metrics] [--scrape-addr HOST:PORT]
#
# --scraper-nice runs the scraping curl at that nice level (on a 2-core
# machine it otherwise competes with the generator and the server as a
# remote Prometheus would not); --max-queues passes --metrics-max-queues;
# --scrape-path /healthz makes the same requests without asking any shard
# for anything (a control: what scraping itself costs the machine);
# --scrape-addr points the per-second curl elsewhere, e.g. 127.0.0.1:9
# where nothing listens (a control: what the scraper process alone costs).
#
# Needs the Python venv of scripts/test-python.sh and curl. Listens on
# 127.0.0.1 only; stops its server by PID. --help prints this and starts
# nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$HOME/.cache/queueber/target}/release"
bin="$target/queueberd" loadgen="$target/loadgen" queues=10000 rounds=6 scraper_nice=0 max_queues=1000 scrape_path=/metrics scrape_addr=
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --loadgen) loadgen="$2"; shift 2 ;;
    --queues) queues="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --scraper-nice) scraper_nice="$2"; shift 2 ;;
    --max-queues) max_queues="$2"; shift 2 ;;
    --scrape-path) scrape_path="$2"; shift 2 ;;
    --scrape-addr) scrape_addr="$2"; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
python="${QUEUEBER_VENV:-$HOME/.cache/queueber/venv}/bin/python"
port=17820 metrics=17821
work=$(mktemp -d /tmp/queueber-scrape.XXXXXX)
pid="" scraper=""
cleanup() {
  [ -n "$scraper" ] && kill "$scraper" 2>/dev/null
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
"$bin" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics" --data-dir "$work/data" \
  --shards 1 --durability periodic --log warn --metrics-max-queues "$max_queues" &
pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
PYTHONPATH=clients/python/src "$python" - "127.0.0.1:$port" "$queues" <<'PY'
import asyncio, sys
import queueber.aio as qa
async def main(addr, n):
    async with qa.connect(addr, tenant="idle") as c:
        room = asyncio.Semaphore(512)
        async def one(i):
            async with room:
                await c.add(f"q{i:06d}", [b"x"])
        await asyncio.gather(*(one(i) for i in range(n)))
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
PY
sleep 1
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
before=$(ticks)
printf 'scrape seconds:'
for _ in $(seq 10); do
  curl -s -o /dev/null -w ' %{time_total}' "http://127.0.0.1:$metrics/metrics"; sleep 0.2
done
echo
echo "server CPU for 10 scrapes and 2 s idle: $(( ($(ticks) - before) * 1000 / $(getconf CLK_TCK) )) ms"
for round in $(seq "$rounds"); do
  for mode in quiet scraped; do
    if [ "$mode" = scraped ]; then
      (while true; do nice -n "$scraper_nice" curl -s -o /dev/null "http://${scrape_addr:-127.0.0.1:$metrics}$scrape_path" || true; sleep 1; done) &
      scraper=$!
    fi
    "$loadgen" --addr "127.0.0.1:$port" --server-pid "$pid" -B 1 -P 2 -C 2 -Q 1 --duration 8 --warmup 1 \
      2>/dev/null | tail -1 | python3 -c "
import json, sys
r = json.loads(sys.stdin.read()); a = r['add']
print('round $round $mode: add p99 %.2f ms p99.9 %.2f ms, %d msg/s, %.2f us CPU/msg' % (
    a['p99_us'] / 1000, a['p999_us'] / 1000, r['removed_per_s'], r['server_cpu_us_per_msg']))"
    if [ "$mode" = scraped ]; then kill "$scraper"; wait "$scraper" 2>/dev/null || true; scraper=""; fi
  done
done
