//! TLS against a real server, with certificates made in the test: a TLS
//! client is served; a plaintext client on the TLS port and a TLS client on
//! a plaintext port get a clean error, not a hang; client certificates
//! required, missing, and from the wrong CA; silent clients closed; and
//! queueberd's flags, the CLI, `top` over an https metrics endpoint, and a
//! certificate reloaded on SIGHUP.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/wire.rs"]
mod wire;

use std::io::Read;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::pki::{self, Pki};
use queueber::names::QueueName;
use queueber::ops;
use queueber::protocol::{ErrorCode, Op};
use queueber::server::{self, ServerLimits};
use queueber::types::NewMessage;

fn q(queue: &str) -> QueueName {
    QueueName::new("t", queue).unwrap()
}

#[test]
fn a_tls_client_is_served_and_a_plaintext_one_is_told_to_use_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "a");
    let mut config = common::config(&dir.path().join("data"), 2);
    config.tls = Some(pki.server(None));
    let server = server::start(config).expect("server starts");
    let addr = server.local_addr();
    pki::with_tls_clients(addr, pki.client(), 2, |clients| async move {
        let (producer, consumer) = (&clients[0], &clients[1]);
        assert_eq!(producer.hello().await.unwrap().shards, 2);
        for queue in ["x", "y", "z"] {
            producer
                .add(&q(queue), vec![NewMessage::new(queue.as_bytes().to_vec())])
                .await
                .unwrap();
            let lease = consumer.poll(&q(queue), 10, 30_000, 1_000).await.unwrap().unwrap();
            assert_eq!(lease.messages[0].payload, queue.as_bytes());
            let ids = vec![lease.messages[0].id];
            assert_eq!(consumer.remove(&q(queue), lease.id, ids).await.unwrap(), vec![true]);
        }
    });

    // Plaintext on the TLS port: one typed error about the connection, then EOF.
    let mut plain = wire::Wire::connect(addr);
    plain.send(&wire::frame(7, Op::Hello(ops::Hello)));
    let answer = plain.recv();
    assert_eq!(answer.id, 0);
    let error = answer.result.unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidArgument);
    assert!(error.message.contains("TLS"), "{}", error.message);
    assert!(plain.read_all().expect("a clean close, not a reset").is_empty());
    common::stop(server);
}

#[test]
fn a_tls_client_on_a_plaintext_port_gets_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "a");
    let server = common::start(&dir.path().join("data"), 1);
    let addr = server.local_addr();
    let client = pki.client();
    let started = Instant::now();
    let outcome = common::on_client_executor(move || async move {
        match pki::connect(addr, &client).await {
            Ok(c) => c.hello().await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    assert!(outcome.is_err(), "a TLS handshake with a plaintext port succeeded");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    common::stop(server);
}

#[test]
fn client_certificates_are_required_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "a");
    let stranger = Pki::new(dir.path(), "b");
    let mut config = common::config(&dir.path().join("data"), 1);
    config.tls = Some(pki.server(Some(&pki.ca)));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = server::start(config).expect("server starts");
    let addr = server.local_addr();
    // Trusts the server, presents a certificate of another CA.
    let wrong =
        queueber::tls::ClientTls::new(Some(&pki.ca), Some((&stranger.client_cert, &stranger.client_key))).unwrap();
    let (none, good) = (pki.client(), pki.client_with_certificate());
    let hello = |tls: queueber::tls::ClientTls| {
        common::on_client_executor(move || async move {
            // With TLS 1.3 the client may finish its handshake before the
            // server has judged its certificate: the refusal then shows at
            // the first request.
            let client = pki::connect(addr, &tls).await.map_err(|e| e.to_string())?;
            client.hello().await.map(|_| ()).map_err(|e| e.to_string())
        })
    };
    assert!(hello(none).is_err(), "no client certificate was accepted");
    assert!(hello(wrong).is_err(), "a certificate of another CA was accepted");
    assert_eq!(hello(good), Ok(()));
    let text = metrics_text(server.metrics_addr().unwrap());
    let refused: f64 = text
        .lines()
        .filter(|l| l.starts_with("queueber_tls_refused_connections_total{") && l.contains("reason=\"handshake\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 2.0, "{text}");
    common::stop(server);
}

#[test]
fn a_silent_client_on_the_tls_port_is_closed_after_the_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "a");
    let mut config = common::config(&dir.path().join("data"), 1);
    config.tls = Some(pki.server(None));
    config.limits = ServerLimits {
        stall_timeout_ms: 300,
        max_connections: 2,
        ..ServerLimits::default()
    };
    let server = server::start(config).expect("server starts");
    let addr = server.local_addr();
    // One sends nothing; one starts a handshake record and stops.
    let silent = std::net::TcpStream::connect(addr).unwrap();
    let mut started = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut started, &[0x16, 0x03, 0x01]).unwrap();
    for mut stream in [silent, started] {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let begun = Instant::now();
        let mut rest = Vec::new();
        // EOF (or a reset), not the read timeout.
        let read = stream.read_to_end(&mut rest);
        assert!(
            begun.elapsed() < Duration::from_secs(5),
            "held for {:?}: {read:?}",
            begun.elapsed()
        );
    }
    // Their slots are free again: two TLS clients are served.
    pki::with_tls_clients(addr, pki.client(), 2, |clients| async move {
        for c in &clients {
            c.hello().await.unwrap();
        }
    });
    common::stop(server);
}

/// `GET /metrics` over plain HTTP.
fn metrics_text(addr: std::net::SocketAddr) -> String {
    let mut scrape = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut scrape, b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    scrape.read_to_string(&mut text).unwrap();
    text
}

fn cli(addr: std::net::SocketAddr, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_queueber"))
        .env_remove("QUEUEBER_TLS")
        .env_remove("QUEUEBER_TLS_CA")
        .args(["--addr", &addr.to_string(), "--tenant", "t", "--json"])
        .args(args)
        .output()
        .expect("queueber runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sighup(server: &daemon::Daemon) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGHUP) }, 0);
}

/// Waits until the server's log says `what` `times` times.
fn wait_for_log(server: &daemon::Daemon, what: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.log_text().matches(what).count() < times {
        assert!(Instant::now() < deadline, "no {what:?} logged:\n{}", server.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn queueberd_the_cli_and_top_speak_tls_and_the_certificate_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Pki::new(dir.path(), "a"), Pki::new(dir.path(), "b"));
    // The server's files: a's now, b's after the reload.
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::copy(&a.server_cert, &cert).unwrap();
    std::fs::copy(&a.server_key, &key).unwrap();
    let metrics_port = daemon::free_port();
    let server = daemon::DaemonSpec::new(&dir.path().join("data"), "wal")
        .arg("--tls-cert")
        .arg(cert.to_str().unwrap())
        .arg("--tls-key")
        .arg(key.to_str().unwrap())
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--metrics-tls")
        .start();
    let (ca_a, ca_b) = (a.ca.to_str().unwrap(), b.ca.to_str().unwrap());

    let added = cli(server.addr, &["--tls-ca", ca_a, "add", "jobs", "hello"]);
    assert!(added.status.success(), "{}", text(&added));
    let stats = cli(server.addr, &["--tls-ca", ca_a, "stats", "jobs"]);
    assert!(text(&stats).contains("\"visible\":1"), "{}", text(&stats));
    // Without TLS the CLI is told to use it.
    let plain = cli(server.addr, &["hello"]);
    assert!(!plain.status.success());
    assert!(text(&plain).contains("speaks TLS"), "{}", text(&plain));
    // A CA that did not sign the server's certificate.
    let untrusted = cli(server.addr, &["--tls-ca", ca_b, "hello"]);
    assert!(!untrusted.status.success());
    assert!(text(&untrusted).contains("TLS"), "{}", text(&untrusted));

    // `top` over the https metrics endpoint, with the same certificate.
    let endpoint = format!("https://127.0.0.1:{metrics_port}");
    let top = cli(
        server.addr,
        &[
            "--tls-ca",
            ca_a,
            "top",
            "--once",
            "--interval-ms",
            "100",
            "--metrics",
            &endpoint,
        ],
    );
    assert!(top.status.success(), "{}", text(&top));
    assert!(text(&top).contains("\"jobs\""), "{}", text(&top));
    // Plain HTTP to it gets nothing useful.
    let plain_top = cli(
        server.addr,
        &[
            "top",
            "--once",
            "--interval-ms",
            "100",
            "--metrics",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );
    assert!(!plain_top.status.success(), "{}", text(&plain_top));

    // A broken file at reload keeps the certificate in use.
    std::fs::write(&cert, "not a certificate").unwrap();
    sighup(&server);
    wait_for_log(&server, "TLS reload failed", 1);
    assert!(cli(server.addr, &["--tls-ca", ca_a, "hello"]).status.success());
    // b's certificate: new handshakes use it.
    std::fs::copy(&b.server_cert, &cert).unwrap();
    std::fs::copy(&b.server_key, &key).unwrap();
    sighup(&server);
    wait_for_log(&server, "TLS certificate reloaded", 1);
    let after = cli(server.addr, &["--tls-ca", ca_b, "hello"]);
    assert!(after.status.success(), "{}", text(&after));
    assert!(!cli(server.addr, &["--tls-ca", ca_a, "hello"]).status.success());
}

#[test]
fn queueberd_refuses_bad_tls_files_at_start_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "a");
    let start = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_queueberd"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off", "--no-pin"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(args)
            .output()
            .expect("queueberd runs")
    };
    let missing = dir.path().join("missing.pem");
    let out = start(&[
        "--tls-cert".as_ref(),
        missing.as_os_str(),
        "--tls-key".as_ref(),
        pki.server_key.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("missing.pem"), "{}", text(&out));
    // A key that is not the certificate's.
    let out = start(&[
        "--tls-cert".as_ref(),
        pki.server_cert.as_os_str(),
        "--tls-key".as_ref(),
        pki.client_key.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("a-server.pem"), "{}", text(&out));
    // A certificate without its key is a usage error.
    let out = start(&["--tls-cert".as_ref(), pki.server_cert.as_os_str()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--tls-key"), "{}", text(&out));
}
