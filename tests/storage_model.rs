//! Property tests: random sequences of operations run against the RocksDB
//! store and the in-memory model with one manual clock must agree, and the
//! RocksDB store must never hand one message to two live leases, lose a
//! message, or change anything when reopened. After every step the RocksDB
//! store's census is checked too: each message in exactly one of visible,
//! delayed, in flight and dead; delivery counts that never go down except
//! by a redrive; no dead letter before its max deliveries unless rejected.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use proptest::prelude::*;
use queueber::clock::{Clock, ManualClock};
use queueber::ids::{LeaseId, MessageId};
use queueber::names::QueueName;
use queueber::storage::{
    Command, CommandError, Durability, Engine, EngineOptions, Executed, Lease, ModelStore, NewMessage, Outcome,
    QueuePolicy, QueueStore, ReplyBudget, ShardStore, StoreError,
};
use queueber::types::{RetryBackoff, UNLIMITED};

const QUEUES: usize = 2;
const T0: u64 = 1_700_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    Add {
        q: usize,
        n: usize,
        delay: u64,
    },
    /// `budget`: the reply's byte budget (`None`: unlimited).
    Poll {
        q: usize,
        max: u32,
        lease_ms: u64,
        budget: Option<usize>,
    },
    Remove {
        pick: usize,
    },
    RemoveWithWrongLease {
        pick: usize,
        other: usize,
    },
    Extend {
        pick: usize,
        lease_ms: u64,
    },
    Release {
        pick: usize,
        delay: u64,
    },
    Advance {
        ms: u64,
    },
    Stats {
        q: usize,
    },
    /// Pages through everything visible, `max` at a time, each store with
    /// its own cursors.
    Peek {
        q: usize,
        max: u32,
    },
    Purge {
        q: usize,
    },
    Expire,
    Reopen,
    /// A metrics walk over every queue, `chunk` queues per call.
    Snapshot {
        chunk: usize,
    },
    CreateQueue {
        q: usize,
        policy: QueuePolicy,
    },
    SetPolicy {
        q: usize,
        policy: QueuePolicy,
    },
    GetPolicy {
        q: usize,
    },
    /// A worker fails a delivered message (`dead`: rejects it).
    Fail {
        pick: usize,
        dead: bool,
    },
    /// Pages through the dead letters, `max` at a time.
    PeekDead {
        q: usize,
        max: u32,
    },
    /// Brings back up to `max` dead letters (0: all).
    Redrive {
        q: usize,
        max: u64,
    },
    /// An add and a poll of one queue in one batch (as the server's core
    /// runs a long poll with the add that wakes it).
    AddThenPoll {
        q: usize,
        n: usize,
        max: u32,
        lease_ms: u64,
    },
}

/// Policies small enough for the generated adds (8-byte payloads, 1 to 3
/// per add) to run into every bound, and leases and retentions short
/// enough to expire.
fn policy() -> impl Strategy<Value = QueuePolicy> {
    use prop::option::of;
    (
        of(1..60u64),
        of(prop_oneof![1..8u64, Just(UNLIMITED)]),
        of(prop_oneof![8..80u64, Just(UNLIMITED)]),
        of(prop_oneof![Just(4u64), Just(8u64), Just(1024u64)]),
        of(prop::collection::vec(1..40u64, 1..4)),
        of(prop_oneof![1..4u64, Just(UNLIMITED)]),
        of(prop_oneof![1..120u64, Just(UNLIMITED)]),
    )
        .prop_map(
            |(lease_ms, max_depth, max_bytes, max_payload_bytes, backoff, max_deliveries, retention_ms)| QueuePolicy {
                lease_ms,
                max_depth,
                max_bytes,
                max_payload_bytes,
                retry_backoff_ms: backoff.map(|steps| RetryBackoff::new(&steps).expect("at most 3 steps")),
                max_deliveries,
                retention_ms,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..QUEUES, 1..4usize, prop_oneof![3 => Just(0u64), 1 => 1..40u64])
            .prop_map(|(q, n, delay)| Op::Add { q, n, delay }),
        4 => (0..QUEUES, 1..4u32, prop_oneof![4 => 1..60u64, 1 => Just(0u64)], prop::option::weighted(0.3, 0usize..200))
            .prop_map(|(q, max, lease_ms, budget)| Op::Poll { q, max, lease_ms, budget }),
        3 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(pick, other)| Op::RemoveWithWrongLease { pick, other }),
        1 => (any::<usize>(), 1..60u64).prop_map(|(pick, lease_ms)| Op::Extend { pick, lease_ms }),
        1 => (any::<usize>(), 0..30u64).prop_map(|(pick, delay)| Op::Release { pick, delay }),
        3 => (0..50u64).prop_map(|ms| Op::Advance { ms }),
        1 => (0..QUEUES).prop_map(|q| Op::Stats { q }),
        1 => (0..QUEUES, 1..4u32).prop_map(|(q, max)| Op::Peek { q, max }),
        1 => Just(Op::Expire),
        1 => (0..QUEUES).prop_map(|q| Op::Purge { q }),
        1 => Just(Op::Reopen),
        1 => (1..4usize).prop_map(|chunk| Op::Snapshot { chunk }),
        1 => (0..QUEUES, policy()).prop_map(|(q, policy)| Op::CreateQueue { q, policy }),
        1 => (0..QUEUES, policy()).prop_map(|(q, policy)| Op::SetPolicy { q, policy }),
        1 => (0..QUEUES).prop_map(|q| Op::GetPolicy { q }),
        2 => (any::<usize>(), prop::bool::weighted(0.3)).prop_map(|(pick, dead)| Op::Fail { pick, dead }),
        1 => (0..QUEUES, 1..4u32).prop_map(|(q, max)| Op::PeekDead { q, max }),
        1 => (0..QUEUES, 0..3u64).prop_map(|(q, max)| Op::Redrive { q, max }),
        2 => (0..QUEUES, 1..4usize, 1..4u32, 1..60u64)
            .prop_map(|(q, n, max, lease_ms)| Op::AddThenPoll { q, n, max, lease_ms }),
    ]
}

/// A poll as the generated ops make it. Each store gets its own budget
/// (clones would share one).
fn poll_command(queue: &QueueName, max: u32, lease_ms: u64, budget: Option<usize>) -> Command {
    Command::Poll {
        queue: queue.clone(),
        max_items: max,
        lease_ms,
        max_bytes: budget.map_or_else(ReplyBudget::unlimited, ReplyBudget::new),
    }
}

/// A lease as both stores named it.
#[derive(Debug, Clone, Copy)]
struct LeasePair {
    real: LeaseId,
    model: LeaseId,
    q: usize,
}

/// A delivered message as both stores named it.
#[derive(Debug, Clone)]
struct Delivered {
    lease: usize,
    real: MessageId,
    model: MessageId,
    payload: Vec<u8>,
}

struct Harness {
    dir: tempfile::TempDir,
    clock: ManualClock,
    real: Option<Tracked>,
    model: ModelStore,
    names: Vec<QueueName>,
    leases: Vec<LeasePair>,
    delivered: Vec<Delivered>,
    /// payload -> (lease slot, expiry) as the RocksDB store handed it out.
    held: HashMap<Vec<u8>, (usize, u64)>,
    /// payload -> queue, for everything added and not yet removed or purged.
    live: BTreeMap<Vec<u8>, usize>,
    next_payload: u64,
    /// A policy with a retention was set: messages may have been dropped,
    /// so the drain holds the store to the model instead of to `live`.
    retention_seen: bool,
    /// payload -> (highest delivery count seen, redrives of its queue then).
    counts: HashMap<Vec<u8>, (u32, u64)>,
    /// Redrives run per queue.
    redrives: [u64; QUEUES],
    /// (time, queue, max deliveries) of every policy set.
    max_deliveries: Vec<(u64, usize, u64)>,
    /// Payloads a worker rejected (`fail` with `dead`).
    rejected: BTreeSet<Vec<u8>>,
}

fn engine_options() -> EngineOptions {
    EngineOptions {
        durability: Durability::Wal,
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
        ..EngineOptions::default()
    }
}

fn open_real(dir: &std::path::Path, clock: &ManualClock) -> Tracked {
    let engine = Engine::open(dir, engine_options(), Arc::new(clock.clone())).expect("open engine");
    Tracked {
        store: ShardStore::open_all(engine).expect("open store"),
        nothing_visible: BTreeSet::new(),
    }
}

/// The RocksDB store, with what the server's core would believe from its
/// batches' hints: queues with nothing visible (`Executed::empty`) until a
/// batch names them in `woken`. The core parks polls of those queues
/// without asking the store, so the belief must never hide a visible
/// message (checked in `Harness::census`).
struct Tracked {
    store: ShardStore,
    nothing_visible: BTreeSet<QueueName>,
}

impl QueueStore for Tracked {
    fn execute(&mut self, commands: Vec<Command>) -> Executed {
        let executed = self.store.execute(commands);
        for (queue, _) in &executed.woken {
            self.nothing_visible.remove(queue);
        }
        for queue in &executed.deleted {
            self.nothing_visible.remove(queue);
        }
        self.nothing_visible.extend(executed.empty.iter().cloned());
        executed
    }

    fn next_deadline(&self) -> Option<u64> {
        self.store.next_deadline()
    }

    fn list_queues(&self) -> Result<Vec<QueueName>, StoreError> {
        self.store.list_queues()
    }
}

/// The answer to a one-command batch, whichever way it failed.
fn only_outcome(executed: Executed) -> Result<Outcome, StoreError> {
    let mut outcomes = executed.outcomes?;
    Ok(outcomes.pop().expect("one outcome")?)
}

/// The variant's name, beneath the command/storage split.
fn error_kind(e: &StoreError) -> String {
    let text = format!("{e:?}");
    let inner = text
        .strip_prefix("Command(")
        .or_else(|| text.strip_prefix("Storage("))
        .unwrap_or(&text);
    inner.split(['(', ' ', '{']).next().unwrap_or_default().to_string()
}

/// A poll's result with ids replaced by payloads, comparable across stores:
/// (expiry, [(payload, delivery count, enqueue time)]).
type PollShape = Option<(u64, Vec<(Vec<u8>, u32, u64)>)>;

fn shape(lease: &Option<Lease>) -> PollShape {
    lease.as_ref().map(|l| {
        (
            l.expires_at_ms,
            l.messages
                .iter()
                .map(|m| (m.payload.to_vec(), m.delivery_count, m.enqueued_at_ms))
                .collect(),
        )
    })
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(T0);
        let real = open_real(dir.path(), &clock);
        let model = ModelStore::new(Arc::new(clock.clone()));
        Self {
            dir,
            clock: clock.clone(),
            real: Some(real),
            model,
            names: (0..QUEUES)
                .map(|i| QueueName::new("t", format!("q{i}")).unwrap())
                .collect(),
            leases: Vec::new(),
            delivered: Vec::new(),
            held: HashMap::new(),
            live: BTreeMap::new(),
            next_payload: 0,
            retention_seen: false,
            counts: HashMap::new(),
            redrives: [0; QUEUES],
            max_deliveries: Vec::new(),
            rejected: BTreeSet::new(),
        }
    }

    fn real(&mut self) -> &mut Tracked {
        self.real.as_mut().expect("store is open")
    }

    fn both(&mut self, real: Command, model: Command) -> (Result<Outcome, StoreError>, Result<Outcome, StoreError>) {
        let r = only_outcome(self.real().execute(vec![real]));
        let m = only_outcome(self.model.execute(vec![model]));
        (r, m)
    }

    fn same(&mut self, command: Command) -> (Result<Outcome, StoreError>, Result<Outcome, StoreError>) {
        self.both(command.clone(), command)
    }

    fn assert_errors_match(r: &Result<Outcome, StoreError>, m: &Result<Outcome, StoreError>) -> bool {
        match (r, m) {
            (Err(a), Err(b)) => {
                assert_eq!(error_kind(a), error_kind(b), "real {a:?} vs model {b:?}");
                true
            }
            (Err(a), Ok(b)) | (Ok(b), Err(a)) => panic!("one store failed: {a:?}, other: {b:?}"),
            _ => false,
        }
    }

    fn stats_all(&mut self) -> Vec<String> {
        (0..QUEUES)
            .map(|q| {
                let name = self.names[q].clone();
                format!("{:?}", self.real().stats(&name).map_err(|e| error_kind(&e)))
            })
            .collect()
    }

    fn step(&mut self, op: Op) {
        self.apply_op(op);
        self.census();
    }

    /// A delivery count seen for `payload` of queue `q`: never lower than
    /// the last one seen, unless the queue was redriven since (to 0).
    fn saw_count(&mut self, payload: &[u8], q: usize, count: u32) {
        let epoch = self.redrives[q];
        if let Some(&(seen, then)) = self.counts.get(payload) {
            assert!(
                count >= seen || (count == 0 && epoch > then),
                "delivery count of {payload:?} went from {seen} to {count}"
            );
        }
        self.counts.insert(payload.to_vec(), (count, epoch));
    }

    /// The RocksDB store's census of every queue, against its own stats and
    /// the leases the harness knows to be live.
    fn census(&mut self) {
        let now = self.clock.now_ms();
        // Nothing due (the core's sweeper would run a batch for it): a
        // queue believed to have nothing visible has nothing visible.
        if self.real().next_deadline().is_none_or(|d| d > now) {
            for name in self.real().nothing_visible.clone() {
                if let Ok(stats) = self.real().stats(&name) {
                    assert_eq!(stats.visible, 0, "{name} is believed empty: {stats:?}");
                }
            }
        }
        for q in 0..QUEUES {
            let name = self.names[q].clone();
            let Ok(stats) = self.real().stats(&name) else {
                continue;
            };
            let (mut visible, mut cursor) = (Vec::new(), None);
            loop {
                let peek = Command::Peek {
                    queue: name.clone(),
                    max_items: 1000,
                    cursor,
                };
                let Ok(Outcome::Peeked(page)) = only_outcome(self.real().execute(vec![peek])) else {
                    panic!("census peek failed");
                };
                visible.extend(page.messages.into_iter().map(|m| (m.payload, m.delivery_count)));
                cursor = page.cursor;
                if cursor.is_none() {
                    break;
                }
            }
            let (mut dead, mut cursor) = (Vec::new(), None);
            loop {
                let peek = Command::PeekDead {
                    queue: name.clone(),
                    max_items: 1000,
                    cursor,
                };
                let Ok(Outcome::DeadPeeked(page)) = only_outcome(self.real().execute(vec![peek])) else {
                    panic!("census peek at the dead failed");
                };
                dead.extend(page.letters);
                cursor = page.cursor;
                if cursor.is_none() {
                    break;
                }
            }
            assert_eq!(visible.len() as u64, stats.visible, "census of visible at {now}");
            assert_eq!(dead.len() as u64, stats.dead, "census of dead at {now}");
            let in_flight: BTreeSet<&[u8]> = self
                .held
                .iter()
                .filter(|(_, &(slot, expiry))| expiry > now && self.leases[slot].q == q)
                .map(|(p, _)| &p[..])
                .collect();
            assert_eq!(in_flight.len() as u64, stats.in_flight, "census in flight at {now}");
            let shown: BTreeSet<&[u8]> = visible.iter().map(|(p, _)| &p[..]).collect();
            let buried: BTreeSet<&[u8]> = dead.iter().map(|d| &d.payload[..]).collect();
            assert_eq!(shown.len(), visible.len(), "a message visible twice");
            assert_eq!(buried.len(), dead.len(), "a message dead twice");
            assert!(shown.is_disjoint(&buried), "visible and dead at {now}");
            assert!(shown.is_disjoint(&in_flight), "visible and in flight at {now}");
            assert!(buried.is_disjoint(&in_flight), "dead and in flight at {now}");
            for letter in &dead {
                match letter.reason {
                    queueber::types::DeadReason::Rejected => {
                        assert!(
                            self.rejected.contains(&letter.payload),
                            "{:?} dead as rejected",
                            letter.payload
                        )
                    }
                    // Some policy of this queue allowed no more deliveries.
                    queueber::types::DeadReason::MaxDeliveries => assert!(
                        self.max_deliveries
                            .iter()
                            .any(|&(t, pq, max)| pq == q && t <= now && u64::from(letter.delivery_count) >= max),
                        "{:?} dead after {} deliveries",
                        letter.payload,
                        letter.delivery_count
                    ),
                }
            }
            for (payload, count) in visible {
                self.saw_count(&payload, q, count);
            }
            for letter in dead {
                self.saw_count(&letter.payload, q, letter.delivery_count);
            }
        }
    }

    /// An add of `n` new payloads to queue `q`, and the payloads.
    fn add_command(&mut self, q: usize, n: usize, delay: u64) -> (Command, Vec<Vec<u8>>) {
        let messages: Vec<_> = (0..n)
            .map(|_| {
                self.next_payload += 1;
                NewMessage::delayed(self.next_payload.to_be_bytes().to_vec(), delay)
            })
            .collect();
        let payloads = messages.iter().map(|m| m.payload.to_vec()).collect();
        let add = Command::Add {
            queue: self.names[q].clone(),
            messages,
        };
        (add, payloads)
    }

    /// Checks an add's outcome in both stores and notes what it stored.
    fn added(
        &mut self,
        q: usize,
        payloads: Vec<Vec<u8>>,
        r: Result<Outcome, StoreError>,
        m: Result<Outcome, StoreError>,
    ) {
        // Refused by a policy (full, payload too large): both, and
        // nothing of it is stored (the drain checks that).
        if Self::assert_errors_match(&r, &m) {
            return;
        }
        match (r, m) {
            (Ok(Outcome::Added(a)), Ok(Outcome::Added(b))) => assert_eq!(a.len(), b.len()),
            other => panic!("add: {other:?}"),
        }
        for p in payloads {
            self.live.insert(p, q);
        }
    }

    /// Checks a poll's outcome in both stores and notes what it leased.
    fn polled(&mut self, q: usize, now: u64, r: Result<Outcome, StoreError>, m: Result<Outcome, StoreError>) {
        if Self::assert_errors_match(&r, &m) {
            return;
        }
        let (Ok(Outcome::Polled(r)), Ok(Outcome::Polled(m))) = (r, m) else {
            panic!("poll answered with another outcome");
        };
        assert_eq!(shape(&r), shape(&m), "poll at {now}");
        if let (Some(r), Some(m)) = (r, m) {
            let slot = self.leases.len();
            self.leases.push(LeasePair {
                real: r.id,
                model: m.id,
                q,
            });
            for (rm, mm) in r.messages.iter().zip(&m.messages) {
                // The invariant itself, checked on the RocksDB store's
                // own answers: nobody else holds this message now.
                if let Some(&(other, expiry)) = self.held.get(&rm.payload[..]) {
                    assert!(
                        expiry <= now,
                        "message {:?} handed to lease {slot} while lease {other} holds it until {expiry}",
                        rm.payload
                    );
                }
                self.held.insert(rm.payload.to_vec(), (slot, r.expires_at_ms));
                self.saw_count(&rm.payload, q, rm.delivery_count);
                self.delivered.push(Delivered {
                    lease: slot,
                    real: rm.id,
                    model: mm.id,
                    payload: rm.payload.to_vec(),
                });
            }
        }
    }

    fn apply_op(&mut self, op: Op) {
        let now = self.clock.now_ms();
        match op {
            Op::Add { q, n, delay } => {
                let (add, payloads) = self.add_command(q, n, delay);
                let (r, m) = self.same(add);
                self.added(q, payloads, r, m);
            }
            Op::Poll {
                q,
                max,
                lease_ms,
                budget,
            } => {
                let (r, m) = self.both(
                    poll_command(&self.names[q], max, lease_ms, budget),
                    poll_command(&self.names[q], max, lease_ms, budget),
                );
                self.polled(q, now, r, m);
            }
            Op::AddThenPoll { q, n, max, lease_ms } => {
                let (add, payloads) = self.add_command(q, n, 0);
                let poll = poll_command(&self.names[q], max, lease_ms, None);
                let mut r = self
                    .real()
                    .execute(vec![add.clone(), poll.clone()])
                    .outcomes
                    .expect("real batch");
                let mut m = self.model.execute(vec![add, poll]).outcomes.expect("model batch");
                let (Some(rp), Some(mp)) = (r.pop(), m.pop()) else {
                    panic!("two outcomes each");
                };
                let (Some(ra), Some(ma)) = (r.pop(), m.pop()) else {
                    panic!("two outcomes each");
                };
                self.added(q, payloads, ra.map_err(Into::into), ma.map_err(Into::into));
                self.polled(q, now, rp.map_err(Into::into), mp.map_err(Into::into));
            }
            Op::Remove { pick } | Op::RemoveWithWrongLease { pick, .. } if self.delivered.is_empty() => {
                let _ = pick;
            }
            Op::Remove { pick } => {
                let d = self.delivered[pick % self.delivered.len()].clone();
                let l = self.leases[d.lease];
                let queue = self.names[l.q].clone();
                let (r, m) = self.both(
                    Command::Remove {
                        queue: queue.clone(),
                        id: d.real,
                        lease: l.real,
                    },
                    Command::Remove {
                        queue,
                        id: d.model,
                        lease: l.model,
                    },
                );
                if Self::assert_errors_match(&r, &m) {
                    return;
                }
                let (Ok(r), Ok(m)) = (r, m) else { unreachable!() };
                assert_eq!(r, m, "remove");
                if r == Outcome::Removed(true) {
                    self.held.remove(&d.payload);
                    self.live.remove(&d.payload);
                }
            }
            Op::RemoveWithWrongLease { pick, other } => {
                let d = self.delivered[pick % self.delivered.len()].clone();
                let wrong = other % self.leases.len();
                if wrong == d.lease {
                    return;
                }
                let (l, w) = (self.leases[d.lease], self.leases[wrong]);
                let queue = self.names[l.q].clone();
                let (r, m) = self.both(
                    Command::Remove {
                        queue: queue.clone(),
                        id: d.real,
                        lease: w.real,
                    },
                    Command::Remove {
                        queue,
                        id: d.model,
                        lease: w.model,
                    },
                );
                if Self::assert_errors_match(&r, &m) {
                    return;
                }
                // "Wrong" unless that lease has since been handed this very
                // message after the first one expired; both stores must agree.
                let (Ok(r), Ok(m)) = (r, m) else { unreachable!() };
                assert_eq!(r, m, "remove with another lease");
                if r == Outcome::Removed(true) {
                    self.held.remove(&d.payload);
                    self.live.remove(&d.payload);
                }
            }
            Op::Extend { .. } | Op::Release { .. } | Op::Fail { .. } if self.delivered.is_empty() => {}
            Op::Fail { pick, dead } => {
                let d = self.delivered[pick % self.delivered.len()].clone();
                let l = self.leases[d.lease];
                let queue = self.names[l.q].clone();
                let fail = |id, lease| Command::Fail {
                    queue: queue.clone(),
                    id,
                    lease,
                    error: format!("error {pick}"),
                    dead,
                };
                let (r, m) = self.both(fail(d.real, l.real), fail(d.model, l.model));
                if Self::assert_errors_match(&r, &m) {
                    return;
                }
                let (Ok(r), Ok(m)) = (r, m) else { unreachable!() };
                assert_eq!(r, m, "fail");
                if r == Outcome::Failed(true) {
                    self.held.remove(&d.payload);
                    if dead {
                        self.rejected.insert(d.payload.clone());
                    }
                }
            }
            Op::PeekDead { q, max } => {
                let (mut real_cursor, mut model_cursor) = (None, None);
                for page in 0.. {
                    assert!(page < 1000, "peek at the dead did not end");
                    let peek = |cursor| Command::PeekDead {
                        queue: self.names[q].clone(),
                        max_items: max,
                        cursor,
                    };
                    let (r, m) = self.both(peek(real_cursor), peek(model_cursor));
                    if Self::assert_errors_match(&r, &m) {
                        return;
                    }
                    let (Ok(Outcome::DeadPeeked(r)), Ok(Outcome::DeadPeeked(m))) = (r, m) else {
                        panic!("peek at the dead answered with another outcome");
                    };
                    let shape = |p: &queueber::types::DeadPeeked| {
                        p.letters
                            .iter()
                            .map(|l| {
                                (
                                    l.payload.clone(),
                                    l.delivery_count,
                                    l.enqueued_at_ms,
                                    l.died_at_ms,
                                    l.reason,
                                    l.last_error.clone(),
                                )
                            })
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(shape(&r), shape(&m), "dead page {page} at {now}");
                    assert_eq!(r.cursor.is_some(), m.cursor.is_some(), "dead page {page} cursor");
                    // A dead letter is held by no live lease.
                    for l in &r.letters {
                        if let Some(&(_, expiry)) = self.held.get(&l.payload) {
                            assert!(expiry <= now, "{:?} is dead and leased until {expiry}", l.payload);
                        }
                    }
                    if r.cursor.is_none() {
                        break;
                    }
                    (real_cursor, model_cursor) = (r.cursor, m.cursor);
                }
            }
            Op::Redrive { q, max } => {
                self.redrives[q] += 1;
                let (r, m) = self.same(Command::Redrive {
                    queue: self.names[q].clone(),
                    max,
                    ids: Vec::new(),
                });
                if !Self::assert_errors_match(&r, &m) {
                    assert_eq!(r.ok(), m.ok(), "redrive at {now}");
                }
            }
            Op::Extend { pick, lease_ms } => {
                let slot = self.delivered[pick % self.delivered.len()].lease;
                let l = self.leases[slot];
                let queue = self.names[l.q].clone();
                let (r, m) = self.both(
                    Command::Extend {
                        queue: queue.clone(),
                        lease: l.real,
                        lease_ms,
                    },
                    Command::Extend {
                        queue,
                        lease: l.model,
                        lease_ms,
                    },
                );
                if Self::assert_errors_match(&r, &m) {
                    return;
                }
                let (Ok(r), Ok(m)) = (r, m) else { unreachable!() };
                assert_eq!(r, m, "extend");
                if let Outcome::Extended(Some(expiry)) = r {
                    for (_, held) in self.held.iter_mut() {
                        if held.0 == slot {
                            held.1 = expiry;
                        }
                    }
                }
            }
            Op::Release { pick, delay } => {
                let d = self.delivered[pick % self.delivered.len()].clone();
                let l = self.leases[d.lease];
                let queue = self.names[l.q].clone();
                let (r, m) = self.both(
                    Command::Release {
                        queue: queue.clone(),
                        id: d.real,
                        lease: l.real,
                        delay_ms: delay,
                    },
                    Command::Release {
                        queue,
                        id: d.model,
                        lease: l.model,
                        delay_ms: delay,
                    },
                );
                if Self::assert_errors_match(&r, &m) {
                    return;
                }
                let (Ok(r), Ok(m)) = (r, m) else { unreachable!() };
                assert_eq!(r, m, "release");
                if r == Outcome::Released(true) {
                    self.held.remove(&d.payload);
                }
            }
            Op::Advance { ms } => self.clock.advance(ms),
            Op::Stats { q } => {
                // Twice: the second read of an unchanged queue takes the
                // head's age from memory (the real store's head cache).
                for read in ["stats", "stats again"] {
                    let (r, m) = self.same(Command::Stats {
                        queue: self.names[q].clone(),
                    });
                    if !Self::assert_errors_match(&r, &m) {
                        assert_eq!(r.ok(), m.ok(), "{read} at {now}");
                    }
                }
            }
            Op::Peek { q, max } => {
                let (mut real_cursor, mut model_cursor) = (None, None);
                for page in 0.. {
                    assert!(page < 1000, "peek did not end");
                    let peek = |cursor| Command::Peek {
                        queue: self.names[q].clone(),
                        max_items: max,
                        cursor,
                    };
                    let (r, m) = self.both(peek(real_cursor), peek(model_cursor));
                    if Self::assert_errors_match(&r, &m) {
                        return;
                    }
                    let (Ok(Outcome::Peeked(r)), Ok(Outcome::Peeked(m))) = (r, m) else {
                        panic!("peek answered with another outcome");
                    };
                    let page_shape = |p: &queueber::types::Peeked| {
                        p.messages
                            .iter()
                            .map(|m| (m.payload.to_vec(), m.delivery_count, m.enqueued_at_ms))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(page_shape(&r), page_shape(&m), "peek page {page} at {now}");
                    assert_eq!(
                        r.cursor.is_some(),
                        m.cursor.is_some(),
                        "peek page {page} cursor at {now}"
                    );
                    assert!(r.messages.len() <= max as usize);
                    // Nothing peeked is leased by it.
                    for d in &r.messages {
                        if let Some(&(_, expiry)) = self.held.get(&d.payload[..]) {
                            assert!(expiry <= now, "peek showed {:?}, leased until {expiry}", d.payload);
                        }
                    }
                    if r.cursor.is_none() {
                        break;
                    }
                    (real_cursor, model_cursor) = (r.cursor, m.cursor);
                }
            }
            Op::Purge { q } => {
                let (r, m) = self.same(Command::Purge {
                    queue: self.names[q].clone(),
                });
                if Self::assert_errors_match(&r, &m) {
                    return;
                }
                assert_eq!(r.ok(), m.ok(), "purge");
                self.live.retain(|_, owner| *owner != q);
                let gone: BTreeSet<usize> = (0..self.leases.len()).filter(|&s| self.leases[s].q == q).collect();
                self.held.retain(|_, (slot, _)| !gone.contains(slot));
            }
            Op::Snapshot { chunk } => {
                let (mut real, mut model) = (Vec::new(), Vec::new());
                for (store, out) in [(true, &mut real), (false, &mut model)] {
                    let mut after = None;
                    for step in 0.. {
                        assert!(step <= QUEUES, "the walk did not end");
                        let command = Command::Snapshot {
                            after: after.clone(),
                            max_queues: chunk,
                        };
                        let executed = if store {
                            self.real().execute(vec![command])
                        } else {
                            self.model.execute(vec![command])
                        };
                        let Ok(Outcome::Snapshot(queues)) = only_outcome(executed) else {
                            panic!("a snapshot failed");
                        };
                        assert!(queues.len() <= chunk);
                        let last_chunk = queues.len() < chunk;
                        after = queues.last().map(|q| q.queue.clone()).or(after);
                        // Names and gauges (the counters since open are the
                        // real store's own: they restart at a reopen).
                        out.extend(queues.into_iter().map(|q| (q.queue, q.stats)));
                        if last_chunk {
                            break;
                        }
                    }
                }
                assert_eq!(real, model, "snapshot walk at {now}");
            }
            Op::CreateQueue { q, policy } => {
                self.retention_seen |= policy.retention().is_some();
                let (r, m) = self.same(Command::CreateQueue {
                    queue: self.names[q].clone(),
                    policy,
                });
                if !Self::assert_errors_match(&r, &m) {
                    assert_eq!(r.ok(), m.ok(), "createQueue");
                    self.note_policy(q, now);
                }
            }
            Op::SetPolicy { q, policy } => {
                self.retention_seen |= policy.retention().is_some();
                let (r, m) = self.same(Command::SetPolicy {
                    queue: self.names[q].clone(),
                    policy,
                });
                if !Self::assert_errors_match(&r, &m) {
                    assert_eq!(r.ok(), m.ok(), "setPolicy");
                    self.note_policy(q, now);
                }
            }
            Op::GetPolicy { q } => {
                let (r, m) = self.same(Command::GetPolicy {
                    queue: self.names[q].clone(),
                });
                if !Self::assert_errors_match(&r, &m) {
                    assert_eq!(r.ok(), m.ok(), "getPolicy");
                }
            }
            Op::Expire => {
                self.real().expire_due();
                self.model.expire_due();
                let (r, m) = (self.real().next_deadline(), self.model.next_deadline());
                // Leases and delays are exact; a retention deadline is a
                // lower bound (the oldest indexed message may have been
                // polled since): the store may wake early, never late, and
                // what it listed is in the future once it settled.
                let never = u64::MAX;
                assert!(
                    r.unwrap_or(never) <= m.unwrap_or(never),
                    "next deadline {r:?}, model {m:?}"
                );
                assert!(r.is_none_or(|r| r > now), "next deadline {r:?} is not after {now}");
            }
            Op::Reopen => {
                let before = self.stats_all();
                drop(self.real.take());
                self.real = Some(open_real(self.dir.path(), &self.clock));
                assert_eq!(self.stats_all(), before, "reopen changed the queues");
                // Ids are ordered within a process; a restarted store orders
                // its new ids after the old ones because a restart takes at
                // least a millisecond of real time. Model that here.
                self.clock.advance(1);
            }
        }
    }

    /// Records the max deliveries now in force for queue `q`.
    fn note_policy(&mut self, q: usize, now: u64) {
        let name = self.names[q].clone();
        if let Ok(Outcome::Policy(info)) = only_outcome(self.real().execute(vec![Command::GetPolicy { queue: name }])) {
            let max = info.effective.max_deliveries.unwrap_or(UNLIMITED);
            self.max_deliveries.push((now, q, max));
        }
    }

    /// Every message added and not removed, purged or dropped by
    /// retention is still there.
    fn drain_and_check(&mut self) {
        // Retention ends first (the clock jumps ten years): what it dropped
        // so far stays dropped, the rest is drained.
        for q in 0..QUEUES {
            let keep = Command::SetPolicy {
                queue: self.names[q].clone(),
                policy: QueuePolicy {
                    retention_ms: Some(UNLIMITED),
                    ..QueuePolicy::default()
                },
            };
            let (r, m) = self.same(keep);
            Self::assert_errors_match(&r, &m);
        }
        self.clock.advance(queueber::storage::MAX_DURATION_MS + 1);
        let names = self.names.clone();
        let found = drain(self.real(), &names);
        let in_model = drain(&mut self.model, &names);
        assert_eq!(found, in_model, "the drain differs from the model's");
        if self.retention_seen {
            // Nothing resurrected; what is missing, retention dropped.
            let dropped: u64 = (0..QUEUES)
                .filter_map(|q| self.model.stats(&self.names[q]).ok())
                .map(|s| s.dropped)
                .sum();
            assert!(found.keys().all(|p| self.live.contains_key(p)), "messages resurrected");
            assert!(
                (self.live.len() - found.len()) as u64 <= dropped,
                "{} messages missing, {dropped} dropped",
                self.live.len() - found.len()
            );
        } else {
            assert_eq!(found, self.live, "messages lost or resurrected");
        }
    }
}

/// Every message of `queues` in `store`, dead letters redriven first
/// (payload -> queue).
fn drain(store: &mut dyn QueueStore, queues: &[QueueName]) -> BTreeMap<Vec<u8>, usize> {
    let mut found = BTreeMap::new();
    for (q, name) in queues.iter().enumerate() {
        // Dead letters are not lost either: bring them all back first.
        loop {
            let redrive = Command::Redrive {
                queue: name.clone(),
                max: 0,
                ids: Vec::new(),
            };
            match only_outcome(store.execute(vec![redrive])) {
                Ok(Outcome::Redriven { more: true, .. }) => continue,
                Ok(Outcome::Redriven { .. }) | Err(StoreError::Command(CommandError::UnknownQueue(_))) => break,
                other => panic!("drain redrive: {other:?}"),
            }
        }
        loop {
            match store.poll(name, 1000, 1_000_000) {
                Ok(Some(lease)) => {
                    for m in lease.messages {
                        assert!(
                            found.insert(m.payload.to_vec(), q).is_none(),
                            "delivered twice in the drain"
                        );
                    }
                }
                Ok(None) | Err(StoreError::Command(CommandError::UnknownQueue(_))) => break,
                Err(e) => panic!("drain: {e}"),
            }
        }
    }
    found
}

/// 48 cases in the suite (each opens RocksDB, so they are slow);
/// `PROPTEST_CASES` asks for a longer run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn rocksdb_store_matches_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut h = Harness::new();
        for op in ops {
            h.step(op);
        }
        h.drain_and_check();
    }
}

#[test]
fn model_and_store_agree_on_a_known_sequence() {
    // A fixed sequence through every path, so a regression shows up even
    // when the random cases miss it.
    let mut h = Harness::new();
    for op in [
        Op::Add { q: 0, n: 3, delay: 0 },
        Op::Add { q: 0, n: 1, delay: 20 },
        Op::Poll {
            q: 0,
            max: 2,
            lease_ms: 10,
            budget: None,
        },
        Op::Remove { pick: 0 },
        Op::Release { pick: 1, delay: 5 },
        Op::Advance { ms: 11 },
        Op::Expire,
        Op::Stats { q: 0 },
        Op::Poll {
            q: 0,
            max: 3,
            lease_ms: 30,
            budget: None,
        },
        Op::Extend { pick: 2, lease_ms: 40 },
        Op::Reopen,
        Op::Advance { ms: 25 },
        Op::Poll {
            q: 0,
            max: 3,
            lease_ms: 30,
            budget: None,
        },
        Op::Stats { q: 1 },
        Op::Purge { q: 0 },
        Op::Add { q: 1, n: 2, delay: 0 },
    ] {
        h.step(op);
    }
    h.drain_and_check();
}

#[test]
fn model_and_store_agree_on_retention() {
    // Retention through every path: set on a queue that holds visible,
    // delayed, in-flight and dead messages; dropped where they lie, at a
    // lease's end, by a poll in the batch that shortened it; across a
    // reopen; and turned off again.
    let retention = |ms| QueuePolicy {
        retention_ms: Some(ms),
        max_deliveries: Some(1),
        ..QueuePolicy::default()
    };
    let mut h = Harness::new();
    for op in [
        Op::Add { q: 0, n: 3, delay: 0 },
        Op::Add { q: 0, n: 1, delay: 40 },
        Op::Poll {
            q: 0,
            max: 2,
            lease_ms: 60,
            budget: None,
        },
        Op::Fail { pick: 0, dead: true },
        Op::Advance { ms: 20 },
        Op::Add { q: 0, n: 2, delay: 0 },
        Op::SetPolicy {
            q: 0,
            policy: retention(30),
        },
        Op::Stats { q: 0 },
        Op::Advance { ms: 10 },
        Op::Expire,
        Op::Stats { q: 0 },
        Op::PeekDead { q: 0, max: 5 },
        Op::Reopen,
        Op::Advance { ms: 25 },
        Op::Expire,
        Op::Stats { q: 0 },
        Op::Advance { ms: 30 },
        Op::Release { pick: 1, delay: 0 },
        Op::Stats { q: 0 },
        Op::Add { q: 0, n: 2, delay: 0 },
        Op::Advance { ms: 29 },
        Op::SetPolicy {
            q: 0,
            policy: retention(10),
        },
        Op::Poll {
            q: 0,
            max: 3,
            lease_ms: 10,
            budget: None,
        },
        Op::Stats { q: 0 },
        Op::Add { q: 0, n: 1, delay: 0 },
        Op::SetPolicy {
            q: 0,
            policy: QueuePolicy::default(),
        },
        Op::Advance { ms: 100 },
        Op::Expire,
        Op::Snapshot { chunk: 2 },
        Op::Stats { q: 0 },
    ] {
        h.step(op);
    }
    let names = h.names.clone();
    let dropped = h.real().stats(&names[0]).unwrap().dropped;
    assert_eq!(dropped, 8, "the sequence's drops");
    h.drain_and_check();
}
