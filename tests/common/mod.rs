//! Shared fixtures of the integration tests: a real server on 127.0.0.1 with
//! an ephemeral port and a temporary data directory, and a client on its own
//! glommio executor. Everything that crosses cores runs under a timeout.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use queueber::client::Client;
use queueber::names::QueueName;
use queueber::server::{self, ServerConfig, ServerHandle, ServerLimits};
use queueber::storage::Durability;

pub mod pki;

/// Longest any single test scenario may take before it is declared hung.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);

pub fn config(dir: &Path, shards: usize) -> ServerConfig {
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir);
    config.shards = shards;
    // Many test servers share two cores: let the scheduler place them.
    config.pin = false;
    config.durability = Durability::Wal;
    config.io_memory = 256 << 10;
    config.block_cache_bytes = 8 << 20;
    config.write_buffer_bytes = 4 << 20;
    // Tests must not depend on how full the machine's disk is.
    config.min_free_disk_bytes = 0;
    config
}

pub fn start(dir: &Path, shards: usize) -> ServerHandle {
    server::start(config(dir, shards)).expect("server starts")
}

pub fn start_with_limits(dir: &Path, shards: usize, limits: ServerLimits) -> ServerHandle {
    let mut config = config(dir, shards);
    config.limits = limits;
    server::start(config).expect("server starts")
}

/// Runs `scenario` with `connections` fresh clients on a new executor thread
/// and returns its result; panics if it takes longer than [`SCENARIO_TIMEOUT`].
pub fn with_clients<T, F, Fut>(addr: SocketAddr, connections: usize, scenario: F) -> T
where
    T: Send + 'static,
    F: FnOnce(Vec<Client>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    on_client_executor(move || async move {
        let mut clients = Vec::new();
        for _ in 0..connections {
            let stream = glommio::net::TcpStream::connect(addr).await.expect("connect");
            let (client, driver) = Client::new(stream);
            glommio::spawn_local(driver).detach();
            clients.push(client);
        }
        scenario(clients).await
    })
}

/// Runs the future `make` makes on a new client executor thread and returns
/// its result; panics if it takes longer than [`SCENARIO_TIMEOUT`].
pub fn on_client_executor<T, M, Fut>(make: M) -> T
where
    T: Send + 'static,
    M: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    queueber::runtime::executor("test-client", None, 256 << 10)
        .spawn(move || async move {
            queueber::runtime::within(SCENARIO_TIMEOUT, make())
                .await
                .expect("scenario timed out")
        })
        .expect("client executor")
        .join()
        .expect("client executor join")
}

pub fn with_client<T, F, Fut>(addr: SocketAddr, scenario: F) -> T
where
    T: Send + 'static,
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    with_clients(addr, 1, |mut clients| scenario(clients.remove(0)))
}

/// Shuts a server down gracefully, failing the test (instead of hanging the
/// suite) if that takes longer than [`SCENARIO_TIMEOUT`].
pub fn stop(server: ServerHandle) {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(server.shutdown());
    });
    match finished.recv_timeout(SCENARIO_TIMEOUT) {
        Ok(result) => result.expect("clean shutdown"),
        Err(_) => panic!("server shutdown hung for {SCENARIO_TIMEOUT:?}"),
    }
}

/// A queue name owned by `shard` of `shards`.
pub fn queue_on_shard(prefix: &str, shard: usize, shards: usize) -> QueueName {
    (0..)
        .map(|i| QueueName::new("test", format!("{prefix}{i}")).unwrap())
        .find(|q| q.shard(shards) == shard)
        .unwrap()
}
