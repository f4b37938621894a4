//! Ready records held out of a batch's writes while a poll later in the
//! same batch may take them.
//!
//! Why: a long poll parked on an empty queue is answered by the add that
//! wakes it, and the core runs the two in one batch. Written as they are
//! applied, the message's record would be put into the ready index and
//! single-deleted again in the same write batch, beside the lease block that
//! now holds it: two memtable inserts and a record's worth of WAL for
//! nothing. Held here instead, a record that a poll of the batch takes is
//! never written at all; what is still held when the batch's commands are
//! applied is written then ([`Fresh::flush`]), before the batch commits, so
//! the batch stays one atomic write whatever it holds.
//!
//! Only immediate adds to a queue that a poll names later in the batch are
//! held. A poll that reads RocksDB (its queue has no cache) merges them in,
//! so it sees every add before it in its batch, as a poll of a cached queue
//! does: a batch applies its commands in order.

use std::collections::BTreeMap;
use std::ops::Bound;

use rocksdb::WriteBatch;

use crate::storage::engine::Family;

use crate::names::QueueName;
use crate::storage::keys::{self, QueueId, ReadyKey};
use crate::storage::Command;

#[derive(Default)]
pub(super) struct Fresh {
    /// Queues a poll of the batch names after an add of the batch does
    /// (a batch names few queues: a list is enough).
    polled_after_add: Vec<QueueName>,
    /// The held records' bytes, back to back (one buffer per batch, not an
    /// allocation per record).
    bytes: Vec<u8>,
    /// Held records by key (the queue's id leads the key): where their
    /// bytes are.
    held: BTreeMap<ReadyKey, std::ops::Range<usize>>,
}

impl Fresh {
    /// Notes which queues of `commands` are polled after being added to.
    pub(super) fn plan(commands: &[Command]) -> Fresh {
        let mut fresh = Fresh::default();
        // A batch of one command has nothing to pair.
        if commands.len() < 2 {
            return fresh;
        }
        let mut added: Vec<&QueueName> = Vec::new();
        for command in commands {
            match command {
                Command::Add { queue, .. } if !added.contains(&queue) => added.push(queue),
                Command::Poll { queue, .. } if added.contains(&queue) && !fresh.polled_after_add.contains(queue) => {
                    fresh.polled_after_add.push(queue.clone());
                }
                _ => {}
            }
        }
        fresh
    }

    /// Whether an immediate add to `queue` is held: a poll follows it in
    /// the batch.
    pub(super) fn wants(&self, queue: &QueueName) -> bool {
        self.polled_after_add.contains(queue)
    }

    pub(super) fn hold(&mut self, key: ReadyKey, record: &[u8]) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(record);
        self.held.insert(key, at..self.bytes.len());
    }

    /// Takes a record out if it is held: `true` when it was (it was never
    /// written, so there is nothing to delete).
    pub(super) fn take(&mut self, key: &ReadyKey) -> bool {
        self.held.remove(key).is_some()
    }

    /// Whether a record is held (a poll that takes it notes the key and
    /// [`Fresh::forget`]s it after its scan).
    pub(super) fn holds(&self, key: &ReadyKey) -> bool {
        self.held.contains_key(key)
    }

    /// Forgets records a poll took.
    pub(super) fn forget(&mut self, taken: &[ReadyKey]) {
        for key in taken {
            self.held.remove(key);
        }
    }

    /// The held records with keys in `[start, end)`, in key order, for a
    /// poll that reads RocksDB and merges them with what it finds there.
    pub(super) fn range<'a>(&'a self, start: &[u8], end: &[u8]) -> impl Iterator<Item = (&'a ReadyKey, &'a [u8])> {
        self.held
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .map(|(k, at)| (k, &self.bytes[at.clone()]))
    }

    /// Forgets a queue's held records (the batch purged or deleted it).
    pub(super) fn drop_queue(&mut self, qid: QueueId) {
        let prefix = keys::queue_prefix(qid);
        self.held.retain(|k, _| !k.starts_with(&prefix));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Writes what is still held, once the batch's commands are applied.
    pub(super) fn flush(&mut self, writes: &mut WriteBatch, ready: &Family) {
        for (key, at) in std::mem::take(&mut self.held) {
            writes.put_cf(ready, key, &self.bytes[at]);
        }
        self.bytes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::IdGenerator;
    use crate::storage::NewMessage;

    fn name(q: &str) -> QueueName {
        QueueName::new("t", q).unwrap()
    }

    fn add(q: &str) -> Command {
        Command::Add {
            queue: name(q),
            messages: vec![NewMessage::new(b"x".to_vec())],
        }
    }

    fn poll(q: &str) -> Command {
        Command::Poll {
            queue: name(q),
            max_items: 1,
            lease_ms: 1000,
            max_bytes: crate::storage::ReplyBudget::unlimited(),
        }
    }

    #[test]
    fn only_queues_polled_after_an_add_are_wanted() {
        let fresh = Fresh::plan(&[poll("a"), add("a"), add("b"), poll("b")]);
        assert!(!fresh.wants(&name("a")), "a's poll comes before its add");
        assert!(fresh.wants(&name("b")));
        assert!(!Fresh::plan(&[add("b")]).wants(&name("b")));
    }

    #[test]
    fn held_records_are_found_by_range_taken_by_key_and_flushed_otherwise() {
        let ids = IdGenerator::new();
        let key = |qid, at| keys::ready_key(qid, at, &ids.message_id(at));
        let mut fresh = Fresh::plan(&[add("a"), poll("a")]);
        let (a1, a2, b1) = (key(1, 10), key(1, 11), key(2, 10));
        fresh.hold(a1, b"a1");
        fresh.hold(a2, b"a2");
        fresh.hold(b1, b"b1");
        let got: Vec<_> = fresh
            .range(&keys::queue_prefix(1), &keys::ready_visible_end(1, 10))
            .map(|(k, v)| (*k, v.to_vec()))
            .collect();
        assert_eq!(got, vec![(a1, b"a1".to_vec())], "only queue 1, visible by 10");
        assert!(fresh.holds(&a1));
        fresh.forget(&[a1]);
        assert!(!fresh.holds(&a1));
        fresh.hold(a1, b"a1");
        assert!(fresh.take(&a1));
        assert!(!fresh.take(&a1), "taken once");
        fresh.drop_queue(2);
        assert!(!fresh.take(&b1), "dropped with its queue");
        assert_eq!(fresh.held.len(), 1, "a2 is left to flush");
    }
}
