//! One batch: settle what is due, apply each command, persist counters,
//! commit atomically (syncing when a command that succeeded needs it).

#[allow(unused_imports)]
use super::*;

impl ShardStore {
    pub(super) fn apply(&mut self, command: Command, now: u64, batch: &mut Batch) -> Result<Outcome, StoreError> {
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
                .end_delivery(&queue, id, lease, Ending::Release { delay_ms }, now, batch)
                .map(Outcome::Released),
            Command::Fail {
                queue,
                id,
                lease,
                error,
                dead,
            } => self
                .end_delivery(&queue, id, lease, Ending::Fail { error, dead }, now, batch)
                .map(Outcome::Failed),
            Command::PeekDead {
                queue,
                max_items,
                cursor,
            } => self.apply_peek_dead(&queue, max_items, cursor).map(Outcome::DeadPeeked),
            Command::Redrive { queue, max, ids } => self
                .apply_redrive(&queue, max, ids, now, batch)
                .map(|(moved, more)| Outcome::Redriven { moved, more }),
            Command::Stats { queue } => self.apply_stats(&queue, now).map(Outcome::Stats),
            Command::Purge { queue } => {
                let qid = self.queue_id(&queue)?;
                self.apply_purge(qid, batch).map(Outcome::Purged)
            }
            Command::Delete { queue } => {
                let qid = self.queue_id(&queue)?;
                self.apply_purge(qid, batch)?;
                Registry::of(&self.engine)?.unregister(&mut batch.writes, &queue, qid);
                self.names.remove(&queue);
                self.sorted = None;
                self.queues.remove(&qid);
                batch.deleted.push(queue);
                Ok(Outcome::Deleted)
            }
            Command::ListQueues => self.list_queues().map(Outcome::Queues),
            Command::CreateQueue { queue, policy } => {
                self.apply_create_queue(&queue, policy, batch)
                    .map(|(created, policy)| Outcome::Created {
                        created,
                        policy: Box::new(policy),
                    })
            }
            Command::GetPolicy { queue } => self.apply_get_policy(&queue).map(|p| Outcome::Policy(Box::new(p))),
            Command::SetPolicy { queue, policy } => self
                .apply_set_policy(&queue, policy, batch)
                .map(|p| Outcome::Policy(Box::new(p))),
            Command::Peek {
                queue,
                max_items,
                cursor,
            } => self.apply_peek(&queue, max_items, cursor, now).map(Outcome::Peeked),
            Command::Snapshot { after, max_queues } => {
                self.snapshot(after.as_ref(), max_queues, now).map(Outcome::Snapshot)
            }
        }
    }
}

impl QueueStore for ShardStore {
    fn execute(&mut self, commands: Vec<Command>) -> Executed {
        if let Some(reason) = &self.failed {
            return Executed::failed(StorageError::Unavailable(format!(
                "storage failed earlier and this shard is unavailable until restart: {reason}"
            )));
        }
        let now = self.now();
        let scratch = std::mem::take(&mut self.scratch);
        let mut batch = Batch {
            writes: WriteBatch::with_capacity_bytes(self.batch_bytes.capacity()),
            needs_sync: false,
            woken: BTreeMap::new(),
            polled: scratch.polled,
            deleted: Vec::new(),
            counted: scratch.counted,
            touched: scratch.touched,
            record: scratch.record,
            unmarked: scratch.unmarked,
            fresh: super::fresh::Fresh::plan(&commands),
        };
        let count = commands.len();
        // A storage failure anywhere stops the whole batch; a command's own
        // failure is its answer and the batch goes on.
        let storage = |e: StoreError| match e {
            StoreError::Storage(s) => s,
            StoreError::Command(c) => StorageError::Unavailable(format!("outside any command: {c}")),
        };
        let mut fatal = self
            .clear_stale_retention(&mut batch)
            .and_then(|()| self.settle_due(now, &mut batch))
            .err()
            .map(storage);
        // Settled leases are committed on their own first, so that polls in
        // this batch can already see the messages that came back.
        if fatal.is_none() && !batch.writes.is_empty() {
            fatal = self
                .persist_counters(&mut batch)
                .and_then(|()| self.engine.commit(std::mem::take(&mut batch.writes), false).map(drop))
                .err()
                .map(storage);
        }
        let mut outcomes = Vec::with_capacity(count);
        let mut sync = None;
        if fatal.is_none() {
            for command in commands {
                let sync = command.needs_sync();
                match self.apply(command, now, &mut batch) {
                    Ok(outcome) => {
                        batch.needs_sync |= sync;
                        outcomes.push(Ok(outcome));
                    }
                    Err(StoreError::Command(e)) => outcomes.push(Err(e)),
                    Err(StoreError::Storage(e)) => {
                        fatal = Some(e);
                        break;
                    }
                }
            }
        }
        if fatal.is_none() {
            fatal = self
                .flush_held(&mut batch)
                .and_then(|()| self.mark_ended_members(&mut batch))
                .and_then(|()| self.persist_counters(&mut batch))
                .err()
                .map(storage);
        }
        if fatal.is_none() && !batch.writes.is_empty() {
            self.batch_bytes.observe(batch.writes.size_in_bytes());
            match self.engine.commit(batch.writes, batch.needs_sync) {
                Ok(wait) => sync = wait,
                Err(e) => fatal = Some(storage(e)),
            }
        }
        if let Some(error) = fatal {
            // Memory may now be ahead of the database: rebuild it from what
            // was committed. If even that fails, stop serving.
            if matches!(error, StorageError::Rocks { no_space: true, .. }) {
                // The disk state logged the cause once; this repeats per batch.
                tracing::debug!(%error, "storage batch failed for lack of space; reloading shard state");
            } else {
                if let Some(failures) = self.failure_log.hit() {
                    tracing::error!(%error, failures, "storage batch failed; reloading shard state");
                }
            }
            if let Err(reload) = self.load_all() {
                tracing::error!(%reload, "rebuilding shard state failed; the shard is unavailable until restart");
                self.failed = Some(format!("{error}; reload failed: {reload}"));
            }
            self.count_queues();
            return Executed::failed(error);
        }
        self.count_queues();
        for (qid, counted) in &batch.counted {
            if let Some(q) = self.queues.get_mut(qid) {
                q.metrics.merge(counted);
            }
        }
        let woken = batch
            .woken
            .into_iter()
            .filter_map(|(qid, n)| self.queues.get(&qid).map(|q| (q.name.clone(), n)))
            .collect();
        let mut polled = batch.polled;
        polled.sort_unstable();
        polled.dedup();
        let empty = polled
            .iter()
            .filter_map(|qid| self.queues.get(qid))
            .filter(|q| q.visible() == 0)
            .map(|q| q.name.clone())
            .collect();
        // A failed batch returned above and drops its buffers; the next
        // starts empty, as every batch did before.
        self.scratch = state::BatchScratch {
            polled,
            touched: batch.touched,
            record: batch.record,
            unmarked: batch.unmarked,
            counted: batch.counted,
        }
        .keep();
        Executed {
            outcomes: Ok(outcomes),
            deleted: batch.deleted,
            woken,
            empty,
            sync,
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        // A shard whose storage failed for good settles nothing until
        // restart: no deadline to wake it for.
        if self.failed.is_some() {
            return None;
        }
        let lease = self.lease_deadlines.first().map(|d| d.0);
        let delay = self.delay_deadlines.first_key_value().map(|(d, _)| d.0);
        let retention = self.retention_deadlines.first().map(|d| d.0);
        // A fill in progress goes on with the next batch.
        let fill = (!self.retention_fills.is_empty()).then_some(self.last_now);
        [lease, delay, retention, fill].into_iter().flatten().min()
    }

    fn list_queues(&self) -> Result<Vec<QueueName>, StoreError> {
        Ok(self.engine.registry()?.into_iter().map(|(name, _)| name).collect())
    }
}

impl ShardStore {
    /// Writes the ready records the batch still holds (`super::fresh`).
    fn flush_held(&self, batch: &mut Batch) -> Result<(), StoreError> {
        if !batch.fresh.is_empty() {
            batch.fresh.flush(&mut batch.writes, self.engine.cf(CF_READY)?);
        }
        Ok(())
    }

    pub(super) fn persist_counters(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        let engine = self.engine.clone();
        let registry = Registry::of(&engine)?;
        // Drained, not taken: the list keeps its room for the next batch.
        for qid in batch.touched.drain(..) {
            let Some(q) = self.queues.get_mut(&qid) else {
                continue;
            };
            q.settle_floor();
            q.cache_head_if_empty(&self.head_budget);
            registry.put_counters(&mut batch.writes, q);
            self.list_retention_deadline(qid);
        }
        Ok(())
    }
}
