"""Exceptions: one class per protocol error code, plus the client's own.

Every error the server can answer with (``ErrorCode`` in ``queueber.capnp``)
has a class named after its code: ``unknownQueue`` raises
:class:`UnknownQueue`, ``diskFull`` raises :class:`DiskFull`, and so on. They
all derive from :class:`QueueberError`, which carries the code and the
server's message. A code this client does not know is raised as
:class:`Internal` (the protocol asks clients to treat unknown codes so).

:class:`ConnectionClosed` is the client's own: the connection could not be
made, or ended before the request was answered, so the request may or may
not have run.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
    "QueueberError",
    "Internal",
    "InvalidArgument",
    "InvalidName",
    "UnknownQueue",
    "PayloadTooLarge",
    "TooManyMessages",
    "FrameTooLarge",
    "MalformedFrame",
    "UnknownOperation",
    "TooManyInFlight",
    "ShuttingDown",
    "Unavailable",
    "DiskFull",
    "Unauthenticated",
    "PermissionDenied",
    "QueueFull",
    "ConnectionClosed",
    "ConnectTimeout",
    "TLSError",
    "error_for_code",
]


class QueueberError(Exception):
    """Base of every error this package raises.

    Attributes:
        code: the protocol's name of the error code (``"unknownQueue"``), or
            ``"connectionClosed"`` for :class:`ConnectionClosed`.
        code_number: the code's number on the wire (``ErrorCode`` ordinal);
            ``-1`` for errors made by the client.
        message: the server's message (human-readable; do not parse it).
        retryable: whether the same request can succeed later unchanged.
        connection_level: the error ended the connection (the server sent it
            with id 0, or the connection was lost); requests that were in
            flight on it have an unknown outcome.
    """

    code: str = "internal"
    code_number: int = 0
    retryable: bool = False

    def __init__(self, message: str = "", *, code_number: Optional[int] = None,
                 connection_level: bool = False) -> None:
        super().__init__(message)
        self.message: str = message
        if code_number is not None:
            self.code_number = code_number
        self.connection_level: bool = connection_level

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class Internal(QueueberError):
    """``internal`` (0): a server-side failure (storage). Retry later; an add
    answered so has an unknown outcome. Also raised for a reply this client
    cannot read and for error codes it does not know."""

    code, code_number, retryable = "internal", 0, True


class InvalidArgument(QueueberError):
    """``invalidArgument`` (1): a number out of range or a malformed id
    (``extend`` with ``lease_ms=0``, an id that is not 16 bytes, an empty add
    or remove), or a queue policy the server cannot hold to (a
    ``max_payload_bytes`` over its own limit, a lease over its longest;
    ``create_queue`` of an existing queue with another policy)."""

    code, code_number = "invalidArgument", 1


class InvalidName(QueueberError):
    """``invalidName`` (2): a tenant or queue is not 1-128 bytes of
    ``[A-Za-z0-9._-]``."""

    code, code_number = "invalidName", 2


class UnknownQueue(QueueberError):
    """``unknownQueue`` (3): the queue does not exist (only ``add`` and
    ``create_queue`` create queues)."""

    code, code_number = "unknownQueue", 3


class PayloadTooLarge(QueueberError):
    """``payloadTooLarge`` (4): a payload is over the server's
    ``max_payload_bytes``, or over the queue policy's; nothing was added."""

    code, code_number = "payloadTooLarge", 4


class TooManyMessages(QueueberError):
    """``tooManyMessages`` (5): an add, or a remove, with more entries than
    ``max_messages_per_add``."""

    code, code_number = "tooManyMessages", 5


class FrameTooLarge(QueueberError):
    """``frameTooLarge`` (6): a request frame was over ``max_frame_bytes``.
    The server closes the connection; every request unanswered on it fails
    with this error."""

    code, code_number = "frameTooLarge", 6


class MalformedFrame(QueueberError):
    """``malformedFrame`` (7): bytes that are not a valid ``Request``. Only a
    framing error closes the connection."""

    code, code_number = "malformedFrame", 7


class UnknownOperation(QueueberError):
    """``unknownOperation`` (8): the server does not know this operation (it
    is older than the client)."""

    code, code_number = "unknownOperation", 8


class TooManyInFlight(QueueberError):
    """``tooManyInFlight`` (9): more pipelined requests than the server's
    ``max_in_flight_per_connection``; the request did not run."""

    code, code_number, retryable = "tooManyInFlight", 9, True


class ShuttingDown(QueueberError):
    """``shuttingDown`` (10): the server is stopping; the request did not run.
    Reconnect later or elsewhere."""

    code, code_number, retryable = "shuttingDown", 10, True


class Unavailable(QueueberError):
    """``unavailable`` (11): the queue's shard cannot serve right now, or (at
    connect) the server is at its connection limit."""

    code, code_number, retryable = "unavailable", 11, True


class DiskFull(QueueberError):
    """``diskFull`` (12): the server is below its free-disk reserve and
    refuses adds (everything else works). Nothing was added; retry later."""

    code, code_number, retryable = "diskFull", 12, True


class Unauthenticated(QueueberError):
    """``unauthenticated`` (13): the server requires a token and this
    connection has not presented one (or presented a wrong one). Nothing
    was executed; connect with ``token=``."""

    code, code_number, retryable = "unauthenticated", 13, False


class PermissionDenied(QueueberError):
    """``permissionDenied`` (14): the connection's token does not allow this
    request (another tenant, a missing permission, a queue outside its
    patterns). Nothing was executed."""

    code, code_number, retryable = "permissionDenied", 14, False


class QueueFull(QueueberError):
    """``queueFull`` (15): the add would take the queue past its policy's
    ``max_depth`` (messages held: visible, delayed and in flight) or
    ``max_bytes`` (payload bytes held). Nothing of it was stored (an add to
    a queue that did not exist created none).

    Retryable, like :class:`DiskFull`: the same add succeeds once consumers
    have removed enough (or the policy is raised). An add that alone is
    larger than the bound never fits; split it or raise the policy."""

    code, code_number, retryable = "queueFull", 15, True


class ConnectionClosed(QueueberError, ConnectionError):
    """The connection could not be made, or ended before the request was
    answered: the request may or may not have run. Made by the client, never
    sent by the server."""

    code, code_number, retryable = "connectionClosed", -1, True

    def __init__(self, message: str = "", *, connection_level: bool = True) -> None:
        super().__init__(message, connection_level=connection_level)


class ConnectTimeout(ConnectionClosed, TimeoutError):
    """Connecting (TCP connect, the TLS handshake and ``hello``) took longer
    than the timeout."""


class TLSError(ConnectionClosed):
    """TLS failed: the handshake (the server's certificate is not trusted or
    not for the name connected to, the server does not speak TLS, no TLS
    version in common) or the connection later (the server refused the
    client certificate, or wanted one). Not retryable: the settings have to
    change. The message has the :mod:`ssl` module's reason."""

    retryable = False


_BY_NUMBER: Dict[int, Type[QueueberError]] = {
    cls.code_number: cls
    for cls in (Internal, InvalidArgument, InvalidName, UnknownQueue, PayloadTooLarge,
                TooManyMessages, FrameTooLarge, MalformedFrame, UnknownOperation,
                TooManyInFlight, ShuttingDown, Unavailable, DiskFull, Unauthenticated,
                PermissionDenied, QueueFull)
}


def error_for_code(code_number: int, message: str, *,
                   connection_level: bool = False) -> QueueberError:
    """The exception for a wire error code; unknown codes become
    :class:`Internal` (keeping the number in ``code_number``)."""
    cls = _BY_NUMBER.get(code_number)
    if cls is None:
        return Internal(f"unknown error code {code_number}: {message}",
                        code_number=code_number, connection_level=connection_level)
    return cls(message, connection_level=connection_level)
