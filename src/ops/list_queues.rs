//! `listQueues`: every queue of every tenant, sorted. Run by the asking
//! connection's own shard: the queue registry is one column family every
//! shard reads.

use super::fields::{read_reply_queue, set_queue};
use super::Operation;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{queue_ref, request, response};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListQueues;

impl Operation for ListQueues {
    const NAME: &'static str = "listQueues";
    type Reply = Vec<QueueName>;
    type RequestArm<'a> = ();
    type ResponseArm<'a> = capnp::Result<capnp::struct_list::Reader<'a, queue_ref::Owned>>;

    fn decode((): ()) -> Result<Self, ErrorReply> {
        Ok(ListQueues)
    }

    fn encode(&self, mut root: request::Builder<'_>) {
        root.set_list_queues(());
    }

    fn reply_words(names: &Vec<QueueName>) -> u32 {
        // A struct of two texts per name (NUL-terminated, word-padded).
        let words: usize = names
            .iter()
            .map(|n| (n.tenant().len() + 1).div_ceil(8) + (n.queue().len() + 1).div_ceil(8) + 4)
            .sum();
        u32::try_from(words)
            .unwrap_or(u32::MAX)
            .saturating_add(super::SMALL_REPLY_WORDS)
    }

    fn encode_reply(names: &Vec<QueueName>, root: response::Builder<'_>) {
        let mut list = root.init_list_queues(names.len() as u32);
        for (i, n) in names.iter().enumerate() {
            set_queue(list.reborrow().get(i as u32), n);
        }
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<Vec<QueueName>, ResponseDecodeError> {
        arm?.iter().map(read_reply_queue).collect()
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for ListQueues {
        fn admit(self, _: &ServerLimits) -> Result<Self, ErrorReply> {
            Ok(self)
        }

        fn route(&self) -> Route<'_> {
            Route::Local
        }

        fn permission(&self) -> Option<crate::auth::Permission> {
            Some(crate::auth::Permission::Admin)
        }

        fn batch_writes(&self) -> usize {
            0
        }

        fn plan(self, commands: &mut Vec<Command>) -> Plan {
            commands.push(Command::ListQueues);
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<Vec<QueueName>, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Queues(names) => Ok(names),
                other => Err(other),
            })
        }
    }
}
