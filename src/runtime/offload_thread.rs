//! A blocking-offload thread of one executor's own, handed work without
//! glommio's blocking pool.
//!
//! Why: a shard hands every storage batch to a thread of its own, so the
//! executor never blocks on RocksDB. glommio's `spawn_blocking` does that
//! through its general pool: a boxed closure and a shared result behind a
//! mutex, a reactor source registered in a map, a `flume` channel each way
//! (a futex wake per send to a parked receiver), and the result collected on
//! a reactor pass: about 11,000 more instructions per message at B=1 than
//! this thread (callgrind), and a round trip of 3.65 µs against 2.27 µs
//! here, where a bare futex ping-pong between two threads on one CPU takes
//! 2.2 µs (`docs/benchmarks.md`). Here the executor puts the job in a slot,
//! wakes the thread only if it is parked, and finds the result in the job's
//! own slot: one allocation for the job, one for its result, no reactor
//! source and no channel.
//!
//! The executor never blocks on the thread. While a job runs it may hand its
//! CPU over (`sched_yield`) for a bounded time, since the two share a CPU
//! and it has nothing to do but wait; after that, or without the yield, it
//! awaits a waker the thread wakes when the job is done (a foreign wake,
//! which glommio delivers through the executor's own notifier).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// What the executor and the thread share.
#[derive(Default)]
struct Shared {
    /// Jobs handed over and not yet started, in order. A mutex, not a
    /// channel: the executor and the thread take it for a push or a pop, so
    /// it is never contended for long.
    jobs: Mutex<VecDeque<Job>>,
    /// Set when the owner is gone: the thread exits once the jobs are done.
    stop: AtomicBool,
}

/// One job's result, and whom to wake when it is there.
struct Slot<R> {
    value: Mutex<Option<R>>,
    done: AtomicBool,
    waker: AtomicWaker,
}

/// A thread that runs the jobs of one owner, in the order they are handed
/// over. It inherits the CPU affinity of the thread that spawns it, so an
/// executor pinned to a CPU gets a thread pinned to the same one.
pub struct OffloadThread {
    shared: Arc<Shared>,
    thread: std::thread::Thread,
}

impl OffloadThread {
    /// Starts the thread. Fails only when the OS refuses a thread.
    pub fn spawn(name: String) -> std::io::Result<OffloadThread> {
        Self::spawn_in(name, tracing::Span::none())
    }

    /// Starts the thread with every job run inside `span` (what its logs
    /// are labelled with). Entered once for the thread's life, not per job:
    /// entering and leaving a span per job cost a registry lookup each.
    pub fn spawn_in(name: String, span: tracing::Span) -> std::io::Result<OffloadThread> {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || span.in_scope(|| work_loop(&theirs)))?;
        Ok(OffloadThread {
            shared,
            thread: handle.thread().clone(),
        })
    }

    /// Runs `work` on the thread and returns its result. While it runs, the
    /// calling executor hands its CPU over with `sched_yield` for at most
    /// `yield_for` (zero: not at all), then awaits the result without
    /// blocking. A panic in `work` is re-raised here.
    pub async fn run<F, R>(&self, work: F, yield_for: Duration) -> R
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let slot = Arc::new(Slot {
            value: Mutex::new(None),
            done: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        let theirs = slot.clone();
        let job: Job = Box::new(move || {
            // A panicking job still ends: the owner is told, not left waiting.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            *theirs.value.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
            theirs.done.store(true, Ordering::Release);
            theirs.waker.wake();
        });
        self.shared
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(job);
        // A futex wake only when the thread is parked (std's unpark).
        self.thread.unpark();
        if !yield_for.is_zero() {
            let until = Instant::now() + yield_for;
            while !slot.done.load(Ordering::Acquire) && Instant::now() < until {
                std::thread::yield_now();
            }
        }
        futures::future::poll_fn(|cx| {
            if slot.done.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            slot.waker.register(cx.waker());
            // Checked again after registering, so a wake in between is not lost.
            if slot.done.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        let result = slot.value.lock().unwrap_or_else(PoisonError::into_inner).take();
        match result {
            Some(Ok(value)) => value,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => unreachable!("a job sets its result before it reports done"),
        }
    }
}

impl Drop for OffloadThread {
    /// Tells the thread to exit once its jobs are done; it is not joined, so
    /// dropping never blocks the executor.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

fn work_loop(shared: &Shared) {
    loop {
        let job = shared.jobs.lock().unwrap_or_else(PoisonError::into_inner).pop_front();
        match job {
            Some(job) => job(),
            None if shared.stop.load(Ordering::Acquire) => return,
            // An unpark between the check and here makes park return at once.
            None => std::thread::park(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{run_on_test_executor as on_executor, run_on_test_executor_at};
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn the_thread_shares_the_pinned_executors_cpu() {
        let cpu = *crate::runtime::allowed_cpus().last().expect("a CPU");
        let cpus = run_on_test_executor_at(Some(cpu), || async {
            let thread = OffloadThread::spawn("offload-pinned".into()).expect("a thread");
            thread
                .run(
                    || {
                        core_affinity::get_core_ids()
                            .unwrap_or_default()
                            .into_iter()
                            .map(|c| c.id)
                            .collect::<Vec<_>>()
                    },
                    Duration::ZERO,
                )
                .await
        });
        assert_eq!(cpus, vec![cpu]);
    }

    #[test]
    fn returns_each_jobs_result_whether_it_outlasts_the_yield_or_not() {
        let (quick, slow, parked, waited, ticks) = on_executor(|| async {
            let thread = OffloadThread::spawn("offload-test".into()).expect("a thread");
            let quick = thread.run(|| 21 * 2, Duration::from_millis(50)).await;
            // Longer than the yield: the executor stops yielding and
            // waits, and serves its other tasks meanwhile.
            let ticks = Rc::new(std::cell::Cell::new(0u32));
            let counter = ticks.clone();
            let ticker = glommio::spawn_local(async move {
                loop {
                    counter.set(counter.get() + 1);
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                }
            })
            .detach();
            let started = Instant::now();
            let slow = thread
                .run(
                    || {
                        std::thread::sleep(Duration::from_millis(100));
                        7
                    },
                    Duration::from_micros(200),
                )
                .await;
            let waited = started.elapsed();
            ticker.cancel();
            let parked = thread.run(|| 9, Duration::ZERO).await;
            (quick, slow, parked, waited, ticks.get())
        });
        assert_eq!((quick, slow, parked), (42, 7, 9));
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(
            ticks >= 5,
            "the executor served other tasks while it waited: {ticks} ticks"
        );
    }

    #[test]
    fn jobs_run_inside_the_threads_span() {
        use tracing_subscriber::layer::SubscriberExt;
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(tracing_subscriber::fmt::layer()));
        let span = tracing::dispatcher::with_default(&dispatch, || tracing::info_span!("shard", index = 7));
        let theirs = dispatch.clone();
        let names = on_executor(move || async move {
            let thread = OffloadThread::spawn_in("offload-span".into(), span).expect("a thread");
            // The thread's own default subscriber, for `Span::current` there.
            thread
                .run(
                    move || std::mem::forget(tracing::dispatcher::set_default(&theirs)),
                    Duration::ZERO,
                )
                .await;
            let current = || tracing::Span::current().metadata().map(|m| m.name());
            let first = thread.run(current, Duration::ZERO).await;
            let second = thread.run(current, Duration::ZERO).await;
            (first, second)
        });
        assert_eq!(names, (Some("shard"), Some("shard")));
    }

    #[test]
    fn runs_jobs_off_the_calling_thread_in_order() {
        let (order, caller, ran_on) = on_executor(|| async {
            let thread = OffloadThread::spawn("offload-order".into()).expect("a thread");
            let next = Arc::new(AtomicUsize::new(0));
            let mut order = Vec::new();
            let mut ran_on = Vec::new();
            for _ in 0..100 {
                let n = next.clone();
                let (seen, id) = thread
                    .run(
                        move || (n.fetch_add(1, Ordering::SeqCst), std::thread::current().id()),
                        Duration::ZERO,
                    )
                    .await;
                order.push(seen);
                ran_on.push(id);
            }
            (order, std::thread::current().id(), ran_on)
        });
        assert_eq!(order, (0..100).collect::<Vec<_>>());
        assert!(ran_on.iter().all(|id| *id != caller), "jobs run on the offload thread");
        assert!(ran_on.windows(2).all(|w| w[0] == w[1]), "always the same thread");
    }

    #[test]
    fn jobs_from_concurrent_tasks_all_complete() {
        let sum = on_executor(|| async {
            let thread = Rc::new(OffloadThread::spawn("offload-many".into()).expect("a thread"));
            let tasks: Vec<_> = (0..32u64)
                .map(|i| {
                    let thread = thread.clone();
                    glommio::spawn_local(async move { thread.run(move || i * 2, Duration::ZERO).await }).detach()
                })
                .collect();
            let mut sum = 0;
            for t in tasks {
                sum += t.await.expect("the task completes");
            }
            sum
        });
        assert_eq!(sum, (0..32u64).map(|i| i * 2).sum::<u64>());
    }

    #[test]
    fn a_panicking_job_panics_the_caller_and_the_thread_goes_on() {
        let (caught, after) = on_executor(|| async {
            let thread = OffloadThread::spawn("offload-panic".into()).expect("a thread");
            let run = std::panic::AssertUnwindSafe(thread.run(|| -> u32 { panic!("job failed") }, Duration::ZERO));
            let caught = futures::FutureExt::catch_unwind(run).await.is_err();
            let after = thread.run(|| 5, Duration::ZERO).await;
            (caught, after)
        });
        assert!(caught, "the job's panic reaches the caller");
        assert_eq!(after, 5);
    }

    #[test]
    fn the_thread_exits_when_its_owner_is_dropped() {
        let shared = on_executor(|| async {
            let thread = OffloadThread::spawn("offload-exit".into()).expect("a thread");
            assert_eq!(thread.run(|| 1, Duration::ZERO).await, 1);
            let shared = Arc::downgrade(&thread.shared);
            drop(thread);
            shared
        });
        // The thread holds the other reference until it returns.
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.upgrade().is_some() {
            assert!(Instant::now() < deadline, "the offload thread did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    use std::rc::Rc;
}
