//! `peek`: up to `max_items` messages visible now, from the head of the
//! queue or after a cursor, without leasing them: a look at what the next
//! polls would get. Paged: a reply that stops early carries the cursor to
//! pass to the next peek.

use super::fields::{bad, invalid, malformed, read_queue, reply_message_id, set_queue};
use super::Operation;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{peek_reply, peek_request, request, response};
use crate::types::{Delivery, PeekCursor, Peeked};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peek {
    pub queue: QueueName,
    /// 0 means 1; capped by the server's limit (`maxItemsPerPoll`).
    pub max_items: u32,
    /// `None` starts at the head.
    pub cursor: Option<PeekCursor>,
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
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_peek();
        set_queue(b.reborrow().init_queue(), &self.queue);
        b.set_max_items(self.max_items);
        if let Some(c) = self.cursor {
            b.set_cursor(&c.to_bytes());
        }
    }

    fn encode_reply(peeked: &Peeked, root: response::Builder<'_>) {
        let mut b = root.init_peek();
        if let Some(c) = peeked.cursor {
            b.set_cursor(&c.to_bytes());
        }
        let mut list = b.init_messages(peeked.messages.len() as u32);
        for (i, m) in peeked.messages.iter().enumerate() {
            let mut e = list.reborrow().get(i as u32);
            e.set_id(m.id.as_bytes());
            e.set_payload(&m.payload);
            e.set_delivery_count(m.delivery_count);
            e.set_enqueued_at_ms(m.enqueued_at_ms);
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
        let mut messages = Vec::new();
        for m in p.get_messages()?.iter() {
            messages.push(Delivery {
                id: reply_message_id(m.get_id())?,
                payload: m.get_payload()?.to_vec(),
                delivery_count: m.get_delivery_count(),
                enqueued_at_ms: m.get_enqueued_at_ms(),
            });
        }
        Ok(Peeked { messages, cursor })
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
            commands.push(Command::Peek {
                queue: self.queue,
                max_items: self.max_items,
                cursor: self.cursor,
            });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<Peeked, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Peeked(p) => Ok(p),
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
