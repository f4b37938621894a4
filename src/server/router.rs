//! Cross-shard routing.
//!
//! Every operation on a queue runs on the queue's owner shard
//! ([`QueueName::shard`](crate::names::QueueName::shard)). A connection on
//! shard A asking about a queue owned by shard B sends the call, reply
//! sender included, over the A→B channel; B's core answers on that sender
//! directly, which wakes the waiting request on A. No token map and no
//! per-call task: a caller that gives up drops its receiver, and B sees the
//! call as cancelled (a parked poll is then never served). Each ordered pair
//! of shards has its own single-producer single-consumer channel (glommio
//! `shared_channel`), so no channel is ever contended.
//!
//! The same channels carry whole connections: a plaintext connection whose
//! requests all go to one other shard moves there
//! ([`super::connection`]'s `Stop::Move`), so it stops paying a hop per
//! request.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use futures::channel::oneshot;
use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};

use super::budget::ConnectionBudget;
use super::core::{Answered, Call, CoreHandle};
use crate::metrics::ShardMetrics;
use crate::ops::Route;
use crate::protocol::{ErrorCode, ErrorReply, Op};

/// What travels between shards: a call for the receiving shard's core, or
/// a connection moving to it.
pub(crate) enum Envelope {
    Call(Call),
    Connection(Moved),
}

/// A connection on its way to another shard (see [`super::connection`]).
pub(crate) type Moved = super::connection::Moved;
/// Capacity of each shard-to-shard channel; a full channel makes the sender
/// wait (backpressure), never drops.
pub(crate) const CHANNEL_CAPACITY: usize = 4096;

/// The unconnected channels of an `n`-shard mesh: `senders[i][j]` sends from
/// shard `i` to shard `j`, `receivers[j][i]` receives it there.
pub(crate) struct Mesh {
    pub senders: Vec<Vec<Option<SharedSender<Envelope>>>>,
    pub receivers: Vec<Vec<Option<SharedReceiver<Envelope>>>>,
}

impl Mesh {
    pub(crate) fn new(n: usize) -> Mesh {
        let mut senders: Vec<Vec<Option<SharedSender<Envelope>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut receivers: Vec<Vec<Option<SharedReceiver<Envelope>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for (from, row) in senders.iter_mut().enumerate() {
            for (to, slot) in row.iter_mut().enumerate() {
                if from != to {
                    let (tx, rx) = glommio::channels::shared_channel::new_bounded(CHANNEL_CAPACITY);
                    *slot = Some(tx);
                    receivers[to][from] = Some(rx);
                }
            }
        }
        Mesh { senders, receivers }
    }

    /// Shard `i`'s ends: what it sends on and what it receives from.
    pub(crate) fn take(&mut self, i: usize) -> ShardLinks {
        ShardLinks {
            senders: self.senders[i].iter_mut().map(Option::take).collect(),
            receivers: self.receivers[i].iter_mut().map(Option::take).collect(),
        }
    }
}

/// One shard's unconnected channel ends (movable to its executor thread).
pub(crate) struct ShardLinks {
    senders: Vec<Option<SharedSender<Envelope>>>,
    receivers: Vec<Option<SharedReceiver<Envelope>>>,
}

pub(crate) struct Router {
    index: usize,
    shards: usize,
    core: CoreHandle,
    metrics: Rc<ShardMetrics>,
    peers: Vec<Option<ConnectedSender<Envelope>>>,
}

/// Connections other shards moved here, for the shard to serve.
pub(crate) type Arrivals = futures::channel::mpsc::UnboundedReceiver<Moved>;

fn unavailable(shard: usize) -> ErrorReply {
    ErrorReply::new(ErrorCode::Unavailable, format!("shard {shard} is not reachable"))
}

impl Router {
    /// Connects this shard's channel ends (every peer does the same at the
    /// same time; connecting waits for the other side) and starts one task
    /// per incoming channel. Connections moved here arrive on the receiver.
    pub(crate) async fn connect(
        index: usize,
        shards: usize,
        core: CoreHandle,
        metrics: Rc<ShardMetrics>,
        links: ShardLinks,
    ) -> (Rc<Router>, Arrivals) {
        let senders = futures::future::join_all(links.senders.into_iter().map(|s| async move {
            if let Some(s) = s {
                Some(s.connect().await)
            } else {
                None
            }
        }));
        let receivers = futures::future::join_all(links.receivers.into_iter().map(|r| async move {
            if let Some(r) = r {
                Some(r.connect().await)
            } else {
                None
            }
        }));
        let (peers, receivers) = futures::join!(senders, receivers);
        let router = Rc::new(Router {
            index,
            shards,
            core,
            metrics,
            peers,
        });
        let (arrived, arrivals) = futures::channel::mpsc::unbounded();
        for receiver in receivers.into_iter().flatten() {
            glommio::spawn_local(serve_peer(router.core.clone(), arrived.clone(), receiver)).detach();
        }
        (router, arrivals)
    }

    /// The shard that owns `op`'s queue; `None` for an operation on no
    /// queue, which this shard runs. Computed once per request (the
    /// connection also notes it, to move to where its queues are).
    pub(crate) fn owner(&self, op: &Op) -> Option<usize> {
        match op.route() {
            Route::Owner(queue) => Some(queue.shard(self.shards)),
            Route::Local | Route::Connection => None,
        }
    }

    /// Runs `op` on shard `owner` ([`Router::owner`] of it). `budget` is the
    /// calling connection's buffer account (a poll's reply is limited by
    /// it). `read_at` is when the request's frame was read.
    ///
    /// A call for this shard is submitted at once, before the returned
    /// future is first polled (dropping the future cancels it, as ever).
    /// That keeps the future down to the reply's receiver: it lives in
    /// every request's task, which glommio allocates and moves whole.
    pub(crate) fn call(
        &self,
        owner: Option<usize>,
        op: Op,
        read_at: Instant,
        budget: Option<Arc<ConnectionBudget>>,
    ) -> impl Future<Output = Answered> + '_ {
        let owner = owner.unwrap_or(self.index);
        let (reply, answer) = oneshot::channel();
        let call = Call {
            op,
            reply,
            read_at,
            budget,
        };
        let sending = if owner == self.index {
            self.core.submit(call);
            None
        } else {
            // Boxed: the channel's send future holds a whole envelope. Only
            // calls for another shard pay for the box, beside a hop that
            // costs far more.
            self.metrics.record_cross_shard();
            Some(Box::pin(self.send_call(owner, call)))
        };
        async move {
            if let Some(sending) = sending {
                if !sending.await {
                    return Answered::now(Err(unavailable(owner)));
                }
            }
            answer.await.unwrap_or_else(|_| Answered::now(Err(unavailable(owner))))
        }
    }

    /// Puts `call` on the channel to shard `owner`; false if it is gone.
    async fn send_call(&self, owner: usize, call: Call) -> bool {
        match self.peers.get(owner).and_then(Option::as_ref) {
            Some(peer) => peer.send(Envelope::Call(call)).await.is_ok(),
            None => false,
        }
    }

    /// Hands a connection to shard `to`. If that shard takes no more (it is
    /// shutting down) the connection comes back to be served here; `None`
    /// only if the channel failed some other way, which closes it (nothing
    /// was in flight on it).
    pub(crate) async fn send_connection(&self, to: usize, moved: Moved) -> Result<(), Option<Moved>> {
        use glommio::{GlommioError, ResourceType};
        let Some(peer) = self.peers.get(to).and_then(Option::as_ref) else {
            return Err(Some(moved));
        };
        match peer.send(Envelope::Connection(moved)).await {
            Ok(()) => Ok(()),
            Err(GlommioError::Closed(ResourceType::Channel(Envelope::Connection(moved))))
            | Err(GlommioError::WouldBlock(ResourceType::Channel(Envelope::Connection(moved)))) => Err(Some(moved)),
            Err(_) => Err(None),
        }
    }

    /// This shard's index.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// How many shards there are.
    pub(crate) fn shards(&self) -> usize {
        self.shards
    }

    /// Drops the outgoing channels so peers' receive loops end.
    pub(crate) fn close(&self) {
        for peer in self.peers.iter().flatten() {
            peer.close();
        }
    }
}

/// Hands calls from one peer shard to this shard's core, and connections
/// it moves here to the shard.
async fn serve_peer(
    core: CoreHandle,
    arrived: futures::channel::mpsc::UnboundedSender<Moved>,
    receiver: ConnectedReceiver<Envelope>,
) {
    while let Some(envelope) = receiver.recv().await {
        match envelope {
            Envelope::Call(call) => core.submit(call),
            // Dropped (the socket closes) only if the shard stopped serving.
            Envelope::Connection(moved) => {
                let _ = arrived.unbounded_send(moved);
            }
        }
    }
}
