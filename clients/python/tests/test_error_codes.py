"""Every error code a client can provoke, raised as its own exception class.

``internal`` needs a failing disk and is covered by the unit tests of the
code-to-exception mapping (test_unit.py).
"""

import asyncio
import signal
import struct
from typing import Callable

import pytest
from conftest import TIGHT, Server, aio_test, eventually

import queueber
import queueber._wire as wire
from queueber import aio


@aio_test
async def test_unknown_queue(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        lease = b"\x00" * 16
        for op in (qb.stats(queue), qb.poll(queue), qb.poll(queue, wait_ms=1000),
                   qb.remove(queue, lease, [lease]), qb.extend(queue, lease, 1000),
                   qb.release(queue, lease, lease), qb.purge(queue), qb.delete(queue)):
            with pytest.raises(queueber.UnknownQueue) as e:
                await op
            assert e.value.code == "unknownQueue" and queue in e.value.message
        assert not e.value.connection_level


@aio_test
async def test_invalid_argument(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"x"])
        lease = await qb.poll(queue)
        cases = [
            qb.extend(queue, lease, 0),
            qb.remove(queue, lease, []),
            qb.remove(queue, b"short", lease.messages),
            qb.remove(queue, lease, [b"\x01" * 15]),
            qb.extend(queue, b"", 1000),
            qb.release(queue, lease, b"x" * 17),
            qb.add(queue, []),
        ]
        for op in cases:
            with pytest.raises(queueber.InvalidArgument):
                await op
        # Nothing above touched the lease.
        assert await qb.remove(queue, lease, lease.messages) == [True]


@aio_test
async def test_invalid_name(server: Server) -> None:
    async with aio.connect(server.addr) as qb:
        for name in ("has space", "a/b", "x" * 129, "é"):
            with pytest.raises(queueber.InvalidName):
                await qb.add(name, [b"x"])
            with pytest.raises(queueber.InvalidName):
                await qb.stats(name)
    async with aio.connect(server.addr, tenant="bad tenant") as qb:
        with pytest.raises(queueber.InvalidName):
            await qb.add("q", [b"x"])
        assert all(r.tenant != "bad tenant" for r in await qb.queues())


@aio_test
async def test_payload_too_large(tight_server: Server, queue: str) -> None:
    async with aio.connect(tight_server.addr) as qb:
        limit = qb.server_info.limits.max_payload_bytes
        assert limit == TIGHT["max_payload_bytes"]
        await qb.add(queue, [b"x" * limit])
        with pytest.raises(queueber.PayloadTooLarge):
            await qb.add(queue, [b"ok", b"x" * (limit + 1)])
        assert (await qb.stats(queue)).visible == 1  # nothing of the refused add


@aio_test
async def test_too_many_messages(tight_server: Server, queue: str) -> None:
    async with aio.connect(tight_server.addr) as qb:
        n = qb.server_info.limits.max_messages_per_add
        await qb.add(queue, [b"m"] * n)
        with pytest.raises(queueber.TooManyMessages):
            await qb.add(queue, [b"m"] * (n + 1))
        lease = await qb.poll(queue, max_items=n)
        ids = [m.id for m in lease]
        with pytest.raises(queueber.TooManyMessages):  # the add limit bounds removes
            await qb.remove(queue, lease, ids + ids[:1])
        assert await qb.remove(queue, lease, ids) == [True] * n


@aio_test
async def test_refused_add_creates_no_queue(tight_server: Server, queue: str) -> None:
    async with aio.connect(tight_server.addr) as qb:
        with pytest.raises(queueber.PayloadTooLarge):
            await qb.add(queue, [b"x" * 5000])
        with pytest.raises(queueber.UnknownQueue):
            await qb.stats(queue)


@aio_test
async def test_frame_too_large_closes_the_connection(tight_server: Server, queue: str) -> None:
    async with aio.connect(tight_server.addr) as qb:
        await qb.add(queue, [b"before"])
        first = qb._conn
        with pytest.raises(queueber.FrameTooLarge) as e:
            await qb.add(queue, [b"x" * (TIGHT["max_frame_bytes"] + 1)])
        assert e.value.connection_level
        # The next request reconnects by itself.
        assert (await qb.stats(queue)).visible == 1
        assert qb._conn is not first


@aio_test
async def test_malformed_frame_garbage(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"before"])
        conn = qb._conn
        # A segment table claiming 2**32 segments: framing is lost, the
        # server answers id 0 and closes; the add behind it is never run.
        conn.transport.write(b"\xff\xff\xff\xff" + bytes(12))
        with pytest.raises(queueber.MalformedFrame) as e:
            await qb.add(queue, [b"never read"])
        assert e.value.connection_level
        assert (await qb.stats(queue)).visible == 1
        assert qb._conn is not conn


@aio_test
async def test_malformed_frame_bad_text_keeps_the_connection(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"x"])
        conn = qb._conn

        def text_without_nul(rid: int) -> bytes:
            frame = wire.encode_queue_op(rid, "stats", "default", queue)
            i = frame.index(queue.encode() + b"\x00")
            end = i + len(queue)
            return frame[:end] + b"x" + frame[end + 1:]  # overwrite the NUL

        with pytest.raises(queueber.MalformedFrame) as e:
            await qb._call("stats", text_without_nul)
        assert not e.value.connection_level
        assert (await qb.stats(queue)).visible == 1
        assert qb._conn is conn  # the connection stayed open


@aio_test
async def test_unknown_operation(server: Server) -> None:
    async with aio.connect(server.addr) as qb:
        conn = qb._conn

        def future_operation(rid: int) -> bytes:
            frame = bytearray(wire.encode_hello(rid))
            struct.pack_into("<H", frame, 24, 42)  # union discriminant
            return bytes(frame)

        with pytest.raises(queueber.UnknownOperation):
            await qb._call("hello", future_operation)
        await qb.hello()
        assert qb._conn is conn


@aio_test
async def test_too_many_in_flight(tight_server: Server, queue: str) -> None:
    limit = TIGHT["max_in_flight"]
    # A client told to ignore the server's limit gets tooManyInFlight for
    # the requests over it (parked polls hold their slots).
    async with aio.connect(tight_server.addr, max_in_flight=limit * 4) as qb:
        await qb.add(queue, [b"x"])
        await qb.purge(queue)
        results = await asyncio.gather(
            *(qb.poll(queue, wait_ms=1000) for _ in range(limit * 3)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, queueber.TooManyInFlight)]
        assert len(refused) >= limit
        assert all(isinstance(r, (queueber.Lease, queueber.TooManyInFlight)) for r in results)
        assert refused[0].retryable
    # By default the client keeps to the limit the server announced.
    async with aio.connect(tight_server.addr) as qb:
        results = await asyncio.gather(
            *(qb.poll(queue, wait_ms=200) for _ in range(limit * 3)), return_exceptions=True)
        assert all(isinstance(r, queueber.Lease) for r in results)


def test_disk_full(make_server: Callable[..., Server]) -> None:
    # A reserve larger than any disk: the server refuses adds at once.
    srv = make_server("--min-free-disk-mib", str(1 << 40))

    async def body() -> None:
        async with aio.connect(srv.addr) as qb:
            async def full() -> bool:
                return (await qb.hello()).disk_full
            await eventually(full)
            with pytest.raises(queueber.DiskFull) as e:
                await qb.add("q", [b"x"])
            assert e.value.retryable and "free" in e.value.message
            # Everything else still works; the refused add created nothing.
            assert await qb.queues() == []
            with pytest.raises(queueber.UnknownQueue):
                await qb.stats("q")

    asyncio.run(asyncio.wait_for(body(), 30))


def test_unavailable_at_the_connection_limit(make_server: Callable[..., Server]) -> None:
    srv = make_server("--max-connections", "1")

    async def body() -> None:
        async with aio.connect(srv.addr) as first:
            with pytest.raises(queueber.Unavailable) as e:
                await aio.connect(srv.addr, connect_timeout=5)
            assert e.value.connection_level
            await first.hello()  # the first connection is unaffected

    asyncio.run(asyncio.wait_for(body(), 30))


def test_shutting_down(make_server: Callable[..., Server]) -> None:
    srv = make_server()

    async def body() -> None:
        async with aio.connect(srv.addr) as qb:
            await qb.add("q", [b"x"])
            await qb.purge("q")
            parked = asyncio.ensure_future(qb.poll("q", wait_ms=20000))
            await asyncio.sleep(0.2)
            srv.signal(signal.SIGTERM)
            # Parked polls are answered at once, empty, when shutdown begins.
            assert not await asyncio.wait_for(parked, 5)
            # For a while the server reads on and refuses every request.
            with pytest.raises(queueber.ShuttingDown) as e:
                await qb.purge("q")
            assert e.value.retryable

    asyncio.run(asyncio.wait_for(body(), 30))
    srv.proc.wait(15)
