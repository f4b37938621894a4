//! One `GET /metrics` over a blocking TCP connection, plain or TLS (rustls's
//! blocking stream, for a server started with --metrics-tls). The endpoint
//! answers HTTP/1.1 with `content-length` and `connection: close`, so a
//! request, a read to the end of the body and a few header checks are all
//! the HTTP this needs (no client library, no async runtime).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Largest answer read (a scrape of many queues is a few MiB at most).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Where the metrics are: `HOST:PORT`, or `http[s]://HOST:PORT[/PATH]`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `HOST:PORT`, as given (also the `Host` header).
    pub authority: String,
    pub path: String,
    /// `https://`: TLS, trusting [`Endpoint::tls`] (the CLI's --tls-ca) or
    /// the system's roots.
    pub https: bool,
    pub tls: Option<queueber::tls::ClientTls>,
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let (https, rest) = match s.strip_prefix("https://") {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix("http://").unwrap_or(s)),
        };
        if rest.contains("://") {
            return Err(format!(
                "{s:?}: only http:// and https:// metrics endpoints are supported"
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/metrics"),
        };
        if authority.is_empty() || !authority.contains(':') {
            return Err(format!("{s:?}: give the metrics endpoint as HOST:PORT"));
        }
        Ok(Endpoint {
            authority: authority.to_string(),
            path: path.to_string(),
            https,
            tls: None,
        })
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.path)
    }

    /// The host part of the authority: the name a TLS certificate must have.
    fn host(&self) -> &str {
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    fn addrs(&self) -> Result<Vec<SocketAddr>, String> {
        let addrs: Vec<SocketAddr> = self
            .authority
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", self.authority))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("{}: no address", self.authority));
        }
        Ok(addrs)
    }

    /// Fetches the body; the whole exchange takes at most `timeout`.
    pub fn get(&self, timeout: Duration) -> Result<String, String> {
        let url = self.url();
        self.exchange(timeout).map_err(|e| format!("GET {url}: {e}"))
    }

    fn exchange(&self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut last_error = String::new();
        let mut stream = None;
        for addr in self.addrs()? {
            match TcpStream::connect_timeout(&addr, remaining(deadline)?) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        let socket = stream.ok_or(last_error)?;
        if !self.https {
            return self.talk(
                socket.try_clone().map_err(|e| e.to_string())?,
                &socket,
                deadline,
                timeout,
            );
        }
        let tls = match &self.tls {
            Some(tls) => tls.clone(),
            None => queueber::tls::ClientTls::new(None, None).map_err(|e| e.to_string())?,
        };
        let name = queueber::tls::ClientTls::server_name(self.host()).map_err(|e| e.to_string())?;
        let connection = rustls::ClientConnection::new(tls.config(), name).map_err(|e| e.to_string())?;
        let stream = rustls::StreamOwned::new(connection, socket.try_clone().map_err(|e| e.to_string())?);
        self.talk(stream, &socket, deadline, timeout)
    }

    /// The request and its answer over `stream`, whose socket is `socket`
    /// (for the timeouts).
    fn talk<S: Read + Write>(
        &self,
        mut stream: S,
        socket: &TcpStream,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<String, String> {
        socket
            .set_write_timeout(Some(remaining(deadline)?))
            .map_err(|e| e.to_string())?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: queueber-top\r\nAccept: text/plain; version=0.0.4\r\nConnection: close\r\n\r\n",
            self.path, self.authority
        );
        stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut raw = Vec::with_capacity(64 << 10);
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            if let Some(body) = complete(&raw)? {
                return Ok(body);
            }
            socket
                .set_read_timeout(Some(remaining(deadline)?))
                .map_err(|e| e.to_string())?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(format!("no complete answer within {timeout:?}"))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            if n == 0 {
                // The server closed: the body is what came (no length given),
                // or the answer was cut short.
                return match split_head(&raw)? {
                    Some((head, body)) if head.content_length.is_none() => answer(head, body),
                    _ => Err("the connection closed before the whole answer".into()),
                };
            }
            raw.extend_from_slice(&chunk[..n]);
            if raw.len() > MAX_RESPONSE_BYTES {
                return Err(format!("answer larger than {MAX_RESPONSE_BYTES} bytes"));
            }
        }
    }
}

fn remaining(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err("timed out".into())
    } else {
        Ok(left)
    }
}

struct Head {
    status: u16,
    reason: String,
    content_length: Option<usize>,
}

/// The head, once it has all arrived, and the body bytes after it.
fn split_head(raw: &[u8]) -> Result<Option<(Head, &[u8])>, String> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "an answer head that is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let (version, status) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 answer: {status_line:?}"));
    }
    let status: u16 = status.parse().map_err(|_| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse().map_err(|_| format!("bad content-length {value:?}"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") && !value.eq_ignore_ascii_case("identity") {
            return Err(format!("unsupported transfer-encoding {value:?}"));
        }
    }
    Ok(Some((
        Head {
            status,
            reason: parts.next().unwrap_or("").to_string(),
            content_length,
        },
        &raw[end + 4..],
    )))
}

/// The body, once all of it (by `content-length`) has arrived; an error
/// for an answer other than 200.
fn complete(raw: &[u8]) -> Result<Option<String>, String> {
    match split_head(raw)? {
        Some((head, body)) => match head.content_length {
            Some(len) if body.len() >= len => answer(head, &body[..len]).map(Some),
            _ => Ok(None),
        },
        None => Ok(None),
    }
}

fn answer(head: Head, body: &[u8]) -> Result<String, String> {
    let body = String::from_utf8_lossy(body).into_owned();
    if head.status != 200 {
        return Err(format!("{} {}: {}", head.status, head.reason, body.trim()));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_host_port_or_an_http_url() {
        let e = Endpoint::parse("127.0.0.1:9420").unwrap();
        assert_eq!((e.authority.as_str(), e.path.as_str()), ("127.0.0.1:9420", "/metrics"));
        let e = Endpoint::parse("http://localhost:1234/other").unwrap();
        assert_eq!((e.authority.as_str(), e.path.as_str()), ("localhost:1234", "/other"));
        assert_eq!(e.url(), "http://localhost:1234/other");
        let e = Endpoint::parse("https://metrics.example:9420").unwrap();
        assert!(e.https);
        assert_eq!(e.host(), "metrics.example");
        assert_eq!(e.url(), "https://metrics.example:9420/metrics");
        assert_eq!(Endpoint::parse("https://[::1]:9420").unwrap().host(), "::1");
        assert!(Endpoint::parse("ftp://x:1").is_err());
        assert!(Endpoint::parse("localhost").is_err());
    }

    #[test]
    fn answers_complete_by_content_length_and_report_their_status() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nconnection: close\r\n\r\nhello";
        assert_eq!(complete(ok).unwrap(), Some("hello".to_string()));
        assert_eq!(complete(&ok[..ok.len() - 1]).unwrap(), None);
        assert_eq!(complete(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap(), None);
        let unavailable = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nstarting\n";
        assert_eq!(
            complete(unavailable),
            Err("503 Service Unavailable: starting".to_string())
        );
        assert!(complete(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(complete(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
    }

    #[test]
    fn a_scrape_of_a_tiny_server_reads_the_body() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let body = "up 1\n";
            write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            request
        });
        let e = Endpoint::parse(&addr.to_string()).unwrap();
        assert_eq!(e.get(Duration::from_secs(5)).unwrap(), "up 1\n");
        assert!(server.join().unwrap().starts_with("GET /metrics HTTP/1.1\r\n"));
    }

    #[test]
    fn a_silent_server_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = Endpoint::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        let started = Instant::now();
        let err = e.get(Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
        assert!(err.contains("within") || err.contains("timed out"), "{err}");
        drop(listener);
    }
}
