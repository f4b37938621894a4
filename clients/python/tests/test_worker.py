"""The worker helper: consume, heartbeats, batched acks, failures, stopping."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, List, Tuple

import pytest
from conftest import Server, aio_test, eventually

import queueber
from queueber import QueuePolicy, aio


async def drain(qb: aio.Client, queue: str) -> List[queueber.Message]:
    """Take and remove everything visible."""
    out: List[queueber.Message] = []
    while True:
        lease = await qb.poll(queue, max_items=4096)
        if not lease:
            return out
        out.extend(lease)
        assert all(await qb.remove(queue, lease, lease.messages))


@aio_test
async def test_consume_processes_everything_once(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"%d" % i for i in range(100)])
        got = []
        # max_held == batch: one poll at a time, so the order is the queue's.
        async with qb.consume(queue, batch=8, max_held=8, wait_ms=200) as consumer:
            async for msg in consumer:
                async with msg:
                    got.append(int(msg.payload))
                if len(got) == 100:
                    break
        assert got == list(range(100))
        stats = await qb.stats(queue)
        assert (stats.visible, stats.in_flight) == (0, 0)


def spy(qb: aio.Client, name: str) -> List[Tuple[Any, ...]]:
    """Record the arguments of every call of ``qb.<name>`` (still made)."""
    calls: List[Tuple[Any, ...]] = []
    original = getattr(qb, name)

    async def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(args + tuple(kwargs.values()))
        return await original(*args, **kwargs)

    setattr(qb, name, recording)
    return calls


@aio_test
async def test_acks_are_batched_per_lease(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"m"] * 64)
        # remove(queue, lease, ids); remove_and_poll(queue, lease, ids, ...)
        removes, carried = spy(qb, "remove"), spy(qb, "remove_and_poll")
        n = 0
        async with qb.consume(queue, batch=32, wait_ms=200) as consumer:
            async for msg in consumer:
                async with msg:
                    n += 1
                if n == 64:
                    break
        acks = [len(c[2]) for c in removes + carried]
        assert sum(acks) == 64
        # One per lease (and flush timer), not per message.
        assert len(acks) <= 4, (removes, carried)


@aio_test
async def test_acks_ride_on_the_next_poll(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"%d" % i for i in range(40)])
        polls, removes = spy(qb, "poll"), spy(qb, "remove")
        carried = spy(qb, "remove_and_poll")
        got = []
        # One poll loop (max_held == batch), acknowledgements sent only when
        # a lease is done (a long ack_delay_ms): each finished batch of 8 is
        # acknowledged by the request that fetches the next one.
        async with qb.consume(queue, batch=8, max_held=8, wait_ms=200,
                              ack_delay_ms=10000) as consumer:
            async for msg in consumer:
                async with msg:
                    got.append(int(msg.payload))
                if len(got) == 40:
                    break
        assert got == list(range(40))
        # remove_and_poll(queue, lease, ids, max_items, lease_ms, wait_ms)
        assert len(carried) >= 4 and all(len(c[2]) == 8 for c in carried), carried
        assert all(c[3:] == (8, 30000, 0) for c in carried)  # they do not wait
        assert sum(len(c[2]) for c in carried + removes) == 40
        # The first poll, and after the fifth batch (the last one's
        # acknowledgement found the queue empty) at most one long poll.
        assert len(polls) <= 2, polls
        stats = await qb.stats(queue)
        assert (stats.visible, stats.in_flight) == (0, 0)


@aio_test
async def test_a_server_without_remove_and_poll_gets_removes(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"%d" % i for i in range(24)])
        calls = []

        async def old_server(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            raise queueber.UnknownOperation("unknown operation removeAndPoll")

        qb.remove_and_poll = old_server  # type: ignore[method-assign]
        removes = spy(qb, "remove")
        got = []
        async with qb.consume(queue, batch=8, max_held=8, wait_ms=200,
                              ack_delay_ms=10000) as consumer:
            async for msg in consumer:
                async with msg:
                    got.append(int(msg.payload))
                if len(got) == 24:
                    break
        # The first refusal found out (its acknowledgements went as a
        # remove); the rest went straight to removes.
        assert got == list(range(24)) and len(calls) == 1
        assert sorted(len(r[2]) for r in removes) == [8, 8, 8]
        stats = await qb.stats(queue)
        assert (stats.visible, stats.in_flight) == (0, 0)


@aio_test
async def test_exception_fails_the_message(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"poison", b"fine"])
        fails, releases = spy(qb, "fail"), spy(qb, "release")
        seen = []
        async with qb.consume(queue, batch=1, wait_ms=200) as consumer:
            async for msg in consumer:
                seen.append((msg.payload, msg.delivery_count))
                async with msg:
                    if msg.payload == b"poison" and msg.delivery_count == 1:
                        raise RuntimeError("transient failure")
                if len(seen) == 3:
                    break
        # The failure was swallowed by `async with msg` (and logged), the
        # message was failed with the exception's text, came back with its
        # delivery count raised, and was removed on the second, successful
        # attempt.
        assert seen == [(b"poison", 1), (b"fine", 1), (b"poison", 2)]
        # fail(queue, lease, id, error, dead)
        assert [(f[0], f[3], f[4]) for f in fails] == [
            (queue, "RuntimeError: transient failure", False)]
        assert releases == []
        assert (await qb.stats(queue)).visible == 0


@aio_test
async def test_a_handler_that_always_raises_gets_the_message_dead_lettered(
        server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.create_queue(queue, QueuePolicy(max_deliveries=3))
        [poison] = await qb.add(queue, [b"poison"])
        await qb.add(queue, [b"fine"])
        attempts: List[int] = []
        done: List[bytes] = []
        async with qb.consume(queue, batch=1, wait_ms=100) as consumer:
            async def work() -> None:
                async for msg in consumer:
                    async with msg:
                        if msg.payload == b"poison":
                            attempts.append(msg.delivery_count)
                            raise ValueError(f"cannot parse attempt {msg.delivery_count}")
                        done.append(msg.payload)

            task = asyncio.ensure_future(work())
            try:
                async def dead() -> bool:
                    return (await qb.stats(queue)).dead == 1

                await eventually(dead)
                # No fourth delivery comes.
                await asyncio.sleep(0.3)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert attempts == [1, 2, 3] and done == [b"fine"]
        stats = await qb.stats(queue)
        assert (stats.visible, stats.delayed, stats.in_flight, stats.dead) == (0, 0, 0, 1)
        [letter] = (await qb.peek_dead(queue)).letters
        assert (letter.id, letter.payload, letter.delivery_count) == (poison, b"poison", 3)
        assert letter.reason == queueber.DeadReason.MAX_DELIVERIES
        assert letter.last_error == "ValueError: cannot parse attempt 3"
        # Redriven, it is delivered again (from a delivery count of 1), once
        # the polls the consumer cancelled have ended on the server too
        # (wait_ms): a parked one would take it (and the client release it).
        await asyncio.sleep(0.5)
        assert (await qb.redrive(queue)).moved == 1
        again = await qb.poll(queue, wait_ms=2000)
        assert [(m.id, m.delivery_count) for m in again] == [(poison, 1)]


@aio_test
async def test_nack_dead_rejects_at_once_and_long_errors_are_cut(
        server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"a", b"b", b"c"])
        async with qb.consume(queue, batch=3, wait_ms=200) as consumer:
            a = await consumer.__anext__()
            a.nack(KeyError("missing field"), dead=True)
            b = await consumer.__anext__()
            b.nack("é" * 2000, dead=True)
            c = await consumer.__anext__()
            c.nack(dead=True)  # no reason: an empty text
            await consumer.flush()
        letters = {d.payload: d for d in (await qb.peek_dead(queue)).letters}
        assert all(d.reason == "rejected" and d.delivery_count == 1 for d in letters.values())
        assert letters[b"a"].last_error == "KeyError: 'missing field'"
        assert letters[b"b"].last_error == "é" * 512  # 1 KiB of UTF-8
        assert letters[b"c"].last_error == ""


@aio_test
async def test_a_retry_delay_releases_instead_of_failing(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"a", b"b"])
        fails, releases = spy(qb, "fail"), spy(qb, "release")
        async with qb.consume(queue, batch=2, wait_ms=200, retry_delay_ms=60000) as consumer:
            a = await consumer.__anext__()
            a.nack("later")  # the consumer's retry delay: a release
            b = await consumer.__anext__()
            b.nack("now", delay_ms=0)  # no delay: a fail
            await consumer.flush()
        # (queue, lease, id, delay_ms); (queue, lease, id, error, dead)
        assert (a.id, 60000) in [r[2:] for r in releases]
        assert [f[2:] for f in fails] == [(b.id, "now", False)]

        async def a_delayed_b_visible() -> bool:
            # A poll the consumer cancelled may still take b; it is released.
            stats = await qb.stats(queue)
            return (stats.visible, stats.delayed, stats.in_flight) == (1, 1, 0)

        await eventually(a_delayed_b_visible)


@aio_test
async def test_a_server_without_fail_gets_releases(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"a", b"b"])
        calls = []

        async def old_server_fail(*args: Any, **kwargs: Any) -> bool:
            calls.append(args)
            raise queueber.UnknownOperation("unknown operation fail")

        qb.fail = old_server_fail  # type: ignore[method-assign]
        releases = spy(qb, "release")
        async with qb.consume(queue, batch=2, wait_ms=200) as consumer:
            for _ in range(2):
                msg = await consumer.__anext__()
                async with msg:
                    raise RuntimeError("failed")
                await consumer.flush()
        # The first failure found out; the second went straight to release.
        assert len(calls) == 1
        assert {r[2] for r in releases} >= {c[2] for c in calls} | {msg.id}

        async def both_visible() -> bool:
            stats = await qb.stats(queue)
            return (stats.visible, stats.in_flight) == (2, 0)

        await eventually(both_visible)


@aio_test
async def test_explicit_ack_nack_settle_once(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"a"])
        async with qb.consume(queue, batch=1, wait_ms=200, retry_delay_ms=60000) as consumer:
            msg = await consumer.__anext__()
            msg.nack("not now")
            assert msg.settled
            msg.ack()  # already settled: ignored
            async with msg:
                pass  # nor does leaving the block settle it again
            await consumer.flush()
        stats = await qb.stats(queue)
        assert (stats.visible, stats.delayed, stats.in_flight) == (0, 1, 0)


@aio_test
async def test_heartbeats_keep_a_slow_message_leased(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb, aio.connect(server.addr) as other:
        await qb.add(queue, [b"slow"])
        async with qb.consume(queue, batch=1, lease_ms=900, wait_ms=200) as consumer:
            async for msg in consumer:
                async with msg:
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < 2.0:  # over two leases
                        assert not await other.poll(queue)  # nobody else gets it
                        assert (await other.stats(queue)).in_flight == 1
                        await asyncio.sleep(0.2)
                break
        assert msg.delivery_count == 1 and not msg.lease_lost
        stats = await qb.stats(queue)
        assert (stats.visible, stats.delayed, stats.in_flight) == (0, 0, 0)


@aio_test
async def test_stop_releases_buffered_messages(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"%d" % i for i in range(20)])
        consumer = qb.consume(queue, batch=10, lease_ms=60000, wait_ms=200)
        first = await consumer.__anext__()
        async with first:
            pass
        await eventually(lambda: asyncio.sleep(0, consumer.held >= 10))
        await consumer.aclose()  # 19 fetched, 1 processed
        stats = await qb.stats(queue)
        # Nothing waits for a 60 s lease: what was not handed out is back.
        assert (stats.visible, stats.in_flight) == (19, 0)
        rest = await drain(qb, queue)
        assert sorted(int(m.payload) for m in rest) == list(range(1, 20))


@aio_test
async def test_max_held_bounds_the_buffer(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.add(queue, [b"m"] * 60)
        peak = 0
        n = 0
        async with qb.consume(queue, batch=4, max_held=6, wait_ms=200) as consumer:
            async for msg in consumer:
                async with msg:
                    await asyncio.sleep(0.001)
                    peak = max(peak, consumer.held)
                    assert (await qb.stats(queue)).in_flight <= 6
                n += 1
                if n == 60:
                    break
        assert 1 <= peak <= 6


@aio_test
async def test_cancellation_loses_nothing_and_acks_once(server: Server, queue: str) -> None:
    total = 300
    processed: List[bytes] = []
    async with aio.connect(server.addr) as producer:
        await producer.add(queue, [b"%d" % i for i in range(total)])

    async def worker() -> None:
        async with aio.connect(server.addr) as qb:
            async for msg in qb.consume(queue, batch=16, lease_ms=60000, wait_ms=200):
                async with msg:
                    await asyncio.sleep(0.002)
                    processed.append(msg.payload)

    task = asyncio.ensure_future(worker())
    await eventually(lambda: asyncio.sleep(0, len(processed) >= 50))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The client's close (in `async with`) released the message being
    # processed and the buffered ones, and confirmed every acknowledgement:
    # the rest are visible at once, not after the 60 s lease.
    async with aio.connect(server.addr) as qb:
        stats = await qb.stats(queue)
        assert stats.in_flight == 0
        assert stats.visible == total - len(processed)
        rest = await drain(qb, queue)
    done = sorted(int(p) for p in processed)
    assert len(set(done)) == len(done)  # none processed (acked) twice
    assert sorted(done + [int(m.payload) for m in rest]) == list(range(total))  # none lost


@aio_test
async def test_consumer_waits_for_the_queue_to_exist(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        async def first() -> queueber.ConsumedMessage:
            async for msg in qb.consume(queue, batch=1, wait_ms=100):
                async with msg:
                    return msg
            raise AssertionError("consumer ended")

        task = asyncio.ensure_future(first())
        await asyncio.sleep(0.3)  # polls answer unknownQueue meanwhile
        await qb.add(queue, [b"created"])
        assert (await asyncio.wait_for(task, 10)).payload == b"created"


@aio_test
async def test_consumer_surfaces_fatal_errors(server: Server) -> None:
    async with aio.connect(server.addr) as qb:
        with pytest.raises(queueber.InvalidName):
            async for _msg in qb.consume("bad name", wait_ms=100):
                pass


WORKER = textwrap.dedent("""
    import asyncio, sys
    import queueber.aio

    async def main(addr, queue):
        async with queueber.aio.connect(addr) as qb:
            async for msg in qb.consume(queue, batch=1, lease_ms=1000, wait_ms=1000):
                async with msg:
                    print(msg.id.hex(), flush=True)
                    await asyncio.sleep(3600)   # stuck: killed mid-message

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


@aio_test
async def test_killed_worker_message_is_redelivered_after_its_lease(
        server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        [mid] = await qb.add(queue, [b"job"])
        proc = subprocess.Popen([sys.executable, "-c", WORKER, server.addr, queue],
                                stdout=subprocess.PIPE, text=True)
        try:
            line = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline), 30)
            assert line.strip() == mid.hex()
            # Heartbeats keep it leased while the worker lives...
            await asyncio.sleep(1.5)
            assert not await qb.poll(queue)
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc.stdout.close()
        # ...a dead worker releases nothing: it is still leased...
        assert not await qb.poll(queue)
        # ...until the last extension (1 s) runs out.
        lease = await qb.poll(queue, wait_ms=5000)
        assert [(m.id, m.delivery_count) for m in lease] == [(mid, 2)]
        assert time.monotonic() - killed_at < 3.0
        assert await qb.remove(queue, lease, lease.messages) == [True]
