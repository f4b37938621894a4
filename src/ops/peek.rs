//! `peek`: up to `max_items` messages visible now, from the head of the
//! queue or after a cursor, without leasing them: a look at what the next
//! polls would get. Paged: a reply that stops early carries the cursor to
//! pass to the next peek. With `dead`, the queue's dead letters instead,
//! oldest death first, with why and when each died.

use super::fields::{
    bad, invalid, malformed, read_deliveries, read_queue, reply_message_id, set_deliveries, set_queue,
};
use super::Operation;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{peek_reply, peek_request, request, response};
use crate::types::{DeadLetter, DeadReason, PeekCursor, Peeked};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peek {
    pub queue: QueueName,
    /// 0 means 1; capped by the server's limit (`maxItemsPerPoll`).
    pub max_items: u32,
    /// `None` starts at the head.
    pub cursor: Option<PeekCursor>,
    /// The dead letters instead of the visible messages.
    pub dead: bool,
}

impl Operation for Peek {
    const NAME: &'static str = "peek";
    type Reply = Peeked;
    type RequestArm<'a> = capnp::Result<peek_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<peek_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(malformed)?;
        let cursor = r.get_cursor().map_err(malformed)?;
        let cursor = if cursor.is_empty() {
            None
        } else {
            Some(PeekCursor::from_bytes(cursor).ok_or_else(|| {
                invalid(format!(
                    "a peek cursor is {} bytes as a reply gave it, got {}",
                    PeekCursor::WIRE_LEN,
                    cursor.len()
                ))
            })?)
        };
        Ok(Peek {
            queue: read_queue(r.get_queue())?,
            max_items: r.get_max_items(),
            cursor,
            dead: r.get_dead(),
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_peek();
        set_queue(b.reborrow().init_queue(), &self.queue);
        b.set_max_items(self.max_items);
        b.set_dead(self.dead);
        if let Some(c) = self.cursor {
            b.set_cursor(&c.to_bytes());
        }
    }

    fn reply_words(peeked: &Peeked) -> u32 {
        let dead: usize = peeked
            .dead
            .iter()
            .map(|d| (d.payload.len() + d.last_error.as_ref().map_or(0, String::len)).div_ceil(8) + 12)
            .sum();
        super::deliveries_words(&peeked.messages).saturating_add(u32::try_from(dead).unwrap_or(u32::MAX))
    }

    fn encode_reply(peeked: &Peeked, root: response::Builder<'_>) {
        let mut b = root.init_peek();
        if let Some(c) = peeked.cursor {
            b.set_cursor(&c.to_bytes());
        }
        set_deliveries(
            b.reborrow().init_messages(peeked.messages.len() as u32),
            &peeked.messages,
        );
        if !peeked.dead.is_empty() {
            let mut list = b.init_dead(peeked.dead.len() as u32);
            for (i, d) in peeked.dead.iter().enumerate() {
                let mut e = list.reborrow().get(i as u32);
                e.set_id(d.id.as_bytes());
                e.set_payload(&d.payload);
                e.set_delivery_count(d.delivery_count);
                e.set_enqueued_at_ms(d.enqueued_at_ms);
                e.set_died_at_ms(d.died_at_ms);
                e.set_reason(match d.reason {
                    DeadReason::MaxDeliveries => crate::queueber_capnp::DeadReason::MaxDeliveries,
                    DeadReason::Rejected => crate::queueber_capnp::DeadReason::Rejected,
                });
                e.set_has_error(d.last_error.is_some());
                e.set_last_error(d.last_error.as_deref().unwrap_or(""));
            }
        }
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<Peeked, ResponseDecodeError> {
        let p = arm?;
        let cursor = p.get_cursor()?;
        let cursor = if cursor.is_empty() {
            None
        } else {
            Some(PeekCursor::from_bytes(cursor).ok_or_else(|| bad("peek cursor", format!("{} bytes", cursor.len())))?)
        };
        let messages = read_deliveries(p.get_messages())?;
        let mut dead = Vec::new();
        for d in p.get_dead()?.iter() {
            let reason = match d.get_reason() {
                Ok(crate::queueber_capnp::DeadReason::MaxDeliveries) => DeadReason::MaxDeliveries,
                Ok(crate::queueber_capnp::DeadReason::Rejected) => DeadReason::Rejected,
                Err(e) => return Err(bad("dead reason", format!("unknown reason {}", e.0))),
            };
            let last_error = match d.get_has_error() {
                true => Some(
                    d.get_last_error()?
                        .to_string()
                        .map_err(|e| bad("lastError", e.to_string()))?,
                ),
                false => None,
            };
            dead.push(DeadLetter {
                id: reply_message_id(d.get_id())?,
                payload: d.get_payload()?.to_vec(),
                delivery_count: d.get_delivery_count(),
                enqueued_at_ms: d.get_enqueued_at_ms(),
                died_at_ms: d.get_died_at_ms(),
                reason,
                last_error,
            });
        }
        Ok(Peeked { messages, dead, cursor })
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for Peek {
        /// `max_items` 0 means 1 and is capped like a poll's; the reply's
        /// bytes are bounded by the store, as a poll's are.
        fn admit(self, limits: &ServerLimits) -> Result<Self, ErrorReply> {
            Ok(Peek {
                max_items: self.max_items.clamp(1, limits.max_items_per_poll.max(1)),
                ..self
            })
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
            commands.push(match self.dead {
                false => Command::Peek {
                    queue: self.queue,
                    max_items: self.max_items,
                    cursor: self.cursor,
                },
                true => Command::PeekDead {
                    queue: self.queue,
                    max_items: self.max_items,
                    cursor: self.cursor,
                },
            });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<Peeked, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Peeked(p) => Ok(p),
                Outcome::DeadPeeked(d) => Ok(Peeked {
                    messages: Vec::new(),
                    dead: d.letters,
                    cursor: d.cursor,
                }),
                other => Err(other),
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::ids::MessageId;

        #[test]
        fn peeks_are_capped_like_polls_and_cursors_round_trip() {
            let limits = ServerLimits {
                max_items_per_poll: 10,
                ..ServerLimits::default()
            };
            let peek = |max_items| Peek {
                queue: QueueName::new("t", "q").unwrap(),
                max_items,
                cursor: None,
                dead: false,
            };
            assert_eq!(peek(0).admit(&limits).unwrap().max_items, 1);
            assert_eq!(peek(99).admit(&limits).unwrap().max_items, 10);
            let c = PeekCursor {
                visible_at_ms: 1_700_000_000_123,
                id: MessageId([7; 16]),
            };
            assert_eq!(PeekCursor::from_bytes(&c.to_bytes()), Some(c));
            assert_eq!(PeekCursor::from_bytes(&[1, 2, 3]), None);
        }

        #[test]
        fn a_cursor_of_the_wrong_length_is_invalid() {
            let mut message = capnp::message::Builder::new_default();
            let mut root = message.init_root::<request::Builder<'_>>();
            root.set_id(7);
            root.init_peek().set_cursor(&[1, 2, 3]);
            let err = crate::protocol::decode_request(&message.into_reader()).unwrap_err();
            assert_eq!(err.id, Some(7));
            assert_eq!(err.error.code, crate::protocol::ErrorCode::InvalidArgument);
            assert!(err.error.message.contains("24 bytes"), "{}", err.error.message);
        }
    }
}
