//! Dead letters over TCP against a real server: a message out of
//! deliveries is dead-lettered when its lease expires; `fail` records the
//! error and brings the message back, or rejects it at once; a peek at the
//! dead shows why, when and the last error; redrive by id or all, with the
//! delivery count reset; and a redrive of 100,000 dead letters while
//! another client's polls keep being answered (the worst poll is printed).

mod common;

use std::time::{Duration, Instant};

use queueber::names::QueueName;
use queueber::types::{DeadReason, NewMessage, QueuePolicy};

fn q(queue: &str) -> QueueName {
    QueueName::new("t", queue).unwrap()
}

#[test]
fn messages_die_after_max_deliveries_or_when_rejected_and_come_back_by_redrive() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), 2);
    common::with_client(server.local_addr(), |c| async move {
        let policy = QueuePolicy {
            max_deliveries: Some(2),
            ..QueuePolicy::default()
        };
        c.create_queue(&q("jobs"), policy).await.unwrap();
        c.add(&q("jobs"), vec![NewMessage::new(b"poison".to_vec())])
            .await
            .unwrap();
        // Two deliveries whose leases run out: the second ends in the dead set.
        for delivery in 1..=2 {
            let lease = c.poll(&q("jobs"), 1, 50, 2_000).await.unwrap().unwrap();
            assert_eq!(lease.messages[0].delivery_count, delivery);
            glommio::timer::sleep(Duration::from_millis(120)).await;
        }
        assert!(c.poll(&q("jobs"), 1, 50, 0).await.unwrap().is_none());
        let stats = c.stats(&q("jobs")).await.unwrap();
        assert_eq!((stats.visible, stats.in_flight, stats.dead), (0, 0, 1), "{stats:?}");
        let dead = c.peek_dead(&q("jobs"), 10, None).await.unwrap().dead;
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].payload, b"poison");
        assert_eq!(dead[0].reason, DeadReason::MaxDeliveries);
        assert_eq!(dead[0].delivery_count, 2);
        assert_eq!(dead[0].last_error, None);

        // fail without dead: back at once (no backoff here) with its error;
        // then rejected, dead at once with that text.
        c.add(&q("jobs"), vec![NewMessage::new(b"bad".to_vec())]).await.unwrap();
        let lease = c.poll(&q("jobs"), 1, 60_000, 0).await.unwrap().unwrap();
        let id = lease.messages[0].id;
        assert!(c.fail(&q("jobs"), lease.id, id, "smtp timeout", false).await.unwrap());
        assert!(
            !c.fail(&q("jobs"), lease.id, id, "again", false).await.unwrap(),
            "the lease ended"
        );
        let lease = c.poll(&q("jobs"), 1, 60_000, 0).await.unwrap().unwrap();
        assert!(c
            .fail(&q("jobs"), lease.id, id, "bad input: no recipient", true)
            .await
            .unwrap());
        let dead = c.peek_dead(&q("jobs"), 10, None).await.unwrap().dead;
        assert_eq!(dead.len(), 2);
        assert_eq!(dead[1].reason, DeadReason::Rejected);
        assert_eq!(dead[1].last_error.as_deref(), Some("bad input: no recipient"));
        // Paged one at a time.
        let first = c.peek_dead(&q("jobs"), 1, None).await.unwrap();
        assert_eq!(first.dead.len(), 1);
        let second = c.peek_dead(&q("jobs"), 1, first.cursor).await.unwrap();
        assert_eq!(second.dead[0].id, id);
        assert!(second.cursor.is_none());

        // Redrive one by id: visible at once, delivery count reset.
        let moved = c.redrive(&q("jobs"), 0, vec![id]).await.unwrap();
        assert_eq!((moved.moved, moved.more), (1, false));
        let back = c.poll(&q("jobs"), 10, 60_000, 0).await.unwrap().unwrap();
        assert_eq!(back.messages.len(), 1);
        assert_eq!((back.messages[0].id, back.messages[0].delivery_count), (id, 1));
        // The rest.
        assert_eq!(c.redrive(&q("jobs"), 0, Vec::new()).await.unwrap().moved, 1);
        assert_eq!(c.stats(&q("jobs")).await.unwrap().dead, 0);
    });
    common::stop(server);
}

#[test]
fn a_large_redrive_goes_in_bounded_batches_while_others_are_served() {
    const DEAD: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), 1);
    let addr = server.local_addr();
    // Fill the dead set: add, lease, reject (pipelined, 1,000 at a time).
    common::with_client(addr, |c| async move {
        for _ in 0..DEAD / 1000 {
            let batch = (0..1000)
                .map(|i: u32| NewMessage::new(i.to_be_bytes().to_vec()))
                .collect();
            c.add(&q("big"), batch).await.unwrap();
            let lease = c.poll(&q("big"), 1000, 600_000, 0).await.unwrap().unwrap();
            let big = q("big");
            let fails = lease
                .messages
                .iter()
                .map(|m| c.fail(&big, lease.id, m.id, "rejected in bulk", true));
            for ok in futures::future::join_all(fails).await {
                assert!(ok.unwrap());
            }
        }
        assert_eq!(c.stats(&q("big")).await.unwrap().dead, DEAD as u64);
        c.add(&q("other"), vec![NewMessage::new(b"x".to_vec())]).await.unwrap();
    });
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            common::with_client(addr, move |c| async move {
                // Another queue's polls (each finds its one message and
                // hands it back) keep their latency while the redrive runs.
                let (mut worst, mut polls) = (Duration::ZERO, 0);
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    let started = Instant::now();
                    let lease = c.poll(&q("other"), 1, 60_000, 0).await.unwrap().unwrap();
                    worst = worst.max(started.elapsed());
                    polls += 1;
                    let id = lease.messages[0].id;
                    assert!(c.release(&q("other"), lease.id, id, 0).await.unwrap());
                }
                (worst, polls)
            })
        })
    };
    let started = Instant::now();
    let (moved, requests) = common::with_client(addr, |c| async move {
        let (mut moved, mut requests) = (0, 0);
        loop {
            let step = c.redrive(&q("big"), 0, Vec::new()).await.unwrap();
            assert!(step.moved <= 1000);
            moved += step.moved;
            requests += 1;
            if !step.more {
                break;
            }
        }
        (moved, requests)
    });
    let took = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (worst, polls) = watcher.join().unwrap();
    println!(
        "redrove {moved} dead letters in {requests} requests, {took:?}; other client: {polls} polls, worst {worst:?}"
    );
    assert_eq!(moved, DEAD as u64);
    // 1,000 a request; the last says no more.
    assert_eq!(requests, DEAD / 1000);
    assert!(polls > 10, "the other client was starved: {polls} polls");
    assert!(
        worst < Duration::from_millis(500),
        "worst poll {worst:?} during the redrive"
    );
    common::with_client(addr, |c| async move {
        let stats = c.stats(&q("big")).await.unwrap();
        assert_eq!((stats.visible, stats.dead), (DEAD as u64, 0));
    });
    common::stop(server);
}
