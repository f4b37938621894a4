//! Disk space as a state, not an error.
//!
//! A full data filesystem must not take the queue down: consumers need to
//! keep polling and removing (that is what frees space), and adds should be
//! refused with a clear, retryable error rather than fail deep inside
//! RocksDB. So the store stops *adds* while the filesystem's free space is
//! under a reserve (`--min-free-disk-mib`), and the reserve is the headroom
//! everything else (lease markers, tombstones, memtable flushes) writes
//! into. A watcher thread samples free space with `statvfs` a few times a
//! second; the state is also entered at once when RocksDB reports ENOSPC,
//! and is left by itself once space is back and a probe write succeeds.
//! One WARN entering, one INFO leaving.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the watcher samples free space.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Default reserve of free space below which adds are refused.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 256 << 20;

/// Free bytes available to an unprivileged writer on `path`'s filesystem.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a valid out
    // pointer for the duration of the call.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Whether a RocksDB error is the filesystem running out of space.
pub fn is_no_space(error: &rocksdb::Error) -> bool {
    let text = error.as_ref();
    text.contains("No space left on device") || text.contains("NoSpace") || text.contains("no space")
}

/// The shared disk-space state of one data directory.
pub struct DiskState {
    path: PathBuf,
    min_free: u64,
    full: AtomicBool,
    /// RocksDB reported ENOSPC: leaving needs a successful probe write too.
    storage_failed: AtomicBool,
    free: AtomicU64,
    /// Serialises state transitions so each logs exactly once.
    transition: Mutex<()>,
}

impl std::fmt::Debug for DiskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskState")
            .field("path", &self.path)
            .field("min_free", &self.min_free)
            .field("full", &self.is_full())
            .finish_non_exhaustive()
    }
}

/// Why an add is refused: what the error message names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFull {
    pub path: PathBuf,
    pub free_bytes: u64,
    pub min_free_bytes: u64,
}

impl std::fmt::Display for DiskFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "disk full: {} has {} MiB free, under the reserve of {} MiB (--min-free-disk-mib); \
             adds are refused until space is freed, everything else keeps working",
            self.path.display(),
            self.free_bytes >> 20,
            self.min_free_bytes >> 20
        )
    }
}

impl DiskState {
    pub fn new(path: &Path, min_free: u64) -> Arc<DiskState> {
        let state = Arc::new(DiskState {
            path: path.to_path_buf(),
            min_free,
            full: AtomicBool::new(false),
            storage_failed: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            transition: Mutex::new(()),
        });
        state.sample(|| Ok(()));
        state
    }

    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// `Some` while adds must be refused.
    pub fn refusal(&self) -> Option<DiskFull> {
        self.is_full().then(|| DiskFull {
            path: self.path.clone(),
            free_bytes: self.free(),
            min_free_bytes: self.min_free,
        })
    }

    /// RocksDB failed a write for lack of space: enter the state at once.
    pub fn note_no_space(&self) {
        self.storage_failed.store(true, Ordering::Relaxed);
        self.enter("the storage engine reported no space left on the device");
    }

    fn enter(&self, why: &str) {
        let _once = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                path = %self.path.display(),
                free_mib = self.free() >> 20,
                reserve_mib = self.min_free >> 20,
                "disk full ({why}): refusing adds; polls, removes and the rest keep working"
            );
        }
    }

    /// Samples free space and moves between states. `probe` is a small
    /// write that must succeed before the state is left after RocksDB itself
    /// failed (the engine may need to recover first).
    pub fn sample(&self, probe: impl FnOnce() -> Result<(), String>) {
        let free = match free_bytes(&self.path) {
            Ok(free) => free,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "statvfs failed");
                return;
            }
        };
        self.free.store(free, Ordering::Relaxed);
        if free < self.min_free {
            self.enter("free space under the reserve");
            return;
        }
        if !self.is_full() {
            return;
        }
        if self.storage_failed.load(Ordering::Relaxed) {
            if let Err(e) = probe() {
                tracing::debug!(error = %e, "storage not writable yet");
                return;
            }
            self.storage_failed.store(false, Ordering::Relaxed);
        }
        let _once = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        if self.full.swap(false, Ordering::Relaxed) {
            tracing::info!(path = %self.path.display(), free_mib = free >> 20, "disk space is back: accepting adds again");
        }
    }
}

/// The background sampler of a [`DiskState`].
pub struct DiskWatcher {
    stop: crossbeam_channel::Sender<()>,
    handle: JoinHandle<()>,
}

impl DiskWatcher {
    pub fn start(
        state: Arc<DiskState>,
        probe: impl Fn() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<DiskWatcher> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let handle = std::thread::Builder::new()
            .name("queueber-disk".into())
            .spawn(move || loop {
                match stopped.recv_timeout(SAMPLE_EVERY) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => state.sample(&probe),
                    _ => return,
                }
            })?;
        Ok(DiskWatcher { stop, handle })
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_of_a_real_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(free_bytes(dir.path()).expect("statvfs") > 0);
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }

    #[test]
    fn a_reserve_above_the_free_space_refuses_adds_and_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = DiskState::new(dir.path(), u64::MAX);
        let refusal = state.refusal().expect("full");
        assert_eq!(refusal.path, dir.path());
        assert!(refusal.to_string().contains(&dir.path().display().to_string()));
        let roomy = DiskState::new(dir.path(), 0);
        assert!(roomy.refusal().is_none());
    }

    #[test]
    fn after_no_space_the_state_waits_for_a_successful_probe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = DiskState::new(dir.path(), 0);
        state.note_no_space();
        assert!(state.is_full());
        state.sample(|| Err("still read-only".into()));
        assert!(state.is_full());
        state.sample(|| Ok(()));
        assert!(!state.is_full());
    }
}
