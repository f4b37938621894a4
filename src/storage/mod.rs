//! Durable queue state.
//!
//! The storage layer is synchronous and blocking: it is meant to run on a
//! blocking-offload thread, never on an executor. Its contract:
//!
//! * **One writer per queue.** A queue is owned by exactly one [`QueueStore`]
//!   at a time (the server gives each shard its own store and routes every
//!   request for a queue to its owner). The store keeps the hot parts of its
//!   queues' state in memory (lease table, counters, scan position), so no
//!   optimistic transactions, conflicts or retry loops are needed. Different
//!   stores write concurrently into the same RocksDB.
//! * **One atomic batch per call.** [`QueueStore::execute`] applies a list of
//!   commands as one RocksDB `WriteBatch`: either all of them reach disk or none.
//! * **Time comes from a [`Clock`](crate::clock::Clock)**, read once per batch.
//!   Leases and delays are decided by that clock, never by when a sweep runs:
//!   a lease whose expiry has passed is invalid even if nothing has swept it
//!   yet, and its messages become visible *at* the expiry time.
//!
//! Layout: [`keys`] (byte encodings), [`engine`] (RocksDB, column families,
//! durability), [`shard`] (the RocksDB-backed store), [`model`] (a plain
//! in-memory store with the same semantics, the oracle for property tests).

pub mod disk;
pub mod engine;
pub mod keys;
pub mod model;
pub mod shard;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::ids::{LeaseId, MessageId};
use crate::names::{NameError, QueueName};

pub use engine::{Durability, Engine, EngineOptions, SyncDone, SyncWait};
pub use model::ModelStore;
pub use shard::ShardStore;
// The values clients and the server exchange live outside the storage layer
// (so a client builds without RocksDB); storage speaks them too.
pub use crate::types::{
    DeadLetter, DeadPeeked, DeadReason, Delivery, Lease, NewMessage, PeekCursor, Peeked, PolicyInfo, QueuePolicy,
    QueueStats,
};

/// Most dead letters one `Redrive` command moves: a large redrive is done
/// in bounded batches, so other requests on the shard keep flowing.
pub const REDRIVE_BATCH: u64 = 1000;

/// Default per-message payload limit (256 KiB).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Default payload budget of one poll (16 MiB).
pub const DEFAULT_MAX_POLL_BYTES: usize = 16 << 20;

/// What a poll counts per message on top of its payload against the budget:
/// the reply's per-message framing (id, counters, pointers) with room to spare.
pub const POLL_MESSAGE_OVERHEAD: usize = 64;

/// How much one page of a peek may hold: at most `max_items` entries and,
/// past the first (which always fits), `budget` bytes of costs. Both stores
/// page with it, so their pages end at the same entry.
#[derive(Debug)]
pub struct Page {
    max_items: u64,
    budget: usize,
    taken: u64,
    bytes: usize,
}

impl Page {
    pub fn new(max_items: u32, budget: usize) -> Page {
        Page {
            max_items: u64::from(max_items),
            budget,
            taken: 0,
            bytes: 0,
        }
    }

    /// Takes an entry of `cost` bytes; false when the page is full (the
    /// entry starts the next page).
    pub fn take(&mut self, cost: usize) -> bool {
        let full = self.taken >= self.max_items || (self.taken > 0 && self.bytes + cost > self.budget);
        if !full {
            self.taken += 1;
            self.bytes += cost;
        }
        !full
    }
}

/// Longest delay, lease or extension the store accepts: about 10 years. Larger
/// values are clamped to it so that `now + duration` can never overflow.
pub const MAX_DURATION_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// Where the bytes of poll replies are accounted while the store builds
/// them (each message counted as its payload plus [`POLL_MESSAGE_OVERHEAD`]).
///
/// The server gives all polls of one connection in one batch the same room,
/// backed by the connection's buffer account, so replies are charged exactly
/// as they are built and nothing is reserved that is not used.
pub trait ReplyRoom: Send + Sync + std::fmt::Debug {
    /// Asks for `bytes` for the next message of a reply; `first` is the
    /// first message of its poll. Returns whether the message may be added.
    fn take(&self, bytes: usize, first: bool) -> bool;
}

/// A poll's reply room (cheap to clone; clones share the room).
#[derive(Debug, Clone)]
pub struct ReplyBudget(Arc<dyn ReplyRoom>);

impl ReplyBudget {
    /// A fixed number of bytes. A poll with any left returns at least one
    /// message, however large (the rest must fit); a poll that finds it
    /// spent returns nothing, as if nothing were visible.
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(FixedRoom(AtomicUsize::new(bytes))))
    }

    /// No limit beyond the store's own.
    pub fn unlimited() -> Self {
        Self::new(usize::MAX)
    }

    pub fn from_room(room: Arc<dyn ReplyRoom>) -> Self {
        Self(room)
    }

    pub fn take(&self, bytes: usize, first: bool) -> bool {
        self.0.take(bytes, first)
    }
}

impl PartialEq for ReplyBudget {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ReplyBudget {}

#[derive(Debug)]
struct FixedRoom(AtomicUsize);

impl ReplyRoom for FixedRoom {
    fn take(&self, bytes: usize, first: bool) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                if left > 0 && (first || bytes <= left) {
                    Some(left.saturating_sub(bytes))
                } else {
                    None
                }
            })
            .is_ok()
    }
}

/// One operation on one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add {
        queue: QueueName,
        messages: Vec<NewMessage>,
    },
    Poll {
        queue: QueueName,
        max_items: u32,
        /// 0: the queue's policy's lease, or the server's default.
        lease_ms: u64,
        /// Byte budget of this poll's reply (capped by the store's own limit).
        max_bytes: ReplyBudget,
    },
    Remove {
        queue: QueueName,
        id: MessageId,
        lease: LeaseId,
    },
    Extend {
        queue: QueueName,
        lease: LeaseId,
        lease_ms: u64,
    },
    Release {
        queue: QueueName,
        id: MessageId,
        lease: LeaseId,
        delay_ms: u64,
    },
    /// Ends a delivery that failed: like a release without a delay (the
    /// queue's backoff applies), recording `error` on the message; with
    /// `dead`, or when the message is out of deliveries, it is
    /// dead-lettered instead.
    Fail {
        queue: QueueName,
        id: MessageId,
        lease: LeaseId,
        error: String,
        dead: bool,
    },
    Stats {
        queue: QueueName,
    },
    Purge {
        queue: QueueName,
    },
    Delete {
        queue: QueueName,
    },
    /// Every queue in the database (all shards), sorted: a read of the
    /// registry every shard shares.
    ListQueues,
    /// Creates a queue with a policy. A queue that exists already is left
    /// as it is when its policy is the same, and refused otherwise.
    CreateQueue {
        queue: QueueName,
        policy: QueuePolicy,
    },
    GetPolicy {
        queue: QueueName,
    },
    /// Replaces a queue's policy whole (unset fields go back to the
    /// server's defaults); it applies from the next command on.
    SetPolicy {
        queue: QueueName,
        policy: QueuePolicy,
    },
    /// Up to `max_items` visible messages from the head (or after
    /// `cursor`), without leasing them.
    Peek {
        queue: QueueName,
        max_items: u32,
        cursor: Option<PeekCursor>,
    },
    /// Up to `max_items` dead letters, oldest death first (or after
    /// `cursor`).
    PeekDead {
        queue: QueueName,
        max_items: u32,
        cursor: Option<PeekCursor>,
    },
    /// Moves dead letters back to the queue, visible at once with their
    /// delivery count reset: those in `ids`, or else the oldest, at most
    /// `max` (and at most [`REDRIVE_BATCH`] per command).
    Redrive {
        queue: QueueName,
        max: u64,
        ids: Vec<MessageId>,
    },
    /// The gauges and counters of up to `max_queues` of the queues this
    /// store owns, in name order, starting after `after` (from the first
    /// when `None`). A scrape walks them in chunks, so that no batch grows
    /// with the number of queues; fewer than `max_queues` ends the walk.
    Snapshot {
        after: Option<QueueName>,
        max_queues: usize,
    },
}

impl Command {
    /// A remove of every message of `lease`: how a consumer acknowledges a
    /// whole lease in one batch (then only the lease's delete is written).
    pub fn remove_all(queue: &QueueName, lease: &Lease) -> Vec<Command> {
        Command::removes(queue, lease.id, lease.messages.iter().map(|m| m.id)).collect()
    }

    /// One remove per id of `lease`, so each gets its own outcome.
    pub fn removes<'q>(
        queue: &'q QueueName,
        lease: LeaseId,
        ids: impl IntoIterator<Item = MessageId> + 'q,
    ) -> impl Iterator<Item = Command> + 'q {
        ids.into_iter().map(move |id| Command::Remove {
            queue: queue.clone(),
            id,
            lease,
        })
    }

    /// Whether losing this command's effect in a power cut would lose or
    /// resurrect data, so `fsync` durability must sync it before answering.
    /// A lost poll, remove, extend or release only causes a redelivery. The
    /// store's commit syncs a batch when any command that succeeded in it
    /// says so (the one rule; nothing sets sync flags by hand).
    pub fn needs_sync(&self) -> bool {
        match self {
            // A policy is acknowledged configuration: it must not come back
            // older after a power cut.
            Command::Add { .. }
            | Command::Purge { .. }
            | Command::Delete { .. }
            | Command::CreateQueue { .. }
            | Command::SetPolicy { .. }
            // An operator's redrive must not come undone.
            | Command::Redrive { .. } => true,
            Command::Poll { .. }
            | Command::Remove { .. }
            | Command::Extend { .. }
            | Command::Release { .. }
            | Command::Fail { .. }
            | Command::PeekDead { .. }
            | Command::Stats { .. }
            | Command::ListQueues
            | Command::Peek { .. }
            | Command::GetPolicy { .. }
            | Command::Snapshot { .. } => false,
        }
    }
}

/// The result of one [`Command`], in the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Added(Vec<MessageId>),
    Polled(Option<Lease>),
    Removed(bool),
    /// The new expiry, or `None` for an unknown or expired lease.
    Extended(Option<u64>),
    Released(bool),
    /// Whether the lease held the message (and the failure was recorded).
    Failed(bool),
    DeadPeeked(DeadPeeked),
    /// How many dead letters moved, and whether more were asked for than
    /// one command moves.
    Redriven {
        moved: u64,
        more: bool,
    },
    Stats(QueueStats),
    /// How many messages (visible, delayed and in flight) were dropped.
    Purged(u64),
    Deleted,
    Queues(Vec<QueueName>),
    Peeked(Peeked),
    /// `createQueue`: whether it created the queue, and its policy.
    /// (Boxed: a policy is several times the size of any other outcome.)
    Created {
        created: bool,
        policy: Box<PolicyInfo>,
    },
    Policy(Box<PolicyInfo>),
    /// One entry per asked queue that exists, in the asked order.
    Snapshot(Vec<QueueSnapshot>),
}

/// What happened to a queue's messages since the store opened: kept in
/// memory (a restart resets them, as Prometheus counters expect), counted
/// only for batches that committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    pub added: u64,
    /// Messages handed out under a lease (every delivery).
    pub delivered: u64,
    /// Deliveries after the first of a message.
    pub redelivered: u64,
    pub removed: u64,
    pub released: u64,
    /// Messages made visible again because their lease expired.
    pub leases_expired: u64,
    /// Deliveries ended by `fail`.
    pub failed: u64,
    /// Dead-lettered after `max_deliveries`.
    pub dead_max_deliveries: u64,
    /// Dead-lettered by a worker (`fail` with `dead`).
    pub dead_rejected: u64,
    /// Dead letters moved back by `redrive`.
    pub redriven: u64,
    /// Messages dropped because they outlived the queue's retention.
    pub dropped_retention: u64,
}

impl QueueCounters {
    pub fn merge(&mut self, other: &QueueCounters) {
        self.added += other.added;
        self.delivered += other.delivered;
        self.redelivered += other.redelivered;
        self.removed += other.removed;
        self.released += other.released;
        self.leases_expired += other.leases_expired;
        self.failed += other.failed;
        self.dead_max_deliveries += other.dead_max_deliveries;
        self.dead_rejected += other.dead_rejected;
        self.redriven += other.redriven;
        self.dropped_retention += other.dropped_retention;
    }
}

/// One queue's figures, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub queue: QueueName,
    pub stats: QueueStats,
    pub counters: QueueCounters,
}

/// What one call to [`QueueStore::execute`] did.
#[derive(Debug)]
pub struct Executed {
    /// Queues deleted by the batch: the server answers polls parked on them.
    pub deleted: Vec<QueueName>,
    /// One result per command, in order; or the storage failure that
    /// stopped the whole batch (then none of it was applied).
    pub outcomes: Result<Vec<Result<Outcome, CommandError>>, StorageError>,
    /// Queues where messages became visible during the batch (adds, releases,
    /// expired leases, delays coming due), with how many: the server wakes as
    /// many long-polls. A hint: the model store reports none.
    pub woken: Vec<(QueueName, u64)>,
    /// Queues that polls of the batch touched and that have nothing visible
    /// at its end: the server parks the next waiting poll of such a queue
    /// without a storage call, until a batch reports it in `woken`. A hint
    /// like `woken` (the model store reports none), and only sound because
    /// `woken` names every queue where messages become visible.
    pub empty: Vec<QueueName>,
    /// In `fsync` durability, when the batch wrote a command that
    /// [`Command::needs_sync`] marks: the WAL sync that makes it durable.
    /// The answers of those commands wait for it; everything else may be
    /// answered at once.
    pub sync: Option<SyncWait>,
}

impl Default for Executed {
    /// A batch of no commands that changed nothing.
    fn default() -> Self {
        Executed {
            outcomes: Ok(Vec::new()),
            deleted: Vec::new(),
            woken: Vec::new(),
            empty: Vec::new(),
            sync: None,
        }
    }
}

impl Executed {
    /// A batch that failed as a whole.
    pub fn failed(error: StorageError) -> Self {
        Executed {
            outcomes: Err(error),
            ..Executed::default()
        }
    }
}

/// A command's own failure: the command did nothing, the rest of its batch
/// ran. Answered to that command's caller alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("queue {0} does not exist")]
    UnknownQueue(QueueName),
    #[error("payload of {size} bytes exceeds max-payload-bytes {limit}")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("queue {0} belongs to another shard")]
    WrongShard(QueueName),
    #[error("no queue ids left (2^32 - 1 queues were created)")]
    QueueIdsExhausted,
    /// The data filesystem is under its free-space reserve: adds are refused.
    #[error("{0}")]
    DiskFull(disk::DiskFull),
    /// An add would take the queue past its `max_depth` or `max_bytes`:
    /// nothing of it was stored.
    #[error("queue {queue} is full: {detail}")]
    QueueFull { queue: QueueName, detail: String },
    /// Creating the queue would take the database past `--max-queues`.
    #[error("the server holds its maximum of {max} queues (--max-queues): no queue is created")]
    TooManyQueues { max: u64 },
    /// `createQueue` of a queue that exists with another policy.
    #[error("queue {0} exists with another policy (setPolicy changes it)")]
    QueueExists(QueueName),
}

/// A failure of the storage itself: nothing of the batch it happened in was
/// applied, and every command of that batch is answered with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    #[error("RocksDB failed to {context}: {message}")]
    Rocks {
        context: &'static str,
        message: String,
        /// The filesystem ran out of space (ENOSPC).
        no_space: bool,
    },
    #[error("corrupt record in column family {cf}: {detail}")]
    Corrupt { cf: &'static str, detail: String },
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// Either kind, for code that propagates with `?` and for the
/// single-command conveniences of [`QueueStore`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<NameError> for StoreError {
    fn from(e: NameError) -> Self {
        StoreError::Command(CommandError::InvalidName(e))
    }
}

impl StoreError {
    pub(crate) fn rocks(context: &'static str) -> impl FnOnce(rocksdb::Error) -> StoreError {
        move |source| {
            StoreError::Storage(StorageError::Rocks {
                context,
                no_space: disk::is_no_space(&source),
                message: source.into_string(),
            })
        }
    }
}

/// The narrow storage interface the server is written against. Implemented by
/// [`ShardStore`] (RocksDB) and [`ModelStore`] (memory).
pub trait QueueStore: Send {
    /// Applies `commands` in order as one atomic batch. Leases that expired and
    /// delays that came due by the clock's `now` are settled first.
    fn execute(&mut self, commands: Vec<Command>) -> Executed;

    /// The earliest future time at which a lease expires or a delayed message
    /// becomes visible in a queue this store owns.
    fn next_deadline(&self) -> Option<u64>;

    /// Every queue in the database (all shards), sorted.
    fn list_queues(&self) -> Result<Vec<QueueName>, StoreError>;

    // Single-command conveniences, for tests, benches and tools.

    fn add(&mut self, queue: &QueueName, messages: Vec<NewMessage>) -> Result<Vec<MessageId>, StoreError> {
        match self.execute_one(Command::Add {
            queue: queue.clone(),
            messages,
        })? {
            Outcome::Added(ids) => Ok(ids),
            other => unreachable_outcome("add", other),
        }
    }

    fn poll(&mut self, queue: &QueueName, max_items: u32, lease_ms: u64) -> Result<Option<Lease>, StoreError> {
        match self.execute_one(Command::Poll {
            queue: queue.clone(),
            max_items,
            lease_ms,
            max_bytes: ReplyBudget::unlimited(),
        })? {
            Outcome::Polled(lease) => Ok(lease),
            other => unreachable_outcome("poll", other),
        }
    }

    fn remove(&mut self, queue: &QueueName, id: MessageId, lease: LeaseId) -> Result<bool, StoreError> {
        match self.execute_one(Command::Remove {
            queue: queue.clone(),
            id,
            lease,
        })? {
            Outcome::Removed(ok) => Ok(ok),
            other => unreachable_outcome("remove", other),
        }
    }

    fn extend(&mut self, queue: &QueueName, lease: LeaseId, lease_ms: u64) -> Result<Option<u64>, StoreError> {
        match self.execute_one(Command::Extend {
            queue: queue.clone(),
            lease,
            lease_ms,
        })? {
            Outcome::Extended(at) => Ok(at),
            other => unreachable_outcome("extend", other),
        }
    }

    fn release(&mut self, queue: &QueueName, id: MessageId, lease: LeaseId, delay_ms: u64) -> Result<bool, StoreError> {
        match self.execute_one(Command::Release {
            queue: queue.clone(),
            id,
            lease,
            delay_ms,
        })? {
            Outcome::Released(ok) => Ok(ok),
            other => unreachable_outcome("release", other),
        }
    }

    fn stats(&mut self, queue: &QueueName) -> Result<QueueStats, StoreError> {
        match self.execute_one(Command::Stats { queue: queue.clone() })? {
            Outcome::Stats(s) => Ok(s),
            other => unreachable_outcome("stats", other),
        }
    }

    fn purge(&mut self, queue: &QueueName) -> Result<u64, StoreError> {
        match self.execute_one(Command::Purge { queue: queue.clone() })? {
            Outcome::Purged(n) => Ok(n),
            other => unreachable_outcome("purge", other),
        }
    }

    fn delete(&mut self, queue: &QueueName) -> Result<(), StoreError> {
        match self.execute_one(Command::Delete { queue: queue.clone() })? {
            Outcome::Deleted => Ok(()),
            other => unreachable_outcome("delete", other),
        }
    }

    /// Settles every lease and delay that is due; returns what became visible.
    fn expire_due(&mut self) -> Vec<(QueueName, u64)> {
        self.execute(Vec::new()).woken
    }

    #[doc(hidden)]
    fn execute_one(&mut self, command: Command) -> Result<Outcome, StoreError> {
        let mut outcomes = self.execute(vec![command]).outcomes?;
        match outcomes.pop() {
            Some(outcome) => Ok(outcome?),
            None => Err(StorageError::Unavailable("store returned no outcome".into()).into()),
        }
    }
}

fn unreachable_outcome<T>(op: &str, outcome: Outcome) -> Result<T, StoreError> {
    Err(StorageError::Unavailable(format!("store answered {op} with {outcome:?}")).into())
}

/// `now + ms`, with `ms` clamped to [`MAX_DURATION_MS`].
pub fn deadline(now_ms: u64, ms: u64) -> u64 {
    now_ms.saturating_add(ms.min(MAX_DURATION_MS))
}
