//! Server configuration and the request limits it enforces.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::protocol::{ErrorCode, ErrorReply, Limits, Op};
use crate::storage::{Durability, MAX_DURATION_MS};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Executors (shards), each pinned to one allowed CPU.
    pub shards: usize,
    /// Pin executors to CPUs (off in tests that run many servers at once).
    pub pin: bool,
    pub durability: Durability,
    pub limits: ServerLimits,
    /// Memory glommio registers with io_uring per executor. queueber does no
    /// direct file I/O through glommio, so it can stay small.
    pub io_memory: usize,
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
    /// Keep an idle executor spinning this long before it parks, so that
    /// cross-core messages and offload completions are picked up without a
    /// wake-up (lower latency, more CPU when idle).
    pub spin_before_park: Option<std::time::Duration>,
    /// Adds are refused while the data filesystem has less free space.
    pub min_free_disk_bytes: u64,
}

impl ServerConfig {
    /// Defaults for everything but where to listen and store.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            shards: crate::runtime::allowed_cpus().len().max(1),
            pin: true,
            durability: Durability::Fsync,
            limits: ServerLimits::default(),
            io_memory: 512 << 10,
            block_cache_bytes: 128 << 20,
            write_buffer_bytes: 64 << 20,
            spin_before_park: None,
            min_free_disk_bytes: crate::storage::disk::DEFAULT_MIN_FREE_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_frame_bytes: usize,
    pub max_messages_per_add: usize,
    pub max_payload_bytes: usize,
    pub max_items_per_poll: u32,
    pub max_wait_ms: u64,
    pub max_in_flight_per_connection: usize,
    pub max_connections: usize,
    /// Server-wide cap on connection buffers: request frames read and not
    /// answered, answers not yet written, frames being received (see
    /// `server::budget`). Reading stops while it is used up.
    pub max_buffered_bytes: usize,
    /// One connection's share of it: a connection holding more than this in
    /// unanswered requests and unwritten answers is not read from.
    pub max_buffered_bytes_per_connection: usize,
    /// A connection is closed when a frame it started sending, or answers
    /// it is not reading, make no progress for this long.
    pub stall_timeout_ms: u64,
}

/// The default server-wide buffer budget: 1/16 of physical memory, between
/// 64 MiB and 1 GiB (1 GiB on a 16 GiB machine or larger).
pub fn default_max_buffered_bytes() -> usize {
    // SAFETY: sysconf has no preconditions; it returns -1 when unknown.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    let physical = if pages > 0 && page > 0 {
        (pages as u64).saturating_mul(page as u64)
    } else {
        4 << 30
    };
    usize::try_from(physical / 16)
        .unwrap_or(usize::MAX)
        .clamp(64 << 20, 1 << 30)
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 16 << 20,
            max_messages_per_add: 4096,
            max_payload_bytes: crate::storage::DEFAULT_MAX_PAYLOAD_BYTES,
            max_items_per_poll: 4096,
            max_wait_ms: 30_000,
            max_in_flight_per_connection: 4096,
            max_connections: 10_000,
            max_buffered_bytes: default_max_buffered_bytes(),
            max_buffered_bytes_per_connection: 32 << 20,
            stall_timeout_ms: 30_000,
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl ServerLimits {
    /// The limits with nonsensical zeros raised to the smallest working value.
    pub fn normalized(mut self) -> Self {
        self.max_frame_bytes = self.max_frame_bytes.max(4096);
        self.max_messages_per_add = self.max_messages_per_add.max(1);
        self.max_items_per_poll = self.max_items_per_poll.max(1);
        self.max_in_flight_per_connection = self.max_in_flight_per_connection.max(1);
        self.max_connections = self.max_connections.max(1);
        self.max_buffered_bytes = self.max_buffered_bytes.max(1 << 20);
        self.max_buffered_bytes_per_connection = self
            .max_buffered_bytes_per_connection
            .clamp(64 << 10, self.max_buffered_bytes);
        self.stall_timeout_ms = self.stall_timeout_ms.max(100);
        self
    }

    pub fn announce(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes as u64,
            max_messages_per_add: saturate(self.max_messages_per_add),
            max_payload_bytes: self.max_payload_bytes as u64,
            max_items_per_poll: self.max_items_per_poll,
            max_wait_ms: self.max_wait_ms,
            max_in_flight_per_connection: saturate(self.max_in_flight_per_connection),
            max_connections: saturate(self.max_connections),
            max_duration_ms: MAX_DURATION_MS,
        }
    }

    /// Checks an operation against the server's request limits and
    /// normalises what the protocol defines as defaulted or capped (maxItems
    /// 0 means 1 and is capped, waits over the limit are capped).
    ///
    /// Each check has one owner. These are the protocol's; what the store
    /// must hold whoever calls it (payloads within `max-payload-bytes`,
    /// durations clamped to [`MAX_DURATION_MS`] so `now + d` cannot
    /// overflow) the store checks, and only the store.
    pub fn admit(&self, op: Op) -> Result<Op, ErrorReply> {
        let invalid = |m: String| Err(ErrorReply::new(ErrorCode::InvalidArgument, m));
        Ok(match op {
            Op::Add { queue, messages } => {
                if messages.is_empty() {
                    return invalid("add needs at least one message".into());
                }
                if messages.len() > self.max_messages_per_add {
                    return Err(ErrorReply::new(
                        ErrorCode::TooManyMessages,
                        format!(
                            "add of {} messages exceeds max-messages-per-add {}",
                            messages.len(),
                            self.max_messages_per_add
                        ),
                    ));
                }
                Op::Add { queue, messages }
            }
            Op::Poll {
                queue,
                max_items,
                lease_ms,
                wait_ms,
            } => {
                if lease_ms == 0 {
                    return invalid("poll leaseMs must be greater than 0".into());
                }
                Op::Poll {
                    queue,
                    max_items: max_items.clamp(1, self.max_items_per_poll.max(1)),
                    lease_ms,
                    wait_ms: wait_ms.min(self.max_wait_ms),
                }
            }
            Op::Remove { queue, lease, ids } => {
                if ids.is_empty() {
                    return invalid("remove needs at least one id".into());
                }
                if ids.len() > self.max_messages_per_add {
                    return Err(ErrorReply::new(
                        ErrorCode::TooManyMessages,
                        format!(
                            "remove of {} ids exceeds max-messages-per-add {}",
                            ids.len(),
                            self.max_messages_per_add
                        ),
                    ));
                }
                Op::Remove { queue, lease, ids }
            }
            Op::Extend { queue, lease, lease_ms } => {
                if lease_ms == 0 {
                    return invalid("extend leaseMs must be greater than 0".into());
                }
                Op::Extend { queue, lease, lease_ms }
            }
            // No limits of their own: listed, not defaulted, so that a new
            // operation must be considered here.
            op @ (Op::Release { .. }
            | Op::Hello
            | Op::ListQueues
            | Op::Stats { .. }
            | Op::Purge { .. }
            | Op::Delete { .. }) => op,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{LeaseId, MessageId};
    use crate::names::QueueName;
    use crate::storage::NewMessage;

    fn q() -> QueueName {
        QueueName::new("t", "q").unwrap()
    }

    fn code(r: Result<Op, ErrorReply>) -> ErrorCode {
        r.unwrap_err().code
    }

    #[test]
    fn polls_are_normalised() {
        let limits = ServerLimits {
            max_items_per_poll: 10,
            max_wait_ms: 100,
            ..ServerLimits::default()
        };
        let poll = |max_items, lease_ms, wait_ms| Op::Poll {
            queue: q(),
            max_items,
            lease_ms,
            wait_ms,
        };
        assert_eq!(limits.admit(poll(0, 5, 0)).unwrap(), poll(1, 5, 0));
        // Durations are the store's to clamp (storage::shard tests).
        assert_eq!(limits.admit(poll(99, u64::MAX, 1000)).unwrap(), poll(10, u64::MAX, 100));
        assert_eq!(code(limits.admit(poll(1, 0, 0))), ErrorCode::InvalidArgument);
    }

    #[test]
    fn adds_are_checked_against_limits() {
        let limits = ServerLimits {
            max_messages_per_add: 2,
            max_payload_bytes: 4,
            ..ServerLimits::default()
        };
        let add = |messages: Vec<NewMessage>| Op::Add { queue: q(), messages };
        assert_eq!(code(limits.admit(add(vec![]))), ErrorCode::InvalidArgument);
        let three = vec![NewMessage::new(vec![]); 3];
        let err = limits.admit(add(three)).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooManyMessages);
        assert!(err.message.contains("max-messages-per-add 2"));
        // Payload size and delays are the store's to check and clamp
        // (storage::shard tests); the server passes them through.
        let through = add(vec![NewMessage::delayed(vec![0; 5], u64::MAX)]);
        assert_eq!(limits.admit(through.clone()).unwrap(), through);
    }

    #[test]
    fn removes_and_extends_are_checked() {
        let limits = ServerLimits::default();
        let lease = LeaseId([1; 16]);
        assert_eq!(
            code(limits.admit(Op::Remove {
                queue: q(),
                lease,
                ids: vec![]
            })),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(limits.admit(Op::Extend {
                queue: q(),
                lease,
                lease_ms: 0
            })),
            ErrorCode::InvalidArgument
        );
        let ok = Op::Release {
            queue: q(),
            lease,
            id: MessageId([2; 16]),
            delay_ms: 3,
        };
        assert_eq!(limits.admit(ok.clone()).unwrap(), ok);
    }
}
