//! A queue's ready records in memory, so that polls take them without a
//! RocksDB iterator.
//!
//! Why: every poll opened an iterator on the ready index and sought the
//! queue's floor (about 11,700 instructions a poll at B=1, callgrind), and
//! at B=32 stepping it was a tenth of the server's instructions. A queue
//! whose records all went through this shard since it last had none is
//! fully known here, so its polls can read memory instead.
//!
//! The cache is *exact or absent*: while a queue has one, it holds every
//! record of the queue's ready index (kept so by [`super::tables::ReadyIndex`],
//! through which every write of that index goes). A queue gets one when it
//! is created, purged, or loaded or left with no ready record; it loses it
//! when the shard's budget ([`SHARD_HEAD_BYTES`]) is spent, and polls then
//! read RocksDB as before until the queue is empty again. A failed batch
//! reloads the shard's state, caches included.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::storage::keys::ReadyKey;

/// Bytes of ready records (with [`ENTRY_OVERHEAD`] each) one shard keeps in
/// memory across its queues.
pub(crate) const SHARD_HEAD_BYTES: usize = 32 << 20;

/// The most messages a poll may ask for and keep its queue's cache.
///
/// Why: the cache saves a poll its iterator (creation and seek, about
/// 11,700 instructions) but costs every message a copy of its record and a
/// map insert and removal. A poll of one message saves far more than that;
/// a poll of 32 shares one iterator among 32 messages, and with the cache
/// the server spent 2% more instructions per message (callgrind, B=32) and
/// 1–3% more CPU (peerbench). So a poll asking for more drops the cache,
/// and the queue gets a new one when it is next empty.
pub(crate) const SMALL_POLL: u32 = 4;

/// What an entry costs beyond its record: its key and the map's share.
const ENTRY_OVERHEAD: usize = 64;

/// The bytes a shard's caches hold between them.
pub(super) type HeadBudget = Arc<AtomicUsize>;

/// Every ready record of one queue, by key (see the module).
pub(super) struct HeadCache {
    records: BTreeMap<ReadyKey, Box<[u8]>>,
    bytes: usize,
    budget: HeadBudget,
}

impl std::fmt::Debug for HeadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadCache")
            .field("records", &self.records.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl HeadCache {
    /// The cache of a queue with no ready record.
    pub(super) fn empty(budget: &HeadBudget) -> HeadCache {
        HeadCache {
            records: BTreeMap::new(),
            bytes: 0,
            budget: budget.clone(),
        }
    }

    /// Adds (or replaces) a record. `false` when the shard's budget is
    /// spent: the cache is then no longer exact and must be dropped.
    #[must_use]
    pub(super) fn insert(&mut self, key: ReadyKey, record: &[u8]) -> bool {
        let cost = record.len() + ENTRY_OVERHEAD;
        if self.budget.fetch_add(cost, Ordering::Relaxed) + cost > SHARD_HEAD_BYTES {
            self.budget.fetch_sub(cost, Ordering::Relaxed);
            return false;
        }
        self.bytes += cost;
        if let Some(old) = self.records.insert(key, record.into()) {
            self.release(old.len() + ENTRY_OVERHEAD);
        }
        true
    }

    pub(super) fn remove(&mut self, key: &ReadyKey) {
        if let Some(old) = self.records.remove(key) {
            self.release(old.len() + ENTRY_OVERHEAD);
        }
    }

    /// The records with keys in `[start, end)`, in key order.
    pub(super) fn range<'a>(&'a self, start: &'a [u8], end: &'a [u8]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        self.records
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .map(|(k, v)| (&k[..], &v[..]))
    }

    fn release(&mut self, cost: usize) {
        self.bytes -= cost;
        self.budget.fetch_sub(cost, Ordering::Relaxed);
    }
}

impl Drop for HeadCache {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ReadyKey {
        let mut k = [0u8; crate::storage::keys::READY_KEY_LEN];
        k[10] = n;
        k
    }

    #[test]
    fn ranges_are_in_key_order_and_the_budget_follows_the_records() {
        let budget = HeadBudget::default();
        let mut cache = HeadCache::empty(&budget);
        for n in [3, 1, 2] {
            assert!(cache.insert(key(n), &[n; 10]));
        }
        let got: Vec<u8> = cache.range(&key(1), &key(3)).map(|(_, v)| v[0]).collect();
        assert_eq!(got, vec![1, 2], "from start, before end");
        assert_eq!(budget.load(Ordering::Relaxed), 3 * (10 + ENTRY_OVERHEAD));
        assert!(cache.insert(key(2), &[9; 20]), "a replaced record");
        cache.remove(&key(1));
        assert_eq!(
            budget.load(Ordering::Relaxed),
            (10 + ENTRY_OVERHEAD) + (20 + ENTRY_OVERHEAD)
        );
        drop(cache);
        assert_eq!(
            budget.load(Ordering::Relaxed),
            0,
            "a dropped cache gives its bytes back"
        );
    }

    #[test]
    fn an_insert_past_the_shard_budget_is_refused() {
        let budget = HeadBudget::default();
        budget.store(SHARD_HEAD_BYTES - 100, Ordering::Relaxed);
        let mut cache = HeadCache::empty(&budget);
        assert!(!cache.insert(key(1), &[0; 100]));
        assert_eq!(budget.load(Ordering::Relaxed), SHARD_HEAD_BYTES - 100);
        assert!(cache.insert(key(1), &[0; 10]));
    }
}
