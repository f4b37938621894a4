//! Lease bookkeeping: expiry, membership, remove, extend and release.

#[allow(unused_imports)]
use super::*;

impl ShardStore {
    /// Makes due delays visible and returns expired leases' messages to the
    /// ready index, at the time each lease expired.
    pub(super) fn settle_due(&mut self, now: u64, batch: &mut Batch) -> Result<(), StoreError> {
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
        // After the delays (a drop counts a delayed message as delayed only
        // while it is), before the leases (which drop their own messages
        // past retention, and index those that come back after the seek
        // that finds each queue's new oldest).
        self.settle_retention(now, batch)?;
        while let Some(&(expires_at, qid, lease)) = self.lease_deadlines.first() {
            if expires_at > now {
                break;
            }
            self.lease_deadlines.pop_first();
            self.expire_lease(qid, lease, expires_at, now, batch)?;
        }
        Ok(())
    }

    pub(super) fn expire_lease(
        &mut self,
        qid: QueueId,
        lease: LeaseId,
        expired_at: u64,
        now: u64,
        batch: &mut Batch,
    ) -> Result<(), StoreError> {
        let (ready, leases) = (ReadyIndex::of(&self.engine)?, LeaseTable::of(&self.engine)?);
        let defaults = self.engine.options().defaults();
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(());
        };
        let policy = q.policy.or(defaults);
        if q.leases.remove(&lease).is_none() {
            return Ok(());
        }
        let dead = DeadSet::of(&self.engine)?;
        let (mut returned, mut visible, mut dropped, mut buried) = (0, 0, 0, 0);
        batch.touched.push(qid);
        let corrupt = |detail: String| StoreError::Storage(StorageError::Corrupt { cf: CF_LEASES, detail });
        // Each member the lease still holds is dead or back as of the
        // expiry, in the same batch as the lease's end.
        let mut land = |q: &mut QueueState, batch: &mut Batch, id: MessageId, record: &[u8]| {
            let Some(bytes) = q.release_holder(lease, &id) else {
                return;
            };
            let ended = dead::Ended {
                id,
                record,
                at: expired_at,
                delay_ms: 0,
                rejected: false,
                bytes,
            };
            let writes = (&mut batch.writes, &mut batch.record);
            match dead::land(
                q,
                &policy,
                &mut self.delay_deadlines,
                (&ready, &dead),
                ended,
                now,
                writes,
            ) {
                dead::Landed::Dropped => dropped += 1,
                dead::Landed::Dead(_) => buried += 1,
                dead::Landed::Back { visible: now_visible } => {
                    returned += 1;
                    visible += u64::from(now_visible);
                }
            }
        };
        let mut it = self
            .engine
            .scan(CF_LEASES, &keys::lease_key(qid, &lease), keys::lease_end(qid, &lease))?;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            match (keys::parse_lease_entry(k), <MemberKey>::try_from(k)) {
                (Some(LeaseEntry::Member(_, id)), Ok(member)) => {
                    leases.delete_member(&mut batch.writes, &member);
                    // Empty: a block member that ended before the lease.
                    if !v.is_empty() {
                        land(q, batch, id, v);
                    }
                }
                _ => {
                    leases.delete_header(&mut batch.writes, k);
                    let header = keys::parse_lease_header(v).ok_or_else(|| {
                        corrupt(format!("header of lease {lease} in {} is {} bytes", q.name, v.len()))
                    })?;
                    for member in header.members.into_iter().flatten() {
                        let (id, record) =
                            member.map_err(|()| corrupt(format!("torn block of lease {lease} in {}", q.name)))?;
                        land(q, batch, id, record);
                    }
                }
            }
            it.next();
        }
        it.status().map_err(StoreError::rocks("scan an expired lease"))?;
        if visible > 0 {
            *batch.woken.entry(qid).or_default() += visible;
        }
        let counted = batch.counted.entry(qid).or_default();
        counted.leases_expired += returned;
        counted.dead_max_deliveries += buried;
        counted.dropped_retention += dropped;
        Ok(())
    }

    /// Drops `id` from `lease` in memory and stages what ends it on disk:
    /// the lease's delete with its last member; before that, an end marker
    /// for a block member (written at the end of the batch, see
    /// [`Self::mark_ended_members`]) or the delete of a member record from
    /// before blocks. Returns the payload size of the message taken.
    pub(super) fn take_member(
        &mut self,
        qid: QueueId,
        id: MessageId,
        lease: LeaseId,
        batch: &mut Batch,
    ) -> Result<u32, StoreError> {
        let leases = LeaseTable::of(&self.engine)?;
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(0);
        };
        let bytes = q.release_holder(lease, &id).unwrap_or(0);
        let Some(state) = q.leases.get_mut(&lease) else {
            return Ok(bytes);
        };
        if !state.block {
            leases.delete_member(&mut batch.writes, &keys::member_key(qid, &lease, &id));
        }
        state.live = state.live.saturating_sub(1);
        if state.live == 0 {
            let expires_at = state.expires_at;
            if let Some(ended) = q.leases.remove(&lease) {
                for marked in &ended.marked {
                    leases.delete_member(&mut batch.writes, &keys::member_key(qid, &lease, marked));
                }
            }
            self.lease_deadlines.remove(&(expires_at, qid, lease));
            leases.delete_header(&mut batch.writes, &keys::lease_key(qid, &lease));
        } else if state.block {
            if state.unmarked.is_empty() {
                batch.unmarked.push((qid, lease));
            }
            state.unmarked.push(id);
        }
        Ok(bytes)
    }

    /// Marks the block members that ended in this batch while their lease
    /// goes on. Done once the batch's commands have run, so a lease whose
    /// every member ends in one batch (a remove of all its ids) writes only
    /// its delete; a lease a purge or delete took since is skipped.
    pub(super) fn mark_ended_members(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        if batch.unmarked.is_empty() {
            return Ok(());
        }
        let leases = LeaseTable::of(&self.engine)?;
        for (qid, lease) in batch.unmarked.drain(..) {
            let Some(state) = self.queues.get_mut(&qid).and_then(|q| q.leases.get_mut(&lease)) else {
                continue;
            };
            for id in std::mem::take(&mut state.unmarked) {
                leases.mark_ended(&mut batch.writes, qid, &lease, &id);
                state.marked.push(id);
            }
        }
        Ok(())
    }

    pub(super) fn holds(&self, qid: QueueId, id: &MessageId, lease: &LeaseId, now: u64) -> bool {
        self.queues
            .get(&qid)
            .is_some_and(|q| q.holders.get(id).is_some_and(|h| h.lease == *lease) && q.lease_valid(lease, now))
    }

    pub(super) fn apply_remove(
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
        let bytes = self.take_member(qid, id, lease, batch)?;
        if let Some(q) = self.queues.get_mut(&qid) {
            q.take_bytes(u64::from(bytes));
        }
        // Its counters (the bytes held) are written with the batch; a remove
        // of many ids touches the queue once.
        if batch.touched.last() != Some(&qid) {
            batch.touched.push(qid);
        }
        batch.counted.entry(qid).or_default().removed += 1;
        Ok(true)
    }

    pub(super) fn apply_extend(
        &mut self,
        queue: &QueueName,
        lease: LeaseId,
        lease_ms: u64,
        now: u64,
        batch: &mut Batch,
    ) -> Result<Option<u64>, StoreError> {
        let qid = self.queue_id(queue)?;
        let leases = LeaseTable::of(&self.engine)?;
        let Some(state) = self.queues.get_mut(&qid).and_then(|q| q.leases.get_mut(&lease)) else {
            return Ok(None);
        };
        if state.expires_at <= now {
            return Ok(None);
        }
        let new_expiry = deadline(now, lease_ms);
        let key = keys::lease_key(qid, &lease);
        if state.block {
            // The block is rewritten whole with the new expiry. The committed
            // one is current: a lease is polled in an earlier batch than any
            // extend of it (its id is unknown until the poll is answered),
            // and nothing else rewrites a block.
            let committed = self
                .engine
                .db()
                .get_pinned_cf(self.engine.cf(CF_LEASES)?, key)
                .map_err(StoreError::rocks("read a lease block"))?
                .filter(|v| v.len() > 8)
                .ok_or_else(|| {
                    StoreError::Storage(StorageError::Corrupt {
                        cf: CF_LEASES,
                        detail: format!("lease {lease} in {queue} has no block"),
                    })
                })?;
            batch.record.clear();
            batch.record.extend_from_slice(&new_expiry.to_be_bytes());
            batch.record.extend_from_slice(&committed[8..]);
            leases.put_header(&mut batch.writes, qid, &lease, &batch.record);
        } else {
            leases.put_header(&mut batch.writes, qid, &lease, &new_expiry.to_be_bytes());
        }
        self.lease_deadlines.remove(&(state.expires_at, qid, lease));
        self.lease_deadlines.insert((new_expiry, qid, lease));
        state.expires_at = new_expiry;
        Ok(Some(new_expiry))
    }
}
