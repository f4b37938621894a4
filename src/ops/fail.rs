//! `fail`: a worker reports that it could not process a leased message. The
//! delivery ends like a release without a delay (the queue's retry backoff
//! applies) and the error text is kept with the message (up to 1 KiB; peeks
//! at dead letters show the last one). With `dead`, or when the message is
//! out of deliveries, it is dead-lettered instead. Answers whether the
//! lease held the message.

use super::fields::{malformed, read_lease, read_message_id, read_queue, set_queue};
use super::Operation;
use crate::ids::{LeaseId, MessageId};
use crate::names::QueueName;
use crate::protocol::{ErrorCode, ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{fail_reply, fail_request, request, response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    pub queue: QueueName,
    pub lease: LeaseId,
    pub id: MessageId,
    /// What went wrong; the server keeps its first 1 KiB.
    pub error: String,
    /// Dead-letter the message at once (reason `rejected`).
    pub dead: bool,
}

impl Operation for Fail {
    const NAME: &'static str = "fail";
    type Reply = bool;
    type RequestArm<'a> = capnp::Result<fail_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<fail_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(malformed)?;
        let error = r
            .get_error()
            .map_err(malformed)?
            .to_str()
            .map_err(|e| ErrorReply::new(ErrorCode::InvalidArgument, format!("error text is not UTF-8: {e}")))?
            .to_string();
        Ok(Fail {
            queue: read_queue(r.get_queue())?,
            lease: read_lease(r.get_lease())?,
            id: read_message_id(r.get_id())?,
            error,
            dead: r.get_dead(),
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_fail();
        set_queue(b.reborrow().init_queue(), &self.queue);
        b.set_lease(self.lease.as_bytes());
        b.set_id(self.id.as_bytes());
        b.set_error(self.error.as_str());
        b.set_dead(self.dead);
    }

    fn encode_reply(failed: &bool, root: response::Builder<'_>) {
        root.init_fail().set_failed(*failed);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<bool, ResponseDecodeError> {
        Ok(arm?.get_failed())
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for Fail {
        /// The text is clipped by the store (1 KiB); the frame limit bounds it
        /// before that.
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
            commands.push(Command::Fail {
                queue: self.queue,
                id: self.id,
                lease: self.lease,
                error: self.error,
                dead: self.dead,
            });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<bool, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Failed(ok) => Ok(ok),
                other => Err(other),
            })
        }
    }
}
