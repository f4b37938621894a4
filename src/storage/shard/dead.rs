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

/// A delivery that ended without a remove: by its lease's expiry, a
/// `release` or a `fail`.
pub(super) struct Ended<'r> {
    pub(super) id: MessageId,
    /// The message's record (as it goes on: with a failure's error text).
    pub(super) record: &'r [u8],
    /// When the delivery ended: the lease's expiry, or the request's time.
    pub(super) at: u64,
    /// A delay of its own (a release's), or 0: the queue's backoff.
    pub(super) delay_ms: u64,
    /// A worker rejected it (`fail` with `dead`).
    pub(super) rejected: bool,
    /// Payload bytes it holds (what a drop takes off the queue).
    pub(super) bytes: u32,
}

/// Where an ended delivery's message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Landed {
    /// Past retention: dropped (and counted on the queue).
    Dropped,
    Dead(keys::DeadReason),
    /// Back in the ready index; `visible` now, or delayed.
    Back {
        visible: bool,
    },
}

/// The one rule for a delivery that ended without a remove, whichever way
/// it ended: past retention it is dropped; rejected or out of deliveries
/// it dies (at the end's time); else it comes back after its own delay or
/// the queue's backoff for its delivery count. Writes it where it goes.
pub(super) fn land(
    q: &mut QueueState,
    policy: &QueuePolicy,
    delay_deadlines: &mut BTreeMap<(u64, QueueId), u64>,
    (ready, dead): (&ReadyIndex<'_>, &DeadSet<'_>),
    ended: Ended<'_>,
    now: u64,
    (writes, scratch): (&mut WriteBatch, &mut Vec<u8>),
) -> Landed {
    let delivery_count = keys::parse_record(ended.record).map_or(1, |(h, _)| h.delivery_count);
    if q.past_retention(keys::record_enqueued_at(ended.record), now) {
        q.take_bytes(u64::from(ended.bytes));
        q.counters.dropped += 1;
        return Landed::Dropped;
    }
    let out_of_deliveries = u64::from(delivery_count) >= policy.max_deliveries.unwrap_or(u64::MAX);
    if ended.rejected || out_of_deliveries {
        let reason = if ended.rejected {
            keys::DeadReason::Rejected
        } else {
            keys::DeadReason::MaxDeliveries
        };
        let death = Death {
            id: ended.id,
            at: ended.at,
            reason,
        };
        dead.bury(writes, q, death, ended.record, scratch);
        return Landed::Dead(reason);
    }
    let delay_ms = match ended.delay_ms {
        0 => policy.retry_backoff_ms.unwrap_or_default().after(delivery_count),
        own => own,
    };
    let at = deadline(ended.at, delay_ms);
    ready.insert(writes, q, keys::ready_key(q.qid, at, &ended.id), ended.record);
    if at > now {
        q.delayed += 1;
        *delay_deadlines.entry((at, q.qid)).or_default() += 1;
    }
    Landed::Back { visible: at <= now }
}

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
        // error text of a failure; read into the batch's buffer. It is in
        // the lease's block, or (from before blocks) under its member key.
        let block = self
            .queues
            .get(&qid)
            .and_then(|q| q.leases.get(&lease))
            .is_some_and(|l| l.block);
        let no_record = || {
            StoreError::Storage(StorageError::Corrupt {
                cf: CF_LEASES,
                detail: format!("message {id} of lease {lease} in {queue} has no record"),
            })
        };
        let cf = self.engine.cf(CF_LEASES)?;
        let db = self.engine.db();
        let stored = if block {
            db.get_pinned_cf(cf, keys::lease_key(qid, &lease))
        } else {
            db.get_pinned_cf(cf, keys::member_key(qid, &lease, &id))
        }
        .map_err(StoreError::rocks("read a leased message"))?
        .ok_or_else(no_record)?;
        let record = if block {
            keys::parse_lease_header(&stored)
                .and_then(|h| h.members)
                .into_iter()
                .flatten()
                .map_while(Result::ok)
                .find_map(|(member, record)| (member == id).then_some(record))
                .ok_or_else(no_record)?
        } else {
            &stored[..]
        };
        let keys::FullRecord { header, payload, .. } = keys::parse_full_record(record).ok_or_else(|| {
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
                batch.record.extend_from_slice(record);
                (*delay_ms, false)
            }
            Ending::Fail { error, dead } => {
                counted.failed += 1;
                keys::encode_record_with_error(&mut batch.record, header, Some(clip(error).as_bytes()), payload);
                (0, *dead)
            }
        };
        drop(stored);
        let bytes = self.take_member(qid, id, lease, batch)?;
        let defaults = self.engine.options().defaults();
        let (ready, dead) = (ReadyIndex::of(&self.engine)?, DeadSet::of(&self.engine)?);
        batch.touched.push(qid);
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(false);
        };
        let policy = q.policy.or(defaults);
        let ended = Ended {
            id,
            record: &batch.record,
            at: now,
            delay_ms,
            rejected,
            bytes,
        };
        let mut scratch = Vec::new();
        let landed = land(
            q,
            &policy,
            &mut self.delay_deadlines,
            (&ready, &dead),
            ended,
            now,
            (&mut batch.writes, &mut scratch),
        );
        let counted = batch.counted.entry(qid).or_default();
        match landed {
            Landed::Dropped => counted.dropped_retention += 1,
            Landed::Dead(keys::DeadReason::Rejected) => counted.dead_rejected += 1,
            Landed::Dead(keys::DeadReason::MaxDeliveries) => counted.dead_max_deliveries += 1,
            Landed::Back { visible: true } => *batch.woken.entry(qid).or_default() += 1,
            Landed::Back { visible: false } => {}
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
