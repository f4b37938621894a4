//! The metrics endpoint against a real server: exact figures after a known
//! sequence of operations, both exposition formats (checked by Prometheus's
//! own parser when `promtool` is available, as `scripts/test.sh` makes it),
//! health and readiness, and the endpoint's answers to bad or stuck clients.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/wire.rs"]
mod wire;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daemon::{free_port, listening, DaemonSpec};
use queueber::clock::ManualClock;
use queueber::names::QueueName;
use queueber::server;
use queueber::types::NewMessage;

/// One HTTP exchange: the status code, the headers and the body.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(request).expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, head.to_string(), body.to_string())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (code, _, body) = http(addr, format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
    (code, body)
}

/// The value of the sample written exactly as `series` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .expect("a number")
}

fn queue_series(name: &str, q: &QueueName, extra: &str) -> String {
    format!("{name}{{tenant=\"{}\",queue=\"{}\"{extra}}}", q.tenant(), q.queue())
}

/// `promtool check metrics` on `text`, when promtool is installed.
fn promtool_accepts(text: &str) -> Option<bool> {
    let cached = dirs_promtool();
    let program = if cached.exists() {
        cached
    } else {
        PathBuf::from("promtool")
    };
    let mut child = Command::new(program)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(text.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        eprintln!(
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(out.status.success())
}

fn dirs_promtool() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/queueber/promtool/usr/bin/promtool")
}

#[test]
fn a_scrape_counts_a_known_sequence_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::config(dir.path(), 2);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let server = server::start_with_clock(config, clock.clone()).expect("server starts");
    let metrics = server.metrics_addr().expect("a metrics endpoint");
    let a = common::queue_on_shard("a", 0, 2);
    let b = common::queue_on_shard("b", 1, 2);
    let (qa, qb) = (a.clone(), b.clone());
    common::with_client(server.local_addr(), move |client| async move {
        let five = (0..5).map(|i| NewMessage::new(vec![i; 10])).collect();
        client.add(&qa, five).await.expect("add to a");
        client
            .add(&qb, vec![NewMessage::new(b"x".to_vec())])
            .await
            .expect("add to b");
        let lease = client
            .poll(&qa, 3, 60_000, 0)
            .await
            .expect("poll a")
            .expect("three messages");
        assert_eq!(lease.messages.len(), 3);
        let ids: Vec<_> = lease.messages.iter().map(|m| m.id).collect();
        client
            .remove(&qa, lease.id, ids[..2].to_vec())
            .await
            .expect("remove two");
        assert!(client.release(&qa, lease.id, ids[2], 0).await.expect("release one"));
        client
            .poll(&qb, 1, 1_000, 0)
            .await
            .expect("poll b")
            .expect("one message");
        assert!(client.poll(&qb, 1, 1_000, 0).await.expect("poll b again").is_none());
        let missing = QueueName::new("test", "missing").unwrap();
        assert!(client.stats(&missing).await.is_err());
        // b's lease expires; the next batch on b settles it.
        clock.advance(2_000);
        assert_eq!(client.stats(&qb).await.expect("stats of b").visible, 1);
    });

    let (code, text) = get(metrics, "/metrics");
    assert_eq!(code, 200, "{text}");
    let q = |name: &str, queue: &QueueName| sample(&text, &queue_series(name, queue, ""));
    assert_eq!(q("queueber_messages_added_total", &a), 5.0);
    assert_eq!(q("queueber_messages_added_total", &b), 1.0);
    assert_eq!(q("queueber_messages_delivered_total", &a), 3.0);
    assert_eq!(q("queueber_messages_delivered_total", &b), 1.0);
    assert_eq!(q("queueber_messages_redelivered_total", &a), 0.0);
    assert_eq!(q("queueber_messages_removed_total", &a), 2.0);
    assert_eq!(q("queueber_messages_released_total", &a), 1.0);
    assert_eq!(q("queueber_leases_expired_total", &b), 1.0);
    assert_eq!(q("queueber_leases_expired_total", &a), 0.0);
    assert_eq!(q("queueber_polls_empty_total", &b), 1.0);
    // Listed for every queue, retention or not (tests/retention.rs counts).
    assert_eq!(
        sample(
            &text,
            &queue_series("queueber_messages_dropped_total", &a, ",reason=\"retention\"")
        ),
        0.0
    );
    assert_eq!(q("queueber_queue_parked_polls", &a), 0.0);
    // Every message was added at the start; the clock then moved 2 s.
    assert_eq!(q("queueber_queue_oldest_message_age_seconds", &a), 2.0);
    assert_eq!(q("queueber_queue_oldest_message_age_seconds", &b), 2.0);
    let state = |queue: &QueueName, s: &str| {
        sample(
            &text,
            &queue_series("queueber_queue_messages", queue, &format!(",state=\"{s}\"")),
        )
    };
    assert_eq!(state(&a, "visible"), 3.0);
    assert_eq!(state(&a, "inflight"), 0.0);
    assert_eq!(state(&a, "delayed"), 0.0);
    assert_eq!(state(&b, "visible"), 1.0);
    let requests = |op: &str, code: &str| {
        sample(
            &text,
            &format!("queueber_requests_total{{op=\"{op}\",code=\"{code}\"}}"),
        )
    };
    assert_eq!(requests("add", "ok"), 2.0);
    assert_eq!(requests("poll", "ok"), 3.0);
    assert_eq!(requests("remove", "ok"), 1.0);
    assert_eq!(requests("release", "ok"), 1.0);
    assert_eq!(requests("stats", "ok"), 1.0);
    assert_eq!(requests("stats", "unknown_queue"), 1.0);
    assert_eq!(
        sample(&text, "queueber_request_duration_seconds_count{op=\"add\"}"),
        2.0
    );
    assert_eq!(sample(&text, "queueber_ready"), 1.0);
    for shard in ["0", "1"] {
        let batches = sample(
            &text,
            &format!("queueber_storage_batch_commands_count{{shard=\"{shard}\"}}"),
        );
        assert!(batches >= 1.0, "shard {shard} ran no batch:\n{text}");
    }
    assert!(sample(&text, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&text, "process_open_fds") > 0.0);
    assert!(text.contains("queueber_rocksdb_memtable_bytes "));
    if let Some(ok) = promtool_accepts(&text) {
        assert!(ok, "promtool rejected the Prometheus text");
    } else {
        eprintln!("promtool not installed: the format check is skipped (scripts/test.sh installs it)");
    }

    // OpenMetrics when asked for.
    let (code, head, open) = http(
        metrics,
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
    );
    assert_eq!(code, 200);
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(open.ends_with("# EOF\n"));
    assert!(open.contains("# TYPE queueber_messages_added counter\n"));
    assert!(open.contains(&format!(
        "{} 5\n",
        queue_series("queueber_messages_added_total", &a, "")
    )));
    common::stop(server);
}

#[test]
fn queues_past_the_limit_fold_into_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::config(dir.path(), 1);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.metrics_max_queues = 2;
    let server = server::start(config).expect("server starts");
    let metrics = server.metrics_addr().expect("a metrics endpoint");
    common::with_client(server.local_addr(), |client| async move {
        for name in ["q1", "q2", "q3", "q4"] {
            let q = QueueName::new("t", name).unwrap();
            client.add(&q, vec![NewMessage::new(b"m".to_vec())]).await.expect("add");
        }
    });
    let (_, text) = get(metrics, "/metrics");
    let added = |t: &str, q: &str| {
        sample(
            &text,
            &format!("queueber_messages_added_total{{tenant=\"{t}\",queue=\"{q}\"}}"),
        )
    };
    assert_eq!(added("t", "q1"), 1.0);
    assert_eq!(added("t", "q2"), 1.0);
    assert_eq!(added("_other", "_other"), 2.0);
    assert!(!text.contains("queue=\"q3\""));
    common::stop(server);
}

#[test]
fn bad_requests_and_stuck_scrapers_do_not_stop_the_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::config(dir.path(), 1);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = server::start(config).expect("server starts");
    let metrics = server.metrics_addr().expect("a metrics endpoint");

    // A scraper that connects and sends nothing holds no one up.
    let stuck = TcpStream::connect(metrics).expect("connect");
    let started = Instant::now();
    assert_eq!(get(metrics, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(metrics, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(get(metrics, "/metrics").0, 200);
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

    assert_eq!(get(metrics, "/nothing-here").0, 404);
    let (code, _, _) = http(metrics, b"POST /metrics HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    assert_eq!(code, 405);
    let (code, _, _) = http(metrics, b"\x16\x03\x01 not http at all\r\n\r\n");
    assert_eq!(code, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nX-Filler: {}\r\n\r\n", "a".repeat(16 << 10));
    let mut stream = TcpStream::connect(metrics).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    // The server answers 400 once its 8 KiB are full, maybe before all of
    // this is sent: a failed write is fine, the answer is what counts.
    let _ = stream.write_all(huge.as_bytes());
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    drop(stuck);
    assert_eq!(get(metrics, "/healthz").0, 200);
    common::stop(server);
}

#[test]
fn readyz_is_503_until_recovery_is_done() {
    // A large unflushed WAL (a killed `wal`-durability server) makes the
    // next start replay it; the endpoint is up before that and says so.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut first = DaemonSpec::new(&data, "wal").start();
    let queue = QueueName::new("t", "big").unwrap();
    let mut wire = wire::Wire::connect(first.addr);
    let batch: Vec<NewMessage> = (0..1000).map(|_| NewMessage::new(vec![7u8; 256])).collect();
    for i in 0..300u64 {
        wire.send(&wire::frame(
            i + 1,
            queueber::protocol::Op::Add(queueber::ops::Add {
                queue: queue.clone(),
                messages: batch.clone(),
            }),
        ));
    }
    for _ in 0..300 {
        assert!(wire.recv().result.is_ok());
    }
    first.kill();

    let port = free_port();
    let spec = DaemonSpec::new(&data, "wal")
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{port}"));
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = spec.spawn_only();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut saw_starting, mut saw_ready) = (false, false);
    while Instant::now() < deadline && !saw_ready {
        if listening(metrics) {
            match get(metrics, "/readyz") {
                (503, body) => {
                    assert!(body.starts_with("starting"), "{body}");
                    saw_starting = true;
                }
                (200, _) => saw_ready = true,
                other => panic!("unexpected /readyz answer {other:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.terminate();
    assert!(saw_starting, "never saw /readyz 503 during recovery");
    assert!(saw_ready, "never saw /readyz 200 after recovery");
}

#[test]
fn slow_requests_are_logged_with_where_the_time_went() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A 1 ms threshold: an fsynced add of 4 MiB takes longer; a long poll
    // that waits 300 ms for nothing is not slow (its waiting does not count).
    let mut server = DaemonSpec::new(&data, "fsync")
        .arg("--slow-request-ms")
        .arg("1")
        .start();
    let queue = QueueName::new("t", "slowq").unwrap();
    let empty = QueueName::new("t", "idle").unwrap();
    let mut wire = wire::Wire::connect(server.addr);
    let big: Vec<NewMessage> = (0..4096).map(|_| NewMessage::new(vec![1u8; 1024])).collect();
    let add = |id, queue: &QueueName, messages| {
        wire::frame(
            id,
            queueber::protocol::Op::Add(queueber::ops::Add {
                queue: queue.clone(),
                messages,
            }),
        )
    };
    wire.send(&add(1, &empty, vec![NewMessage::delayed(b"later".to_vec(), 3_600_000)]));
    assert!(wire.recv().result.is_ok());
    wire.send(&wire::poll(2, &empty, 1, 1000, 300));
    assert!(wire.recv().result.is_ok());
    wire.send(&add(3, &queue, big));
    assert!(wire.recv().result.is_ok());
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = server.log_text();
        if log.contains("slow request") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    server.terminate();
    let slow: Vec<&str> = log.lines().filter(|l| l.contains("slow request")).collect();
    let add_line = slow
        .iter()
        .find(|l| l.contains("queue=t/slowq"))
        .unwrap_or_else(|| panic!("no slow add logged:\n{log}"));
    for field in [
        "op=\"add\"",
        "shard=",
        "total_ms=",
        "queued_ms=",
        "storage_ms=",
        "sync_ms=",
    ] {
        assert!(add_line.contains(field), "{field} missing in {add_line}");
    }
    assert!(
        !slow.iter().any(|l| l.contains("op=\"poll\"") || l.contains("op=poll")),
        "a long poll's wait was logged as slow:\n{log}"
    );
}

/// The family names of an exposition in the Prometheus text format.
fn families(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The metric names a piece of text mentions (`queueber_…`, `process_…`),
/// a histogram's `_bucket`, `_sum` and `_count` samples by their family.
fn names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("queueber_") || word.starts_with("process_") {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(word);
            names.insert(family.to_string());
        }
    }
    names
}

/// docs/operations.md's series table is what the server exposes, and its
/// alert rules parse (`promtool check rules`) and name only real series.
#[test]
fn the_documented_series_and_alerts_match_the_server() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).expect("operations.md");
    let table: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("queueber_") || n.starts_with("process_"))
        .map(str::to_string)
        .collect();

    // With access control and backups, so that their series exist too.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::config(&dir.path().join("data"), 2);
    config.backup = Some(queueber::server::backup::BackupConfig {
        dir: dir.path().join("backups"),
        every: None,
        keep: 1,
        now: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    });
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let tokens = queueber::auth::Tokens::parse("", "none").expect("an empty token list");
    config.access = Some(Arc::new(queueber::auth::Access::new(tokens)));
    let server = server::start(config).expect("server starts");
    let (_, text) = get(server.metrics_addr().expect("a metrics endpoint"), "/metrics");
    common::stop(server);
    let exposed = families(&text);
    assert_eq!(
        exposed, table,
        "docs/operations.md's series table and the server's families differ"
    );

    let rules = doc
        .split("#### Alerts")
        .nth(1)
        .and_then(|s| s.split("```yaml\n").nth(1))
        .and_then(|s| s.split("\n```").next())
        .expect("an alert rules block in operations.md");
    let unknown: Vec<String> = names_in(rules).difference(&exposed).cloned().collect();
    assert!(
        unknown.is_empty(),
        "alert rules name series the server does not expose: {unknown:?}"
    );
    assert!(
        rules.contains("queueber_messages_dead_lettered_total"),
        "an alert on dead letters"
    );

    let file = dir.path().join("rules.yml");
    std::fs::write(&file, rules).expect("write rules");
    let program = if dirs_promtool().exists() {
        dirs_promtool()
    } else {
        PathBuf::from("promtool")
    };
    match Command::new(program).arg("check").arg("rules").arg(&file).output() {
        Ok(out) => assert!(
            out.status.success(),
            "promtool rejected the documented rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!("promtool not installed: the rules check is skipped (scripts/test.sh installs it)"),
    }
}

/// The endpoint binds with SO_REUSEPORT, like the protocol port: a second
/// server given the same metrics address must be refused, or scrapes would
/// alternate between the two servers' figures.
#[test]
fn a_second_server_on_a_taken_metrics_port_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = common::config(&dir.path().join("first"), 1);
    first.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let first = server::start(first).expect("the first server starts");
    let taken = first.metrics_addr().expect("a metrics endpoint");
    let mut second = common::config(&dir.path().join("second"), 1);
    second.metrics_listen = Some(taken);
    match server::start(second) {
        Ok(second) => {
            common::stop(second);
            panic!("a second server started on the taken metrics port {taken}");
        }
        Err(e) => assert!(e.to_string().contains("already in use"), "{e}"),
    }
    // The first still answers its own scrapes.
    let (code, _) = get(taken, "/healthz");
    assert_eq!(code, 200);
    common::stop(first);
}
