//! `queueber top`: a live view of a server for a person at a shell, and
//! one snapshot for scripts (`--once`, with `--json`).
//!
//! It reads the server's metrics endpoint (`GET /metrics`, the Prometheus
//! text format), not the queue protocol: one source of truth with what
//! Prometheus and the dashboards see, and the endpoint already sums the
//! shards and is cheap to scrape (each core answers a snapshot through its
//! inbox; no storage read, no queue operation counted against the load).
//!
//! Layout: [`scrape`] (one blocking HTTP GET), [`model`] (parsing, rates
//! and quantiles; pure), [`format`] (cells and the text report), [`ui`]
//! (the terminal, with ratatui).

mod format;
mod model;
mod scrape;
mod ui;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;

use model::{Snapshot, SortKey};
use scrape::Endpoint;

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The server's metrics endpoint: HOST:PORT (queueberd --metrics-listen),
    /// or http[s]://HOST:PORT/PATH (https: queueberd --metrics-tls; trusts
    /// --tls-ca or the system's roots, presents --tls-client-cert).
    #[arg(
        long = "metrics",
        value_name = "ADDR",
        env = "QUEUEBER_METRICS",
        default_value = "127.0.0.1:9420"
    )]
    pub metrics: String,
    /// Milliseconds between scrapes: the refresh of the live view, and with
    /// --once the gap between the two scrapes that rates need.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=3_600_000))]
    pub interval_ms: u64,
    /// Print one snapshot and exit (text, or one JSON document with --json).
    /// Without --once, --json prints one JSON document per line per interval.
    #[arg(long)]
    pub once: bool,
    /// The queues' first order (keys v, a, i, r, n change it in the live view).
    #[arg(long, value_enum, default_value_t = SortKey::Visible)]
    pub sort: SortKey,
}

/// The `--help` text of `top`: what each figure means.
pub const LONG_ABOUT: &str = "\
A live view of a server, refreshed every --interval-ms (default 1 s).

It reads the server's metrics endpoint (GET /metrics on --metrics, as
queueberd --metrics-listen serves it), not the queue protocol: the same
figures Prometheus sees. Rates are increases between the last two scrapes,
per second; p99s come from the histogram buckets that moved in that interval.

Server line:
  requests/s    requests answered, every operation and result
  p99 request   99th percentile server time of those requests (a long
                poll's wait included)
  WAL syncs/s   fsyncs of the write-ahead log, server-wide
  connections   open client connections
  RSS, CPU      the server process's resident memory and CPU use (100% is
                one core)

Shards (one row each):
  BATCHES/S     storage batches the shard committed per second
  AVG BATCH     commands per storage batch over the interval
  P99 BATCH     99th percentile storage batch time over the interval
  PENDING       requests waiting at the shard's core for the next batch
  CROSS-SHARD/S requests its connections routed to another shard's core

Queues (one row each, sorted by the backlog, visible, unless a key says
otherwise; beyond queueberd --metrics-max-queues they sum into _other/_other):
  VISIBLE       messages ready to be polled now
  DELAYED       messages that become visible later
  IN FLIGHT     messages leased and not yet removed
  DEAD          dead-lettered messages (always 0: there are no dead letters yet)
  OLDEST        age of the oldest visible message
  ADDS/S, DELIVERIES/S, REMOVES/S
                messages added, leased (redeliveries included) and removed
                per second

Narrow terminals abbreviate the queue headers: VIS, DLY, INFL, AGE, ADD/S,
DLV/S, RM/S.

Keys: v visible, a oldest age, i in flight, r add rate, n name (sort);
arrows, PgUp/PgDn, Home/End scroll the queues; q, Esc or Ctrl-C quit.

--once --json prints {\"server\", \"shards\", \"queues\"} with the same figures
(times in seconds, rates per second, null where there is none yet).";

/// Runs `top`; `json` is the CLI's global --json.
pub fn run(args: TopArgs, json: bool, tls: Option<queueber::tls::ClientTls>) -> ExitCode {
    let interval = Duration::from_millis(args.interval_ms);
    let result = Endpoint::parse(&args.metrics).and_then(|mut endpoint| {
        endpoint.tls = tls;
        if args.once {
            once(&endpoint, interval, args.sort, json)
        } else if json {
            stream(&endpoint, interval, args.sort)
        } else {
            ui::run(endpoint, interval, args.sort)
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                println!("{}", json!({ "error": "metrics", "message": e }));
            } else {
                eprintln!("queueber top: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// One scrape, parsed, and when its answer came.
fn scrape(endpoint: &Endpoint, timeout: Duration) -> Result<(Instant, Snapshot), String> {
    let text = endpoint.get(timeout)?;
    let at = Instant::now();
    Ok((at, Snapshot::parse(&text).map_err(|e| e.to_string())?))
}

/// The timeout of one scrape.
fn scrape_timeout(interval: Duration) -> Duration {
    interval.max(Duration::from_secs(5))
}

fn document(endpoint: &Endpoint, view: &model::View) -> serde_json::Value {
    json!({
        "metrics": endpoint.url(),
        "interval_s": view.interval_s,
        "server": view.server,
        "shards": view.shards,
        "queues": view.queues,
    })
}

/// Two scrapes `interval` apart, printed once.
fn once(endpoint: &Endpoint, interval: Duration, sort: SortKey, json: bool) -> Result<(), String> {
    let timeout = scrape_timeout(interval);
    let (t0, first) = scrape(endpoint, timeout)?;
    std::thread::sleep(interval);
    let (t1, second) = scrape(endpoint, timeout)?;
    let mut view = model::view(Some(&first), &second, t1.duration_since(t0).as_secs_f64());
    model::sort_queues(&mut view.queues, sort);
    if json {
        println!("{}", document(endpoint, &view));
    } else {
        print!("{}", format::report(&view, &endpoint.url()));
    }
    Ok(())
}

/// One JSON line per interval, until killed; a failed scrape prints an
/// error line and the next one tries again.
fn stream(endpoint: &Endpoint, interval: Duration, sort: SortKey) -> Result<(), String> {
    use std::io::Write;
    let timeout = scrape_timeout(interval);
    let mut last: Option<(Instant, Snapshot)> = None;
    loop {
        let started = Instant::now();
        let line = match scrape(endpoint, timeout) {
            Ok((at, snapshot)) => {
                let mut view = match &last {
                    Some((t, earlier)) => model::view(Some(earlier), &snapshot, at.duration_since(*t).as_secs_f64()),
                    None => model::view(None, &snapshot, 0.0),
                };
                model::sort_queues(&mut view.queues, sort);
                last = Some((at, snapshot));
                document(endpoint, &view)
            }
            Err(e) => json!({ "error": "metrics", "message": e }),
        };
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) ends the stream.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        drop(out);
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}
