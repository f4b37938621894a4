//! `delete`: removes a queue and all its messages. Polls parked on it are
//! answered empty (the core learns of the deletion from the batch), so none
//! outlives it into a queue re-created by name.

use super::fields::{read_queue, set_queue};
use super::Operation;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{queue_ref, request, response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub queue: QueueName,
}

impl Operation for Delete {
    const NAME: &'static str = "delete";
    type Reply = ();
    type RequestArm<'a> = capnp::Result<queue_ref::Reader<'a>>;
    type ResponseArm<'a> = ();

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        Ok(Delete {
            queue: read_queue(arm)?,
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        set_queue(root.init_delete(), &self.queue);
    }

    fn encode_reply((): &(), mut root: response::Builder<'_>) {
        root.set_delete(());
    }

    fn decode_reply((): ()) -> Result<(), ResponseDecodeError> {
        Ok(())
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for Delete {
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
            commands.push(Command::Delete { queue: self.queue });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<(), ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Deleted => Ok(()),
                other => Err(other),
            })
        }
    }
}
