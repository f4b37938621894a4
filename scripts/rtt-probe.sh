#!/usr/bin/env bash
# Where the idle-latency floor of this machine is, measured in one run so the
# numbers can be compared with each other:
#
#  1. kernel costs: a plain syscall vs arming and disarming a timer (on a KVM
#     guest every reprogramming of the timer device is a VM exit), and a pipe
#     ping-pong between two processes on the same CPU vs on two CPUs (a
#     cross-CPU wake-up needs an IPI);
#  2. a baseline server: a blocking one-thread TCP echo server (the least a
#     request/response server can do), round trip and server CPU per request;
#  3. queueberd: `hello` (answered by the connection: network and executor
#     wake-up only) and `stats` (one trip through the shard core and its
#     blocking-offload thread), round trip and server CPU per request.
#
# Requests are sequential, one at a time, with --gap-us between them so
# every request meets an idle server, as in an open-loop run at low rate.
#
#   scripts/rtt-probe.sh [--shards 1] [--requests 3000] [--gap-us 500]
# --help prints this and starts nothing.
source "$(dirname "$0")/help.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
shards=1
requests=3000
gap_us=500
port=17710
while [ $# -gt 0 ]; do
  case "$1" in
    --shards) shards="$2"; shift 2 ;;
    --requests) requests="$2"; shift 2 ;;
    --gap-us) gap_us="$2"; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
cargo build --release --bin queueberd --bin queueber >&2
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d /tmp/queueber-rtt.XXXXXX)
"$bin/queueberd" --listen "127.0.0.1:$port" --data-dir "$work/data" --shards "$shards" \
  --durability periodic --log warn &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
QUEUEBER_ADDR="127.0.0.1:$port" "$bin/queueber" add probe x > /dev/null
capnp encode queueber.capnp Request <<< '(id = 1, hello = void)' > "$work/hello.bin"
capnp encode queueber.capnp Request <<< '(id = 2, stats = (tenant = "default", queue = "probe"))' > "$work/stats.bin"
python3 - "$work" "$port" "$requests" "$pid" "$gap_us" <<'PY'
import ctypes, os, socket, struct, sys, time

work, port, n, pid, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) / 1e6
libc = ctypes.CDLL("libc.so.6", use_errno=True)


def cpu_seconds(p):
    fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# 1a. A syscall vs a timer armed 100 µs ahead and disarmed (the timer is the
# earliest on the CPU, so both calls reprogram the timer device).
class Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class Itimerspec(ctypes.Structure):
    _fields_ = [("interval", Timespec), ("value", Timespec)]


fd = libc.timerfd_create(1, 0)  # CLOCK_MONOTONIC
arm, disarm = Itimerspec(Timespec(0, 0), Timespec(0, 100_000)), Itimerspec(Timespec(0, 0), Timespec(0, 0))
reps = 100_000
start = time.perf_counter()
for _ in range(reps):
    libc.getppid()
    libc.getppid()
two_syscalls = (time.perf_counter() - start) / reps * 1e6
start = time.perf_counter()
for _ in range(reps):
    libc.timerfd_settime(fd, 0, ctypes.byref(arm), None)
    libc.timerfd_settime(fd, 0, ctypes.byref(disarm), None)
arm_disarm = (time.perf_counter() - start) / reps * 1e6
os.close(fd)
print(f"kernel      two plain syscalls {two_syscalls:5.2f} µs   arm+disarm a timer {arm_disarm:5.2f} µs")


# 1b. Pipe ping-pong between two processes.
def ping_pong(cpu_a, cpu_b, rounds=20_000):
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    child = os.fork()
    if child == 0:
        os.sched_setaffinity(0, {cpu_b})
        for _ in range(rounds):
            os.read(r1, 1)
            os.write(w2, b"x")
        os._exit(0)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu_a})
    t0, c0 = time.perf_counter(), os.times()
    for _ in range(rounds):
        os.write(w1, b"x")
        os.read(r2, 1)
    elapsed = time.perf_counter() - t0
    os.waitpid(child, 0)
    c1 = os.times()
    os.sched_setaffinity(0, before)
    for f in (r1, w1, r2, w2):
        os.close(f)
    cpu = sum(getattr(c1, a) - getattr(c0, a) for a in ("user", "system", "children_user", "children_system"))
    return elapsed / rounds * 1e6, cpu / rounds * 1e6


cpus = sorted(os.sched_getaffinity(0))
same = ping_pong(cpus[0], cpus[0])
print(f"wake-up     same CPU   round trip {same[0]:5.1f} µs, CPU {same[1]:5.1f} µs")
if len(cpus) > 1:
    cross = ping_pong(cpus[0], cpus[1])
    print(f"wake-up     two CPUs   round trip {cross[0]:5.1f} µs, CPU {cross[1]:5.1f} µs")


def read_frame(s):
    head = s.recv(8, socket.MSG_WAITALL)
    segments = struct.unpack("<I", head[:4])[0] + 1
    words = struct.unpack("<I", head[4:8])[0]
    if segments > 1:
        rest = s.recv((segments - 1) * 4 + (4 if segments % 2 == 0 else 0), socket.MSG_WAITALL)
        words += sum(struct.unpack(f"<{segments - 1}I", rest[: (segments - 1) * 4]))
    s.recv(words * 8, socket.MSG_WAITALL)


def probe(name, server_pid, server_port, frame, read):
    s = socket.create_connection(("127.0.0.1", server_port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    c0 = cpu_seconds(server_pid)
    for _ in range(n):
        if gap:
            time.sleep(gap)
        start = time.perf_counter()
        s.sendall(frame)
        read(s)
        times.append(time.perf_counter() - start)
    c1 = cpu_seconds(server_pid)
    s.close()
    times.sort()
    p50, p99 = times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6
    print(f"{name:<11} p50 {p50:5.0f} µs   p99 {p99:5.0f} µs   server CPU {(c1 - c0) / n * 1e6:5.1f} µs per request")


# 2. Baseline: a blocking echo server in a child process.
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen()
echo_port = listener.getsockname()[1]
echo = os.fork()
if echo == 0:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(4096):
        conn.sendall(data)
    os._exit(0)
listener.close()
probe("echo", echo, echo_port, b"x" * 56, lambda s: s.recv(4096))
os.waitpid(echo, 0)

# 3. queueberd.
for name in ("hello", "stats"):
    probe(name, pid, port, open(f"{work}/{name}.bin", "rb").read(), read_frame)
PY
