"""Reconnection: automatic where it is safe, never re-sending an add."""

import asyncio
import signal
import socket
from typing import Any, Callable, List, Tuple

import pytest
from conftest import Server, aio_test

import queueber
import queueber._wire as wire
from queueber import aio


class FakeServer:
    """A stand-in server that answers hello, then drops the first
    connection at the first other request it reads, and answers normally on
    later connections. It records every request it reads."""

    def __init__(self) -> None:
        self.seen: List[Tuple[int, str]] = []  # (connection number, operation)
        self.connections = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        buf = b""
        try:
            while True:
                size = wire.frame_length(buf, 0)
                if size == 0 or len(buf) < size:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    buf += chunk
                    continue
                frame, buf = buf[:size], buf[size:]
                with wire.schema.Request.from_bytes(frame) as req:
                    rid, op = req.id, req.which()
                self.seen.append((conn, op))
                if op != "hello" and conn == 1:
                    return  # drop the connection without answering
                writer.write(self.answer(rid, op))
        finally:
            writer.close()

    @staticmethod
    def answer(rid: int, op: str) -> bytes:
        resp = wire.schema.Response.new_message()
        resp.id = rid
        if op == "hello":
            hello = resp.init("hello")
            hello.version = "fake"
            hello.shards = 1
            hello.limits.maxInFlightPerConnection = 100
            hello.limits.maxMessagesPerAdd = 100
        elif op == "stats":
            resp.init("stats").visible = 7
        elif op == "add":
            resp.init("add").init("ids", 1)[0] = b"i" * 16
        else:
            err = resp.init("error")
            err.code = "unknownOperation"
            err.message = op
        return resp.to_bytes()  # type: ignore[no-any-return]


@aio_test
async def test_safe_requests_are_resent_once() -> None:
    fake = FakeServer()
    addr = await fake.start()
    async with aio.connect(addr) as qb:
        stats = await qb.stats("q")  # lost with the first connection, resent
        assert stats.visible == 7
    assert fake.seen == [(1, "hello"), (1, "stats"), (2, "hello"), (2, "stats")]
    fake.server.close()


@aio_test
async def test_an_add_is_never_resent() -> None:
    fake = FakeServer()
    addr = await fake.start()
    async with aio.connect(addr) as qb:
        with pytest.raises(queueber.ConnectionClosed) as e:
            await qb.add("q", [b"x"])
        assert e.value.connection_level
        await asyncio.sleep(0.1)
        assert fake.seen == [(1, "hello"), (1, "add")]
        # The next request reconnects; the add is not sent again.
        assert (await qb.stats("q")).visible == 7
        assert [op for _c, op in fake.seen].count("add") == 1
    fake.server.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def test_reconnects_after_a_server_restart(make_server: Callable[..., Server],
                                           tmp_path: Any) -> None:
    listen = f"127.0.0.1:{free_port()}"
    data = str(tmp_path / "data")
    first = make_server(listen=listen, data_dir=data)

    async def body() -> None:
        async with aio.connect(listen) as qb:
            await qb.add("q", [b"kept"])
            await qb.purge("q")
            await qb.add("q", [b"kept"])
            parked = asyncio.ensure_future(qb.poll("other", wait_ms=10000))
            await asyncio.sleep(0.1)
            first.signal(signal.SIGKILL)
            # A poll in flight is not re-sent: it fails.
            with pytest.raises((queueber.ConnectionClosed, queueber.UnknownQueue)):
                await asyncio.wait_for(parked, 10)
            await asyncio.get_running_loop().run_in_executor(None, first.proc.wait, 10)
            with pytest.raises(queueber.ConnectionClosed):
                await qb.stats("q")  # nobody listening: the reconnect fails
            make_server(listen=listen, data_dir=data)
            assert (await qb.stats("q")).visible == 1  # reconnected
            assert qb.connected

    asyncio.run(asyncio.wait_for(body(), 60))


class LatePollServer(FakeServer):
    """Parks polls on the first connection and, when the client sends its
    EOF, answers them with two messages anyway (the race the protocol
    allows), then closes. Later connections answer releases."""

    def __init__(self) -> None:
        super().__init__()
        self.released: List[Tuple[bytes, bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        buf = b""
        parked: List[int] = []
        try:
            while True:
                size = wire.frame_length(buf, 0)
                if size == 0 or len(buf) < size:
                    chunk = await reader.read(65536)
                    if not chunk:
                        for rid in parked:
                            writer.write(self.poll_reply(rid))
                        await writer.drain()
                        return
                    buf += chunk
                    continue
                frame, buf = buf[:size], buf[size:]
                with wire.schema.Request.from_bytes(frame) as req:
                    rid, op = req.id, req.which()
                    if op == "release":
                        self.released.append((req.release.lease, req.release.id))
                self.seen.append((conn, op))
                if op == "poll":
                    parked.append(rid)
                elif op == "release":
                    resp = wire.schema.Response.new_message()
                    resp.id = rid
                    resp.init("release").released = True
                    writer.write(resp.to_bytes())
                else:
                    writer.write(self.answer(rid, op))
        finally:
            writer.close()

    @staticmethod
    def poll_reply(rid: int) -> bytes:
        resp = wire.schema.Response.new_message()
        resp.id = rid
        poll = resp.init("poll")
        poll.lease = b"L" * 16
        poll.expiresAtMs = 1
        msgs = poll.init("messages", 2)
        for i, m in enumerate(msgs):
            m.id = bytes([i + 1]) * 16
            m.payload = b"late"
            m.deliveryCount = 1
        return resp.to_bytes()  # type: ignore[no-any-return]


@aio_test
async def test_messages_of_an_abandoned_poll_answered_at_close_are_released() -> None:
    fake = LatePollServer()
    addr = await fake.start()
    qb = await aio.connect(addr)
    poll = asyncio.ensure_future(qb.poll("q", max_items=2, wait_ms=10000))
    await asyncio.sleep(0.1)
    poll.cancel()
    # close() sends EOF; the server answers the parked poll with messages.
    # The first connection can no longer carry a release, so the client
    # releases them over a short-lived second one.
    await qb.close()
    assert sorted(fake.released) == [(b"L" * 16, b"\x01" * 16), (b"L" * 16, b"\x02" * 16)]
    assert [c for c, op in fake.seen if op == "release"] == [2, 2]
    fake.server.close()
