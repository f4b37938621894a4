//! Cross-shard routing.
//!
//! Every operation on a queue runs on the queue's owner shard
//! ([`QueueName::shard`](crate::names::QueueName::shard)). A connection on
//! shard A asking about a queue owned by shard B sends the operation over A→B
//! channel with a token; B runs it on its core and sends the reply back over
//! B→A with the same token. Each pair of shards has its own single-producer
//! single-consumer channel per direction (glommio `shared_channel`), so no
//! channel is ever contended, and the calling connection only awaits a
//! oneshot: its other requests keep flowing meanwhile.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use futures::channel::oneshot;
use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};

use super::core::{CoreHandle, ReplyResult, ReplyTx};
use crate::protocol::{ErrorCode, ErrorReply, Op};

/// What travels between shards.
pub(crate) enum Envelope {
    Call { from: usize, token: u64, op: Op },
    Answer { token: u64, result: ReplyResult },
}

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
    peers: Vec<Option<ConnectedSender<Envelope>>>,
    waiting: RefCell<HashMap<u64, ReplyTx>>,
    next_token: Cell<u64>,
}

fn unavailable(shard: usize) -> ErrorReply {
    ErrorReply::new(ErrorCode::Unavailable, format!("shard {shard} is not reachable"))
}

impl Router {
    /// Connects this shard's channel ends (every peer does the same at the
    /// same time; connecting waits for the other side) and starts one task
    /// per incoming channel.
    pub(crate) async fn connect(index: usize, shards: usize, core: CoreHandle, links: ShardLinks) -> Rc<Router> {
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
            peers,
            waiting: RefCell::new(HashMap::new()),
            next_token: Cell::new(0),
        });
        for receiver in receivers.into_iter().flatten() {
            glommio::spawn_local(serve_peer(router.clone(), receiver)).detach();
        }
        router
    }

    /// Runs `op` on the shard that owns its queue.
    pub(crate) async fn call(&self, op: Op) -> ReplyResult {
        let owner = op.queue().map_or(self.index, |q| q.shard(self.shards));
        if owner == self.index {
            return self.core.call(op).await;
        }
        let Some(peer) = self.peers.get(owner).and_then(Option::as_ref) else {
            return Err(unavailable(owner));
        };
        let token = self.next_token.get();
        self.next_token.set(token.wrapping_add(1));
        let (reply, answer) = oneshot::channel();
        self.waiting.borrow_mut().insert(token, reply);
        if peer
            .send(Envelope::Call {
                from: self.index,
                token,
                op,
            })
            .await
            .is_err()
        {
            self.waiting.borrow_mut().remove(&token);
            return Err(unavailable(owner));
        }
        answer.await.unwrap_or_else(|_| Err(unavailable(owner)))
    }

    /// Drops the outgoing channels so peers' receive loops end.
    pub(crate) fn close(&self) {
        for peer in self.peers.iter().flatten() {
            peer.close();
        }
    }
}

async fn serve_peer(router: Rc<Router>, receiver: ConnectedReceiver<Envelope>) {
    while let Some(envelope) = receiver.recv().await {
        match envelope {
            Envelope::Call { from, token, op } => {
                let router = router.clone();
                glommio::spawn_local(async move {
                    let result = router.core.call(op).await;
                    if let Some(peer) = router.peers.get(from).and_then(Option::as_ref) {
                        // If the caller's shard is gone there is nobody to tell.
                        let _ = peer.send(Envelope::Answer { token, result }).await;
                    }
                })
                .detach();
            }
            Envelope::Answer { token, result } => {
                if let Some(reply) = router.waiting.borrow_mut().remove(&token) {
                    let _ = reply.send(result);
                }
            }
        }
    }
}
