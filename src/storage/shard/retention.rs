//! Retention: a queue whose policy has `retention_ms` drops every message
//! that outlived it since its first add, visible, delayed or dead. A
//! message in flight is left to its worker and dropped when its lease ends
//! (`leases`, `dead`); a poll never hands out one past retention (`ready`).
//!
//! What comes due is found in order without scanning the queue. Most
//! messages are ready records whose visible time is their add time, so the
//! ready index already orders them by age: everything in it visible by the
//! cutoff (now - retention) is past retention. The others, ready records
//! visible later than their add (delayed adds, messages back from a lease
//! or a redrive) and dead letters, are kept in a retention index (`retention`
//! column family) by the time of their first add; [`ReadyIndex`] and
//! [`DeadSet`] keep it as they write. So a plain add, poll and remove cost
//! a queue with a retention nothing more.
//!
//! Each batch first drops what is due, then indexes the records of queues
//! that got a retention while holding messages (a *fill*, which drops
//! those already past it), at most [`RETENTION_BATCH`] records per batch so
//! that a large expiry cannot stall the shard: the sweeper runs again at
//! once while work is left.
//!
//! The drop reads the ready records and the index as committed; in that
//! order nothing the batch itself writes is missed: the fill and the lease
//! expiries that follow drop what they meet past retention themselves, and
//! note the rest after the drop has found each queue's new oldest.

#[allow(unused_imports)]
use super::*;

use state::{Fill, Retention};

/// Most records one batch indexes or drops for retention, over all queues.
pub(super) const RETENTION_BATCH: usize = 10_000;

impl ShardStore {
    /// Drops what is due, then fills, within [`RETENTION_BATCH`].
    pub(super) fn settle_retention(&mut self, now: u64, batch: &mut Batch) -> Result<(), StoreError> {
        let mut budget = RETENTION_BATCH;
        while budget > 0 {
            let Some(&(due, qid)) = self.retention_deadlines.first() else {
                break;
            };
            if due > now {
                break;
            }
            if !self.queues.contains_key(&qid) {
                self.retention_deadlines.remove(&(due, qid));
                continue;
            }
            let taken = self.drop_expired(qid, now, budget, batch)?;
            budget -= taken;
            self.list_retention_deadline(qid);
            if taken == 0 && self.retention_deadlines.first() == Some(&(due, qid)) {
                // Cannot happen (a pass finds the new oldest, which is not
                // due); if it did, the sweeper would spin on it.
                break;
            }
        }
        let filling: Vec<QueueId> = self.retention_fills.iter().copied().collect();
        for qid in filling {
            if budget == 0 {
                break;
            }
            budget -= self.fill_retention(qid, budget, now, batch)?;
        }
        Ok(())
    }

    /// Starts, changes or ends a queue's retention index to match its
    /// effective policy (after a policy change, a creation, or at open).
    /// `stored` is what the registry says of the index.
    pub(super) fn track_retention(
        &mut self,
        qid: QueueId,
        stored: Option<u8>,
        batch: Option<&mut Batch>,
    ) -> Result<(), StoreError> {
        let defaults = self.engine.options().defaults();
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(());
        };
        let wanted = q.policy.or(defaults).retention();
        // The index kept from now on, and what the registry must say of it.
        let (next, state) = match (wanted, q.retention.take()) {
            (None, _) => (None, None),
            // Only the duration changed: the index stays as it is.
            (Some(ms), Some(kept)) => (Some(Retention { ms, ..kept }), stored),
            (Some(ms), None) => {
                let empty = q.counters.ready == 0 && q.counters.dead == 0;
                let (filling, state) = match (stored, empty) {
                    (Some(keys::RETENTION_COMPLETE), _) | (_, true) => (None, keys::RETENTION_COMPLETE),
                    _ => (Some(Fill::Ready(q.scan_start().into_owned())), keys::RETENTION_FILLING),
                };
                let oldest = None;
                (Some(Retention { ms, oldest, filling }), Some(state))
            }
        };
        let filling = next.as_ref().is_some_and(|r| r.filling.is_some());
        q.retention = next;
        if filling {
            self.retention_fills.insert(qid);
        } else {
            self.retention_fills.remove(&qid);
        }
        if let Some(batch) = batch {
            if state != stored {
                Registry::of(&self.engine)?.put_retention_state(&mut batch.writes, qid, state);
                if state.is_none() {
                    // Not kept from now on: an index left behind would be
                    // stale if retention came back.
                    RetentionIndex::of(&self.engine)?.purge(&mut batch.writes, qid);
                }
            }
            batch.touched.push(qid);
        }
        Ok(())
    }

    /// At open: whether the queue keeps a retention index (and whether it is
    /// complete), and its oldest message (one seek in the ready records from
    /// the floor, one in the index), so that its deadline is listed.
    pub(super) fn load_retention(&mut self, qid: QueueId) -> Result<(), StoreError> {
        let stored = self
            .engine
            .db()
            .get_pinned_cf(self.engine.cf(CF_REGISTRY)?, keys::retention_state_key(qid))
            .map_err(StoreError::rocks("read a queue's retention state"))?
            .and_then(|v| v.first().copied());
        self.track_retention(qid, stored, None)?;
        let kept = self.queues.get(&qid).is_some_and(|q| q.retention.is_some());
        if stored.is_some() && !kept {
            // The server's default retention went away since this queue's
            // index was written: it is dropped with the queue's next batch.
            self.stale_retention.push(qid);
        }
        if kept {
            let floor = self
                .queues
                .get(&qid)
                .map(|q| q.scan_start().into_owned())
                .unwrap_or_default();
            let ready = self.first_key_time(CF_READY, qid, floor)?;
            let indexed = self.first_key_time(CF_RETENTION, qid, keys::queue_prefix(qid).to_vec())?;
            let oldest = [ready, indexed].into_iter().flatten().min();
            if let Some(r) = self.queues.get_mut(&qid).and_then(|q| q.retention.as_mut()) {
                r.oldest = oldest;
            }
            self.list_retention_deadline(qid);
        }
        Ok(())
    }

    /// Drops the retention indexes of queues that no longer keep one (found
    /// at open), in the first batch.
    pub(super) fn clear_stale_retention(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        if self.stale_retention.is_empty() {
            return Ok(());
        }
        let (registry, index) = (Registry::of(&self.engine)?, RetentionIndex::of(&self.engine)?);
        for qid in self.stale_retention.drain(..) {
            registry.put_retention_state(&mut batch.writes, qid, None);
            index.purge(&mut batch.writes, qid);
        }
        Ok(())
    }

    /// Lists (or moves, or unlists) a queue's retention deadline in the
    /// shard's timers, as its oldest entry says.
    pub(super) fn list_retention_deadline(&mut self, qid: QueueId) {
        let Some(q) = self.queues.get_mut(&qid) else {
            return;
        };
        let due = q.retention.as_ref().and_then(Retention::due);
        if due == q.retention_listed {
            return;
        }
        if let Some(old) = q.retention_listed.take() {
            self.retention_deadlines.remove(&(old, qid));
        }
        if let Some(due) = due {
            self.retention_deadlines.insert((due, qid));
        }
        q.retention_listed = due;
    }

    /// The time in the first key at or after `from` of a queue's ready
    /// records (visible at) or retention index (first added at).
    fn first_key_time(&self, cf: &'static str, qid: QueueId, from: Vec<u8>) -> Result<Option<u64>, StoreError> {
        let it = self.engine.scan(cf, &from, keys::queue_end(qid).to_vec())?;
        let first = it.key().and_then(keys::parse_ready_key).map(|(at, _)| at);
        it.status()
            .map_err(StoreError::rocks("seek a queue's oldest message"))?;
        Ok(first)
    }

    /// Indexes up to `budget` records of a queue written before it kept an
    /// index (its ready records, then its dead letters), dropping those
    /// already past retention. Returns how many it took.
    fn fill_retention(
        &mut self,
        qid: QueueId,
        budget: usize,
        now: u64,
        batch: &mut Batch,
    ) -> Result<usize, StoreError> {
        let engine = self.engine.clone();
        let Writers { ready, dead, index } = Writers::of(&engine)?;
        let Some(q) = self.queues.get_mut(&qid) else {
            self.retention_fills.remove(&qid);
            return Ok(0);
        };
        let Some(mut fill) = q.retention.as_ref().and_then(|r| r.filling.clone()) else {
            self.retention_fills.remove(&qid);
            return Ok(0);
        };
        batch.touched.push(qid);
        let (mut done, mut dropped) = (0, 0);
        let corrupt = |cf: &'static str, k: &[u8]| {
            StoreError::Storage(StorageError::Corrupt {
                cf,
                detail: format!("unparseable key {k:?} in queue id {qid}"),
            })
        };
        loop {
            let (cf, from) = match &fill {
                Fill::Ready(from) => (CF_READY, from.clone()),
                Fill::Dead(from) => (CF_DEAD, from.clone()),
            };
            let mut it = engine.scan(cf, &from, keys::queue_end(qid).to_vec())?;
            let mut stopped_at = None;
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if done == budget {
                    stopped_at = Some(k.to_vec());
                    break;
                }
                let (at, id) = keys::parse_ready_key(k).ok_or_else(|| corrupt(cf, k))?;
                let (place, record) = match &fill {
                    Fill::Ready(_) => (keys::Place::Ready(at), v),
                    Fill::Dead(_) => (keys::Place::Dead(at), v.get(1..).unwrap_or_default()),
                };
                let enqueued_at = keys::record_enqueued_at(record);
                if q.past_retention(enqueued_at, now) {
                    let found = Found {
                        id,
                        place,
                        enqueued_at,
                        payload_len: keys::payload_len(record) as u64,
                    };
                    drop_found(q, &mut self.delay_deadlines, (&ready, &dead), found, now, batch);
                    dropped += 1;
                } else if place == keys::Place::Ready(enqueued_at) {
                    // Ordered by the ready index itself.
                    q.note_retention_oldest(enqueued_at);
                } else {
                    index.note(&mut batch.writes, q, &id, enqueued_at, place);
                }
                done += 1;
                it.next();
            }
            it.status().map_err(StoreError::rocks("fill a retention index"))?;
            q.counters.dropped += dropped;
            batch.counted.entry(qid).or_default().dropped_retention += dropped;
            dropped = 0;
            fill = match (stopped_at, fill) {
                (Some(next), Fill::Ready(_)) => Fill::Ready(next),
                (Some(next), Fill::Dead(_)) => Fill::Dead(next),
                (None, Fill::Ready(_)) => Fill::Dead(keys::queue_prefix(qid).to_vec()),
                (None, Fill::Dead(_)) => {
                    if let Some(r) = &mut q.retention {
                        r.filling = None;
                    }
                    self.retention_fills.remove(&qid);
                    Registry::of(&engine)?.put_retention_state(&mut batch.writes, qid, Some(keys::RETENTION_COMPLETE));
                    return Ok(done);
                }
            };
            if done == budget {
                if let Some(r) = &mut q.retention {
                    r.filling = Some(fill);
                }
                return Ok(done);
            }
        }
    }

    /// Drops up to `budget` of a queue's messages past retention, oldest
    /// first, and finds its new oldest. Returns how many records it took
    /// (dropped, or stale index entries cleared).
    ///
    /// Two scans: the ready records visible by the cutoff (every one of
    /// them was first added no later than it became visible, so all are
    /// past retention: the ready index itself orders plain messages), then
    /// the retention index for the rest (dead letters, and ready records
    /// visible after the cutoff though added before it).
    fn drop_expired(&mut self, qid: QueueId, now: u64, budget: usize, batch: &mut Batch) -> Result<usize, StoreError> {
        let engine = self.engine.clone();
        let Writers { ready, dead, index } = Writers::of(&engine)?;
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(0);
        };
        let Some(Retention { ms, oldest, .. }) = q.retention.clone() else {
            return Ok(0);
        };
        let Some(cutoff) = now.checked_sub(ms) else {
            return Ok(0);
        };
        batch.touched.push(qid);
        // Keys of either family at or after `end` were added (or became
        // visible) after the cutoff.
        let end = keys::ready_visible_end(qid, cutoff).to_vec();
        let corrupt = |cf: &'static str, detail: String| StoreError::Storage(StorageError::Corrupt { cf, detail });
        let (mut taken, mut dropped) = (0, 0u64);

        let floor = q.scan_start().into_owned();
        let mut it = engine.scan(CF_READY, &floor, end.clone())?;
        let (mut ready_left, mut last_dropped) = (None, None);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let (at, id) = keys::parse_ready_key(k)
                .ok_or_else(|| corrupt(CF_READY, format!("unparseable key {k:?} in {}", q.name)))?;
            if taken == budget {
                ready_left = Some(at);
                break;
            }
            let found = Found {
                id,
                place: keys::Place::Ready(at),
                enqueued_at: keys::record_enqueued_at(v),
                payload_len: keys::payload_len(v) as u64,
            };
            drop_found(q, &mut self.delay_deadlines, (&ready, &dead), found, now, batch);
            last_dropped = Some(k.to_vec());
            dropped += 1;
            taken += 1;
            it.next();
        }
        it.status().map_err(StoreError::rocks("scan a queue past retention"))?;
        drop(it);
        if let Some(mut last) = last_dropped {
            // Like a poll: the next scan starts past what was dropped. (Nothing
            // of this batch is written below it yet: the drop runs first.)
            last.push(0);
            q.counters.floor = Some(last);
        }

        let mut index_left = None;
        if taken < budget {
            let start = keys::retention_key(qid, oldest.unwrap_or(0), &MessageId([0; 16]));
            let mut it = engine.scan(CF_RETENTION, &start, end.clone())?;
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                let (enqueued_at, id) = keys::parse_ready_key(k)
                    .ok_or_else(|| corrupt(CF_RETENTION, format!("unparseable key {k:?} in {}", q.name)))?;
                if taken == budget {
                    index_left = Some(enqueued_at);
                    break;
                }
                let place = keys::parse_place(v)
                    .ok_or_else(|| corrupt(CF_RETENTION, format!("place of {id} in {}", q.name)))?;
                let cf = match place {
                    // Dropped by the first scan.
                    keys::Place::Ready(at) if at <= cutoff => {
                        it.next();
                        continue;
                    }
                    keys::Place::Ready(_) => CF_READY,
                    keys::Place::Dead(_) => CF_DEAD,
                };
                let record = engine
                    .db()
                    .get_pinned_cf(engine.cf(cf)?, place.record_key(qid, &id))
                    .map_err(StoreError::rocks("read a message past retention"))?;
                match record {
                    Some(record) => {
                        let found = Found {
                            id,
                            place,
                            enqueued_at,
                            payload_len: keys::payload_len(&record) as u64,
                        };
                        drop(record);
                        drop_found(q, &mut self.delay_deadlines, (&ready, &dead), found, now, batch);
                        dropped += 1;
                    }
                    // An entry whose record is gone cannot happen (they are
                    // written together); if it does, it is cleared, not
                    // counted.
                    None => index.forget(&mut batch.writes, q, &id, enqueued_at),
                }
                taken += 1;
                it.next();
            }
            it.status().map_err(StoreError::rocks("scan a retention index"))?;
        } else {
            index_left = oldest;
        }
        q.counters.dropped += dropped;
        q.dirty = true;
        // What is left is the first record after the cutoff in either
        // family (one seek each), unless the budget stopped a scan short.
        let floor = q.scan_start().into_owned();
        let ready_left = match ready_left {
            Some(at) => Some(at),
            None => self.first_key_time(CF_READY, qid, floor.max(end.clone()))?,
        };
        let index_left = match index_left {
            Some(at) => Some(at),
            None => self.first_key_time(CF_RETENTION, qid, end)?,
        };
        let oldest = [ready_left, index_left].into_iter().flatten().min();
        if let Some(r) = self.queues.get_mut(&qid).and_then(|q| q.retention.as_mut()) {
            r.oldest = oldest;
        }
        batch.counted.entry(qid).or_default().dropped_retention += dropped;
        Ok(taken)
    }
}

/// The families a drop or a fill writes.
struct Writers<'e> {
    ready: ReadyIndex<'e>,
    dead: DeadSet<'e>,
    index: RetentionIndex<'e>,
}

impl<'e> Writers<'e> {
    fn of(engine: &'e Engine) -> Result<Self, StoreError> {
        Ok(Writers {
            ready: ReadyIndex::of(engine)?,
            dead: DeadSet::of(engine)?,
            index: RetentionIndex::of(engine)?,
        })
    }
}

/// A visible, delayed or dead message that retention drops.
struct Found {
    id: MessageId,
    place: keys::Place,
    enqueued_at: u64,
    payload_len: u64,
}

/// Deletes a message past retention (its record and index entry) and takes
/// it off the queue's counts; the caller counts it as dropped.
fn drop_found(
    q: &mut QueueState,
    delay_deadlines: &mut BTreeMap<(u64, QueueId), u64>,
    (ready, dead): (&ReadyIndex<'_>, &DeadSet<'_>),
    found: Found,
    now: u64,
    batch: &mut Batch,
) {
    let key = found.place.record_key(q.qid, &found.id);
    // Its counts are persisted with the batch.
    q.dirty = true;
    match found.place {
        keys::Place::Ready(at) => {
            let written = !batch.fresh.take(&key);
            ready.take(&mut batch.writes, written, q, &key, found.enqueued_at);
            q.counters.ready = q.counters.ready.saturating_sub(1);
            q.take_bytes(found.payload_len);
            q.note_ready_change();
            if at > now {
                q.delayed = q.delayed.saturating_sub(1);
                if let Some(count) = delay_deadlines.get_mut(&(at, q.qid)) {
                    *count -= 1;
                    if *count == 0 {
                        delay_deadlines.remove(&(at, q.qid));
                    }
                }
            }
        }
        keys::Place::Dead(_) => {
            dead.take(&mut batch.writes, q, &key, &found.id, found.enqueued_at);
            q.counters.dead = q.counters.dead.saturating_sub(1);
        }
    }
}
