//! `purge`: drops every message of a queue (visible, delayed and in
//! flight) and keeps the queue; answers how many were dropped.

use super::fields::{read_queue, set_queue};
use super::Operation;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{purge_reply, queue_ref, request, response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purge {
    pub queue: QueueName,
}

impl Operation for Purge {
    const NAME: &'static str = "purge";
    type Reply = u64;
    type RequestArm<'a> = capnp::Result<queue_ref::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<purge_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        Ok(Purge {
            queue: read_queue(arm)?,
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        set_queue(root.init_purge(), &self.queue);
    }

    fn encode_reply(purged: &u64, root: response::Builder<'_>) {
        root.init_purge().set_purged(*purged);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<u64, ResponseDecodeError> {
        Ok(arm?.get_purged())
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for Purge {
        fn admit(self, _: &ServerLimits) -> Result<Self, ErrorReply> {
            Ok(self)
        }

        fn route(&self) -> Route<'_> {
            Route::Owner(&self.queue)
        }

        fn permission(&self) -> Option<crate::auth::Permission> {
            Some(crate::auth::Permission::Admin)
        }

        fn batch_writes(&self) -> usize {
            0
        }

        fn plan(self, commands: &mut Vec<Command>) -> Plan {
            commands.push(Command::Purge { queue: self.queue });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<u64, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Purged(n) => Ok(n),
                other => Err(other),
            })
        }
    }
}
