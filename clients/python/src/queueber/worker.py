"""The worker helper: ``async for msg in qb.consume(queue)``.

A :class:`Consumer` long-polls a queue in the background, hands messages out
one at a time, keeps their leases alive while they wait or are being
processed, and acknowledges them in batches::

    async with queueber.aio.connect("127.0.0.1:7420") as qb:
        async for msg in qb.consume("emails", batch=32, lease_ms=30000):
            async with msg:       # removed on success, failed on an exception
                await send(msg.payload)

Delivery is at-least-once: a message is removed only after its processing
succeeded; if the worker dies, its leases expire and the messages are
delivered again (``delivery_count`` tells how often). A message whose
processing raises is reported with ``fail`` and the exception's text: it
comes back after the queue's retry backoff, or is dead-lettered once it has
had the queue policy's ``max_deliveries`` (``peek_dead`` shows the text).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Set, Tuple, Union

from .errors import ConnectionClosed, QueueberError, UnknownOperation, UnknownQueue
from .types import Lease, Message, clip_error

if TYPE_CHECKING:  # pragma: no cover
    from .aio import Client

__all__ = ["Consumer", "ConsumedMessage"]

log = logging.getLogger("queueber.worker")


def error_text(reason: Union[BaseException, str, None]) -> str:
    """What ``fail`` reports for a failure: an exception as
    ``"TypeName: message"`` (the name alone when the message is empty), a
    string as it is, ``None`` as ``""``; cut to 1 KiB as the server keeps
    it."""
    if reason is None:
        return ""
    if isinstance(reason, BaseException):
        name = type(reason).__name__
        try:
            text = str(reason)
        except Exception:  # a broken __str__ must not lose the failure
            text = ""
        return clip_error(f"{name}: {text}" if text else name)
    return clip_error(str(reason))


class _LeaseState:
    """What the consumer knows about one lease it holds."""

    __slots__ = ("id", "open", "acks", "lost", "extend_at")

    def __init__(self, lease_id: bytes, count: int, extend_at: float) -> None:
        self.id = lease_id
        self.open = count  # messages not settled yet (buffered or handed out)
        self.acks: List[bytes] = []  # settled successfully, removal not sent yet
        self.lost = False  # an extend said the lease had expired
        self.extend_at = extend_at  # loop time of the next heartbeat


class ConsumedMessage:
    """A message handed out by :class:`Consumer`, to be settled exactly once.

    Use it as an async context manager: leaving the block normally
    acknowledges it (removal, batched); an exception fails it (see
    :meth:`nack`: delivered again after the queue's retry backoff, or
    dead-lettered when out of deliveries, with the exception's text kept)
    and is logged and suppressed, so the worker loop goes on. Cancellation,
    ``KeyboardInterrupt`` and ``SystemExit`` are not failures of the
    message: it is released, visible again at once, and they propagate. Or
    settle it yourself with :meth:`ack` / :meth:`nack`; settling twice does
    nothing.
    """

    __slots__ = ("id", "payload", "delivery_count", "enqueued_at_ms", "_lease", "_consumer",
                 "_settled")

    def __init__(self, message: Message, lease: _LeaseState, consumer: "Consumer") -> None:
        #: 16-byte message id.
        self.id: bytes = message.id
        self.payload: bytes = message.payload
        #: 1 on the first delivery.
        self.delivery_count: int = message.delivery_count
        #: When it was added (server epoch ms).
        self.enqueued_at_ms: int = message.enqueued_at_ms
        self._lease = lease
        self._consumer = consumer
        self._settled = False

    @property
    def lease_id(self) -> bytes:
        """The lease the message is held under."""
        return self._lease.id

    @property
    def lease_lost(self) -> bool:
        """Whether a heartbeat found the lease expired: the message may already
        be redelivered to another worker, and acknowledging it will fail."""
        return self._lease.lost

    @property
    def settled(self) -> bool:
        """Whether :meth:`ack` or :meth:`nack` was called (or the block ended)."""
        return self._settled

    def ack(self) -> None:
        """Processing succeeded: remove the message (in the next batch of
        removals, sent within ``ack_delay_ms``)."""
        if not self._settled:
            self._settled = True
            self._consumer._settle(self, True, None, None)

    def nack(self, reason: Union[BaseException, str, None] = None,
             delay_ms: Optional[int] = None, *, dead: bool = False) -> None:
        """Processing failed: report it with ``fail``. ``reason`` is kept
        with the message as its last error (an exception as
        ``"TypeName: message"``; up to 1 KiB). The message comes back after
        the queue policy's ``retry_backoff_ms``, or is dead-lettered once it
        has had the policy's ``max_deliveries``; with ``dead=True`` it is
        dead-lettered at once (a message that can never succeed).

        With a delay (``delay_ms``, default the consumer's
        ``retry_delay_ms``, 0 unless set) it is released instead, visible
        again after that delay: ``fail`` has no delay of its own, so then the
        text is not kept (the delivery still counts toward
        ``max_deliveries``). Prefer the queue's retry backoff.
        """
        if not self._settled:
            self._settled = True
            self._consumer._settle(self, False, reason, delay_ms, dead)

    def _give_back(self) -> None:
        """Not a failure of the message (cancellation, interpreter exit, a
        message never seen by the caller): release it, visible at once, and
        record no error."""
        if not self._settled:
            self._settled = True
            self._consumer._settle(self, False, None, 0, give_back=True)

    async def __aenter__(self) -> "ConsumedMessage":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None and not self._settled:  # the hot path, inlined
            self._settled = True
            self._consumer._settle(self, True, None, None)
            return False
        return self._exit(exc_type, exc)

    def _exit(self, exc_type: Any, exc: Any) -> bool:
        if exc_type is None:
            self.ack()
            return False
        if issubclass(exc_type, Exception):
            self.nack(exc)
            log.error("queueber: processing message %s (delivery %d) failed",
                      self.id.hex(), self.delivery_count,
                      exc_info=(exc_type, exc, exc.__traceback__))
            return True  # the worker loop goes on with the next message
        self._give_back()
        return False  # cancellation and interpreter exit propagate

    def __repr__(self) -> str:
        return (f"ConsumedMessage(id={self.id.hex()}, delivery_count={self.delivery_count}, "
                f"payload={self.payload[:32]!r}{'...' if len(self.payload) > 32 else ''})")


class Consumer:
    """Consumes one queue for a worker loop (made by ``Client.consume``).

    Args:
        batch: most messages per poll. A poll is sent only when there is
            room for a whole batch, so polls stay full under load.
        lease_ms: lease of every poll, and of every heartbeat extension.
        wait_ms: long-poll wait when the queue is empty (capped by the
            server's ``max_wait_ms``).
        max_held: most messages held at once, leased but not yet settled
            (waiting in the buffer or being processed). Default ``2 * batch``:
            one batch processed while the next is fetched. Up to
            ``max_held // batch`` polls are in flight at once, so with small
            batches a larger ``max_held`` fetches in parallel.
        heartbeat_fraction: a lease is extended every
            ``lease_ms * heartbeat_fraction`` while it holds unsettled
            messages.
        ack_delay_ms: successful messages are removed in batches, one remove
            per lease; a batch goes out when every message of its lease is
            settled, or this long after its first acknowledgement. A batch
            that goes out just as a poll loop gets room for its next batch
            rides on that poll (one ``removeAndPoll`` request instead of a
            ``remove`` and a ``poll``).
        retry_delay_ms: 0 (the default): a message whose processing failed
            is reported with ``fail`` (its error text kept; the queue's
            retry backoff and ``max_deliveries`` apply). Over 0: it is
            released instead, invisible for this long (no error text kept).

    Stopping (:meth:`aclose`, or the end of the ``async with`` block of the
    consumer or of its client, which is also where cancelling the iterating
    task leads) releases the messages fetched but not handed out, sends the
    pending acknowledgements and waits for them. Messages handed out and not settled
    by then keep their lease until it expires (settling them still works
    while the client is open).
    """

    def __init__(self, client: "Client", queue: str, *, batch: int = 32,
                 lease_ms: int = 30000, wait_ms: int = 5000, max_held: Optional[int] = None,
                 heartbeat_fraction: float = 1 / 3, ack_delay_ms: float = 5.0,
                 retry_delay_ms: int = 0) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if lease_ms < 1:
            raise ValueError("lease_ms must be at least 1")
        if not 0 < heartbeat_fraction < 1:
            raise ValueError("heartbeat_fraction must be between 0 and 1")
        self.queue = queue
        self._client = client
        self._batch = batch
        self._lease_ms = lease_ms
        self._wait_ms = wait_ms
        self._max_held = max(max_held if max_held is not None else 2 * batch, 1)
        self._heartbeat_s = lease_ms * heartbeat_fraction / 1000
        self._ack_delay_s = ack_delay_ms / 1000
        self._retry_delay_ms = retry_delay_ms
        self._want = min(batch, self._max_held)  # messages asked for per poll
        self._max_ids = 4096  # ids per remove: the server's limit, set at start
        self._can_fail = True  # False once the server answered fail unknownOperation
        # False once the server answered removeAndPoll unknownOperation.
        self._can_combine = True

        self._buffer: Deque[ConsumedMessage] = collections.deque()
        self._held = 0
        self._leases: Dict[bytes, _LeaseState] = {}
        self._unflushed: Dict[bytes, _LeaseState] = {}  # leases with acks to send
        self._flush_timer: Optional[asyncio.TimerHandle] = None
        # Removes, fails and releases in flight, and polls carrying removes.
        self._ops: Set["asyncio.Future[Any]"] = set()
        # Batches of acknowledgements for the next poll to carry, and the
        # callback that sends the ones no poll took as removes.
        self._riders: Deque[Tuple[_LeaseState, List[bytes]]] = collections.deque()
        self._riders_handle: Optional[asyncio.Handle] = None
        self._reserved = 0  # room taken by polls in flight
        self._idle_pollers = 0  # poll loops waiting for room
        self._pollers: List["asyncio.Task[None]"] = []
        self._heartbeat: Optional["asyncio.Task[None]"] = None
        self._item_waiter: Optional["asyncio.Future[None]"] = None
        self._room_waiter: Optional["asyncio.Future[None]"] = None
        self._lease_waiter: Optional["asyncio.Future[None]"] = None
        self._error: Optional[BaseException] = None
        self._stopping = False
        self._stopped: Optional["asyncio.Future[None]"] = None

    # -- iteration -------------------------------------------------------------

    def __aiter__(self) -> "Consumer":
        return self

    async def __anext__(self) -> ConsumedMessage:
        if not self._pollers and not self._stopping:
            self._start()
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._error is not None:
                raise self._error
            if self._stopping:
                raise StopAsyncIteration
            self._item_waiter = asyncio.get_running_loop().create_future()
            await self._item_waiter

    async def __aenter__(self) -> "Consumer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    @property
    def held(self) -> int:
        """Messages leased and not yet settled (buffered or being processed)."""
        return self._held

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._max_ids = self._client.server_info.limits.max_messages_per_add
        except QueueberError:
            pass  # not connected yet: the first poll connects
        # As many polls in flight as there is room for whole batches.
        n = max(1, self._max_held // self._want)
        self._pollers = [loop.create_task(self._poll_loop()) for _ in range(n)]
        self._heartbeat = loop.create_task(self._heartbeat_loop())

    @staticmethod
    def _wake(waiter: Optional["asyncio.Future[None]"]) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- fetching --------------------------------------------------------------

    async def _poll_loop(self) -> None:
        """One of the consumer's poll loops. Each reserves room for a whole
        batch before it polls, so together they never hold more than
        ``max_held`` messages."""
        loop = asyncio.get_running_loop()
        want = self._want
        backoff = 0.05
        try:
            while not self._stopping:
                if self._max_held - self._held - self._reserved < want:
                    if self._room_waiter is None or self._room_waiter.done():
                        self._room_waiter = loop.create_future()
                    self._idle_pollers += 1
                    try:
                        await self._room_waiter
                    finally:
                        self._idle_pollers -= 1
                    continue
                self._reserved += want
                # Acknowledgements settled just as this loop got its room
                # (see _flush) go out with the poll.
                rider = self._riders.popleft() if self._riders else None
                try:
                    if rider is None:
                        lease = await self._client.poll(self.queue, want, self._lease_ms,
                                                        self._wait_ms)
                    else:
                        carried = await self._remove_and_poll(rider[0], rider[1], want)
                        if carried is None:
                            continue  # refused: polled apart on the next turn
                        lease = carried
                    backoff = 0.05
                except UnknownQueue:
                    # Only add creates queues, and a long poll does not wait
                    # for one: a worker started before its producers waits.
                    await asyncio.sleep(min(max(self._wait_ms, 100), 1000) / 1000)
                    continue
                except QueueberError as e:
                    if not e.retryable:
                        raise
                    log.warning("queueber: polling %s failed, retrying in %.2f s: %s",
                                self.queue, backoff, e)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                finally:
                    self._reserved -= want
                if lease.messages:
                    self._take(lease.id, lease.messages, loop.time())
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a non-retryable error ends the iteration
            self._error = e
            self._wake(self._item_waiter)

    async def _remove_and_poll(self, st: _LeaseState, ids: List[bytes],
                               want: int) -> Optional[Lease]:
        """Acknowledge ``ids`` and poll in one request (``removeAndPoll``).

        The poll does not wait: when nothing is visible, the next turn
        long-polls as usual, so the removes are confirmed at once (and
        :meth:`flush` waits for this request like for a remove). ``None``
        when the server refused the request, so that nothing was removed or
        leased: the acknowledgements then go out as a remove, and the poll
        is made apart on the next turn (where an error of its own comes
        back, handled as ever)."""
        done: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
        self._ops.add(done)
        try:
            got = await self._client.remove_and_poll(self.queue, st.id, ids, want,
                                                     self._lease_ms, 0)
        except asyncio.CancelledError:
            # Stopping: whether the request went out is unknown. Removing
            # again does no harm (the second remove answers False).
            self._spawn(self._remove(st, ids, again=True))
            raise
        except QueueberError as e:
            if isinstance(e, ConnectionClosed) or e.connection_level:
                # Unknown outcome: remove again (on the next connection);
                # the error is the poll's to handle.
                self._spawn(self._remove(st, ids, again=True))
                raise
            if isinstance(e, UnknownOperation) and self._can_combine:
                self._can_combine = False
                log.info("queueber: the server does not know removeAndPoll; acknowledgements "
                         "on %s are sent apart from polls", self.queue)
            self._spawn(self._remove(st, ids))
            return None
        finally:
            self._ops.discard(done)
            done.set_result(None)
        self._report_late(got.removed)
        return got.lease

    def _take(self, lease_id: bytes, messages: List[Message], now: float) -> None:
        st = _LeaseState(lease_id, len(messages), now + self._heartbeat_s)
        self._leases[lease_id] = st
        self._held += len(messages)
        self._buffer.extend(ConsumedMessage(m, st, self) for m in messages)
        self._wake(self._item_waiter)
        self._wake(self._lease_waiter)

    # -- heartbeats ------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._leases:
                self._lease_waiter = loop.create_future()
                await self._lease_waiter
                continue
            now = loop.time()
            due = [st for st in self._leases.values() if st.extend_at <= now]
            if due:
                for st in due:
                    st.extend_at = now + self._heartbeat_s
                await asyncio.gather(*(self._extend(st) for st in due))
                continue
            next_at = min(st.extend_at for st in self._leases.values())
            await asyncio.sleep(next_at - now)

    async def _extend(self, st: _LeaseState) -> None:
        try:
            expires = await self._client.extend(self.queue, st.id, self._lease_ms)
        except QueueberError as e:
            # The lease lives on the server whatever happens to the
            # connection: try again soon, well before it expires.
            log.warning("queueber: extending a lease on %s failed: %s", self.queue, e)
            st.extend_at = asyncio.get_running_loop().time() + self._heartbeat_s / 4
            return
        if expires is None and st.open > 0:
            self._lease_lost(st)

    def _lease_lost(self, st: _LeaseState) -> None:
        """The lease expired (the worker was stalled longer than a lease):
        its messages may be with another worker already. Drop the ones not
        handed out yet; the server redelivers them."""
        st.lost = True
        self._leases.pop(st.id, None)
        kept = collections.deque(m for m in self._buffer if m._lease is not st)
        dropped = len(self._buffer) - len(kept)
        self._buffer = kept
        st.open -= dropped
        self._held -= dropped
        log.warning("queueber: a lease on %s expired before its messages were settled; "
                    "%d unprocessed messages dropped (they are redelivered)", self.queue, dropped)
        self._room_changed()

    # -- settling ----------------------------------------------------------------

    def _room_changed(self) -> None:
        waiter = self._room_waiter
        if waiter is not None and not waiter.done() and \
                self._max_held - self._held - self._reserved >= self._want:
            waiter.set_result(None)

    def _settle(self, msg: ConsumedMessage, ok: bool,
                reason: Union[BaseException, str, None], delay_ms: Optional[int],
                dead: bool = False, give_back: bool = False) -> None:
        st = msg._lease
        st.open -= 1
        self._held -= 1
        self._room_changed()
        if ok:
            acks = st.acks
            acks.append(msg.id)
            if st.open == 0 or len(acks) >= self._max_ids:
                self._flush(st, ride=True)
            else:
                self._unflushed[st.id] = st
                if self._flush_timer is None:
                    self._flush_timer = asyncio.get_running_loop().call_later(
                        self._ack_delay_s, self._flush_all)
        else:
            delay = self._retry_delay_ms if delay_ms is None else delay_ms
            if give_back or (delay and not dead):
                self._spawn(self._release(st, msg.id, delay))
            else:
                self._spawn(self._fail(st, msg.id, error_text(reason), dead))
            if st.open == 0:
                self._flush(st, ride=True)
        if st.open == 0:
            self._leases.pop(st.id, None)

    def _flush(self, st: _LeaseState, ride: bool = False) -> None:
        """Send ``st``'s acknowledgements; with ``ride``, on the next poll
        if one is about to go out."""
        self._unflushed.pop(st.id, None)
        if st.acks:
            ids, st.acks = st.acks, []
            if ride and self._poll_due():
                # The poll loop just woken runs before this callback: it
                # takes the batch, else the callback sends it as a remove.
                self._riders.append((st, ids))
                if self._riders_handle is None:
                    self._riders_handle = asyncio.get_running_loop().call_soon(
                        self._send_riders)
            else:
                self._spawn(self._remove(st, ids))

    def _poll_due(self) -> bool:
        """Whether a poll loop is about to poll: one waits for room and
        there is room for its batch (so _room_changed has woken it)."""
        return (self._can_combine and not self._stopping and self._idle_pollers > 0
                and self._max_held - self._held - self._reserved >= self._want)

    def _send_riders(self) -> None:
        """Send the acknowledgements no poll took as removes."""
        if self._riders_handle is not None:
            self._riders_handle.cancel()  # nothing if this is it running
            self._riders_handle = None
        while self._riders:
            st, ids = self._riders.popleft()
            self._spawn(self._remove(st, ids))

    def _flush_all(self) -> None:
        self._flush_timer = None
        for st in list(self._unflushed.values()):
            self._flush(st)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)

    async def _remove(self, st: _LeaseState, ids: List[bytes], again: bool = False) -> None:
        """Remove ``ids``; ``again``: they may have been removed already (by
        a removeAndPoll whose answer was lost), so ``False`` is no news."""
        try:
            flags = await self._client.remove(self.queue, st.id, ids)
        except QueueberError as e:
            log.warning("queueber: acknowledging %d messages on %s failed (they are "
                        "redelivered after their lease): %s", len(ids), self.queue, e)
            return
        if not again:
            self._report_late(flags)

    def _report_late(self, flags: List[bool]) -> None:
        late = flags.count(False)
        if late:
            log.warning("queueber: %d acknowledgements on %s came after the lease expired; "
                        "those messages may be delivered again", late, self.queue)

    async def _fail(self, st: _LeaseState, mid: bytes, error: str, dead: bool) -> None:
        if not self._can_fail:
            await self._release(st, mid, 0)
            return
        try:
            failed = await self._client.fail(self.queue, st.id, mid, error, dead)
        except UnknownOperation:
            # A server older than dead letters: release, as before them.
            if self._can_fail:
                self._can_fail = False
                log.warning("queueber: the server does not know fail (older than dead "
                            "letters); failed messages on %s are released instead, without "
                            "their error text", self.queue)
            await self._release(st, mid, 0)
            return
        except QueueberError as e:
            log.warning("queueber: failing a message on %s failed (it is redelivered after "
                        "its lease): %s", self.queue, e)
            return
        if not failed:
            log.warning("queueber: failing message %s on %s came after its lease expired; "
                        "it may be delivered again", mid.hex(), self.queue)

    async def _release(self, st: _LeaseState, mid: bytes, delay_ms: int) -> None:
        try:
            await self._client.release(self.queue, st.id, mid, delay_ms)
        except QueueberError as e:
            log.warning("queueber: releasing a message on %s failed (it is redelivered "
                        "after its lease): %s", self.queue, e)

    # -- stopping ----------------------------------------------------------------

    async def flush(self) -> None:
        """Send the pending acknowledgements now and wait for every removal,
        failure and release in flight."""
        self._flush_all()
        self._send_riders()
        while self._ops:
            await asyncio.gather(*list(self._ops), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop: no more polls, buffered messages released, acknowledgements
        flushed and confirmed. Idempotent."""
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
            return
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self._stopping = True
        try:
            self._wake(self._item_waiter)
            # Polls in flight are cancelled; if an answer brings messages
            # anyway, the client releases them.
            for poller in self._pollers:
                poller.cancel()
            await asyncio.gather(*self._pollers, return_exceptions=True)
            while self._buffer:
                msg = self._buffer.popleft()
                msg._settled = True
                st = msg._lease
                st.open -= 1
                self._held -= 1
                # Not a failure: a plain release, not a fail.
                self._spawn(self._release(st, msg.id, 0))
                if st.open == 0:
                    self._flush(st)
                    self._leases.pop(st.id, None)
            await self.flush()
        finally:
            if self._heartbeat is not None:
                self._heartbeat.cancel()
                await asyncio.gather(self._heartbeat, return_exceptions=True)
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            self._client._consumer_stopped(self)
            self._stopped.set_result(None)
