//! The real `queueberd` binary as a child process: for tests that kill it,
//! signal it, limit it (prlimit, capabilities) or read its memory from
//! `/proc`. Its log goes to a file the test can read.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

/// Whether something accepts connections at `addr`. (A connect to an unused
/// ephemeral port can connect the socket to itself; that does not count.)
pub fn listening(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
}

pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

/// How to start one.
pub struct DaemonSpec<'a> {
    pub data_dir: &'a Path,
    pub port: u16,
    pub durability: &'a str,
    pub shards: usize,
    /// Extra queueberd flags.
    pub args: Vec<String>,
    /// A command the server runs under (`prlimit ...`, `setpriv ...`).
    pub wrapper: Vec<String>,
}

impl<'a> DaemonSpec<'a> {
    pub fn new(data_dir: &'a Path, durability: &'a str) -> Self {
        Self {
            data_dir,
            port: free_port(),
            durability,
            shards: 2,
            args: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> Daemon {
        let mut daemon = self.spawn_only();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !listening(daemon.addr) {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("queueberd exited with {status}: {}", daemon.log_text());
            }
            assert!(Instant::now() < deadline, "queueberd did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// Starts the server process without waiting for it.
    pub fn spawn_only(&self) -> Daemon {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().expect("address");
        let log = self.data_dir.with_extension(format!("{}.log", self.port));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(env!("CARGO_BIN_EXE_queueberd"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_queueberd")),
        };
        let child = command
            .args(["--listen", &addr.to_string(), "--no-pin", "--log", "info"])
            .args(["--shards", &self.shards.to_string()])
            .args(["--durability", self.durability, "--block-cache-mib", "8"])
            .arg("--data-dir")
            .arg(self.data_dir)
            .args(&self.args)
            // Tests run many servers at once: no metrics endpoint unless asked.
            .args(if self.args.iter().any(|a| a == "--metrics-listen") {
                &[][..]
            } else {
                &["--metrics-listen", "off"][..]
            })
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("queueberd starts");
        Daemon { child, addr, log }
    }
}

impl Daemon {
    /// Starts a server with the usual test settings.
    pub fn start(dir: &Path, port: u16, durability: &str) -> Daemon {
        DaemonSpec {
            port,
            ..DaemonSpec::new(dir, durability)
        }
        .start()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident memory, from `/proc/<pid>/status`.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .expect("VmRSS")
    }

    /// SIGKILL: no shutdown path runs, nothing is flushed by us.
    pub fn kill(&mut self) {
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

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0);
    }

    /// Waits for the process to exit (after a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "queueberd did not stop within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the exit status of a graceful stop.
    pub fn terminate(&mut self) {
        self.signal_term();
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "graceful stop exits 0, got {status}: {}",
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    /// A failing test must not leave a server running.
    fn drop(&mut self) {
        // A failing test shows what the server said before its log goes.
        if std::thread::panicking() {
            let status = self.child.try_wait();
            eprintln!("queueberd ({status:?}) log:\n{}", self.log_text());
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
