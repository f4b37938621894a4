//! Byte encodings of keys and values.
//!
//! Every key is fixed-width, big-endian and starts with the 4-byte queue id,
//! so one queue's records are contiguous and sort the way we scan them. The
//! column family says what a key is; no key carries a text namespace.
//!
//! | column family | key                               | value                         |
//! |---------------|-----------------------------------|-------------------------------|
//! | `ready`       | qid · visible_at · message id (28)| record                        |
//! | `leases`      | qid · lease id (20)               | lease block, or expires_at (8)|
//! | `leases`      | qid · lease id · message id (36)  | empty (member ended), or record|
//! | `registry`    | `n` · len · tenant · queue        | qid (4)                       |
//! | `registry`    | `c` · qid (5)                     | counters                      |
//! | `registry`    | `p` · qid (5)                     | policy (version · 4 fields)   |
//!
//! | `registry`    | `r` · qid (5)                     | retention index state (1)     |
//! | `dead`        | qid · died_at · message id (28)   | reason (1) · record           |
//! | `retention`   | qid · enqueued_at · message id (28)| place (1) · visible/died at (8)|
//!
//! A *record* is `enqueued_at (8) · delivery_count (4) · payload`: the same
//! bytes whether the message is ready, leased or dead, so moving it is a
//! copy. A message a worker reported failing carries the error text too:
//! the top bit of `delivery_count` is then set and `len (2) · text` comes
//! before the payload.
//!
//! A *lease block* is `expires_at (8)` followed by each member as
//! `message id (16) · record length (4) · record`: a poll writes its whole
//! lease as one value. A member that ends while others stay (a remove,
//! release or failure of some of its messages) is marked by an empty value
//! under its member key, deleted with the lease. Leases written before
//! blocks have an 8-byte header and one record per member key; both are
//! read, so a database from before keeps its leases.

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

/// Starts a lease block in `out` (see the module docs).
pub fn start_lease_block(out: &mut Vec<u8>, expires_at: u64) {
    out.clear();
    out.extend_from_slice(&expires_at.to_be_bytes());
}

/// Appends a member to a lease block: its id and its record.
pub fn push_block_member(
    out: &mut Vec<u8>,
    id: &MessageId,
    header: RecordHeader,
    error: Option<&[u8]>,
    payload: &[u8],
) {
    out.extend_from_slice(id.as_bytes());
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    append_record(out, header, error, payload);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// A lease header's value: a block (`members` holds the rest of it) or,
/// from before blocks, only the expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseHeader<'a> {
    pub expires_at: u64,
    pub members: Option<BlockMembers<'a>>,
}

/// A lease header's value; `None` if it is neither an expiry nor a block.
pub fn parse_lease_header(v: &[u8]) -> Option<LeaseHeader<'_>> {
    let expires_at = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let members = (v.len() > 8).then(|| BlockMembers(&v[8..]));
    Some(LeaseHeader { expires_at, members })
}

/// The members of a lease block, in the order the poll took them. Yields
/// `Err(())` once, then stops, if the rest is not a whole member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMembers<'a>(&'a [u8]);

impl<'a> Iterator for BlockMembers<'a> {
    type Item = Result<(MessageId, &'a [u8]), ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let member = (|| {
            let id = MessageId::from_slice(self.0.get(..16)?)?;
            let len = u32::from_be_bytes(self.0.get(16..20)?.try_into().ok()?) as usize;
            let record = self.0.get(20..20usize.checked_add(len)?)?;
            Some((id, record, 20 + len))
        })();
        match member {
            Some((id, record, used)) => {
                self.0 = &self.0[used..];
                Some(Ok((id, record)))
            }
            None => {
                self.0 = &[];
                Some(Err(()))
            }
        }
    }
}

/// A message record: its metadata followed by the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub enqueued_at: u64,
    pub delivery_count: u32,
}

/// The bit of the stored delivery count that says an error text follows.
/// Delivery counts stay far below it.
const HAS_ERROR: u32 = 1 << 31;

/// Longest error text a record keeps (longer texts are cut at a character
/// boundary by the caller, [`crate::types::clip_error`]).
pub use crate::types::MAX_ERROR_LEN;

pub fn encode_record(out: &mut Vec<u8>, header: RecordHeader, payload: &[u8]) {
    encode_record_with_error(out, header, None, payload);
}

/// A record that carries `error`, the last failure a worker reported.
pub fn encode_record_with_error(out: &mut Vec<u8>, header: RecordHeader, error: Option<&[u8]>, payload: &[u8]) {
    out.clear();
    append_record(out, header, error, payload);
}

/// Appends a record to `out` (see [`encode_record_with_error`]).
fn append_record(out: &mut Vec<u8>, header: RecordHeader, error: Option<&[u8]>, payload: &[u8]) {
    let error = error.map(|e| &e[..e.len().min(MAX_ERROR_LEN)]);
    out.reserve(RECORD_HEADER_LEN + error.map_or(0, |e| 2 + e.len()) + payload.len());
    out.extend_from_slice(&header.enqueued_at.to_be_bytes());
    let count = header.delivery_count & !HAS_ERROR;
    match error {
        None => out.extend_from_slice(&count.to_be_bytes()),
        Some(e) => {
            out.extend_from_slice(&(count | HAS_ERROR).to_be_bytes());
            out.extend_from_slice(&(e.len() as u16).to_be_bytes());
            out.extend_from_slice(e);
        }
    }
    out.extend_from_slice(payload);
}

/// A record's header and payload (the error text skipped).
/// The time of a record's first add (0 for a record too short to hold
/// one, which parsing it elsewhere reports as corrupt).
pub fn record_enqueued_at(record: &[u8]) -> u64 {
    record
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

pub fn parse_record(v: &[u8]) -> Option<(RecordHeader, &[u8])> {
    parse_full_record(v).map(|r| (r.header, r.payload))
}

/// A record read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FullRecord<'a> {
    pub header: RecordHeader,
    /// The last error a worker reported, if any.
    pub error: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// A record's header, error text (if a worker reported one) and payload.
pub fn parse_full_record(v: &[u8]) -> Option<FullRecord<'_>> {
    if v.len() < RECORD_HEADER_LEN {
        return None;
    }
    let enqueued_at = u64::from_be_bytes(v[..8].try_into().ok()?);
    let stored = u32::from_be_bytes(v[8..12].try_into().ok()?);
    let header = RecordHeader {
        enqueued_at,
        delivery_count: stored & !HAS_ERROR,
    };
    let rest = &v[RECORD_HEADER_LEN..];
    if stored & HAS_ERROR == 0 {
        return Some(FullRecord {
            header,
            error: None,
            payload: rest,
        });
    }
    let len = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
    let error = rest.get(2..2 + len)?;
    Some(FullRecord {
        header,
        error: Some(error),
        payload: &rest[2 + len..],
    })
}

/// The payload size of a record (what `max_bytes` counts).
pub fn payload_len(v: &[u8]) -> usize {
    parse_record(v).map_or(0, |(_, p)| p.len())
}

pub use crate::types::DeadReason;

fn reason_byte(reason: DeadReason) -> u8 {
    match reason {
        DeadReason::MaxDeliveries => 1,
        DeadReason::Rejected => 2,
    }
}

fn reason_of(b: u8) -> Option<DeadReason> {
    match b {
        1 => Some(DeadReason::MaxDeliveries),
        2 => Some(DeadReason::Rejected),
        _ => None,
    }
}

/// A dead letter's key: like a ready key, ordered by the time it died.
pub fn dead_key(qid: QueueId, died_at: u64, id: &MessageId) -> ReadyKey {
    ready_key(qid, died_at, id)
}

/// A dead letter: its reason, then its record.
pub fn encode_dead(out: &mut Vec<u8>, reason: DeadReason, record: &[u8]) {
    out.clear();
    out.reserve(1 + record.len());
    out.push(reason_byte(reason));
    out.extend_from_slice(record);
}

pub fn parse_dead(v: &[u8]) -> Option<(DeadReason, &[u8])> {
    let (&reason, record) = v.split_first()?;
    Some((reason_of(reason)?, record))
}

pub const REGISTRY_NAME_TAG: u8 = b'n';
pub const REGISTRY_COUNTERS_TAG: u8 = b'c';
pub const REGISTRY_POLICY_TAG: u8 = b'p';
pub const REGISTRY_RETENTION_TAG: u8 = b'r';

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

/// Whether a queue's retention index is complete (`RETENTION_COMPLETE`) or
/// still being filled from records written before it was kept
/// (`RETENTION_FILLING`); absent when the queue keeps none.
pub fn retention_state_key(qid: QueueId) -> [u8; 1 + QID_LEN] {
    tagged_key(REGISTRY_RETENTION_TAG, qid)
}

pub const RETENTION_FILLING: u8 = 0;
pub const RETENTION_COMPLETE: u8 = 1;

/// Where a message in the retention index is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// In the ready index, visible (or delayed) at this time.
    Ready(u64),
    /// A dead letter that died at this time.
    Dead(u64),
}

impl Place {
    /// The key of the record this place names.
    pub fn record_key(self, qid: QueueId, id: &MessageId) -> ReadyKey {
        match self {
            Place::Ready(at) => ready_key(qid, at, id),
            Place::Dead(at) => dead_key(qid, at, id),
        }
    }
}

/// A retention index key: like a ready key, ordered by the first add.
pub fn retention_key(qid: QueueId, enqueued_at: u64, id: &MessageId) -> ReadyKey {
    ready_key(qid, enqueued_at, id)
}

pub fn encode_place(place: Place) -> [u8; 9] {
    let (tag, at) = match place {
        Place::Ready(at) => (b'r', at),
        Place::Dead(at) => (b'd', at),
    };
    let mut v = [0u8; 9];
    v[0] = tag;
    v[1..].copy_from_slice(&at.to_be_bytes());
    v
}

pub fn parse_place(v: &[u8]) -> Option<Place> {
    let (&tag, at) = v.split_first()?;
    let at = u64::from_be_bytes(at.try_into().ok()?);
    match tag {
        b'r' => Some(Place::Ready(at)),
        b'd' => Some(Place::Dead(at)),
        _ => None,
    }
}

fn tagged_key(tag: u8, qid: QueueId) -> [u8; 1 + QID_LEN] {
    let mut k = [0u8; 1 + QID_LEN];
    k[0] = tag;
    k[1..].copy_from_slice(&qid.to_be_bytes());
    k
}

/// A stored policy: version, then each number field (0 = unset), then the
/// backoff's steps (a count, then each; 0 steps when unset), then
/// `max_deliveries` and `retention_ms` (0 = unset). Older records end
/// after the numbers (the first format), after the steps or after
/// `max_deliveries`; all still read.
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
    let steps = p.retry_backoff_ms.as_ref().map_or(&[][..], |b| b.steps());
    v.push(steps.len() as u8);
    for step in steps {
        v.extend_from_slice(&step.to_be_bytes());
    }
    v.extend_from_slice(&p.max_deliveries.unwrap_or(0).to_be_bytes());
    v.extend_from_slice(&p.retention_ms.unwrap_or(0).to_be_bytes());
    v
}

pub fn parse_policy(v: &[u8]) -> Option<(u64, crate::types::QueuePolicy)> {
    let field = |at: usize| v.get(at..at + 8)?.try_into().ok().map(u64::from_be_bytes);
    let set = |i: usize| field(i * 8).filter(|&f| f != 0);
    let (retry_backoff_ms, max_deliveries, retention_ms) = match v.get(40) {
        None if v.len() == 40 => (None, None, None),
        None => return None,
        Some(&n) => {
            let steps = (0..usize::from(n))
                .map(|i| field(41 + i * 8))
                .collect::<Option<Vec<u64>>>()?;
            let end = 41 + steps.len() * 8;
            let (max_deliveries, retention_ms) = match v.len() - end {
                0 => (None, None),
                8 => (field(end).filter(|&m| m != 0), None),
                16 => (field(end).filter(|&m| m != 0), field(end + 8).filter(|&r| r != 0)),
                _ => return None,
            };
            let backoff = match steps.is_empty() {
                true => None,
                false => Some(crate::types::RetryBackoff::new(&steps).ok()?),
            };
            (backoff, max_deliveries, retention_ms)
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
            max_deliveries,
            retention_ms,
        },
    ))
}

/// Counters persisted with every batch that changes a queue, so that opening a
/// queue never has to count its messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counters {
    /// Ready records (visible and delayed).
    pub ready: u64,
    /// Dead letters.
    pub dead: u64,
    /// Messages retention dropped, over the queue's life.
    pub dropped: u64,
    /// Payload bytes of the queue's messages, ready and leased (`max_bytes`).
    /// `None` in counters written before it was kept: recovery counts them.
    /// Persisted without the leased ones (see [`encode_counters`]).
    pub bytes: Option<u64>,
    /// Every ready key of the queue sorts at or after this one; polls seek here
    /// instead of wading through the tombstones of consumed messages.
    pub floor: Option<Vec<u8>>,
}

/// The first byte of counters that carry `bytes` (v2), `dead` (v3) and
/// `dropped` (v4). The
/// first format began with the high byte of `ready`, which stays 0 below
/// 2^56 messages, so these tags can never be mistaken for it.
const COUNTERS_V2: u8 = 2;
const COUNTERS_V3: u8 = 3;
const COUNTERS_V4: u8 = 4;
/// As v4, but `bytes` leaves out the payloads of leased messages, which
/// recovery counts from the lease blocks it reads anyway.
const COUNTERS_V5: u8 = 5;
/// Where the floor starts in v4 and v5 counters: the tag, then `ready`,
/// `bytes`, `dead` and `dropped` (8 bytes each).
const COUNTERS_FLOOR_AT: usize = 1 + 4 * 8;

/// Encodes counters with `leased` (the payload bytes of the queue's leased
/// messages) left out of `bytes`.
///
/// Why: a remove ends a leased message, which changes the queue's bytes and
/// nothing else in its counters. Kept without the leased payloads, the
/// persisted counters do not change, and a batch of removes writes none
/// (the shard skips a write that would not change the stored value).
pub fn encode_counters(c: &Counters, leased: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(COUNTERS_FLOOR_AT + 32);
    v.push(COUNTERS_V5);
    v.extend_from_slice(&c.ready.to_be_bytes());
    v.extend_from_slice(&c.bytes.unwrap_or(0).saturating_sub(leased).to_be_bytes());
    v.extend_from_slice(&c.dead.to_be_bytes());
    v.extend_from_slice(&c.dropped.to_be_bytes());
    if let Some(f) = &c.floor {
        v.extend_from_slice(f);
    }
    v
}

/// Whether counters encoded as `new` differ from the `stored` ones only by a
/// higher floor (or a floor where none was stored: no floor is the queue's
/// lowest key).
///
/// Why: the floor is a lower bound that scans start from ("every live ready
/// key sorts at or above it"), so a stored floor below the true one is still
/// correct, only a longer scan after a restart (over the records taken in
/// between). A batch that adds as many messages to a queue as it leases
/// from it (an add that wakes a long poll; at B=1, an add and a poll in one
/// batch) changes the queue's counters only by its floor: the shard skips
/// that write for a bounded number of batches in a row
/// (`tables::FLOOR_LAG_BATCHES`), which saves a counters write per message
/// on those paths.
pub fn only_floor_rose(stored: &[u8], new: &[u8]) -> bool {
    const AT: usize = COUNTERS_FLOOR_AT;
    if stored.first() != Some(&COUNTERS_V5) || stored.len() < AT || new.len() < AT {
        return false;
    }
    if stored[..AT] != new[..AT] {
        return false;
    }
    let (old_floor, new_floor) = (&stored[AT..], &new[AT..]);
    if new_floor.is_empty() {
        // No floor is the lowest: a floor that went back to none dropped.
        return old_floor.is_empty();
    }
    old_floor.is_empty() || new_floor > old_floor
}

/// Whether stored counters leave the leased payloads out of `bytes`
/// ([`encode_counters`]); older ones count them.
pub fn counters_exclude_leased(v: &[u8]) -> bool {
    v.first() == Some(&COUNTERS_V5)
}

/// Parses stored counters; `bytes` is as stored (see
/// [`counters_exclude_leased`]).
pub fn parse_counters(v: &[u8]) -> Option<Counters> {
    let u64_at = |at: usize| v.get(at..at + 8)?.try_into().ok().map(u64::from_be_bytes);
    let floor_from = |at: usize| (v.len() > at).then(|| v[at..].to_vec());
    match v.first() {
        Some(&COUNTERS_V5 | &COUNTERS_V4) => Some(Counters {
            ready: u64_at(1)?,
            bytes: Some(u64_at(9)?),
            dead: u64_at(17)?,
            dropped: u64_at(25)?,
            floor: floor_from(COUNTERS_FLOOR_AT),
        }),
        // Written before retention existed: nothing was dropped.
        Some(&COUNTERS_V3) => Some(Counters {
            ready: u64_at(1)?,
            bytes: Some(u64_at(9)?),
            dead: u64_at(17)?,
            dropped: 0,
            floor: floor_from(25),
        }),
        // Written before dead letters existed: there are none.
        Some(&COUNTERS_V2) => Some(Counters {
            ready: u64_at(1)?,
            bytes: Some(u64_at(9)?),
            dead: 0,
            dropped: 0,
            floor: floor_from(17),
        }),
        _ => Some(Counters {
            ready: u64_at(0)?,
            bytes: None,
            dead: 0,
            dropped: 0,
            floor: floor_from(8),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mid(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    #[test]
    fn a_lease_block_holds_its_expiry_and_every_member_record() {
        let header = |count| RecordHeader {
            enqueued_at: 7,
            delivery_count: count,
        };
        let mut block = vec![1, 2, 3];
        start_lease_block(&mut block, 1_000);
        push_block_member(&mut block, &mid(1), header(1), None, b"first");
        push_block_member(&mut block, &mid(2), header(3), Some(b"boom"), b"");
        let parsed = parse_lease_header(&block).expect("a block");
        assert_eq!(parsed.expires_at, 1_000);
        let members: Vec<_> = parsed
            .members
            .expect("members")
            .collect::<Result<_, _>>()
            .expect("whole");
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].0, mid(1));
        assert_eq!(parse_record(members[0].1), Some((header(1), &b"first"[..])));
        let second = parse_full_record(members[1].1).expect("record");
        assert_eq!(
            (second.header, second.error, second.payload),
            (header(3), Some(&b"boom"[..]), &b""[..])
        );
        // An expiry alone is a lease from before blocks.
        let expiry = 5u64.to_be_bytes();
        let old = parse_lease_header(&expiry).expect("an expiry");
        assert_eq!((old.expires_at, old.members), (5, None));
        assert_eq!(parse_lease_header(&[0; 7]), None);
        // A torn member is reported once, then the walk stops.
        let torn = parse_lease_header(&block[..block.len() - 1]).expect("a block");
        let walked: Vec<_> = torn.members.expect("members").collect();
        assert_eq!(walked.len(), 2);
        assert!(walked[0].is_ok() && walked[1].is_err());
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
    fn only_a_rising_floor_is_left_unwritten() {
        let at = |n: u8| Some(ready_key(1, u64::from(n), &mid(n)).to_vec());
        let base = Counters {
            ready: 2,
            bytes: Some(10),
            dead: 1,
            dropped: 0,
            floor: at(5),
        };
        let stored = encode_counters(&base, 0);
        let with = |c: Counters| encode_counters(&c, 0);
        assert!(only_floor_rose(
            &stored,
            &with(Counters {
                floor: at(7),
                ..base.clone()
            })
        ));
        assert!(
            !only_floor_rose(
                &stored,
                &with(Counters {
                    floor: at(3),
                    ..base.clone()
                })
            ),
            "a floor that drops is written"
        );
        assert!(
            !only_floor_rose(&stored, &stored),
            "unchanged is not a rise (and is skipped anyway)"
        );
        assert!(
            !only_floor_rose(
                &stored,
                &with(Counters {
                    floor: None,
                    ..base.clone()
                })
            ),
            "back to no floor is a drop"
        );
        assert!(
            !only_floor_rose(
                &stored,
                &with(Counters {
                    ready: 3,
                    floor: at(7),
                    ..base.clone()
                })
            ),
            "another counter changed"
        );
        assert!(!only_floor_rose(
            &stored,
            &with(Counters {
                bytes: Some(11),
                floor: at(7),
                ..base.clone()
            })
        ));
        let none = with(Counters {
            floor: None,
            ..base.clone()
        });
        assert!(
            only_floor_rose(
                &none,
                &with(Counters {
                    floor: at(1),
                    ..base.clone()
                })
            ),
            "no floor is the lowest"
        );
        // Counters of an older format are always rewritten.
        let mut v4 = stored.clone();
        v4[0] = COUNTERS_V4;
        assert!(!only_floor_rose(
            &v4,
            &with(Counters {
                floor: at(7),
                ..base.clone()
            })
        ));
    }

    #[test]
    fn counters_round_trip() {
        let c = Counters {
            ready: 9,
            bytes: Some(1234),
            dead: 4,
            dropped: 6,
            floor: Some(ready_key(1, 2, &mid(3)).to_vec()),
        };
        assert_eq!(parse_counters(&encode_counters(&c, 0)), Some(c.clone()));
        // Leased payloads are left out of the stored bytes.
        let stored = encode_counters(&c, 234);
        assert!(counters_exclude_leased(&stored));
        assert_eq!(parse_counters(&stored).unwrap().bytes, Some(1000));
        let empty = Counters {
            bytes: Some(0),
            ..Counters::default()
        };
        assert_eq!(parse_counters(&encode_counters(&empty, 0)), Some(empty));
        assert_eq!(parse_counters(&[1, 2]), None);
    }

    #[test]
    fn records_carry_an_error_text_when_a_worker_reported_one() {
        let h = RecordHeader {
            enqueued_at: 5,
            delivery_count: 3,
        };
        let mut plain = Vec::new();
        encode_record(&mut plain, h, b"payload");
        let full = |header, error, payload| FullRecord { header, error, payload };
        assert_eq!(parse_full_record(&plain), Some(full(h, None, &b"payload"[..])));
        let mut failed = Vec::new();
        encode_record_with_error(&mut failed, h, Some(b"boom"), b"payload");
        assert_eq!(
            parse_full_record(&failed),
            Some(full(h, Some(&b"boom"[..]), &b"payload"[..]))
        );
        assert_eq!(parse_record(&failed), Some((h, &b"payload"[..])));
        assert_eq!(payload_len(&failed), 7);
        let long = vec![b'x'; 5000];
        encode_record_with_error(&mut failed, h, Some(&long), b"p");
        assert_eq!(parse_full_record(&failed).unwrap().error.unwrap().len(), MAX_ERROR_LEN);
        assert_eq!(parse_full_record(&failed[..14]), None);
        let mut dead = Vec::new();
        encode_dead(&mut dead, DeadReason::Rejected, &plain);
        assert_eq!(parse_dead(&dead), Some((DeadReason::Rejected, &plain[..])));
        assert_eq!(parse_dead(&[9, 0]), None);
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
            max_deliveries: Some(5),
            retention_ms: Some(60_000),
        };
        assert_eq!(parse_policy(&encode_policy(3, &p)), Some((3, p)));
        // The first format: the numbers only.
        let first = &encode_policy(3, &p)[..40];
        let without = crate::types::QueuePolicy {
            max_deliveries: None,
            retention_ms: None,
            ..p
        };
        assert_eq!(parse_policy(first), Some((3, without)));
        let with_backoff = crate::types::QueuePolicy {
            retry_backoff_ms: Some(crate::types::RetryBackoff::new(&[1000, 5000]).unwrap()),
            ..p
        };
        assert_eq!(parse_policy(&encode_policy(4, &with_backoff)), Some((4, with_backoff)));
        assert_eq!(parse_policy(&[0; 39]), None);
        assert_eq!(parse_policy(&[0; 42]), None);
        // Written before retention: it ends after max_deliveries.
        let encoded = encode_policy(5, &p);
        let before_retention = &encoded[..encoded.len() - 8];
        let without_retention = crate::types::QueuePolicy {
            retention_ms: None,
            ..p
        };
        assert_eq!(parse_policy(before_retention), Some((5, without_retention)));
    }

    #[test]
    fn retention_places_round_trip() {
        for place in [Place::Ready(7), Place::Dead(u64::MAX)] {
            assert_eq!(parse_place(&encode_place(place)), Some(place));
        }
        assert_eq!(parse_place(b"x12345678"), None);
        assert_eq!(parse_place(b"r1"), None);
        let id = mid(3);
        assert_eq!(Place::Dead(9).record_key(1, &id), dead_key(1, 9, &id));
        assert_eq!(Place::Ready(9).record_key(1, &id), ready_key(1, 9, &id));
    }
}
