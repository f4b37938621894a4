//! Access control: the token file, verifying a presented token, and what a
//! verified token grants.
//!
//! A token file holds, per token, its id, the SHA-256 of its secret (never
//! the secret), exactly one tenant, its permissions and optionally the
//! queue name patterns it is limited to:
//!
//! ```toml
//! [[token]]
//! id = "orders-writer"
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! tenant = "acme"
//! permissions = ["send", "consume"]
//! queues = ["orders.*"]
//! ```
//!
//! Verification takes the same time whether the id is unknown, the secret
//! wrong or right: the presented secret is always hashed and compared, in
//! constant time, against a stored hash or a fixed dummy one.
//!
//! A client presents the whole secret (`<id>.<random>`) in an `auth`
//! request; the server binds the connection to the grant (`server::connection`).

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::names::QueueName;

/// What a token may do. `admin` covers create, policy, purge, delete, peek,
/// redrive, stats and list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// add
    Send,
    /// poll, remove, extend, release, fail
    Consume,
    Admin,
}

impl Permission {
    const ALL: [Permission; 3] = [Permission::Send, Permission::Consume, Permission::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Permission::Send => "send",
            Permission::Consume => "consume",
            Permission::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Permission::Send => 1,
            Permission::Consume => 2,
            Permission::Admin => 4,
        }
    }

    pub fn parse(s: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// A queue name pattern: exact, or with `*` matching any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePattern(String);

impl QueuePattern {
    pub fn new(pattern: &str) -> Result<QueuePattern, String> {
        let literal = pattern.replace('*', "");
        let valid = literal
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if pattern.is_empty() || !valid {
            return Err(format!(
                "queue pattern {pattern:?}: use queue-name characters ([A-Za-z0-9._-]) and *"
            ));
        }
        Ok(QueuePattern(pattern.to_string()))
    }

    pub fn matches(&self, queue: &str) -> bool {
        glob(self.0.as_bytes(), queue.as_bytes())
    }
}

/// `*` matches any run of bytes (iterative, with one backtrack point:
/// linear in practice, no recursion whatever the pattern).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// What a verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub token_id: String,
    pub tenant: String,
    permissions: u8,
    /// Empty: every queue of the tenant.
    queues: Vec<QueuePattern>,
    /// The secret's hash: a token re-issued under the same id is another
    /// grant (a reload revokes the old one).
    hash: [u8; 32],
}

/// Why a grant refuses a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("token {token} is bound to tenant {bound}, not {asked}")]
    OtherTenant {
        token: String,
        bound: String,
        asked: String,
    },
    #[error("token {token} lacks the {permission} permission")]
    Permission { token: String, permission: &'static str },
    #[error("token {token} is not allowed queue {queue}")]
    Queue { token: String, queue: String },
}

impl Grant {
    pub fn has(&self, permission: Permission) -> bool {
        self.permissions & permission.bit() != 0
    }

    /// Whether this grant allows `permission` on `queue` (`None`: an
    /// operation on no queue, such as listing).
    pub fn allows(&self, permission: Permission, queue: Option<&QueueName>) -> Result<(), Denied> {
        if let Some(q) = queue {
            if q.tenant() != self.tenant {
                return Err(Denied::OtherTenant {
                    token: self.token_id.clone(),
                    bound: self.tenant.clone(),
                    asked: q.tenant().to_string(),
                });
            }
        }
        if !self.has(permission) {
            return Err(Denied::Permission {
                token: self.token_id.clone(),
                permission: permission.name(),
            });
        }
        if let Some(q) = queue {
            if !self.queues.is_empty() && !self.queues.iter().any(|p| p.matches(q.queue())) {
                return Err(Denied::Queue {
                    token: self.token_id.clone(),
                    queue: q.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// A token file that could not be read, with where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: line {line}: {message}")]
pub struct AuthFileError {
    pub path: String,
    pub line: usize,
    pub message: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    token: Vec<toml::Spanned<TokenEntry>>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    id: String,
    sha256: String,
    tenant: String,
    permissions: Vec<String>,
    #[serde(default)]
    queues: Vec<String>,
}

struct Stored {
    hash: [u8; 32],
    grant: Grant,
}

/// The tokens of one auth file.
pub struct Tokens {
    by_id: HashMap<String, Stored>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print hashes.
        f.debug_struct("Tokens").field("count", &self.by_id.len()).finish()
    }
}

/// Compared against when the presented id is unknown, so that an unknown
/// id costs what a wrong secret does.
const DUMMY_HASH: [u8; 32] = [0x5a; 32];

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthFileError {
            path: path.display().to_string(),
            line: 0,
            message: format!("cannot read it: {e}"),
        })?;
        Tokens::parse(&text, &path.display().to_string())
    }

    /// Parses a token file; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Tokens, AuthFileError> {
        let error = |line: usize, message: String| AuthFileError {
            path: path.to_string(),
            line,
            message,
        };
        let file: FileFormat = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            error(line, e.message().to_string())
        })?;
        let mut by_id = HashMap::new();
        for spanned in file.token {
            let line = line_of(text, spanned.span().start);
            let entry = spanned.into_inner();
            let hash = decode_hash(&entry.sha256)
                .ok_or_else(|| error(line, format!("token {}: sha256 must be 64 hex digits", entry.id)))?;
            if entry.id.is_empty() || entry.id.len() > 128 || entry.id.chars().any(char::is_whitespace) {
                return Err(error(
                    line,
                    format!("token id {:?}: 1-128 characters, no spaces", entry.id),
                ));
            }
            crate::names::QueueName::new(&entry.tenant, "q")
                .map_err(|e| error(line, format!("token {}: tenant: {e}", entry.id)))?;
            let mut permissions = 0;
            for p in &entry.permissions {
                let p = Permission::parse(p).ok_or_else(|| {
                    error(
                        line,
                        format!("token {}: unknown permission {p:?} (send, consume, admin)", entry.id),
                    )
                })?;
                permissions |= p.bit();
            }
            if permissions == 0 {
                return Err(error(line, format!("token {}: no permissions", entry.id)));
            }
            let queues = entry
                .queues
                .iter()
                .map(|p| QueuePattern::new(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| error(line, format!("token {}: {e}", entry.id)))?;
            let stored = Stored {
                hash,
                grant: Grant {
                    token_id: entry.id.clone(),
                    tenant: entry.tenant,
                    permissions,
                    queues,
                    hash,
                },
            };
            if by_id.insert(entry.id.clone(), stored).is_some() {
                return Err(error(line, format!("token id {} appears twice", entry.id)));
            }
        }
        Ok(Tokens { by_id })
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The grant of a presented token, `<id>.<random>` as `new_token`
    /// made it (the whole string is the secret; its id part finds the
    /// entry). Hashes and compares in constant time whether or not the id
    /// exists.
    pub fn verify(&self, token: &str) -> Option<&Grant> {
        let id = token.rsplit_once('.').map_or("", |(id, _)| id);
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let stored = self.by_id.get(id);
        let expected = stored.map_or(&DUMMY_HASH, |s| &s.hash);
        let equal: bool = presented.ct_eq(expected).into();
        match stored {
            Some(s) if equal => Some(&s.grant),
            _ => None,
        }
    }
}

/// The server's access control: its tokens and the failed attempts per
/// client address (a failure path only; the lock is never on the request
/// path of an authenticated connection).
#[derive(Debug)]
pub struct Access {
    /// Replaced whole by a reload; read at `auth` and when a connection
    /// sees the generation move, never on the request path otherwise.
    tokens: std::sync::RwLock<std::sync::Arc<Tokens>>,
    /// Bumped by every reload that changed the tokens: a connection
    /// re-checks its grant when it sees a new one (one atomic read per
    /// request, no write).
    generation: std::sync::atomic::AtomicU64,
    /// Notified after every generation move: each shard then closes the
    /// revoked token's idle connections too, not only at their next request.
    changed: event_listener::Event,
    /// Where the tokens come from (for reloads).
    path: Option<std::path::PathBuf>,
    failures: std::sync::Mutex<HashMap<std::net::IpAddr, u32>>,
    /// Failed `auth` attempts since start (metrics).
    failures_total: std::sync::atomic::AtomicU64,
}

/// Most addresses whose failures are remembered (the oldest are forgotten).
const FAILURE_ADDRESSES: usize = 10_000;

impl Access {
    pub fn new(tokens: Tokens) -> Access {
        Access {
            tokens: std::sync::RwLock::new(std::sync::Arc::new(tokens)),
            generation: std::sync::atomic::AtomicU64::new(0),
            changed: event_listener::Event::new(),
            path: None,
            failures: std::sync::Mutex::new(HashMap::new()),
            failures_total: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Failed `auth` attempts since start.
    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Access from a token file, which [`Access::reload`] reads again.
    pub fn load(path: &Path) -> Result<Access, AuthFileError> {
        let mut access = Access::new(Tokens::load(path)?);
        access.path = Some(path.to_path_buf());
        Ok(access)
    }

    fn current(&self) -> std::sync::Arc<Tokens> {
        match self.tokens.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The grant of a presented token (see [`Tokens::verify`]).
    pub fn verify(&self, token: &str) -> Option<Grant> {
        self.current().verify(token).cloned()
    }

    /// How many tokens there are now.
    pub fn token_count(&self) -> usize {
        self.current().len()
    }

    /// The tokens' generation (moves with every reload that applied).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether `grant` is still what the current tokens give its id: false
    /// once its token was removed, re-issued or changed by a reload.
    pub fn still_valid(&self, grant: &Grant) -> bool {
        self.current()
            .by_id
            .get(&grant.token_id)
            .is_some_and(|s| &s.grant == grant)
    }

    /// Replaces the tokens with `tokens` (a reload that parsed).
    pub fn replace(&self, tokens: Tokens) {
        match self.tokens.write() {
            Ok(mut t) => *t = std::sync::Arc::new(tokens),
            Err(poisoned) => *poisoned.into_inner() = std::sync::Arc::new(tokens),
        }
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.changed.notify(usize::MAX);
    }

    /// Notified whenever [`Access::generation`] moves.
    pub fn changed(&self) -> &event_listener::Event {
        &self.changed
    }

    /// Reads the token file again (SIGHUP). A file that does not parse
    /// changes nothing: the old tokens stay, and the error says why.
    pub fn reload(&self) -> Result<usize, AuthFileError> {
        let Some(path) = &self.path else {
            return Ok(self.current().len());
        };
        let tokens = Tokens::load(path)?;
        let n = tokens.len();
        self.replace(tokens);
        Ok(n)
    }

    /// Counts a failed attempt from `addr`; returns how many in a row, and
    /// how long to wait before answering it (doubling from 50 ms, at most
    /// 2 s), so guessing is slow while one mistyped token costs little.
    pub fn failed(&self, addr: std::net::IpAddr) -> (u32, std::time::Duration) {
        self.failures_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let count = match self.failures.lock() {
            Ok(mut map) => {
                if map.len() >= FAILURE_ADDRESSES && !map.contains_key(&addr) {
                    map.clear();
                }
                let n = map.entry(addr).or_default();
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        let delay_ms = 50u64.saturating_mul(1 << (count.saturating_sub(1)).min(6));
        (count, std::time::Duration::from_millis(delay_ms.min(2_000)))
    }

    /// A successful attempt from `addr` clears its count.
    pub fn succeeded(&self, addr: std::net::IpAddr) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&addr);
        }
    }
}

fn decode_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token: its secret (shown once, never stored) and the TOML entry
/// to append to an auth file.
#[derive(Debug)]
pub struct NewToken {
    pub secret: String,
    pub entry: String,
}

/// Makes a token for `tenant` with `permissions`, limited to `queues` when
/// any are given. The secret is `<id>.<32 random bytes from the OS, hex>`.
pub fn new_token(tenant: &str, permissions: &[Permission], queues: &[String]) -> Result<NewToken, String> {
    crate::names::QueueName::new(tenant, "q").map_err(|e| format!("tenant: {e}"))?;
    if permissions.is_empty() {
        return Err("give at least one permission (send, consume, admin)".into());
    }
    for q in queues {
        QueuePattern::new(q)?;
    }
    let mut random = [0u8; 40];
    getrandom::getrandom(&mut random).map_err(|e| format!("no randomness from the OS: {e}"))?;
    let id = format!("{tenant}-{}", encode_hex(&random[32..]));
    // The id travels inside the secret, so one string is all a client
    // presents; the file keeps only its hash.
    let secret = format!("{id}.{}", encode_hex(&random[..32]));
    let hash = encode_hex(&Sha256::digest(secret.as_bytes()));
    let list = |items: Vec<String>| items.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let mut entry = format!(
        "[[token]]\nid = {id:?}\nsha256 = {hash:?}\ntenant = {tenant:?}\npermissions = [{}]\n",
        list(permissions.iter().map(|p| p.name().to_string()).collect())
    );
    if !queues.is_empty() {
        entry.push_str(&format!("queues = [{}]\n", list(queues.to_vec())));
    }
    Ok(NewToken { secret, entry })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(tenant: &str, queue: &str) -> QueueName {
        QueueName::new(tenant, queue).unwrap()
    }

    #[test]
    fn a_new_token_verifies_with_its_secret_only() {
        let t = new_token("acme", &[Permission::Send, Permission::Consume], &["orders.*".into()]).unwrap();
        let tokens = Tokens::parse(&t.entry, "new").unwrap();
        assert_eq!(tokens.len(), 1);
        let id = tokens.by_id.keys().next().unwrap().clone();
        let grant = tokens.verify(&t.secret).expect("its own secret");
        assert!(t.secret.starts_with(&format!("{id}.")));
        assert_eq!(grant.tenant, "acme");
        assert!(grant.has(Permission::Send) && grant.has(Permission::Consume) && !grant.has(Permission::Admin));
        assert!(tokens.verify(&format!("{id}.wrong")).is_none());
        assert!(tokens.verify("unknown.secret").is_none());
        assert!(tokens.verify("no-dot").is_none());
        assert!(!t.entry.contains(&t.secret), "the entry must not hold the secret");
    }

    #[test]
    fn grants_hold_tenant_permissions_and_patterns() {
        let t = new_token("acme", &[Permission::Send], &["orders.*".into(), "audit".into()]).unwrap();
        let tokens = Tokens::parse(&t.entry, "x").unwrap();
        let grant = tokens.by_id.values().next().unwrap().grant.clone();
        assert_eq!(grant.allows(Permission::Send, Some(&q("acme", "orders.eu"))), Ok(()));
        assert_eq!(grant.allows(Permission::Send, Some(&q("acme", "audit"))), Ok(()));
        assert!(matches!(
            grant.allows(Permission::Send, Some(&q("acme", "billing"))),
            Err(Denied::Queue { .. })
        ));
        assert!(matches!(
            grant.allows(Permission::Send, Some(&q("other", "orders.eu"))),
            Err(Denied::OtherTenant { .. })
        ));
        assert!(matches!(
            grant.allows(Permission::Consume, Some(&q("acme", "orders.eu"))),
            Err(Denied::Permission {
                permission: "consume",
                ..
            })
        ));
    }

    #[test]
    fn a_reload_revokes_removed_and_reissued_tokens() {
        let a = new_token("acme", &[Permission::Send], &[]).unwrap();
        let b = new_token("acme", &[Permission::Send], &[]).unwrap();
        let access = Access::new(Tokens::parse(&format!("{}{}", a.entry, b.entry), "x").unwrap());
        let (ga, gb) = (access.verify(&a.secret).unwrap(), access.verify(&b.secret).unwrap());
        let before = access.generation();
        // b is dropped; a stays as it was.
        access.replace(Tokens::parse(&a.entry, "x").unwrap());
        assert!(access.generation() > before);
        assert!(access.still_valid(&ga));
        assert!(!access.still_valid(&gb));
        assert!(access.verify(&b.secret).is_none());
        // a re-issued under the same id with another secret: the old grant goes.
        let (id, _) = a.secret.rsplit_once('.').unwrap();
        let other = a
            .entry
            .replace(&encode_hex(&Sha256::digest(a.secret.as_bytes())), &"ab".repeat(32));
        access.replace(Tokens::parse(&other, "x").unwrap());
        assert!(!access.still_valid(&ga), "{id}");
    }

    #[test]
    fn failures_slow_down_and_success_resets() {
        let access = Access::new(Tokens::parse("", "x").unwrap());
        let addr: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let delays: Vec<u64> = (0..8).map(|_| access.failed(addr).1.as_millis() as u64).collect();
        assert_eq!(delays, vec![50, 100, 200, 400, 800, 1600, 2000, 2000]);
        access.succeeded(addr);
        assert_eq!(access.failed(addr), (1, std::time::Duration::from_millis(50)));
    }

    #[test]
    fn globs_match_runs_of_characters() {
        let p = |s: &str| QueuePattern::new(s).unwrap();
        assert!(p("*").matches("anything"));
        assert!(p("orders.*").matches("orders."));
        assert!(p("orders.*").matches("orders.eu.west"));
        assert!(!p("orders.*").matches("order"));
        assert!(p("a*b*c").matches("aXXbYYc"));
        assert!(!p("a*b*c").matches("aXXbYY"));
        assert!(p("exact").matches("exact") && !p("exact").matches("exactly"));
        assert!(QueuePattern::new("bad pattern").is_err());
        assert!(QueuePattern::new("").is_err());
    }

    #[test]
    fn errors_name_the_line() {
        let good = new_token("acme", &[Permission::Admin], &[]).unwrap().entry;
        let bad_perm = good.replace("\"admin\"", "\"root\"");
        let text = format!("# tokens\n\n{bad_perm}");
        let err = Tokens::parse(&text, "auth.toml").unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("unknown permission \"root\""), "{err}");
        assert!(err.to_string().starts_with("auth.toml: line 3:"));

        let syntax = "[[token]]\nid = \"a\"\nsha256 = oops\n";
        let err = Tokens::parse(syntax, "auth.toml").unwrap_err();
        assert_eq!(err.line, 3, "{err}");

        let twice = format!("{good}\n{good}");
        let err = Tokens::parse(&twice, "auth.toml").unwrap_err();
        assert!(err.message.contains("appears twice"), "{err}");

        let short = good.replace("sha256 = \"", "sha256 = \"ab");
        assert!(Tokens::parse(&short, "a")
            .unwrap_err()
            .message
            .contains("64 hex digits"));
        assert!(Tokens::parse("[[token]]\nid = \"a\"\n", "a").is_err(), "missing fields");
        assert!(Tokens::parse("", "empty").unwrap().is_empty());
    }
}
