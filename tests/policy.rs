//! Queue policies over TCP against a real server: createQueue (idempotent,
//! refused with another policy), getPolicy and setPolicy with versions and
//! the server's defaults; bounded queues (`queueFull` leaves nothing
//! behind, a refused add to a new queue creates no queue); the policy's
//! payload limit; a poll that names no lease gets the policy's; policies
//! and byte counts survive a restart; the CLI.

mod common;

use std::process::Command;

use queueber::names::QueueName;
use queueber::protocol::ErrorCode;
use queueber::server;
use queueber::types::{NewMessage, QueuePolicy, UNLIMITED};

fn q(queue: &str) -> QueueName {
    QueueName::new("t", queue).unwrap()
}

fn messages(n: usize, size: usize) -> Vec<NewMessage> {
    (0..n).map(|i| NewMessage::new(vec![i as u8; size])).collect()
}

#[test]
fn policies_bound_queues_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 2);
    // Server defaults: queues without a policy hold at most 5 messages.
    config.default_policy = QueuePolicy {
        max_depth: Some(5),
        ..QueuePolicy::default()
    };
    let server = server::start(config).expect("server starts");
    let addr = server.local_addr();
    common::with_client(addr, |c| async move {
        let code = |e: queueber::client::ClientError| e.code();
        let bounded = QueuePolicy {
            lease_ms: Some(1_500),
            max_depth: Some(3),
            max_bytes: Some(1_000),
            max_payload_bytes: Some(400),
            retry_backoff_ms: None,
            max_deliveries: None,
            retention_ms: Some(3_600_000),
        };
        // Created with version 1; again with the same policy: unchanged.
        let created = c.create_queue(&q("jobs"), bounded).await.unwrap();
        assert!(created.created);
        assert_eq!((created.policy.version, created.policy.policy), (1, bounded));
        let again = c.create_queue(&q("jobs"), bounded).await.unwrap();
        assert!(!again.created);
        assert_eq!(again.policy.version, 1);
        let other = QueuePolicy {
            max_depth: Some(4),
            ..bounded
        };
        assert_eq!(
            code(c.create_queue(&q("jobs"), other).await.unwrap_err()),
            Some(ErrorCode::InvalidArgument)
        );

        // max-depth 3: 2 fit, then 2 more do not (none of them stored).
        c.add(&q("jobs"), messages(2, 100)).await.unwrap();
        let full = c.add(&q("jobs"), messages(2, 100)).await.unwrap_err();
        assert_eq!(full.code(), Some(ErrorCode::QueueFull), "{full}");
        assert_eq!(c.stats(&q("jobs")).await.unwrap().visible, 2);
        // max-bytes 1000: 200 held, 900 more do not fit, 300 do.
        c.add(&q("jobs"), messages(1, 300)).await.unwrap();
        // Another queue, created by an add: the server's defaults.
        c.add(&q("other-jobs"), messages(1, 300)).await.unwrap();
        // max-payload 400 (under the server's limit).
        c.set_policy(
            &q("jobs"),
            QueuePolicy {
                max_depth: Some(10),
                ..bounded
            },
        )
        .await
        .unwrap();
        let too_big = c.add(&q("jobs"), messages(1, 401)).await.unwrap_err();
        assert_eq!(too_big.code(), Some(ErrorCode::PayloadTooLarge));
        let over_bytes = c.add(&q("jobs"), messages(2, 300)).await.unwrap_err();
        assert_eq!(over_bytes.code(), Some(ErrorCode::QueueFull), "{over_bytes}");
        assert_eq!(c.stats(&q("jobs")).await.unwrap().visible, 3);

        // A poll naming no lease gets the policy's 1.5 s.
        let before = now_ms();
        let lease = c.poll(&q("jobs"), 10, 0, 0).await.unwrap().unwrap();
        let lease_ms = lease.expires_at_ms - before;
        assert!((1_400..=2_500).contains(&lease_ms), "lease of {lease_ms} ms");
        // Removing frees room: bytes held go down with it.
        let ids: Vec<_> = lease.messages.iter().map(|m| m.id).collect();
        c.remove(&q("jobs"), lease.id, ids).await.unwrap();
        c.add(&q("jobs"), messages(2, 400)).await.unwrap();

        // The server's defaults: a queue without a policy holds 5; a
        // refused add to a queue that does not exist creates none.
        assert_eq!(
            code(c.add(&q("fresh"), messages(6, 1)).await.unwrap_err()),
            Some(ErrorCode::QueueFull)
        );
        assert!(!c.list_queues().await.unwrap().contains(&q("fresh")));
        let defaults = c.get_policy(&q("other-jobs")).await.unwrap();
        assert_eq!(defaults.version, 0);
        assert_eq!(defaults.policy, QueuePolicy::default());
        assert_eq!(defaults.effective.max_depth, Some(5));
        assert_eq!(defaults.effective.max_bytes, Some(UNLIMITED));
        assert_eq!(defaults.effective.lease_ms, Some(30_000));
        assert_eq!(
            code(c.get_policy(&q("nope")).await.unwrap_err()),
            Some(ErrorCode::UnknownQueue)
        );
        // A payload limit over the server's is refused.
        let huge = QueuePolicy {
            max_payload_bytes: Some(1 << 40),
            ..QueuePolicy::default()
        };
        assert_eq!(
            code(c.set_policy(&q("jobs"), huge).await.unwrap_err()),
            Some(ErrorCode::InvalidArgument)
        );
    });
    common::stop(server);

    // After a restart: the policy (version 2) and the bytes held (800 of
    // 1000) are what they were.
    let mut config = common::config(dir.path(), 2);
    config.default_policy = QueuePolicy {
        max_depth: Some(5),
        ..QueuePolicy::default()
    };
    let server = server::start(config).expect("server restarts");
    common::with_client(server.local_addr(), |c| async move {
        let info = c.get_policy(&q("jobs")).await.unwrap();
        assert_eq!(info.version, 2);
        assert_eq!(info.policy.max_depth, Some(10));
        let full = c.add(&q("jobs"), messages(1, 201)).await.unwrap_err();
        assert_eq!(full.code(), Some(ErrorCode::QueueFull), "{full}");
        c.add(&q("jobs"), messages(1, 200)).await.unwrap();
    });
    common::stop(server);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn the_cli_creates_reads_and_changes_policies() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), 1);
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_queueber"))
            .args(["--addr", &server.local_addr().to_string(), "--tenant", "t", "--json"])
            .args(args)
            .output()
            .expect("queueber runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (
            out.status.success(),
            serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default(),
            text,
        )
    };
    let (ok, v, text) = cli(&["create", "jobs", "--max-depth", "2", "--lease-ms", "5000"]);
    assert!(ok, "{text}");
    assert_eq!(v["created"], true);
    assert_eq!(v["policy"]["max_depth"], 2);
    assert_eq!(v["effective"]["max_bytes"], "unlimited");
    // Only the fields given change.
    let (ok, v, text) = cli(&[
        "policy",
        "set",
        "jobs",
        "--max-bytes",
        "unlimited",
        "--max-depth",
        "default",
    ]);
    assert!(ok, "{text}");
    assert_eq!(v["version"], 2);
    assert_eq!(v["policy"]["lease_ms"], 5000);
    assert_eq!(v["policy"]["max_depth"], serde_json::Value::Null);
    assert_eq!(v["policy"]["max_bytes"], "unlimited");
    let (_, v, _) = cli(&["policy", "get", "jobs"]);
    assert_eq!(v["version"], 2);
    assert_eq!(v["effective"]["retention_ms"], "unlimited");
    let (ok, v, text) = cli(&["policy", "set", "jobs", "--retention-ms", "86400000"]);
    assert!(ok, "{text}");
    assert_eq!(v["policy"]["retention_ms"], 86_400_000);
    let (ok, v, text) = cli(&["policy", "set", "jobs", "--retention-ms", "forever"]);
    assert!(ok, "{text}");
    assert_eq!(v["policy"]["retention_ms"], "unlimited");
    let (ok, v, text) = cli(&["stats", "jobs"]);
    assert!(ok, "{text}");
    assert_eq!(v["dropped"], 0);
    let (ok, _, text) = cli(&["policy", "set", "jobs", "--max-depth", "lots"]);
    assert!(!ok, "{text}");
    common::stop(server);
}

#[test]
fn failed_deliveries_wait_out_the_retry_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), 1);
    common::with_client(server.local_addr(), |c| async move {
        let backoff = queueber::types::RetryBackoff::new(&[400, 900]).unwrap();
        let policy = QueuePolicy {
            retry_backoff_ms: Some(backoff),
            ..QueuePolicy::default()
        };
        c.create_queue(&q("flaky"), policy).await.unwrap();
        c.add(&q("flaky"), messages(1, 10)).await.unwrap();

        // First delivery: the lease runs out after 100 ms; the message is
        // back 400 ms after that, not before.
        let first = c.poll(&q("flaky"), 1, 100, 0).await.unwrap().unwrap();
        let expired_at = first.expires_at_ms;
        let second = c.poll(&q("flaky"), 1, 60_000, 5_000).await.unwrap().unwrap();
        let back_after = now_ms().saturating_sub(expired_at);
        assert_eq!(second.messages[0].delivery_count, 2);
        // The sweeper's precision: a few ms late at most, never early.
        assert!(
            (400..1_000).contains(&back_after),
            "visible {back_after} ms after the expiry"
        );
        assert_eq!(c.stats(&q("flaky")).await.unwrap().in_flight, 1);

        // Second failure, a release without a delay of its own: 900 ms.
        let released_at = now_ms();
        let id = second.messages[0].id;
        assert!(c.release(&q("flaky"), second.id, id, 0).await.unwrap());
        assert_eq!(c.stats(&q("flaky")).await.unwrap().delayed, 1);
        let third = c.poll(&q("flaky"), 1, 60_000, 5_000).await.unwrap().unwrap();
        let waited = now_ms() - released_at;
        assert!((900..1_600).contains(&waited), "visible {waited} ms after the release");
        // A release with its own delay keeps it (10 ms, not the backoff).
        let id = third.messages[0].id;
        assert!(c.release(&q("flaky"), third.id, id, 10).await.unwrap());
        let started = now_ms();
        c.poll(&q("flaky"), 1, 60_000, 5_000).await.unwrap().unwrap();
        assert!(
            now_ms() - started < 600,
            "the explicit delay was replaced by the backoff"
        );
    });
    common::stop(server);
}

/// `--max-queues` bounds what a client that makes up queue names can make
/// the server hold: past it an add to a new queue (or a createQueue) is
/// `queueFull` and creates nothing, while the existing queues keep working
/// and a delete makes room, whichever shard owns each queue.
#[test]
fn queues_past_max_queues_are_refused_and_a_delete_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 2);
    config.max_queues = 5;
    let server = server::start(config).expect("server starts");
    common::with_client(server.local_addr(), |c| async move {
        for i in 0..5 {
            c.add(&q(&format!("made-up-{i}")), messages(1, 10)).await.unwrap();
        }
        let refused = c.add(&q("made-up-5"), messages(1, 10)).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::QueueFull), "{refused}");
        assert!(refused.to_string().contains("--max-queues"), "{refused}");
        let refused = c
            .create_queue(&q("made-up-6"), QueuePolicy::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::QueueFull), "{refused}");
        assert_eq!(c.list_queues().await.unwrap().len(), 5);
        assert_eq!(
            c.stats(&q("made-up-5")).await.unwrap_err().code(),
            Some(ErrorCode::UnknownQueue)
        );
        // The queues that exist take adds and polls as before.
        c.add(&q("made-up-0"), messages(1, 10)).await.unwrap();
        assert_eq!(c.stats(&q("made-up-0")).await.unwrap().visible, 2);
        c.delete(&q("made-up-0")).await.unwrap();
        c.add(&q("made-up-5"), messages(1, 10)).await.unwrap();
        assert_eq!(
            c.add(&q("made-up-6"), messages(1, 10)).await.unwrap_err().code(),
            Some(ErrorCode::QueueFull)
        );
    });
    common::stop(server);
}
