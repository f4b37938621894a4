//! Integration tests: a real server over TCP, through the client library.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{queue_on_shard, start, start_with_limits, with_client, with_clients};
use queueber::client::ClientError;
use queueber::ids::{LeaseId, MessageId};
use queueber::names::QueueName;
use queueber::protocol::ErrorCode;
use queueber::server::ServerLimits;
use queueber::storage::NewMessage;

fn q(name: &str) -> QueueName {
    QueueName::new("test", name).unwrap()
}

fn msgs(n: usize, prefix: &str) -> Vec<NewMessage> {
    (0..n)
        .map(|i| NewMessage::new(format!("{prefix}{i}").into_bytes()))
        .collect()
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[test]
fn every_operation_and_error_path() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2);
    with_client(server.local_addr(), |c| async move {
        let info = c.hello().await.unwrap();
        assert_eq!(info.shards, 2);
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.limits.max_payload_bytes, 256 * 1024);

        let a = q("ops");
        let ids = c.add(&a, msgs(3, "m")).await.unwrap();
        assert_eq!(ids.len(), 3);
        c.add(&a, vec![NewMessage::delayed(b"later".to_vec(), 60_000)])
            .await
            .unwrap();
        let s = c.stats(&a).await.unwrap();
        assert_eq!((s.visible, s.delayed, s.in_flight), (3, 1, 0));
        assert!(s.oldest_visible_age_ms.is_some());

        let lease = c.poll(&a, 2, 30_000, 0).await.unwrap().unwrap();
        assert_eq!(lease.messages.len(), 2);
        assert_eq!(lease.messages[0].id, ids[0]);
        assert_eq!(lease.messages[0].payload, &b"m0"[..]);
        assert_eq!(lease.messages[0].delivery_count, 1);
        let flags = c
            .remove(&a, lease.id, vec![ids[0], ids[2], MessageId([7; 16])])
            .await
            .unwrap();
        assert_eq!(flags, vec![true, false, false]);
        assert_eq!(c.remove(&a, LeaseId([1; 16]), vec![ids[1]]).await.unwrap(), vec![false]);
        let extended = c.extend(&a, lease.id, 60_000).await.unwrap();
        assert!(extended.unwrap() > lease.expires_at_ms);
        assert_eq!(c.extend(&a, LeaseId([1; 16]), 1_000).await.unwrap(), None);
        assert!(!c.release(&a, LeaseId([1; 16]), ids[1], 0).await.unwrap());
        assert!(c.release(&a, lease.id, ids[1], 0).await.unwrap());
        let again = c.poll(&a, 10, 30_000, 0).await.unwrap().unwrap();
        let got: Vec<_> = again.messages.iter().map(|m| (m.id, m.delivery_count)).collect();
        // The released message is visible from the release time, after m2.
        assert_eq!(got, vec![(ids[2], 1), (ids[1], 2)]);

        assert_eq!(c.list_queues().await.unwrap(), vec![a.clone()]);
        assert_eq!(c.purge(&a).await.unwrap(), 3);
        assert_eq!(c.poll(&a, 1, 1_000, 0).await.unwrap(), None);
        c.delete(&a).await.unwrap();
        assert!(c.list_queues().await.unwrap().is_empty());

        // Error paths, each a typed error on a connection that keeps working.
        assert_eq!(code(c.stats(&a).await), ErrorCode::UnknownQueue);
        assert_eq!(code(c.poll(&q("nope"), 1, 1_000, 0).await), ErrorCode::UnknownQueue);
        assert_eq!(code(c.delete(&q("nope")).await), ErrorCode::UnknownQueue);
        // No lease named: the queue's policy (here the server's default).
        let defaulted = c.poll(&q("nope"), 1, 0, 0).await;
        assert_eq!(code(defaulted), ErrorCode::UnknownQueue);
        assert_eq!(code(c.extend(&a, lease.id, 0).await), ErrorCode::InvalidArgument);
        assert_eq!(code(c.add(&a, vec![]).await), ErrorCode::InvalidArgument);
        assert_eq!(code(c.remove(&a, lease.id, vec![]).await), ErrorCode::InvalidArgument);
        let big = vec![NewMessage::new(vec![0u8; 256 * 1024 + 1])];
        let err = c.add(&a, big).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::PayloadTooLarge));
        assert!(err.to_string().contains("max-payload-bytes"), "{err}");
        assert_eq!(code(c.add(&a, msgs(4097, "x")).await), ErrorCode::TooManyMessages);
        // Out-of-range durations are clamped, never overflowed.
        c.add(&a, vec![NewMessage::delayed(b"far".to_vec(), u64::MAX)])
            .await
            .unwrap();
        assert_eq!(c.stats(&a).await.unwrap().delayed, 1);
        c.add(&a, msgs(1, "n")).await.unwrap();
        let l = c.poll(&a, 0, u64::MAX, 0).await.unwrap().unwrap();
        assert_eq!(l.messages.len(), 1, "maxItems 0 means 1");
        assert!(c.hello().await.is_ok());
    });
    common::stop(server);
}

#[test]
fn a_second_server_cannot_take_a_busy_port() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let server = start(a.path(), 1);
    let mut config = common::config(b.path(), 1);
    config.listen = server.local_addr();
    let err = queueber::server::start(config).err().expect("the port is taken");
    assert!(err.to_string().contains("already in use"), "{err}");
    with_client(server.local_addr(), |c| async move { c.hello().await.unwrap() });
    common::stop(server);
}

#[test]
fn invalid_names_are_rejected_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1);
    let reply = raw::exchange(server.local_addr(), &raw::stats_frame(7, "bad name"));
    assert_eq!(reply, Some((7, Some(ErrorCode::InvalidName))));
    common::stop(server);
}

#[test]
fn one_connection_reaches_queues_on_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2);
    let (on0, on1) = (queue_on_shard("route", 0, 2), queue_on_shard("route", 1, 2));
    with_client(server.local_addr(), move |c| async move {
        for (i, queue) in [&on0, &on1].into_iter().enumerate() {
            c.add(queue, msgs(5, &format!("s{i}-"))).await.unwrap();
        }
        for (i, queue) in [&on0, &on1].into_iter().enumerate() {
            let lease = c.poll(queue, 10, 30_000, 0).await.unwrap().unwrap();
            let payloads: Vec<_> = lease
                .messages
                .iter()
                .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
                .collect();
            assert_eq!(payloads, (0..5).map(|n| format!("s{i}-{n}")).collect::<Vec<_>>());
            let ids = lease.messages.iter().map(|m| m.id).collect();
            assert!(c.remove(queue, lease.id, ids).await.unwrap().into_iter().all(|ok| ok));
            assert_eq!(c.stats(queue).await.unwrap().in_flight, 0);
        }
        let mut listed = c.list_queues().await.unwrap();
        listed.sort();
        let mut want = vec![on0.clone(), on1.clone()];
        want.sort();
        assert_eq!(listed, want);
    });
    common::stop(server);
}

#[test]
fn concurrent_consumers_never_share_a_message() {
    consumers_never_share_a_message(false);
}

/// Pinned, each shard's executor hands its CPU to its storage thread while
/// a batch runs (`--offload-yield-us`) instead of parking: the same
/// guarantees through that path.
#[test]
fn concurrent_consumers_never_share_a_message_on_pinned_shards() {
    consumers_never_share_a_message(true);
}

fn consumers_never_share_a_message(pinned: bool) {
    const MESSAGES: usize = 3_000;
    const CONSUMERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 2);
    config.pin = pinned;
    let server = queueber::server::start(config).expect("server starts");
    let queue = q("contended");
    let delivered = with_clients(server.local_addr(), CONSUMERS + 1, move |clients| async move {
        let producer = clients[0].clone();
        for chunk in 0..(MESSAGES / 100) {
            producer.add(&queue, msgs(100, &format!("c{chunk}-"))).await.unwrap();
        }
        let consumers = clients[1..].iter().cloned().map(|c| {
            let queue = queue.clone();
            async move {
                let mut seen = Vec::new();
                while let Some(lease) = c.poll(&queue, 7, 60_000, 0).await.unwrap() {
                    let ids: Vec<_> = lease.messages.iter().map(|m| m.id).collect();
                    let flags = c.remove(&queue, lease.id, ids.clone()).await.unwrap();
                    assert!(flags.iter().all(|&ok| ok), "a fresh lease must hold its messages");
                    seen.extend(ids);
                }
                seen
            }
        });
        futures::future::join_all(consumers).await
    });
    let all: Vec<_> = delivered.into_iter().flatten().collect();
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "a message was delivered to two leases");
    assert_eq!(all.len(), MESSAGES);
    common::stop(server);
}

#[test]
fn long_polls_wake_on_add_and_on_due_delays_but_not_for_other_queues() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2);
    let (a, b) = (queue_on_shard("lp", 0, 2), queue_on_shard("lp", 1, 2));
    with_clients(server.local_addr(), 2, move |clients| async move {
        let (waiter, producer) = (clients[0].clone(), clients[1].clone());
        // Create both queues empty-handed: add then drain.
        for queue in [&a, &b] {
            producer.add(queue, msgs(1, "seed")).await.unwrap();
            let l = producer.poll(queue, 1, 60_000, 0).await.unwrap().unwrap();
            producer.remove(queue, l.id, vec![l.messages[0].id]).await.unwrap();
        }

        // 1. An add wakes a waiting poll promptly.
        let started = Instant::now();
        let wait = waiter.poll(&a, 1, 30_000, 10_000);
        let add = async {
            glommio::timer::sleep(Duration::from_millis(100)).await;
            producer.add(&a, msgs(1, "wake")).await.unwrap();
        };
        let (got, ()) = futures::join!(wait, add);
        let got = got.unwrap().expect("woken by the add");
        assert_eq!(got.messages[0].payload, &b"wake0"[..]);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );

        // 2. A delayed message coming due wakes it (no add needed).
        producer
            .add(&b, vec![NewMessage::delayed(b"due".to_vec(), 300)])
            .await
            .unwrap();
        let started = Instant::now();
        let got = waiter
            .poll(&b, 1, 30_000, 10_000)
            .await
            .unwrap()
            .expect("woken by the due delay");
        assert_eq!(got.messages[0].payload, &b"due"[..]);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
            "{waited:?}"
        );

        // 3. An add to another queue does not wake it; it times out empty.
        let started = Instant::now();
        let wait = waiter.poll(&a, 1, 30_000, 600);
        let add = async {
            glommio::timer::sleep(Duration::from_millis(50)).await;
            producer.add(&b, msgs(3, "other")).await.unwrap();
        };
        let (got, ()) = futures::join!(wait, add);
        assert_eq!(got.unwrap(), None);
        assert!(
            started.elapsed() >= Duration::from_millis(550),
            "{:?}",
            started.elapsed()
        );
    });
    common::stop(server);
}

#[test]
fn one_add_wakes_as_many_waiters_as_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1);
    let queue = q("fanout");
    with_clients(server.local_addr(), 4, move |clients| async move {
        clients[0].add(&queue, msgs(1, "s")).await.unwrap();
        let l = clients[0].poll(&queue, 1, 60_000, 0).await.unwrap().unwrap();
        clients[0].remove(&queue, l.id, vec![l.messages[0].id]).await.unwrap();
        let waits = clients[1..].iter().map(|c| c.poll(&queue, 1, 60_000, 1_500));
        let add = async {
            glommio::timer::sleep(Duration::from_millis(100)).await;
            clients[0].add(&queue, msgs(2, "w")).await.unwrap();
        };
        let (results, ()) = futures::join!(futures::future::join_all(waits), add);
        let got: Vec<_> = results.into_iter().map(|r| r.unwrap().is_some()).collect();
        assert_eq!(got.iter().filter(|&&g| g).count(), 2, "{got:?}");
    });
    common::stop(server);
}

#[test]
fn expiry_redelivers_extend_prevents_release_returns() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2);
    let queue = q("leases");
    with_client(server.local_addr(), move |c| async move {
        let ids = c.add(&queue, msgs(2, "l")).await.unwrap();
        let first = c.poll(&queue, 2, 300, 0).await.unwrap().unwrap();
        assert!(c.extend(&queue, first.id, 5_000).await.unwrap().is_some());
        // The second message is handed back, the first stays leased.
        assert!(c.release(&queue, first.id, ids[1], 0).await.unwrap());
        glommio::timer::sleep(Duration::from_millis(500)).await;
        let back = c.poll(&queue, 5, 300, 0).await.unwrap().unwrap();
        assert_eq!(back.messages.len(), 1, "extended message must stay leased");
        assert_eq!((back.messages[0].id, back.messages[0].delivery_count), (ids[1], 2));
        // Let this one expire: it comes back, same id, delivery count 3, and
        // a long poll is woken by the expiry.
        let started = Instant::now();
        let again = c
            .poll(&queue, 5, 300, 5_000)
            .await
            .unwrap()
            .expect("redelivered after expiry");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!((again.messages[0].id, again.messages[0].delivery_count), (ids[1], 3));
        assert_eq!(c.remove(&queue, back.id, vec![ids[1]]).await.unwrap(), vec![false]);
        assert_eq!(c.remove(&queue, first.id, vec![ids[0]]).await.unwrap(), vec![true]);
    });
    common::stop(server);
}

#[test]
fn restart_keeps_messages_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let queues = [queue_on_shard("r", 0, 2), queue_on_shard("r", 1, 2)];
    let server = start(dir.path(), 2);
    let qs = queues.clone();
    let leases = with_client(server.local_addr(), move |c| async move {
        let mut leases = Vec::new();
        for queue in &qs {
            c.add(queue, msgs(5, "keep")).await.unwrap();
            c.add(queue, vec![NewMessage::delayed(b"d".to_vec(), 60_000)])
                .await
                .unwrap();
            leases.push(c.poll(queue, 2, 120_000, 0).await.unwrap().unwrap());
        }
        leases
    });
    common::stop(server);

    let server = start(dir.path(), 2);
    with_client(server.local_addr(), move |c| async move {
        for (queue, lease) in queues.iter().zip(leases) {
            let s = c.stats(queue).await.unwrap();
            assert_eq!((s.visible, s.delayed, s.in_flight), (3, 1, 2), "{queue}");
            let ids = lease.messages.iter().map(|m| m.id).collect();
            assert_eq!(c.remove(queue, lease.id, ids).await.unwrap(), vec![true, true]);
            let rest = c.poll(queue, 10, 1_000, 0).await.unwrap().unwrap();
            assert_eq!(rest.messages.len(), 3);
        }
    });
    common::stop(server);
}

#[test]
fn thousands_of_pipelined_requests_on_one_connection() {
    // Just under the default max-in-flight-per-connection (4096).
    const REQUESTS: usize = 4_000;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2);
    let (a, b) = (queue_on_shard("pipe", 0, 2), queue_on_shard("pipe", 1, 2));
    with_client(server.local_addr(), move |c| async move {
        let adds = (0..REQUESTS).map(|i| {
            let c = c.clone();
            let queue = if i % 2 == 0 { a.clone() } else { b.clone() };
            async move {
                let ids = c
                    .add(&queue, vec![NewMessage::new(i.to_be_bytes().to_vec())])
                    .await
                    .unwrap();
                ids.len()
            }
        });
        let answered: usize = futures::future::join_all(adds).await.into_iter().sum();
        assert_eq!(answered, REQUESTS);
        let total = c.stats(&a).await.unwrap().visible + c.stats(&b).await.unwrap().visible;
        assert_eq!(total as usize, REQUESTS);
        // Per-queue order follows the order of the pipelined requests.
        let lease = c.poll(&a, 10, 60_000, 0).await.unwrap().unwrap();
        let firsts: Vec<usize> = lease
            .messages
            .iter()
            .map(|m| usize::from_be_bytes(m.payload[..].try_into().unwrap()))
            .collect();
        assert_eq!(firsts, (0..10).map(|i| i * 2).collect::<Vec<_>>());
    });
    common::stop(server);
}

#[test]
fn in_flight_limit_is_enforced_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        max_in_flight_per_connection: 2,
        ..ServerLimits::default()
    };
    let server = start_with_limits(dir.path(), 1, limits);
    let queue = q("inflight");
    with_client(server.local_addr(), move |c| async move {
        c.add(&queue, msgs(1, "x")).await.unwrap();
        let l = c.poll(&queue, 1, 60_000, 0).await.unwrap().unwrap();
        assert_eq!(l.messages.len(), 1);
        // Two long polls occupy both slots; the third request is refused.
        let p1 = c.poll(&queue, 1, 1_000, 800);
        let p2 = c.poll(&queue, 1, 1_000, 800);
        let third = async {
            glommio::timer::sleep(Duration::from_millis(100)).await;
            c.stats(&queue).await
        };
        let (r1, r2, r3) = futures::join!(p1, p2, third);
        assert_eq!((r1.unwrap(), r2.unwrap()), (None, None));
        let err = r3.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::TooManyInFlight));
        assert!(err.to_string().contains("max-in-flight-per-connection 2"));
        assert!(c.stats(&queue).await.is_ok(), "the connection keeps working");
    });
    common::stop(server);
}

#[test]
fn a_client_that_does_not_read_gets_every_answer_later() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        max_in_flight_per_connection: 8,
        ..ServerLimits::default()
    };
    let server = start_with_limits(dir.path(), 2, limits);
    let addr = server.local_addr();
    // 64 pipelined requests, nothing read until all are sent.
    let frames: Vec<u8> = (1..=64).flat_map(|id| raw::stats_frame(id, "q")).collect();
    let answers = raw::exchange_all(addr, &frames);
    for (_, code) in &answers {
        assert!(
            matches!(code, Some(ErrorCode::UnknownQueue | ErrorCode::TooManyInFlight)),
            "{code:?}"
        );
    }
    let mut ids: Vec<u64> = answers.iter().map(|(id, _)| *id).collect();
    ids.sort();
    assert_eq!(ids, (1..=64).collect::<Vec<_>>(), "one answer per request");
    // Everyone else is served throughout.
    with_client(addr, |c| async move { c.hello().await.unwrap() });
    common::stop(server);
}

#[test]
fn connection_limit_refuses_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        max_connections: 1,
        ..ServerLimits::default()
    };
    let server = start_with_limits(dir.path(), 1, limits);
    let addr = server.local_addr();
    with_client(addr, move |c| async move {
        c.hello().await.unwrap();
        let reply = std::thread::spawn(move || raw::exchange(addr, &raw::stats_frame(1, "q")))
            .join()
            .unwrap();
        assert_eq!(reply, Some((0, Some(ErrorCode::Unavailable))));
        c.hello().await.unwrap();
    });
    common::stop(server);
}

#[test]
fn bad_input_never_disturbs_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        max_frame_bytes: 64 << 10,
        ..ServerLimits::default()
    };
    let server = start_with_limits(dir.path(), 2, limits);
    let addr = server.local_addr();
    let queue = q("steady");
    with_client(addr, move |c| async move {
        c.add(&queue, msgs(1, "before")).await.unwrap();
        let abuse = std::thread::spawn(move || {
            // Random bytes: an error or a close, never a hang.
            let mut noise = vec![0u8; 4096];
            let mut x: u32 = 0x9e37_79b9;
            for b in noise.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            let noise_reply = raw::exchange(addr, &noise);
            // A frame announcing more than the limit.
            let mut huge = vec![0u8; 8];
            huge[4..8].copy_from_slice(&(1u32 << 20).to_le_bytes());
            let huge_reply = raw::exchange(addr, &huge);
            // A truncated frame, then the client goes away.
            let truncated = raw::stats_frame(3, "q");
            let truncated_reply = raw::exchange(addr, &truncated[..truncated.len() - 5]);
            // A valid frame of the wrong type (a Response).
            let wrong = raw::response_frame(9);
            let wrong_reply = raw::exchange(addr, &wrong);
            (noise_reply, huge_reply, truncated_reply, wrong_reply)
        });
        // The well-behaved client keeps being served meanwhile.
        for i in 0..50 {
            c.add(&queue, msgs(1, &format!("during{i}"))).await.unwrap();
        }
        let (noise, huge, truncated, wrong) = abuse.join().unwrap();
        assert!(
            matches!(
                noise,
                None | Some((0, Some(ErrorCode::MalformedFrame | ErrorCode::FrameTooLarge)))
            ),
            "{noise:?}"
        );
        assert_eq!(huge, Some((0, Some(ErrorCode::FrameTooLarge))));
        assert_eq!(truncated, None, "a truncated frame gets no answer");
        assert_eq!(wrong, Some((9, Some(ErrorCode::UnknownOperation))));
        assert_eq!(c.stats(&queue).await.unwrap().visible, 51);
    });
    common::stop(server);
}

#[test]
fn shutdown_answers_long_polls_and_stops_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2);
    let addr = server.local_addr();
    let queue = q("bye");
    let setup = queue.clone();
    with_client(addr, move |c| async move {
        c.add(&setup, msgs(1, "x")).await.unwrap();
        let l = c.poll(&setup, 1, 60_000, 0).await.unwrap().unwrap();
        c.remove(&setup, l.id, vec![l.messages[0].id]).await.unwrap();
    });
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        common::stop(server);
        started.elapsed()
    });
    let (polled, waited) = with_client(addr, move |c| async move {
        let started = Instant::now();
        (c.poll(&queue, 1, 1_000, 20_000).await, started.elapsed())
    });
    assert_eq!(polled.unwrap(), None, "a parked long poll is answered empty");
    assert!(waited < Duration::from_secs(5), "long poll held for {waited:?}");
    let took = stopper.join().unwrap();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
}

/// Raw-socket helpers for frames the typed client cannot produce.
mod raw {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    use capnp::message::{Builder, ReaderOptions};
    use queueber::protocol::{decode_response, ErrorCode};
    use queueber::queueber_capnp::{request, response};

    pub fn stats_frame(id: u64, queue: &str) -> Vec<u8> {
        let mut message = Builder::new_default();
        let mut root = message.init_root::<request::Builder<'_>>();
        root.set_id(id);
        root.init_stats().set_queue(queue);
        capnp::serialize::write_message_to_words(&message)
    }

    pub fn response_frame(id: u64) -> Vec<u8> {
        let mut message = Builder::new_default();
        let mut root = message.init_root::<response::Builder<'_>>();
        root.set_id(id);
        // The response union's last arm: past the request union's last.
        root.init_remove_and_poll();
        capnp::serialize::write_message_to_words(&message)
    }

    /// Sends `bytes`, half-closes, and reads the first response, if any:
    /// (response id, error code if it is an error).
    pub fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<(u64, Option<ErrorCode>)> {
        exchange_all(addr, bytes).into_iter().next()
    }

    /// Sends `bytes`, half-closes, and reads every response until the server
    /// closes: (response id, error code if it is an error) each.
    pub fn exchange_all(addr: SocketAddr, bytes: &[u8]) -> Vec<(u64, Option<ErrorCode>)> {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let mut answers = Vec::new();
        let mut rest = &buf[..];
        while let Ok(reader) = capnp::serialize::read_message(&mut rest, ReaderOptions::new()) {
            let Ok(resp) = decode_response(&reader) else { break };
            answers.push((resp.id, resp.result.err().map(|e| e.code)));
        }
        answers
    }
}

#[test]
fn peek_pages_through_the_visible_head_without_leasing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2);
    with_client(server.local_addr(), |c| async move {
        let a = q("peeked");
        let ids = c.add(&a, msgs(5, "p")).await.unwrap();
        c.add(&a, vec![NewMessage::delayed(b"later".to_vec(), 60_000)])
            .await
            .unwrap();
        // Pages of two: p0 p1 | p2 p3 | p4, the delayed message never.
        let mut seen = Vec::new();
        let mut cursor = None;
        for page in 0.. {
            assert!(page < 10, "peek did not end");
            let peeked = c.peek(&a, 2, cursor).await.unwrap();
            assert!(peeked.messages.len() <= 2);
            seen.extend(
                peeked
                    .messages
                    .iter()
                    .map(|m| (m.id, m.payload.to_vec(), m.delivery_count)),
            );
            cursor = peeked.cursor;
            if cursor.is_none() {
                break;
            }
        }
        let expected: Vec<_> = (0..5).map(|i| (ids[i], format!("p{i}").into_bytes(), 0)).collect();
        assert_eq!(seen, expected);
        // Peeking leased nothing: a poll gets the head, which a peek then skips.
        let lease = c.poll(&a, 1, 30_000, 0).await.unwrap().unwrap();
        assert_eq!(lease.messages[0].id, ids[0]);
        let head = c.peek(&a, 1, None).await.unwrap();
        assert_eq!(head.messages[0].id, ids[1]);
        assert!(head.cursor.is_some());
        // A released message comes back with its delivery count.
        assert!(c.release(&a, lease.id, ids[0], 0).await.unwrap());
        let all = c.peek(&a, 100, None).await.unwrap();
        assert_eq!(all.messages.len(), 5);
        assert_eq!(all.cursor, None);
        let back = all.messages.iter().find(|m| m.id == ids[0]).unwrap();
        assert_eq!(back.delivery_count, 1);
        assert_eq!(c.stats(&a).await.unwrap().in_flight, 0);

        let missing = c.peek(&q("never-added"), 1, None).await.unwrap_err();
        assert_eq!(missing.code(), Some(ErrorCode::UnknownQueue));
    });
    common::stop(server);
}

/// `removeAndPoll`: the removes run exactly as `remove` would (a flag per
/// id), then the poll exactly as `poll` would, waiting included; on a queue
/// of the other shard as well as this one's.
#[test]
fn remove_and_poll_acknowledges_then_leases_in_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2);
    with_clients(server.local_addr(), 2, |clients| async move {
        let (c, producer) = (&clients[0], &clients[1]);
        for shard in 0..2 {
            let queue = queue_on_shard("rap", shard, 2);
            c.add(&queue, msgs(5, "m")).await.unwrap();
            // No ids: a plain poll.
            let first = c.remove_and_poll(&queue, None, vec![], 2, 30_000, 0).await.unwrap();
            assert!(first.removed.is_empty());
            let a = first.lease.expect("a lease");
            assert_eq!(a.messages.len(), 2);
            // Its ids (and one it does not hold) removed, then the next two.
            let mut ids: Vec<_> = a.messages.iter().map(|m| m.id).collect();
            ids.push(MessageId([9; 16]));
            let second = c.remove_and_poll(&queue, Some(a.id), ids, 2, 30_000, 0).await.unwrap();
            assert_eq!(second.removed, vec![true, true, false]);
            let b = second.lease.expect("a lease");
            assert_eq!(b.messages.len(), 2);
            let stats = c.stats(&queue).await.unwrap();
            assert_eq!((stats.visible, stats.in_flight), (1, 2), "{stats:?}");
            // The last one, then nothing: removed, and an empty lease at once.
            let ids = b.messages.iter().map(|m| m.id).collect();
            let third = c.remove_and_poll(&queue, Some(b.id), ids, 5, 30_000, 0).await.unwrap();
            assert_eq!(third.removed, vec![true, true]);
            let last = third.lease.expect("the fifth");
            let ids = last.messages.iter().map(|m| m.id).collect();
            let empty = c
                .remove_and_poll(&queue, Some(last.id), ids, 5, 30_000, 0)
                .await
                .unwrap();
            assert_eq!((empty.removed, empty.lease), (vec![true], None));
            // Waiting: removes at once, then leases what is added meanwhile.
            c.add(&queue, msgs(1, "w")).await.unwrap();
            let held = c.poll(&queue, 1, 30_000, 0).await.unwrap().unwrap();
            let waiting = c.remove_and_poll(&queue, Some(held.id), vec![held.messages[0].id], 1, 30_000, 5_000);
            let later = async {
                glommio::timer::sleep(Duration::from_millis(100)).await;
                producer.add(&queue, msgs(1, "late")).await.unwrap();
            };
            let started = Instant::now();
            let (waited, ()) = futures::join!(waiting, later);
            let waited = waited.unwrap();
            assert_eq!(waited.removed, vec![true]);
            let got = waited.lease.expect("the late message");
            assert_eq!(got.messages[0].payload, &b"late0"[..]);
            assert!(
                started.elapsed() >= Duration::from_millis(90),
                "{:?}",
                started.elapsed()
            );
            assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
            let stats = c.stats(&queue).await.unwrap();
            assert_eq!((stats.visible, stats.in_flight), (0, 1), "{stats:?}");
        }
        // Ids without the lease they came under, and an unknown queue.
        let queue = q("rap-errors");
        let no_lease = c
            .remove_and_poll(&queue, None, vec![MessageId([1; 16])], 1, 1_000, 0)
            .await;
        assert_eq!(code(no_lease), ErrorCode::InvalidArgument);
        assert_eq!(
            code(c.remove_and_poll(&queue, None, vec![], 1, 1_000, 0).await),
            ErrorCode::UnknownQueue
        );
    });
    common::stop(server);
}

/// The Rust client's consumer helper drains a queue with one request per
/// batch while messages wait, removing exactly what was marked done, and
/// long-polls when the queue is empty.
#[test]
fn the_consumer_helper_removes_what_is_done_and_leaves_the_rest() {
    use queueber::consumer::Consumer;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 2);
    with_clients(server.local_addr(), 2, |clients| async move {
        let queue = queue_on_shard("consumer", 1, 2);
        clients[1].add(&queue, msgs(50, "c")).await.unwrap();
        let mut consumer = Consumer::new(clients[0].clone(), queue.clone(), 8, 30_000, 200);
        let (mut seen, mut skipped) = (HashSet::new(), 0);
        while let Some(lease) = consumer.next().await.unwrap() {
            for m in &lease.messages {
                assert!(seen.insert(m.payload.clone()), "delivered twice");
                // Every tenth message is left unhandled: it stays leased.
                if seen.len() % 10 == 0 {
                    skipped += 1;
                } else {
                    consumer.done(&lease, m.id);
                }
            }
        }
        consumer.flush().await.unwrap();
        assert!(consumer.take_not_removed().is_empty());
        assert_eq!((seen.len(), skipped), (50, 5));
        let stats = clients[1].stats(&queue).await.unwrap();
        assert_eq!((stats.visible, stats.in_flight), (0, 5), "{stats:?}");
        // An empty queue: next() waits its wait_ms for a late message.
        let late = async {
            glommio::timer::sleep(Duration::from_millis(50)).await;
            clients[1].add(&queue, msgs(1, "late")).await.unwrap();
        };
        let (got, ()) = futures::join!(consumer.next(), late);
        assert_eq!(
            got.unwrap().expect("the late message").messages[0].payload,
            &b"late0"[..]
        );
    });
    common::stop(server);
}
