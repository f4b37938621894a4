//! [`ShardStore`]: the RocksDB-backed [`QueueStore`] of one shard.
//!
//! The shard owns its queues, so it keeps their hot state in memory and uses
//! RocksDB only for what must survive a crash:
//!
//! * counters (ready records, delayed records) so stats never scan;
//! * the lease table (expiry, members, which lease holds which message), so a
//!   remove is validated without a read and costs one write (the lease's
//!   delete with its last member, an end marker before that);
//! * the *floor* of each queue's ready index: every live ready key sorts at or
//!   above it. Polls seek straight to the floor, so the tombstones left by
//!   consumed messages are never walked (the RocksDB "queue trap",
//!   facebook/rocksdb#5265), however many messages were consumed before;
//! * timers: lease expiries and delays coming due, shard-wide and ordered, so
//!   settling them costs in proportion to what is due, never to history.
//!
//! All of it is rebuilt from the column families when the shard opens.
//!
//! Layout: [`state`] (in-memory queue state, the batch), [`recovery`]
//! (rebuilding it at open), [`ready`] (adds, polls, stats, purges),
//! [`leases`] (expiry, remove, extend, release), [`dead`] (failures, dead
//! letters and redrive), [`fresh`] (records added and leased in one batch,
//! never written), [`retention`] (dropping what outlived its queue's
//! retention), [`policy`] (queue policies, created and changed), [`commit`]
//! (one batch).

mod commit;
mod dead;
mod fresh;
mod head;
mod leases;
mod policy;
mod ready;
mod recovery;
mod retention;
mod state;
mod tables;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use rocksdb::WriteBatch;

use super::engine::{Engine, CF_DEAD, CF_LEASES, CF_READY, CF_REGISTRY, CF_RETENTION};
use super::keys::{self, Counters, LeaseEntry, QueueId, ReadyKey, RecordHeader};
use super::{
    deadline, Command, CommandError, DeadLetter, DeadPeeked, Delivery, Executed, Lease, NewMessage, Outcome,
    PeekCursor, Peeked, PolicyInfo, QueueCounters, QueuePolicy, QueueSnapshot, QueueStats, QueueStore, ReplyBudget,
    StorageError, StoreError,
};
use crate::ids::{IdGenerator, LeaseId, MessageId};
use crate::names::QueueName;

use dead::Ending;
use fresh::Fresh;
use head::HeadCache;
use state::{Batch, Held, LeaseState, QueueState};
use tables::{DeadSet, Death, LeaseTable, MemberKey, ReadyIndex, Registry, RetentionIndex};

/// The store's in-memory maps (see [`crate::hashing`]).
pub(super) use crate::hashing::Map;

/// Decides whether this shard owns a queue (the server's stable hash).
pub type Ownership = Arc<dyn Fn(&QueueName) -> bool + Send + Sync>;

pub struct ShardStore {
    engine: Arc<Engine>,
    owns: Ownership,
    ids: IdGenerator,
    names: Map<QueueName, QueueId>,
    /// `names` in name order, for scrapes that walk every queue; built on
    /// the first walk after a queue was created or deleted (`None` until
    /// then), so a scrape of a stable set of queues sorts nothing.
    sorted: Option<Vec<(QueueName, QueueId)>>,
    queues: Map<QueueId, QueueState>,
    lease_deadlines: BTreeSet<(u64, QueueId, LeaseId)>,
    delay_deadlines: BTreeMap<(u64, QueueId), u64>,
    /// When each queue with a retention may next have a message to drop.
    retention_deadlines: BTreeSet<(u64, QueueId)>,
    /// Queues whose retention index is still being filled.
    retention_fills: BTreeSet<QueueId>,
    /// Queues found at open with a retention index they no longer keep.
    stale_retention: Vec<QueueId>,
    last_now: u64,
    /// How large the next batch's buffer starts (see [`BatchBytes`]).
    batch_bytes: BatchBytes,
    failed: Option<String>,
    /// Repeated batch failures: a line at most every 10 s, with a count.
    failure_log: crate::runtime::LogEvery,
    /// The bytes the queues' head caches hold between them ([`head`]).
    head_budget: head::HeadBudget,
    /// The buffers the next batch builds in ([`state::BatchScratch`]).
    scratch: state::BatchScratch,
    /// How many queues this store has counted in the engine's total
    /// ([`Engine::reserve_queue`]): one per queue it created, loaded or
    /// reserved room for, until [`ShardStore::count_queues`] settles it.
    counted_queues: u64,
}

impl Drop for ShardStore {
    /// A store closed on a live engine (tests, tools that reopen) takes its
    /// queues out of the engine's count.
    fn drop(&mut self) {
        self.engine.recount_queues(self.counted_queues, 0);
    }
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStore")
            .field("queues", &self.names.len())
            .field("leases", &self.lease_deadlines.len())
            .finish_non_exhaustive()
    }
}

/// The size a batch's `WriteBatch` starts at: about the largest of the
/// shard's recent batches, rounded up to a power of two and capped.
/// RocksDB keeps a batch in one `std::string`; started empty, it grew by
/// doubling, and the copies and reallocations of that growth were 2-3% of
/// the server's instructions per message (callgrind, B=32). Small batches
/// (removes) and large ones (adds) alternate, so the guess follows the
/// largest at once and forgets it slowly (an eighth per batch).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct BatchBytes(usize);

impl BatchBytes {
    /// Larger batches (deep pipelines, purges) grow past it as before: a
    /// bigger up-front allocation would be mapped and unmapped per batch.
    pub(super) const CAP: usize = 1 << 20;

    pub(super) fn observe(&mut self, bytes: usize) {
        self.0 = bytes.min(Self::CAP).max(self.0 - self.0 / 8);
    }

    pub(super) fn capacity(self) -> usize {
        self.0.checked_next_power_of_two().unwrap_or(Self::CAP).min(Self::CAP)
    }
}

impl ShardStore {
    /// Opens the shard that owns the queues for which `owns` is true, loading
    /// their state from the database.
    pub fn open(engine: Arc<Engine>, owns: Ownership) -> Result<ShardStore, StoreError> {
        let mut store = ShardStore {
            engine,
            owns,
            ids: IdGenerator::new(),
            names: Map::default(),
            sorted: None,
            queues: Map::default(),
            lease_deadlines: BTreeSet::new(),
            delay_deadlines: BTreeMap::new(),
            retention_deadlines: BTreeSet::new(),
            retention_fills: BTreeSet::new(),
            stale_retention: Vec::new(),
            last_now: 0,
            batch_bytes: BatchBytes::default(),
            failed: None,
            failure_log: crate::runtime::LogEvery::new(std::time::Duration::from_secs(10)),
            head_budget: head::HeadBudget::default(),
            scratch: state::BatchScratch::default(),
            counted_queues: 0,
        };
        store.load_all()?;
        store.count_queues();
        Ok(store)
    }

    /// Brings this store's share of the engine's queue count to the queues
    /// it holds: room reserved by a batch that failed, or by a create that
    /// did not happen, is given back; a deleted queue's is too.
    pub(super) fn count_queues(&mut self) {
        let held = self.names.len() as u64;
        if held != self.counted_queues {
            self.engine.recount_queues(self.counted_queues, held);
            self.counted_queues = held;
        }
    }

    /// A store owning every queue (one shard, tools, tests).
    pub fn open_all(engine: Arc<Engine>) -> Result<ShardStore, StoreError> {
        Self::open(engine, Arc::new(|_| true))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub(super) fn now(&mut self) -> u64 {
        // Never let time run backwards inside the store: the floor and the
        // timers assume it does not.
        self.last_now = self.last_now.max(self.engine.clock().now_ms());
        self.last_now
    }

    pub(super) fn queue_id(&self, name: &QueueName) -> Result<QueueId, StoreError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| StoreError::Command(CommandError::UnknownQueue(name.clone())))
    }
}
