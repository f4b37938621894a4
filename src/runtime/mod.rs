//! Small runtime helpers the server leans on (in the spirit of Redpanda's
//! `ssx`): blocking offload (glommio's pool for occasional work, a shard's
//! own [`OffloadThread`] for its storage batches), CPU placement,
//! locked-memory limits, executor construction, a timeout and an [`Alarm`]
//! for waits at a moving deadline.

use std::future::Future;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

mod alarm;
mod offload_thread;
pub use alarm::Alarm;
pub use offload_thread::OffloadThread;

/// Runs occasional blocking work (a metrics scrape's RocksDB reads, file
/// reads) on glommio's blocking-offload pool so the executor keeps serving
/// while it runs. A shard's storage batches, which come by the thousand per
/// second, go to its [`OffloadThread`] instead.
pub async fn offload<F, R>(work: F) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    glommio::executor().spawn_blocking(work).await
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

/// Runs the future `f` makes on a fresh, unpinned executor and returns its
/// output (tests of code that needs an executor); see
/// [`run_on_test_executor_at`].
#[cfg(test)]
pub(crate) fn run_on_test_executor<T, Fut>(f: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    run_on_test_executor_at(None, f)
}

/// Runs the future `f` makes on a fresh executor pinned to `cpu` (or
/// floating) and returns its output. Fails the test if the executor has not
/// finished within a minute: a lost wake-up would otherwise hang it.
#[cfg(test)]
pub(crate) fn run_on_test_executor_at<T, Fut>(cpu: Option<usize>, f: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let handle = executor("test", cpu, 1 << 20).spawn(f).expect("a test executor starts");
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(handle.join());
    });
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the test executor finished within a minute")
        .expect("the test executor's work completes")
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
}
