//! Message and lease identifiers: 16-byte UUIDv7s made by the server.
//!
//! UUIDv7 leads with the millisecond timestamp, so ids sort by creation time and
//! storage keys that end in an id keep insertion order within a millisecond.

use std::fmt;
use uuid::{timestamp::context::ContextV7, Timestamp, Uuid};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// Parses the 16 raw bytes of the wire format.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                bytes.try_into().ok().map(Self)
            }

            /// Parses the hyphenated text form (as the CLI prints it).
            pub fn parse(text: &str) -> Option<Self> {
                Uuid::parse_str(text).ok().map(|u| Self(*u.as_bytes()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&Uuid::from_bytes(self.0).hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }
    };
}

id_type!(
    /// Identifies one message for its whole life.
    MessageId
);
id_type!(
    /// Identifies one poll's lease; never shared between two polls.
    LeaseId
);

/// Makes UUIDv7s that increase strictly, even within one millisecond and even
/// if the clock steps back (the counter then carries the order).
#[derive(Debug, Default)]
pub struct IdGenerator {
    context: ContextV7,
}

impl IdGenerator {
    pub fn new() -> Self {
        Self::default()
    }

    fn next(&self, now_ms: u64) -> [u8; 16] {
        let ts = Timestamp::from_unix(&self.context, now_ms / 1000, ((now_ms % 1000) * 1_000_000) as u32);
        *Uuid::new_v7(ts).as_bytes()
    }

    pub fn message_id(&self, now_ms: u64) -> MessageId {
        MessageId(self.next(now_ms))
    }

    pub fn lease_id(&self, now_ms: u64) -> LeaseId {
        LeaseId(self.next(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_within_a_millisecond() {
        let g = IdGenerator::new();
        let mut prev = g.message_id(1_000);
        for _ in 0..10_000 {
            let next = g.message_id(1_000);
            assert!(next > prev);
            prev = next;
        }
    }

    #[test]
    fn text_form_round_trips() {
        let g = IdGenerator::new();
        let id = g.lease_id(1_700_000_000_000);
        assert_eq!(LeaseId::parse(&id.to_string()), Some(id));
        assert_eq!(LeaseId::from_slice(id.as_bytes()), Some(id));
        assert_eq!(LeaseId::from_slice(&[0u8; 15]), None);
        assert_eq!(MessageId::parse("not-a-uuid"), None);
    }
}
