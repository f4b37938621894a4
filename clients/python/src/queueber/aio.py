"""The asyncio client: one connection, many requests in flight.

>>> async with queueber.aio.connect("127.0.0.1:7420") as qb:   # doctest: +SKIP
...     ids = await qb.add("emails", [b"hello"])
...     lease = await qb.poll("emails", max_items=10, wait_ms=1000)
...     await qb.remove("emails", lease, lease.messages)

Requests are pipelined: every call writes its frame at once (frames written
in the same event-loop tick go out in one ``write``) and waits for the reply
with its id, so any number of tasks can share one client. Replies may come
back in any order. The client keeps at most the server's
``max_in_flight_per_connection`` requests outstanding; callers beyond that
wait for a slot.

Reconnection: when the connection is lost, the requests in flight on it fail
with :class:`~queueber.errors.ConnectionClosed` (their outcome is unknown),
except the ones that are safe to send twice (``hello``, ``stats``,
``queues``, ``peek``, ``peek_dead``, ``extend``, ``get_policy``), which are
sent again once on a new connection. The next request after a loss
reconnects first. An ``add`` is never sent again by the client, nor are
``create_queue`` (its ``created`` would be wrong the second time),
``set_policy`` (it would move the version on twice), ``fail`` (the second
would answer ``False``), ``redrive`` (it could move more than ``max``) and
``remove_and_poll`` (its flags would be ``False`` the second time).

TLS: ``tls=True`` (or a CA, or a client certificate, or the ``QUEUEBER_TLS*``
environment variables the CLI reads) connects with TLS 1.2 or newer,
verifying the server's certificate for the host connected to; see
:class:`Client`.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import os
import ssl
from typing import (Any, Callable, Deque, Dict, Generator, Iterable, List, Optional, Sequence,
                    Set, Tuple, Union)

import capnp  # type: ignore[import-untyped]

from . import _tls, _wire
from .errors import ConnectionClosed, ConnectTimeout, Internal, QueueberError, TLSError
from .types import (DeadLetter, DeadPeeked, Lease, Message, NewMessage, Payload, Peeked,
                    PolicyInfo, QueueCreated, QueuePolicy, QueueRef, QueueStats, Redriven,
                    RemovedAndPolled, ServerInfo)
from .worker import Consumer

__all__ = ["Client", "connect", "DEFAULT_ADDRESS"]

log = logging.getLogger("queueber")

DEFAULT_ADDRESS = "127.0.0.1:7420"

#: How long ``close`` waits for the server to answer what is in flight.
CLOSE_TIMEOUT_S = 10.0

#: Most dead letters one ``redrive`` request moves, and most ids it takes.
REDRIVE_BATCH = 1000

Address = Union[str, Tuple[str, int]]
LeaseLike = Union[Lease, bytes]
IdLike = Union[Message, DeadLetter, bytes]

# A request waiting for its reply: the future, the reply kind expected, and
# for polls the (tenant, queue) its messages would have to be released to.
_Pending = Tuple["asyncio.Future[Any]", str, Optional[Tuple[str, str]]]


def parse_address(address: Address) -> Tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``(host, port)`` as ``(host, port)``."""
    if isinstance(address, tuple):
        return address[0], int(address[1])
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


#: Plaintext read from TLS at a time (a record holds at most 16 KiB).
_TLS_READ_SIZE = 64 * 1024


class _Connection(asyncio.Protocol):
    """One TCP connection: writes request frames, splits the byte stream
    into reply frames and hands each to the request waiting for its id.

    With TLS it runs the TLS session itself (an :class:`ssl.SSLObject` over
    memory BIOs) rather than through asyncio's SSL transport, because the
    protocol ends a connection with a half-close: the client says it has no
    more requests and goes on reading the answers to those it sent. asyncio's
    SSL transport cannot half-close (no ``write_eof``) and drops what comes
    after its ``close_notify``; here ``write_eof`` sends ``close_notify``
    and a TCP FIN, and reading goes on until the server's ``close_notify``
    or EOF."""

    def __init__(self, client: "Client", tls: Optional[ssl.SSLContext] = None,
                 server_name: Optional[str] = None) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self.transport: Optional[asyncio.Transport] = None
        self._tls_context = tls
        self._server_name = server_name
        self._ssl: Optional[ssl.SSLObject] = None
        self._ssl_in = ssl.MemoryBIO()
        self._ssl_out = ssl.MemoryBIO()
        #: With TLS: done when the handshake is (or failed with TLSError).
        self.handshake: "Optional[asyncio.Future[None]]" = \
            self._loop.create_future() if tls is not None else None
        self._eof_sent = False
        self.pending: Dict[int, _Pending] = {}
        #: False once no new request may be sent here (lost, closing, or an
        #: id-0 error): the client then opens a new connection.
        self.usable = True
        self.max_in_flight = 1 << 31  # until hello tells the server's limit
        #: Set when the connection has ended and every request on it failed.
        self.closed: "asyncio.Future[None]" = self._loop.create_future()
        self._fatal: Optional[QueueberError] = None  # the id-0 error, if any
        self._rbuf = bytearray()
        self._need = 0  # bytes _rbuf must hold before it is worth parsing
        self._wbuf: List[bytes] = []
        self._flush_scheduled = False
        self._write_ok = asyncio.Event()
        self._write_ok.set()
        self._slot_waiters: Deque["asyncio.Future[None]"] = collections.deque()

    # -- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._tls_context is not None:
            self._ssl = self._tls_context.wrap_bio(self._ssl_in, self._ssl_out,
                                                   server_side=False,
                                                   server_hostname=self._server_name)
            self._tls_handshake()  # sends the ClientHello

    def data_received(self, data: bytes) -> None:
        if self._ssl is not None:
            self._tls_received(data)
        else:
            self._received(data)

    def _received(self, data: bytes) -> None:
        """Plaintext from the server: split into reply frames."""
        if self._rbuf:
            self._rbuf += data
            if len(self._rbuf) < self._need:
                return  # a large frame still arriving: do not re-parse
            data = bytes(self._rbuf)
            self._rbuf = bytearray()
        pos, end_of_data = 0, len(data)
        try:
            while pos < end_of_data:
                size = _wire.frame_length(data, pos)
                end = pos + size
                if size == 0 or end > end_of_data:
                    self._need = size  # 0: the table itself is incomplete
                    self._rbuf = bytearray(data[pos:])
                    return
                # A reply that is the whole chunk is passed on without a copy.
                self._dispatch(data if size == end_of_data else data[pos:end])
                pos = end
        except _wire.FramingError as e:
            self._fail(Internal(f"lost the framing of the server's replies: {e}",
                                connection_level=True))
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool:
        return False  # the server sends EOF after its last answer: close

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.usable = False
        if self.handshake is not None and not self.handshake.done():
            self.handshake.set_exception(
                self._fatal or ConnectionClosed(f"connection lost during the TLS handshake"
                                                f"{': ' + str(exc) if exc else ''}"))
            self.handshake.exception()  # retrieved: _open may have stopped waiting
        if self._fatal is not None:
            err: QueueberError = self._fatal
        elif exc is not None:
            err = ConnectionClosed(f"connection lost: {exc}")
        else:
            err = ConnectionClosed("the server closed the connection before answering")
        pending, self.pending = self.pending, {}
        for fut, _kind, _ctx in pending.values():
            if not fut.done():
                # A copy each: an exception instance raised in many tasks
                # would collect all their tracebacks.
                fut.set_exception(copy.copy(err))
        self._wake_all()
        self._write_ok.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_ok.clear()

    def resume_writing(self) -> None:
        self._write_ok.set()

    # -- sending -----------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a frame; everything queued in one loop tick is written with
        a single ``transport.write`` (one syscall for a burst of requests)."""
        self._wbuf.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        buf, self._wbuf = self._wbuf, []
        if self.transport is None or self.transport.is_closing() or self._eof_sent or not buf:
            return
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        if self._ssl is None:
            self.transport.write(data)
            return
        try:
            view = memoryview(data)
            while view:
                n = self._ssl.write(view)
                view = view[n:]
        except ssl.SSLError as e:
            self._tls_failed(e)
            return
        self._tls_send()

    async def wait_writable(self) -> None:
        """Wait while the transport's write buffer is over its high-water
        mark (large adds faster than the socket drains)."""
        await self._write_ok.wait()

    def write_eof(self) -> None:
        """Flush and send EOF: the server answers what it has read (parked
        polls at once, empty) and then closes."""
        self.usable = False
        self._flush()
        t = self.transport
        if t is not None and not t.is_closing() and not self._eof_sent:
            if self._ssl is not None:
                if self.handshake is not None and not self.handshake.done():
                    t.abort()  # nothing sent yet: no answers to wait for
                    self._wake_all()
                    return
                try:
                    self._ssl.unwrap()  # queues our close_notify
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass  # the server's close_notify has not come yet: expected
                except (ssl.SSLError, ValueError):
                    pass  # the session is already broken or shut down
                self._tls_send()
            self._eof_sent = True
            if t.can_write_eof():
                try:
                    t.write_eof()
                except OSError:
                    t.abort()
        self._wake_all()

    # -- in-flight slots -----------------------------------------------------

    async def wait_slot(self) -> None:
        """Wait until fewer than ``max_in_flight`` requests are outstanding
        (or the connection stops being usable)."""
        while self.usable and len(self.pending) >= self.max_in_flight:
            waiter = self._loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                    # We were cancelled after being woken: pass the slot on.
                elif self._slot_waiters and len(self.pending) < self.max_in_flight:
                    self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_result(None)

    # -- replies -------------------------------------------------------------

    def _dispatch(self, frame: bytes) -> None:
        rid, kind, value = _wire.decode(frame)
        if rid == 0:
            if kind == "error":
                self._connection_error(value)
            else:
                log.warning("queueber: ignoring a %s reply with id 0", kind)
            return
        entry = self.pending.pop(rid, None)
        if entry is None:
            log.warning("queueber: ignoring a reply to unknown request id %d", rid)
            return
        if self._slot_waiters:
            self._wake_one()
        fut, expected, ctx = entry
        if fut.done():
            # The caller gave up (cancelled). A poll's messages are leased to
            # nobody now: give them back instead of letting them sit out the
            # lease.
            if ctx is not None:
                polled = _wire.leased(kind, value)
                if polled is not None and polled[2]:
                    self._client._release_abandoned(ctx, polled[0], polled[2])
            return
        if kind == "error":
            fut.set_exception(value)
        elif kind != expected:
            fut.set_exception(Internal(f"unexpected {kind} reply to a {expected} request"))
        else:
            fut.set_result(value)

    def _connection_error(self, err: QueueberError) -> None:
        """An error with id 0 is about the connection (frameTooLarge, a
        framing malformedFrame, unavailable at the connection limit). The
        protocol says: read until EOF, since the server first answers what it
        has read, then fail what is still unanswered and reconnect."""
        log.warning("queueber: connection error from the server: %s", err)
        if self._fatal is None:
            self._fatal = err
        # A malformedFrame about an unreadable root keeps the connection open
        # on the server's side: our EOF makes it finish and close.
        self.write_eof()

    def _fail(self, err: QueueberError) -> None:
        if self._fatal is None:
            self._fatal = err
        self.usable = False

    # -- TLS -------------------------------------------------------------------

    def _tls_send(self) -> None:
        """Write what the TLS session has to send (records, alerts)."""
        out = self._ssl_out.read()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _tls_handshake(self) -> bool:
        """Advance the handshake; True once it is done."""
        assert self._ssl is not None and self.handshake is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._tls_send()
            return False
        except ssl.SSLError as e:
            self._tls_failed(e)
            return False
        self._tls_send()
        if not self.handshake.done():
            self.handshake.set_result(None)
        return True

    def _tls_received(self, data: bytes) -> None:
        """Bytes from the socket: decrypt and pass the plaintext on."""
        assert self._ssl is not None and self.handshake is not None
        self._ssl_in.write(data)
        if not self.handshake.done() and not self._tls_handshake():
            return
        chunks: List[bytes] = []
        closed = False
        try:
            while True:
                chunk = self._ssl.read(_TLS_READ_SIZE)
                if not chunk:
                    closed = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            closed = True  # the server's close_notify: its EOF
        except ssl.SSLError as e:
            # What was decrypted before the error still counts (answers).
            if chunks:
                self._received(b"".join(chunks))
            self._tls_failed(e)
            return
        self._tls_send()  # e.g. a KeyUpdate answer
        if chunks:
            self._received(b"".join(chunks))
        if closed and self.transport is not None:
            # As eof_received: nothing more comes, so nothing pending will be
            # answered.
            self.transport.close()

    def _tls_failed(self, e: ssl.SSLError) -> None:
        """A TLS error: the handshake or the session failed. Fail what is
        pending with it and close (sending our alert, if any)."""
        host, port = self._client.address
        if self.handshake is not None and not self.handshake.done():
            what = f"TLS handshake with {host}:{port} (server name {self._server_name!r}) failed"
        else:
            what = f"TLS with {host}:{port} failed"
        reason = getattr(e, "verify_message", None) or str(e)
        hint = _tls_hint(e)
        err = TLSError(f"{what}: {reason}{hint}")
        self._fail(err)
        if self.handshake is not None and not self.handshake.done():
            self.handshake.set_exception(copy.copy(err))
            self.handshake.exception()  # retrieved: _open may have stopped waiting
        self._tls_send()
        if self.transport is not None:
            self.transport.close()


def _tls_hint(e: ssl.SSLError) -> str:
    """A hint for the usual TLS failures, after the error."""
    text = str(e).upper()
    if "WRONG_VERSION_NUMBER" in text or "RECORD_LAYER_FAILURE" in text \
            or "PACKET_LENGTH_TOO_LONG" in text:
        return " (does the server serve TLS on this port?)"
    if "CERTIFICATE_REQUIRED" in text:
        return (" (the server requires a client certificate: tls_client_cert= and "
                "tls_client_key=)")
    if isinstance(e, ssl.SSLCertVerificationError):
        return " (tls_ca= names the CA to trust, tls_server_name= the name to expect)"
    return ""


class Client:
    """An asyncio queueber client over one TCP connection.

    Create it with :func:`connect` (``async with queueber.aio.connect(addr)
    as qb`` or ``qb = await queueber.aio.connect(addr)``), or construct it
    and ``await qb.connect()``.

    Every operation takes the queue name as its first argument; the tenant
    is the client's (``tenant=`` at connect, ``"default"`` unless given). An
    empty name means ``default`` on the server.

    Args:
        address: ``"host:port"`` or ``(host, port)``.
        tenant: the tenant of every queue this client names.
        connect_timeout: seconds for TCP connect plus ``hello``, on the first
            connect and on every reconnect.
        max_in_flight: most requests outstanding at once; default (``None``)
            the server's ``max_in_flight_per_connection``.
        token: the access token presented on every connection (servers with
            ``--auth-file``); default ``$QUEUEBER_TOKEN``.
        tls: connect with TLS (``True``), not (``False``), or with this
            :class:`ssl.SSLContext` as it is. Default (``None``):
            ``$QUEUEBER_TLS`` (``true``/``false``), and TLS whenever a CA or
            a client certificate is given.
        tls_ca: PEM file of the CA certificates to trust (implies TLS);
            default ``$QUEUEBER_TLS_CA``, else the system's roots.
        tls_client_cert: PEM file of a client certificate (chain) to present,
            for servers started with ``--tls-client-ca`` (implies TLS; needs
            ``tls_client_key``); default ``$QUEUEBER_TLS_CLIENT_CERT``.
        tls_client_key: PEM file of its private key; default
            ``$QUEUEBER_TLS_CLIENT_KEY``.
        tls_server_name: the name (or IP address) the server's certificate
            must be valid for; default ``$QUEUEBER_TLS_SERVER_NAME``, else
            the host of ``address``.

    TLS is 1.2 or newer. The settings are checked here (a file that cannot
    be loaded raises :class:`ValueError`); a handshake that fails raises
    :class:`~queueber.errors.TLSError` at connect.
    """

    def __init__(self, address: Address = DEFAULT_ADDRESS, *, tenant: str = "default",
                 connect_timeout: float = 10.0, max_in_flight: Optional[int] = None,
                 token: Optional[str] = None, tls: _tls.TLSArg = None,
                 tls_ca: _tls.PathArg = None, tls_client_cert: _tls.PathArg = None,
                 tls_client_key: _tls.PathArg = None,
                 tls_server_name: Optional[str] = None) -> None:
        self.address: Tuple[str, int] = parse_address(address)
        #: The TLS context connections use; ``None``: plaintext.
        self.tls_context: Optional[ssl.SSLContext] = _tls.resolve(
            tls, tls_ca, tls_client_cert, tls_client_key)
        #: The name the server's certificate is checked against (with TLS).
        self.tls_server_name: Optional[str] = (
            _tls.server_name(tls_server_name, self.address[0])
            if self.tls_context is not None else None)
        self.tenant: str = tenant
        # Presented on every (re)connect, after hello; default from the
        # environment like the CLI's.
        self._token: Optional[str] = token if token is not None else os.environ.get("QUEUEBER_TOKEN")
        self.connect_timeout = connect_timeout
        self._max_in_flight = max_in_flight
        self._conn: Optional[_Connection] = None
        self._connect_lock: Optional[asyncio.Lock] = None
        self._next_id = 1  # id 0 is the server's for connection errors
        self._closing = False
        # Created by the first close(); later calls wait on it. (Futures and
        # locks are made inside the loop: on Python 3.9 they bind to a loop
        # when created.)
        self._closed: "Optional[asyncio.Future[None]]" = None
        self._server_info: Optional[ServerInfo] = None
        self._consumers: Set[Consumer] = set()
        self._background: Set["asyncio.Task[Any]"] = set()
        # Messages of abandoned polls that came back once the connection
        # could no longer carry a release: released at close.
        self._orphans: List[Tuple[Tuple[str, str], bytes, List[Message]]] = []

    # -- lifecycle -------------------------------------------------------------

    async def connect(self) -> "Client":
        """Open the connection and say ``hello`` (learning the server's
        limits). Raises :class:`~queueber.errors.ConnectionClosed` when the
        server cannot be reached, :class:`~queueber.errors.ConnectTimeout`
        after ``connect_timeout``, :class:`~queueber.errors.Unavailable` when
        the server is at its connection limit."""
        await self._ensure_connection()
        return self

    @property
    def server_info(self) -> ServerInfo:
        """What the server said in ``hello`` on the latest (re)connect."""
        if self._server_info is None:
            raise ConnectionClosed("not connected yet", connection_level=False)
        return self._server_info

    @property
    def connected(self) -> bool:
        """Whether the client has a usable connection right now."""
        return self._conn is not None and self._conn.usable

    async def close(self) -> None:
        """Stop the consumers (their unprocessed messages are released and
        their acknowledgements flushed), let requests in flight finish,
        then close the connection. Parked polls are answered at once, empty.
        Idempotent."""
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        self._closing = True
        try:
            for consumer in list(self._consumers):
                await consumer.aclose()
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)
            conn = self._conn
            if conn is not None:
                await self._finish(conn)
            if self._orphans:
                await self._release_orphans()
        finally:
            self._closed.set_result(None)

    async def _finish(self, conn: _Connection) -> None:
        conn.write_eof()
        try:
            await asyncio.wait_for(asyncio.shield(conn.closed), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            if conn.transport is not None:
                conn.transport.abort()
            await conn.closed

    async def __aenter__(self) -> "Client":
        if self._conn is None:
            await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _ensure_connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._closing:
            raise ConnectionClosed("the client is closed", connection_level=False)
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            conn = self._conn
            if conn is None or not conn.usable:
                conn, info = await self._open()
                if self._closing:  # close() began while we were connecting
                    conn.transport.abort()
                    raise ConnectionClosed("the client is closed", connection_level=False)
                self._conn, self._server_info = conn, info
            return conn

    async def _open(self) -> Tuple[_Connection, ServerInfo]:
        """A new connection that has said hello, within ``connect_timeout``."""
        loop = asyncio.get_running_loop()
        host, port = self.address
        deadline = loop.time() + self.connect_timeout
        try:
            _t, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self, self.tls_context, self.tls_server_name),
                    host, port),
                self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"connecting to {host}:{port} timed out after "
                                 f"{self.connect_timeout} s") from None
        except OSError as e:
            raise ConnectionClosed(f"cannot connect to {host}:{port}: {e}") from e

        async def by_deadline(step: "asyncio.Future[Any]", late: str) -> Any:
            # A step of opening the connection: past the deadline, or on
            # any failure, the half-open connection is dropped.
            try:
                return await asyncio.wait_for(step, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                conn.transport.abort()  # type: ignore[union-attr]
                raise ConnectTimeout(f"{late} within {self.connect_timeout} s") from None
            except BaseException:
                conn.transport.abort()  # type: ignore[union-attr]
                raise

        if conn.handshake is not None:
            await by_deadline(asyncio.shield(conn.handshake),
                              f"the TLS handshake with {host}:{port} did not finish")
        info: ServerInfo = await by_deadline(self._submit(conn, "hello", _wire.encode_hello, ()),
                                             f"no hello from {host}:{port}")
        conn.max_in_flight = self._max_in_flight or info.limits.max_in_flight_per_connection
        if self._token:
            try:
                fut = self._submit(conn, "auth", _wire.encode_auth, (self._token,))
                await asyncio.wait_for(fut, max(0.0, deadline - loop.time()) + 3.0)
            except BaseException:
                conn.transport.abort()  # type: ignore[union-attr]
                raise
        return conn, info

    # -- requests --------------------------------------------------------------

    def _submit(self, conn: _Connection, kind: str, encode: Callable[..., bytes],
                args: Tuple[Any, ...], ctx: Optional[Tuple[str, str]] = None
                ) -> "asyncio.Future[Any]":
        rid = self._next_id
        self._next_id = rid + 1
        try:
            frame = encode(rid, *args)
        except (capnp.KjException, OverflowError) as e:
            # pycapnp's messages carry a C++ stack; keep the first line.
            raise ValueError(f"cannot encode the {kind} request: "
                             f"{str(e).splitlines()[0]}") from None
        fut: "asyncio.Future[Any]" = conn._loop.create_future()
        if conn.closed.done():
            # Ended before this could be sent (between a TLS handshake and
            # hello, say): nothing would ever answer it.
            fut.set_exception(copy.copy(conn._fatal) if conn._fatal is not None else
                              ConnectionClosed("the connection is closed"))
            return fut
        conn.pending[rid] = (fut, kind, ctx)
        conn.send(frame)
        return fut

    async def _call(self, kind: str, encode: Callable[..., bytes], *args: Any,
                    resend: bool = False, ctx: Optional[Tuple[str, str]] = None) -> Any:
        """Send one request and wait for its reply.

        ``resend``: the request is safe to run twice, so if the connection
        is lost before the reply it is sent once more on a new connection.
        ``ctx``: for polls (and removeAndPoll), the queue to release
        messages to if the caller is cancelled after the server has leased
        them.
        """
        attempt = 0
        while True:
            conn = self._conn
            if conn is None or not conn.usable:
                conn = await self._ensure_connection()
            if len(conn.pending) >= conn.max_in_flight:
                await conn.wait_slot()
                continue  # the connection may have changed meanwhile
            if not conn._write_ok.is_set():
                await conn.wait_writable()
                continue
            fut = self._submit(conn, kind, encode, args, ctx)
            try:
                return await fut
            except QueueberError as e:
                if resend and attempt == 0 and e.connection_level:
                    attempt += 1
                    continue
                raise
            except asyncio.CancelledError:
                if ctx is not None and fut.done() and not fut.cancelled() \
                        and fut.exception() is None:
                    # Answered, but we were cancelled before we could use it.
                    polled = _wire.leased(kind, fut.result())
                    if polled is not None and polled[2]:
                        self._release_abandoned(ctx, polled[0], polled[2])
                raise

    def _release_abandoned(self, ctx: Tuple[str, str], lease: bytes,
                           messages: List[Message]) -> None:
        """Give back the messages of a poll whose caller went away."""
        conn = self._conn
        if self._closing and (conn is None or not conn.usable):
            self._orphans.append((ctx, lease, messages))
            return
        task = asyncio.ensure_future(self._release_all(self._call, ctx, lease, messages))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _release_all(call: Callable[..., Any], ctx: Tuple[str, str], lease: bytes,
                           messages: List[Message]) -> None:
        tenant, queue = ctx
        results = await asyncio.gather(
            *(call("release", _wire.encode_release, tenant, queue, lease, m.id, 0)
              for m in messages), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.warning("queueber: could not release a message of an abandoned poll "
                            "(it is redelivered when its lease expires): %s", r)

    async def _release_orphans(self) -> None:
        """At close, over a short-lived connection of its own."""
        orphans, self._orphans = self._orphans, []
        try:
            conn, _info = await self._open()
        except QueueberError as e:
            log.warning("queueber: could not release %d abandoned messages (they are "
                        "redelivered when their leases expire): %s",
                        sum(len(m) for _c, _l, m in orphans), e)
            return

        def call(kind: str, encode: Callable[..., bytes], *args: Any) -> Any:
            return self._submit(conn, kind, encode, args)

        for ctx, lease, messages in orphans:
            await self._release_all(call, ctx, lease, messages)
        await self._finish(conn)

    # -- operations --------------------------------------------------------------

    async def hello(self) -> ServerInfo:
        """The server's version, shard count, limits and disk state."""
        info: ServerInfo = await self._call("hello", _wire.encode_hello, resend=True)
        self._server_info = info
        return info

    async def add(self, queue: str, messages: Sequence[Union[Payload, NewMessage]],
                  delay_ms: int = 0) -> List[bytes]:
        """Add messages to ``queue`` (creating it); returns their 16-byte ids
        in order.

        ``messages`` holds payloads (bytes, or str sent as UTF-8) and/or
        :class:`~queueber.types.NewMessage` for a per-message delay;
        ``delay_ms`` applies to the bare payloads. The add is atomic: all
        are stored or none. It is never re-sent by the client: if the
        connection is lost before the answer, it raises
        :class:`~queueber.errors.ConnectionClosed` and the outcome is unknown.
        """
        if isinstance(messages, (bytes, bytearray, memoryview, str, NewMessage)):
            raise TypeError("add takes a sequence of payloads, e.g. [b'...']")
        ids: List[bytes] = await self._call("add", _wire.encode_add, self.tenant, queue,
                                            messages, delay_ms)
        return ids

    async def poll(self, queue: str, max_items: int = 1, lease_ms: Optional[int] = 30000,
                   wait_ms: int = 0) -> Lease:
        """Lease up to ``max_items`` visible messages for ``lease_ms``.

        ``lease_ms=None`` (or 0) leaves the lease to the server: the queue
        policy's ``lease_ms``, else the server's ``--default-lease-ms``
        (servers older than queue policies refuse it with
        :class:`~queueber.errors.InvalidArgument`). With ``wait_ms`` > 0 and
        nothing visible, the server waits that long (capped by its
        ``max_wait_ms``) for messages. Returns a
        :class:`~queueber.types.Lease`, empty (falsy) when nothing came. If
        the caller is cancelled after the server leased messages, they are
        released.
        """
        lease, expires, messages = await self._call(
            "poll", _wire.encode_poll, self.tenant, queue, max_items, lease_ms or 0, wait_ms,
            ctx=(self.tenant, queue))
        return Lease(lease, expires, messages)

    async def remove(self, queue: str, lease: LeaseLike, ids: Iterable[IdLike]) -> List[bool]:
        """Acknowledge (delete) leased messages; one flag per id, ``False``
        when the lease no longer held it (expired: it may be redelivered)."""
        flags: List[bool] = await self._call("remove", _wire.encode_remove, self.tenant, queue,
                                             _wire.lease_bytes(lease), _wire.id_list(ids))
        return flags

    async def remove_and_poll(self, queue: str, lease: Optional[LeaseLike], ids: Iterable[IdLike],
                              max_items: int = 1, lease_ms: Optional[int] = 30000,
                              wait_ms: int = 0) -> RemovedAndPolled:
        """A consumer's loop in one round trip: :meth:`remove` ``ids``
        (delivered under ``lease``), then :meth:`poll` ``queue`` for more.

        The removes run first, exactly as :meth:`remove` (one flag per id,
        ``False`` when the lease no longer held it); then the poll, exactly
        as :meth:`poll` (``max_items``, ``lease_ms`` with ``None``/0 for the
        queue's lease, and ``wait_ms``, waiting included: the removes are
        done by then whatever the wait brings). ``ids`` may be empty, and
        then ``lease`` may be ``None`` or empty (a previous empty result's
        lease): a plain poll. Ids with an empty lease raise
        :class:`~queueber.errors.InvalidArgument`; more ids than the
        server's ``max_messages_per_add``
        :class:`~queueber.errors.TooManyMessages`; any error means nothing
        was removed or leased. Needs the consume permission. A server older
        than this operation raises
        :class:`~queueber.errors.UnknownOperation` (use :meth:`remove`
        then :meth:`poll`). Not re-sent after a lost connection. If the
        caller is cancelled after the server leased messages, they are
        released (the removes stay done).

        Returns a :class:`~queueber.types.RemovedAndPolled`: ``removed``
        (the flags) and ``lease`` (as :meth:`poll` returns it); falsy when
        nothing was leased.
        """
        reply = await self._call(
            "removeAndPoll", _wire.encode_remove_and_poll, self.tenant, queue,
            b"" if lease is None else _wire.lease_bytes(lease), _wire.id_list(ids), max_items,
            lease_ms or 0, wait_ms, ctx=(self.tenant, queue))
        return _wire.removed_and_polled(reply)

    async def extend(self, queue: str, lease: LeaseLike, lease_ms: int) -> Optional[int]:
        """Make the lease expire ``lease_ms`` from now (not added to the old
        expiry). Returns the new expiry (server epoch ms), or ``None`` when
        the lease is no longer live and its messages may be redelivered."""
        expires: Optional[int] = await self._call(
            "extend", _wire.encode_extend, self.tenant, queue, _wire.lease_bytes(lease),
            lease_ms, resend=True)
        return expires

    async def release(self, queue: str, lease: LeaseLike, id: IdLike, delay_ms: int = 0) -> bool:
        """Give one leased message back, visible again after ``delay_ms``
        (a message past the queue policy's ``retention_ms`` is dropped
        instead); ``False`` when the lease no longer held it."""
        mid = _wire.id_list([id])[0]
        released: bool = await self._call("release", _wire.encode_release, self.tenant, queue,
                                          _wire.lease_bytes(lease), mid, delay_ms)
        return released

    async def fail(self, queue: str, lease: LeaseLike, id: IdLike, error: str = "",
                   dead: bool = False) -> bool:
        """Report that processing a leased message failed: its delivery ends
        like a :meth:`release` without a delay (the queue policy's
        ``retry_backoff_ms`` applies), and ``error`` is kept with the message
        (its first 1 KiB of UTF-8, cut here already; a later ``fail``
        replaces it), for :meth:`peek_dead` to show should it die.

        With ``dead=True`` the message is dead-lettered at once (reason
        ``rejected``), whatever its deliveries; without, it is dead-lettered
        (reason ``maxDeliveries``) when it has had the policy's
        ``max_deliveries``; either way, a message past the policy's
        ``retention_ms`` is dropped instead. ``False`` when the lease no
        longer held it (nothing changed). Needs the consume permission. Not
        re-sent after a lost connection (a second one would answer
        ``False``).
        """
        if not isinstance(error, str):
            raise TypeError(f"error must be a str, not {type(error).__name__}")
        mid = _wire.id_list([id])[0]
        failed: bool = await self._call("fail", _wire.encode_fail, self.tenant, queue,
                                        _wire.lease_bytes(lease), mid, error, bool(dead))
        return failed

    async def stats(self, queue: str) -> QueueStats:
        """Counters of ``queue``: visible, delayed, in flight, dead, head age,
        and how many messages its retention has dropped."""
        stats: QueueStats = await self._call("stats", _wire.encode_queue_op, "stats",
                                             self.tenant, queue, resend=True)
        return stats

    async def peek(self, queue: str, max_items: int = 10,
                   cursor: Optional[bytes] = None) -> Peeked:
        """Up to ``max_items`` messages visible now, without leasing them,
        from the head or after ``cursor`` (a previous result's)."""
        reply = await self._call("peek", _wire.encode_peek, self.tenant, queue, max_items,
                                 cursor, resend=True)
        return _wire.peeked(reply)

    async def peek_dead(self, queue: str, max_items: int = 10,
                        cursor: Optional[bytes] = None) -> DeadPeeked:
        """Up to ``max_items`` of ``queue``'s dead letters, oldest death
        first, from the first or after ``cursor`` (a previous
        ``peek_dead``'s). Each :class:`~queueber.types.DeadLetter` tells
        why (``reason``), when (``died_at_ms``), after how many deliveries,
        and the last error a worker reported with :meth:`fail`. Nothing
        changes. A server older than dead letters raises
        :class:`~queueber.errors.UnknownOperation`."""
        reply = await self._call("peek", _wire.encode_peek, self.tenant, queue, max_items,
                                 cursor, True, resend=True)
        return _wire.dead_peeked(reply)

    async def redrive(self, queue: str, ids: Optional[Iterable[IdLike]] = None,
                      max: int = 0) -> Redriven:
        """Move dead letters back to ``queue``, visible at once with their
        ``delivery_count`` reset to 0 (their last error stays): the ones in
        ``ids`` (dead letters or ids; at most 1000, others are ignored),
        or else the oldest ``max`` (0 = all).

        One request moves at most 1000; ``more=True`` in the answer says
        more were asked for and remain: call again (with ``max`` reduced by
        ``moved``), or use :meth:`redrive_all`, which does. More than 1000
        ``ids`` raise :class:`~queueber.errors.TooManyMessages`. Needs the
        admin permission. Not re-sent after a lost connection.
        """
        id_list = _wire.id_list(ids) if ids is not None else []
        if isinstance(max, bool) or not isinstance(max, int) or max < 0:
            raise ValueError(f"max must be an int >= 0, not {max!r}")
        if ids is not None and not id_list:
            return Redriven(0, False)  # none asked for (an empty list is not "all")
        redriven: Redriven = await self._call("redrive", _wire.encode_redrive, self.tenant,
                                              queue, max, id_list)
        return redriven

    async def redrive_all(self, queue: str, ids: Optional[Iterable[IdLike]] = None,
                          max: int = 0) -> int:
        """:meth:`redrive` until done; returns how many were moved.

        Without ``ids``: the oldest ``max`` dead letters (0 = all), one
        request of up to 1000 after another while the server says there
        are more. With ``ids``: any number, 1000 a request. The requests
        are one after another, so the queue's shard serves others in
        between; should one fail, the ones before it stay done.
        """
        moved = 0
        if ids is not None:
            id_list = _wire.id_list(ids)
            for start in range(0, len(id_list), REDRIVE_BATCH):
                step = await self.redrive(queue, id_list[start:start + REDRIVE_BATCH])
                moved += step.moved
            return moved
        while True:
            step = await self.redrive(queue, max=max - moved if max else 0)
            moved += step.moved
            if not step.more or (max and moved >= max) or step.moved == 0:
                return moved

    async def queues(self) -> List[QueueRef]:
        """Every queue on the server (all tenants), sorted by (tenant, queue)."""
        refs: List[QueueRef] = await self._call("listQueues", _wire.encode_list_queues,
                                                resend=True)
        return refs

    async def purge(self, queue: str) -> int:
        """Drop every message of ``queue`` (visible, delayed, in flight);
        returns how many. The queue stays."""
        purged: int = await self._call("purge", _wire.encode_queue_op, "purge",
                                       self.tenant, queue)
        return purged

    async def delete(self, queue: str) -> None:
        """Purge ``queue`` and remove it."""
        await self._call("delete", _wire.encode_queue_op, "delete", self.tenant, queue)

    async def create_queue(self, queue: str,
                           policy: Optional[QueuePolicy] = None) -> QueueCreated:
        """Create ``queue`` with ``policy`` (``None``: every field left to
        the server's defaults).

        Idempotent: a queue that exists with the same policy is answered
        with ``created=False``; one with another policy raises
        :class:`~queueber.errors.InvalidArgument` (change policies with
        :meth:`set_policy`). A policy the server cannot hold to (a
        ``max_payload_bytes`` over its own limit, a ``lease_ms`` or
        ``retention_ms`` over its longest duration) raises
        ``InvalidArgument`` too. Needs the admin permission on servers with
        access control.
        """
        created: QueueCreated = await self._call(
            "createQueue", _wire.encode_create_queue, self.tenant, queue, policy)
        return created

    async def get_policy(self, queue: str) -> PolicyInfo:
        """``queue``'s policy as stored (``None`` fields: the server's
        default), its version, and the effective one (every field set).
        :class:`~queueber.errors.UnknownQueue` if it does not exist."""
        info: PolicyInfo = await self._call("getPolicy", _wire.encode_queue_op, "getPolicy",
                                            self.tenant, queue, resend=True)
        return info

    async def set_policy(self, queue: str, policy: QueuePolicy) -> PolicyInfo:
        """Replace ``queue``'s whole policy (fields left ``None`` go back to
        the server's defaults); the version goes up by one. It applies from
        the next request: messages already held stay, and a lower
        ``max_depth`` refuses adds until the queue drains under it; a
        ``retention_ms`` applies to the messages already held as well
        (counted from their first add)."""
        info: PolicyInfo = await self._call("setPolicy", _wire.encode_set_policy, self.tenant,
                                            queue, policy)
        return info

    def consume(self, queue: str, *, batch: int = 32, lease_ms: int = 30000,
                wait_ms: int = 5000, max_held: Optional[int] = None,
                heartbeat_fraction: float = 1 / 3, ack_delay_ms: float = 5.0,
                retry_delay_ms: int = 0) -> Consumer:
        """Iterate over the messages of ``queue``, for a worker loop::

            async for msg in qb.consume("emails", batch=32):
                async with msg:          # removed on success, failed on an error
                    await send(msg.payload)

        See :class:`~queueber.worker.Consumer` for the arguments and the
        guarantees (heartbeats, batched acknowledgements, clean stop).
        """
        if self._closing:
            raise ConnectionClosed("the client is closed", connection_level=False)
        consumer = Consumer(self, queue, batch=batch, lease_ms=lease_ms, wait_ms=wait_ms,
                            max_held=max_held, heartbeat_fraction=heartbeat_fraction,
                            ack_delay_ms=ack_delay_ms, retry_delay_ms=retry_delay_ms)
        self._consumers.add(consumer)
        return consumer

    def _consumer_stopped(self, consumer: Consumer) -> None:
        self._consumers.discard(consumer)


class _Connector:
    """What :func:`connect` returns: await it, or use it with ``async with``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._client.connect().__await__()

    async def __aenter__(self) -> Client:
        return await self._client.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self._client.close()


def connect(address: Address = DEFAULT_ADDRESS, *, tenant: str = "default",
            connect_timeout: float = 10.0, max_in_flight: Optional[int] = None,
            token: Optional[str] = None, tls: _tls.TLSArg = None,
            tls_ca: _tls.PathArg = None, tls_client_cert: _tls.PathArg = None,
            tls_client_key: _tls.PathArg = None,
            tls_server_name: Optional[str] = None) -> _Connector:
    """Connect to a queueber server::

        async with queueber.aio.connect("127.0.0.1:7420", tenant="acme") as qb:
            ...
        qb = await queueber.aio.connect("127.0.0.1:7420")   # then await qb.close()
        async with queueber.aio.connect("qb.example:7420", tls_ca="ca.pem") as qb:
            ...                                               # over TLS

    See :class:`Client` for the arguments.
    """
    return _Connector(Client(address, tenant=tenant, connect_timeout=connect_timeout,
                             max_in_flight=max_in_flight, token=token, tls=tls, tls_ca=tls_ca,
                             tls_client_cert=tls_client_cert, tls_client_key=tls_client_key,
                             tls_server_name=tls_server_name))
