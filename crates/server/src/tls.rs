//! Optional `wss://`: builds a rustls acceptor from PEM files named in the
//! config. It only loads certificates; it never accepts connections itself.

use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("no private key found in {0}")]
    NoKey(String),
    #[error("{path} is not valid PEM: {reason}")]
    BadPem { path: String, reason: String },
    #[error("no certificate found in {0}")]
    NoCert(String),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.display().to_string(),
            source,
        })
    };
    let cert_pem = read("certificate", &config.cert)?;
    let key_pem = read("private key", &config.key)?;
    // A malformed block is an error, not something to skip: a certificate
    // chain missing a link fails only later, at every handshake.
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: config.cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(config.cert.display().to_string()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| TlsError::NoKey(config.key.display().to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The TLS settings in force for new connections. A reload swaps them
/// whole; a handshake under way keeps the ones it started with, and
/// connections already up are not touched.
#[derive(Clone)]
pub struct TlsSwap(Arc<std::sync::RwLock<TlsAcceptor>>);

impl TlsSwap {
    pub fn new(acceptor: TlsAcceptor) -> TlsSwap {
        TlsSwap(Arc::new(std::sync::RwLock::new(acceptor)))
    }

    /// The acceptor for the next handshake.
    pub fn current(&self) -> TlsAcceptor {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `acceptor` in force for every handshake from now on.
    pub fn install(&self, acceptor: TlsAcceptor) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
    }
}
