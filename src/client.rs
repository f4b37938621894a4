//! An async client for any `futures` byte stream.
//!
//! [`Client::new`] splits a stream into a cheap, cloneable [`Client`] and a
//! driver future that owns the socket. Spawn the driver on whatever executor
//! you use; every call pipelines one request and awaits its response, matched
//! by id, so many calls can be in flight on one connection at once.
//!
//! On glommio:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use queueber::client::Client;
//! use queueber::names::QueueName;
//! use queueber::types::NewMessage;
//!
//! glommio::LocalExecutorBuilder::default().spawn(|| async {
//!     let stream = glommio::net::TcpStream::connect("127.0.0.1:7420").await.unwrap();
//!     let (client, driver) = Client::new(stream);
//!     glommio::spawn_local(driver).detach();
//!     let queue = QueueName::new("acme", "emails").unwrap();
//!     client.add(&queue, vec![NewMessage::new(b"hello".to_vec())]).await.unwrap();
//!     if let Some(lease) = client.poll(&queue, 10, 30_000, 1_000).await.unwrap() {
//!         let ids: Vec<_> = lease.messages.iter().map(|m| m.id).collect();
//!         client.remove(&queue, lease.id, ids).await.unwrap();
//!     }
//! })?.join()?;
//! # Ok(()) }
//! ```
//!
//! From a tokio application, through tokio-util's compat layer:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use tokio_util::compat::TokioAsyncReadCompatExt;
//! use queueber::client::Client;
//!
//! let stream = tokio::net::TcpStream::connect("127.0.0.1:7420").await?;
//! let (client, driver) = Client::new(stream.compat());
//! tokio::spawn(driver);
//! let info = client.hello().await?;
//! println!("queueber {} with {} shards", info.version, info.shards);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use capnp::message::ReaderOptions;
use futures::channel::{mpsc, oneshot};
use futures::future::{select, Either};
use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use futures::StreamExt;

use crate::ids::{LeaseId, MessageId};
use crate::names::QueueName;
use crate::ops::create_queue::QueueCreated;
use crate::ops::{self, Dispatch};
use crate::protocol::{
    decode_response, encode_request, ErrorCode, ErrorReply, Op, Reply, Request, ResponseDecodeError, ServerInfo,
};
use crate::types::{Lease, NewMessage, PeekCursor, Peeked, PolicyInfo, QueuePolicy, QueueStats};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a typed error.
    #[error("server error {}: {}", code_name(.0.code), .0.message)]
    Server(ErrorReply),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ResponseDecodeError),
    #[error("the connection is closed")]
    Closed,
    #[error("unexpected reply to {op}: {reply:?}")]
    UnexpectedReply { op: &'static str, reply: Box<Reply> },
}

impl ClientError {
    /// The server's error code, when this is a server error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }
}

/// The snake_case name of an error code, as docs and the CLI show it.
pub fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Internal => "internal",
        ErrorCode::InvalidArgument => "invalid_argument",
        ErrorCode::InvalidName => "invalid_name",
        ErrorCode::UnknownQueue => "unknown_queue",
        ErrorCode::PayloadTooLarge => "payload_too_large",
        ErrorCode::TooManyMessages => "too_many_messages",
        ErrorCode::FrameTooLarge => "frame_too_large",
        ErrorCode::MalformedFrame => "malformed_frame",
        ErrorCode::UnknownOperation => "unknown_operation",
        ErrorCode::TooManyInFlight => "too_many_in_flight",
        ErrorCode::ShuttingDown => "shutting_down",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::DiskFull => "disk_full",
        ErrorCode::Unauthenticated => "unauthenticated",
        ErrorCode::PermissionDenied => "permission_denied",
        ErrorCode::QueueFull => "queue_full",
    }
}

type Waiting = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Reply, ErrorReply>>>>>>;

/// A handle for making requests; clone it freely.
#[derive(Clone)]
pub struct Client {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    waiting: Waiting,
    next_id: Arc<AtomicU64>,
}

/// Responses larger than this (1 GiB) are refused. Servers bound a poll reply
/// by their frame limit (16 MiB by default), so this only stops garbage.
const MAX_RESPONSE_WORDS: usize = (1 << 30) / 8;

impl Client {
    /// Wraps a connected stream. The returned future drives the connection
    /// and must be spawned; it ends when the connection closes or every
    /// `Client` clone is dropped.
    pub fn new<S>(stream: S) -> (Client, impl Future<Output = Result<(), ClientError>>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (frames, outgoing) = mpsc::unbounded();
        let waiting: Waiting = Arc::new(Mutex::new(Some(HashMap::new())));
        let client = Client {
            frames,
            waiting: waiting.clone(),
            // Id 0 is what the server uses for errors about the connection.
            next_id: Arc::new(AtomicU64::new(1)),
        };
        (client, drive(stream, outgoing, waiting))
    }

    /// Sends one request and waits for its response.
    pub async fn call(&self, op: Op) -> Result<Reply, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = capnp::serialize::write_message_to_words(&encode_request(&Request { id, op }));
        let (reply, answer) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock().map_err(|_| ClientError::Closed)?;
            waiting.as_mut().ok_or(ClientError::Closed)?.insert(id, reply);
        }
        if self.frames.unbounded_send(frame).is_err() {
            if let Ok(mut w) = self.waiting.lock() {
                w.as_mut().map(|w| w.remove(&id));
            }
            return Err(ClientError::Closed);
        }
        answer
            .await
            .map_err(|_| ClientError::Closed)?
            .map_err(ClientError::Server)
    }

    /// Sends one operation and waits for its own reply type.
    pub async fn send<O: Dispatch>(&self, op: O) -> Result<O::Reply, ClientError> {
        O::reply_of(self.call(op.into()).await?).map_err(|reply| ClientError::UnexpectedReply {
            op: O::NAME,
            reply: Box::new(reply),
        })
    }

    /// Presents a token (`<id>.<secret>`, as `queueber token new` printed
    /// it) and binds this connection to its tenant; returns the tenant.
    pub async fn auth(&self, token: &str) -> Result<String, ClientError> {
        self.send(ops::Auth {
            token: token.to_string(),
        })
        .await
    }

    pub async fn hello(&self) -> Result<ServerInfo, ClientError> {
        self.send(ops::Hello).await
    }

    pub async fn add(&self, queue: &QueueName, messages: Vec<NewMessage>) -> Result<Vec<MessageId>, ClientError> {
        self.send(ops::Add {
            queue: queue.clone(),
            messages,
        })
        .await
    }

    /// Leases up to `max_items` visible messages for `lease_ms`, waiting up to
    /// `wait_ms` for one to appear. `None` when nothing came.
    pub async fn poll(
        &self,
        queue: &QueueName,
        max_items: u32,
        lease_ms: u64,
        wait_ms: u64,
    ) -> Result<Option<Lease>, ClientError> {
        self.send(ops::Poll {
            queue: queue.clone(),
            max_items,
            lease_ms,
            wait_ms,
        })
        .await
    }

    /// Acknowledges messages of a lease; one flag per id, false when the id
    /// is not (or no longer) held by that lease.
    pub async fn remove(
        &self,
        queue: &QueueName,
        lease: LeaseId,
        ids: Vec<MessageId>,
    ) -> Result<Vec<bool>, ClientError> {
        self.send(ops::Remove {
            queue: queue.clone(),
            lease,
            ids,
        })
        .await
    }

    /// A consumer's loop in one round trip: removes `ids` of `lease` (as
    /// [`remove`](Self::remove); none is fine, with no lease), then leases
    /// up to `max_items` more, waiting up to `wait_ms` (as
    /// [`poll`](Self::poll)). A worker that acknowledges each batch as it
    /// asks for the next pays one request per batch instead of two.
    pub async fn remove_and_poll(
        &self,
        queue: &QueueName,
        lease: Option<LeaseId>,
        ids: Vec<MessageId>,
        max_items: u32,
        lease_ms: u64,
        wait_ms: u64,
    ) -> Result<ops::RemovedAndPolled, ClientError> {
        self.send(ops::RemoveAndPoll {
            queue: queue.clone(),
            lease,
            ids,
            max_items,
            lease_ms,
            wait_ms,
        })
        .await
    }

    /// The lease's new expiry (epoch ms), or `None` if it had expired or is unknown.
    pub async fn extend(&self, queue: &QueueName, lease: LeaseId, lease_ms: u64) -> Result<Option<u64>, ClientError> {
        self.send(ops::Extend {
            queue: queue.clone(),
            lease,
            lease_ms,
        })
        .await
    }

    pub async fn release(
        &self,
        queue: &QueueName,
        lease: LeaseId,
        id: MessageId,
        delay_ms: u64,
    ) -> Result<bool, ClientError> {
        self.send(ops::Release {
            queue: queue.clone(),
            lease,
            id,
            delay_ms,
        })
        .await
    }

    pub async fn stats(&self, queue: &QueueName) -> Result<QueueStats, ClientError> {
        self.send(ops::Stats { queue: queue.clone() }).await
    }

    pub async fn list_queues(&self) -> Result<Vec<QueueName>, ClientError> {
        self.send(ops::ListQueues).await
    }

    pub async fn purge(&self, queue: &QueueName) -> Result<u64, ClientError> {
        self.send(ops::Purge { queue: queue.clone() }).await
    }

    /// Up to `max_items` messages visible now, from the head or after
    /// `cursor` (the previous reply's), without leasing them.
    pub async fn peek(
        &self,
        queue: &QueueName,
        max_items: u32,
        cursor: Option<PeekCursor>,
    ) -> Result<Peeked, ClientError> {
        self.peek_any(queue, max_items, cursor, false).await
    }

    /// Up to `max_items` dead letters (in `Peeked::dead`), oldest death
    /// first, from the start or after `cursor`.
    pub async fn peek_dead(
        &self,
        queue: &QueueName,
        max_items: u32,
        cursor: Option<PeekCursor>,
    ) -> Result<Peeked, ClientError> {
        self.peek_any(queue, max_items, cursor, true).await
    }

    async fn peek_any(
        &self,
        queue: &QueueName,
        max_items: u32,
        cursor: Option<PeekCursor>,
        dead: bool,
    ) -> Result<Peeked, ClientError> {
        self.send(ops::Peek {
            queue: queue.clone(),
            max_items,
            cursor,
            dead,
        })
        .await
    }

    /// Reports that `lease`'s message `id` could not be processed: it comes
    /// back after the queue's backoff with `error` recorded, or is
    /// dead-lettered (`dead`, or out of deliveries). False if the lease
    /// does not hold it.
    pub async fn fail(
        &self,
        queue: &QueueName,
        lease: LeaseId,
        id: MessageId,
        error: &str,
        dead: bool,
    ) -> Result<bool, ClientError> {
        self.send(ops::Fail {
            queue: queue.clone(),
            lease,
            id,
            error: error.to_string(),
            dead,
        })
        .await
    }

    /// Moves dead letters back (`ids`, or else up to `max` of the oldest, 0
    /// = all), at most 1,000 per call; `more` says to call again.
    pub async fn redrive(
        &self,
        queue: &QueueName,
        max: u64,
        ids: Vec<MessageId>,
    ) -> Result<ops::redrive::Redriven, ClientError> {
        self.send(ops::Redrive {
            queue: queue.clone(),
            max,
            ids,
        })
        .await
    }

    /// Creates `queue` with `policy`; a queue that exists with the same
    /// policy is answered as it is (`created` false), with another refused.
    pub async fn create_queue(&self, queue: &QueueName, policy: QueuePolicy) -> Result<QueueCreated, ClientError> {
        self.send(ops::CreateQueue {
            queue: queue.clone(),
            policy: Box::new(policy),
        })
        .await
    }

    pub async fn get_policy(&self, queue: &QueueName) -> Result<PolicyInfo, ClientError> {
        self.send(ops::GetPolicy { queue: queue.clone() })
            .await
            .map(|info| *info)
    }

    /// Replaces the queue's policy whole; returns it with its new version.
    pub async fn set_policy(&self, queue: &QueueName, policy: QueuePolicy) -> Result<PolicyInfo, ClientError> {
        self.send(ops::SetPolicy {
            queue: queue.clone(),
            policy: Box::new(policy),
        })
        .await
        .map(|info| *info)
    }

    pub async fn delete(&self, queue: &QueueName) -> Result<(), ClientError> {
        self.send(ops::Delete { queue: queue.clone() }).await
    }
}

async fn drive<S>(
    stream: S,
    mut outgoing: mpsc::UnboundedReceiver<Vec<u8>>,
    waiting: Waiting,
) -> Result<(), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (reader, writer) = stream.split();
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let mut writer = BufWriter::with_capacity(64 << 10, writer);
    let write = async {
        while let Some(frame) = outgoing.next().await {
            writer.write_all(&frame).await?;
            while let Ok(frame) = outgoing.try_recv() {
                writer.write_all(&frame).await?;
            }
            writer.flush().await?;
        }
        Ok::<(), ClientError>(())
    };
    // An error about the connection itself (id 0: a frame too large, TLS
    // required, a revoked token...). The server still answers what it had
    // read, then closes; calls left unanswered then fail with this error.
    let connection_error: Mutex<Option<ErrorReply>> = Mutex::new(None);
    let read = async {
        let mut options = ReaderOptions::new();
        options.traversal_limit_in_words(Some(MAX_RESPONSE_WORDS));
        loop {
            let Some(message) = capnp_futures::serialize::try_read_message(&mut reader, options)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?
            else {
                return Ok::<(), ClientError>(());
            };
            let response = match decode_response(&message) {
                Ok(response) => response,
                Err(e) => {
                    // A reply this client cannot read (a newer server's
                    // addition, say) fails its own call, not the connection.
                    let id = message
                        .get_root::<crate::queueber_capnp::response::Reader<'_>>()
                        .map(|r| r.get_id())
                        .map_err(ResponseDecodeError::from)?;
                    if let Some(reply) = waiting.lock().ok().and_then(|mut w| w.as_mut()?.remove(&id)) {
                        let _ = reply.send(Err(ErrorReply::new(
                            ErrorCode::Internal,
                            format!("unreadable reply: {e}"),
                        )));
                    }
                    continue;
                }
            };
            let reply = waiting.lock().ok().and_then(|mut w| w.as_mut()?.remove(&response.id));
            match reply {
                Some(reply) => {
                    let _ = reply.send(response.result);
                }
                None if response.id == 0 => {
                    if let (Err(e), Ok(mut slot)) = (response.result, connection_error.lock()) {
                        *slot = Some(e);
                    }
                }
                None => {}
            }
        }
    };
    let result = match select(Box::pin(write), Box::pin(read)).await {
        Either::Left((result, _)) | Either::Right((result, _)) => result,
    };
    // Whatever still waits will never be answered: it fails with the
    // server's reason if it gave one, else (dropping the senders) `Closed`.
    let reason = connection_error.lock().ok().and_then(|mut e| e.take());
    if let Ok(mut w) = waiting.lock() {
        for (_, reply) in w.take().into_iter().flatten() {
            if let Some(e) = &reason {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
    match (result, reason) {
        (Ok(()), Some(e)) => Err(ClientError::Server(e)),
        (result, _) => result,
    }
}
