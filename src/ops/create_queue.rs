//! `createQueue`: creates a queue with a policy. Idempotent: a queue that
//! exists with the same policy is answered as it is (`created` false); one
//! with another policy is refused (`setPolicy` changes policies). An add to
//! a missing queue still creates it, with the server's defaults.

use super::fields::{read_policy, read_policy_reply, read_queue, set_policy, set_policy_reply, set_queue};
use super::Operation;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{create_queue_request, policy_reply, request, response};
use crate::types::{PolicyInfo, QueuePolicy};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateQueue {
    pub queue: QueueName,
    /// Boxed: a policy is larger than any other request's fields, and every
    /// request travels as an `Op` between shards.
    pub policy: Box<QueuePolicy>,
}

/// What `createQueue` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCreated {
    /// The queue is new (false: it existed with this policy).
    pub created: bool,
    /// Boxed: a policy is the largest reply by far, and every reply the
    /// server passes between tasks is as large as the largest.
    pub policy: Box<PolicyInfo>,
}

impl Operation for CreateQueue {
    const NAME: &'static str = "createQueue";
    type Reply = QueueCreated;
    type RequestArm<'a> = capnp::Result<create_queue_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<policy_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(super::fields::malformed)?;
        Ok(CreateQueue {
            queue: read_queue(r.get_queue())?,
            policy: Box::new(read_policy(r.get_policy())?),
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_create_queue();
        set_queue(b.reborrow().init_queue(), &self.queue);
        set_policy(b.init_policy(), &self.policy);
    }

    fn encode_reply(reply: &QueueCreated, root: response::Builder<'_>) {
        set_policy_reply(root.init_create_queue(), &reply.policy, reply.created);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<QueueCreated, ResponseDecodeError> {
        let (policy, created) = read_policy_reply(arm)?;
        Ok(QueueCreated {
            created,
            policy: Box::new(policy),
        })
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::fields::check_policy;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for CreateQueue {
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
            commands.push(Command::CreateQueue {
                queue: self.queue,
                policy: *self.policy,
            });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<QueueCreated, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Created { created, policy } => Ok(QueueCreated { created, policy }),
                other => Err(other),
            })
        }
    }
}
