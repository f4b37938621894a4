//! The text exposition formats: Prometheus 0.0.4 (what `curl` and most
//! tools read) and OpenMetrics 1.0 (what Prometheus asks for first).
//!
//! Written here rather than with `prometheus-client`: that crate renders
//! OpenMetrics only, from metric objects it owns, while a scrape here is a
//! snapshot of values counted elsewhere (per shard, per queue, folded), and
//! both formats are needed. The two differ in three places, all handled by
//! [`Writer`]: a counter's family name (OpenMetrics drops `_total` in
//! `# TYPE`), the trailing `# EOF`, and the content type.

use std::fmt::Write as _;

use super::Histogram;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    OpenMetrics,
}

impl Format {
    /// The format a scrape asked for in its `Accept` header: OpenMetrics
    /// when it names it, else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Builds one exposition. Families must be written whole, one after
/// another (both formats require a family's samples to be contiguous).
#[derive(Debug)]
pub struct Writer {
    out: String,
    format: Format,
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Writer {
    pub fn new(format: Format) -> Self {
        Self {
            out: String::with_capacity(16 << 10),
            format,
        }
    }

    /// Starts a family. Counter names end in `_total`.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let family = match (kind, self.format) {
            (Kind::Counter, Format::OpenMetrics) => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {family} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {family} {kind}");
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// The `_bucket`, `_sum` and `_count` samples of one histogram.
    pub fn histogram(&mut self, name: &str, labels: Labels<'_>, h: &Histogram) {
        let mut cumulative = 0;
        for (bound, count) in h.bounds.iter().zip(&h.counts) {
            cumulative += count;
            let le = number(*bound);
            let _ = write!(self.out, "{name}_bucket");
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let _ = write!(self.out, "{name}_bucket");
        self.labels(labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", h.count);
        let _ = write!(self.out, "{name}_sum");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", number(h.sum));
        let _ = write!(self.out, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", h.count);
    }

    pub fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }

    fn labels(&mut self, labels: Labels<'_>, le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label_into(&mut self.out, v);
            self.out.push('"');
        }
        self.out.push('}');
    }
}

/// A sample value as both formats spell it (integers without a fraction).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_label_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_differ_between_formats_only_in_the_family_name_and_eof() {
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let mut w = Writer::new(format);
            w.family("x_total", Kind::Counter, "Things.");
            w.sample("x_total", &[("queue", "a\"b")], 3.0);
            let text = w.finish();
            let family = if format == Format::OpenMetrics { "x" } else { "x_total" };
            assert!(text.starts_with(&format!("# HELP {family} Things.\n# TYPE {family} counter\n")));
            assert!(text.contains("x_total{queue=\"a\\\"b\"} 3\n"), "{text}");
            assert_eq!(text.ends_with("# EOF\n"), format == Format::OpenMetrics);
        }
    }

    #[test]
    fn histograms_are_cumulative_with_an_inf_bucket() {
        let mut h = Histogram::new(&[0.5, 1.0]);
        h.observe(0.1);
        h.observe(0.7);
        h.observe(5.0);
        let mut w = Writer::new(Format::Prometheus);
        w.family("d", Kind::Histogram, "D.");
        w.histogram("d", &[("op", "add")], &h);
        let text = w.finish();
        assert!(text.contains("d_bucket{op=\"add\",le=\"0.5\"} 1\n"), "{text}");
        assert!(text.contains("d_bucket{op=\"add\",le=\"1\"} 2\n"));
        assert!(text.contains("d_bucket{op=\"add\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("d_sum{op=\"add\"} 5.8\n"));
        assert!(text.contains("d_count{op=\"add\"} 3\n"));
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Prometheus);
    }
}
