//! `add`: stores messages in a queue (created on first add), each visible
//! at once or after its own delay; answers their ids in request order.

use super::fields::{malformed, read_queue, reply_message_id, set_queue};
use super::Operation;
use crate::ids::MessageId;
use crate::names::QueueName;
use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{add_reply, add_request, request, response};
use crate::types::NewMessage;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Add {
    pub queue: QueueName,
    pub messages: Vec<NewMessage>,
}

impl Operation for Add {
    const NAME: &'static str = "add";
    type Reply = Vec<MessageId>;
    type RequestArm<'a> = capnp::Result<add_request::Reader<'a>>;
    type ResponseArm<'a> = capnp::Result<add_reply::Reader<'a>>;

    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply> {
        let r = arm.map_err(malformed)?;
        let list = r.get_messages().map_err(malformed)?;
        // Every payload is copied into one buffer the messages share: one
        // allocation per request, freed with its last message.
        let mut read = Vec::with_capacity(list.len() as usize);
        for m in list.iter() {
            read.push((m.get_payload().map_err(malformed)?, m.get_delay_ms()));
        }
        let mut all = bytes::BytesMut::with_capacity(read.iter().map(|(p, _)| p.len()).sum());
        for (payload, _) in &read {
            all.extend_from_slice(payload);
        }
        let mut all = all.freeze();
        let messages = read
            .iter()
            .map(|&(payload, delay_ms)| NewMessage {
                payload: all.split_to(payload.len()),
                delay_ms,
            })
            .collect();
        Ok(Add {
            queue: read_queue(r.get_queue())?,
            messages,
        })
    }

    fn encode(&self, root: request::Builder<'_>) {
        let mut b = root.init_add();
        set_queue(b.reborrow().init_queue(), &self.queue);
        let mut list = b.init_messages(self.messages.len() as u32);
        for (i, m) in self.messages.iter().enumerate() {
            let mut e = list.reborrow().get(i as u32);
            e.set_payload(&m.payload);
            e.set_delay_ms(m.delay_ms);
        }
    }

    fn reply_words(ids: &Vec<MessageId>) -> u32 {
        // A list pointer to 16 bytes per id.
        u32::try_from(ids.len() * 3)
            .unwrap_or(u32::MAX)
            .saturating_add(super::SMALL_REPLY_WORDS)
    }

    fn encode_reply(ids: &Vec<MessageId>, root: response::Builder<'_>) {
        let mut list = root.init_add().init_ids(ids.len() as u32);
        for (i, id) in ids.iter().enumerate() {
            list.set(i as u32, id.as_bytes());
        }
    }

    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<Vec<MessageId>, ResponseDecodeError> {
        arm?.get_ids()?.iter().map(reply_message_id).collect()
    }
}

#[cfg(feature = "server")]
mod serve {
    use super::*;
    use crate::ops::fields::invalid;
    use crate::ops::{one, Outcomes, Plan, Route, Serve};
    use crate::protocol::ErrorCode;
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    impl Serve for Add {
        /// At least one message and at most `max-messages-per-add`; payload
        /// sizes and delays are the store's to check and clamp.
        fn admit(self, limits: &ServerLimits) -> Result<Self, ErrorReply> {
            if self.messages.is_empty() {
                return Err(invalid("add needs at least one message"));
            }
            if self.messages.len() > limits.max_messages_per_add {
                return Err(ErrorReply::new(
                    ErrorCode::TooManyMessages,
                    format!(
                        "add of {} messages exceeds max-messages-per-add {}",
                        self.messages.len(),
                        limits.max_messages_per_add
                    ),
                ));
            }
            Ok(self)
        }

        fn route(&self) -> Route<'_> {
            Route::Owner(&self.queue)
        }

        fn permission(&self) -> Option<crate::auth::Permission> {
            Some(crate::auth::Permission::Send)
        }

        /// Every message is a write the batch budget counts.
        fn batch_writes(&self) -> usize {
            self.messages.len()
        }

        fn plan(self, commands: &mut Vec<Command>) -> Plan {
            commands.push(Command::Add {
                queue: self.queue,
                messages: self.messages,
            });
            Plan::Commands(1)
        }

        fn reply(outcomes: &mut Outcomes<'_>) -> Result<Vec<MessageId>, ErrorReply> {
            one(outcomes, Self::NAME, |o| match o {
                Outcome::Added(ids) => Ok(ids),
                other => Err(other),
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn adds_are_checked_against_limits() {
            let limits = ServerLimits {
                max_messages_per_add: 2,
                max_payload_bytes: 4,
                ..ServerLimits::default()
            };
            let add = |messages: Vec<NewMessage>| Add {
                queue: QueueName::new("t", "q").unwrap(),
                messages,
            };
            assert_eq!(add(vec![]).admit(&limits).unwrap_err().code, ErrorCode::InvalidArgument);
            let err = add(vec![NewMessage::new(vec![]); 3]).admit(&limits).unwrap_err();
            assert_eq!(err.code, ErrorCode::TooManyMessages);
            assert!(err.message.contains("max-messages-per-add 2"));
            // Payload size and delays are the store's to check and clamp
            // (storage::shard tests); the server passes them through.
            let through = add(vec![NewMessage::delayed(vec![0; 5], u64::MAX)]);
            assert_eq!(through.clone().admit(&limits).unwrap(), through);
        }
    }
}
