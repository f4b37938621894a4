//! # queueber
//!
//! A durable, leased work-queue server: clients add messages to named queues,
//! poll them under a lease, and remove (acknowledge) them with that lease; an
//! expired lease makes its messages visible again. Map of the crate:
//!
//! * [`names`], [`ids`], [`clock`]: queue names and the stable shard hash,
//!   message and lease ids (UUIDv7), the injectable millisecond clock.
//! * [`storage`]: durable queue state in one shared RocksDB behind the narrow
//!   [`storage::QueueStore`] trait: the RocksDB store of one shard, and an
//!   in-memory model with the same semantics for tests.
//! * [`frame`]: Cap'n Proto stream framing that commits memory only as a
//!   frame's bytes arrive, whatever its header claims.
//! * [`protocol`]: requests and responses and their Cap'n Proto framing
//!   ([`queueber_capnp`], generated from `queueber.capnp`).
//! * [`ops`]: one module per operation (its request and reply types and
//!   codec; with `server`, its limits, routing and store mapping), and the
//!   table that dispatches over them.
//! * [`server`]: the daemon: one glommio executor per core, each owning a
//!   shard of queues with its own coalescer, long-poll waiters and sweeper;
//!   requests routed between shards over cross-core channels.
//! * [`metrics`]: what the server counts (per shard, per queue) and the
//!   Prometheus / OpenMetrics text a scrape renders.
//! * [`runtime`]: the small helpers the server leans on (blocking offload,
//!   a shard's own storage thread, CPU placement, locked memory, timeouts).
//! * `hashing`: the seeded, fast hash maps of the store's and the cores'
//!   hot paths.
//! * [`auth`]: the token file, secret verification, grants and their
//!   reload (what the server enforces per connection).
//! * [`tls`]: rustls configurations for the server, the metrics endpoint
//!   and clients, from PEM files (feature `tls`).
//! * [`client`]: an async, pipelining client over any `futures` stream
//!   (plain TCP or [`tls::ClientTls`]'s); [`consumer`]: a worker's loop
//!   on it that acknowledges each batch in the request for the next.
//! * [`types`]: the values client and server exchange (messages, leases,
//!   queue counters).
//!
//! ## Features
//!
//! `server` (on by default) builds the daemon, the CLI, the load generator
//! and everything they need: glommio, RocksDB, logging. A program that only
//! talks to a server depends on `queueber = { default-features = false }`
//! and gets [`client`], [`consumer`], [`protocol`], [`types`], [`names`], [`ids`],
//! [`clock`] and [`frame`], with neither RocksDB's C++ nor an executor;
//! adding the `tls` feature gives it [`tls`] as well.

#[cfg(feature = "server")]
pub mod auth;
pub mod client;
pub mod clock;
pub mod consumer;
pub mod frame;
#[cfg(feature = "server")]
mod hashing;
pub mod ids;
#[cfg(feature = "server")]
pub mod metrics;
pub mod names;
pub mod ops;
pub mod protocol;
#[cfg(feature = "server")]
pub mod runtime;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod storage;
#[cfg(feature = "tls")]
pub mod tls;
pub mod types;

/// Generated Cap'n Proto bindings of `queueber.capnp`.
#[allow(clippy::all, clippy::pedantic, unused, missing_docs)]
pub mod queueber_capnp {
    include!(concat!(env!("OUT_DIR"), "/queueber_capnp.rs"));
}
