//! Accepting connections, and the file descriptors they need.
//!
//! Every connection is a file descriptor, and so is every RocksDB file the
//! engine keeps open. [`size_descriptors`] works out at start what the
//! configuration needs, raises RLIMIT_NOFILE that far where the process may,
//! and otherwise lowers the connection limit (one WARN) so that running out
//! of descriptors is a refusal with a reason, not a hang.
//!
//! Should the process run out anyway (other files, a limit changed under
//! it), [`accept_loop`] keeps one spare descriptor: on EMFILE/ENFILE it
//! frees the spare, accepts the waiting client, tells it why it is refused,
//! closes it and takes the spare back, instead of leaving clients hanging in
//! the backlog. Such refusals are logged at most once per [`LOG_EVERY`],
//! with a count. (On a TLS port that refusal is plaintext, which a TLS
//! client reports as a corrupt record: an error, not a hang.)

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use futures::future::{select, Either};
use glommio::net::TcpListener;

use super::connection::{self, ConnectionGuard, ShardContext};
use super::handshake;
use crate::runtime::LogEvery;

/// File descriptors the server needs besides connections: RocksDB's own
/// (its table cache is capped at [`crate::storage::engine::MAX_OPEN_FILES`]),
/// io_uring rings, eventfds, listeners, logs, the WAL and a margin.
pub(crate) const OTHER_DESCRIPTORS: u64 = crate::storage::engine::MAX_OPEN_FILES as u64 + 256;

/// How long a refusal made with the spare descriptor waits for the client.
const EMERGENCY_LINGER: Duration = Duration::from_millis(50);

/// At most one accept-failure log line per shard per interval.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// Raises RLIMIT_NOFILE for `max_connections` and returns the connection
/// limit that fits the descriptors actually available.
pub(crate) fn size_descriptors(max_connections: usize) -> usize {
    let want = max_connections as u64 + OTHER_DESCRIPTORS;
    let have = crate::runtime::raise_limit(rlimit::Resource::NOFILE, want);
    if have >= want {
        return max_connections;
    }
    let fits = have.saturating_sub(OTHER_DESCRIPTORS).max(1) as usize;
    tracing::warn!(
        rlimit_nofile = have,
        needed = want,
        max_connections,
        effective_max_connections = fits,
        "RLIMIT_NOFILE is too low for --max-connections; accepting at most {fits} connections \
         (raise it with `ulimit -n {want}` or LimitNOFILE={want})"
    );
    fits
}

fn out_of_descriptors(e: &glommio::GlommioError<()>) -> bool {
    match e {
        glommio::GlommioError::IoError(io) => matches!(io.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)),
        _ => false,
    }
}

/// A descriptor held in reserve for refusing clients when none are left.
fn spare_descriptor() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// A shard's listening socket: bound as `glommio::net::TcpListener::bind`
/// binds (SO_REUSEPORT, a backlog of 1,024), with its descriptor kept.
pub(crate) struct Listener {
    listener: TcpListener,
    fd: RawFd,
}

impl Listener {
    pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<Listener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is a bound, listening TCP socket just released from
        // its owner; the glommio listener owns it from here on.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        Ok(Listener { listener, fd })
    }

    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Takes the socket out of listening now.
    ///
    /// Why: the kernel keeps a closed listener alive while the executor's
    /// io_uring holds an accept on it, until the ring is torn down, which
    /// happens a few milliseconds after the process exits. Until then it is
    /// still in the port's SO_REUSEPORT group, so a server started on the
    /// same port in that window shares the port with it: a client's
    /// connection could land in the dead listener's backlog and be reset.
    /// `shutdown` moves a listening socket out of LISTEN (and the group) at
    /// once, whoever still holds it.
    fn stop_listening(&self) {
        // SAFETY: `fd` is this listener's descriptor, open while `self` is.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
    }
}

pub(crate) async fn accept_loop(listening: Listener, ctx: Rc<ShardContext>) {
    let listener = &listening.listener;
    let spare = RefCell::new(spare_descriptor());
    let mut failures = LogEvery::new(LOG_EVERY);
    let mut note = |what: &str, error: &dyn std::fmt::Display| {
        if let Some(count) = failures.hit() {
            tracing::warn!(%error, count, "{what} (logged at most every {}s)", LOG_EVERY.as_secs());
        }
    };
    loop {
        let stream = match select(Box::pin(listener.accept()), Box::pin(ctx.shutdown.wait())).await {
            Either::Left((Ok(stream), _)) => stream,
            Either::Left((Err(e), _)) if out_of_descriptors(&e) => {
                note("out of file descriptors: refusing a connection", &e);
                // The last refusal's socket may have been closed since (its
                // close is asynchronous): take the spare back first.
                if spare.borrow().is_none() {
                    *spare.borrow_mut() = spare_descriptor();
                }
                // Free the spare (a synchronous close) so the waiting client
                // can be accepted and told why, rather than left hanging in
                // the backlog.
                if spare.borrow_mut().take().is_some() {
                    if let Ok(stream) = listener.accept().await {
                        // Inline and brief: the shard accepts nothing meanwhile.
                        let why = "the server is out of file descriptors; try again later";
                        connection::refuse(stream, why, EMERGENCY_LINGER).await;
                    }
                }
                glommio::timer::sleep(Duration::from_millis(1)).await;
                *spare.borrow_mut() = spare_descriptor();
                continue;
            }
            Either::Left((Err(e), _)) => {
                note("accept failed", &e);
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Either::Right(_) => {
                listening.stop_listening();
                return;
            }
        };
        // The spare comes back before anyone is served: were this client
        // served instead, the next one could be neither accepted nor told.
        if spare.borrow().is_none() {
            *spare.borrow_mut() = spare_descriptor();
            if spare.borrow().is_none() {
                let why = "the server is out of file descriptors; try again later";
                connection::refuse(stream, why, EMERGENCY_LINGER).await;
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let admitted = ConnectionGuard::admit(&ctx.connections, ctx.max_connections)
            .ok_or_else(|| format!("max-connections {} reached; try again later", ctx.max_connections));
        match (&ctx.tls, admitted) {
            (None, Ok(guard)) => {
                let peer = stream.peer_addr().ok().map(|a| a.ip());
                let socket = std::os::fd::AsRawFd::as_raw_fd(&stream);
                let arrival = connection::Arrival::accepted(peer, guard);
                glommio::spawn_local(connection::serve(stream, ctx.clone(), arrival, Some(socket))).detach();
            }
            (None, Err(why)) => {
                glommio::spawn_local(async move { connection::refuse(stream, &why, connection::LINGER).await })
                    .detach();
            }
            // The handshake runs in the connection's own task: a slow one
            // holds up nobody else's accept.
            (Some(tls), admitted) => {
                glommio::spawn_local(handshake::serve_tls(stream, tls.clone(), ctx.clone(), admitted)).detach();
            }
        }
    }
}
