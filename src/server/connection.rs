//! One client connection: read frames, run requests concurrently, write
//! answers as they complete, and close without losing any of them.
//!
//! Reading never waits for a request to finish, so a client can pipeline
//! thousands of requests and a long poll does not hold up the ones behind it.
//! Answers go through one writer task that gathers whatever is ready into one
//! write, so a burst leaves in few syscalls.
//!
//! What a connection may make the server hold is bounded three ways: frame
//! memory is committed only as bytes arrive ([`FrameBuffer`]), every byte
//! read or answered is charged to the connection's share of the server's
//! buffer budget ([`super::budget`]), and a connection whose frame or unread
//! answers make no progress for the stall timeout is closed.
//!
//! Closing follows what careful servers do, so that the kernel never resets
//! a connection that still has answers in flight: answer everything read,
//! shut down the write side (the client reads EOF after the last answer),
//! then read and discard until the client's EOF or [`LINGER`], then close.
//!
//! A plaintext connection whose requests all go to queues of one other shard
//! moves there ([`Stop::Move`]): between two requests, with nothing in
//! flight, its socket, unread bytes and token travel over the shard mesh and
//! the owner serves it from then on, so it stops paying a cross-core hop
//! (50-85 µs on this kind of machine) per request. Clients see nothing.

use std::cell::Cell;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnp::message::ReaderOptions;
use futures::future::{select, Either};
use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

use super::budget::{BufferBudget, Charge, ConnectionBudget};
use super::config::ServerLimits;
use super::core::{Answered, Timing};
use super::router::Router;
use crate::auth::{Access, Grant, Permission};
use crate::frame::{FrameBuffer, FrameError};
use crate::metrics::{op_label, result_column, ShardMetrics, UNDECODED};
use crate::names::QueueName;
use crate::ops;
use crate::ops::Route;
use crate::protocol::{
    decode_request, encode_response, write_response, ErrorCode, ErrorReply, Op, Reply, Request, Response, ServerInfo,
};
use crate::runtime::{wait_until, within};
use crate::storage::disk::DiskState;

/// How long a closing connection keeps reading (and discarding) what the
/// client still sends, so that closing does not reset answers in flight.
pub(crate) const LINGER: Duration = Duration::from_secs(2);

/// Above this the writer's gather buffer is given back after a flush.
const WRITE_BUFFER_KEEP: usize = 64 << 10;

/// Requests in a row for queues of one other shard (and none for this
/// one's) after which a connection moves to that shard. Enough that a
/// client working several shards' queues does not bounce between them.
pub(crate) const MOVE_AFTER: u32 = 16;

/// Where a connection's requests have been going (see [`MOVE_AFTER`]).
#[derive(Debug, Clone, Copy, Default)]
struct Affinity {
    shard: usize,
    /// Requests in a row for `shard`'s queues (0: none since this shard's).
    streak: u32,
}

/// How a connection comes to be served on a shard: accepted here, or moved
/// here by another shard with what it had.
pub(crate) struct Arrival {
    peer: Option<std::net::IpAddr>,
    guard: ConnectionGuard,
    /// Bytes read but not yet taken as frames (a moved connection's).
    frames: Option<FrameBuffer>,
    /// The token it presented, with the access generation it was checked at.
    grant: Option<(Grant, u64)>,
}

impl Arrival {
    /// A connection just accepted.
    pub(crate) fn accepted(peer: Option<std::net::IpAddr>, guard: ConnectionGuard) -> Arrival {
        Arrival {
            peer,
            guard,
            frames: None,
            grant: None,
        }
    }
}

/// A plaintext connection on its way to another shard.
pub(crate) struct Moved {
    socket: OwnedFd,
    arrival: Arrival,
}

/// Serves a connection another shard moved here.
pub(crate) async fn adopt(moved: Moved, ctx: Rc<ShardContext>) {
    let fd = moved.socket.into_raw_fd();
    // SAFETY: `fd` is an open TCP socket this process owns (it was just
    // released from an OwnedFd) and nothing else uses it from now on.
    let stream = unsafe { glommio::net::TcpStream::from_raw_fd(fd) };
    serve(stream, ctx, moved.arrival, Some(fd)).await;
}

/// A one-shot broadcast: shutdown of the server, or the end of a client's
/// requests.
#[derive(Default)]
pub(crate) struct Signal {
    fired: Cell<bool>,
    event: event_listener::Event,
}

impl Signal {
    pub(crate) fn fire(&self) {
        self.fired.set(true);
        self.event.notify(usize::MAX);
    }

    pub(crate) fn is_fired(&self) -> bool {
        self.fired.get()
    }

    pub(crate) async fn wait(&self) {
        wait_until(&self.event, || self.fired.get()).await;
    }
}

/// What every connection of a shard shares.
pub(crate) struct ShardContext {
    pub router: Rc<Router>,
    pub limits: ServerLimits,
    pub info: ServerInfo,
    pub shutdown: Signal,
    /// Open connections across all shards (the connection limit is global).
    pub connections: Arc<AtomicUsize>,
    /// The effective connection limit (lowered when file descriptors are short).
    pub max_connections: usize,
    pub budget: Arc<BufferBudget>,
    pub disk: Arc<DiskState>,
    /// This shard's request figures (shared with its core).
    pub metrics: Rc<ShardMetrics>,
    /// Requests slower than this are logged (`None`: never).
    pub slow_request: Option<Duration>,
    /// Access control (`--auth-file`); `None`: every request is allowed.
    pub access: Option<Arc<Access>>,
    /// TLS on this port (`--tls-cert`); `None`: plaintext.
    pub tls: Option<crate::tls::ServerTls>,
    /// This shard's connections that presented a token, so that a reload
    /// that revokes it closes them even while they are idle
    /// ([`revoke_on_reload`]). Dead entries are pruned as it grows.
    pub bound: BoundConnections,
}

/// A shard's connections that presented a token (see [`ShardContext::bound`]).
#[derive(Default)]
pub(crate) struct BoundConnections(std::cell::RefCell<Vec<std::rc::Weak<Connection>>>);

impl ShardContext {
    fn hello(&self) -> ServerInfo {
        let mut info = self.info.clone();
        info.disk_full = self.disk.is_full();
        info
    }
}

/// Counts a connection for as long as it lives.
pub(crate) struct ConnectionGuard(Arc<AtomicUsize>);

impl ConnectionGuard {
    /// Admits a connection if the global limit allows.
    pub(crate) fn admit(counter: &Arc<AtomicUsize>, limit: usize) -> Option<ConnectionGuard> {
        let before = counter.fetch_add(1, Ordering::AcqRel);
        let guard = ConnectionGuard(counter.clone());
        (before < limit).then_some(guard)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An encoded answer on its way to the socket, with the bytes it holds.
struct Outgoing {
    /// Its size on the wire: its bytes are the next this many of the
    /// connection's `encoded` buffer.
    bytes: usize,
    _charge: Charge,
}

/// Closes, on every shard, the connections whose token a reload revoked:
/// each is told why (an `unauthenticated` error about the connection, id 0)
/// and closed as at shutdown, whether or not it sends anything.
pub(crate) async fn revoke_on_reload(ctx: Rc<ShardContext>) {
    let Some(access) = ctx.access.clone() else {
        return;
    };
    let mut seen = access.generation();
    loop {
        {
            let last = seen;
            let moved = pin!(wait_until(access.changed(), || access.generation() != last));
            if let Either::Right(_) = select(moved, pin!(ctx.shutdown.wait())).await {
                return;
            }
        }
        seen = access.generation();
        let bound: Vec<Rc<Connection>> = ctx.bound.0.borrow().iter().filter_map(std::rc::Weak::upgrade).collect();
        for conn in bound {
            if conn.recheck_grant(&access) {
                conn.answer(0, Err(revoked()));
                conn.finished.fire();
            }
        }
    }
}

/// What a connection whose token was revoked is told.
fn revoked() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Unauthenticated,
        "this connection's token was revoked; the connection closes",
    )
}

/// State shared by a connection's reader, its request tasks and its writer.
///
/// `in_flight` counts requests accepted and not yet answered on the socket
/// (running, or answered but not yet written). The in-flight limit is
/// checked against it, so a client that pipelines without reading cannot
/// make the server run without bound.
struct Connection {
    ctx: Rc<ShardContext>,
    budget: Arc<ConnectionBudget>,
    /// Answers for the writer task. glommio's channel of one executor: no
    /// allocation and no atomics per answer (futures' mpsc took both, about
    /// 1% of the server's instructions at B=1). `None` once closed.
    out: std::cell::RefCell<Option<LocalSender<Outgoing>>>,
    /// The queued answers, framed, in order. Each is encoded straight into
    /// it (no message kept per answer); the writer takes the bytes of the
    /// answers it takes from `out`.
    encoded: std::cell::RefCell<Vec<u8>>,
    in_flight: Cell<usize>,
    changed: event_listener::Event,
    /// The writer hit a socket error or stalled: nothing more will be written.
    broken: Cell<bool>,
    /// The client sent EOF (or the connection broke): its parked polls are
    /// answered at once.
    finished: Signal,
    /// What the connection's token allows, once it presented one (`auth`).
    grant: std::cell::RefCell<Option<Grant>>,
    /// The access generation the grant was last checked against.
    grant_generation: Cell<u64>,
    /// Its token was revoked by a reload: everything is refused and the
    /// connection closes.
    revoked: Cell<bool>,
    /// It is in its shard's [`ShardContext::bound`] list.
    registered: Cell<bool>,
    /// The client's address (failed `auth` attempts are counted per address).
    peer: Option<std::net::IpAddr>,
    /// Where its requests have been going.
    affinity: Cell<Affinity>,
    /// It is being handed to another shard: the writer leaves the socket open.
    moving: Cell<bool>,
}

impl Connection {
    /// Notes which shard a request runs on (`None`: it names no queue,
    /// which says nothing about where the connection belongs).
    fn note_owner(&self, owner: Option<usize>) {
        let Some(owner) = owner else {
            return;
        };
        let router = &self.ctx.router;
        let mut a = self.affinity.get();
        if owner == router.index() {
            a.streak = 0;
        } else if owner == a.shard && a.streak > 0 {
            a.streak = a.streak.saturating_add(1);
        } else {
            a = Affinity {
                shard: owner,
                streak: 1,
            };
        }
        self.affinity.set(a);
    }

    /// The shard to move to now, if the connection should and may: its
    /// requests have gone there for a while, and nothing is in flight (no
    /// answer to hand over, no parked poll), so it moves between requests.
    fn ready_to_move(&self) -> Option<usize> {
        let a = self.affinity.get();
        let may = a.streak >= MOVE_AFTER
            && self.in_flight.get() == 0
            && !self.broken.get()
            && !self.revoked.get()
            && !self.finished.is_fired()
            && !self.ctx.shutdown.is_fired();
        may.then_some(a.shard)
    }

    /// Counts a request (or an error answer) that will produce one answer.
    fn reserve(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
    }

    /// Queues the answer of a reserved request.
    fn send(&self, id: u64, result: Result<Reply, ErrorReply>) {
        let mut encoded = self.encoded.borrow_mut();
        let start = encoded.len();
        write_response(&Response { id, result }, &mut encoded);
        let bytes = encoded.len() - start;
        let outgoing = Outgoing {
            bytes,
            _charge: self.budget.charge(bytes),
        };
        let sent = match &*self.out.borrow() {
            Some(out) => out.try_send(outgoing).is_ok(),
            None => false,
        };
        if !sent {
            // The writer is gone: nothing will take these bytes.
            encoded.truncate(start);
            drop(encoded);
            self.written(1);
        }
    }

    /// Moves the first `bytes` of the queued answers' bytes into the empty
    /// `into`: the whole buffer, without a copy, when they are all of it.
    fn take_encoded(&self, bytes: usize, into: &mut Vec<u8>) {
        let mut encoded = self.encoded.borrow_mut();
        if bytes >= encoded.len() {
            std::mem::swap(into, &mut *encoded);
        } else {
            into.extend_from_slice(&encoded[..bytes]);
            encoded.drain(..bytes);
        }
    }

    /// Reserves and queues at once (answers the reader gives itself).
    fn answer(&self, id: u64, result: Result<Reply, ErrorReply>) {
        self.reserve();
        self.send(id, result);
    }

    /// `n` answers reached the socket (or can never reach it).
    fn written(&self, n: usize) {
        self.in_flight.set(self.in_flight.get().saturating_sub(n));
        self.changed.notify(usize::MAX);
    }

    /// Ends the writer's stream: it writes what is queued, then stops.
    fn close_answers(&self) {
        self.out.borrow_mut().take();
    }

    fn fail(&self) {
        // Answers queued for the writer will not be written.
        *self.encoded.borrow_mut() = Vec::new();
        self.broken.set(true);
        self.finished.fire();
        self.changed.notify(usize::MAX);
    }

    /// Resolves when the server begins to shut down or this connection is
    /// finished (the client's EOF, or the writer failed).
    async fn stopping(&self) {
        select(pin!(self.ctx.shutdown.wait()), pin!(self.finished.wait())).await;
    }

    /// Waits until fewer than `n` answers are pending (or the socket broke).
    async fn wait_below(&self, n: usize) {
        wait_until(&self.changed, || self.in_flight.get() < n || self.broken.get()).await;
    }
}

/// The answer to a frame whose framing is lost (the connection closes).
fn frame_error(e: &FrameError) -> ErrorReply {
    match e {
        FrameError::TooLarge { .. } => ErrorReply::new(ErrorCode::FrameTooLarge, e.to_string()),
        FrameError::BadSegmentCount(_) => ErrorReply::new(ErrorCode::MalformedFrame, format!("malformed frame: {e}")),
    }
}

/// Why the reader stopped.
enum Stop {
    /// The client sent EOF (or the socket failed): nothing more to read.
    Eof,
    /// Shutdown, a framing error or a stall: the client may still be sending.
    Closing,
    /// Hand the connection to shard `to` (its socket duplicated into
    /// `socket`): see [`MOVE_AFTER`].
    Move { to: usize, socket: OwnedFd },
}

/// Serves one connection, plaintext or TLS (one copy of this code per
/// stream type: plaintext pays nothing for TLS existing). `socket` is the
/// plaintext stream's descriptor, for moving it to another shard; `None`
/// (TLS, whose session state cannot move) keeps it here.
pub(crate) async fn serve<S>(stream: S, ctx: Rc<ShardContext>, arrival: Arrival, socket: Option<RawFd>)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let Arrival {
        peer,
        guard,
        frames,
        grant,
    } = arrival;
    // A write that cannot make progress (a client that stopped reading) for
    // the stall timeout fails, and the connection closes.
    let stall = Duration::from_millis(ctx.limits.stall_timeout_ms);
    let (mut reader, writer) = stream.split();
    let (out, outgoing) = local_channel::new_unbounded();
    let bound = grant.is_some();
    let (grant, grant_generation) = grant.map_or((None, 0), |(g, generation)| (Some(g), generation));
    let conn = Rc::new(Connection {
        budget: ctx.budget.connection(),
        ctx: ctx.clone(),
        out: std::cell::RefCell::new(Some(out)),
        encoded: std::cell::RefCell::new(Vec::new()),
        in_flight: Cell::new(0),
        changed: event_listener::Event::new(),
        broken: Cell::new(false),
        finished: Signal::default(),
        grant: std::cell::RefCell::new(grant),
        grant_generation: Cell::new(grant_generation),
        revoked: Cell::new(false),
        registered: Cell::new(false),
        peer,
        affinity: Cell::new(Affinity::default()),
        moving: Cell::new(false),
    });
    if bound {
        // A reload that revokes its token closes it here now.
        conn.register();
    }
    let writer = glommio::spawn_local(write_loop(writer, outgoing, conn.clone(), stall)).detach();

    let mut frames = frames.unwrap_or_else(|| FrameBuffer::new(ctx.limits.max_frame_bytes));
    let stop = read_requests(&mut reader, &conn, stall, &mut frames, socket).await;
    if let Stop::Move { to, socket } = stop {
        // Nothing is in flight: the writer ends without shutting the socket
        // down, and this shard's descriptor closes with the stream.
        conn.moving.set(true);
        conn.close_answers();
        writer.await;
        drop(reader);
        let grant = conn.grant.borrow_mut().take().map(|g| (g, conn.grant_generation.get()));
        drop(conn);
        ctx.metrics.record_connection_moved();
        let arrival = Arrival {
            peer,
            guard,
            frames: Some(frames),
            grant,
        };
        match ctx.router.send_connection(to, Moved { socket, arrival }).await {
            Ok(()) => {}
            // That shard is stopping: serve it here after all.
            Err(Some(back)) => {
                glommio::spawn_local(adopt(back, ctx.clone())).detach();
            }
            Err(None) => tracing::warn!(to, "a connection could not be moved and is closed"),
        }
        return;
    }
    // Parked polls of a client that has stopped sending are answered now:
    // leasing messages to a client that went away would only delay them.
    conn.finished.fire();
    // Answer everything already accepted before closing.
    conn.wait_below(1).await;
    // The writer holds the connection too: end its stream explicitly. It
    // shuts the write side down after the last answer.
    conn.close_answers();
    writer.await;
    if matches!(stop, Stop::Closing) && !conn.broken.get() {
        discard_until_eof(&mut reader, LINGER).await;
    }
    drop(guard);
}

/// Reads and dispatches requests until EOF, an error or shutdown.
async fn read_requests<S: AsyncRead + AsyncWrite>(
    reader: &mut ReadHalf<S>,
    conn: &Rc<Connection>,
    stall: Duration,
    frames: &mut FrameBuffer,
    socket: Option<RawFd>,
) -> Stop {
    let ctx = &conn.ctx;
    let limit = ctx.limits.max_in_flight_per_connection;
    let mut options = ReaderOptions::new();
    options.traversal_limit_in_words(Some(ctx.limits.max_frame_bytes / 8));
    // The receive buffer counts against the server, not the share.
    let mut buffer_charge = Charge::server(&ctx.budget, 0);
    let mut closing_at: Option<Instant> = None;
    // One watch for the whole connection, not one per read that has to
    // wait (each registers two listeners, an allocation apiece). Fused: once
    // it has fired, `closing_at` is set and it is not awaited again.
    let mut stopping = pin!(futures::FutureExt::fuse(conn.stopping()));
    loop {
        // Dispatch every request that has fully arrived.
        loop {
            // A client far over its limit (pipelining without reading even
            // the errors) is not read from until its answers drain.
            if conn.in_flight.get() >= 2 * limit {
                conn.wait_below(limit).await;
            }
            if conn.broken.get() {
                return Stop::Eof;
            }
            // A token revoked by a reload: answer what was read, then close.
            if conn.revoked.get() {
                return Stop::Closing;
            }
            let next = frames.next_frame(options, |message| {
                message
                    .map_err(|e| crate::protocol::DecodeError {
                        id: None,
                        error: ErrorReply::new(ErrorCode::MalformedFrame, format!("malformed frame: {e}")),
                    })
                    .and_then(|m| decode_request(&m))
            });
            match next {
                Ok(Some((len, decoded))) => dispatch(conn, len, decoded, limit),
                Ok(None) => break,
                Err(e) => {
                    // Framing is lost: answer (id 0 = about the connection) and close.
                    conn.answer(0, Err(frame_error(&e)));
                    return Stop::Closing;
                }
            }
        }
        buffer_charge.set(frames.capacity());
        if ctx.shutdown.is_fired() && closing_at.is_none() {
            closing_at = Some(Instant::now() + LINGER);
        }
        // Backpressure: a connection over its share, or any connection while
        // the server's budget is used up, is not read from (TCP pushes back).
        if conn.budget.over_share() || ctx.budget.exhausted() {
            let room = pin!(async {
                conn.budget.wait_under_share().await;
                ctx.budget.wait_for_room().await;
            });
            if let Either::Right(_) = select(room, pin!(conn.stopping())).await {
                return Stop::Closing;
            }
        }
        let partial = frames.partial();
        match frames.prepare_read() {
            Ok(capacity) => buffer_charge.set(capacity),
            Err(e) => {
                conn.answer(0, Err(frame_error(&e)));
                return Stop::Closing;
            }
        }
        // Bytes already waiting need neither a timer nor the stop watch: a
        // pipelining client is read without any allocation or timer here.
        let read = match futures::FutureExt::now_or_never(reader.read(frames.spare())) {
            Some(read) => read,
            None => {
                let space = frames.spare();
                let read = pin!(async {
                    if partial {
                        // A frame in progress must keep arriving (slow-loris
                        // clients would otherwise hold their buffer forever);
                        // an idle connection between frames may wait as long
                        // as it likes.
                        within(stall, reader.read(space))
                            .await
                            .unwrap_or_else(|| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "frame stalled")))
                    } else {
                        reader.read(space).await
                    }
                });
                match closing_at {
                    // At shutdown the connection keeps reading for a moment,
                    // answering `shuttingDown` to what the client had already
                    // sent, so that a pipelining client learns the fate of
                    // every request instead of losing answers to a reset. A
                    // writer that failed (the client stopped reading past the
                    // stall timeout) ends the connection even while idle.
                    None => match select(read, stopping.as_mut()).await {
                        Either::Left((read, _)) => read,
                        Either::Right(_) if conn.broken.get() => return Stop::Eof,
                        Either::Right(_) => {
                            closing_at = Some(Instant::now() + LINGER);
                            continue;
                        }
                    },
                    Some(deadline) => match within(deadline.saturating_duration_since(Instant::now()), read).await {
                        Some(read) => read,
                        None => return Stop::Closing,
                    },
                }
            }
        };
        let n = match read {
            Ok(0) => return Stop::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                tracing::debug!("closing a connection whose frame stalled");
                return Stop::Closing;
            }
            Err(_) => return Stop::Eof,
        };
        frames.filled(n);
        // Between requests is the one moment a connection can change
        // shards: what just arrived goes with it.
        if let (Some(fd), Some(to)) = (socket, conn.ready_to_move()) {
            // SAFETY: `fd` is this stream's descriptor, open while `reader` is.
            match unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned() {
                Ok(socket) => return Stop::Move { to, socket },
                // Out of descriptors: stay, and try again after another streak.
                Err(_) => conn.affinity.set(Affinity::default()),
            }
        }
    }
}

/// Answers a request that failed to decode, or starts it.
fn dispatch(conn: &Rc<Connection>, len: usize, decoded: Result<Request, crate::protocol::DecodeError>, limit: usize) {
    let request = match decoded {
        Ok(request) => request,
        Err(e) => {
            // The frame was whole, so framing is intact: answer and go on.
            conn.ctx
                .metrics
                .record_request(UNDECODED, result_column(Some(e.error.code)), Duration::ZERO);
            conn.answer(e.id.unwrap_or(0), Err(e.error));
            return;
        }
    };
    if conn.in_flight.get() >= limit {
        let error = ErrorReply::new(
            ErrorCode::TooManyInFlight,
            format!("more than max-in-flight-per-connection {limit} requests in flight"),
        );
        conn.ctx
            .metrics
            .record_request(request.op.index(), result_column(Some(error.code)), Duration::ZERO);
        conn.answer(request.id, Err(error));
        return;
    }
    conn.reserve();
    // The decoded request holds about as much as its frame did, until answered.
    let charge = conn.budget.charge(len);
    glommio::spawn_local(handle(request, conn.clone(), charge)).detach();
}

/// Runs one request and answers it. Every request is a task of this
/// future, moved and allocated whole: what it holds across its awaits is
/// kept small (the large, rare paths are boxed).
async fn handle(request: Request, conn: Rc<Connection>, frame: Charge) {
    let ctx = &conn.ctx;
    let started = Instant::now();
    let Request { id, op: request } = request;
    let op = request.index();
    let owner = ctx.router.owner(&request);
    conn.note_owner(owner);
    // For the slow-request log: the name is reference-counted, so this
    // neither copies nor allocates.
    let label = ctx.slow_request.map(|slow| (slow, queue_of(&request)));
    let mut waited = false;
    // Access first: a request the connection may not make is not even
    // checked against the limits, let alone run.
    let refusal = conn.refusal(&request);
    let answered = match refusal.map_or_else(|| request.admit(&ctx.limits), Err) {
        Err(e) => Answered::now(Err(e)),
        Ok(Op::Hello(_)) => Answered::now(Ok(Reply::Hello(ctx.hello()))),
        Ok(Op::Auth(auth)) => Answered::now(Box::pin(conn.authenticate(&auth)).await),
        Ok(_) if ctx.shutdown.is_fired() => {
            Answered::now(Err(ErrorReply::new(ErrorCode::ShuttingDown, "server is shutting down")))
        }
        Ok(Op::Poll(poll)) if poll.wait_ms > 0 => {
            waited = true;
            long_poll(&conn, owner, poll, started).await
        }
        Ok(Op::RemoveAndPoll(op)) => {
            let (answered, polled_again) = remove_and_poll(&conn, owner, op, started).await;
            waited = polled_again;
            answered
        }
        Ok(op) => ctx.router.call(owner, op, started, Some(conn.budget.clone())).await,
    };
    let took = started.elapsed();
    let Answered { mut result, timing } = answered;
    // A token bound to a tenant sees that tenant's queues only.
    if let (Ok(Reply::Queues(names)), Some(grant)) = (&mut result, &*conn.grant.borrow()) {
        names.retain(|q| grant.allows(Permission::Admin, Some(q)).is_ok());
    }
    let column = result_column(result.as_ref().err().map(|e| e.code));
    conn.send(id, result);
    ctx.metrics.record_request(op, column, took);
    if let Some((slow, queue)) = label {
        // A long poll's waiting is not slowness: only its last attempt counts.
        let work = if waited {
            timing.queued + timing.storage + timing.sync
        } else {
            took
        };
        if work >= slow {
            log_slow(ctx, op, queue.as_ref(), took, work, timing);
        }
    }
    drop(frame);
}

/// A `removeAndPoll`: the remove and a first try at the poll in one call;
/// if that leased nothing and the request may wait, the rest of the wait as
/// a poll. True in the second element if it waited.
async fn remove_and_poll(
    conn: &Rc<Connection>,
    owner: Option<usize>,
    op: ops::RemoveAndPoll,
    started: Instant,
) -> (Answered, bool) {
    let ctx = &conn.ctx;
    let may_wait = op.wait_ms > 0;
    let poll = op.poll();
    // In a block of its own so the first answer is gone before the wait:
    // only what it removed is kept across it, which keeps every request's
    // task small.
    let removed = {
        let first = ctx
            .router
            .call(owner, Op::RemoveAndPoll(op), started, Some(conn.budget.clone()))
            .await;
        match first.result {
            // Removed, nothing to lease yet: wait the rest as a poll.
            Ok(Reply::RemovedAndPolled(ops::RemovedAndPolled { removed, lease: None }))
                if may_wait && !ctx.shutdown.is_fired() =>
            {
                removed
            }
            result => {
                return (
                    Answered {
                        result,
                        timing: first.timing,
                    },
                    false,
                )
            }
        }
    };
    // Boxed: only a request that found nothing pays for it, and it is
    // about to wait anyway.
    let Answered { result, timing } = Box::pin(long_poll(conn, owner, poll, started)).await;
    let result = result.and_then(|reply| match reply {
        Reply::Polled(lease) => Ok(Reply::RemovedAndPolled(ops::RemovedAndPolled { removed, lease })),
        other => Err(ErrorReply::new(
            ErrorCode::Internal,
            format!("a poll was answered with {other:?}"),
        )),
    });
    (Answered { result, timing }, true)
}

/// A poll that may wait (`wait_ms` counts from `started`, the frame's
/// read). A client that has finished sending gets one try, no wait; one
/// that finishes while its poll is parked gets an empty answer.
async fn long_poll(conn: &Rc<Connection>, owner: Option<usize>, mut poll: ops::Poll, started: Instant) -> Answered {
    if conn.finished.is_fired() {
        poll.wait_ms = 0;
    }
    let call = pin!(conn
        .ctx
        .router
        .call(owner, Op::Poll(poll), started, Some(conn.budget.clone())));
    let finished = pin!(conn.finished.wait());
    match select(call, finished).await {
        Either::Left((answered, _)) => answered,
        // Dropping the call cancels the parked poll wherever it is.
        Either::Right(_) => Answered::now(Ok(Reply::Polled(None))),
    }
}

impl Connection {
    /// Why the connection may not make `op`, on a server with access
    /// control: no token presented yet, or one that does not allow it.
    fn refusal(&self, op: &Op) -> Option<ErrorReply> {
        let access = self.ctx.access.as_ref()?;
        // The tokens were reloaded since this connection's grant was
        // checked (and its shard has not got round to it yet): a grant
        // whose token is gone or changed is revoked, and the connection
        // closes after answering.
        self.recheck_grant(access);
        if self.revoked.get() {
            return Some(revoked());
        }
        let permission = op.permission()?;
        match &*self.grant.borrow() {
            None => Some(ErrorReply::new(
                ErrorCode::Unauthenticated,
                "this server requires a token: send auth first",
            )),
            Some(grant) => {
                let queue = match op.route() {
                    Route::Owner(q) => Some(q),
                    Route::Local | Route::Connection => None,
                };
                let denied = grant.allows(permission, queue).err()?;
                Some(ErrorReply::new(ErrorCode::PermissionDenied, denied.to_string()))
            }
        }
    }

    /// Puts the connection on its shard's list of token-bound connections
    /// (once), pruning the list of closed ones whenever its length doubles.
    fn register(self: &Rc<Self>) {
        if self.registered.replace(true) {
            return;
        }
        let mut bound = self.ctx.bound.0.borrow_mut();
        if bound.len() >= 64 && bound.len().is_power_of_two() {
            bound.retain(|c| c.strong_count() > 0);
        }
        bound.push(Rc::downgrade(self));
    }

    /// Re-checks the grant if the tokens moved since it was last checked;
    /// true if that revoked it just now.
    fn recheck_grant(&self, access: &Access) -> bool {
        if access.generation() == self.grant_generation.get() {
            return false;
        }
        self.grant_generation.set(access.generation());
        let revoked = self.grant.borrow().as_ref().is_some_and(|g| !access.still_valid(g));
        if revoked {
            *self.grant.borrow_mut() = None;
            self.revoked.set(true);
        }
        revoked
    }

    /// `auth`: binds the connection to the token's grant, or counts a
    /// failure against the client's address and answers it late.
    async fn authenticate(self: &Rc<Self>, auth: &ops::Auth) -> Result<Reply, ErrorReply> {
        let Some(access) = &self.ctx.access else {
            return Err(ErrorReply::new(
                ErrorCode::InvalidArgument,
                "this server has no --auth-file: no token is needed",
            ));
        };
        // Read before the tokens: a reload in between is then seen as new.
        let generation = access.generation();
        if let Some(grant) = access.verify(&auth.token) {
            if let Some(addr) = self.peer {
                access.succeeded(addr);
            }
            let tenant = grant.tenant.clone();
            self.grant_generation.set(generation);
            *self.grant.borrow_mut() = Some(grant);
            self.register();
            return Ok(Reply::Authenticated(tenant));
        }
        let addr = self
            .peer
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let (failures, delay) = access.failed(addr);
        let id = auth.token.rsplit_once('.').map_or("(no id)", |(id, _)| id);
        tracing::warn!(%addr, token = id, failures, "refused a token (unknown id or wrong secret)");
        glommio::timer::sleep(delay).await;
        Err(ErrorReply::new(
            ErrorCode::Unauthenticated,
            "unknown token or wrong secret",
        ))
    }
}

/// The slow-request warning: what the request was and where its time went.
fn log_slow(ctx: &ShardContext, op: usize, queue: Option<&QueueName>, took: Duration, work: Duration, t: Timing) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let shard = queue.map_or(ctx.router.index(), |q| q.shard(ctx.router.shards()));
    tracing::warn!(
        op = op_label(op),
        queue = %queue.map_or_else(|| "-".to_string(), |q| q.to_string()),
        shard,
        total_ms = ms(took),
        counted_ms = ms(work),
        queued_ms = ms(t.queued),
        storage_ms = ms(t.storage),
        sync_ms = ms(t.sync),
        other_ms = ms(work.saturating_sub(t.queued + t.storage + t.sync)),
        "slow request"
    );
}

/// The queue `op` names, if any.
fn queue_of(op: &Op) -> Option<QueueName> {
    match op.route() {
        Route::Owner(q) => Some(q.clone()),
        Route::Local | Route::Connection => None,
    }
}

/// Writes all of `bytes`, failing when the socket accepts nothing for
/// `stall`. The timer is armed only once a write would block: a client that
/// reads costs no timer per write (timers are expensive here, see
/// docs/benchmarks.md).
async fn write_all_within<W: futures::io::AsyncWrite + Unpin>(
    writer: &mut W,
    mut bytes: &[u8],
    stall: Duration,
) -> std::io::Result<()> {
    use futures::FutureExt;
    while !bytes.is_empty() {
        let written = match writer.write(bytes).now_or_never() {
            Some(result) => result?,
            None => within(stall, writer.write(bytes)).await.unwrap_or_else(|| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client stopped reading",
                ))
            })?,
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[written..];
    }
    Ok(())
}

/// Writes answers until the channel closes, then shuts the write side down;
/// or, for a connection moving to another shard, leaves it open.
async fn write_loop<W: futures::io::AsyncWrite + Unpin>(
    mut writer: W,
    outgoing: LocalReceiver<Outgoing>,
    conn: Rc<Connection>,
    stall: Duration,
) {
    let mut gathered: Vec<u8> = Vec::new();
    let mut held: Vec<Outgoing> = Vec::new();
    while let Some(first) = outgoing.recv().await {
        // Gather whatever else is ready into the same write.
        let mut bytes = first.bytes;
        held.push(first);
        while bytes < WRITE_BUFFER_KEEP {
            let Some(Some(next)) = futures::FutureExt::now_or_never(outgoing.recv()) else {
                break;
            };
            bytes += next.bytes;
            held.push(next);
        }
        conn.take_encoded(bytes, &mut gathered);
        let ok = write_all_within(&mut writer, &gathered, stall).await.is_ok();
        gathered.clear();
        if gathered.capacity() > WRITE_BUFFER_KEEP {
            gathered = Vec::new();
        }
        if !ok {
            conn.fail();
            return;
        }
        // Only now are they on the socket: until then they count against
        // the connection's in-flight limit and its buffer share.
        conn.written(held.len());
        held.clear();
    }
    if conn.moving.get() {
        return;
    }
    // Shuts down the write side: the client reads EOF after the last answer.
    let _ = writer.close().await;
}

/// Tells a client the server cannot take why it is being closed, waiting at
/// most `linger` for it to finish sending (see [`LINGER`]).
pub(crate) async fn refuse<S: AsyncRead + AsyncWrite>(stream: S, why: &str, linger: Duration) {
    refuse_with(stream, ErrorReply::new(ErrorCode::Unavailable, why), linger).await;
}

/// Answers `error` about the connection (id 0), then closes it as
/// [`refuse`] does.
pub(crate) async fn refuse_with<S: AsyncRead + AsyncWrite>(stream: S, error: ErrorReply, linger: Duration) {
    let message = encode_response(&Response {
        id: 0,
        result: Err(error),
    });
    let bytes = capnp::serialize::write_message_to_words(&message);
    let (mut reader, mut writer) = stream.split();
    if write_all_within(&mut writer, &bytes, linger).await.is_ok() {
        let _ = writer.close().await;
        discard_until_eof(&mut reader, linger).await;
    }
}

/// Reads and drops what the client still sends, until its EOF or `linger`.
/// Closing a socket with unread bytes makes the kernel send a reset, which
/// can destroy answers the client has not read yet.
async fn discard_until_eof<S: AsyncRead>(reader: &mut ReadHalf<S>, linger: Duration) {
    let mut sink = [0u8; 4096];
    let _ = within(linger, async {
        while let Ok(n) = reader.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<Fut>(_: impl FnOnce(Request, Rc<Connection>, Charge) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn a_request_task_fits_the_allocators_thread_cache() {
        // Every request is a task of `handle`'s future, allocated and moved
        // whole. glibc serves allocations of up to 1,032 bytes from a cache
        // per thread; the task adds its header (40 bytes) and its schedule
        // to the future. At 2,016 bytes every task went through malloc's
        // slow path and was copied three times on its way in.
        let size = future_size(handle);
        assert!(size <= 960, "a request's task future is {size} bytes");
    }
}
