"""Queue policies against a real server: create_queue (idempotent, refused
with another policy), get_policy and set_policy with versions and the
server's defaults; bounded queues (QueueFull leaves nothing behind); the
policy's payload limit; a poll that names no lease gets the policy's;
retention drops old messages (visible, or in flight when their lease
ends) and counts them in stats."""

import asyncio
import time
from typing import Awaitable, Callable, Tuple

import pytest
from conftest import Server, aio_test

import queueber
from queueber import MAX_RETENTION_MS, UNLIMITED, NewMessage, PolicyInfo, QueuePolicy, aio

#: Slack for comparing a lease's expiry (server clock) with the local clock
#: around the poll: the same machine, so only scheduling noise.
CLOCK_SLACK_MS = 250


def counts(stats: queueber.QueueStats) -> Tuple[int, int, int]:
    return stats.visible, stats.delayed, stats.in_flight


def now_ms() -> float:
    return time.time() * 1000


async def timed(poll: Callable[[], Awaitable[queueber.Lease]]) -> Tuple[queueber.Lease, float,
                                                                           float]:
    before = now_ms()
    lease = await poll()
    return lease, before, now_ms()


def assert_lease_of(lease: queueber.Lease, before: float, after: float, lease_ms: int) -> None:
    assert lease, "the poll returned nothing"
    assert before + lease_ms - CLOCK_SLACK_MS <= lease.expires_at_ms \
        <= after + lease_ms + CLOCK_SLACK_MS, \
        f"lease of about {lease.expires_at_ms - before:.0f} ms, wanted {lease_ms}"


@aio_test
async def test_create_get_set_round_trip(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        server_payload_limit = qb.server_info.limits.max_payload_bytes
        policy = QueuePolicy(lease_ms=1500, max_depth=100)
        created = await qb.create_queue(queue, policy)
        assert created.created
        assert created.policy.version == 1
        assert created.policy.policy == policy
        # Unset fields are the server's defaults (queueberd's own here).
        assert created.policy.effective == QueuePolicy(
            lease_ms=1500, max_depth=100, max_bytes=UNLIMITED,
            max_payload_bytes=server_payload_limit, max_deliveries=UNLIMITED,
            retention_ms=UNLIMITED)
        assert await qb.get_policy(queue) == created.policy
        assert queueber.QueueRef("default", queue) in await qb.queues()
        assert (await qb.stats(queue)).visible == 0

        # set_policy replaces the whole policy: lease_ms and max_depth go
        # back to the defaults; every change moves the version on.
        second = QueuePolicy(max_bytes=4096, max_payload_bytes=512)
        info = await qb.set_policy(queue, second)
        assert isinstance(info, PolicyInfo)
        assert (info.version, info.policy) == (2, second)
        assert info.effective == QueuePolicy(lease_ms=30000, max_depth=UNLIMITED,
                                             max_bytes=4096, max_payload_bytes=512,
                                             max_deliveries=UNLIMITED, retention_ms=UNLIMITED)
        assert await qb.get_policy(queue) == info
        again = await qb.set_policy(queue, second)  # the same policy still counts
        assert again.version == 3
        unbounded = await qb.set_policy(queue, QueuePolicy(max_depth=UNLIMITED))
        assert unbounded.version == 4 and unbounded.policy.max_depth == UNLIMITED
        assert (await qb.get_policy(queue)).version == 4


@aio_test
async def test_versions_of_queues_without_a_policy(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        # A queue made by an add has no policy of its own: version 0.
        await qb.add(queue, [b"x"])
        info = await qb.get_policy(queue)
        assert (info.version, info.policy) == (0, QueuePolicy())
        assert info.effective.lease_ms == 30000 and info.effective.max_depth == UNLIMITED
        # create_queue without a policy on it: the same (empty) policy.
        existing = await qb.create_queue(queue)
        assert not existing.created and existing.policy == info
        # create_queue without a policy on a new queue sets the empty one.
        fresh = await qb.create_queue(queue + "-new")
        assert fresh.created and fresh.policy.version == 1
        assert fresh.policy.policy == QueuePolicy()
        assert fresh.policy.effective == info.effective


@aio_test
async def test_create_queue_is_idempotent(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        policy = QueuePolicy(max_depth=5, max_bytes=1000)
        first = await qb.create_queue(queue, policy)
        await qb.add(queue, [b"kept"])
        same = await qb.create_queue(queue, policy)
        assert first.created and not same.created
        assert same.policy == first.policy  # version 1 still
        with pytest.raises(queueber.InvalidArgument) as e:
            await qb.create_queue(queue, QueuePolicy(max_depth=6, max_bytes=1000))
        assert not e.value.retryable
        with pytest.raises(queueber.InvalidArgument):
            await qb.create_queue(queue)  # no policy is another policy too
        # Refused: the queue, its policy and its messages are as they were.
        assert await qb.get_policy(queue) == first.policy
        assert (await qb.stats(queue)).visible == 1
        with pytest.raises(queueber.InvalidName):
            await qb.create_queue("bad name", policy)


@aio_test
async def test_queue_full_leaves_nothing_behind(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.create_queue(queue, QueuePolicy(max_depth=3, max_bytes=1000))
        ids = await qb.add(queue, [b"a" * 100, NewMessage(b"b" * 100, delay_ms=60000)])
        before = counts(await qb.stats(queue))
        assert before == (1, 1, 0)

        # Depth: 2 held (delayed ones count), 2 more would make 4 > 3.
        with pytest.raises(queueber.QueueFull) as e:
            await qb.add(queue, [b"c", b"d"])
        assert e.value.code == "queueFull" and e.value.code_number == 15
        assert e.value.retryable and not e.value.connection_level
        assert counts(await qb.stats(queue)) == before
        assert [m.id for m in await qb.peek(queue)] == ids[:1]

        # In-flight messages count as well.
        lease = await qb.poll(queue, lease_ms=60000)
        assert [m.id for m in lease] == ids[:1]
        await qb.add(queue, [b"e" * 100])  # 3 of 3
        with pytest.raises(queueber.QueueFull):
            await qb.add(queue, [b"f"])
        assert counts(await qb.stats(queue)) == (1, 1, 1)

        # Bytes: 300 held; 800 more would make 1100 > 1000 (depth raised).
        await qb.set_policy(queue, QueuePolicy(max_depth=10, max_bytes=1000))
        with pytest.raises(queueber.QueueFull):
            await qb.add(queue, [b"g" * 400, b"h" * 400])
        assert counts(await qb.stats(queue)) == (1, 1, 1)
        await qb.add(queue, [b"i" * 700])  # exactly 1000
        with pytest.raises(queueber.QueueFull):
            await qb.add(queue, [b"j"])

        # Removing frees room, in messages and in bytes.
        assert await qb.remove(queue, lease, lease.messages) == [True]
        await qb.add(queue, [b"k" * 100])
        assert (await qb.stats(queue)).visible == 3


@aio_test
async def test_policy_payload_limit(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        server_limit = qb.server_info.limits.max_payload_bytes
        await qb.create_queue(queue, QueuePolicy(max_payload_bytes=100))
        await qb.add(queue, [b"x" * 100])
        with pytest.raises(queueber.PayloadTooLarge):
            await qb.add(queue, [b"ok", b"x" * 101])
        assert counts(await qb.stats(queue)) == (1, 0, 0)
        # A queue's limit cannot be over the server's.
        with pytest.raises(queueber.InvalidArgument) as e:
            await qb.set_policy(queue, QueuePolicy(max_payload_bytes=server_limit + 1))
        assert "max-payload-bytes" in e.value.message
        with pytest.raises(queueber.InvalidArgument):
            await qb.create_queue(queue + "-big", QueuePolicy(max_payload_bytes=server_limit + 1))
        with pytest.raises(queueber.UnknownQueue):  # the refused create made no queue
            await qb.get_policy(queue + "-big")
        assert (await qb.get_policy(queue)).policy.max_payload_bytes == 100
        # At the server's limit is fine.
        info = await qb.set_policy(queue, QueuePolicy(max_payload_bytes=server_limit))
        assert info.effective.max_payload_bytes == server_limit
        await qb.add(queue, [b"x" * 101])


@aio_test
async def test_poll_without_a_lease_gets_the_policys(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.create_queue(queue, QueuePolicy(lease_ms=5000))
        await qb.add(queue, [b"1", b"2", b"3", b"4"])
        # None and 0 both leave the lease to the queue's policy.
        lease, before, after = await timed(lambda: qb.poll(queue, lease_ms=None))
        assert_lease_of(lease, before, after, 5000)
        lease, before, after = await timed(lambda: qb.poll(queue, lease_ms=0))
        assert_lease_of(lease, before, after, 5000)
        # A lease named in the call wins; so does the default of poll().
        lease, before, after = await timed(lambda: qb.poll(queue, lease_ms=60000))
        assert_lease_of(lease, before, after, 60000)
        lease, before, after = await timed(lambda: qb.poll(queue))
        assert_lease_of(lease, before, after, 30000)
        # A queue with no lease in its policy: the server's default.
        await qb.add(queue + "-plain", [b"x"])
        lease, before, after = await timed(lambda: qb.poll(queue + "-plain", lease_ms=None))
        assert_lease_of(lease, before, after, 30000)
        # An empty poll is still an empty lease.
        assert not await qb.poll(queue, lease_ms=None)


def test_server_defaults_apply_where_policies_leave_fields_unset(
        make_server: Callable[..., Server]) -> None:
    srv = make_server("--default-lease-ms", "4000", "--default-max-depth", "2",
                      "--default-max-bytes", "5000")

    @aio_test
    async def body() -> None:
        async with aio.connect(srv.addr) as qb:
            await qb.add("plain", [b"x"])
            info = await qb.get_policy("plain")
            assert (info.version, info.policy) == (0, QueuePolicy())
            assert info.effective == QueuePolicy(
                lease_ms=4000, max_depth=2, max_bytes=5000,
                max_payload_bytes=qb.server_info.limits.max_payload_bytes,
                max_deliveries=UNLIMITED, retention_ms=UNLIMITED)
            lease, before, after = await timed(lambda: qb.poll("plain", lease_ms=0))
            assert_lease_of(lease, before, after, 4000)
            # A refused add to a queue that does not exist creates none.
            with pytest.raises(queueber.QueueFull):
                await qb.add("fresh", [b"1", b"2", b"3"])
            with pytest.raises(queueber.UnknownQueue):
                await qb.stats("fresh")
            assert queueber.QueueRef("default", "fresh") not in await qb.queues()
            # A policy's own bound overrides the default, UNLIMITED included.
            created = await qb.create_queue("big", QueuePolicy(max_depth=UNLIMITED))
            assert created.policy.effective.max_depth == UNLIMITED
            assert created.policy.effective.max_bytes == 5000
            await qb.add("big", [b"m"] * 10)

    body()


@aio_test
async def test_unknown_queue(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        with pytest.raises(queueber.UnknownQueue) as e:
            await qb.get_policy(queue)
        assert queue in e.value.message
        with pytest.raises(queueber.UnknownQueue):
            await qb.set_policy(queue, QueuePolicy(max_depth=3))
        with pytest.raises(queueber.UnknownQueue):  # set_policy creates nothing
            await qb.stats(queue)


@aio_test
async def test_invalid_policies_are_refused_before_sending(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        with pytest.raises(TypeError):
            await qb.create_queue(queue, {"max_depth": 3})  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await qb.create_queue(queue, QueuePolicy(max_depth=0))
        with pytest.raises(queueber.UnknownQueue):
            await qb.get_policy(queue)
        # A lease over the server's longest is the server's to refuse.
        with pytest.raises(queueber.InvalidArgument):
            await qb.create_queue(queue, QueuePolicy(lease_ms=UNLIMITED))


def test_sync_policies(server: Server, queue: str) -> None:
    with queueber.connect(server.addr, tenant="sync") as qb:
        policy = QueuePolicy(lease_ms=3000, max_depth=2, max_payload_bytes=64)
        created = qb.create_queue(queue, policy)
        assert created.created and created.policy.version == 1
        assert created.policy.policy == policy
        assert not qb.create_queue(queue, policy).created
        with pytest.raises(queueber.InvalidArgument):
            qb.create_queue(queue, QueuePolicy(max_depth=3))
        assert qb.get_policy(queue) == created.policy

        qb.add(queue, [b"a", b"b"])
        with pytest.raises(queueber.QueueFull):
            qb.add(queue, [b"c"])
        assert counts(qb.stats(queue)) == (2, 0, 0)

        before = now_ms()
        lease = qb.poll(queue, lease_ms=None)
        assert_lease_of(lease, before, now_ms(), 3000)

        info = qb.set_policy(queue, QueuePolicy(max_depth=3, max_payload_bytes=64))
        assert info.version == 2 and info.effective.lease_ms == 30000
        qb.add(queue, [b"c"])  # room for a third now
        with pytest.raises(queueber.PayloadTooLarge):
            qb.add(queue, [b"x" * 65])
        with pytest.raises(queueber.UnknownQueue):
            qb.get_policy(queue + "-missing")
        with pytest.raises(queueber.UnknownQueue):
            qb.set_policy(queue + "-missing", QueuePolicy())


@aio_test
async def test_retry_backoff_round_trips_and_delays_failed_deliveries(
        server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        created = await qb.create_queue(queue, QueuePolicy(retry_backoff_ms=(300, 700)))
        assert created.policy.policy.retry_backoff_ms == (300, 700)
        assert (await qb.get_policy(queue)).effective.retry_backoff_ms == (300, 700)
        await qb.add(queue, [b"job"])
        lease = await qb.poll(queue, lease_ms=60000)
        # Released without a delay of its own: the first step, 300 ms.
        released = now_ms()
        assert await qb.release(queue, lease, lease.messages[0].id)
        assert counts(await qb.stats(queue)) == (0, 1, 0)
        again = await qb.poll(queue, lease_ms=60000, wait_ms=5000)
        assert again and again.messages[0].delivery_count == 2
        assert now_ms() - released >= 300 - CLOCK_SLACK_MS / 5
        # Back to no backoff: an empty list is unset.
        info = await qb.set_policy(queue, QueuePolicy(retry_backoff_ms=()))
        assert info.policy.retry_backoff_ms is None
        assert await qb.release(queue, again, again.messages[0].id)
        assert counts(await qb.stats(queue)) == (1, 0, 0)


def test_retry_backoff_is_checked_locally() -> None:
    with pytest.raises(ValueError):
        QueuePolicy(retry_backoff_ms=tuple(range(1, 10)))
    with pytest.raises(ValueError):
        QueuePolicy(retry_backoff_ms=(1, -5))
    assert QueuePolicy(retry_backoff_ms=[5, 6]).retry_backoff_ms == (5, 6)


# --- retention ------------------------------------------------------------------

#: Retention of the behaviour tests: short, so they wait well under a second.
RETENTION_MS = 300


async def wait_for_stats(qb: aio.Client, queue: str,
                         done: Callable[[queueber.QueueStats], bool],
                         timeout: float = 5.0) -> queueber.QueueStats:
    """``stats`` of ``queue`` as soon as ``done`` holds of it, polled with a
    deadline; fails the test after ``timeout`` seconds with the last ones."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await qb.stats(queue)
        if done(stats):
            return stats
        if time.monotonic() > deadline:
            pytest.fail(f"stats not reached in {timeout} s: {stats}")
        await asyncio.sleep(0.05)


@aio_test
async def test_retention_round_trips(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        policy = QueuePolicy(retention_ms=60000, max_deliveries=3)
        created = await qb.create_queue(queue, policy)
        assert created.created and created.policy.policy == policy
        assert created.policy.policy.retention_ms == 60000
        assert created.policy.effective.retention_ms == 60000
        assert await qb.get_policy(queue) == created.policy
        # The same policy again: not created, nothing changed.
        assert not (await qb.create_queue(queue, policy)).created
        # Another retention is another policy.
        with pytest.raises(queueber.InvalidArgument):
            await qb.create_queue(queue, QueuePolicy(retention_ms=60001, max_deliveries=3))

        forever = await qb.set_policy(queue, QueuePolicy(retention_ms=UNLIMITED))
        assert (forever.version, forever.policy.retention_ms) == (2, UNLIMITED)
        assert forever.effective.retention_ms == UNLIMITED
        assert await qb.get_policy(queue) == forever
        longest = await qb.set_policy(queue, QueuePolicy(retention_ms=MAX_RETENTION_MS))
        assert longest.policy.retention_ms == longest.effective.retention_ms == MAX_RETENTION_MS
        # Unset: None as stored; the default server keeps messages forever.
        unset = await qb.set_policy(queue, QueuePolicy())
        assert unset.version == 4 and unset.policy.retention_ms is None
        assert unset.effective.retention_ms == UNLIMITED
        assert (await qb.get_policy(queue)).policy == QueuePolicy()
        # A queue made by an add has no retention of its own either.
        await qb.add(queue + "-plain", [b"x"])
        plain = await qb.get_policy(queue + "-plain")
        assert plain.policy.retention_ms is None and plain.effective.retention_ms == UNLIMITED
        assert (await qb.stats(queue + "-plain")).dropped == 0


@aio_test
async def test_retention_drops_old_messages(server: Server, queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.create_queue(queue, QueuePolicy(retention_ms=RETENTION_MS))
        await qb.add(queue, [b"a", b"b", b"c"])
        added = time.monotonic()
        stats = await qb.stats(queue)
        assert (stats.visible, stats.dropped) == (3, 0)
        stats = await wait_for_stats(qb, queue, lambda s: s.dropped == 3)
        assert time.monotonic() - added >= RETENTION_MS / 1000 - CLOCK_SLACK_MS / 1000
        assert counts(stats) == (0, 0, 0) and stats.dead == 0
        assert stats.oldest_visible_age_ms is None
        assert not await qb.poll(queue, max_items=10)
        assert len(await qb.peek(queue)) == 0
        # The count outlives a policy change and a purge (which drops
        # nothing the retention has to count).
        await qb.set_policy(queue, QueuePolicy(retention_ms=60000))
        await qb.add(queue, [b"d"])
        assert await qb.purge(queue) == 1
        stats = await qb.stats(queue)
        assert (stats.visible, stats.dropped) == (0, 3)


@aio_test
async def test_retention_drops_a_leased_message_when_its_lease_ends(server: Server,
                                                                    queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        await qb.create_queue(queue, QueuePolicy(retention_ms=RETENTION_MS))
        await qb.add(queue, [b"slow job"])
        lease = await qb.poll(queue, lease_ms=2000)
        polled = time.monotonic()
        assert len(lease) == 1
        # Past retention, still leased: left to its worker.
        await asyncio.sleep(2 * RETENTION_MS / 1000)
        assert time.monotonic() - polled < 1.5, "too slow: the lease is about to expire"
        stats = await qb.stats(queue)
        assert (counts(stats), stats.dropped) == ((0, 0, 1), 0)
        # The lease still held it, so the release is granted, but the
        # message is dropped instead of coming back.
        assert await qb.release(queue, lease, lease.messages[0].id) is True
        stats = await qb.stats(queue)
        assert (stats.visible, stats.delayed, stats.in_flight, stats.dead, stats.dropped) == (
            0, 0, 0, 0, 1)
        assert not await qb.poll(queue)


@aio_test
async def test_retention_over_the_longest_duration_is_refused(server: Server,
                                                             queue: str) -> None:
    async with aio.connect(server.addr) as qb:
        with pytest.raises(queueber.InvalidArgument) as e:
            await qb.create_queue(queue, QueuePolicy(retention_ms=10 ** 13))
        assert "retentionMs" in e.value.message and not e.value.retryable
        with pytest.raises(queueber.UnknownQueue):  # the refused create made no queue
            await qb.get_policy(queue)
        with pytest.raises(queueber.InvalidArgument):
            await qb.create_queue(queue, QueuePolicy(retention_ms=MAX_RETENTION_MS + 1))
        await qb.create_queue(queue, QueuePolicy(retention_ms=1000))
        with pytest.raises(queueber.InvalidArgument):
            await qb.set_policy(queue, QueuePolicy(retention_ms=10 ** 13))
        info = await qb.get_policy(queue)  # unchanged
        assert (info.version, info.policy.retention_ms) == (1, 1000)


def test_sync_retention(server: Server, queue: str) -> None:
    with queueber.connect(server.addr, tenant="sync") as qb:
        created = qb.create_queue(queue, QueuePolicy(retention_ms=RETENTION_MS))
        assert created.policy.effective.retention_ms == RETENTION_MS
        qb.add(queue, [b"x", b"y"])
        deadline = time.monotonic() + 5.0
        while (stats := qb.stats(queue)).dropped < 2:
            assert time.monotonic() < deadline, f"not dropped in time: {stats}"
            time.sleep(0.05)
        assert counts(stats) == (0, 0, 0) and stats.dropped == 2
