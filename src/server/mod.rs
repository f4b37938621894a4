//! The queueber daemon: thread-per-core shards on glommio.
//!
//! [`start`] opens the shared RocksDB, then starts one executor per shard,
//! each pinned to its own CPU. Every shard:
//!
//! * binds the listen address with SO_REUSEPORT and accepts its own
//!   connections ([`connection`]), after a TLS handshake when the port
//!   speaks TLS ([`handshake`]);
//! * owns the queues whose stable hash maps to it, through its own
//!   [`ShardStore`] driven by its [`core`] (coalescer, long-poll waiters,
//!   sweeper) on its blocking-offload thread;
//! * routes requests for other shards' queues over cross-core channels
//!   ([`router`]).
//!
//! Shutdown (SIGINT/SIGTERM or [`ServerHandle::shutdown`]): stop accepting,
//! answer parked long polls empty, finish every request already read, then
//! stop the cores and sync the WAL.

mod accept;
pub mod backup;
mod budget;
pub mod config;
mod connection;
mod core;
mod handshake;
mod http;
mod router;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use budget::BufferBudget;
pub use config::{ServerConfig, ServerLimits};
use connection::{ShardContext, Signal};
use router::{Mesh, Router, ShardLinks};

use crate::clock::{Clock, SystemClock};
use crate::names::QueueName;
use crate::protocol::{Limits, ServerInfo};
use crate::runtime;
use crate::storage::{Engine, EngineOptions, QueueStore, ShardStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Storage(#[from] StoreError),
    #[error(transparent)]
    Memlock(#[from] runtime::MemlockError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("shard executor: {0}")]
    Executor(String),
    #[error("configuration: {0}")]
    Config(String),
}

/// How long shutdown waits for open connections to finish their requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a shard looks at the process-wide stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    shards: Vec<glommio::ExecutorJoinHandle<Result<(), ServerError>>>,
    engine: Arc<Engine>,
    metrics: Option<http::Endpoint>,
    backups: Option<backup::Backups>,
}

impl ServerHandle {
    /// The address clients connect to (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the metrics endpoint listens, if it does.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(http::Endpoint::local_addr)
    }

    /// What the backup thread has done (`None`: no `backup` configured).
    pub fn backup_figures(&self) -> Option<backup::BackupFigures> {
        self.backups.as_ref().map(backup::Backups::figures)
    }

    /// Stops the server gracefully and waits until it has.
    pub fn shutdown(self) -> Result<(), ServerError> {
        self.stop.store(true, Ordering::SeqCst);
        self.wait()
    }

    /// Waits until the server stops (after its stop flag is set).
    pub fn wait(mut self) -> Result<(), ServerError> {
        let mut first_error = None;
        for shard in self.shards {
            let result = shard
                .join()
                .map_err(|e| ServerError::Executor(e.to_string()))
                .and_then(|r| r);
            if let Err(e) = result {
                tracing::error!(error = %e, "shard stopped with an error");
                first_error.get_or_insert(e);
            }
        }
        // The endpoint holds the engine for its figures: it goes first.
        drop(self.metrics.take());
        // A backup being written is finished, so the database closes cleanly.
        if let Some(backups) = self.backups.take() {
            backups.join();
        }
        self.engine.sync_wal()?;
        drop(self.engine);
        first_error.map_or(Ok(()), Err)
    }
}

/// Starts a server with the system clock.
pub fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    start_with_clock(config, Arc::new(SystemClock))
}

/// Starts a server; returns once every shard is accepting connections.
pub fn start_with_clock(config: ServerConfig, clock: Arc<dyn Clock>) -> Result<ServerHandle, ServerError> {
    start_with_stop(config, clock, Arc::new(AtomicBool::new(false)))
}

/// Refuses a listen address where a server is already listening. Shards bind
/// with SO_REUSEPORT, which would otherwise let two servers share a port and
/// split its connections between them. A test bind cannot tell: it also
/// fails on the TIME_WAIT leftovers of a previous run. A connect can.
///
/// A server that was just killed may still be listening for a moment: its
/// io_uring holds the socket until the kernel tears the ring down. So a busy
/// port is retried for [`PORT_RELEASE_WAIT`] before it counts as taken;
/// binding next to such a leftover would hand it some of our connections.
fn check_port_free(addr: SocketAddr) -> Result<(), ServerError> {
    if addr.port() == 0 {
        return Ok(());
    }
    let listening = || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            // A connect to an unused port in the ephemeral range can connect
            // the socket to itself (TCP simultaneous open): not a listener.
            .is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
    };
    let deadline = Instant::now() + PORT_RELEASE_WAIT;
    while listening() {
        if Instant::now() >= deadline {
            return Err(ServerError::Io {
                context: format!("{addr} is already in use (another queueberd?)"),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// How long a busy listen port may take to be released by a dead server.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Starts a server that stops when `stop` is set (signal handlers may set it
/// before the server is up; it then stops right after starting).
pub fn start_with_stop(
    mut config: ServerConfig,
    clock: Arc<dyn Clock>,
    stop: Arc<AtomicBool>,
) -> Result<ServerHandle, ServerError> {
    check_port_free(config.listen)?;
    // The endpoint binds with SO_REUSEPORT too: a second server would share
    // the port and answer every other scrape with its own figures.
    if let Some(metrics) = config.metrics_listen {
        check_port_free(metrics)?;
    }
    config.limits = config.limits.normalized();
    let shards = config.shards.max(1);
    // One executor per shard, and one for the metrics endpoint.
    let executors = shards + 1;
    let locked = runtime::raise_memlock(
        runtime::MIN_MEMLOCK_BYTES + (config.io_memory * executors) as u64,
        (config.io_memory as u64 + (8 << 20)) * executors as u64,
    )?;
    let max_connections = accept::size_descriptors(config.limits.max_connections);
    tracing::debug!(locked, "RLIMIT_MEMLOCK");
    // Up before recovery, so that /readyz can say it is not done.
    let status = http::Status::new(config.metrics_max_queues);
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let tls = match (&config.tls, config.metrics_tls) {
                (Some(tls), true) => Some(tls.clone()),
                (None, true) => {
                    return Err(ServerError::Config(
                        "--metrics-tls needs --tls-cert and --tls-key".into(),
                    ))
                }
                (_, false) => None,
            };
            let endpoint = http::Endpoint::start(addr, status.clone(), config.io_memory, tls)?;
            tracing::info!(addr = %endpoint.local_addr(), "metrics endpoint listening");
            Some(endpoint)
        }
        None => None,
    };
    let engine = Engine::open(
        &config.data_dir,
        EngineOptions {
            durability: config.durability,
            max_payload_bytes: config.limits.max_payload_bytes,
            // A poll reply must fit the frames clients are told about.
            // Headroom for the framing of each message in the reply.
            max_poll_bytes: config
                .limits
                .max_frame_bytes
                .saturating_sub(64 << 10)
                .max(config.limits.max_payload_bytes),
            block_cache_bytes: config.block_cache_bytes,
            write_buffer_bytes: config.write_buffer_bytes,
            min_free_disk_bytes: config.min_free_disk_bytes,
            default_policy: config.default_policy,
            max_queues: config.max_queues,
        },
        clock,
    )?;
    // The data directory exists now: the backup directory is checked
    // against it before any shard starts.
    if let Some(backup) = &config.backup {
        backup.prepare(&config.data_dir).map_err(ServerError::Config)?;
    }
    let connections = Arc::new(AtomicUsize::new(0));
    status.set_engine(engine.clone(), connections.clone());
    if let Some(access) = &config.access {
        status.set_access(access.clone());
    }
    let budget = BufferBudget::new(
        config.limits.max_buffered_bytes,
        config.limits.max_buffered_bytes_per_connection,
    );
    let cpus = runtime::allowed_cpus();
    let info = ServerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        shards: shards as u32,
        limits: Limits {
            // What this server will actually accept (fewer when descriptors are short).
            max_connections: u32::try_from(max_connections).unwrap_or(u32::MAX),
            ..config.limits.announce()
        },
        disk_full: false,
        auth_required: config.access.is_some(),
    };
    let mut mesh = Mesh::new(shards);
    let (bound_tx, bound_rx) = crossbeam_channel::bounded(shards);
    let mut addr = config.listen;
    let mut handles = Vec::with_capacity(shards);
    for index in 0..shards {
        let owns = Arc::new(move |q: &QueueName| q.shard(shards) == index);
        let store = ShardStore::open(engine.clone(), owns)?;
        let cpu = (config.pin && !cpus.is_empty()).then(|| cpus[index % cpus.len()]);
        let shard = Shard {
            index,
            shards,
            store: Box::new(store),
            listen: addr,
            links: mesh.take(index),
            limits: config.limits.clone(),
            info: info.clone(),
            stop: stop.clone(),
            connections: connections.clone(),
            max_connections,
            budget: budget.clone(),
            engine: engine.clone(),
            clock: engine.clock().clone(),
            bound: bound_tx.clone(),
            status: status.clone(),
            slow_request: config.slow_request,
            access: config.access.clone(),
            tls: config.tls.clone(),
            hand_off: core::HandOff {
                // Yielding hands the CPU to the storage thread only when the
                // two share one (pinned); unpinned, it would be a spin.
                yield_for: if cpu.is_some() {
                    config.offload_yield
                } else {
                    Duration::ZERO
                },
            },
        };
        let mut builder = runtime::executor(&format!("queueber-shard-{index}"), cpu, config.io_memory);
        if let Some(spin) = config.spin_before_park {
            builder = builder.spin_before_park(spin);
        }
        let handle = builder
            .spawn(move || shard.run())
            .map_err(|e| ServerError::Executor(e.to_string()))?;
        handles.push(handle);
        // The first shard picks the port (when 0 was asked); the others
        // join it through SO_REUSEPORT.
        match bound_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(bound)) => addr = bound,
            Ok(Err(e)) => {
                stop.store(true, Ordering::SeqCst);
                return Err(e);
            }
            Err(_) => {
                stop.store(true, Ordering::SeqCst);
                return Err(ServerError::Executor(format!("shard {index} did not start")));
            }
        }
    }
    // Last, so that a start that fails earlier leaves no backup thread.
    let backups = match &config.backup {
        Some(backup) => {
            let started = backup::Backups::start(engine.clone(), backup.clone(), stop.clone());
            let backups = started.map_err(|source| {
                // The shards are up: they stop with the flag.
                stop.store(true, Ordering::SeqCst);
                ServerError::Io {
                    context: "starting the backup thread".into(),
                    source,
                }
            })?;
            status.set_backups(backups.reader());
            tracing::info!(dir = %backup.dir.display(), every_ms = backup.every.map(|e| e.as_millis() as u64), keep = backup.keep, "backups on");
            Some(backups)
        }
        None => None,
    };
    tracing::info!(%addr, shards, tls = config.tls.is_some(), durability = ?config.durability, data_dir = %config.data_dir.display(), "queueber listening");
    status.set_ready();
    Ok(ServerHandle {
        addr,
        stop,
        shards: handles,
        engine,
        metrics,
        backups,
    })
}

/// Everything one shard's executor needs, moved onto its thread.
struct Shard {
    index: usize,
    shards: usize,
    store: Box<dyn QueueStore>,
    listen: SocketAddr,
    links: ShardLinks,
    limits: ServerLimits,
    info: ServerInfo,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    max_connections: usize,
    budget: Arc<BufferBudget>,
    engine: Arc<Engine>,
    clock: Arc<dyn Clock>,
    bound: crossbeam_channel::Sender<Result<SocketAddr, ServerError>>,
    status: Arc<http::Status>,
    slow_request: Option<Duration>,
    access: Option<Arc<crate::auth::Access>>,
    tls: Option<crate::tls::ServerTls>,
    hand_off: core::HandOff,
}

impl Shard {
    async fn run(self) -> Result<(), ServerError> {
        let listen = self.listen;
        let listener = match accept::Listener::bind(listen).and_then(|l| Ok((l.local_addr()?, l))) {
            Ok((addr, l)) => {
                let _ = self.bound.send(Ok(addr));
                l
            }
            Err(e) => {
                let error = |e: &std::io::Error| ServerError::Io {
                    context: format!("binding {listen}"),
                    source: std::io::Error::new(e.kind(), e.to_string()),
                };
                // Both the starter (waiting for the bind) and the shard's
                // own result report it.
                let _ = self.bound.send(Err(error(&e)));
                return Err(error(&e));
            }
        };
        let metrics = Rc::new(crate::metrics::ShardMetrics::default());
        // Its storage thread: spawned here, on the executor, so it shares the
        // executor's CPU (a thread inherits its creator's affinity).
        // Storage logs come from that thread: labelled with the shard.
        let span = tracing::info_span!("shard", index = self.index);
        let offload =
            runtime::OffloadThread::spawn_in(format!("queueber-store-{}", self.index), span).map_err(|source| {
                ServerError::Io {
                    context: format!("starting shard {}'s storage thread", self.index),
                    source,
                }
            })?;
        let (core, core_task) = core::spawn(
            self.index,
            self.store,
            self.clock,
            metrics.clone(),
            self.hand_off,
            offload,
        );
        self.status.add_core(self.index, core.control());
        let (router, mut arrivals) =
            Router::connect(self.index, self.shards, core.clone(), metrics.clone(), self.links).await;
        let ctx = Rc::new(ShardContext {
            router: router.clone(),
            limits: self.limits,
            info: self.info,
            shutdown: Signal::default(),
            connections: self.connections.clone(),
            max_connections: self.max_connections,
            budget: self.budget,
            disk: self.engine.disk().clone(),
            metrics,
            slow_request: self.slow_request,
            access: self.access,
            tls: self.tls,
            bound: Default::default(),
        });
        drop(self.engine);
        let acceptor = glommio::spawn_local(accept::accept_loop(listener, ctx.clone())).detach();
        let revoker = glommio::spawn_local(connection::revoke_on_reload(ctx.clone())).detach();
        // Connections other shards move here (ends when they close their channels).
        let adopting = ctx.clone();
        glommio::spawn_local(async move {
            while let Some(moved) = futures::StreamExt::next(&mut arrivals).await {
                glommio::spawn_local(connection::adopt(moved, adopting.clone())).detach();
            }
        })
        .detach();

        while !self.stop.load(Ordering::SeqCst) {
            glommio::timer::sleep(STOP_POLL).await;
        }
        tracing::info!(shard = self.index, "shutting down");
        self.status.set_stopping();
        ctx.shutdown.fire();
        core.drain();
        acceptor.await;
        revoker.await;
        // Requests routed here from other shards' connections may still be
        // running: wait until no connection anywhere is open.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        core.stop();
        let store = core_task.await;
        router.close();
        drop(store);
        Ok(())
    }
}
