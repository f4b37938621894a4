//! `auth`: presents a token (`<id>.<secret>`, as `queueber token new`
//! printed it) and binds the connection to its grant: its one tenant, its
//! permissions, its queue patterns. Answered by the connection itself,
//! like `hello`: it concerns the connection, not a queue.

use super::fields::{bad, malformed};
use super::Operation;
use crate::protocol::{ErrorCode, ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{auth_reply, auth_request, request, response};

#[derive(Clone, PartialEq, Eq)]
pub struct Auth {
    pub token: String,
}

/// Never prints the secret.
impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.token.rsplit_once('.').map_or("?", |(id, _)| id);
        write!(f, "Auth {{ token: {id}.*** }}")
    }
}

impl Operation for Auth {
    const NAME: &'static str = "auth";
    /// The tenant the connection is now bound to.
    type Reply = String;
    type RequestArm<'a> = capnp::Result<auth_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<auth_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(malformed)?;
        let token = r
            .get_token()
            .map_err(malformed)?
            .to_str()
            .map_err(|_| ErrorReply::new(ErrorCode::Unauthenticated, "the token is not UTF-8"))?;
        Ok(Auth {
            token: token.to_string(),
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        root.init_auth().set_token(self.token.as_str());
    }

    fn encode_reply(tenant: &String, root: response::Builder<'_>) {
        root.init_auth().set_tenant(tenant.as_str());
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<String, ResponseDecodeError> {
        arm?.get_tenant()?.to_string().map_err(|e| bad("tenant", e.to_string()))
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::auth::Permission;
    use crate::ops::{Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::Command;

    impl Serve for Auth {
        fn admit(self, _: &ServerLimits) -> Result<Self, ErrorReply> {
            Ok(self)
        }

        fn route(&self) -> Route<'_> {
            Route::Connection
        }

        /// Open to every connection: it is how a connection gets a grant.
        fn permission(&self) -> Option<Permission> {
            None
        }

        fn batch_writes(&self) -> usize {
            0
        }

        fn plan(self, _: &mut Vec<Command>) -> Plan {
            Plan::Connection
        }

        fn reply(_: &mut Outcomes<'_>) -> Result<String, ErrorReply> {
            Err(ErrorReply::new(
                ErrorCode::Internal,
                "auth is answered by the connection, not a shard",
            ))
        }
    }
}
