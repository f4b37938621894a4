//! Metrics: what the server counts, and how a scrape renders it.
//!
//! Counting costs nothing shared on the hot path: every figure is a plain
//! value owned by one shard ([`ShardMetrics`], touched only by its own
//! executor thread) or by its store (per-queue counters, kept by the store
//! as it applies commands and counted only for batches that commit). A
//! scrape asks each shard's core for a [`ShardSnapshot`] through the core's
//! own inbox, sums them, and renders the text ([`exposition`]). The one
//! figure several threads write is the WAL sync histogram
//! ([`AtomicHistogram`]), written once per fsync, never per request.
//!
//! Layout: [`exposition`] (the Prometheus and OpenMetrics text formats),
//! [`process`] (the process's own figures from `/proc`), [`render`] (the
//! series catalogue: every name, label and help text).

pub mod exposition;
pub mod process;
pub mod render;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::ops::Op;
use crate::protocol::{ErrorCode, ERROR_CODES};
use crate::storage::QueueSnapshot;

/// Bucket bounds of request and storage latencies, in seconds: 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Bucket bounds of commands per storage batch.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// A histogram with fixed bounds: per-bucket counts (not cumulative; the
/// last slot counts values above every bound), their sum and count.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        let slot = self.bounds.partition_point(|&b| b < value);
        self.counts[slot] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// Adds another histogram of the same bounds (shards are summed).
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// A histogram several threads observe into (the WAL syncs: one writer per
/// fsync, not per request, so the atomics are not a hot-path cost).
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let slot = self.bounds.partition_point(|&b| b < seconds);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Histogram {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        Histogram {
            bounds: self.bounds,
            count: counts.iter().sum(),
            counts,
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// What one shard counts about requests and batches. Owned by the shard's
/// executor (its connections and its core share it through an `Rc`).
#[derive(Debug, Default)]
pub struct ShardMetrics {
    inner: RefCell<ShardFigures>,
}

/// Rows of the request tables: one per operation ([`Op::index`]) and a
/// last one for frames that were not a request.
pub const REQUEST_ROWS: usize = Op::NAMES.len() + 1;
/// Columns: `ok`, then each error code by its discriminant.
pub const RESULT_COLUMNS: usize = ERROR_CODES.len() + 1;

/// The row of a request that could not be decoded.
pub const UNDECODED: usize = Op::NAMES.len();

/// The `op` label of a row.
pub fn op_label(row: usize) -> &'static str {
    Op::NAMES.get(row).copied().unwrap_or("undecoded")
}

/// The `code` label of a column.
pub fn code_label(column: usize) -> &'static str {
    match column.checked_sub(1).and_then(|i| ERROR_CODES.get(i)) {
        Some(&code) => crate::client::code_name(code),
        None => "ok",
    }
}

/// The column of a result.
pub fn result_column(code: Option<ErrorCode>) -> usize {
    code.map_or(0, |c| c as usize + 1).min(RESULT_COLUMNS - 1)
}

/// Why a connection to a TLS port was closed before it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRefusal {
    /// It spoke plaintext (it was told so, in its own protocol).
    Plaintext,
    /// The handshake failed (no common version or cipher, a client
    /// certificate missing or not trusted, garbage).
    Handshake,
    /// It sent nothing, or did not finish the handshake, within the stall
    /// timeout.
    Timeout,
}

impl TlsRefusal {
    pub const ALL: [TlsRefusal; 3] = [TlsRefusal::Plaintext, TlsRefusal::Handshake, TlsRefusal::Timeout];

    /// Its `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            TlsRefusal::Plaintext => "plaintext",
            TlsRefusal::Handshake => "handshake",
            TlsRefusal::Timeout => "timeout",
        }
    }
}

/// The figures of [`ShardMetrics`], as a snapshot carries them. Dense
/// tables, not maps: recording a request is two index operations.
#[derive(Debug, Clone)]
pub struct ShardFigures {
    /// Requests answered, `[op row][result column]`.
    pub requests: Vec<[u64; RESULT_COLUMNS]>,
    /// Server time per request, from its frame read to its answer queued
    /// on the socket, by op row. A long poll's parked time counts.
    pub request_duration: Vec<Histogram>,
    /// Requests this shard's connections sent to another shard's core.
    pub cross_shard_requests: u64,
    /// Connections this shard handed to the shard their requests went to.
    pub connections_moved: u64,
    /// Connections to a TLS port that never got to be served, by
    /// [`TlsRefusal`] (its discriminant is the index).
    pub tls_refused: [u64; TlsRefusal::ALL.len()],
    /// Time of each storage call of the core (the offload round trip).
    pub batch_duration: Histogram,
    /// Commands per storage call.
    pub batch_commands: Histogram,
}

impl Default for ShardFigures {
    fn default() -> Self {
        Self {
            requests: vec![[0; RESULT_COLUMNS]; REQUEST_ROWS],
            request_duration: vec![Histogram::new(LATENCY_BUCKETS); REQUEST_ROWS],
            cross_shard_requests: 0,
            connections_moved: 0,
            tls_refused: [0; TlsRefusal::ALL.len()],
            batch_duration: Histogram::new(LATENCY_BUCKETS),
            batch_commands: Histogram::new(BATCH_SIZE_BUCKETS),
        }
    }
}

impl ShardMetrics {
    /// Counts one answered request of op row `op` with result column `result`.
    pub fn record_request(&self, op: usize, result: usize, took: Duration) {
        let mut f = self.inner.borrow_mut();
        if let Some(row) = f.requests.get_mut(op) {
            row[result.min(RESULT_COLUMNS - 1)] += 1;
        }
        if let Some(h) = f.request_duration.get_mut(op) {
            h.observe(took.as_secs_f64());
        }
    }

    pub fn record_cross_shard(&self) {
        self.inner.borrow_mut().cross_shard_requests += 1;
    }

    pub fn record_connection_moved(&self) {
        self.inner.borrow_mut().connections_moved += 1;
    }

    pub fn record_tls_refusal(&self, why: TlsRefusal) {
        self.inner.borrow_mut().tls_refused[why as usize] += 1;
    }

    pub fn record_batch(&self, took: Duration, commands: usize) {
        let mut f = self.inner.borrow_mut();
        f.batch_duration.observe(took.as_secs_f64());
        f.batch_commands.observe(commands as f64);
    }

    pub fn figures(&self) -> ShardFigures {
        self.inner.borrow().clone()
    }
}

/// One queue's series: the store's figures plus its core's long polls.
#[derive(Debug, Clone)]
pub struct QueueSeries {
    pub store: QueueSnapshot,
    /// Polls parked on the queue now.
    pub parked_polls: u64,
    /// Polls of the queue answered with nothing (at once, at the end of
    /// their wait, or because the queue was deleted) since start.
    pub polls_empty: u64,
}

/// Everything one shard reports to a scrape.
#[derive(Debug, Clone)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub queues: Vec<QueueSeries>,
    /// Requests at the core not yet taken into a batch.
    pub pending_requests: u64,
    pub figures: ShardFigures,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_into_the_first_bound_at_or_above() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 1, 1]);
        assert_eq!(h.count, 4);
        assert!((h.sum - 6.0).abs() < 1e-9);
        let mut sum = h.clone();
        sum.merge(&h);
        assert_eq!(sum.counts, vec![4, 2, 2]);
    }

    #[test]
    fn every_result_has_its_own_column_and_label() {
        assert_eq!(code_label(result_column(None)), "ok");
        for code in ERROR_CODES {
            assert_eq!(code_label(result_column(Some(code))), crate::client::code_name(code));
        }
        assert_eq!(op_label(UNDECODED), "undecoded");
        for (i, name) in Op::NAMES.iter().enumerate() {
            assert_eq!(op_label(i), *name);
        }
        assert_eq!(Op::Hello(crate::ops::Hello).index(), 0);
        assert_eq!(Op::NAMES[Op::ListQueues(crate::ops::ListQueues).index()], "listQueues");
    }

    #[test]
    fn atomic_histograms_snapshot_what_was_observed() {
        let h = AtomicHistogram::new(LATENCY_BUCKETS);
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_millis(20));
        let s = h.snapshot();
        assert_eq!(s.count, 2);
        assert_eq!(s.counts[0], 1);
        assert_eq!(s.counts[LATENCY_BUCKETS.partition_point(|&b| b < 0.02)], 1);
    }
}
