//! [`ModelStore`]: the queue semantics in the plainest possible form.
//!
//! Everything is recomputed from a list of messages on every call: slow,
//! obviously right, and the oracle that property tests hold
//! [`ShardStore`](super::ShardStore) against. Leases are judged by the clock
//! alone, exactly as the contract in [`super`] says.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{
    deadline, Command, CommandError, DeadLetter, DeadPeeked, DeadReason, Delivery, Executed, Lease, Outcome,
    PolicyInfo, QueueCounters, QueuePolicy, QueueSnapshot, QueueStats, QueueStore, StoreError,
    DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_POLL_BYTES, POLL_MESSAGE_OVERHEAD,
};
use crate::clock::Clock;
use crate::ids::{IdGenerator, LeaseId, MessageId};
use crate::names::QueueName;

#[derive(Debug, Clone)]
struct Message {
    payload: bytes::Bytes,
    enqueued_at: u64,
    visible_at: u64,
    delivery_count: u32,
    lease: Option<LeaseId>,
    /// The last error a worker reported (`fail`), already clipped.
    last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Queue {
    messages: BTreeMap<MessageId, Message>,
    leases: HashMap<LeaseId, u64>,
    /// Dead letters by (time of death, id), with why.
    dead: BTreeMap<(u64, MessageId), (Message, DeadReason)>,
    counters: QueueCounters,
    policy: QueuePolicy,
    policy_version: u64,
    /// Messages retention dropped, over the queue's life.
    dropped: u64,
}

impl Queue {
    /// Returns the messages of expired leases, visible from the expiry time
    /// plus the retry backoff of their delivery count.
    fn settle(&mut self, now: u64, defaults: &QueuePolicy) {
        let policy = self.policy.or(*defaults);
        let backoff = policy.retry_backoff_ms.unwrap_or_default();
        let max_deliveries = policy.max_deliveries.unwrap_or(u64::MAX);
        let retention = policy.retention();
        let mut buried = Vec::new();
        let mut expired = Vec::new();
        for (id, m) in self.messages.iter_mut() {
            if let Some(lease) = m.lease {
                let expiry = self.leases.get(&lease).copied().unwrap_or(0);
                if expiry <= now && past(retention, m.enqueued_at, now) {
                    // Its lease ended past retention: dropped.
                    expired.push(*id);
                } else if expiry <= now && u64::from(m.delivery_count) >= max_deliveries {
                    // Out of deliveries: dead at the expiry.
                    m.lease = None;
                    buried.push((*id, expiry));
                    self.counters.dead_max_deliveries += 1;
                } else if expiry <= now {
                    m.lease = None;
                    m.visible_at = deadline(expiry, backoff.after(m.delivery_count));
                    self.counters.leases_expired += 1;
                }
            }
        }
        for (id, died_at) in buried {
            self.bury(id, died_at, DeadReason::MaxDeliveries);
        }
        for id in expired {
            self.messages.remove(&id);
            self.note_dropped(1);
        }
        let held: std::collections::HashSet<LeaseId> = self.messages.values().filter_map(|m| m.lease).collect();
        self.leases.retain(|l, _| held.contains(l));
    }

    /// Drops every message past retention that is not in flight: visible,
    /// delayed and dead. Only at the start of a batch: a retention
    /// shortened by a batch drops from the next one (a poll or the end of a
    /// delivery in between still drops what it meets).
    fn drop_expired(&mut self, now: u64, defaults: &QueuePolicy) {
        let retention = self.policy.or(*defaults).retention();
        let before = self.messages.len() + self.dead.len();
        self.messages
            .retain(|_, m| m.lease.is_some() || !past(retention, m.enqueued_at, now));
        self.dead.retain(|_, (m, _)| !past(retention, m.enqueued_at, now));
        let dropped = before - (self.messages.len() + self.dead.len());
        self.note_dropped(dropped as u64);
    }

    fn note_dropped(&mut self, n: u64) {
        self.dropped += n;
        self.counters.dropped_retention += n;
    }

    fn visible_in_order(&self, now: u64) -> Vec<MessageId> {
        let mut ids: Vec<_> = self
            .messages
            .iter()
            .filter(|(_, m)| m.lease.is_none() && m.visible_at <= now)
            .map(|(id, m)| (m.visible_at, *id))
            .collect();
        ids.sort();
        ids.into_iter().map(|(_, id)| id).collect()
    }

    fn stats(&self, now: u64) -> QueueStats {
        let mut stats = QueueStats::default();
        for m in self.messages.values() {
            match (m.lease, m.visible_at <= now) {
                (Some(_), _) => stats.in_flight += 1,
                (None, true) => stats.visible += 1,
                (None, false) => stats.delayed += 1,
            }
        }
        stats.dead = self.dead.len() as u64;
        stats.dropped = self.dropped;
        stats.oldest_visible_age_ms = self
            .visible_in_order(now)
            .first()
            .and_then(|id| self.messages.get(id))
            .map(|m| now.saturating_sub(m.enqueued_at));
        stats
    }

    fn bury(&mut self, id: MessageId, died_at: u64, reason: DeadReason) {
        if let Some(m) = self.messages.remove(&id) {
            self.dead.insert((died_at, id), (m, reason));
        }
    }

    /// Ends `id`'s delivery without a remove (release or fail): dead when
    /// rejected or out of deliveries, else back after `delay_ms` (0: the
    /// backoff).
    fn end_delivery(&mut self, id: MessageId, delay_ms: u64, rejected: bool, now: u64, defaults: &QueuePolicy) {
        let policy = self.policy.or(*defaults);
        let Some(m) = self.messages.get_mut(&id) else {
            return;
        };
        m.lease = None;
        if past(policy.retention(), m.enqueued_at, now) {
            self.messages.remove(&id);
            self.note_dropped(1);
            return;
        }
        let out = u64::from(m.delivery_count) >= policy.max_deliveries.unwrap_or(u64::MAX);
        if rejected || out {
            let reason = if rejected {
                self.counters.dead_rejected += 1;
                DeadReason::Rejected
            } else {
                self.counters.dead_max_deliveries += 1;
                DeadReason::MaxDeliveries
            };
            self.bury(id, now, reason);
            return;
        }
        let delay = match delay_ms {
            0 => policy.retry_backoff_ms.unwrap_or_default().after(m.delivery_count),
            own => own,
        };
        m.visible_at = deadline(now, delay);
    }

    fn bytes(&self) -> u64 {
        self.messages.values().map(|m| m.payload.len() as u64).sum()
    }

    fn policy_info(&self, defaults: QueuePolicy) -> PolicyInfo {
        PolicyInfo {
            version: self.policy_version,
            policy: self.policy,
            effective: self.policy.or(defaults),
        }
    }

    fn holds(&self, id: &MessageId, lease: &LeaseId, now: u64) -> bool {
        self.messages.get(id).is_some_and(|m| m.lease == Some(*lease))
            && self.leases.get(lease).is_some_and(|&e| e > now)
    }
}

/// Whether a message first added at `enqueued_at` is past `retention`.
fn past(retention: Option<u64>, enqueued_at: u64, now: u64) -> bool {
    retention.is_some_and(|r| enqueued_at.saturating_add(r) <= now)
}

/// Most messages past retention one poll drops on its way (as the store).
const POLL_DROPS: usize = 10_000;

pub struct ModelStore {
    clock: Arc<dyn Clock>,
    ids: IdGenerator,
    queues: BTreeMap<QueueName, Queue>,
    max_payload_bytes: usize,
    max_poll_bytes: usize,
    /// The server's policy defaults (as `EngineOptions::default_policy`).
    default_policy: QueuePolicy,
    last_now: u64,
}

impl ModelStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            ids: IdGenerator::new(),
            queues: BTreeMap::new(),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_poll_bytes: DEFAULT_MAX_POLL_BYTES,
            default_policy: QueuePolicy::default(),
            last_now: 0,
        }
    }

    /// With the server's policy defaults set to `defaults`.
    pub fn with_default_policy(mut self, defaults: QueuePolicy) -> Self {
        self.default_policy = defaults;
        self
    }

    fn defaults(&self) -> QueuePolicy {
        super::engine::complete_defaults(self.default_policy, self.max_payload_bytes)
    }

    fn queue(&mut self, name: &QueueName) -> Result<&mut Queue, StoreError> {
        self.queues
            .get_mut(name)
            .ok_or_else(|| StoreError::Command(CommandError::UnknownQueue(name.clone())))
    }

    fn apply(&mut self, command: Command, now: u64, deleted: &mut Vec<QueueName>) -> Result<Outcome, StoreError> {
        match command {
            Command::Add { queue, messages } => {
                let defaults = self.defaults();
                let existing = self.queues.get(&queue);
                let policy = existing.map_or(defaults, |q| q.policy.or(defaults));
                let limit = policy.max_payload_bytes.unwrap_or(u64::MAX);
                if let Some(m) = messages.iter().find(|m| m.payload.len() as u64 > limit) {
                    return Err(StoreError::Command(CommandError::PayloadTooLarge {
                        size: m.payload.len(),
                        limit: usize::try_from(limit).unwrap_or(usize::MAX),
                    }));
                }
                let (depth, bytes) = existing.map_or((0, 0), |q| (q.messages.len() as u64, q.bytes()));
                let adding: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
                let too_deep = policy.max_depth.is_some_and(|m| depth + messages.len() as u64 > m);
                let too_big = policy.max_bytes.is_some_and(|m| bytes + adding > m);
                if too_deep || too_big {
                    return Err(StoreError::Command(CommandError::QueueFull {
                        queue,
                        detail: "over max-depth or max-bytes".into(),
                    }));
                }
                let mut ids = Vec::new();
                for m in messages {
                    let id = self.ids.message_id(now);
                    self.queues.entry(queue.clone()).or_default().messages.insert(
                        id,
                        Message {
                            payload: m.payload,
                            enqueued_at: now,
                            visible_at: deadline(now, m.delay_ms),
                            delivery_count: 0,
                            lease: None,
                            last_error: None,
                        },
                    );
                    ids.push(id);
                }
                // An add of nothing still creates the queue, as in ShardStore.
                self.queues.entry(queue).or_default().counters.added += ids.len() as u64;
                Ok(Outcome::Added(ids))
            }
            Command::Poll {
                queue,
                max_items,
                lease_ms,
                max_bytes,
            } => {
                let lease = self.ids.lease_id(now);
                let budget = self.max_poll_bytes;
                let defaults = self.defaults();
                let q = self.queue(&queue)?;
                let lease_ms = match lease_ms {
                    0 => q
                        .policy
                        .or(defaults)
                        .lease_ms
                        .unwrap_or(super::engine::DEFAULT_LEASE_MS),
                    named => named,
                };
                let retention = q.policy.or(defaults).retention();
                // In delivery order: messages past retention met on the way
                // are dropped (the store drops them where its scan meets
                // them), the rest taken while they fit.
                let (mut bytes, mut ids, mut expired) = (0, Vec::new(), Vec::new());
                for id in q.visible_in_order(now) {
                    if ids.len() == max_items as usize {
                        break;
                    }
                    let Some(m) = q.messages.get(&id) else { continue };
                    if past(retention, m.enqueued_at, now) {
                        if expired.len() == POLL_DROPS {
                            break;
                        }
                        expired.push(id);
                        continue;
                    }
                    let cost = m.payload.len() + POLL_MESSAGE_OVERHEAD;
                    let first = ids.is_empty();
                    if !((first || bytes + cost <= budget) && max_bytes.take(cost, first)) {
                        break;
                    }
                    bytes += cost;
                    ids.push(id);
                }
                for id in &expired {
                    q.messages.remove(id);
                }
                q.note_dropped(expired.len() as u64);
                if ids.is_empty() {
                    return Ok(Outcome::Polled(None));
                }
                let expires_at = deadline(now, lease_ms);
                q.leases.insert(lease, expires_at);
                let mut messages = Vec::new();
                for id in ids {
                    if let Some(m) = q.messages.get_mut(&id) {
                        m.delivery_count += 1;
                        m.lease = Some(lease);
                        messages.push(Delivery {
                            id,
                            payload: m.payload.clone(),
                            delivery_count: m.delivery_count,
                            enqueued_at_ms: m.enqueued_at,
                        });
                    }
                }
                q.counters.delivered += messages.len() as u64;
                q.counters.redelivered += messages.iter().filter(|m| m.delivery_count > 1).count() as u64;
                Ok(Outcome::Polled(Some(Lease {
                    id: lease,
                    expires_at_ms: expires_at,
                    messages,
                })))
            }
            Command::Remove { queue, id, lease } => {
                let defaults = self.defaults();
                let q = self.queue(&queue)?;
                if !q.holds(&id, &lease, now) {
                    return Ok(Outcome::Removed(false));
                }
                q.messages.remove(&id);
                q.settle(now, &defaults);
                q.counters.removed += 1;
                Ok(Outcome::Removed(true))
            }
            Command::Extend { queue, lease, lease_ms } => {
                let q = self.queue(&queue)?;
                match q.leases.get_mut(&lease) {
                    Some(expiry) if *expiry > now => {
                        *expiry = deadline(now, lease_ms);
                        Ok(Outcome::Extended(Some(*expiry)))
                    }
                    _ => Ok(Outcome::Extended(None)),
                }
            }
            Command::Release {
                queue,
                id,
                lease,
                delay_ms,
            } => {
                let defaults = self.defaults();
                let q = self.queue(&queue)?;
                if !q.holds(&id, &lease, now) {
                    return Ok(Outcome::Released(false));
                }
                // Without a delay of its own, a released message waits out
                // the queue's retry backoff; out of deliveries, it dies.
                q.end_delivery(id, delay_ms, false, now, &defaults);
                q.settle(now, &defaults);
                q.counters.released += 1;
                Ok(Outcome::Released(true))
            }
            Command::Stats { queue } => Ok(Outcome::Stats(self.queue(&queue)?.stats(now))),
            Command::Purge { queue } => {
                let q = self.queue(&queue)?;
                // What retention dropped stays counted (it is history).
                let n = (q.messages.len() + q.dead.len()) as u64;
                q.messages.clear();
                q.dead.clear();
                q.leases.clear();
                Ok(Outcome::Purged(n))
            }
            Command::Fail {
                queue,
                id,
                lease,
                error,
                dead,
            } => {
                let defaults = self.defaults();
                let q = self.queue(&queue)?;
                if !q.holds(&id, &lease, now) {
                    return Ok(Outcome::Failed(false));
                }
                if let Some(m) = q.messages.get_mut(&id) {
                    m.last_error = Some(crate::types::clip_error(&error).to_string());
                }
                q.end_delivery(id, 0, dead, now, &defaults);
                q.settle(now, &defaults);
                q.counters.failed += 1;
                Ok(Outcome::Failed(true))
            }
            Command::PeekDead {
                queue,
                max_items,
                cursor,
            } => {
                let budget = self.max_poll_bytes;
                let q = self.queue(&queue)?;
                let after = cursor.map(|c| (c.visible_at_ms, c.id));
                let mut peeked = DeadPeeked::default();
                let (mut page, mut last) = (super::Page::new(max_items, budget), None);
                for (&(died_at, id), (m, reason)) in &q.dead {
                    if after.is_some_and(|a| (died_at, id) <= a) {
                        continue;
                    }
                    // As the store counts its value: reason, header, error, payload.
                    let stored = 1 + 12 + m.last_error.as_ref().map_or(0, |e| 2 + e.len()) + m.payload.len();
                    if !page.take(stored + POLL_MESSAGE_OVERHEAD) {
                        peeked.cursor = last;
                        break;
                    }
                    peeked.letters.push(DeadLetter {
                        id,
                        payload: m.payload.to_vec(),
                        delivery_count: m.delivery_count,
                        enqueued_at_ms: m.enqueued_at,
                        died_at_ms: died_at,
                        reason: *reason,
                        last_error: m.last_error.clone(),
                    });
                    last = Some(crate::storage::PeekCursor {
                        visible_at_ms: died_at,
                        id,
                    });
                }
                Ok(Outcome::DeadPeeked(peeked))
            }
            Command::Redrive { queue, max, ids } => {
                let q = self.queue(&queue)?;
                let wanted: std::collections::HashSet<MessageId> = ids.iter().copied().collect();
                let asked = match (wanted.is_empty(), max) {
                    (false, _) => wanted.len() as u64,
                    (true, 0) => u64::MAX,
                    (true, max) => max,
                };
                let limit = asked.min(crate::storage::REDRIVE_BATCH);
                let chosen: Vec<(u64, MessageId)> = q
                    .dead
                    .keys()
                    .filter(|(_, id)| wanted.is_empty() || wanted.contains(id))
                    .take(limit as usize)
                    .copied()
                    .collect();
                for key in &chosen {
                    if let Some((mut m, _)) = q.dead.remove(key) {
                        m.delivery_count = 0;
                        m.visible_at = now;
                        q.messages.insert(key.1, m);
                    }
                }
                let moved = chosen.len() as u64;
                q.counters.redriven += moved;
                let more = moved == crate::storage::REDRIVE_BATCH && asked > moved && !q.dead.is_empty();
                Ok(Outcome::Redriven { moved, more })
            }
            Command::Delete { queue } => {
                if self.queues.remove(&queue).is_none() {
                    return Err(StoreError::Command(CommandError::UnknownQueue(queue)));
                }
                deleted.push(queue);
                Ok(Outcome::Deleted)
            }
            Command::ListQueues => self.list_queues().map(Outcome::Queues),
            Command::CreateQueue { queue, policy } => {
                let defaults = self.defaults();
                if let Some(q) = self.queues.get(&queue) {
                    if q.policy != policy {
                        return Err(StoreError::Command(CommandError::QueueExists(queue)));
                    }
                    return Ok(Outcome::Created {
                        created: false,
                        policy: Box::new(q.policy_info(defaults)),
                    });
                }
                let q = self.queues.entry(queue).or_default();
                q.policy = policy;
                q.policy_version = 1;
                Ok(Outcome::Created {
                    created: true,
                    policy: Box::new(q.policy_info(defaults)),
                })
            }
            Command::GetPolicy { queue } => {
                let defaults = self.defaults();
                Ok(Outcome::Policy(Box::new(self.queue(&queue)?.policy_info(defaults))))
            }
            Command::SetPolicy { queue, policy } => {
                let defaults = self.defaults();
                let q = self.queue(&queue)?;
                q.policy = policy;
                q.policy_version += 1;
                Ok(Outcome::Policy(Box::new(q.policy_info(defaults))))
            }
            Command::Peek {
                queue,
                max_items,
                cursor,
            } => {
                let budget = self.max_poll_bytes;
                let q = self.queue(&queue)?;
                let after = cursor.map(|c| (c.visible_at_ms, c.id));
                let mut peeked = crate::storage::Peeked::default();
                let mut page = super::Page::new(max_items, budget);
                let mut last = None;
                for id in q.visible_in_order(now) {
                    let Some(m) = q.messages.get(&id) else { continue };
                    if after.is_some_and(|a| (m.visible_at, id) <= a) {
                        continue;
                    }
                    if !page.take(m.payload.len() + POLL_MESSAGE_OVERHEAD) {
                        peeked.cursor = last;
                        break;
                    }
                    peeked.messages.push(Delivery {
                        id,
                        payload: m.payload.clone(),
                        delivery_count: m.delivery_count,
                        enqueued_at_ms: m.enqueued_at,
                    });
                    last = Some(crate::storage::PeekCursor {
                        visible_at_ms: m.visible_at,
                        id,
                    });
                }
                Ok(Outcome::Peeked(peeked))
            }
            Command::Snapshot { after, max_queues } => {
                let from = match after {
                    Some(after) => std::ops::Bound::Excluded(after),
                    None => std::ops::Bound::Unbounded,
                };
                Ok(Outcome::Snapshot(
                    self.queues
                        .range((from, std::ops::Bound::Unbounded))
                        .take(max_queues)
                        .map(|(name, q)| QueueSnapshot {
                            stats: q.stats(now),
                            counters: q.counters,
                            queue: name.clone(),
                        })
                        .collect(),
                ))
            }
        }
    }
}

impl QueueStore for ModelStore {
    fn execute(&mut self, commands: Vec<Command>) -> Executed {
        self.last_now = self.last_now.max(self.clock.now_ms());
        let now = self.last_now;
        let defaults = self.defaults();
        for q in self.queues.values_mut() {
            q.settle(now, &defaults);
            q.drop_expired(now, &defaults);
        }
        let mut outcomes = Vec::with_capacity(commands.len());
        let mut deleted = Vec::new();
        for command in commands {
            match self.apply(command, now, &mut deleted) {
                Ok(outcome) => outcomes.push(Ok(outcome)),
                Err(StoreError::Command(e)) => outcomes.push(Err(e)),
                // Memory does not fail; kept total for the type's sake.
                Err(StoreError::Storage(e)) => return Executed::failed(e),
            }
        }
        Executed {
            outcomes: Ok(outcomes),
            deleted,
            ..Executed::default()
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        let now = self.last_now;
        let defaults = self.defaults();
        self.queues
            .values()
            .flat_map(|q| {
                // When the oldest message not in flight outlives retention.
                let retention = q.policy.or(defaults).retention().and_then(|r| {
                    let unleased = q.messages.values().filter(|m| m.lease.is_none());
                    let dead = q.dead.values().map(|(m, _)| m);
                    unleased.chain(dead).map(|m| m.enqueued_at.saturating_add(r)).min()
                });
                q.leases
                    .values()
                    .copied()
                    .chain(q.messages.values().filter(|m| m.lease.is_none()).map(|m| m.visible_at))
                    .chain(retention)
            })
            .filter(|&t| t > now)
            .min()
    }

    fn list_queues(&self) -> Result<Vec<QueueName>, StoreError> {
        Ok(self.queues.keys().cloned().collect())
    }
}
