//! Access control against a real server: nothing but `hello` before `auth`,
//! a wrong token refused late, and a bound connection held to its token's
//! tenant, permissions and queue patterns; listing shows its tenant only.
//! And queueberd's safe default: no non-loopback address without tokens.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/wire.rs"]
mod wire;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use queueber::auth::{new_token, Access, Permission, Tokens};
use queueber::names::QueueName;
use queueber::protocol::ErrorCode;
use queueber::server;
use queueber::types::NewMessage;

/// The error code of a refused call (`None` if it succeeded).
fn denied<T>(r: Result<T, queueber::client::ClientError>) -> Option<ErrorCode> {
    r.err().and_then(|e| e.code())
}

fn q(tenant: &str, queue: &str) -> QueueName {
    QueueName::new(tenant, queue).unwrap()
}

#[test]
fn a_connection_is_held_to_its_token_over_tcp() {
    held_to_its_token(false);
}

#[test]
fn a_connection_is_held_to_its_token_over_tls() {
    held_to_its_token(true);
}

/// Every permission allowed and refused, tenant binding, requests before
/// `auth` and a wrong secret, over plain TCP or TLS.
fn held_to_its_token(tls: bool) {
    let sender = new_token("acme", &[Permission::Send, Permission::Consume], &["orders.*".into()]).unwrap();
    let admin = new_token("acme", &[Permission::Admin], &[]).unwrap();
    let other = new_token("other", &[Permission::Send], &[]).unwrap();
    let file = format!("{}\n{}\n{}", sender.entry, admin.entry, other.entry);
    let tokens = Tokens::parse(&file, "test").expect("auth file");
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 2);
    config.access = Some(Arc::new(Access::new(tokens)));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let pki = common::pki::Pki::new(dir.path(), "auth");
    if tls {
        config.tls = Some(pki.server(None));
    }
    let server = server::start(config).expect("server starts");
    let metrics = server.metrics_addr().expect("a metrics endpoint");
    let (sender, admin, other) = (sender.secret, admin.secret, other.secret);
    let scenario = move |clients: Vec<queueber::client::Client>| async move {
        let (c, a, o) = (&clients[0], &clients[1], &clients[2]);
        let code = |e: queueber::client::ClientError| e.code();
        // Before auth: hello only.
        assert!(c.hello().await.is_ok());
        assert_eq!(
            code(c.stats(&q("acme", "orders.eu")).await.unwrap_err()),
            Some(ErrorCode::Unauthenticated)
        );
        let refused = c
            .add(&q("acme", "orders.eu"), vec![NewMessage::new(b"x".to_vec())])
            .await;
        assert_eq!(code(refused.unwrap_err()), Some(ErrorCode::Unauthenticated));
        // A wrong secret is refused, late.
        let started = Instant::now();
        let id = sender.rsplit_once('.').unwrap().0;
        let wrong = c.auth(&format!("{id}.0000")).await.unwrap_err();
        assert_eq!(code(wrong), Some(ErrorCode::Unauthenticated));
        // An unknown id gets the same answer (and costs the same: benches/auth.rs).
        let unknown = c.auth("nobody-00.0123456789abcdef").await.unwrap_err();
        assert_eq!(code(unknown), Some(ErrorCode::Unauthenticated));
        assert!(
            started.elapsed() >= Duration::from_millis(45),
            "{:?}",
            started.elapsed()
        );
        // Bound to acme, send + consume, orders.* only.
        assert_eq!(c.auth(&sender).await.unwrap(), "acme");
        c.add(&q("acme", "orders.eu"), vec![NewMessage::new(b"m".to_vec())])
            .await
            .unwrap();
        let lease = c.poll(&q("acme", "orders.eu"), 1, 30_000, 0).await.unwrap().unwrap();
        assert_eq!(
            c.remove(&q("acme", "orders.eu"), lease.id, vec![lease.messages[0].id])
                .await
                .unwrap(),
            vec![true]
        );
        let one = || vec![NewMessage::new(b"x".to_vec())];
        assert_eq!(
            denied(c.add(&q("acme", "billing"), one()).await),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(
            denied(c.add(&q("other", "orders.eu"), one()).await),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(
            denied(c.stats(&q("acme", "orders.eu")).await),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(denied(c.list_queues().await), Some(ErrorCode::PermissionDenied));
        // Another tenant's queue exists; acme's admin does not see it.
        assert_eq!(o.auth(&other).await.unwrap(), "other");
        o.add(&q("other", "secret-plans"), one()).await.unwrap();
        assert_eq!(a.auth(&admin).await.unwrap(), "acme");
        assert_eq!(a.list_queues().await.unwrap(), vec![q("acme", "orders.eu")]);
        assert_eq!(a.stats(&q("acme", "orders.eu")).await.unwrap().visible, 0);
        assert_eq!(
            denied(a.stats(&q("other", "secret-plans")).await),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(
            denied(a.add(&q("acme", "orders.eu"), one()).await),
            Some(ErrorCode::PermissionDenied)
        );
        // Admin is not consume.
        assert_eq!(
            denied(a.poll(&q("acme", "orders.eu"), 1, 1_000, 0).await),
            Some(ErrorCode::PermissionDenied)
        );
    };
    if tls {
        common::pki::with_tls_clients(server.local_addr(), pki.client(), 3, scenario);
    } else {
        common::with_clients(server.local_addr(), 3, scenario);
    }
    // The two failed attempts are counted, and refusals by their codes.
    let mut scrape = std::net::TcpStream::connect(metrics).unwrap();
    std::io::Write::write_all(&mut scrape, b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut scrape, &mut text).unwrap();
    assert!(text.contains("\nqueueber_auth_failures_total 2\n"), "{text}");
    assert!(text.contains("code=\"unauthenticated\"") && text.contains("code=\"permission_denied\""));
    common::stop(server);
}

#[test]
fn without_tokens_auth_is_not_needed() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), 1);
    common::with_client(server.local_addr(), |c| async move {
        let e = c.auth("x.y").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::InvalidArgument));
        c.add(&q("t", "q"), vec![NewMessage::new(b"m".to_vec())]).await.unwrap();
    });
    common::stop(server);
}

#[test]
fn queueberd_refuses_a_public_address_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_queueberd"))
        .args(["--listen", "0.0.0.0:0", "--metrics-listen", "off", "--no-pin"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("queueberd runs");
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("without --auth-file"), "{log}");

    let bad = dir.path().join("auth.toml");
    std::fs::write(
        &bad,
        "[[token]]\nid = \"a\"\nsha256 = \"00\"\ntenant = \"t\"\npermissions = [\"send\"]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_queueberd"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off", "--no-pin"])
        .arg("--auth-file")
        .arg(&bad)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("queueberd runs");
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("line 1") && log.contains("64 hex digits"), "{log}");
}

#[test]
fn the_cli_presents_its_token() {
    let token = new_token("acme", &[Permission::Send, Permission::Admin], &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 1);
    config.access = Some(Arc::new(Access::new(Tokens::parse(&token.entry, "t").unwrap())));
    let server = server::start(config).expect("server starts");
    let cli = |token: Option<&str>, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_queueber"));
        c.env_remove("QUEUEBER_TOKEN")
            .args(["--addr", &server.local_addr().to_string(), "--tenant", "acme", "--json"]);
        if let Some(t) = token {
            c.env("QUEUEBER_TOKEN", t);
        }
        c.args(args).output().expect("queueber runs")
    };
    let refused = cli(None, &["add", "jobs", "x"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stdout).contains("unauthenticated"));
    let added = cli(Some(&token.secret), &["add", "jobs", "x"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let stats = cli(Some(&token.secret), &["stats", "jobs"]);
    assert!(String::from_utf8_lossy(&stats.stdout).contains("\"visible\":1"));
    common::stop(server);
}

#[test]
fn sighup_reloads_tokens_and_revokes_removed_ones() {
    let keep = new_token("acme", &[Permission::Send], &[]).unwrap();
    let drop = new_token("acme", &[Permission::Send], &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(&file, format!("{}{}", keep.entry, drop.entry)).unwrap();
    let mut server = daemon::DaemonSpec::new(&dir.path().join("data"), "wal")
        .arg("--auth-file")
        .arg(file.to_str().unwrap())
        .start();
    let auth = |w: &mut wire::Wire, id, token: &str| {
        w.call(
            id,
            queueber::protocol::Op::Auth(queueber::ops::Auth {
                token: token.to_string(),
            }),
        )
        .result
    };
    let add = |w: &mut wire::Wire, id| w.add_one(id, &q("acme", "jobs"), b"m".to_vec()).result;
    let (mut kept, mut dropped) = (wire::Wire::connect(server.addr), wire::Wire::connect(server.addr));
    assert!(auth(&mut kept, 1, &keep.secret).is_ok());
    assert!(auth(&mut dropped, 1, &drop.secret).is_ok());
    assert!(add(&mut dropped, 2).is_ok());

    // A file that does not parse changes nothing.
    std::fs::write(&file, "this is not toml [").unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log_text().contains("reload failed") {
        assert!(
            Instant::now() < deadline,
            "no reload failure logged:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(add(&mut dropped, 3).is_ok(), "the old tokens stay after a bad reload");

    // Without `drop`: its connection, idle, is told why and closed without
    // sending anything more; `keep` goes on.
    std::fs::write(&file, &keep.entry).unwrap();
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGHUP) }, 0);
    while !server.log_text().contains("auth file reloaded") {
        assert!(Instant::now() < deadline, "no reload logged:\n{}", server.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    dropped.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let told = dropped.read_all().expect("closed, not reset, and within 10 s");
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].id, 0);
    let refused = told[0].result.clone().unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unauthenticated);
    assert!(refused.message.contains("revoked"), "{}", refused.message);
    assert!(add(&mut kept, 5).is_ok());
    let fresh = &mut wire::Wire::connect(server.addr);
    assert_eq!(
        auth(fresh, 1, &drop.secret).unwrap_err().code,
        ErrorCode::Unauthenticated
    );
    // The refusal is logged with the token's id and never its secret.
    let (id, secret) = drop.secret.rsplit_once('.').unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log_text().contains("refused a token") {
        assert!(Instant::now() < deadline, "no refusal logged:\n{}", server.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = server.log_text();
    assert!(log.contains(id), "{log}");
    assert!(
        !log.contains(secret) && !log.contains(&keep.secret),
        "a secret in the log:\n{log}"
    );
    server.terminate();
}

/// The bad-input side of access control: before a valid `auth`, no frame
/// executes anything. Every operation (valid frames), then thousands of
/// mutations of them (bit flips, overwritten bytes, truncations, garbage
/// tails) on fresh connections: every answer is `hello`'s, or a refusal or
/// decoding error, never another success; and the queue that was there
/// before is untouched (its message still visible, no queue created).
#[test]
fn no_frame_executes_anything_before_auth() {
    use queueber::protocol::{Op, Reply};

    let admin = new_token("acme", &[Permission::Send, Permission::Consume, Permission::Admin], &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 2);
    config.access = Some(Arc::new(Access::new(Tokens::parse(&admin.entry, "t").unwrap())));
    let server = server::start(config).expect("server starts");
    let addr = server.local_addr();
    let secret = admin.secret.clone();
    common::with_client(addr, move |c| async move {
        c.auth(&secret).await.unwrap();
        c.add(&q("acme", "jobs"), vec![NewMessage::new(b"keep".to_vec())])
            .await
            .unwrap();
    });

    let jobs = q("acme", "jobs");
    let every_op = every_op(&jobs, &q("acme", "created"), &q("acme", "made"));
    assert_eq!(every_op.len() + 1, Op::NAMES.len(), "a new operation belongs here");
    let frames: Vec<Vec<u8>> = every_op
        .iter()
        .enumerate()
        .map(|(i, op)| wire::frame(i as u64 + 1, op.clone()))
        .collect();

    let executed = |responses: &[queueber::protocol::Response]| {
        responses
            .iter()
            .filter(|r| matches!(&r.result, Ok(reply) if !matches!(reply, Reply::Hello(_))))
            .map(|r| format!("{r:?}"))
            .collect::<Vec<_>>()
    };
    // Each valid frame: refused unauthenticated (hello answered).
    let mut w = wire::Wire::connect(addr);
    for (frame, op) in frames.iter().zip(&every_op) {
        w.send(frame);
        let answer = w.recv();
        match op {
            Op::Hello(_) => assert!(answer.result.is_ok()),
            _ => assert_eq!(answer.result.unwrap_err().code, ErrorCode::Unauthenticated, "{op:?}"),
        }
    }
    drop(w);

    // Mutations, 25 per connection, 2,000 in all (xorshift: reproducible):
    // changed bytes first, then one that breaks the framing (a truncation
    // or a garbage tail), after which the server closes.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    let mut answered = 0;
    for _ in 0..80 {
        let mut w = wire::Wire::connect(addr);
        for i in 0..25 {
            let mut frame = frames[next(frames.len())].clone();
            let kind = if i < 24 { next(2) } else { 2 + next(2) };
            match kind {
                // Past the segment table (8 bytes): the frame stays a frame.
                0 => {
                    let at = 8 + next(frame.len() - 8);
                    frame[at] ^= 1 << next(8);
                }
                1 => {
                    for _ in 0..1 + next(4) {
                        let at = 8 + next(frame.len() - 8);
                        frame[at] = next(256) as u8;
                    }
                }
                2 => frame.truncate(8 + next(frame.len() - 8)),
                _ => frame.extend((0..next(64)).map(|_| next(256) as u8)),
            }
            // The server may already have closed (framing lost).
            if std::io::Write::write_all(&mut w.stream, &frame).is_err() {
                break;
            }
        }
        w.half_close();
        let answers = w.read_all().unwrap_or_default();
        assert_eq!(executed(&answers), Vec::<String>::new());
        answered += answers.len();
    }
    // Not vacuous: most mutated frames still decode and are answered.
    assert!(answered > 1_000, "only {answered} answers");

    let secret = admin.secret.clone();
    common::with_client(addr, move |c| async move {
        c.auth(&secret).await.unwrap();
        assert_eq!(c.list_queues().await.unwrap(), vec![q("acme", "jobs")]);
        let stats = c.stats(&q("acme", "jobs")).await.unwrap();
        assert_eq!((stats.visible, stats.in_flight), (1, 0), "{stats:?}");
    });
    common::stop(server);
}

/// One request of every operation but `auth`: on `target`, except the add
/// (to `fresh`) and the create (of `made`), so that a test can tell whether
/// either ran. The lease and message ids are made up.
fn every_op(target: &QueueName, fresh: &QueueName, made: &QueueName) -> Vec<queueber::protocol::Op> {
    use queueber::ids::{LeaseId, MessageId};
    use queueber::ops;
    use queueber::protocol::Op;
    let (lease, id) = (LeaseId([7; 16]), MessageId([9; 16]));
    let ops = vec![
        Op::Hello(ops::Hello),
        Op::Add(ops::Add {
            queue: fresh.clone(),
            messages: vec![NewMessage::new(b"x".to_vec())],
        }),
        Op::Poll(ops::Poll {
            queue: target.clone(),
            max_items: 10,
            lease_ms: 60_000,
            wait_ms: 0,
        }),
        Op::Remove(ops::Remove {
            queue: target.clone(),
            lease,
            ids: vec![id],
        }),
        Op::Extend(ops::Extend {
            queue: target.clone(),
            lease,
            lease_ms: 1,
        }),
        Op::Release(ops::Release {
            queue: target.clone(),
            lease,
            id,
            delay_ms: 0,
        }),
        Op::Stats(ops::Stats { queue: target.clone() }),
        Op::ListQueues(ops::ListQueues),
        Op::Purge(ops::Purge { queue: target.clone() }),
        Op::Delete(ops::Delete { queue: target.clone() }),
        Op::Peek(ops::Peek {
            queue: target.clone(),
            max_items: 10,
            cursor: None,
            dead: true,
        }),
        Op::Fail(ops::Fail {
            queue: target.clone(),
            lease,
            id,
            error: "x".into(),
            dead: true,
        }),
        Op::Redrive(ops::Redrive {
            queue: target.clone(),
            max: 0,
            ids: Vec::new(),
        }),
        Op::RemoveAndPoll(ops::RemoveAndPoll {
            queue: target.clone(),
            lease: Some(lease),
            ids: vec![id],
            max_items: 10,
            lease_ms: 60_000,
            wait_ms: 0,
        }),
        Op::CreateQueue(ops::CreateQueue {
            queue: made.clone(),
            policy: Box::default(),
        }),
        Op::GetPolicy(ops::GetPolicy { queue: target.clone() }),
        Op::SetPolicy(ops::SetPolicy {
            queue: target.clone(),
            policy: Box::new(queueber::types::QueuePolicy {
                max_depth: Some(1),
                ..Default::default()
            }),
        }),
    ];
    ops
}

/// The permission the table gives each operation. Exhaustive, so a
/// new operation must be placed before this compiles.
fn needs(op: &queueber::protocol::Op) -> Option<Permission> {
    use queueber::protocol::Op;
    match op {
        Op::Hello(_) | Op::Auth(_) => None,
        Op::Add(_) => Some(Permission::Send),
        Op::Poll(_) | Op::Remove(_) | Op::Extend(_) | Op::Release(_) | Op::Fail(_) | Op::RemoveAndPoll(_) => {
            Some(Permission::Consume)
        }
        Op::CreateQueue(_)
        | Op::GetPolicy(_)
        | Op::SetPolicy(_)
        | Op::Purge(_)
        | Op::Delete(_)
        | Op::Peek(_)
        | Op::Redrive(_)
        | Op::Stats(_)
        | Op::ListQueues(_) => Some(Permission::Admin),
    }
}

#[test]
fn every_operation_needs_exactly_its_permission_over_tcp() {
    every_operation_needs_exactly_its_permission(false);
}

#[test]
fn every_operation_needs_exactly_its_permission_over_tls() {
    every_operation_needs_exactly_its_permission(true);
}

/// Each operation against tokens with one permission each: allowed (any
/// answer but `permissionDenied`) exactly when the token has the operation's
/// permission; a token limited to `orders.*` is refused every queue outside
/// it; another tenant's token is refused every queue of this one. `hello`
/// says, before `auth`, that a token is required.
fn every_operation_needs_exactly_its_permission(tls: bool) {
    use queueber::protocol::{Op, Reply};
    let tokens = [
        new_token("acme", &[Permission::Send], &[]).unwrap(),
        new_token("acme", &[Permission::Consume], &[]).unwrap(),
        new_token("acme", &[Permission::Admin], &[]).unwrap(),
        new_token(
            "acme",
            &[Permission::Send, Permission::Consume, Permission::Admin],
            &["orders.*".into()],
        )
        .unwrap(),
        new_token(
            "other",
            &[Permission::Send, Permission::Consume, Permission::Admin],
            &[],
        )
        .unwrap(),
    ];
    let file: String = tokens.iter().map(|t| t.entry.as_str()).collect::<Vec<_>>().join("\n");
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 2);
    config.access = Some(Arc::new(Access::new(Tokens::parse(&file, "test").unwrap())));
    let pki = common::pki::Pki::new(dir.path(), "matrix");
    if tls {
        config.tls = Some(pki.server(None));
    }
    let server = server::start(config).expect("server starts");
    let secrets: Vec<String> = tokens.iter().map(|t| t.secret.clone()).collect();
    let scenario = move |clients: Vec<queueber::client::Client>| async move {
        let info = clients[0].hello().await.unwrap();
        assert!(info.auth_required, "hello announces that tokens are required");
        for (c, secret) in clients.iter().zip(&secrets) {
            c.auth(secret).await.unwrap();
        }
        let (orders, billing) = (q("acme", "orders.eu"), q("acme", "billing"));
        for queue in [&orders, &billing] {
            clients[2].create_queue(queue, Default::default()).await.unwrap();
            clients[0]
                .add(queue, vec![NewMessage::new(b"m".to_vec())])
                .await
                .unwrap();
        }
        let mut checked = 0;
        // One permission each, on a queue of their tenant.
        for (c, has) in clients[..3]
            .iter()
            .zip([Permission::Send, Permission::Consume, Permission::Admin])
        {
            for op in every_op(&orders, &q("acme", "orders.new"), &q("acme", "orders.made")) {
                let expect = needs(&op).is_some_and(|p| p != has);
                let name = format!("{op:?}");
                assert_eq!(refused(c, op).await, expect, "{has:?} token, {name}");
                checked += 1;
            }
        }
        // Every permission, but only orders.*: billing is out of reach,
        // orders.eu is not (listing names no queue and is allowed).
        let limited = &clients[3];
        for op in every_op(&billing, &q("acme", "billing.new"), &q("acme", "billing.made")) {
            let expect = !matches!(op, Op::Hello(_) | Op::ListQueues(_));
            let name = format!("{op:?}");
            assert_eq!(refused(limited, op).await, expect, "orders.* token, {name}");
            checked += 1;
        }
        for op in every_op(&orders, &q("acme", "orders.new2"), &q("acme", "orders.made2")) {
            let name = format!("{op:?}");
            assert!(!refused(limited, op).await, "orders.* token, {name}");
            checked += 1;
        }
        // Another tenant's token, with every permission, on acme's queues.
        let other = &clients[4];
        for op in every_op(&billing, &q("acme", "x"), &q("acme", "y")) {
            let expect = !matches!(op, Op::Hello(_) | Op::ListQueues(_));
            let name = format!("{op:?}");
            assert_eq!(refused(other, op).await, expect, "other tenant, {name}");
            checked += 1;
        }
        // Its listing shows its own tenant only (none yet).
        match other.call(Op::ListQueues(queueber::ops::ListQueues)).await {
            Ok(Reply::Queues(queues)) => assert!(queues.iter().all(|q| q.tenant() == "other"), "{queues:?}"),
            r => panic!("{r:?}"),
        }
        checked
    };
    let checked = if tls {
        common::pki::with_tls_clients(server.local_addr(), pki.client(), 5, scenario)
    } else {
        common::with_clients(server.local_addr(), 5, scenario)
    };
    assert_eq!(checked, 6 * (queueber::protocol::Op::NAMES.len() - 1));
    common::stop(server);
}

/// Whether `op` is refused with `permissionDenied`; never with another
/// refusal that would hide one (`unauthenticated`).
async fn refused(c: &queueber::client::Client, op: queueber::protocol::Op) -> bool {
    let name = format!("{op:?}");
    match c.call(op).await {
        Err(e) if e.code() == Some(ErrorCode::PermissionDenied) => true,
        Err(e) => {
            assert_ne!(e.code(), Some(ErrorCode::Unauthenticated), "{name}: {e}");
            false
        }
        Ok(_) => false,
    }
}
