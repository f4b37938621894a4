//! [`ShardStore`]: the RocksDB-backed [`QueueStore`] of one shard.
//!
//! The shard owns its queues, so it keeps their hot state in memory and uses
//! RocksDB only for what must survive a crash:
//!
//! * counters (ready records, delayed records) so stats never scan;
//! * the lease table (expiry, members, which lease holds which message), so a
//!   remove is validated without a read and costs two deletes;
//! * the *floor* of each queue's ready index: every live ready key sorts at or
//!   above it. Polls seek straight to the floor, so the tombstones left by
//!   consumed messages are never walked (the RocksDB "queue trap",
//!   facebook/rocksdb#5265), however many messages were consumed before;
//! * timers: lease expiries and delays coming due, shard-wide and ordered, so
//!   settling them costs in proportion to what is due, never to history.
//!
//! All of it is rebuilt from the column families when the shard opens.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use rocksdb::WriteBatch;

use super::engine::{Engine, CF_LEASES, CF_READY, CF_REGISTRY};
use super::keys::{self, Counters, LeaseEntry, QueueId, ReadyKey, RecordHeader};
use super::{
    deadline, Command, Delivery, Executed, Lease, NewMessage, Outcome, QueueStats, QueueStore, ReplyBudget, StoreError,
};
use crate::ids::{IdGenerator, LeaseId, MessageId};
use crate::names::QueueName;

/// Decides whether this shard owns a queue (the server's stable hash).
pub type Ownership = Arc<dyn Fn(&QueueName) -> bool + Send + Sync>;

#[derive(Debug)]
struct LeaseState {
    expires_at: u64,
    /// Messages still held. The lease record is deleted with the last one.
    live: u32,
}

#[derive(Debug)]
struct QueueState {
    name: QueueName,
    qid: QueueId,
    counters: Counters,
    /// Ready records whose visible time is still in the future.
    delayed: u64,
    leases: HashMap<LeaseId, LeaseState>,
    holders: HashMap<MessageId, LeaseId>,
    /// The lowest ready key written by the batch in progress. Polls in the
    /// same batch cannot see those records yet (they are not committed), so
    /// the floor must not move past them.
    batch_low: Option<ReadyKey>,
    dirty: bool,
}

impl QueueState {
    fn new(name: QueueName, qid: QueueId, counters: Counters) -> Self {
        Self {
            name,
            qid,
            counters,
            delayed: 0,
            leases: HashMap::new(),
            holders: HashMap::new(),
            batch_low: None,
            dirty: false,
        }
    }

    fn visible(&self) -> u64 {
        self.counters.ready.saturating_sub(self.delayed)
    }

    /// Bookkeeping for a record written to the ready index in this batch.
    fn note_ready_insert(&mut self, key: &ReadyKey) {
        self.counters.ready += 1;
        if self.counters.floor.as_deref().is_some_and(|f| &key[..] < f) {
            self.counters.floor = Some(key.to_vec());
        }
        if self.batch_low.is_none_or(|low| key < &low) {
            self.batch_low = Some(*key);
        }
        self.dirty = true;
    }

    /// Where a scan of the ready index starts: the floor, or the queue's
    /// first possible key.
    fn scan_start(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.counters.floor {
            Some(floor) => std::borrow::Cow::Borrowed(floor),
            None => std::borrow::Cow::Owned(keys::queue_prefix(self.qid).to_vec()),
        }
    }

    fn lease_valid(&self, lease: &LeaseId, now: u64) -> bool {
        self.leases.get(lease).is_some_and(|l| l.expires_at > now)
    }
}

/// The write batch being built plus what it woke.
struct Batch {
    writes: WriteBatch,
    needs_sync: bool,
    woken: BTreeMap<QueueId, u64>,
    /// Queues whose counters may have changed (persisted at commit).
    touched: Vec<QueueId>,
    record: Vec<u8>,
}

pub struct ShardStore {
    engine: Arc<Engine>,
    owns: Ownership,
    ids: IdGenerator,
    names: HashMap<QueueName, QueueId>,
    queues: HashMap<QueueId, QueueState>,
    lease_deadlines: BTreeSet<(u64, QueueId, LeaseId)>,
    delay_deadlines: BTreeMap<(u64, QueueId), u64>,
    last_now: u64,
    failed: Option<String>,
    failure_log: FailureLog,
}

/// Repeated batch failures log at most once per [`FailureLog::EVERY`], with
/// how many there were, instead of a line per batch.
#[derive(Default)]
struct FailureLog {
    last: Option<std::time::Instant>,
    since: u64,
}

impl FailureLog {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    fn note(&mut self, error: &StoreError) {
        self.since += 1;
        if self.last.is_none_or(|at| at.elapsed() >= Self::EVERY) {
            tracing::error!(%error, failures = self.since, "storage batch failed; reloading shard state");
            self.last = Some(std::time::Instant::now());
            self.since = 0;
        }
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

/// Maps a RocksDB or decoding failure inside a batch: the whole batch fails.
fn is_fatal(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Rocks { .. } | StoreError::Corrupt { .. } | StoreError::Unavailable(_) | StoreError::Failed(_)
    )
}

impl ShardStore {
    /// Opens the shard that owns the queues for which `owns` is true, loading
    /// their state from the database.
    pub fn open(engine: Arc<Engine>, owns: Ownership) -> Result<ShardStore, StoreError> {
        let mut store = ShardStore {
            engine,
            owns,
            ids: IdGenerator::new(),
            names: HashMap::new(),
            queues: HashMap::new(),
            lease_deadlines: BTreeSet::new(),
            delay_deadlines: BTreeMap::new(),
            last_now: 0,
            failed: None,
            failure_log: FailureLog::default(),
        };
        store.load_all()?;
        Ok(store)
    }

    /// A store owning every queue (one shard, tools, tests).
    pub fn open_all(engine: Arc<Engine>) -> Result<ShardStore, StoreError> {
        Self::open(engine, Arc::new(|_| true))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn now(&mut self) -> u64 {
        // Never let time run backwards inside the store: the floor and the
        // timers assume it does not.
        self.last_now = self.last_now.max(self.engine.clock().now_ms());
        self.last_now
    }

    fn load_all(&mut self) -> Result<(), StoreError> {
        self.names.clear();
        self.queues.clear();
        self.lease_deadlines.clear();
        self.delay_deadlines.clear();
        let now = self.now();
        for (name, qid) in self.engine.registry()? {
            if (self.owns)(&name) {
                self.load_queue(name, qid, now)?;
            }
        }
        Ok(())
    }

    fn load_queue(&mut self, name: QueueName, qid: QueueId, now: u64) -> Result<(), StoreError> {
        let engine = self.engine.clone();
        let db = engine.db();
        let counters = match db
            .get_pinned_cf(engine.cf(CF_REGISTRY)?, keys::counters_key(qid))
            .map_err(StoreError::rocks("read queue counters"))?
        {
            Some(v) => keys::parse_counters(&v).ok_or_else(|| StoreError::Corrupt {
                cf: CF_REGISTRY,
                detail: format!("counters of {name}"),
            })?,
            None => Counters::default(),
        };
        let mut q = QueueState::new(name.clone(), qid, counters);

        // Leases: a header (expiry) followed by its members, in key order.
        let mut it = engine.scan(CF_LEASES, &keys::queue_prefix(qid), keys::queue_end(qid).to_vec())?;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            match keys::parse_lease_entry(k) {
                Some(LeaseEntry::Header(lease)) => {
                    let expires_at = v.try_into().map(u64::from_be_bytes).map_err(|_| StoreError::Corrupt {
                        cf: CF_LEASES,
                        detail: format!("lease header of {name} is {} bytes", v.len()),
                    })?;
                    q.leases.insert(lease, LeaseState { expires_at, live: 0 });
                }
                Some(LeaseEntry::Member(lease, id)) => {
                    // A member without a header cannot happen (they are written
                    // and deleted together); if it does, expire it at once
                    // rather than hold the message forever.
                    q.leases
                        .entry(lease)
                        .or_insert(LeaseState { expires_at: 0, live: 0 })
                        .live += 1;
                    q.holders.insert(id, lease);
                }
                None => {
                    return Err(StoreError::Corrupt {
                        cf: CF_LEASES,
                        detail: format!("unparseable key {k:?} in {name}"),
                    })
                }
            }
            it.next();
        }
        it.status().map_err(StoreError::rocks("scan leases"))?;
        drop(it);
        for (lease, state) in &q.leases {
            self.lease_deadlines.insert((state.expires_at, qid, *lease));
        }

        // Delayed records: everything above `now` in the ready index.
        let mut it = engine.scan(
            CF_READY,
            &keys::ready_visible_end(qid, now),
            keys::queue_end(qid).to_vec(),
        )?;
        while let Some(k) = it.key() {
            let (at, _) = keys::parse_ready_key(k).ok_or_else(|| StoreError::Corrupt {
                cf: CF_READY,
                detail: format!("unparseable key {k:?} in {name}"),
            })?;
            *self.delay_deadlines.entry((at, qid)).or_default() += 1;
            q.delayed += 1;
            it.next();
        }
        it.status().map_err(StoreError::rocks("scan delayed messages"))?;

        self.names.insert(name, qid);
        self.queues.insert(qid, q);
        Ok(())
    }

    /// Makes due delays visible and returns expired leases' messages to the
    /// ready index, at the time each lease expired.
    fn settle_due(&mut self, now: u64, batch: &mut Batch) -> Result<(), StoreError> {
        while let Some(entry) = self.delay_deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, qid), count) = entry.remove_entry();
            if let Some(q) = self.queues.get_mut(&qid) {
                q.delayed = q.delayed.saturating_sub(count);
            }
            *batch.woken.entry(qid).or_default() += count;
        }
        while let Some(&(expires_at, qid, lease)) = self.lease_deadlines.first() {
            if expires_at > now {
                break;
            }
            self.lease_deadlines.pop_first();
            self.expire_lease(qid, lease, expires_at, batch)?;
        }
        Ok(())
    }

    fn expire_lease(
        &mut self,
        qid: QueueId,
        lease: LeaseId,
        expired_at: u64,
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        let engine = self.engine.clone();
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(());
        };
        if q.leases.remove(&lease).is_none() {
            return Ok(());
        }
        let (ready_cf, leases_cf) = (engine.cf(CF_READY)?, engine.cf(CF_LEASES)?);
        let mut it = engine.scan(CF_LEASES, &keys::lease_key(qid, &lease), keys::lease_end(qid, &lease))?;
        let mut returned = 0;
        batch.touched.push(qid);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if let Some(LeaseEntry::Member(_, id)) = keys::parse_lease_entry(k) {
                // Members are written once and deleted once: SingleDelete
                // lets flushes drop the pair instead of keeping a tombstone.
                batch.writes.single_delete_cf(leases_cf, k);
                if q.holders.get(&id) == Some(&lease) {
                    q.holders.remove(&id);
                    let key = keys::ready_key(qid, expired_at, &id);
                    batch.writes.put_cf(ready_cf, key, v);
                    q.note_ready_insert(&key);
                    returned += 1;
                }
            } else {
                // The header is rewritten by extends: a plain delete.
                batch.writes.delete_cf(leases_cf, k);
            }
            it.next();
        }
        it.status().map_err(StoreError::rocks("scan an expired lease"))?;
        if returned > 0 {
            *batch.woken.entry(qid).or_default() += returned;
        }
        Ok(())
    }

    fn queue_id(&self, name: &QueueName) -> Result<QueueId, StoreError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| StoreError::UnknownQueue(name.clone()))
    }

    fn apply(&mut self, command: Command, now: u64, batch: &mut Batch) -> Result<Outcome, StoreError> {
        match command {
            Command::Add { queue, messages } => self.apply_add(queue, messages, now, batch).map(Outcome::Added),
            Command::Poll {
                queue,
                max_items,
                lease_ms,
                max_bytes,
            } => self
                .apply_poll(&queue, max_items, lease_ms, max_bytes, now, batch)
                .map(Outcome::Polled),
            Command::Remove { queue, id, lease } => {
                self.apply_remove(&queue, id, lease, now, batch).map(Outcome::Removed)
            }
            Command::Extend { queue, lease, lease_ms } => self
                .apply_extend(&queue, lease, lease_ms, now, batch)
                .map(Outcome::Extended),
            Command::Release {
                queue,
                id,
                lease,
                delay_ms,
            } => self
                .apply_release(&queue, id, lease, delay_ms, now, batch)
                .map(Outcome::Released),
            Command::Stats { queue } => self.apply_stats(&queue, now).map(Outcome::Stats),
            Command::Purge { queue } => {
                let qid = self.queue_id(&queue)?;
                self.apply_purge(qid, batch).map(Outcome::Purged)
            }
            Command::Delete { queue } => {
                let qid = self.queue_id(&queue)?;
                self.apply_purge(qid, batch)?;
                let registry = self.engine.cf(CF_REGISTRY)?;
                batch.writes.delete_cf(registry, keys::name_key(&queue));
                batch.writes.delete_cf(registry, keys::counters_key(qid));
                self.names.remove(&queue);
                self.queues.remove(&qid);
                Ok(Outcome::Deleted)
            }
        }
    }

    fn apply_add(
        &mut self,
        queue: QueueName,
        messages: Vec<NewMessage>,
        now: u64,
        batch: &mut Batch,
    ) -> Result<Vec<MessageId>, StoreError> {
        let limit = self.engine.options().max_payload_bytes;
        if let Some(m) = messages.iter().find(|m| m.payload.len() > limit) {
            return Err(StoreError::PayloadTooLarge {
                size: m.payload.len(),
                limit,
            });
        }
        // Checked before the queue is created: a refused add leaves nothing.
        if let Some(full) = self.engine.disk().refusal() {
            return Err(StoreError::DiskFull(full));
        }
        let engine = self.engine.clone();
        let ready_cf = engine.cf(CF_READY)?;
        let qid = match self.names.get(&queue) {
            Some(&qid) => qid,
            None => {
                if !(self.owns)(&queue) {
                    return Err(StoreError::WrongShard(queue));
                }
                let qid = engine.allocate_qid()?;
                batch
                    .writes
                    .put_cf(engine.cf(CF_REGISTRY)?, keys::name_key(&queue), qid.to_be_bytes());
                self.names.insert(queue.clone(), qid);
                let mut state = QueueState::new(queue, qid, Counters::default());
                state.dirty = true;
                self.queues.insert(qid, state);
                qid
            }
        };
        let q = self
            .queues
            .get_mut(&qid)
            .ok_or_else(|| StoreError::Unavailable(format!("queue id {qid} has no state")))?;
        batch.touched.push(qid);
        let header = RecordHeader {
            enqueued_at: now,
            delivery_count: 0,
        };
        let mut ids = Vec::with_capacity(messages.len());
        let mut visible_now = 0;
        for m in &messages {
            let id = self.ids.message_id(now);
            let at = deadline(now, m.delay_ms);
            let key = keys::ready_key(qid, at, &id);
            keys::encode_record(&mut batch.record, header, &m.payload);
            batch.writes.put_cf(ready_cf, key, &batch.record);
            q.note_ready_insert(&key);
            if at > now {
                q.delayed += 1;
                *self.delay_deadlines.entry((at, qid)).or_default() += 1;
            } else {
                visible_now += 1;
            }
            ids.push(id);
        }
        if visible_now > 0 {
            *batch.woken.entry(qid).or_default() += visible_now;
        }
        Ok(ids)
    }

    fn apply_poll(
        &mut self,
        queue: &QueueName,
        max_items: u32,
        lease_ms: u64,
        max_bytes: ReplyBudget,
        now: u64,
        batch: &mut Batch,
    ) -> Result<Option<Lease>, StoreError> {
        if max_items == 0 {
            return Err(StoreError::ZeroItems);
        }
        let qid = self.queue_id(queue)?;
        let engine = self.engine.clone();
        let (ready_cf, leases_cf) = (engine.cf(CF_READY)?, engine.cf(CF_LEASES)?);
        let Some(q) = self.queues.get_mut(&qid) else {
            return Err(StoreError::UnknownQueue(queue.clone()));
        };
        let want = u64::from(max_items).min(q.visible());
        let budget = engine.options().max_poll_bytes;
        if want == 0 {
            return Ok(None);
        }
        batch.touched.push(qid);
        let mut it = engine.scan(CF_READY, &q.scan_start(), keys::ready_visible_end(qid, now).to_vec())?;

        let lease = self.ids.lease_id(now);
        let expires_at = deadline(now, lease_ms);
        let mut messages = Vec::with_capacity(want as usize);
        let mut last_key: Option<ReadyKey> = None;
        let mut bytes = 0;
        while (messages.len() as u64) < want {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            let cost = v.len().saturating_sub(keys::RECORD_HEADER_LEN) + super::POLL_MESSAGE_OVERHEAD;
            let first = messages.is_empty();
            if (!first && bytes + cost > budget) || !max_bytes.take(cost, first) {
                break;
            }
            bytes += cost;
            let (_, id) = keys::parse_ready_key(k).ok_or_else(|| StoreError::Corrupt {
                cf: CF_READY,
                detail: format!("unparseable key {k:?} in {queue}"),
            })?;
            let (mut header, payload) = keys::parse_record(v).ok_or_else(|| StoreError::Corrupt {
                cf: CF_READY,
                detail: format!("record of {id} in {queue} is {} bytes", v.len()),
            })?;
            header.delivery_count = header.delivery_count.saturating_add(1);
            keys::encode_record(&mut batch.record, header, payload);
            batch.writes.single_delete_cf(ready_cf, k);
            batch
                .writes
                .put_cf(leases_cf, keys::member_key(qid, &lease, &id), &batch.record);
            messages.push(Delivery {
                id,
                payload: payload.to_vec(),
                delivery_count: header.delivery_count,
                enqueued_at_ms: header.enqueued_at,
            });
            // parse_ready_key checked the length; a fixed array, no allocation.
            last_key = k.try_into().ok();
            it.next();
        }
        it.status().map_err(StoreError::rocks("scan the ready index"))?;
        let Some(last) = last_key else {
            return Ok(None);
        };
        // Just above the last consumed key, but never above a record this
        // batch wrote and the iterator could not see.
        let mut floor = Vec::with_capacity(last.len() + 1);
        floor.extend_from_slice(&last);
        floor.push(0);
        if let Some(low) = q.batch_low.filter(|low| low[..] < floor[..]) {
            floor = low.to_vec();
        }
        q.counters.floor = Some(floor);
        q.counters.ready -= messages.len() as u64;
        q.dirty = true;
        for m in &messages {
            q.holders.insert(m.id, lease);
        }
        q.leases.insert(
            lease,
            LeaseState {
                expires_at,
                live: messages.len() as u32,
            },
        );
        self.lease_deadlines.insert((expires_at, qid, lease));
        batch
            .writes
            .put_cf(leases_cf, keys::lease_key(qid, &lease), expires_at.to_be_bytes());
        Ok(Some(Lease {
            id: lease,
            expires_at_ms: expires_at,
            messages,
        }))
    }

    /// Drops `id` from `lease` in memory and stages the deletes; the lease
    /// record goes with its last member.
    fn take_member(
        &mut self,
        qid: QueueId,
        id: MessageId,
        lease: LeaseId,
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        let leases_cf = self.engine.cf(CF_LEASES)?;
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(());
        };
        q.holders.remove(&id);
        batch
            .writes
            .single_delete_cf(leases_cf, keys::member_key(qid, &lease, &id));
        if let Some(state) = q.leases.get_mut(&lease) {
            state.live = state.live.saturating_sub(1);
            if state.live == 0 {
                let expires_at = state.expires_at;
                q.leases.remove(&lease);
                self.lease_deadlines.remove(&(expires_at, qid, lease));
                batch.writes.delete_cf(leases_cf, keys::lease_key(qid, &lease));
            }
        }
        Ok(())
    }

    fn holds(&self, qid: QueueId, id: &MessageId, lease: &LeaseId, now: u64) -> bool {
        self.queues
            .get(&qid)
            .is_some_and(|q| q.holders.get(id) == Some(lease) && q.lease_valid(lease, now))
    }

    fn apply_remove(
        &mut self,
        queue: &QueueName,
        id: MessageId,
        lease: LeaseId,
        now: u64,
        batch: &mut Batch,
    ) -> Result<bool, StoreError> {
        let qid = self.queue_id(queue)?;
        if !self.holds(qid, &id, &lease, now) {
            return Ok(false);
        }
        self.take_member(qid, id, lease, batch)?;
        Ok(true)
    }

    fn apply_extend(
        &mut self,
        queue: &QueueName,
        lease: LeaseId,
        lease_ms: u64,
        now: u64,
        batch: &mut Batch,
    ) -> Result<Option<u64>, StoreError> {
        let qid = self.queue_id(queue)?;
        let leases_cf = self.engine.cf(CF_LEASES)?;
        let Some(state) = self.queues.get_mut(&qid).and_then(|q| q.leases.get_mut(&lease)) else {
            return Ok(None);
        };
        if state.expires_at <= now {
            return Ok(None);
        }
        let new_expiry = deadline(now, lease_ms);
        self.lease_deadlines.remove(&(state.expires_at, qid, lease));
        self.lease_deadlines.insert((new_expiry, qid, lease));
        state.expires_at = new_expiry;
        batch
            .writes
            .put_cf(leases_cf, keys::lease_key(qid, &lease), new_expiry.to_be_bytes());
        Ok(Some(new_expiry))
    }

    fn apply_release(
        &mut self,
        queue: &QueueName,
        id: MessageId,
        lease: LeaseId,
        delay_ms: u64,
        now: u64,
        batch: &mut Batch,
    ) -> Result<bool, StoreError> {
        let qid = self.queue_id(queue)?;
        if !self.holds(qid, &id, &lease, now) {
            return Ok(false);
        }
        let engine = self.engine.clone();
        let record = engine
            .db()
            .get_pinned_cf(engine.cf(CF_LEASES)?, keys::member_key(qid, &lease, &id))
            .map_err(StoreError::rocks("read a leased message"))?
            .ok_or_else(|| StoreError::Corrupt {
                cf: CF_LEASES,
                detail: format!("message {id} of lease {lease} in {queue} has no record"),
            })?;
        self.take_member(qid, id, lease, batch)?;
        let at = deadline(now, delay_ms);
        let key = keys::ready_key(qid, at, &id);
        batch.writes.put_cf(engine.cf(CF_READY)?, key, &*record);
        batch.touched.push(qid);
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(false);
        };
        q.note_ready_insert(&key);
        if at > now {
            q.delayed += 1;
            *self.delay_deadlines.entry((at, qid)).or_default() += 1;
        } else {
            *batch.woken.entry(qid).or_default() += 1;
        }
        Ok(true)
    }

    fn apply_stats(&mut self, queue: &QueueName, now: u64) -> Result<QueueStats, StoreError> {
        let qid = self.queue_id(queue)?;
        let engine = self.engine.clone();
        let Some(q) = self.queues.get(&qid) else {
            return Err(StoreError::UnknownQueue(queue.clone()));
        };
        let mut stats = QueueStats {
            visible: q.visible(),
            delayed: q.delayed,
            in_flight: q.holders.len() as u64,
            oldest_visible_age_ms: None,
            disk_full: engine.disk().is_full(),
        };
        if stats.visible > 0 {
            // One seek to the head of the line (the floor keeps it cheap).
            let it = engine.scan(CF_READY, &q.scan_start(), keys::ready_visible_end(qid, now).to_vec())?;
            if let Some(v) = it.value() {
                if let Some((header, _)) = keys::parse_record(v) {
                    stats.oldest_visible_age_ms = Some(now.saturating_sub(header.enqueued_at));
                }
            }
            it.status().map_err(StoreError::rocks("read the head of a queue"))?;
        }
        Ok(stats)
    }

    fn apply_purge(&mut self, qid: QueueId, batch: &mut Batch) -> Result<u64, StoreError> {
        let engine = self.engine.clone();
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(0);
        };
        let dropped = q.counters.ready + q.holders.len() as u64;
        batch.touched.push(qid);
        let (start, end) = (keys::queue_prefix(qid), keys::queue_end(qid));
        // Range tombstones: O(1) to write, and later scans skip the range whole.
        batch.writes.delete_range_cf(engine.cf(CF_READY)?, start, end);
        batch.writes.delete_range_cf(engine.cf(CF_LEASES)?, start, end);
        q.counters = Counters::default();
        q.delayed = 0;
        q.leases.clear();
        q.holders.clear();
        q.batch_low = None;
        q.dirty = true;
        self.lease_deadlines.retain(|&(_, owner, _)| owner != qid);
        self.delay_deadlines.retain(|&(_, owner), _| owner != qid);
        Ok(dropped)
    }
}

impl QueueStore for ShardStore {
    fn execute(&mut self, commands: Vec<Command>) -> Executed {
        if let Some(reason) = &self.failed {
            let outcomes = commands
                .iter()
                .map(|_| Err(StoreError::Unavailable(reason.clone())))
                .collect();
            return Executed {
                outcomes,
                woken: Vec::new(),
            };
        }
        let now = self.now();
        let mut batch = Batch {
            writes: WriteBatch::default(),
            needs_sync: false,
            woken: BTreeMap::new(),
            touched: Vec::new(),
            record: Vec::new(),
        };
        let count = commands.len();
        let mut fatal = self.settle_due(now, &mut batch).err();
        // Settled leases are committed on their own first, so that polls in
        // this batch can already see the messages that came back.
        if fatal.is_none() && !batch.writes.is_empty() {
            fatal = self
                .persist_counters(&mut batch)
                .and_then(|()| self.engine.commit(std::mem::take(&mut batch.writes), false))
                .err();
        }
        let mut outcomes = Vec::with_capacity(count);
        if fatal.is_none() {
            for command in commands {
                let sync = command.needs_sync();
                let outcome = self.apply(command, now, &mut batch);
                batch.needs_sync |= sync && outcome.is_ok();
                if let Err(e) = &outcome {
                    if is_fatal(e) {
                        fatal = Some(e.duplicate());
                        break;
                    }
                }
                outcomes.push(outcome);
            }
        }
        if fatal.is_none() {
            fatal = self.persist_counters(&mut batch).err();
        }
        if fatal.is_none() && !batch.writes.is_empty() {
            fatal = self.engine.commit(batch.writes, batch.needs_sync).err();
        }
        if let Some(error) = fatal {
            // Memory may now be ahead of the database: rebuild it from what
            // was committed. If even that fails, stop serving.
            if self.engine.disk().is_full() && error.to_string().contains("No space left on device") {
                // The disk state logged the cause once; this repeats per batch.
                tracing::debug!(%error, "storage batch failed for lack of space; reloading shard state");
            } else {
                self.failure_log.note(&error);
            }
            if let Err(reload) = self.load_all() {
                tracing::error!(%reload, "rebuilding shard state failed; the shard is unavailable until restart");
                self.failed = Some(format!("{error}; reload failed: {reload}"));
            }
            return Executed {
                outcomes: (0..count).map(|_| Err(error.duplicate())).collect(),
                woken: Vec::new(),
            };
        }
        let woken = batch
            .woken
            .into_iter()
            .filter_map(|(qid, n)| self.queues.get(&qid).map(|q| (q.name.clone(), n)))
            .collect();
        Executed { outcomes, woken }
    }

    fn next_deadline(&self) -> Option<u64> {
        let lease = self.lease_deadlines.first().map(|d| d.0);
        let delay = self.delay_deadlines.first_key_value().map(|(d, _)| d.0);
        match (lease, delay) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn list_queues(&self) -> Result<Vec<QueueName>, StoreError> {
        Ok(self.engine.registry()?.into_iter().map(|(name, _)| name).collect())
    }
}

impl ShardStore {
    fn persist_counters(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        let registry = self.engine.cf(CF_REGISTRY)?;
        for qid in std::mem::take(&mut batch.touched) {
            let Some(q) = self.queues.get_mut(&qid) else {
                continue;
            };
            q.batch_low = None;
            if std::mem::take(&mut q.dirty) {
                batch
                    .writes
                    .put_cf(registry, keys::counters_key(q.qid), keys::encode_counters(&q.counters));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::storage::{Durability, EngineOptions};

    const T0: u64 = 1_700_000_000_000;

    struct Fixture {
        dir: tempfile::TempDir,
        clock: ManualClock,
        store: ShardStore,
    }

    fn options() -> EngineOptions {
        EngineOptions {
            durability: Durability::Wal,
            max_payload_bytes: 1024,
            ..EngineOptions::default()
        }
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let engine = Engine::open(dir.path(), options(), Arc::new(clock.clone())).unwrap();
        let store = ShardStore::open_all(engine).unwrap();
        Fixture { dir, clock, store }
    }

    impl Fixture {
        fn reopen(self) -> Fixture {
            let Fixture { dir, clock, store } = self;
            drop(store);
            let engine = Engine::open(dir.path(), options(), Arc::new(clock.clone())).unwrap();
            let store = ShardStore::open_all(engine).unwrap();
            Fixture { dir, clock, store }
        }
    }

    fn q(name: &str) -> QueueName {
        QueueName::new("t", name).unwrap()
    }

    fn payloads(lease: &Lease) -> Vec<&[u8]> {
        lease.messages.iter().map(|m| &m.payload[..]).collect()
    }

    fn msgs(items: &[&str]) -> Vec<NewMessage> {
        items.iter().map(|s| NewMessage::new(s.as_bytes().to_vec())).collect()
    }

    #[test]
    fn polls_in_order_and_counts_deliveries() {
        let mut f = fixture();
        let ids = f.store.add(&q("a"), msgs(&["1", "2", "3"])).unwrap();
        assert_eq!(ids.len(), 3);
        let lease = f.store.poll(&q("a"), 2, 1000).unwrap().unwrap();
        assert_eq!(payloads(&lease), vec![b"1", b"2"]);
        assert_eq!(lease.messages[0].id, ids[0]);
        assert!(lease.messages.iter().all(|m| m.delivery_count == 1));
        assert_eq!(lease.expires_at_ms, T0 + 1000);
        let next = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
        assert_eq!(payloads(&next), vec![b"3"]);
        assert_ne!(next.id, lease.id);
        assert_eq!(f.store.poll(&q("a"), 5, 1000).unwrap(), None);
    }

    #[test]
    fn remove_is_false_for_every_wrong_case() {
        let mut f = fixture();
        let ids = f.store.add(&q("a"), msgs(&["1", "2"])).unwrap();
        let lease = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
        let id = lease.messages[0].id;
        assert!(!f.store.remove(&q("a"), id, LeaseId([0; 16])).unwrap(), "wrong lease");
        assert!(!f.store.remove(&q("a"), ids[1], lease.id).unwrap(), "id not in lease");
        assert!(
            !f.store.remove(&q("a"), MessageId([9; 16]), lease.id).unwrap(),
            "unknown id"
        );
        assert!(matches!(
            f.store.remove(&q("nope"), id, lease.id),
            Err(StoreError::UnknownQueue(_))
        ));
        assert!(f.store.remove(&q("a"), id, lease.id).unwrap());
        assert!(!f.store.remove(&q("a"), id, lease.id).unwrap(), "already removed");
    }

    #[test]
    fn an_expired_lease_is_invalid_before_any_sweep() {
        let mut f = fixture();
        f.store.add(&q("a"), msgs(&["1"])).unwrap();
        let lease = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
        f.clock.advance(100);
        assert!(!f.store.remove(&q("a"), lease.messages[0].id, lease.id).unwrap());
        assert_eq!(f.store.extend(&q("a"), lease.id, 100).unwrap(), None);
        let again = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
        assert_eq!(again.messages[0].id, lease.messages[0].id);
        assert_eq!(again.messages[0].delivery_count, 2);
        assert_eq!(again.messages[0].payload, b"1");
    }

    #[test]
    fn extend_keeps_the_lease_alive() {
        let mut f = fixture();
        f.store.add(&q("a"), msgs(&["1"])).unwrap();
        let lease = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
        f.clock.advance(90);
        assert_eq!(f.store.extend(&q("a"), lease.id, 100).unwrap(), Some(T0 + 190));
        f.clock.advance(50);
        assert!(f.store.expire_due().is_empty());
        assert_eq!(f.store.poll(&q("a"), 1, 100).unwrap(), None);
        assert_eq!(f.store.next_deadline(), Some(T0 + 190));
        assert!(f.store.remove(&q("a"), lease.messages[0].id, lease.id).unwrap());
        assert_eq!(f.store.next_deadline(), None, "the last remove drops the lease");
        assert_eq!(f.store.extend(&q("a"), lease.id, 100).unwrap(), None);
    }

    #[test]
    fn release_hands_a_message_back_after_its_delay() {
        let mut f = fixture();
        f.store.add(&q("a"), msgs(&["1", "2"])).unwrap();
        let lease = f.store.poll(&q("a"), 2, 1000).unwrap().unwrap();
        let first = lease.messages[0].id;
        assert!(!f.store.release(&q("a"), first, LeaseId([1; 16]), 0).unwrap());
        assert!(f.store.release(&q("a"), first, lease.id, 50).unwrap());
        assert!(!f.store.release(&q("a"), first, lease.id, 0).unwrap(), "no longer held");
        let s = f.store.stats(&q("a")).unwrap();
        assert_eq!((s.visible, s.delayed, s.in_flight), (0, 1, 1));
        assert_eq!(f.store.poll(&q("a"), 1, 10).unwrap(), None);
        f.clock.advance(50);
        let woken = f.store.expire_due();
        assert_eq!(woken, vec![(q("a"), 1)]);
        let again = f.store.poll(&q("a"), 1, 10).unwrap().unwrap();
        assert_eq!((again.messages[0].id, again.messages[0].delivery_count), (first, 2));
        // The other message of the first lease is still held by it.
        assert!(f.store.remove(&q("a"), lease.messages[1].id, lease.id).unwrap());
    }

    #[test]
    fn expiry_redelivers_at_the_expiry_time_and_reports_wakeups() {
        let mut f = fixture();
        f.store.add(&q("a"), msgs(&["1", "2"])).unwrap();
        let lease = f.store.poll(&q("a"), 2, 100).unwrap().unwrap();
        assert_eq!(f.store.next_deadline(), Some(T0 + 100));
        f.clock.advance(150);
        assert_eq!(f.store.expire_due(), vec![(q("a"), 2)]);
        let s = f.store.stats(&q("a")).unwrap();
        assert_eq!((s.visible, s.in_flight), (2, 0));
        assert_eq!(s.oldest_visible_age_ms, Some(150));
        let again = f.store.poll(&q("a"), 5, 100).unwrap().unwrap();
        assert_eq!(payloads(&again), payloads(&lease));
    }

    #[test]
    fn delayed_messages_wait_their_turn() {
        let mut f = fixture();
        f.store
            .add(
                &q("a"),
                vec![
                    NewMessage::delayed(b"late".to_vec(), 30),
                    NewMessage::new(b"now".to_vec()),
                ],
            )
            .unwrap();
        let s = f.store.stats(&q("a")).unwrap();
        assert_eq!((s.visible, s.delayed), (1, 1));
        assert_eq!(f.store.next_deadline(), Some(T0 + 30));
        let first = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
        assert_eq!(payloads(&first), vec![b"now"]);
        f.clock.advance(30);
        let second = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
        assert_eq!(payloads(&second), vec![b"late"]);
    }

    #[test]
    fn expired_messages_are_visible_to_the_batch_that_settles_them() {
        let mut f = fixture();
        f.store
            .add(
                &q("a"),
                vec![NewMessage::new(b"a".to_vec()), NewMessage::delayed(b"d".to_vec(), 20)],
            )
            .unwrap();
        let lease = f.store.poll(&q("a"), 1, 15).unwrap().unwrap();
        assert_eq!(payloads(&lease), vec![b"a"]);
        f.clock.advance(25);
        // "a" is back since T0+15, "d" visible since T0+20: that order.
        let got = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
        assert_eq!(payloads(&got), vec![b"a", b"d"]);
    }

    #[test]
    fn a_release_and_a_poll_in_one_batch_lose_nothing() {
        // Regression: the released message is written below a message the
        // same batch's poll consumes (same millisecond, older id); the poll
        // cannot see the uncommitted write, and the floor must not pass it.
        let mut f = fixture();
        f.store.add(&q("a"), msgs(&["y"])).unwrap();
        let lease = f.store.poll(&q("a"), 1, 1000).unwrap().unwrap();
        f.store.add(&q("a"), msgs(&["x"])).unwrap();
        let out = f.store.execute(vec![
            Command::Release {
                queue: q("a"),
                id: lease.messages[0].id,
                lease: lease.id,
                delay_ms: 0,
            },
            Command::Poll {
                queue: q("a"),
                max_items: 5,
                lease_ms: 1000,
                max_bytes: ReplyBudget::unlimited(),
            },
        ]);
        match &out.outcomes[1] {
            Ok(Outcome::Polled(Some(l))) => assert_eq!(payloads(l), vec![b"x"]),
            other => panic!("{other:?}"),
        }
        let got = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
        assert_eq!(payloads(&got), vec![b"y"]);
    }

    #[test]
    fn a_poll_stops_at_its_byte_budget_but_returns_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        let options = EngineOptions {
            max_poll_bytes: 2 * (4 + crate::storage::POLL_MESSAGE_OVERHEAD) + 1,
            ..options()
        };
        let engine = Engine::open(dir.path(), options, Arc::new(ManualClock::new(T0))).unwrap();
        let mut store = ShardStore::open_all(engine).unwrap();
        store.add(&q("a"), msgs(&["aaaa", "bbbb", "cccc"])).unwrap();
        assert_eq!(
            payloads(&store.poll(&q("a"), 5, 100).unwrap().unwrap()),
            vec![b"aaaa", b"bbbb"]
        );
        store.add(&q("b"), vec![NewMessage::new(vec![1u8; 100])]).unwrap();
        assert_eq!(store.poll(&q("b"), 5, 100).unwrap().unwrap().messages.len(), 1);
    }

    #[test]
    fn adds_and_polls_in_one_batch() {
        let mut f = fixture();
        f.store.add(&q("a"), msgs(&["old"])).unwrap();
        let out = f.store.execute(vec![
            Command::Add {
                queue: q("a"),
                messages: msgs(&["new"]),
            },
            Command::Poll {
                queue: q("a"),
                max_items: 1,
                lease_ms: 100,
                max_bytes: ReplyBudget::unlimited(),
            },
            Command::Poll {
                queue: q("a"),
                max_items: 1,
                lease_ms: 100,
                max_bytes: ReplyBudget::unlimited(),
            },
        ]);
        let polled: Vec<_> = out
            .outcomes
            .into_iter()
            .skip(1)
            .map(|o| match o.unwrap() {
                Outcome::Polled(l) => l.map(|l| l.messages[0].payload.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(polled, vec![Some(b"old".to_vec()), None]);
        assert_eq!(out.woken, vec![(q("a"), 1)]);
        let got = f.store.poll(&q("a"), 5, 100).unwrap().unwrap();
        assert_eq!(payloads(&got), vec![b"new"]);
    }

    #[test]
    fn invalid_input_is_a_typed_error_and_changes_nothing() {
        let mut f = fixture();
        let big = NewMessage::new(vec![0u8; 1025]);
        assert!(matches!(
            f.store.add(&q("a"), vec![NewMessage::new(b"ok".to_vec()), big]),
            Err(StoreError::PayloadTooLarge {
                size: 1025,
                limit: 1024
            })
        ));
        assert!(matches!(f.store.stats(&q("a")), Err(StoreError::UnknownQueue(_))));
        f.store.add(&q("a"), msgs(&["1"])).unwrap();
        assert!(matches!(f.store.poll(&q("a"), 0, 10), Err(StoreError::ZeroItems)));
        assert!(matches!(f.store.poll(&q("b"), 1, 10), Err(StoreError::UnknownQueue(_))));
        assert!(matches!(f.store.purge(&q("b")), Err(StoreError::UnknownQueue(_))));
        assert!(matches!(f.store.delete(&q("b")), Err(StoreError::UnknownQueue(_))));
        assert_eq!(f.store.stats(&q("a")).unwrap().visible, 1);
    }

    #[test]
    fn durations_are_clamped_not_overflowed() {
        let mut f = fixture();
        f.store
            .add(&q("a"), vec![NewMessage::delayed(b"x".to_vec(), u64::MAX)])
            .unwrap();
        assert_eq!(f.store.next_deadline(), Some(T0 + crate::storage::MAX_DURATION_MS));
        f.store.add(&q("a"), msgs(&["y"])).unwrap();
        let lease = f.store.poll(&q("a"), 1, u64::MAX).unwrap().unwrap();
        assert_eq!(lease.expires_at_ms, T0 + crate::storage::MAX_DURATION_MS);
    }

    #[test]
    fn purge_and_delete() {
        let mut f = fixture();
        f.store.add(&q("a"), msgs(&["1", "2", "3"])).unwrap();
        f.store
            .add(&q("a"), vec![NewMessage::delayed(b"4".to_vec(), 100)])
            .unwrap();
        let lease = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
        f.store.add(&q("b"), msgs(&["keep"])).unwrap();
        assert_eq!(f.store.purge(&q("a")).unwrap(), 4);
        assert_eq!(f.store.stats(&q("a")).unwrap(), QueueStats::default());
        assert!(!f.store.remove(&q("a"), lease.messages[0].id, lease.id).unwrap());
        assert_eq!(f.store.next_deadline(), None);
        f.store.add(&q("a"), msgs(&["5"])).unwrap();
        assert_eq!(payloads(&f.store.poll(&q("a"), 9, 100).unwrap().unwrap()), vec![b"5"]);

        f.store.delete(&q("a")).unwrap();
        assert_eq!(f.store.list_queues().unwrap(), vec![q("b")]);
        assert!(matches!(f.store.stats(&q("a")), Err(StoreError::UnknownQueue(_))));
        let mut f = f.reopen();
        assert_eq!(f.store.list_queues().unwrap(), vec![q("b")]);
        f.store.add(&q("a"), msgs(&["fresh"])).unwrap();
        assert_eq!(f.store.stats(&q("a")).unwrap().visible, 1);
        assert_eq!(f.store.stats(&q("b")).unwrap().visible, 1);
    }

    #[test]
    fn reopen_restores_messages_leases_and_timers() {
        let mut f = fixture();
        f.store.add(&q("a"), msgs(&["1", "2", "3", "4"])).unwrap();
        f.store
            .add(&q("a"), vec![NewMessage::delayed(b"d".to_vec(), 500)])
            .unwrap();
        let short = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
        let long = f.store.poll(&q("a"), 2, 10_000).unwrap().unwrap();
        let before = f.store.stats(&q("a")).unwrap();
        let mut f = f.reopen();
        assert_eq!(f.store.stats(&q("a")).unwrap(), before);
        assert_eq!(f.store.next_deadline(), Some(T0 + 100));
        assert!(f.store.remove(&q("a"), long.messages[0].id, long.id).unwrap());
        // While "down", the short lease expired: it is redelivered.
        let f2 = f.reopen();
        f2.clock.advance(200);
        let mut f = f2.reopen();
        let got = f.store.poll(&q("a"), 5, 10_000).unwrap().unwrap();
        // "4" was visible since T0, "1" came back when its lease expired.
        assert_eq!(payloads(&got), vec![b"4", b"1"]);
        assert_eq!(got.messages[1].id, short.messages[0].id);
        assert_eq!(got.messages[1].delivery_count, 2);
        f.clock.advance(300);
        let got = f.store.poll(&q("a"), 5, 100).unwrap().unwrap();
        assert_eq!(payloads(&got), vec![b"d"]);
    }

    #[test]
    fn shards_only_load_and_create_their_own_queues() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let engine = Engine::open(dir.path(), options(), Arc::new(clock)).unwrap();
        let only = |name: &'static str| -> Ownership { Arc::new(move |q: &QueueName| q.queue() == name) };
        let mut a = ShardStore::open(engine.clone(), only("a")).unwrap();
        let mut b = ShardStore::open(engine.clone(), only("b")).unwrap();
        a.add(&q("a"), msgs(&["1"])).unwrap();
        b.add(&q("b"), msgs(&["2"])).unwrap();
        assert!(matches!(a.add(&q("b"), msgs(&["x"])), Err(StoreError::WrongShard(_))));
        assert_eq!(a.list_queues().unwrap(), vec![q("a"), q("b")]);
        drop((a, b));
        let mut a = ShardStore::open(engine.clone(), only("a")).unwrap();
        assert!(matches!(a.stats(&q("b")), Err(StoreError::UnknownQueue(_))));
        assert_eq!(a.stats(&q("a")).unwrap().visible, 1);
    }

    #[test]
    fn a_long_consumed_queue_still_polls_from_its_floor() {
        let mut f = fixture();
        for _ in 0..50 {
            let batch: Vec<_> = (0..100).map(|i| NewMessage::new(vec![i as u8])).collect();
            f.store.add(&q("a"), batch).unwrap();
            let lease = f.store.poll(&q("a"), 100, 1000).unwrap().unwrap();
            for m in &lease.messages {
                assert!(f.store.remove(&q("a"), m.id, lease.id).unwrap());
            }
        }
        f.store.add(&q("a"), msgs(&["last"])).unwrap();
        let floor = f.store.queues.values().next().unwrap().counters.floor.clone().unwrap();
        let mut f = f.reopen();
        let q_state = f.store.queues.values().next().unwrap();
        assert_eq!(
            q_state.counters.floor.as_ref(),
            Some(&floor),
            "the floor survives a restart"
        );
        assert_eq!(payloads(&f.store.poll(&q("a"), 5, 10).unwrap().unwrap()), vec![b"last"]);
    }
}
