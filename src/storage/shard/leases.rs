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
        let mut buried = 0;
        let mut it = self
            .engine
            .scan(CF_LEASES, &keys::lease_key(qid, &lease), keys::lease_end(qid, &lease))?;
        let (mut returned, mut visible, mut dropped) = (0, 0, 0);
        batch.touched.push(qid);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            match (keys::parse_lease_entry(k), <MemberKey>::try_from(k)) {
                (Some(LeaseEntry::Member(_, id)), Ok(member)) => {
                    if let Some(bytes) = leases.take_member(&mut batch.writes, q, &member, lease, id) {
                        // Dead or back as of the expiry, in the same batch
                        // as the lease's end.
                        let ended = dead::Ended {
                            id,
                            record: v,
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
                    }
                }
                _ => leases.delete_expiry(&mut batch.writes, k),
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

    /// Drops `id` from `lease` in memory and stages the deletes; the lease
    /// record goes with its last member. Returns the payload size of the
    /// message taken.
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
        let bytes = leases
            .take_member(&mut batch.writes, q, &keys::member_key(qid, &lease, &id), lease, id)
            .unwrap_or(0);
        if let Some(state) = q.leases.get_mut(&lease) {
            state.live = state.live.saturating_sub(1);
            if state.live == 0 {
                let expires_at = state.expires_at;
                q.leases.remove(&lease);
                self.lease_deadlines.remove(&(expires_at, qid, lease));
                leases.delete_expiry(&mut batch.writes, &keys::lease_key(qid, &lease));
            }
        }
        Ok(bytes)
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
        self.lease_deadlines.remove(&(state.expires_at, qid, lease));
        self.lease_deadlines.insert((new_expiry, qid, lease));
        state.expires_at = new_expiry;
        leases.put_expiry(&mut batch.writes, qid, &lease, new_expiry);
        Ok(Some(new_expiry))
    }
}
