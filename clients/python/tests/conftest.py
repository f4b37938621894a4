"""Fixtures: real queueberd servers on 127.0.0.1, each with a fresh data dir.

The binary is ``$QUEUEBERD`` if set, else
``${CARGO_TARGET_DIR:-~/.cache/queueber/target}/release/queueberd``. Servers
listen on an ephemeral port (``--listen 127.0.0.1:0``; the port is read from
the server's JSON log) and are stopped by PID when their fixture ends.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, List, Optional, TypeVar

import pytest

T = TypeVar("T")

#: Every async test body runs under this timeout (pytest-timeout is the
#: backstop for everything else).
ASYNC_TEST_TIMEOUT_S = 60.0


def queueberd_path() -> str:
    explicit = os.environ.get("QUEUEBERD")
    if explicit:
        return explicit
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/queueber/target")
    return os.path.join(target, "release", "queueberd")


class Server:
    """A queueberd process started for a test."""

    def __init__(self, *args: str, data_dir: Optional[str] = None, listen: str = "127.0.0.1:0",
                 shards: int = 1) -> None:
        binary = queueberd_path()
        if not os.access(binary, os.X_OK):
            pytest.fail(f"queueberd not found at {binary}: build it (cargo build --release "
                        f"--bin queueberd) or set QUEUEBERD")
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="qb-pytest-")
            data_dir = os.path.join(self._tmp.name, "data")
        self.data_dir = data_dir
        self.args = list(args)
        self.log_path = Path(data_dir + ".log")
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()  # a restart appends to the same log
        self.proc = subprocess.Popen(
            [binary, "--listen", listen, "--data-dir", data_dir, "--shards", str(shards),
             "--durability", "periodic", "--log-json", "--log", "info",
             # Tests run many servers at once: no metrics endpoint unless asked
             # (then on a port of its own: ``--metrics-listen 127.0.0.1:0``).
             *([] if "--metrics-listen" in self.args else ["--metrics-listen", "off"]),
             *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.addr = self._wait_listening("queueber listening")
        self.metrics_addr = (self._wait_listening("metrics endpoint listening")
                             if "--metrics-listen" in self.args else None)
        self.host, port = self.addr.rsplit(":", 1)
        self.port = int(port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_listening(self, what: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                lines = f.read().decode(errors="replace").splitlines()
            for line in lines:
                if what in line:
                    try:
                        return str(json.loads(line)["fields"]["addr"])
                    except (ValueError, KeyError):
                        m = re.search(r"addr\W+([0-9.]+:\d+)", line)
                        if m:
                            return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"queueberd did not start: {self.log_path.read_text(errors='replace')}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by PID, SIGKILL if it has not exited after ``timeout``."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """A server with the default limits and two shards."""
    s = Server(shards=2)
    yield s
    s.cleanup()


#: Small limits, so that every limit can be hit with small requests.
TIGHT = dict(max_frame_bytes=65536, max_payload_bytes=1024, max_messages_per_add=8,
             max_in_flight=16, max_wait_ms=3000)


@pytest.fixture(scope="session")
def tight_server() -> Iterator[Server]:
    """A server with small limits (see TIGHT)."""
    s = Server("--max-frame-bytes", str(TIGHT["max_frame_bytes"]),
               "--max-payload-bytes", str(TIGHT["max_payload_bytes"]),
               "--max-messages-per-add", str(TIGHT["max_messages_per_add"]),
               "--max-in-flight", str(TIGHT["max_in_flight"]),
               "--max-wait-ms", str(TIGHT["max_wait_ms"]))
    yield s
    s.cleanup()


@pytest.fixture
def make_server() -> Iterator[Callable[..., Server]]:
    """Start a server of the test's own (stopped when the test ends)."""
    started: List[Server] = []

    def make(*args: str, **kw: Any) -> Server:
        s = Server(*args, **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.cleanup()


@pytest.fixture
def queue(request: pytest.FixtureRequest) -> str:
    """A queue name of this test's own."""
    base = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:80]
    return f"{base}-{uuid.uuid4().hex[:8]}"


def aio_test(fn: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """Run an ``async def`` test in a fresh event loop, with a timeout."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(fn(*args, **kwargs), ASYNC_TEST_TIMEOUT_S)

        return asyncio.run(bounded())

    return wrapper


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0,
                     interval: float = 0.05) -> None:
    """Wait until ``check()`` is true (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(interval)
