//! Online backups (`--backup-dir`): a backup holds exactly what was
//! acknowledged before it was asked for and nothing acknowledged after it
//! was written, a server opens a copy of it as its data directory, only the
//! newest are kept, and SIGUSR1 asks `queueberd` for one.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daemon::DaemonSpec;
use queueber::names::QueueName;
use queueber::server::{self, backup::BackupConfig, ServerHandle};
use queueber::types::NewMessage;

/// The backups in `dir`, oldest first.
fn backups(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("the backup directory")
        .map(|e| e.expect("an entry").path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("queueber-backup-") && !n.ends_with(".tmp"))
        })
        .collect();
    found.sort();
    found
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asks for one backup and waits until it is written.
fn back_up(server: &ServerHandle, now: &AtomicBool) {
    let before = server.backup_figures().expect("backups on");
    now.store(true, Ordering::SeqCst);
    wait_until("the backup", || {
        let figures = server.backup_figures().expect("backups on");
        assert_eq!(figures.failed, before.failed, "a backup failed");
        figures.written > before.written
    });
}

/// A checkpoint is one flat directory of files.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read the backup") {
        let entry = entry.expect("an entry");
        assert!(entry.file_type().expect("a type").is_file(), "{:?}", entry.path());
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

fn with_backups(data: &Path, dir: &Path, keep: usize, shards: usize) -> (ServerHandle, Arc<AtomicBool>) {
    let now = Arc::new(AtomicBool::new(false));
    let mut config = common::config(data, shards);
    config.backup = Some(BackupConfig {
        dir: dir.to_path_buf(),
        every: None,
        keep,
        now: now.clone(),
    });
    (server::start(config).expect("server starts"), now)
}

fn payloads(prefix: &str, range: std::ops::Range<usize>) -> Vec<NewMessage> {
    range.map(|i| NewMessage::new(format!("{prefix}-{i}"))).collect()
}

#[test]
fn a_backup_holds_what_was_acknowledged_before_it_and_opens_as_a_data_dir() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("backups"));
    let (server, now) = with_backups(&data, &dir, 3, 2);
    // One queue on each shard: the backup is of the whole database.
    let queues = [common::queue_on_shard("b", 0, 2), common::queue_on_shard("b", 1, 2)];

    // Before the backup: 10 added, the first 4 leased for 10 minutes, 2 of
    // those removed. So 6 visible and 2 in flight.
    let qs = queues.clone();
    common::with_client(server.local_addr(), move |c| async move {
        for q in &qs {
            c.add(q, payloads("before", 0..10)).await.expect("add");
            let lease = c.poll(q, 4, 600_000, 0).await.expect("poll").expect("leased");
            let ids = lease.messages[..2].iter().map(|d| d.id).collect();
            assert_eq!(c.remove(q, lease.id, ids).await.expect("remove"), [true, true]);
        }
    });
    back_up(&server, &now);

    // After it: more added, and everything visible leased and removed.
    let qs = queues.clone();
    common::with_client(server.local_addr(), move |c| async move {
        for q in &qs {
            c.add(q, payloads("after", 0..5)).await.expect("add");
            let lease = c.poll(q, 100, 600_000, 0).await.expect("poll").expect("leased");
            assert_eq!(lease.messages.len(), 11);
            let ids: Vec<_> = lease.messages.iter().map(|d| d.id).collect();
            c.remove(q, lease.id, ids).await.expect("remove");
            assert_eq!(c.stats(q).await.expect("stats").visible, 0);
        }
    });
    common::stop(server);

    let taken = backups(&dir);
    assert_eq!(taken.len(), 1, "{taken:?}");
    let restored = tmp.path().join("restored");
    copy_dir(&taken[0], &restored);
    let server = common::start(&restored, 2);
    let qs = queues.clone();
    let seen: Vec<(u64, u64, Vec<String>)> = common::with_client(server.local_addr(), move |c| async move {
        let mut seen = Vec::new();
        for q in &qs {
            let stats = c.stats(q).await.expect("stats");
            let lease = c.poll(q, 100, 30_000, 0).await.expect("poll").expect("leased");
            let texts = lease
                .messages
                .iter()
                .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
                .collect();
            seen.push((stats.visible, stats.in_flight, texts));
        }
        seen
    });
    common::stop(server);
    let expected: Vec<String> = (4..10).map(|i| format!("before-{i}")).collect();
    for (q, (visible, in_flight, texts)) in queues.iter().zip(seen) {
        assert_eq!((visible, in_flight), (6, 2), "{q}");
        assert_eq!(texts, expected, "{q}");
    }
}

#[test]
fn only_the_newest_backups_are_kept() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("backups"));
    let (server, now) = with_backups(&data, &dir, 2, 1);
    let q = QueueName::new("test", "kept").expect("a name");
    let mut names = Vec::new();
    for round in 0..3 {
        let queue = q.clone();
        common::with_client(server.local_addr(), move |c| async move {
            c.add(&queue, payloads("m", round..round + 1)).await.expect("add");
        });
        back_up(&server, &now);
        names.push(backups(&dir).last().cloned().expect("a backup"));
    }
    let figures = server.backup_figures().expect("backups on");
    common::stop(server);
    assert_eq!((figures.written, figures.failed), (3, 0));
    assert!(figures.last_written_ms > 0);
    // The first was removed; the two newest are left, each its own.
    assert_eq!(backups(&dir), names[1..]);
    for (kept, messages) in names[1..].iter().zip([2, 3]) {
        let restored = tmp.path().join(format!("restored-{messages}"));
        copy_dir(kept, &restored);
        let server = common::start(&restored, 1);
        let queue = q.clone();
        let visible = common::with_client(server.local_addr(), move |c| async move {
            c.stats(&queue).await.expect("stats").visible
        });
        common::stop(server);
        assert_eq!(visible, messages, "{kept:?}");
    }
}

#[test]
fn sigusr1_asks_queueberd_for_a_backup_and_never_stops_it() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("backups"));
    std::fs::create_dir_all(&data).expect("mkdir");
    let mut daemon = DaemonSpec::new(&data, "wal")
        .arg("--backup-dir")
        .arg(dir.to_str().expect("utf-8"))
        .start();
    let signal = |pid: i32, sig: i32| {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    };
    signal(daemon.pid(), libc::SIGUSR1);
    wait_until("a backup after SIGUSR1", || backups(&dir).len() == 1);
    wait_until("its log line", || daemon.log_text().contains("backup written"));
    daemon.terminate();

    // Without --backup-dir, SIGUSR1 is ignored, and so is SIGHUP without
    // anything to reload: neither ends the server.
    let mut plain = DaemonSpec::new(&data, "wal").start();
    signal(plain.pid(), libc::SIGUSR1);
    signal(plain.pid(), libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(daemon::listening(plain.addr), "{}", plain.log_text());
    plain.terminate();
}

#[test]
fn a_backup_dir_inside_the_data_dir_or_an_interval_without_one_is_refused() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    let inside = data.join("backups");
    for args in [
        vec!["--backup-dir", inside.to_str().expect("utf-8")],
        vec!["--backup-interval-ms", "60000"],
    ] {
        let mut spec = DaemonSpec::new(&data, "wal");
        for a in &args {
            spec = spec.arg(*a);
        }
        let mut daemon = spec.spawn_only();
        let status = daemon.wait_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{args:?}: {}", daemon.log_text());
    }
    // Below a second is a command-line error (clap's status 2).
    let mut daemon = DaemonSpec::new(&data, "wal")
        .arg("--backup-dir")
        .arg(tmp.path().join("b").to_str().expect("utf-8"))
        .arg("--backup-interval-ms")
        .arg("999")
        .spawn_only();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).code(), Some(2));
}
