//! Queue names: validation and the stable shard hash.
//!
//! A queue is named by a (tenant, queue) pair. Both parts are 1 to 128 bytes of
//! `[A-Za-z0-9._-]`, which keeps names safe in keys, logs and file names, and
//! lets us use a length prefix instead of escaping in storage keys.

use std::fmt;
use std::sync::Arc;

/// Longest tenant or queue part, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// The name used when a client sends an empty tenant or queue.
pub const DEFAULT_NAME: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{part} name is empty")]
    Empty { part: &'static str },
    #[error("{part} name is {len} bytes; the limit is {MAX_NAME_LEN}")]
    TooLong { part: &'static str, len: usize },
    #[error("{part} name contains {byte:#04x}; only [A-Za-z0-9._-] are allowed")]
    BadByte { part: &'static str, byte: u8 },
}

/// A validated (tenant, queue) pair.
///
/// Stored as one shared `tenant 0x00 queue` string: a name is cloned into
/// every command of a request (a remove of 32 ids makes 32 commands) and
/// into the server's maps, and a clone is then a reference count, not two
/// allocations. 0x00 sorts below every allowed byte, so the derived order
/// is the order of (tenant, queue) pairs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName {
    joined: Arc<str>,
    /// Length of the tenant part (at most [`MAX_NAME_LEN`]).
    tenant_len: usize,
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueName")
            .field("tenant", &self.tenant())
            .field("queue", &self.queue())
            .finish()
    }
}

fn validate(part: &'static str, s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty { part });
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { part, len: s.len() });
    }
    match s
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        Some(byte) => Err(NameError::BadByte { part, byte }),
        None => Ok(()),
    }
}

/// A name part as the wire protocol reads it: empty means [`DEFAULT_NAME`].
fn wire_part(part: &str) -> &str {
    if part.is_empty() {
        DEFAULT_NAME
    } else {
        part
    }
}

impl QueueName {
    /// Validates both parts exactly as given (no defaulting).
    pub fn new(tenant: impl AsRef<str>, queue: impl AsRef<str>) -> Result<Self, NameError> {
        let (tenant, queue) = (tenant.as_ref(), queue.as_ref());
        validate("tenant", tenant)?;
        validate("queue", queue)?;
        // Joined in a buffer on the stack, so the name costs one allocation
        // (the `Arc`) instead of a `String` copied into it: a name is built
        // for every request decoded.
        let mut buffer = [0u8; 2 * MAX_NAME_LEN + 1];
        let len = tenant.len() + 1 + queue.len();
        buffer[..tenant.len()].copy_from_slice(tenant.as_bytes());
        buffer[tenant.len() + 1..len].copy_from_slice(queue.as_bytes());
        // Both parts are ASCII (validated above), so this cannot fail.
        let joined = std::str::from_utf8(&buffer[..len]).map_err(|_| NameError::BadByte {
            part: "tenant",
            byte: 0,
        })?;
        Ok(Self {
            joined: Arc::from(joined),
            tenant_len: tenant.len(),
        })
    }

    /// As the wire protocol reads names: an empty part means [`DEFAULT_NAME`].
    pub fn from_wire(tenant: &str, queue: &str) -> Result<Self, NameError> {
        Self::new(wire_part(tenant), wire_part(queue))
    }

    /// Whether [`QueueName::from_wire`] would read `tenant` and `queue` as
    /// this name (without validating them again: equal parts are valid).
    pub(crate) fn is_wire(&self, tenant: &str, queue: &str) -> bool {
        wire_part(tenant) == self.tenant() && wire_part(queue) == self.queue()
    }

    pub fn tenant(&self) -> &str {
        &self.joined[..self.tenant_len]
    }

    pub fn queue(&self) -> &str {
        &self.joined[self.tenant_len + 1..]
    }

    /// Stable 64-bit hash (FNV-1a over `tenant 0x00 queue`). It must never
    /// change between releases: it decides which shard owns a queue, and a
    /// restarted server has to agree with the one that wrote the data.
    pub fn stable_hash(&self) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h = OFFSET;
        // Exactly the joined form: tenant, 0x00, queue.
        for b in self.joined.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        h
    }

    /// The shard that owns this queue among `shards` shards.
    pub fn shard(&self, shards: usize) -> usize {
        (self.stable_hash() % shards.max(1) as u64) as usize
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant(), self.queue())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        let n = QueueName::new("Acme-1", "jobs.high_prio").unwrap();
        assert_eq!(n.to_string(), "Acme-1/jobs.high_prio");
        assert!(QueueName::new("a".repeat(128), "b".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_bad_names_with_the_reason() {
        assert_eq!(QueueName::new("", "q"), Err(NameError::Empty { part: "tenant" }));
        assert_eq!(
            QueueName::new("t", "a".repeat(129)),
            Err(NameError::TooLong {
                part: "queue",
                len: 129
            })
        );
        assert_eq!(
            QueueName::new("t", "a/b"),
            Err(NameError::BadByte {
                part: "queue",
                byte: b'/'
            })
        );
        assert!(QueueName::new("t", "é").is_err());
        assert!(QueueName::new("t\0", "q").is_err());
    }

    #[test]
    fn wire_names_default_when_empty() {
        let n = QueueName::from_wire("", "").unwrap();
        assert_eq!((n.tenant(), n.queue()), ("default", "default"));
        assert!(QueueName::from_wire("", "bad name").is_err());
    }

    #[test]
    fn stable_hash_is_pinned() {
        // Changing the hash would move queues between shards on upgrade.
        let n = QueueName::new("t", "q").unwrap();
        assert_eq!(n.stable_hash(), 0x566d_c519_43ee_3518);
        // The separator keeps ("ab","c") and ("a","bc") apart.
        let a = QueueName::new("ab", "c").unwrap();
        let b = QueueName::new("a", "bc").unwrap();
        assert_ne!(a.stable_hash(), b.stable_hash());
    }

    #[test]
    fn names_order_as_tenant_then_queue_pairs() {
        let pairs = [
            ("a", "z"),
            ("ab", "a"),
            ("a", "b"),
            ("A", "zz"),
            ("ab", "-"),
            ("a.b", "c"),
        ];
        let mut names: Vec<QueueName> = pairs.iter().map(|(t, q)| QueueName::new(*t, *q).unwrap()).collect();
        names.sort();
        let mut sorted = pairs.to_vec();
        sorted.sort();
        let got: Vec<(&str, &str)> = names.iter().map(|n| (n.tenant(), n.queue())).collect();
        assert_eq!(got, sorted);
        assert_eq!(format!("{:?}", names[0]), r#"QueueName { tenant: "A", queue: "zz" }"#);
    }

    #[test]
    fn shard_spreads_queues() {
        let mut counts = [0usize; 4];
        for i in 0..400 {
            let n = QueueName::new("t", format!("q{i}")).unwrap();
            counts[n.shard(4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }
}
