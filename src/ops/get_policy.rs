//! `getPolicy`: a queue's policy as stored (with its version) and what
//! applies once the server's defaults fill what it leaves unset.

use super::fields::{read_policy_reply, read_queue, set_policy_reply, set_queue};
use super::Operation;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{policy_reply, queue_ref, request, response};
use crate::types::PolicyInfo;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetPolicy {
    pub queue: QueueName,
}

impl Operation for GetPolicy {
    const NAME: &'static str = "getPolicy";
    /// Boxed: a policy is the largest reply by far, and every reply the
    /// server passes between tasks is as large as the largest.
    type Reply = Box<PolicyInfo>;
    type RequestArm<'a> = capnp::Result<queue_ref::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<policy_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        Ok(GetPolicy {
            queue: read_queue(arm)?,
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        set_queue(root.init_get_policy(), &self.queue);
    }

    fn encode_reply(reply: &Box<PolicyInfo>, root: response::Builder<'_>) {
        set_policy_reply(root.init_get_policy(), reply, false);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<Box<PolicyInfo>, ResponseDecodeError> {
        read_policy_reply(arm).map(|(info, _)| Box::new(info))
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for GetPolicy {
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
            commands.push(Command::GetPolicy { queue: self.queue });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<Box<PolicyInfo>, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Policy(p) => Ok(p),
                other => Err(other),
            })
        }
    }
}
