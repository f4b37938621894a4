//! How `top` writes figures: the cells of both tables and the server line,
//! shared by the live view and the `--once` text report.

use super::model::{QueueRow, ShardRow, SortKey, View};

/// Headers of the queue table (the column the rows are sorted by is marked
/// by the caller).
pub const QUEUE_COLUMNS: [&str; 9] = [
    "QUEUE",
    "VISIBLE",
    "DELAYED",
    "IN FLIGHT",
    "DEAD",
    "OLDEST",
    "ADDS/S",
    "DELIVERIES/S",
    "REMOVES/S",
];

/// The same headers, short, for terminals too narrow for the long ones.
pub const QUEUE_COLUMNS_SHORT: [&str; 9] = ["QUEUE", "VIS", "DLY", "INFL", "DEAD", "AGE", "ADD/S", "DLV/S", "RM/S"];

/// The queue column each order sorts by.
pub fn sorted_column(key: SortKey) -> usize {
    match key {
        SortKey::Name => 0,
        SortKey::Visible => 1,
        SortKey::InFlight => 3,
        SortKey::Age => 5,
        SortKey::AddRate => 6,
    }
}

pub const SHARD_COLUMNS: [&str; 6] = [
    "SHARD",
    "BATCHES/S",
    "AVG BATCH",
    "P99 BATCH",
    "PENDING",
    "CROSS-SHARD/S",
];

pub fn queue_cells(r: &QueueRow) -> [String; 9] {
    [
        format!("{}/{}", r.tenant, r.queue),
        r.visible.to_string(),
        r.delayed.to_string(),
        r.in_flight.to_string(),
        r.dead.to_string(),
        // The gauge is 0 both for no visible message and for one just added.
        if r.visible == 0 {
            "-".into()
        } else {
            age(r.oldest_age_s)
        },
        rate(r.adds_per_s),
        rate(r.deliveries_per_s),
        rate(r.removes_per_s),
    ]
}

pub fn shard_cells(r: &ShardRow) -> [String; 6] {
    [
        r.shard.to_string(),
        rate(r.batches_per_s),
        r.avg_batch_commands.map_or("-".into(), |n| format!("{n:.1}")),
        seconds(r.batch_p99_s),
        r.pending_requests.to_string(),
        rate(r.cross_shard_per_s),
    ]
}

/// The server-wide figures as label/value pairs.
pub fn server_fields(v: &View) -> Vec<(&'static str, String)> {
    let s = &v.server;
    vec![
        ("requests/s", rate(s.requests_per_s)),
        ("p99 request", seconds(s.request_p99_s)),
        ("WAL syncs/s", rate(s.wal_syncs_per_s)),
        ("connections", s.connections.map_or("-".into(), |c| c.to_string())),
        ("RSS", bytes(s.rss_bytes)),
        ("CPU", s.cpu_percent.map_or("-".into(), |p| format!("{p:.0}%"))),
    ]
}

/// A rate: one decimal below 10, whole numbers below 100 000, then k, M.
pub fn rate(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 9.95 => format!("{v:.1}"),
        Some(v) if v < 99_999.5 => format!("{v:.0}"),
        Some(v) if v < 99_999_500.0 => format!("{:.1}k", v / 1e3),
        Some(v) => format!("{:.1}M", v / 1e6),
    }
}

/// A short time: µs, ms or s.
pub fn seconds(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 0.000_999_5 => format!("{:.0}µs", v * 1e6),
        Some(v) if v < 0.999_5 => format!("{:.1}ms", v * 1e3),
        Some(v) => format!("{v:.2}s"),
    }
}

/// An age: milliseconds, seconds, then minutes, hours, days.
pub fn age(v: f64) -> String {
    if v < 0.0 || !v.is_finite() {
        return "-".into();
    }
    if v < 0.9995 {
        return format!("{:.0}ms", v * 1e3);
    }
    if v < 59.95 {
        return format!("{v:.1}s");
    }
    let s = v.round() as u64;
    match s {
        0..3_600 => format!("{}m{:02}s", s / 60, s % 60),
        3_600..86_400 => format!("{}h{:02}m", s / 3_600, s % 3_600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3_600),
    }
}

pub fn bytes(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(b) if b < 1 << 20 => format!("{:.0} KiB", b as f64 / 1024.0),
        Some(b) if b < 1 << 30 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        Some(b) => format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30)),
    }
}

/// Fixed-width text: the first column left-aligned, the rest right.
fn table<const N: usize>(headers: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = headers.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(widths).enumerate() {
            if i == 0 {
                out.push_str(&format!("{cell:<w$}"));
            } else {
                out.push_str(&format!("  {cell:>w$}"));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// The `--once` text report.
pub fn report(v: &View, source: &str) -> String {
    let mut out = format!(
        "queueber top: {source}{}{}\n",
        v.interval_s.map_or(String::new(), |s| format!(", rates over {s:.2} s")),
        match v.server.ready {
            Some(false) => ", NOT READY (recovering or stopping)",
            _ => "",
        }
    );
    let fields: Vec<String> = server_fields(v).into_iter().map(|(k, v)| format!("{k} {v}")).collect();
    out.push_str(&fields.join("   "));
    out.push_str("\n\n");
    out.push_str(&table(
        SHARD_COLUMNS,
        &v.shards.iter().map(shard_cells).collect::<Vec<_>>(),
    ));
    out.push('\n');
    out.push_str(&table(
        QUEUE_COLUMNS,
        &v.queues.iter().map(queue_cells).collect::<Vec<_>>(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_short() {
        assert_eq!(rate(None), "-");
        assert_eq!(rate(Some(0.0)), "0.0");
        assert_eq!(rate(Some(2.34)), "2.3");
        assert_eq!(rate(Some(12345.4)), "12345");
        assert_eq!(rate(Some(250_000.0)), "250.0k");
        assert_eq!(rate(Some(2.5e9)), "2500.0M");
        assert_eq!(seconds(Some(0.000_25)), "250µs");
        assert_eq!(seconds(Some(0.0123)), "12.3ms");
        assert_eq!(seconds(Some(2.5)), "2.50s");
        assert_eq!(age(0.0), "0ms");
        assert_eq!(age(0.046), "46ms");
        assert_eq!(age(1.24), "1.2s");
        assert_eq!(age(125.0), "2m05s");
        assert_eq!(age(7_300.0), "2h01m");
        assert_eq!(age(90_000.0), "1d01h");
        assert_eq!(bytes(Some(26 << 20)), "26.0 MiB");
        assert_eq!(bytes(Some(3 << 30)), "3.00 GiB");
    }

    #[test]
    fn every_sort_key_marks_a_column() {
        for k in SortKey::ALL {
            assert!(sorted_column(k) < QUEUE_COLUMNS.len());
        }
    }

    #[test]
    fn text_tables_align_their_columns() {
        let t = table(["A", "BB"], &[["long".to_string(), "1".to_string()]]);
        assert_eq!(t, "A     BB\nlong   1\n");
    }
}
