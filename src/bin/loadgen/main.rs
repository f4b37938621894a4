//! loadgen: drives a queueber server with P producers and C consumers (one
//! connection each) and reports throughput, latency percentiles, errors,
//! duplicates, losses and (given its PID) the server's CPU per message.
//!
//! Every payload carries its producer, sequence number and (intended) send
//! time, so end-to-end latency is measured from when the message was meant to
//! be sent: in open-loop mode (`--rate`) a stalled server cannot hide behind
//! a stalled generator (no coordinated omission).

mod backend;
mod procstat;
mod report;
mod workload;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version, about = "Load generator for queueber")]
pub struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub addr: SocketAddr,
    /// What runs at --addr: queueber, or a Redis server as a baseline
    /// (LPUSH / BLMOVE / LREM, -B 1 only; see docs/benchmarks.md).
    #[arg(long, value_enum, default_value_t = backend::Kind::Queueber)]
    pub backend: backend::Kind,
    /// Producer connections.
    #[arg(short = 'P', long, default_value_t = 2)]
    pub producers: usize,
    /// Consumer connections.
    #[arg(short = 'C', long, default_value_t = 2)]
    pub consumers: usize,
    /// Messages per add and most messages per poll.
    #[arg(short = 'B', long, default_value_t = 32)]
    pub batch: usize,
    /// Payload bytes per message (at least 20: the header the generator needs).
    #[arg(short = 'S', long, default_value_t = 256)]
    pub payload: usize,
    /// Number of queues.
    #[arg(short = 'Q', long, default_value_t = 1)]
    pub queues: usize,
    /// Choose queue names so that every shard owns the same number of queues.
    #[arg(long, conflicts_with = "shard")]
    pub per_shard: bool,
    /// Put every queue on this shard.
    #[arg(long)]
    pub shard: Option<usize>,
    /// Tenant of the generated queues.
    #[arg(long, default_value = "loadgen")]
    pub tenant: String,
    /// Lease duration of polls.
    #[arg(long, default_value_t = 30_000)]
    pub lease_ms: u64,
    /// Long-poll wait of consumers.
    #[arg(long, default_value_t = 1_000)]
    pub wait_ms: u64,
    /// Consumers acknowledge each batch in the request that polls the next
    /// (`removeAndPoll`: one round trip per batch instead of two; queueber
    /// only). The remove latency then reports that combined request.
    #[arg(long)]
    pub remove_and_poll: bool,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Closed loop: most messages added but not yet removed.
    #[arg(long, default_value_t = 1024)]
    pub max_unacked: usize,
    /// Requests each producer and consumer keeps in flight per queue it
    /// serves (pipelined on its connection). Default: enough to fill
    /// --max-unacked, at most 64.
    #[arg(long)]
    pub depth: Option<usize>,
    /// Open loop: total messages per second across producers (instead of the closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// PID of the server, to report its CPU per message and peak RSS from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Preload this many messages (in batches of --batch) before starting, then only drain.
    #[arg(long, default_value_t = 0)]
    pub preload: u64,
    /// A label for the JSON line (scenario name).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Access token to present on every connection (queueberd --auth-file).
    #[arg(long, env = "QUEUEBER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Connect with TLS, trusting this CA (PEM); the certificate must name
    /// the IP of --addr.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Seconds to wait for the drain at the end before counting messages lost.
    #[arg(long, default_value_t = 15.0)]
    pub drain_timeout: f64,
}

impl Args {
    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration.max(0.1))
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup.max(0.0))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.payload < workload::HEADER_BYTES {
        eprintln!("loadgen: --payload must be at least {} bytes", workload::HEADER_BYTES);
        return ExitCode::FAILURE;
    }
    if args.backend == backend::Kind::Redis && args.batch != 1 {
        eprintln!("loadgen: --backend redis moves one message per poll; use -B 1");
        return ExitCode::FAILURE;
    }
    let run = queueber::runtime::executor("loadgen", None, 256 << 10).spawn({
        let args = args.clone();
        move || workload::run(args)
    });
    let outcome = match run.map(|h| h.join()) {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => {
            eprintln!("loadgen: executor failed: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match outcome {
        Ok(report) => {
            println!("{}", report.human());
            println!("{}", report.json_line());
            if report.clean() {
                ExitCode::SUCCESS
            } else {
                eprintln!("loadgen: FAILED: duplicates, losses or errors (see above)");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
