"""Many requests in flight on one connection; answers matched by id."""

import asyncio

from conftest import Server, aio_test, eventually

from queueber import aio


@aio_test
async def test_ten_thousand_requests_on_one_connection(server: Server, queue: str) -> None:
    n = 10_000
    async with aio.connect(server.addr) as qb:
        conn = qb._conn
        # Each add carries its index; the ids that come back must be the
        # ones of that very add, whatever order the answers arrive in.
        ids = await asyncio.gather(*(qb.add(queue, [b"%d" % i]) for i in range(n)))
        assert qb._conn is conn  # one connection throughout
        by_id = {one[0]: i for i, one in enumerate(ids)}
        assert len(by_id) == n
        seen = 0
        while seen < n:
            lease = await qb.poll(queue, max_items=4096)
            for m in lease:
                assert by_id[m.id] == int(m.payload)
            assert all(await qb.remove(queue, lease, lease.messages))
            seen += len(lease)
        # 10,000 pipelined stats and hellos, interleaved.
        results = await asyncio.gather(*(qb.stats(queue) if i % 2 else qb.hello()
                                         for i in range(n)))
        assert all(r.visible == 0 for r in results[1::2])
        assert all(r.version for r in results[0::2])
        assert qb._conn is conn


@aio_test
async def test_answers_arrive_out_of_order(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb, aio.connect(server.addr) as producer:
        await producer.add(queue, [b"x"])
        await producer.purge(queue)
        done = []
        parked = asyncio.ensure_future(qb.poll(queue, wait_ms=10000))
        parked.add_done_callback(lambda _: done.append("poll"))
        await asyncio.sleep(0.05)  # sent first
        for i in range(100):
            await qb.stats(queue)  # answered while the poll waits
            done.append(i)
        await producer.add(queue, [b"late"])
        lease = await asyncio.wait_for(parked, 5)
        assert [m.payload for m in lease] == [b"late"]
        assert done == list(range(100)) + ["poll"]


@aio_test
async def test_in_flight_bound_is_kept(server: Server, queue: str) -> None:
    # Parked polls hold their slots; with a bound of 4, the fifth request
    # waits in the client until one is answered.
    async with aio.connect(server.addr, max_in_flight=4) as qb:
        await qb.add(queue, [b"x"])
        await qb.purge(queue)
        polls = [asyncio.ensure_future(qb.poll(queue, wait_ms=1500)) for _ in range(4)]
        await asyncio.sleep(0.1)
        stats = asyncio.ensure_future(qb.stats(queue))
        await asyncio.sleep(0.2)
        assert not stats.done() and len(qb._conn.pending) == 4
        assert (await asyncio.wait_for(stats, 5)).visible == 0
        assert all(not p.result() for p in polls)


@aio_test
async def test_cancelled_poll_gives_its_messages_back(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb, aio.connect(server.addr) as producer:
        await producer.add(queue, [b"x"])
        await producer.purge(queue)
        parked = asyncio.ensure_future(qb.poll(queue, max_items=5, wait_ms=10000,
                                               lease_ms=60000))
        await asyncio.sleep(0.1)
        parked.cancel()
        # The server still has the poll parked; the add wakes it and leases
        # the messages, and the client releases them instead of leaving them
        # to a 60 s lease.
        await producer.add(queue, [b"a", b"b"])

        async def visible_again() -> bool:
            return (await producer.stats(queue)).visible == 2

        await eventually(visible_again)
        lease = await producer.poll(queue, max_items=5)
        assert [m.delivery_count for m in lease] == [2, 2]
