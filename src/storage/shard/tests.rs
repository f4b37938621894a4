//! Unit tests of the shard store against a real RocksDB.

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::storage::{Durability, EngineOptions};

const T0: u64 = 1_700_000_000_000;

struct Fixture {
    dir: tempfile::TempDir,
    clock: ManualClock,
    store: ShardStore,
}

fn options() -> EngineOptions {
    EngineOptions {
        durability: Durability::Wal,
        max_payload_bytes: 1024,
        ..EngineOptions::default()
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let engine = Engine::open(dir.path(), options(), Arc::new(clock.clone())).unwrap();
    let store = ShardStore::open_all(engine).unwrap();
    Fixture { dir, clock, store }
}

impl Fixture {
    fn reopen(self) -> Fixture {
        let Fixture { dir, clock, store } = self;
        drop(store);
        let engine = Engine::open(dir.path(), options(), Arc::new(clock.clone())).unwrap();
        let store = ShardStore::open_all(engine).unwrap();
        Fixture { dir, clock, store }
    }
}

fn q(name: &str) -> QueueName {
    QueueName::new("t", name).unwrap()
}

fn payloads(lease: &Lease) -> Vec<&[u8]> {
    lease.messages.iter().map(|m| &m.payload[..]).collect()
}

fn msgs(items: &[&str]) -> Vec<NewMessage> {
    items.iter().map(|s| NewMessage::new(s.as_bytes().to_vec())).collect()
}

#[test]
fn polls_in_order_and_counts_deliveries() {
    let mut f = fixture();
    let ids = f.store.add(&q("a"), msgs(&["1", "2", "3"])).unwrap();
    assert_eq!(ids.len(), 3);
    let lease = f.store.poll(&q("a"), 2, 1000).unwrap().unwrap();
    assert_eq!(payloads(&lease), vec![b"1", b"2"]);
    assert_eq!(lease.messages[0].id, ids[0]);
    assert!(lease.messages.iter().all(|m| m.delivery_count == 1));
    assert_eq!(lease.expires_at_ms, T0 + 1000);
    let next = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
    assert_eq!(payloads(&next), vec![b"3"]);
    assert_ne!(next.id, lease.id);
    assert_eq!(f.store.poll(&q("a"), 5, 1000).unwrap(), None);
}

#[test]
fn remove_is_false_for_every_wrong_case() {
    let mut f = fixture();
    let ids = f.store.add(&q("a"), msgs(&["1", "2"])).unwrap();
    let lease = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
    let id = lease.messages[0].id;
    assert!(!f.store.remove(&q("a"), id, LeaseId([0; 16])).unwrap(), "wrong lease");
    assert!(!f.store.remove(&q("a"), ids[1], lease.id).unwrap(), "id not in lease");
    assert!(
        !f.store.remove(&q("a"), MessageId([9; 16]), lease.id).unwrap(),
        "unknown id"
    );
    assert!(matches!(
        f.store.remove(&q("nope"), id, lease.id),
        Err(StoreError::Command(CommandError::UnknownQueue(_)))
    ));
    assert!(f.store.remove(&q("a"), id, lease.id).unwrap());
    assert!(!f.store.remove(&q("a"), id, lease.id).unwrap(), "already removed");
}

#[test]
fn an_expired_lease_is_invalid_before_any_sweep() {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["1"])).unwrap();
    let lease = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
    f.clock.advance(100);
    assert!(!f.store.remove(&q("a"), lease.messages[0].id, lease.id).unwrap());
    assert_eq!(f.store.extend(&q("a"), lease.id, 100).unwrap(), None);
    let again = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
    assert_eq!(again.messages[0].id, lease.messages[0].id);
    assert_eq!(again.messages[0].delivery_count, 2);
    assert_eq!(again.messages[0].payload, &b"1"[..]);
}

#[test]
fn extend_keeps_the_lease_alive() {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["1"])).unwrap();
    let lease = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
    f.clock.advance(90);
    assert_eq!(f.store.extend(&q("a"), lease.id, 100).unwrap(), Some(T0 + 190));
    f.clock.advance(50);
    assert!(f.store.expire_due().is_empty());
    assert_eq!(f.store.poll(&q("a"), 1, 100).unwrap(), None);
    assert_eq!(f.store.next_deadline(), Some(T0 + 190));
    assert!(f.store.remove(&q("a"), lease.messages[0].id, lease.id).unwrap());
    assert_eq!(f.store.next_deadline(), None, "the last remove drops the lease");
    assert_eq!(f.store.extend(&q("a"), lease.id, 100).unwrap(), None);
}

#[test]
fn release_hands_a_message_back_after_its_delay() {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["1", "2"])).unwrap();
    let lease = f.store.poll(&q("a"), 2, 1000).unwrap().unwrap();
    let first = lease.messages[0].id;
    assert!(!f.store.release(&q("a"), first, LeaseId([1; 16]), 0).unwrap());
    assert!(f.store.release(&q("a"), first, lease.id, 50).unwrap());
    assert!(!f.store.release(&q("a"), first, lease.id, 0).unwrap(), "no longer held");
    let s = f.store.stats(&q("a")).unwrap();
    assert_eq!((s.visible, s.delayed, s.in_flight), (0, 1, 1));
    assert_eq!(f.store.poll(&q("a"), 1, 10).unwrap(), None);
    f.clock.advance(50);
    let woken = f.store.expire_due();
    assert_eq!(woken, vec![(q("a"), 1)]);
    let again = f.store.poll(&q("a"), 1, 10).unwrap().unwrap();
    assert_eq!((again.messages[0].id, again.messages[0].delivery_count), (first, 2));
    // The other message of the first lease is still held by it.
    assert!(f.store.remove(&q("a"), lease.messages[1].id, lease.id).unwrap());
}

#[test]
fn expiry_redelivers_at_the_expiry_time_and_reports_wakeups() {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["1", "2"])).unwrap();
    let lease = f.store.poll(&q("a"), 2, 100).unwrap().unwrap();
    assert_eq!(f.store.next_deadline(), Some(T0 + 100));
    f.clock.advance(150);
    assert_eq!(f.store.expire_due(), vec![(q("a"), 2)]);
    let s = f.store.stats(&q("a")).unwrap();
    assert_eq!((s.visible, s.in_flight), (2, 0));
    assert_eq!(s.oldest_visible_age_ms, Some(150));
    let again = f.store.poll(&q("a"), 5, 100).unwrap().unwrap();
    assert_eq!(payloads(&again), payloads(&lease));
}

#[test]
fn delayed_messages_wait_their_turn() {
    let mut f = fixture();
    f.store
        .add(
            &q("a"),
            vec![
                NewMessage::delayed(b"late".to_vec(), 30),
                NewMessage::new(b"now".to_vec()),
            ],
        )
        .unwrap();
    let s = f.store.stats(&q("a")).unwrap();
    assert_eq!((s.visible, s.delayed), (1, 1));
    assert_eq!(f.store.next_deadline(), Some(T0 + 30));
    let first = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
    assert_eq!(payloads(&first), vec![b"now"]);
    f.clock.advance(30);
    let second = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
    assert_eq!(payloads(&second), vec![b"late"]);
}

#[test]
fn expired_messages_are_visible_to_the_batch_that_settles_them() {
    let mut f = fixture();
    f.store
        .add(
            &q("a"),
            vec![NewMessage::new(b"a".to_vec()), NewMessage::delayed(b"d".to_vec(), 20)],
        )
        .unwrap();
    let lease = f.store.poll(&q("a"), 1, 15).unwrap().unwrap();
    assert_eq!(payloads(&lease), vec![b"a"]);
    f.clock.advance(25);
    // "a" is back since T0+15, "d" visible since T0+20: that order.
    let got = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
    assert_eq!(payloads(&got), vec![b"a", b"d"]);
}

fn release_then_poll(cached: bool) -> (Vec<Vec<u8>>, Option<Vec<Vec<u8>>>) {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["y"])).unwrap();
    let lease = f.store.poll(&q("a"), 1, 1000).unwrap().unwrap();
    f.store.add(&q("a"), msgs(&["x"])).unwrap();
    if !cached {
        // Reopened with records in the queue: polls read RocksDB.
        f = f.reopen();
    }
    let out = f.store.execute(vec![
        Command::Release {
            queue: q("a"),
            id: lease.messages[0].id,
            lease: lease.id,
            delay_ms: 0,
        },
        Command::Poll {
            queue: q("a"),
            max_items: 5,
            lease_ms: 1000,
            max_bytes: ReplyBudget::unlimited(),
        },
    ]);
    let first = match &out.outcomes.expect("no storage failure")[1] {
        Ok(Outcome::Polled(Some(l))) => payloads(l).iter().map(|p| p.to_vec()).collect(),
        other => panic!("{other:?}"),
    };
    let then = f.store.poll(&q("a"), 5, 1000).unwrap();
    (first, then.map(|l| payloads(&l).iter().map(|p| p.to_vec()).collect()))
}

#[test]
fn a_release_and_a_poll_in_one_batch_lose_nothing() {
    // Regression: the released message is written below a message the
    // same batch's poll consumes (same millisecond, older id); a poll that
    // reads RocksDB cannot see the uncommitted write, and the floor must
    // not pass it once the batch has committed.
    let (first, then) = release_then_poll(false);
    assert_eq!(first, vec![b"x".to_vec()]);
    assert_eq!(then, Some(vec![b"y".to_vec()]));
    // A poll that reads the queue's cache starts at the same floor: the
    // release is below it until the batch ends.
    let (first, then) = release_then_poll(true);
    assert_eq!(first, vec![b"x".to_vec()]);
    assert_eq!(then, Some(vec![b"y".to_vec()]));
}

#[test]
fn a_poll_stops_at_its_byte_budget_but_returns_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions {
        max_poll_bytes: 2 * (4 + crate::storage::POLL_MESSAGE_OVERHEAD) + 1,
        ..options()
    };
    let engine = Engine::open(dir.path(), options, Arc::new(ManualClock::new(T0))).unwrap();
    let mut store = ShardStore::open_all(engine).unwrap();
    store.add(&q("a"), msgs(&["aaaa", "bbbb", "cccc"])).unwrap();
    assert_eq!(
        payloads(&store.poll(&q("a"), 5, 100).unwrap().unwrap()),
        vec![b"aaaa", b"bbbb"]
    );
    store.add(&q("b"), vec![NewMessage::new(vec![1u8; 100])]).unwrap();
    assert_eq!(store.poll(&q("b"), 5, 100).unwrap().unwrap().messages.len(), 1);
}

#[test]
fn two_polls_of_one_batch_never_take_the_same_record() {
    // Regression: a release in the batch writes its message below a record
    // the batch's first poll took (same millisecond, older id) and lowers
    // the floor; RocksDB still shows the taken record (its delete is not
    // committed), so the second poll must start past what the first read.
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["y"])).unwrap();
    let lease = f.store.poll(&q("a"), 1, 1000).unwrap().unwrap();
    f.store.add(&q("a"), msgs(&["x"])).unwrap();
    // Reopened with a record in the queue: its polls read RocksDB.
    let mut f = f.reopen();
    let poll = || Command::Poll {
        queue: q("a"),
        max_items: 1,
        lease_ms: 1000,
        max_bytes: ReplyBudget::unlimited(),
    };
    let out = f.store.execute(vec![
        poll(),
        Command::Release {
            queue: q("a"),
            id: lease.messages[0].id,
            lease: lease.id,
            delay_ms: 0,
        },
        poll(),
    ]);
    let outcomes = out.outcomes.expect("no storage failure");
    let got = |i: usize| match &outcomes[i] {
        Ok(Outcome::Polled(l)) => l.as_ref().map(|l| payloads(l)[0].to_vec()),
        other => panic!("{other:?}"),
    };
    assert_eq!(got(0), Some(b"x".to_vec()));
    assert_eq!(got(2), None, "x was leased twice");
    let then = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
    assert_eq!(payloads(&then), vec![b"y"]);
}

#[test]
fn adds_and_polls_in_one_batch() {
    for cached in [false, true] {
        adds_and_polls_in_one_batch_reading(cached);
    }
}

fn adds_and_polls_in_one_batch_reading(cached: bool) {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["old"])).unwrap();
    if !cached {
        f = f.reopen();
    }
    // Ids made after a reopen order after the old ones from the next
    // millisecond on (within one, a new generator's counter starts afresh).
    f.clock.advance(1);
    let out = f.store.execute(vec![
        Command::Add {
            queue: q("a"),
            messages: msgs(&["new"]),
        },
        Command::Poll {
            queue: q("a"),
            max_items: 1,
            lease_ms: 100,
            max_bytes: ReplyBudget::unlimited(),
        },
        Command::Poll {
            queue: q("a"),
            max_items: 1,
            lease_ms: 100,
            max_bytes: ReplyBudget::unlimited(),
        },
    ]);
    let polled: Vec<_> = out
        .outcomes
        .expect("no storage failure")
        .into_iter()
        .skip(1)
        .map(|o| match o.unwrap() {
            Outcome::Polled(l) => l.map(|l| l.messages[0].payload.to_vec()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(out.woken, vec![(q("a"), 1)]);
    // A poll sees the adds before it in its batch: the cache holds them as
    // soon as they are applied, and a poll that reads RocksDB (which shows
    // them only once the batch has committed) merges the batch's held
    // records in (`super::fresh`).
    assert_eq!(
        polled,
        vec![Some(b"old".to_vec()), Some(b"new".to_vec())],
        "cached {cached}"
    );
    assert!(f.store.poll(&q("a"), 5, 100).unwrap().is_none());
}

/// Entries (puts and deletes) in the active memtable of a column family.
fn memtable_entries(store: &ShardStore, family: &'static str) -> u64 {
    let cf = store.engine.cf(family).unwrap();
    store
        .engine
        .db()
        .property_int_value_cf(cf, "rocksdb.num-entries-active-mem-table")
        .unwrap()
        .unwrap()
}

fn ready_memtable_entries(store: &ShardStore) -> u64 {
    memtable_entries(store, CF_READY)
}

fn bytes_of(store: &ShardStore, queue: &QueueName) -> u64 {
    store.queues[&store.names[queue]].bytes()
}

#[test]
fn counters_stored_before_v5_count_the_leased_bytes_themselves() {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["12345", "678"])).unwrap();
    let _lease = f.store.poll(&q("a"), 1, 60_000).unwrap().unwrap();
    let qid = f.store.names[&q("a")];
    // Rewritten as a v4 server stored them: 8 bytes, the leased 5 included.
    let mut v4 = vec![4u8];
    let counters = &f.store.queues[&qid].counters;
    for n in [counters.ready, 8, counters.dead, counters.dropped] {
        v4.extend_from_slice(&n.to_be_bytes());
    }
    v4.extend_from_slice(counters.floor.as_deref().unwrap_or_default());
    let cf = f.store.engine.cf(CF_REGISTRY).unwrap();
    f.store.engine.db().put_cf(cf, keys::counters_key(qid), &v4).unwrap();
    let f = f.reopen();
    assert_eq!(bytes_of(&f.store, &q("a")), 8);
}

#[test]
fn a_batch_of_removes_writes_no_counters_and_the_bytes_survive_a_reopen() {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["12345", "678"])).unwrap();
    let first = f.store.poll(&q("a"), 1, 60_000).unwrap().unwrap();
    let before = memtable_entries(&f.store, CF_REGISTRY);
    remove_all(&mut f.store, &q("a"), &first);
    assert_eq!(
        memtable_entries(&f.store, CF_REGISTRY),
        before,
        "the counters were written for a remove"
    );
    assert_eq!(bytes_of(&f.store, &q("a")), 3);
    // Leased bytes are counted back from the lease at a reopen.
    let second = f.store.poll(&q("a"), 1, 60_000).unwrap().unwrap();
    assert_eq!(payloads(&second), vec![b"678"]);
    let mut f = f.reopen();
    assert_eq!(bytes_of(&f.store, &q("a")), 3);
    remove_all(&mut f.store, &q("a"), &second);
    assert_eq!(bytes_of(&f.store, &q("a")), 0);
    let f = f.reopen();
    assert_eq!(bytes_of(&f.store, &q("a")), 0);
}

/// A store with queue `a` and nothing visible in it, which polls read
/// through its head cache (`cached`) or from RocksDB: a delayed record and
/// a reopen leave it without a cache, so a poll must merge the batch's
/// held records with what it reads.
fn queue_a(cached: bool) -> Fixture {
    let mut f = fixture();
    if !cached {
        f.store
            .add(&q("a"), vec![NewMessage::delayed(b"later".to_vec(), 60_000)])
            .unwrap();
        f = f.reopen();
    }
    f
}

fn add_then_poll(f: &mut Fixture, add: &[&str], max_items: u32) -> Vec<Vec<u8>> {
    let out = f.store.execute(vec![
        Command::Add {
            queue: q("a"),
            messages: msgs(add),
        },
        Command::Poll {
            queue: q("a"),
            max_items,
            lease_ms: 1000,
            max_bytes: ReplyBudget::unlimited(),
        },
    ]);
    match &out.outcomes.expect("no storage failure")[1] {
        Ok(Outcome::Polled(Some(l))) => payloads(l).iter().map(|p| p.to_vec()).collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_add_leased_in_its_own_batch_is_never_written_to_the_ready_index() {
    for cached in [true, false] {
        let mut f = queue_a(cached);
        let before = ready_memtable_entries(&f.store);
        assert_eq!(
            add_then_poll(&mut f, &["now"], 1),
            vec![b"now".to_vec()],
            "cached {cached}"
        );
        assert_eq!(
            ready_memtable_entries(&f.store),
            before,
            "no put and delete of the record (cached {cached})"
        );
        // Durable as a lease: after a reopen it is held until the lease
        // ends, then delivered again.
        let mut f = f.reopen();
        assert!(f.store.poll(&q("a"), 5, 1000).unwrap().is_none(), "cached {cached}");
        f.clock.advance(1001);
        let again = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
        assert_eq!(payloads(&again), vec![b"now"]);
        assert_eq!(again.messages[0].delivery_count, 2);
    }
}

#[test]
fn an_add_leased_in_its_own_batch_writes_no_counters_and_nothing_is_lost_on_reopen() {
    for cached in [true, false] {
        let mut f = queue_a(cached);
        assert_eq!(add_then_poll(&mut f, &["first"], 1), vec![b"first".to_vec()]);
        // Only the floor moved (past "first"): its counters are not rewritten.
        let lag = |f: &Fixture| f.store.queues.values().next().expect("queue a").floor_lag;
        let lag0 = lag(&f);
        let before = memtable_entries(&f.store, CF_REGISTRY);
        for n in 0..5 {
            let body = format!("m{n}");
            assert_eq!(add_then_poll(&mut f, &[body.as_str()], 1), vec![body.into_bytes()]);
        }
        assert_eq!(
            memtable_entries(&f.store, CF_REGISTRY),
            before,
            "counters written for a batch that moved only the floor (cached {cached})"
        );
        assert_eq!(lag(&f), lag0 + 5);
        // Not for long: the batch after FLOOR_LAG_BATCHES of them writes it.
        for n in 5..super::tables::FLOOR_LAG_BATCHES - lag0 {
            add_then_poll(&mut f, &[format!("m{n}").as_str()], 1);
        }
        assert_eq!(memtable_entries(&f.store, CF_REGISTRY), before, "cached {cached}");
        assert_eq!(lag(&f), super::tables::FLOOR_LAG_BATCHES);
        add_then_poll(&mut f, &["last"], 1);
        assert_eq!(
            memtable_entries(&f.store, CF_REGISTRY),
            before + 1,
            "the lagging floor was written (cached {cached})"
        );
        assert_eq!(lag(&f), 0);
        for n in 0..5 {
            let body = format!("n{n}");
            add_then_poll(&mut f, &[body.as_str()], 1);
        }
        // The stored floor lags behind; after a reopen every lease comes
        // back, and a record added then is found from the older floor.
        let mut f = f.reopen();
        f.store.add(&q("a"), msgs(&["after"])).unwrap();
        let next = f.store.poll(&q("a"), 100, 1000).unwrap().unwrap();
        assert_eq!(payloads(&next), vec![b"after"], "cached {cached}");
        f.clock.advance(1001);
        let again = f.store.poll(&q("a"), 100, 1000).unwrap().unwrap();
        let mut got = payloads(&again).into_iter().map(|p| p.to_vec()).collect::<Vec<_>>();
        got.sort();
        let mut want: Vec<Vec<u8>> = ["after", "first", "last"]
            .iter()
            .map(|s| s.to_string())
            .chain((0..super::tables::FLOOR_LAG_BATCHES - lag0).map(|n| format!("m{n}")))
            .chain((0..5).map(|n| format!("n{n}")))
            .map(String::into_bytes)
            .collect();
        want.sort();
        assert_eq!(got, want, "every lease ended and came back (cached {cached})");
    }
}

#[test]
fn held_records_a_poll_leaves_are_written_with_the_batch() {
    for cached in [true, false] {
        let mut f = queue_a(cached);
        let before = ready_memtable_entries(&f.store);
        assert_eq!(
            add_then_poll(&mut f, &["1", "2", "3"], 2),
            vec![b"1".to_vec(), b"2".to_vec()]
        );
        assert_eq!(ready_memtable_entries(&f.store), before + 1, "only 3 is written");
        let mut f = f.reopen();
        let rest = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
        assert_eq!(payloads(&rest), vec![b"3"], "cached {cached}");
    }
}

#[test]
fn a_purge_drops_the_records_its_batch_held() {
    let mut f = fixture();
    let poll = || Command::Poll {
        queue: q("a"),
        max_items: 5,
        lease_ms: 1000,
        max_bytes: ReplyBudget::unlimited(),
    };
    let out = f.store.execute(vec![
        Command::Add {
            queue: q("a"),
            messages: msgs(&["gone"]),
        },
        Command::Purge { queue: q("a") },
        Command::Add {
            queue: q("a"),
            messages: msgs(&["kept"]),
        },
        Command::Add {
            queue: q("a"),
            messages: msgs(&["also"]),
        },
        poll(),
    ]);
    let outcomes = out.outcomes.expect("no storage failure");
    match &outcomes[4] {
        Ok(Outcome::Polled(Some(l))) => assert_eq!(payloads(l), vec![b"kept", b"also"]),
        other => panic!("{other:?}"),
    }
    // Nothing was left behind in the ready index (below the floor, a
    // record written after the purge's range delete would never be seen
    // again, nor ever deleted).
    let cf = f.store.engine.cf(CF_READY).unwrap();
    assert_eq!(
        f.store
            .engine
            .db()
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .count(),
        0
    );
    // Nothing comes back from before the purge, after a reopen either.
    let mut f = f.reopen();
    f.clock.advance(1001);
    let again = f.store.poll(&q("a"), 5, 1000).unwrap().unwrap();
    assert_eq!(payloads(&again), vec![b"kept", b"also"]);
}

#[test]
fn invalid_input_is_a_typed_error_and_changes_nothing() {
    let mut f = fixture();
    let big = NewMessage::new(vec![0u8; 1025]);
    let refused = f.store.add(&q("a"), vec![NewMessage::new(b"ok".to_vec()), big]);
    assert!(matches!(
        refused,
        Err(StoreError::Command(CommandError::PayloadTooLarge {
            size: 1025,
            limit: 1024
        }))
    ));
    assert!(refused.unwrap_err().to_string().contains("max-payload-bytes 1024"));
    assert!(matches!(
        f.store.stats(&q("a")),
        Err(StoreError::Command(CommandError::UnknownQueue(_)))
    ));
    f.store.add(&q("a"), msgs(&["1"])).unwrap();
    // maxItems 0 is the protocol's to normalise (server::config); to the
    // store it asks for nothing.
    assert_eq!(f.store.poll(&q("a"), 0, 10).unwrap(), None);
    assert!(matches!(
        f.store.poll(&q("b"), 1, 10),
        Err(StoreError::Command(CommandError::UnknownQueue(_)))
    ));
    assert!(matches!(
        f.store.purge(&q("b")),
        Err(StoreError::Command(CommandError::UnknownQueue(_)))
    ));
    assert!(matches!(
        f.store.delete(&q("b")),
        Err(StoreError::Command(CommandError::UnknownQueue(_)))
    ));
    assert_eq!(f.store.stats(&q("a")).unwrap().visible, 1);
}

#[test]
fn durations_are_clamped_not_overflowed() {
    let mut f = fixture();
    f.store
        .add(&q("a"), vec![NewMessage::delayed(b"x".to_vec(), u64::MAX)])
        .unwrap();
    assert_eq!(f.store.next_deadline(), Some(T0 + crate::storage::MAX_DURATION_MS));
    f.store.add(&q("a"), msgs(&["y"])).unwrap();
    let lease = f.store.poll(&q("a"), 1, u64::MAX).unwrap().unwrap();
    assert_eq!(lease.expires_at_ms, T0 + crate::storage::MAX_DURATION_MS);
}

#[test]
fn purge_and_delete() {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["1", "2", "3"])).unwrap();
    f.store
        .add(&q("a"), vec![NewMessage::delayed(b"4".to_vec(), 100)])
        .unwrap();
    let lease = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
    f.store.add(&q("b"), msgs(&["keep"])).unwrap();
    assert_eq!(f.store.purge(&q("a")).unwrap(), 4);
    assert_eq!(f.store.stats(&q("a")).unwrap(), QueueStats::default());
    assert!(!f.store.remove(&q("a"), lease.messages[0].id, lease.id).unwrap());
    assert_eq!(f.store.next_deadline(), None);
    f.store.add(&q("a"), msgs(&["5"])).unwrap();
    assert_eq!(payloads(&f.store.poll(&q("a"), 9, 100).unwrap().unwrap()), vec![b"5"]);

    f.store.delete(&q("a")).unwrap();
    assert_eq!(f.store.list_queues().unwrap(), vec![q("b")]);
    assert!(matches!(
        f.store.stats(&q("a")),
        Err(StoreError::Command(CommandError::UnknownQueue(_)))
    ));
    let mut f = f.reopen();
    assert_eq!(f.store.list_queues().unwrap(), vec![q("b")]);
    f.store.add(&q("a"), msgs(&["fresh"])).unwrap();
    assert_eq!(f.store.stats(&q("a")).unwrap().visible, 1);
    assert_eq!(f.store.stats(&q("b")).unwrap().visible, 1);
}

#[test]
fn reopen_restores_messages_leases_and_timers() {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["1", "2", "3", "4"])).unwrap();
    f.store
        .add(&q("a"), vec![NewMessage::delayed(b"d".to_vec(), 500)])
        .unwrap();
    let short = f.store.poll(&q("a"), 1, 100).unwrap().unwrap();
    let long = f.store.poll(&q("a"), 2, 10_000).unwrap().unwrap();
    let before = f.store.stats(&q("a")).unwrap();
    let mut f = f.reopen();
    assert_eq!(f.store.stats(&q("a")).unwrap(), before);
    assert_eq!(f.store.next_deadline(), Some(T0 + 100));
    assert!(f.store.remove(&q("a"), long.messages[0].id, long.id).unwrap());
    // While "down", the short lease expired: it is redelivered.
    let f2 = f.reopen();
    f2.clock.advance(200);
    let mut f = f2.reopen();
    let got = f.store.poll(&q("a"), 5, 10_000).unwrap().unwrap();
    // "4" was visible since T0, "1" came back when its lease expired.
    assert_eq!(payloads(&got), vec![b"4", b"1"]);
    assert_eq!(got.messages[1].id, short.messages[0].id);
    assert_eq!(got.messages[1].delivery_count, 2);
    f.clock.advance(300);
    let got = f.store.poll(&q("a"), 5, 100).unwrap().unwrap();
    assert_eq!(payloads(&got), vec![b"d"]);
}

#[test]
fn shards_only_load_and_create_their_own_queues() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let engine = Engine::open(dir.path(), options(), Arc::new(clock)).unwrap();
    let only = |name: &'static str| -> Ownership { Arc::new(move |q: &QueueName| q.queue() == name) };
    let mut a = ShardStore::open(engine.clone(), only("a")).unwrap();
    let mut b = ShardStore::open(engine.clone(), only("b")).unwrap();
    a.add(&q("a"), msgs(&["1"])).unwrap();
    b.add(&q("b"), msgs(&["2"])).unwrap();
    assert!(matches!(
        a.add(&q("b"), msgs(&["x"])),
        Err(StoreError::Command(CommandError::WrongShard(_)))
    ));
    assert_eq!(a.list_queues().unwrap(), vec![q("a"), q("b")]);
    drop((a, b));
    let mut a = ShardStore::open(engine.clone(), only("a")).unwrap();
    assert!(matches!(
        a.stats(&q("b")),
        Err(StoreError::Command(CommandError::UnknownQueue(_)))
    ));
    assert_eq!(a.stats(&q("a")).unwrap().visible, 1);
}

#[test]
fn a_long_consumed_queue_still_polls_from_its_floor() {
    let mut f = fixture();
    for _ in 0..50 {
        let batch: Vec<_> = (0..100).map(|i| NewMessage::new(vec![i as u8])).collect();
        f.store.add(&q("a"), batch).unwrap();
        let lease = f.store.poll(&q("a"), 100, 1000).unwrap().unwrap();
        for m in &lease.messages {
            assert!(f.store.remove(&q("a"), m.id, lease.id).unwrap());
        }
    }
    f.store.add(&q("a"), msgs(&["last"])).unwrap();
    let floor = f.store.queues.values().next().unwrap().counters.floor.clone().unwrap();
    let mut f = f.reopen();
    let q_state = f.store.queues.values().next().unwrap();
    assert_eq!(
        q_state.counters.floor.as_ref(),
        Some(&floor),
        "the floor survives a restart"
    );
    assert_eq!(payloads(&f.store.poll(&q("a"), 5, 10).unwrap().unwrap()), vec![b"last"]);
}

fn set_retention(store: &mut ShardStore, queue: &QueueName, retention_ms: Option<u64>) {
    let policy = QueuePolicy {
        retention_ms,
        ..QueuePolicy::default()
    };
    let set = store
        .execute_one(Command::SetPolicy {
            queue: queue.clone(),
            policy,
        })
        .unwrap();
    assert!(matches!(set, Outcome::Policy(_)), "{set:?}");
}

/// A worker rejects the first message of `lease` (`fail` with `dead`).
fn reject_first(store: &mut ShardStore, queue: &QueueName, lease: &Lease) {
    let failed = store
        .execute_one(Command::Fail {
            queue: queue.clone(),
            id: lease.messages[0].id,
            lease: lease.id,
            error: "bad".into(),
            dead: true,
        })
        .unwrap();
    assert_eq!(failed, Outcome::Failed(true));
}

/// Every retention index entry of the store (all queues).
fn retention_entries(store: &ShardStore) -> usize {
    let cf = store.engine.cf(CF_RETENTION).unwrap();
    store.engine.db().iterator_cf(cf, rocksdb::IteratorMode::Start).count()
}

#[test]
fn retention_drops_visible_delayed_and_dead_messages_in_bounded_batches() {
    let mut f = fixture();
    let jobs = q("jobs");
    // More than two batches' worth, kept without retention first: the fill
    // indexes them in steps.
    let n = 2 * retention::RETENTION_BATCH + 500;
    for chunk in 0..(n / 500) {
        let batch = (0..500)
            .map(|i| NewMessage::new(format!("{chunk}-{i}").into_bytes()))
            .collect();
        f.store.add(&jobs, batch).unwrap();
    }
    f.store
        .add(&jobs, vec![NewMessage::delayed(b"later".to_vec(), 50_000)])
        .unwrap();
    let lease = f.store.poll(&jobs, 1, 60_000).unwrap().unwrap();
    reject_first(&mut f.store, &jobs, &lease);
    assert_eq!(f.store.stats(&jobs).unwrap().dead, 1);
    f.clock.advance(1_000);
    f.store.add(&jobs, msgs(&["young"])).unwrap();
    set_retention(&mut f.store, &jobs, Some(1_000));
    // Filling: the sweeper is due at once until the index is complete.
    assert!(f.store.next_deadline().is_some_and(|d| d <= f.clock.now_ms()));
    let mut batches = 0;
    while f.store.next_deadline().is_some_and(|d| d <= f.clock.now_ms()) {
        f.store.expire_due();
        batches += 1;
        assert!(batches < 10, "the fill did not end");
    }
    assert!(batches >= 3, "{batches} batches for {n} messages");
    // Everything older than a second (visible, delayed and the dead
    // letter) was dropped by the fill itself; the young message is indexed
    // and due a second after its add.
    let stats = f.store.stats(&jobs).unwrap();
    let old = n as u64 + 1;
    assert_eq!(
        (stats.visible, stats.delayed, stats.dead, stats.dropped),
        (1, 0, 0, old)
    );
    // A plain message needs no index entry: the ready index orders it.
    assert_eq!(retention_entries(&f.store), 0);
    assert_eq!(f.store.next_deadline(), Some(f.clock.now_ms() + 1_000));

    // Dropped by the drop pass, at its due time, and the count survives a
    // reopen and a purge.
    f.clock.advance(1_000);
    f.store.expire_due();
    let stats = f.store.stats(&jobs).unwrap();
    assert_eq!((stats.visible, stats.dropped), (0, old + 1));
    assert_eq!(f.store.next_deadline(), None);
    f = f.reopen();
    assert_eq!(f.store.stats(&jobs).unwrap().dropped, old + 1);
    f.store.purge(&jobs).unwrap();
    assert_eq!(f.store.stats(&jobs).unwrap().dropped, old + 1);
}

#[test]
fn retention_index_follows_messages_and_survives_reopen() {
    let mut f = fixture();
    let jobs = q("jobs");
    f.store.add(&jobs, msgs(&["a", "b", "c"])).unwrap();
    f.store
        .add(&jobs, vec![NewMessage::delayed(b"later".to_vec(), 500)])
        .unwrap();
    set_retention(&mut f.store, &jobs, Some(10_000));
    f.store.expire_due();
    // Only the delayed message is indexed: the ready index orders the rest.
    assert_eq!(retention_entries(&f.store), 1);
    // A plain add, poll and remove never touch the index.
    f.store.add(&jobs, msgs(&["d"])).unwrap();
    let lease = f.store.poll(&jobs, 2, 1_000).unwrap().unwrap();
    f.store.remove(&jobs, lease.messages[0].id, lease.id).unwrap();
    assert_eq!(retention_entries(&f.store), 1);
    // A message back from its lease is visible later than its add: indexed.
    f.clock.advance(1_000);
    f.store.expire_due();
    assert_eq!(retention_entries(&f.store), 2);
    // Taken again by a poll: its entry goes.
    let lease = f.store.poll(&jobs, 4, 20_000).unwrap().unwrap();
    assert_eq!(lease.messages.len(), 4);
    assert_eq!(retention_entries(&f.store), 0);
    // A reopen finds the oldest message again and lists its deadline.
    f.store.release(&jobs, lease.messages[3].id, lease.id, 0).unwrap();
    f = f.reopen();
    assert_eq!(f.store.next_deadline(), Some(T0 + 10_000));
    // Messages whose lease expires past retention are dropped, not made
    // visible again; the released one where it lies.
    f.clock.advance(20_000);
    f.store.expire_due();
    let stats = f.store.stats(&jobs).unwrap();
    assert_eq!((stats.visible, stats.in_flight, stats.dropped), (0, 0, 4));
    assert!(!f.store.remove(&jobs, lease.messages[0].id, lease.id).unwrap());
    assert_eq!(retention_entries(&f.store), 0);
    // Without retention, no index is kept, and none is left behind.
    f.store.add(&jobs, vec![NewMessage::delayed(b"e".to_vec(), 5)]).unwrap();
    assert_eq!(retention_entries(&f.store), 1);
    set_retention(&mut f.store, &jobs, Some(crate::types::UNLIMITED));
    f.store.add(&jobs, vec![NewMessage::delayed(b"f".to_vec(), 5)]).unwrap();
    assert_eq!(retention_entries(&f.store), 0);
    f.clock.advance(1_000_000);
    f.store.expire_due();
    assert_eq!(f.store.next_deadline(), None);
    assert_eq!(f.store.stats(&jobs).unwrap().visible, 2);
}

#[test]
fn retention_set_on_a_queue_of_dead_letters_drops_them() {
    let mut f = fixture();
    let jobs = q("jobs");
    f.store.add(&jobs, msgs(&["a"])).unwrap();
    let lease = f.store.poll(&jobs, 1, 1).unwrap().unwrap();
    reject_first(&mut f.store, &jobs, &lease);
    f.clock.advance(47);
    set_retention(&mut f.store, &jobs, Some(1));
    let stats = f.store.stats(&jobs).unwrap();
    assert_eq!((stats.dead, stats.dropped), (0, 1));
    // Persisted with the batch that dropped it.
    f = f.reopen();
    let stats = f.store.stats(&jobs).unwrap();
    assert_eq!((stats.dead, stats.dropped), (0, 1));
}

#[test]
fn a_batch_starts_at_the_recent_largest_batch_rounded_up_and_capped() {
    let mut bytes = BatchBytes::default();
    assert_eq!(bytes.capacity(), 1);
    bytes.observe(10_000);
    assert_eq!(bytes.capacity(), 16_384);
    // A small batch in between does not shrink the next one's buffer much.
    bytes.observe(300);
    assert_eq!(bytes.capacity(), 16_384);
    bytes.observe(usize::MAX);
    assert_eq!(bytes.capacity(), BatchBytes::CAP);
    // Forgotten an eighth per batch.
    for _ in 0..100 {
        bytes.observe(300);
    }
    assert_eq!(bytes.capacity(), 512);
}

#[test]
fn the_batch_size_follows_what_was_committed() {
    let mut f = fixture();
    let jobs = q("jobs");
    f.store.add(&jobs, msgs(&["a", "b", "c"])).unwrap();
    let after_add = f.store.batch_bytes.capacity();
    assert!(after_add >= 3 * 16, "{after_add}");
    f.store
        .add(&jobs, (0..100).map(|_| NewMessage::new(vec![7; 1000])).collect())
        .unwrap();
    assert!(f.store.batch_bytes.capacity() >= 100_000, "{:?}", f.store.batch_bytes);
}

/// Every key and value of the `leases` column family.
fn lease_entries(store: &ShardStore) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cf = store.engine.cf(CF_LEASES).unwrap();
    store
        .engine
        .db()
        .iterator_cf(cf, rocksdb::IteratorMode::Start)
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
        .collect()
}

fn remove_all(store: &mut ShardStore, queue: &QueueName, lease: &Lease) {
    let outcomes = store.execute(Command::remove_all(queue, lease)).outcomes.unwrap();
    assert!(
        outcomes.iter().all(|o| matches!(o, Ok(Outcome::Removed(true)))),
        "{outcomes:?}"
    );
}

#[test]
fn a_lease_is_one_block_and_a_remove_of_all_its_ids_one_delete() {
    let mut f = fixture();
    let jobs = q("jobs");
    f.store.add(&jobs, msgs(&["a", "b", "c"])).unwrap();
    let lease = f.store.poll(&jobs, 3, 1000).unwrap().unwrap();
    let entries = lease_entries(&f.store);
    assert_eq!(entries.len(), 1, "one header holds the lease");
    let header = keys::parse_lease_header(&entries[0].1).unwrap();
    assert_eq!(header.expires_at, lease.expires_at_ms);
    let members: Vec<_> = header.members.unwrap().map(|m| m.unwrap().0).collect();
    assert_eq!(members, lease.messages.iter().map(|m| m.id).collect::<Vec<_>>());
    // All ids in one batch: no end marker is written on the way.
    remove_all(&mut f.store, &jobs, &lease);
    assert!(lease_entries(&f.store).is_empty());
    assert_eq!(f.store.stats(&jobs).unwrap().in_flight, 0);
    f = f.reopen();
    assert_eq!(f.store.stats(&jobs).unwrap().in_flight, 0);
    assert_eq!(f.store.next_deadline(), None);
}

#[test]
fn members_that_end_before_their_lease_are_marked_and_survive_a_reopen() {
    let mut f = fixture();
    let jobs = q("jobs");
    f.store.add(&jobs, msgs(&["a", "b", "c"])).unwrap();
    let lease = f.store.poll(&jobs, 3, 1000).unwrap().unwrap();
    let [a, b, c] = [0, 1, 2].map(|i| lease.messages[i].id);
    assert!(f.store.remove(&jobs, a, lease.id).unwrap());
    assert!(f.store.release(&jobs, b, lease.id, 0).unwrap());
    let marked = lease_entries(&f.store);
    assert_eq!(marked.len(), 3, "the block and two end markers");
    assert!(marked[1..].iter().all(|(_, v)| v.is_empty()));
    f = f.reopen();
    let stats = f.store.stats(&jobs).unwrap();
    assert_eq!((stats.visible, stats.in_flight), (1, 1), "b is back, c still leased");
    assert!(
        !f.store.remove(&jobs, a, lease.id).unwrap(),
        "a ended before the reopen"
    );
    // c is still the lease's, with its record: a release puts it back.
    assert!(f.store.release(&jobs, c, lease.id, 0).unwrap());
    assert!(
        lease_entries(&f.store).is_empty(),
        "the last member takes the block and markers"
    );
    let again = f.store.poll(&jobs, 5, 1000).unwrap().unwrap();
    assert_eq!(payloads(&again), vec![b"b", b"c"]);
    assert!(again.messages.iter().all(|m| m.delivery_count == 2));
}

#[test]
fn an_extended_block_keeps_its_members_and_expires_with_its_markers() {
    let mut f = fixture();
    let jobs = q("jobs");
    f.store.add(&jobs, msgs(&["a", "b"])).unwrap();
    let lease = f.store.poll(&jobs, 2, 100).unwrap().unwrap();
    assert!(f.store.remove(&jobs, lease.messages[0].id, lease.id).unwrap());
    assert_eq!(f.store.extend(&jobs, lease.id, 5_000).unwrap(), Some(T0 + 5_000));
    f = f.reopen();
    f.clock.advance(1_000);
    f.store.expire_due();
    assert_eq!(f.store.stats(&jobs).unwrap().in_flight, 1, "the extension survived");
    f.clock.advance(5_000);
    f.store.expire_due();
    let stats = f.store.stats(&jobs).unwrap();
    assert_eq!((stats.visible, stats.in_flight), (1, 0));
    assert!(
        lease_entries(&f.store).is_empty(),
        "the expiry took the block and its marker"
    );
    let again = f.store.poll(&jobs, 5, 1000).unwrap().unwrap();
    assert_eq!(payloads(&again), vec![b"b"]);
}

#[test]
fn leases_written_before_blocks_are_read_removed_and_expired() {
    let mut f = fixture();
    let jobs = q("jobs");
    f.store.add(&jobs, msgs(&["a", "b", "c"])).unwrap();
    let lease = f.store.poll(&jobs, 3, 1000).unwrap().unwrap();
    // Rewrite the lease as a server from before blocks stored it: an
    // expiry in the header and a record under each member key.
    let (header_key, block) = lease_entries(&f.store).remove(0);
    let header = keys::parse_lease_header(&block).unwrap();
    // The queue id is the header key's first bytes.
    let qid = u32::from_be_bytes(header_key[..4].try_into().unwrap());
    let cf = f.store.engine.cf(CF_LEASES).unwrap();
    let mut old = WriteBatch::default();
    old.put_cf(cf, &header_key, header.expires_at.to_be_bytes());
    for member in header.members.unwrap() {
        let (id, record) = member.unwrap();
        old.put_cf(cf, keys::member_key(qid, &lease.id, &id), record);
    }
    f.store.engine.db().write(old).unwrap();
    assert_eq!(lease_entries(&f.store).len(), 4);
    f = f.reopen();
    assert_eq!(f.store.stats(&jobs).unwrap().in_flight, 3);
    let [a, b, _] = [0, 1, 2].map(|i| lease.messages[i].id);
    assert!(f.store.remove(&jobs, a, lease.id).unwrap());
    assert!(f.store.release(&jobs, b, lease.id, 0).unwrap());
    assert_eq!(lease_entries(&f.store).len(), 2, "each ended member's record went");
    f = f.reopen();
    assert_eq!(f.store.stats(&jobs).unwrap().in_flight, 1);
    f.clock.advance(1_000);
    f.store.expire_due();
    assert!(lease_entries(&f.store).is_empty());
    let again = f.store.poll(&jobs, 5, 1000).unwrap().unwrap();
    assert_eq!(payloads(&again), vec![b"b", b"c"]);
}

fn create(store: &mut ShardStore, name: &str) -> Result<Outcome, StoreError> {
    store.execute_one(Command::CreateQueue {
        queue: q(name),
        policy: QueuePolicy::default(),
    })
}

#[test]
fn queues_past_max_queues_are_refused_across_shards_until_one_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let limited = EngineOptions {
        max_queues: 3,
        ..options()
    };
    let engine = Engine::open(dir.path(), limited.clone(), Arc::new(clock.clone())).unwrap();
    // Two shards on one engine, as the server runs them: the limit is the
    // database's, not each shard's.
    let even = |q: &QueueName| q.queue().len().is_multiple_of(2);
    let mut a = ShardStore::open(engine.clone(), Arc::new(move |q: &QueueName| even(q))).unwrap();
    let mut b = ShardStore::open(engine.clone(), Arc::new(move |q: &QueueName| !even(q))).unwrap();
    a.add(&q("aa"), msgs(&["1"])).unwrap();
    b.add(&q("b"), msgs(&["1"])).unwrap();
    create(&mut a, "cc").unwrap();
    assert_eq!(engine.live_queues(), 3);
    let refused = [
        b.add(&q("d"), msgs(&["1"])).unwrap_err(),
        a.add(&q("ee"), msgs(&["1"])).unwrap_err(),
        create(&mut b, "f").unwrap_err(),
    ];
    for e in refused {
        assert_eq!(e, StoreError::Command(CommandError::TooManyQueues { max: 3 }));
    }
    // Nothing of a refused queue was kept; queues that exist take adds.
    assert_eq!(a.list_queues().unwrap(), vec![q("aa"), q("b"), q("cc")]);
    b.add(&q("b"), msgs(&["2"])).unwrap();
    assert_eq!(engine.live_queues(), 3);
    // A delete makes room, on whichever shard.
    a.delete(&q("cc")).unwrap();
    assert_eq!(engine.live_queues(), 2);
    b.add(&q("d"), msgs(&["1"])).unwrap();
    assert!(a.add(&q("ee"), msgs(&["1"])).is_err());
    // Reopened, the stores count what is stored.
    drop((a, b));
    assert_eq!(engine.live_queues(), 0);
    drop(engine);
    let engine = Engine::open(dir.path(), limited, Arc::new(clock)).unwrap();
    let mut all = ShardStore::open_all(engine.clone()).unwrap();
    assert_eq!(engine.live_queues(), 3);
    assert!(all.add(&q("gg"), msgs(&["1"])).is_err());
}

#[test]
fn a_shard_that_failed_for_good_has_no_deadline_to_wake_for() {
    let mut f = fixture();
    f.store.add(&q("a"), msgs(&["1"])).unwrap();
    f.store.poll(&q("a"), 1, 1000).unwrap().unwrap();
    assert_eq!(f.store.next_deadline(), Some(T0 + 1000));
    // What a failed reload leaves (white box: forcing RocksDB to fail a
    // reload here would need a corrupt file).
    f.store.failed = Some("reload failed".into());
    assert_eq!(f.store.next_deadline(), None);
    let executed = f.store.execute(Vec::new());
    assert!(matches!(executed.outcomes, Err(StorageError::Unavailable(_))));
}
