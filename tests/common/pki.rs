//! A test PKI made in the test (rcgen): a CA, a server certificate for
//! 127.0.0.1 and localhost, and a client certificate, as PEM files in a
//! directory; and clients that connect over TLS.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use queueber::client::Client;
use queueber::tls::{ClientTls, ServerTls, ServerTlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// One CA and the certificates it signed, on disk.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a PEM file");
    path
}

impl Pki {
    /// Makes a CA named `name` and its certificates in `dir` (files prefixed
    /// with `name`).
    pub fn new(dir: &Path, name: &str) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(vec!["worker.test".into()], ExtendedKeyUsagePurpose::ClientAuth);
        Pki {
            ca: write(dir, &format!("{name}-ca.pem"), &ca_cert.pem()),
            server_cert: write(dir, &format!("{name}-server.pem"), &server_cert),
            server_key: write(dir, &format!("{name}-server.key"), &server_key),
            client_cert: write(dir, &format!("{name}-client.pem"), &client_cert),
            client_key: write(dir, &format!("{name}-client.key"), &client_key),
        }
    }

    /// The server's TLS, requiring client certificates of `client_ca` if given.
    pub fn server(&self, client_ca: Option<&Path>) -> ServerTls {
        ServerTls::load(&ServerTlsFiles {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: client_ca.map(Path::to_path_buf),
        })
        .expect("server TLS loads")
    }

    /// A client trusting this CA, without a client certificate.
    pub fn client(&self) -> ClientTls {
        ClientTls::new(Some(&self.ca), None).expect("client TLS")
    }

    /// A client trusting this CA and presenting this PKI's client certificate.
    pub fn client_with_certificate(&self) -> ClientTls {
        ClientTls::new(Some(&self.ca), Some((&self.client_cert, &self.client_key))).expect("client TLS")
    }
}

/// Connects one client over TLS (to the name 127.0.0.1).
pub async fn connect(addr: SocketAddr, tls: &ClientTls) -> std::io::Result<Client> {
    let stream = glommio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let stream = tls.connect("127.0.0.1", stream).await?;
    let (client, driver) = Client::new(stream);
    glommio::spawn_local(driver).detach();
    Ok(client)
}

/// [`super::with_clients`] over TLS.
pub fn with_tls_clients<T, F, Fut>(addr: SocketAddr, tls: ClientTls, connections: usize, scenario: F) -> T
where
    T: Send + 'static,
    F: FnOnce(Vec<Client>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    super::on_client_executor(move || async move {
        let mut clients = Vec::new();
        for _ in 0..connections {
            clients.push(connect(addr, &tls).await.expect("TLS connect"));
        }
        scenario(clients).await
    })
}
