//! Server configuration and the request limits it enforces.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::protocol::Limits;
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
    /// How long a shard's executor yields its CPU to its storage thread
    /// while a storage batch runs, before parking (zero: park at once).
    pub offload_yield: std::time::Duration,
    /// Adds are refused while the data filesystem has less free space.
    pub min_free_disk_bytes: u64,
    /// Where the metrics endpoint listens (`/metrics`, `/healthz`,
    /// `/readyz`); `None` serves none.
    pub metrics_listen: Option<SocketAddr>,
    /// Per-queue series beyond this many fold into `queue="_other"`.
    pub metrics_max_queues: usize,
    /// Requests slower than this are logged at warn (`None`: never).
    pub slow_request: Option<std::time::Duration>,
    /// Tokens a connection must present (`auth`) before anything but
    /// `hello`; `None`: no access control.
    pub access: Option<std::sync::Arc<crate::auth::Access>>,
    /// Serve TLS on the protocol port (`--tls-cert`, `--tls-key`,
    /// `--tls-client-ca`); `None`: plaintext.
    pub tls: Option<crate::tls::ServerTls>,
    /// Serve the metrics endpoint over TLS too, with the same certificate.
    pub metrics_tls: bool,
    /// What applies to a queue where its policy sets nothing
    /// (`--default-lease-ms`, `--default-max-depth`, `--default-max-bytes`);
    /// unset fields take the built-in defaults
    /// ([`crate::storage::engine::complete_defaults`]).
    pub default_policy: crate::types::QueuePolicy,
    /// Most queues the server holds (`--max-queues`); an add or
    /// `createQueue` that would create one more is refused (`queueFull`).
    pub max_queues: u64,
    /// Online backups (`--backup-dir`); `None`: none.
    pub backup: Option<super::backup::BackupConfig>,
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
            offload_yield: DEFAULT_OFFLOAD_YIELD,
            min_free_disk_bytes: crate::storage::disk::DEFAULT_MIN_FREE_BYTES,
            metrics_listen: None,
            metrics_max_queues: DEFAULT_METRICS_MAX_QUEUES,
            slow_request: Some(std::time::Duration::from_millis(DEFAULT_SLOW_REQUEST_MS)),
            access: None,
            tls: None,
            metrics_tls: false,
            default_policy: crate::types::QueuePolicy::default(),
            max_queues: crate::storage::engine::DEFAULT_MAX_QUEUES,
            backup: None,
        }
    }
}

/// Default of `--slow-request-ms`.
pub const DEFAULT_SLOW_REQUEST_MS: u64 = 1000;

/// Default of `--offload-yield-us`. A storage batch of adds, polls and
/// removes takes tens of microseconds: 200 µs covers nearly all of them
/// without letting one that blocks (a write stall) keep the executor
/// spinning for long. Measured against 50 and 1,000 µs in
/// docs/benchmarks.md.
pub const DEFAULT_OFFLOAD_YIELD: std::time::Duration = std::time::Duration::from_micros(200);

/// Default of `--metrics-max-queues`.
pub const DEFAULT_METRICS_MAX_QUEUES: usize = 1000;

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
}
