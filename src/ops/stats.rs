//! `stats`: one queue's counters (visible, delayed, in flight, age of the
//! oldest visible message) and whether adds are refused for lack of disk.

use super::fields::{read_queue, set_queue};
use super::Operation;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{queue_ref, queue_stats, request, response};
use crate::types::QueueStats;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub queue: QueueName,
}

impl Operation for Stats {
    const NAME: &'static str = "stats";
    type Reply = QueueStats;
    type RequestArm<'a> = capnp::Result<queue_ref::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<queue_stats::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        Ok(Stats {
            queue: read_queue(arm)?,
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        set_queue(root.init_stats(), &self.queue);
    }

    fn encode_reply(s: &QueueStats, root: response::Builder<'_>) {
        let mut b = root.init_stats();
        b.set_visible(s.visible);
        b.set_delayed(s.delayed);
        b.set_in_flight(s.in_flight);
        b.set_has_visible(s.oldest_visible_age_ms.is_some());
        b.set_oldest_visible_age_ms(s.oldest_visible_age_ms.unwrap_or(0));
        b.set_disk_full(s.disk_full);
        b.set_dead(s.dead);
        b.set_dropped(s.dropped);
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<QueueStats, ResponseDecodeError> {
        let s = arm?;
        Ok(QueueStats {
            visible: s.get_visible(),
            delayed: s.get_delayed(),
            in_flight: s.get_in_flight(),
            oldest_visible_age_ms: s.get_has_visible().then(|| s.get_oldest_visible_age_ms()),
            disk_full: s.get_disk_full(),
            dead: s.get_dead(),
            dropped: s.get_dropped(),
        })
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for Stats {
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
            commands.push(Command::Stats { queue: self.queue });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<QueueStats, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Stats(s) => Ok(s),
                other => Err(other),
            })
        }
    }
}
