//! `remove`: acknowledges messages held by a lease, for good. One flag per
//! id: false when that id is not (or no longer) held by the lease.

use super::fields::{malformed, read_lease, read_message_ids, read_queue, set_message_ids, set_queue};
use super::Operation;
use crate::ids::{LeaseId, MessageId};
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{remove_reply, remove_request, request, response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remove {
    pub queue: QueueName,
    pub lease: LeaseId,
    pub ids: Vec<MessageId>,
}

impl Operation for Remove {
    const NAME: &'static str = "remove";
    type Reply = Vec<bool>;
    type RequestArm<'a> = capnp::Result<remove_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<remove_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(malformed)?;
        let ids = read_message_ids(r.get_ids())?;
        Ok(Remove {
            queue: read_queue(r.get_queue())?,
            lease: read_lease(r.get_lease())?,
            ids,
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_remove();
        set_queue(b.reborrow().init_queue(), &self.queue);
        b.set_lease(self.lease.as_bytes());
        set_message_ids(b.init_ids(self.ids.len() as u32), &self.ids);
    }

    fn encode_reply(flags: &Vec<bool>, root: response::Builder<'_>) {
        let mut list = root.init_remove().init_removed(flags.len() as u32);
        for (i, &f) in flags.iter().enumerate() {
            list.set(i as u32, f);
        }
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<Vec<bool>, ResponseDecodeError> {
        Ok(arm?.get_removed()?.iter().collect())
    }
}

#[cfg(feature = "server")]
pub(crate) use serve::{check_ids, push_removes};

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::fields::invalid;
    use crate::ops::{missing_outcome, wrong_outcome, Outcomes, Plan, Route, Serve};
    use crate::protocol::ErrorCode;
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    /// At most `max-messages-per-add` ids in one request (a remove is as
    /// large a batch as the add that stored them); also `removeAndPoll`'s.
    pub(crate) fn check_ids(n: usize, limits: &ServerLimits) -> Result<(), ErrorReply> {
        if n > limits.max_messages_per_add {
            return Err(ErrorReply::new(
                ErrorCode::TooManyMessages,
                format!(
                    "remove of {n} ids exceeds max-messages-per-add {}",
                    limits.max_messages_per_add
                ),
            ));
        }
        Ok(())
    }

    /// One store command per id, so each gets its own flag; also
    /// `removeAndPoll`'s.
    pub(crate) fn push_removes(commands: &mut Vec<Command>, queue: &QueueName, lease: LeaseId, ids: Vec<MessageId>) {
        commands.extend(Command::removes(queue, lease, ids));
    }

    impl Serve for Remove {
        /// At least one id, at most `max-messages-per-add` (a remove is as
        /// large a batch as the add that stored them).
        fn admit(self, limits: &ServerLimits) -> Result<Self, ErrorReply> {
            if self.ids.is_empty() {
                return Err(invalid("remove needs at least one id"));
            }
            check_ids(self.ids.len(), limits)?;
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
            let n = self.ids.len();
            push_removes(commands, &self.queue, self.lease, self.ids);
            Plan::Commands(n)
        }

        /// All flags, or the error of any id (the remove is then answered
        /// with it: a storage failure fails them all alike).
        fn reply(outcomes: &mut Outcomes<'_>) -> Result<Vec<bool>, ErrorReply> {
            let mut flags = Vec::new();
            let mut error = None;
            for outcome in outcomes {
                match outcome {
                    Ok(Outcome::Removed(ok)) => flags.push(ok),
                    Ok(other) => error = Some(wrong_outcome(Self::NAME, &other)),
                    Err(e) => error = Some(e),
                }
            }
            match error {
                Some(e) => Err(e),
                None if flags.is_empty() => Err(missing_outcome(Self::NAME)),
                None => Ok(flags),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn removes_are_checked() {
            let limits = ServerLimits {
                max_messages_per_add: 2,
                ..ServerLimits::default()
            };
            let remove = |n: usize| Remove {
                queue: QueueName::new("t", "q").unwrap(),
                lease: LeaseId([1; 16]),
                ids: vec![MessageId([2; 16]); n],
            };
            assert_eq!(remove(0).admit(&limits).unwrap_err().code, ErrorCode::InvalidArgument);
            assert_eq!(remove(3).admit(&limits).unwrap_err().code, ErrorCode::TooManyMessages);
            assert_eq!(remove(2).admit(&limits).unwrap(), remove(2));
        }

        #[test]
        fn one_flag_per_id_or_the_error() {
            let mut ok = [Ok(Outcome::Removed(true)), Ok(Outcome::Removed(false))].into_iter();
            assert_eq!(Remove::reply(&mut ok), Ok(vec![true, false]));
            let failed = ErrorReply::new(ErrorCode::DiskFull, "full");
            let mut bad = [Ok(Outcome::Removed(true)), Err(failed.clone())].into_iter();
            assert_eq!(Remove::reply(&mut bad), Err(failed));
        }
    }
}
