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
//!   waiting until their deadline. Two shortcuts save storage trips on
//!   quiet queues: polls parked on a queue the batch adds to run right
//!   after it in the same hand-off ([`FollowUp`]), and a poll of a queue
//!   the store last reported with nothing visible parks without a storage
//!   call ([`Waiters::nothing_visible`]).
//! * **Sweeper.** The loop sleeps until the earliest of: new work, a waiter's
//!   deadline, or the store's next lease expiry / delay deadline, and runs an
//!   (empty) batch then, which settles what is due and wakes waiters. After
//!   a batch that failed as a whole, the store's deadline waits at least
//!   [`FAILED_BATCH_PAUSE`], so a due timer whose writes fail does not spin.
//!
//! The store is moved into the shard's own blocking-offload thread
//! ([`OffloadThread`]) for each call and moved back, so exactly one thread
//! touches it at a time without a lock.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use futures::channel::{mpsc, oneshot};
use futures::future::{select, Either};
use futures::StreamExt;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use std::pin::pin;

use crate::clock::Clock;
use crate::hashing::{Map, Set};
use crate::metrics::{QueueSeries, ShardMetrics, ShardSnapshot};
use crate::names::QueueName;
use crate::ops::{self, Plan, ReplyFn, Serve};
use crate::protocol::{ErrorCode, ErrorReply, Op, Reply};
use crate::runtime::{Alarm, OffloadThread};
use crate::storage::{
    Command, CommandError, Executed, Outcome, QueueSnapshot, QueueStore, ReplyBudget, StorageError, StoreError,
};
use std::rc::Rc;

use super::budget::{BatchReplyRoom, ConnectionBudget};
use std::sync::Arc;

pub(crate) type ReplyResult = Result<Reply, ErrorReply>;
pub(crate) type ReplyTx = oneshot::Sender<Answered>;

/// A call's answer, and where its time went at the owner's core (for the
/// slow-request log).
#[derive(Debug)]
pub(crate) struct Answered {
    pub result: ReplyResult,
    pub timing: Timing,
}

impl Answered {
    /// An answer that took no time at a core (refusals, parked polls
    /// answered at their deadline).
    pub(crate) fn now(result: ReplyResult) -> Answered {
        Answered {
            result,
            timing: Timing::default(),
        }
    }
}

/// Where a request's time went at its core.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Timing {
    /// From the frame read (or, for a woken long poll, its wake-up) until
    /// its storage batch started: routing and waiting for the batch ahead.
    pub queued: Duration,
    /// The storage batch.
    pub storage: Duration,
    /// Waiting for the WAL sync that made its writes durable, after the
    /// batch (`fsync` durability, the writes `Command::needs_sync` marks).
    pub sync: Duration,
}

impl From<&CommandError> for ErrorReply {
    fn from(e: &CommandError) -> Self {
        let code = match e {
            CommandError::InvalidName(_) => ErrorCode::InvalidName,
            CommandError::UnknownQueue(_) => ErrorCode::UnknownQueue,
            CommandError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            CommandError::DiskFull(_) => ErrorCode::DiskFull,
            CommandError::QueueFull { .. } | CommandError::TooManyQueues { .. } => ErrorCode::QueueFull,
            CommandError::QueueExists(_) => ErrorCode::InvalidArgument,
            CommandError::WrongShard(_) | CommandError::QueueIdsExhausted => ErrorCode::Internal,
        };
        ErrorReply::new(code, e.to_string())
    }
}

impl From<&StorageError> for ErrorReply {
    fn from(e: &StorageError) -> Self {
        let code = match e {
            // A batch that ran out of space fails as a whole; say why.
            StorageError::Rocks { no_space: true, .. } => ErrorCode::DiskFull,
            StorageError::Rocks { .. } | StorageError::Corrupt { .. } => ErrorCode::Internal,
            StorageError::Unavailable(_) => ErrorCode::Unavailable,
        };
        ErrorReply::new(code, e.to_string())
    }
}

impl From<&StoreError> for ErrorReply {
    fn from(e: &StoreError) -> Self {
        match e {
            StoreError::Command(e) => e.into(),
            StoreError::Storage(e) => e.into(),
        }
    }
}

fn unavailable(what: &str) -> ErrorReply {
    ErrorReply::new(ErrorCode::Unavailable, format!("shard {what}"))
}

/// What the core receives: jobs from any thread, calls from its own.
struct Inbox {
    jobs: mpsc::UnboundedReceiver<Job>,
    calls: LocalReceiver<Call>,
}

/// What woke the core's wait.
enum Next {
    Job(Option<Job>),
    Call(Option<Call>),
    /// A deadline may be due (a parked poll's, the store's).
    Alarm,
}

enum Job {
    /// Report this shard's figures (a metrics scrape).
    Snapshot(oneshot::Sender<ShardSnapshot>),
    /// Answer every parked poll now and park no more (shutdown has begun).
    Drain,
    /// Finish the current batch and return the store.
    Stop,
}

/// One operation for this shard, with where its answer goes. The reply
/// sender travels with the request, across shards too: the owner answers
/// the caller directly, and a caller that gives up (its connection closed)
/// drops the receiver, which the owner sees as a cancelled request.
pub(crate) struct Call {
    pub op: Op,
    pub reply: ReplyTx,
    /// When its frame was read (the start of its time at the core).
    pub read_at: Instant,
    /// The calling connection's buffer account: a poll's reply is limited
    /// to the room left in it. `None` for internal callers.
    pub budget: Option<Arc<ConnectionBudget>>,
}

impl Call {
    /// Who this request counts against when batches are shared out.
    fn source(&self) -> usize {
        self.budget.as_ref().map_or(0, |b| Arc::as_ptr(b) as usize)
    }

    fn batch_writes(&self) -> usize {
        self.op.batch_writes()
    }
}

/// Most bulk writes ([`Serve::batch_writes`]: added messages) one batch
/// takes. Requests beyond it wait for the next batch, so a write flood
/// cannot make a batch (and everything answered with it: polls, removes,
/// stats) arbitrarily long.
const BATCH_WRITES: usize = 4096;
/// Most bulk writes one connection contributes to a batch while others
/// wait: a single heavy producer cannot fill every batch.
const BATCH_WRITES_PER_SOURCE: usize = 1024;

/// A cheap handle for submitting work to the shard's core, for tasks of
/// the core's own executor (its connections, and the calls peers route
/// here). Not `Send`: see [`CoreControl`] for other threads.
#[derive(Clone)]
pub(crate) struct CoreHandle {
    control: CoreControl,
    /// glommio's channel of one executor: no allocation and no atomics per
    /// call (futures' mpsc took both, about 1% of the server's
    /// instructions at B=1, callgrind).
    calls: Rc<LocalSender<Call>>,
}

/// Control of a shard's core from any thread: metrics, drain, stop.
#[derive(Clone)]
pub(crate) struct CoreControl {
    jobs: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for CoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoreHandle")
    }
}

impl std::fmt::Debug for CoreControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoreControl")
    }
}

impl CoreHandle {
    /// Runs one operation on this shard for an internal caller (no buffer
    /// account); connections go through [`CoreHandle::submit`].
    #[cfg(test)]
    pub(crate) async fn call(&self, op: Op) -> ReplyResult {
        let (reply, answer) = oneshot::channel();
        self.submit(Call {
            op,
            reply,
            read_at: Instant::now(),
            budget: None,
        });
        answer
            .await
            .map(|a| a.result)
            .unwrap_or_else(|_| Err(unavailable("dropped the request")))
    }

    /// Queues a call whose caller waits on its reply sender.
    pub(crate) fn submit(&self, call: Call) {
        use glommio::{GlommioError, ResourceType};
        if let Err(
            GlommioError::Closed(ResourceType::Channel(call)) | GlommioError::WouldBlock(ResourceType::Channel(call)),
        ) = self.calls.try_send(call)
        {
            let _ = call.reply.send(Answered::now(Err(unavailable("is stopping"))));
        }
    }

    /// The part other threads may hold.
    pub(crate) fn control(&self) -> CoreControl {
        self.control.clone()
    }

    pub(crate) fn drain(&self) {
        self.control.drain();
    }

    pub(crate) fn stop(&self) {
        self.control.stop();
    }
}

impl CoreControl {
    /// Asks the core for its figures; `None` if it has stopped.
    pub(crate) async fn snapshot(&self) -> Option<ShardSnapshot> {
        let (reply, answer) = oneshot::channel();
        self.jobs.unbounded_send(Job::Snapshot(reply)).ok()?;
        answer.await.ok()
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
    poll: ops::Poll,
    /// When this attempt began: the frame read, or the wake-up of a retry.
    attempt_at: Instant,
    deadline: Instant,
    reply: ReplyTx,
    budget: Option<Arc<ConnectionBudget>>,
}

/// How to turn a call's outcomes back into its reply.
enum Finish {
    /// Built by the operation itself from its commands' outcomes.
    Reply {
        reply: ReplyTx,
        commands: usize,
        build: ReplyFn,
        read_at: Instant,
        /// Answered once the batch's WAL sync is done, if it has one (see
        /// `Command::needs_sync`).
        waits_for_sync: bool,
    },
    /// A poll that ran.
    Poll(Parked),
    /// A poll that did not run: its connection has no room for a reply, or
    /// its queue is known to have nothing visible ([`Waiters::nothing_visible`]).
    PollNotRun(Parked),
    /// `removeAndPoll`: its removes' outcomes, then its poll attempt's
    /// (when it ran: `polled`).
    RemoveThenPoll {
        reply: ReplyTx,
        removes: usize,
        polled: bool,
        queue: QueueName,
        may_wait: bool,
        read_at: Instant,
    },
    /// One chunk of a scrape's queue figures.
    ScrapeChunk,
}

/// Counts an empty poll answer of `queue` (cloning the name only the
/// first time).
fn count_empty(counts: &mut Map<QueueName, u64>, queue: &QueueName) {
    match counts.get_mut(queue) {
        Some(n) => *n += 1,
        None => {
            counts.insert(queue.clone(), 1);
        }
    }
}

/// Waiting polls per queue, plus their deadlines in order.
#[derive(Default)]
struct Waiters {
    by_queue: Map<QueueName, VecDeque<(u64, Parked)>>,
    deadlines: BTreeMap<(Instant, u64), QueueName>,
    next_seq: u64,
    /// Polls answered with nothing, per queue (metrics).
    polls_empty: Map<QueueName, u64>,
    /// Queues with nothing visible as of the last batch that polled them
    /// (`Executed::empty`), until a batch reports messages becoming visible
    /// there (`Executed::woken`). A poll of one parks (or is answered empty)
    /// without a storage call: on a quiet queue a consumer's next poll
    /// would otherwise cost a trip to the storage thread to find nothing.
    nothing_visible: Set<QueueName>,
}

impl Waiters {
    fn park(&mut self, parked: Parked) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.deadlines.insert((parked.deadline, seq), parked.poll.queue.clone());
        self.by_queue
            .entry(parked.poll.queue.clone())
            .or_default()
            .push_back((seq, parked));
    }

    fn count_empty(&mut self, queue: &QueueName) {
        count_empty(&mut self.polls_empty, queue);
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
                capacity += u64::from(parked.poll.max_items.max(1));
                into.push(Parked {
                    attempt_at: Instant::now(),
                    ..parked
                });
            }
        }
        if list.is_empty() {
            self.by_queue.remove(queue);
        }
    }

    /// Answers every waiter of `queue` with an empty poll (the queue was
    /// deleted: a poll must not outlive it into a queue re-created by name).
    fn answer_queue(&mut self, queue: &QueueName) {
        self.nothing_visible.remove(queue);
        if let Some(list) = self.by_queue.remove(queue) {
            for (seq, parked) in list {
                self.deadlines.remove(&(parked.deadline, seq));
                let _ = parked.reply.send(Answered::now(Ok(Reply::Polled(None))));
            }
        }
        // Its series go with it.
        self.polls_empty.remove(queue);
    }

    /// Answers every waiter whose deadline is at or before `now` with an
    /// empty poll (all of them when `now` is `None`), and forgets waiters
    /// whose caller has gone.
    fn expire(&mut self, now: Option<Instant>) {
        while let Some(entry) = self.deadlines.first_entry() {
            if now.is_some_and(|now| entry.key().0 > now) {
                break;
            }
            let ((_, seq), queue) = entry.remove_entry();
            if let Some(list) = self.by_queue.get_mut(&queue) {
                if let Some(pos) = list.iter().position(|(s, _)| *s == seq) {
                    if let Some((_, parked)) = list.remove(pos) {
                        let _ = parked.reply.send(Answered::now(Ok(Reply::Polled(None))));
                        count_empty(&mut self.polls_empty, &queue);
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
///
/// `clock` must be the store's: lease expiries and delays are in its time,
/// and the sweeper converts them to how long to sleep with it.
pub(crate) fn spawn(
    shard: usize,
    store: Box<dyn QueueStore>,
    clock: Arc<dyn Clock>,
    metrics: Rc<ShardMetrics>,
    hand_off: HandOff,
    offload: OffloadThread,
) -> (CoreHandle, glommio::task::JoinHandle<Box<dyn QueueStore>>) {
    let (jobs, incoming) = mpsc::unbounded();
    let (calls, arriving) = local_channel::new_unbounded();
    let inbox = Inbox {
        jobs: incoming,
        calls: arriving,
    };
    let task = glommio::spawn_local(run(shard, store, clock, metrics, inbox, hand_off, offload)).detach();
    let control = CoreControl { jobs };
    let calls = Rc::new(calls);
    (CoreHandle { control, calls }, task)
}

/// How long after a batch that failed as a whole the store's deadlines are
/// tried again at the earliest. Requests still run at once.
const FAILED_BATCH_PAUSE: Duration = Duration::from_millis(100);

/// How the core waits for a storage batch on its offload thread (see
/// [`OffloadThread::run`]). No batch waits for the disk there
/// (WAL syncs run on the engine's syncer), so every batch may be yielded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HandOff {
    /// How long the executor yields its CPU to the batch before parking.
    pub yield_for: Duration,
}

impl HandOff {
    /// Always park (the plain offload).
    #[cfg(test)]
    pub(crate) const PARK: HandOff = HandOff {
        yield_for: Duration::ZERO,
    };

    /// How long to yield for the next batch, given how long batches have
    /// lately taken (`typical`): not at all when they outlast the yield (a
    /// deeply pipelined load).
    fn for_batch(&self, typical: Duration) -> Duration {
        if typical > self.yield_for {
            Duration::ZERO
        } else {
            self.yield_for
        }
    }
}

/// Converts the store's next deadline (epoch ms) to a monotonic instant.
fn store_deadline(clock: &dyn Clock, deadline_ms: Option<u64>) -> Option<Instant> {
    let now_ms = clock.now_ms();
    deadline_ms.map(|d| Instant::now() + Duration::from_millis(d.saturating_sub(now_ms)))
}

/// Calls not yet taken into a batch, in arrival order. Calls without bulk
/// writes are taken by the next batch; those with them (adds) are taken up
/// to [`BATCH_WRITES`], at most [`BATCH_WRITES_PER_SOURCE`] per connection
/// while others wait, so under a write flood adds are pushed back and
/// everything else waits at most one (bounded) batch.
#[derive(Default)]
struct Backlog {
    writes: VecDeque<Call>,
}

impl Backlog {
    /// Splits newly arrived calls: bulk writes join the backlog, the rest run now.
    fn take(&mut self, arrived: &mut Vec<Call>, now: &mut Vec<Call>) {
        for call in arrived.drain(..) {
            if call.batch_writes() > 0 {
                self.writes.push_back(call);
            } else {
                now.push(call);
            }
        }
        // The common case: everything waiting fits under both limits, so
        // nothing is deferred. Taken as is, without the per-source map and
        // without replacing the queue's buffer (two allocations per batch).
        let waiting: usize = self.writes.iter().map(Call::batch_writes).sum();
        if waiting < BATCH_WRITES_PER_SOURCE.min(BATCH_WRITES) {
            now.extend(self.writes.drain(..));
            return;
        }
        let mut taken = 0;
        let mut per_source: Map<usize, usize> = Map::default();
        let mut deferred = VecDeque::new();
        while let Some(call) = self.writes.pop_front() {
            if taken >= BATCH_WRITES {
                self.writes.push_front(call);
                break;
            }
            let n = call.batch_writes();
            let from_source = per_source.entry(call.source()).or_default();
            if taken > 0 && *from_source >= BATCH_WRITES_PER_SOURCE {
                deferred.push_back(call);
                continue;
            }
            *from_source += n;
            taken += n;
            now.push(call);
        }
        deferred.extend(self.writes.drain(..));
        self.writes = deferred;
    }

    fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    fn len(&self) -> usize {
        self.writes.len()
    }
}

/// Queues snapshotted per storage batch: a scrape of many queues is spread
/// over several batches, so no batch (and no request answered with it)
/// waits for all of them. About 1 ms of storage work per chunk.
const SNAPSHOT_CHUNK: usize = 256;

/// A scrape in progress on this shard.
#[derive(Default)]
struct Scrape {
    /// Who waits for it (scrapes arriving meanwhile share it).
    replies: Vec<oneshot::Sender<ShardSnapshot>>,
    /// Where the walk over the shard's queues (in name order) resumes:
    /// after the last queue snapshotted.
    after: Option<QueueName>,
    /// A chunk is in the batch being run.
    asked: bool,
    done: Vec<QueueSnapshot>,
}

impl Scrape {
    /// Plans its next step into the batch, if it has one now.
    fn plan(&mut self, commands: &mut Vec<Command>, finishes: &mut Vec<Finish>) {
        if self.asked {
            return;
        }
        commands.push(Command::Snapshot {
            after: self.after.clone(),
            max_queues: SNAPSHOT_CHUNK,
        });
        finishes.push(Finish::ScrapeChunk);
        self.asked = true;
    }

    /// Takes a step's outcome; answers every waiting scrape when all is
    /// collected (a failed step answers with what was collected).
    fn take(
        &mut self,
        outcome: Option<Result<Outcome, ErrorReply>>,
        reporter: &Reporter<'_>,
        waiters: &Waiters,
    ) -> bool {
        self.asked = false;
        let finished = match outcome {
            Some(Ok(Outcome::Snapshot(mut queues))) => {
                let last_chunk = queues.len() < SNAPSHOT_CHUNK;
                self.after = queues.last().map(|q| q.queue.clone());
                self.done.append(&mut queues);
                last_chunk
            }
            _ => true,
        };
        if finished {
            let snapshot = reporter.snapshot(std::mem::take(&mut self.done), waiters);
            // A copy for every scrape but the last, which takes it: a
            // snapshot of thousands of queues is thousands of names to copy
            // on the shard's core.
            if let Some(last) = self.replies.pop() {
                for reply in self.replies.drain(..) {
                    let _ = reply.send(snapshot.clone());
                }
                let _ = last.send(snapshot);
            }
        }
        finished
    }
}

/// What a snapshot needs besides the store's figures.
struct Reporter<'a> {
    shard: usize,
    metrics: &'a ShardMetrics,
    pending: u64,
}

impl Reporter<'_> {
    fn snapshot(&self, queues: Vec<QueueSnapshot>, waiters: &Waiters) -> ShardSnapshot {
        let queues = queues
            .into_iter()
            .map(|store| QueueSeries {
                parked_polls: waiters.by_queue.get(&store.queue).map_or(0, |l| l.len() as u64),
                polls_empty: waiters.polls_empty.get(&store.queue).copied().unwrap_or(0),
                store,
            })
            .collect();
        ShardSnapshot {
            shard: self.shard,
            queues,
            pending_requests: self.pending,
            figures: self.metrics.figures(),
        }
    }
}

async fn run(
    shard: usize,
    store: Box<dyn QueueStore>,
    clock: Arc<dyn Clock>,
    metrics: Rc<ShardMetrics>,
    inbox: Inbox,
    hand_off: HandOff,
    offload: OffloadThread,
) -> Box<dyn QueueStore> {
    let Inbox {
        jobs: mut incoming,
        calls: arriving,
    } = inbox;
    let mut store = Some(store);
    let mut waiters = Waiters::default();
    let mut retry: Vec<Parked> = Vec::new();
    let mut backlog = Backlog::default();
    let mut scrape: Option<Scrape> = None;
    let mut store_due = store_deadline(&*clock, store.as_ref().and_then(|s| s.next_deadline()));
    let mut draining = false;
    let mut stopping = false;
    let (mut batches, mut commands_run) = (0u64, 0u64);
    let mut typical_batch = Duration::ZERO;
    // Reused by every pass (an allocation each otherwise).
    let (mut jobs, mut arrived, mut calls) = (Vec::new(), Vec::new(), Vec::new());
    let mut room = ReplyRooms::default();
    let mut calls_open = true;
    // Wakes the core for the next deadline without a timer per wait.
    let mut alarm = Alarm::new();
    loop {
        // Wait for work unless some is ready (woken waiters, deferred adds,
        // due timers).
        if retry.is_empty() && backlog.is_empty() && scrape.is_none() && !stopping {
            if let Some(at) = [waiters.next_deadline(), store_due].into_iter().flatten().min() {
                alarm.set_by(at);
            }
            let work = async {
                if calls_open {
                    match select(incoming.next(), pin!(arriving.recv())).await {
                        Either::Left((job, _)) => Next::Job(job),
                        Either::Right((call, _)) => Next::Call(call),
                    }
                } else {
                    Next::Job(incoming.next().await)
                }
            };
            let next = match select(pin!(work), pin!(alarm.rung())).await {
                Either::Left((next, _)) => next,
                Either::Right(((), _)) => Next::Alarm,
            };
            match next {
                Next::Job(Some(job)) => jobs.push(job),
                Next::Job(None) => stopping = true,
                Next::Call(Some(call)) => arrived.push(call),
                // Every handle is gone: only jobs can come now.
                Next::Call(None) => calls_open = false,
                // Whatever is due is settled below.
                Next::Alarm => {}
            }
        }
        while let Ok(job) = incoming.try_recv() {
            jobs.push(job);
        }
        while calls_open {
            match futures::FutureExt::now_or_never(arriving.recv()) {
                Some(Some(call)) => arrived.push(call),
                Some(None) => calls_open = false,
                None => break,
            }
        }

        let mut scrapes = Vec::new();
        for job in jobs.drain(..) {
            match job {
                Job::Snapshot(reply) => scrapes.push(reply),
                Job::Drain => draining = true,
                Job::Stop => stopping = true,
            }
        }
        backlog.take(&mut arrived, &mut calls);
        let mut commands = Vec::new();
        let mut finishes = Vec::new();
        for call in calls.drain(..) {
            plan(call, &waiters.nothing_visible, &mut room, &mut commands, &mut finishes);
        }
        for parked in retry.drain(..) {
            plan_poll(parked, &mut room, &mut commands, &mut finishes);
        }
        if !scrapes.is_empty() {
            // Scrapes arriving while one runs share its answer.
            scrape.get_or_insert_with(Scrape::default).replies.append(&mut scrapes);
        }
        if let Some(s) = scrape.as_mut() {
            s.plan(&mut commands, &mut finishes);
        }
        let now = Instant::now();
        waiters.expire(if draining { None } else { Some(now) });
        let timers_due = store_due.is_some_and(|d| d <= now);
        let follow = if draining {
            FollowUp::default()
        } else {
            FollowUp::plan(&commands, &mut waiters, &mut room)
        };

        let ran = if !commands.is_empty() || timers_due {
            let Some(mut owned) = store.take() else {
                break;
            };
            batches += 1;
            let batch_commands = commands.len() + follow.commands.len();
            commands_run += batch_commands as u64;
            let started = Instant::now();
            let yield_for = hand_off.for_batch(typical_batch);
            let FollowUp {
                commands: follow_commands,
                finishes: follow_finishes,
                queues: follow_queues,
            } = follow;
            let work = move || {
                // The follow-ups run last in the same batch: they see its
                // adds, and the batch commits once.
                let mut commands = commands;
                let planned = commands.len();
                commands.extend(follow_commands);
                let mut executed = owned.execute(commands);
                let followed = split_off_followed(&mut executed, planned);
                let next = owned.next_deadline();
                (owned, executed, followed, next)
            };
            let (owned, mut executed, followed, next) = offload.run(work, yield_for).await;
            let took = started.elapsed();
            // A moving average over about the last eight batches.
            typical_batch = (typical_batch * 7 + took) / 8;
            metrics.record_batch(took, batch_commands);
            store = Some(owned);
            store_due = store_deadline(&*clock, next);
            // What was due may be what fails (writes settling an expired
            // lease on a full disk; a shard whose storage failed for good):
            // retried after a pause, not at once, which would spin the shard.
            if executed.outcomes.is_err() {
                let later = Instant::now() + FAILED_BATCH_PAUSE;
                store_due = store_due.map(|due| due.max(later));
            }
            let batch = BatchTiming { started, took };
            // (Follow-ups without a command are polls without room: they park.)
            let followed = (!follow_finishes.is_empty()).then(|| {
                let f = followed;
                for (queue, _) in &executed.woken {
                    waiters.nothing_visible.remove(queue);
                }
                // What the follow-up polls took wakes nobody else.
                executed.woken = still_to_wake(std::mem::take(&mut executed.woken), &follow_queues, &f);
                (f, follow_finishes)
            });
            Some((executed, batch, followed))
        } else if !finishes.is_empty() {
            // Follow-ups come only from adds, which are commands.
            debug_assert!(follow.finishes.is_empty());
            // Nothing ran: answers (polls without room, hello) take no time here.
            let batch = BatchTiming {
                started: Instant::now(),
                took: Duration::ZERO,
            };
            Some((Executed::default(), batch, None))
        } else {
            None
        };
        if let Some((executed, batch, followed)) = ran {
            let ctx = Finishing {
                draining,
                reporter: Reporter {
                    shard,
                    metrics: &metrics,
                    pending: backlog.len() as u64,
                },
                batch,
            };
            // The follow-up polls are answered first: a consumer waiting on
            // a long poll is the latency a queue is judged by, and its answer
            // then goes out (and its thread is woken) before the producer's.
            // A follow-up that found nothing parks again before the batch's
            // wake-ups are handed out, which may wake it once more.
            if let Some((executed, finishes)) = followed {
                finish(executed, finishes, &mut waiters, &mut retry, &mut scrape, &ctx);
            }
            finish(executed, finishes, &mut waiters, &mut retry, &mut scrape, &ctx);
        }
        // The replies are built: the connections charge them as they encode
        // them, so the reservations go (the map keeps its room).
        room.clear();
        if stopping && retry.is_empty() && backlog.is_empty() {
            break;
        }
    }
    tracing::info!(shard, batches, commands = commands_run, "shard core stopped");
    waiters.expire(None);
    // Calls that raced with the stop get a clear answer rather than silence;
    // once the receiver is gone, later submits are answered `unavailable`.
    incoming.close();
    while let Some(Some(call)) = futures::FutureExt::now_or_never(arriving.recv()) {
        let _ = call.reply.send(Answered::now(Err(ErrorReply::new(
            ErrorCode::ShuttingDown,
            "server is shutting down",
        ))));
    }
    drop(arriving);
    match store {
        Some(s) => s,
        None => unreachable!("the store is always returned by the offload"),
    }
}

/// Long polls parked on queues that a batch adds to, run at the end of the
/// same batch.
///
/// Why: otherwise the batch's answer wakes them and they run in the next
/// batch, so a consumer that waits gets its message two storage round trips
/// after the add instead of one; under a light load (an open loop, a quiet
/// queue) that second trip is a third of a message's CPU and latency. In
/// the same batch (not a second one after it) the two commit as one write,
/// and a message the add stores and the poll leases is written once, in
/// its lease (`storage::shard::fresh`), instead of being put into the ready
/// index and deleted again.
/// A follow-up that finds nothing (the add failed, was delayed, or another
/// poll of the batch took the messages) parks again, as a woken poll does.
#[derive(Default)]
struct FollowUp {
    commands: Vec<Command>,
    finishes: Vec<Finish>,
    /// The queue of each of `commands`.
    queues: Vec<QueueName>,
}

impl FollowUp {
    /// Takes, per queue that `commands` add visible messages to, enough
    /// parked polls to take them ([`Waiters::wake`]) and plans them.
    fn plan(commands: &[Command], waiters: &mut Waiters, rooms: &mut ReplyRooms) -> FollowUp {
        let mut follow = FollowUp::default();
        if waiters.by_queue.is_empty() {
            return follow;
        }
        let mut visible: Map<&QueueName, u64> = Map::default();
        for command in commands {
            let Command::Add { queue, messages } = command else {
                continue;
            };
            if waiters.by_queue.contains_key(queue) {
                *visible.entry(queue).or_default() += messages.iter().filter(|m| m.delay_ms == 0).count() as u64;
            }
        }
        let mut woken = Vec::new();
        for (queue, n) in visible {
            waiters.wake(queue, n, &mut woken);
        }
        for parked in woken {
            let queue = parked.poll.queue.clone();
            let before = follow.commands.len();
            plan_poll(parked, rooms, &mut follow.commands, &mut follow.finishes);
            if follow.commands.len() > before {
                follow.queues.push(queue);
            }
        }
        follow
    }
}

/// Splits the outcomes of a batch's follow-up polls (the commands after the
/// first `planned`) off into their own result; a storage failure fails
/// both alike. The rest (wake-ups, empty queues, the WAL sync) stays with
/// the batch.
fn split_off_followed(executed: &mut Executed, planned: usize) -> Executed {
    let outcomes = match &mut executed.outcomes {
        Ok(list) => Ok(list.split_off(planned.min(list.len()))),
        Err(e) => Err(e.clone()),
    };
    Executed {
        outcomes,
        ..Executed::default()
    }
}

/// The batch's woken counts less what its follow-up polls (`followed`, on
/// `queues`) delivered: those messages are taken, and waking more polls
/// for them would only cost a batch that finds nothing.
fn still_to_wake(woken: Vec<(QueueName, u64)>, queues: &[QueueName], followed: &Executed) -> Vec<(QueueName, u64)> {
    let Ok(outcomes) = &followed.outcomes else {
        return woken;
    };
    let mut delivered: Map<&QueueName, u64> = Map::default();
    for (queue, outcome) in queues.iter().zip(outcomes) {
        if let Ok(Outcome::Polled(Some(lease))) = outcome {
            *delivered.entry(queue).or_default() += lease.messages.len() as u64;
        }
    }
    woken
        .into_iter()
        .filter_map(|(queue, n)| {
            let left = n.saturating_sub(delivered.get(&queue).copied().unwrap_or(0));
            (left > 0).then_some((queue, left))
        })
        .collect()
}

/// The reply room of each calling connection in the batch being planned:
/// a connection's polls in one batch share one (see [`BatchReplyRoom`]).
#[derive(Default)]
struct ReplyRooms {
    by_source: Map<usize, ReplyBudget>,
}

impl ReplyRooms {
    /// Lets the batch's rooms go (their reservations with them).
    fn clear(&mut self) {
        self.by_source.clear();
    }

    /// The room for a poll of `account`, or `None` when the caller has no
    /// room for a reply right now (over its share, or the server's budget
    /// is used up).
    fn for_caller(&mut self, account: Option<&Arc<ConnectionBudget>>) -> Option<ReplyBudget> {
        let Some(account) = account else {
            return Some(ReplyBudget::unlimited());
        };
        if !account.has_room() {
            return None;
        }
        let key = Arc::as_ptr(account) as usize;
        let room = self
            .by_source
            .entry(key)
            .or_insert_with(|| ReplyBudget::from_room(Arc::new(BatchReplyRoom::new(account.clone()))));
        Some(room.clone())
    }
}

/// Plans a poll (new or woken) against its caller's reply room, or parks it
/// without running when the caller has no room for a reply.
fn plan_poll(parked: Parked, rooms: &mut ReplyRooms, commands: &mut Vec<Command>, finishes: &mut Vec<Finish>) {
    // A caller that has gone is not served: leasing to it would only delay
    // the messages until the lease expired.
    if parked.reply.is_canceled() {
        return;
    }
    let Some(budget) = rooms.for_caller(parked.budget.as_ref()) else {
        finishes.push(Finish::PollNotRun(parked));
        return;
    };
    commands.push(parked.poll.command(budget));
    finishes.push(Finish::Poll(parked));
}

/// Turns one call into storage commands and a way to finish it: the
/// operation plans itself (`ops`), the core adds what is its own (parking
/// polls, reply rooms).
fn plan(
    call: Call,
    nothing_visible: &Set<QueueName>,
    rooms: &mut ReplyRooms,
    commands: &mut Vec<Command>,
    finishes: &mut Vec<Finish>,
) {
    let Call {
        op,
        reply,
        read_at,
        budget,
    } = call;
    match op.plan(commands) {
        (Plan::Commands(n), build) => finishes.push(Finish::Reply {
            reply,
            commands: n,
            build,
            read_at,
            waits_for_sync: commands[commands.len().saturating_sub(n)..]
                .iter()
                .any(Command::needs_sync),
        }),
        (Plan::Poll(poll), _) => {
            let deadline = read_at + Duration::from_millis(poll.wait_ms);
            let parked = Parked {
                poll,
                attempt_at: read_at,
                deadline,
                reply,
                budget,
            };
            if nothing_visible.contains(&parked.poll.queue) {
                finishes.push(Finish::PollNotRun(parked));
            } else {
                plan_poll(parked, rooms, commands, finishes);
            }
        }
        (Plan::RemoveThenPoll { removes, poll }, _) => {
            // One attempt against the caller's reply room; none for a caller
            // that has gone or has no room (the poll then found nothing).
            let room = (!reply.is_canceled())
                .then(|| rooms.for_caller(budget.as_ref()))
                .flatten();
            let polled = room.is_some();
            if let Some(room) = room {
                commands.push(poll.command(room));
            }
            finishes.push(Finish::RemoveThenPoll {
                reply,
                removes,
                polled,
                may_wait: poll.wait_ms > 0,
                queue: poll.queue,
                read_at,
            });
        }
        // Never routed to a shard; the operation says why.
        (Plan::Connection, build) => {
            let _ = reply.send(Answered::now(build(&mut std::iter::empty())));
        }
    }
}

/// Parks an empty poll that may still wait, or answers it.
fn park_or_answer(
    parked: Parked,
    result: ReplyResult,
    waiters: &mut Waiters,
    draining: bool,
    now: Instant,
    batch: &BatchTiming,
) {
    match result {
        Ok(Reply::Polled(None)) if !draining && parked.deadline > now && !parked.reply.is_canceled() => {
            waiters.park(parked)
        }
        other => {
            if matches!(other, Ok(Reply::Polled(None))) {
                waiters.count_empty(&parked.poll.queue);
            }
            let timing = batch.of(parked.attempt_at);
            let _ = parked.reply.send(Answered { result: other, timing });
        }
    }
}

/// When a batch ran, for its calls' [`Timing`].
#[derive(Debug, Clone, Copy)]
struct BatchTiming {
    started: Instant,
    took: Duration,
}

impl BatchTiming {
    /// The timing of a call that began at `since` and was answered by
    /// this batch.
    fn of(&self, since: Instant) -> Timing {
        Timing {
            queued: self.started.saturating_duration_since(since),
            storage: self.took,
            sync: Duration::ZERO,
        }
    }
}

/// What answering a batch needs to know about it.
struct Finishing<'a> {
    draining: bool,
    reporter: Reporter<'a>,
    batch: BatchTiming,
}

fn finish(
    executed: Executed,
    finishes: Vec<Finish>,
    waiters: &mut Waiters,
    retry: &mut Vec<Parked>,
    scrape: &mut Option<Scrape>,
    ctx: &Finishing<'_>,
) {
    let (draining, reporter, batch) = (ctx.draining, &ctx.reporter, &ctx.batch);
    // One answer per command; a storage failure answers every command of
    // the batch alike (ErrorReply is Clone: no fan-out of the store's error).
    let mut outcomes: Box<dyn Iterator<Item = Result<Outcome, ErrorReply>>> = match executed.outcomes {
        Ok(list) => Box::new(list.into_iter().map(|r| r.map_err(|e| ErrorReply::from(&e)))),
        Err(e) => Box::new(std::iter::repeat(Err(ErrorReply::from(&e)))),
    };
    let now = Instant::now();
    let mut held = Vec::new();
    for f in finishes {
        match f {
            Finish::Reply {
                reply,
                commands,
                build,
                read_at,
                waits_for_sync,
            } => {
                let mut own = outcomes.by_ref().take(commands);
                let result = build(&mut own);
                // Whatever the operation did not read is still its own.
                own.for_each(drop);
                let answered = Answered {
                    result,
                    timing: batch.of(read_at),
                };
                if waits_for_sync && executed.sync.is_some() {
                    held.push((reply, answered));
                } else {
                    let _ = reply.send(answered);
                }
            }
            Finish::Poll(parked) => {
                let result = ops::Poll::reply(&mut outcomes.by_ref().take(1)).map(Reply::Polled);
                park_or_answer(parked, result, waiters, draining, now, batch);
            }
            Finish::PollNotRun(parked) => {
                park_or_answer(parked, Ok(Reply::Polled(None)), waiters, draining, now, batch)
            }
            Finish::RemoveThenPoll {
                reply,
                removes,
                polled,
                queue,
                may_wait,
                read_at,
            } => {
                let removed = if removes == 0 {
                    Ok(Vec::new())
                } else {
                    ops::Remove::reply(&mut outcomes.by_ref().take(removes))
                };
                let lease = if polled {
                    ops::Poll::reply(&mut outcomes.by_ref().take(1))
                } else {
                    Ok(None)
                };
                // An empty answer that will not go on waiting is an empty
                // poll (one that waits is counted by its waiting poll).
                if matches!(lease, Ok(None)) && !may_wait {
                    waiters.count_empty(&queue);
                }
                let result = removed.and_then(|removed| {
                    lease.map(|lease| Reply::RemovedAndPolled(ops::RemovedAndPolled { removed, lease }))
                });
                let _ = reply.send(Answered {
                    result,
                    timing: batch.of(read_at),
                });
            }
            Finish::ScrapeChunk => {
                let outcome = outcomes.next();
                if let Some(s) = scrape.as_mut() {
                    if s.take(outcome, reporter, waiters) {
                        *scrape = None;
                    }
                }
            }
        }
    }
    // A deleted queue's parked polls must not outlive it into a queue
    // re-created by the same name.
    for queue in &executed.deleted {
        waiters.answer_queue(queue);
    }
    for (queue, n) in executed.woken {
        waiters.nothing_visible.remove(&queue);
        waiters.wake(&queue, n, retry);
    }
    waiters.nothing_visible.extend(executed.empty);
    if let Some(sync) = executed.sync {
        answer_when_synced(sync, held);
    }
}

/// Sends the answers that wait for the batch's WAL sync once it is done,
/// without holding up the core: the next batches run meanwhile (their own
/// durable answers wait for a later sync). A failed sync answers them with
/// an error: their writes are in the database but may not survive a power
/// loss, so they are not acknowledged.
fn answer_when_synced(sync: crate::storage::SyncWait, held: Vec<(ReplyTx, Answered)>) {
    if held.is_empty() {
        return;
    }
    let waited = Instant::now();
    glommio::spawn_local(async move {
        let synced = sync
            .await
            .unwrap_or_else(|_| Err("the WAL syncer stopped before this batch was synced".into()));
        let waited = waited.elapsed();
        for (reply, mut answered) in held {
            answered.timing.sync = waited;
            if let Err(detail) = &synced {
                answered.result = Err(ErrorReply::new(
                    ErrorCode::Unavailable,
                    format!("the write is not known to be durable: {detail}"),
                ));
            }
            let _ = reply.send(answered);
        }
    })
    .detach();
}

#[cfg(test)]
mod tests {

    fn test_offload() -> OffloadThread {
        OffloadThread::spawn("queueber-store-test".into()).expect("a storage thread starts")
    }
    use super::*;
    use crate::clock::ManualClock;
    use crate::runtime::{run_on_test_executor as run_on_executor, within};
    use crate::storage::{ModelStore, NewMessage};
    use std::sync::Arc;

    fn q(name: &str) -> QueueName {
        QueueName::new("t", name).unwrap()
    }

    /// A poll of one message of queue `a`.
    fn poll_one(lease_ms: u64, wait_ms: u64) -> Op {
        Op::Poll(ops::Poll {
            queue: q("a"),
            max_items: 1,
            lease_ms,
            wait_ms,
        })
    }

    /// A core over the model store, on a manual clock at 1,000 ms.
    fn spawn_model_core(hand_off: HandOff) -> (CoreHandle, glommio::task::JoinHandle<Box<dyn QueueStore>>) {
        let clock = Arc::new(ManualClock::new(1_000));
        let store = ModelStore::new(clock.clone());
        spawn(0, Box::new(store), clock, Rc::default(), hand_off, test_offload())
    }

    #[test]
    fn the_hand_off_yields_only_while_batches_are_short() {
        let yield_for = Duration::from_micros(200);
        let hand_off = HandOff { yield_for };
        assert_eq!(hand_off.for_batch(Duration::from_micros(80)), yield_for);
        assert_eq!(
            hand_off.for_batch(Duration::from_micros(400)),
            Duration::ZERO,
            "batches lately too long"
        );
        assert_eq!(HandOff::PARK.for_batch(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn batches_map_back_to_their_callers() {
        let out = run_on_executor(|| {
            Box::pin(async {
                // The hand-off the server runs with (yielding), as the others park.
                let (core, task) = spawn_model_core(HandOff {
                    yield_for: Duration::from_micros(200),
                });
                let add = core.call(Op::Add(ops::Add {
                    queue: q("a"),
                    messages: vec![NewMessage::new(b"1".to_vec()), NewMessage::new(b"2".to_vec())],
                }));
                let stats = core.call(Op::Stats(ops::Stats { queue: q("missing") }));
                let (added, stats) = futures::join!(add, stats);
                let Ok(Reply::Added(ids)) = added else {
                    panic!("{added:?}")
                };
                let polled = core
                    .call(Op::Poll(ops::Poll {
                        queue: q("a"),
                        max_items: 5,
                        lease_ms: 100,
                        wait_ms: 0,
                    }))
                    .await;
                let Ok(Reply::Polled(Some(lease))) = polled else {
                    panic!("{polled:?}")
                };
                let removed = core
                    .call(Op::Remove(ops::Remove {
                        queue: q("a"),
                        lease: lease.id,
                        ids: vec![ids[0], ids[0], ids[1]],
                    }))
                    .await;
                let queues = core.call(Op::ListQueues(ops::ListQueues)).await;
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
    fn a_woken_long_poll_is_answered_before_the_add_that_woke_it() {
        let order = run_on_executor(|| {
            Box::pin(async {
                // The model store reports no wake-ups: the poll below can only
                // be served as a follow-up in the add's own batch.
                let (core, task) = spawn_model_core(HandOff::PARK);
                let add = |body: &[u8]| {
                    Op::Add(ops::Add {
                        queue: q("a"),
                        messages: vec![NewMessage::new(body.to_vec())],
                    })
                };
                let poll = |wait_ms| poll_one(60_000, wait_ms);
                // The queue exists and is empty.
                core.call(add(b"seed")).await.expect("the seed is added");
                let taken = core.call(poll(0)).await;
                assert!(matches!(taken, Ok(Reply::Polled(Some(_)))), "{taken:?}");
                let order = Rc::new(std::cell::RefCell::new(Vec::new()));
                // Each caller is a task of its own, woken by its answer:
                // glommio runs woken tasks in the order they were woken, so
                // `order` is the order the answers were sent in.
                let caller = |label: &'static str, op: Op, served: fn(&ReplyResult) -> bool| {
                    let (core, seen) = (core.clone(), order.clone());
                    glommio::spawn_local(async move {
                        let answer = core.call(op).await;
                        seen.borrow_mut().push((label, served(&answer)));
                    })
                };
                let polled = caller("poll", poll(60_000), |a| matches!(a, Ok(Reply::Polled(Some(_)))));
                // Long enough for the poll to find the queue empty and park.
                glommio::timer::sleep(Duration::from_millis(50)).await;
                let added = caller("add", add(b"m"), Result::is_ok);
                let limit = Duration::from_secs(10);
                within(limit, polled).await.expect("the poll was answered");
                within(limit, added).await.expect("the add was answered");
                core.stop();
                task.await;
                order.take()
            })
        });
        assert_eq!(order, vec![("poll", true), ("add", true)]);
    }

    #[test]
    fn parked_polls_time_out_empty_and_drain_answers_them() {
        let (timed_out, drained) = run_on_executor(|| {
            Box::pin(async {
                let (core, task) = spawn_model_core(HandOff::PARK);
                core.call(Op::Add(ops::Add {
                    queue: q("a"),
                    messages: vec![NewMessage::delayed(b"later".to_vec(), 1_000_000)],
                }))
                .await
                .unwrap();
                let poll = |wait_ms| poll_one(100, wait_ms);
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

    /// A store whose batches run through `around`, which calls the inner
    /// store itself: how a test counts batches or attaches a WAL sync.
    struct Around<F> {
        inner: Box<dyn QueueStore>,
        around: F,
    }

    impl<F> QueueStore for Around<F>
    where
        F: FnMut(&mut dyn QueueStore, Vec<Command>) -> Executed + Send + 'static,
    {
        fn execute(&mut self, commands: Vec<Command>) -> Executed {
            (self.around)(&mut *self.inner, commands)
        }

        fn next_deadline(&self) -> Option<u64> {
            self.inner.next_deadline()
        }

        fn list_queues(&self) -> Result<Vec<QueueName>, StoreError> {
            self.inner.list_queues()
        }
    }

    /// A store whose every batch fails as a whole, with a deadline that is
    /// always due: a disk that refuses the writes settling an expired lease,
    /// or a shard whose storage failed for good.
    struct AlwaysFailing {
        batches: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl QueueStore for AlwaysFailing {
        fn execute(&mut self, _: Vec<Command>) -> Executed {
            self.batches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Executed::failed(crate::storage::StorageError::Unavailable("the disk is gone".into()))
        }

        fn next_deadline(&self) -> Option<u64> {
            Some(0)
        }

        fn list_queues(&self) -> Result<Vec<QueueName>, StoreError> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn a_store_that_keeps_failing_is_retried_not_spun_and_requests_still_run() {
        let batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = batches.clone();
        let (idle_batches, answer) = run_on_executor(move || {
            Box::pin(async move {
                let clock = Arc::new(ManualClock::new(1_000));
                let store = AlwaysFailing {
                    batches: counted.clone(),
                };
                let (core, task) = spawn(0, Box::new(store), clock, Rc::default(), HandOff::PARK, test_offload());
                // 300 ms with nothing asked: only the due deadline runs batches.
                glommio::timer::sleep(Duration::from_millis(300)).await;
                let idle_batches = counted.load(std::sync::atomic::Ordering::SeqCst);
                // A request is not held back by the retry's pause.
                let answer = within(
                    Duration::from_millis(50),
                    core.call(Op::Stats(ops::Stats { queue: q("a") })),
                )
                .await;
                core.stop();
                task.await;
                (idle_batches, answer)
            })
        });
        // Every 100 ms at most, not back to back (thousands in 300 ms).
        assert!((1..=5).contains(&idle_batches), "{idle_batches} batches in 300 ms");
        let answer = answer.expect("answered at once");
        assert!(answer.is_err(), "{answer:?}");
        assert!(batches.load(std::sync::atomic::Ordering::SeqCst) > idle_batches);
    }

    #[test]
    fn durable_answers_wait_for_their_sync_and_nothing_else_does() {
        let syncs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let pending = syncs.clone();
        let (held_while_unsynced, stats, added, failed) = run_on_executor(move || {
            Box::pin(async move {
                let clock = Arc::new(ManualClock::new(1_000));
                // Durable batches wait for a WAL sync the test completes.
                let syncs = pending.clone();
                let store = Around {
                    inner: Box::new(ModelStore::new(clock.clone())),
                    around: move |inner: &mut dyn QueueStore, commands: Vec<Command>| {
                        let durable = commands.iter().any(Command::needs_sync);
                        let mut executed = inner.execute(commands);
                        if durable {
                            let (done, wait) = futures::channel::oneshot::channel();
                            syncs.lock().expect("syncs").push(done);
                            executed.sync = Some(wait);
                        }
                        executed
                    },
                };
                let (core, task) = spawn(0, Box::new(store), clock, Rc::default(), HandOff::PARK, test_offload());
                let core = Rc::new(core);
                let answered = Rc::new(std::cell::Cell::new(false));
                let add = |payload: &'static [u8]| {
                    let (core, answered) = (core.clone(), answered.clone());
                    glommio::spawn_local(async move {
                        let reply = core
                            .call(Op::Add(ops::Add {
                                queue: q("a"),
                                messages: vec![NewMessage::new(payload)],
                            }))
                            .await;
                        answered.set(true);
                        reply
                    })
                };
                let take_sync = || async {
                    for _ in 0..500 {
                        if let Some(done) = pending.lock().expect("syncs").pop() {
                            return done;
                        }
                        glommio::timer::sleep(Duration::from_millis(2)).await;
                    }
                    panic!("no batch asked for a sync within a second");
                };
                let first = add(b"one");
                let sync = take_sync().await;
                // The core goes on while the add waits for its sync: a later
                // request that needs none is answered first.
                let stats = core.call(Op::Stats(ops::Stats { queue: q("a") })).await;
                glommio::timer::sleep(Duration::from_millis(20)).await;
                let held_while_unsynced = !answered.get();
                sync.send(Ok(Duration::from_micros(300))).expect("the core waits");
                let added = first.await;
                let second = add(b"two");
                take_sync().await.send(Err("disk gone".into())).expect("the core waits");
                let failed = second.await;
                core.stop();
                task.await;
                (held_while_unsynced, stats, added, failed)
            })
        });
        assert!(held_while_unsynced, "an add was answered before its sync");
        let Ok(Reply::Stats(stats)) = stats else {
            panic!("{stats:?}")
        };
        assert_eq!(stats.visible, 1, "the unsynced add is already visible");
        assert!(
            matches!(added, Ok(Reply::Added(ref ids)) if ids.len() == 1),
            "{added:?}"
        );
        let Err(error) = failed else { panic!("{failed:?}") };
        assert_eq!(error.code, ErrorCode::Unavailable);
        assert!(error.message.contains("disk gone"), "{}", error.message);
        assert!(syncs.lock().expect("syncs").is_empty());
    }

    #[test]
    fn the_sweeper_runs_on_the_injected_clock() {
        // An expired lease wakes a parked poll when the *store's* clock says
        // so: time stands still until the test moves it, and the sweeper
        // neither spins on a deadline the system clock thinks long past nor
        // waits for one the manual clock has reached.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let (redelivered, waited) = run_on_executor(move || {
            Box::pin(async move {
                let clock = Arc::new(ManualClock::new(1_700_000_000_000));
                let options = crate::storage::EngineOptions {
                    durability: crate::storage::Durability::Wal,
                    ..Default::default()
                };
                let engine = crate::storage::Engine::open(&path, options, clock.clone()).expect("engine");
                let store = crate::storage::ShardStore::open_all(engine).expect("store");
                let batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let counting = batches.clone();
                let counted = Around {
                    inner: Box::new(store),
                    around: move |inner: &mut dyn QueueStore, commands: Vec<Command>| {
                        counting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        inner.execute(commands)
                    },
                };
                let (core, task) = spawn(
                    0,
                    Box::new(counted),
                    clock.clone(),
                    Rc::default(),
                    HandOff::PARK,
                    test_offload(),
                );
                core.call(Op::Add(ops::Add {
                    queue: q("a"),
                    messages: vec![NewMessage::new(b"m".to_vec())],
                }))
                .await
                .unwrap();
                let poll = |wait_ms| {
                    Op::Poll(ops::Poll {
                        queue: q("a"),
                        max_items: 1,
                        lease_ms: 50,
                        wait_ms,
                    })
                };
                let Ok(Reply::Polled(Some(_))) = core.call(poll(0)).await else {
                    panic!("first delivery")
                };
                let started = Instant::now();
                let parked = core.call(poll(5_000));
                let advance = async {
                    // Real time passes, the store's does not: still leased.
                    glommio::timer::sleep(Duration::from_millis(150)).await;
                    clock.advance(60);
                };
                let (redelivered, ()) = futures::join!(parked, advance);
                let waited = started.elapsed();
                core.stop();
                task.await;
                let batches = batches.load(std::sync::atomic::Ordering::Relaxed);
                assert!(batches < 50, "the sweeper spun: {batches} batches");
                (redelivered, waited)
            })
        });
        let Ok(Reply::Polled(Some(lease))) = redelivered else {
            panic!("{redelivered:?}")
        };
        assert_eq!(lease.messages[0].delivery_count, 2);
        assert!(
            waited >= Duration::from_millis(150),
            "redelivered before the clock moved: {waited:?}"
        );
        assert!(
            waited < Duration::from_millis(2_000),
            "the sweeper missed the manual deadline: {waited:?}"
        );
    }

    /// The commands of each `execute`, by kind, and the real shard store
    /// under them (it reports `woken` and `empty`, which the model does
    /// not). An add whose payload is `refused` is turned into a command
    /// that fails, as a full queue would refuse it.
    fn logged_shard_store(
        path: &std::path::Path,
        clock: Arc<ManualClock>,
        log: Arc<std::sync::Mutex<Vec<Vec<&'static str>>>>,
    ) -> Box<dyn QueueStore> {
        let options = crate::storage::EngineOptions {
            durability: crate::storage::Durability::Wal,
            ..Default::default()
        };
        let engine = crate::storage::Engine::open(path, options, clock).expect("engine");
        let store = crate::storage::ShardStore::open_all(engine).expect("store");
        Box::new(Around {
            inner: Box::new(store),
            around: move |inner: &mut dyn QueueStore, commands: Vec<Command>| {
                let commands: Vec<Command> = commands
                    .into_iter()
                    .map(|c| match c {
                        Command::Add { queue, messages } if messages[0].payload[..] == b"refused"[..] => {
                            Command::Stats {
                                queue: QueueName::new(queue.tenant(), "missing").expect("name"),
                            }
                        }
                        other => other,
                    })
                    .collect();
                let kinds = commands
                    .iter()
                    .map(|c| match c {
                        Command::Add { .. } => "add",
                        Command::Poll { .. } => "poll",
                        Command::Stats { .. } => "refused add",
                        _ => "other",
                    })
                    .collect();
                log.lock().expect("log").push(kinds);
                inner.execute(commands)
            },
        })
    }

    #[test]
    fn a_waiting_poll_is_served_in_the_hand_off_of_the_add_that_wakes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let logged = log.clone();
        let (first, second, early, batches) = run_on_executor(move || {
            Box::pin(async move {
                let clock = Arc::new(ManualClock::new(1_700_000_000_000));
                let store = logged_shard_store(&path, clock.clone(), logged.clone());
                let metrics = Rc::new(ShardMetrics::default());
                let (core, task) = spawn(0, store, clock, metrics.clone(), HandOff::PARK, test_offload());
                let core = Rc::new(core);
                // The queue exists and is empty.
                core.call(Op::Add(ops::Add {
                    queue: q("a"),
                    messages: vec![NewMessage::new(b"seed".to_vec())],
                }))
                .await
                .unwrap();
                let poll = |wait_ms| {
                    let core = core.clone();
                    glommio::spawn_local(async move {
                        core.call(Op::Poll(ops::Poll {
                            queue: q("a"),
                            max_items: 1,
                            lease_ms: 60_000,
                            wait_ms,
                        }))
                        .await
                    })
                    .detach()
                };
                let Some(Ok(Reply::Polled(Some(_)))) = poll(0).await else {
                    panic!("the seed")
                };
                let logged_now = || logged.lock().expect("log").len();
                let settle = || glommio::timer::sleep(Duration::from_millis(30));
                let first = poll(60_000);
                settle().await;
                // The first poll ran and found nothing; the second parks
                // without a storage call, and so is a poll that may not wait
                // answered.
                let ran = logged_now();
                let second = poll(60_000);
                let early = poll(0).await;
                settle().await;
                assert_eq!(logged_now(), ran, "polls of an empty queue went to the store");
                // A refused add runs the oldest waiter after it in the same
                // batch; it finds nothing and waits on, now the youngest.
                let refused = core
                    .call(Op::Add(ops::Add {
                        queue: q("a"),
                        messages: vec![NewMessage::new(b"refused".to_vec())],
                    }))
                    .await;
                assert!(refused.is_err(), "{refused:?}");
                let mut first = std::pin::pin!(first);
                assert!(within(Duration::from_millis(30), first.as_mut()).await.is_none());
                let before = metrics.figures().batch_commands.count;
                for payload in [b"one", b"two"] {
                    core.call(Op::Add(ops::Add {
                        queue: q("a"),
                        messages: vec![NewMessage::new(payload.to_vec())],
                    }))
                    .await
                    .unwrap();
                }
                let (first, second) = (first.await, second.await);
                let batches = metrics.figures().batch_commands.count - before;
                core.stop();
                Rc::try_unwrap(core).ok();
                task.await;
                (first, second, early, batches)
            })
        });
        let payload = |r: Option<ReplyResult>| match r {
            Some(Ok(Reply::Polled(Some(lease)))) => lease.messages[0].payload.to_vec(),
            other => panic!("{other:?}"),
        };
        // The first waiter waits on behind the second, as a woken poll that
        // finds nothing does.
        assert_eq!(payload(second), b"one");
        assert_eq!(payload(first), b"two");
        assert!(matches!(early, Some(Ok(Reply::Polled(None)))), "{early:?}");
        assert_eq!(batches, 2, "each add and the poll it woke took one hand-off");
        let log = log.lock().expect("log").clone();
        let tail: Vec<Vec<&str>> = log[log.len() - 3..].to_vec();
        assert_eq!(
            tail,
            vec![vec!["refused add", "poll"], vec!["add", "poll"], vec!["add", "poll"]],
            "each add and the poll it woke ran as one batch: {log:?}"
        );
    }
}
