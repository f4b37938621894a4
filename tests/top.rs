//! `queueber top` against a real `queueberd` with a metrics endpoint: the
//! `--once --json` snapshot (exact counts, rates, every shard), the text
//! report, an unreachable endpoint, and the live view in a real terminal
//! (tmux): it shows the queues, sorts on keys and quits on q, Esc and
//! Ctrl-C. Every child process and every wait is bounded.

#[path = "common/daemon.rs"]
mod daemon;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use daemon::{free_port, listening, Daemon, DaemonSpec};
use serde_json::Value;

const CLI: &str = env!("CARGO_BIN_EXE_queueber");

/// Runs a command to its end, killing it after `limit`.
fn run(command: &mut Command, limit: Duration) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => {
            waiter.join().expect("waiter");
            output.expect("the command's output")
        }
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            waiter.join().expect("waiter");
            panic!("{command:?} did not finish within {limit:?}");
        }
    }
}

/// A server with its metrics endpoint on another free port.
fn server(dir: &Path) -> (Daemon, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let daemon = DaemonSpec::new(&dir.join("data"), "periodic")
        .arg("--metrics-listen")
        .arg(&metrics)
        .start();
    let addr: SocketAddr = metrics.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listening(addr) {
        assert!(Instant::now() < deadline, "the metrics endpoint did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    (daemon, metrics)
}

/// Runs the CLI against the server; it must succeed.
fn cli(server: &Daemon, args: &[&str]) -> String {
    let out = run(
        Command::new(CLI)
            .args(args)
            .env("QUEUEBER_ADDR", server.addr.to_string()),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "queueber {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn top(args: &[&str]) -> Output {
    run(
        Command::new(CLI).arg("top").args(args).env_remove("QUEUEBER_METRICS"),
        Duration::from_secs(30),
    )
}

fn top_json(args: &[&str]) -> Value {
    let out = top(args);
    assert!(
        out.status.success(),
        "top {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

fn queue<'a>(doc: &'a Value, tenant: &str, name: &str) -> &'a Value {
    doc["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["tenant"] == tenant && q["queue"] == name)
        .unwrap_or_else(|| panic!("no queue {tenant}/{name} in {doc:#}"))
}

#[test]
fn once_json_has_exact_counts_rates_and_every_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, metrics) = server(dir.path());
    cli(&server, &["add", "jobs", "a", "b", "c", "d", "e"]);
    cli(&server, &["add", "--delay-ms", "600000", "jobs", "later"]);
    cli(&server, &["poll", "jobs", "-n", "2"]);
    cli(&server, &["--tenant", "other", "add", "idle", "x"]);

    let doc = top_json(&["--once", "--json", "--metrics", &metrics, "--interval-ms", "200"]);
    let jobs = queue(&doc, "default", "jobs");
    assert_eq!(jobs["visible"], 3, "{doc:#}");
    assert_eq!(jobs["delayed"], 1);
    assert_eq!(jobs["in_flight"], 2);
    assert_eq!(jobs["dead"], 0);
    for rate in ["adds_per_s", "deliveries_per_s", "removes_per_s"] {
        assert!(jobs[rate].as_f64().is_some_and(|r| r >= 0.0), "{rate} in {jobs:#}");
    }
    assert!(jobs["oldest_age_s"].as_f64().is_some_and(|a| a >= 0.0));
    assert_eq!(queue(&doc, "other", "idle")["visible"], 1);
    // Sorted by visible messages, largest first.
    assert_eq!(doc["queues"][0]["queue"], "jobs");
    let shards = doc["shards"].as_array().expect("shards");
    assert_eq!(
        shards.iter().map(|s| s["shard"].as_u64().unwrap()).collect::<Vec<_>>(),
        [0, 1],
        "{doc:#}"
    );
    for s in shards {
        assert!(s["batches_per_s"].as_f64().is_some_and(|r| r >= 0.0), "{s:#}");
        assert!(s["pending_requests"].as_u64().is_some());
    }
    assert_eq!(doc["server"]["ready"], true);
    assert!(doc["server"]["requests_per_s"].as_f64().is_some_and(|r| r >= 0.0));
    assert!(doc["server"]["wal_syncs_per_s"].as_f64().is_some());
    assert!(doc["server"]["rss_bytes"].as_u64().is_some_and(|b| b > 0));
    assert!(doc["interval_s"].as_f64().is_some_and(|s| s >= 0.2));

    // Messages added between the two scrapes show as a rate.
    let child = std::thread::spawn({
        let metrics = metrics.clone();
        move || top_json(&["--once", "--json", "--metrics", &metrics, "--interval-ms", "2000"])
    });
    std::thread::sleep(Duration::from_millis(500));
    cli(
        &server,
        &["add", "burst", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"],
    );
    let doc = child.join().expect("top");
    let burst = queue(&doc, "default", "burst");
    assert_eq!(burst["visible"], 10);
    let rate = burst["adds_per_s"].as_f64().expect("an add rate");
    assert!(rate > 0.0 && rate <= 10.0 / 1.5, "10 adds over ~2 s gave {rate}/s");

    // The text report: both tables with their headers.
    let out = top(&["--once", "--metrics", &metrics, "--interval-ms", "100"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for expected in [
        "SHARD",
        "BATCHES/S",
        "P99 BATCH",
        "QUEUE",
        "VISIBLE",
        "IN FLIGHT",
        "DEAD",
        "default/jobs",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    let first_queue = text.lines().skip_while(|l| !l.starts_with("QUEUE")).nth(1).unwrap();
    assert!(first_queue.starts_with("default/burst "), "{text}");
}

#[test]
fn an_unreachable_endpoint_is_an_error_in_time() {
    let nobody = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = top(&["--once", "--json", "--metrics", &nobody, "--interval-ms", "100"]);
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(15));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(doc["error"], "metrics", "{doc}");
    assert!(doc["message"].as_str().unwrap().contains(&nobody), "{doc}");
    // Without a terminal the live view says what to use instead.
    let out = top(&["--metrics", &nobody]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--once"));
}

/// A tmux server of its own (its socket in the test's directory, no
/// configuration), killed on drop whatever happens.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn new(dir: &Path) -> Tmux {
        static N: AtomicUsize = AtomicUsize::new(0);
        Tmux {
            socket: dir.join(format!("tmux-{}.sock", N.fetch_add(1, Ordering::Relaxed))),
        }
    }

    fn cmd(&self, args: &[&str]) -> Output {
        run(
            Command::new("tmux")
                .arg("-S")
                .arg(&self.socket)
                .args(["-f", "/dev/null"])
                .args(args)
                .env("LANG", "C.UTF-8"),
            Duration::from_secs(10),
        )
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.cmd(&["has-session", "-t", "top"]).status.success()
    }

    fn keys(&self, keys: &str) {
        assert!(self.cmd(&["send-keys", "-t", "top", keys]).status.success());
    }

    /// Waits until the screen satisfies `ok`.
    fn wait_for(&self, what: &str, errors: &Path, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what}:\n{screen}\nstderr: {}",
                std::fs::read_to_string(errors).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn tmux_available() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Which of `a` and `b` comes first on the screen.
fn above(screen: &str, a: &str, b: &str) -> bool {
    match (screen.find(a), screen.find(b)) {
        (Some(i), Some(j)) => i < j,
        _ => false,
    }
}

#[test]
fn the_live_view_shows_queues_sorts_on_keys_and_quits() {
    if !tmux_available() {
        eprintln!("skipped: tmux is not installed (the live view needs a terminal)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, metrics) = server(dir.path());
    cli(&server, &["add", "aaa", "1"]);
    cli(&server, &["add", "zzz", "1", "2", "3"]);
    let errors: PathBuf = dir.path().join("top.stderr");

    for (quit, name) in [("q", "q"), ("Escape", "Esc"), ("C-c", "Ctrl-C")] {
        let tmux = Tmux::new(dir.path());
        let command = format!(
            "exec '{CLI}' top --metrics {metrics} --interval-ms 200 2>'{}'",
            errors.display()
        );
        let started = tmux.cmd(&["new-session", "-d", "-s", "top", "-x", "160", "-y", "40", &command]);
        assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
        let screen = tmux.wait_for("the queues and both headers", &errors, |s| {
            s.contains("default/aaa") && s.contains("default/zzz") && s.contains("VISIBLE") && s.contains("SHARD")
        });
        assert!(screen.contains("q quit"), "no footer:\n{screen}");
        if name == "q" {
            // Visible first (zzz has 3), then by name, then back.
            assert!(above(&screen, "default/zzz", "default/aaa"), "{screen}");
            tmux.keys("n");
            tmux.wait_for("the queues by name", &errors, |s| {
                above(s, "default/aaa", "default/zzz") && s.contains("QUEUE▲")
            });
            tmux.keys("v");
            tmux.wait_for("the queues by visible", &errors, |s| {
                above(s, "default/zzz", "default/aaa") && s.contains("VISIBLE▼")
            });
            // Rates appear once there are two scrapes.
            tmux.wait_for("rates", &errors, |s| !s.contains("rates after the next scrape"));
        }
        tmux.keys(quit);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tmux.alive() {
            assert!(
                Instant::now() < deadline,
                "top did not quit on {name}:\n{}",
                tmux.screen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let stderr = std::fs::read_to_string(&errors).unwrap_or_default();
        assert!(stderr.is_empty(), "top wrote to stderr: {stderr}");
    }
}
