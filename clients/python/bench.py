#!/usr/bin/env python3
"""Throughput of the asyncio client: add + poll + remove, closed loop.

Mirrors the Rust load generator (``loadgen``, docs/benchmarks.md): P producer
connections and C consumer connections on one queue, all on one event loop;
payloads of S bytes; B messages per add and at most B per poll; at most
``--max-unacked`` messages added and not yet removed, filled by pipelining
(each producer and consumer runs ``depth`` request loops on its connection,
``depth = clamp(max_unacked / (B * P), 1, 64)`` as in loadgen). It counts
the messages removed during ``--duration`` seconds after ``--warmup``.

``--mode consume`` measures the worker helper instead: each consumer
connection runs one ``qb.consume(queue, batch=B)`` loop that acknowledges
every message (``async with msg``).

Without ``--addr`` it starts its own ``queueberd --shards 1 --durability
periodic`` (``$QUEUEBERD``, else the cargo target dir) on 127.0.0.1 with a
fresh data dir, and stops it by PID. With ``--compare-loadgen PATH`` it runs
the Python client and the Rust loadgen alternately, a fresh server per run,
for each ``-B`` given, ``--runs`` times, and prints the medians.

Every run is bounded: warm-up + duration + a drain of at most 15 s.

    python bench.py -B 32 -B 1 --runs 3 --compare-loadgen ~/.cache/queueber/target/release/loadgen
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from typing import Any, Deque, Dict, List, Optional

import queueber.aio

QUEUE = "bench"
TENANT = "pybench"


def queueberd_path() -> str:
    if os.environ.get("QUEUEBERD"):
        return os.environ["QUEUEBERD"]
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/queueber/target")
    return os.path.join(target, "release", "queueberd")


class Server:
    """A fresh queueberd on an ephemeral 127.0.0.1 port, stopped by PID."""

    def __init__(self, shards: int, durability: str) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="qb-bench-")
        log_path = os.path.join(self.tmp.name, "server.log")
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [queueberd_path(), "--listen", "127.0.0.1:0", "--data-dir",
             os.path.join(self.tmp.name, "data"), "--shards", str(shards),
             "--durability", durability, "--log-json", "--log", "info",
             "--metrics-listen", "off"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(log_path) as f:
                for line in f:
                    if "queueber listening" in line:
                        self.addr = json.loads(line)["fields"]["addr"]
                        return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("queueberd did not start: " + open(log_path).read())

    def cpu_micros(self) -> Optional[int]:
        try:
            fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) * 1_000_000 // ticks

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        self.tmp.cleanup()


class Bench:
    def __init__(self, args: argparse.Namespace, batch: int, mode: str) -> None:
        self.args = args
        self.batch = batch
        self.mode = mode
        self.depth = args.depth or max(1, min(64, args.max_unacked // (batch * args.producers)))
        self.payloads = [os.urandom(args.payload)] * batch
        self.unacked = 0
        self.removed = 0
        self.added = 0
        self.errors = 0
        self.producing = True
        self.consuming = True
        # Producers waiting for room under max_unacked, woken one batch at a
        # time (waking them all on every removal would cost more than the
        # client itself at B=1).
        self.waiters: Deque["asyncio.Future[None]"] = collections.deque()

    async def produce(self, qb: queueber.aio.Client) -> None:
        b, limit = self.batch, max(self.args.max_unacked, self.batch)
        loop = asyncio.get_running_loop()
        while self.producing:
            if self.unacked + b > limit or self.waiters:
                waiter = loop.create_future()
                self.waiters.append(waiter)
                await waiter  # acked() counted this batch in unacked already
                if not self.producing:
                    return
            else:
                self.unacked += b
            try:
                await qb.add(QUEUE, self.payloads)
                self.added += b
            except queueber.QueueberError:
                self.unacked -= b
                self.errors += 1
                await asyncio.sleep(0.01)

    def acked(self, n: int) -> None:
        self.removed += n
        self.unacked -= n
        b, limit = self.batch, max(self.args.max_unacked, self.batch)
        while self.waiters and self.unacked + b <= limit:
            self.unacked += b
            self.waiters.popleft().set_result(None)

    async def consume_raw(self, qb: queueber.aio.Client) -> None:
        while self.consuming:
            try:
                lease = await qb.poll(QUEUE, self.batch, 30000, self.args.wait_ms)
                if lease:
                    flags = await qb.remove(QUEUE, lease, lease.messages)
                    self.acked(flags.count(True))
            except queueber.QueueberError:
                self.errors += 1
                await asyncio.sleep(0.01)

    async def consume_helper(self, qb: queueber.aio.Client) -> None:
        async with qb.consume(QUEUE, batch=self.batch, lease_ms=30000,
                              wait_ms=self.args.wait_ms,
                              max_held=self.batch * self.depth) as consumer:
            async for msg in consumer:
                async with msg:
                    pass
                self.acked(1)
                if not self.consuming:
                    break

    async def run(self, addr: str, server: Optional[Server]) -> Dict[str, Any]:
        a = self.args
        producers = [await queueber.aio.connect(addr, tenant=TENANT) for _ in range(a.producers)]
        consumers = [await queueber.aio.connect(addr, tenant=TENANT) for _ in range(a.consumers)]
        await producers[0].add(QUEUE, [b"x"])  # create the queue
        await producers[0].purge(QUEUE)
        producer_tasks = [asyncio.ensure_future(self.produce(p))
                          for p in producers for _ in range(self.depth)]
        tasks = list(producer_tasks)
        if self.mode == "raw":
            tasks += [asyncio.ensure_future(self.consume_raw(c))
                      for c in consumers for _ in range(self.depth)]
        else:
            tasks += [asyncio.ensure_future(self.consume_helper(c)) for c in consumers]
        await asyncio.sleep(a.warmup)
        removed0, cpu0 = self.removed, server.cpu_micros() if server else None
        own0 = time.process_time()
        t0 = time.monotonic()
        await asyncio.sleep(a.duration)
        elapsed = time.monotonic() - t0
        removed = self.removed - removed0
        own_cpu = time.process_time() - own0
        cpu1 = server.cpu_micros() if server else None
        # Stop producing, let the consumers drain (bounded), then stop.
        self.producing = False
        while self.waiters:
            self.waiters.popleft().set_result(None)
        deadline = time.monotonic() + 15
        # Adds still in flight count once answered: wait for the producers
        # to finish before comparing added with removed.
        await asyncio.wait(producer_tasks, timeout=15)
        while self.removed < self.added and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.consuming = False
        await asyncio.sleep(0)
        for c in consumers + producers:
            await c.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {
            "client": "python-" + self.mode, "batch": self.batch, "payload": a.payload,
            "producers": a.producers, "consumers": a.consumers, "depth": self.depth,
            "seconds": round(elapsed, 3), "removed_per_s": round(removed / elapsed),
            "client_cpu_us_per_msg": round(own_cpu * 1e6 / removed, 2) if removed else None,
            "server_cpu_us_per_msg": (round((cpu1 - cpu0) / removed, 2)
                                      if removed and cpu0 is not None and cpu1 is not None
                                      else None),
            # Added but not removed after the drain (0 unless something was lost).
            "errors": self.errors, "lost": self.added - self.removed,
        }


def run_python(args: argparse.Namespace, batch: int, mode: str) -> Dict[str, Any]:
    server = None if args.addr else Server(args.shards, args.durability)
    addr = args.addr or server.addr  # type: ignore[union-attr]
    try:
        return asyncio.run(Bench(args, batch, mode).run(addr, server))
    finally:
        if server is not None:
            server.stop()


def run_loadgen(args: argparse.Namespace, batch: int) -> Dict[str, Any]:
    server = Server(args.shards, args.durability)
    try:
        out = subprocess.run(
            [args.compare_loadgen, "--addr", server.addr, "--server-pid", str(server.proc.pid),
             "-P", str(args.producers), "-C", str(args.consumers), "-B", str(batch),
             "-S", str(args.payload), "-Q", "1", "--duration", str(args.duration),
             "--warmup", str(args.warmup), "--wait-ms", str(args.wait_ms),
             "--max-unacked", str(args.max_unacked), "--label", "rust-loadgen"],
            capture_output=True, text=True, timeout=args.warmup + args.duration + 120)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
        rep = json.loads(line)
        return {"client": "rust-loadgen", "batch": batch,
                "removed_per_s": round(rep["removed_per_s"]),
                "server_cpu_us_per_msg": rep.get("server_cpu_us_per_msg"),
                "errors": rep.get("errors"), "lost": rep.get("lost")}
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", help="use a running server (default: start one per run)")
    p.add_argument("-B", "--batch", type=int, action="append",
                   help="messages per add/poll (repeatable; default 32)")
    p.add_argument("-P", "--producers", type=int, default=2)
    p.add_argument("-C", "--consumers", type=int, default=2)
    p.add_argument("-S", "--payload", type=int, default=256)
    p.add_argument("--depth", type=int, help="request loops per connection (default as loadgen)")
    p.add_argument("--max-unacked", type=int, default=1024)
    p.add_argument("--wait-ms", type=int, default=1000)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--mode", choices=["raw", "consume"], action="append",
                   help="raw: poll + remove loops as loadgen; consume: the worker helper "
                        "(repeatable; default raw)")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--durability", default="periodic")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--compare-loadgen", metavar="PATH",
                   help="also run the Rust loadgen, interleaved")
    p.add_argument("--profile", metavar="FILE", help="cProfile the Python client into FILE")
    args = p.parse_args()
    batches = args.batch or [32]
    modes = args.mode or ["raw"]
    if args.compare_loadgen and args.addr:
        p.error("--compare-loadgen starts its own servers; drop --addr")
    results: List[Dict[str, Any]] = []
    started = time.time()
    for run in range(1, args.runs + 1):
        for b in batches:
            for mode in modes:
                if args.profile:
                    import cProfile
                    prof = cProfile.Profile()
                    rep = prof.runcall(run_python, args, b, mode)
                    prof.dump_stats(args.profile)
                else:
                    rep = run_python(args, b, mode)
                rep["run"] = run
                print(json.dumps(rep), flush=True)
                results.append(rep)
            if args.compare_loadgen:
                rep = run_loadgen(args, b)
                rep["run"] = run
                print(json.dumps(rep), flush=True)
                results.append(rep)
    load = open("/proc/loadavg").read().split()[:3]
    print(f"\nmedians over {args.runs} run(s) of {args.duration:g} s (+{args.warmup:g} s warm-up), "
          f"P={args.producers} C={args.consumers} S={args.payload}, "
          f"{time.time() - started:.0f} s in all; load average now {' '.join(load)}")
    for b in batches:
        row = {}
        for client in sorted({r["client"] for r in results}):
            vals = [r["removed_per_s"] for r in results
                    if r["client"] == client and r["batch"] == b]
            row[client] = statistics.median(vals)
            print(f"  B={b:<3} {client:<16} {row[client]:>10,.0f} msg/s  (runs: "
                  f"{', '.join(f'{v:,}' for v in vals)})")
        rust = row.get("rust-loadgen")
        for mode in modes:
            py = row.get("python-" + mode)
            if py and rust:
                print(f"  B={b:<3} rust-loadgen / python-{mode} = {rust / py:.2f}x")


if __name__ == "__main__":
    main()
