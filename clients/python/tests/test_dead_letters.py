"""Dead letters against a real server: fail (with and without dead, the
error text kept and cut to 1 KiB), a policy's max_deliveries, peek_dead
(paged), redrive (by ids, the oldest max, all; 1000 a request and
redrive_all for more), stats.dead, the policy round trip, the blocking
client, and the permissions of fail (consume) and redrive (admin)."""

import asyncio
import hashlib
import secrets
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
from conftest import Server, aio_test, eventually

import queueber
from queueber import (MAX_DELIVERIES_LIMIT, UNLIMITED, DeadLetter, DeadReason, QueuePolicy,
                      Redriven, aio)
from queueber.types import MAX_ERROR_BYTES, clip_error


def counts(stats: queueber.QueueStats) -> Tuple[int, int, int, int]:
    return stats.visible, stats.delayed, stats.in_flight, stats.dead


async def lease_one(qb: aio.Client, queue: str) -> Tuple[queueber.Lease, queueber.Message]:
    lease = await qb.poll(queue, lease_ms=60000, wait_ms=5000)
    assert len(lease) == 1, lease
    return lease, lease.messages[0]


async def all_dead(qb: aio.Client, queue: str, page: int = 100) -> List[DeadLetter]:
    out: List[DeadLetter] = []
    cursor = None
    while True:
        peeked = await qb.peek_dead(queue, max_items=page, cursor=cursor)
        out.extend(peeked)
        cursor = peeked.cursor
        if cursor is None:
            return out


async def make_dead(qb: aio.Client, queue: str, n: int, error: str = "rejected") -> List[bytes]:
    """Add ``n`` messages and fail each with dead=True (pipelined)."""
    ids: List[bytes] = []
    max_add = qb.server_info.limits.max_messages_per_add
    for start in range(0, n, max_add):
        ids += await qb.add(queue, [b"%d" % i for i in range(start, min(n, start + max_add))])
    left = n
    while left:
        lease = await qb.poll(queue, max_items=min(left, qb.server_info.limits.max_items_per_poll),
                              lease_ms=60000)
        assert lease
        flags = await asyncio.gather(*(qb.fail(queue, lease, m, error, dead=True)
                                       for m in lease))
        assert all(flags)
        left -= len(lease)
    return ids


@aio_test
async def test_fail_brings_the_message_back_with_its_error(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        [mid] = await qb.add(queue, [b"job"])
        lease, msg = await lease_one(qb, queue)
        assert await qb.fail(queue, lease, msg, "smtp timeout") is True
        # The lease no longer holds it: a second fail (or release) does nothing.
        assert await qb.fail(queue, lease, msg.id, "again") is False
        assert await qb.release(queue, lease, msg) is False
        assert counts(await qb.stats(queue)) == (1, 0, 0, 0)
        lease, msg = await lease_one(qb, queue)
        assert (msg.id, msg.delivery_count) == (mid, 2)
        # Without an error text it still fails (and records the empty text).
        assert await qb.fail(queue, lease.id, mid) is True
        lease, msg = await lease_one(qb, queue)
        assert msg.delivery_count == 3
        # Rejected: dead at once, with the text of this fail.
        assert await qb.fail(queue, lease, msg, "bad input: no recipient", dead=True)
        assert counts(await qb.stats(queue)) == (0, 0, 0, 1)
        assert not await qb.poll(queue)
        [dead] = await all_dead(qb, queue)
        assert (dead.id, dead.payload, dead.delivery_count) == (mid, b"job", 3)
        assert dead.reason is DeadReason.REJECTED and dead.reason == "rejected"
        assert str(dead.reason) == "rejected"
        assert dead.last_error == "bad input: no recipient"
        assert dead.enqueued_at_ms > 0 and dead.died_at_ms >= dead.enqueued_at_ms
        # A normal peek does not show dead letters.
        assert len(await qb.peek(queue)) == 0


@aio_test
async def test_error_text_round_trips_cut_to_1_kib(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        texts = [
            "plain",
            "ünïcödé ✓ 🚀 and \n a newline",
            "é" * 1000,  # 2000 bytes: cut inside a character, at its start
            "x" * 1023 + "🚀",  # the 4-byte character would pass 1024: dropped
            "y" * 5000,
        ]
        await qb.add(queue, [b"%d" % i for i in range(len(texts))])
        lease = await qb.poll(queue, max_items=len(texts), lease_ms=60000)
        for m, text in zip(lease, texts):
            assert await qb.fail(queue, lease, m, text, dead=True)
        letters = await all_dead(qb, queue)
        got = {d.payload: d.last_error for d in letters}
        for i, text in enumerate(texts):
            kept = got[b"%d" % i]
            assert kept == clip_error(text)
            assert text.startswith(kept) and len(kept.encode()) <= MAX_ERROR_BYTES
        assert got[b"2"] == "é" * 512
        assert got[b"3"] == "x" * 1023
        assert got[b"4"] == "y" * 1024
        with pytest.raises(TypeError):
            await qb.fail(queue, lease, lease.messages[0], b"bytes")  # type: ignore[arg-type]


@aio_test
async def test_max_deliveries_dead_letters_failed_deliveries(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        created = await qb.create_queue(queue, QueuePolicy(max_deliveries=2))
        assert created.policy.policy.max_deliveries == 2
        [released, failed, expired] = await qb.add(queue, [b"released", b"failed", b"expired"])
        # Each ends its deliveries a different way; the second failure kills.
        for delivery, after in ((1, (3, 0, 0, 0)), (2, (0, 0, 0, 3))):
            lease = await qb.poll(queue, max_items=3, lease_ms=60000, wait_ms=5000)
            assert {m.id: m.delivery_count for m in lease} == {
                released: delivery, failed: delivery, expired: delivery}
            assert await qb.release(queue, lease, released)
            assert await qb.fail(queue, lease, failed, f"attempt {delivery}")
            # The third one's lease runs out instead.
            assert await qb.extend(queue, lease, 100) is not None

            async def settled(after: Tuple[int, int, int, int] = after) -> bool:
                return counts(await qb.stats(queue)) == after

            await eventually(settled)
        letters = {d.id: d for d in await all_dead(qb, queue)}
        assert set(letters) == {released, failed, expired}
        for d in letters.values():
            assert d.reason is DeadReason.MAX_DELIVERIES and d.delivery_count == 2
        assert letters[failed].last_error == "attempt 2"
        assert letters[released].last_error is None
        assert letters[expired].last_error is None


@aio_test
async def test_peek_dead_pages_oldest_death_first(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        ids = []
        for i in range(5):  # one at a time: each dies after the one before
            [mid] = await qb.add(queue, [b"%d" % i])
            lease, msg = await lease_one(qb, queue)
            assert await qb.fail(queue, lease, msg, f"error {i}", dead=True)
            ids.append(mid)
        await qb.add(queue, [b"alive"])
        first = await qb.peek_dead(queue, max_items=2)
        assert isinstance(first, queueber.DeadPeeked)
        assert [d.id for d in first] == ids[:2] and len(first) == 2
        assert first.cursor is not None
        second = await qb.peek_dead(queue, max_items=2, cursor=first.cursor)
        assert [d.id for d in second.letters] == ids[2:4]
        third = await qb.peek_dead(queue, max_items=2, cursor=second.cursor)
        assert [d.id for d in third] == ids[4:] and third.cursor is None
        letters = first.letters + second.letters + third.letters
        assert [d.last_error for d in letters] == [f"error {i}" for i in range(5)]
        assert [d.died_at_ms for d in letters] == sorted(d.died_at_ms for d in letters)
        # Nothing changed: the same again, and the live message is untouched.
        assert await all_dead(qb, queue, page=100) == letters
        assert [m.payload for m in await qb.peek(queue)] == [b"alive"]
        # A queue without dead letters; errors like peek's.
        await qb.add(queue + "-clean", [b"x"])
        empty = await qb.peek_dead(queue + "-clean")
        assert len(empty) == 0 and empty.cursor is None
        with pytest.raises(queueber.UnknownQueue):
            await qb.peek_dead(queue + "-missing")
        with pytest.raises(queueber.InvalidArgument):
            await qb.peek_dead(queue, cursor=b"bad")


@aio_test
async def test_redrive_by_ids_and_all(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.create_queue(queue, QueuePolicy(max_deliveries=1))
        ids = await make_dead(qb, queue, 5, error="first life")
        assert (await qb.stats(queue)).dead == 5

        # By id: those only; ids that are not dead letters are ignored.
        step = await qb.redrive(queue, ids=[ids[1], b"\x00" * 16])
        assert step == Redriven(moved=1, more=False)
        assert counts(await qb.stats(queue)) == (1, 0, 0, 4)
        [back] = (await qb.peek(queue)).messages
        assert (back.id, back.delivery_count) == (ids[1], 0)  # the count starts over
        # Its last error stays: out of deliveries again, it dies with it.
        lease, msg = await lease_one(qb, queue)
        assert msg.delivery_count == 1
        assert await qb.release(queue, lease, msg)
        [again] = [d for d in await all_dead(qb, queue) if d.id == ids[1]]
        assert again.reason == DeadReason.MAX_DELIVERIES
        assert again.last_error == "first life" and again.delivery_count == 1

        # DeadLetter objects work as ids too; an empty list moves nothing.
        letters = await all_dead(qb, queue)
        assert (await qb.redrive(queue, ids=letters[:2])).moved == 2
        assert await qb.redrive(queue, ids=[]) == Redriven(0, False)
        assert (await qb.stats(queue)).dead == 3
        # The oldest max, then all.
        assert await qb.redrive(queue, max=1) == Redriven(1, False)
        assert await qb.redrive(queue) == Redriven(2, False)
        assert await qb.redrive(queue) == Redriven(0, False)
        assert counts(await qb.stats(queue)) == (5, 0, 0, 0)
        assert sorted(m.id for m in await qb.peek(queue)) == sorted(ids)
        with pytest.raises(queueber.UnknownQueue):
            await qb.redrive(queue + "-missing")
        with pytest.raises(ValueError):
            await qb.redrive(queue, max=-1)
        with pytest.raises(queueber.InvalidArgument):
            await qb.redrive(queue, ids=[b"short"])


@aio_test
async def test_redrive_moves_1000_a_request_and_redrive_all_loops(
        server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        ids = await make_dead(qb, queue, 2600)
        assert (await qb.stats(queue)).dead == 2600
        # One request moves at most 1000 and says there are more.
        assert await qb.redrive(queue) == Redriven(1000, True)
        # max over one request: moved across two, exactly max.
        assert await qb.redrive_all(queue, max=1200) == 1200
        assert counts(await qb.stats(queue)) == (2200, 0, 0, 400)
        assert await qb.redrive_all(queue) == 400
        assert (await qb.stats(queue)).dead == 0
        assert await qb.redrive_all(queue) == 0

        # More than 1000 ids: refused in one request, split by redrive_all.
        assert await qb.purge(queue) == 2600
        ids = await make_dead(qb, queue, 1500)
        with pytest.raises(queueber.TooManyMessages):
            await qb.redrive(queue, ids=ids)
        assert (await qb.stats(queue)).dead == 1500
        assert await qb.redrive_all(queue, ids=ids[:1200]) == 1200
        assert counts(await qb.stats(queue)) == (1200, 0, 0, 300)
        # Purge counts the dead letters too.
        assert await qb.purge(queue) == 1500
        assert counts(await qb.stats(queue)) == (0, 0, 0, 0)


@aio_test
async def test_policy_max_deliveries_round_trip(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        created = await qb.create_queue(queue, QueuePolicy(max_deliveries=MAX_DELIVERIES_LIMIT))
        assert created.policy.policy.max_deliveries == 1000
        assert created.policy.effective.max_deliveries == 1000
        assert await qb.get_policy(queue) == created.policy
        info = await qb.set_policy(queue, QueuePolicy(max_deliveries=UNLIMITED, lease_ms=2000))
        assert info.policy == QueuePolicy(lease_ms=2000, max_deliveries=UNLIMITED)
        assert info.effective.max_deliveries == UNLIMITED
        # Unset: the server's default, unlimited unless --default-max-deliveries.
        info = await qb.set_policy(queue, QueuePolicy(max_deliveries=None))
        assert info.policy.max_deliveries is None
        assert info.effective.max_deliveries == UNLIMITED
        info = await qb.set_policy(queue, QueuePolicy(max_deliveries=1))
        assert (info.version, info.policy.max_deliveries) == (4, 1)
        assert (await qb.get_policy(queue)).policy.max_deliveries == 1


def test_max_deliveries_is_checked_locally() -> None:
    for bad in (0, -1, 1001, UNLIMITED - 1, 2 ** 64):
        with pytest.raises(ValueError):
            QueuePolicy(max_deliveries=bad)
    for wrong in (True, "3", 2.0):
        with pytest.raises(TypeError):
            QueuePolicy(max_deliveries=wrong)  # type: ignore[arg-type]
    for good in (1, 5, 1000, UNLIMITED):
        assert QueuePolicy(max_deliveries=good).max_deliveries == good


def test_server_default_max_deliveries(make_server: Callable[..., Server]) -> None:
    srv = make_server("--default-max-deliveries", "2")

    @aio_test
    async def body() -> None:
        async with aio.connect(srv.addr) as qb:
            await qb.add("plain", [b"x"])
            info = await qb.get_policy("plain")
            assert info.policy.max_deliveries is None and info.effective.max_deliveries == 2
            for _ in range(2):
                lease, msg = await lease_one(qb, "plain")
                assert await qb.fail("plain", lease, msg, "no luck")
            assert counts(await qb.stats("plain")) == (0, 0, 0, 1)
            [dead] = (await qb.peek_dead("plain")).letters
            assert (dead.reason, dead.last_error) == (DeadReason.MAX_DELIVERIES, "no luck")
            # A queue's own policy wins, unlimited included.
            await qb.create_queue("forever", QueuePolicy(max_deliveries=UNLIMITED))
            await qb.add("forever", [b"y"])
            for _ in range(3):
                lease, msg = await lease_one(qb, "forever")
                assert await qb.fail("forever", lease, msg, "still no luck")
            assert counts(await qb.stats("forever")) == (1, 0, 0, 0)

    body()


def test_sync_dead_letters(server: Server, queue: str) -> None:
    with queueber.connect(server.addr, tenant="sync") as qb:
        qb.create_queue(queue, QueuePolicy(max_deliveries=2))
        ids = qb.add(queue, [b"a", b"b", b"c"])
        lease = qb.poll(queue, max_items=3, lease_ms=60000)
        assert qb.fail(queue, lease, lease.messages[0], "retry me") is True
        assert qb.fail(queue, lease, lease.messages[1], "broken", dead=True) is True
        assert qb.fail(queue, lease, lease.messages[2].id, "gone", True) is True
        assert qb.fail(queue, lease, lease.messages[2].id, "gone") is False
        stats = qb.stats(queue)
        assert (stats.visible, stats.dead) == (1, 2)
        first = qb.peek_dead(queue, max_items=1)
        assert [d.id for d in first] == [ids[1]] and first.cursor is not None
        rest = qb.peek_dead(queue, max_items=10, cursor=first.cursor)
        assert [(d.id, d.reason, d.last_error) for d in rest] == [
            (ids[2], DeadReason.REJECTED, "gone")]
        assert qb.redrive(queue, ids=iter([ids[2]])) == Redriven(1, False)
        assert qb.redrive(queue, max=5) == Redriven(1, False)
        assert qb.redrive_all(queue) == 0
        assert qb.stats(queue).visible == 3 and qb.stats(queue).dead == 0
        assert qb.get_policy(queue).policy.max_deliveries == 2


def auth_file(tmp_path: Path, tokens: List[Tuple[str, List[str]]]) -> Tuple[Path, List[str]]:
    """An --auth-file with one token per (id, permissions), tenant acme,
    made the way ``queueber token new`` makes them."""
    lines, secrets_out = [], []
    for tid, perms in tokens:
        token = f"{tid}.{secrets.token_hex(32)}"
        secrets_out.append(token)
        lines += ["[[token]]", f'id = "{tid}"',
                  f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"',
                  'tenant = "acme"',
                  "permissions = [%s]" % ", ".join(f'"{p}"' for p in perms), ""]
    path = tmp_path / "auth.toml"
    path.write_text("\n".join(lines))
    return path, secrets_out


def test_fail_needs_consume_and_redrive_admin(tmp_path: Path) -> None:
    path, (worker, admin) = auth_file(tmp_path, [("worker-py", ["send", "consume"]),
                                                 ("admin-py", ["admin"])])
    server = Server("--auth-file", str(path))
    try:
        with queueber.connect(server.addr, tenant="acme", token=worker) as w, \
                queueber.connect(server.addr, tenant="acme", token=admin) as a:
            ids = w.add("jobs", [b"x", b"y"])
            lease = w.poll("jobs", max_items=2, lease_ms=60000)
            # fail is a consumer's operation.
            assert w.fail("jobs", lease, ids[0], "bad", dead=True) is True
            with pytest.raises(queueber.PermissionDenied):
                a.fail("jobs", lease, ids[1], "not yours")
            # Looking at and moving dead letters are admin operations.
            for op in (lambda: w.redrive("jobs"), lambda: w.redrive("jobs", ids=[ids[0]]),
                       lambda: w.redrive_all("jobs"), lambda: w.peek_dead("jobs")):
                with pytest.raises(queueber.PermissionDenied):
                    op()
            assert a.stats("jobs").dead == 1
            assert [d.id for d in a.peek_dead("jobs")] == [ids[0]]
            assert a.redrive("jobs") == Redriven(1, False)
            # Nothing was run by the refused requests: the lease still holds y.
            assert w.fail("jobs", lease, ids[1], "late") is True
            assert a.stats("jobs").visible == 2
    finally:
        server.cleanup()
