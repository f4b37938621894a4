//! Retention over TCP against a real server on a manual clock: a queue's
//! `retentionMs` drops visible, delayed and dead messages that outlived it;
//! a message in flight stays with its worker (its remove works) and is
//! dropped when its lease ends instead of coming back; `stats.dropped` and
//! `queueber_messages_dropped_total{reason="retention"}` count the drops;
//! a retention set on a queue that already holds messages applies to them.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use queueber::clock::ManualClock;
use queueber::names::QueueName;
use queueber::protocol::ErrorCode;
use queueber::server;
use queueber::types::{NewMessage, QueuePolicy, UNLIMITED};

fn q(queue: &str) -> QueueName {
    QueueName::new("t", queue).unwrap()
}

fn one(payload: &str) -> Vec<NewMessage> {
    vec![NewMessage::new(payload.as_bytes().to_vec())]
}

/// A sample of the metrics endpoint's Prometheus text.
fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read the answer");
    let prefix = format!("{series} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
}

#[test]
fn retention_drops_what_outlived_it_and_leaves_workers_their_messages() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 2);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let server = server::start_with_clock(config, clock.clone()).expect("server starts");
    let metrics = server.metrics_addr().expect("a metrics endpoint");
    let jobs = q("jobs");
    let dropped_series = r#"queueber_messages_dropped_total{tenant="t",queue="jobs",reason="retention"}"#;
    let (queue, tick) = (jobs.clone(), clock.clone());
    common::with_client(server.local_addr(), move |c| async move {
        let policy = QueuePolicy {
            retention_ms: Some(10_000),
            ..QueuePolicy::default()
        };
        let created = c.create_queue(&queue, policy).await.unwrap();
        assert_eq!(created.policy.effective.retention_ms, Some(10_000));
        // A dead letter, two in flight, one visible, one delayed.
        c.add(&queue, one("dead")).await.unwrap();
        let lease = c.poll(&queue, 1, 60_000, 0).await.unwrap().unwrap();
        assert!(c
            .fail(&queue, lease.id, lease.messages[0].id, "bad input", true)
            .await
            .unwrap());
        c.add(&queue, one("removed")).await.unwrap();
        c.add(&queue, one("released")).await.unwrap();
        let held = c.poll(&queue, 2, 60_000, 0).await.unwrap().unwrap();
        assert_eq!(held.messages.len(), 2);
        c.add(&queue, one("visible")).await.unwrap();
        c.add(&queue, vec![NewMessage::delayed(b"delayed".to_vec(), 30_000)])
            .await
            .unwrap();
        let stats = c.stats(&queue).await.unwrap();
        assert_eq!(
            (stats.visible, stats.delayed, stats.in_flight, stats.dead, stats.dropped),
            (1, 1, 2, 1, 0)
        );

        // Just before the retention: nothing goes.
        tick.advance(9_999);
        assert_eq!(c.stats(&queue).await.unwrap().dropped, 0);
        tick.advance(1);
        let stats = c.stats(&queue).await.unwrap();
        assert_eq!(
            (stats.visible, stats.delayed, stats.in_flight, stats.dead, stats.dropped),
            (0, 0, 2, 0, 3)
        );
        assert!(c.poll(&queue, 10, 1_000, 0).await.unwrap().is_none());
        assert!(c.peek_dead(&queue, 10, None).await.unwrap().dead.is_empty());

        // In flight: the worker's remove still works; a release drops it.
        let (removed, released) = (held.messages[0].id, held.messages[1].id);
        assert_eq!(c.remove(&queue, held.id, vec![removed]).await.unwrap(), vec![true]);
        assert!(c.release(&queue, held.id, released, 0).await.unwrap());
        let stats = c.stats(&queue).await.unwrap();
        assert_eq!((stats.visible, stats.in_flight, stats.dropped), (0, 0, 4));

        // A retention set later applies to messages already there; one
        // shortened so much that nothing is kept drops them at once.
        c.add(&queue, one("kept")).await.unwrap();
        let forever = QueuePolicy {
            retention_ms: Some(UNLIMITED),
            ..QueuePolicy::default()
        };
        c.set_policy(&queue, forever).await.unwrap();
        tick.advance(60_000);
        assert_eq!(c.stats(&queue).await.unwrap().visible, 1);
        c.set_policy(&queue, policy).await.unwrap();
        let stats = c.stats(&queue).await.unwrap();
        assert_eq!((stats.visible, stats.dropped), (0, 5));

        // Longer than the longest duration: refused.
        let absurd = QueuePolicy {
            retention_ms: Some(queueber::storage::MAX_DURATION_MS + 1),
            ..QueuePolicy::default()
        };
        let refused = c.set_policy(&queue, absurd).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::InvalidArgument), "{refused}");
    });
    assert_eq!(metric(metrics, dropped_series), Some(5.0));
    common::stop(server);
}
