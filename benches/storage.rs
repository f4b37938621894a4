//! Storage hot paths: add batches, poll+remove cycles, a long poll served
//! by the add that wakes it (in the add's batch or in a second one), and
//! poll cost on a queue that has consumed many messages (the tombstone
//! trap) against a fresh one. `QUEUEBER_BENCH_CONSUMED` sets the history (default 1,000,000).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use queueber::clock::SystemClock;
use queueber::names::QueueName;
use queueber::storage::{
    Command, Durability, Engine, EngineOptions, NewMessage, Outcome, QueueStore, ReplyBudget, ShardStore,
};

const PAYLOAD: usize = 256;

fn open(dir: &std::path::Path) -> ShardStore {
    let options = EngineOptions {
        // The WAL is written but not synced: this measures CPU, not the disk.
        durability: Durability::Wal,
        ..EngineOptions::default()
    };
    let engine = Engine::open(dir, options, Arc::new(SystemClock)).expect("open engine");
    ShardStore::open_all(engine).expect("open store")
}

fn batch(n: usize) -> Vec<NewMessage> {
    (0..n).map(|_| NewMessage::new(vec![7u8; PAYLOAD])).collect()
}

fn add_batches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let queue = QueueName::new("bench", "add").unwrap();
    let mut group = c.benchmark_group("add");
    for n in [1usize, 32, 256] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_batched(|| batch(n), |m| store.add(&queue, m).unwrap(), BatchSize::SmallInput)
        });
    }
    group.finish();
}

/// add B, poll B, remove B: one message's whole life, B at a time, each
/// step one storage batch as the server's coalescer issues it.
fn cycle(store: &mut ShardStore, queue: &QueueName, n: usize) {
    store.add(queue, batch(n)).unwrap();
    let lease = store.poll(queue, n as u32, 30_000).unwrap().expect("messages");
    let done = store.execute(Command::remove_all(queue, &lease));
    let removed = done.outcomes.expect("no storage failure");
    assert!(removed.iter().all(|o| matches!(o, Ok(Outcome::Removed(true)))));
}

fn poll_remove_cycles(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let queue = QueueName::new("bench", "cycle").unwrap();
    let mut group = c.benchmark_group("add_poll_remove");
    for n in [1usize, 32] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| cycle(&mut store, &queue, n))
        });
    }
    group.finish();
}

/// A consumer waiting on an empty queue gets the message of the add that
/// wakes it, then removes it: the add and the poll as one storage batch
/// (the core's follow-up polls since the eighth session; the record is
/// held and never written to the ready index) against two batches, the
/// poll after the add has committed (how the core ran them before).
fn woken_poll(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let queue = QueueName::new("bench", "woken").unwrap();
    let add = |queue: &QueueName| Command::Add {
        queue: queue.clone(),
        messages: batch(1),
    };
    let poll = |queue: &QueueName| Command::Poll {
        queue: queue.clone(),
        max_items: 1,
        lease_ms: 30_000,
        max_bytes: ReplyBudget::unlimited(),
    };
    let lease_of = |outcome: Option<Result<Outcome, _>>| match outcome {
        Some(Ok(Outcome::Polled(Some(lease)))) => lease,
        other => panic!("no lease: {other:?}"),
    };
    let mut group = c.benchmark_group("woken_poll");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_batch", |b| {
        b.iter(|| {
            let mut outcomes = store.execute(vec![add(&queue), poll(&queue)]).outcomes.expect("batch");
            let lease = lease_of(outcomes.pop());
            store.execute(Command::remove_all(&queue, &lease));
        })
    });
    group.bench_function("two_batches", |b| {
        b.iter(|| {
            store.execute(vec![add(&queue)]);
            let mut outcomes = store.execute(vec![poll(&queue)]).outcomes.expect("batch");
            let lease = lease_of(outcomes.pop());
            store.execute(Command::remove_all(&queue, &lease));
        })
    });
    group.finish();
}

/// Poll (and keep the queue steady) on a fresh queue and on one that has
/// consumed `QUEUEBER_BENCH_CONSUMED` messages; the two should cost the same.
fn tombstones(c: &mut Criterion) {
    let consumed: usize = std::env::var("QUEUEBER_BENCH_CONSUMED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let fresh_dir = tempfile::tempdir().unwrap();
    let used_dir = tempfile::tempdir().unwrap();
    let mut fresh = open(fresh_dir.path());
    let mut used = open(used_dir.path());
    let queue = QueueName::new("bench", "deep").unwrap();
    for _ in 0..consumed / 256 {
        cycle(&mut used, &queue, 256);
    }
    // Both queues hold the same 1,000 visible messages during the measurement,
    // and neither is still busy flushing or compacting its history.
    for store in [&mut fresh, &mut used] {
        store.add(&queue, batch(1_000)).unwrap();
        store.engine().wait_for_compactions().unwrap();
    }
    let mut group = c.benchmark_group("poll_after_consumed");
    group.throughput(Throughput::Elements(1));
    for (name, store) in [("fresh", &mut fresh), ("consumed", &mut used)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let lease = store.poll(&queue, 1, 30_000).unwrap().expect("message");
                store.remove(&queue, lease.messages[0].id, lease.id).unwrap();
                store.add(&queue, batch(1)).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(4));
    targets = add_batches, poll_remove_cycles, woken_poll, tombstones
}
criterion_main!(benches);
