"""The blocking client: same operations, threads sharing one connection."""

import threading
import time
from typing import List

import pytest
from conftest import Server

import queueber


def test_sync_operations(server: Server, queue: str) -> None:
    with queueber.connect(server.addr, tenant="sync") as qb:
        assert qb.tenant == "sync" and qb.hello().version
        ids = qb.add(queue, [b"a", "b", queueber.NewMessage(b"c", delay_ms=60000)])
        assert len(ids) == 3
        stats = qb.stats(queue)
        assert (stats.visible, stats.delayed) == (2, 1)
        lease = qb.poll(queue, max_items=5, lease_ms=10000, wait_ms=100)
        assert [m.payload for m in lease] == [b"a", b"b"]
        assert qb.extend(queue, lease, 20000) is not None
        assert qb.release(queue, lease, lease.messages[1]) is True
        assert qb.remove(queue, lease, [lease.messages[0]]) == [True]
        assert queueber.QueueRef("sync", queue) in qb.queues()
        assert qb.purge(queue) == 2
        qb.delete(queue)
        with pytest.raises(queueber.UnknownQueue):
            qb.stats(queue)
    with pytest.raises(queueber.ConnectionClosed):
        qb.stats(queue)  # closed


def test_sync_remove_and_poll(server: Server, queue: str) -> None:
    with queueber.connect(server.addr) as qb:
        ids = qb.add(queue, [b"a", b"b", b"c"])
        got = qb.remove_and_poll(queue, None, [], max_items=2)  # no ids: a poll
        assert got.removed == [] and [m.id for m in got] == ids[:2]
        got = qb.remove_and_poll(queue, got.lease, iter(got.messages), max_items=2,
                                 lease_ms=10000, wait_ms=100)
        assert got.removed == [True, True] and [m.id for m in got] == ids[2:]
        # A wrong id is False; the poll waits (wait_ms) and finds nothing.
        t0 = time.monotonic()
        last = qb.remove_and_poll(queue, got.lease, [ids[0], ids[2]], wait_ms=300)
        assert last.removed == [False, True] and not last
        assert time.monotonic() - t0 >= 0.25
        stats = qb.stats(queue)
        assert (stats.visible, stats.in_flight) == (0, 0)


def test_sync_consume(server: Server, queue: str) -> None:
    with queueber.Client(server.addr) as qb:
        qb.add(queue, [b"fail"] + [b"%d" % i for i in range(50)])
        got: List[bytes] = []
        with qb.consume(queue, batch=8, wait_ms=200, retry_delay_ms=60000) as consumer:
            for msg in consumer:
                with msg:
                    if msg.payload == b"fail":
                        raise ValueError("released, and the loop goes on")
                    got.append(msg.payload)
                if len(got) == 50:
                    break
        assert got == [b"%d" % i for i in range(50)]
        stats = qb.stats(queue)
        assert (stats.visible, stats.delayed, stats.in_flight) == (0, 1, 0)


def test_sync_heartbeats_run_while_the_caller_blocks(server: Server, queue: str) -> None:
    with queueber.connect(server.addr) as qb, queueber.connect(server.addr) as other:
        qb.add(queue, [b"slow"])
        with qb.consume(queue, batch=1, lease_ms=800, wait_ms=200) as consumer:
            for msg in consumer:
                with msg:
                    time.sleep(1.8)  # blocking work, over two leases
                    assert not other.poll(queue)
                break
        assert qb.stats(queue).in_flight == 0 and qb.stats(queue).visible == 0


def test_threads_share_one_client(server: Server, queue: str) -> None:
    errors: List[BaseException] = []
    with queueber.connect(server.addr) as qb:
        def produce(k: int) -> None:
            try:
                for i in range(50):
                    qb.add(queue, [b"%d-%d" % (k, i)])
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert qb.stats(queue).visible == 400
        assert qb.purge(queue) == 400


def test_sync_connect_errors(server: Server) -> None:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(queueber.ConnectionClosed):
        queueber.connect(f"127.0.0.1:{port}", connect_timeout=2)
    with queueber.connect(server.addr) as qb:
        with pytest.raises(queueber.InvalidName):
            qb.add("bad name", [b"x"])


def test_sync_consume_fails_and_dead_letters(server: Server, queue: str) -> None:
    with queueber.connect(server.addr) as qb:
        qb.create_queue(queue, queueber.QueuePolicy(max_deliveries=2))
        qb.add(queue, [b"raises", b"rejected", b"fine"])
        attempts: List[int] = []
        seen: List[bytes] = []
        with qb.consume(queue, batch=3, wait_ms=100) as consumer:
            for msg in consumer:
                seen.append(msg.payload)
                if msg.payload == b"rejected":
                    msg.nack(ValueError("never valid"), dead=True)
                else:
                    with msg:
                        if msg.payload == b"raises":
                            attempts.append(msg.delivery_count)
                            raise RuntimeError(f"attempt {msg.delivery_count}")
                if len(attempts) == 2:
                    break
        # Closing the consumer waited for its fails to be answered.
        assert attempts == [1, 2] and sorted(seen) == [b"fine", b"raises", b"raises",
                                                       b"rejected"]
        stats = qb.stats(queue)
        assert (stats.visible, stats.in_flight, stats.dead) == (0, 0, 2)
        letters = {d.payload: d for d in qb.peek_dead(queue)}
        assert (letters[b"raises"].reason, letters[b"raises"].last_error) == (
            "maxDeliveries", "RuntimeError: attempt 2")
        assert (letters[b"rejected"].reason, letters[b"rejected"].last_error) == (
            "rejected", "ValueError: never valid")
