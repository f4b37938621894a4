//! What the generator talks to: a queueber server, or a Redis server used as
//! a baseline through the same workload, timers and histograms.
//!
//! The Redis baseline is the usual "reliable queue" pattern: `LPUSH` adds,
//! `BLMOVE` to a per-queue in-flight list polls (blocking up to the wait),
//! `LREM` from that list acknowledges. It has no leases or redelivery, so it
//! is a floor for the network and event-loop path, not an equal: it tells how
//! much of a latency figure the machine and the generator set.
//!
//! The RESP client is hand-written on purpose: the Rust Redis clients run on
//! tokio or threads, and the point of the baseline is to keep everything on
//! the generator's side (executor, connection handling, timing) identical.
//! It speaks the four commands above, one request at a time per connection.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use futures::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use queueber::client::Client;
use queueber::ids::{LeaseId, MessageId};
use queueber::names::QueueName;
use queueber::storage::{Delivery, Lease, NewMessage};

/// Which server the generator drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Queueber,
    Redis,
}

impl Kind {
    /// The flag's spelling (`queueber`, `redis`), for reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Queueber => "queueber",
            Kind::Redis => "redis",
        }
    }
}

/// How queueber connections are made: TLS, and a token to present.
#[derive(Clone, Default)]
pub struct Secure {
    pub tls: Option<queueber::tls::ClientTls>,
    pub token: Option<String>,
}

/// One connection to the server under test.
#[derive(Clone)]
pub enum Conn {
    Queueber(Client),
    Redis(Rc<Redis>),
}

impl Conn {
    /// Connects; a queueber connection goes over TLS when `secure` has it,
    /// and presents its token first.
    pub async fn connect(kind: Kind, addr: SocketAddr, secure: &Secure) -> Result<Conn, String> {
        let stream = glommio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        Ok(match kind {
            Kind::Queueber => {
                let _ = stream.set_nodelay(true);
                let client = match &secure.tls {
                    None => {
                        let (client, driver) = Client::new(stream);
                        glommio::spawn_local(driver).detach();
                        client
                    }
                    Some(tls) => {
                        let stream = tls
                            .connect(&addr.ip().to_string(), stream)
                            .await
                            .map_err(|e| format!("TLS with {addr}: {e}"))?;
                        let (client, driver) = Client::new(stream);
                        glommio::spawn_local(driver).detach();
                        client
                    }
                };
                if let Some(token) = &secure.token {
                    client.auth(token).await.map_err(|e| format!("auth: {e}"))?;
                }
                Conn::Queueber(client)
            }
            Kind::Redis => {
                stream.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
                Conn::Redis(Rc::new(Redis {
                    stream: RefCell::new(Some(BufReader::new(stream))),
                }))
            }
        })
    }

    /// Several tasks may share a queueber connection (it pipelines); a Redis
    /// connection blocks in `BLMOVE`, so every Redis task needs its own.
    pub fn shareable(kind: Kind) -> bool {
        kind == Kind::Queueber
    }

    /// The server's shard count (1 for Redis).
    pub async fn shards(&self) -> Result<usize, String> {
        match self {
            Conn::Queueber(c) => Ok(c.hello().await.map_err(|e| format!("hello: {e}"))?.shards.max(1) as usize),
            Conn::Redis(r) => match r.call(&[b"PING"]).await? {
                Resp::Simple(_) => Ok(1),
                other => Err(format!("PING answered {other:?}")),
            },
        }
    }

    pub async fn add(&self, queue: &QueueName, messages: Vec<NewMessage>) -> Result<(), String> {
        match self {
            Conn::Queueber(c) => c.add(queue, messages).await.map(drop).map_err(|e| e.to_string()),
            Conn::Redis(r) => {
                let key = redis_key(queue, "");
                let mut args: Vec<&[u8]> = vec![b"LPUSH", key.as_bytes()];
                args.extend(messages.iter().map(|m| &m.payload[..]));
                match r.call(&args).await? {
                    Resp::Int(_) => Ok(()),
                    other => Err(format!("LPUSH answered {other:?}")),
                }
            }
        }
    }

    /// A lease of up to `max_items` messages, `None` after waiting in vain.
    /// Redis moves one message per call and has no lease: its "lease" carries
    /// zero ids, and `remove` finds the message by payload.
    pub async fn poll(
        &self,
        queue: &QueueName,
        max_items: u32,
        lease_ms: u64,
        wait_ms: u64,
    ) -> Result<Option<Lease>, String> {
        match self {
            Conn::Queueber(c) => match c.poll(queue, max_items, lease_ms, wait_ms).await {
                Ok(lease) => Ok(lease),
                // A consumer can start before the first add has created its
                // queue (P < Q, no warm-up): that queue is empty, not an
                // error. A queue lost mid-run still shows as lost messages.
                Err(e) if e.code() == Some(queueber::protocol::ErrorCode::UnknownQueue) => {
                    glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                    Ok(None)
                }
                Err(e) => Err(e.to_string()),
            },
            Conn::Redis(r) => {
                let (from, to) = (redis_key(queue, ""), redis_key(queue, ":leased"));
                let wait = format!("{:.3}", wait_ms.max(1) as f64 / 1000.0);
                let args: [&[u8]; 6] = [
                    b"BLMOVE",
                    from.as_bytes(),
                    to.as_bytes(),
                    b"RIGHT",
                    b"LEFT",
                    wait.as_bytes(),
                ];
                match r.call(&args).await? {
                    Resp::Nil => Ok(None),
                    Resp::Bulk(payload) => Ok(Some(Lease {
                        id: LeaseId([0; 16]),
                        expires_at_ms: 0,
                        messages: vec![Delivery {
                            id: MessageId([0; 16]),
                            payload: payload.into(),
                            delivery_count: 1,
                            enqueued_at_ms: 0,
                        }],
                    })),
                    other => Err(format!("BLMOVE answered {other:?}")),
                }
            }
        }
    }

    /// Whether [`remove_and_poll`](Self::remove_and_poll) is one request
    /// here (queueber); elsewhere the consumer removes and polls apart.
    pub fn has_remove_and_poll(&self) -> bool {
        matches!(self, Conn::Queueber(_))
    }

    /// Acknowledges every message of `done` and polls for more in one
    /// request (`removeAndPoll`): the flags of `done`'s messages and the
    /// new lease, as [`remove`](Self::remove) and [`poll`](Self::poll).
    pub async fn remove_and_poll(
        &self,
        queue: &QueueName,
        done: &Lease,
        max_items: u32,
        lease_ms: u64,
        wait_ms: u64,
    ) -> Result<(Vec<bool>, Option<Lease>), String> {
        match self {
            Conn::Queueber(c) => {
                let ids = done.messages.iter().map(|m| m.id).collect();
                c.remove_and_poll(queue, Some(done.id), ids, max_items, lease_ms, wait_ms)
                    .await
                    .map(|r| (r.removed, r.lease))
                    .map_err(|e| e.to_string())
            }
            Conn::Redis(_) => {
                let flags = self.remove(queue, done).await?;
                Ok((flags, self.poll(queue, max_items, lease_ms, wait_ms).await?))
            }
        }
    }

    /// Acknowledges every message of `lease`; one flag per message.
    pub async fn remove(&self, queue: &QueueName, lease: &Lease) -> Result<Vec<bool>, String> {
        match self {
            Conn::Queueber(c) => {
                let ids = lease.messages.iter().map(|m| m.id).collect();
                c.remove(queue, lease.id, ids).await.map_err(|e| e.to_string())
            }
            Conn::Redis(r) => {
                let key = redis_key(queue, ":leased");
                let mut flags = Vec::with_capacity(lease.messages.len());
                for m in &lease.messages {
                    match r.call(&[b"LREM", key.as_bytes(), b"1", &m.payload]).await? {
                        Resp::Int(n) => flags.push(n == 1),
                        other => return Err(format!("LREM answered {other:?}")),
                    }
                }
                Ok(flags)
            }
        }
    }
}

fn redis_key(queue: &QueueName, suffix: &str) -> String {
    format!("queueber-loadgen:{}:{}{suffix}", queue.tenant(), queue.queue())
}

/// One Redis connection, one request at a time.
pub struct Redis {
    /// Taken while a request is in flight: a second concurrent user is a
    /// bug in the caller, reported as an error instead of interleaving.
    stream: RefCell<Option<BufReader<glommio::net::TcpStream>>>,
}

/// The RESP replies the baseline needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Resp>),
}

impl Redis {
    async fn call(&self, args: &[&[u8]]) -> Result<Resp, String> {
        let mut stream = self
            .stream
            .borrow_mut()
            .take()
            .ok_or("a Redis connection was used by two tasks at once")?;
        let result = async {
            stream
                .get_mut()
                .write_all(&encode(args))
                .await
                .map_err(|e| format!("redis write: {e}"))?;
            read_reply(&mut stream).await
        }
        .await;
        *self.stream.borrow_mut() = Some(stream);
        result
    }
}

/// A command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply. Boxed because arrays nest.
pub fn read_reply<'a, R>(
    r: &'a mut R,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Resp, String>> + 'a>>
where
    R: futures::io::AsyncBufRead + Unpin,
{
    Box::pin(async move {
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line)
            .await
            .map_err(|e| format!("redis read: {e}"))?;
        let text = line
            .strip_suffix(b"\r\n")
            .ok_or_else(|| "redis closed the connection or sent a bare line".to_string())?;
        let (&kind, rest) = text.split_first().ok_or("redis sent an empty line")?;
        let rest = String::from_utf8_lossy(rest).into_owned();
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| format!("redis sent a bad length {rest:?}"))
        };
        match kind {
            b'+' => Ok(Resp::Simple(rest)),
            b'-' => Err(format!("redis error: {rest}")),
            b':' => Ok(Resp::Int(number()?)),
            b'$' => {
                let Ok(len) = usize::try_from(number()?) else {
                    return Ok(Resp::Nil);
                };
                let mut body = vec![0u8; len + 2];
                r.read_exact(&mut body).await.map_err(|e| format!("redis read: {e}"))?;
                body.truncate(len);
                Ok(Resp::Bulk(body))
            }
            b'*' => {
                let Ok(n) = usize::try_from(number()?) else {
                    return Ok(Resp::Nil);
                };
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(read_reply(r).await?);
                }
                Ok(Resp::Array(items))
            }
            b'_' => Ok(Resp::Nil),
            other => Err(format!("redis sent an unknown reply type {:?}", other as char)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Resp, String> {
        futures::executor::block_on(read_reply(&mut BufReader::new(bytes)))
    }

    #[test]
    fn report_names_are_the_flag_spellings() {
        use clap::ValueEnum;
        for kind in Kind::value_variants() {
            assert_eq!(Kind::from_str(kind.name(), false), Ok(*kind));
        }
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            encode(&[b"LPUSH", b"q", b"a\r\nb"]),
            b"*3\r\n$5\r\nLPUSH\r\n$1\r\nq\r\n$4\r\na\r\nb\r\n"
        );
    }

    #[test]
    fn replies_parse() {
        assert_eq!(parse(b"+PONG\r\n"), Ok(Resp::Simple("PONG".into())));
        assert_eq!(parse(b":3\r\n"), Ok(Resp::Int(3)));
        assert_eq!(parse(b"$4\r\na\r\nb\r\n"), Ok(Resp::Bulk(b"a\r\nb".to_vec())));
        assert_eq!(parse(b"$-1\r\n"), Ok(Resp::Nil));
        assert_eq!(parse(b"*-1\r\n"), Ok(Resp::Nil));
        assert_eq!(
            parse(b"*2\r\n:1\r\n$1\r\nx\r\n"),
            Ok(Resp::Array(vec![Resp::Int(1), Resp::Bulk(b"x".to_vec())]))
        );
        assert!(parse(b"-ERR wrong\r\n").unwrap_err().contains("ERR wrong"));
        assert!(parse(b"$5\r\nab").is_err());
        assert!(parse(b"").is_err());
    }
}
