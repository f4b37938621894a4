//! Rebuilding a shard's in-memory state from the column families at open
//! (and after a failed batch).

#[allow(unused_imports)]
use super::*;

impl ShardStore {
    pub(super) fn load_all(&mut self) -> Result<(), StoreError> {
        // The counters since open outlive a reload (a failed batch counted
        // nothing, so they are still right).
        let mut metrics: HashMap<QueueName, QueueCounters> =
            self.queues.drain().map(|(_, q)| (q.name, q.metrics)).collect();
        self.names.clear();
        self.sorted = None;
        self.lease_deadlines.clear();
        self.delay_deadlines.clear();
        self.retention_deadlines.clear();
        self.retention_fills.clear();
        self.stale_retention.clear();
        let now = self.now();
        for (name, qid) in self.engine.registry()? {
            if (self.owns)(&name) {
                let counted = metrics.remove(&name).unwrap_or_default();
                self.load_queue(name, qid, now)?;
                if let Some(q) = self.queues.get_mut(&qid) {
                    q.metrics = counted;
                }
            }
        }
        Ok(())
    }

    pub(super) fn load_queue(&mut self, name: QueueName, qid: QueueId, now: u64) -> Result<(), StoreError> {
        let engine = &self.engine;
        let db = engine.db();
        let stored = db
            .get_pinned_cf(engine.cf(CF_REGISTRY)?, keys::counters_key(qid))
            .map_err(StoreError::rocks("read queue counters"))?
            .map(|v| v.to_vec());
        let counters = match &stored {
            Some(v) => keys::parse_counters(v).ok_or_else(|| {
                StoreError::Storage(StorageError::Corrupt {
                    cf: CF_REGISTRY,
                    detail: format!("counters of {name}"),
                })
            })?,
            None => Counters::default(),
        };
        let exclude_leased = stored.as_deref().is_some_and(keys::counters_exclude_leased);
        let mut q = QueueState::new(name.clone(), qid, counters);
        q.persisted = stored;
        if let Some(v) = db
            .get_pinned_cf(engine.cf(CF_REGISTRY)?, keys::policy_key(qid))
            .map_err(StoreError::rocks("read a queue policy"))?
        {
            (q.policy_version, q.policy) = keys::parse_policy(&v).ok_or_else(|| {
                StoreError::Storage(StorageError::Corrupt {
                    cf: CF_REGISTRY,
                    detail: format!("policy of {name} is {} bytes", v.len()),
                })
            })?;
        }
        // Counters from before payload bytes were kept: count them once
        // (leased payloads below, ready ones after), and persist them with
        // the queue's next batch.
        let count_bytes = q.counters.bytes.is_none();

        // Leases: a header (a block, or an expiry from before blocks)
        // followed by its member keys (end markers of a block's members,
        // or records from before blocks), in key order.
        let corrupt = |detail: String| StoreError::Storage(StorageError::Corrupt { cf: CF_LEASES, detail });
        let mut it = engine.scan(CF_LEASES, &keys::queue_prefix(qid), keys::queue_end(qid).to_vec())?;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            match keys::parse_lease_entry(k) {
                Some(LeaseEntry::Header(lease)) => {
                    let header = keys::parse_lease_header(v)
                        .ok_or_else(|| corrupt(format!("lease header of {name} is {} bytes", v.len())))?;
                    let state = q.leases.entry(lease).or_insert(LeaseState::new(0, 0, false));
                    state.expires_at = header.expires_at;
                    state.block = header.members.is_some();
                    for member in header.members.into_iter().flatten() {
                        let (id, record) =
                            member.map_err(|()| corrupt(format!("torn block of lease {lease} in {name}")))?;
                        let bytes = keys::payload_len(record) as u32;
                        state.live += 1;
                        // `QueueState::hold`, field by field: `state`
                        // borrows the queue's leases meanwhile.
                        if let Some(old) = q.holders.insert(id, Held { lease, bytes }) {
                            q.leased_bytes -= u64::from(old.bytes);
                        }
                        q.leased_bytes += u64::from(bytes);
                    }
                }
                Some(LeaseEntry::Member(lease, id)) if v.is_empty() => {
                    // A block member that ended: after its block in key order.
                    q.release_holder(lease, &id);
                    if let Some(state) = q.leases.get_mut(&lease) {
                        state.live = state.live.saturating_sub(1);
                        state.marked.push(id);
                    }
                }
                Some(LeaseEntry::Member(lease, id)) => {
                    // A member without a header cannot happen (they are written
                    // and deleted together); if it does, expire it at once
                    // rather than hold the message forever.
                    q.leases.entry(lease).or_insert(LeaseState::new(0, 0, false)).live += 1;
                    let bytes = keys::payload_len(v) as u32;
                    q.hold(id, Held { lease, bytes });
                }
                None => return Err(corrupt(format!("unparseable key {k:?} in {name}"))),
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
            let (at, _) = keys::parse_ready_key(k).ok_or_else(|| {
                StoreError::Storage(StorageError::Corrupt {
                    cf: CF_READY,
                    detail: format!("unparseable key {k:?} in {name}"),
                })
            })?;
            *self.delay_deadlines.entry((at, qid)).or_default() += 1;
            q.delayed += 1;
            it.next();
        }
        it.status().map_err(StoreError::rocks("scan delayed messages"))?;
        drop(it);
        if count_bytes {
            let mut ready_bytes = 0u64;
            let mut it = engine.scan(CF_READY, &keys::queue_prefix(qid), keys::queue_end(qid).to_vec())?;
            while let Some(v) = it.value() {
                ready_bytes += keys::payload_len(v) as u64;
                it.next();
            }
            it.status()
                .map_err(StoreError::rocks("count a queue's payload bytes"))?;
            q.counters.bytes = Some(q.leased_bytes + ready_bytes);
            q.dirty = true;
        } else if exclude_leased {
            // Stored without the leased payloads, which the leases just
            // read hold.
            q.counters.bytes = q.counters.bytes.map(|b| b + q.leased_bytes);
        }

        q.cache_head_if_empty(&self.head_budget);
        self.names.insert(name, qid);
        self.sorted = None;
        self.queues.insert(qid, q);
        self.load_retention(qid)
    }
}
