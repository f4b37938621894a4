//! Typed writers for the shard's column families.
//!
//! Each writes RocksDB (into the batch being built) and the matching
//! in-memory index in the same call, so the two cannot drift, and each
//! decides how its records are deleted: the records that are written once
//! and deleted once (ready records, lease members) are taken with
//! `SingleDelete`, which lets a flush drop the put and its delete together
//! instead of keeping a tombstone, and only through these types, whose keys
//! are the write-once key types; records that are rewritten (a lease's
//! expiry, a queue's counters) are deleted plainly. Using `SingleDelete` on
//! a key written twice is undefined in RocksDB, which is why it is not left
//! to each call site.

use crate::storage::engine::Family;

/// How many batches in a row may leave a queue's stored floor behind the
/// true one (see [`keys::only_floor_rose`]). A restart then scans at most
/// the records those batches took (put and deleted) before it reaches the
/// true floor; the floor is written with the batch after.
pub(super) const FLOOR_LAG_BATCHES: u32 = 64;

#[allow(unused_imports)]
use super::*;

/// Ready records: one per visible or delayed message, keyed (queue,
/// visible-at, id). A key is written once: ids are unique, and a message
/// that comes back does so under a new visible-at. Each record written or
/// taken moves the queue's retention index with it (when it keeps one).
pub(super) struct ReadyIndex<'e>(&'e Family, RetentionIndex<'e>);

impl<'e> ReadyIndex<'e> {
    /// Taken per use from the engine's handles (resolved at open): each
    /// call site takes only the families it writes.
    pub(super) fn of(engine: &'e Engine) -> Result<Self, StoreError> {
        Ok(Self(engine.cf(CF_READY)?, RetentionIndex::of(engine)?))
    }

    /// Writes a record and moves its queue's counters and floor with it.
    pub(super) fn insert(&self, writes: &mut WriteBatch, q: &mut QueueState, key: ReadyKey, record: &[u8]) {
        writes.put_cf(self.0, key, record);
        self.noted(writes, q, key, record);
    }

    /// [`ReadyIndex::insert`] for a record held out of the batch's writes
    /// (an immediate add that a poll of the batch may take; see
    /// [`super::fresh`]): written when the batch's commands are applied,
    /// unless a poll took it by then.
    pub(super) fn insert_held(
        &self,
        fresh: &mut Fresh,
        writes: &mut WriteBatch,
        q: &mut QueueState,
        key: ReadyKey,
        record: &[u8],
    ) {
        fresh.hold(key, record);
        self.noted(writes, q, key, record);
    }

    /// What a record's insert moves besides the record itself: the head
    /// cache, the queue's counters and floor, its retention index.
    fn noted(&self, writes: &mut WriteBatch, q: &mut QueueState, key: ReadyKey, record: &[u8]) {
        if let Some(head) = &mut q.head {
            if !head.insert(key, record) {
                // Over the shard's budget: polls of this queue read RocksDB
                // until it is empty again.
                q.head = None;
            }
        }
        q.note_ready_insert(&key);
        if q.retention.is_some() {
            if let Some((at, id)) = keys::parse_ready_key(&key) {
                let enqueued_at = keys::record_enqueued_at(record);
                if at == enqueued_at {
                    // Found through the ready index itself.
                    q.note_retention_oldest(at);
                } else {
                    self.1.note(writes, q, &id, enqueued_at, keys::Place::Ready(at));
                }
            }
        }
    }

    /// Takes a record out (a poll leased it, or retention dropped it). The
    /// caller moves the queue's floor past it and counts it. A record the
    /// batch held (`super::fresh`) was never `written`: there is nothing to
    /// delete.
    pub(super) fn take(
        &self,
        writes: &mut WriteBatch,
        written: bool,
        q: &mut QueueState,
        key: &ReadyKey,
        enqueued_at: u64,
    ) {
        if written {
            writes.single_delete_cf(self.0, key);
        }
        if let Some(head) = &mut q.head {
            head.remove(key);
        }
        if q.retention.is_some() {
            if let Some((at, id)) = keys::parse_ready_key(key) {
                if at != enqueued_at {
                    self.1.forget(writes, q, &id, enqueued_at);
                }
            }
        }
    }

    /// Drops every record of a queue (a range tombstone: O(1) to write, and
    /// later scans skip the range whole), and its retention index.
    pub(super) fn purge(&self, writes: &mut WriteBatch, fresh: &mut Fresh, qid: QueueId) {
        // Held records would be written after the range delete: drop them.
        fresh.drop_queue(qid);
        writes.delete_range_cf(self.0, keys::queue_prefix(qid), keys::queue_end(qid));
        self.1.purge(writes, qid);
    }
}

/// The retention index of the queues that keep one: (queue, first add,
/// id) to where the message is, for the messages the ready index does not
/// already order by their first add: ready records whose visible time is
/// not their add time (delayed adds, messages back from a lease or a
/// redrive) and dead letters. A plain add, polled and removed, never
/// touches it. Kept by [`ReadyIndex`] and [`DeadSet`] as they write; a
/// message in flight has no entry (retention does not take it from its
/// worker). Keys are rewritten (a message that comes back is indexed again
/// under the same key): deleted plainly.
pub(super) struct RetentionIndex<'e>(&'e Family);

impl<'e> RetentionIndex<'e> {
    pub(super) fn of(engine: &'e Engine) -> Result<Self, StoreError> {
        Ok(Self(engine.cf(CF_RETENTION)?))
    }

    /// Indexes a message now at `place` (nothing when the queue keeps no
    /// index), and lowers the queue's oldest bound to it.
    pub(super) fn note(
        &self,
        writes: &mut WriteBatch,
        q: &mut QueueState,
        id: &MessageId,
        enqueued_at: u64,
        place: keys::Place,
    ) {
        if q.retention.is_some() {
            writes.put_cf(
                self.0,
                keys::retention_key(q.qid, enqueued_at, id),
                keys::encode_place(place),
            );
            q.note_retention_oldest(enqueued_at);
        }
    }

    /// Drops a message's entry (it was leased, moved or dropped).
    pub(super) fn forget(&self, writes: &mut WriteBatch, q: &QueueState, id: &MessageId, enqueued_at: u64) {
        if q.retention.is_some() {
            writes.delete_cf(self.0, keys::retention_key(q.qid, enqueued_at, id));
        }
    }

    pub(super) fn purge(&self, writes: &mut WriteBatch, qid: QueueId) {
        writes.delete_range_cf(self.0, keys::queue_prefix(qid), keys::queue_end(qid));
    }
}

/// A lease member's key: written once (a member record from before lease
/// blocks, or a block member's end marker), deleted once, with its lease.
pub(super) type MemberKey = [u8; keys::MEMBER_KEY_LEN];

/// Leases: a header per lease holding its block (its expiry, rewritten by
/// extends, and every member's record) and an end marker per member that
/// ended before the lease. A poll of 32 messages writes one value and a
/// remove of all 32 one delete, where a record per member cost 66 memtable
/// inserts per lease (a third of the server's instructions per message at
/// B=32, callgrind). Leases from before blocks (an expiry in the header, a
/// record per member key) are still read and ended.
pub(super) struct LeaseTable<'e>(&'e Family);

impl<'e> LeaseTable<'e> {
    pub(super) fn of(engine: &'e Engine) -> Result<Self, StoreError> {
        Ok(Self(engine.cf(CF_LEASES)?))
    }

    /// Writes (or, with a new expiry, rewrites) a lease's header: a block
    /// or, for a lease from before blocks, an expiry.
    pub(super) fn put_header(&self, writes: &mut WriteBatch, qid: QueueId, lease: &LeaseId, value: &[u8]) {
        writes.put_cf(self.0, keys::lease_key(qid, lease), value);
    }

    /// Deletes a lease's header (rewritten by extends: a plain delete).
    pub(super) fn delete_header(&self, writes: &mut WriteBatch, key: &[u8]) {
        writes.delete_cf(self.0, key);
    }

    /// Marks a block member as ended while its lease goes on.
    pub(super) fn mark_ended(&self, writes: &mut WriteBatch, qid: QueueId, lease: &LeaseId, id: &MessageId) {
        writes.put_cf(self.0, keys::member_key(qid, lease, id), []);
    }

    /// Deletes a member key: a record from before blocks, or an end marker.
    pub(super) fn delete_member(&self, writes: &mut WriteBatch, key: &MemberKey) {
        writes.single_delete_cf(self.0, key);
    }

    /// Drops every lease of a queue.
    pub(super) fn purge(&self, writes: &mut WriteBatch, qid: QueueId) {
        writes.delete_range_cf(self.0, keys::queue_prefix(qid), keys::queue_end(qid));
    }
}

/// Which message died, when and why.
#[derive(Debug, Clone, Copy)]
pub(super) struct Death {
    pub(super) id: MessageId,
    pub(super) at: u64,
    pub(super) reason: keys::DeadReason,
}

/// Dead letters, keyed (queue, died-at, id). Deleted plainly, not with
/// `SingleDelete`: a message redriven and dead again within the same
/// millisecond would write its key twice.
pub(super) struct DeadSet<'e>(&'e Family, RetentionIndex<'e>);

impl<'e> DeadSet<'e> {
    pub(super) fn of(engine: &'e Engine) -> Result<Self, StoreError> {
        Ok(Self(engine.cf(CF_DEAD)?, RetentionIndex::of(engine)?))
    }

    /// Buries a message: its record, as `death` says, in the queue's dead
    /// set (`scratch` holds the encoded value).
    pub(super) fn bury(
        &self,
        writes: &mut WriteBatch,
        q: &mut QueueState,
        death: Death,
        record: &[u8],
        scratch: &mut Vec<u8>,
    ) {
        keys::encode_dead(scratch, death.reason, record);
        writes.put_cf(self.0, keys::dead_key(q.qid, death.at, &death.id), &scratch[..]);
        q.counters.dead += 1;
        q.take_bytes(keys::payload_len(record) as u64);
        let enqueued_at = keys::record_enqueued_at(record);
        self.1
            .note(writes, q, &death.id, enqueued_at, keys::Place::Dead(death.at));
    }

    /// Takes a dead letter out (redriven, or dropped by retention); the
    /// caller counts it.
    pub(super) fn take(&self, writes: &mut WriteBatch, q: &QueueState, key: &[u8], id: &MessageId, enqueued_at: u64) {
        writes.delete_cf(self.0, key);
        self.1.forget(writes, q, id, enqueued_at);
    }

    /// Drops every dead letter of a queue (its retention index goes with
    /// the ready records').
    pub(super) fn purge(&self, writes: &mut WriteBatch, qid: QueueId) {
        writes.delete_range_cf(self.0, keys::queue_prefix(qid), keys::queue_end(qid));
    }
}

/// The registry: queue names to ids, and each queue's counters.
pub(super) struct Registry<'e>(&'e Family);

impl<'e> Registry<'e> {
    pub(super) fn of(engine: &'e Engine) -> Result<Self, StoreError> {
        Ok(Self(engine.cf(CF_REGISTRY)?))
    }

    pub(super) fn register(&self, writes: &mut WriteBatch, name: &QueueName, qid: QueueId) {
        writes.put_cf(self.0, keys::name_key(name), qid.to_be_bytes());
    }

    pub(super) fn unregister(&self, writes: &mut WriteBatch, name: &QueueName, qid: QueueId) {
        writes.delete_cf(self.0, keys::name_key(name));
        writes.delete_cf(self.0, keys::counters_key(qid));
        writes.delete_cf(self.0, keys::policy_key(qid));
        writes.delete_cf(self.0, keys::retention_state_key(qid));
    }

    /// Records whether a queue's retention index is complete (`Some`:
    /// [`keys::RETENTION_COMPLETE`] or [`keys::RETENTION_FILLING`]), or
    /// that it keeps none.
    pub(super) fn put_retention_state(&self, writes: &mut WriteBatch, qid: QueueId, state: Option<u8>) {
        match state {
            Some(state) => writes.put_cf(self.0, keys::retention_state_key(qid), [state]),
            None => writes.delete_cf(self.0, keys::retention_state_key(qid)),
        }
    }

    /// Writes a queue's policy (rewritten by every change: deleted plainly).
    pub(super) fn put_policy(&self, writes: &mut WriteBatch, q: &QueueState) {
        writes.put_cf(
            self.0,
            keys::policy_key(q.qid),
            keys::encode_policy(q.policy_version, &q.policy),
        );
    }

    /// Writes a changed queue's counters, unless they are stored as they
    /// are (a batch of removes only: see [`keys::encode_counters`]) or
    /// differ only by a floor that rose, for at most [`FLOOR_LAG_BATCHES`]
    /// batches in a row (see [`keys::only_floor_rose`]).
    pub(super) fn put_counters(&self, writes: &mut WriteBatch, q: &mut QueueState) {
        if std::mem::take(&mut q.dirty) {
            let encoded = keys::encode_counters(&q.counters, q.leased_bytes);
            let skip = match q.persisted.as_deref() {
                Some(stored) if stored == &encoded[..] => true,
                Some(stored) if q.floor_lag < FLOOR_LAG_BATCHES && keys::only_floor_rose(stored, &encoded) => {
                    q.floor_lag += 1;
                    true
                }
                _ => false,
            };
            if !skip {
                writes.put_cf(self.0, keys::counters_key(q.qid), &encoded);
                q.persisted = Some(encoded);
                q.floor_lag = 0;
            }
        }
    }
}
