//! The shard core: the one task that drives a shard's [`QueueStore`].
//!
//! Three jobs share one loop because they share one store:
//!
//! * **Coalescer.** Requests queue up while a storage call is in flight; the
//!   next call takes all of them as one atomic batch (one WAL write, one sync
//!   in `fsync` mode). There is no batching window: an idle shard answers at
//!   once, a busy one batches more.
//! * **Long-poll waiters.** A poll that finds nothing and may wait is parked
//!   on its queue. When a batch reports messages becoming visible on a queue
//!   (add, release, expired lease, delay come due), enough parked polls to
//!   take those messages are retried in the next batch; the rest keep
//!   waiting until their deadline.
//! * **Sweeper.** The loop sleeps until the earliest of: new work, a waiter's
//!   deadline, or the store's next lease expiry / delay deadline, and runs an
//!   (empty) batch then, which settles what is due and wakes waiters.
//!
//! The store is moved into the blocking-offload thread for each call and moved
//! back, so exactly one thread touches it at a time without a lock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures::channel::{mpsc, oneshot};
use futures::StreamExt;

use crate::clock::{Clock, SystemClock};
use crate::names::QueueName;
use crate::protocol::{ErrorCode, ErrorReply, Op, Reply};
use crate::runtime::{offload, within};
use crate::storage::{Command, Executed, Outcome, QueueStore, StoreError};

pub(crate) type ReplyResult = Result<Reply, ErrorReply>;
pub(crate) type ReplyTx = oneshot::Sender<ReplyResult>;

impl From<&StoreError> for ErrorReply {
    fn from(e: &StoreError) -> Self {
        let code = match e {
            StoreError::InvalidName(_) => ErrorCode::InvalidName,
            StoreError::UnknownQueue(_) => ErrorCode::UnknownQueue,
            StoreError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            StoreError::ZeroItems => ErrorCode::InvalidArgument,
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::WrongShard(_)
            | StoreError::Failed(_)
            | StoreError::Rocks { .. }
            | StoreError::Corrupt { .. }
            | StoreError::QueueIdsExhausted => ErrorCode::Internal,
        };
        ErrorReply::new(code, e.to_string())
    }
}

fn unavailable(what: &str) -> ErrorReply {
    ErrorReply::new(ErrorCode::Unavailable, format!("shard {what}"))
}

enum Job {
    Call {
        op: Op,
        reply: ReplyTx,
    },
    /// Answer every parked poll now and park no more (shutdown has begun).
    Drain,
    /// Finish the current batch and return the store.
    Stop,
}

/// A cheap handle for submitting work to the shard's core.
#[derive(Clone)]
pub(crate) struct CoreHandle {
    jobs: mpsc::UnboundedSender<Job>,
}

impl CoreHandle {
    /// Runs one operation on this shard (the caller routed it here).
    pub(crate) async fn call(&self, op: Op) -> ReplyResult {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .unbounded_send(Job::Call { op, reply })
            .map_err(|_| unavailable("is stopping"))?;
        answer.await.unwrap_or_else(|_| Err(unavailable("dropped the request")))
    }

    pub(crate) fn drain(&self) {
        let _ = self.jobs.unbounded_send(Job::Drain);
    }

    pub(crate) fn stop(&self) {
        let _ = self.jobs.unbounded_send(Job::Stop);
    }
}

/// A poll waiting for messages.
struct Parked {
    queue: QueueName,
    max_items: u32,
    lease_ms: u64,
    deadline: Instant,
    reply: ReplyTx,
}

/// How to turn a job's outcomes back into one reply.
enum Finish {
    Single(ReplyTx),
    Poll(Parked),
    Remove(ReplyTx, usize),
    ListQueues(ReplyTx),
}

/// Waiting polls per queue, plus their deadlines in order.
#[derive(Default)]
struct Waiters {
    by_queue: HashMap<QueueName, VecDeque<(u64, Parked)>>,
    deadlines: BTreeMap<(Instant, u64), QueueName>,
    next_seq: u64,
}

impl Waiters {
    fn park(&mut self, parked: Parked) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.deadlines.insert((parked.deadline, seq), parked.queue.clone());
        self.by_queue
            .entry(parked.queue.clone())
            .or_default()
            .push_back((seq, parked));
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first_key_value().map(|(k, _)| k.0)
    }

    /// Takes live waiters of `queue`, oldest first, enough to take `n` messages.
    fn wake(&mut self, queue: &QueueName, n: u64, into: &mut Vec<Parked>) {
        let Some(list) = self.by_queue.get_mut(queue) else {
            return;
        };
        // Wake waiters until they can take all `n` messages between them:
        // one waiter per message when each polls for one, fewer when they
        // poll for many (waking more would only re-park the surplus).
        let mut capacity = 0;
        while capacity < n {
            let Some((seq, parked)) = list.pop_front() else {
                break;
            };
            self.deadlines.remove(&(parked.deadline, seq));
            // A waiter whose connection went away is skipped, not counted.
            if !parked.reply.is_canceled() {
                capacity += u64::from(parked.max_items.max(1));
                into.push(parked);
            }
        }
        if list.is_empty() {
            self.by_queue.remove(queue);
        }
    }

    /// Answers every waiter whose deadline is at or before `now` with an
    /// empty poll (all of them when `now` is `None`).
    fn expire(&mut self, now: Option<Instant>) {
        while let Some(entry) = self.deadlines.first_entry() {
            if now.is_some_and(|now| entry.key().0 > now) {
                break;
            }
            let ((_, seq), queue) = entry.remove_entry();
            if let Some(list) = self.by_queue.get_mut(&queue) {
                if let Some(pos) = list.iter().position(|(s, _)| *s == seq) {
                    if let Some((_, parked)) = list.remove(pos) {
                        let _ = parked.reply.send(Ok(Reply::Polled(None)));
                    }
                }
                if list.is_empty() {
                    self.by_queue.remove(&queue);
                }
            }
        }
    }
}

/// Spawns the core of one shard on the current executor. The returned task
/// yields the store back when the core is stopped.
pub(crate) fn spawn(
    shard: usize,
    store: Box<dyn QueueStore>,
) -> (CoreHandle, glommio::task::JoinHandle<Box<dyn QueueStore>>) {
    let (jobs, incoming) = mpsc::unbounded();
    let task = glommio::spawn_local(run(shard, store, incoming)).detach();
    (CoreHandle { jobs }, task)
}

/// Converts the store's next deadline (epoch ms) to a monotonic instant.
fn store_deadline(deadline_ms: Option<u64>) -> Option<Instant> {
    let now_ms = SystemClock.now_ms();
    deadline_ms.map(|d| Instant::now() + Duration::from_millis(d.saturating_sub(now_ms)))
}

async fn run(
    shard: usize,
    store: Box<dyn QueueStore>,
    mut incoming: mpsc::UnboundedReceiver<Job>,
) -> Box<dyn QueueStore> {
    // Storage logs come from the offload thread: label them with the shard.
    let span = tracing::info_span!("shard", index = shard);
    let mut store = Some(store);
    let mut waiters = Waiters::default();
    let mut retry: Vec<Parked> = Vec::new();
    let mut store_due = store_deadline(store.as_ref().and_then(|s| s.next_deadline()));
    let mut draining = false;
    let mut stopping = false;
    let (mut batches, mut commands_run) = (0u64, 0u64);
    loop {
        // Wait for work unless some is ready (woken waiters, due timers).
        let mut jobs = Vec::new();
        if retry.is_empty() && !stopping {
            let wake_at = [waiters.next_deadline(), store_due].into_iter().flatten().min();
            let next = match wake_at {
                Some(at) => within(at.saturating_duration_since(Instant::now()), incoming.next()).await,
                None => Some(incoming.next().await),
            };
            match next {
                Some(Some(job)) => jobs.push(job),
                Some(None) => stopping = true,
                None => {}
            }
        }
        while let Ok(job) = incoming.try_recv() {
            jobs.push(job);
        }

        let mut commands = Vec::new();
        let mut finishes = Vec::new();
        for job in jobs {
            match job {
                Job::Call { op, reply } => plan(op, reply, &mut commands, &mut finishes),
                Job::Drain => draining = true,
                Job::Stop => stopping = true,
            }
        }
        for parked in retry.drain(..) {
            commands.push(Command::Poll {
                queue: parked.queue.clone(),
                max_items: parked.max_items,
                lease_ms: parked.lease_ms,
            });
            finishes.push(Finish::Poll(parked));
        }
        let now = Instant::now();
        waiters.expire(if draining { None } else { Some(now) });
        let timers_due = store_due.is_some_and(|d| d <= now);

        if !finishes.is_empty() || timers_due {
            let Some(mut owned) = store.take() else {
                break;
            };
            let list_queues = finishes.iter().any(|f| matches!(f, Finish::ListQueues(_)));
            batches += 1;
            commands_run += commands.len() as u64;
            let span = span.clone();
            let work = move || {
                let _in_shard = span.enter();
                let executed = owned.execute(commands);
                let queues = list_queues.then(|| owned.list_queues());
                let next = owned.next_deadline();
                (owned, executed, queues, next)
            };
            let (owned, executed, queues, next) = offload(work).await;
            store = Some(owned);
            store_due = store_deadline(next);
            finish(executed, queues, finishes, &mut waiters, &mut retry, draining);
        }
        if stopping && retry.is_empty() {
            break;
        }
    }
    tracing::info!(shard, batches, commands = commands_run, "shard core stopped");
    waiters.expire(None);
    // Jobs that raced with the stop get a clear answer rather than silence.
    incoming.close();
    while let Ok(job) = incoming.try_recv() {
        if let Job::Call { reply, .. } = job {
            let _ = reply.send(Err(ErrorReply::new(ErrorCode::ShuttingDown, "server is shutting down")));
        }
    }
    match store {
        Some(s) => s,
        None => unreachable!("the store is always returned by the offload"),
    }
}

/// Turns one operation into storage commands and a way to finish it.
fn plan(op: Op, reply: ReplyTx, commands: &mut Vec<Command>, finishes: &mut Vec<Finish>) {
    let command = match op {
        Op::Add { queue, messages } => Command::Add { queue, messages },
        Op::Poll {
            queue,
            max_items,
            lease_ms,
            wait_ms,
        } => {
            commands.push(Command::Poll {
                queue: queue.clone(),
                max_items,
                lease_ms,
            });
            finishes.push(Finish::Poll(Parked {
                queue,
                max_items,
                lease_ms,
                deadline: Instant::now() + Duration::from_millis(wait_ms),
                reply,
            }));
            return;
        }
        Op::Remove { queue, lease, ids } => {
            let n = ids.len();
            commands.extend(ids.into_iter().map(|id| Command::Remove {
                queue: queue.clone(),
                id,
                lease,
            }));
            finishes.push(Finish::Remove(reply, n));
            return;
        }
        Op::Extend { queue, lease, lease_ms } => Command::Extend { queue, lease, lease_ms },
        Op::Release {
            queue,
            lease,
            id,
            delay_ms,
        } => Command::Release {
            queue,
            id,
            lease,
            delay_ms,
        },
        Op::Stats { queue } => Command::Stats { queue },
        Op::Purge { queue } => Command::Purge { queue },
        Op::Delete { queue } => Command::Delete { queue },
        Op::ListQueues => {
            finishes.push(Finish::ListQueues(reply));
            return;
        }
        Op::Hello => {
            let _ = reply.send(Err(ErrorReply::new(
                ErrorCode::Internal,
                "hello is answered by the connection, not a shard",
            )));
            return;
        }
    };
    commands.push(command);
    finishes.push(Finish::Single(reply));
}

fn to_reply(outcome: Result<Outcome, StoreError>) -> ReplyResult {
    match outcome {
        Ok(Outcome::Added(ids)) => Ok(Reply::Added(ids)),
        Ok(Outcome::Polled(lease)) => Ok(Reply::Polled(lease)),
        Ok(Outcome::Removed(ok)) => Ok(Reply::Removed(vec![ok])),
        Ok(Outcome::Extended(at)) => Ok(Reply::Extended(at)),
        Ok(Outcome::Released(ok)) => Ok(Reply::Released(ok)),
        Ok(Outcome::Stats(s)) => Ok(Reply::Stats(s)),
        Ok(Outcome::Purged(n)) => Ok(Reply::Purged(n)),
        Ok(Outcome::Deleted) => Ok(Reply::Deleted),
        Err(e) => Err(ErrorReply::from(&e)),
    }
}

fn finish(
    executed: Executed,
    queues: Option<Result<Vec<QueueName>, StoreError>>,
    finishes: Vec<Finish>,
    waiters: &mut Waiters,
    retry: &mut Vec<Parked>,
    draining: bool,
) {
    let mut outcomes = executed.outcomes.into_iter();
    let missing = || Err(StoreError::Unavailable("store returned too few outcomes".into()));
    let now = Instant::now();
    for f in finishes {
        match f {
            Finish::Single(reply) => {
                let _ = reply.send(to_reply(outcomes.next().unwrap_or_else(missing)));
            }
            Finish::Poll(parked) => match outcomes.next().unwrap_or_else(missing) {
                Ok(Outcome::Polled(None)) if !draining && parked.deadline > now && !parked.reply.is_canceled() => {
                    waiters.park(parked)
                }
                other => {
                    let _ = parked.reply.send(to_reply(other));
                }
            },
            Finish::Remove(reply, n) => {
                let mut flags = Vec::with_capacity(n);
                let mut error = None;
                for _ in 0..n {
                    match outcomes.next().unwrap_or_else(missing) {
                        Ok(Outcome::Removed(ok)) => flags.push(ok),
                        Ok(other) => {
                            error = Some(ErrorReply::new(ErrorCode::Internal, format!("remove got {other:?}")))
                        }
                        Err(e) => error = Some(ErrorReply::from(&e)),
                    }
                }
                let _ = reply.send(error.map_or(Ok(Reply::Removed(flags)), Err));
            }
            Finish::ListQueues(reply) => {
                let result = match &queues {
                    Some(Ok(names)) => Ok(Reply::Queues(names.clone())),
                    Some(Err(e)) => Err(ErrorReply::from(e)),
                    None => Err(unavailable("did not list queues")),
                };
                let _ = reply.send(result);
            }
        }
    }
    for (queue, n) in executed.woken {
        waiters.wake(&queue, n, retry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::storage::{ModelStore, NewMessage};
    use std::sync::Arc;

    fn q(name: &str) -> QueueName {
        QueueName::new("t", name).unwrap()
    }

    fn run_on_executor<T: Send + 'static>(
        f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> T {
        crate::runtime::executor("core-test", None, 1 << 20)
            .spawn(f)
            .expect("executor")
            .join()
            .expect("join")
    }

    #[test]
    fn batches_map_back_to_their_callers() {
        let out = run_on_executor(|| {
            Box::pin(async {
                let store = ModelStore::new(Arc::new(ManualClock::new(1_000)));
                let (core, task) = spawn(0, Box::new(store));
                let add = core.call(Op::Add {
                    queue: q("a"),
                    messages: vec![NewMessage::new(b"1".to_vec()), NewMessage::new(b"2".to_vec())],
                });
                let stats = core.call(Op::Stats { queue: q("missing") });
                let (added, stats) = futures::join!(add, stats);
                let Ok(Reply::Added(ids)) = added else {
                    panic!("{added:?}")
                };
                let polled = core
                    .call(Op::Poll {
                        queue: q("a"),
                        max_items: 5,
                        lease_ms: 100,
                        wait_ms: 0,
                    })
                    .await;
                let Ok(Reply::Polled(Some(lease))) = polled else {
                    panic!("{polled:?}")
                };
                let removed = core
                    .call(Op::Remove {
                        queue: q("a"),
                        lease: lease.id,
                        ids: vec![ids[0], ids[0], ids[1]],
                    })
                    .await;
                let queues = core.call(Op::ListQueues).await;
                core.stop();
                task.await;
                (ids.len(), stats.map_err(|e| e.code), removed, queues)
            })
        });
        assert_eq!(out.0, 2);
        assert_eq!(out.1, Err(ErrorCode::UnknownQueue));
        assert_eq!(out.2, Ok(Reply::Removed(vec![true, false, true])));
        assert_eq!(out.3, Ok(Reply::Queues(vec![q("a")])));
    }

    #[test]
    fn parked_polls_time_out_empty_and_drain_answers_them() {
        let (timed_out, drained) = run_on_executor(|| {
            Box::pin(async {
                let store = ModelStore::new(Arc::new(ManualClock::new(1_000)));
                let (core, task) = spawn(0, Box::new(store));
                core.call(Op::Add {
                    queue: q("a"),
                    messages: vec![NewMessage::delayed(b"later".to_vec(), 1_000_000)],
                })
                .await
                .unwrap();
                let poll = |wait_ms| Op::Poll {
                    queue: q("a"),
                    max_items: 1,
                    lease_ms: 100,
                    wait_ms,
                };
                let started = Instant::now();
                let timed_out = core.call(poll(30)).await;
                assert!(started.elapsed() >= Duration::from_millis(30));
                let long = core.call(poll(60_000));
                let drain = async {
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    core.drain();
                };
                let (drained, ()) = futures::join!(long, drain);
                core.stop();
                task.await;
                (timed_out, drained)
            })
        });
        assert_eq!(timed_out, Ok(Reply::Polled(None)));
        assert_eq!(drained, Ok(Reply::Polled(None)));
    }
}
