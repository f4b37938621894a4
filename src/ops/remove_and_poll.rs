//! `removeAndPoll`: a consumer's loop in one round trip. Acknowledges what
//! it finished (exactly as `remove`), then leases more (exactly as `poll`,
//! waiting included), on one queue.
//!
//! The removes and a first, non-waiting poll attempt run in one storage
//! batch (`Plan::RemoveThenPoll`); only when that finds nothing and the
//! request may wait does the connection go on with a plain long poll for
//! the rest of the wait (`server::connection`). So a busy consumer pays one
//! network round trip and one storage trip per batch of messages instead
//! of two of each.

use super::fields::{invalid, malformed, read_lease, read_message_ids, read_queue, set_message_ids, set_queue};
use super::poll::{read_poll_reply, set_poll_reply, Poll};
use super::Operation;
use crate::ids::{LeaseId, MessageId};
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{remove_and_poll_reply, remove_and_poll_request, request, response};
use crate::types::Lease;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveAndPoll {
    pub queue: QueueName,
    /// The lease `ids` were delivered under; `None` only when `ids` is empty.
    pub lease: Option<LeaseId>,
    /// Removed first, each answered with a flag as by `remove`.
    pub ids: Vec<MessageId>,
    /// The poll: as [`Poll`]'s fields.
    pub max_items: u32,
    pub lease_ms: u64,
    pub wait_ms: u64,
}

/// What `removeAndPoll` answers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RemovedAndPolled {
    /// One flag per id, as `remove` answers.
    pub removed: Vec<bool>,
    /// As `poll` answers: `None` when nothing was leased.
    pub lease: Option<Lease>,
}

impl RemoveAndPoll {
    /// The poll half.
    pub fn poll(&self) -> Poll {
        Poll {
            queue: self.queue.clone(),
            max_items: self.max_items,
            lease_ms: self.lease_ms,
            wait_ms: self.wait_ms,
        }
    }
}

impl Operation for RemoveAndPoll {
    const NAME: &'static str = "removeAndPoll";
    type Reply = RemovedAndPolled;
    type RequestArm<'a> = capnp::Result<remove_and_poll_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<remove_and_poll_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(malformed)?;
        let ids = read_message_ids(r.get_ids())?;
        let lease_bytes = r.get_lease().map_err(malformed)?;
        let lease = if lease_bytes.is_empty() {
            if !ids.is_empty() {
                return Err(invalid(
                    "removeAndPoll with ids needs the lease they were delivered under",
                ));
            }
            None
        } else {
            Some(read_lease(Ok(lease_bytes))?)
        };
        Ok(RemoveAndPoll {
            queue: read_queue(r.get_queue())?,
            lease,
            ids,
            max_items: r.get_max_items(),
            lease_ms: r.get_lease_ms(),
            wait_ms: r.get_wait_ms(),
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_remove_and_poll();
        set_queue(b.reborrow().init_queue(), &self.queue);
        if let Some(lease) = &self.lease {
            b.set_lease(lease.as_bytes());
        }
        b.set_max_items(self.max_items);
        b.set_lease_ms(self.lease_ms);
        b.set_wait_ms(self.wait_ms);
        set_message_ids(b.init_ids(self.ids.len() as u32), &self.ids);
    }

    fn reply_words(reply: &RemovedAndPolled) -> u32 {
        let flags = u32::try_from(reply.removed.len().div_ceil(64)).unwrap_or(u32::MAX);
        <Poll as Operation>::reply_words(&reply.lease).saturating_add(flags)
    }

    fn encode_reply(reply: &RemovedAndPolled, root: response::Builder<'_>) {
        let mut b = root.init_remove_and_poll();
        let mut list = b.reborrow().init_removed(reply.removed.len() as u32);
        for (i, &f) in reply.removed.iter().enumerate() {
            list.set(i as u32, f);
        }
        set_poll_reply(b.init_poll(), &reply.lease);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<RemovedAndPolled, ResponseDecodeError> {
        let r = arm?;
        Ok(RemovedAndPolled {
            removed: r.get_removed()?.iter().collect(),
            lease: read_poll_reply(r.get_poll()?)?,
        })
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::Command;

    impl Serve for RemoveAndPoll {
        /// The removes' limits are `remove`'s (none is fine here), the
        /// poll's normalisation `poll`'s.
        fn admit(self, limits: &ServerLimits) -> Result<Self, ErrorReply> {
            crate::ops::remove::check_ids(self.ids.len(), limits)?;
            let poll = self.poll().admit(limits)?;
            Ok(RemoveAndPoll {
                max_items: poll.max_items,
                wait_ms: poll.wait_ms,
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

        /// One remove command per id, as `remove`; the poll attempt is the
        /// core's to add (it needs the caller's reply room).
        fn plan(self, commands: &mut Vec<Command>) -> Plan {
            let poll = self.poll();
            let removes = self.ids.len();
            if let Some(lease) = self.lease {
                crate::ops::remove::push_removes(commands, &self.queue, lease, self.ids);
            }
            Plan::RemoveThenPoll { removes, poll }
        }

        /// Built by the core (`Finish::RemoveThenPoll`), which knows
        /// whether the poll attempt ran; never from outcomes alone.
        fn reply(_: &mut Outcomes<'_>) -> Result<RemovedAndPolled, ErrorReply> {
            Err(crate::ops::missing_outcome(Self::NAME))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::protocol::ErrorCode;

        fn op(ids: usize, max_items: u32, wait_ms: u64) -> RemoveAndPoll {
            RemoveAndPoll {
                queue: QueueName::new("t", "q").unwrap(),
                lease: Some(LeaseId([1; 16])),
                ids: vec![MessageId([2; 16]); ids],
                max_items,
                lease_ms: 1_000,
                wait_ms,
            }
        }

        #[test]
        fn both_halves_are_checked_as_their_own_operations() {
            let limits = ServerLimits {
                max_messages_per_add: 2,
                max_items_per_poll: 10,
                max_wait_ms: 100,
                ..ServerLimits::default()
            };
            assert_eq!(op(3, 1, 0).admit(&limits).unwrap_err().code, ErrorCode::TooManyMessages);
            assert_eq!(op(0, 0, 5_000).admit(&limits).unwrap(), op(0, 1, 100));
            assert_eq!(op(2, 99, 0).admit(&limits).unwrap(), op(2, 10, 0));
        }

        #[test]
        fn the_removes_come_first_and_the_poll_is_left_to_the_core() {
            let mut commands = Vec::new();
            match op(2, 5, 0).plan(&mut commands) {
                Plan::RemoveThenPoll { removes, poll } => {
                    assert_eq!(removes, 2);
                    assert_eq!(poll.max_items, 5);
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(commands.len(), 2);
            assert!(commands.iter().all(|c| matches!(c, Command::Remove { .. })));
        }
    }
}
