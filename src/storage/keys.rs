//! Byte encodings of keys and values.
//!
//! Every key is fixed-width, big-endian and starts with the 4-byte queue id,
//! so one queue's records are contiguous and sort the way we scan them. The
//! column family says what a key is; no key carries a text namespace.
//!
//! | column family | key                               | value                         |
//! |---------------|-----------------------------------|-------------------------------|
//! | `ready`       | qid · visible_at · message id (28)| record                        |
//! | `leases`      | qid · lease id (20)               | expires_at (8)                |
//! | `leases`      | qid · lease id · message id (36)  | record                        |
//! | `registry`    | `n` · len · tenant · queue        | qid (4)                       |
//! | `registry`    | `c` · qid (5)                     | counters                      |
//! | `registry`    | `p` · qid (5)                     | policy (version · 4 fields)   |
//!
//! A *record* is `enqueued_at (8) · delivery_count (4) · payload`: the same
//! bytes whether the message is ready or leased, so moving it is a copy.

use crate::ids::{LeaseId, MessageId};
use crate::names::QueueName;

pub type QueueId = u32;

pub const QID_LEN: usize = 4;
pub const READY_KEY_LEN: usize = QID_LEN + 8 + 16;
pub const LEASE_KEY_LEN: usize = QID_LEN + 16;
pub const MEMBER_KEY_LEN: usize = LEASE_KEY_LEN + 16;
pub const RECORD_HEADER_LEN: usize = 12;

pub type ReadyKey = [u8; READY_KEY_LEN];

pub fn queue_prefix(qid: QueueId) -> [u8; QID_LEN] {
    qid.to_be_bytes()
}

/// The first key after every key of queue `qid`. Queue ids stop below
/// `u32::MAX`, so this never wraps.
pub fn queue_end(qid: QueueId) -> [u8; QID_LEN] {
    (qid + 1).to_be_bytes()
}

pub fn ready_key(qid: QueueId, visible_at: u64, id: &MessageId) -> ReadyKey {
    let mut k = [0u8; READY_KEY_LEN];
    k[..4].copy_from_slice(&qid.to_be_bytes());
    k[4..12].copy_from_slice(&visible_at.to_be_bytes());
    k[12..].copy_from_slice(id.as_bytes());
    k
}

/// Upper bound (exclusive) of the ready keys of `qid` visible at `now`.
pub fn ready_visible_end(qid: QueueId, now: u64) -> [u8; QID_LEN + 8] {
    let mut k = [0u8; QID_LEN + 8];
    k[..4].copy_from_slice(&qid.to_be_bytes());
    // now + 1 cannot overflow: clocks are far from u64::MAX milliseconds.
    k[4..].copy_from_slice(&now.saturating_add(1).to_be_bytes());
    k
}

/// `(visible_at, id)` of a ready key.
pub fn parse_ready_key(k: &[u8]) -> Option<(u64, MessageId)> {
    if k.len() != READY_KEY_LEN {
        return None;
    }
    let at = u64::from_be_bytes(k[4..12].try_into().ok()?);
    Some((at, MessageId::from_slice(&k[12..])?))
}

pub fn lease_key(qid: QueueId, lease: &LeaseId) -> [u8; LEASE_KEY_LEN] {
    let mut k = [0u8; LEASE_KEY_LEN];
    k[..4].copy_from_slice(&qid.to_be_bytes());
    k[4..].copy_from_slice(lease.as_bytes());
    k
}

/// The first key after a lease's header and all its members.
pub fn lease_end(qid: QueueId, lease: &LeaseId) -> Vec<u8> {
    let mut k = lease_key(qid, lease).to_vec();
    k.push(0xff);
    k
}

pub fn member_key(qid: QueueId, lease: &LeaseId, id: &MessageId) -> [u8; MEMBER_KEY_LEN] {
    let mut k = [0u8; MEMBER_KEY_LEN];
    k[..LEASE_KEY_LEN].copy_from_slice(&lease_key(qid, lease));
    k[LEASE_KEY_LEN..].copy_from_slice(id.as_bytes());
    k
}

/// A key of the `leases` column family: a lease header or one member.
#[derive(Debug, PartialEq, Eq)]
pub enum LeaseEntry {
    Header(LeaseId),
    Member(LeaseId, MessageId),
}

pub fn parse_lease_entry(k: &[u8]) -> Option<LeaseEntry> {
    let lease = LeaseId::from_slice(k.get(QID_LEN..LEASE_KEY_LEN)?)?;
    match k.len() {
        LEASE_KEY_LEN => Some(LeaseEntry::Header(lease)),
        MEMBER_KEY_LEN => Some(LeaseEntry::Member(lease, MessageId::from_slice(&k[LEASE_KEY_LEN..])?)),
        _ => None,
    }
}

/// A message record: its metadata followed by the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub enqueued_at: u64,
    pub delivery_count: u32,
}

pub fn encode_record(out: &mut Vec<u8>, header: RecordHeader, payload: &[u8]) {
    out.clear();
    out.reserve(RECORD_HEADER_LEN + payload.len());
    out.extend_from_slice(&header.enqueued_at.to_be_bytes());
    out.extend_from_slice(&header.delivery_count.to_be_bytes());
    out.extend_from_slice(payload);
}

pub fn parse_record(v: &[u8]) -> Option<(RecordHeader, &[u8])> {
    if v.len() < RECORD_HEADER_LEN {
        return None;
    }
    let enqueued_at = u64::from_be_bytes(v[..8].try_into().ok()?);
    let delivery_count = u32::from_be_bytes(v[8..12].try_into().ok()?);
    Some((
        RecordHeader {
            enqueued_at,
            delivery_count,
        },
        &v[RECORD_HEADER_LEN..],
    ))
}

pub const REGISTRY_NAME_TAG: u8 = b'n';
pub const REGISTRY_COUNTERS_TAG: u8 = b'c';
pub const REGISTRY_POLICY_TAG: u8 = b'p';

/// Registry key of a queue name. Names are at most 128 bytes a part, so one
/// length byte delimits the tenant without escaping.
pub fn name_key(name: &QueueName) -> Vec<u8> {
    let (t, q) = (name.tenant().as_bytes(), name.queue().as_bytes());
    let mut k = Vec::with_capacity(2 + t.len() + q.len());
    k.push(REGISTRY_NAME_TAG);
    k.push(t.len() as u8);
    k.extend_from_slice(t);
    k.extend_from_slice(q);
    k
}

pub fn parse_name_key(k: &[u8]) -> Option<QueueName> {
    let (&tag, rest) = k.split_first()?;
    if tag != REGISTRY_NAME_TAG {
        return None;
    }
    let (&tlen, rest) = rest.split_first()?;
    let (t, q) = rest.split_at_checked(tlen as usize)?;
    QueueName::new(std::str::from_utf8(t).ok()?, std::str::from_utf8(q).ok()?).ok()
}

pub fn counters_key(qid: QueueId) -> [u8; 1 + QID_LEN] {
    tagged_key(REGISTRY_COUNTERS_TAG, qid)
}

pub fn policy_key(qid: QueueId) -> [u8; 1 + QID_LEN] {
    tagged_key(REGISTRY_POLICY_TAG, qid)
}

fn tagged_key(tag: u8, qid: QueueId) -> [u8; 1 + QID_LEN] {
    let mut k = [0u8; 1 + QID_LEN];
    k[0] = tag;
    k[1..].copy_from_slice(&qid.to_be_bytes());
    k
}

/// A stored policy: version, then each number field (0 = unset), then the
/// backoff's steps (a count, then each; nothing at all when unset, so the
/// first format, without backoff, reads as it did).
pub fn encode_policy(version: u64, p: &crate::types::QueuePolicy) -> Vec<u8> {
    let fields = [
        version,
        p.lease_ms.unwrap_or(0),
        p.max_depth.unwrap_or(0),
        p.max_bytes.unwrap_or(0),
        p.max_payload_bytes.unwrap_or(0),
    ];
    let mut v = Vec::with_capacity(48);
    for f in fields {
        v.extend_from_slice(&f.to_be_bytes());
    }
    if let Some(backoff) = &p.retry_backoff_ms {
        v.push(backoff.steps().len() as u8);
        for step in backoff.steps() {
            v.extend_from_slice(&step.to_be_bytes());
        }
    }
    v
}

pub fn parse_policy(v: &[u8]) -> Option<(u64, crate::types::QueuePolicy)> {
    let field = |at: usize| v.get(at..at + 8)?.try_into().ok().map(u64::from_be_bytes);
    let set = |i: usize| field(i * 8).filter(|&f| f != 0);
    let retry_backoff_ms = match v.get(40) {
        None if v.len() == 40 => None,
        None => return None,
        Some(&n) => {
            let steps = (0..usize::from(n))
                .map(|i| field(41 + i * 8))
                .collect::<Option<Vec<u64>>>()?;
            if v.len() != 41 + steps.len() * 8 {
                return None;
            }
            Some(crate::types::RetryBackoff::new(&steps).ok()?)
        }
    };
    Some((
        field(0)?,
        crate::types::QueuePolicy {
            lease_ms: set(1),
            max_depth: set(2),
            max_bytes: set(3),
            max_payload_bytes: set(4),
            retry_backoff_ms,
        },
    ))
}

/// Counters persisted with every batch that changes a queue, so that opening a
/// queue never has to count its messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counters {
    /// Ready records (visible and delayed).
    pub ready: u64,
    /// Payload bytes of the queue's messages, ready and leased (`max_bytes`).
    /// `None` in counters written before it was kept: recovery counts them.
    pub bytes: Option<u64>,
    /// Every ready key of the queue sorts at or after this one; polls seek here
    /// instead of wading through the tombstones of consumed messages.
    pub floor: Option<Vec<u8>>,
}

/// The first byte of counters that carry `bytes`. The first format began
/// with the high byte of `ready`, which stays 0 below 2^56 messages, so
/// this tag can never be mistaken for it.
const COUNTERS_V2: u8 = 2;

pub fn encode_counters(c: &Counters) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + 16 + 32);
    v.push(COUNTERS_V2);
    v.extend_from_slice(&c.ready.to_be_bytes());
    v.extend_from_slice(&c.bytes.unwrap_or(0).to_be_bytes());
    if let Some(f) = &c.floor {
        v.extend_from_slice(f);
    }
    v
}

pub fn parse_counters(v: &[u8]) -> Option<Counters> {
    let u64_at = |at: usize| v.get(at..at + 8)?.try_into().ok().map(u64::from_be_bytes);
    if v.first() == Some(&COUNTERS_V2) {
        let floor = (v.len() > 17).then(|| v[17..].to_vec());
        return Some(Counters {
            ready: u64_at(1)?,
            bytes: Some(u64_at(9)?),
            floor,
        });
    }
    let floor = (v.len() > 8).then(|| v[8..].to_vec());
    Some(Counters {
        ready: u64_at(0)?,
        bytes: None,
        floor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mid(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    #[test]
    fn ready_keys_sort_by_queue_then_time_then_id() {
        let a = ready_key(1, 5, &mid(9));
        let b = ready_key(1, 6, &mid(0));
        let c = ready_key(1, 6, &mid(1));
        let d = ready_key(2, 0, &mid(0));
        assert!(a < b && b < c && c < d);
        // Big-endian: 256 sorts after 255.
        assert!(ready_key(1, 255, &mid(0)) < ready_key(1, 256, &mid(0)));
        assert!(ready_key(255, u64::MAX, &mid(255)) < ready_key(256, 0, &mid(0)));
        assert_eq!(parse_ready_key(&c), Some((6, mid(1))));
        assert_eq!(parse_ready_key(&c[..27]), None);
    }

    #[test]
    fn visible_end_includes_now_and_excludes_later() {
        let end = ready_visible_end(3, 100);
        assert!(ready_key(3, 100, &mid(255))[..] < end[..]);
        assert!(ready_key(3, 101, &mid(0))[..] >= end[..]);
        assert!(end[..] < queue_end(3)[..]);
    }

    #[test]
    fn lease_headers_precede_their_members() {
        let l = LeaseId([7; 16]);
        let h = lease_key(1, &l);
        let m = member_key(1, &l, &mid(0));
        assert!(h[..] < m[..]);
        assert!(m[..] < lease_end(1, &l)[..]);
        assert!(lease_end(1, &l)[..] < lease_key(1, &LeaseId([8; 16]))[..]);
        assert_eq!(parse_lease_entry(&h), Some(LeaseEntry::Header(l)));
        assert_eq!(parse_lease_entry(&m), Some(LeaseEntry::Member(l, mid(0))));
        assert_eq!(parse_lease_entry(&m[..30]), None);
    }

    #[test]
    fn records_round_trip_and_reject_short_values() {
        let mut buf = Vec::new();
        let h = RecordHeader {
            enqueued_at: 42,
            delivery_count: 3,
        };
        encode_record(&mut buf, h, b"hello");
        assert_eq!(parse_record(&buf), Some((h, &b"hello"[..])));
        assert_eq!(parse_record(&buf[..11]), None);
    }

    #[test]
    fn name_keys_round_trip_and_do_not_collide() {
        let a = QueueName::new("ab", "c").unwrap();
        let b = QueueName::new("a", "bc").unwrap();
        assert_ne!(name_key(&a), name_key(&b));
        assert_eq!(parse_name_key(&name_key(&a)), Some(a));
        assert_eq!(parse_name_key(&counters_key(1)), None);
        assert_eq!(parse_name_key(&[b'n', 200, b'x']), None);
    }

    #[test]
    fn counters_round_trip() {
        let c = Counters {
            ready: 9,
            bytes: Some(1234),
            floor: Some(ready_key(1, 2, &mid(3)).to_vec()),
        };
        assert_eq!(parse_counters(&encode_counters(&c)), Some(c));
        let empty = Counters {
            bytes: Some(0),
            ..Counters::default()
        };
        assert_eq!(parse_counters(&encode_counters(&empty)), Some(empty));
        assert_eq!(parse_counters(&[1, 2]), None);
    }

    #[test]
    fn counters_of_the_first_format_still_parse_without_bytes() {
        let floor = ready_key(1, 2, &mid(3));
        let mut old = 9u64.to_be_bytes().to_vec();
        old.extend_from_slice(&floor);
        let c = parse_counters(&old).unwrap();
        assert_eq!((c.ready, c.bytes, c.floor), (9, None, Some(floor.to_vec())));
        assert_eq!(parse_counters(&7u64.to_be_bytes()).unwrap().ready, 7);
    }

    #[test]
    fn policies_round_trip_with_unset_fields() {
        let p = crate::types::QueuePolicy {
            lease_ms: Some(5_000),
            max_depth: Some(crate::types::UNLIMITED),
            max_bytes: None,
            max_payload_bytes: Some(1024),
            retry_backoff_ms: None,
        };
        assert_eq!(parse_policy(&encode_policy(3, &p)), Some((3, p)));
        assert_eq!(encode_policy(3, &p).len(), 40);
        let with_backoff = crate::types::QueuePolicy {
            retry_backoff_ms: Some(crate::types::RetryBackoff::new(&[1000, 5000]).unwrap()),
            ..p
        };
        assert_eq!(parse_policy(&encode_policy(4, &with_backoff)), Some((4, with_backoff)));
        assert_eq!(parse_policy(&[0; 39]), None);
        assert_eq!(parse_policy(&[0; 42]), None);
    }
}
