//! The values a client and the server exchange: messages to add, messages
//! handed out under a lease, queue counters. Plain data with no storage or
//! runtime behind it, so the client (`default-features = false`) has them
//! without RocksDB or glommio.

use bytes::Bytes;

use crate::ids::{LeaseId, MessageId};

/// One message to add. Payloads are `Bytes`: the server reads the payloads
/// of one request (or one poll) into one buffer that they share, instead
/// of an allocation per message that another thread then frees (two per
/// message were 7% of the server's instructions at B=32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub payload: Bytes,
    /// Milliseconds before the message becomes visible (0 = at once).
    pub delay_ms: u64,
}

impl NewMessage {
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            delay_ms: 0,
        }
    }

    pub fn delayed(payload: impl Into<Bytes>, delay_ms: u64) -> Self {
        Self {
            payload: payload.into(),
            delay_ms,
        }
    }
}

/// A message handed out by a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: MessageId,
    pub payload: Bytes,
    /// How many times this message has been leased, this time included.
    pub delivery_count: u32,
    pub enqueued_at_ms: u64,
}

/// What a successful poll hands out: a fresh lease over some messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub expires_at_ms: u64,
    pub messages: Vec<Delivery>,
}

/// Cheap counters of one queue (no scan).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub visible: u64,
    pub delayed: u64,
    pub in_flight: u64,
    /// How long the next message in line has been in the queue; `None` when
    /// nothing is visible.
    pub oldest_visible_age_ms: Option<u64>,
    /// Adds are being refused because the data filesystem is under its
    /// free-space reserve (a server-wide state, reported per queue too).
    pub disk_full: bool,
    /// Dead letters (see [`DeadLetter`]).
    pub dead: u64,
    /// Messages dropped because they outlived the queue's `retention_ms`,
    /// over the queue's life (kept across restarts and purges).
    pub dropped: u64,
}

/// Where a peek stopped: the position of the last message it returned, in
/// delivery order (visible time, then id). Opaque to clients (24 bytes on
/// the wire); the next peek starts just after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeekCursor {
    pub visible_at_ms: u64,
    pub id: MessageId,
}

impl PeekCursor {
    pub const WIRE_LEN: usize = 24;

    pub fn to_bytes(self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[..8].copy_from_slice(&self.visible_at_ms.to_be_bytes());
        b[8..].copy_from_slice(self.id.as_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<PeekCursor> {
        if b.len() != Self::WIRE_LEN {
            return None;
        }
        Some(PeekCursor {
            visible_at_ms: u64::from_be_bytes(b[..8].try_into().ok()?),
            id: MessageId::from_slice(&b[8..])?,
        })
    }
}

/// What a peek saw: messages visible now, not leased, and where to go on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Peeked {
    /// In delivery order, with their current delivery counts.
    pub messages: Vec<Delivery>,
    /// A peek at the dead letters: them instead, oldest death first.
    pub dead: Vec<DeadLetter>,
    /// Set when more follow the last one returned.
    pub cursor: Option<PeekCursor>,
}

/// Most deliveries a policy may bound a message to (else unlimited).
pub const MAX_DELIVERIES_LIMIT: u64 = 1000;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Delivered `max_deliveries` times without being removed.
    MaxDeliveries,
    /// A worker failed it with `dead` set.
    Rejected,
}

/// A message that will not be delivered again unless redriven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: MessageId,
    pub payload: Vec<u8>,
    /// Deliveries before it died.
    pub delivery_count: u32,
    pub enqueued_at_ms: u64,
    pub died_at_ms: u64,
    pub reason: DeadReason,
    /// The last error text a worker reported with `fail` (up to 1 KiB).
    pub last_error: Option<String>,
}

/// Longest error text a message keeps from `fail`, in bytes.
pub const MAX_ERROR_LEN: usize = 1024;

/// `error` cut to [`MAX_ERROR_LEN`] bytes at a character boundary.
pub fn clip_error(error: &str) -> &str {
    let mut end = error.len().min(MAX_ERROR_LEN);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

/// Where a peek at dead letters stopped (their order: time of death, id).
pub type DeadCursor = PeekCursor;

/// What a peek at dead letters saw.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeadPeeked {
    pub letters: Vec<DeadLetter>,
    pub cursor: Option<DeadCursor>,
}

/// `max_depth` or `max_bytes` without a bound (on the wire: all ones).
pub const UNLIMITED: u64 = u64::MAX;

/// Most steps of a retry backoff.
pub const MAX_BACKOFF_STEPS: usize = 8;

/// Delays before a message whose delivery failed (its lease expired, or it
/// was released without a delay of its own) is visible again: the n-th
/// step after the n-th failed delivery, the last step repeating. A fixed
/// array, so a policy stays `Copy` and checking it allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryBackoff {
    steps: [u64; MAX_BACKOFF_STEPS],
    len: u8,
}

impl RetryBackoff {
    /// At most [`MAX_BACKOFF_STEPS`] steps, in milliseconds.
    pub fn new(steps: &[u64]) -> Result<RetryBackoff, String> {
        if steps.len() > MAX_BACKOFF_STEPS {
            return Err(format!("{} backoff steps: at most {MAX_BACKOFF_STEPS}", steps.len()));
        }
        let mut backoff = RetryBackoff {
            len: steps.len() as u8,
            ..RetryBackoff::default()
        };
        backoff.steps[..steps.len()].copy_from_slice(steps);
        Ok(backoff)
    }

    pub fn steps(&self) -> &[u64] {
        &self.steps[..usize::from(self.len)]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The delay after the `failures`-th failed delivery (1 for the first):
    /// that step, or the last; 0 without steps.
    pub fn after(&self, failures: u32) -> u64 {
        let steps = self.steps();
        let n = (failures.max(1) as usize).min(steps.len());
        steps.get(n.wrapping_sub(1)).copied().unwrap_or(0)
    }
}

/// A queue's own settings. `None` leaves a field to the server's default
/// (`queueberd --default-*` flags); on the wire, 0 (an empty list).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueuePolicy {
    /// The lease, in milliseconds, of a poll that names none (`leaseMs` 0).
    pub lease_ms: Option<u64>,
    /// Most messages the queue holds (visible, delayed and in flight); an
    /// add that would go past it is refused whole (`queueFull`).
    /// [`UNLIMITED`] for no bound.
    pub max_depth: Option<u64>,
    /// Most payload bytes the queue holds (visible, delayed and in flight);
    /// same refusal. [`UNLIMITED`] for no bound.
    pub max_bytes: Option<u64>,
    /// Largest payload of one message in this queue: at most the server's
    /// `--max-payload-bytes`.
    pub max_payload_bytes: Option<u64>,
    /// Delays before a failed delivery's message is visible again (none by
    /// default: at once).
    pub retry_backoff_ms: Option<RetryBackoff>,
    /// Deliveries after which a message that is not removed is
    /// dead-lettered instead of coming back (1 to 1,000, or [`UNLIMITED`]).
    pub max_deliveries: Option<u64>,
    /// How long a message may stay, from its first add, before it is
    /// dropped, whether visible, delayed or dead ([`UNLIMITED`]: forever).
    /// A message in flight is not taken from its worker: it is dropped when
    /// its lease ends, instead of coming back or dying.
    pub retention_ms: Option<u64>,
}

impl QueuePolicy {
    /// Each field of `self`, or else `defaults`'s.
    pub fn or(self, defaults: QueuePolicy) -> QueuePolicy {
        QueuePolicy {
            lease_ms: self.lease_ms.or(defaults.lease_ms),
            max_depth: self.max_depth.or(defaults.max_depth),
            max_bytes: self.max_bytes.or(defaults.max_bytes),
            max_payload_bytes: self.max_payload_bytes.or(defaults.max_payload_bytes),
            retry_backoff_ms: self.retry_backoff_ms.or(defaults.retry_backoff_ms),
            max_deliveries: self.max_deliveries.or(defaults.max_deliveries),
            retention_ms: self.retention_ms.or(defaults.retention_ms),
        }
    }

    /// The retention in force: `None` when messages are kept forever.
    pub fn retention(&self) -> Option<u64> {
        self.retention_ms.filter(|&r| r != UNLIMITED)
    }
}

/// A queue's policy as stored, with what applies once the server's
/// defaults fill the fields it leaves unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyInfo {
    /// 0 until a policy is set (at `createQueue` or by `setPolicy`), then
    /// one more with every change.
    pub version: u64,
    pub policy: QueuePolicy,
    /// Every field set: the queue's own, else the server's default.
    pub effective: QueuePolicy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_steps_repeat_the_last_and_are_bounded() {
        let b = RetryBackoff::new(&[1000, 5000, 30000]).unwrap();
        assert_eq!(
            [b.after(1), b.after(2), b.after(3), b.after(9)],
            [1000, 5000, 30000, 30000]
        );
        assert_eq!(b.after(0), 1000);
        assert_eq!(RetryBackoff::default().after(3), 0);
        assert!(RetryBackoff::new(&[1; MAX_BACKOFF_STEPS + 1]).is_err());
        assert_eq!(RetryBackoff::new(&[7]).unwrap().steps(), &[7]);
    }
}
