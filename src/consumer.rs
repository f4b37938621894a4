//! A worker's loop over one queue, acknowledging each batch in the request
//! that fetches the next (`removeAndPoll`).
//!
//! ```no_run
//! # async fn work(client: queueber::client::Client) -> Result<(), queueber::client::ClientError> {
//! use queueber::consumer::Consumer;
//! use queueber::names::QueueName;
//!
//! let queue = QueueName::new("acme", "emails").unwrap();
//! let mut consumer = Consumer::new(client, queue, 32, 30_000, 5_000);
//! while let Some(lease) = consumer.next().await? {
//!     for message in &lease.messages {
//!         // ... handle message.payload ...
//!         consumer.done(&lease, message.id);
//!     }
//! }
//! consumer.flush().await?;
//! # Ok(()) }
//! ```
//!
//! Messages marked [`done`](Consumer::done) are removed by the next call to
//! [`next`](Consumer::next) or [`flush`](Consumer::flush); messages not
//! marked stay leased until their lease expires, then come back (or are
//! dead-lettered, per the queue's policy), exactly as with `poll` and
//! `remove`. The combined request never waits: its answer is also the
//! confirmation of the removes, so when it finds nothing the consumer
//! long-polls with a plain `poll` (`docs/protocol.md`, "removeAndPoll").

use crate::client::{Client, ClientError};
use crate::ids::{LeaseId, MessageId};
use crate::names::QueueName;
use crate::types::Lease;

/// Drains one queue batch by batch; see the [module](self).
pub struct Consumer {
    client: Client,
    queue: QueueName,
    max_items: u32,
    lease_ms: u64,
    wait_ms: u64,
    /// Messages handled and not yet removed, grouped by lease in the order
    /// marked (one request removes one lease's messages).
    done: Vec<(LeaseId, Vec<MessageId>)>,
    /// Ids the last removes did not remove (their lease had expired, or
    /// they were not its).
    not_removed: Vec<MessageId>,
}

impl Consumer {
    /// Polls `queue` for up to `max_items` messages at a time, leased for
    /// `lease_ms` (0: the queue's lease), waiting up to `wait_ms` when the
    /// queue is empty.
    pub fn new(client: Client, queue: QueueName, max_items: u32, lease_ms: u64, wait_ms: u64) -> Consumer {
        Consumer {
            client,
            queue,
            max_items,
            lease_ms,
            wait_ms,
            done: Vec::new(),
            not_removed: Vec::new(),
        }
    }

    /// Marks a message of `lease` as handled: the next request removes it.
    pub fn done(&mut self, lease: &Lease, id: MessageId) {
        match self.done.last_mut() {
            Some((held, ids)) if *held == lease.id => ids.push(id),
            _ => self.done.push((lease.id, vec![id])),
        }
    }

    /// Removes what is marked and leases the next batch: one request when
    /// messages are waiting, a plain long poll after it when none are.
    /// `None` when the wait ran out with nothing.
    pub async fn next(&mut self) -> Result<Option<Lease>, ClientError> {
        self.remove_all_but_last().await?;
        if let Some((lease, ids)) = self.done.pop() {
            let answer = self
                .client
                .remove_and_poll(&self.queue, Some(lease), ids.clone(), self.max_items, self.lease_ms, 0)
                .await;
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    // Nothing was removed: the marks stay for the next try.
                    self.done.push((lease, ids));
                    return Err(e);
                }
            };
            self.note_removed(&ids, &answer.removed);
            if answer.lease.is_some() || self.wait_ms == 0 {
                return Ok(answer.lease);
            }
        }
        self.client
            .poll(&self.queue, self.max_items, self.lease_ms, self.wait_ms)
            .await
    }

    /// Removes everything marked, without polling (before stopping).
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.remove_all_but_last().await?;
        if let Some((lease, ids)) = self.done.pop() {
            self.remove(lease, ids).await?;
        }
        Ok(())
    }

    /// Ids that marked messages' removes did not remove since the last
    /// call (their lease had expired: another worker may have them now).
    pub fn take_not_removed(&mut self) -> Vec<MessageId> {
        std::mem::take(&mut self.not_removed)
    }

    /// The consumer's client (to add, extend, fail... on the same connection).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Marks of leases before the last one go as plain removes (a worker
    /// that marks a batch after fetching the next).
    async fn remove_all_but_last(&mut self) -> Result<(), ClientError> {
        while self.done.len() > 1 {
            let (lease, ids) = self.done.remove(0);
            if let Err(e) = self.remove(lease, ids.clone()).await {
                self.done.insert(0, (lease, ids));
                return Err(e);
            }
        }
        Ok(())
    }

    async fn remove(&mut self, lease: LeaseId, ids: Vec<MessageId>) -> Result<(), ClientError> {
        let flags = self.client.remove(&self.queue, lease, ids.clone()).await?;
        self.note_removed(&ids, &flags);
        Ok(())
    }

    fn note_removed(&mut self, ids: &[MessageId], flags: &[bool]) {
        self.not_removed
            .extend(ids.iter().zip(flags).filter(|(_, &ok)| !ok).map(|(&id, _)| id));
    }
}
