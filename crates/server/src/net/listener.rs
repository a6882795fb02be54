//! The accept loop: TCP (optionally TLS), then the websocket upgrade with
//! buffers and limits sized to the protocol, then [`super::conn::serve`].
//!
//! It owns nothing but the listening socket; every connection is a task
//! tracked by the server's `TaskTracker` so shutdown can wait for it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guildchat_protocol::limits::MAX_FRAME_BYTES;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
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
        let span = info_span!("conn", id = %id, %addr);
        let deadline = ctx.config.limits.login_timeout();
        let ctx = ctx.clone();
        // One task type per transport, so neither carries room for the
        // other's session.
        match &tls {
            None => {
                let handshake = Box::pin(websocket(tcp, deadline));
                tracker.spawn(connection(handshake, id, ctx).instrument(span));
            }
            Some(acceptor) => {
                let handshake = Box::pin(tls_websocket(tcp, addr, acceptor.clone(), deadline));
                tracker.spawn(connection(handshake, id, ctx).instrument(span));
            }
        }
    }
}

/// A connection's task: the handshakes, then [`conn::serve`].
///
/// Every connection keeps this task for its whole life, so it holds only
/// what the session needs. The handshakes (TLS, websocket) are boxed
/// before the task starts and freed when they finish; the session runs
/// inline (boxing it would cost a second allocation per connection). Not
/// an `async fn`, and nothing moved into the session is bound across its
/// await: a moved-from local still takes room in the state machine.
#[allow(clippy::manual_async_fn)]
fn connection<S, H>(
    handshake: Pin<Box<H>>,
    id: ConnId,
    ctx: Arc<ConnCtx>,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Future<Output = Option<WebSocketStream<S>>> + Send,
{
    async move {
        let session = match handshake.await {
            Some(ws) => {
                Stats::bump(&ctx.stats.connections);
                conn::serve(ws, id, ctx)
            }
            None => return,
        };
        session.await
    }
}

/// The TLS handshake, then the websocket one, each within `deadline`.
async fn tls_websocket(
    tcp: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    deadline: Duration,
) -> Option<WebSocketStream<TlsStream<TcpStream>>> {
    let stream = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!(%addr, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            debug!(%addr, "TLS handshake timed out");
            return None;
        }
    };
    websocket(stream, deadline).await
}

/// The websocket upgrade, with our buffers and limits, within `deadline`.
async fn websocket<S>(stream: S, deadline: Duration) -> Option<WebSocketStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ws = tokio_tungstenite::accept_async_with_config(stream, Some(websocket_config()));
    match tokio::time::timeout(deadline, ws).await {
        Ok(Ok(ws)) => Some(ws),
        Ok(Err(e)) => {
            debug!(error = %e, "websocket upgrade failed");
            None
        }
        Err(_) => {
            debug!("websocket upgrade timed out");
            None
        }
    }
}
