//! The metrics endpoint: `GET /metrics`, `/healthz` and `/readyz` over
//! HTTP/1.1 (over TLS with `--metrics-tls`), on an executor thread of its own.
//!
//! Its own thread because it must answer before the shards exist (`/readyz`
//! is 503 while the data directory is recovered) and because no scraper,
//! however slow or stuck, may take time from a shard. A scrape asks each
//! shard's core for a snapshot through the core's inbox (the same queue its
//! requests take, so the figures are consistent with one batch), reads the
//! process's and RocksDB's figures on a blocking thread, and renders the
//! text. One request per connection (`Connection: close`), bounded in size
//! and time.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpListener;

use super::core::CoreControl;
use super::ServerError;
use crate::metrics::exposition::Format;
use crate::metrics::render::{render, Scrape};
use crate::metrics::{process, Histogram, LATENCY_BUCKETS};
use crate::runtime::{offload, within};
use crate::storage::Engine;

/// Largest request head accepted; a longer one is answered 400.
const MAX_REQUEST_BYTES: usize = 8 << 10;
/// A scraper gets this long to send its request, and to read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scrape waits for a shard's snapshot before leaving it out.
const SHARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Scrapes served at once; more connections are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// How often the endpoint looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The nice value of the endpoint's thread: rendering a scrape of thousands
/// of queues takes milliseconds of CPU, which must not preempt a shard on
/// the same core (the shards keep the default, 0). CFS gives a thread at 19
/// about 1/70 of a contended core and lets a waking shard preempt it, so a
/// scrape is slower on a saturated machine but never delays requests.
const METRICS_NICE: libc::c_int = 19;

/// Lowers the calling thread's scheduling priority to [`METRICS_NICE`] (on
/// Linux, nice values are per thread). Failing is harmless: logged, and
/// the endpoint serves at normal priority.
fn lower_priority() {
    // SAFETY: setpriority reads no memory of ours; `0` means the calling
    // thread for PRIO_PROCESS on Linux.
    let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, METRICS_NICE) };
    if done != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "metrics endpoint keeps normal priority");
    }
}

const STARTING: u8 = 0;
const READY: u8 = 1;
const STOPPING: u8 = 2;

/// What the endpoint reports, filled in as the server starts.
#[derive(Debug, Default)]
pub(crate) struct Status {
    state: AtomicU8,
    engine: OnceLock<Arc<Engine>>,
    cores: Mutex<Vec<(usize, CoreControl)>>,
    connections: OnceLock<Arc<AtomicUsize>>,
    access: OnceLock<Arc<crate::auth::Access>>,
    backups: OnceLock<super::backup::BackupReader>,
    max_queues: usize,
}

impl Status {
    pub(crate) fn new(max_queues: usize) -> Arc<Status> {
        Arc::new(Status {
            max_queues,
            ..Status::default()
        })
    }

    pub(crate) fn set_engine(&self, engine: Arc<Engine>, connections: Arc<AtomicUsize>) {
        let _ = self.engine.set(engine);
        let _ = self.connections.set(connections);
    }

    pub(crate) fn set_access(&self, access: Arc<crate::auth::Access>) {
        let _ = self.access.set(access);
    }

    pub(crate) fn set_backups(&self, backups: super::backup::BackupReader) {
        let _ = self.backups.set(backups);
    }

    pub(crate) fn add_core(&self, shard: usize, core: CoreControl) {
        if let Ok(mut cores) = self.cores.lock() {
            cores.push((shard, core));
        }
    }

    pub(crate) fn set_ready(&self) {
        let _ = self
            .state
            .compare_exchange(STARTING, READY, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub(crate) fn set_stopping(&self) {
        self.state.store(STOPPING, Ordering::SeqCst);
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::SeqCst)
    }
}

/// The running endpoint; stopping (or dropping) it stops its thread.
pub(crate) struct Endpoint {
    stop: Arc<AtomicBool>,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
    addr: SocketAddr,
}

impl Endpoint {
    /// Binds `addr` and serves it on a new executor thread.
    pub(crate) fn start(
        addr: SocketAddr,
        status: Arc<Status>,
        io_memory: usize,
        tls: Option<crate::tls::ServerTls>,
    ) -> Result<Endpoint, ServerError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = crossbeam_channel::bounded(1);
        let stopped = stop.clone();
        let thread = crate::runtime::executor("queueber-metrics", None, io_memory)
            .spawn(move || async move {
                lower_priority();
                let listener = match TcpListener::bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = bound_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = bound_tx.send(listener.local_addr().map_err(|e| e.to_string()));
                let server = glommio::spawn_local(serve(listener, status, tls)).detach();
                while !stopped.load(Ordering::SeqCst) {
                    glommio::timer::sleep(STOP_POLL).await;
                }
                server.cancel();
            })
            .map_err(|e| ServerError::Executor(format!("metrics endpoint: {e}")))?;
        let bind_error = |detail: String| ServerError::Io {
            context: format!("binding the metrics endpoint {addr} (--metrics-listen; `off` disables it)"),
            source: std::io::Error::other(detail),
        };
        match bound_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(addr)) => Ok(Endpoint {
                stop,
                thread: Some(thread),
                addr,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(bind_error(e))
            }
            Err(_) => Err(bind_error("the endpoint did not start".into())),
        }
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(listener: TcpListener, status: Arc<Status>, tls: Option<crate::tls::ServerTls>) {
    let active = Rc::new(std::cell::Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if active.get() >= MAX_CONNECTIONS {
            continue;
        }
        active.set(active.get() + 1);
        let (status, active, tls) = (status.clone(), active.clone(), tls.clone());
        glommio::spawn_local(async move {
            match tls {
                None => answer(stream, &status).await,
                Some(tls) => {
                    if let Some(Ok(stream)) = within(IO_TIMEOUT, tls.accept(stream)).await {
                        answer(stream, &status).await;
                    }
                }
            }
            active.set(active.get() - 1);
        })
        .detach();
    }
}

/// A parsed request head: what routing needs.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    method: String,
    path: String,
    accept: Option<String>,
}

/// Parses a request head. `Ok(None)`: not complete yet.
fn parse_head(bytes: &[u8]) -> Result<Option<Head>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes)? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(_) => {
            let accept = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("accept"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::to_string);
            let path = request.path.unwrap_or("/");
            Ok(Some(Head {
                method: request.method.unwrap_or("").to_string(),
                path: path.split('?').next().unwrap_or(path).to_string(),
                accept,
            }))
        }
    }
}

/// A response: status line, content type, body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, status: &Status) {
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    let head = loop {
        let n = match within(IO_TIMEOUT, stream.read(&mut buf[len..])).await {
            Some(Ok(0)) | Some(Err(_)) | None => return,
            Some(Ok(n)) => n,
        };
        len += n;
        match parse_head(&buf[..len]) {
            Ok(Some(head)) => break Ok(head),
            Ok(None) if len < buf.len() => continue,
            Ok(None) => break Err("request head too large"),
            Err(_) => break Err("malformed request"),
        }
    };
    let response = match head {
        Err(why) => Response::text("400 Bad Request", why),
        Ok(head) => route(&head, status).await,
    };
    let bytes = format!(
        "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        response.status,
        response.content_type,
        response.body.len(),
        response.body
    );
    let _ = within(IO_TIMEOUT, async {
        stream.write_all(bytes.as_bytes()).await?;
        stream.flush().await
    })
    .await;
    let _ = stream.close().await;
}

async fn route(head: &Head, status: &Status) -> Response {
    let known = matches!(head.path.as_str(), "/metrics" | "/healthz" | "/readyz");
    if !known {
        return Response::text("404 Not Found", "not found: try /metrics, /healthz or /readyz");
    }
    if head.method != "GET" {
        return Response::text("405 Method Not Allowed", "only GET");
    }
    match head.path.as_str() {
        "/healthz" => Response::text("200 OK", "ok"),
        "/readyz" => match status.state() {
            READY => Response::text("200 OK", "ready"),
            STARTING => Response::text("503 Service Unavailable", "starting: recovering the data directory"),
            _ => Response::text("503 Service Unavailable", "shutting down"),
        },
        _ => {
            let format = Format::negotiate(head.accept.as_deref());
            match render(gather(status).await, format) {
                Ok(body) => Response {
                    status: "200 OK",
                    content_type: format.content_type(),
                    body,
                },
                // Only a bug in the catalogue gets here (writing to a
                // String does not fail): say so rather than serve half.
                Err(_) => Response::text("500 Internal Server Error", "the metrics could not be rendered"),
            }
        }
    }
}

/// Collects one scrape: every shard's snapshot, then the process's and
/// RocksDB's figures (file and property reads: on a blocking thread).
async fn gather(status: &Status) -> Scrape {
    let cores: Vec<(usize, CoreControl)> = status.cores.lock().map(|c| c.clone()).unwrap_or_default();
    let snapshots = futures::future::join_all(cores.iter().map(|(shard, core)| async move {
        match within(SHARD_TIMEOUT, core.snapshot()).await {
            Some(Some(snapshot)) => Some(snapshot),
            Some(None) if status.state() != READY => {
                // A scrape that meets shutdown: the core has already stopped.
                tracing::debug!(shard, "a stopped shard left out of a metrics scrape");
                None
            }
            Some(None) => {
                tracing::warn!(shard, "a shard's core has stopped: left out of the metrics scrape");
                None
            }
            None => {
                tracing::warn!(shard, "a shard did not answer the metrics scrape in time");
                None
            }
        }
    }))
    .await;
    let engine = status.engine.get().cloned();
    let (process, rocks, wal_sync) = offload(move || {
        let rocks = engine.as_ref().map(|e| e.rocks_figures()).unwrap_or_default();
        let wal = engine.as_ref().map(|e| e.wal_sync_histogram());
        (process::read(), rocks, wal)
    })
    .await;
    Scrape {
        shards: snapshots.into_iter().flatten().collect(),
        wal_sync: wal_sync.unwrap_or_else(|| Histogram::new(LATENCY_BUCKETS)),
        connections: status.connections.get().map_or(0, |c| c.load(Ordering::Relaxed) as u64),
        ready: status.state() == READY,
        process,
        rocks,
        max_queues: status.max_queues,
        auth_failures: status.access.get().map(|a| a.failures_total()),
        backups: status.backups.get().map(|b| b.figures()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_with_their_path_and_accept_header() {
        let head = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/metrics");
        assert_eq!(head.accept.as_deref(), Some("application/openmetrics-text"));
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost:").unwrap(), None);
        assert!(parse_head(b"\x00\x01 nonsense\r\n\r\n").is_err());
    }
}
