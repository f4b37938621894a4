//! The ready index: adds, polls (from the floor), stats and purges.

#[allow(unused_imports)]
use super::*;

impl ShardStore {
    pub(super) fn apply_add(
        &mut self,
        queue: QueueName,
        messages: Vec<NewMessage>,
        now: u64,
        batch: &mut Batch,
    ) -> Result<Vec<MessageId>, StoreError> {
        // The queue's limits, or the server's for a queue this add creates.
        let defaults = self.engine.options().defaults();
        let known = self.names.get(&queue).copied();
        let existing = known.and_then(|qid| self.queues.get(&qid));
        let policy = existing.map_or(defaults, |q| q.policy.or(defaults));
        let limit = policy.max_payload_bytes.unwrap_or(u64::MAX);
        if let Some(m) = messages.iter().find(|m| m.payload.len() as u64 > limit) {
            return Err(StoreError::Command(CommandError::PayloadTooLarge {
                size: m.payload.len(),
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            }));
        }
        // All or nothing: the whole add fits under the queue's bounds, or
        // none of it is stored.
        let adding: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
        let (depth, bytes) = existing.map_or((0, 0), |q| (q.depth(), q.bytes()));
        let full = |detail: String| {
            StoreError::Command(CommandError::QueueFull {
                queue: queue.clone(),
                detail,
            })
        };
        if let Some(max) = policy
            .max_depth
            .filter(|&m| depth.saturating_add(messages.len() as u64) > m)
        {
            return Err(full(format!(
                "{depth} messages and max-depth {max}: {} more do not fit",
                messages.len()
            )));
        }
        if let Some(max) = policy.max_bytes.filter(|&m| bytes.saturating_add(adding) > m) {
            return Err(full(format!(
                "{bytes} payload bytes and max-bytes {max}: {adding} more do not fit"
            )));
        }
        // Checked before the queue is created: a refused add leaves nothing.
        if let Some(full) = self.engine.disk().refusal() {
            return Err(StoreError::Command(CommandError::DiskFull(full)));
        }
        let qid = match known {
            Some(qid) => qid,
            None => self.create_queue(&queue, batch)?,
        };
        let ready = ReadyIndex::of(&self.engine)?;
        let q = self
            .queues
            .get_mut(&qid)
            .ok_or_else(|| StoreError::Storage(StorageError::Unavailable(format!("queue id {qid} has no state"))))?;
        batch.touched.push(qid);
        q.add_bytes(adding);
        let header = RecordHeader {
            enqueued_at: now,
            delivery_count: 0,
        };
        // Immediate adds that a poll of this batch may take are held out of
        // its writes (`super::fresh`).
        let hold = batch.fresh.wants(&queue);
        let mut ids = Vec::with_capacity(messages.len());
        let mut visible_now = 0;
        for m in &messages {
            let id = self.ids.message_id(now);
            let at = deadline(now, m.delay_ms);
            let key = keys::ready_key(qid, at, &id);
            keys::encode_record(&mut batch.record, header, &m.payload);
            if at <= now && hold {
                ready.insert_held(&mut batch.fresh, &mut batch.writes, q, key, &batch.record);
            } else {
                ready.insert(&mut batch.writes, q, key, &batch.record);
            }
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
        batch.counted.entry(qid).or_default().added += ids.len() as u64;
        Ok(ids)
    }

    pub(super) fn apply_poll(
        &mut self,
        queue: &QueueName,
        max_items: u32,
        lease_ms: u64,
        max_bytes: ReplyBudget,
        now: u64,
        batch: &mut Batch,
    ) -> Result<Option<Lease>, StoreError> {
        let qid = self.queue_id(queue)?;
        batch.polled.push(qid);
        let (ready, leases) = (ReadyIndex::of(&self.engine)?, LeaseTable::of(&self.engine)?);
        let Some(q) = self.queues.get_mut(&qid) else {
            return Err(StoreError::Command(CommandError::UnknownQueue(queue.clone())));
        };
        let want = u64::from(max_items).min(q.visible());
        let budget = self.engine.options().max_poll_bytes;
        if want == 0 {
            return Ok(None);
        }
        batch.touched.push(qid);
        // The queue's cache when this shard knows all its records (taken out
        // while the loop below takes records from the queue), else RocksDB.
        let start = q.scan_start().into_owned();
        let end = keys::ready_visible_end(qid, now);
        let cached = q.head.take();
        // Kept for queues polled a few messages at a time; a larger poll
        // drops it (see `head::SMALL_POLL`), and only a kept cache needs to
        // know what the poll took or dropped.
        let keep_cache = cached.is_some() && max_items <= super::head::SMALL_POLL;
        let mut taken: Vec<ReadyKey> = Vec::new();

        let lease = self.ids.lease_id(now);
        // A poll that names no lease gets the queue's (or the server's).
        let lease_ms = match lease_ms {
            0 => q
                .policy
                .or(self.engine.options().defaults())
                .lease_ms
                .unwrap_or(crate::storage::engine::DEFAULT_LEASE_MS),
            named => named,
        };
        let expires_at = deadline(now, lease_ms);
        let mut messages: Vec<Delivery> = Vec::with_capacity(want as usize);
        let mut lengths = Vec::with_capacity(want as usize);
        let mut held_payloads = bytes::BytesMut::new();
        let mut last_key: Option<ReadyKey> = None;
        let (mut bytes, mut dropped) = (0, 0u64);
        // Records this batch holds out of its writes (`super::fresh`) that
        // the poll takes: forgotten once the scan is done.
        let fresh = &batch.fresh;
        let mut taken_held: Vec<ReadyKey> = Vec::new();
        // One ready record in key order; `false` when the poll is done.
        let mut visit = |k: &[u8], v: &[u8]| -> Result<bool, StoreError> {
            let corrupt_key = || {
                StoreError::Storage(StorageError::Corrupt {
                    cf: CF_READY,
                    detail: format!("unparseable key {k:?} in {queue}"),
                })
            };
            let enqueued_at = keys::record_enqueued_at(v);
            if q.past_retention(enqueued_at, now) {
                // Not dropped yet (the drop is behind, or the retention was
                // shortened in this batch): never handed out. Bounded like
                // the drop itself; the next poll goes on.
                if dropped == super::retention::RETENTION_BATCH as u64 {
                    return Ok(false);
                }
                let key: ReadyKey = k.try_into().map_err(|_| corrupt_key())?;
                let written = !fresh.holds(&key);
                if !written {
                    taken_held.push(key);
                }
                ready.take(&mut batch.writes, written, q, &key, enqueued_at);
                q.take_bytes(keys::payload_len(v) as u64);
                dropped += 1;
                if keep_cache {
                    taken.push(key);
                }
                last_key = Some(key);
                return Ok(true);
            }
            // Payload and per-message overhead (not a failure's error text).
            let cost = keys::payload_len(v) + crate::storage::POLL_MESSAGE_OVERHEAD;
            let first = messages.is_empty();
            if (!first && bytes + cost > budget) || !max_bytes.take(cost, first) {
                return Ok(false);
            }
            bytes += cost;
            let (_, id) = keys::parse_ready_key(k).ok_or_else(corrupt_key)?;
            // A fixed array, no allocation.
            let key: ReadyKey = k.try_into().map_err(|_| corrupt_key())?;
            let keys::FullRecord {
                mut header,
                error,
                payload,
            } = keys::parse_full_record(v).ok_or_else(|| {
                StoreError::Storage(StorageError::Corrupt {
                    cf: CF_READY,
                    detail: format!("record of {id} in {queue} is {} bytes", v.len()),
                })
            })?;
            header.delivery_count = header.delivery_count.saturating_add(1);
            // The whole lease is one block, written below; the last error a
            // worker reported travels with the message.
            if messages.is_empty() {
                keys::start_lease_block(&mut batch.record, expires_at);
            }
            keys::push_block_member(&mut batch.record, &id, header, error, payload);
            let written = !fresh.holds(&key);
            if !written {
                taken_held.push(key);
            }
            ready.take(&mut batch.writes, written, q, &key, header.enqueued_at);
            q.hold(
                id,
                Held {
                    lease,
                    bytes: payload.len() as u32,
                },
            );
            // The payloads go into one buffer the deliveries share (cut
            // below), sized on the first as if all were alike.
            if messages.is_empty() {
                held_payloads.reserve(payload.len().saturating_mul(want as usize).min(budget));
            }
            held_payloads.extend_from_slice(payload);
            lengths.push(payload.len());
            messages.push(Delivery {
                id,
                payload: bytes::Bytes::new(),
                delivery_count: header.delivery_count,
                enqueued_at_ms: header.enqueued_at,
            });
            if keep_cache {
                taken.push(key);
            }
            last_key = Some(key);
            Ok((messages.len() as u64) < want)
        };
        match &cached {
            Some(head) => {
                for (k, v) in head.range(&start, &end) {
                    if !visit(k, v)? {
                        break;
                    }
                }
            }
            None => {
                // RocksDB has what earlier batches wrote; the records this
                // batch holds are merged in, in key order.
                let mut held = fresh.range(&start, &end).peekable();
                let mut it = self.engine.scan(CF_READY, &start, end.to_vec())?;
                loop {
                    let from_held = match (it.key(), held.peek()) {
                        (None, None) => break,
                        (Some(k), Some((h, _))) => &h[..] < k,
                        (Some(_), None) => false,
                        (None, Some(_)) => true,
                    };
                    let go_on = if from_held {
                        let Some((k, v)) = held.next() else {
                            break;
                        };
                        visit(k, v)?
                    } else {
                        let (Some(k), Some(v)) = (it.key(), it.value()) else {
                            break;
                        };
                        let go_on = visit(k, v)?;
                        it.next();
                        go_on
                    };
                    if !go_on {
                        break;
                    }
                }
                it.status().map_err(StoreError::rocks("scan the ready index"))?;
            }
        }
        batch.fresh.forget(&taken_held);
        if let Some(mut head) = cached.filter(|_| keep_cache) {
            for key in &taken {
                head.remove(key);
            }
            q.head = Some(head);
        }
        let mut payloads = held_payloads.freeze();
        for (m, len) in messages.iter_mut().zip(lengths) {
            m.payload = payloads.split_to(len);
        }
        let Some(last) = last_key else {
            return Ok(None);
        };
        // Just above the last consumed key (lowered to what this batch wrote
        // below it when the batch ends: `QueueState::settle_floor`).
        // Rewritten in place: the queue's floor keeps its buffer.
        let floor = q.counters.floor.get_or_insert_with(Vec::new);
        floor.clear();
        floor.extend_from_slice(&last);
        floor.push(0);
        q.note_ready_change();
        q.counters.ready -= messages.len() as u64 + dropped;
        q.counters.dropped += dropped;
        q.dirty = true;
        if dropped > 0 {
            batch.counted.entry(qid).or_default().dropped_retention += dropped;
        }
        if messages.is_empty() {
            return Ok(None);
        }
        q.leases
            .insert(lease, LeaseState::new(expires_at, messages.len() as u32, true));
        self.lease_deadlines.insert((expires_at, qid, lease));
        leases.put_header(&mut batch.writes, qid, &lease, &batch.record);
        let counted = batch.counted.entry(qid).or_default();
        counted.delivered += messages.len() as u64;
        counted.redelivered += messages.iter().filter(|m| m.delivery_count > 1).count() as u64;
        Ok(Some(Lease {
            id: lease,
            expires_at_ms: expires_at,
            messages,
        }))
    }

    pub(super) fn apply_stats(&mut self, queue: &QueueName, now: u64) -> Result<QueueStats, StoreError> {
        let qid = self.queue_id(queue)?;
        let Some(q) = self.queues.get(&qid) else {
            return Err(StoreError::Command(CommandError::UnknownQueue(queue.clone())));
        };
        let disk_full = self.engine.disk().is_full();
        if let Some(stats) = known_head_stats(q, now, disk_full) {
            return Ok(stats);
        }
        let mut it = self.engine.db().raw_iterator_cf(self.engine.cf(CF_READY)?);
        queue_stats(q, &mut it, now, disk_full)
    }

    /// Up to `max_items` visible messages from the floor (or just after
    /// `cursor`), within the poll byte budget; nothing is written.
    pub(super) fn apply_peek(
        &self,
        queue: &QueueName,
        max_items: u32,
        cursor: Option<PeekCursor>,
        now: u64,
    ) -> Result<Peeked, StoreError> {
        let qid = self.queue_id(queue)?;
        let Some(q) = self.queues.get(&qid) else {
            return Err(StoreError::Command(CommandError::UnknownQueue(queue.clone())));
        };
        let floor = q.scan_start().into_owned();
        // Never below the floor: what lies there is consumed (tombstones).
        let start = match cursor {
            Some(c) => {
                let mut after = keys::ready_key(qid, c.visible_at_ms, &c.id).to_vec();
                after.push(0);
                after.max(floor)
            }
            None => floor,
        };
        let budget = self.engine.options().max_poll_bytes;
        let mut it = self
            .engine
            .scan(CF_READY, &start, keys::ready_visible_end(qid, now).to_vec())?;
        let mut peeked = Peeked::default();
        let mut last = None;
        let mut page = crate::storage::Page::new(max_items, budget);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            // Payload and per-message overhead (not a failure's error text).
            if !page.take(keys::payload_len(v) + crate::storage::POLL_MESSAGE_OVERHEAD) {
                peeked.cursor = last;
                break;
            }
            let corrupt = |detail: String| StoreError::Storage(StorageError::Corrupt { cf: CF_READY, detail });
            let (visible_at_ms, id) =
                keys::parse_ready_key(k).ok_or_else(|| corrupt(format!("unparseable key {k:?} in {queue}")))?;
            let (header, payload) = keys::parse_record(v)
                .ok_or_else(|| corrupt(format!("record of {id} in {queue} is {} bytes", v.len())))?;
            peeked.messages.push(Delivery {
                id,
                payload: bytes::Bytes::copy_from_slice(payload),
                delivery_count: header.delivery_count,
                enqueued_at_ms: header.enqueued_at,
            });
            last = Some(PeekCursor { visible_at_ms, id });
            it.next();
        }
        it.status().map_err(StoreError::rocks("peek at the ready index"))?;
        Ok(peeked)
    }

    pub(super) fn apply_purge(&mut self, qid: QueueId, batch: &mut Batch) -> Result<u64, StoreError> {
        let (ready, leases) = (ReadyIndex::of(&self.engine)?, LeaseTable::of(&self.engine)?);
        let dead = DeadSet::of(&self.engine)?;
        let Some(q) = self.queues.get_mut(&qid) else {
            return Ok(0);
        };
        let dropped = q.counters.ready + q.holders.len() as u64 + q.counters.dead;
        batch.touched.push(qid);
        ready.purge(&mut batch.writes, &mut batch.fresh, qid);
        leases.purge(&mut batch.writes, qid);
        dead.purge(&mut batch.writes, qid);
        // Nothing is left in the ready index: known whole again.
        q.head = Some(HeadCache::empty(&self.head_budget));
        // What retention dropped is history a purge does not undo.
        q.counters = Counters {
            bytes: Some(0),
            dropped: q.counters.dropped,
            ..Counters::default()
        };
        if let Some(r) = &mut q.retention {
            // The index went with the ready records: nothing is left to
            // fill or drop.
            r.oldest = None;
            if r.filling.take().is_some() {
                self.retention_fills.remove(&qid);
                Registry::of(&self.engine)?.put_retention_state(&mut batch.writes, qid, Some(keys::RETENTION_COMPLETE));
            }
        }
        q.note_ready_change();
        q.delayed = 0;
        q.leases.clear();
        q.clear_holders();
        q.batch_low = None;
        q.dirty = true;
        self.lease_deadlines.retain(|&(_, owner, _)| owner != qid);
        self.delay_deadlines.retain(|&(_, owner), _| owner != qid);
        // Nothing left to drop: its retention timer goes too (also for a
        // queue being deleted, whose state goes next).
        self.list_retention_deadline(qid);
        Ok(dropped)
    }

    /// The gauges and counters of up to `max_queues` queues after `after`
    /// in name order, all heads read with one iterator (creating one costs
    /// more than seeking).
    pub(super) fn snapshot(
        &mut self,
        after: Option<&QueueName>,
        max_queues: usize,
        now: u64,
    ) -> Result<Vec<QueueSnapshot>, StoreError> {
        let disk_full = self.engine.disk().is_full();
        let names = &self.names;
        let sorted = self.sorted.get_or_insert_with(|| {
            let mut sorted: Vec<(QueueName, QueueId)> = names.iter().map(|(n, &qid)| (n.clone(), qid)).collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            sorted
        });
        let start = after.map_or(0, |after| sorted.partition_point(|(name, _)| name <= after));
        // Made on the first head that is not known already: a chunk of idle
        // queues creates none.
        let mut it = None;
        let mut out = Vec::with_capacity(max_queues.min(sorted.len() - start));
        for (queue, qid) in &sorted[start..] {
            if out.len() >= max_queues {
                break;
            }
            let Some(q) = self.queues.get(qid) else {
                continue;
            };
            let stats = match known_head_stats(q, now, disk_full) {
                Some(stats) => stats,
                None => {
                    let it = match &mut it {
                        Some(it) => it,
                        None => it.insert(self.engine.db().raw_iterator_cf(self.engine.cf(CF_READY)?)),
                    };
                    queue_stats(q, it, now, disk_full)?
                }
            };
            let counters = q.metrics;
            out.push(QueueSnapshot {
                queue: queue.clone(),
                stats,
                counters,
            });
        }
        Ok(out)
    }
}

/// A queue's counts, from memory.
fn counts(q: &QueueState, disk_full: bool) -> QueueStats {
    QueueStats {
        visible: q.visible(),
        delayed: q.delayed,
        in_flight: q.holders.len() as u64,
        oldest_visible_age_ms: None,
        disk_full,
        dead: q.counters.dead,
        dropped: q.counters.dropped,
    }
}

/// A queue's stats without reading RocksDB, when memory has them all:
/// nothing visible, or a head found since the queue's ready records last
/// changed (`QueueState::head_seen`).
fn known_head_stats(q: &QueueState, now: u64, disk_full: bool) -> Option<QueueStats> {
    let mut stats = counts(q, disk_full);
    if stats.visible == 0 {
        return Some(stats);
    }
    let (generation, enqueued_at) = q.head_seen.get()?;
    if generation != q.ready_generation {
        return None;
    }
    stats.oldest_visible_age_ms = Some(now.saturating_sub(enqueued_at));
    Some(stats)
}

/// A queue's counts (in memory) and the age of its head: one seek to the
/// floor on `it`, an iterator over the ready index that may be reused
/// across queues (every key read is checked to lie between this queue's
/// floor and its visible end, so seeks never read another queue's).
fn queue_stats(
    q: &QueueState,
    it: &mut rocksdb::DBRawIterator<'_>,
    now: u64,
    disk_full: bool,
) -> Result<QueueStats, StoreError> {
    if let Some(stats) = known_head_stats(q, now, disk_full) {
        return Ok(stats);
    }
    let mut stats = counts(q, disk_full);
    if stats.visible > 0 {
        let start = q.scan_start();
        let end = keys::ready_visible_end(q.qid, now);
        it.seek(&start);
        if let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k >= &start[..] && k < &end[..] {
                if let Some((header, _)) = keys::parse_record(v) {
                    stats.oldest_visible_age_ms = Some(now.saturating_sub(header.enqueued_at));
                    // Not while this batch has written records the seek
                    // could not see: one of them may be the head at commit.
                    if q.batch_low.is_none() {
                        q.head_seen.set(Some((q.ready_generation, header.enqueued_at)));
                    }
                }
            }
        }
        it.status().map_err(StoreError::rocks("read the head of a queue"))?;
    }
    Ok(stats)
}
