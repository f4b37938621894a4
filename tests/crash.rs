//! Crash tests: the real `queueberd` binary is killed with SIGKILL after it
//! acknowledged adds, then restarted on the same data directory. In every
//! durability mode the WAL is written before an add is acknowledged, so a
//! killed process (as opposed to a lost machine) loses nothing.

mod common;

#[path = "common/daemon.rs"]
mod daemon;

use std::collections::BTreeSet;

use common::{queue_on_shard, with_client};
use daemon::{free_port, Daemon};
use queueber::storage::NewMessage;

#[test]
fn acknowledged_adds_and_leases_survive_sigkill_in_every_mode() {
    for durability in ["fsync", "periodic", "wal"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let queues = [queue_on_shard("crash", 0, 2), queue_on_shard("crash", 1, 2)];

        let mut daemon = Daemon::start(dir.path(), port, durability);
        let qs = queues.clone();
        let (added, leased) = with_client(daemon.addr, move |c| async move {
            let mut added = BTreeSet::new();
            for round in 0..20 {
                for queue in &qs {
                    let batch = (0..10)
                        .map(|i| NewMessage::new(format!("{round}-{i}").into_bytes()))
                        .collect();
                    added.extend(c.add(queue, batch).await.unwrap());
                }
            }
            let lease = c.poll(&qs[0], 5, 600_000, 0).await.unwrap().unwrap();
            (added, lease)
        });
        daemon.kill();

        let mut daemon = Daemon::start(dir.path(), port, durability);
        let found = with_client(daemon.addr, move |c| async move {
            let mut found = BTreeSet::new();
            // The lease taken before the crash still holds its messages.
            let ids = leased.messages.iter().map(|m| m.id).collect();
            assert_eq!(c.remove(&queues[0], leased.id, ids).await.unwrap(), vec![true; 5]);
            found.extend(leased.messages.iter().map(|m| m.id));
            for queue in &queues {
                while let Some(lease) = c.poll(queue, 100, 60_000, 0).await.unwrap() {
                    found.extend(lease.messages.iter().map(|m| m.id));
                }
            }
            found
        });
        assert_eq!(
            found, added,
            "{durability}: acknowledged adds lost or invented after SIGKILL"
        );
        daemon.terminate();
    }
}

/// A bounded queue's policy and what it holds (messages and payload bytes,
/// which its bounds are checked against) come back exactly after SIGKILL:
/// the room left before the kill is the room left after it.
#[test]
fn policies_and_queue_bounds_survive_sigkill_in_every_mode() {
    use queueber::protocol::ErrorCode;
    use queueber::types::{QueuePolicy, RetryBackoff};

    for durability in ["fsync", "periodic", "wal"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let queue = queue_on_shard("bounded", 1, 2);
        let policy = QueuePolicy {
            max_depth: Some(50),
            max_bytes: Some(4_000),
            lease_ms: Some(600_000),
            retry_backoff_ms: Some(RetryBackoff::new(&[1_000, 2_000]).unwrap()),
            ..QueuePolicy::default()
        };

        let mut daemon = Daemon::start(dir.path(), port, durability);
        let q = queue.clone();
        with_client(daemon.addr, move |c| async move {
            c.create_queue(&q, policy).await.unwrap();
            // 30 messages of 100 bytes: 3,000 of 4,000 bytes.
            for _ in 0..3 {
                let batch = (0..10).map(|_| NewMessage::new(vec![7u8; 100])).collect();
                c.add(&q, batch).await.unwrap();
            }
            // 5 removed (500 bytes back), 5 more in flight (still held).
            let lease = c.poll(&q, 10, 0, 0).await.unwrap().unwrap();
            let done: Vec<_> = lease.messages[..5].iter().map(|m| m.id).collect();
            assert_eq!(c.remove(&q, lease.id, done).await.unwrap(), vec![true; 5]);
        });
        daemon.kill();

        let mut daemon = Daemon::start(dir.path(), port, durability);
        let q = queue.clone();
        with_client(daemon.addr, move |c| async move {
            let info = c.get_policy(&q).await.unwrap();
            assert_eq!((info.version, info.policy), (1, policy), "{durability}");
            // 25 messages, 2,500 bytes held: 1,500 bytes of room, no more.
            let stats = c.stats(&q).await.unwrap();
            assert_eq!(stats.visible + stats.in_flight, 25, "{durability}: {stats:?}");
            let over = (0..16).map(|_| NewMessage::new(vec![1u8; 100])).collect();
            let full = c.add(&q, over).await.unwrap_err();
            assert_eq!(full.code(), Some(ErrorCode::QueueFull), "{durability}: {full}");
            let fits = (0..15).map(|_| NewMessage::new(vec![1u8; 100])).collect();
            c.add(&q, fits).await.unwrap();
        });
        daemon.terminate();
    }
}

/// SIGKILL in the middle of a stream of deliveries that dead-letter (their
/// leases run out, or workers reject them) and removes: after a restart
/// every acknowledged message is in exactly one place, removed, dead, or
/// back in the queue, in every durability mode.
#[test]
fn dead_lettering_survives_sigkill_with_every_message_in_one_place() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use queueber::types::QueuePolicy;

    for durability in ["fsync", "periodic", "wal"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let queue = queue_on_shard("poison", 0, 2);
        let mut daemon = Daemon::start(dir.path(), port, durability);
        let added = Arc::new(Mutex::new(BTreeSet::new()));
        let removed = Arc::new(Mutex::new(BTreeSet::new()));
        let unanswered = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (q, added, removed, unanswered, stop, addr) = (
                queue.clone(),
                added.clone(),
                removed.clone(),
                unanswered.clone(),
                stop.clone(),
                daemon.addr,
            );
            std::thread::spawn(move || {
                with_client(addr, move |c| async move {
                    let policy = QueuePolicy {
                        max_deliveries: Some(1),
                        ..QueuePolicy::default()
                    };
                    c.create_queue(&q, policy).await.unwrap();
                    let mut round = 0u32;
                    while !stop.load(Ordering::SeqCst) {
                        round += 1;
                        let batch = (0..20)
                            .map(|i| NewMessage::new(format!("{round}-{i}").into_bytes()))
                            .collect();
                        let Ok(ids) = c.add(&q, batch).await else { break };
                        added.lock().unwrap().extend(ids);
                        // Leases of 30 ms that run out (one delivery: dead),
                        // rejections, and removes, all in flight at once.
                        let Ok(Some(lease)) = c.poll(&q, 20, 30, 0).await else {
                            break;
                        };
                        for (i, m) in lease.messages.iter().enumerate() {
                            let done = match i % 3 {
                                0 => c.remove(&q, lease.id, vec![m.id]).await.map(|r| r == vec![true]),
                                1 => c.fail(&q, lease.id, m.id, "bad input", true).await,
                                _ => continue,
                            };
                            match done {
                                Ok(true) if i % 3 == 0 => {
                                    removed.lock().unwrap().insert(m.id);
                                }
                                Ok(_) => {}
                                Err(_) => {
                                    // The kill cut the answer off: the
                                    // remove may or may not have happened.
                                    if i % 3 == 0 {
                                        unanswered.lock().unwrap().insert(m.id);
                                    }
                                    return;
                                }
                            }
                        }
                    }
                })
            })
        };
        std::thread::sleep(Duration::from_millis(400));
        daemon.kill();
        stop.store(true, Ordering::SeqCst);
        let _ = worker.join();

        let mut daemon = Daemon::start(dir.path(), port, durability);
        let q = queue.clone();
        let (dead, live) = with_client(daemon.addr, move |c| async move {
            // Leases from before the kill run out now: their messages die.
            glommio::timer::sleep(Duration::from_millis(100)).await;
            let (mut dead, mut cursor) = (Vec::new(), None);
            loop {
                let page = c.peek_dead(&q, 1000, cursor).await.unwrap();
                dead.extend(page.dead.iter().map(|d| d.id));
                cursor = page.cursor;
                if cursor.is_none() {
                    break;
                }
            }
            let mut live = Vec::new();
            while let Some(lease) = c.poll(&q, 1000, 600_000, 0).await.unwrap() {
                live.extend(lease.messages.iter().map(|m| m.id));
            }
            (dead, live)
        });
        let (added, removed) = (added.lock().unwrap().clone(), removed.lock().unwrap().clone());
        let dead_set: BTreeSet<_> = dead.iter().copied().collect();
        let live_set: BTreeSet<_> = live.iter().copied().collect();
        assert_eq!(dead_set.len(), dead.len(), "{durability}: a message dead twice");
        assert!(dead_set.is_disjoint(&live_set), "{durability}: dead and visible");
        assert!(
            removed.is_disjoint(&dead_set) && removed.is_disjoint(&live_set),
            "{durability}: removed yet kept"
        );
        let unanswered = unanswered.lock().unwrap().clone();
        let everywhere: BTreeSet<_> = dead_set
            .union(&live_set)
            .chain(removed.iter())
            .chain(unanswered.iter())
            .copied()
            .collect();
        let missing: Vec<_> = added.difference(&everywhere).collect();
        assert!(
            missing.is_empty(),
            "{durability}: acknowledged adds lost: {} of {} (dead {}, live {}, removed {}): {:?}",
            missing.len(),
            added.len(),
            dead_set.len(),
            live_set.len(),
            removed.len(),
            &missing[..missing.len().min(5)]
        );
        assert!(
            !dead_set.is_empty(),
            "{durability}: nothing was dead-lettered before the kill"
        );
        daemon.terminate();
    }
}

/// SIGKILL while retention drops messages (visible ones, and leased ones
/// as their leases end) and workers remove others: after a restart the
/// queue's index and counts still agree, so everything left is dropped on
/// time, and every acknowledged add is accounted for as removed or dropped,
/// in every durability mode.
#[test]
fn retention_survives_sigkill_with_every_message_accounted_for() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use queueber::types::QueuePolicy;

    for durability in ["fsync", "periodic", "wal"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let queue = queue_on_shard("expiring", 0, 2);
        let mut daemon = Daemon::start(dir.path(), port, durability);
        let added = Arc::new(Mutex::new(BTreeSet::new()));
        let removed = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (q, added, removed, stop, addr) =
                (queue.clone(), added.clone(), removed.clone(), stop.clone(), daemon.addr);
            std::thread::spawn(move || {
                with_client(addr, move |c| async move {
                    let policy = QueuePolicy {
                        retention_ms: Some(150),
                        ..QueuePolicy::default()
                    };
                    c.create_queue(&q, policy).await.unwrap();
                    let mut round = 0u32;
                    while !stop.load(Ordering::SeqCst) {
                        round += 1;
                        let batch = (0..20)
                            .map(|i| NewMessage::new(format!("{round}-{i}").into_bytes()))
                            .collect();
                        let Ok(ids) = c.add(&q, batch).await else { break };
                        added.lock().unwrap().extend(ids);
                        // Half of what is polled is removed; the rest is
                        // held past the retention (dropped as its lease
                        // ends); the unpolled half is dropped where it lies.
                        let Ok(Some(lease)) = c.poll(&q, 10, 400, 0).await else {
                            continue;
                        };
                        let ids: Vec<_> = lease.messages.iter().step_by(2).map(|m| m.id).collect();
                        let Ok(done) = c.remove(&q, lease.id, ids.clone()).await else {
                            // The kill cut the answer off: these may be
                            // removed or not.
                            removed.lock().unwrap().extend(ids);
                            break;
                        };
                        let mut removed = removed.lock().unwrap();
                        removed.extend(ids.iter().zip(done).filter(|(_, ok)| *ok).map(|(id, _)| *id));
                    }
                })
            })
        };
        std::thread::sleep(Duration::from_millis(500));
        daemon.kill();
        stop.store(true, Ordering::SeqCst);
        let _ = worker.join();

        let mut daemon = Daemon::start(dir.path(), port, durability);
        let q = queue.clone();
        let stats = with_client(daemon.addr, move |c| async move {
            // Every lease from before the kill ends within 400 ms, every
            // message is past 150 ms: the sweeper drops all that is left.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let s = c.stats(&q).await.unwrap();
                if s.visible + s.delayed + s.in_flight + s.dead == 0 || Instant::now() > deadline {
                    return s;
                }
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        });
        let (added, removed) = (added.lock().unwrap().len() as u64, removed.lock().unwrap().len() as u64);
        assert_eq!(
            (stats.visible, stats.delayed, stats.in_flight, stats.dead),
            (0, 0, 0, 0),
            "{durability}: left undropped"
        );
        // Adds whose answer the kill cut off may be stored too, and removes
        // whose answer it cut off count as removed: at least.
        assert!(
            stats.dropped + removed >= added,
            "{durability}: {added} added, {removed} removed, {} dropped",
            stats.dropped
        );
        assert!(stats.dropped > 0, "{durability}: nothing was dropped");
        daemon.terminate();
    }
}
