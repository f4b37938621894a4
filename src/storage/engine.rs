//! The shared RocksDB: column families, their tuning, and durability.
//!
//! One [`Engine`] per process, shared by every shard's [`ShardStore`]
//! (`Arc<Engine>`). It owns what is global: the database handle, the queue-id
//! allocator and the background WAL syncer of `periodic` durability.
//!
//! [`ShardStore`]: super::ShardStore

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::metrics::AtomicHistogram;
use std::thread::JoinHandle;
use std::time::Duration;

use rocksdb::{
    AsColumnFamilyRef, BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode,
    Options, ReadOptions, SliceTransform, WriteBatch, DB,
};

use super::disk::{is_no_space, DiskState, DiskWatcher};
use super::keys::{self, QueueId};
use super::{CommandError, StorageError, StoreError};
use crate::clock::Clock;
use crate::names::QueueName;

/// RocksDB's table-cache cap on open files: with `-1` (its default) the
/// engine may hold one descriptor per SST file, which competes with
/// connections for RLIMIT_NOFILE (see `server::accept`).
pub const MAX_OPEN_FILES: i32 = 1024;

pub const CF_READY: &str = "ready";
pub const CF_LEASES: &str = "leases";
pub const CF_REGISTRY: &str = "registry";
/// Dead letters: messages that ran out of deliveries or were rejected.
pub const CF_DEAD: &str = "dead";
/// Where each visible, delayed or dead message of a queue with a retention
/// lives, by the time of its first add: what retention drops, found in the
/// order it comes due.
pub const CF_RETENTION: &str = "retention";

/// Every column family, in the order they are opened.
pub const COLUMN_FAMILIES: [&str; 5] = [CF_READY, CF_LEASES, CF_REGISTRY, CF_DEAD, CF_RETENTION];

/// A column family's handle, resolved once when the database opens.
///
/// `DB::cf_handle` searches a map of names on every call, and the storage
/// path asked for a family several times per message (about 270
/// instructions each, 1.5% of the server's instructions per message at
/// B=1, callgrind). The handle itself is a pointer RocksDB keeps stable for
/// as long as the family is open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Family(*mut librocksdb_sys::rocksdb_column_family_handle_t);

// SAFETY: a column family handle is thread-safe in RocksDB; rust-rocksdb
// declares its own `ColumnFamily`, a wrapper of the same pointer, Send and
// Sync on that ground. This one only ever travels inside its `Engine`.
unsafe impl Send for Family {}
// SAFETY: as for Send above.
unsafe impl Sync for Family {}

impl AsColumnFamilyRef for Family {
    fn inner(&self) -> *mut librocksdb_sys::rocksdb_column_family_handle_t {
        self.0
    }
}

/// When an acknowledged write reaches stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A write that must not be lost (`Command::needs_sync`: adds, purges,
    /// deletes, policy changes, redrives) is acknowledged only after its WAL
    /// record is fsynced. The sync runs on the engine's WAL syncer thread, not in the
    /// write: the shard's storage thread goes on with the next batch while
    /// the disk works, and one sync covers every batch written before it
    /// starts (all shards' alike), so throughput grows with load.
    Fsync,
    /// The WAL is written at once and fsynced by a background thread every
    /// interval: a power cut loses at most about one interval of writes.
    Periodic(Duration),
    /// The WAL is written but never fsynced by us: survives a killed process,
    /// not a power cut or kernel crash.
    Wal,
}

impl Durability {
    pub const DEFAULT_PERIOD: Duration = Duration::from_millis(50);
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub durability: Durability,
    pub max_payload_bytes: usize,
    /// A poll stops adding messages once their payloads would exceed this
    /// (it always returns at least one), so a reply stays a sane size.
    pub max_poll_bytes: usize,
    /// Shared block cache for all column families.
    pub block_cache_bytes: usize,
    /// Memtable size per column family.
    pub write_buffer_bytes: usize,
    /// Adds are refused while the data filesystem has less free space than
    /// this (see [`super::disk`]).
    pub min_free_disk_bytes: u64,
    /// What applies to a queue where its policy sets nothing (the
    /// `queueberd --default-*` flags). Its `max_payload_bytes` is at most
    /// `max_payload_bytes`.
    pub default_policy: crate::types::QueuePolicy,
    /// Most queues the database holds (`--max-queues`); a queue past it is
    /// not created. [`crate::types::UNLIMITED`]: no limit.
    pub max_queues: u64,
}

/// The default of `--max-queues`. An empty queue costs about 1.2 KiB of
/// memory (its state at its shard, its registry entry), so a client that
/// makes up queue names could otherwise grow the server without bound:
/// 100,000 queues is about 120 MiB.
pub const DEFAULT_MAX_QUEUES: u64 = 100_000;

/// The default of the server-wide default lease (`--default-lease-ms`).
pub const DEFAULT_LEASE_MS: u64 = 30_000;

impl EngineOptions {
    /// Every field of the default policy set (see [`complete_defaults`]).
    pub fn defaults(&self) -> crate::types::QueuePolicy {
        complete_defaults(self.default_policy, self.max_payload_bytes)
    }
}

/// `defaults` with every field set, the built-in value where it has none
/// (a 30 s lease, no depth or byte bound, the server's payload limit), and
/// `max_payload_bytes` within `max_payload_bytes`.
pub fn complete_defaults(defaults: crate::types::QueuePolicy, max_payload_bytes: usize) -> crate::types::QueuePolicy {
    let limit = max_payload_bytes as u64;
    let mut p = defaults.or(crate::types::QueuePolicy {
        lease_ms: Some(DEFAULT_LEASE_MS),
        max_depth: Some(crate::types::UNLIMITED),
        max_bytes: Some(crate::types::UNLIMITED),
        max_payload_bytes: Some(limit),
        // No backoff unless asked: a failed delivery is visible at once.
        retry_backoff_ms: None,
        max_deliveries: Some(crate::types::UNLIMITED),
        retention_ms: Some(crate::types::UNLIMITED),
    });
    p.max_payload_bytes = p.max_payload_bytes.map(|m| m.min(limit));
    p
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Fsync,
            max_payload_bytes: super::DEFAULT_MAX_PAYLOAD_BYTES,
            max_poll_bytes: super::DEFAULT_MAX_POLL_BYTES,
            block_cache_bytes: 128 << 20,
            write_buffer_bytes: 64 << 20,
            // Off for tools and tests; the server sets its own default.
            min_free_disk_bytes: 0,
            default_policy: crate::types::QueuePolicy::default(),
            max_queues: crate::types::UNLIMITED,
        }
    }
}

pub struct Engine {
    db: Arc<DB>,
    /// The handle of each of [`COLUMN_FAMILIES`], in that order. Valid while
    /// `db` lives, which is as long as `self`: a family is dropped only
    /// through `&mut DB`, which nothing here can get from the `Arc`.
    families: [(&'static str, Family); COLUMN_FAMILIES.len()],
    options: EngineOptions,
    clock: Arc<dyn Clock>,
    next_qid: AtomicU32,
    /// The queues that exist, as the stores open on this engine count them
    /// (each adds what it creates, loads and deletes), checked against
    /// `options.max_queues` when a queue is created.
    live_queues: AtomicU64,
    syncer: Option<Syncer>,
    /// In `fsync` durability: syncs the WAL for the batches that need it.
    wal_syncer: Option<WalSyncer>,
    disk: Arc<DiskState>,
    watcher: Option<DiskWatcher>,
    path: PathBuf,
    /// Time of each WAL fsync, whoever runs it (metrics).
    wal_syncs: Arc<AtomicHistogram>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Deletions dominate the `ready` and `leases` families (every message is
/// consumed), so files are marked for compaction when a window of entries is
/// mostly tombstones: reads then stop paying for history.
fn add_tombstone_compaction(opts: &mut Options) {
    opts.add_compact_on_deletion_collector_factory(128, 64, 0.5);
}

fn cf_options(name: &str, cache: &Cache, write_buffer: usize) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table.set_format_version(6);
    let mut opts = Options::default();
    opts.set_write_buffer_size(write_buffer);
    opts.set_level_compaction_dynamic_level_bytes(true);
    // Every family but the registry is keyed queue id first: prefix blooms
    // in the SST files and insert hints per queue (below). No memtable
    // prefix bloom: every insert hashed its prefix into it (2%
    // of the server's instructions per message, callgrind B=32) to spare a
    // seek into the memtable for a queue it does not hold, and the queues
    // that are sought are the busy ones, which it holds.
    let queue_prefixed = matches!(name, CF_READY | CF_LEASES | CF_DEAD | CF_RETENTION);
    if queue_prefixed {
        opts.set_prefix_extractor(SliceTransform::create_fixed_prefix(keys::QID_LEN));
    }
    match name {
        CF_READY => {
            // Scanned in order from a known position within one queue: prefix
            // blooms keep seeks off files without that queue; payloads make
            // the values large, so larger blocks with light compression.
            table.set_block_size(16 << 10);
            table.set_bloom_filter(10.0, false);
            table.set_whole_key_filtering(false);
            opts.set_compression_type(DBCompressionType::Lz4);
            opts.set_bottommost_compression_type(DBCompressionType::Zstd);
            add_tombstone_compaction(&mut opts);
        }
        CF_LEASES => {
            // Short-lived: most entries die in the memtable. Small blocks, no
            // compression on the hot levels, point and prefix blooms.
            table.set_block_size(4 << 10);
            table.set_bloom_filter(10.0, false);
            opts.set_compression_type(DBCompressionType::None);
            opts.set_bottommost_compression_type(DBCompressionType::Lz4);
            add_tombstone_compaction(&mut opts);
        }
        CF_DEAD => {
            // Rarely written, read by peeks and redrives in order within a
            // queue: prefix blooms, compressed like the ready index.
            table.set_block_size(16 << 10);
            table.set_bloom_filter(10.0, false);
            table.set_whole_key_filtering(false);
            opts.set_compression_type(DBCompressionType::Lz4);
            opts.set_bottommost_compression_type(DBCompressionType::Zstd);
        }
        CF_RETENTION => {
            // Small entries, written with the ready records of queues that
            // have a retention, scanned from a queue's oldest: prefix blooms.
            table.set_block_size(4 << 10);
            table.set_bloom_filter(10.0, false);
            table.set_whole_key_filtering(false);
            opts.set_compression_type(DBCompressionType::None);
            opts.set_bottommost_compression_type(DBCompressionType::Lz4);
            add_tombstone_compaction(&mut opts);
        }
        _ => {
            // Registry: tiny, read at open and on queue creation.
            table.set_block_size(4 << 10);
            table.set_bloom_filter(10.0, false);
            opts.set_compression_type(DBCompressionType::None);
            opts.set_write_buffer_size(write_buffer.min(4 << 20));
        }
    }
    opts.set_block_based_table_factory(&table);
    if queue_prefixed {
        with_insert_hints(opts)
    } else {
        opts
    }
}

/// The option that keys the memtable's insert hints by queue id, as
/// RocksDB's options string (and its OPTIONS file) spells it.
fn insert_hint_setting() -> String {
    format!(
        "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.{}",
        keys::QID_LEN
    )
}

/// Gives the memtable one insert hint per queue (its key prefix).
///
/// Why: without a hint, RocksDB's skip list reuses the splice of the previous
/// insert only when the new key lands exactly in it (sequential appends), and
/// otherwise searches again from the top. A consumed message's tombstone goes
/// right after its own record, which the previous tombstone's splice never
/// brackets, so every delete paid a full search: 4.8k instructions against
/// 1.2k for an append (callgrind, peerbench B=32). With a hint the splice is
/// repaired from the lowest level that brackets the key, which for the next
/// record of the same queue is a step or two.
///
/// The option is not in RocksDB's C API, so it is set through the options
/// string parser, which copies every other option of `opts` unchanged.
fn with_insert_hints(mut opts: Options) -> Options {
    match opts.get_options_from_string(insert_hint_setting()) {
        Ok(hinted) => hinted,
        Err(error) => {
            // Only slower, never wrong: keep the options as they were.
            tracing::warn!(%error, "RocksDB refused memtable insert hints; inserts use no hint");
            opts
        }
    }
}

impl Engine {
    /// Opens (or creates) the database at `path`.
    pub fn open(
        path: impl AsRef<Path>,
        options: EngineOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Engine>, StoreError> {
        let path = path.as_ref().to_path_buf();
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as i32;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(cpus);
        db_opts.set_max_background_jobs((2 * cpus).max(2));
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_wal_bytes_per_sync(1 << 20);
        db_opts.set_max_total_wal_size(512 << 20);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_log_file_size(32 << 20);
        db_opts.set_max_open_files(MAX_OPEN_FILES);
        // Recover every acknowledged write; stop at a torn tail record.
        db_opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let cfs = COLUMN_FAMILIES
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options(name, &cache, options.write_buffer_bytes)));
        let db =
            Arc::new(DB::open_cf_descriptors(&db_opts, &path, cfs).map_err(StoreError::rocks("open the database"))?);

        let mut families = [("", Family(std::ptr::null_mut())); COLUMN_FAMILIES.len()];
        for (slot, name) in families.iter_mut().zip(COLUMN_FAMILIES) {
            let handle = db.cf_handle(name).ok_or_else(|| missing_family(name))?;
            *slot = (name, Family(handle.inner()));
        }

        let mut max_qid = 0;
        for queue in list_registry(&db)? {
            max_qid = max_qid.max(queue.1);
        }
        let wal_syncs = Arc::new(AtomicHistogram::new(crate::metrics::LATENCY_BUCKETS));
        let syncer = match options.durability {
            Durability::Periodic(every) => Some(Syncer::start(db.clone(), every, wal_syncs.clone()).map_err(|e| {
                StoreError::Storage(StorageError::Unavailable(format!("spawning the WAL sync thread: {e}")))
            })?),
            _ => None,
        };
        let wal_syncer = match options.durability {
            Durability::Fsync => Some(WalSyncer::start(db.clone(), wal_syncs.clone()).map_err(|e| {
                StoreError::Storage(StorageError::Unavailable(format!("spawning the WAL fsync thread: {e}")))
            })?),
            _ => None,
        };
        let disk = DiskState::new(&path, options.min_free_disk_bytes);
        let probe_db = db.clone();
        let watcher = DiskWatcher::start(disk.clone(), move || probe_write(&probe_db)).map_err(|e| {
            StoreError::Storage(StorageError::Unavailable(format!(
                "spawning the disk watcher thread: {e}"
            )))
        })?;
        Ok(Arc::new(Engine {
            db,
            families,
            options,
            clock,
            next_qid: AtomicU32::new(max_qid + 1),
            live_queues: AtomicU64::new(0),
            syncer,
            wal_syncer,
            disk,
            watcher: Some(watcher),
            path,
            wal_syncs,
        }))
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The data filesystem's space state (adds are refused while full).
    pub fn disk(&self) -> &Arc<DiskState> {
        &self.disk
    }

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    /// The handle of the column family `name` (one of
    /// [`COLUMN_FAMILIES`]), found among five without searching the
    /// database's map.
    pub(crate) fn cf(&self, name: &'static str) -> Result<&Family, StoreError> {
        self.families
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, family)| family)
            .ok_or_else(|| missing_family(name))
    }

    /// A fresh queue id. Ids are never handed out twice in one process; after a
    /// restart the allocator resumes above the largest registered id, so the
    /// id of a deleted queue may return, which is safe because deleting a
    /// queue range-deletes all its records in the same batch.
    pub(crate) fn allocate_qid(&self) -> Result<QueueId, StoreError> {
        let qid = self.next_qid.fetch_add(1, Ordering::Relaxed);
        if qid >= u32::MAX - 1 {
            return Err(StoreError::Command(CommandError::QueueIdsExhausted));
        }
        Ok(qid)
    }

    /// Takes room for one more queue, or refuses when the database holds
    /// `max_queues` (counting the queues of every shard). Exact across
    /// shards: the check and the count are one atomic step.
    pub(crate) fn reserve_queue(&self) -> Result<(), StoreError> {
        let max = self.options.max_queues;
        self.live_queues
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map(drop)
            .map_err(|_| StoreError::Command(CommandError::TooManyQueues { max }))
    }

    /// Moves a store's share of the count from `was` to `now` queues: the
    /// queues it loaded, or room taken by [`Self::reserve_queue`] for a
    /// create that did not happen, or a deleted queue's, given back.
    pub(crate) fn recount_queues(&self, was: u64, now: u64) {
        if now >= was {
            self.live_queues.fetch_add(now - was, Ordering::AcqRel);
        } else {
            self.live_queues.fetch_sub(was - now, Ordering::AcqRel);
        }
    }

    /// How many queues the open stores hold between them.
    pub fn live_queues(&self) -> u64 {
        self.live_queues.load(Ordering::Acquire)
    }

    /// An iterator over `[lower, upper)` of one queue's keys in `cf`,
    /// positioned at `lower`. Both bounds are set so RocksDB never steps past
    /// them, and the prefix (queue id) lets it use the prefix Bloom filters.
    pub(crate) fn scan(
        &self,
        cf: &'static str,
        lower: &[u8],
        upper: Vec<u8>,
    ) -> Result<rocksdb::DBRawIterator<'_>, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(lower.to_vec());
        ro.set_iterate_upper_bound(upper);
        ro.set_prefix_same_as_start(true);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf)?, ro);
        it.seek(lower);
        Ok(it)
    }

    /// Writes one batch. When it holds writes that must be durable before
    /// they are acknowledged (`needs_sync`) and the durability is `fsync`,
    /// returns the wait for the WAL sync that covers it: whoever answers
    /// those writes holds the answers until it completes. The write itself
    /// never waits for the disk, so the caller can go on with its next batch.
    pub(crate) fn commit(&self, batch: WriteBatch, needs_sync: bool) -> Result<Option<SyncWait>, StoreError> {
        let written = self.db.write(batch).map_err(|source| {
            if is_no_space(&source) {
                self.disk.note_no_space();
            }
            StoreError::rocks("write a batch")(source)
        });
        written?;
        Ok(match &self.wal_syncer {
            Some(syncer) if needs_sync => Some(syncer.request()),
            _ => None,
        })
    }

    /// Every WAL fsync's time so far.
    pub fn wal_sync_histogram(&self) -> crate::metrics::Histogram {
        self.wal_syncs.snapshot()
    }

    /// Writes a consistent copy of the whole database into `dir`, which must
    /// not exist yet: a RocksDB checkpoint (memtables flushed, SST files hard
    /// linked when `dir` is on the same filesystem and copied otherwise, the
    /// live WAL copied). Every storage batch is one atomic write, so the copy
    /// holds each batch whole or not at all; opened by a server, it recovers
    /// like a crash at the moment of the copy. Blocks for the flush and the
    /// copy: call it from a blocking thread, never an executor.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        let checkpoint =
            rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(StoreError::rocks("prepare a checkpoint"))?;
        checkpoint
            .create_checkpoint(dir)
            .map_err(StoreError::rocks("write a checkpoint"))
    }

    /// RocksDB's figures for metrics (in-memory property reads), summed
    /// over the column families.
    pub fn rocks_figures(&self) -> crate::metrics::render::RocksFigures {
        let sum = |property: &str| -> u64 {
            self.families
                .iter()
                .filter_map(|(_, family)| self.db.property_int_value_cf(family, property).ok().flatten())
                .sum()
        };
        let db = |property: &str| self.db.property_int_value(property).ok().flatten().unwrap_or(0);
        crate::metrics::render::RocksFigures {
            live_sst_bytes: sum("rocksdb.live-sst-files-size"),
            pending_compaction_bytes: sum("rocksdb.estimate-pending-compaction-bytes"),
            write_stopped: db("rocksdb.is-write-stopped") > 0,
            delayed_write_rate: db("rocksdb.actual-delayed-write-rate"),
            block_cache_bytes: db("rocksdb.block-cache-usage"),
            memtable_bytes: sum("rocksdb.cur-size-all-mem-tables"),
        }
    }

    /// Every registered queue with its id, sorted by name.
    pub fn registry(&self) -> Result<Vec<(QueueName, QueueId)>, StoreError> {
        list_registry(&self.db)
    }

    /// Fsyncs the WAL: what was acknowledged so far survives a power cut.
    pub fn sync_wal(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true).map_err(StoreError::rocks("sync the WAL"))
    }

    /// Waits until background flushes and compactions are done (benchmarks
    /// use it to measure a settled database, not one busy compacting).
    pub fn wait_for_compactions(&self) -> Result<(), StoreError> {
        self.db
            .wait_for_compact(&rocksdb::WaitForCompactOptions::default())
            .map_err(StoreError::rocks("wait for compactions"))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.stop();
        }
        if let Some(syncer) = self.syncer.take() {
            syncer.stop();
        }
        if let Some(syncer) = self.wal_syncer.take() {
            syncer.stop();
        }
        // Whatever mode we ran in, a clean shutdown leaves nothing unsynced.
        if let Err(e) = self.db.flush_wal(true) {
            tracing::warn!(error = %e, "final WAL sync failed");
        }
    }
}

/// Key of the registry record the disk watcher writes and deletes to learn
/// whether RocksDB accepts writes again (no registry reader looks at `~`).
const PROBE_KEY: &[u8] = b"~probe";

fn missing_family(name: &'static str) -> StoreError {
    StoreError::Storage(StorageError::Corrupt {
        cf: name,
        detail: "column family missing".into(),
    })
}

/// A small write through the WAL: succeeds only when the engine can write.
fn probe_write(db: &DB) -> Result<(), String> {
    let cf = db.cf_handle(CF_REGISTRY).ok_or("registry column family missing")?;
    let mut batch = WriteBatch::default();
    batch.put_cf(cf, PROBE_KEY, b"");
    batch.delete_cf(cf, PROBE_KEY);
    db.write(batch).map_err(|e| e.to_string())
}

fn list_registry(db: &DB) -> Result<Vec<(QueueName, QueueId)>, StoreError> {
    let cf = db.cf_handle(CF_REGISTRY).ok_or_else(|| missing_family(CF_REGISTRY))?;
    let mut out = Vec::new();
    let start = [keys::REGISTRY_NAME_TAG];
    for item in db.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward)) {
        let (k, v) = item.map_err(StoreError::rocks("scan the registry"))?;
        if k.first() != Some(&keys::REGISTRY_NAME_TAG) {
            break;
        }
        let name = keys::parse_name_key(&k).ok_or_else(|| {
            StoreError::Storage(StorageError::Corrupt {
                cf: CF_REGISTRY,
                detail: format!("unparseable queue name key {k:?}"),
            })
        })?;
        let qid = v.as_ref().try_into().map(u32::from_be_bytes).map_err(|_| {
            StoreError::Storage(StorageError::Corrupt {
                cf: CF_REGISTRY,
                detail: format!("queue id of {name} is {} bytes", v.len()),
            })
        })?;
        out.push((name, qid));
    }
    // Key order is (tenant length, tenant, queue); callers want names sorted.
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Background WAL fsync for `periodic` durability.
struct Syncer {
    stop: crossbeam_channel::Sender<()>,
    handle: JoinHandle<()>,
}

impl Syncer {
    fn start(db: Arc<DB>, every: Duration, timings: Arc<AtomicHistogram>) -> std::io::Result<Syncer> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let handle = std::thread::Builder::new()
            .name("queueber-wal-sync".into())
            .spawn(move || loop {
                match stopped.recv_timeout(every) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        if let Err(e) = sync_wal(&db, &timings) {
                            tracing::error!(error = %e, "periodic WAL sync failed");
                        }
                    }
                    _ => return,
                }
            })?;
        Ok(Syncer { stop, handle })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.join();
    }
}

/// Fsyncs every WAL file written so far (RocksDB's `SyncWAL`), recording
/// how long it took: the one way both syncers sync.
fn sync_wal(db: &DB, timings: &AtomicHistogram) -> Result<Duration, rocksdb::Error> {
    let started = std::time::Instant::now();
    db.flush_wal(true)?;
    let took = started.elapsed();
    timings.observe(took);
    Ok(took)
}

/// The wait for the WAL sync that makes a batch durable: how long the sync
/// took, or why it failed (then the batch may or may not survive a power
/// loss; it is in the database either way).
pub type SyncWait = futures::channel::oneshot::Receiver<Result<Duration, String>>;

/// Completes a [`SyncWait`].
pub type SyncDone = futures::channel::oneshot::Sender<Result<Duration, String>>;

/// The `fsync` durability's syncer: a thread that fsyncs the WAL whenever
/// batches wait for it. Each sync covers every batch whose request it took
/// before starting, since a batch asks only once its write has returned;
/// requests that arrive during a sync share the next one.
struct WalSyncer {
    requests: Option<crossbeam_channel::Sender<SyncDone>>,
    handle: JoinHandle<()>,
}

impl WalSyncer {
    fn start(db: Arc<DB>, timings: Arc<AtomicHistogram>) -> std::io::Result<WalSyncer> {
        let (requests, waiting) = crossbeam_channel::unbounded::<SyncDone>();
        let handle = std::thread::Builder::new()
            .name("queueber-wal-fsync".into())
            .spawn(move || {
                // Ends when the engine drops its sender, after answering
                // every request made before.
                while let Ok(first) = waiting.recv() {
                    let mut covered = vec![first];
                    covered.extend(waiting.try_iter());
                    let synced = sync_wal(&db, &timings).map_err(|e| {
                        tracing::error!(error = %e, "WAL fsync failed; the writes it covered are answered with an error");
                        format!("WAL fsync failed: {e}")
                    });
                    for waiter in covered {
                        let _ = waiter.send(synced.clone());
                    }
                }
            })?;
        Ok(WalSyncer {
            requests: Some(requests),
            handle,
        })
    }

    fn request(&self) -> SyncWait {
        let (done, wait) = futures::channel::oneshot::channel();
        if let Some(requests) = &self.requests {
            // The thread outlives the engine's last batch (it is stopped
            // only when the engine drops), so the send cannot fail.
            let _ = requests.send(done);
        }
        wait
    }

    fn stop(mut self) {
        drop(self.requests.take());
        let _ = self.handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    /// The options of one section of RocksDB's OPTIONS file, `key=value`
    /// lines until the next section.
    fn section<'a>(file: &'a str, header: &str) -> Vec<&'a str> {
        file.lines()
            .skip_while(|l| l.trim() != header)
            .skip(1)
            .take_while(|l| !l.trim_start().starts_with('['))
            .map(str::trim)
            .collect()
    }

    fn probe_batch(engine: &Engine, key: &[u8]) -> WriteBatch {
        let mut batch = WriteBatch::default();
        batch.put_cf(engine.cf(CF_REGISTRY).unwrap(), key, b"v");
        batch
    }

    /// In `fsync` durability a durable batch comes back with the wait for
    /// its sync, which the syncer thread completes; nothing else waits.
    #[test]
    fn durable_batches_wait_for_the_syncer_and_only_in_fsync_durability() {
        let dir = tempfile::tempdir().unwrap();
        let fsync = Engine::open(dir.path(), EngineOptions::default(), Arc::new(ManualClock::new(0))).unwrap();
        assert!(fsync.commit(probe_batch(&fsync, b"a"), false).unwrap().is_none());
        let waits: Vec<SyncWait> = (0..20)
            .map(|i| {
                fsync
                    .commit(probe_batch(&fsync, &[i]), true)
                    .unwrap()
                    .expect("a sync to wait for")
            })
            .collect();
        for wait in waits {
            let synced = futures::executor::block_on(wait).expect("the syncer answers");
            assert!(synced.is_ok(), "{synced:?}");
        }
        assert!(fsync.wal_sync_histogram().count >= 1);
        // Requests made just before the engine drops are still answered.
        let last = fsync.commit(probe_batch(&fsync, b"z"), true).unwrap().expect("a sync");
        drop(fsync);
        assert!(matches!(futures::executor::block_on(last), Ok(Ok(_))));
        let periodic = EngineOptions {
            durability: Durability::Periodic(Duration::from_secs(60)),
            ..EngineOptions::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let periodic = Engine::open(dir.path(), periodic, Arc::new(ManualClock::new(0))).unwrap();
        assert!(periodic.commit(probe_batch(&periodic, b"a"), true).unwrap().is_none());
    }

    /// The insert hints are set through RocksDB's options-string parser,
    /// which falls back (with a warning) if a RocksDB upgrade refuses the
    /// string: this checks, from the OPTIONS file RocksDB writes, that the
    /// hints are on and that the copy kept every other option we set.
    #[test]
    fn queue_families_get_memtable_insert_hints_and_keep_their_other_options() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), EngineOptions::default(), Arc::new(ManualClock::new(0))).unwrap();
        drop(engine);
        let options = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
            .max_by_key(|e| e.file_name())
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .expect("RocksDB wrote an OPTIONS file");
        let hint = insert_hint_setting();
        let prefix = format!("prefix_extractor=rocksdb.FixedPrefix.{}", keys::QID_LEN);
        let families = [
            (CF_READY, 16384, "kLZ4Compression", true),
            (CF_LEASES, 4096, "kNoCompression", true),
            (CF_DEAD, 16384, "kLZ4Compression", false),
            (CF_RETENTION, 4096, "kNoCompression", true),
        ];
        for (cf, block_size, compression, tombstone_compaction) in families {
            let cf_options = section(&options, &format!("[CFOptions \"{cf}\"]"));
            assert!(cf_options.contains(&hint.as_str()), "{cf}: no insert hints");
            assert!(cf_options.contains(&prefix.as_str()), "{cf}: prefix extractor lost");
            let compression = format!("compression={compression}");
            assert!(cf_options.contains(&compression.as_str()), "{cf}: compression lost");
            assert!(
                cf_options.contains(&"level_compaction_dynamic_level_bytes=true"),
                "{cf}"
            );
            let collector = cf_options.iter().any(|l| l.contains("CompactOnDeletionCollector"));
            assert_eq!(collector, tombstone_compaction, "{cf}: deletion-triggered compaction");
            let write_buffer = format!("write_buffer_size={}", EngineOptions::default().write_buffer_bytes);
            assert!(
                cf_options.contains(&write_buffer.as_str()),
                "{cf}: write buffer size lost"
            );
            let table = section(&options, &format!("[TableOptions/BlockBasedTable \"{cf}\"]"));
            assert!(
                table.contains(&format!("block_size={block_size}").as_str()),
                "{cf}: table options lost"
            );
            assert!(table.contains(&"format_version=6"), "{cf}: table options lost");
        }
        let registry = section(&options, &format!("[CFOptions \"{CF_REGISTRY}\"]"));
        assert!(registry.contains(&"memtable_insert_with_hint_prefix_extractor=nullptr"));
    }
}
