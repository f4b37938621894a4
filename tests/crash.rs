//! Crash tests: the real `queueberd` binary is killed with SIGKILL after it
//! acknowledged adds, then restarted on the same data directory. In every
//! durability mode the WAL is written before an add is acknowledged, so a
//! killed process (as opposed to a lost machine) loses nothing.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{queue_on_shard, with_client};
use queueber::storage::NewMessage;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

impl Drop for Daemon {
    /// A failing test must not leave a server running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether something accepts connections at `addr`. (A connect to an unused
/// ephemeral port can connect the socket to itself; that does not count.)
fn listening(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect(addr).is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
}

impl Daemon {
    fn start(dir: &std::path::Path, port: u16, durability: &str) -> Daemon {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_queueberd"))
            .args([
                "--listen",
                &addr.to_string(),
                "--shards",
                "2",
                "--no-pin",
                "--log",
                "warn",
            ])
            .args(["--durability", durability, "--block-cache-mib", "8"])
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("queueberd starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !listening(addr) {
            assert!(Instant::now() < deadline, "queueberd did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, addr }
    }

    /// SIGKILL: no shutdown path runs, nothing is flushed by us.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
        // The dead process's io_uring keeps its listening sockets alive for
        // a moment after it is reaped; do not mistake them for the next one.
        let deadline = Instant::now() + Duration::from_secs(10);
        while listening(self.addr) {
            assert!(Instant::now() < deadline, "the killed server still listens");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the exit status of a graceful stop.
    fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "graceful stop exits 0, got {status}");
                return;
            }
            assert!(Instant::now() < deadline, "queueberd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn acknowledged_adds_and_leases_survive_sigkill_in_every_mode() {
    for durability in ["fsync", "periodic", "wal"] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let queues = [queue_on_shard("crash", 0, 2), queue_on_shard("crash", 1, 2)];

        let mut daemon = Daemon::start(dir.path(), port, durability);
        let qs = queues.clone();
        let (added, leased) = with_client(daemon.addr, move |c| async move {
            let mut added = BTreeSet::new();
            for round in 0..20 {
                for queue in &qs {
                    let batch = (0..10)
                        .map(|i| NewMessage::new(format!("{round}-{i}").into_bytes()))
                        .collect();
                    added.extend(c.add(queue, batch).await.unwrap());
                }
            }
            let lease = c.poll(&qs[0], 5, 600_000, 0).await.unwrap().unwrap();
            (added, lease)
        });
        daemon.kill();

        let mut daemon = Daemon::start(dir.path(), port, durability);
        let found = with_client(daemon.addr, move |c| async move {
            let mut found = BTreeSet::new();
            // The lease taken before the crash still holds its messages.
            let ids = leased.messages.iter().map(|m| m.id).collect();
            assert_eq!(c.remove(&queues[0], leased.id, ids).await.unwrap(), vec![true; 5]);
            found.extend(leased.messages.iter().map(|m| m.id));
            for queue in &queues {
                while let Some(lease) = c.poll(queue, 100, 60_000, 0).await.unwrap() {
                    found.extend(lease.messages.iter().map(|m| m.id));
                }
            }
            found
        });
        assert_eq!(
            found, added,
            "{durability}: acknowledged adds lost or invented after SIGKILL"
        );
        daemon.terminate();
    }
}
