//! Reload without dropping anyone: SIGHUP and `POST /v1/reload` re-read
//! the key ring, the TLS certificate and the sensitive-word list.
//!
//! It owns the all-or-nothing rule: everything is read and validated
//! first, and only if all of it is good is any of it put in force, so a
//! bad edit leaves the server exactly as it was. What it installs applies
//! to the next login and the next handshake; it never touches a session or
//! a connection that is already up.

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::filter::{self, Filter, FilterHandle};
use crate::tls::TlsSwap;

/// Why a reload was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("keys: {0}")]
    Keys(#[from] crate::auth::KeysError),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("filter: {0}")]
    Filter(#[from] filter::FilterError),
}

/// What a reload needs to reach.
pub struct Reloader {
    config: Arc<Config>,
    auth: Arc<Authenticator>,
    tls: Option<TlsSwap>,
    filter: FilterHandle,
    /// One reload at a time, so two cannot interleave their installs.
    running: std::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        config: Arc<Config>,
        auth: Arc<Authenticator>,
        tls: Option<TlsSwap>,
        filter: FilterHandle,
    ) -> Reloader {
        Reloader {
            config,
            auth,
            tls,
            filter,
            running: std::sync::Mutex::new(()),
        }
    }

    /// Re-reads and validates everything, then installs it all. Blocking
    /// (file reads, key parsing, the filter's automaton): call it off the
    /// runtime. Returns what was reloaded.
    pub fn reload(&self) -> Result<Vec<&'static str>, ReloadError> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // The file is read and installed with list edits held off, so an
        // edit made meanwhile is neither lost nor overwritten.
        let _edits = self.filter.lock_edits();
        let verifier = self.auth.prepare_reload(&self.config)?;
        let acceptor = match (&self.tls, &self.config.tls) {
            (Some(_), Some(tls)) => Some(crate::tls::acceptor(tls)?),
            _ => None,
        };
        // In a cluster the shared list is the list, and the file only its
        // copy: a reload leaves the filter alone.
        let built = match self.config.cluster.enabled() {
            true => None,
            false => Some(Filter::new(filter::load(&filter::path_in(
                &self.config.data_dir,
            ))?)?),
        };
        let mut done = Vec::new();
        if let Some(verifier) = verifier {
            self.auth.install(verifier);
            done.push("keys");
        }
        if let (Some(swap), Some(acceptor)) = (&self.tls, acceptor) {
            swap.install(acceptor);
            done.push("tls");
        }
        if let Some(built) = built {
            self.filter.replace(Arc::new(built));
            done.push("filter");
        }
        Ok(done)
    }
}
