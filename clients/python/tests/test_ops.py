"""Every operation of the asyncio client against a real server."""

import asyncio
import time

import pytest
from conftest import Server, aio_test, eventually

import queueber
from queueber import NewMessage, aio


@aio_test
async def test_hello(server: Server) -> None:
    async with aio.connect(server.addr) as qb:
        info = await qb.hello()
        assert info.version and info.shards == 2 and not info.disk_full and not info.auth_required
        assert info.limits.max_frame_bytes == 16 * 1024 * 1024
        assert info.limits.max_in_flight_per_connection == 4096
        assert qb.server_info == info


@aio_test
async def test_add_poll_remove(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        ids = await qb.add(queue, [b"one", "two", bytearray(b"three")])
        assert len(ids) == 3 and all(len(i) == 16 for i in ids)
        lease = await qb.poll(queue, max_items=10, lease_ms=30000)
        assert lease and len(lease.id) == 16 and lease.expires_at_ms > 0
        assert [m.payload for m in lease] == [b"one", b"two", b"three"]  # FIFO
        assert [m.id for m in lease.messages] == ids
        assert all(m.delivery_count == 1 and m.enqueued_at_ms > 0 for m in lease)
        assert await qb.remove(queue, lease, lease.messages) == [True, True, True]
        # Raw bytes work as well as the objects; removed ids answer False.
        assert await qb.remove(queue, lease.id, [ids[0]]) == [False]
        stats = await qb.stats(queue)
        assert (stats.visible, stats.delayed, stats.in_flight) == (0, 0, 0)
        assert stats.oldest_visible_age_ms is None


@aio_test
async def test_empty_poll_is_a_falsy_lease(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"x"])
        assert await qb.poll(queue)
        empty = await qb.poll(queue)
        assert not empty and empty.id == b"" and empty.messages == [] and len(empty) == 0


@aio_test
async def test_add_with_delays(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"now", NewMessage(b"later", delay_ms=60000)])
        await qb.add(queue, [b"also later"], delay_ms=60000)
        stats = await qb.stats(queue)
        assert (stats.visible, stats.delayed) == (1, 2)
        assert stats.oldest_visible_age_ms is not None
        t0 = time.monotonic()
        await qb.add(queue, [NewMessage(b"soon", delay_ms=300)])
        lease = await qb.poll(queue, max_items=10)
        assert [m.payload for m in lease] == [b"now"]
        # A delayed message shows up once its delay has passed.
        lease = await qb.poll(queue, max_items=10, wait_ms=5000)
        assert [m.payload for m in lease] == [b"soon"]
        assert time.monotonic() - t0 >= 0.25


@aio_test
async def test_long_poll_is_woken_by_an_add(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb, aio.connect(server.addr) as producer:
        await producer.add(queue, [b"seed"])  # an existing, empty queue
        await producer.purge(queue)
        parked = asyncio.ensure_future(qb.poll(queue, wait_ms=10000))
        await asyncio.sleep(0.2)
        assert not parked.done()
        await producer.add(queue, [b"wake"])
        lease = await asyncio.wait_for(parked, 5)
        assert [m.payload for m in lease] == [b"wake"]
        # With nothing to take, a poll waits wait_ms and comes back empty.
        t0 = time.monotonic()
        assert not await qb.poll(queue, wait_ms=300)
        assert time.monotonic() - t0 >= 0.25


@aio_test
async def test_extend_and_expiry(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"m"])
        lease = await qb.poll(queue, lease_ms=1000)
        expires = await qb.extend(queue, lease, 60000)
        assert expires is not None and expires > lease.expires_at_ms
        await asyncio.sleep(1.2)  # past the original lease: still held
        assert (await qb.stats(queue)).in_flight == 1
        # Shortening is allowed: the new expiry is now + lease_ms.
        assert await qb.extend(queue, lease, 100) is not None
        await asyncio.sleep(0.3)
        assert await qb.extend(queue, lease, 60000) is None  # expired
        again = await qb.poll(queue, wait_ms=2000)
        assert [m.delivery_count for m in again] == [2]
        assert await qb.remove(queue, lease, lease.messages) == [False]
        assert await qb.remove(queue, again, again.messages) == [True]


@aio_test
async def test_release(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"a", b"b"])
        lease = await qb.poll(queue, max_items=2)
        a, b = lease.messages
        assert await qb.release(queue, lease, a) is True
        assert await qb.release(queue, lease, a.id) is False  # no longer held
        assert await qb.release(queue, lease, b, delay_ms=60000) is True
        stats = await qb.stats(queue)
        assert (stats.visible, stats.delayed, stats.in_flight) == (1, 1, 0)
        again = await qb.poll(queue)
        assert [(m.payload, m.delivery_count) for m in again] == [(b"a", 2)]


@aio_test
async def test_queues_purge_delete(server: Server, queue: str) -> None:
    async with aio.connect(server.addr, tenant="acme") as acme, \
            aio.connect(server.addr) as default:
        await acme.add(queue, [b"1", b"2", NewMessage(b"3", delay_ms=60000)])
        await acme.poll(queue)
        await default.add(queue, [b"other tenant"])
        refs = await acme.queues()
        assert queueber.QueueRef("acme", queue) in refs
        assert queueber.QueueRef("default", queue) in refs
        assert refs == sorted(refs, key=lambda r: (r.tenant, r.queue))
        assert await acme.purge(queue) == 3  # visible, delayed and in flight
        assert (await acme.stats(queue)).visible == 0
        await acme.delete(queue)
        assert queueber.QueueRef("acme", queue) not in await acme.queues()
        with pytest.raises(queueber.UnknownQueue):
            await acme.stats(queue)
        # The other tenant's queue of the same name is untouched.
        assert (await default.stats(queue)).visible == 1


@aio_test
async def test_empty_names_mean_default(server: Server) -> None:
    async with aio.connect(server.addr, tenant="") as qb:
        await qb.add("", [b"x"])
        assert queueber.QueueRef("default", "default") in await qb.queues()
        async with aio.connect(server.addr) as named:
            assert (await named.stats("default")).visible >= 1
        await qb.purge("")


@aio_test
async def test_large_poll_reply(server: Server, queue: str) -> None:
    # About 4 MiB in one reply: many reads per frame, multi-segment messages.
    payload = bytes(range(256)) * 256  # 64 KiB
    async with aio.connect(server.addr) as qb:
        for _ in range(4):
            await qb.add(queue, [payload] * 16)
        lease = await qb.poll(queue, max_items=64)
        assert len(lease) == 64 and all(m.payload == payload for m in lease)
        assert all(await qb.remove(queue, lease, lease.messages))


@aio_test
async def test_remove_and_poll_removes_then_leases_the_next_batch(
        server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        ids = await qb.add(queue, [b"%d" % i for i in range(5)])
        first = await qb.poll(queue, max_items=2)
        got = await qb.remove_and_poll(queue, first, first.messages, max_items=2, lease_ms=30000)
        assert isinstance(got, queueber.RemovedAndPolled)
        assert got.removed == [True, True]
        assert got and len(got.lease.id) == 16 and got.lease.id != first.id
        assert got.lease.expires_at_ms > 0
        assert [m.id for m in got] == ids[2:4] and got.messages == got.lease.messages
        assert all(m.delivery_count == 1 for m in got)
        stats = await qb.stats(queue)
        assert (stats.visible, stats.in_flight) == (1, 2)
        # Raw bytes work as well as the objects.
        got = await qb.remove_and_poll(queue, got.lease.id, [m.id for m in got], max_items=10)
        assert got.removed == [True, True] and [m.id for m in got] == ids[4:]
        # The last batch: removed, and nothing more to lease (falsy, as an
        # empty poll).
        last = await qb.remove_and_poll(queue, got.lease, got.messages, max_items=10)
        assert last.removed == [True]
        assert not last and last.lease.id == b"" and last.messages == [] and len(last) == 0
        stats = await qb.stats(queue)
        assert (stats.visible, stats.delayed, stats.in_flight) == (0, 0, 0)


@aio_test
async def test_remove_and_poll_without_ids_is_a_poll(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        ids = await qb.add(queue, [b"a", b"b", b"c"])
        got = await qb.remove_and_poll(queue, None, [], max_items=2)
        assert got.removed == [] and [m.id for m in got] == ids[:2]
        # The lease of an empty result is empty too: a plain poll again, with
        # the queue's lease (lease_ms=None).
        got = await qb.remove_and_poll(queue, queueber.Lease(b"", 0), [], max_items=5,
                                       lease_ms=None)
        assert got.removed == [] and [m.id for m in got] == ids[2:]
        assert got.lease.expires_at_ms > 0
        assert not await qb.remove_and_poll(queue, b"", [])
        assert (await qb.stats(queue)).in_flight == 3


@aio_test
async def test_remove_and_poll_with_a_wrong_lease_still_polls(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"1", b"2", b"3"])
        a = await qb.poll(queue)
        b = await qb.poll(queue)
        # b's message is not a's, and an unknown id is nobody's: False, and
        # they stay leased; a's own message is removed; the poll happens.
        got = await qb.remove_and_poll(queue, a, [b.messages[0], b"\x07" * 16, a.messages[0]],
                                       max_items=5)
        assert got.removed == [False, False, True]
        assert [m.payload for m in got] == [b"3"]
        stats = await qb.stats(queue)
        assert (stats.visible, stats.in_flight) == (0, 2)
        assert await qb.remove(queue, b, b.messages) == [True]
        # Ids removed already come back False too.
        again = await qb.remove_and_poll(queue, a, a.messages)
        assert again.removed == [False] and not again


@aio_test
async def test_remove_and_poll_errors_do_nothing(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"x", b"y"])
        lease = await qb.poll(queue)
        with pytest.raises(queueber.InvalidArgument):  # ids need their lease
            await qb.remove_and_poll(queue, None, lease.messages)
        with pytest.raises(queueber.InvalidArgument):
            await qb.remove_and_poll(queue, b"short", lease.messages)
        with pytest.raises(queueber.UnknownQueue):
            await qb.remove_and_poll(queue + "-missing", lease, lease.messages)
        # Nothing was removed and nothing leased.
        stats = await qb.stats(queue)
        assert (stats.visible, stats.in_flight) == (1, 1)
        assert await qb.remove(queue, lease, lease.messages) == [True]


@aio_test
async def test_remove_and_poll_is_bounded_like_remove(tight_server: Server, queue: str) -> None:
    async with aio.connect(tight_server.addr) as qb:
        n = qb.server_info.limits.max_messages_per_add
        await qb.add(queue, [b"m"] * n)
        await qb.add(queue, [b"next"])
        lease = await qb.poll(queue, max_items=n)
        ids = [m.id for m in lease]
        with pytest.raises(queueber.TooManyMessages):
            await qb.remove_and_poll(queue, lease, ids + ids[:1], max_items=5)
        assert (await qb.stats(queue)).in_flight == n  # the whole request refused
        got = await qb.remove_and_poll(queue, lease, ids, max_items=5)
        assert got.removed == [True] * n and [m.payload for m in got] == [b"next"]


@aio_test
async def test_remove_and_poll_waits_like_a_long_poll(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb, aio.connect(server.addr) as producer:
        await producer.add(queue, [b"first"])
        lease = await qb.poll(queue)
        # The queue is empty now: the removes are done at once, then the
        # request waits for a message.
        parked = asyncio.ensure_future(
            qb.remove_and_poll(queue, lease, lease.messages, max_items=5, wait_ms=10000))
        await asyncio.sleep(0.2)
        assert not parked.done()
        stats = await producer.stats(queue)
        assert (stats.visible, stats.in_flight) == (0, 0)  # removed while it waits
        [mid] = await producer.add(queue, [b"wake"])
        got = await asyncio.wait_for(parked, 5)
        assert got.removed == [True] and [m.id for m in got] == [mid]
        # With nothing to take, it waits wait_ms and comes back empty.
        t0 = time.monotonic()
        got = await qb.remove_and_poll(queue, got.lease, got.messages, wait_ms=300)
        assert got.removed == [True] and not got
        assert time.monotonic() - t0 >= 0.25


@aio_test
async def test_cancelled_remove_and_poll_gives_its_messages_back(
        server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb, aio.connect(server.addr) as producer:
        await producer.add(queue, [b"done"])
        lease = await qb.poll(queue)
        parked = asyncio.ensure_future(qb.remove_and_poll(
            queue, lease, lease.messages, max_items=5, lease_ms=60000, wait_ms=10000))
        await asyncio.sleep(0.1)
        parked.cancel()
        # The removes stay done; what the parked request leases when the add
        # wakes it is released, not left to a 60 s lease.
        await producer.add(queue, [b"a", b"b"])

        async def visible_again() -> bool:
            stats = await producer.stats(queue)
            return (stats.visible, stats.in_flight) == (2, 0)

        await eventually(visible_again)
        again = await producer.poll(queue, max_items=5)
        assert [(m.payload, m.delivery_count) for m in again] == [(b"a", 2), (b"b", 2)]


def test_connect_refused_and_timeout() -> None:
    async def body() -> None:
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        with pytest.raises(queueber.ConnectionClosed):
            await aio.connect(f"127.0.0.1:{port}", connect_timeout=2)
        # A listener that never answers hello: the connect times out.
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(queueber.ConnectTimeout):
            await aio.connect(f"127.0.0.1:{port}", connect_timeout=0.3)
        assert time.monotonic() - t0 < 2
        srv.close()

    asyncio.run(asyncio.wait_for(body(), 20))


@aio_test
async def test_close_answers_parked_polls_and_is_final(server: Server, queue: str) -> None:
    qb = await aio.connect(server.addr)
    await qb.add(queue, [b"x"])
    await qb.purge(queue)
    parked = asyncio.ensure_future(qb.poll(queue, wait_ms=20000))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await qb.close()
    assert not await asyncio.wait_for(parked, 5)  # answered empty, at once
    assert time.monotonic() - t0 < 2
    await qb.close()  # idempotent
    with pytest.raises(queueber.ConnectionClosed):
        await qb.stats(queue)


@aio_test
async def test_peek_pages_without_leasing(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        ids = await qb.add(queue, [b"a", b"b", b"c"])
        await qb.add(queue, [NewMessage(b"later", delay_ms=60000)])
        first = await qb.peek(queue, max_items=2)
        assert [m.payload for m in first] == [b"a", b"b"]
        assert [m.delivery_count for m in first] == [0, 0]
        assert first.cursor is not None
        rest = await qb.peek(queue, max_items=2, cursor=first.cursor)
        assert [m.id for m in rest] == [ids[2]]
        assert rest.cursor is None
        # Nothing was leased: a poll still gets the head.
        lease = await qb.poll(queue, max_items=1)
        assert lease.messages[0].id == ids[0]
        assert (await qb.stats(queue)).in_flight == 1
        with pytest.raises(queueber.UnknownQueue):
            await qb.peek(queue + "-missing")
        with pytest.raises(queueber.InvalidArgument):
            await qb.peek(queue, cursor=b"bad")


def test_sync_peek(server: Server, queue: str) -> None:
    with queueber.connect(server.addr) as qb:
        qb.add(queue, [b"x"])
        peeked = qb.peek(queue)
        assert len(peeked) == 1 and peeked.messages[0].payload == b"x"
        assert peeked.cursor is None


def test_tokens_bind_a_connection(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A server with --auth-file: nothing but hello before the token, then
    the token's tenant and permissions. The entry is made here the way
    ``queueber token new`` makes it: the file keeps the SHA-256 of
    ``<id>.<secret>``, the client presents the whole string."""
    import hashlib
    import secrets

    token = f"acme-py.{secrets.token_hex(32)}"
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text(
        "[[token]]\n"
        'id = "acme-py"\n'
        f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
        'tenant = "acme"\n'
        'permissions = ["send", "consume"]\n')
    server = Server("--auth-file", str(auth_file))
    try:
        with queueber.connect(server.addr, tenant="acme") as anon:
            assert anon.hello().auth_required
            with pytest.raises(queueber.Unauthenticated):
                anon.add("jobs", [b"x"])
        with pytest.raises(queueber.Unauthenticated):
            queueber.connect(server.addr, tenant="acme", token=token + "0")
        with queueber.connect(server.addr, tenant="acme", token=token) as qb:
            qb.add("jobs", [b"x", b"y"])
            lease = qb.poll("jobs")
            assert len(lease) == 1
            # removeAndPoll needs consume, as remove and poll do.
            got = qb.remove_and_poll("jobs", lease, lease.messages)
            assert got.removed == [True] and [m.payload for m in got] == [b"y"]
            with pytest.raises(queueber.PermissionDenied):
                qb.stats("jobs")  # admin only
            # Policies are admin operations too.
            for op in (lambda: qb.create_queue("jobs2"), lambda: qb.get_policy("jobs"),
                       lambda: qb.set_policy("jobs", queueber.QueuePolicy(max_depth=1))):
                with pytest.raises(queueber.PermissionDenied):
                    op()
    finally:
        server.stop()
