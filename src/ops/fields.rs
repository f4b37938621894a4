//! Codecs of the fields several operations share: queue references, lease
//! and message ids, and the error constructors their decoders use.

use crate::ids::{LeaseId, MessageId};
use crate::names::QueueName;
use crate::protocol::{ErrorCode, ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::queue_ref;

pub(crate) fn invalid(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(ErrorCode::InvalidArgument, message)
}

pub(crate) fn malformed(e: capnp::Error) -> ErrorReply {
    ErrorReply::new(ErrorCode::MalformedFrame, format!("malformed request: {e}"))
}

/// A response field this client cannot accept.
pub(crate) fn bad(what: &'static str, detail: impl Into<String>) -> ResponseDecodeError {
    ResponseDecodeError::Bad {
        what,
        detail: detail.into(),
    }
}

/// A queue reference of a request; empty names mean `default`.
pub(crate) fn read_queue(r: capnp::Result<queue_ref::Reader<'_>>) -> Result<QueueName, ErrorReply> {
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

/// A queue reference of a response (the server only sends valid names).
pub(crate) fn read_reply_queue(r: queue_ref::Reader<'_>) -> Result<QueueName, ResponseDecodeError> {
    let t = r.get_tenant()?.to_str().map_err(|e| bad("tenant", e.to_string()))?;
    let n = r.get_queue()?.to_str().map_err(|e| bad("queue", e.to_string()))?;
    QueueName::new(t, n).map_err(|e| bad("queue name", e.to_string()))
}

pub(crate) fn set_queue(mut b: queue_ref::Builder<'_>, q: &QueueName) {
    b.set_tenant(q.tenant());
    b.set_queue(q.queue());
}

pub(crate) fn read_lease(bytes: capnp::Result<&[u8]>) -> Result<LeaseId, ErrorReply> {
    let bytes = bytes.map_err(malformed)?;
    LeaseId::from_slice(bytes).ok_or_else(|| invalid(format!("lease id must be 16 bytes, got {}", bytes.len())))
}

pub(crate) fn read_message_id(bytes: capnp::Result<&[u8]>) -> Result<MessageId, ErrorReply> {
    let bytes = bytes.map_err(malformed)?;
    MessageId::from_slice(bytes).ok_or_else(|| invalid(format!("message id must be 16 bytes, got {}", bytes.len())))
}

/// A message id of a response.
pub(crate) fn reply_message_id(bytes: capnp::Result<&[u8]>) -> Result<MessageId, ResponseDecodeError> {
    let bytes = bytes?;
    MessageId::from_slice(bytes).ok_or_else(|| bad("message id", format!("{} bytes", bytes.len())))
}

/// The error arm of a response.
pub(crate) fn read_error(
    e: capnp::Result<crate::queueber_capnp::error::Reader<'_>>,
) -> Result<ErrorReply, ResponseDecodeError> {
    let e = e?;
    let code = e.get_code().map_err(|e| ResponseDecodeError::UnknownCode(e.0))?;
    let message = e
        .get_message()?
        .to_string()
        .map_err(|e| bad("error message", e.to_string()))?;
    Ok(ErrorReply::new(code, message))
}
