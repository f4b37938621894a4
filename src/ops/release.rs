//! `release`: gives one leased message back, visible again after
//! `delay_ms`; answers whether the lease held it.

use super::fields::{malformed, read_lease, read_message_id, read_queue, set_queue};
use super::Operation;
use crate::ids::{LeaseId, MessageId};
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{release_reply, release_request, request, response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub queue: QueueName,
    pub lease: LeaseId,
    pub id: MessageId,
    pub delay_ms: u64,
}

impl Operation for Release {
    const NAME: &'static str = "release";
    type Reply = bool;
    type RequestArm<'a> = capnp::Result<release_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<release_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(malformed)?;
        Ok(Release {
            queue: read_queue(r.get_queue())?,
            lease: read_lease(r.get_lease())?,
            id: read_message_id(r.get_id())?,
            delay_ms: r.get_delay_ms(),
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_release();
        set_queue(b.reborrow().init_queue(), &self.queue);
        b.set_lease(self.lease.as_bytes());
        b.set_id(self.id.as_bytes());
        b.set_delay_ms(self.delay_ms);
    }

    fn encode_reply(released: &bool, root: response::Builder<'_>) {
        root.init_release().set_released(*released);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<bool, ResponseDecodeError> {
        Ok(arm?.get_released())
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for Release {
        /// Nothing of the protocol's to check: any delay is valid, and its
        /// clamp is the store's.
        fn admit(self, _: &ServerLimits) -> Result<Self, ErrorReply> {
            Ok(self)
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

        fn plan(self, commands: &mut Vec<Command>) -> Plan {
            commands.push(Command::Release {
                queue: self.queue,
                id: self.id,
                lease: self.lease,
                delay_ms: self.delay_ms,
            });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<bool, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Released(ok) => Ok(ok),
                other => Err(other),
            })
        }
    }
}
