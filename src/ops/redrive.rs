//! `redrive`: moves dead letters back to their queue, visible at once with
//! their delivery count reset: the given ids, or else the oldest, up to
//! `max` (0: all). One request moves at most 1,000 (a storage batch stays
//! short, so other requests on the shard keep flowing); `more` says to ask
//! again.

use super::fields::{malformed, read_message_ids, read_queue, set_message_ids, set_queue};
use super::Operation;
use crate::ids::MessageId;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{redrive_reply, redrive_request, request, response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redrive {
    pub queue: QueueName,
    /// Most to move, oldest death first (0: all); ignored with `ids`.
    pub max: u64,
    /// These dead letters only.
    pub ids: Vec<MessageId>,
}

/// What a redrive did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redriven {
    pub moved: u64,
    /// More were asked for than one request moves: send it again.
    pub more: bool,
}

impl Operation for Redrive {
    const NAME: &'static str = "redrive";
    type Reply = Redriven;
    type RequestArm<'a> = capnp::Result<redrive_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<redrive_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(malformed)?;
        let ids = read_message_ids(r.get_ids())?;
        Ok(Redrive {
            queue: read_queue(r.get_queue())?,
            max: r.get_max(),
            ids,
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_redrive();
        set_queue(b.reborrow().init_queue(), &self.queue);
        b.set_max(self.max);
        set_message_ids(b.init_ids(self.ids.len() as u32), &self.ids);
    }

    fn encode_reply(r: &Redriven, root: response::Builder<'_>) {
        let mut b = root.init_redrive();
        b.set_moved(r.moved);
        b.set_more(r.more);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<Redriven, ResponseDecodeError> {
        let r = arm?;
        Ok(Redriven {
            moved: r.get_moved(),
            more: r.get_more(),
        })
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::protocol::ErrorCode;
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome, REDRIVE_BATCH};

    impl Serve for Redrive {
        /// At most one batch's worth of ids (a longer list would be moved
        /// in part and could not say which).
        fn admit(self, _: &ServerLimits) -> Result<Self, ErrorReply> {
            if self.ids.len() as u64 > REDRIVE_BATCH {
                return Err(ErrorReply::new(
                    ErrorCode::TooManyMessages,
                    format!("redrive of {} ids: at most {REDRIVE_BATCH} per request", self.ids.len()),
                ));
            }
            Ok(self)
        }

        fn route(&self) -> Route<'_> {
            Route::Owner(&self.queue)
        }

        fn permission(&self) -> Option<crate::auth::Permission> {
            Some(crate::auth::Permission::Admin)
        }

        /// Its moves are bounded per request (a flood of redrives is a flood
        /// of 1,000-message batches, each counted like an add of that many).
        fn batch_writes(&self) -> usize {
            REDRIVE_BATCH as usize
        }

        fn plan(self, commands: &mut Vec<Command>) -> Plan {
            commands.push(Command::Redrive {
                queue: self.queue,
                max: self.max,
                ids: self.ids,
            });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<Redriven, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Redriven { moved, more } => Ok(Redriven { moved, more }),
                other => Err(other),
            })
        }
    }
}
