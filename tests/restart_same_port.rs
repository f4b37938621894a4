//! A server stopped and started again on the same port at once serves the
//! first connection it gets (2 shards, so the port has an SO_REUSEPORT
//! group). A stopping shard used to leave its listening socket to the
//! kernel's io_uring teardown, which runs after the process exits: for a few
//! milliseconds the dead listener stayed in the port's group, and a client
//! of the new server could land in its backlog and be reset. Without the
//! fix (`accept::Listener::stop_listening`) this failed within about five
//! restarts.

#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/wire.rs"]
mod wire;

use daemon::{free_port, DaemonSpec};
use queueber::names::QueueName;
use queueber::ops;
use queueber::protocol::{Op, Reply};
use queueber::storage::NewMessage;
use wire::Wire;

#[test]
fn a_server_restarted_on_the_same_port_serves_its_first_connection() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("the data directory");
    let port = free_port();
    let queue = QueueName::new("restart", "q").expect("a valid name");
    let mut added = 0u64;
    for round in 0..30u64 {
        let mut server = DaemonSpec {
            port,
            ..DaemonSpec::new(&data, "periodic")
        }
        .start();
        let mut w = Wire::connect(server.addr);
        for i in 0..20u64 {
            let add = Op::Add(ops::Add {
                queue: queue.clone(),
                messages: vec![NewMessage::new(vec![7u8; 100])],
            });
            match w.call(round * 100 + i, add).result {
                Ok(Reply::Added(ids)) => added += ids.len() as u64,
                other => panic!("round {round}, add {i}: {other:?}"),
            }
        }
        match w.call(99, Op::Stats(ops::Stats { queue: queue.clone() })).result {
            Ok(Reply::Stats(s)) => assert_eq!(s.visible, added, "round {round}: every add is there"),
            other => panic!("round {round}: {other:?}"),
        }
        drop(w);
        server.terminate();
    }
}
