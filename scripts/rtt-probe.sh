#!/usr/bin/env bash
# Sequential round-trip latency of single requests against an idle server:
# `hello` (answered by the connection: network and executor wake-up only) and
# `stats` (one trip through the shard core and its blocking-offload thread).
# The difference is the cost of a storage hand-off at idle.
#
#   scripts/rtt-probe.sh [--shards 1] [--requests 3000]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
shards=1
requests=3000
port=17710
while [ $# -gt 0 ]; do
  case "$1" in
    --shards) shards="$2"; shift 2 ;;
    --requests) requests="$2"; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
cargo build --release --bin queueberd --bin queueber >&2
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d /tmp/queueber-rtt.XXXXXX)
"$bin/queueberd" --listen "127.0.0.1:$port" --data-dir "$work/data" --shards "$shards" --log warn &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
QUEUEBER_ADDR="127.0.0.1:$port" "$bin/queueber" add probe x > /dev/null
capnp encode queueber.capnp Request <<< '(id = 1, hello = void)' > "$work/hello.bin"
capnp encode queueber.capnp Request <<< '(id = 2, stats = (tenant = "default", queue = "probe"))' > "$work/stats.bin"
python3 - "$work" "$port" "$requests" <<'PY'
import socket, struct, sys, time
work, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rtt(frame):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        s.sendall(frame)
        head = s.recv(8, socket.MSG_WAITALL)
        segments = struct.unpack("<I", head[:4])[0] + 1
        words = struct.unpack("<I", head[4:8])[0]
        if segments > 1:
            rest = s.recv((segments - 1) * 4 + (4 if segments % 2 == 0 else 0), socket.MSG_WAITALL)
            words += sum(struct.unpack(f"<{segments - 1}I", rest[: (segments - 1) * 4]))
        s.recv(words * 8, socket.MSG_WAITALL)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6
for name in ("hello", "stats"):
    p50, p99 = rtt(open(f"{work}/{name}.bin", "rb").read())
    print(f"{name:<6} p50 {p50:6.0f} µs   p99 {p99:6.0f} µs")
PY
