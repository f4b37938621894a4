//! `poll`: leases up to `max_items` visible messages for `lease_ms`,
//! waiting up to `wait_ms` for one to appear (a long poll). The waiting is
//! the shard core's (`server::core`), which parks an empty poll on its
//! queue and retries it when messages become visible there.

use super::fields::{bad, malformed, read_deliveries, read_queue, set_deliveries, set_queue};
use super::Operation;
use crate::ids::LeaseId;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{poll_reply, poll_request, request, response};
use crate::types::Lease;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poll {
    pub queue: QueueName,
    /// 0 means 1; capped by the server's limit.
    pub max_items: u32,
    /// Must be greater than 0.
    pub lease_ms: u64,
    /// 0 answers at once; capped by the server's limit.
    pub wait_ms: u64,
}

impl Operation for Poll {
    const NAME: &'static str = "poll";
    /// `None` when nothing was leased (the wait ran out).
    type Reply = Option<Lease>;
    type RequestArm<'a> = capnp::Result<poll_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<poll_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(malformed)?;
        Ok(Poll {
            queue: read_queue(r.get_queue())?,
            max_items: r.get_max_items(),
            lease_ms: r.get_lease_ms(),
            wait_ms: r.get_wait_ms(),
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_poll();
        set_queue(b.reborrow().init_queue(), &self.queue);
        b.set_max_items(self.max_items);
        b.set_lease_ms(self.lease_ms);
        b.set_wait_ms(self.wait_ms);
    }

    /// No lease is an empty `lease` field (and no messages).
    fn reply_words(lease: &Option<Lease>) -> u32 {
        lease
            .as_ref()
            .map_or(super::SMALL_REPLY_WORDS, |l| super::deliveries_words(&l.messages))
    }

    fn encode_reply(lease: &Option<Lease>, root: response::Builder<'_>) {
        set_poll_reply(root.init_poll(), lease);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<Option<Lease>, ResponseDecodeError> {
        read_poll_reply(arm?)
    }
}

/// Writes a poll's answer (also `removeAndPoll`'s second half).
pub(crate) fn set_poll_reply(mut b: poll_reply::Builder<'_>, lease: &Option<Lease>) {
    if let Some(lease) = lease {
        b.set_lease(lease.id.as_bytes());
        b.set_expires_at_ms(lease.expires_at_ms);
        set_deliveries(b.init_messages(lease.messages.len() as u32), &lease.messages);
    }
}

/// Reads a poll's answer: `None` for an empty `lease` field.
pub(crate) fn read_poll_reply(p: poll_reply::Reader<'_>) -> Result<Option<Lease>, ResponseDecodeError> {
    let lease = p.get_lease()?;
    if lease.is_empty() {
        return Ok(None);
    }
    let id = LeaseId::from_slice(lease).ok_or_else(|| bad("lease id", format!("{} bytes", lease.len())))?;
    Ok(Some(Lease {
        id,
        expires_at_ms: p.get_expires_at_ms(),
        messages: read_deliveries(p.get_messages())?,
    }))
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome, ReplyBudget};

    impl Poll {
        /// The store command of one attempt, with the caller's reply room.
        pub fn command(&self, max_bytes: ReplyBudget) -> Command {
            Command::Poll {
                queue: self.queue.clone(),
                max_items: self.max_items,
                lease_ms: self.lease_ms,
                max_bytes,
            }
        }
    }

    impl Serve for Poll {
        /// `max_items` 0 means 1 and is capped, waits over the limit are
        /// capped. `lease_ms` 0 is the queue policy's lease (the store's to
        /// resolve), and the lease's clamp to the longest duration is the
        /// store's too.
        fn admit(self, limits: &ServerLimits) -> Result<Self, ErrorReply> {
            Ok(Poll {
                max_items: self.max_items.clamp(1, limits.max_items_per_poll.max(1)),
                wait_ms: self.wait_ms.min(limits.max_wait_ms),
                ..self
            })
        }

        fn route(&self) -> Route<'_> {
            Route::Owner(&self.queue)
        }

        fn permission(&self) -> Option<crate::auth::Permission> {
            Some(crate::auth::Permission::Consume)
        }

        fn batch_writes(&self) -> usize {
            0
        }

        fn plan(self, _: &mut Vec<Command>) -> Plan {
            Plan::Poll(self)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<Option<Lease>, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Polled(lease) => Ok(lease),
                other => Err(other),
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn polls_are_normalised() {
            let limits = ServerLimits {
                max_items_per_poll: 10,
                max_wait_ms: 100,
                ..ServerLimits::default()
            };
            let poll = |max_items, lease_ms, wait_ms| Poll {
                queue: QueueName::new("t", "q").unwrap(),
                max_items,
                lease_ms,
                wait_ms,
            };
            assert_eq!(poll(0, 5, 0).admit(&limits).unwrap(), poll(1, 5, 0));
            // Durations are the store's to clamp (storage::shard tests).
            assert_eq!(
                poll(99, u64::MAX, 1000).admit(&limits).unwrap(),
                poll(10, u64::MAX, 100)
            );
            // No lease named: the queue's policy decides, in the store.
            assert_eq!(poll(1, 0, 0).admit(&limits).unwrap(), poll(1, 0, 0));
        }
    }
}
