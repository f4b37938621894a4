//! `extend`: moves a live lease's expiry to `now + lease_ms`; answers the
//! new expiry, or that the lease had expired or is unknown.

use super::fields::{malformed, read_lease, read_queue, set_queue};
use super::Operation;
use crate::ids::LeaseId;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{extend_reply, extend_request, request, response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extend {
    pub queue: QueueName,
    pub lease: LeaseId,
    /// Must be greater than 0.
    pub lease_ms: u64,
}

impl Operation for Extend {
    const NAME: &'static str = "extend";
    /// The new expiry (epoch ms), or `None` for an expired or unknown lease.
    type Reply = Option<u64>;
    type RequestArm<'a> = capnp::Result<extend_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<extend_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(malformed)?;
        Ok(Extend {
            queue: read_queue(r.get_queue())?,
            lease: read_lease(r.get_lease())?,
            lease_ms: r.get_lease_ms(),
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_extend();
        set_queue(b.reborrow().init_queue(), &self.queue);
        b.set_lease(self.lease.as_bytes());
        b.set_lease_ms(self.lease_ms);
    }

    fn encode_reply(at: &Option<u64>, root: response::Builder<'_>) {
        let mut b = root.init_extend();
        b.set_extended(at.is_some());
        b.set_expires_at_ms(at.unwrap_or(0));
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<Option<u64>, ResponseDecodeError> {
        let e = arm?;
        Ok(e.get_extended().then(|| e.get_expires_at_ms()))
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::fields::invalid;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for Extend {
        /// `lease_ms` must be positive; its clamp is the store's.
        fn admit(self, _: &ServerLimits) -> Result<Self, ErrorReply> {
            if self.lease_ms == 0 {
                return Err(invalid("extend leaseMs must be greater than 0"));
            }
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
            commands.push(Command::Extend {
                queue: self.queue,
                lease: self.lease,
                lease_ms: self.lease_ms,
            });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<Option<u64>, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Extended(at) => Ok(at),
                other => Err(other),
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::protocol::ErrorCode;

        #[test]
        fn a_zero_extension_is_refused() {
            let extend = Extend {
                queue: QueueName::new("t", "q").unwrap(),
                lease: LeaseId([1; 16]),
                lease_ms: 0,
            };
            let err = extend.admit(&ServerLimits::default()).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument);
        }
    }
}
