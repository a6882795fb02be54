//! A connection's writer task: the only code that writes to its socket.
//!
//! It waits for the first queued frame, then takes whatever else is already
//! queued (up to [`MAX_BATCH`]), writes them all and flushes once: under load
//! many frames share one syscall. Under sustained load it also corks: a
//! frame that arrives within `coalesce` of the previous write waits until
//! `coalesce` has passed, so that the frames behind it join the same write
//! (one syscall, one wake-up of the client) instead of each paying for its
//! own. A frame after a quiet spell goes out at once, so corking adds
//! latency only while a client receives faster than one write per
//! `coalesce`, and never more than `coalesce`. It also sends the periodic ping, and obeys
//! the kill switch even while a write is stuck on a client that stopped
//! reading. When sheddable notifications were dropped for this client, it
//! tells the client how many once its queue has drained. The periodic ping
//! goes only to a client that sent no frame since the previous one. On a JSON
//! connection it writes text frames; the frames were transcoded before they
//! were queued, and only its own notices (shed, kill switch) are transcoded
//! here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use guildchat_protocol::{codec, json, pb, Codec, KickReason, MsgType};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::outbound::{kick_notice, Control, Outbound, Shared};
use super::queue;

/// Most frames written between two flushes.
const MAX_BATCH: usize = 64;

/// How long a close (notice + close frame) may take to write before the
/// writer gives up on the client.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// A queued frame as the websocket message of the connection's codec.
fn frame_message(codec: Codec, frame: Bytes) -> Option<Message> {
    match codec {
        Codec::Protobuf => Some(Message::Binary(frame)),
        // serde_json writes UTF-8; checked again (a few hundred bytes)
        // rather than taken on trust with `unsafe`.
        Codec::Json => Utf8Bytes::try_from(frame).ok().map(Message::Text),
    }
}

/// A notice of the writer's own, encoded as protobuf, in the connection's
/// codec. One recipient: transcoded here, once.
fn notice_message(codec: Codec, proto: Bytes) -> Option<Message> {
    match codec {
        Codec::Protobuf => Some(Message::Binary(proto)),
        Codec::Json => frame_message(codec, json::transcode_server(&proto).ok()?),
    }
}

pub(crate) fn close_message(code: u16) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: "".into(),
    }))
}

/// Runs until the connection is closed. The kill switch (`shared.kill`) is
/// cancelled on exit, which stops the reader, and a reader that ends first
/// cancels it too, which stops the writer.
///
/// A plain async block rather than an `async fn` (see Memory layout in
/// ARCHITECTURE.md).
#[allow(clippy::manual_async_fn)]
pub(crate) fn run<S>(
    mut sink: Sink<S>,
    mut rx: queue::Receiver<Outbound>,
    shared: Arc<Shared>,
    ping_every: Duration,
    coalesce: Duration,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Built here rather than in the block (see Memory layout in
    // ARCHITECTURE.md).
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    async move {
        // Polled only while a write is stuck: registering a waiter on a token
        // takes its lock, too dear for every wake-up. Otherwise the writer waits
        // on its queue alone and reads the kill flag after each wake-up.
        let kill = shared.kill.cancelled();
        tokio::pin!(kill);
        // When the last batch was written; far enough back that the first frame
        // never waits.
        let now = tokio::time::Instant::now();
        let mut last_write = now.checked_sub(coalesce).unwrap_or(now);
        // The cork timer, allocated the first time this connection corks
        // (see Memory layout in ARCHITECTURE.md).
        let mut cork_timer: Option<Pin<Box<Sleep>>> = None;
        loop {
            if shared.is_killed() {
                let (reason, code) = shared.verdict();
                // Boxed, like every once-only path (see Memory layout in
                // ARCHITECTURE.md).
                Box::pin(killed(&mut sink, shared.codec(), reason, code)).await;
                break;
            }
            if shared.is_reader_gone() {
                break;
            }
            let close = tokio::select! {
                biased;
                first = rx.recv() => {
                    let Some(first) = first else {
                        // Every handle dropped: the session ended without a
                        // reason to give.
                        let _ = Box::pin(tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(close_message(1000)))).await;
                        break;
                    };
                    // One clock read per batch: the batch counts as written
                    // when it starts, at once or when the cork ends. Only
                    // `last_write` is kept across the wait.
                    let cork = last_write + coalesce;
                    let now = tokio::time::Instant::now();
                    let wait = matches!(first, Outbound::Frame(_)) && now < cork;
                    last_write = if wait { cork } else { now };
                    if wait {
                        let timer = match &mut cork_timer {
                            Some(timer) => {
                                timer.as_mut().reset(last_write);
                                timer
                            }
                            None => cork_timer.insert(Box::pin(tokio::time::sleep_until(last_write))),
                        };
                        tokio::select! {
                            biased;
                            _ = &mut kill => {}
                            _ = timer.as_mut() => {}
                        }
                    }
                    let written = tokio::select! {
                        biased;
                        r = write_batch(&mut sink, first, &mut rx, &shared) => Some(r),
                        _ = &mut kill => None,
                    };
                    match written {
                        Some(Ok(true)) => true,
                        Some(Ok(false)) => {
                            if rx.is_empty() && shed_notice(&mut sink, &shared).await.is_err() {
                                break;
                            }
                            false
                        }
                        // The socket failed: nothing more can be written.
                        Some(Err(())) => break,
                        // Killed while the socket was full: the loop's check
                        // writes the notice and close frame, best effort.
                        None => false,
                    }
                }
                _ = ping.tick() => {
                    // A client that sent a frame since the last tick is
                    // alive, and its next frame resets the reader's idle
                    // timer anyway: the ping would be a wake-up and a
                    // syscall on both sides for nothing. Only data frames
                    // count, not pongs, so a silent client is still pinged
                    // every interval.
                    if shared.take_heard() {
                        continue;
                    }
                    let ping = tokio::select! {
                        biased;
                        r = sink.send(Message::Ping(Bytes::new())) => r,
                        _ = &mut kill => continue,
                    };
                    if ping.is_err() {
                        break;
                    }
                    false
                }
            };
            if close {
                break;
            }
        }
        shared.kill.cancel();
    }
}

/// Writes `first` and whatever else is already queued (up to [`MAX_BATCH`]
/// frames), flushes once, then reports the drained bytes: exactly what
/// `try_frame` counted for those frames, also when the socket fails midway,
/// so the queued count never drifts. Ok(true) when the batch ended with a
/// close frame. Frames go from the queue straight to the sink: no batch
/// buffer (see Memory layout in ARCHITECTURE.md).
async fn write_batch<S>(
    sink: &mut Sink<S>,
    first: Outbound,
    rx: &mut queue::Receiver<Outbound>,
    shared: &Shared,
) -> Result<bool, ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut closing = false;
    let mut bytes = 0usize;
    // Settled before anything was queued, so one read serves the batch.
    let codec = shared.codec();
    let mut next = Some(first);
    for _ in 0..MAX_BATCH {
        let Some(item) = next.take().or_else(|| rx.try_recv()) else {
            break;
        };
        let msg = match item {
            Outbound::Frame(frame) => {
                bytes = bytes.saturating_add(frame.len());
                match frame_message(codec, frame.into_bytes()) {
                    Some(msg) => msg,
                    // Never made by this server; counted, not written.
                    None => continue,
                }
            }
            Outbound::Control(control) => match *control {
                Control::Wake => continue,
                Control::Ping(payload) => Message::Ping(payload),
                Control::Close(code) => {
                    closing = true;
                    close_message(code)
                }
            },
        };
        if sink.feed(msg).await.is_err() {
            shared.unqueue(bytes);
            return Err(());
        }
        if closing {
            break;
        }
    }
    if sink.flush().await.is_err() {
        shared.unqueue(bytes);
        return Err(());
    }
    shared.drained(bytes);
    Ok(closing)
}

/// Tells the client how many sheddable notifications it missed, once its
/// queue is empty again.
async fn shed_notice<S>(sink: &mut Sink<S>, shared: &Shared) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let count = shared
        .shed_pending
        .swap(0, std::sync::atomic::Ordering::AcqRel);
    if count == 0 {
        return Ok(());
    }
    let notice = codec::encode(&pb::ChatMessageNotifyShed {
        msghead: codec::head(MsgType::ChcNotifyShed, 0),
        count,
        total: shared.shed_total.load(std::sync::atomic::Ordering::Acquire),
    });
    match notice_message(shared.codec(), notice) {
        Some(msg) => sink.send(msg).await.map_err(|_| ()),
        None => Ok(()),
    }
}

/// Best effort: the notice and the close frame, within a deadline, skipping
/// whatever was queued.
async fn killed<S>(sink: &mut Sink<S>, codec: Codec, reason: Option<KickReason>, code: u16)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        if let Some(notice) = reason.and_then(|r| notice_message(codec, kick_notice(r, ""))) {
            sink.feed(notice).await?;
        }
        sink.send(close_message(code)).await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// The writer's task is per-connection memory for the connection's life.
    #[tokio::test]
    async fn an_idle_writer_task_stays_small() {
        let (io, _peer) = tokio::io::duplex(64);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        let (sink, _stream) = ws.split();
        let (_tx, rx) = queue::channel(8);
        let shared = Shared::new();
        let writer = run(
            sink,
            rx,
            shared,
            Duration::from_secs(15),
            Duration::from_millis(5),
        );
        // 680 bytes today (see Memory layout in ARCHITECTURE.md).
        let size = std::mem::size_of_val(&writer);
        assert!(
            size <= 680,
            "writer future is {size} bytes (see Memory layout in ARCHITECTURE.md)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_periodic_ping_goes_only_to_a_client_that_sent_nothing_since_the_last() {
        let (io, peer) = tokio::io::duplex(4096);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        let (sink, _stream) = ws.split();
        let mut client = WebSocketStream::from_raw_socket(peer, Role::Client, None).await;
        let (_tx, rx) = queue::channel(8);
        let shared = Shared::new();
        let every = Duration::from_secs(15);
        tokio::spawn(run(
            sink,
            rx,
            shared.clone(),
            every,
            Duration::from_millis(5),
        ));
        // The client spoke during the first interval: no ping at its end.
        shared.heard();
        let first = tokio::time::timeout(every + Duration::from_secs(1), client.next()).await;
        assert!(first.is_err(), "pinged a client that spoke: {first:?}");
        // Silent through the second: pinged at its end.
        let second = tokio::time::timeout(every, client.next()).await;
        assert!(
            matches!(second, Ok(Some(Ok(Message::Ping(_))))),
            "a silent client was not pinged: {second:?}"
        );
    }
}
