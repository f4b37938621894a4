//! What a run measured, as text for people and one JSON line for scripts.

use hdrhistogram::Histogram;
use serde_json::json;

use super::Args;

/// Messages per shard in the measured window.
#[derive(Debug, Clone)]
pub struct ShardCounts {
    pub added: Vec<u64>,
    pub delivered: Vec<u64>,
    pub removed: Vec<u64>,
}

impl ShardCounts {
    pub fn new(shards: usize) -> Self {
        Self {
            added: vec![0; shards],
            delivered: vec![0; shards],
            removed: vec![0; shards],
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl From<&Histogram<u64>> for Latency {
    fn from(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

impl Latency {
    fn json(&self) -> serde_json::Value {
        json!({ "count": self.count, "p50_us": self.p50, "p90_us": self.p90, "p99_us": self.p99, "p999_us": self.p999, "max_us": self.max })
    }

    fn line(&self, name: &str) -> String {
        format!(
            "  {name:<11} p50 {:>7} µs  p90 {:>7} µs  p99 {:>7} µs  p99.9 {:>7} µs  max {:>8} µs  (n={})",
            self.p50, self.p90, self.p99, self.p999, self.max, self.count
        )
    }
}

pub struct Report {
    pub label: String,
    pub args: Args,
    pub shards: usize,
    pub queues: usize,
    /// Requests in flight per producer/consumer and queue.
    pub depth: usize,
    pub seconds: f64,
    pub counts: ShardCounts,
    pub end_to_end: Latency,
    pub add: Latency,
    /// Open loop only: actual minus intended send time of adds.
    pub send_lag: Option<Latency>,
    pub poll: Latency,
    pub remove: Latency,
    pub errors: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub server_cpu_us_per_msg: Option<f64>,
    pub server_peak_rss_kib: Option<u64>,
    pub preload_secs: Option<f64>,
}

impl Report {
    fn rate(&self, n: u64) -> f64 {
        n as f64 / self.seconds.max(1e-9)
    }

    /// No duplicate, no loss, no error: the run counts.
    pub fn clean(&self) -> bool {
        self.duplicates == 0 && self.lost == 0 && self.errors == 0
    }

    pub fn human(&self) -> String {
        let a = &self.args;
        let total = |v: &[u64]| v.iter().sum::<u64>();
        let mut s = format!(
            "loadgen against {}{}: P={} C={} B={} S={} Q={} depth={} shards={} {} over {:.1}s\n",
            a.backend.name(),
            if self.label.is_empty() {
                String::new()
            } else {
                format!(" [{}]", self.label)
            },
            a.producers,
            a.consumers,
            a.batch,
            a.payload,
            self.queues,
            self.depth,
            self.shards,
            match a.rate {
                Some(r) => format!("open loop at {r} msg/s"),
                None => format!("closed loop (max unacked {})", a.max_unacked),
            },
            self.seconds
        );
        s += &format!(
            "  throughput  added {:.0}/s  delivered {:.0}/s  removed {:.0}/s\n",
            self.rate(total(&self.counts.added)),
            self.rate(total(&self.counts.delivered)),
            self.rate(total(&self.counts.removed))
        );
        for shard in 0..self.shards {
            s += &format!(
                "  shard {shard}     added {:.0}/s  delivered {:.0}/s  removed {:.0}/s\n",
                self.rate(self.counts.added[shard]),
                self.rate(self.counts.delivered[shard]),
                self.rate(self.counts.removed[shard])
            );
        }
        s += &self.end_to_end.line("end-to-end");
        s += "\n";
        s += &self.add.line("add rpc");
        s += "\n";
        if let Some(lag) = &self.send_lag {
            s += &lag.line("send lag");
            s += "\n";
        }
        s += &self.poll.line("poll rpc");
        s += "\n";
        s += &self.remove.line("remove rpc");
        s += "\n";
        if let Some(cpu) = self.server_cpu_us_per_msg {
            s += &format!("  server cpu  {cpu:.2} µs per message\n");
        }
        if let Some(rss) = self.server_peak_rss_kib {
            s += &format!("  server rss  peak {} MiB\n", rss / 1024);
        }
        if let Some(p) = self.preload_secs {
            s += &format!("  preload     {} messages in {p:.1}s\n", a.preload);
        }
        s += &format!(
            "  errors {}  duplicates {}  lost {}",
            self.errors, self.duplicates, self.lost
        );
        s
    }

    pub fn json_line(&self) -> String {
        let a = &self.args;
        let total = |v: &[u64]| v.iter().sum::<u64>();
        json!({
            "label": self.label,
            "backend": a.backend.name(),
            "producers": a.producers, "consumers": a.consumers, "batch": a.batch, "payload": a.payload,
            "queues": self.queues, "depth": self.depth, "shards": self.shards, "rate": a.rate, "max_unacked": a.max_unacked,
            "seconds": self.seconds,
            "added_per_s": self.rate(total(&self.counts.added)),
            "delivered_per_s": self.rate(total(&self.counts.delivered)),
            "removed_per_s": self.rate(total(&self.counts.removed)),
            "removed_per_s_by_shard": self.counts.removed.iter().map(|&n| self.rate(n)).collect::<Vec<_>>(),
            "end_to_end": self.end_to_end.json(),
            "add": self.add.json(), "send_lag": self.send_lag.as_ref().map(Latency::json), "poll": self.poll.json(), "remove": self.remove.json(),
            "errors": self.errors, "duplicates": self.duplicates, "lost": self.lost,
            "server_cpu_us_per_msg": self.server_cpu_us_per_msg,
            "server_peak_rss_kib": self.server_peak_rss_kib,
            "preload": a.preload, "preload_secs": self.preload_secs,
        })
        .to_string()
    }
}
