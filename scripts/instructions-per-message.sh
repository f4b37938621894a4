#!/usr/bin/env bash
# User-space instructions per message of a queueberd binary under
# peerbench's closed-loop workload, counted by valgrind's callgrind: a figure
# that does not move with the machine's noise, for A/B work on CPU cost.
#
#   scripts/instructions-per-message.sh --bin BIN [--batch 32] [--duration 10]
#       [--rate N] [--valgrind PATH] [--peerbench PATH] [--port 17870] [--keep DIR]
#
# Starts BIN under callgrind (1 shard, periodic durability, 127.0.0.1:PORT)
# with instrumentation off, switches it on, runs peerbench for --duration
# seconds (no warm-up: everything the server does for those messages
# counts, its RocksDB background threads included), switches it off, dumps,
# stops the server by PID and prints the instructions divided by the
# messages peerbench moved (added, delivered and acknowledged), with the
# functions that cost the most.
#
# Valgrind 3.19 (Debian 12) cannot run the server: its io_uring_enter
# wrapper does not release valgrind's big lock while the call blocks, so the
# first executor to park stops every other thread (KDE bug 463859; fixed
# upstream). --valgrind takes a build with that fixed; to make one from
# Debian's source:
#   curl -O http://deb.debian.org/debian/pool/main/v/valgrind/valgrind_3.19.0.orig.tar.bz2
#   tar xjf valgrind_3.19.0.orig.tar.bz2 && cd valgrind-3.19.0
#   sed -i '/^PRE(sys_io_uring_enter)/{n;s/$/\n   *flags |= SfMayBlock;/}' coregrind/m_syswrap/syswrap-linux.c
#   ./configure --prefix="$HOME/.cache/valgrind" --enable-only64bit && make -j2 && make install
source "$(dirname "$0")/help.sh"
set -euo pipefail
bin="" batch=32 duration=10 port=17870 keep="" rate=()
valgrind="$HOME/.cache/valgrind/bin/valgrind"
peerbench="${PEERBENCH_BIN:-$HOME/.cache/peerbench/target/release/peerbench}"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --rate) rate=(--rate "$2"); shift 2 ;;
    --valgrind) valgrind="$2"; shift 2 ;;
    --peerbench) peerbench="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
[ -n "$bin" ] || { echo "--bin is required" >&2; exit 2; }
[ -x "$valgrind" ] || { echo "no valgrind at $valgrind (see the comment at the top)" >&2; exit 2; }
control="$(dirname "$valgrind")/callgrind_control"
work=$(mktemp -d /tmp/queueber-instructions.XXXXXX)
pid=""
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
"$valgrind" --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out" \
  "$bin" --listen "127.0.0.1:$port" --metrics-listen off --data-dir "$work/data" \
  --shards 1 --durability periodic --log warn 2>"$work/valgrind.log" &
pid=$!
for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
"$control" -i on "$pid" >/dev/null 2>&1
timeout $((duration + 120)) "$peerbench" --target queueber --addr "127.0.0.1:$port" --server-pid "$pid" \
  -B "$batch" "${rate[@]}" --duration "$duration" --warmup 0 >"$work/result.txt" 2>/dev/null
"$control" -i off "$pid" >/dev/null 2>&1
"$control" -d "$pid" >/dev/null 2>&1
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=""
dump=$(ls "$work"/callgrind.out.* | head -1)
[ -n "$keep" ] && cp "$dump" "$keep/"
# Every message counted was added, polled and removed once.
total=$(grep -o "correctness total enqueued [0-9]*, acked [0-9]*" "$work/result.txt" | grep -o "[0-9]*$")
instructions=$(grep "^totals:" "$dump" | awk '{print $2}')
python3 - "$batch" "${total:-0}" "${instructions:-0}" <<'PY'
import sys
batch, messages, instructions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if messages == 0:
    sys.exit("peerbench moved no messages")
print(f"B={batch}: {instructions:,} instructions for {messages:,} messages: "
      f"{instructions / messages:,.0f} per message")
PY
"$(dirname "$valgrind")/callgrind_annotate" --inclusive=yes "$dump" 2>/dev/null \
  | grep -E "queueber::|rocksdb::(MemTable::Add|DBImpl::WriteImpl)|glommio::reactor|capnp::" \
  | sed -E 's#/root/.cargo/registry/src/[^/]+/##; s#\[[^]]*\]$##' | cut -c1-160 | head -15
