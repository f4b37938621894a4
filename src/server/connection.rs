//! One client connection: read frames, run requests concurrently, write
//! responses as they complete.
//!
//! Reading never waits for a request to finish, so a client can pipeline
//! thousands of requests and a long poll does not hold up the ones behind it.
//! Responses go through one writer task that buffers them and flushes only
//! when no further response is ready, so a burst leaves in few syscalls.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use futures::channel::mpsc;
use futures::future::{select, Either};
use futures::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use futures::StreamExt;
use glommio::net::TcpStream;

use super::config::ServerLimits;
use super::router::Router;
use crate::protocol::{
    decode_request, encode_response, ErrorCode, ErrorReply, Op, Reply, Request, Response, ServerInfo,
};

const IO_BUFFER: usize = 64 << 10;

/// Fired once when the server begins to shut down.
#[derive(Default)]
pub(crate) struct ShutdownSignal {
    fired: Cell<bool>,
    event: event_listener::Event,
}

impl ShutdownSignal {
    pub(crate) fn fire(&self) {
        self.fired.set(true);
        self.event.notify(usize::MAX);
    }

    pub(crate) fn is_fired(&self) -> bool {
        self.fired.get()
    }

    pub(crate) async fn wait(&self) {
        while !self.fired.get() {
            let listener = self.event.listen();
            if self.fired.get() {
                return;
            }
            listener.await;
        }
    }
}

/// What every connection of a shard shares.
pub(crate) struct ShardContext {
    pub router: Rc<Router>,
    pub limits: ServerLimits,
    pub info: ServerInfo,
    pub shutdown: ShutdownSignal,
    /// Open connections across all shards (the connection limit is global).
    pub connections: Arc<AtomicUsize>,
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

/// The responses of one connection on their way to its writer task.
///
/// `pending` counts requests accepted and not yet answered on the socket
/// (running, or answered but not yet written). The in-flight limit is
/// checked against it, so a client that pipelines without reading cannot
/// make the server buffer without bound.
struct Responses {
    out: mpsc::UnboundedSender<Builder<HeapAllocator>>,
    pending: Cell<usize>,
    changed: event_listener::Event,
    /// The writer hit a socket error: nothing more will be written.
    broken: Cell<bool>,
}

impl Responses {
    fn new(out: mpsc::UnboundedSender<Builder<HeapAllocator>>) -> Self {
        Self {
            out,
            pending: Cell::new(0),
            changed: event_listener::Event::new(),
            broken: Cell::new(false),
        }
    }

    /// Counts a request (or an error answer) that will produce one response.
    fn reserve(&self) {
        self.pending.set(self.pending.get() + 1);
    }

    /// Queues the response of a reserved request.
    fn send(&self, id: u64, result: Result<Reply, ErrorReply>) {
        if self
            .out
            .unbounded_send(encode_response(&Response { id, result }))
            .is_err()
        {
            self.written(1);
        }
    }

    /// Reserves and queues at once (answers the reader gives itself).
    fn answer(&self, id: u64, result: Result<Reply, ErrorReply>) {
        self.reserve();
        self.send(id, result);
    }

    /// `n` responses reached the socket (or can never reach it).
    fn written(&self, n: usize) {
        self.pending.set(self.pending.get().saturating_sub(n));
        self.changed.notify(usize::MAX);
    }

    fn fail(&self) {
        self.broken.set(true);
        self.changed.notify(usize::MAX);
    }

    /// Waits until fewer than `n` responses are pending (or the socket broke).
    async fn wait_below(&self, n: usize) {
        while self.pending.get() >= n && !self.broken.get() {
            let listener = self.changed.listen();
            if self.pending.get() < n || self.broken.get() {
                return;
            }
            listener.await;
        }
    }
}

/// Classifies a frame the framing layer rejected.
fn frame_error(e: &capnp::Error, limits: &ServerLimits) -> Option<ErrorReply> {
    match e.kind {
        capnp::ErrorKind::Disconnected => None,
        _ if e.extra.contains("too large") => Some(ErrorReply::new(
            ErrorCode::FrameTooLarge,
            format!("frame exceeds max-frame-bytes {}: {}", limits.max_frame_bytes, e.extra),
        )),
        capnp::ErrorKind::PrematureEndOfFile => None,
        _ => Some(ErrorReply::new(
            ErrorCode::MalformedFrame,
            format!("malformed frame: {e}"),
        )),
    }
}

pub(crate) async fn serve(stream: TcpStream, ctx: Rc<ShardContext>, guard: ConnectionGuard) {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.split();
    let mut reader = BufReader::with_capacity(IO_BUFFER, reader);
    let (out, outgoing) = mpsc::unbounded();
    let responses = Rc::new(Responses::new(out));
    let writer = glommio::spawn_local(write_loop(
        BufWriter::with_capacity(IO_BUFFER, writer),
        outgoing,
        responses.clone(),
    ))
    .detach();
    let limit = ctx.limits.max_in_flight_per_connection;
    let mut options = ReaderOptions::new();
    options.traversal_limit_in_words(Some(ctx.limits.max_frame_bytes / 8));

    loop {
        // A client far over its limit (pipelining without reading even the
        // errors) is not read from until its answers drain.
        if responses.pending.get() >= 2 * limit {
            responses.wait_below(limit).await;
        }
        if responses.broken.get() {
            break;
        }
        let read = capnp_futures::serialize::try_read_message(&mut reader, options);
        let frame = match select(Box::pin(read), Box::pin(ctx.shutdown.wait())).await {
            Either::Left((frame, _)) => frame,
            Either::Right(_) => break,
        };
        let message = match frame {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(e) => {
                if let Some(error) = frame_error(&e, &ctx.limits) {
                    // Framing is lost: answer (id 0 = about the connection) and close.
                    responses.answer(0, Err(error));
                }
                break;
            }
        };
        let request = match decode_request(&message) {
            Ok(request) => request,
            Err(e) => {
                let fatal = e.error.code == ErrorCode::MalformedFrame;
                responses.answer(e.id.unwrap_or(0), Err(e.error));
                if fatal {
                    break;
                }
                continue;
            }
        };
        if responses.pending.get() >= limit {
            let error = ErrorReply::new(
                ErrorCode::TooManyInFlight,
                format!("more than max-in-flight-per-connection {limit} requests in flight"),
            );
            responses.answer(request.id, Err(error));
            continue;
        }
        responses.reserve();
        glommio::spawn_local(handle(request, ctx.clone(), responses.clone())).detach();
    }
    // Answer everything already accepted before closing.
    responses.wait_below(1).await;
    // The writer holds the responses too: end its stream explicitly.
    responses.out.close_channel();
    writer.await;
    drop(guard);
}

async fn handle(request: Request, ctx: Rc<ShardContext>, responses: Rc<Responses>) {
    let result = match ctx.limits.admit(request.op) {
        Err(e) => Err(e),
        Ok(Op::Hello) => Ok(Reply::Hello(ctx.info.clone())),
        Ok(_) if ctx.shutdown.is_fired() => Err(ErrorReply::new(ErrorCode::ShuttingDown, "server is shutting down")),
        Ok(op) => ctx.router.call(op).await,
    };
    responses.send(request.id, result);
}

async fn write_loop<W: futures::io::AsyncWrite + Unpin>(
    mut writer: BufWriter<W>,
    mut outgoing: mpsc::UnboundedReceiver<Builder<HeapAllocator>>,
    responses: Rc<Responses>,
) {
    while let Some(first) = outgoing.next().await {
        let mut ok = capnp_futures::serialize::write_message(&mut writer, &first)
            .await
            .is_ok();
        let mut count = 1;
        // Coalesce whatever else is ready into the same flush.
        while ok {
            let Ok(message) = outgoing.try_recv() else {
                break;
            };
            ok = capnp_futures::serialize::write_message(&mut writer, &message)
                .await
                .is_ok();
            count += 1;
        }
        ok = ok && writer.flush().await.is_ok();
        if !ok {
            responses.fail();
            return;
        }
        // Only now are they on the socket: until then they count against
        // the connection's in-flight limit.
        responses.written(count);
    }
    let _ = writer.close().await;
}

/// Tells a client over the connection limit why it is being closed.
pub(crate) async fn refuse(stream: TcpStream, limit: usize) {
    let mut writer = BufWriter::new(stream);
    let error = ErrorReply::new(
        ErrorCode::Unavailable,
        format!("max-connections {limit} reached; try again later"),
    );
    let message = encode_response(&Response {
        id: 0,
        result: Err(error),
    });
    if capnp_futures::serialize::write_message(&mut writer, &message)
        .await
        .is_ok()
    {
        let _ = writer.flush().await;
    }
    let _ = writer.close().await;
}
