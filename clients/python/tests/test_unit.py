"""Unit tests that need no server: error mapping, codec and framing."""

import asyncio
import copy
import struct
from typing import List

import pytest

import queueber
import queueber._wire as wire
from queueber import errors

CODES = {
    "internal": (0, errors.Internal),
    "invalidArgument": (1, errors.InvalidArgument),
    "invalidName": (2, errors.InvalidName),
    "unknownQueue": (3, errors.UnknownQueue),
    "payloadTooLarge": (4, errors.PayloadTooLarge),
    "tooManyMessages": (5, errors.TooManyMessages),
    "frameTooLarge": (6, errors.FrameTooLarge),
    "malformedFrame": (7, errors.MalformedFrame),
    "unknownOperation": (8, errors.UnknownOperation),
    "tooManyInFlight": (9, errors.TooManyInFlight),
    "shuttingDown": (10, errors.ShuttingDown),
    "unavailable": (11, errors.Unavailable),
    "diskFull": (12, errors.DiskFull),
    "unauthenticated": (13, errors.Unauthenticated),
    "permissionDenied": (14, errors.PermissionDenied),
    "queueFull": (15, errors.QueueFull),
}


def test_every_schema_error_code_has_a_class() -> None:
    enumerants = wire.schema.ErrorCode.schema.enumerants
    assert dict(enumerants) == {name: num for name, (num, _cls) in CODES.items()}


def error_reply(rid: int, code: str, message: str) -> bytes:
    resp = wire.schema.Response.new_message()
    resp.id = rid
    err = resp.init("error")
    err.code = code
    err.message = message
    return resp.to_bytes()


@pytest.mark.parametrize("code", sorted(CODES))
def test_error_reply_decodes_to_its_class(code: str) -> None:
    number, cls = CODES[code]
    rid, kind, err = wire.decode(error_reply(7, code, f"the {code} message"))
    assert (rid, kind) == (7, "error")
    assert type(err) is cls
    assert isinstance(err, queueber.QueueberError)
    assert err.code == code and err.code_number == number
    assert err.message == f"the {code} message"
    assert str(err) == f"{code}: the {code} message"
    assert not err.connection_level


def test_id_zero_errors_are_connection_level() -> None:
    _rid, _kind, err = wire.decode(error_reply(0, "unavailable", "too many connections"))
    assert type(err) is errors.Unavailable and err.connection_level


def test_unknown_error_code_is_internal() -> None:
    # An ErrorCode from a newer server: patch the Error struct's code. The
    # root struct (2 data words, 1 pointer) starts at segment word 1; its
    # pointer (segment word 3) locates the Error, whose code is its first u16.
    frame = bytearray(error_reply(3, "internal", "a newer server's code"))
    ptr = struct.unpack_from("<i", frame, 8 + 3 * 8)[0]  # offset<<2 | kind
    error_word = 3 + 1 + (ptr >> 2)
    struct.pack_into("<H", frame, 8 + 8 * error_word, 99)
    _rid, _kind, err = wire.decode(bytes(frame))
    assert type(err) is errors.Internal
    assert err.code == "internal" and err.code_number == 99
    assert "a newer server's code" in err.message


def test_errors_copy_keeps_their_attributes() -> None:
    err = errors.FrameTooLarge("frame of 70000 bytes", connection_level=True)
    dup = copy.copy(err)
    assert type(dup) is errors.FrameTooLarge and dup.connection_level and dup.message == err.message
    odd = errors.error_for_code(42, "x")
    assert copy.copy(odd).code_number == 42


def test_connection_closed_is_a_connection_error() -> None:
    assert issubclass(errors.ConnectionClosed, ConnectionError)
    assert issubclass(errors.ConnectTimeout, TimeoutError)
    assert issubclass(errors.ConnectTimeout, queueber.QueueberError)


def test_retryable_codes() -> None:
    retryable = {c for c, (_n, cls) in CODES.items() if cls.retryable}
    assert retryable == {"internal", "tooManyInFlight", "shuttingDown", "unavailable", "diskFull",
                         "queueFull"}


def test_unknown_reply_member_fails_only_that_request() -> None:
    resp = wire.schema.Response.new_message()
    resp.id = 5
    resp.delete = None
    frame = bytearray(resp.to_bytes())
    # The union discriminant is the u16 at data word 1 of the root struct:
    # 8 bytes of segment table + 8 of root pointer + 8 of id.
    struct.pack_into("<H", frame, 24, 200)
    rid, kind, err = wire.decode(bytes(frame))
    assert (rid, kind) == (5, "error") and type(err) is errors.Internal
    assert "unreadable reply" in err.message


def test_hello_request_matches_the_protocol_example() -> None:
    # docs/protocol.md, "Example: a hello request".
    assert wire.encode_hello(1).hex() == (
        "00000000" "04000000" "0000000002000100" "0100000000000000"
        "0000000000000000" "0000000000000000")


def test_frame_length() -> None:
    one = wire.encode_hello(1)
    assert wire.frame_length(one, 0) == len(one) == 40
    assert wire.frame_length(one[:7], 0) == 0  # table incomplete
    assert wire.frame_length(one[:20], 0) == 40  # table complete, body partial
    # Two segments: count-1 = 1, sizes 3 and 2, padding to 16 bytes.
    two = struct.pack("<IIII", 1, 3, 2, 0) + bytes(40)
    assert wire.frame_length(two, 0) == 56
    assert wire.frame_length(two[:12], 0) == 0
    # Frames back to back.
    assert wire.frame_length(one + two, 40) == 56
    with pytest.raises(wire.FramingError):
        wire.frame_length(struct.pack("<II", 999, 1), 0)


def test_multi_segment_reply_decodes() -> None:
    # pycapnp starts a new segment for large messages, as the Rust server does.
    resp = wire.schema.Response.new_message()
    resp.id = 9
    poll = resp.init("poll")
    poll.lease = b"L" * 16
    msgs = poll.init("messages", 40)
    for i, m in enumerate(msgs):
        m.id = bytes([i]) * 16
        m.payload = bytes([i]) * 500
        m.deliveryCount = 1
    frame = resp.to_bytes()
    assert struct.unpack_from("<I", frame)[0] >= 1  # more than one segment
    assert wire.frame_length(frame, 0) == len(frame)
    rid, kind, (lease, _exp, messages) = wire.decode(frame)
    assert (rid, kind, lease) == (9, "poll", b"L" * 16)
    assert [m.payload[0] for m in messages] == list(range(40))


def test_add_rejects_a_bare_payload() -> None:
    client = queueber.aio.Client()
    with pytest.raises(TypeError):
        asyncio.run(client.add("q", b"not a list"))  # type: ignore[arg-type]


def test_parse_address() -> None:
    from queueber.aio import parse_address
    assert parse_address("127.0.0.1:7420") == ("127.0.0.1", 7420)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert parse_address(("h", 1)) == ("h", 1)
    with pytest.raises(ValueError):
        parse_address("nohost")


def test_queue_policy_fields_are_unset_or_positive() -> None:
    assert queueber.QueuePolicy() == queueber.QueuePolicy(None, None, None, None)
    queueber.QueuePolicy(lease_ms=1, max_depth=queueber.UNLIMITED, max_bytes=2 ** 64 - 1)
    assert queueber.UNLIMITED == 2 ** 64 - 1
    for bad in (0, -1, 2 ** 64):
        with pytest.raises(ValueError):
            queueber.QueuePolicy(max_depth=bad)
    for wrong in ("5", 1.5, True):
        with pytest.raises(TypeError):
            queueber.QueuePolicy(lease_ms=wrong)  # type: ignore[arg-type]


def test_policy_requests_encode_unset_fields_as_zero() -> None:
    policy = queueber.QueuePolicy(lease_ms=1500, max_bytes=queueber.UNLIMITED)
    with wire.schema.Request.from_bytes(wire.encode_create_queue(4, "t", "q", policy)) as r:
        assert r.which() == "createQueue" and r.id == 4
        cq = r.createQueue
        assert (cq.queue.tenant, cq.queue.queue) == ("t", "q")
        p = cq.policy
        assert (p.leaseMs, p.maxDepth, p.maxBytes, p.maxPayloadBytes) == (
            1500, 0, 2 ** 64 - 1, 0)
    with wire.schema.Request.from_bytes(wire.encode_create_queue(5, "t", "q", None)) as r:
        p = r.createQueue.policy
        assert (p.leaseMs, p.maxDepth, p.maxBytes, p.maxPayloadBytes) == (0, 0, 0, 0)
    with wire.schema.Request.from_bytes(wire.encode_set_policy(6, "t", "q", policy)) as r:
        assert r.which() == "setPolicy" and r.setPolicy.policy.leaseMs == 1500
    with wire.schema.Request.from_bytes(wire.encode_queue_op(7, "getPolicy", "t", "q")) as r:
        assert r.which() == "getPolicy" and r.getPolicy.queue == "q"
    with pytest.raises(TypeError):
        wire.encode_set_policy(8, "t", "q", {"max_depth": 3})  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["createQueue", "getPolicy", "setPolicy"])
def test_policy_replies_decode(kind: str) -> None:
    resp = wire.schema.Response.new_message()
    resp.id = 11
    reply = resp.init(kind)
    reply.version = 3
    reply.policy.maxDepth = 10
    eff = reply.effective
    eff.leaseMs, eff.maxDepth, eff.maxBytes, eff.maxPayloadBytes = 30000, 10, 2 ** 64 - 1, 1024
    reply.created = True
    rid, got_kind, value = wire.decode(resp.to_bytes())
    assert (rid, got_kind) == (11, kind)
    info = queueber.PolicyInfo(
        3, queueber.QueuePolicy(max_depth=10),
        queueber.QueuePolicy(30000, 10, queueber.UNLIMITED, 1024))
    if kind == "createQueue":
        assert value == queueber.QueueCreated(True, info)
    else:
        assert value == info


# --- dead letters ---------------------------------------------------------------

def test_clip_error_cuts_at_1_kib_on_a_character_boundary() -> None:
    from queueber.types import MAX_ERROR_BYTES, clip_error
    assert MAX_ERROR_BYTES == 1024
    assert clip_error("") == "" and clip_error("short") == "short"
    assert clip_error("x" * 1024) == "x" * 1024
    assert clip_error("x" * 1025) == "x" * 1024
    assert clip_error("é" * 600) == "é" * 512  # 2 bytes each
    assert clip_error("x" * 1022 + "€") == "x" * 1022  # 3 bytes would pass 1024
    assert clip_error("x" * 1021 + "€") == "x" * 1021 + "€"
    assert clip_error("bad \udc80 surrogate") == "bad ? surrogate"  # not UTF-8: replaced


def test_worker_error_text() -> None:
    from queueber.worker import error_text
    assert error_text(None) == ""
    assert error_text("as is") == "as is"
    assert error_text(ValueError("bad row 7")) == "ValueError: bad row 7"
    assert error_text(KeyError("k")) == "KeyError: 'k'"
    assert error_text(RuntimeError()) == "RuntimeError"
    assert len(error_text(ValueError("x" * 5000)).encode()) == 1024

    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    assert error_text(Broken()) == "Broken"


def test_fail_and_redrive_requests_encode() -> None:
    lease, mid = b"L" * 16, b"M" * 16
    with wire.schema.Request.from_bytes(
            wire.encode_fail(3, "t", "q", lease, mid, "é" * 600, True)) as r:
        assert r.which() == "fail" and r.id == 3
        f = r.fail
        assert (f.queue.tenant, f.queue.queue, f.lease, f.id, f.dead) == ("t", "q", lease, mid,
                                                                          True)
        assert f.error == "é" * 512  # cut before sending
    with wire.schema.Request.from_bytes(wire.encode_fail(4, "t", "q", lease, mid, "", False)) as r:
        assert (r.fail.error, r.fail.dead) == ("", False)
    with wire.schema.Request.from_bytes(wire.encode_redrive(5, "t", "q", 7, [])) as r:
        assert r.which() == "redrive" and (r.redrive.max, len(r.redrive.ids)) == (7, 0)
    with wire.schema.Request.from_bytes(wire.encode_redrive(6, "t", "q", 0, [mid, lease])) as r:
        assert list(r.redrive.ids) == [mid, lease]
    with wire.schema.Request.from_bytes(wire.encode_peek(7, "t", "q", 5, None, True)) as r:
        assert r.peek.dead and r.peek.maxItems == 5
    with wire.schema.Request.from_bytes(wire.encode_peek(8, "t", "q", 5, b"c" * 24)) as r:
        assert not r.peek.dead and r.peek.cursor == b"c" * 24


def peek_reply(rid: int, dead: int = 0, messages: int = 0) -> bytes:
    resp = wire.schema.Response.new_message()
    resp.id = rid
    peek = resp.init("peek")
    peek.cursor = b"C" * 24
    for i, m in enumerate(peek.init("messages", messages)):
        m.id = bytes([i]) * 16
        m.payload = b"alive"
    letters = peek.init("dead", dead)
    for i, d in enumerate(letters):
        d.id = bytes([i]) * 16
        d.payload = b"p%d" % i
        d.deliveryCount = 3
        d.enqueuedAtMs = 100
        d.diedAtMs = 200 + i
        d.reason = "rejected" if i % 2 else "maxDeliveries"
        if i:
            d.hasError = True
            d.lastError = "boom %d" % i if i > 1 else ""
    return resp.to_bytes()  # type: ignore[no-any-return]


def test_peek_dead_reply_decodes() -> None:
    rid, kind, reply = wire.decode(peek_reply(4, dead=3))
    assert (rid, kind) == (4, "peek")
    peeked = wire.dead_peeked(reply)
    assert isinstance(peeked, queueber.DeadPeeked) and peeked.cursor == b"C" * 24
    assert peeked.letters == [
        queueber.DeadLetter(b"\x00" * 16, b"p0", 3, 100, 200, queueber.DeadReason.MAX_DELIVERIES,
                            None),
        queueber.DeadLetter(b"\x01" * 16, b"p1", 3, 100, 201, queueber.DeadReason.REJECTED, ""),
        queueber.DeadLetter(b"\x02" * 16, b"p2", 3, 100, 202, "maxDeliveries", "boom 2"),
    ]
    assert [str(d.reason) for d in peeked] == ["maxDeliveries", "rejected", "maxDeliveries"]
    # The same reply kind carries visible messages for a plain peek.
    plain = wire.peeked(wire.decode(peek_reply(5, messages=2))[2])
    assert [m.payload for m in plain] == [b"alive", b"alive"] and plain.cursor == b"C" * 24


def test_peek_dead_at_an_older_server_is_unknown_operation() -> None:
    # An older server ignores `dead` and answers the visible messages.
    _rid, _kind, reply = wire.decode(peek_reply(6, messages=1))
    with pytest.raises(errors.UnknownOperation):
        wire.dead_peeked(reply)
    # No messages and no dead letters: simply none.
    empty = wire.dead_peeked(wire.decode(peek_reply(7))[2])
    assert len(empty) == 0


def test_unknown_dead_reason_still_decodes() -> None:
    # A DeadReason from a newer server: patch the second letter's reason
    # (rejected = 1). A DeadLetter's data section: deliveryCount u32 at byte
    # 0, reason u16 at byte 4, enqueuedAtMs at 8, diedAtMs (201) at 16.
    frame = bytearray(peek_reply(8, dead=2))
    reason_at = frame.index(struct.pack("<Q", 201)) - 16 + 4
    assert struct.unpack_from("<H", frame, reason_at)[0] == 1
    struct.pack_into("<H", frame, reason_at, 9)
    _rid, kind, reply = wire.decode(bytes(frame))
    assert kind == "peek"
    assert [d.reason for d in wire.dead_peeked(reply)] == ["maxDeliveries", "unknown(9)"]


def test_stats_and_redrive_and_fail_replies_decode() -> None:
    resp = wire.schema.Response.new_message()
    resp.id = 2
    st = resp.init("stats")
    st.visible, st.dead = 4, 7
    assert wire.decode(resp.to_bytes())[2] == queueber.QueueStats(4, 0, 0, None, False, 7)
    resp = wire.schema.Response.new_message()
    resp.id = 2
    st = resp.init("stats")
    st.visible, st.dead, st.dropped = 4, 7, 12
    stats = wire.decode(resp.to_bytes())[2]
    assert stats == queueber.QueueStats(4, 0, 0, None, False, 7, 12) and stats.dropped == 12
    resp = wire.schema.Response.new_message()
    resp.id = 3
    rd = resp.init("redrive")
    rd.moved, rd.more = 1000, True
    assert wire.decode(resp.to_bytes()) == (3, "redrive", queueber.Redriven(1000, True))
    resp = wire.schema.Response.new_message()
    resp.id = 4
    resp.init("fail").failed = True
    assert wire.decode(resp.to_bytes()) == (4, "fail", True)


def test_policy_max_deliveries_encodes_and_decodes_unchecked() -> None:
    policy = queueber.QueuePolicy(max_deliveries=5)
    with wire.schema.Request.from_bytes(wire.encode_set_policy(1, "t", "q", policy)) as r:
        assert r.setPolicy.policy.maxDeliveries == 5
    with wire.schema.Request.from_bytes(wire.encode_set_policy(2, "t", "q",
                                                               queueber.QueuePolicy())) as r:
        assert r.setPolicy.policy.maxDeliveries == 0
    resp = wire.schema.Response.new_message()
    resp.id = 9
    reply = resp.init("getPolicy")
    reply.policy.maxDeliveries = 5000  # over this client's range: a newer server's
    reply.effective.maxDeliveries = 2 ** 64 - 1
    reply.effective.retryBackoffMs = list(range(1, 11))  # more steps than 8, likewise
    _rid, _kind, info = wire.decode(resp.to_bytes())
    assert isinstance(info, queueber.PolicyInfo)
    assert info.policy.max_deliveries == 5000
    assert info.effective.max_deliveries == queueber.UNLIMITED
    assert info.effective.retry_backoff_ms == tuple(range(1, 11))
    # Every field is set on a decoded policy (compare and hash work).
    assert info.policy == info.policy and hash(info.effective) == hash(info.effective)
    assert queueber.QueuePolicy(max_deliveries=5) == wire._policy(
        wire.schema.QueuePolicy.new_message(maxDeliveries=5))


# --- retention ------------------------------------------------------------------

def test_queue_policy_retention_ms_is_unset_positive_or_unlimited() -> None:
    assert queueber.QueuePolicy().retention_ms is None
    assert queueber.MAX_RETENTION_MS == 315_360_000_000  # 10 years, the server's longest
    for good in (1, 300, queueber.MAX_RETENTION_MS, queueber.UNLIMITED):
        assert queueber.QueuePolicy(retention_ms=good).retention_ms == good
    # Over 10 years (and not UNLIMITED) is the server's to refuse, like a
    # lease over its longest: accepted here.
    assert queueber.QueuePolicy(retention_ms=10 ** 13).retention_ms == 10 ** 13
    for bad in (0, -1, 2 ** 64):
        with pytest.raises(ValueError, match="retention_ms"):
            queueber.QueuePolicy(retention_ms=bad)
    for wrong in ("300", 1.5, True, False):
        with pytest.raises(TypeError, match="retention_ms"):
            queueber.QueuePolicy(retention_ms=wrong)  # type: ignore[arg-type]
    # A field of its own: the policies differ, and hash apart.
    assert queueber.QueuePolicy(retention_ms=5) != queueber.QueuePolicy()
    assert queueber.QueuePolicy(retention_ms=5) == queueber.QueuePolicy(retention_ms=5)
    assert len({queueber.QueuePolicy(retention_ms=5), queueber.QueuePolicy(retention_ms=5)}) == 1


def test_policy_retention_ms_encodes_and_decodes() -> None:
    for value, wire_value in ((300, 300), (queueber.UNLIMITED, 2 ** 64 - 1), (None, 0)):
        policy = queueber.QueuePolicy(retention_ms=value)
        with wire.schema.Request.from_bytes(wire.encode_set_policy(1, "t", "q", policy)) as r:
            assert r.setPolicy.policy.retentionMs == wire_value
        with wire.schema.Request.from_bytes(wire.encode_create_queue(2, "t", "q", policy)) as r:
            assert r.createQueue.policy.retentionMs == wire_value
    with wire.schema.Request.from_bytes(wire.encode_create_queue(3, "t", "q", None)) as r:
        assert r.createQueue.policy.retentionMs == 0

    def policy_reply(retention: int) -> bytes:
        resp = wire.schema.Response.new_message()
        resp.id = 9
        reply = resp.init("getPolicy")
        reply.version = 2
        reply.policy.retentionMs = retention
        reply.effective.retentionMs = 2 ** 64 - 1
        return resp.to_bytes()  # type: ignore[no-any-return]

    _rid, _kind, info = wire.decode(policy_reply(300))
    assert info.policy == queueber.QueuePolicy(retention_ms=300)
    assert info.effective.retention_ms == queueber.UNLIMITED
    _rid, _kind, info = wire.decode(policy_reply(0))  # unset
    assert info.policy.retention_ms is None and info.policy == queueber.QueuePolicy()


# --- removeAndPoll --------------------------------------------------------------

def test_remove_and_poll_request_encodes() -> None:
    lease, a, b = b"L" * 16, b"A" * 16, b"B" * 16
    with wire.schema.Request.from_bytes(
            wire.encode_remove_and_poll(9, "t", "q", lease, [a, b], 32, 30000, 5000)) as r:
        assert r.which() == "removeAndPoll" and r.id == 9
        rp = r.removeAndPoll
        assert (rp.queue.tenant, rp.queue.queue, rp.lease, list(rp.ids)) == ("t", "q", lease,
                                                                            [a, b])
        assert (rp.maxItems, rp.leaseMs, rp.waitMs) == (32, 30000, 5000)
    # No ids and no lease: a plain poll (both left empty on the wire).
    with wire.schema.Request.from_bytes(
            wire.encode_remove_and_poll(10, "t", "q", b"", [], 1, 0, 0)) as r:
        rp = r.removeAndPoll
        assert (rp.lease, len(rp.ids), rp.maxItems, rp.leaseMs, rp.waitMs) == (b"", 0, 1, 0, 0)


def remove_and_poll_reply(rid: int, removed: List[bool], messages: int) -> bytes:
    resp = wire.schema.Response.new_message()
    resp.id = rid
    rp = resp.init("removeAndPoll")
    rp.removed = removed
    poll = rp.init("poll")
    if messages:
        poll.lease = b"L" * 16
        poll.expiresAtMs = 1234
    for i, m in enumerate(poll.init("messages", messages)):
        m.id = bytes([i]) * 16
        m.payload = b"p%d" % i
        m.deliveryCount = 1
        m.enqueuedAtMs = 99
    return resp.to_bytes()  # type: ignore[no-any-return]


def test_remove_and_poll_reply_decodes() -> None:
    rid, kind, reply = wire.decode(remove_and_poll_reply(4, [True, False], 2))
    assert (rid, kind) == (4, "removeAndPoll")
    got = wire.removed_and_polled(reply)
    assert isinstance(got, queueber.RemovedAndPolled)
    assert got.removed == [True, False]
    assert got.lease == queueber.Lease(b"L" * 16, 1234, [
        queueber.Message(b"\x00" * 16, b"p0", 1, 99), queueber.Message(b"\x01" * 16, b"p1", 1, 99)])
    assert got and len(got) == 2 and [m.payload for m in got] == [b"p0", b"p1"]
    assert got.messages is got.lease.messages
    # The poll part, for releasing the messages of an abandoned request.
    assert wire.leased(kind, reply) == (b"L" * 16, 1234, got.lease.messages)
    assert wire.leased("remove", [True]) is None
    # Nothing leased: falsy, with an empty lease (as an empty poll).
    empty = wire.removed_and_polled(wire.decode(remove_and_poll_reply(5, [], 0))[2])
    assert not empty and empty.removed == [] and empty.lease == queueber.Lease(b"", 0, [])
