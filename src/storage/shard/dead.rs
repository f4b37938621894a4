//! Failed deliveries and dead letters: a release or `fail` ends a delivery
//! (the message comes back after the queue's backoff, or dies when it is
//! out of deliveries or rejected); peeks at the dead; redrive brings them
//! back. A death is written in the same batch as the delivery's end, so a
//! message is never both dead and visible, and never lost between them.

#[allow(unused_imports)]
use super::*;

/// How a delivery ends without a remove.
#[derive(Debug)]
pub(super) enum Ending {
    /// Back to the queue, after `delay_ms` (0: the queue's backoff).
    Release { delay_ms: u64 },
    /// A worker's failure, its text recorded on the message; `dead`
    /// buries it at once.
    Fail { error: String, dead: bool },
}

use crate::types::clip_error as clip;

impl ShardStore {
    /// Ends `lease`'s delivery of `id` as `ending` says (`release`, `fail`)
    /// and counts it; false if the lease does not hold it (nothing changes
    /// then).
    pub(super) fn end_delivery(
        &mut self,
        queue: &QueueName,
        id: MessageId,
        lease: LeaseId,
        ending: Ending,
        now: u64,
        batch: &mut Batch,
    ) -> Result<bool, StoreError> {
        let qid = self.queue_id(queue)?;
        if !self.holds(qid, &id, &lease, now) {
            return Ok(false);
        }
        // The record goes back as it is (delivery count included), with the
        // error text of a failure; read into the batch's buffer.
        let record = self
            .engine
            .db()
            .get_pinned_cf(self.engine.cf(CF_LEASES)?, keys::member_key(qid, &lease, &id))
            .map_err(StoreError::rocks("read a leased message"))?
            .ok_or_else(|| {
                StoreError::Storage(StorageError::Corrupt {
                    cf: CF_LEASES,
                    detail: format!("message {id} of lease {lease} in {queue} has no record"),
                })
            })?;
        let keys::FullRecord { header, payload, .. } = keys::parse_full_record(&record).ok_or_else(|| {
            StoreError::Storage(StorageError::Corrupt {
                cf: CF_LEASES,
                detail: format!("record of {id} in {queue} is {} bytes", record.len()),
            })
        })?;
        let counted = batch.counted.entry(qid).or_default();
        let (delay_ms, rejected) = match &ending {
            Ending::Release { delay_ms } => {
                counted.released += 1;
                batch.record.clear();
                batch.record.extend_from_slice(&record);
                (*delay_ms, false)
            }
            Ending::Fail { error, dead } => {
                counted.failed += 1;
                keys::encode_record_with_error(&mut batch.record, header, Some(clip(error).as_bytes()), payload);
                (0, *dead)
            }
        };
        drop(record);
        let bytes = self.take_member(qid, id, lease, batch)?;
        let defaults = self.engine.options().defaults();
        let (ready, dead) = (ReadyIndex::of(&self.engine)?, DeadSet::of(&self.engine)?);
        batch.touched.push(qid);
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(false);
        };
        if q.past_retention(header.enqueued_at, now) {
            // Neither back nor dead: retention drops it.
            q.take_bytes(u64::from(bytes));
            q.counters.dropped += 1;
            batch.counted.entry(qid).or_default().dropped_retention += 1;
            return Ok(true);
        }
        let policy = q.policy.or(defaults);
        let out_of_deliveries = u64::from(header.delivery_count) >= policy.max_deliveries.unwrap_or(u64::MAX);
        if rejected || out_of_deliveries {
            let reason = if rejected {
                keys::DeadReason::Rejected
            } else {
                keys::DeadReason::MaxDeliveries
            };
            let mut scratch = Vec::new();
            let death = Death { id, at: now, reason };
            dead.bury(&mut batch.writes, q, death, &batch.record, &mut scratch);
            let counted = batch.counted.entry(qid).or_default();
            match reason {
                keys::DeadReason::Rejected => counted.dead_rejected += 1,
                keys::DeadReason::MaxDeliveries => counted.dead_max_deliveries += 1,
            }
            return Ok(true);
        }
        // Without a delay of its own, the message waits out the queue's
        // retry backoff for its delivery count.
        let delay_ms = match delay_ms {
            0 => policy.retry_backoff_ms.unwrap_or_default().after(header.delivery_count),
            own => own,
        };
        let at = deadline(now, delay_ms);
        ready.insert(&mut batch.writes, q, keys::ready_key(qid, at, &id), &batch.record);
        if at > now {
            q.delayed += 1;
            *self.delay_deadlines.entry((at, qid)).or_default() += 1;
        } else {
            *batch.woken.entry(qid).or_default() += 1;
        }
        Ok(true)
    }

    /// Up to `max_items` dead letters, oldest death first (after `cursor`),
    /// within the poll byte budget; nothing is written.
    pub(super) fn apply_peek_dead(
        &self,
        queue: &QueueName,
        max_items: u32,
        cursor: Option<PeekCursor>,
    ) -> Result<DeadPeeked, StoreError> {
        let qid = self.queue_id(queue)?;
        let start = match cursor {
            Some(c) => {
                let mut after = keys::dead_key(qid, c.visible_at_ms, &c.id).to_vec();
                after.push(0);
                after
            }
            None => keys::queue_prefix(qid).to_vec(),
        };
        let budget = self.engine.options().max_poll_bytes;
        let mut it = self.engine.scan(CF_DEAD, &start, keys::queue_end(qid).to_vec())?;
        let mut peeked = DeadPeeked::default();
        let (mut page, mut last) = (crate::storage::Page::new(max_items, budget), None);
        let corrupt = |detail: String| StoreError::Storage(StorageError::Corrupt { cf: CF_DEAD, detail });
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !page.take(v.len() + crate::storage::POLL_MESSAGE_OVERHEAD) {
                peeked.cursor = last;
                break;
            }
            let (died_at, id) =
                keys::parse_ready_key(k).ok_or_else(|| corrupt(format!("unparseable key {k:?} in {queue}")))?;
            let (reason, record) =
                keys::parse_dead(v).ok_or_else(|| corrupt(format!("dead letter {id} in {queue}")))?;
            let keys::FullRecord { header, error, payload } =
                keys::parse_full_record(record).ok_or_else(|| corrupt(format!("record of {id} in {queue}")))?;
            peeked.letters.push(DeadLetter {
                id,
                payload: payload.to_vec(),
                delivery_count: header.delivery_count,
                enqueued_at_ms: header.enqueued_at,
                died_at_ms: died_at,
                reason,
                last_error: error.map(|e| String::from_utf8_lossy(e).into_owned()),
            });
            last = Some(PeekCursor {
                visible_at_ms: died_at,
                id,
            });
            it.next();
        }
        it.status().map_err(StoreError::rocks("peek at dead letters"))?;
        Ok(peeked)
    }

    /// Moves dead letters back, visible now with their delivery count
    /// reset (their last error kept): those in `ids`, else the oldest; at
    /// most `max` (0: all) and at most [`REDRIVE_BATCH`] per command.
    pub(super) fn apply_redrive(
        &mut self,
        queue: &QueueName,
        max: u64,
        ids: Vec<MessageId>,
        now: u64,
        batch: &mut Batch,
    ) -> Result<(u64, bool), StoreError> {
        let qid = self.queue_id(queue)?;
        let (ready, dead) = (ReadyIndex::of(&self.engine)?, DeadSet::of(&self.engine)?);
        let wanted: std::collections::HashSet<MessageId> = ids.iter().copied().collect();
        let asked = if wanted.is_empty() {
            if max == 0 {
                u64::MAX
            } else {
                max
            }
        } else {
            wanted.len() as u64
        };
        let limit = asked.min(crate::storage::REDRIVE_BATCH);
        let mut it = self
            .engine
            .scan(CF_DEAD, &keys::queue_prefix(qid), keys::queue_end(qid).to_vec())?;
        let Some(q) = self.queues.get_mut(&qid) else {
            return Err(StoreError::Command(CommandError::UnknownQueue(queue.clone())));
        };
        batch.touched.push(qid);
        let corrupt = |detail: String| StoreError::Storage(StorageError::Corrupt { cf: CF_DEAD, detail });
        let mut moved = 0;
        while moved < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            let (_, id) =
                keys::parse_ready_key(k).ok_or_else(|| corrupt(format!("unparseable key {k:?} in {queue}")))?;
            if !wanted.is_empty() && !wanted.contains(&id) {
                it.next();
                continue;
            }
            let (_, record) = keys::parse_dead(v).ok_or_else(|| corrupt(format!("dead letter {id} in {queue}")))?;
            let keys::FullRecord {
                mut header,
                error,
                payload,
            } = keys::parse_full_record(record).ok_or_else(|| corrupt(format!("record of {id} in {queue}")))?;
            header.delivery_count = 0;
            keys::encode_record_with_error(&mut batch.record, header, error, payload);
            dead.take(&mut batch.writes, q, k, &id, header.enqueued_at);
            ready.insert(&mut batch.writes, q, keys::ready_key(qid, now, &id), &batch.record);
            q.counters.dead = q.counters.dead.saturating_sub(1);
            q.add_bytes(payload.len() as u64);
            moved += 1;
            it.next();
        }
        it.status().map_err(StoreError::rocks("scan dead letters"))?;
        if moved > 0 {
            *batch.woken.entry(qid).or_default() += moved;
            batch.counted.entry(qid).or_default().redriven += moved;
        }
        let more = moved == crate::storage::REDRIVE_BATCH && asked > moved && q.counters.dead > 0;
        Ok((moved, more))
    }
}
