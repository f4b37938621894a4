"""Wire codec: Cap'n Proto stream framing, request encoders, reply decoder.

The schema is ``queueber.capnp`` shipped inside this package, a byte-for-byte
copy of the repository's (a test checks it). Requests and responses are
single Cap'n Proto messages in the standard (unpacked) stream framing, one
after another on the TCP stream (docs/protocol.md, section 2).

Frames are split by hand from the read buffer (the segment table gives the
length) so that one ``data_received`` can hand many replies to the decoder
without pycapnp's stream helpers.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import capnp  # type: ignore[import-untyped]

from .errors import Internal, UnknownOperation, error_for_code
from .types import (DeadLetter, DeadPeeked, DeadReason, Lease, Limits, Message, NewMessage,
                    Payload, Peeked, PolicyInfo, QueueCreated, QueuePolicy, QueueRef, QueueStats,
                    Redriven, RemovedAndPolled, ServerInfo, clip_error)

SCHEMA_PATH = Path(__file__).with_name("queueber.capnp")
schema: Any = capnp.load(str(SCHEMA_PATH))
_Request: Any = schema.Request
_Response: Any = schema.Response

#: The server accepts 1-511 segments; a reply claiming more has lost framing.
MAX_SEGMENTS = 511

#: Traversal limit for decoding replies, in 8-byte words. Replies are bounded
#: by the server's frame limit except ``listQueues``, which is not; 1 GiB
#: matches the Rust client.
TRAVERSAL_LIMIT_WORDS = (1 << 30) // 8

_U32 = struct.Struct("<I")


class FramingError(Exception):
    """The byte stream from the server is not a sequence of frames."""


def frame_length(buf: Union[bytes, bytearray], pos: int) -> int:
    """Length of the frame starting at ``buf[pos]``, or 0 if its segment
    table has not fully arrived yet. The frame itself may still be partial:
    compare with the bytes available."""
    avail = len(buf) - pos
    if avail < 8:
        return 0
    nseg: int = _U32.unpack_from(buf, pos)[0] + 1
    if nseg == 1:  # the common case: one segment, 8-byte table
        size0: int = _U32.unpack_from(buf, pos + 4)[0]
        return 8 + 8 * size0
    if nseg > MAX_SEGMENTS:
        raise FramingError(f"frame with {nseg} segments")
    table = 4 * (nseg + 1) + (4 if nseg % 2 == 0 else 0)
    if avail < table:
        return 0
    sizes: Tuple[int, ...] = struct.unpack_from(f"<{nseg}I", buf, pos + 4)
    return table + 8 * sum(sizes)


# --- requests ---------------------------------------------------------------
#
# Each encoder returns the whole frame for one Request. The tenant and queue
# are passed through as given: an empty one means "default" on the server.


def _new(rid: int) -> Any:
    req = _Request.new_message()
    req.id = rid
    return req


def _queue(ref: Any, tenant: str, queue: str) -> None:
    ref.tenant = tenant
    ref.queue = queue


def _payload_bytes(p: Payload) -> bytes:
    if isinstance(p, str):
        return p.encode()
    return p if isinstance(p, bytes) else bytes(p)


def encode_hello(rid: int) -> bytes:
    req = _new(rid)
    req.hello = None
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_list_queues(rid: int) -> bytes:
    req = _new(rid)
    req.listQueues = None
    return req.to_bytes()  # type: ignore[no-any-return]


_NM = schema.NewMessage.schema.fields
_NM_PAYLOAD, _NM_DELAY = _NM["payload"], _NM["delayMs"]


def encode_add(rid: int, tenant: str, queue: str,
               messages: Sequence[Union[Payload, NewMessage]], delay_ms: int) -> bytes:
    req = _new(rid)
    add = req.init("add")
    _queue(add.queue, tenant, queue)
    out = add.init("messages", len(messages))
    for i, m in enumerate(messages):
        slot = out[i]
        if m.__class__ is bytes:  # the common case first
            slot._set_by_field(_NM_PAYLOAD, m)
            if delay_ms:
                slot._set_by_field(_NM_DELAY, delay_ms)
        elif isinstance(m, NewMessage):
            slot._set_by_field(_NM_PAYLOAD, _payload_bytes(m.payload))
            if m.delay_ms:
                slot._set_by_field(_NM_DELAY, m.delay_ms)
        else:
            slot._set_by_field(_NM_PAYLOAD, _payload_bytes(m))
            if delay_ms:
                slot._set_by_field(_NM_DELAY, delay_ms)
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_poll(rid: int, tenant: str, queue: str, max_items: int, lease_ms: int,
                wait_ms: int) -> bytes:
    req = _new(rid)
    poll = req.init("poll")
    _queue(poll.queue, tenant, queue)
    poll.maxItems = max_items
    poll.leaseMs = lease_ms
    poll.waitMs = wait_ms
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_remove(rid: int, tenant: str, queue: str, lease: bytes,
                  ids: List[bytes]) -> bytes:
    req = _new(rid)
    rm = req.init("remove")
    _queue(rm.queue, tenant, queue)
    rm.lease = lease
    rm.ids = ids
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_remove_and_poll(rid: int, tenant: str, queue: str, lease: bytes, ids: List[bytes],
                           max_items: int, lease_ms: int, wait_ms: int) -> bytes:
    """``removeAndPoll``: ``ids`` removed under ``lease`` (both may be
    empty: then it is a plain poll), then the poll."""
    req = _new(rid)
    rp = req.init("removeAndPoll")
    _queue(rp.queue, tenant, queue)
    if lease:
        rp.lease = lease
    if ids:
        rp.ids = ids
    rp.maxItems = max_items
    rp.leaseMs = lease_ms
    rp.waitMs = wait_ms
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_extend(rid: int, tenant: str, queue: str, lease: bytes, lease_ms: int) -> bytes:
    req = _new(rid)
    ext = req.init("extend")
    _queue(ext.queue, tenant, queue)
    ext.lease = lease
    ext.leaseMs = lease_ms
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_release(rid: int, tenant: str, queue: str, lease: bytes, mid: bytes,
                   delay_ms: int) -> bytes:
    req = _new(rid)
    rel = req.init("release")
    _queue(rel.queue, tenant, queue)
    rel.lease = lease
    rel.id = mid
    rel.delayMs = delay_ms
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_peek(rid: int, tenant: str, queue: str, max_items: int,
                cursor: Optional[bytes], dead: bool = False) -> bytes:
    req = _new(rid)
    peek = req.init("peek")
    _queue(peek.queue, tenant, queue)
    peek.maxItems = max_items
    if cursor:
        peek.cursor = cursor
    if dead:
        peek.dead = True
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_fail(rid: int, tenant: str, queue: str, lease: bytes, mid: bytes, error: str,
                dead: bool) -> bytes:
    req = _new(rid)
    fail = req.init("fail")
    _queue(fail.queue, tenant, queue)
    fail.lease = lease
    fail.id = mid
    if error:
        fail.error = clip_error(error)
    fail.dead = dead
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_redrive(rid: int, tenant: str, queue: str, max_: int, ids: List[bytes]) -> bytes:
    req = _new(rid)
    rd = req.init("redrive")
    _queue(rd.queue, tenant, queue)
    rd.max = max_
    if ids:
        rd.ids = ids
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_auth(rid: int, token: str) -> bytes:
    req = _new(rid)
    req.init("auth").token = token
    return req.to_bytes()  # type: ignore[no-any-return]


def _set_policy(b: Any, policy: Optional[QueuePolicy]) -> None:
    """A QueuePolicy struct: ``None`` (the policy or a field) is 0, unset."""
    if policy is None:
        return
    if not isinstance(policy, QueuePolicy):
        raise TypeError(f"policy must be a QueuePolicy or None, not {type(policy).__name__}")
    b.leaseMs = policy.lease_ms or 0
    b.maxDepth = policy.max_depth or 0
    b.maxBytes = policy.max_bytes or 0
    b.maxPayloadBytes = policy.max_payload_bytes or 0
    b.maxDeliveries = policy.max_deliveries or 0
    b.retentionMs = policy.retention_ms or 0
    steps = policy.retry_backoff_ms or ()
    if steps:
        backoff = b.init("retryBackoffMs", len(steps))
        for i, step in enumerate(steps):
            backoff[i] = step


def encode_create_queue(rid: int, tenant: str, queue: str,
                        policy: Optional[QueuePolicy]) -> bytes:
    req = _new(rid)
    cq = req.init("createQueue")
    _queue(cq.queue, tenant, queue)
    _set_policy(cq.init("policy"), policy)
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_set_policy(rid: int, tenant: str, queue: str, policy: QueuePolicy) -> bytes:
    req = _new(rid)
    sp = req.init("setPolicy")
    _queue(sp.queue, tenant, queue)
    _set_policy(sp.init("policy"), policy)
    return req.to_bytes()  # type: ignore[no-any-return]


def encode_queue_op(rid: int, op: str, tenant: str, queue: str) -> bytes:
    """``stats``, ``purge``, ``delete`` or ``getPolicy``: a request that is
    just a QueueRef."""
    req = _new(rid)
    _queue(req.init(op), tenant, queue)
    return req.to_bytes()  # type: ignore[no-any-return]


# --- replies ----------------------------------------------------------------
#
# Readers are accessed with pycapnp's ``_get``/``_get_by_field`` rather than
# attributes: attribute access goes through a generic lookup that costs
# about three times as much, and poll replies are the client's hot path.
# Each converter copies what it needs out of the reader, which is only
# valid inside ``from_bytes``' context.

_PM = schema.PolledMessage.schema.fields
_PM_ID, _PM_PAYLOAD, _PM_COUNT, _PM_ENQUEUED = (
    _PM["id"], _PM["payload"], _PM["deliveryCount"], _PM["enqueuedAtMs"])


def _limits(lim: Any) -> Limits:
    g = lim._get
    return Limits(
        max_frame_bytes=g("maxFrameBytes"),
        max_messages_per_add=g("maxMessagesPerAdd"),
        max_payload_bytes=g("maxPayloadBytes"),
        max_items_per_poll=g("maxItemsPerPoll"),
        max_wait_ms=g("maxWaitMs"),
        max_in_flight_per_connection=g("maxInFlightPerConnection"),
        max_connections=g("maxConnections"),
        max_duration_ms=g("maxDurationMs"),
    )


def _hello(h: Any) -> ServerInfo:
    g = h._get
    return ServerInfo(g("version"), g("shards"), _limits(g("limits")), g("diskFull"),
                      g("authRequired"))


def _poll(p: Any) -> Tuple[bytes, int, List[Message]]:
    g = p._get
    return (g("lease"), g("expiresAtMs"),
            [Message(m._get_by_field(_PM_ID), m._get_by_field(_PM_PAYLOAD),
                     m._get_by_field(_PM_COUNT), m._get_by_field(_PM_ENQUEUED))
             for m in g("messages")])


def _remove_and_poll(r: Any) -> Tuple[List[bool], Tuple[bytes, int, List[Message]]]:
    """A removeAndPoll reply as (removed flags, the poll part as ``_poll``)."""
    return list(r._get("removed")), _poll(r._get("poll"))


def leased(kind: str, value: Any) -> Optional[Tuple[bytes, int, List[Message]]]:
    """The poll part, (lease, expiry, messages), of a decoded ``poll`` or
    ``removeAndPoll`` reply; ``None`` for any other kind."""
    if kind == "poll":
        return value  # type: ignore[no-any-return]
    if kind == "removeAndPoll":
        return value[1]  # type: ignore[no-any-return]
    return None


def removed_and_polled(reply: Tuple[List[bool], Tuple[bytes, int, List[Message]]]
                       ) -> RemovedAndPolled:
    """The result of a ``remove_and_poll`` from its decoded reply."""
    removed, (lease, expires, messages) = reply
    return RemovedAndPolled(removed, Lease(lease, expires, messages))


_DEAD_REASONS = {0: DeadReason.MAX_DELIVERIES, 1: DeadReason.REJECTED}


def _dead_letter(d: Any) -> DeadLetter:
    g = d._get
    raw: int = g("reason").raw
    return DeadLetter(g("id"), g("payload"), g("deliveryCount"), g("enqueuedAtMs"),
                      g("diedAtMs"), _DEAD_REASONS.get(raw) or f"unknown({raw})",
                      g("lastError") if g("hasError") else None)


def _peek(p: Any) -> Tuple[List[Message], List[DeadLetter], Optional[bytes]]:
    """A peek reply as (messages, dead letters, cursor): a peek at the
    visible messages has no dead letters, one at the dead no messages."""
    g = p._get
    return ([Message(m._get_by_field(_PM_ID), m._get_by_field(_PM_PAYLOAD),
                     m._get_by_field(_PM_COUNT), m._get_by_field(_PM_ENQUEUED))
             for m in g("messages")],
            [_dead_letter(d) for d in g("dead")],
            g("cursor") or None)


def peeked(reply: Tuple[List[Message], List[DeadLetter], Optional[bytes]]) -> Peeked:
    """The result of a ``peek`` from its decoded reply."""
    messages, _dead, cursor = reply
    return Peeked(messages, cursor)


def dead_peeked(reply: Tuple[List[Message], List[DeadLetter], Optional[bytes]]) -> DeadPeeked:
    """The result of a ``peek`` with ``dead`` from its decoded reply.

    A server older than dead letters ignores ``dead`` and answers the
    visible messages: that is raised as
    :class:`~queueber.errors.UnknownOperation` rather than passed off as
    "no dead letters"."""
    messages, letters, cursor = reply
    if messages:
        raise UnknownOperation("the server answered a peek at the dead letters with visible "
                               "messages: it is older than dead letters")
    return DeadPeeked(letters, cursor)


def _extend(e: Any) -> Optional[int]:
    expires: int = e._get("expiresAtMs")
    return expires if e._get("extended") else None


def _stats(s: Any) -> QueueStats:
    g = s._get
    return QueueStats(g("visible"), g("delayed"), g("inFlight"),
                      g("oldestVisibleAgeMs") if g("hasVisible") else None, g("diskFull"),
                      g("dead"), g("dropped"))


def _policy(p: Any) -> QueuePolicy:
    """A policy as the server sent it. Not checked like one made by the
    caller: a newer server's wider range (more backoff steps, more
    deliveries) must not make the reply unreadable."""
    g = p._get
    policy: QueuePolicy = object.__new__(QueuePolicy)
    for name, value in (("lease_ms", g("leaseMs") or None), ("max_depth", g("maxDepth") or None),
                        ("max_bytes", g("maxBytes") or None),
                        ("max_payload_bytes", g("maxPayloadBytes") or None),
                        ("retry_backoff_ms", tuple(g("retryBackoffMs")) or None),
                        ("max_deliveries", g("maxDeliveries") or None),
                        ("retention_ms", g("retentionMs") or None)):
        object.__setattr__(policy, name, value)
    return policy


def _policy_info(r: Any) -> PolicyInfo:
    g = r._get
    return PolicyInfo(g("version"), _policy(g("policy")), _policy(g("effective")))


def _queue_refs(refs: Any) -> List[QueueRef]:
    return [QueueRef(q._get("tenant"), q._get("queue")) for q in refs]


# Reply kind -> converter of that union member's value.
_CONVERT: Any = {
    "hello": _hello,
    "add": lambda a: list(a._get("ids")),
    "poll": _poll,
    "remove": lambda r: list(r._get("removed")),
    "removeAndPoll": _remove_and_poll,
    "extend": _extend,
    "release": lambda r: r._get("released"),
    "stats": _stats,
    "listQueues": _queue_refs,
    "purge": lambda p: p._get("purged"),
    "peek": _peek,
    "auth": lambda a: a._get("tenant"),
    "createQueue": lambda r: QueueCreated(r._get("created"), _policy_info(r)),
    "getPolicy": _policy_info,
    "setPolicy": _policy_info,
    "fail": lambda f: f._get("failed"),
    "redrive": lambda r: Redriven(r._get("moved"), r._get("more")),
}


def decode(frame: bytes) -> Tuple[int, str, Any]:
    """Decode one reply frame into ``(id, kind, value)``.

    ``kind`` is the ``Response`` union member (``"poll"``, ``"error"``, ...)
    and ``value`` its content as Python values; for ``"error"`` it is the
    :class:`~queueber.errors.QueueberError` to raise. A reply whose id is
    readable but whose content is not (an unknown union member, a bad
    pointer) decodes as an :class:`~queueber.errors.Internal` error for that
    id, as the protocol asks. Raises :class:`FramingError` only when not
    even the id can be read.
    """
    try:
        with _Response.from_bytes(frame, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS) as r:
            rid: int = r._get("id")
            try:
                kind: str = r._which_str()
                if kind == "delete":  # Void
                    return rid, kind, None
                value = r._get(kind)
                if kind == "error":
                    return rid, kind, error_for_code(value._get("code").raw, value._get("message"),
                                                     connection_level=rid == 0)
                return rid, kind, _CONVERT[kind](value)
            except Exception as e:  # a reply this client cannot read
                return rid, "error", Internal(f"unreadable reply: {e}")
    except capnp.KjException as e:
        raise FramingError(f"unreadable reply frame: {e}") from e


def lease_bytes(lease: Any) -> bytes:
    """A lease id from a :class:`~queueber.types.Lease` or raw bytes."""
    lid = getattr(lease, "id", lease)
    return bytes(lid)


def id_list(ids: Iterable[Any]) -> List[bytes]:
    """Message ids from :class:`~queueber.types.Message` objects or raw bytes."""
    return [m if isinstance(m, bytes) else bytes(getattr(m, "id", m)) for m in ids]

