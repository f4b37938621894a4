//! Property-based fuzzing of the two decoders a client reaches first: the
//! frame reader ([`FrameBuffer`]) and the request decoder
//! ([`decode_request`]). Inputs are random bytes, valid request frames, and
//! valid frames with random mutations (bit flips, overwritten words,
//! truncation, splicing), fed in random-sized pieces. What must hold:
//!
//! * nothing panics, whatever the bytes;
//! * memory follows the bytes: the buffer never holds more than what has
//!   arrived plus one growth step, whatever a header claims;
//! * valid frames come out whole, in order, however they are split, and
//!   decode to the request that was encoded;
//! * an oversized or malformed segment table is reported before its body
//!   is needed.
//!
//! The case count follows `PROPTEST_CASES` (default 256); the closing note
//! of issue 9 records a longer run.

use capnp::message::ReaderOptions;
use proptest::prelude::*;
use queueber::frame::{frame_len, FrameBuffer, BASE_CAPACITY, READ_CHUNK};
use queueber::ids::{LeaseId, MessageId};
use queueber::names::QueueName;
use queueber::ops;
use queueber::protocol::{decode_request, encode_request, Op, Request};
use queueber::types::NewMessage;

const MAX_FRAME: usize = 1 << 20;

fn options() -> ReaderOptions {
    let mut options = ReaderOptions::new();
    options.traversal_limit_in_words(Some(MAX_FRAME / 8));
    options
}

fn queue_name() -> impl Strategy<Value = QueueName> {
    ("[a-z]{1,8}", "[a-z0-9._-]{1,12}").prop_map(|(t, q)| QueueName::new(&t, &q).expect("valid name"))
}

fn op() -> impl Strategy<Value = Op> {
    let id = any::<[u8; 16]>();
    prop_oneof![
        Just(Op::Hello(ops::Hello)),
        Just(Op::ListQueues(ops::ListQueues)),
        (
            queue_name(),
            prop::collection::vec((prop::collection::vec(any::<u8>(), 0..300), any::<u64>()), 0..8)
        )
            .prop_map(|(queue, m)| Op::Add(ops::Add {
                queue,
                messages: m.into_iter().map(|(p, d)| NewMessage::delayed(p, d)).collect(),
            })),
        (queue_name(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(queue, max_items, lease_ms, wait_ms)| {
            Op::Poll(ops::Poll {
                queue,
                max_items,
                lease_ms,
                wait_ms,
            })
        }),
        (queue_name(), id, prop::collection::vec(id, 0..6)).prop_map(|(queue, l, ids)| Op::Remove(ops::Remove {
            queue,
            lease: LeaseId(l),
            ids: ids.into_iter().map(MessageId).collect(),
        })),
        (queue_name(), id, any::<u64>()).prop_map(|(queue, l, lease_ms)| Op::Extend(ops::Extend {
            queue,
            lease: LeaseId(l),
            lease_ms,
        })),
        (queue_name(), id, id, any::<u64>()).prop_map(|(queue, l, m, delay_ms)| Op::Release(ops::Release {
            queue,
            lease: LeaseId(l),
            id: MessageId(m),
            delay_ms,
        })),
        queue_name().prop_map(|queue| Op::Stats(ops::Stats { queue })),
        queue_name().prop_map(|queue| Op::Purge(ops::Purge { queue })),
        queue_name().prop_map(|queue| Op::Delete(ops::Delete { queue })),
        "[a-z0-9.-]{0,40}".prop_map(|token| Op::Auth(ops::Auth { token })),
        (
            queue_name(),
            any::<u32>(),
            prop::option::of((any::<u64>(), id)),
            any::<bool>()
        )
            .prop_map(|(queue, max_items, cursor, dead)| {
                Op::Peek(ops::Peek {
                    queue,
                    max_items,
                    cursor: cursor.map(|(visible_at_ms, id)| queueber::types::PeekCursor {
                        visible_at_ms,
                        id: MessageId(id),
                    }),
                    dead,
                })
            }),
        (queue_name(), id, id, "[ -~]{0,60}", any::<bool>()).prop_map(|(queue, l, m, error, dead)| {
            Op::Fail(ops::Fail {
                queue,
                lease: LeaseId(l),
                id: MessageId(m),
                error,
                dead,
            })
        }),
        (queue_name(), any::<u64>(), prop::collection::vec(id, 0..4)).prop_map(|(queue, max, ids)| {
            Op::Redrive(ops::Redrive {
                queue,
                max,
                ids: ids.into_iter().map(MessageId).collect(),
            })
        }),
        (
            queue_name(),
            id,
            prop::collection::vec(id, 0..4),
            any::<u32>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(queue, l, ids, max_items, lease_ms, wait_ms)| {
                // A lease is sent exactly when there are ids to remove
                // (decoding refuses ids without one).
                Op::RemoveAndPoll(ops::RemoveAndPoll {
                    queue,
                    lease: (!ids.is_empty()).then_some(LeaseId(l)),
                    ids: ids.into_iter().map(MessageId).collect(),
                    max_items,
                    lease_ms,
                    wait_ms,
                })
            }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (any::<u64>(), op()).prop_map(|(id, op)| Request { id, op })
}

fn frame_of(request: &Request) -> Vec<u8> {
    capnp::serialize::write_message_to_words(&encode_request(request))
}

/// One mutation of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    SetWord(usize, u64),
    Truncate(usize),
    Splice(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<usize>(), any::<u64>()).prop_map(|(i, w)| Mutation::SetWord(i, w)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(i, b)| Mutation::Splice(i, b)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    match m {
        Mutation::FlipBit(i, b) => bytes[i % len] ^= 1 << b,
        Mutation::SetWord(i, w) => {
            let at = (i % len) & !7;
            let end = (at + 8).min(len);
            bytes[at..end].copy_from_slice(&w.to_le_bytes()[..end - at]);
        }
        Mutation::Truncate(i) => bytes.truncate(i % len),
        Mutation::Splice(i, b) => {
            let at = i % len;
            bytes.splice(at..at, b.iter().copied());
        }
    }
}

/// Feeds `bytes` in pieces of the given sizes, taking frames out as they
/// complete and checking the memory bound after every step. Returns what
/// each frame decoded to, and whether the framing was refused.
fn feed(bytes: &[u8], pieces: &[usize]) -> (Vec<Result<Request, String>>, bool) {
    let mut buffer = FrameBuffer::new(MAX_FRAME);
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut sizes = pieces.iter().cycle();
    let mut received = 0usize;
    loop {
        loop {
            match buffer.next_frame(options(), |m| {
                m.map_err(|e| e.to_string())
                    .and_then(|m| decode_request(&m).map_err(|e| e.error.message))
            }) {
                Ok(Some((_, decoded))) => out.push(decoded),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
        if rest.is_empty() {
            return (out, false);
        }
        let space = match buffer.read_space() {
            Ok(space) => space,
            Err(_) => return (out, true),
        };
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, space.len()).min(rest.len());
        space[..n].copy_from_slice(&rest[..n]);
        buffer.filled(n);
        rest = &rest[n..];
        received += n;
        // Memory follows the bytes: what is buffered plus one growth step
        // (never more than the base or what already arrived).
        let bound = buffer.buffered() + BASE_CAPACITY.max(buffer.buffered().min(READ_CHUNK)) + 8;
        assert!(
            buffer.capacity() <= bound.max(BASE_CAPACITY + 8),
            "capacity {} after {received} bytes ({} buffered)",
            buffer.capacity(),
            buffer.buffered()
        );
    }
}

proptest! {
    #[test]
    fn valid_frames_come_out_whole_in_order_however_split(
        requests in prop::collection::vec(request(), 1..12),
        pieces in prop::collection::vec(1usize..5000, 1..8),
    ) {
        let mut stream = Vec::new();
        for r in &requests {
            stream.extend(frame_of(r));
        }
        let (decoded, refused) = feed(&stream, &pieces);
        prop_assert!(!refused);
        let decoded: Vec<Request> = decoded.into_iter().map(|d| d.expect("valid request decodes")).collect();
        prop_assert_eq!(decoded, requests);
    }

    #[test]
    fn mutated_frames_never_panic_or_overcommit(
        requests in prop::collection::vec(request(), 1..4),
        mutations in prop::collection::vec(mutation(), 1..6),
        pieces in prop::collection::vec(1usize..3000, 1..6),
    ) {
        let mut stream = Vec::new();
        for r in &requests {
            stream.extend(frame_of(r));
        }
        for m in &mutations {
            mutate(&mut stream, m);
        }
        let _ = feed(&stream, &pieces);
    }

    #[test]
    fn random_bytes_never_panic_or_overcommit(
        bytes in prop::collection::vec(any::<u8>(), 0..20_000),
        pieces in prop::collection::vec(1usize..4096, 1..6),
    ) {
        let _ = feed(&bytes, &pieces);
    }

    #[test]
    fn a_lying_header_costs_only_the_base_buffer(words in 1u32..(1 << 29), extra in prop::collection::vec(any::<u8>(), 0..100)) {
        let mut bytes = vec![0, 0, 0, 0];
        bytes.extend(words.to_le_bytes());
        bytes.extend(extra);
        let declared = 8 + u64::from(words) * 8;
        match frame_len(&bytes, MAX_FRAME) {
            Ok(Some(len)) => prop_assert_eq!(len as u64, declared),
            Err(_) => prop_assert!(declared > MAX_FRAME as u64),
            Ok(None) => prop_assert!(false, "a whole one-segment table was given"),
        }
        let (_, _) = feed(&bytes, &[bytes.len()]);
    }
}
