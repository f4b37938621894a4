//! The in-memory state of a shard's queues and of the batch being built.

#[allow(unused_imports)]
use super::*;

#[derive(Debug)]
pub(super) struct LeaseState {
    pub(super) expires_at: u64,
    /// Messages still held. The lease record is deleted with the last one.
    pub(super) live: u32,
    /// Written as one block (the header holds every member's record), or,
    /// from before blocks, as an expiry and a record per member.
    pub(super) block: bool,
    /// Block members that ended in earlier batches: their end markers are
    /// on disk, and go with the lease.
    pub(super) marked: Vec<MessageId>,
    /// Block members that ended in this batch: marked at its end unless
    /// the lease ends in the same batch (a remove of every id of a lease
    /// then writes a single delete).
    pub(super) unmarked: Vec<MessageId>,
}

impl LeaseState {
    pub(super) fn new(expires_at: u64, live: u32, block: bool) -> Self {
        Self {
            expires_at,
            live,
            block,
            marked: Vec::new(),
            unmarked: Vec::new(),
        }
    }
}

/// Who holds a leased message, and its payload's size (what a remove takes
/// off the queue's bytes without reading the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) lease: LeaseId,
    pub(super) bytes: u32,
}

#[derive(Debug)]
pub(super) struct QueueState {
    pub(super) name: QueueName,
    pub(super) qid: QueueId,
    pub(super) counters: Counters,
    /// What happened to the queue's messages since the store opened
    /// (metrics; carried over when a failed batch reloads the state). Kept
    /// here rather than in a map of its own so that a scrape of thousands
    /// of queues reads each queue's figures from one place.
    pub(super) metrics: QueueCounters,
    /// Ready records whose visible time is still in the future.
    pub(super) delayed: u64,
    pub(super) leases: Map<LeaseId, LeaseState>,
    /// Which lease holds each leased message (changed through
    /// [`QueueState::hold`], [`QueueState::release_holder`] and
    /// [`QueueState::clear_holders`], which keep `leased_bytes`).
    pub(super) holders: Map<MessageId, Held>,
    /// The payload bytes of `holders`: left out of the persisted counters.
    pub(super) leased_bytes: u64,
    /// The counters as last read or written (encoded): a batch that would
    /// write them unchanged writes nothing.
    pub(super) persisted: Option<Vec<u8>>,
    /// The queue's own policy and its version (0: never set).
    pub(super) policy: QueuePolicy,
    pub(super) policy_version: u64,
    /// The lowest ready key written by the batch in progress. The floor
    /// drops to it only when the batch's counters are persisted
    /// ([`QueueState::settle_floor`]): until the batch commits, its polls
    /// read RocksDB as it was, which does not show those records but still
    /// shows the ones the batch's polls took (their deletes are not
    /// committed either), so a floor lowered mid-batch would hand those out
    /// twice.
    pub(super) batch_low: Option<ReadyKey>,
    pub(super) dirty: bool,
    /// Batches since the counters were last written in which only the floor
    /// rose, so the stored floor lags (see [`super::tables`]'s
    /// `put_counters`): bounded, so a scan after a restart never starts far
    /// below the true floor.
    pub(super) floor_lag: u32,
    /// Moves with every change to the queue's ready records (a record
    /// written or taken, a purge): while it stands still the ready index of
    /// the queue is what it was, and so is its head.
    pub(super) ready_generation: u64,
    /// The visible head the last stats read found: `(ready_generation,
    /// enqueued_at)`. While the generation is unchanged that record is still
    /// the head (and still visible: time only moves forward), so a scrape of
    /// thousands of idle queues reads its ages from memory instead of
    /// seeking each queue's head in RocksDB.
    pub(super) head_seen: std::cell::Cell<Option<(u64, u64)>>,
    /// The queue's retention index, while its policy has a retention.
    pub(super) retention: Option<Retention>,
    /// The retention deadline listed in the shard's timers for this queue.
    pub(super) retention_listed: Option<u64>,
    /// Every ready record of the queue, when this shard knows them all
    /// (see [`super::head`]); polls read it instead of RocksDB.
    pub(super) head: Option<super::head::HeadCache>,
}

/// What a shard keeps in memory of a queue's retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Retention {
    /// The retention in force, in milliseconds (finite).
    pub(super) ms: u64,
    /// No message of the queue's ready records and dead letters was first
    /// added before this time (a lower bound: messages taken since may
    /// have left the oldest younger). `None`: there are none.
    pub(super) oldest: Option<u64>,
    /// Records written before the index was kept and not indexed yet:
    /// where indexing them goes on.
    pub(super) filling: Option<Fill>,
}

impl Retention {
    /// When the oldest entry may outlive the retention.
    pub(super) fn due(&self) -> Option<u64> {
        self.oldest.map(|o| o.saturating_add(self.ms))
    }

    /// Whether a message first added at `enqueued_at` is past retention.
    pub(super) fn expired(&self, enqueued_at: u64, now: u64) -> bool {
        enqueued_at.saturating_add(self.ms) <= now
    }
}

/// The next record a retention fill indexes: it walks the ready index,
/// then the dead letters, from these keys on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fill {
    Ready(Vec<u8>),
    Dead(Vec<u8>),
}

impl QueueState {
    pub(super) fn new(name: QueueName, qid: QueueId, counters: Counters) -> Self {
        Self {
            name,
            qid,
            counters,
            metrics: QueueCounters::default(),
            delayed: 0,
            leases: Map::default(),
            holders: Map::default(),
            leased_bytes: 0,
            persisted: None,
            policy: QueuePolicy::default(),
            policy_version: 0,
            batch_low: None,
            dirty: false,
            floor_lag: 0,
            ready_generation: 0,
            head_seen: std::cell::Cell::new(None),
            retention: None,
            retention_listed: None,
            head: None,
        }
    }

    /// The queue's ready records changed (see `ready_generation`).
    pub(super) fn note_ready_change(&mut self) {
        self.ready_generation = self.ready_generation.wrapping_add(1);
    }

    pub(super) fn visible(&self) -> u64 {
        self.counters.ready.saturating_sub(self.delayed)
    }

    /// At the end of a batch: the floor drops to the lowest record the
    /// batch wrote below it (see `batch_low`).
    pub(super) fn settle_floor(&mut self) {
        if let Some(low) = self.batch_low.take() {
            if self.counters.floor.as_deref().is_some_and(|f| low[..] < *f) {
                self.counters.floor = Some(low.to_vec());
            }
        }
    }

    /// Gives the queue a head cache if it has no ready record (see
    /// [`super::head`]): from now on every record goes through this shard.
    pub(super) fn cache_head_if_empty(&mut self, budget: &super::head::HeadBudget) {
        if self.head.is_none() && self.counters.ready == 0 {
            self.head = Some(super::head::HeadCache::empty(budget));
        }
    }

    /// Bookkeeping for a record written to the ready index in this batch.
    pub(super) fn note_ready_insert(&mut self, key: &ReadyKey) {
        self.note_ready_change();
        self.counters.ready += 1;
        if self.batch_low.is_none_or(|low| key < &low) {
            self.batch_low = Some(*key);
        }
        self.dirty = true;
    }

    /// Where a scan of the ready index starts: the floor, or the queue's
    /// first possible key.
    pub(super) fn scan_start(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.counters.floor {
            Some(floor) => std::borrow::Cow::Borrowed(floor),
            None => std::borrow::Cow::Owned(keys::queue_prefix(self.qid).to_vec()),
        }
    }

    /// Payload bytes held (ready and leased).
    pub(super) fn bytes(&self) -> u64 {
        self.counters.bytes.unwrap_or(0)
    }

    pub(super) fn add_bytes(&mut self, n: u64) {
        self.counters.bytes = Some(self.bytes().saturating_add(n));
        self.dirty = true;
    }

    pub(super) fn take_bytes(&mut self, n: u64) {
        self.counters.bytes = Some(self.bytes().saturating_sub(n));
        self.dirty = true;
    }

    /// Messages held: visible, delayed and in flight.
    pub(super) fn depth(&self) -> u64 {
        self.counters.ready + self.holders.len() as u64
    }

    pub(super) fn policy_info(&self, defaults: QueuePolicy) -> PolicyInfo {
        PolicyInfo {
            version: self.policy_version,
            policy: self.policy,
            effective: self.policy.or(defaults),
        }
    }

    /// A message first added at `enqueued_at` entered the queue's ready
    /// records or dead letters: the oldest bound goes down to it.
    pub(super) fn note_retention_oldest(&mut self, enqueued_at: u64) {
        if let Some(r) = &mut self.retention {
            r.oldest = Some(r.oldest.map_or(enqueued_at, |o| o.min(enqueued_at)));
        }
    }

    /// Whether retention drops a message first added at `enqueued_at`.
    pub(super) fn past_retention(&self, enqueued_at: u64, now: u64) -> bool {
        self.retention.as_ref().is_some_and(|r| r.expired(enqueued_at, now))
    }

    /// Notes that `held.lease` holds `id`.
    pub(super) fn hold(&mut self, id: MessageId, held: Held) {
        self.leased_bytes += u64::from(held.bytes);
        if let Some(old) = self.holders.insert(id, held) {
            self.leased_bytes -= u64::from(old.bytes);
        }
    }

    /// Forgets every holder (a purge).
    pub(super) fn clear_holders(&mut self) {
        self.holders.clear();
        self.leased_bytes = 0;
    }

    /// Drops `id`'s holder entry if `lease` holds it; returns the payload
    /// size of what it took then.
    pub(super) fn release_holder(&mut self, lease: LeaseId, id: &MessageId) -> Option<u32> {
        // One lookup on the usual path (the lease does hold it); a stale
        // lease puts the entry back.
        let held = self.holders.remove(id)?;
        if held.lease == lease {
            self.leased_bytes -= u64::from(held.bytes);
            Some(held.bytes)
        } else {
            self.holders.insert(*id, held);
            None
        }
    }

    pub(super) fn lease_valid(&self, lease: &LeaseId, now: u64) -> bool {
        self.leases.get(lease).is_some_and(|l| l.expires_at > now)
    }
}

/// The buffers a batch builds in, kept by the store between batches.
///
/// Why: started empty, they were grown again by every batch (the lease
/// block buffer three times per poll, the queue lists and the per-queue
/// counts once each): about six allocations per message at B=1
/// (callgrind). A batch takes them, and a batch that commits gives them
/// back cleared, so they keep their capacity (a large one is let go, see
/// [`BatchScratch::keep`]).
#[derive(Default)]
pub(super) struct BatchScratch {
    pub(super) polled: Vec<QueueId>,
    pub(super) touched: Vec<QueueId>,
    pub(super) record: Vec<u8>,
    pub(super) unmarked: Vec<(QueueId, LeaseId)>,
    pub(super) counted: Map<QueueId, QueueCounters>,
}

impl BatchScratch {
    /// The largest record buffer kept between batches: a lease block of a
    /// large poll is let go rather than held by an idle shard.
    const KEEP_RECORD_BYTES: usize = 64 * 1024;
    /// The most queues the lists and the counts keep room for.
    const KEEP_QUEUES: usize = 1024;

    /// Clears what a batch used, and keeps it unless it grew large.
    pub(super) fn keep(mut self) -> Self {
        emptied(&mut self.record, Self::KEEP_RECORD_BYTES);
        emptied(&mut self.polled, Self::KEEP_QUEUES);
        emptied(&mut self.touched, Self::KEEP_QUEUES);
        emptied(&mut self.unmarked, Self::KEEP_QUEUES);
        self.counted.clear();
        if self.counted.capacity() > Self::KEEP_QUEUES {
            self.counted = Map::default();
        }
        self
    }
}

/// Clears `v`, and lets its memory go when it holds room for more than `keep`.
fn emptied<T>(v: &mut Vec<T>, keep: usize) {
    v.clear();
    if v.capacity() > keep {
        *v = Vec::new();
    }
}

/// The write batch being built plus what it woke.
pub(super) struct Batch {
    pub(super) writes: WriteBatch,
    pub(super) needs_sync: bool,
    pub(super) woken: BTreeMap<QueueId, u64>,
    /// Queues polled in this batch (reported in `Executed::empty` when
    /// nothing is visible in them at its end).
    pub(super) polled: Vec<QueueId>,
    /// Queues the batch deleted (reported once it commits).
    pub(super) deleted: Vec<QueueName>,
    /// What the batch did per queue, added to the store's counters once it
    /// commits (a failed batch counts nothing).
    pub(super) counted: Map<QueueId, QueueCounters>,
    /// Queues whose counters may have changed (persisted at commit).
    pub(super) touched: Vec<QueueId>,
    pub(super) record: Vec<u8>,
    /// Block leases with members that ended in this batch (see
    /// `LeaseState::unmarked`).
    pub(super) unmarked: Vec<(QueueId, LeaseId)>,
    /// Ready records held out of `writes` while a poll of the batch may take
    /// them (see [`super::fresh`]).
    pub(super) fresh: super::fresh::Fresh,
}

#[cfg(test)]
mod scratch_tests {
    use super::*;

    #[test]
    fn kept_scratch_is_empty_and_keeps_its_room_unless_it_grew_large() {
        let mut used = BatchScratch::default();
        used.polled.extend([1, 2]);
        used.touched.push(3);
        used.record.extend_from_slice(&[7; 300]);
        used.unmarked.push((4, LeaseId([0; 16])));
        used.counted.entry(5).or_default().added = 9;
        let kept = used.keep();
        assert!(kept.polled.is_empty() && kept.touched.is_empty() && kept.unmarked.is_empty());
        assert!(kept.record.is_empty() && kept.counted.is_empty());
        assert!(kept.record.capacity() >= 300, "a small buffer keeps its room");
        assert!(kept.polled.capacity() >= 2);

        let mut large = BatchScratch::default();
        large.record.resize(BatchScratch::KEEP_RECORD_BYTES + 1, 0);
        large.polled.resize(BatchScratch::KEEP_QUEUES + 1, 0);
        let kept = large.keep();
        assert_eq!(kept.record.capacity(), 0, "a large lease block is let go");
        assert_eq!(kept.polled.capacity(), 0);
    }
}
