//! The wire protocol: owned Rust types for requests and responses, and their
//! Cap'n Proto encoding (`queueber.capnp`).
//!
//! Both sides speak through these types: the server decodes [`Request`]s and
//! encodes [`Response`]s, the client does the reverse. Decoding validates
//! what needs no server configuration (names, id lengths); the server checks
//! its limits.

use capnp::message::{Builder, HeapAllocator, Reader, ReaderSegments, ScratchSpaceHeapAllocator};

use crate::queueber_capnp::{request, response};

pub use crate::queueber_capnp::ErrorCode;

pub use crate::ops::hello::{Limits, ServerInfo};
pub use crate::ops::{Op, Reply};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

/// A typed failure of one request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub result: Result<Reply, ErrorReply>,
}

/// Why a frame could not be decoded as a request. `id` is the request id when
/// the frame was readable that far, so the error can still be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub id: Option<u64>,
    pub error: ErrorReply,
}

fn malformed(e: capnp::Error) -> ErrorReply {
    ErrorReply::new(ErrorCode::MalformedFrame, format!("malformed request: {e}"))
}

/// Decodes one request frame.
pub fn decode_request<S: ReaderSegments>(message: &Reader<S>) -> Result<Request, DecodeError> {
    let root: request::Reader<'_> = message.get_root().map_err(|e| DecodeError {
        id: None,
        error: malformed(e),
    })?;
    let id = root.get_id();
    decode_op(root)
        .map(|op| Request { id, op })
        .map_err(|error| DecodeError { id: Some(id), error })
}

fn decode_op(root: request::Reader<'_>) -> Result<Op, ErrorReply> {
    let which = root
        .which()
        .map_err(|e| ErrorReply::new(ErrorCode::UnknownOperation, format!("unknown operation {}", e.0)))?;
    Op::decode(which)
}

/// Encodes a request into a fresh message.
pub fn encode_request(req: &Request) -> Builder<HeapAllocator> {
    let mut message = Builder::new_default();
    let mut root = message.init_root::<request::Builder<'_>>();
    root.set_id(req.id);
    req.op.encode(root);
    message
}

/// Encodes a response into a fresh message.
pub fn encode_response(resp: &Response) -> Builder<HeapAllocator> {
    let words = response_words(resp);
    encode_response_with(resp, HeapAllocator::new().first_segment_words(words))
}

/// Words [`encode_response`] gives a response's first segment: enough for
/// the whole of it as the reply estimates it (one segment on the wire).
fn response_words(resp: &Response) -> u32 {
    let words = match &resp.result {
        Ok(reply) => reply.words(),
        Err(_) => crate::ops::SMALL_REPLY_WORDS,
    };
    // Clamped far below capnp's own limit (2^29 words, which it asserts):
    // past 8 MiB, further segments are added as needed.
    words.clamp(1, 1 << 20)
}

/// Words of the stack buffer [`write_response`] encodes small responses in.
const SCRATCH_WORDS: u32 = 128;

/// Appends a response, framed, to `out`: the bytes [`encode_response`]'s
/// message serializes to. A response that fits in 1 KiB (the estimate
/// every reply gives) is built in a buffer on the stack instead of a zeroed
/// allocation, and the message is gone when this returns: the server
/// encodes every answer this way (about 2% of its instructions per message
/// were the allocation and its release, callgrind).
pub fn write_response(resp: &Response, out: &mut Vec<u8>) {
    let words = response_words(resp);
    if words <= SCRATCH_WORDS {
        let mut scratch = [capnp::word(0, 0, 0, 0, 0, 0, 0, 0); SCRATCH_WORDS as usize];
        let allocator = ScratchSpaceHeapAllocator::new(capnp::Word::words_to_bytes_mut(&mut scratch));
        let message = encode_response_with(resp, allocator);
        // Writing into a Vec cannot fail.
        let _ = capnp::serialize::write_message(out, &message);
    } else {
        let message = encode_response_with(resp, HeapAllocator::new().first_segment_words(words));
        let _ = capnp::serialize::write_message(out, &message);
    }
}

fn encode_response_with<A: capnp::message::Allocator>(resp: &Response, allocator: A) -> Builder<A> {
    let mut message = Builder::new(allocator);
    let mut root = message.init_root::<response::Builder<'_>>();
    root.set_id(resp.id);
    match &resp.result {
        Err(e) => {
            let mut b = root.init_error();
            b.set_code(e.code);
            b.set_message(e.message.as_str());
        }
        Ok(reply) => reply.encode(root),
    }
    message
}

/// Why a response frame could not be understood (client side).
#[derive(Debug, thiserror::Error)]
pub enum ResponseDecodeError {
    #[error("malformed response: {0}")]
    Capnp(#[from] capnp::Error),
    #[error("unknown response kind {0}")]
    UnknownKind(u16),
    #[error("unknown error code {0}")]
    UnknownCode(u16),
    #[error("bad {what} in response: {detail}")]
    Bad { what: &'static str, detail: String },
}

/// Decodes one response frame.
pub fn decode_response<S: ReaderSegments>(message: &Reader<S>) -> Result<Response, ResponseDecodeError> {
    let root: response::Reader<'_> = message.get_root()?;
    let which = root.which().map_err(|e| ResponseDecodeError::UnknownKind(e.0))?;
    Ok(Response {
        id: root.get_id(),
        result: Reply::decode(which)?,
    })
}

/// Every error code, for docs and exhaustive tests.
pub const ERROR_CODES: [ErrorCode; 16] = [
    ErrorCode::Internal,
    ErrorCode::InvalidArgument,
    ErrorCode::InvalidName,
    ErrorCode::UnknownQueue,
    ErrorCode::PayloadTooLarge,
    ErrorCode::TooManyMessages,
    ErrorCode::FrameTooLarge,
    ErrorCode::MalformedFrame,
    ErrorCode::UnknownOperation,
    ErrorCode::TooManyInFlight,
    ErrorCode::ShuttingDown,
    ErrorCode::Unavailable,
    ErrorCode::DiskFull,
    ErrorCode::Unauthenticated,
    ErrorCode::PermissionDenied,
    ErrorCode::QueueFull,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{LeaseId, MessageId};
    use crate::names::QueueName;
    use crate::ops;
    use crate::types::{Delivery, Lease, NewMessage, QueueStats};
    use capnp::message::ReaderOptions;

    fn q(name: &str) -> QueueName {
        QueueName::new("t", name).unwrap()
    }

    /// Other-language clients are written from docs/protocol.md alone: its
    /// appendix must be the schema the server speaks, word for word.
    #[test]
    fn the_protocol_document_carries_the_schema_verbatim() {
        let schema = include_str!("../queueber.capnp");
        let doc = include_str!("../docs/protocol.md");
        let copy = format!("```capnp\n{}\n```", schema.trim_end());
        assert!(
            doc.contains(&copy),
            "docs/protocol.md's schema appendix differs from queueber.capnp: copy it again"
        );
    }

    fn round_trip_request(req: &Request) -> Result<Request, DecodeError> {
        let bytes = capnp::serialize::write_message_to_words(&encode_request(req));
        let reader = capnp::serialize::read_message(&mut &bytes[..], ReaderOptions::new()).unwrap();
        decode_request(&reader)
    }

    fn round_trip_response(resp: &Response) -> Response {
        let bytes = capnp::serialize::write_message_to_words(&encode_response(resp));
        let reader = capnp::serialize::read_message(&mut &bytes[..], ReaderOptions::new()).unwrap();
        decode_response(&reader).unwrap()
    }

    #[test]
    fn every_request_round_trips() {
        let lease = LeaseId([1; 16]);
        let id = MessageId([2; 16]);
        let ops = vec![
            Op::Hello(ops::Hello),
            Op::ListQueues(ops::ListQueues),
            Op::Add(ops::Add {
                queue: q("a"),
                messages: vec![NewMessage::new(b"x".to_vec()), NewMessage::delayed(vec![], 5)],
            }),
            Op::Poll(ops::Poll {
                queue: q("a"),
                max_items: 7,
                lease_ms: 100,
                wait_ms: 9,
            }),
            Op::Remove(ops::Remove {
                queue: q("a"),
                lease,
                ids: vec![id, id],
            }),
            Op::Extend(ops::Extend {
                queue: q("a"),
                lease,
                lease_ms: 3,
            }),
            Op::Release(ops::Release {
                queue: q("a"),
                lease,
                id,
                delay_ms: 4,
            }),
            Op::Stats(ops::Stats { queue: q("a") }),
            Op::Purge(ops::Purge { queue: q("a") }),
            Op::Delete(ops::Delete { queue: q("a") }),
            Op::Peek(ops::Peek {
                queue: q("a"),
                max_items: 3,
                cursor: None,
                dead: false,
            }),
            Op::Fail(ops::Fail {
                queue: q("a"),
                lease,
                id,
                error: "timeout talking to smtp".into(),
                dead: true,
            }),
            Op::Redrive(ops::Redrive {
                queue: q("a"),
                max: 10,
                ids: vec![id, MessageId([3; 16])],
            }),
            Op::RemoveAndPoll(ops::RemoveAndPoll {
                queue: q("a"),
                lease: Some(lease),
                ids: vec![id, MessageId([3; 16])],
                max_items: 32,
                lease_ms: 30_000,
                wait_ms: 1_000,
            }),
            Op::RemoveAndPoll(ops::RemoveAndPoll {
                queue: q("a"),
                lease: None,
                ids: Vec::new(),
                max_items: 1,
                lease_ms: 0,
                wait_ms: 0,
            }),
            Op::SetPolicy(ops::SetPolicy {
                queue: q("a"),
                policy: Box::new(crate::types::QueuePolicy {
                    lease_ms: Some(5),
                    max_depth: Some(crate::types::UNLIMITED),
                    max_bytes: None,
                    max_payload_bytes: Some(7),
                    retry_backoff_ms: Some(crate::types::RetryBackoff::new(&[1, 2, 3]).unwrap()),
                    max_deliveries: Some(4),
                    retention_ms: Some(86_400_000),
                }),
            }),
            Op::Auth(ops::Auth {
                token: "acme-01.secret".into(),
            }),
            Op::Peek(ops::Peek {
                queue: q("a"),
                max_items: 0,
                cursor: Some(crate::types::PeekCursor {
                    visible_at_ms: 5,
                    id: MessageId([6; 16]),
                }),
                dead: true,
            }),
        ];
        for (i, op) in ops.into_iter().enumerate() {
            let req = Request {
                id: i as u64 + 1000,
                op,
            };
            assert_eq!(round_trip_request(&req), Ok(req));
        }
    }

    #[test]
    fn every_response_round_trips() {
        let lease = Lease {
            id: LeaseId([3; 16]),
            expires_at_ms: 77,
            messages: vec![Delivery {
                id: MessageId([4; 16]),
                payload: b"p".to_vec().into(),
                delivery_count: 2,
                enqueued_at_ms: 5,
            }],
        };
        let results = vec![
            Ok(Reply::Hello(ServerInfo {
                version: "1.2.3".into(),
                shards: 2,
                disk_full: true,
                auth_required: true,
                limits: Limits {
                    max_frame_bytes: 1,
                    max_messages_per_add: 2,
                    max_payload_bytes: 3,
                    max_items_per_poll: 4,
                    max_wait_ms: 5,
                    max_in_flight_per_connection: 6,
                    max_connections: 7,
                    max_duration_ms: 8,
                },
            })),
            Ok(Reply::Added(vec![MessageId([9; 16])])),
            Ok(Reply::Polled(Some(lease.clone()))),
            Ok(Reply::Polled(None)),
            Ok(Reply::Removed(vec![true, false])),
            Ok(Reply::Extended(Some(10))),
            Ok(Reply::Extended(None)),
            Ok(Reply::Released(true)),
            Ok(Reply::Stats(QueueStats {
                visible: 1,
                delayed: 2,
                in_flight: 3,
                oldest_visible_age_ms: Some(0),
                disk_full: true,
                dead: 7,
                dropped: 11,
            })),
            Ok(Reply::Stats(QueueStats::default())),
            Ok(Reply::Queues(vec![q("a"), q("b")])),
            Ok(Reply::Purged(12)),
            Ok(Reply::Deleted(())),
            Ok(Reply::Authenticated("acme".into())),
            Ok(Reply::Peeked(crate::types::Peeked::default())),
            Ok(Reply::Peeked(crate::types::Peeked {
                messages: vec![Delivery {
                    id: MessageId([8; 16]),
                    payload: b"q".to_vec().into(),
                    delivery_count: 0,
                    enqueued_at_ms: 9,
                }],
                dead: Vec::new(),
                cursor: Some(crate::types::PeekCursor {
                    visible_at_ms: 10,
                    id: MessageId([8; 16]),
                }),
            })),
            Ok(Reply::Peeked(crate::types::Peeked {
                messages: Vec::new(),
                dead: vec![
                    crate::types::DeadLetter {
                        id: MessageId([8; 16]),
                        payload: b"x".to_vec(),
                        delivery_count: 5,
                        enqueued_at_ms: 9,
                        died_at_ms: 11,
                        reason: crate::types::DeadReason::MaxDeliveries,
                        last_error: None,
                    },
                    crate::types::DeadLetter {
                        id: MessageId([9; 16]),
                        payload: Vec::new(),
                        delivery_count: 1,
                        enqueued_at_ms: 9,
                        died_at_ms: 12,
                        reason: crate::types::DeadReason::Rejected,
                        last_error: Some(String::new()),
                    },
                ],
                cursor: None,
            })),
            Ok(Reply::Failed(true)),
            Ok(Reply::Redriven(ops::redrive::Redriven {
                moved: 1000,
                more: true,
            })),
            Ok(Reply::RemovedAndPolled(ops::RemovedAndPolled {
                removed: vec![true, false],
                lease: Some(lease.clone()),
            })),
            Ok(Reply::RemovedAndPolled(ops::RemovedAndPolled::default())),
        ];
        for (i, result) in results.into_iter().enumerate() {
            let resp = Response { id: i as u64, result };
            assert_eq!(round_trip_response(&resp), resp);
        }
        for code in ERROR_CODES {
            let resp = Response {
                id: 1,
                result: Err(ErrorReply::new(code, "why")),
            };
            assert_eq!(round_trip_response(&resp), resp);
        }
    }

    #[test]
    fn answers_fit_their_first_segment_and_small_ones_stay_small() {
        let delivery = |size: usize| Delivery {
            id: MessageId([7; 16]),
            payload: vec![1; size].into(),
            delivery_count: 3,
            enqueued_at_ms: 1_700_000_000_000,
        };
        let lease = |n: usize, size: usize| Lease {
            id: LeaseId([9; 16]),
            expires_at_ms: 1_700_000_030_000,
            messages: (0..n).map(|_| delivery(size)).collect(),
        };
        // One segment each: the estimate covers the answer, so nothing is
        // allocated (and zeroed) twice.
        for (n, size) in [(1, 0), (1, 256), (32, 256), (7, 4000), (100, 1)] {
            let resp = Response {
                id: 1,
                result: Ok(Reply::Polled(Some(lease(n, size)))),
            };
            let message = encode_response(&resp);
            assert_eq!(message.get_segments_for_output().len(), 1, "{n} x {size} B");
            let resp = Response {
                id: 2,
                result: Ok(Reply::RemovedAndPolled(ops::RemovedAndPolled {
                    removed: vec![true; n],
                    lease: Some(lease(n, size)),
                })),
            };
            assert_eq!(
                encode_response(&resp).get_segments_for_output().len(),
                1,
                "{n} x {size} B"
            );
        }
        for n in [1, 32, 1000] {
            let added = encode_response(&Response {
                id: 3,
                result: Ok(Reply::Added((0..n).map(|i| MessageId([i as u8; 16])).collect())),
            });
            assert_eq!(added.get_segments_for_output().len(), 1, "{n} ids");
        }
        // An answer without payloads or ids gets a 512-byte first segment,
        // not capnp's default 8 KiB.
        for result in [
            Ok(Reply::Removed(vec![true; 32])),
            Err(ErrorReply::new(ErrorCode::UnknownQueue, "no such queue")),
        ] {
            let message = encode_response(&Response { id: 4, result });
            let segments = message.get_segments_for_output();
            assert_eq!(segments.len(), 1);
            assert!(
                segments[0].len() <= 8 * ops::SMALL_REPLY_WORDS as usize,
                "{}",
                segments[0].len()
            );
        }
    }

    #[test]
    fn written_responses_are_the_encoded_messages_framed() {
        let lease = |n: usize, size: usize| Lease {
            id: LeaseId([9; 16]),
            expires_at_ms: 1_700_000_030_000,
            messages: (0..n)
                .map(|i| Delivery {
                    id: MessageId([i as u8; 16]),
                    payload: vec![1; size].into(),
                    delivery_count: 1,
                    enqueued_at_ms: 1_700_000_000_000,
                })
                .collect(),
        };
        // Small (the stack buffer), at its edge and past it (the heap).
        let results = [
            Ok(Reply::Removed(vec![true])),
            Err(ErrorReply::new(ErrorCode::UnknownQueue, "no such queue")),
            Ok(Reply::Polled(Some(lease(1, 256)))),
            Ok(Reply::Polled(Some(lease(1, 700)))),
            Ok(Reply::Polled(Some(lease(1, 1200)))),
            Ok(Reply::Polled(Some(lease(32, 256)))),
            Ok(Reply::Added((0..100).map(|i| MessageId([i as u8; 16])).collect())),
        ];
        // Appended after what is already queued, twice over.
        let mut out = b"queued".to_vec();
        let mut expected = out.clone();
        for (id, result) in results.into_iter().enumerate() {
            let resp = Response { id: id as u64, result };
            write_response(&resp, &mut out);
            write_response(&resp, &mut out);
            let framed = capnp::serialize::write_message_to_words(&encode_response(&resp));
            expected.extend_from_slice(&framed);
            expected.extend_from_slice(&framed);
        }
        assert_eq!(out, expected);
    }

    #[test]
    fn empty_names_mean_default() {
        let mut message = Builder::new_default();
        let mut root = message.init_root::<request::Builder<'_>>();
        root.set_id(5);
        root.init_stats();
        let req = decode_request(&message.into_reader()).unwrap();
        assert_eq!(
            req.op,
            Op::Stats(ops::Stats {
                queue: QueueName::new("default", "default").unwrap()
            })
        );
    }

    #[test]
    fn bad_fields_are_typed_errors_carrying_the_id() {
        let mut message = Builder::new_default();
        let mut root = message.init_root::<request::Builder<'_>>();
        root.set_id(42);
        let mut r = root.init_remove();
        r.set_lease(&[1, 2, 3]);
        let err = decode_request(&message.into_reader()).unwrap_err();
        assert_eq!(err.id, Some(42));
        assert_eq!(err.error.code, ErrorCode::InvalidArgument);
        assert!(err.error.message.contains("16 bytes"), "{}", err.error.message);

        let mut message = Builder::new_default();
        let mut root = message.init_root::<request::Builder<'_>>();
        root.set_id(43);
        root.init_stats().set_queue("no spaces");
        let err = decode_request(&message.into_reader()).unwrap_err();
        assert_eq!(err.error.code, ErrorCode::InvalidName);
    }

    #[test]
    fn a_response_frame_is_not_a_request() {
        // A valid frame of the wrong type: the union discriminant of a
        // Response read as a Request is out of the request's range (the
        // response union has one arm more, its error) or decodes to some op
        // whose fields are then checked. The last response arm is past the
        // last request arm.
        let resp = Response {
            id: 9,
            result: Ok(Reply::RemovedAndPolled(crate::ops::RemovedAndPolled::default())),
        };
        let bytes = capnp::serialize::write_message_to_words(&encode_response(&resp));
        let reader = capnp::serialize::read_message(&mut &bytes[..], ReaderOptions::new()).unwrap();
        let err = decode_request(&reader).unwrap_err();
        assert_eq!(err.error.code, ErrorCode::UnknownOperation);
    }
}
