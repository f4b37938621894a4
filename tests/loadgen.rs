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
    let mut args: Vec<String> = [
        "--addr",
        &server.local_addr().to_string(),
        "--server-pid",
        &std::process::id().to_string(),
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "-S",
        "64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = loadgen(&args, Duration::from_secs(60));
    common::stop(server);
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
