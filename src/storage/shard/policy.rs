//! Queue policies: creating a queue with one, reading and replacing it.
//! What a policy limits is enforced where it applies (adds in `ready`).

#[allow(unused_imports)]
use super::*;

impl ShardStore {
    /// Registers a new queue (empty, with the default policy) in the batch.
    pub(super) fn create_queue(&mut self, queue: &QueueName, batch: &mut Batch) -> Result<QueueId, StoreError> {
        if !(self.owns)(queue) {
            return Err(StoreError::Command(CommandError::WrongShard(queue.clone())));
        }
        // Room first: a refused queue takes no id. The batch's end settles
        // the count if the create goes no further (ShardStore::count_queues).
        self.engine.reserve_queue()?;
        self.counted_queues += 1;
        let qid = self.engine.allocate_qid()?;
        Registry::of(&self.engine)?.register(&mut batch.writes, queue, qid);
        self.names.insert(queue.clone(), qid);
        self.sorted = None;
        let counters = Counters {
            bytes: Some(0),
            ..Counters::default()
        };
        let mut state = QueueState::new(queue.clone(), qid, counters);
        state.cache_head_if_empty(&self.head_budget);
        state.dirty = true;
        self.queues.insert(qid, state);
        batch.touched.push(qid);
        // A server default retention applies from the first message on.
        self.track_retention(qid, None, Some(batch))?;
        Ok(qid)
    }

    /// `createQueue`: a new queue with `policy` (version 1), or the queue
    /// as it is when it exists with the same policy.
    pub(super) fn apply_create_queue(
        &mut self,
        queue: &QueueName,
        policy: QueuePolicy,
        batch: &mut Batch,
    ) -> Result<(bool, PolicyInfo), StoreError> {
        let defaults = self.engine.options().defaults();
        if let Some(q) = self.names.get(queue).and_then(|qid| self.queues.get(qid)) {
            if q.policy != policy {
                return Err(StoreError::Command(CommandError::QueueExists(queue.clone())));
            }
            return Ok((false, q.policy_info(defaults)));
        }
        let qid = self.create_queue(queue, batch)?;
        self.put_policy(qid, policy, batch).map(|info| (true, info))
    }

    pub(super) fn apply_get_policy(&self, queue: &QueueName) -> Result<PolicyInfo, StoreError> {
        let qid = self.queue_id(queue)?;
        let defaults = self.engine.options().defaults();
        self.queues
            .get(&qid)
            .map(|q| q.policy_info(defaults))
            .ok_or_else(|| StoreError::Command(CommandError::UnknownQueue(queue.clone())))
    }

    /// `setPolicy`: replaces the policy whole and moves its version on.
    pub(super) fn apply_set_policy(
        &mut self,
        queue: &QueueName,
        policy: QueuePolicy,
        batch: &mut Batch,
    ) -> Result<PolicyInfo, StoreError> {
        let qid = self.queue_id(queue)?;
        self.put_policy(qid, policy, batch)
    }

    fn put_policy(&mut self, qid: QueueId, policy: QueuePolicy, batch: &mut Batch) -> Result<PolicyInfo, StoreError> {
        let registry = Registry::of(&self.engine)?;
        let defaults = self.engine.options().defaults();
        let Some(q) = self.queues.get_mut(&qid) else {
            return Err(StoreError::Storage(StorageError::Unavailable(format!(
                "queue id {qid} has no state"
            ))));
        };
        q.policy = policy;
        q.policy_version += 1;
        registry.put_policy(&mut batch.writes, q);
        let info = q.policy_info(defaults);
        let stored = q.retention.as_ref().map(|r| match r.filling {
            Some(_) => keys::RETENTION_FILLING,
            None => keys::RETENTION_COMPLETE,
        });
        self.track_retention(qid, stored, Some(batch))?;
        Ok(info)
    }
}
