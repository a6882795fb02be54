//! The accept loop: TCP (optionally TLS), then the websocket upgrade with
//! buffers and limits sized to the protocol, then [`super::conn::serve`].
//!
//! It owns nothing but the listening socket; every connection is a task
//! tracked by the server's `TaskTracker` so shutdown can wait for it.
//! Whether a connection may start at all, and what its upgrade request
//! gets, is [`super::admission`]'s business; this loop only applies it, and
//! applies one deadline, from the accept to the login.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guildchat_protocol::limits::MAX_FRAME_BYTES;
use guildchat_protocol::Codec;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use super::admission::{self, Admission, Admitted, Head, IpGuard, Permits, LOGIN_CUT_SLACK};
use super::conn::{self, ConnCtx};
use crate::ids::ConnId;
use crate::stats::Stats;

/// tungstenite's read buffer per connection, allocated at the upgrade and
/// kept for the connection's life, so every idle connection pays it. Its
/// default (128 KiB) would be most of an idle connection's memory. Client
/// frames are small (a chat line, a heartbeat); the largest legal message
/// is `MAX_FRAME_BYTES`, and the buffer grows on demand for it (and comes
/// back to this size once that frame is consumed).
const READ_BUFFER: usize = 1024;
/// Frames are collected up to this size before a write syscall (the writer
/// task flushes after each batch anyway).
const WRITE_BUFFER: usize = 16 * 1024;
/// A connection whose unsent bytes exceed this is broken; the outbound queue
/// bounds what can pile up long before.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;

pub(crate) fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// How often the per-IP login limiter forgets addresses whose bucket is
/// full again, so its memory follows the addresses seen recently.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Accepts until `ctx.shutdown` or `ctx.drain` is cancelled; the listener
/// closes when it returns.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Option<crate::tls::TlsSwap>,
    ctx: Arc<ConnCtx>,
    tracker: TaskTracker,
) {
    let admission = Arc::new(Admission::new(&ctx.config.admission, ctx.stats.clone()));
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = ctx.drain.cancelled() => return,
            _ = prune.tick() => {
                admission.prune();
                continue;
            }
            r = listener.accept() => r,
        };
        let (tcp, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Typically EMFILE: out of file descriptors. Back off
                // instead of spinning; connections will close and free some.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The deadline starts here and covers the PROXY header, TLS, the
        // upgrade and the login.
        let deadline = Instant::now() + ctx.config.limits.login_timeout();
        // Checked before anything is spawned, so a flood of connections
        // costs an accept and a close each.
        let permits = match admission.admit() {
            Ok(p) => p,
            Err(refusal) => {
                refusal.count(&ctx.stats);
                debug!(%addr, %refusal, "connection refused");
                admission::refuse_now(tcp, tls.is_none());
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let sndbuf = ctx.config.limits.socket_send_buffer;
        if sndbuf > 0 {
            let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(sndbuf as usize);
        }
        let id = ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed));
        let span = info_span!("conn", id = %id, %addr, client = tracing::field::Empty);
        let ctx = ctx.clone();
        let start = Start {
            tcp,
            addr,
            permits,
            admission: admission.clone(),
            deadline,
            shutdown: ctx.shutdown.clone(),
        };
        // One task type per transport, so neither carries room for the
        // other's session.
        match &tls {
            None => {
                let handshake = Box::pin(plain_websocket(start));
                tracker.spawn(connection(handshake, id, ctx, deadline).instrument(span));
            }
            Some(acceptor) => {
                let handshake = Box::pin(tls_websocket(start, acceptor.current()));
                tracker.spawn(connection(handshake, id, ctx, deadline).instrument(span));
            }
        }
    }
}

/// A connection's task: the handshakes (boxed), then [`conn::serve`]
/// inline. Not an `async fn` (see Memory layout in ARCHITECTURE.md).
#[allow(clippy::manual_async_fn)]
fn connection<S, H>(
    handshake: Pin<Box<H>>,
    id: ConnId,
    ctx: Arc<ConnCtx>,
    login_deadline: Instant,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Future<Output = Option<(WebSocketStream<S>, Option<Codec>)>> + Send,
{
    async move {
        let session = match handshake.await {
            Some((ws, subprotocol)) => {
                Stats::bump(&ctx.stats.connections);
                conn::serve(ws, id, ctx, login_deadline, subprotocol)
            }
            None => return,
        };
        session.await
    }
}

/// What a connection's handshake starts from.
struct Start {
    tcp: TcpStream,
    addr: SocketAddr,
    permits: Permits,
    admission: Arc<Admission>,
    /// The login deadline, from the accept.
    deadline: Instant,
    /// A handshake still under way when the server stops is abandoned.
    shutdown: CancellationToken,
}

/// The PROXY header (when configured) and the per-IP limits. Returns the
/// socket and the connection's count against its address, or None when
/// the connection was refused (and answered).
async fn admit_peer(
    tcp: &mut TcpStream,
    addr: SocketAddr,
    admission: &Arc<Admission>,
    plain: bool,
) -> Option<IpGuard> {
    let stats = &admission.stats;
    let mut peer = addr;
    if admission.proxy_protocol {
        match admission::read_proxy_header(tcp).await {
            Ok(Some(client)) => peer = client,
            // A balancer's own health check: its address is the peer.
            Ok(None) => {}
            Err(refusal) => {
                refusal.count(stats);
                debug!(%refusal, "connection refused");
                return None;
            }
        }
        tracing::Span::current().record("client", tracing::field::display(peer));
    }
    match admission.admit_ip(peer.ip()) {
        Ok(guard) => Some(guard),
        Err(refusal) => {
            refusal.count(stats);
            debug!(client = %peer, %refusal, "connection refused");
            if plain {
                admission::answer_busy(tcp).await;
            }
            None
        }
    }
}

/// The plain transport: admission, then the upgrade, within the deadline.
async fn plain_websocket(
    start: Start,
) -> Option<(WebSocketStream<Admitted<TcpStream>>, Option<Codec>)> {
    let Start {
        mut tcp,
        addr,
        permits,
        admission,
        deadline,
        shutdown,
    } = start;
    let stats = admission.stats.clone();
    let steps = async {
        let guard = admit_peer(&mut tcp, addr, &admission, true).await?;
        let upgraded = upgrade(&mut tcp, &stats).await?;
        Some((guard, upgraded))
    };
    let (guard, (rest, codec)) = within(deadline, &shutdown, &stats, steps).await?;
    let stream = Admitted::new(tcp, permits, Some(guard), deadline + LOGIN_CUT_SLACK, stats);
    Some((into_websocket(stream, rest).await, codec))
}

/// The TLS transport: admission, the TLS handshake, then the upgrade, all
/// within one deadline.
async fn tls_websocket(
    start: Start,
    acceptor: TlsAcceptor,
) -> Option<(
    WebSocketStream<Admitted<TlsStream<TcpStream>>>,
    Option<Codec>,
)> {
    let Start {
        mut tcp,
        addr,
        permits,
        admission,
        deadline,
        shutdown,
    } = start;
    let stats = admission.stats.clone();
    let steps = async {
        let guard = admit_peer(&mut tcp, addr, &admission, false).await?;
        let mut stream = match acceptor.accept(tcp).await {
            Ok(stream) => stream,
            Err(e) => {
                debug!(error = %e, "TLS handshake failed");
                return None;
            }
        };
        let upgraded = upgrade(&mut stream, &stats).await?;
        Some((guard, stream, upgraded))
    };
    let (guard, stream, (rest, codec)) = within(deadline, &shutdown, &stats, steps).await?;
    let stream = Admitted::new(
        stream,
        permits,
        Some(guard),
        deadline + LOGIN_CUT_SLACK,
        stats,
    );
    Some((into_websocket(stream, rest).await, codec))
}

/// Runs the steps before the upgrade under the login deadline, until
/// shutdown.
async fn within<T>(
    deadline: Instant,
    shutdown: &CancellationToken,
    stats: &Stats,
    steps: impl Future<Output = Option<T>>,
) -> Option<T> {
    let timed = tokio::select! {
        r = tokio::time::timeout_at(deadline, steps) => r,
        _ = shutdown.cancelled() => return None,
    };
    match timed {
        Ok(done) => done,
        Err(_) => {
            Stats::bump(&stats.handshake_timeouts);
            debug!("handshake not done within the login deadline");
            None
        }
    }
}

/// Reads the upgrade request and answers it: `101`, or an HTTP error for
/// a request that is not a websocket upgrade we serve. Returns what the
/// client sent after its request, and the subprotocol's codec (echoed in
/// the `101`).
async fn upgrade<S>(stream: &mut S, stats: &Stats) -> Option<(Vec<u8>, Option<Codec>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match admission::read_head(stream).await {
        Head::Upgrade {
            accept,
            rest,
            codec,
        } => {
            let response = admission::switching_protocols(&accept, codec);
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                debug!(error = %e, "websocket upgrade failed");
                return None;
            }
            Some((rest, codec))
        }
        Head::Refused(refusal) => {
            Stats::bump(&stats.http_refused);
            debug!(?refusal, "not a websocket upgrade");
            admission::answer_http(stream, refusal).await;
            None
        }
        Head::Gone => None,
    }
}

/// The websocket over an upgraded stream, with our buffers and limits.
async fn into_websocket<S>(stream: S, rest: Vec<u8>) -> WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(websocket_config())).await
}
