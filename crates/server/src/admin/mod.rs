//! The admin HTTP API: what the game's logic server, game masters and ops
//! use to drive a running guildchat (membership, moderation,
//! announcements, the word filter, the audit log, metrics and health).
//!
//! It owns its own listener (never the game port), the key check, the
//! routes and the OpenAPI document generated from them. It changes chat
//! state only through the world's handle, the store's handle and the shared
//! [`Moderation`] copy, in that order for a sanction: store first, so that
//! what a caller was told happened survives a restart. It never touches a
//! player's socket and never holds a blocking lock across an `.await` (the
//! one async lock, taken by announcements that carry an idempotency key,
//! makes check, send and record one step).
//!
//! # Layout
//! - [`error`]: the error body and the extractors that produce it.
//! - [`keys`]: keys, scopes, the bearer check.
//! - `routes`: the handlers, one per operation, and the router.

pub mod error;
pub mod keys;
mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::filter::FilterHandle;
use crate::history::{AuditEntry, HistoryHandle};
use crate::moderation::{now_ms, Moderation};
use crate::reload::Reloader;
use crate::stats::Stats;
use crate::world::WorldHandle;
pub use keys::{AdminKey, Scope};
pub use routes::{openapi, router};

/// How long an announce idempotency key is remembered.
const IDEMPOTENCY_MS: u64 = 24 * 60 * 60 * 1000;

/// Announce keys and audit lines kept in memory when there is no store;
/// the oldest go first.
const MEMORY_CAP: usize = 10_000;

/// Everything a handler may reach. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    pub(crate) world: WorldHandle,
    pub(crate) stats: Arc<Stats>,
    pub(crate) history: Option<HistoryHandle>,
    pub(crate) moderation: Arc<Moderation>,
    pub(crate) filter: FilterHandle,
    pub(crate) reloader: Arc<Reloader>,
    pub(crate) config: Arc<Config>,
    pub(crate) keys: Arc<[AdminKey]>,
    /// Without a store: announce keys and the audit log, bounded.
    memory: Arc<Mutex<Memory>>,
    /// Requests per key: `admin.requests_per_sec`, with a burst of twice
    /// that; beyond it, 429 with `Retry-After`.
    pub(crate) limiter: Arc<governor::DefaultKeyedRateLimiter<String>>,
    /// Held from the idempotency check to the record of an announce key,
    /// so that two concurrent repeats send once.
    pub(crate) announce_lock: Arc<tokio::sync::Mutex<()>>,
    /// Held by each sanction change from its store write to its in-memory
    /// update, so two changes cannot land in one order and apply in the
    /// other.
    change_lock: Arc<tokio::sync::Mutex<()>>,
    /// The world's last answer to a readiness probe, and when: probes
    /// (which need no key) share one question a second, so a flood of them
    /// cannot fill the world's inbox.
    probe: Arc<tokio::sync::Mutex<Option<(std::time::Instant, bool)>>>,
    /// Development mode only (keys generated in the data dir): mints the
    /// demo client's tokens. `None` in production.
    pub(crate) dev_signer: Option<Arc<guildchat_auth::Signer>>,
    /// The game port's address once it is bound, for the demo page.
    pub(crate) game_addr: Arc<std::sync::OnceLock<SocketAddr>>,
    /// In a cluster: where sanctions are shared and calls about another
    /// node's players go.
    pub(crate) cluster: Option<crate::cluster::Cluster>,
    /// Drains the node (`POST /v1/drain`); `None` outside a server.
    pub(crate) drain: Option<tokio_util::sync::CancellationToken>,
}

#[derive(Default)]
struct Memory {
    announce: HashMap<String, (u64, u64)>,
    audit: std::collections::VecDeque<AuditEntry>,
    next_audit: u64,
}

impl AdminState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        world: WorldHandle,
        stats: Arc<Stats>,
        history: Option<HistoryHandle>,
        moderation: Arc<Moderation>,
        filter: FilterHandle,
        reloader: Arc<Reloader>,
        config: Arc<Config>,
    ) -> AdminState {
        let keys = config.admin.keys.clone().into();
        let rate = std::num::NonZeroU32::new(config.admin.requests_per_sec)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
        let limiter = Arc::new(governor::RateLimiter::keyed(
            governor::Quota::per_second(rate).allow_burst(burst),
        ));
        AdminState {
            world,
            stats,
            history,
            moderation,
            filter,
            reloader,
            config,
            keys,
            memory: Arc::default(),
            limiter,
            announce_lock: Arc::default(),
            change_lock: Arc::default(),
            probe: Arc::default(),
            dev_signer: None,
            game_addr: Arc::default(),
            cluster: None,
            drain: None,
        }
    }

    /// Whether the world answers within a second, asked at most once a
    /// second however many probes come.
    pub(crate) async fn world_answers(&self) -> bool {
        let mut last = self.probe.lock().await;
        if let Some((at, ok)) = *last {
            if at.elapsed() < std::time::Duration::from_secs(1) {
                return ok;
            }
        }
        let ok = tokio::time::timeout(std::time::Duration::from_secs(1), self.world.counts())
            .await
            .is_ok_and(|r| r.is_ok());
        *last = Some((std::time::Instant::now(), ok));
        ok
    }

    /// Runs a change to the end on a task of its own, one change at a time,
    /// once the store's sanctions are loaded: a caller who hangs up cannot
    /// leave it half done (stored but not applied).
    pub(crate) async fn change<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = Result<T, error::ApiError>> + Send + 'static,
    ) -> Result<T, error::ApiError> {
        let unavailable = |why: &str| error::ApiError::Unavailable(why.to_owned());
        if !self
            .moderation
            .wait_loaded(std::time::Duration::from_secs(5))
            .await
        {
            return Err(unavailable("the sanctions in force are still being loaded"));
        }
        let lock = self.change_lock.clone();
        tokio::spawn(async move {
            let _one_at_a_time = lock.lock().await;
            f.await
        })
        .await
        .map_err(|_| unavailable("the change stopped"))?
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a change in the audit log. A failure to record is logged,
    /// not returned: the change itself already happened.
    pub(crate) async fn audit(
        &self,
        key_id: &str,
        action: &str,
        target: String,
        reason: &str,
        result: &str,
    ) {
        let entry = AuditEntry {
            id: 0,
            time_ms: now_ms(),
            key_id: key_id.to_owned(),
            action: action.to_owned(),
            target,
            reason: reason.to_owned(),
            result: result.to_owned(),
        };
        // In a cluster, also in the shared log every node reads.
        if let Some(cluster) = &self.cluster {
            if let Err(e) = cluster.audit(&entry).await {
                warn!(error = %e, action, "could not record an admin action in the shared audit log; it is in this node's own");
            }
        }
        match &self.history {
            Some(history) => {
                if let Err(e) = history.audit(entry).await {
                    warn!(error = %e, action, "could not record an admin action in the audit log");
                }
            }
            None => {
                let mut memory = self.memory();
                memory.next_audit += 1;
                let mut entry = entry;
                entry.id = memory.next_audit;
                if memory.audit.len() >= MEMORY_CAP {
                    memory.audit.pop_front();
                }
                memory.audit.push_back(entry);
            }
        }
    }

    /// The audit log, newest first, below `before` (0: from the newest),
    /// with the node that took each action in a cluster (whose shared log
    /// it reads).
    pub(crate) async fn audit_page(
        &self,
        before: u64,
        limit: u32,
    ) -> Result<Vec<(AuditEntry, Option<String>)>, error::ApiError> {
        if let Some(cluster) = &self.cluster {
            let page = cluster
                .audit_page(before, limit)
                .await
                .map_err(|e| error::ApiError::Unavailable(format!("the shared audit log: {e}")))?;
            return Ok(page
                .into_iter()
                .map(|(id, e)| {
                    let entry = AuditEntry {
                        id,
                        time_ms: e.time_ms,
                        key_id: e.key_id,
                        action: e.action,
                        target: e.target,
                        reason: e.reason,
                        result: e.result,
                    };
                    (entry, Some(e.node))
                })
                .collect());
        }
        let alone = |entries: Vec<AuditEntry>| entries.into_iter().map(|e| (e, None)).collect();
        match &self.history {
            Some(history) => Ok(alone(history.audit_page(before, limit).await?)),
            None => {
                let memory = self.memory();
                Ok(memory
                    .audit
                    .iter()
                    .rev()
                    .filter(|e| before == 0 || e.id < before)
                    .take(limit.clamp(1, 1000) as usize)
                    .map(|e| (e.clone(), None))
                    .collect())
            }
        }
    }

    /// Records that announce `key` sent `msg_id`; returns the msg_id that
    /// owns the key. Kept in memory as well as in the store, so a store
    /// that cannot take the record now still stops a repeat in this
    /// process (the failure is logged: the line has gone out already).
    pub(crate) async fn announce_key(&self, key: String, msg_id: u64) -> u64 {
        let now = now_ms();
        let owner = {
            let mut memory = self.memory();
            memory
                .announce
                .retain(|_, (_, at)| now.saturating_sub(*at) < IDEMPOTENCY_MS);
            if memory.announce.len() >= MEMORY_CAP {
                let oldest = memory
                    .announce
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    memory.announce.remove(&oldest);
                }
            }
            memory
                .announce
                .entry(key.clone())
                .or_insert((msg_id, now))
                .0
        };
        if let Some(history) = &self.history {
            match history.announce_key(key, owner, now).await {
                Ok(stored) => return stored,
                Err(e) => warn!(error = %e, "could not store an announce idempotency key"),
            }
        }
        owner
    }

    /// An announce key already used within 24 h, if any.
    pub(crate) async fn announce_seen(&self, key: &str) -> Result<Option<u64>, error::ApiError> {
        let now = now_ms();
        let remembered = self
            .memory()
            .announce
            .get(key)
            .filter(|(_, at)| now.saturating_sub(*at) < IDEMPOTENCY_MS)
            .map(|(id, _)| *id);
        match (remembered, &self.history) {
            (Some(id), _) => Ok(Some(id)),
            (None, Some(history)) => Ok(history.announce_seen(key.to_owned(), now).await?),
            (None, None) => Ok(None),
        }
    }
}

/// Most admin connections open at once. The admin listener shares the
/// process's descriptors with the game port; past this, new admin
/// connections wait in the kernel's backlog instead of taking more.
pub const MAX_CONNECTIONS: usize = 256;

/// The admin listener with its connection cap.
struct Capped {
    inner: TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
}

/// An admin connection holding its place under [`MAX_CONNECTIONS`].
struct Placed {
    stream: tokio::net::TcpStream,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl axum::serve::Listener for Capped {
    type Io = Placed;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Placed, SocketAddr) {
        let place = match self.permits.clone().acquire_owned().await {
            Ok(place) => place,
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        Placed {
                            stream,
                            _place: place,
                        },
                        addr,
                    );
                }
                // Out of descriptors, or a connection reset before it was
                // taken: wait a little rather than spin.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl tokio::io::AsyncRead for Placed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Placed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves the admin API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    if state.keys.is_empty() {
        info!(%addr, "admin listener up (no keys configured: only /metrics, /healthz, /readyz)");
    } else {
        info!(%addr, keys = state.keys.len(), "admin listener up");
    }
    let app = router(state);
    let capped = Capped {
        inner: listener,
        permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
    };
    axum::serve(capped, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
