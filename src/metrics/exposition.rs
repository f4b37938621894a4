//! The text exposition formats, written by `prometheus-client`: Prometheus
//! 0.0.4 (what `curl` and most tools read) and OpenMetrics 1.0 (what
//! Prometheus asks for first).
//!
//! A scrape here is a snapshot of values counted elsewhere (per shard, per
//! queue, folded), not metric objects registered once, so the catalogue
//! ([`super::render`]) is a `prometheus-client` [`Collector`] run once per
//! scrape over that snapshot; this module is the narrow adaptor it writes
//! through ([`Families`]). The crate owns everything the two formats
//! disagree on (a counter's family name, `# EOF`, float spelling, escaping),
//! so we do not.

use std::collections::HashMap;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

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
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Renders what `collector` writes in `format`.
pub fn encode(collector: impl Collector, format: Format) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::with_capacity(16 << 10);
    match format {
        Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?,
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Where a [`Collector`] writes its families, one whole family at a time
/// (both formats require a family's samples to be contiguous).
pub struct Families<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl<'a> Families<'a> {
    pub fn new(encoder: DescriptorEncoder<'a>) -> Self {
        Self { encoder }
    }

    /// Starts a family. Counter names are given as exposed, ending in
    /// `_total`; the crate adds that suffix itself, so it is taken off here.
    pub fn family<'s>(&'s mut self, name: &'s str, kind: Kind, help: &str) -> Result<Family<'s>, fmt::Error> {
        let (name, metric_type) = match kind {
            Kind::Counter => (name.strip_suffix("_total").unwrap_or(name), MetricType::Counter),
            Kind::Gauge => (name, MetricType::Gauge),
            Kind::Histogram => (name, MetricType::Histogram),
        };
        let metric = self.encoder.encode_descriptor(name, help, None, metric_type)?;
        Ok(Family { metric, kind })
    }
}

/// A sample value: integers are written without a fraction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(u64::from(v))
    }
}

/// One family being written.
pub struct Family<'s> {
    metric: MetricEncoder<'s>,
    kind: Kind,
}

// No exemplars are written; the encoder's signatures still name their types.
const NO_EXEMPLAR: Option<&Exemplar<NoLabelSet, f64>> = None;
const NO_EXEMPLARS: Option<&HashMap<usize, Exemplar<NoLabelSet, f64>>> = None;

impl Family<'_> {
    /// One counter or gauge sample.
    pub fn sample(&mut self, labels: Labels<'_>, value: impl Into<Value>) -> fmt::Result {
        let value = value.into();
        if labels.is_empty() {
            write_value(&mut self.metric, self.kind, value)
        } else {
            write_value(&mut self.metric.encode_family(&labels)?, self.kind, value)
        }
    }

    /// The `_bucket`, `_sum` and `_count` samples of one histogram.
    pub fn histogram(&mut self, labels: Labels<'_>, h: &Histogram) -> fmt::Result {
        // The crate takes per-bucket counts (it sums them) ending with +Inf.
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.counts.iter().copied())
            .collect();
        if labels.is_empty() {
            self.metric.encode_histogram(h.sum, h.count, &buckets, NO_EXEMPLARS)
        } else {
            self.metric
                .encode_family(&labels)?
                .encode_histogram(h.sum, h.count, &buckets, NO_EXEMPLARS)
        }
    }
}

fn write_value(metric: &mut MetricEncoder<'_>, kind: Kind, value: Value) -> fmt::Result {
    match (kind, value) {
        (Kind::Counter, Value::Int(v)) => metric.encode_counter(&v, NO_EXEMPLAR),
        (Kind::Counter, Value::Float(v)) => metric.encode_counter(&v, NO_EXEMPLAR),
        (_, Value::Int(v)) => metric.encode_gauge(&v),
        (_, Value::Float(v)) => metric.encode_gauge(&v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct One(Kind, &'static str, Vec<(&'static str, &'static str)>, Option<Histogram>);

    impl Collector for One {
        fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
            let mut families = Families::new(encoder);
            let mut family = families.family(self.1, self.0, "Things.")?;
            match &self.3 {
                Some(h) => family.histogram(&self.2, h),
                None => family.sample(&self.2, 3u64),
            }
        }
    }

    #[test]
    fn counters_differ_between_formats_only_in_the_family_name_and_eof() {
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let text = encode(One(Kind::Counter, "x_total", vec![("queue", "a\"b")], None), format).unwrap();
            let family = if format == Format::OpenMetrics { "x" } else { "x_total" };
            assert!(
                text.starts_with(&format!("# HELP {family} Things.\n# TYPE {family} counter\n")),
                "{text}"
            );
            assert!(text.contains("x_total{queue=\"a\\\"b\"} 3\n"), "{text}");
            assert_eq!(text.ends_with("# EOF\n"), format == Format::OpenMetrics);
        }
    }

    #[test]
    fn a_sample_without_labels_has_no_braces() {
        let text = encode(One(Kind::Gauge, "g", vec![], None), Format::Prometheus).unwrap();
        assert!(text.contains("\ng 3\n"), "{text}");
    }

    #[test]
    fn histograms_are_cumulative_with_an_inf_bucket() {
        let mut h = Histogram::new(&[0.5, 1.0]);
        h.observe(0.1);
        h.observe(0.7);
        h.observe(5.0);
        let text = encode(
            One(Kind::Histogram, "d", vec![("op", "add")], Some(h)),
            Format::Prometheus,
        )
        .unwrap();
        assert!(text.contains("d_bucket{op=\"add\",le=\"0.5\"} 1\n"), "{text}");
        assert!(text.contains("d_bucket{op=\"add\",le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("d_bucket{op=\"add\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("d_sum{op=\"add\"} 5.8\n"), "{text}");
        assert!(text.contains("d_count{op=\"add\"} 3\n"), "{text}");
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
