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
