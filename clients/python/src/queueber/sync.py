"""The blocking client, for scripts and threads.

It has the asyncio client's API without ``await``::

    with queueber.connect("127.0.0.1:7420") as qb:
        qb.add("emails", [b"hello"])
        for msg in qb.consume("emails"):
            with msg:
                send(msg.payload)

It runs an :class:`queueber.aio.Client` on an event loop in a daemon thread
of its own. Every method hands its request to that loop and blocks until the
reply, so any number of threads can share one client and their requests are
pipelined on its one connection. Heartbeats and batched acknowledgements of
:meth:`Client.consume` run on that loop while the caller's thread works.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
import threading
from typing import (Any, Callable, Coroutine, Iterable, Iterator, List, Optional, Sequence,
                    TypeVar, Union)

from . import _tls, aio
from .errors import ConnectionClosed
from .types import (DeadPeeked, Lease, NewMessage, Payload, Peeked, PolicyInfo, QueueCreated,
                    QueuePolicy, QueueRef, QueueStats, Redriven, RemovedAndPolled, ServerInfo)
from .worker import ConsumedMessage, Consumer

__all__ = ["Client", "connect", "SyncConsumer", "SyncMessage"]

T = TypeVar("T")


class Client:
    """A blocking queueber client; connects in the constructor.

    Args:
        address: ``"host:port"`` or ``(host, port)``.
        tenant: the tenant of every queue this client names.
        connect_timeout: seconds for TCP connect plus ``hello``.
        max_in_flight: most requests outstanding at once (default: the
            server's limit).
        token: the access token (default ``$QUEUEBER_TOKEN``).
        tls, tls_ca, tls_client_cert, tls_client_key, tls_server_name: TLS,
            as for :class:`queueber.aio.Client` (defaults from the
            ``QUEUEBER_TLS*`` environment variables).

    Methods and results are those of :class:`queueber.aio.Client`.
    """

    def __init__(self, address: aio.Address = aio.DEFAULT_ADDRESS, *, tenant: str = "default",
                 connect_timeout: float = 10.0, max_in_flight: Optional[int] = None,
                 token: Optional[str] = None, tls: _tls.TLSArg = None,
                 tls_ca: _tls.PathArg = None, tls_client_cert: _tls.PathArg = None,
                 tls_client_key: _tls.PathArg = None,
                 tls_server_name: Optional[str] = None) -> None:
        # Made first: bad settings raise before there is a thread to stop.
        self._aio = aio.Client(address, tenant=tenant, connect_timeout=connect_timeout,
                               max_in_flight=max_in_flight, token=token, tls=tls,
                               tls_ca=tls_ca, tls_client_cert=tls_client_cert,
                               tls_client_key=tls_client_key, tls_server_name=tls_server_name)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="queueber-client", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._run(self._aio.connect())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def tenant(self) -> str:
        """The tenant of every queue this client names."""
        return self._aio.tenant

    @property
    def tls_context(self) -> Optional[ssl.SSLContext]:
        """The TLS context connections use; ``None``: plaintext."""
        return self._aio.tls_context

    @property
    def connected(self) -> bool:
        """Whether the client has a usable connection right now (the next
        request reconnects if not)."""
        return self._aio.connected

    @property
    def server_info(self) -> ServerInfo:
        """What the server said in ``hello`` on the latest (re)connect."""
        return self._aio.server_info

    def _run(self, coro: Coroutine[Any, Any, T],
             on_orphan: Optional[Callable[[T], object]] = None) -> T:
        """Run ``coro`` on the client's loop and wait for its result.

        If the wait is interrupted (``KeyboardInterrupt``), the coroutine is
        cancelled; if it had already finished, ``on_orphan`` gets the result
        nobody will see (for messages that must go back to the queue).
        """
        if self._closed:
            close = getattr(coro, "close", None)
            if close is not None:
                close()  # never awaited: avoid the "was never awaited" warning
            raise ConnectionClosed("the client is closed", connection_level=False)
        fut: "concurrent.futures.Future[T]" = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            # Cancelling a poll in flight makes the aio client release its
            # messages when the answer comes.
            if not fut.cancel() and on_orphan is not None and not fut.cancelled() \
                    and fut.exception() is None:
                on_orphan(fut.result())
            raise

    def _in_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the client's loop thread and return its
        result (the consumer's state belongs to that thread)."""
        done: "concurrent.futures.Future[T]" = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as e:
                done.set_exception(e)

        self._loop.call_soon_threadsafe(call)
        return done.result()

    def hello(self) -> ServerInfo:
        """See :meth:`queueber.aio.Client.hello`."""
        return self._run(self._aio.hello())

    def add(self, queue: str, messages: Sequence[Union[Payload, NewMessage]],
            delay_ms: int = 0) -> List[bytes]:
        """See :meth:`queueber.aio.Client.add`."""
        return self._run(self._aio.add(queue, messages, delay_ms))

    def poll(self, queue: str, max_items: int = 1, lease_ms: Optional[int] = 30000,
             wait_ms: int = 0) -> Lease:
        """See :meth:`queueber.aio.Client.poll`."""
        return self._run(self._aio.poll(queue, max_items, lease_ms, wait_ms),
                         on_orphan=lambda lease: self._loop.call_soon_threadsafe(
                             self._aio._release_abandoned, (self.tenant, queue), lease.id,
                             lease.messages))

    def remove(self, queue: str, lease: aio.LeaseLike, ids: Iterable[aio.IdLike]) -> List[bool]:
        """See :meth:`queueber.aio.Client.remove`."""
        return self._run(self._aio.remove(queue, lease, list(ids)))

    def remove_and_poll(self, queue: str, lease: Optional[aio.LeaseLike],
                        ids: Iterable[aio.IdLike], max_items: int = 1,
                        lease_ms: Optional[int] = 30000, wait_ms: int = 0) -> RemovedAndPolled:
        """See :meth:`queueber.aio.Client.remove_and_poll`."""
        return self._run(self._aio.remove_and_poll(queue, lease, list(ids), max_items, lease_ms,
                                                   wait_ms),
                         on_orphan=lambda got: self._loop.call_soon_threadsafe(
                             self._aio._release_abandoned, (self.tenant, queue), got.lease.id,
                             got.lease.messages))

    def extend(self, queue: str, lease: aio.LeaseLike, lease_ms: int) -> Optional[int]:
        """See :meth:`queueber.aio.Client.extend`."""
        return self._run(self._aio.extend(queue, lease, lease_ms))

    def release(self, queue: str, lease: aio.LeaseLike, id: aio.IdLike, delay_ms: int = 0) -> bool:
        """See :meth:`queueber.aio.Client.release`."""
        return self._run(self._aio.release(queue, lease, id, delay_ms))

    def fail(self, queue: str, lease: aio.LeaseLike, id: aio.IdLike, error: str = "",
             dead: bool = False) -> bool:
        """See :meth:`queueber.aio.Client.fail`."""
        return self._run(self._aio.fail(queue, lease, id, error, dead))

    def stats(self, queue: str) -> QueueStats:
        """See :meth:`queueber.aio.Client.stats`."""
        return self._run(self._aio.stats(queue))

    def peek(self, queue: str, max_items: int = 10, cursor: Optional[bytes] = None) -> Peeked:
        """See :meth:`queueber.aio.Client.peek`."""
        return self._run(self._aio.peek(queue, max_items, cursor))

    def peek_dead(self, queue: str, max_items: int = 10,
                  cursor: Optional[bytes] = None) -> DeadPeeked:
        """See :meth:`queueber.aio.Client.peek_dead`."""
        return self._run(self._aio.peek_dead(queue, max_items, cursor))

    def redrive(self, queue: str, ids: Optional[Iterable[aio.IdLike]] = None,
                max: int = 0) -> Redriven:
        """See :meth:`queueber.aio.Client.redrive`."""
        return self._run(self._aio.redrive(queue, None if ids is None else list(ids), max))

    def redrive_all(self, queue: str, ids: Optional[Iterable[aio.IdLike]] = None,
                    max: int = 0) -> int:
        """See :meth:`queueber.aio.Client.redrive_all`."""
        return self._run(self._aio.redrive_all(queue, None if ids is None else list(ids), max))

    def queues(self) -> List[QueueRef]:
        """See :meth:`queueber.aio.Client.queues`."""
        return self._run(self._aio.queues())

    def purge(self, queue: str) -> int:
        """See :meth:`queueber.aio.Client.purge`."""
        return self._run(self._aio.purge(queue))

    def delete(self, queue: str) -> None:
        """See :meth:`queueber.aio.Client.delete`."""
        self._run(self._aio.delete(queue))

    def create_queue(self, queue: str, policy: Optional[QueuePolicy] = None) -> QueueCreated:
        """See :meth:`queueber.aio.Client.create_queue`."""
        return self._run(self._aio.create_queue(queue, policy))

    def get_policy(self, queue: str) -> PolicyInfo:
        """See :meth:`queueber.aio.Client.get_policy`."""
        return self._run(self._aio.get_policy(queue))

    def set_policy(self, queue: str, policy: QueuePolicy) -> PolicyInfo:
        """See :meth:`queueber.aio.Client.set_policy`."""
        return self._run(self._aio.set_policy(queue, policy))

    def consume(self, queue: str, *, batch: int = 32, lease_ms: int = 30000,
                wait_ms: int = 5000, max_held: Optional[int] = None,
                heartbeat_fraction: float = 1 / 3, ack_delay_ms: float = 5.0,
                retry_delay_ms: int = 0) -> "SyncConsumer":
        """Iterate over the messages of ``queue`` (see
        :class:`queueber.worker.Consumer`)::

            for msg in qb.consume("emails"):
                with msg:                  # removed on success, failed on an error
                    send(msg.payload)
        """
        consumer = self._in_loop(lambda: self._aio.consume(
            queue, batch=batch, lease_ms=lease_ms, wait_ms=wait_ms, max_held=max_held,
            heartbeat_fraction=heartbeat_fraction, ack_delay_ms=ack_delay_ms,
            retry_delay_ms=retry_delay_ms))
        return SyncConsumer(self, consumer)

    def close(self) -> None:
        """Stop the consumers, finish what is in flight, close the
        connection and stop the client's thread. Idempotent."""
        if self._closed:
            return
        try:
            self._run(self._aio.close())
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(address: aio.Address = aio.DEFAULT_ADDRESS, *, tenant: str = "default",
            connect_timeout: float = 10.0, max_in_flight: Optional[int] = None,
            token: Optional[str] = None, tls: _tls.TLSArg = None,
            tls_ca: _tls.PathArg = None, tls_client_cert: _tls.PathArg = None,
            tls_client_key: _tls.PathArg = None,
            tls_server_name: Optional[str] = None) -> Client:
    """Connect a blocking :class:`Client` (also a context manager)."""
    return Client(address, tenant=tenant, connect_timeout=connect_timeout,
                  max_in_flight=max_in_flight, token=token, tls=tls, tls_ca=tls_ca,
                  tls_client_cert=tls_client_cert, tls_client_key=tls_client_key,
                  tls_server_name=tls_server_name)


class SyncMessage:
    """A message handed out by :class:`SyncConsumer`; a context manager with
    the semantics of :class:`queueber.worker.ConsumedMessage`."""

    __slots__ = ("_msg", "_client")

    def __init__(self, msg: ConsumedMessage, client: Client) -> None:
        self._msg = msg
        self._client = client

    @property
    def id(self) -> bytes:
        """16-byte message id."""
        return self._msg.id

    @property
    def payload(self) -> bytes:
        """The message's payload."""
        return self._msg.payload

    @property
    def delivery_count(self) -> int:
        """1 on the first delivery."""
        return self._msg.delivery_count

    @property
    def enqueued_at_ms(self) -> int:
        """When it was added (server epoch ms)."""
        return self._msg.enqueued_at_ms

    @property
    def lease_id(self) -> bytes:
        """The lease the message is held under."""
        return self._msg.lease_id

    @property
    def lease_lost(self) -> bool:
        """Whether a heartbeat found the lease expired."""
        return self._msg.lease_lost

    @property
    def settled(self) -> bool:
        """Whether it was acknowledged, failed or released."""
        return self._msg.settled

    def ack(self) -> None:
        """See :meth:`queueber.worker.ConsumedMessage.ack`."""
        self._client._in_loop(self._msg.ack)

    def nack(self, reason: Union[BaseException, str, None] = None,
             delay_ms: Optional[int] = None, *, dead: bool = False) -> None:
        """See :meth:`queueber.worker.ConsumedMessage.nack`."""
        self._client._in_loop(lambda: self._msg.nack(reason, delay_ms, dead=dead))

    def __enter__(self) -> "SyncMessage":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return self._client._in_loop(self._msg._exit, exc_type, exc)

    def __repr__(self) -> str:
        return f"Sync{self._msg!r}"


class SyncConsumer:
    """Blocking iterator over a queue's messages (see
    :class:`queueber.worker.Consumer`); a context manager that stops it."""

    def __init__(self, client: Client, consumer: Consumer) -> None:
        self._client = client
        self._consumer = consumer

    def __iter__(self) -> Iterator[SyncMessage]:
        return self

    def __next__(self) -> SyncMessage:
        try:
            msg = self._client._run(
                self._consumer.__anext__(),
                # Handed out but never seen by the caller: give it back (a
                # release, not a failure).
                on_orphan=lambda m: self._client._loop.call_soon_threadsafe(m._give_back))
        except StopAsyncIteration:
            raise StopIteration from None
        return SyncMessage(msg, self._client)

    def close(self) -> None:
        """Stop the consumer: buffered messages released, acknowledgements
        flushed."""
        self._client._run(self._consumer.aclose())

    def __enter__(self) -> "SyncConsumer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
