//! The wire protocol: owned Rust types for requests and responses, and their
//! Cap'n Proto encoding (`queueber.capnp`).
//!
//! Both sides speak through these types: the server decodes [`Request`]s and
//! encodes [`Response`]s, the client does the reverse. Decoding validates
//! what needs no server configuration (names, id lengths); the server checks
//! its limits.

use capnp::message::{Builder, HeapAllocator, Reader, ReaderSegments};

use crate::ids::{LeaseId, MessageId};
use crate::names::QueueName;
use crate::queueber_capnp::{request, response};
use crate::types::{Delivery, Lease, NewMessage, QueueStats};

pub use crate::queueber_capnp::ErrorCode;

/// One operation a client can ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Hello,
    Add {
        queue: QueueName,
        messages: Vec<NewMessage>,
    },
    Poll {
        queue: QueueName,
        max_items: u32,
        lease_ms: u64,
        wait_ms: u64,
    },
    Remove {
        queue: QueueName,
        lease: LeaseId,
        ids: Vec<MessageId>,
    },
    Extend {
        queue: QueueName,
        lease: LeaseId,
        lease_ms: u64,
    },
    Release {
        queue: QueueName,
        lease: LeaseId,
        id: MessageId,
        delay_ms: u64,
    },
    Stats {
        queue: QueueName,
    },
    ListQueues,
    Purge {
        queue: QueueName,
    },
    Delete {
        queue: QueueName,
    },
}

impl Op {
    /// The queue the operation addresses, if any: it decides the shard.
    pub fn queue(&self) -> Option<&QueueName> {
        match self {
            Op::Hello | Op::ListQueues => None,
            Op::Add { queue, .. }
            | Op::Poll { queue, .. }
            | Op::Remove { queue, .. }
            | Op::Extend { queue, .. }
            | Op::Release { queue, .. }
            | Op::Stats { queue }
            | Op::Purge { queue }
            | Op::Delete { queue } => Some(queue),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

/// What the server announces in `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    pub max_frame_bytes: u64,
    pub max_messages_per_add: u32,
    pub max_payload_bytes: u64,
    pub max_items_per_poll: u32,
    pub max_wait_ms: u64,
    pub max_in_flight_per_connection: u32,
    pub max_connections: u32,
    pub max_duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerInfo {
    pub version: String,
    pub shards: u32,
    pub limits: Limits,
    /// Adds are being refused for lack of disk space right now.
    pub disk_full: bool,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Hello(ServerInfo),
    Added(Vec<MessageId>),
    Polled(Option<Lease>),
    Removed(Vec<bool>),
    Extended(Option<u64>),
    Released(bool),
    Stats(QueueStats),
    Queues(Vec<QueueName>),
    Purged(u64),
    Deleted,
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

fn invalid(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(ErrorCode::InvalidArgument, message)
}

fn malformed(e: capnp::Error) -> ErrorReply {
    ErrorReply::new(ErrorCode::MalformedFrame, format!("malformed request: {e}"))
}

fn read_queue(r: capnp::Result<crate::queueber_capnp::queue_ref::Reader<'_>>) -> Result<QueueName, ErrorReply> {
    let r = r.map_err(malformed)?;
    let tenant = r
        .get_tenant()
        .map_err(malformed)?
        .to_str()
        .map_err(|e| ErrorReply::new(ErrorCode::InvalidName, format!("tenant is not UTF-8: {e}")))?;
    let queue = r
        .get_queue()
        .map_err(malformed)?
        .to_str()
        .map_err(|e| ErrorReply::new(ErrorCode::InvalidName, format!("queue is not UTF-8: {e}")))?;
    QueueName::from_wire(tenant, queue).map_err(|e| ErrorReply::new(ErrorCode::InvalidName, e.to_string()))
}

fn read_lease(bytes: capnp::Result<&[u8]>) -> Result<LeaseId, ErrorReply> {
    let bytes = bytes.map_err(malformed)?;
    LeaseId::from_slice(bytes).ok_or_else(|| invalid(format!("lease id must be 16 bytes, got {}", bytes.len())))
}

fn read_message_id(bytes: capnp::Result<&[u8]>) -> Result<MessageId, ErrorReply> {
    let bytes = bytes.map_err(malformed)?;
    MessageId::from_slice(bytes).ok_or_else(|| invalid(format!("message id must be 16 bytes, got {}", bytes.len())))
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
    use request::Which;
    let which = root
        .which()
        .map_err(|e| ErrorReply::new(ErrorCode::UnknownOperation, format!("unknown operation {}", e.0)))?;
    Ok(match which {
        Which::Hello(()) => Op::Hello,
        Which::ListQueues(()) => Op::ListQueues,
        Which::Add(r) => {
            let r = r.map_err(malformed)?;
            let list = r.get_messages().map_err(malformed)?;
            let mut messages = Vec::with_capacity(list.len() as usize);
            for m in list.iter() {
                messages.push(NewMessage {
                    payload: m.get_payload().map_err(malformed)?.to_vec(),
                    delay_ms: m.get_delay_ms(),
                });
            }
            Op::Add {
                queue: read_queue(r.get_queue())?,
                messages,
            }
        }
        Which::Poll(r) => {
            let r = r.map_err(malformed)?;
            Op::Poll {
                queue: read_queue(r.get_queue())?,
                max_items: r.get_max_items(),
                lease_ms: r.get_lease_ms(),
                wait_ms: r.get_wait_ms(),
            }
        }
        Which::Remove(r) => {
            let r = r.map_err(malformed)?;
            let list = r.get_ids().map_err(malformed)?;
            let mut ids = Vec::with_capacity(list.len() as usize);
            for id in list.iter() {
                ids.push(read_message_id(id)?);
            }
            Op::Remove {
                queue: read_queue(r.get_queue())?,
                lease: read_lease(r.get_lease())?,
                ids,
            }
        }
        Which::Extend(r) => {
            let r = r.map_err(malformed)?;
            Op::Extend {
                queue: read_queue(r.get_queue())?,
                lease: read_lease(r.get_lease())?,
                lease_ms: r.get_lease_ms(),
            }
        }
        Which::Release(r) => {
            let r = r.map_err(malformed)?;
            Op::Release {
                queue: read_queue(r.get_queue())?,
                lease: read_lease(r.get_lease())?,
                id: read_message_id(r.get_id())?,
                delay_ms: r.get_delay_ms(),
            }
        }
        Which::Stats(r) => Op::Stats { queue: read_queue(r)? },
        Which::Purge(r) => Op::Purge { queue: read_queue(r)? },
        Which::Delete(r) => Op::Delete { queue: read_queue(r)? },
    })
}

fn set_queue(mut b: crate::queueber_capnp::queue_ref::Builder<'_>, q: &QueueName) {
    b.set_tenant(q.tenant());
    b.set_queue(q.queue());
}

/// Encodes a request into a fresh message.
pub fn encode_request(req: &Request) -> Builder<HeapAllocator> {
    let mut message = Builder::new_default();
    let mut root = message.init_root::<request::Builder<'_>>();
    root.set_id(req.id);
    match &req.op {
        Op::Hello => root.set_hello(()),
        Op::ListQueues => root.set_list_queues(()),
        Op::Add { queue, messages } => {
            let mut b = root.init_add();
            set_queue(b.reborrow().init_queue(), queue);
            let mut list = b.init_messages(messages.len() as u32);
            for (i, m) in messages.iter().enumerate() {
                let mut e = list.reborrow().get(i as u32);
                e.set_payload(&m.payload);
                e.set_delay_ms(m.delay_ms);
            }
        }
        Op::Poll {
            queue,
            max_items,
            lease_ms,
            wait_ms,
        } => {
            let mut b = root.init_poll();
            set_queue(b.reborrow().init_queue(), queue);
            b.set_max_items(*max_items);
            b.set_lease_ms(*lease_ms);
            b.set_wait_ms(*wait_ms);
        }
        Op::Remove { queue, lease, ids } => {
            let mut b = root.init_remove();
            set_queue(b.reborrow().init_queue(), queue);
            b.set_lease(lease.as_bytes());
            let mut list = b.init_ids(ids.len() as u32);
            for (i, id) in ids.iter().enumerate() {
                list.set(i as u32, id.as_bytes());
            }
        }
        Op::Extend { queue, lease, lease_ms } => {
            let mut b = root.init_extend();
            set_queue(b.reborrow().init_queue(), queue);
            b.set_lease(lease.as_bytes());
            b.set_lease_ms(*lease_ms);
        }
        Op::Release {
            queue,
            lease,
            id,
            delay_ms,
        } => {
            let mut b = root.init_release();
            set_queue(b.reborrow().init_queue(), queue);
            b.set_lease(lease.as_bytes());
            b.set_id(id.as_bytes());
            b.set_delay_ms(*delay_ms);
        }
        Op::Stats { queue } => set_queue(root.init_stats(), queue),
        Op::Purge { queue } => set_queue(root.init_purge(), queue),
        Op::Delete { queue } => set_queue(root.init_delete(), queue),
    }
    message
}

/// Encodes a response into a fresh message.
pub fn encode_response(resp: &Response) -> Builder<HeapAllocator> {
    let mut message = Builder::new_default();
    let mut root = message.init_root::<response::Builder<'_>>();
    root.set_id(resp.id);
    match &resp.result {
        Err(e) => {
            let mut b = root.init_error();
            b.set_code(e.code);
            b.set_message(e.message.as_str());
        }
        Ok(Reply::Hello(info)) => {
            let mut b = root.init_hello();
            b.set_version(info.version.as_str());
            b.set_shards(info.shards);
            b.set_disk_full(info.disk_full);
            let l = &info.limits;
            let mut lb = b.init_limits();
            lb.set_max_frame_bytes(l.max_frame_bytes);
            lb.set_max_messages_per_add(l.max_messages_per_add);
            lb.set_max_payload_bytes(l.max_payload_bytes);
            lb.set_max_items_per_poll(l.max_items_per_poll);
            lb.set_max_wait_ms(l.max_wait_ms);
            lb.set_max_in_flight_per_connection(l.max_in_flight_per_connection);
            lb.set_max_connections(l.max_connections);
            lb.set_max_duration_ms(l.max_duration_ms);
        }
        Ok(Reply::Added(ids)) => {
            let mut list = root.init_add().init_ids(ids.len() as u32);
            for (i, id) in ids.iter().enumerate() {
                list.set(i as u32, id.as_bytes());
            }
        }
        Ok(Reply::Polled(lease)) => {
            let mut b = root.init_poll();
            if let Some(lease) = lease {
                b.set_lease(lease.id.as_bytes());
                b.set_expires_at_ms(lease.expires_at_ms);
                let mut list = b.init_messages(lease.messages.len() as u32);
                for (i, m) in lease.messages.iter().enumerate() {
                    let mut e = list.reborrow().get(i as u32);
                    e.set_id(m.id.as_bytes());
                    e.set_payload(&m.payload);
                    e.set_delivery_count(m.delivery_count);
                    e.set_enqueued_at_ms(m.enqueued_at_ms);
                }
            }
        }
        Ok(Reply::Removed(flags)) => {
            let mut list = root.init_remove().init_removed(flags.len() as u32);
            for (i, &f) in flags.iter().enumerate() {
                list.set(i as u32, f);
            }
        }
        Ok(Reply::Extended(at)) => {
            let mut b = root.init_extend();
            b.set_extended(at.is_some());
            b.set_expires_at_ms(at.unwrap_or(0));
        }
        Ok(Reply::Released(ok)) => root.init_release().set_released(*ok),
        Ok(Reply::Stats(s)) => {
            let mut b = root.init_stats();
            b.set_visible(s.visible);
            b.set_delayed(s.delayed);
            b.set_in_flight(s.in_flight);
            b.set_has_visible(s.oldest_visible_age_ms.is_some());
            b.set_oldest_visible_age_ms(s.oldest_visible_age_ms.unwrap_or(0));
            b.set_disk_full(s.disk_full);
        }
        Ok(Reply::Queues(names)) => {
            let mut list = root.init_list_queues(names.len() as u32);
            for (i, n) in names.iter().enumerate() {
                set_queue(list.reborrow().get(i as u32), n);
            }
        }
        Ok(Reply::Purged(n)) => root.init_purge().set_purged(*n),
        Ok(Reply::Deleted) => root.set_delete(()),
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

fn bad(what: &'static str, detail: impl Into<String>) -> ResponseDecodeError {
    ResponseDecodeError::Bad {
        what,
        detail: detail.into(),
    }
}

/// Decodes one response frame.
pub fn decode_response<S: ReaderSegments>(message: &Reader<S>) -> Result<Response, ResponseDecodeError> {
    use response::Which;
    let root: response::Reader<'_> = message.get_root()?;
    let id = root.get_id();
    let which = root.which().map_err(|e| ResponseDecodeError::UnknownKind(e.0))?;
    let result = match which {
        Which::Error(e) => {
            let e = e?;
            let code = e.get_code().map_err(|e| ResponseDecodeError::UnknownCode(e.0))?;
            Err(ErrorReply::new(
                code,
                e.get_message()?
                    .to_string()
                    .map_err(|e| bad("error message", e.to_string()))?,
            ))
        }
        Which::Hello(h) => {
            let h = h?;
            let l = h.get_limits()?;
            Ok(Reply::Hello(ServerInfo {
                version: h
                    .get_version()?
                    .to_string()
                    .map_err(|e| bad("version", e.to_string()))?,
                shards: h.get_shards(),
                disk_full: h.get_disk_full(),
                limits: Limits {
                    max_frame_bytes: l.get_max_frame_bytes(),
                    max_messages_per_add: l.get_max_messages_per_add(),
                    max_payload_bytes: l.get_max_payload_bytes(),
                    max_items_per_poll: l.get_max_items_per_poll(),
                    max_wait_ms: l.get_max_wait_ms(),
                    max_in_flight_per_connection: l.get_max_in_flight_per_connection(),
                    max_connections: l.get_max_connections(),
                    max_duration_ms: l.get_max_duration_ms(),
                },
            }))
        }
        Which::Add(a) => {
            let mut ids = Vec::new();
            for id in a?.get_ids()?.iter() {
                let id = id?;
                ids.push(MessageId::from_slice(id).ok_or_else(|| bad("message id", format!("{} bytes", id.len())))?);
            }
            Ok(Reply::Added(ids))
        }
        Which::Poll(p) => {
            let p = p?;
            let lease = p.get_lease()?;
            if lease.is_empty() {
                Ok(Reply::Polled(None))
            } else {
                let lease_id =
                    LeaseId::from_slice(lease).ok_or_else(|| bad("lease id", format!("{} bytes", lease.len())))?;
                let mut messages = Vec::new();
                for m in p.get_messages()?.iter() {
                    let id = m.get_id()?;
                    messages.push(Delivery {
                        id: MessageId::from_slice(id)
                            .ok_or_else(|| bad("message id", format!("{} bytes", id.len())))?,
                        payload: m.get_payload()?.to_vec(),
                        delivery_count: m.get_delivery_count(),
                        enqueued_at_ms: m.get_enqueued_at_ms(),
                    });
                }
                Ok(Reply::Polled(Some(Lease {
                    id: lease_id,
                    expires_at_ms: p.get_expires_at_ms(),
                    messages,
                })))
            }
        }
        Which::Remove(r) => Ok(Reply::Removed(r?.get_removed()?.iter().collect())),
        Which::Extend(e) => {
            let e = e?;
            Ok(Reply::Extended(e.get_extended().then(|| e.get_expires_at_ms())))
        }
        Which::Release(r) => Ok(Reply::Released(r?.get_released())),
        Which::Stats(s) => {
            let s = s?;
            Ok(Reply::Stats(QueueStats {
                visible: s.get_visible(),
                delayed: s.get_delayed(),
                in_flight: s.get_in_flight(),
                oldest_visible_age_ms: s.get_has_visible().then(|| s.get_oldest_visible_age_ms()),
                disk_full: s.get_disk_full(),
            }))
        }
        Which::ListQueues(list) => {
            let mut names = Vec::new();
            for q in list?.iter() {
                let t = q.get_tenant()?.to_str().map_err(|e| bad("tenant", e.to_string()))?;
                let n = q.get_queue()?.to_str().map_err(|e| bad("queue", e.to_string()))?;
                names.push(QueueName::new(t, n).map_err(|e| bad("queue name", e.to_string()))?);
            }
            Ok(Reply::Queues(names))
        }
        Which::Purge(p) => Ok(Reply::Purged(p?.get_purged())),
        Which::Delete(()) => Ok(Reply::Deleted),
    };
    Ok(Response { id, result })
}

/// Every error code, for docs and exhaustive tests.
pub const ERROR_CODES: [ErrorCode; 13] = [
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
];

#[cfg(test)]
mod tests {
    use super::*;
    use capnp::message::ReaderOptions;

    fn q(name: &str) -> QueueName {
        QueueName::new("t", name).unwrap()
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
            Op::Hello,
            Op::ListQueues,
            Op::Add {
                queue: q("a"),
                messages: vec![NewMessage::new(b"x".to_vec()), NewMessage::delayed(vec![], 5)],
            },
            Op::Poll {
                queue: q("a"),
                max_items: 7,
                lease_ms: 100,
                wait_ms: 9,
            },
            Op::Remove {
                queue: q("a"),
                lease,
                ids: vec![id, id],
            },
            Op::Extend {
                queue: q("a"),
                lease,
                lease_ms: 3,
            },
            Op::Release {
                queue: q("a"),
                lease,
                id,
                delay_ms: 4,
            },
            Op::Stats { queue: q("a") },
            Op::Purge { queue: q("a") },
            Op::Delete { queue: q("a") },
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
                payload: b"p".to_vec(),
                delivery_count: 2,
                enqueued_at_ms: 5,
            }],
        };
        let results = vec![
            Ok(Reply::Hello(ServerInfo {
                version: "1.2.3".into(),
                shards: 2,
                disk_full: true,
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
            Ok(Reply::Polled(Some(lease))),
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
            })),
            Ok(Reply::Stats(QueueStats::default())),
            Ok(Reply::Queues(vec![q("a"), q("b")])),
            Ok(Reply::Purged(12)),
            Ok(Reply::Deleted),
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
    fn empty_names_mean_default() {
        let mut message = Builder::new_default();
        let mut root = message.init_root::<request::Builder<'_>>();
        root.set_id(5);
        root.init_stats();
        let req = decode_request(&message.into_reader()).unwrap();
        assert_eq!(
            req.op,
            Op::Stats {
                queue: QueueName::new("default", "default").unwrap()
            }
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
        // Response read as a Request is out of the request's range or
        // decodes to some op whose fields are then checked.
        let resp = Response {
            id: 9,
            result: Ok(Reply::Deleted),
        };
        let bytes = capnp::serialize::write_message_to_words(&encode_response(&resp));
        let reader = capnp::serialize::read_message(&mut &bytes[..], ReaderOptions::new()).unwrap();
        let err = decode_request(&reader).unwrap_err();
        assert_eq!(err.error.code, ErrorCode::UnknownOperation);
    }
}
