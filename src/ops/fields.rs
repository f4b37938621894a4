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
///
/// Clients send the same queue over and over, so the name last decoded on
/// this thread is kept: a request naming it again gets it back without
/// validating the name or allocating it (about 700 of the 3,500
/// instructions a request took to decode, callgrind).
pub(crate) fn read_queue(r: capnp::Result<queue_ref::Reader<'_>>) -> Result<QueueName, ErrorReply> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<QueueName>> = const { std::cell::RefCell::new(None) };
    }
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
    if let Some(last) = LAST.with_borrow(|last| last.as_ref().filter(|last| last.is_wire(tenant, queue)).cloned()) {
        return Ok(last);
    }
    let name =
        QueueName::from_wire(tenant, queue).map_err(|e| ErrorReply::new(ErrorCode::InvalidName, e.to_string()))?;
    LAST.with_borrow_mut(|last| *last = Some(name.clone()));
    Ok(name)
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

/// A request's list of message ids (16 bytes each).
pub(crate) fn read_message_ids(
    list: capnp::Result<capnp::data_list::Reader<'_>>,
) -> Result<Vec<MessageId>, ErrorReply> {
    list.map_err(malformed)?.iter().map(read_message_id).collect()
}

/// Writes message ids into a list built for them.
pub(crate) fn set_message_ids(mut list: capnp::data_list::Builder<'_>, ids: &[MessageId]) {
    for (i, id) in ids.iter().enumerate() {
        list.set(i as u32, id.as_bytes());
    }
}

/// Writes delivered messages (`List(PolledMessage)`: poll, peek).
pub(crate) fn set_deliveries(
    mut list: capnp::struct_list::Builder<'_, crate::queueber_capnp::polled_message::Owned>,
    messages: &[crate::types::Delivery],
) {
    for (i, m) in messages.iter().enumerate() {
        let mut e = list.reborrow().get(i as u32);
        e.set_id(m.id.as_bytes());
        e.set_payload(&m.payload);
        e.set_delivery_count(m.delivery_count);
        e.set_enqueued_at_ms(m.enqueued_at_ms);
    }
}

/// Reads delivered messages of a response (poll, peek).
pub(crate) fn read_deliveries(
    list: capnp::Result<capnp::struct_list::Reader<'_, crate::queueber_capnp::polled_message::Owned>>,
) -> Result<Vec<crate::types::Delivery>, ResponseDecodeError> {
    list?
        .iter()
        .map(|m| {
            Ok(crate::types::Delivery {
                id: reply_message_id(m.get_id())?,
                payload: bytes::Bytes::copy_from_slice(m.get_payload()?),
                delivery_count: m.get_delivery_count(),
                enqueued_at_ms: m.get_enqueued_at_ms(),
            })
        })
        .collect()
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

/// A policy of a request: 0 = unset. Checked against the server's limits
/// by [`check_policy`].
pub(crate) fn read_policy(
    r: capnp::Result<crate::queueber_capnp::queue_policy::Reader<'_>>,
) -> Result<crate::types::QueuePolicy, ErrorReply> {
    let r = r.map_err(malformed)?;
    let steps = r.get_retry_backoff_ms().map_err(malformed)?;
    policy_of(&r, steps.iter().collect()).map_err(|e| invalid(format!("retryBackoffMs: {e}")))
}

/// A policy's fields; an empty backoff is none.
fn policy_of(
    r: &crate::queueber_capnp::queue_policy::Reader<'_>,
    steps: Vec<u64>,
) -> Result<crate::types::QueuePolicy, String> {
    let set = |v: u64| (v != 0).then_some(v);
    let retry_backoff_ms = match steps.is_empty() {
        true => None,
        false => Some(crate::types::RetryBackoff::new(&steps)?),
    };
    Ok(crate::types::QueuePolicy {
        lease_ms: set(r.get_lease_ms()),
        max_depth: set(r.get_max_depth()),
        max_bytes: set(r.get_max_bytes()),
        max_payload_bytes: set(r.get_max_payload_bytes()),
        retry_backoff_ms,
        max_deliveries: set(r.get_max_deliveries()),
        retention_ms: set(r.get_retention_ms()),
    })
}

fn reply_policy(
    r: capnp::Result<crate::queueber_capnp::queue_policy::Reader<'_>>,
) -> Result<crate::types::QueuePolicy, ResponseDecodeError> {
    let r = r?;
    let steps = r.get_retry_backoff_ms()?.iter().collect();
    policy_of(&r, steps).map_err(|e| bad("retryBackoffMs", e))
}

pub(crate) fn set_policy(mut b: crate::queueber_capnp::queue_policy::Builder<'_>, p: &crate::types::QueuePolicy) {
    b.set_lease_ms(p.lease_ms.unwrap_or(0));
    b.set_max_depth(p.max_depth.unwrap_or(0));
    b.set_max_bytes(p.max_bytes.unwrap_or(0));
    b.set_max_payload_bytes(p.max_payload_bytes.unwrap_or(0));
    b.set_max_deliveries(p.max_deliveries.unwrap_or(0));
    b.set_retention_ms(p.retention_ms.unwrap_or(0));
    if let Some(backoff) = &p.retry_backoff_ms {
        let steps = backoff.steps();
        let mut list = b.init_retry_backoff_ms(steps.len() as u32);
        for (i, step) in steps.iter().enumerate() {
            list.set(i as u32, *step);
        }
    }
}

/// What the server can hold to: a lease within the longest duration, a
/// payload limit within the server's own.
#[cfg(feature = "server")]
pub(crate) fn check_policy(
    p: &crate::types::QueuePolicy,
    limits: &crate::server::ServerLimits,
) -> Result<(), ErrorReply> {
    let backoff = p.retry_backoff_ms.unwrap_or_default();
    if let Some(step) = backoff.steps().iter().find(|&&s| s > crate::storage::MAX_DURATION_MS) {
        return Err(invalid(format!(
            "retryBackoffMs step {step} is over the longest delay, {} ms",
            crate::storage::MAX_DURATION_MS
        )));
    }
    let limit = crate::types::MAX_DELIVERIES_LIMIT;
    if let Some(max) = p.max_deliveries.filter(|&m| m > limit && m != crate::types::UNLIMITED) {
        return Err(invalid(format!("maxDeliveries {max}: 1 to {limit}, or unlimited")));
    }
    if let Some(r) = p.retention().filter(|&r| r > crate::storage::MAX_DURATION_MS) {
        return Err(invalid(format!(
            "retentionMs {r} is over the longest duration, {} ms (all ones keeps messages forever)",
            crate::storage::MAX_DURATION_MS
        )));
    }
    if let Some(lease) = p.lease_ms.filter(|&l| l > crate::storage::MAX_DURATION_MS) {
        return Err(invalid(format!(
            "leaseMs {lease} is over the longest lease, {} ms",
            crate::storage::MAX_DURATION_MS
        )));
    }
    if let Some(max) = p.max_payload_bytes.filter(|&m| m > limits.max_payload_bytes as u64) {
        return Err(invalid(format!(
            "maxPayloadBytes {max} is over the server's max-payload-bytes {}",
            limits.max_payload_bytes
        )));
    }
    Ok(())
}

/// The answer of `createQueue`, `getPolicy` and `setPolicy`.
pub(crate) fn set_policy_reply(
    mut b: crate::queueber_capnp::policy_reply::Builder<'_>,
    info: &crate::types::PolicyInfo,
    created: bool,
) {
    b.set_version(info.version);
    set_policy(b.reborrow().init_policy(), &info.policy);
    set_policy(b.reborrow().init_effective(), &info.effective);
    b.set_created(created);
}

pub(crate) fn read_policy_reply(
    r: capnp::Result<crate::queueber_capnp::policy_reply::Reader<'_>>,
) -> Result<(crate::types::PolicyInfo, bool), ResponseDecodeError> {
    let r = r?;
    Ok((
        crate::types::PolicyInfo {
            version: r.get_version(),
            policy: reply_policy(r.get_policy())?,
            effective: reply_policy(r.get_effective())?,
        },
        r.get_created(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp::message::Builder;

    fn read(tenant: &str, queue: &str) -> Result<QueueName, ErrorReply> {
        let mut message = Builder::new_default();
        let mut q = message.init_root::<queue_ref::Builder<'_>>();
        q.set_tenant(tenant);
        q.set_queue(queue);
        read_queue(Ok(q.into_reader()))
    }

    fn name(tenant: &str, queue: &str) -> QueueName {
        QueueName::new(tenant, queue).expect("valid name")
    }

    #[test]
    fn the_last_name_is_reused_only_for_the_same_bytes() {
        assert_eq!(read("acme", "jobs").expect("valid"), name("acme", "jobs"));
        assert_eq!(read("acme", "jobs").expect("valid"), name("acme", "jobs"));
        // Either part differing, or the split between them, is another name.
        assert_eq!(read("acme", "jobz").expect("valid"), name("acme", "jobz"));
        assert_eq!(read("acmf", "jobz").expect("valid"), name("acmf", "jobz"));
        assert_eq!(read("acm", "fjobz").expect("valid"), name("acm", "fjobz"));
    }

    #[test]
    fn empty_parts_are_the_default_whether_or_not_reused() {
        let default = name("default", "default");
        assert_eq!(read("", "").expect("valid"), default);
        assert_eq!(read("", "").expect("valid"), default);
        assert_eq!(read("default", "").expect("valid"), default);
        assert_eq!(read("", "default").expect("valid"), default);
        assert_eq!(read("", "jobs").expect("valid"), name("default", "jobs"));
    }

    #[test]
    fn an_invalid_name_after_a_valid_one_is_still_refused() {
        read("acme", "jobs").expect("valid");
        for (tenant, queue) in [("acme", "jo bs"), ("ac/me", "jobs"), ("acme", &"j".repeat(200))] {
            let refused = read(tenant, queue).expect_err("invalid name");
            assert_eq!(refused.code, ErrorCode::InvalidName, "{tenant}/{queue}");
        }
        assert_eq!(read("acme", "jobs").expect("valid"), name("acme", "jobs"));
    }
}
