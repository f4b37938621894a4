"""The small value types that operations take and return."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator, List, Optional, Tuple, Union

__all__ = [
    "Payload",
    "NewMessage",
    "Message",
    "Lease",
    "RemovedAndPolled",
    "Peeked",
    "DeadReason",
    "DeadLetter",
    "DeadPeeked",
    "Redriven",
    "QueueStats",
    "QueueRef",
    "Limits",
    "ServerInfo",
    "UNLIMITED",
    "QueuePolicy",
    "PolicyInfo",
    "QueueCreated",
    "MAX_DELIVERIES_LIMIT",
    "MAX_RETENTION_MS",
    "MAX_ERROR_BYTES",
]

#: What ``add`` accepts as a payload: bytes-like, or ``str`` (sent as UTF-8).
Payload = Union[bytes, bytearray, memoryview, str]


@dataclass
class NewMessage:
    """A message to add with its own delay (``add`` also takes bare payloads)."""

    payload: Payload
    #: Milliseconds before the message becomes visible; 0 = at once.
    delay_ms: int = 0


@dataclass
class Message:
    """A message returned by ``poll``, leased to the caller."""

    #: 16-byte message id (a UUIDv7 made by the server; treat it as opaque).
    id: bytes
    payload: bytes
    #: 1 on the first delivery; counts every lease, released or expired too.
    delivery_count: int
    #: When the message was added, in Unix epoch ms by the server's clock.
    enqueued_at_ms: int


@dataclass
class Lease:
    """The result of ``poll``: the messages, all under one lease.

    It is falsy, and ``id`` is empty, when nothing was available. Iterating
    over it yields its messages.
    """

    #: 16-byte lease id; ``b""`` when no messages were returned.
    id: bytes
    #: Expiry in Unix epoch ms by the server's clock (0 when empty). Do not
    #: compare it with the local clock; keep a local deadline instead.
    expires_at_ms: int
    messages: List[Message] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages)


@dataclass
class RemovedAndPolled:
    """The result of ``remove_and_poll``: the removes' flags and the poll's
    lease.

    Like a :class:`Lease` it is falsy when the poll leased nothing, and
    iterating over it yields the newly leased messages; ``removed`` is what
    ``remove`` would have answered for the ids.
    """

    #: One flag per requested id, in order; ``False`` when the lease no
    #: longer held it (expired: it may be redelivered). Empty for no ids.
    removed: List[bool]
    #: What ``poll`` would have answered: empty (falsy, ``id`` ``b""``) when
    #: nothing was leased.
    lease: Lease

    @property
    def messages(self) -> List[Message]:
        """The newly leased messages (``lease.messages``)."""
        return self.lease.messages

    def __len__(self) -> int:
        return len(self.lease.messages)

    def __iter__(self) -> Iterator[Message]:
        return iter(self.lease.messages)


@dataclass
class Peeked:
    """The result of ``peek``: messages visible now, not leased.

    ``cursor`` is set when more visible messages follow the last one; pass
    it to the next ``peek`` to continue. Iterating yields the messages.
    """

    #: In the order polls would take them; ``delivery_count`` is 0 for a
    #: message never delivered (a peek is not a delivery).
    messages: List[Message] = field(default_factory=list)
    #: Opaque position to continue from; ``None`` at the end.
    cursor: Optional[bytes] = None

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages)


class DeadReason(str, Enum):
    """Why a message was dead-lettered. A ``str``: each member equals the
    protocol's name (``DeadReason.REJECTED == "rejected"``)."""

    #: Its delivery failed (lease expired, released or failed) after the
    #: queue policy's ``max_deliveries`` deliveries.
    MAX_DELIVERIES = "maxDeliveries"
    #: A worker failed it with ``dead=True``.
    REJECTED = "rejected"

    def __str__(self) -> str:
        return str(self.value)


@dataclass
class DeadLetter:
    """A dead-lettered message, as ``peek_dead`` shows it. It is not
    delivered again unless ``redrive`` moves it back."""

    #: 16-byte message id (the same as when it was alive).
    id: bytes
    payload: bytes
    #: Deliveries before it died.
    delivery_count: int
    #: When the message was added, in Unix epoch ms by the server's clock.
    enqueued_at_ms: int
    #: When it was dead-lettered, in Unix epoch ms by the server's clock.
    died_at_ms: int
    #: Why: a :class:`DeadReason` (a ``str``); a reason this client does not
    #: know (from a newer server) is ``"unknown(N)"``, N its number.
    reason: str
    #: The text of the last ``fail`` of it (its first 1 KiB); ``None`` when
    #: no worker reported one (``""`` when one reported an empty text).
    last_error: Optional[str] = None


@dataclass
class DeadPeeked:
    """The result of ``peek_dead``: a queue's dead letters, oldest death
    first.

    ``cursor`` is set when more follow the last one; pass it to the next
    ``peek_dead`` to continue. Iterating yields the dead letters.
    """

    letters: List[DeadLetter] = field(default_factory=list)
    #: Opaque position to continue from; ``None`` at the end.
    cursor: Optional[bytes] = None

    def __len__(self) -> int:
        return len(self.letters)

    def __iter__(self) -> Iterator[DeadLetter]:
        return iter(self.letters)


@dataclass
class Redriven:
    """The result of one ``redrive`` request."""

    #: Dead letters moved back to the queue (visible at once, their
    #: ``delivery_count`` reset to 0).
    moved: int
    #: One request moves at most 1000: more were asked for and remain. Ask
    #: again (``redrive_all`` does).
    more: bool = False


@dataclass
class QueueStats:
    """Counters of one queue (``stats``)."""

    #: Messages a poll can take now.
    visible: int
    #: Messages whose visible time is in the future.
    delayed: int
    #: Messages held by live leases.
    in_flight: int
    #: Age of the message at the head of the queue; ``None`` when nothing is
    #: visible.
    oldest_visible_age_ms: Optional[int]
    #: The server refuses adds for lack of disk space (server-wide).
    disk_full: bool = False
    #: Dead letters (not counted in ``visible``, ``delayed`` or ``in_flight``;
    #: see ``peek_dead`` and ``redrive``). 0 from a server older than them.
    dead: int = 0
    #: Messages the queue policy's ``retention_ms`` dropped, over the
    #: queue's life: a running total, kept across server restarts and
    #: ``purge`` (the dropped messages themselves are gone). 0 from a
    #: server older than retention.
    dropped: int = 0


@dataclass(frozen=True)
class QueueRef:
    """A queue's full name, as ``queues()`` lists it."""

    tenant: str
    queue: str


@dataclass
class Limits:
    """The server's limits, as announced by ``hello``."""

    max_frame_bytes: int
    max_messages_per_add: int
    max_payload_bytes: int
    max_items_per_poll: int
    max_wait_ms: int
    max_in_flight_per_connection: int
    max_connections: int
    #: The longest lease, delay or extension; longer ones are clamped.
    max_duration_ms: int


@dataclass
class ServerInfo:
    """The answer to ``hello``."""

    version: str
    shards: int
    limits: Limits
    #: The server refuses adds for lack of disk space (a snapshot).
    disk_full: bool = False
    #: The server checks tokens (``--auth-file``): everything but ``hello``
    #: and ``auth`` is refused until the connection presents one.
    auth_required: bool = False


#: ``max_depth`` / ``max_bytes`` / ``max_deliveries`` / ``retention_ms`` of
#: a :class:`QueuePolicy` with no bound (2**64 - 1 on the wire), whatever the
#: server's ``--default-*`` are: for ``retention_ms``, messages are kept
#: forever.
UNLIMITED = 0xFFFF_FFFF_FFFF_FFFF

_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


#: Most steps of a retry backoff.
MAX_BACKOFF_STEPS = 8

#: Largest bounded ``max_deliveries`` of a policy (else :data:`UNLIMITED`).
MAX_DELIVERIES_LIMIT = 1000

#: Longest ``retention_ms`` of a policy the server accepts, 10 years in ms
#: (else :data:`UNLIMITED`); the server's longest duration, as for
#: ``lease_ms``.
MAX_RETENTION_MS = 10 * 365 * 24 * 3600 * 1000

#: Most bytes of a ``fail``'s error text the server keeps (and the client
#: sends): the text is cut there, at a character boundary.
MAX_ERROR_BYTES = 1024


def clip_error(text: str) -> str:
    """``text`` cut to its first :data:`MAX_ERROR_BYTES` bytes of UTF-8, at
    a character boundary, as the server keeps it. Characters UTF-8 cannot
    carry (lone surrogates) become ``?``."""
    # A character is at least one byte: the first MAX_ERROR_BYTES characters
    # hold the first MAX_ERROR_BYTES bytes.
    data = text[:MAX_ERROR_BYTES].encode("utf-8", "replace")
    return data[:MAX_ERROR_BYTES].decode("utf-8", "ignore")


@dataclass(frozen=True)
class QueuePolicy:
    """A queue's own settings (``create_queue``, ``set_policy``).

    ``None`` leaves a field to the server's default (its ``--default-*``
    flags; on the wire, 0). A set field is a positive integer: 0 is refused
    here, since on the wire it would mean "unset", not "none allowed".
    """

    #: The lease, in ms, of a ``poll`` that names none (``lease_ms=None``
    #: or 0).
    lease_ms: Optional[int] = None
    #: Most messages the queue holds (visible, delayed and in flight); an
    #: add that would go past it raises ``QueueFull``. :data:`UNLIMITED`
    #: for no bound.
    max_depth: Optional[int] = None
    #: Most payload bytes the queue holds (visible, delayed and in flight);
    #: same refusal. :data:`UNLIMITED` for no bound.
    max_bytes: Optional[int] = None
    #: Largest payload of one message in this queue (``PayloadTooLarge``
    #: over it); at most the server's ``max_payload_bytes``.
    max_payload_bytes: Optional[int] = None
    #: Delays in ms before a message whose delivery failed (its lease
    #: expired, it was released without a delay, or failed) is visible again: the
    #: n-th after the n-th failure, the last repeating; at most 8 steps.
    #: ``None`` (or empty): the server's default, visible at once unless set.
    retry_backoff_ms: Optional[Tuple[int, ...]] = None
    #: Deliveries after which a message whose delivery fails (lease
    #: expired, released, or failed) is dead-lettered instead of coming
    #: back: 1 to 1000, or :data:`UNLIMITED` for never.
    max_deliveries: Optional[int] = None
    #: How long, in ms from its first add, a message may stay before it is
    #: dropped, whether visible, delayed or dead-lettered; a message in
    #: flight is dropped when its lease ends (expired, released or failed)
    #: instead of coming back or being dead-lettered. Dropped messages count
    #: in ``QueueStats.dropped``. :data:`UNLIMITED` to keep messages forever.
    #: A value over :data:`MAX_RETENTION_MS`, other than :data:`UNLIMITED`,
    #: is checked by the server, which refuses it with ``InvalidArgument``.
    retention_ms: Optional[int] = None

    def __post_init__(self) -> None:
        if self.retry_backoff_ms is not None:
            steps = tuple(self.retry_backoff_ms)
            if len(steps) > MAX_BACKOFF_STEPS:
                raise ValueError(f"QueuePolicy.retry_backoff_ms has {len(steps)} steps: "
                                 f"at most {MAX_BACKOFF_STEPS}")
            for step in steps:
                if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _U64_MAX:
                    raise ValueError(f"QueuePolicy.retry_backoff_ms steps must be ints in "
                                     f"0..2**64-1, not {step!r}")
            # Frozen: set through object.__setattr__; empty is unset.
            object.__setattr__(self, "retry_backoff_ms", steps or None)
        for name in ("lease_ms", "max_depth", "max_bytes", "max_payload_bytes", "retention_ms"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"QueuePolicy.{name} must be an int or None, "
                                f"not {type(value).__name__}")
            if not 1 <= value <= _U64_MAX:
                raise ValueError(f"QueuePolicy.{name} must be None (the server's default) "
                                 f"or 1..2**64-1, not {value}")
        value = self.max_deliveries
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"QueuePolicy.max_deliveries must be an int or None, "
                                f"not {type(value).__name__}")
            if not (1 <= value <= MAX_DELIVERIES_LIMIT or value == UNLIMITED):
                raise ValueError(f"QueuePolicy.max_deliveries must be None (the server's "
                                 f"default), 1..{MAX_DELIVERIES_LIMIT} or UNLIMITED, not {value}")


@dataclass(frozen=True)
class PolicyInfo:
    """A queue's policy as ``get_policy`` and ``set_policy`` answer it."""

    #: 0 until a policy is set (by ``create_queue`` or ``set_policy``);
    #: one more with every change.
    version: int
    #: As stored: ``None`` where the queue leaves a field to the server.
    policy: QueuePolicy
    #: What applies: every field set, the queue's own or else the server's
    #: default (``max_depth``/``max_bytes``/``max_deliveries``
    #: :data:`UNLIMITED` when unbounded, ``retention_ms`` when messages are
    #: kept forever; ``retry_backoff_ms`` ``None`` when there is none).
    effective: QueuePolicy


@dataclass(frozen=True)
class QueueCreated:
    """The answer to ``create_queue``."""

    #: The queue is new; ``False``: it already existed with this policy.
    created: bool
    policy: PolicyInfo
