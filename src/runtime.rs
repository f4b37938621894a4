//! Small runtime helpers the server leans on (in the spirit of Redpanda's
//! `ssx`): blocking offload, CPU placement, locked-memory limits, executor
//! construction and a timeout.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

/// Runs blocking work (RocksDB) on the executor's blocking-offload thread so
/// the executor keeps serving while it runs.
pub async fn offload<F, R>(work: F) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    glommio::executor().spawn_blocking(work).await
}

/// [`offload`], but while the work runs the executor hands its CPU to the
/// offload thread (`sched_yield`) for up to `yield_for` instead of parking.
///
/// Why: the shard's executor and its offload thread share one CPU, so the
/// executor can do nothing useful while a storage batch runs. Parking costs
/// more than the batch on a virtualised host: arming the reactor's timer
/// (about 13 µs on the benchmark guest), an eventfd write from the offload
/// thread, and a wake-up. Yielding lets the batch run at once and finds its
/// result without any of those. Work that outlasts `yield_for` (a batch
/// waiting on fsync, say) is awaited the usual way, so the executor never
/// spins longer than that.
pub async fn offload_yielding<F, R>(work: F, yield_for: Duration) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if yield_for.is_zero() {
        return offload(work).await;
    }
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    let mut result = std::pin::pin!(glommio::executor().spawn_blocking(move || {
        let r = work();
        finished.store(true, Ordering::Release);
        r
    }));
    // The first poll hands the work to the offload thread.
    if let Poll::Ready(r) = futures::poll!(result.as_mut()) {
        return r;
    }
    let until = Instant::now() + yield_for;
    while !done.load(Ordering::Acquire) && Instant::now() < until {
        std::thread::yield_now();
    }
    // Done (its result is collected on the reactor's next pass, without a
    // park) or out of patience (an ordinary wait).
    result.await
}

/// Awaits `fut` for at most `limit`; `None` on timeout.
pub async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    glommio::timer::timeout(limit, async { Ok(fut.await) }).await.ok()
}

/// The CPUs this process may run on (respecting taskset/cgroups), sorted.
pub fn allowed_cpus() -> Vec<usize> {
    let mut cpus: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// An executor pinned to `cpu` (or floating when `None`). Its blocking-offload
/// thread is pinned to the same CPU: the executor waits while RocksDB works,
/// so the two share the core instead of piling onto CPU 0.
pub fn executor(name: &str, cpu: Option<usize>, io_memory: usize) -> LocalExecutorBuilder {
    let placement = cpu.map_or(Placement::Unbound, Placement::Fixed);
    let pool = glommio::PoolPlacement::from(placement.clone());
    LocalExecutorBuilder::new(placement)
        .name(name)
        .io_memory(io_memory)
        .blocking_thread_pool_placement(pool)
}

/// glommio refuses to start below this much locked memory.
pub const MIN_MEMLOCK_BYTES: u64 = 512 << 10;

#[derive(Debug, thiserror::Error)]
#[error(
    "RLIMIT_MEMLOCK is {have} bytes but io_uring needs at least {need}; raise it \
     (`ulimit -l {kib}` in the shell, LimitMEMLOCK={need} in a systemd unit, or \
     --ulimit memlock={need} for a container)"
)]
pub struct MemlockError {
    pub have: u64,
    pub need: u64,
    pub kib: u64,
}

/// Raises the locked-memory limit to `want` bytes where permitted (the soft
/// limit up to the hard one; both when privileged) and fails with advice when
/// the result is below `need`.
pub fn raise_memlock(need: u64, want: u64) -> Result<u64, MemlockError> {
    let soft = raise_limit(rlimit::Resource::MEMLOCK, want);
    if soft < need {
        return Err(MemlockError {
            have: soft,
            need,
            kib: need.div_ceil(1024),
        });
    }
    Ok(soft)
}

/// Raises a resource limit toward `want` where permitted (both soft and hard
/// when privileged, else the soft limit up to the hard one) and returns the
/// soft limit now in force.
pub fn raise_limit(resource: rlimit::Resource, want: u64) -> u64 {
    let (soft, hard) = resource.get().unwrap_or((0, 0));
    if soft < want && resource.set(want, want.max(hard)).is_err() {
        let _ = resource.set(want.min(hard), hard);
    }
    resource.get().map_or(soft, |(soft, _)| soft)
}

/// Something that happens often, logged at most once per interval with how
/// many times it happened since the last line (instead of a line each).
#[derive(Debug)]
pub struct LogEvery {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    since: u64,
}

impl LogEvery {
    pub fn new(every: std::time::Duration) -> Self {
        Self {
            every,
            last: None,
            since: 0,
        }
    }

    /// Counts one occurrence; `Some(count)` when a line is due now.
    pub fn hit(&mut self) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|at| at.elapsed() < self.every) {
            return None;
        }
        self.last = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}

/// Waits until `ready` holds, woken by `changed` (which whoever makes it
/// hold notifies). Checks again after registering, so no wake-up is lost.
pub async fn wait_until(changed: &event_listener::Event, ready: impl Fn() -> bool) {
    while !ready() {
        let listener = changed.listen();
        if ready() {
            return;
        }
        listener.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_cpus_are_not_empty() {
        assert!(!allowed_cpus().is_empty());
    }

    #[test]
    fn log_every_reports_counts_once_per_interval() {
        let mut log = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(log.hit(), Some(1), "the first one is logged");
        assert_eq!(log.hit(), None);
        assert_eq!(log.hit(), None);
        let mut now = LogEvery::new(Duration::ZERO);
        assert_eq!(now.hit(), Some(1));
        assert_eq!(now.hit(), Some(1));
    }

    #[test]
    fn memlock_reports_what_to_set() {
        let err = raise_memlock(u64::MAX, 0).unwrap_err();
        assert_eq!(err.need, u64::MAX);
        assert!(err.to_string().contains("ulimit -l"));
        assert!(raise_memlock(0, 0).is_ok());
    }

    #[test]
    fn offload_and_within_work_on_an_executor() {
        let out = executor("t", None, 1 << 20)
            .spawn(|| async {
                let v = offload(|| 21 * 2).await;
                let late = within(Duration::from_millis(5), glommio::timer::sleep(Duration::from_secs(5))).await;
                (v, late.is_none())
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(out, (42, true));
    }

    #[test]
    fn a_yielding_offload_returns_the_work_whether_it_outlasts_the_yield_or_not() {
        let out = executor("t", None, 1 << 20)
            .spawn(|| async {
                let short = offload_yielding(|| 21 * 2, Duration::from_millis(50)).await;
                // Longer than the yield: the executor stops yielding and waits,
                // and keeps serving its other tasks meanwhile.
                let ticks = std::rc::Rc::new(std::cell::Cell::new(0u32));
                let counter = ticks.clone();
                let ticker = glommio::spawn_local(async move {
                    loop {
                        counter.set(counter.get() + 1);
                        glommio::timer::sleep(Duration::from_millis(5)).await;
                    }
                })
                .detach();
                let started = Instant::now();
                let long = offload_yielding(
                    || {
                        std::thread::sleep(Duration::from_millis(100));
                        7
                    },
                    Duration::from_micros(200),
                )
                .await;
                let waited = started.elapsed();
                ticker.cancel();
                let off = offload_yielding(|| 9, Duration::ZERO).await;
                (short, long, off, waited, ticks.get())
            })
            .unwrap()
            .join()
            .unwrap();
        let (short, long, off, waited, ticks) = out;
        assert_eq!((short, long, off), (42, 7, 9));
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(
            ticks >= 5,
            "the executor served other tasks while it waited: {ticks} ticks"
        );
    }
}
