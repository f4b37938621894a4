//! Connections move to the shard that owns their queues: a plaintext
//! connection whose requests all go to another shard's queues is handed to
//! that shard between two requests, with its unread bytes and its token,
//! and the client notices nothing (every answer arrives, in order of its
//! own requests, and its token still binds it).

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/wire.rs"]
mod wire;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use common::queue_on_shard;
use queueber::auth::{new_token, Access, Permission, Tokens};
use queueber::client::Client;
use queueber::names::QueueName;
use queueber::protocol::ErrorCode;
use queueber::types::NewMessage;

/// Requests in a row for one other shard after which a connection moves
/// (`MOVE_AFTER` in src/server/connection.rs).
const MOVE_AFTER: u64 = 16;

/// The sum over shards of one per-shard counter of `/metrics`.
fn shard_total(metrics: SocketAddr, family: &str) -> u64 {
    let mut stream = std::net::TcpStream::connect(metrics).expect("metrics endpoint");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

/// One message added, polled and removed, one request at a time.
async fn cycle(c: &Client, queue: &QueueName, payload: &[u8]) {
    c.add(queue, vec![NewMessage::new(payload.to_vec())]).await.unwrap();
    let lease = c.poll(queue, 1, 30_000, 0).await.unwrap().expect("a message");
    assert_eq!(lease.messages.len(), 1);
    assert_eq!(
        c.remove(queue, lease.id, vec![lease.messages[0].id]).await.unwrap(),
        vec![true]
    );
}

#[test]
fn connections_move_to_the_shard_that_owns_their_queue_and_back() {
    const CONNECTIONS: usize = 16;
    const CYCLES: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 2);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = queueber::server::start(config).expect("server starts");
    let metrics = server.metrics_addr().expect("a metrics endpoint");
    let (on_1, on_0) = (queue_on_shard("moving", 1, 2), queue_on_shard("moving", 0, 2));
    let (a, b) = (on_1.clone(), on_0.clone());
    common::with_clients(server.local_addr(), CONNECTIONS, move |clients| async move {
        // Each connection works shard 1's queue, one request at a time.
        futures::future::join_all(clients.iter().enumerate().map(|(i, c)| {
            let q = a.clone();
            async move {
                for n in 0..CYCLES {
                    cycle(c, &q, format!("{i}-{n}").as_bytes()).await;
                }
            }
        }))
        .await;
        let after_first = shard_total(metrics, "queueber_connections_moved_total");
        // Then shard 0's: every connection that moved to shard 1 moves back.
        futures::future::join_all(clients.iter().map(|c| {
            let q = b.clone();
            async move {
                for _ in 0..CYCLES {
                    cycle(c, &q, b"back").await;
                }
            }
        }))
        .await;
        let moved = shard_total(metrics, "queueber_connections_moved_total");
        // 16 connections land on shard 0 with probability 1 - 17/65536 or
        // so (SO_REUSEPORT hashes their ports): some moved each way, and
        // no connection moved twice per phase.
        assert!((1..=CONNECTIONS as u64).contains(&after_first), "{after_first}");
        assert!(
            moved > after_first && moved <= 2 * CONNECTIONS as u64,
            "{after_first} then {moved}"
        );
        // Without moving, about half of all 3 * 2 * 40 * 16 requests would
        // hop; with it, each connection hops at most MOVE_AFTER + 1 times a
        // phase (the request that completes the streak, and the one read
        // before the move).
        let hops = shard_total(metrics, "queueber_cross_shard_requests_total");
        assert!(
            hops <= 2 * CONNECTIONS as u64 * (MOVE_AFTER + 1),
            "{hops} cross-shard requests"
        );
        for q in [&a, &b] {
            let stats = clients[0].stats(q).await.unwrap();
            assert_eq!((stats.visible, stats.in_flight), (0, 0), "{stats:?}");
        }
    });
    common::stop(server);
}

/// A client that pipelines: answers still arrive for every request, across
/// moves that happen wherever its stream of frames has a lull, including
/// with part of a frame already read.
#[test]
fn a_pipelining_connection_loses_nothing_when_it_moves() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), 2);
    let queue = queue_on_shard("piped", 1, 2);
    let q = queue.clone();
    common::with_clients(server.local_addr(), 8, move |clients| async move {
        let ids = futures::future::join_all(clients.iter().enumerate().flat_map(|(i, c)| {
            let q = q.clone();
            (0..250).map(move |n| {
                let q = q.clone();
                async move {
                    let payload = vec![i as u8; 1 + n % 700];
                    c.add(&q, vec![NewMessage::new(payload)]).await.unwrap()
                }
            })
        }))
        .await;
        assert_eq!(ids.len(), 2_000);
        let mut drained = 0;
        while let Some(lease) = clients[0].poll(&q, 100, 30_000, 0).await.unwrap() {
            let ids: Vec<_> = lease.messages.iter().map(|m| m.id).collect();
            drained += ids.len();
            assert!(clients[0].remove(&q, lease.id, ids).await.unwrap().iter().all(|&ok| ok));
        }
        assert_eq!(drained, 2_000);
    });
    common::stop(server);
}

/// A connection bound to a token keeps it on the shard it moves to: still
/// allowed what the token allows, still refused the rest.
#[test]
fn a_moved_connection_keeps_its_token() {
    let token = new_token("test", &[Permission::Send, Permission::Consume], &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 2);
    config.access = Some(Arc::new(Access::new(Tokens::parse(&token.entry, "t").unwrap())));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = queueber::server::start(config).expect("server starts");
    let metrics = server.metrics_addr().expect("a metrics endpoint");
    let queue = queue_on_shard("bound", 1, 2);
    let secret = token.secret.clone();
    common::with_clients(server.local_addr(), 16, move |clients| async move {
        futures::future::join_all(clients.iter().map(|c| {
            let (q, secret) = (queue.clone(), secret.clone());
            async move {
                c.auth(&secret).await.unwrap();
                for _ in 0..2 * MOVE_AFTER {
                    cycle(c, &q, b"m").await;
                }
                // Still bound: its tenant's queue yes, admin and another tenant no.
                cycle(c, &q, b"after").await;
                let denied = c.stats(&q).await.unwrap_err().code();
                assert_eq!(denied, Some(ErrorCode::PermissionDenied));
                let other = QueueName::new("other", "x").unwrap();
                let denied = c
                    .add(&other, vec![NewMessage::new(b"x".to_vec())])
                    .await
                    .unwrap_err()
                    .code();
                assert_eq!(denied, Some(ErrorCode::PermissionDenied));
            }
        }))
        .await;
        assert!(shard_total(metrics, "queueber_connections_moved_total") >= 1);
    });
    common::stop(server);
}

/// A moved connection is registered for revocation on the shard it moved
/// to: a reload that removes its token closes it there even while it is
/// idle (told why, with id 0), as on the shard that accepted it.
#[test]
fn a_moved_connection_is_still_revoked_by_a_reload() {
    use std::time::{Duration, Instant};
    let keep = new_token("test", &[Permission::Send], &[]).unwrap();
    let revoke = new_token("test", &[Permission::Send], &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(&file, format!("{}{}", keep.entry, revoke.entry)).unwrap();
    let mut server = daemon::DaemonSpec::new(&dir.path().join("data"), "wal")
        .arg("--auth-file")
        .arg(file.to_str().unwrap())
        .start();
    let queue = queue_on_shard("revoked", 1, 2);
    // Eight connections: those the kernel gave shard 0 move to shard 1
    // after MOVE_AFTER adds (all eight stay on 1 with probability 1/256).
    let mut wires: Vec<wire::Wire> = (0..8).map(|_| wire::Wire::connect(server.addr)).collect();
    for w in &mut wires {
        let auth = queueber::protocol::Op::Auth(queueber::ops::Auth {
            token: revoke.secret.clone(),
        });
        assert!(w.call(1, auth).result.is_ok());
        for id in 0..MOVE_AFTER + 4 {
            assert!(w.add_one(2 + id, &queue, b"m".to_vec()).result.is_ok());
        }
    }
    std::fs::write(&file, &keep.entry).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log_text().contains("auth file reloaded") {
        assert!(Instant::now() < deadline, "no reload logged:\n{}", server.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in &mut wires {
        w.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let told = w.read_all().expect("closed, not reset, and within 10 s");
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].id, 0);
        assert_eq!(told[0].result.clone().unwrap_err().code, ErrorCode::Unauthenticated);
    }
    server.terminate();
}
