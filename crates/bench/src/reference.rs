//! The reference server (`guildchat bench reference`): the least a tokio +
//! tokio-tungstenite broadcast server can do, to show how close guildchat
//! comes to the limit of its runtime and websocket crate on this machine.
//!
//! Every binary frame a client sends is relayed, as the same `Bytes`, to
//! every connection (the sender included). Each connection has a bounded
//! queue and a writer task that drains it, feeds every frame and flushes
//! once, exactly like guildchat's writer; websocket buffers are sized like
//! guildchat's too. What it leaves out is everything that makes a chat
//! server: login, protobuf, actors, audiences, cooldowns, replay buffers and
//! the slow-consumer policy. A frame that does not fit a full queue is
//! dropped and counted, which the generator then reports as loss.
//!
//! It must never be used as a chat server: it trusts every client and
//! relays anything.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Frames waiting for one connection's socket; when full, further frames
/// for that connection are dropped and counted.
const QUEUE: usize = 1024;
/// Most frames written between two flushes (guildchat's writer uses the
/// same).
const MAX_BATCH: usize = 64;

/// The connections, each a queue to its writer.
#[derive(Default)]
struct Hub {
    conns: RwLock<HashMap<u64, mpsc::Sender<Bytes>>>,
    relayed: AtomicU64,
    dropped: AtomicU64,
}

impl Hub {
    fn broadcast(&self, frame: &Bytes) {
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        let mut sent = 0;
        for tx in conns.values() {
            match tx.try_send(frame.clone()) {
                Ok(()) => sent += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        self.relayed.fetch_add(sent, Ordering::Relaxed);
    }
}

fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(4 * 1024))
        .max_frame_size(Some(4 * 1024))
}

/// Serves until SIGTERM/SIGINT or `limit` has passed, then reports what it
/// relayed and dropped on stderr.
pub async fn serve(listen: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(
        listen.ip().is_loopback(),
        "the reference server only listens on loopback"
    );
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    let listener = socket.listen(4096)?;
    let hub = Arc::new(Hub::default());
    let stop = async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
        }
        let _ = tokio::signal::ctrl_c().await;
    };
    tokio::select! {
        _ = accept_loop(listener, hub.clone()) => {}
        _ = stop => {}
        _ = tokio::time::sleep(limit) => {}
    }
    eprintln!(
        "reference: relayed {} frames, dropped {}",
        hub.relayed.load(Ordering::Relaxed),
        hub.dropped.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn accept_loop(listener: TcpListener, hub: Arc<Hub>) {
    let mut next_id = 0u64;
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(_) => {
                // Out of descriptors, most likely: wait for some to close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next_id += 1;
        tokio::spawn(connection(tcp, next_id, hub.clone()));
    }
}

async fn connection(tcp: TcpStream, id: u64, hub: Arc<Hub>) {
    let _ = tcp.set_nodelay(true);
    let accept = tokio_tungstenite::accept_async_with_config(tcp, Some(websocket_config()));
    let Ok(Ok(ws)) = tokio::time::timeout(Duration::from_secs(10), accept).await else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    hub.conns
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, tx);
    let writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            for frame in batch.drain(..) {
                if sink.feed(Message::Binary(frame)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        // Every sender is gone: the client closed. Answer its close.
        let _ = sink.close().await;
    });
    // Pings are answered by tungstenite as the stream is read.
    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Binary(frame) => hub.broadcast(&frame),
            Message::Close(_) => break,
            _ => {}
        }
    }
    hub.conns
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    // The writer ends once a broadcast in flight drops its clone of the
    // queue's sender; it is not worth waiting long for.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(2), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}
