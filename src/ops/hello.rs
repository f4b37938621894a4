//! `hello`: what the server is and the limits it enforces. Answered by the
//! connection itself (it needs no queue), so clients can discover limits
//! before anything else, and during shutdown.

use super::fields::bad;
use super::Operation;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{hello_reply, request, response};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hello;

/// What the server announces in `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    pub max_frame_bytes: u64,
    pub max_messages_per_add: u32,
    pub max_payload_bytes: u64,
    pub max_items_per_poll: u32,
    pub max_wait_ms: u64,
    pub max_in_flight_per_connection: u32,
    pub max_connections: u32,
    pub max_duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerInfo {
    pub version: String,
    pub shards: u32,
    pub limits: Limits,
    /// Adds are being refused for lack of disk space right now.
    pub disk_full: bool,
    /// The server checks tokens: everything but `hello` and `auth` is
    /// refused until the connection has presented one.
    pub auth_required: bool,
}

impl Operation for Hello {
    const NAME: &'static str = "hello";
    type Reply = ServerInfo;
    type RequestArm<'a> = ();
    type ResponseArm<'a> = capnp::Result<hello_reply::Reader<'a>>;

    fn decode((): ()) -> Result<Self, ErrorReply> {
        Ok(Hello)
    }

    fn encode(&self, mut root: request::Builder<'_>) {
        root.set_hello(());
    }

    fn encode_reply(info: &ServerInfo, root: response::Builder<'_>) {
        let mut b = root.init_hello();
        b.set_version(info.version.as_str());
        b.set_shards(info.shards);
        b.set_disk_full(info.disk_full);
        b.set_auth_required(info.auth_required);
        let l = &info.limits;
        let mut lb = b.init_limits();
        lb.set_max_frame_bytes(l.max_frame_bytes);
        lb.set_max_messages_per_add(l.max_messages_per_add);
        lb.set_max_payload_bytes(l.max_payload_bytes);
        lb.set_max_items_per_poll(l.max_items_per_poll);
        lb.set_max_wait_ms(l.max_wait_ms);
        lb.set_max_in_flight_per_connection(l.max_in_flight_per_connection);
        lb.set_max_connections(l.max_connections);
        lb.set_max_duration_ms(l.max_duration_ms);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<ServerInfo, ResponseDecodeError> {
        let h = arm?;
        let l = h.get_limits()?;
        Ok(ServerInfo {
            version: h
                .get_version()?
                .to_string()
                .map_err(|e| bad("version", e.to_string()))?,
            shards: h.get_shards(),
            disk_full: h.get_disk_full(),
            auth_required: h.get_auth_required(),
            limits: Limits {
                max_frame_bytes: l.get_max_frame_bytes(),
                max_messages_per_add: l.get_max_messages_per_add(),
                max_payload_bytes: l.get_max_payload_bytes(),
                max_items_per_poll: l.get_max_items_per_poll(),
                max_wait_ms: l.get_max_wait_ms(),
                max_in_flight_per_connection: l.get_max_in_flight_per_connection(),
                max_connections: l.get_max_connections(),
                max_duration_ms: l.get_max_duration_ms(),
            },
        })
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{Outcomes, Plan, Route, Serve};
    use crate::protocol::ErrorCode;
    use crate::server::ServerLimits;
    use crate::storage::Command;

    impl Serve for Hello {
        fn admit(self, _: &ServerLimits) -> Result<Self, ErrorReply> {
            Ok(self)
        }

        fn route(&self) -> Route<'_> {
            Route::Connection
        }

        /// Open to every connection: clients learn from it that auth is required.
        fn permission(&self) -> Option<crate::auth::Permission> {
            None
        }

        fn batch_writes(&self) -> usize {
            0
        }

        fn plan(self, _: &mut Vec<Command>) -> Plan {
            Plan::Connection
        }

        fn reply(_: &mut Outcomes<'_>) -> Result<ServerInfo, ErrorReply> {
            Err(ErrorReply::new(
                ErrorCode::Internal,
                "hello is answered by the connection, not a shard",
            ))
        }
    }
}
