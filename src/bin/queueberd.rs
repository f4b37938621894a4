//! queueberd: the queueber server daemon. `queueberd --help` lists every flag;
//! each can also be set through the environment variable it names.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use queueber::clock::SystemClock;
use queueber::server::backup::BackupConfig;
use queueber::server::{self, ServerConfig, ServerLimits};
use queueber::storage::Durability;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DurabilityMode {
    /// Acknowledge an add only after its WAL record is fsynced (one sync, on
    /// a syncer thread, covers every batch written before it).
    Fsync,
    /// Fsync the WAL in the background every --sync-interval-ms.
    Periodic,
    /// Write the WAL without fsync: survives a crash of the process, not of the host.
    Wal,
}

#[derive(Debug, Parser)]
#[command(name = "queueberd", version, about = "The queueber durable work-queue server")]
struct Args {
    /// Address to listen on (every shard binds it with SO_REUSEPORT).
    #[arg(long, env = "QUEUEBER_LISTEN", default_value = "127.0.0.1:7420")]
    listen: SocketAddr,

    /// Where the RocksDB data lives.
    #[arg(long, env = "QUEUEBER_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,

    /// Number of shards (executors, one per core); default: the CPUs this process may use.
    #[arg(long, env = "QUEUEBER_SHARDS")]
    shards: Option<usize>,

    /// Do not pin shard executors to CPUs.
    #[arg(long, env = "QUEUEBER_NO_PIN")]
    no_pin: bool,

    /// When an acknowledged write is on stable storage.
    #[arg(long, env = "QUEUEBER_DURABILITY", value_enum, default_value_t = DurabilityMode::Fsync)]
    durability: DurabilityMode,

    /// WAL fsync interval of --durability periodic.
    #[arg(long, env = "QUEUEBER_SYNC_INTERVAL_MS", default_value_t = Durability::DEFAULT_PERIOD.as_millis() as u64)]
    sync_interval_ms: u64,

    /// Largest request frame, in bytes.
    #[arg(long, env = "QUEUEBER_MAX_FRAME_BYTES", default_value_t = ServerLimits::default().max_frame_bytes)]
    max_frame_bytes: usize,

    /// Most messages in one add (and ids in one remove).
    #[arg(long, env = "QUEUEBER_MAX_MESSAGES_PER_ADD", default_value_t = ServerLimits::default().max_messages_per_add)]
    max_messages_per_add: usize,

    /// Largest message payload, in bytes.
    #[arg(long, env = "QUEUEBER_MAX_PAYLOAD_BYTES", default_value_t = ServerLimits::default().max_payload_bytes)]
    max_payload_bytes: usize,

    /// Most messages one poll returns.
    #[arg(long, env = "QUEUEBER_MAX_ITEMS_PER_POLL", default_value_t = ServerLimits::default().max_items_per_poll)]
    max_items_per_poll: u32,

    /// Longest long-poll wait, in milliseconds.
    #[arg(long, env = "QUEUEBER_MAX_WAIT_MS", default_value_t = ServerLimits::default().max_wait_ms)]
    max_wait_ms: u64,

    /// Most pipelined requests in flight on one connection.
    #[arg(long, env = "QUEUEBER_MAX_IN_FLIGHT", default_value_t = ServerLimits::default().max_in_flight_per_connection)]
    max_in_flight: usize,

    /// Most open connections.
    #[arg(long, env = "QUEUEBER_MAX_CONNECTIONS", default_value_t = ServerLimits::default().max_connections)]
    max_connections: usize,

    /// Server-wide cap on connection buffers (requests read and not answered,
    /// answers not written, frames being received); reading stops while it is
    /// used up. Default: 1/16 of physical memory, between 64 MiB and 1 GiB.
    #[arg(long, env = "QUEUEBER_MAX_BUFFERED_BYTES", default_value_t = ServerLimits::default().max_buffered_bytes)]
    max_buffered_bytes: usize,

    /// One connection's share of --max-buffered-bytes: a connection holding
    /// more in unanswered requests and unread answers is not read from.
    #[arg(long, env = "QUEUEBER_MAX_BUFFERED_BYTES_PER_CONNECTION", default_value_t = ServerLimits::default().max_buffered_bytes_per_connection)]
    max_buffered_bytes_per_connection: usize,

    /// Close a connection whose frame in progress, or whose unread answers,
    /// make no progress for this long (milliseconds).
    #[arg(long, env = "QUEUEBER_STALL_TIMEOUT_MS", default_value_t = ServerLimits::default().stall_timeout_ms)]
    stall_timeout_ms: u64,

    /// Refuse adds (error diskFull) while the data directory's filesystem has
    /// less free space than this; the rest is headroom for polls, removes,
    /// flushes and compactions.
    #[arg(long, env = "QUEUEBER_MIN_FREE_DISK_MIB", default_value_t = queueber::storage::disk::DEFAULT_MIN_FREE_BYTES >> 20)]
    min_free_disk_mib: u64,

    /// Spin an idle shard this many microseconds before parking it (lower
    /// latency for cross-shard requests, more CPU when lightly loaded; 0 = off).
    #[arg(long, env = "QUEUEBER_SPIN_BEFORE_PARK_US", default_value_t = 0)]
    spin_before_park_us: u64,

    /// How long a shard's executor hands its CPU to its storage thread while
    /// a storage batch runs, before it parks (microseconds; 0 = park at
    /// once). Not while batches take longer than this.
    #[arg(long, env = "QUEUEBER_OFFLOAD_YIELD_US", default_value_t = queueber::server::config::DEFAULT_OFFLOAD_YIELD.as_micros() as u64)]
    offload_yield_us: u64,

    /// Where to serve metrics (`GET /metrics`, Prometheus or OpenMetrics
    /// text), `/healthz` and `/readyz` over HTTP; `off` serves none.
    #[arg(long, env = "QUEUEBER_METRICS_LISTEN", default_value = "127.0.0.1:9420", value_parser = parse_metrics_listen)]
    metrics_listen: MetricsListen,

    /// Per-queue metric series beyond this many queues (in name order) are
    /// summed into one `tenant="_other",queue="_other"` series.
    #[arg(long, env = "QUEUEBER_METRICS_MAX_QUEUES", default_value_t = queueber::server::config::DEFAULT_METRICS_MAX_QUEUES)]
    metrics_max_queues: usize,

    /// Log a request at warn when it takes longer than this many
    /// milliseconds (a long poll: its last attempt, not its wait), with
    /// where the time went; 0 logs none.
    #[arg(long, env = "QUEUEBER_SLOW_REQUEST_MS", default_value_t = queueber::server::config::DEFAULT_SLOW_REQUEST_MS)]
    slow_request_ms: u64,

    /// A TOML file of access tokens (`queueber token new` makes entries).
    /// Clients must then present one (`auth`) before anything but `hello`,
    /// and are held to its tenant, permissions and queue patterns.
    #[arg(long, env = "QUEUEBER_AUTH_FILE")]
    auth_file: Option<PathBuf>,

    /// Listen on a non-loopback address without --auth-file anyway
    /// (anyone who reaches the port can then read and delete every queue).
    #[arg(long, env = "QUEUEBER_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,

    /// Serve TLS 1.2/1.3 on --listen with this certificate chain (PEM, the
    /// leaf first); needs --tls-key. Reloaded on SIGHUP.
    #[arg(long, env = "QUEUEBER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "QUEUEBER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM) on the TLS port.
    #[arg(long, env = "QUEUEBER_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// Serve the metrics endpoint over TLS too, with --tls-cert (and
    /// requiring client certificates if --tls-client-ca is given).
    #[arg(long, env = "QUEUEBER_METRICS_TLS", requires = "tls_cert")]
    metrics_tls: bool,

    /// The lease, in milliseconds, of a poll that names none (leaseMs 0) on
    /// a queue whose policy sets none.
    #[arg(long, env = "QUEUEBER_DEFAULT_LEASE_MS", default_value_t = queueber::storage::engine::DEFAULT_LEASE_MS,
          value_parser = clap::value_parser!(u64).range(1..=queueber::storage::MAX_DURATION_MS))]
    default_lease_ms: u64,

    /// Most messages a queue holds (visible, delayed, in flight) where its
    /// policy sets no max-depth: a number, or `unlimited`.
    #[arg(long, env = "QUEUEBER_DEFAULT_MAX_DEPTH", default_value = "unlimited", value_parser = parse_bound)]
    default_max_depth: u64,

    /// Most payload bytes a queue holds where its policy sets no max-bytes:
    /// a number, or `unlimited`.
    #[arg(long, env = "QUEUEBER_DEFAULT_MAX_BYTES", default_value = "unlimited", value_parser = parse_bound)]
    default_max_bytes: u64,

    /// Delays before a failed delivery's message is visible again, where a
    /// queue's policy sets none: comma-separated milliseconds (the n-th
    /// after the n-th failure, the last repeating, at most 8), or `none`.
    #[arg(long, env = "QUEUEBER_DEFAULT_RETRY_BACKOFF_MS", default_value = "none", value_parser = parse_backoff)]
    default_retry_backoff_ms: Backoff,

    /// Deliveries after which a message that is not removed is
    /// dead-lettered, where a queue's policy sets none: 1 to 1000, or
    /// `unlimited`.
    #[arg(long, env = "QUEUEBER_DEFAULT_MAX_DELIVERIES", default_value = "unlimited", value_parser = parse_max_deliveries)]
    default_max_deliveries: u64,

    /// How long a message may stay, from its first add, before it is
    /// dropped (visible, delayed or dead; in flight, when its lease ends),
    /// where a queue's policy sets no retention: milliseconds, or `forever`.
    #[arg(long, env = "QUEUEBER_DEFAULT_RETENTION_MS", default_value = "forever", value_parser = parse_retention)]
    default_retention_ms: u64,

    /// Write online backups (consistent copies of the database, each a
    /// directory a server can open as its --data-dir) into this directory:
    /// every --backup-interval-ms, and whenever the server gets SIGUSR1.
    /// Must not be inside --data-dir.
    #[arg(long, env = "QUEUEBER_BACKUP_DIR")]
    backup_dir: Option<PathBuf>,

    /// Milliseconds from the end of one backup to the start of the next (the
    /// first this long after startup), at least 1000; `off`: only on
    /// SIGUSR1. Needs --backup-dir.
    #[arg(long, env = "QUEUEBER_BACKUP_INTERVAL_MS", default_value = "off", value_parser = parse_backup_interval)]
    backup_interval_ms: BackupInterval,

    /// How many backups to keep in --backup-dir (the newest; older ones are
    /// removed after each new one); 0 keeps every one.
    #[arg(long, env = "QUEUEBER_BACKUP_KEEP", default_value_t = 3)]
    backup_keep: usize,

    /// Most queues the server holds, of all tenants; an add or createQueue
    /// that would create one more is refused (queueFull). About 1.2 KiB of
    /// memory each, empty: a positive number, or `unlimited`.
    #[arg(long, env = "QUEUEBER_MAX_QUEUES", default_value_t = queueber::storage::engine::DEFAULT_MAX_QUEUES, value_parser = parse_bound)]
    max_queues: u64,

    /// RocksDB block cache, in MiB.
    #[arg(long, env = "QUEUEBER_BLOCK_CACHE_MIB", default_value_t = 128)]
    block_cache_mib: usize,

    /// Log filter (tracing EnvFilter syntax, e.g. "info" or "queueber=debug").
    #[arg(long, env = "QUEUEBER_LOG", default_value = "info")]
    log: String,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "QUEUEBER_LOG_JSON")]
    log_json: bool,
}

/// `--default-retry-backoff-ms`: steps, or none.
#[derive(Debug, Clone, Copy)]
struct Backoff(Option<queueber::types::RetryBackoff>);

fn parse_backoff(value: &str) -> Result<Backoff, String> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(Backoff(None));
    }
    let steps = value
        .split(',')
        .map(|s| s.trim().parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("{value:?}: expected milliseconds like 1000,5000,30000, or none"))?;
    if let Some(step) = steps.iter().find(|&&s| s > queueber::storage::MAX_DURATION_MS) {
        return Err(format!(
            "step {step} is over the longest delay, {} ms",
            queueber::storage::MAX_DURATION_MS
        ));
    }
    queueber::types::RetryBackoff::new(&steps).map(|b| Backoff(Some(b)))
}

/// `--default-max-deliveries`: 1 to 1000, or `unlimited`.
fn parse_max_deliveries(value: &str) -> Result<u64, String> {
    let limit = queueber::types::MAX_DELIVERIES_LIMIT;
    match parse_bound(value)? {
        n if n <= limit || n == queueber::types::UNLIMITED => Ok(n),
        n => Err(format!("{n}: 1 to {limit}, or unlimited")),
    }
}

/// `--default-retention-ms`: milliseconds (at most the longest duration),
/// or `forever`.
fn parse_retention(value: &str) -> Result<u64, String> {
    if value.eq_ignore_ascii_case("forever") {
        return Ok(queueber::types::UNLIMITED);
    }
    match parse_bound(value)? {
        n if n <= queueber::storage::MAX_DURATION_MS || n == queueber::types::UNLIMITED => Ok(n),
        n => Err(format!(
            "{n}: at most {} ms, or forever",
            queueber::storage::MAX_DURATION_MS
        )),
    }
}

/// `--backup-interval-ms`: milliseconds, or off.
#[derive(Debug, Clone, Copy)]
struct BackupInterval(Option<Duration>);

/// A shorter interval would spend the disk on backups rather than queues.
const MIN_BACKUP_INTERVAL_MS: u64 = 1000;

fn parse_backup_interval(value: &str) -> Result<BackupInterval, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(BackupInterval(None));
    }
    match value.parse::<u64>() {
        Ok(ms) if ms >= MIN_BACKUP_INTERVAL_MS => Ok(BackupInterval(Some(Duration::from_millis(ms)))),
        _ => Err(format!(
            "{value:?}: expected milliseconds, at least {MIN_BACKUP_INTERVAL_MS}, or off"
        )),
    }
}

/// A queue bound: a positive number, or `unlimited`.
fn parse_bound(value: &str) -> Result<u64, String> {
    if value.eq_ignore_ascii_case("unlimited") {
        return Ok(queueber::types::UNLIMITED);
    }
    match value.parse::<u64>() {
        Ok(0) | Err(_) => Err(format!("{value:?}: expected a positive number, or unlimited")),
        Ok(n) => Ok(n),
    }
}

/// `--metrics-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
struct MetricsListen(Option<std::net::SocketAddr>);

fn parse_metrics_listen(value: &str) -> Result<MetricsListen, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(MetricsListen(None));
    }
    value
        .parse()
        .map(|addr| MetricsListen(Some(addr)))
        .map_err(|e| format!("{e}: expected an address such as 127.0.0.1:9420, or off"))
}

/// Reads the auth file and the TLS certificate again on every SIGHUP, from
/// a thread of its own (a file that fails to load keeps what is in use and
/// says why). A revoked token's connections are closed; new handshakes use
/// the new certificate, open sessions keep theirs. With neither, SIGHUP is
/// only caught, and ignored.
fn reload_on_sighup(
    access: Option<Arc<queueber::auth::Access>>,
    tls: Option<queueber::tls::ServerTls>,
) -> std::io::Result<()> {
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
    if access.is_none() && tls.is_none() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("queueber-reload".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            if !hup.swap(false, std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            if let Some(access) = &access {
                match access.reload() {
                    Ok(tokens) => tracing::info!(tokens, "auth file reloaded"),
                    Err(e) => tracing::error!("auth file reload failed, the old tokens stay: {e}"),
                }
            }
            if let Some(tls) = &tls {
                match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => tracing::error!("TLS reload failed, the certificate in use stays: {e}"),
                }
            }
        })?;
    Ok(())
}

fn default_data_dir() -> PathBuf {
    // XDG data home, so a user-run server keeps its data across reboots.
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join("queueber")
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("queueberd: invalid --log filter {:?}: {e}", args.log);
            return ExitCode::FAILURE;
        }
    };
    // Colours only on a terminal: a log file or journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }

    let mut config = ServerConfig::new(args.listen, &args.data_dir);
    if let Some(shards) = args.shards {
        config.shards = shards.max(1);
    }
    config.pin = !args.no_pin;
    config.durability = match args.durability {
        DurabilityMode::Fsync => Durability::Fsync,
        DurabilityMode::Periodic => Durability::Periodic(Duration::from_millis(args.sync_interval_ms.max(1))),
        DurabilityMode::Wal => Durability::Wal,
    };
    config.block_cache_bytes = args.block_cache_mib << 20;
    config.spin_before_park = (args.spin_before_park_us > 0).then(|| Duration::from_micros(args.spin_before_park_us));
    config.offload_yield = Duration::from_micros(args.offload_yield_us);
    config.limits = ServerLimits {
        max_frame_bytes: args.max_frame_bytes,
        max_messages_per_add: args.max_messages_per_add,
        max_payload_bytes: args.max_payload_bytes,
        max_items_per_poll: args.max_items_per_poll,
        max_wait_ms: args.max_wait_ms,
        max_in_flight_per_connection: args.max_in_flight,
        max_connections: args.max_connections,
        max_buffered_bytes: args.max_buffered_bytes,
        max_buffered_bytes_per_connection: args.max_buffered_bytes_per_connection,
        stall_timeout_ms: args.stall_timeout_ms,
    };
    config.min_free_disk_bytes = args.min_free_disk_mib << 20;
    config.max_queues = args.max_queues;
    config.default_policy = queueber::types::QueuePolicy {
        lease_ms: Some(args.default_lease_ms),
        max_depth: Some(args.default_max_depth),
        max_bytes: Some(args.default_max_bytes),
        max_payload_bytes: None,
        retry_backoff_ms: args.default_retry_backoff_ms.0,
        max_deliveries: Some(args.default_max_deliveries),
        retention_ms: Some(args.default_retention_ms),
    };
    config.metrics_listen = args.metrics_listen.0;
    config.metrics_max_queues = args.metrics_max_queues;
    config.slow_request = (args.slow_request_ms > 0).then(|| Duration::from_millis(args.slow_request_ms));
    match &args.auth_file {
        Some(path) => match queueber::auth::Access::load(path) {
            Ok(access) => {
                let access = Arc::new(access);
                tracing::info!(path = %path.display(), tokens = access.token_count(), "access control on");
                config.access = Some(access);
            }
            Err(e) => {
                tracing::error!("invalid --auth-file: {e}");
                return ExitCode::FAILURE;
            }
        },
        None if !args.listen.ip().is_loopback() && !args.insecure_no_auth => {
            tracing::error!(
                "refusing to listen on {} without --auth-file: anyone who reaches it could read and delete every queue (give --auth-file, or --insecure-no-auth to accept that)",
                args.listen
            );
            return ExitCode::FAILURE;
        }
        None => {}
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let files = queueber::tls::ServerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        };
        match queueber::tls::ServerTls::load(&files) {
            Ok(tls) => {
                tracing::info!(
                    cert = %cert.display(),
                    client_certificates = if tls.requires_client_certificates() { "required" } else { "not asked" },
                    "TLS on"
                );
                config.tls = Some(tls);
                config.metrics_tls = args.metrics_tls;
            }
            Err(e) => {
                tracing::error!("invalid TLS configuration: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // Installed even with nothing to reload: SIGHUP's default action would
    // end the process with no drain and no final WAL sync (a `systemctl
    // reload` or a closed terminal).
    if let Err(e) = reload_on_sighup(config.access.clone(), config.tls.clone()) {
        tracing::error!(error = %e, "cannot install the SIGHUP handler");
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::create_dir_all(&config.data_dir) {
        tracing::error!(dir = %config.data_dir.display(), error = %e, "cannot create the data directory");
        return ExitCode::FAILURE;
    }

    // SIGUSR1 asks for a backup. Registered even without --backup-dir (then
    // it is ignored), so that it never ends the process, as it would by
    // default.
    let backup_now = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGUSR1, backup_now.clone()) {
        tracing::error!(error = %e, "cannot install the SIGUSR1 handler");
        return ExitCode::FAILURE;
    }
    match (&args.backup_dir, args.backup_interval_ms.0) {
        // The directory is checked by the server as it starts
        // (`BackupConfig::prepare`).
        (Some(dir), every) => {
            config.backup = Some(BackupConfig {
                dir: dir.clone(),
                every,
                keep: args.backup_keep,
                now: backup_now,
            });
        }
        (None, Some(_)) => {
            tracing::error!("--backup-interval-ms needs --backup-dir");
            return ExitCode::FAILURE;
        }
        (None, None) => {}
    }

    // Signals first, so a SIGTERM during a long recovery still stops the
    // server gracefully once it is up. A second signal exits at once.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let registered = signal_hook::flag::register_conditional_shutdown(signal, 1, stop.clone())
            .and_then(|_| signal_hook::flag::register(signal, stop.clone()));
        if let Err(e) = registered {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    }
    let handle = match server::start_with_stop(config, Arc::new(SystemClock), stop) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "failed to start");
            return ExitCode::FAILURE;
        }
    };
    match handle.wait() {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "stopped with an error");
            ExitCode::FAILURE
        }
    }
}
