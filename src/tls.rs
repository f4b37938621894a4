//! TLS for the protocol port, the metrics endpoint and clients: rustls (no
//! OpenSSL) on the ring provider, driven through `futures-rustls` so that it
//! runs on any `futures` byte stream, glommio's included (no tokio).
//!
//! Certificates and keys are read from PEM files. The server speaks TLS 1.2
//! and 1.3 with rustls's safe defaults, optionally requiring client
//! certificates signed by a given CA; clients verify the server against a
//! given CA file, or against the system's trusted roots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::io::{AsyncRead, AsyncWrite};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The first byte of every TLS record that starts a handshake. A queueber
/// frame starts with its segment count minus one (little-endian, and never
/// near 22 segments), so this tells a TLS client from a plaintext one.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1): {detail}")]
    NoKey { path: PathBuf, detail: String },
    #[error("{path}: not PEM: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
    #[error("client certificate CA {path}: {detail}")]
    ClientCa { path: PathBuf, detail: String },
    #[error("no trusted root certificates: give a CA file (--tls-ca){detail}")]
    NoRoots { detail: String },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file (a chain: the leaf first).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::NoKey {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn roots_from(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certificates(path)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            what: format!("CA certificate in {}", path.display()),
            source,
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a TLS server needs: its certificate chain and key, and optionally
/// the CA that client certificates must be signed by (then they are required).
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A server's TLS configuration, loaded and checked (the key matches the
/// certificate) before anything listens, and loaded again by
/// [`ServerTls::reload`] (SIGHUP) so that certificates rotate without a
/// restart. Clones share the configuration.
#[derive(Clone)]
pub struct ServerTls {
    files: ServerTlsFiles,
    /// Read once per handshake (an uncontended read lock and an `Arc` clone).
    current: Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
    requires_client_certificates: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("requires_client_certificates", &self.requires_client_certificates)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn load(files: &ServerTlsFiles) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            current: Arc::new(std::sync::RwLock::new(Self::config(files)?)),
            files: files.clone(),
            requires_client_certificates: files.client_ca.is_some(),
        })
    }

    /// Reads the files again. On any error the configuration in use stays
    /// and the error says why; connections already open keep their session.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Self::config(&self.files)?;
        match self.current.write() {
            Ok(mut current) => *current = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(())
    }

    fn config(files: &ServerTlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let chain = load_certificates(&files.cert)?;
        let key = load_private_key(&files.key)?;
        let rustls_error = |what: &str| {
            let what = what.to_string();
            move |source| TlsError::Rustls { what, source }
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_error("TLS protocol versions"))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots_from(ca)?), provider())
                        .build()
                        .map_err(|e| TlsError::ClientCa {
                            path: ca.clone(),
                            detail: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, key).map_err(rustls_error(&format!(
            "certificate {} with key {}",
            files.cert.display(),
            files.key.display()
        )))?;
        Ok(Arc::new(config))
    }

    pub fn requires_client_certificates(&self) -> bool {
        self.requires_client_certificates
    }

    /// Runs the server side of a handshake on `stream`.
    pub async fn accept<S>(&self, stream: S) -> std::io::Result<futures_rustls::server::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        futures_rustls::TlsAcceptor::from(config).accept(stream).await
    }
}

/// A client's TLS configuration: whom to trust, and optionally a client
/// certificate to present (servers started with `--tls-client-ca` need one).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the certificates in `ca` (PEM) or, without one, the system's
    /// roots; presents `identity` (certificate chain file, key file) if given.
    pub fn new(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<ClientTls, TlsError> {
        let roots = match ca {
            Some(ca) => roots_from(ca)?,
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = rustls::RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    let detail = found.errors.first().map_or(String::new(), |e| format!(" ({e})"));
                    return Err(TlsError::NoRoots { detail });
                }
                roots
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                what: "TLS protocol versions".into(),
                source,
            })?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certificates(cert)?, load_private_key(key)?)
                .map_err(|source| TlsError::Rustls {
                    what: format!("client certificate {} with key {}", cert.display(), key.display()),
                    source,
                })?,
        };
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }

    /// The rustls configuration, for blocking use (`rustls::StreamOwned`).
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// `server_name` as rustls takes it: a DNS name or an IP address.
    pub fn server_name(server_name: &str) -> std::io::Result<ServerName<'static>> {
        ServerName::try_from(server_name.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{server_name:?} is not a valid TLS server name: {e}"),
            )
        })
    }

    /// Runs the client side of a handshake on `stream`, verifying that the
    /// server's certificate names `server_name` (a DNS name or an IP address).
    pub async fn connect<S>(
        &self,
        server_name: &str,
        stream: S,
    ) -> std::io::Result<futures_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = Self::server_name(server_name)?;
        futures_rustls::TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn missing_and_empty_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = load_certificates(&missing).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }), "{e}");
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let empty = write(dir.path(), "empty.pem", "");
        assert!(matches!(load_certificates(&empty), Err(TlsError::NoCertificate { .. })));
        assert!(matches!(load_private_key(&empty), Err(TlsError::NoKey { .. })));
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let one = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = write(dir.path(), "cert.pem", &one.cert.pem());
        let key = write(dir.path(), "key.pem", &other.signing_key.serialize_pem());
        let files = ServerTlsFiles {
            cert,
            key,
            client_ca: None,
        };
        let e = ServerTls::load(&files).unwrap_err();
        assert!(e.to_string().contains("cert.pem"), "{e}");
        let good = write(dir.path(), "good.pem", &one.signing_key.serialize_pem());
        let files = ServerTlsFiles { key: good, ..files };
        assert!(ServerTls::load(&files).is_ok());
    }

    #[test]
    fn a_client_trusts_only_the_given_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let path = write(dir.path(), "ca.pem", &ca.cert.pem());
        assert!(ClientTls::new(Some(&path), None).is_ok());
        let garbage = write(dir.path(), "garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n");
        assert!(ClientTls::new(Some(&garbage), None).is_err());
    }
}
