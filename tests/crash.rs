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
