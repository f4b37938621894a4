//! queueber: the command-line client. One subcommand per operation; human
//! output by default, one JSON document with `--json`. `top` watches a
//! server through its metrics endpoint instead (see [`top`]).

mod top;

use std::io::{BufRead, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use queueber::client::{code_name, Client, ClientError};
use queueber::ids::{LeaseId, MessageId};
use queueber::names::QueueName;
use queueber::storage::{Lease, NewMessage};
use queueber::types::{PeekCursor, PolicyInfo, QueuePolicy};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "queueber", version, about = "Command-line client for a queueber server")]
struct Cli {
    /// Server address.
    #[arg(long, env = "QUEUEBER_ADDR", default_value = "127.0.0.1:7420", global = true)]
    addr: SocketAddr,
    /// Tenant of the queue.
    #[arg(long, env = "QUEUEBER_TENANT", default_value = "default", global = true)]
    tenant: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Access token (`<id>.<secret>`, as `token new` printed it), presented
    /// first on a server with --auth-file.
    #[arg(long, env = "QUEUEBER_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    command: Command,
}

/// How to reach a server (or `top`'s https:// metrics endpoint) over TLS.
#[derive(Debug, clap::Args)]
struct TlsArgs {
    /// Connect with TLS (trusting the system's roots, or --tls-ca).
    #[arg(long, env = "QUEUEBER_TLS", global = true)]
    tls: bool,
    /// Trust the CA certificates in this PEM file (implies --tls).
    #[arg(long, env = "QUEUEBER_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// Present this client certificate chain (PEM) to a server that
    /// requires one (queueberd --tls-client-ca); needs --tls-client-key.
    #[arg(long, env = "QUEUEBER_TLS_CLIENT_CERT", global = true, requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    /// The private key of --tls-client-cert (PEM).
    #[arg(long, env = "QUEUEBER_TLS_CLIENT_KEY", global = true, requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
    /// The name the server's certificate must have (default: the host of
    /// --addr, an IP address).
    #[arg(long, env = "QUEUEBER_TLS_SERVER_NAME", global = true)]
    tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The client TLS configuration these flags ask for, if any.
    fn client(&self) -> Result<Option<queueber::tls::ClientTls>, String> {
        if !(self.tls || self.tls_ca.is_some() || self.tls_client_cert.is_some()) {
            return Ok(None);
        }
        let identity = self.tls_client_cert.as_deref().zip(self.tls_client_key.as_deref());
        queueber::tls::ClientTls::new(self.tls_ca.as_deref(), identity)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the server's version, shard count and limits.
    Hello,
    /// Add messages: the arguments, each --file, or else one per line of stdin.
    Add {
        queue: String,
        messages: Vec<String>,
        /// A file whose whole content is one message (repeatable; "-" is stdin).
        #[arg(long)]
        file: Vec<PathBuf>,
        /// Milliseconds before the messages become visible.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Lease visible messages.
    Poll {
        queue: String,
        /// Most messages to lease.
        #[arg(short = 'n', long, default_value_t = 1)]
        max: u32,
        /// Lease duration.
        #[arg(long, default_value_t = 30_000)]
        lease_ms: u64,
        /// How long to wait for a message (long poll).
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
    },
    /// Acknowledge messages of a lease.
    Remove {
        queue: String,
        lease: String,
        ids: Vec<String>,
    },
    /// Extend a lease to now + --lease-ms.
    Extend {
        queue: String,
        lease: String,
        #[arg(long, default_value_t = 30_000)]
        lease_ms: u64,
    },
    /// Hand a leased message back (visible again after --delay-ms).
    Release {
        queue: String,
        lease: String,
        id: String,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Report that a leased message could not be processed: it comes back
    /// after the queue's backoff with the error recorded, or (--dead, or out
    /// of deliveries) is dead-lettered.
    Fail {
        queue: String,
        lease: String,
        id: String,
        /// What went wrong (kept with the message, up to 1 KiB).
        #[arg(long, default_value = "")]
        error: String,
        /// Dead-letter it at once.
        #[arg(long)]
        dead: bool,
    },
    /// Move dead letters back to the queue (the given ids, or the oldest
    /// --max, or all), visible at once with their delivery count reset.
    Redrive {
        queue: String,
        ids: Vec<String>,
        /// Most to move (default: all).
        #[arg(long, default_value_t = 0)]
        max: u64,
    },
    /// Visible, delayed, in-flight and dead counts of a queue.
    Stats { queue: String },
    /// Show messages visible now, without leasing them (paged: pass the
    /// printed cursor to --cursor for the next page).
    Peek {
        queue: String,
        /// Most messages to show.
        #[arg(short = 'n', long = "max", default_value_t = 10)]
        max: u32,
        /// Continue after a previous peek (its printed cursor).
        #[arg(long)]
        cursor: Option<String>,
        /// The dead letters instead (oldest death first, with why).
        #[arg(long)]
        dead: bool,
    },
    /// Create a queue with a policy (an add creates one with the defaults).
    Create {
        queue: String,
        #[command(flatten)]
        policy: PolicyFlags,
    },
    /// Read or change a queue's policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// List every queue.
    Queues,
    /// Drop every message of a queue.
    Purge { queue: String },
    /// Delete a queue and its messages.
    Delete { queue: String },
    /// Live view of a server from its metrics endpoint: queues, shards, rates.
    #[command(long_about = top::LONG_ABOUT)]
    Top(top::TopArgs),
    /// Access tokens (for a server's --auth-file).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// The queue's policy (version, as set, and what applies).
    Get { queue: String },
    /// Change the fields given; the others stay as they are.
    Set {
        queue: String,
        #[command(flatten)]
        policy: PolicyFlags,
    },
}

/// A policy's fields: a number, `unlimited` (depth and bytes), or
/// `default` (unset: the server's default applies).
#[derive(Debug, clap::Args)]
struct PolicyFlags {
    /// Lease of a poll that names none, in milliseconds.
    #[arg(long, value_name = "MS|default")]
    lease_ms: Option<String>,
    /// Most messages held (visible, delayed, in flight).
    #[arg(long, value_name = "N|unlimited|default")]
    max_depth: Option<String>,
    /// Most payload bytes held.
    #[arg(long, value_name = "N|unlimited|default")]
    max_bytes: Option<String>,
    /// Largest payload of one message (at most the server's limit).
    #[arg(long, value_name = "N|default")]
    max_payload_bytes: Option<String>,
    /// Delays before a failed delivery's message is visible again:
    /// comma-separated milliseconds, the n-th after the n-th failure, the
    /// last repeating (at most 8); `default` for none.
    #[arg(long, value_name = "MS,MS,...|default")]
    retry_backoff_ms: Option<String>,
    /// Deliveries after which a message that is not removed is
    /// dead-lettered: 1 to 1000.
    #[arg(long, value_name = "N|unlimited|default")]
    max_deliveries: Option<String>,
    /// How long a message may stay, from its first add, before it is
    /// dropped (visible, delayed or dead; in flight, when its lease ends),
    /// in milliseconds; `forever` keeps messages.
    #[arg(long, value_name = "MS|forever|default")]
    retention_ms: Option<String>,
}

impl PolicyFlags {
    /// `base` with the given fields changed.
    fn apply(&self, mut base: QueuePolicy) -> Result<QueuePolicy, CliError> {
        let field =
            |flag: &str, value: &Option<String>, unlimited: bool, old: Option<u64>| -> Result<Option<u64>, CliError> {
                match value.as_deref() {
                    None => Ok(old),
                    Some("default") => Ok(None),
                    Some("unlimited") if unlimited => Ok(Some(queueber::types::UNLIMITED)),
                    Some(v) => match v.parse::<u64>() {
                        Ok(n) if n > 0 => Ok(Some(n)),
                        _ => Err(CliError::Usage(format!(
                            "--{flag} {v:?}: expected a positive number{}, or default",
                            if unlimited { ", unlimited" } else { "" }
                        ))),
                    },
                }
            };
        base.lease_ms = field("lease-ms", &self.lease_ms, false, base.lease_ms)?;
        base.max_depth = field("max-depth", &self.max_depth, true, base.max_depth)?;
        base.max_bytes = field("max-bytes", &self.max_bytes, true, base.max_bytes)?;
        base.max_payload_bytes = field(
            "max-payload-bytes",
            &self.max_payload_bytes,
            false,
            base.max_payload_bytes,
        )?;
        base.max_deliveries = field("max-deliveries", &self.max_deliveries, true, base.max_deliveries)?;
        let retention = match self.retention_ms.as_deref() {
            Some("forever") => Some("unlimited".to_string()),
            other => other.map(str::to_string),
        };
        base.retention_ms = field("retention-ms", &retention, true, base.retention_ms)?;
        match self.retry_backoff_ms.as_deref() {
            None => {}
            Some("default") => base.retry_backoff_ms = None,
            Some(list) => {
                let steps = list
                    .split(',')
                    .map(|s| s.trim().parse::<u64>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| {
                        CliError::Usage(format!(
                            "--retry-backoff-ms {list:?}: expected milliseconds like 1000,5000,30000, or default"
                        ))
                    })?;
                let backoff = queueber::types::RetryBackoff::new(&steps)
                    .map_err(|e| CliError::Usage(format!("--retry-backoff-ms: {e}")))?;
                base.retry_backoff_ms = (!backoff.is_empty()).then_some(backoff);
            }
        }
        Ok(base)
    }
}

/// A policy as text and JSON.
fn show_policy(info: &PolicyInfo) -> (String, Value) {
    let text_of = |v: Option<u64>| match v {
        None => "default".to_string(),
        Some(queueber::types::UNLIMITED) => "unlimited".to_string(),
        Some(n) => n.to_string(),
    };
    let json_of = |v: Option<u64>| match v {
        None => Value::Null,
        Some(queueber::types::UNLIMITED) => json!("unlimited"),
        Some(n) => json!(n),
    };
    let fields = |p: &QueuePolicy| {
        [
            ("lease_ms", p.lease_ms),
            ("max_depth", p.max_depth),
            ("max_bytes", p.max_bytes),
            ("max_payload_bytes", p.max_payload_bytes),
            ("max_deliveries", p.max_deliveries),
            ("retention_ms", p.retention_ms),
        ]
    };
    let backoff_text = |p: &QueuePolicy| match &p.retry_backoff_ms {
        None => "default".to_string(),
        Some(b) => b.steps().iter().map(u64::to_string).collect::<Vec<_>>().join(","),
    };
    let mut text = format!("version {}", info.version);
    for ((name, own), (_, effective)) in fields(&info.policy).into_iter().zip(fields(&info.effective)) {
        text.push_str(&format!("\n{name} {} (applies: {})", text_of(own), text_of(effective)));
    }
    let applies = match &info.effective.retry_backoff_ms {
        None => "none: visible at once".to_string(),
        Some(_) => backoff_text(&info.effective),
    };
    text.push_str(&format!(
        "\nretry_backoff_ms {} (applies: {applies})",
        backoff_text(&info.policy)
    ));
    let object = |p: &QueuePolicy| {
        let mut fields: serde_json::Map<String, Value> = fields(p)
            .into_iter()
            .map(|(k, v)| (k.to_string(), json_of(v)))
            .collect();
        fields.insert(
            "retry_backoff_ms".into(),
            p.retry_backoff_ms.map_or(Value::Null, |b| json!(b.steps())),
        );
        Value::Object(fields)
    };
    let json = json!({ "version": info.version, "policy": object(&info.policy), "effective": object(&info.effective) });
    (text, json)
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token: prints its secret alone on the first line (shown once,
    /// never stored), then the TOML entry to append to the auth file, so
    /// that `tail -n +2` of the output is an auth file by itself.
    New {
        /// The one tenant the token is bound to.
        #[arg(long)]
        tenant: String,
        /// Comma-separated: send (add), consume (poll, remove,
        /// removeAndPoll, extend, release, fail), admin (everything else).
        #[arg(long, value_delimiter = ',', required = true)]
        perms: Vec<String>,
        /// Comma-separated queue name patterns (`*` matches any run of
        /// characters) the token is limited to; all queues if absent.
        #[arg(long, value_delimiter = ',')]
        queues: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn payload_text(p: &[u8]) -> Value {
    match std::str::from_utf8(p) {
        Ok(s) => json!(s),
        Err(_) => json!({ "hex": p.iter().map(|b| format!("{b:02x}")).collect::<String>() }),
    }
}

fn lease_json(lease: &Option<Lease>) -> Value {
    match lease {
        None => json!({ "lease": null, "messages": [] }),
        Some(l) => json!({
            "lease": l.id.to_string(),
            "expires_at_ms": l.expires_at_ms,
            "messages": l.messages.iter().map(|m| json!({
                "id": m.id.to_string(),
                "delivery_count": m.delivery_count,
                "enqueued_at_ms": m.enqueued_at_ms,
                "payload": payload_text(&m.payload),
            })).collect::<Vec<_>>(),
        }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cursor as `peek` prints it (hex).
fn parse_cursor(s: &str) -> Result<PeekCursor, CliError> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    bytes
        .and_then(|b| PeekCursor::from_bytes(&b))
        .ok_or_else(|| CliError::Usage(format!("{s:?} is not a peek cursor (as `peek` printed it)")))
}

fn parse_lease(s: &str) -> Result<LeaseId, CliError> {
    LeaseId::parse(s).ok_or_else(|| CliError::Usage(format!("{s:?} is not a lease id (UUID)")))
}

fn parse_id(s: &str) -> Result<MessageId, CliError> {
    MessageId::parse(s).ok_or_else(|| CliError::Usage(format!("{s:?} is not a message id (UUID)")))
}

fn read_messages(messages: Vec<String>, files: Vec<PathBuf>, delay_ms: u64) -> Result<Vec<NewMessage>, CliError> {
    let mut out: Vec<NewMessage> = messages
        .into_iter()
        .map(|m| NewMessage::delayed(m.into_bytes(), delay_ms))
        .collect();
    for f in &files {
        let mut data = Vec::new();
        if f.as_os_str() == "-" {
            std::io::stdin().read_to_end(&mut data)?;
        } else {
            data = std::fs::read(f)?;
        }
        out.push(NewMessage::delayed(data, delay_ms));
    }
    if out.is_empty() {
        for line in std::io::stdin().lock().lines() {
            out.push(NewMessage::delayed(line?.into_bytes(), delay_ms));
        }
    }
    if out.is_empty() {
        return Err(CliError::Usage(
            "nothing to add: give messages, --file, or lines on stdin".into(),
        ));
    }
    Ok(out)
}

/// Runs one command; returns (human text, JSON).
async fn run(client: &Client, tenant: &str, command: Command) -> Result<(String, Value), CliError> {
    let queue = |name: &str| QueueName::from_wire(tenant, name).map_err(|e| CliError::Usage(e.to_string()));
    Ok(match command {
        Command::Hello => {
            let info = client.hello().await?;
            let l = &info.limits;
            (
                format!(
                    "queueber {} with {} shards{}{}\nmax frame {} B, payload {} B, {} messages per add, {} items per poll, wait {} ms, {} in flight per connection, {} connections",
                    info.version, info.shards, if info.disk_full { " (DISK FULL: adds refused)" } else { "" },
                    if info.auth_required { ", tokens required (--token)" } else { "" },
                    l.max_frame_bytes, l.max_payload_bytes, l.max_messages_per_add,
                    l.max_items_per_poll, l.max_wait_ms, l.max_in_flight_per_connection, l.max_connections
                ),
                json!({ "version": info.version, "shards": info.shards, "disk_full": info.disk_full, "auth_required": info.auth_required, "limits": {
                    "max_frame_bytes": l.max_frame_bytes, "max_payload_bytes": l.max_payload_bytes,
                    "max_messages_per_add": l.max_messages_per_add, "max_items_per_poll": l.max_items_per_poll,
                    "max_wait_ms": l.max_wait_ms, "max_in_flight_per_connection": l.max_in_flight_per_connection,
                    "max_connections": l.max_connections, "max_duration_ms": l.max_duration_ms }}),
            )
        }
        Command::Add {
            queue: name,
            messages,
            file,
            delay_ms,
        } => {
            let q = queue(&name)?;
            let ids = client.add(&q, read_messages(messages, file, delay_ms)?).await?;
            let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
            (ids.join("\n"), json!({ "queue": q.to_string(), "ids": ids }))
        }
        Command::Poll {
            queue: name,
            max,
            lease_ms,
            wait_ms,
        } => {
            let lease = client.poll(&queue(&name)?, max, lease_ms, wait_ms).await?;
            let text = match &lease {
                None => "no messages".to_string(),
                Some(l) => {
                    let mut s = format!("lease {} (expires at {} ms)", l.id, l.expires_at_ms);
                    for m in &l.messages {
                        s.push_str(&format!(
                            "\n{} (delivery {}) {}",
                            m.id,
                            m.delivery_count,
                            String::from_utf8_lossy(&m.payload)
                        ));
                    }
                    s
                }
            };
            (text, lease_json(&lease))
        }
        Command::Remove {
            queue: name,
            lease,
            ids,
        } => {
            if ids.is_empty() {
                return Err(CliError::Usage("give at least one message id".into()));
            }
            let parsed = ids.iter().map(|s| parse_id(s)).collect::<Result<Vec<_>, _>>()?;
            let flags = client.remove(&queue(&name)?, parse_lease(&lease)?, parsed).await?;
            let text = ids
                .iter()
                .zip(&flags)
                .map(|(id, ok)| format!("{id} {}", if *ok { "removed" } else { "not held by this lease" }))
                .collect::<Vec<_>>()
                .join("\n");
            (
                text,
                json!({ "removed": ids.iter().zip(&flags).map(|(id, ok)| json!({"id": id, "removed": ok})).collect::<Vec<_>>() }),
            )
        }
        Command::Extend {
            queue: name,
            lease,
            lease_ms,
        } => match client.extend(&queue(&name)?, parse_lease(&lease)?, lease_ms).await? {
            Some(at) => (
                format!("extended to {at} ms"),
                json!({ "extended": true, "expires_at_ms": at }),
            ),
            None => ("lease unknown or expired".into(), json!({ "extended": false })),
        },
        Command::Release {
            queue: name,
            lease,
            id,
            delay_ms,
        } => {
            let ok = client
                .release(&queue(&name)?, parse_lease(&lease)?, parse_id(&id)?, delay_ms)
                .await?;
            (
                if ok { "released" } else { "not held by this lease" }.into(),
                json!({ "released": ok }),
            )
        }
        Command::Fail {
            queue: name,
            lease,
            id,
            error,
            dead,
        } => {
            let ok = client
                .fail(&queue(&name)?, parse_lease(&lease)?, parse_id(&id)?, &error, dead)
                .await?;
            (
                if ok { "failed" } else { "not held by this lease" }.into(),
                json!({ "failed": ok }),
            )
        }
        Command::Redrive { queue: name, ids, max } => {
            let q = queue(&name)?;
            let ids = ids.iter().map(|i| parse_id(i)).collect::<Result<Vec<_>, _>>()?;
            // One request moves at most 1,000: go on while the server says
            // more were asked for.
            let mut moved = 0u64;
            loop {
                let left = if max == 0 { 0 } else { max - moved };
                let step = client.redrive(&q, left, ids.clone()).await?;
                moved += step.moved;
                if !step.more || step.moved == 0 || (max != 0 && moved >= max) {
                    break;
                }
            }
            (format!("redrove {moved} dead letters"), json!({ "redriven": moved }))
        }
        Command::Stats { queue: name } => {
            let s = client.stats(&queue(&name)?).await?;
            (
                format!(
                    "visible {}\ndelayed {}\nin flight {}\ndead {}\ndropped by retention {}\noldest visible age {}{}",
                    s.visible,
                    s.delayed,
                    s.in_flight,
                    s.dead,
                    s.dropped,
                    s.oldest_visible_age_ms.map_or("-".into(), |a| format!("{a} ms")),
                    if s.disk_full {
                        "\ndisk full: adds are refused"
                    } else {
                        ""
                    }
                ),
                json!({ "visible": s.visible, "delayed": s.delayed, "in_flight": s.in_flight, "dead": s.dead, "dropped": s.dropped, "oldest_visible_age_ms": s.oldest_visible_age_ms, "disk_full": s.disk_full }),
            )
        }
        Command::Create { queue: name, policy } => {
            let created = client
                .create_queue(&queue(&name)?, policy.apply(QueuePolicy::default())?)
                .await?;
            let (text, mut json) = show_policy(&created.policy);
            json["created"] = json!(created.created);
            let head = if created.created {
                "created"
            } else {
                "exists with this policy"
            };
            (format!("{head}\n{text}"), json)
        }
        Command::Policy(PolicyCommand::Get { queue: name }) => show_policy(&client.get_policy(&queue(&name)?).await?),
        Command::Policy(PolicyCommand::Set { queue: name, policy }) => {
            let q = queue(&name)?;
            // Read, change the fields given, write back: the others stay.
            let current = client.get_policy(&q).await?;
            show_policy(&client.set_policy(&q, policy.apply(current.policy)?).await?)
        }
        Command::Queues => {
            let names = client.list_queues().await?;
            let names: Vec<String> = names.iter().map(ToString::to_string).collect();
            (names.join("\n"), json!({ "queues": names }))
        }
        Command::Peek {
            queue: name,
            max,
            cursor,
            dead: true,
        } => {
            let cursor = match cursor {
                None => None,
                Some(c) => Some(parse_cursor(&c)?),
            };
            let peeked = client.peek_dead(&queue(&name)?, max, cursor).await?;
            let reason = |r| match r {
                queueber::types::DeadReason::MaxDeliveries => "max_deliveries",
                queueber::types::DeadReason::Rejected => "rejected",
            };
            let mut text = String::new();
            for d in &peeked.dead {
                text.push_str(&format!(
                    "{} {} after {} deliveries at {} ms{} {}\n",
                    d.id,
                    reason(d.reason),
                    d.delivery_count,
                    d.died_at_ms,
                    d.last_error
                        .as_ref()
                        .map_or(String::new(), |e| format!(" (last error: {e})")),
                    String::from_utf8_lossy(&d.payload)
                ));
            }
            let cursor = peeked.cursor.map(|c| hex(&c.to_bytes()));
            match &cursor {
                Some(c) => text.push_str(&format!("more: --dead --cursor {c}")),
                None if peeked.dead.is_empty() => text.push_str("no dead letters"),
                None => text.push_str("(end)"),
            }
            let json = json!({
                "dead": peeked.dead.iter().map(|d| json!({
                    "id": d.id.to_string(),
                    "delivery_count": d.delivery_count,
                    "enqueued_at_ms": d.enqueued_at_ms,
                    "died_at_ms": d.died_at_ms,
                    "reason": reason(d.reason),
                    "last_error": d.last_error,
                    "payload": payload_text(&d.payload),
                })).collect::<Vec<_>>(),
                "cursor": cursor,
            });
            (text, json)
        }
        Command::Peek {
            queue: name,
            max,
            cursor,
            dead: false,
        } => {
            let cursor = match cursor {
                None => None,
                Some(c) => Some(parse_cursor(&c)?),
            };
            let peeked = client.peek(&queue(&name)?, max, cursor).await?;
            let mut text = String::new();
            for m in &peeked.messages {
                text.push_str(&format!(
                    "{} (delivered {} times) {}\n",
                    m.id,
                    m.delivery_count,
                    String::from_utf8_lossy(&m.payload)
                ));
            }
            let cursor = peeked.cursor.map(|c| hex(&c.to_bytes()));
            match &cursor {
                Some(c) => text.push_str(&format!("more: --cursor {c}")),
                None if peeked.messages.is_empty() => text.push_str("no visible messages"),
                None => text.push_str("(end)"),
            }
            let json = json!({
                "messages": peeked.messages.iter().map(|m| json!({
                    "id": m.id.to_string(),
                    "delivery_count": m.delivery_count,
                    "enqueued_at_ms": m.enqueued_at_ms,
                    "payload": payload_text(&m.payload),
                })).collect::<Vec<_>>(),
                "cursor": cursor,
            });
            (text, json)
        }
        Command::Purge { queue: name } => {
            let n = client.purge(&queue(&name)?).await?;
            (format!("purged {n} messages"), json!({ "purged": n }))
        }
        Command::Delete { queue: name } => {
            client.delete(&queue(&name)?).await?;
            ("deleted".into(), json!({ "deleted": true }))
        }
        Command::Top(_) | Command::Token(_) => {
            return Err(CliError::Usage("this command does not use the queue protocol".into()))
        }
    })
}

/// `queueber token new`: the secret on the first line, the entry after it.
fn token_new(tenant: &str, perms: &[String], queues: &[String]) -> ExitCode {
    let permissions: Result<Vec<_>, String> = perms
        .iter()
        .map(|p| {
            queueber::auth::Permission::parse(p.trim())
                .ok_or_else(|| format!("unknown permission {p:?} (send, consume, admin)"))
        })
        .collect();
    match permissions.and_then(|p| queueber::auth::new_token(tenant, &p, queues)) {
        Ok(token) => {
            println!("{}", token.secret);
            print!("{}", token.entry);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("queueber: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Cli {
        addr,
        tenant,
        json,
        token,
        tls,
        command,
    } = cli;
    let client_tls = match tls.client() {
        Ok(client_tls) => client_tls,
        Err(e) => {
            eprintln!("queueber: {e}");
            return ExitCode::from(2);
        }
    };
    // top reads the metrics endpoint over blocking HTTP(S): no runtime.
    let command = match command {
        Command::Top(args) => return top::run(args, json, client_tls),
        Command::Token(TokenCommand::New { tenant, perms, queues }) => return token_new(&tenant, &perms, &queues),
        other => other,
    };
    // io_uring needs a little locked memory; raise the limit where allowed.
    if let Err(e) = queueber::runtime::raise_memlock(queueber::runtime::MIN_MEMLOCK_BYTES * 2, 4 << 20) {
        eprintln!("queueber: {e}");
        return ExitCode::FAILURE;
    }
    let outcome = queueber::runtime::executor("queueber-cli", None, 256 << 10).spawn(move || async move {
        let stream = glommio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| CliError::Io(std::io::Error::other(format!("connecting to {addr}: {e}"))))?;
        let _ = stream.set_nodelay(true);
        let client = match &client_tls {
            None => {
                let (client, driver) = Client::new(stream);
                glommio::spawn_local(driver).detach();
                client
            }
            Some(client_tls) => {
                let name = tls.tls_server_name.clone().unwrap_or_else(|| addr.ip().to_string());
                let stream = client_tls
                    .connect(&name, stream)
                    .await
                    .map_err(|e| CliError::Io(std::io::Error::other(format!("TLS with {addr} ({name}): {e}"))))?;
                let (client, driver) = Client::new(stream);
                glommio::spawn_local(driver).detach();
                client
            }
        };
        if let Some(token) = &token {
            client.auth(token).await?;
        }
        run(&client, &tenant, command).await
    });
    let result = match outcome.map(|h| h.join()) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(CliError::Usage(format!("executor: {e}"))),
        Err(e) => Err(CliError::Usage(format!("cannot start the runtime: {e}"))),
    };
    match result {
        Ok((text, value)) => {
            if json {
                println!("{value}");
            } else if !text.is_empty() {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                let code = match &e {
                    CliError::Client(c) => c.code().map(code_name).unwrap_or("client"),
                    CliError::Usage(_) => "usage",
                    CliError::Io(_) => "io",
                };
                println!("{}", json!({ "error": code, "message": e.to_string() }));
            } else {
                eprintln!("queueber: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
