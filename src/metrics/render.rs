//! The series catalogue: every name, label and help text a scrape shows,
//! rendered from the shards' snapshots. Names are fixed: dashboards and
//! alerts depend on them (docs/operations.md lists them all).

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::exposition::{self, Families, Format, Kind, Value};
use super::process::ProcessFigures;
use super::{
    code_label, op_label, Histogram, QueueSeries, ShardSnapshot, LATENCY_BUCKETS, REQUEST_ROWS, RESULT_COLUMNS,
};
use crate::storage::{QueueCounters, QueueStats};

/// RocksDB's own figures that matter to an operator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RocksFigures {
    pub live_sst_bytes: u64,
    pub pending_compaction_bytes: u64,
    /// Writes are stopped (a stall), or being slowed down to this rate.
    pub write_stopped: bool,
    pub delayed_write_rate: u64,
    pub block_cache_bytes: u64,
    pub memtable_bytes: u64,
}

/// Everything one scrape renders.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub shards: Vec<ShardSnapshot>,
    pub wal_sync: Histogram,
    pub connections: u64,
    pub ready: bool,
    pub process: ProcessFigures,
    pub rocks: RocksFigures,
    /// Per-queue series beyond this many (in name order) fold into
    /// `tenant="_other",queue="_other"`.
    pub max_queues: usize,
    /// Failed `auth` attempts, when the server has access control.
    pub auth_failures: Option<u64>,
    /// What the backup thread has done; `None`: backups are off.
    pub backups: Option<crate::server::backup::BackupFigures>,
}

/// The label a folded queue takes.
pub const OTHER: &str = "_other";

/// One queue's (or the fold's) figures, summed.
#[derive(Debug, Clone, Default)]
struct QueueRow {
    stats: QueueStats,
    oldest_age_ms: u64,
    counters: QueueCounters,
    parked: u64,
    polls_empty: u64,
}

impl QueueRow {
    fn add(&mut self, s: &QueueSeries) {
        self.stats.visible += s.store.stats.visible;
        self.stats.delayed += s.store.stats.delayed;
        self.stats.in_flight += s.store.stats.in_flight;
        self.stats.dead += s.store.stats.dead;
        self.oldest_age_ms = self.oldest_age_ms.max(s.store.stats.oldest_visible_age_ms.unwrap_or(0));
        self.counters.merge(&s.store.counters);
        self.parked += s.parked_polls;
        self.polls_empty += s.polls_empty;
    }
}

/// Per-queue rows in (tenant, queue) order, the first `max` by name on
/// their own, the rest summed into one `_other` row (its age the oldest).
fn queue_rows(shards: &[ShardSnapshot], max: usize) -> Vec<((String, String), QueueRow)> {
    let mut all: Vec<&QueueSeries> = shards.iter().flat_map(|s| &s.queues).collect();
    all.sort_by(|a, b| a.store.queue.cmp(&b.store.queue));
    let mut rows = Vec::with_capacity(all.len().min(max) + 1);
    let mut other: Option<QueueRow> = None;
    for (i, s) in all.into_iter().enumerate() {
        if i < max {
            let mut row = QueueRow::default();
            row.add(s);
            rows.push((
                (s.store.queue.tenant().to_string(), s.store.queue.queue().to_string()),
                row,
            ));
        } else {
            other.get_or_insert_with(QueueRow::default).add(s);
        }
    }
    if let Some(row) = other {
        rows.push(((OTHER.to_string(), OTHER.to_string()), row));
    }
    rows
}

/// A per-queue counter: name, help, and its value in a row.
type QueueCounterSeries = (&'static str, &'static str, fn(&QueueRow) -> u64);
/// A per-shard histogram: name, help, and where a snapshot keeps it.
type ShardHistogramSeries = (&'static str, &'static str, fn(&ShardSnapshot) -> &Histogram);

/// A per-queue family with one more label (`label`), a sample for each of
/// the values `split` gives a row.
fn per_queue_by<const N: usize>(
    w: &mut Families<'_>,
    rows: &[((String, String), QueueRow)],
    (name, kind): (&str, Kind),
    help: &str,
    label: &str,
    split: impl Fn(&QueueRow) -> [(&'static str, u64); N],
) -> fmt::Result {
    let mut family = w.family(name, kind, help)?;
    for ((tenant, queue), row) in rows {
        for (value, n) in split(row) {
            family.sample(&[("tenant", tenant), ("queue", queue), (label, value)], n)?;
        }
    }
    Ok(())
}

/// A per-queue family: one sample per row.
fn per_queue(
    w: &mut Families<'_>,
    rows: &[((String, String), QueueRow)],
    (name, kind): (&str, Kind),
    help: &str,
    value: impl Fn(&QueueRow) -> Value,
) -> fmt::Result {
    let mut family = w.family(name, kind, help)?;
    for ((tenant, queue), row) in rows {
        family.sample(&[("tenant", tenant), ("queue", queue)], value(row))?;
    }
    Ok(())
}

/// A family of one sample without labels.
fn single(w: &mut Families<'_>, name: &str, kind: Kind, help: &str, value: impl Into<Value>) -> fmt::Result {
    w.family(name, kind, help)?.sample(&[], value)
}

/// Renders a scrape in `format`.
pub fn render(scrape: Scrape, format: Format) -> Result<String, fmt::Error> {
    exposition::encode(Catalogue(scrape), format)
}

/// The catalogue as a `prometheus-client` collector over one scrape.
#[derive(Debug)]
struct Catalogue(Scrape);

impl Collector for Catalogue {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        write_series(&self.0, &mut Families::new(encoder))
    }
}

fn write_series(scrape: &Scrape, w: &mut Families<'_>) -> fmt::Result {
    let rows = queue_rows(&scrape.shards, scrape.max_queues);

    per_queue_by(
        w,
        &rows,
        ("queueber_queue_messages", Kind::Gauge),
        "Messages in a queue by state: visible (ready now), delayed (ready later), inflight (leased), dead (dead letters).",
        "state",
        |r| {
            [
                ("visible", r.stats.visible),
                ("delayed", r.stats.delayed),
                ("inflight", r.stats.in_flight),
                ("dead", r.stats.dead),
            ]
        },
    )?;
    per_queue(
        w,
        &rows,
        ("queueber_queue_oldest_message_age_seconds", Kind::Gauge),
        "Age (since its first add) of the oldest visible message; 0 when none is visible.",
        |r| Value::Float(r.oldest_age_ms as f64 / 1000.0),
    )?;
    per_queue(
        w,
        &rows,
        ("queueber_queue_parked_polls", Kind::Gauge),
        "Long polls waiting for a message on the queue.",
        |r| Value::Int(r.parked),
    )?;
    let counters: [QueueCounterSeries; 9] = [
        ("queueber_messages_added_total", "Messages added.", |r| r.counters.added),
        (
            "queueber_messages_delivered_total",
            "Messages handed out under a lease (every delivery).",
            |r| r.counters.delivered,
        ),
        (
            "queueber_messages_redelivered_total",
            "Deliveries of a message after its first.",
            |r| r.counters.redelivered,
        ),
        (
            "queueber_messages_removed_total",
            "Messages removed (acknowledged).",
            |r| r.counters.removed,
        ),
        (
            "queueber_messages_released_total",
            "Messages released back by their lease holder.",
            |r| r.counters.released,
        ),
        (
            "queueber_leases_expired_total",
            "Messages made visible again because their lease expired.",
            |r| r.counters.leases_expired,
        ),
        ("queueber_polls_empty_total", "Polls answered with no message.", |r| {
            r.polls_empty
        }),
        (
            "queueber_messages_failed_total",
            "Deliveries a worker ended with fail.",
            |r| r.counters.failed,
        ),
        (
            "queueber_messages_redriven_total",
            "Dead letters moved back to their queue by redrive.",
            |r| r.counters.redriven,
        ),
    ];
    for (name, help, value) in counters {
        per_queue(w, &rows, (name, Kind::Counter), help, |r| Value::Int(value(r)))?;
    }

    per_queue_by(
        w,
        &rows,
        ("queueber_messages_dead_lettered_total", Kind::Counter),
        "Messages dead-lettered, by reason: max_deliveries (out of deliveries) or rejected (fail with dead).",
        "reason",
        |r| {
            [
                ("max_deliveries", r.counters.dead_max_deliveries),
                ("rejected", r.counters.dead_rejected),
            ]
        },
    )?;

    per_queue_by(
        w,
        &rows,
        ("queueber_messages_dropped_total", Kind::Counter),
        "Messages dropped without a remove, by reason: retention (outlived the queue's retention_ms).",
        "reason",
        |r| [("retention", r.counters.dropped_retention)],
    )?;

    single(
        w,
        "queueber_connections",
        Kind::Gauge,
        "Open client connections.",
        scrape.connections,
    )?;
    if let Some(n) = scrape.auth_failures {
        single(
            w,
            "queueber_auth_failures_total",
            Kind::Counter,
            "Failed auth attempts (unknown token id or wrong secret).",
            n,
        )?;
    }
    if let Some(b) = scrape.backups {
        let mut family = w.family(
            "queueber_backups_total",
            Kind::Counter,
            "Online backups (--backup-dir) written, and failed or skipped.",
        )?;
        family.sample(&[("result", "written")], b.written)?;
        family.sample(&[("result", "failed")], b.failed)?;
        // 0 until the first: an alert on its age then fires for a server
        // that has never written one, as it should.
        single(
            w,
            "queueber_backup_last_written_timestamp_seconds",
            Kind::Gauge,
            "When the last backup written was finished (Unix time); 0: none yet.",
            b.last_written_ms as f64 / 1000.0,
        )?;
    }
    single(
        w,
        "queueber_ready",
        Kind::Gauge,
        "1 once recovery is done and until shutdown begins (as /readyz).",
        scrape.ready,
    )?;

    let mut shards: Vec<&ShardSnapshot> = scrape.shards.iter().collect();
    shards.sort_by_key(|s| s.shard);
    let shard_labels: Vec<String> = shards.iter().map(|s| s.shard.to_string()).collect();
    // One sample per shard for each of these: name, kind, help, value.
    type PerShard = (&'static str, Kind, &'static str, fn(&ShardSnapshot) -> u64);
    let per_shard: [PerShard; 3] = [
        (
            "queueber_shard_pending_requests",
            Kind::Gauge,
            "Requests waiting at a shard's core for the next storage batch.",
            |s| s.pending_requests,
        ),
        (
            "queueber_cross_shard_requests_total",
            Kind::Counter,
            "Requests a shard's connections routed to another shard's core.",
            |s| s.figures.cross_shard_requests,
        ),
        (
            "queueber_connections_moved_total",
            Kind::Counter,
            "Connections a shard handed to the shard that owns the queues they use.",
            |s| s.figures.connections_moved,
        ),
    ];
    for (name, kind, help, value) in per_shard {
        let mut family = w.family(name, kind, help)?;
        for (s, label) in shards.iter().zip(&shard_labels) {
            family.sample(&[("shard", label)], value(s))?;
        }
    }
    {
        let mut family = w.family(
            "queueber_tls_refused_connections_total",
            Kind::Counter,
            "Connections to the TLS port closed before being served, by reason (plaintext, handshake, timeout).",
        )?;
        for (s, label) in shards.iter().zip(&shard_labels) {
            for why in crate::metrics::TlsRefusal::ALL {
                family.sample(
                    &[("shard", label), ("reason", why.label())],
                    s.figures.tls_refused[why as usize],
                )?;
            }
        }
    }

    // Requests, summed over the shards whose connections read them.
    let mut requests = vec![[0u64; RESULT_COLUMNS]; REQUEST_ROWS];
    let mut durations = vec![Histogram::new(LATENCY_BUCKETS); REQUEST_ROWS];
    for s in &shards {
        for (sum, row) in requests.iter_mut().zip(&s.figures.requests) {
            for (total, n) in sum.iter_mut().zip(row) {
                *total += n;
            }
        }
        for (sum, h) in durations.iter_mut().zip(&s.figures.request_duration) {
            sum.merge(h);
        }
    }
    {
        let mut family = w.family(
            "queueber_requests_total",
            Kind::Counter,
            "Requests answered, by operation and result code (ok or the error code).",
        )?;
        for (row, counts) in requests.iter().enumerate() {
            for (column, &n) in counts.iter().enumerate() {
                if n > 0 {
                    family.sample(&[("op", op_label(row)), ("code", code_label(column))], n)?;
                }
            }
        }
    }
    {
        let mut family = w.family(
            "queueber_request_duration_seconds",
            Kind::Histogram,
            "Server time per request, from its frame read to its answer queued on the socket (a long poll's wait included).",
        )?;
        for (row, h) in durations.iter().enumerate() {
            if h.count > 0 {
                family.histogram(&[("op", op_label(row))], h)?;
            }
        }
    }
    let shard_histograms: [ShardHistogramSeries; 2] = [
        (
            "queueber_storage_batch_duration_seconds",
            "Time of one storage batch of a shard (hand-off to the storage thread and back).",
            |s| &s.figures.batch_duration,
        ),
        (
            "queueber_storage_batch_commands",
            "Commands in one storage batch of a shard.",
            |s| &s.figures.batch_commands,
        ),
    ];
    for (name, help, pick) in shard_histograms {
        let mut family = w.family(name, Kind::Histogram, help)?;
        for (s, label) in shards.iter().zip(&shard_labels) {
            family.histogram(&[("shard", label)], pick(s))?;
        }
    }
    w.family(
        "queueber_wal_sync_duration_seconds",
        Kind::Histogram,
        "Time of one WAL fsync (per batch in fsync durability, per period in periodic).",
    )?
    .histogram(&[], &scrape.wal_sync)?;

    let rocks = &scrape.rocks;
    let gauges: [(&str, &str, Value); 6] = [
        (
            "queueber_rocksdb_live_sst_bytes",
            "Bytes of live SST files.",
            rocks.live_sst_bytes.into(),
        ),
        (
            "queueber_rocksdb_pending_compaction_bytes",
            "Bytes RocksDB estimates compaction must rewrite.",
            rocks.pending_compaction_bytes.into(),
        ),
        (
            "queueber_rocksdb_write_stopped",
            "1 while RocksDB stops writes (a write stall).",
            rocks.write_stopped.into(),
        ),
        (
            "queueber_rocksdb_delayed_write_rate_bytes",
            "The rate RocksDB slows writes to while delaying them; 0 when not delaying.",
            rocks.delayed_write_rate.into(),
        ),
        (
            "queueber_rocksdb_block_cache_bytes",
            "Bytes in RocksDB's block cache.",
            rocks.block_cache_bytes.into(),
        ),
        (
            "queueber_rocksdb_memtable_bytes",
            "Bytes in RocksDB's memtables.",
            rocks.memtable_bytes.into(),
        ),
    ];
    for (name, help, value) in gauges {
        single(w, name, Kind::Gauge, help, value)?;
    }

    let p = &scrape.process;
    single(
        w,
        "process_resident_memory_bytes",
        Kind::Gauge,
        "Resident memory size in bytes.",
        p.resident_bytes,
    )?;
    single(
        w,
        "process_cpu_seconds_total",
        Kind::Counter,
        "User and system CPU time spent in seconds.",
        p.cpu_seconds,
    )?;
    single(
        w,
        "process_open_fds",
        Kind::Gauge,
        "Number of open file descriptors.",
        p.open_fds,
    )?;
    single(
        w,
        "process_max_fds",
        Kind::Gauge,
        "Maximum number of open file descriptors.",
        p.max_fds,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{ShardFigures, ShardSnapshot};
    use crate::names::QueueName;
    use crate::storage::QueueSnapshot;

    fn series(tenant: &str, queue: &str, visible: u64, added: u64) -> QueueSeries {
        QueueSeries {
            store: QueueSnapshot {
                queue: QueueName::new(tenant, queue).unwrap(),
                stats: QueueStats {
                    visible,
                    oldest_visible_age_ms: Some(1500),
                    ..QueueStats::default()
                },
                counters: QueueCounters {
                    added,
                    ..QueueCounters::default()
                },
            },
            parked_polls: 1,
            polls_empty: 2,
        }
    }

    fn scrape(queues: Vec<QueueSeries>, max_queues: usize) -> Scrape {
        Scrape {
            shards: vec![ShardSnapshot {
                shard: 0,
                queues,
                pending_requests: 0,
                figures: ShardFigures::default(),
            }],
            wal_sync: Histogram::new(LATENCY_BUCKETS),
            connections: 3,
            ready: true,
            process: ProcessFigures::default(),
            rocks: RocksFigures::default(),
            max_queues,
            auth_failures: None,
            backups: None,
        }
    }

    #[test]
    fn queues_beyond_the_limit_fold_into_other() {
        let text = render(
            scrape(
                vec![series("t", "b", 2, 5), series("t", "a", 1, 4), series("t", "c", 3, 6)],
                1,
            ),
            Format::Prometheus,
        )
        .unwrap();
        assert!(
            text.contains("queueber_queue_messages{tenant=\"t\",queue=\"a\",state=\"visible\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("queueber_queue_messages{tenant=\"_other\",queue=\"_other\",state=\"visible\"} 5\n"));
        assert!(text.contains("queueber_messages_added_total{tenant=\"_other\",queue=\"_other\"} 11\n"));
        assert!(text.contains("queueber_queue_oldest_message_age_seconds{tenant=\"t\",queue=\"a\"} 1.5\n"));
        assert!(!text.contains("queue=\"b\""));
        assert!(text.contains("queueber_connections 3\n"));
    }
}
