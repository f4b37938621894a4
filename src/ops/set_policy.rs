//! `setPolicy`: replaces a queue's policy whole (fields left unset go back
//! to the server's defaults) and moves its version on. It applies from the
//! next request: messages already in the queue stay (a lower `maxDepth`
//! refuses adds until the queue drains under it).

use super::fields::{read_policy, read_policy_reply, read_queue, set_policy, set_policy_reply, set_queue};
use super::Operation;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{policy_reply, request, response, set_policy_request};
use crate::types::{PolicyInfo, QueuePolicy};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetPolicy {
    pub queue: QueueName,
    /// Boxed: a policy is larger than any other request's fields, and every
    /// request travels as an `Op` between shards.
    pub policy: Box<QueuePolicy>,
}

impl Operation for SetPolicy {
    const NAME: &'static str = "setPolicy";
    /// Boxed, as `getPolicy`'s.
    type Reply = Box<PolicyInfo>;
    type RequestArm<'a> = capnp::Result<set_policy_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<policy_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(super::fields::malformed)?;
        Ok(SetPolicy {
            queue: read_queue(r.get_queue())?,
            policy: Box::new(read_policy(r.get_policy())?),
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_set_policy();
        set_queue(b.reborrow().init_queue(), &self.queue);
        set_policy(b.init_policy(), &self.policy);
    }

    fn encode_reply(reply: &Box<PolicyInfo>, root: response::Builder<'_>) {
        set_policy_reply(root.init_set_policy(), reply, false);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<Box<PolicyInfo>, ResponseDecodeError> {
        read_policy_reply(arm).map(|(info, _)| Box::new(info))
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::fields::check_policy;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for SetPolicy {
        fn admit(self, limits: &ServerLimits) -> Result<Self, ErrorReply> {
            check_policy(&self.policy, limits)?;
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
            commands.push(Command::SetPolicy {
                queue: self.queue,
                policy: *self.policy,
            });
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
