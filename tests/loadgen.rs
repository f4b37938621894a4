//! The load generator is the instrument every performance claim is judged
//! by, so it is tested like the server: short runs of the real `loadgen`
//! binary against a real server on 127.0.0.1, reading its JSON line.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `loadgen` with `args`, killing it if it outlives `limit`.
fn loadgen(args: &[String], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loadgen ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("loadgen output")
}

/// The run's JSON line (the last line of its standard output).
fn json_line(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {stdout}"))
}

fn run_against_server(extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), 2);
    let run = successful_run(&short_run(server.local_addr(), extra));
    common::stop(server);
    run
}

/// Arguments of a one-second run against `addr` (this process stands in for
/// the server's PID), then `extra`.
fn short_run(addr: std::net::SocketAddr, extra: &[&str]) -> Vec<String> {
    let common = [
        "--addr",
        &addr.to_string(),
        "--server-pid",
        &std::process::id().to_string(),
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "-S",
        "64",
    ]
    .map(String::from);
    common.into_iter().chain(extra.iter().map(|s| s.to_string())).collect()
}

/// Runs `loadgen`, requires it to succeed, and returns its JSON line.
fn successful_run(args: &[String]) -> Value {
    let out = loadgen(args, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "loadgen failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    json_line(&out)
}

fn assert_clean(run: &Value) {
    assert_eq!(run["lost"], 0, "{run}");
    assert_eq!(run["duplicates"], 0, "{run}");
    assert_eq!(run["errors"], 0, "{run}");
    assert!(run["removed_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{run}");
    assert!(run["end_to_end"]["count"].as_u64().unwrap_or(0) > 0, "{run}");
    assert!(run["server_cpu_us_per_msg"].as_f64().is_some(), "{run}");
}

#[test]
fn closed_loop_over_queues_on_both_shards_loses_nothing() {
    let run = run_against_server(&["-B", "8", "-Q", "4", "--per-shard", "--max-unacked", "256"]);
    assert_clean(&run);
    let by_shard = run["removed_per_s_by_shard"].as_array().expect("per-shard rates");
    assert_eq!(by_shard.len(), 2, "{run}");
    assert!(by_shard.iter().all(|r| r.as_f64().unwrap_or(0.0) > 0.0), "{run}");
    // Send lag is an open-loop measure only.
    assert!(run["send_lag"].is_null(), "{run}");
}

#[test]
fn open_loop_holds_its_rate_and_reports_send_lag() {
    let run = run_against_server(&["-B", "1", "--rate", "500"]);
    assert_clean(&run);
    let added = run["added_per_s"].as_f64().unwrap_or(0.0);
    // Paced, not flat out: within a wide band around the asked rate.
    assert!((250.0..=750.0).contains(&added), "{run}");
    assert!(run["send_lag"]["count"].as_u64().unwrap_or(0) > 0, "{run}");
}

#[test]
fn an_unreachable_server_fails_the_run() {
    // A port nothing listens on: bind one, learn it, close it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port");
    let out = loadgen(
        &["--addr".into(), addr.to_string(), "--duration".into(), "0.2".into()],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loadgen:"));
}

/// A stand-in for Redis speaking the four commands the baseline sends, so the
/// generator's Redis path is tested without installing Redis: lists live in a
/// map, `BLMOVE` waits on a condition variable up to its timeout.
mod fake_redis {
    use std::collections::{HashMap, VecDeque};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    #[derive(Default)]
    pub struct Lists {
        pub lists: HashMap<Vec<u8>, VecDeque<Vec<u8>>>,
        pub calls: HashMap<String, u64>,
    }

    pub type Shared = Arc<(Mutex<Lists>, Condvar)>;

    pub fn start() -> (SocketAddr, Shared) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared: Shared = Arc::default();
        let state = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let state = state.clone();
                std::thread::spawn(move || serve(conn, state));
            }
        });
        (addr, shared)
    }

    fn read_command(r: &mut BufReader<TcpStream>) -> Option<Vec<Vec<u8>>> {
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let n: usize = line.trim_end().strip_prefix('*')?.parse().ok()?;
        let mut args = Vec::with_capacity(n);
        for _ in 0..n {
            line.clear();
            r.read_line(&mut line).ok()?;
            let len: usize = line.trim_end().strip_prefix('$')?.parse().ok()?;
            let mut arg = vec![0u8; len + 2];
            r.read_exact(&mut arg).ok()?;
            arg.truncate(len);
            args.push(arg);
        }
        Some(args)
    }

    fn serve(conn: TcpStream, state: Shared) {
        let mut writer = conn.try_clone().expect("clone");
        let mut reader = BufReader::new(conn);
        while let Some(args) = read_command(&mut reader) {
            let reply = answer(&args, &state);
            if writer.write_all(&reply).is_err() {
                return;
            }
        }
    }

    fn bulk(v: &[u8]) -> Vec<u8> {
        let mut out = format!("${}\r\n", v.len()).into_bytes();
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
        out
    }

    fn answer(args: &[Vec<u8>], state: &Shared) -> Vec<u8> {
        let (lock, cond) = &**state;
        let name = String::from_utf8_lossy(&args[0]).to_uppercase();
        let mut s = lock.lock().expect("lock");
        *s.calls.entry(name.clone()).or_default() += 1;
        match (name.as_str(), args.len()) {
            ("PING", 1) => b"+PONG\r\n".to_vec(),
            ("LPUSH", n) if n >= 3 => {
                let list = s.lists.entry(args[1].clone()).or_default();
                for v in &args[2..] {
                    list.push_front(v.clone());
                }
                let len = list.len();
                cond.notify_all();
                format!(":{len}\r\n").into_bytes()
            }
            ("BLMOVE", 6) => {
                let secs: f64 = String::from_utf8_lossy(&args[5]).parse().unwrap_or(0.0);
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                loop {
                    if let Some(v) = s.lists.get_mut(&args[1]).and_then(|l| l.pop_back()) {
                        s.lists.entry(args[2].clone()).or_default().push_front(v.clone());
                        return bulk(&v);
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return b"*-1\r\n".to_vec();
                    }
                    s = cond.wait_timeout(s, deadline - now).expect("wait").0;
                }
            }
            ("LREM", 4) => {
                let list = s.lists.entry(args[1].clone()).or_default();
                match list.iter().position(|v| *v == args[3]) {
                    Some(i) => {
                        list.remove(i);
                        b":1\r\n".to_vec()
                    }
                    None => b":0\r\n".to_vec(),
                }
            }
            _ => format!("-ERR unknown command {name}\r\n").into_bytes(),
        }
    }
}

#[test]
fn the_redis_baseline_moves_every_message_through_lpush_blmove_lrem() {
    let (addr, state) = fake_redis::start();
    let args = short_run(
        addr,
        &[
            "--backend",
            "redis",
            "-B",
            "1",
            "-P",
            "2",
            "-C",
            "2",
            "--depth",
            "2",
            "--rate",
            "400",
            "--wait-ms",
            "200",
        ],
    );
    let run = successful_run(&args);
    assert_clean(&run);
    assert_eq!(run["backend"], "redis", "{run}");
    let s = state.0.lock().expect("lock");
    let calls = |c: &str| s.calls.get(c).copied().unwrap_or(0);
    let total_added = calls("LPUSH");
    assert!(total_added > 0, "no LPUSH reached the server");
    // Every add was moved to the in-flight list and acknowledged from it.
    assert!(calls("BLMOVE") >= total_added);
    assert_eq!(calls("LREM"), total_added);
    assert!(s.lists.values().all(|l| l.is_empty()), "messages left behind");
}

#[test]
fn the_redis_baseline_refuses_batches() {
    let out = loadgen(
        &["--backend".into(), "redis".into(), "-B".into(), "4".into()],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-B 1"));
}
