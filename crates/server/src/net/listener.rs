//! The accept loop: TCP (optionally TLS), then the websocket upgrade with
//! buffers and limits sized to the protocol, then [`super::conn::serve`].
//!
//! It owns nothing but the listening socket; every connection is a task
//! tracked by the server's `TaskTracker` so shutdown can wait for it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guildchat_protocol::limits::MAX_FRAME_BYTES;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

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

/// Accepts until `ctx.shutdown` is cancelled.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<ConnCtx>,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
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
        let _ = tcp.set_nodelay(true);
        let sndbuf = ctx.config.limits.socket_send_buffer;
        if sndbuf > 0 {
            let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(sndbuf as usize);
        }
        let id = ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed));
        let ctx = ctx.clone();
        let tls = tls.clone();
        tracker
            .spawn(handle(tcp, addr, id, tls, ctx).instrument(info_span!("conn", id = %id, %addr)));
    }
}

async fn handle(
    tcp: TcpStream,
    addr: SocketAddr,
    id: ConnId,
    tls: Option<TlsAcceptor>,
    ctx: Arc<ConnCtx>,
) {
    // Every sub-future is boxed, and no value that is moved into one is
    // bound across an await (a moved-from local still takes room in the
    // state machine): a connection task is as large as its largest branch
    // (TLS handshake, websocket handshake, plain or TLS session), and an
    // idle connection would carry all that room for its whole life.
    // Boxed, it keeps only the session it runs.
    match tls {
        None => Box::pin(upgrade(tcp, id, ctx)).await,
        Some(acceptor) => Box::pin(tls_upgrade(tcp, addr, id, acceptor, ctx)).await,
    }
}

async fn tls_upgrade(
    tcp: TcpStream,
    addr: SocketAddr,
    id: ConnId,
    acceptor: TlsAcceptor,
    ctx: Arc<ConnCtx>,
) {
    let deadline = ctx.config.limits.login_timeout();
    let session = match tokio::time::timeout(deadline, Box::pin(acceptor.accept(tcp))).await {
        Ok(Ok(stream)) => Box::pin(upgrade(stream, id, ctx)),
        Ok(Err(e)) => return debug!(%addr, error = %e, "TLS handshake failed"),
        Err(_) => return debug!(%addr, "TLS handshake timed out"),
    };
    session.await
}

async fn upgrade<S>(stream: S, id: ConnId, ctx: Arc<ConnCtx>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = ctx.config.limits.login_timeout();
    let ws = Box::pin(tokio_tungstenite::accept_async_with_config(
        stream,
        Some(websocket_config()),
    ));
    let session = match tokio::time::timeout(deadline, ws).await {
        Ok(Ok(ws)) => {
            Stats::bump(&ctx.stats.connections);
            Box::pin(conn::serve(ws, id, ctx))
        }
        Ok(Err(e)) => return debug!(error = %e, "websocket upgrade failed"),
        Err(_) => return debug!("websocket upgrade timed out"),
    };
    session.await
}
