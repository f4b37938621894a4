//! The pure part of `queueber top`: the Prometheus text exposition parsed
//! into samples, one scrape's figures ([`Snapshot`]), and what two scrapes
//! say together ([`View`]: rates, average batch sizes, p99s from histogram
//! bucket deltas, queues in the chosen order). No I/O here.

use std::collections::BTreeMap;

use serde::Serialize;

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("metrics line {line}: {why}")]
pub struct ParseError {
    pub line: usize,
    pub why: String,
}

/// Parses the Prometheus text format (0.0.4): `#` lines (HELP, TYPE,
/// comments) and blank lines are skipped; label values may escape `\\`,
/// `\"` and `\n`; a timestamp after the value is ignored.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        samples.push(parse_line(line).map_err(|why| ParseError { line: i + 1, why })?);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .ok_or("a sample without a value")?;
    let name = &line[..name_end];
    if !valid_name(name, true) {
        return Err(format!("{name:?} is not a metric name"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inside) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inside)?;
        labels = parsed;
        rest = after;
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = parse_value(fields.next().ok_or("a sample without a value")?)?;
    // An optional timestamp (milliseconds) may follow; nothing else.
    let _timestamp = fields.next();
    if fields.next().is_some() {
        return Err("text after the value and timestamp".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Metric names may contain `:`, label names may not.
fn valid_name(s: &str, colons: bool) -> bool {
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':');
    let mut chars = s.chars();
    chars.next().is_some_and(ok_first) && chars.all(|c| ok_first(c) || c.is_ascii_digit())
}

/// Label pairs of a sample, in the order written.
type Labels = Vec<(String, String)>;

/// The labels after `{`, up to and including `}`; returns the text after it.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').ok_or("a label without '='")?;
        let key = s[..eq].trim();
        if !valid_name(key, false) {
            return Err(format!("{key:?} is not a label name"));
        }
        s = s[eq + 1..].trim_start();
        s = s.strip_prefix('"').ok_or("a label value without quotes")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("an unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    // Not an escape the format defines: kept as written.
                    Some((_, c)) => {
                        value.push('\\');
                        value.push(c);
                    }
                    None => return Err("an unterminated label value".into()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("{s:?} is not a number")),
    }
}

/// A histogram as exposed: cumulative bucket counts by upper bound (`le`,
/// ascending, `+Inf` last), the sum and the count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hist {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Hist {
    /// Adds `cumulative` to the bucket `le` (several series with the same
    /// bounds, such as every operation's, merge into one).
    pub fn add_bucket(&mut self, le: f64, cumulative: f64) {
        match self.buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, n)) => *n += cumulative,
            None => {
                let at = self.buckets.partition_point(|(bound, _)| *bound < le);
                self.buckets.insert(at, (le, cumulative));
            }
        }
    }

    /// What was observed since `earlier`, bucket by bucket. A count that
    /// went down means the server restarted: then all of `self` is new.
    pub fn since(&self, earlier: &Hist) -> Hist {
        if self.count < earlier.count {
            return self.clone();
        }
        let before = |le: f64| {
            earlier
                .buckets
                .iter()
                .find(|(bound, _)| *bound == le)
                .map_or(0.0, |(_, n)| *n)
        };
        Hist {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| (le, (n - before(le)).max(0.0)))
                .collect(),
            sum: (self.sum - earlier.sum).max(0.0),
            count: self.count - earlier.count,
        }
    }

    /// The `q` quantile as Prometheus's `histogram_quantile` estimates it:
    /// linear within the bucket the rank falls in (from 0 for the first);
    /// the highest finite bound when it falls in `+Inf`. `None` when the
    /// histogram is empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let i = self.buckets.iter().position(|&(_, n)| n >= rank)?;
        let (upper, count) = self.buckets[i];
        if upper == f64::INFINITY {
            return i.checked_sub(1).map(|j| self.buckets[j].0);
        }
        let (lower, below) = match i.checked_sub(1) {
            Some(j) => self.buckets[j],
            None if upper <= 0.0 => return Some(upper),
            None => (0.0, 0.0),
        };
        let within = count - below;
        if within <= 0.0 {
            return Some(upper);
        }
        Some(lower + (upper - lower) * (rank - below) / within)
    }
}

/// One queue's figures in one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueFigures {
    pub visible: f64,
    pub delayed: f64,
    pub in_flight: f64,
    pub oldest_age_s: f64,
    pub parked_polls: f64,
    pub added: f64,
    pub delivered: f64,
    pub redelivered: f64,
    pub removed: f64,
    pub released: f64,
    pub expired: f64,
    pub polls_empty: f64,
}

/// One shard's figures in one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardFigures {
    pub pending: f64,
    pub cross_shard: f64,
    pub batch_commands: Hist,
    pub batch_duration: Hist,
}

/// The figures of one scrape that `top` shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// By (tenant, queue).
    pub queues: BTreeMap<(String, String), QueueFigures>,
    /// By shard number.
    pub shards: BTreeMap<u64, ShardFigures>,
    /// Requests answered, every operation and result code.
    pub requests: f64,
    /// Request durations, every operation's histogram merged.
    pub request_duration: Hist,
    pub wal_syncs: f64,
    pub connections: Option<f64>,
    pub ready: Option<bool>,
    pub rss_bytes: Option<f64>,
    pub cpu_seconds: Option<f64>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Result<Snapshot, ParseError> {
        Ok(Snapshot::from_samples(&parse(text)?))
    }

    /// Picks the series `top` uses; everything else is ignored.
    pub fn from_samples(samples: &[Sample]) -> Snapshot {
        let mut s = Snapshot::default();
        for sample in samples {
            let v = sample.value;
            let name = sample.name.as_str();
            if let Some(field) = queue_field(name, sample.label("state")) {
                if let (Some(tenant), Some(queue)) = (sample.label("tenant"), sample.label("queue")) {
                    let q = s.queues.entry((tenant.to_string(), queue.to_string())).or_default();
                    *field(q) = v;
                }
                continue;
            }
            if let Some((family, part)) = shard_series(name) {
                let Some(shard) = sample.label("shard").and_then(|n| n.parse::<u64>().ok()) else {
                    continue;
                };
                let figures = s.shards.entry(shard).or_default();
                match family {
                    "queueber_shard_pending_requests" => figures.pending = v,
                    "queueber_cross_shard_requests_total" => figures.cross_shard = v,
                    "queueber_storage_batch_commands" => hist_part(&mut figures.batch_commands, part, sample),
                    _ => hist_part(&mut figures.batch_duration, part, sample),
                }
                continue;
            }
            match name {
                "queueber_requests_total" => s.requests += v,
                "queueber_request_duration_seconds_bucket" => hist_part(&mut s.request_duration, "bucket", sample),
                "queueber_request_duration_seconds_sum" => s.request_duration.sum += v,
                "queueber_request_duration_seconds_count" => s.request_duration.count += v,
                "queueber_wal_sync_duration_seconds_count" => s.wal_syncs = v,
                "queueber_connections" => s.connections = Some(v),
                "queueber_ready" => s.ready = Some(v != 0.0),
                "process_resident_memory_bytes" => s.rss_bytes = Some(v),
                "process_cpu_seconds_total" => s.cpu_seconds = Some(v),
                _ => {}
            }
        }
        s
    }
}

type QueueField = fn(&mut QueueFigures) -> &mut f64;

/// Where a per-queue series goes.
fn queue_field(name: &str, state: Option<&str>) -> Option<QueueField> {
    Some(match (name, state) {
        ("queueber_queue_messages", Some("visible")) => |q| &mut q.visible,
        ("queueber_queue_messages", Some("delayed")) => |q| &mut q.delayed,
        ("queueber_queue_messages", Some("inflight")) => |q| &mut q.in_flight,
        ("queueber_queue_oldest_message_age_seconds", _) => |q| &mut q.oldest_age_s,
        ("queueber_queue_parked_polls", _) => |q| &mut q.parked_polls,
        ("queueber_messages_added_total", _) => |q| &mut q.added,
        ("queueber_messages_delivered_total", _) => |q| &mut q.delivered,
        ("queueber_messages_redelivered_total", _) => |q| &mut q.redelivered,
        ("queueber_messages_removed_total", _) => |q| &mut q.removed,
        ("queueber_messages_released_total", _) => |q| &mut q.released,
        ("queueber_leases_expired_total", _) => |q| &mut q.expired,
        ("queueber_polls_empty_total", _) => |q| &mut q.polls_empty,
        _ => return None,
    })
}

/// A per-shard series: its family and the histogram part (`bucket`,
/// `sum`, `count`, or `""` for a plain series).
fn shard_series(name: &str) -> Option<(&'static str, &str)> {
    for family in ["queueber_shard_pending_requests", "queueber_cross_shard_requests_total"] {
        if name == family {
            return Some((family, ""));
        }
    }
    for family in [
        "queueber_storage_batch_commands",
        "queueber_storage_batch_duration_seconds",
    ] {
        if let Some(part) = name.strip_prefix(family).and_then(|p| p.strip_prefix('_')) {
            if matches!(part, "bucket" | "sum" | "count") {
                return Some((family, part));
            }
        }
    }
    None
}

fn hist_part(h: &mut Hist, part: &str, sample: &Sample) {
    match part {
        "bucket" => {
            if let Some(le) = sample.label("le").and_then(|le| parse_value(le).ok()) {
                h.add_bucket(le, sample.value);
            }
        }
        "sum" => h.sum += sample.value,
        "count" => h.count += sample.value,
        _ => {}
    }
}

/// A counter's increase per second; a counter that went down was reset
/// (the server restarted), so all of its value is new.
fn rate(later: f64, earlier: f64, seconds: f64) -> f64 {
    let increase = if later >= earlier { later - earlier } else { later };
    increase / seconds
}

/// One queue's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueRow {
    pub tenant: String,
    pub queue: String,
    pub visible: u64,
    pub delayed: u64,
    pub in_flight: u64,
    /// Dead-lettered messages: always 0, there are no dead letters yet.
    pub dead: u64,
    /// Age of the oldest visible message.
    pub oldest_age_s: f64,
    pub parked_polls: u64,
    pub adds_per_s: Option<f64>,
    pub deliveries_per_s: Option<f64>,
    pub removes_per_s: Option<f64>,
    pub redeliveries_per_s: Option<f64>,
    pub releases_per_s: Option<f64>,
    pub lease_expiries_per_s: Option<f64>,
    pub empty_polls_per_s: Option<f64>,
}

/// One shard's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardRow {
    pub shard: u64,
    pub batches_per_s: Option<f64>,
    /// Commands per storage batch, over the interval.
    pub avg_batch_commands: Option<f64>,
    /// p99 storage batch time over the interval.
    pub batch_p99_s: Option<f64>,
    pub pending_requests: u64,
    pub cross_shard_per_s: Option<f64>,
}

/// The server-wide line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerRow {
    pub ready: Option<bool>,
    pub requests_per_s: Option<f64>,
    /// p99 request time over the interval, every operation together.
    pub request_p99_s: Option<f64>,
    pub wal_syncs_per_s: Option<f64>,
    pub connections: Option<u64>,
    pub rss_bytes: Option<u64>,
    pub cpu_percent: Option<f64>,
}

/// What `top` shows: the later scrape's gauges, and rates over the
/// interval between two scrapes (`None` with only one).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct View {
    pub interval_s: Option<f64>,
    pub server: ServerRow,
    pub shards: Vec<ShardRow>,
    pub queues: Vec<QueueRow>,
}

fn count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

/// The view of `later`, with rates since `earlier` taken `seconds` before
/// it. Queues and shards absent from `earlier` count from 0 (they are new).
pub fn view(earlier: Option<&Snapshot>, later: &Snapshot, seconds: f64) -> View {
    let earlier = earlier.filter(|_| seconds > 0.0 && seconds.is_finite());
    let per_s = |pick: &dyn Fn(&Snapshot) -> f64| earlier.map(|e| rate(pick(later), pick(e), seconds));
    let request_p99_s = earlier.and_then(|e| later.request_duration.since(&e.request_duration).quantile(0.99));
    let cpu_percent = earlier.and_then(|e| {
        let (now, before) = (later.cpu_seconds?, e.cpu_seconds?);
        Some(rate(now, before, seconds) * 100.0)
    });
    let server = ServerRow {
        ready: later.ready,
        requests_per_s: per_s(&|s| s.requests),
        request_p99_s,
        wal_syncs_per_s: per_s(&|s| s.wal_syncs),
        connections: later.connections.map(count),
        rss_bytes: later.rss_bytes.map(count),
        cpu_percent,
    };
    let empty_shard = ShardFigures::default();
    let shards = later
        .shards
        .iter()
        .map(|(&shard, now)| {
            let before = earlier.map(|e| e.shards.get(&shard).unwrap_or(&empty_shard));
            let commands = before.map(|b| now.batch_commands.since(&b.batch_commands));
            ShardRow {
                shard,
                batches_per_s: commands.as_ref().map(|c| c.count / seconds),
                avg_batch_commands: commands.as_ref().filter(|c| c.count > 0.0).map(|c| c.sum / c.count),
                batch_p99_s: before.and_then(|b| now.batch_duration.since(&b.batch_duration).quantile(0.99)),
                pending_requests: count(now.pending),
                cross_shard_per_s: before.map(|b| rate(now.cross_shard, b.cross_shard, seconds)),
            }
        })
        .collect();
    let empty_queue = QueueFigures::default();
    let queues = later
        .queues
        .iter()
        .map(|((tenant, queue), now)| {
            let before = earlier.map(|e| e.queues.get(&(tenant.clone(), queue.clone())).unwrap_or(&empty_queue));
            let per_s = |pick: fn(&QueueFigures) -> f64| before.map(|b| rate(pick(now), pick(b), seconds));
            QueueRow {
                tenant: tenant.clone(),
                queue: queue.clone(),
                visible: count(now.visible),
                delayed: count(now.delayed),
                in_flight: count(now.in_flight),
                dead: 0,
                oldest_age_s: now.oldest_age_s.max(0.0),
                parked_polls: count(now.parked_polls),
                adds_per_s: per_s(|q| q.added),
                deliveries_per_s: per_s(|q| q.delivered),
                removes_per_s: per_s(|q| q.removed),
                redeliveries_per_s: per_s(|q| q.redelivered),
                releases_per_s: per_s(|q| q.released),
                lease_expiries_per_s: per_s(|q| q.expired),
                empty_polls_per_s: per_s(|q| q.polls_empty),
            }
        })
        .collect();
    View {
        interval_s: earlier.map(|_| seconds),
        server,
        shards,
        queues,
    }
}

/// The order of the queue table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// Most visible messages first (the backlog).
    Visible,
    /// Oldest visible message first.
    Age,
    /// Most in-flight messages first.
    InFlight,
    /// Highest add rate first.
    AddRate,
    /// By tenant and queue name.
    Name,
}

impl SortKey {
    pub const ALL: [SortKey; 5] = [
        SortKey::Visible,
        SortKey::Age,
        SortKey::InFlight,
        SortKey::AddRate,
        SortKey::Name,
    ];

    /// The key that picks this order in the live view.
    pub fn key(self) -> char {
        match self {
            SortKey::Visible => 'v',
            SortKey::Age => 'a',
            SortKey::InFlight => 'i',
            SortKey::AddRate => 'r',
            SortKey::Name => 'n',
        }
    }

    pub fn from_key(c: char) -> Option<SortKey> {
        SortKey::ALL.into_iter().find(|k| k.key() == c)
    }

    /// How the footer names it.
    pub fn label(self) -> &'static str {
        match self {
            SortKey::Visible => "visible",
            SortKey::Age => "age",
            SortKey::InFlight => "in flight",
            SortKey::AddRate => "add rate",
            SortKey::Name => "name",
        }
    }
}

/// Sorts queue rows by `key`, largest first (names ascending); ties and
/// rows without a rate yet go by name.
pub fn sort_queues(rows: &mut [QueueRow], key: SortKey) {
    let figure = |r: &QueueRow| -> f64 {
        match key {
            SortKey::Visible => r.visible as f64,
            SortKey::Age => r.oldest_age_s,
            SortKey::InFlight => r.in_flight as f64,
            SortKey::AddRate => r.adds_per_s.unwrap_or(-1.0),
            SortKey::Name => 0.0,
        }
    };
    rows.sort_by(|a, b| {
        figure(b)
            .total_cmp(&figure(a))
            .then_with(|| (&a.tenant, &a.queue).cmp(&(&b.tenant, &b.queue)))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn samples_parse_with_escaped_labels_special_values_and_timestamps() {
        let text = "# HELP x_total Things.\n# TYPE x_total counter\n\
            x_total{queue=\"a\\\"b\",tenant=\"c\\\\d\",note=\"l1\\nl2\"} 3\n\
            \n   up 1 1700000000000\n\
            h_bucket{le=\"+Inf\"} +Inf\nneg -Inf\nn NaN\nsci{a = \"1\" , } 1.5e3\nempty{} 2\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 7);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(
            s[0].labels,
            labels(&[("queue", "a\"b"), ("tenant", "c\\d"), ("note", "l1\nl2")])
        );
        assert_eq!(s[0].value, 3.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("up", 1.0));
        assert!(s[1].labels.is_empty());
        assert_eq!(s[2].label("le"), Some("+Inf"));
        assert_eq!(s[2].value, f64::INFINITY);
        assert_eq!(s[3].value, f64::NEG_INFINITY);
        assert!(s[4].value.is_nan());
        assert_eq!(s[5].labels, labels(&[("a", "1")]));
        assert_eq!(s[5].value, 1500.0);
        assert!(s[6].labels.is_empty());
    }

    #[test]
    fn a_label_value_may_hold_braces_commas_and_spaces() {
        let s = parse("m{q=\"a} b, c=\\\"d\\\"\",r=\"\"} 7").unwrap();
        assert_eq!(s[0].labels, labels(&[("q", "a} b, c=\"d\""), ("r", "")]));
        assert_eq!(s[0].value, 7.0);
    }

    #[test]
    fn malformed_lines_are_errors_with_their_line_number() {
        for bad in [
            "m",
            "m{q=\"a\"",
            "m{q=a} 1",
            "m{q=\"a\" r=\"b\"} 1",
            "m{=\"a\"} 1",
            "m{q=\"a\"}",
            "m x",
            "m 1 2 3",
            "1m 2",
            "m{q=\"a\\",
        ] {
            let err = parse(&format!("# c\nok 1\n{bad}\n")).unwrap_err();
            assert_eq!(err.line, 3, "{bad}: {err}");
        }
    }

    const SCRAPE_1: &str = r#"
# TYPE queueber_queue_messages gauge
queueber_queue_messages{tenant="t",queue="a",state="visible"} 10
queueber_queue_messages{tenant="t",queue="a",state="delayed"} 2
queueber_queue_messages{tenant="t",queue="a",state="inflight"} 3
queueber_queue_oldest_message_age_seconds{tenant="t",queue="a"} 1.5
queueber_queue_parked_polls{tenant="t",queue="a"} 1
queueber_messages_added_total{tenant="t",queue="a"} 100
queueber_messages_delivered_total{tenant="t",queue="a"} 50
queueber_messages_removed_total{tenant="t",queue="a"} 40
queueber_connections 4
queueber_ready 1
queueber_shard_pending_requests{shard="0"} 0
queueber_shard_pending_requests{shard="1"} 5
queueber_cross_shard_requests_total{shard="0"} 7
queueber_cross_shard_requests_total{shard="1"} 0
queueber_requests_total{op="add",code="ok"} 10
queueber_requests_total{op="poll",code="ok"} 20
queueber_requests_total{op="add",code="disk_full"} 1
queueber_request_duration_seconds_bucket{op="add",le="0.001"} 5
queueber_request_duration_seconds_bucket{op="add",le="0.01"} 10
queueber_request_duration_seconds_bucket{op="add",le="+Inf"} 11
queueber_request_duration_seconds_sum{op="add"} 0.5
queueber_request_duration_seconds_count{op="add"} 11
queueber_request_duration_seconds_bucket{op="poll",le="0.001"} 20
queueber_request_duration_seconds_bucket{op="poll",le="0.01"} 20
queueber_request_duration_seconds_bucket{op="poll",le="+Inf"} 20
queueber_request_duration_seconds_sum{op="poll"} 0.01
queueber_request_duration_seconds_count{op="poll"} 20
queueber_storage_batch_duration_seconds_bucket{shard="0",le="0.001"} 1
queueber_storage_batch_duration_seconds_bucket{shard="0",le="+Inf"} 1
queueber_storage_batch_duration_seconds_sum{shard="0"} 0.0005
queueber_storage_batch_duration_seconds_count{shard="0"} 1
queueber_storage_batch_commands_bucket{shard="0",le="1"} 1
queueber_storage_batch_commands_bucket{shard="0",le="+Inf"} 1
queueber_storage_batch_commands_sum{shard="0"} 1
queueber_storage_batch_commands_count{shard="0"} 1
queueber_wal_sync_duration_seconds_bucket{le="+Inf"} 30
queueber_wal_sync_duration_seconds_sum 0.1
queueber_wal_sync_duration_seconds_count 30
process_resident_memory_bytes 1048576
process_cpu_seconds_total 10
"#;

    #[test]
    fn a_scrape_sums_requests_and_merges_the_operations_histograms() {
        let s = Snapshot::parse(SCRAPE_1).unwrap();
        let a = &s.queues[&("t".to_string(), "a".to_string())];
        assert_eq!((a.visible, a.delayed, a.in_flight), (10.0, 2.0, 3.0));
        assert_eq!((a.oldest_age_s, a.parked_polls, a.added), (1.5, 1.0, 100.0));
        assert_eq!(s.requests, 31.0);
        assert_eq!(
            s.request_duration.buckets,
            vec![(0.001, 25.0), (0.01, 30.0), (f64::INFINITY, 31.0)]
        );
        assert_eq!(s.request_duration.count, 31.0);
        assert_eq!(s.shards.len(), 2);
        assert_eq!(s.shards[&1].pending, 5.0);
        assert_eq!(s.shards[&0].cross_shard, 7.0);
        assert_eq!(s.shards[&0].batch_commands.count, 1.0);
        assert_eq!(s.shards[&0].batch_duration.buckets.len(), 2);
        assert_eq!(s.wal_syncs, 30.0);
        assert_eq!((s.connections, s.ready), (Some(4.0), Some(true)));
        assert_eq!((s.rss_bytes, s.cpu_seconds), (Some(1048576.0), Some(10.0)));
    }

    fn hist(buckets: &[(f64, f64)]) -> Hist {
        Hist {
            buckets: buckets.to_vec(),
            sum: 0.0,
            count: buckets.last().map_or(0.0, |b| b.1),
        }
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        let inf = f64::INFINITY;
        // 100 observations: 50 up to 1, 40 in (1, 2], 10 in (2, 4].
        let h = hist(&[(1.0, 50.0), (2.0, 90.0), (4.0, 100.0), (inf, 100.0)]);
        assert_eq!(h.quantile(0.5), Some(1.0));
        assert_eq!(h.quantile(0.25), Some(0.5));
        assert_eq!(h.quantile(0.7), Some(1.5));
        assert!((h.quantile(0.99).unwrap() - 3.8).abs() < 1e-9);
        // In the +Inf bucket: the highest finite bound.
        let tail = hist(&[(1.0, 1.0), (2.0, 1.0), (inf, 100.0)]);
        assert_eq!(tail.quantile(0.99), Some(2.0));
        assert_eq!(hist(&[(1.0, 0.0), (inf, 0.0)]).quantile(0.99), None);
        assert_eq!(Hist::default().quantile(0.99), None);
    }

    #[test]
    fn p99_comes_from_bucket_deltas_not_from_everything_since_start() {
        let inf = f64::INFINITY;
        // Before: 10000 fast requests. During the interval: 100 slow ones,
        // which the p99 since the start would not show.
        let before = hist(&[(0.001, 10000.0), (0.1, 10000.0), (1.0, 10000.0), (inf, 10000.0)]);
        let after = hist(&[(0.001, 10000.0), (0.1, 10000.0), (1.0, 10100.0), (inf, 10100.0)]);
        assert!(after.quantile(0.99).unwrap() <= 0.001);
        let delta = after.since(&before);
        assert_eq!(delta.count, 100.0);
        assert_eq!(
            delta.buckets,
            vec![(0.001, 0.0), (0.1, 0.0), (1.0, 100.0), (inf, 100.0)]
        );
        assert!((delta.quantile(0.99).unwrap() - 0.991).abs() < 1e-9);
        // A restart (count went down): the later histogram is all new.
        let restarted = hist(&[(0.001, 5.0), (0.1, 5.0), (1.0, 5.0), (inf, 5.0)]);
        assert_eq!(restarted.since(&before), restarted);
    }

    #[test]
    fn merged_histograms_add_matching_bounds_and_keep_them_ordered() {
        let mut h = Hist::default();
        h.add_bucket(f64::INFINITY, 3.0);
        h.add_bucket(0.5, 1.0);
        h.add_bucket(0.1, 1.0);
        h.add_bucket(0.5, 2.0);
        assert_eq!(h.buckets, vec![(0.1, 1.0), (0.5, 3.0), (f64::INFINITY, 3.0)]);
    }

    fn scrape_2() -> String {
        SCRAPE_1
            .replace(
                "queueber_messages_added_total{tenant=\"t\",queue=\"a\"} 100",
                "queueber_messages_added_total{tenant=\"t\",queue=\"a\"} 300\n\
                 queueber_messages_added_total{tenant=\"t\",queue=\"new\"} 8\n\
                 queueber_queue_messages{tenant=\"t\",queue=\"new\",state=\"visible\"} 8",
            )
            .replace(
                "queueber_messages_delivered_total{tenant=\"t\",queue=\"a\"} 50",
                "queueber_messages_delivered_total{tenant=\"t\",queue=\"a\"} 10",
            )
            .replace("{op=\"poll\",code=\"ok\"} 20", "{op=\"poll\",code=\"ok\"} 60")
            .replace(
                "queueber_storage_batch_commands_sum{shard=\"0\"} 1\nqueueber_storage_batch_commands_count{shard=\"0\"} 1",
                "queueber_storage_batch_commands_sum{shard=\"0\"} 81\nqueueber_storage_batch_commands_count{shard=\"0\"} 5",
            )
            .replace(
                "queueber_storage_batch_commands_bucket{shard=\"0\",le=\"+Inf\"} 1",
                "queueber_storage_batch_commands_bucket{shard=\"0\",le=\"+Inf\"} 5",
            )
            .replace("queueber_wal_sync_duration_seconds_count 30", "queueber_wal_sync_duration_seconds_count 50")
            .replace("process_cpu_seconds_total 10", "process_cpu_seconds_total 11")
    }

    #[test]
    fn rates_are_increases_per_second_between_two_scrapes() {
        let earlier = Snapshot::parse(SCRAPE_1).unwrap();
        let later = Snapshot::parse(&scrape_2()).unwrap();
        let v = view(Some(&earlier), &later, 2.0);
        assert_eq!(v.interval_s, Some(2.0));
        let a = v.queues.iter().find(|q| q.queue == "a").unwrap();
        assert_eq!((a.visible, a.delayed, a.in_flight, a.dead), (10, 2, 3, 0));
        assert_eq!(a.adds_per_s, Some(100.0));
        // 50 -> 10: a reset (restart), so all 10 are new.
        assert_eq!(a.deliveries_per_s, Some(5.0));
        assert_eq!(a.removes_per_s, Some(0.0));
        // A queue the earlier scrape did not have counts from 0.
        let new = v.queues.iter().find(|q| q.queue == "new").unwrap();
        assert_eq!((new.visible, new.adds_per_s), (8, Some(4.0)));
        assert_eq!(v.server.requests_per_s, Some(20.0));
        assert_eq!(v.server.request_p99_s, None, "no request histogram moved");
        assert_eq!(v.server.wal_syncs_per_s, Some(10.0));
        assert_eq!(v.server.cpu_percent, Some(50.0));
        assert_eq!((v.server.connections, v.server.rss_bytes), (Some(4), Some(1048576)));
        assert_eq!(v.shards.len(), 2);
        let s0 = &v.shards[0];
        assert_eq!(s0.batches_per_s, Some(2.0));
        assert_eq!(s0.avg_batch_commands, Some(20.0));
        assert_eq!(s0.batch_p99_s, None);
        assert_eq!(s0.cross_shard_per_s, Some(0.0));
        assert_eq!(v.shards[1].pending_requests, 5);
        assert_eq!(v.shards[1].avg_batch_commands, None);
    }

    #[test]
    fn one_scrape_gives_gauges_and_no_rates() {
        let only = Snapshot::parse(SCRAPE_1).unwrap();
        let v = view(None, &only, 1.0);
        assert_eq!(v.interval_s, None);
        assert_eq!(v.queues[0].visible, 10);
        assert_eq!(v.queues[0].adds_per_s, None);
        assert_eq!(v.server.requests_per_s, None);
        assert_eq!(v.shards[1].pending_requests, 5);
        assert_eq!(v.shards[0].batches_per_s, None);
        // A zero interval cannot give rates either.
        assert_eq!(view(Some(&only), &only, 0.0).server.requests_per_s, None);
    }

    fn row(queue: &str, visible: u64, age: f64, in_flight: u64, adds: Option<f64>) -> QueueRow {
        QueueRow {
            tenant: "t".into(),
            queue: queue.into(),
            visible,
            delayed: 0,
            in_flight,
            dead: 0,
            oldest_age_s: age,
            parked_polls: 0,
            adds_per_s: adds,
            deliveries_per_s: None,
            removes_per_s: None,
            redeliveries_per_s: None,
            releases_per_s: None,
            lease_expiries_per_s: None,
            empty_polls_per_s: None,
        }
    }

    #[test]
    fn sorting_puts_the_largest_first_and_breaks_ties_by_name() {
        let mut rows = vec![
            row("c", 5, 1.0, 0, Some(3.0)),
            row("a", 5, 9.0, 2, None),
            row("b", 7, 0.0, 1, Some(1.0)),
            row("d", 0, 2.0, 2, Some(0.0)),
        ];
        let order = |rows: &[QueueRow]| rows.iter().map(|r| r.queue.as_str()).collect::<String>();
        sort_queues(&mut rows, SortKey::Visible);
        assert_eq!(order(&rows), "bacd");
        sort_queues(&mut rows, SortKey::Age);
        assert_eq!(order(&rows), "adcb");
        sort_queues(&mut rows, SortKey::InFlight);
        assert_eq!(order(&rows), "adbc");
        sort_queues(&mut rows, SortKey::AddRate);
        assert_eq!(order(&rows), "cbda");
        sort_queues(&mut rows, SortKey::Name);
        assert_eq!(order(&rows), "abcd");
    }

    #[test]
    fn every_sort_key_has_its_own_letter() {
        for k in SortKey::ALL {
            assert_eq!(SortKey::from_key(k.key()), Some(k));
        }
        assert_eq!(SortKey::from_key('q'), None);
    }
}
