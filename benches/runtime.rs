//! Costs of the runtime plumbing every request pays: a blocking-offload round
//! trip (executor → blocking thread → executor; parked, or yielding its CPU
//! to the blocking thread) and a cross-core channel round trip (shard A →
//! shard B → shard A), each on pinned executors.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use glommio::channels::shared_channel;

fn cpus() -> Vec<usize> {
    queueber::runtime::allowed_cpus()
}

/// Runs `iters` round trips of `work` on a pinned executor; returns the time.
fn on_executor<F, Fut>(iters: u64, work: F) -> Duration
where
    F: FnOnce(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Duration> + 'static,
{
    let cpu = cpus().first().copied();
    queueber::runtime::executor("bench", cpu, 256 << 10)
        .spawn(move || work(iters))
        .expect("executor")
        .join()
        .expect("join")
}

fn offload_round_trip(c: &mut Criterion) {
    c.bench_function("offload_round_trip", |b| {
        b.iter_custom(|iters| {
            on_executor(iters, |iters| async move {
                let start = Instant::now();
                for i in 0..iters {
                    std::hint::black_box(queueber::runtime::offload(move || i + 1).await);
                }
                start.elapsed()
            })
        })
    });
}

/// A round trip through a shard's own offload thread (`OffloadThread`, what
/// a shard's core hands its storage batches to): the executor parked while
/// the work runs, or yielding its CPU to the thread (what a pinned shard's
/// core does for short batches).
fn offload_thread_round_trip(c: &mut Criterion) {
    for (name, yield_for) in [
        ("offload_thread_round_trip", Duration::ZERO),
        ("offload_thread_round_trip_yielding", Duration::from_micros(200)),
    ] {
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                on_executor(iters, move |iters| async move {
                    let thread = queueber::runtime::OffloadThread::spawn("bench-offload".into()).expect("a thread");
                    let start = Instant::now();
                    for i in 0..iters {
                        std::hint::black_box(thread.run(move || i + 1, yield_for).await);
                    }
                    start.elapsed()
                })
            })
        });
    }
}

fn cross_core_round_trip(c: &mut Criterion) {
    let cpus = cpus();
    if cpus.len() < 2 {
        return;
    }
    c.bench_function("cross_core_round_trip", |b| {
        b.iter_custom(|iters| {
            let (to_b, from_a) = shared_channel::new_bounded::<u64>(64);
            let (to_a, from_b) = shared_channel::new_bounded::<u64>(64);
            let echo = queueber::runtime::executor("echo", Some(cpus[1]), 256 << 10)
                .spawn(move || async move {
                    let (rx, tx) = futures::join!(from_a.connect(), to_a.connect());
                    while let Some(v) = rx.recv().await {
                        if tx.send(v).await.is_err() {
                            break;
                        }
                    }
                })
                .expect("echo executor");
            let elapsed = on_executor(iters, move |iters| async move {
                let (tx, rx) = futures::join!(to_b.connect(), from_b.connect());
                let start = Instant::now();
                for i in 0..iters {
                    let _ = tx.send(i).await;
                    std::hint::black_box(rx.recv().await);
                }
                let elapsed = start.elapsed();
                drop(tx);
                elapsed
            });
            let _ = echo.join();
            elapsed
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = offload_round_trip, offload_thread_round_trip, cross_core_round_trip
}
criterion_main!(benches);
