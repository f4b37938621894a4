//! Online backups: consistent copies of the whole database, written while
//! the server runs, by a thread of their own.
//!
//! Why a thread of their own, and not a shard's storage thread: a
//! checkpoint flushes the memtables and links or copies every file, which
//! takes milliseconds to seconds. On a shard's storage thread it would hold
//! up that shard's batches all the while; beside them, RocksDB takes it
//! while the shards keep writing. The thread blocks; no executor waits for
//! it.
//!
//! Why the operator's host starts them (an interval, SIGUSR1 in
//! `queueberd`) and not a request: every token is bound to one tenant,
//! and a backup copies every tenant's queues and takes the server's disk.
//!
//! Each backup is a directory `queueber-backup-<UTC time>` in the backup
//! directory, which a server opens as its `--data-dir` (on a copy: a
//! server writes to its data directory). Only the newest `keep` are kept.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::storage::Engine;

/// The name every backup directory starts with; nothing else in the
/// backup directory is touched.
pub const BACKUP_PREFIX: &str = "queueber-backup-";
/// The suffix RocksDB gives a checkpoint while it writes it; renamed away
/// when it is complete.
const STAGING_SUFFIX: &str = ".tmp";
/// How often the thread looks at its trigger and the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// Where and when backups are written (`--backup-dir`,
/// `--backup-interval-ms`, `--backup-keep`).
#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub dir: PathBuf,
    /// A backup this long after the previous one ended (the first this long
    /// after startup); `None`: only when asked.
    pub every: Option<Duration>,
    /// The newest this many backups are kept, older ones removed after
    /// each backup written; 0 keeps every one.
    pub keep: usize,
    /// Set to ask for a backup now (SIGUSR1 in `queueberd`); cleared when
    /// the thread takes it.
    pub now: Arc<AtomicBool>,
}

/// What the backups have done, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackupFigures {
    pub written: u64,
    pub failed: u64,
    /// When the last backup written was finished (epoch ms); 0: none yet.
    pub last_written_ms: u64,
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    failed: AtomicU64,
    last_written_ms: AtomicU64,
}

impl Counters {
    fn figures(&self) -> BackupFigures {
        BackupFigures {
            written: self.written.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            last_written_ms: self.last_written_ms.load(Ordering::Relaxed),
        }
    }
}

/// The running backup thread.
pub struct Backups {
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl BackupConfig {
    /// Creates the backup directory, refuses one inside `data_dir` (a
    /// backup there would be part of the database it copies), and removes
    /// what an interrupted backup left in it. Before the server opens its
    /// database, so a bad directory stops the start with nothing running.
    pub(crate) fn prepare(&self, data_dir: &Path) -> Result<(), String> {
        let inside = std::fs::create_dir_all(&self.dir)
            .and_then(|()| Ok(self.dir.canonicalize()?.starts_with(data_dir.canonicalize()?)))
            .map_err(|e| format!("cannot use the backup directory {}: {e}", self.dir.display()))?;
        if inside {
            return Err(format!(
                "--backup-dir {} must not be inside --data-dir {}",
                self.dir.display(),
                data_dir.display()
            ));
        }
        remove_staging_leftovers(&self.dir);
        Ok(())
    }
}

impl Backups {
    /// Starts the thread (after [`BackupConfig::prepare`]); it stops once
    /// `stop` is set.
    pub fn start(engine: Arc<Engine>, config: BackupConfig, stop: Arc<AtomicBool>) -> std::io::Result<Backups> {
        let counters = Arc::new(Counters::default());
        let theirs = counters.clone();
        let thread = std::thread::Builder::new()
            .name("queueber-backup".into())
            .spawn(move || run(&engine, &config, &stop, &theirs))?;
        Ok(Backups {
            counters,
            thread: Some(thread),
        })
    }

    pub fn figures(&self) -> BackupFigures {
        self.counters.figures()
    }

    /// A reader of the figures that outlives `self` (the metrics endpoint's).
    pub(crate) fn reader(&self) -> BackupReader {
        BackupReader(self.counters.clone())
    }

    /// Waits for the thread (after the stop flag is set): a backup being
    /// written is finished first, so the database closes cleanly.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads the figures of a [`Backups`].
#[derive(Debug, Clone)]
pub(crate) struct BackupReader(Arc<Counters>);

impl BackupReader {
    pub(crate) fn figures(&self) -> BackupFigures {
        self.0.figures()
    }
}

fn run(engine: &Engine, config: &BackupConfig, stop: &AtomicBool, counters: &Counters) {
    let mut next = config.every.map(|every| Instant::now() + every);
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(POLL);
        let asked = config.now.swap(false, Ordering::AcqRel);
        let due = next.is_some_and(|at| Instant::now() >= at);
        if !(asked || due) {
            continue;
        }
        if take_one(engine, config) {
            counters.written.fetch_add(1, Ordering::Relaxed);
            counters
                .last_written_ms
                .store(epoch_ms(SystemTime::now()), Ordering::Relaxed);
        } else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
        }
        next = config.every.map(|every| Instant::now() + every);
    }
}

/// Writes one backup and prunes old ones; whether it was written.
fn take_one(engine: &Engine, config: &BackupConfig) -> bool {
    // A checkpoint flushes the memtables into the data filesystem; with
    // that below its floor the flush could fail, and a failed flush stops
    // RocksDB's writes until a restart.
    if engine.disk().is_full() {
        tracing::warn!("backup skipped: the data directory's disk is below --min-free-disk-mib");
        return false;
    }
    let started = Instant::now();
    let path = unused_path(&config.dir, SystemTime::now());
    let written = engine
        .checkpoint(&path)
        .map_err(|e| e.to_string())
        .and_then(|()| sync_dir(&config.dir).map_err(|e| format!("sync {}: {e}", config.dir.display())));
    match written {
        Ok(()) => {
            tracing::info!(
                path = %path.display(),
                took_ms = started.elapsed().as_millis() as u64,
                "backup written"
            );
            prune(&config.dir, config.keep);
            true
        }
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "backup failed");
            // Neither a half-written backup nor a complete one whose
            // directory entry may not be durable is left to be restored.
            let _ = std::fs::remove_dir_all(staging(&path));
            let _ = std::fs::remove_dir_all(&path);
            false
        }
    }
}

/// `queueber-backup-<UTC time to the millisecond>` in `dir`, with a counter
/// appended in the unlikely case that it exists.
fn unused_path(dir: &Path, at: SystemTime) -> PathBuf {
    let name = format!("{BACKUP_PREFIX}{}", utc_stamp(epoch_ms(at)));
    let mut path = dir.join(&name);
    let mut n = 1;
    while path.exists() || staging(&path).exists() {
        path = dir.join(format!("{name}-{n}"));
        n += 1;
    }
    path
}

fn staging(path: &Path) -> PathBuf {
    let mut staged = path.as_os_str().to_owned();
    staged.push(STAGING_SUFFIX);
    PathBuf::from(staged)
}

/// The backups in `dir`, oldest first (their names sort by time).
fn backups_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(BACKUP_PREFIX) && !n.ends_with(STAGING_SUFFIX))
        })
        .collect();
    found.sort();
    found
}

/// Removes all but the newest `keep` backups (none when `keep` is 0).
fn prune(dir: &Path, keep: usize) {
    if keep == 0 {
        return;
    }
    let found = backups_in(dir);
    let excess = found.len().saturating_sub(keep);
    for old in &found[..excess] {
        match std::fs::remove_dir_all(old) {
            Ok(()) => tracing::info!(path = %old.display(), "old backup removed"),
            Err(error) => tracing::warn!(path = %old.display(), %error, "cannot remove an old backup"),
        }
    }
}

/// Removes staging directories a backup interrupted by a crash left.
fn remove_staging_leftovers(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(BACKUP_PREFIX) && name.ends_with(STAGING_SUFFIX) {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(path = %entry.path().display(), "unfinished backup removed"),
                Err(error) => {
                    tracing::warn!(path = %entry.path().display(), %error, "cannot remove an unfinished backup")
                }
            }
        }
    }
}

/// Makes the new backup's directory entry durable (RocksDB syncs the
/// backup's own files and directory, not the directory it was renamed in).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `YYYYMMDDTHHMMSS.mmmZ` (UTC): sorts as it happened, and has no
/// character a shell or a filesystem treats specially.
fn utc_stamp(epoch_ms: u64) -> String {
    let secs = epoch_ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        epoch_ms % 1000
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_dates_that_sort_in_time_order() {
        assert_eq!(utc_stamp(0), "19700101T000000.000Z");
        // 2000-02-29 (a leap day of a century leap year), 23:59:59.999.
        assert_eq!(utc_stamp(951_868_799_999), "20000229T235959.999Z");
        assert_eq!(utc_stamp(951_868_800_000), "20000301T000000.000Z");
        // 2026-11-27 07:19:08.250.
        assert_eq!(utc_stamp(1_795_763_948_250), "20261127T071908.250Z");
        let mut stamps: Vec<(u64, String)> = [5_000_000_000_000u64, 1, 1_795_763_948_250, 999]
            .into_iter()
            .map(|ms| (ms, utc_stamp(ms)))
            .collect();
        stamps.sort_by(|a, b| a.1.cmp(&b.1));
        assert!(stamps.windows(2).all(|w| w[0].0 < w[1].0), "{stamps:?}");
    }

    #[test]
    fn pruning_keeps_the_newest_and_touches_nothing_else() {
        let dir = tempfile::tempdir().expect("a temp dir");
        for name in [
            "queueber-backup-20261127T000000.000Z",
            "queueber-backup-20261127T000001.000Z",
            "queueber-backup-20261127T000002.000Z",
            "queueber-backup-20261127T000003.000Z.tmp",
            "unrelated",
        ] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
        }
        std::fs::write(dir.path().join("queueber-backup-a-file"), b"x").expect("a file");
        prune(dir.path(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "queueber-backup-20261127T000001.000Z",
                "queueber-backup-20261127T000002.000Z",
                "queueber-backup-20261127T000003.000Z.tmp",
                "queueber-backup-a-file",
                "unrelated",
            ]
        );
        remove_staging_leftovers(dir.path());
        assert!(!dir.path().join("queueber-backup-20261127T000003.000Z.tmp").exists());
        assert!(dir.path().join("unrelated").exists());
        // keep 0: every backup stays.
        prune(dir.path(), 0);
        assert_eq!(backups_in(dir.path()).len(), 2);
    }

    #[test]
    fn a_taken_name_gets_a_counter() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let at = UNIX_EPOCH + Duration::from_millis(1_795_763_948_250);
        let first = unused_path(dir.path(), at);
        assert_eq!(
            first.file_name().and_then(|n| n.to_str()),
            Some("queueber-backup-20261127T071908.250Z")
        );
        std::fs::create_dir(&first).expect("mkdir");
        let second = unused_path(dir.path(), at);
        assert_eq!(
            second.file_name().and_then(|n| n.to_str()),
            Some("queueber-backup-20261127T071908.250Z-1")
        );
        // A staging directory of that name counts as taken too.
        std::fs::create_dir(staging(&second)).expect("mkdir");
        assert_eq!(
            unused_path(dir.path(), at).file_name().and_then(|n| n.to_str()),
            Some("queueber-backup-20261127T071908.250Z-2")
        );
    }
}
