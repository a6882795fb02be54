//! One connection, from websocket upgrade to close.
//!
//! The task that runs [`serve`] is the connection's reader. It spawns the
//! writer, does the login handshake (verify the token, ask the world to
//! register the player or take over its session), then only reads frames,
//! decodes them and forwards requests to the user actor, waiting when the
//! actor is busy so that a flooding client is slowed at its own socket.
//!
//! A connection speaks one codec: protobuf in binary frames or JSON in
//! text frames, chosen by the websocket subprotocol or else by the kind of
//! its first frame. A frame of the other kind is a bad frame.
//!
//! It never holds chat state. Frames it cannot decode get an error notice;
//! too many of them close the connection with PROTOCOL_ERROR. That budget
//! refills slowly, so only a burst of garbage closes a connection, not the
//! odd bad frame over a long session.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use guildchat_protocol::{
    codec, json, pb, ClientMsg, Codec, DecodeError, KickReason, MsgType, ResCode,
};
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, warn};

use super::outbound::{Close, ConnTx, Shared};
use super::writer;
use crate::auth::{Authenticator, Refusal};
use crate::config::Config;
use crate::ids::ConnId;
use crate::stats::Stats;
use crate::user::{Inbound, INBOUND_QUEUE};
use crate::world::{LoginArgs, WorldHandle};

/// After the server sent its close frame, how long the reader waits for the
/// client's close reply before dropping the socket.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What every connection shares.
pub(crate) struct ConnCtx {
    pub world: WorldHandle,
    pub auth: Arc<Authenticator>,
    pub config: Arc<Config>,
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
    /// Cancelled when the node is drained: the listener closes, so the
    /// balancer sends new connections elsewhere.
    pub drain: CancellationToken,
    /// In a cluster: where logins claim the player's session.
    pub cluster: Option<crate::cluster::Cluster>,
}

/// What the reader saw.
enum Event {
    /// A data frame: binary (protobuf) or text (JSON).
    Frame(Bytes, Codec),
    /// A pong with a payload (the server's own delivery barrier).
    Pong(Bytes),
    /// The peer closed, or the socket failed.
    Closed,
    /// Nothing (not even a pong) within the idle limit.
    Idle,
    /// A message over the size limit.
    TooBig,
    /// Our side is closing (kill switch or writer gone).
    Closing,
}

struct Reader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    conn: ConnTx,
    /// The connection's kill switch: cancelled by a kill, by the writer when
    /// it ends, and by this reader when it ends, so each task stops the other.
    done: CancellationToken,
    /// Fires when `done` is cancelled. Created once per connection: registering a
    /// waiter takes the token's lock.
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    /// One timer for the idle limit, re-armed lazily from `last_seen`
    /// instead of once per frame.
    idle_timer: Pin<Box<Sleep>>,
    last_seen: Instant,
    ctx: Arc<ConnCtx>,
    bad_frames: BadFrames,
}

/// The bad frames a connection has sent, minus one forgiven every
/// `rates.bad_frame_forgive_ms`: a count and when its oldest unforgiven
/// frame started waiting to be forgiven.
#[derive(Debug, Clone, Copy)]
struct BadFrames {
    count: u32,
    since: Instant,
}

impl BadFrames {
    fn new(now: Instant) -> BadFrames {
        BadFrames {
            count: 0,
            since: now,
        }
    }

    /// Counts one more bad frame at `now`, after forgiving one per
    /// `forgive` elapsed; returns the count.
    fn add(&mut self, now: Instant, forgive: Duration) -> u32 {
        let elapsed = now.saturating_duration_since(self.since);
        let forgiven =
            (elapsed.as_nanos() / forgive.as_nanos().max(1)).min(u32::MAX as u128) as u32;
        if forgiven >= self.count {
            self.count = 0;
            self.since = now;
        } else {
            self.count -= forgiven;
            // Keep the part of an interval that has already run.
            self.since += forgive * forgiven;
        }
        self.count = self.count.saturating_add(1);
        self.count
    }
}

/// Serves one upgraded websocket until it closes. `login_deadline` is the
/// one deadline the connection has from its accept (through TLS and the
/// upgrade) to its login.
///
/// Not an `async fn`: the set-up runs here, and the returned future holds
/// only the reader and the writer's handle (see Memory layout in
/// ARCHITECTURE.md).
pub(crate) fn serve<S>(
    ws: WebSocketStream<S>,
    id: ConnId,
    ctx: Arc<ConnCtx>,
    login_deadline: Instant,
    subprotocol: Option<Codec>,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let (tx, rx) = super::queue::channel(ctx.config.limits.outbound_queue);
    let shared = Shared::new();
    if let Some(codec) = subprotocol {
        shared.settle_codec(codec);
    }
    let done = shared.kill.clone();
    let conn = ConnTx::new(id, tx, shared.clone(), ctx.config.limits.outbound_bytes);
    let writer = tokio::spawn(writer::run(
        sink,
        rx,
        shared.clone(),
        ctx.config.limits.ping_interval(),
        ctx.config.limits.write_coalesce(),
    ));
    let now = Instant::now();
    let mut reader = Reader {
        stream,
        conn,
        closing: Box::pin(done.clone().cancelled_owned()),
        done,
        idle_timer: Box::pin(tokio::time::sleep_until(
            now + ctx.config.limits.idle_timeout(),
        )),
        last_seen: now,
        ctx,
        bad_frames: BadFrames::new(now),
    };
    async move {
        // Login and the closing drain are boxed; an idle connection spends
        // its life in `forward` (see Memory layout in ARCHITECTURE.md).
        let peer_closed = match Box::pin(reader.login(login_deadline)).await {
            Ok(inbound) => reader.forward(inbound).await,
            // A peer that left before logging in is not waited for.
            Err(peer_closed) => peer_closed,
        };
        if !peer_closed {
            Box::pin(reader.drain()).await;
        }
        reader.done.cancel();
        reader.conn.close(Close::ReaderGone, &reader.ctx.stats);
        let _ = writer.await;
    }
}

impl<S> Reader<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn next(&mut self) -> Event {
        let idle = self.ctx.config.limits.idle_timeout();
        loop {
            let read = tokio::select! {
                biased;
                _ = self.closing.as_mut() => return Event::Closing,
                _ = self.idle_timer.as_mut() => {
                    let deadline = self.last_seen + idle;
                    if Instant::now() >= deadline {
                        return Event::Idle;
                    }
                    self.idle_timer.as_mut().reset(deadline);
                    continue;
                }
                r = self.stream.next() => r,
            };
            self.last_seen = Instant::now();
            return match read {
                None => Event::Closed,
                Some(Ok(Message::Binary(b))) => {
                    self.conn.heard();
                    Event::Frame(b, Codec::Protobuf)
                }
                Some(Ok(Message::Text(t))) => {
                    self.conn.heard();
                    Event::Frame(t.into(), Codec::Json)
                }
                // Pings are answered by tungstenite; pongs and pings are
                // life, nothing more.
                Some(Ok(Message::Pong(p))) if !p.is_empty() => Event::Pong(p),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(_))) => Event::Closed,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => Event::TooBig,
                Some(Err(e)) => {
                    debug!(conn = %self.conn.id(), error = %e, "read failed");
                    Event::Closed
                }
            };
        }
    }

    /// Handles events every phase treats alike. Returns Some(peer_closed)
    /// when the connection is over.
    fn terminal(&mut self, event: &Event) -> Option<bool> {
        match event {
            Event::Closed => Some(true),
            Event::Closing => Some(false),
            Event::Idle => {
                self.conn
                    .close(Close::Kick(KickReason::KickIdle), &self.ctx.stats);
                Some(false)
            }
            Event::TooBig => {
                Stats::bump(&self.ctx.stats.bad_frames);
                self.conn.close(Close::TooBig, &self.ctx.stats);
                Some(false)
            }
            Event::Frame(..) | Event::Pong(_) => None,
        }
    }

    /// Answers an unusable frame with an error notice. Returns false once the
    /// connection has sent too many and is being closed.
    fn bad_frame(&mut self, res: ResCode, msgid: u32, seq: u32, detail: String) -> bool {
        Stats::bump(&self.ctx.stats.bad_frames);
        let count = self
            .bad_frames
            .add(Instant::now(), self.ctx.config.rates.bad_frame_forgive());
        // In the connection's codec, like every reply.
        let _ = self.conn.try_frame(
            codec::encode(&pb::ChatMessageNotifyError {
                msghead: codec::head(MsgType::ChcNotifyError, seq),
                res: res as i32,
                badmsgid: msgid,
                detail,
            }),
            &self.ctx.stats,
        );
        if count >= self.ctx.config.limits.bad_frame_limit {
            self.conn
                .close(Close::Kick(KickReason::KickProtocolError), &self.ctx.stats);
            return false;
        }
        true
    }

    /// Decodes a data frame in the connection's codec, settling the codec
    /// first if this is the connection's first frame. Ok(None) when the
    /// frame was refused (and answered); Err(()) once too many were.
    fn decode(&mut self, frame: &[u8], kind: Codec) -> Result<Option<ClientMsg>, ()> {
        let codec = self.conn.settle_codec(kind);
        if codec != kind {
            let detail = match kind {
                Codec::Json => "text frame on a protobuf connection",
                Codec::Protobuf => "binary frame on a JSON connection",
            };
            let more = self.bad_frame(ResCode::ResBadRequest, 0, 0, detail.into());
            return if more { Ok(None) } else { Err(()) };
        }
        let decoded = match codec {
            Codec::Protobuf => codec::decode_client(frame),
            Codec::Json => json::decode_client(frame),
        };
        match decoded {
            Ok(msg) => Ok(Some(msg)),
            Err(e) if self.decode_failed(frame, codec, e.clone()) => Ok(None),
            Err(_) => Err(()),
        }
    }

    fn decode_failed(&mut self, frame: &[u8], codec: Codec, e: DecodeError) -> bool {
        let res = match &e {
            DecodeError::UnknownMsg(_) => ResCode::ResUnknownMsg,
            DecodeError::Malformed { reason, .. } if reason.contains("UTF-8") => {
                ResCode::ResBadUtf8
            }
            _ => ResCode::ResBadRequest,
        };
        let seq = match codec {
            Codec::Protobuf => codec::peek_seq(frame),
            Codec::Json => json::peek_seq(frame),
        };
        self.bad_frame(res, e.msgid(), seq, e.to_string())
    }

    /// The login handshake, until `deadline` (set at the accept). Returns
    /// the request queue of the user actor this connection now feeds, or,
    /// when the connection is over, whether the peer closed it.
    async fn login(&mut self, deadline: Instant) -> Result<mpsc::Sender<Box<Inbound>>, bool> {
        let shutdown = self.ctx.shutdown.clone();
        loop {
            let event = tokio::select! {
                e = self.next() => e,
                _ = tokio::time::sleep_until(deadline) => {
                    self.conn.close(Close::Kick(KickReason::KickLoginTimeout), &self.ctx.stats);
                    return Err(false);
                }
                _ = shutdown.cancelled() => {
                    self.conn.close(Close::Kick(KickReason::KickShutdown), &self.ctx.stats);
                    return Err(false);
                }
            };
            if let Some(peer_closed) = self.terminal(&event) {
                return Err(peer_closed);
            }
            if let Event::Pong(_) = event {
                continue;
            }
            let Event::Frame(frame, kind) = event else {
                continue;
            };
            let msg = match self.decode(&frame, kind) {
                Ok(Some(msg)) => msg,
                Ok(None) => continue,
                Err(()) => return Err(false),
            };
            let seq = msg.seq();
            let refusal = match msg {
                ClientMsg::Login(req) => return self.try_login(req, seq).await,
                ClientMsg::Heartbeat(m) => crate::user::heartbeat_reply(seq, &m),
                other => other.refusal(ResCode::ResNotLoggedIn, 0),
            };
            let _ = self.conn.try_frame(refusal, &self.ctx.stats);
        }
    }

    async fn try_login(
        &mut self,
        req: pb::ChatMessageLoginReq,
        seq: u32,
    ) -> Result<mpsc::Sender<Box<Inbound>>, bool> {
        let checked = self.ctx.auth.check(&req);
        let mut user = None;
        let result = match checked {
            Ok(identity) => {
                user = Some(identity.user);
                // In a cluster the session is claimed first: the directory
                // then names this node, and the node that held it ends its
                // copy when it sees the claim.
                // A full node refuses a new session before claiming it, so
                // the player's session on another node is not ended for a
                // login that would be refused here anyway.
                let full = self.ctx.cluster.is_some()
                    && self
                        .ctx
                        .stats
                        .online
                        .load(std::sync::atomic::Ordering::Relaxed)
                        >= u64::from(self.ctx.config.max_online)
                    && matches!(self.ctx.world.player(identity.user).await, Ok(None));
                let claim = match &self.ctx.cluster {
                    _ if full => Err(Refusal::Code(ResCode::ResServerFull)),
                    Some(cluster) => cluster.claim(identity.user, &identity.name).await.map_err(
                        |e| {
                            warn!(user = %identity.user, error = %e, "cannot claim the session");
                            Refusal::Code(ResCode::ResInternal)
                        },
                    ),
                    None => Ok(0),
                };
                match claim {
                    Err(refusal) => Err(refusal),
                    Ok(claim) => {
                        let (tx, inbound) = mpsc::channel(INBOUND_QUEUE);
                        let args = LoginArgs {
                            identity,
                            conn: self.conn.clone(),
                            inbound,
                            seq,
                            last_msg_id: req.last_msg_id,
                            claim,
                        };
                        let result = self.ctx.world.login(args).await;
                        // A claim the world then refused (full, shutting
                        // down) is let go, so the directory does not keep
                        // naming this node for the player.
                        if let (Err(_), Some(cluster), 1..) = (&result, &self.ctx.cluster, claim) {
                            cluster.release(user.unwrap_or_default(), claim);
                        }
                        result.map(|()| tx).map_err(Refusal::Code)
                    }
                }
            }
            Err(refusal) => Err(refusal),
        };
        match result {
            Ok(tx) => Ok(tx),
            Err(refusal) => {
                Stats::bump(&self.ctx.stats.login_failures);
                self.ctx.stats.metrics.login(refusal.code());
                debug!(conn = %self.conn.id(), ?refusal, "login refused");
                // Rounded up, so a ban never reads as 0 ms left.
                let left = match refusal {
                    Refusal::Banned(left) => Some(left),
                    Refusal::Code(ResCode::ResBanned) => {
                        user.and_then(|u| self.ctx.auth.ban_left(u))
                    }
                    Refusal::Code(_) => None,
                };
                let banned_ms = left.map_or(0, |d| {
                    d.as_micros().div_ceil(1000).clamp(1, u32::MAX as u128) as u32
                });
                let _ = self.conn.try_frame(
                    codec::encode(&pb::ChatMessageLoginRep {
                        msghead: codec::head(MsgType::ChcLoginRep, seq),
                        res: refusal.code() as i32,
                        banned_ms,
                        ..Default::default()
                    }),
                    &self.ctx.stats,
                );
                self.conn
                    .close(Close::Kick(KickReason::KickLoginFailed), &self.ctx.stats);
                Err(false)
            }
        }
    }

    /// After login: decode and forward until the connection ends. Returns
    /// whether the peer closed.
    async fn forward(&mut self, inbound: mpsc::Sender<Box<Inbound>>) -> bool {
        loop {
            let event = self.next().await;
            if let Some(peer_closed) = self.terminal(&event) {
                return peer_closed;
            }
            if let Event::Pong(payload) = event {
                if inbound
                    .send(Box::new(Inbound::Pong(payload)))
                    .await
                    .is_err()
                {
                    return false;
                }
                continue;
            }
            let Event::Frame(frame, kind) = event else {
                continue;
            };
            // Boxed before the await (see Memory layout in ARCHITECTURE.md).
            let req = match self.decode(&frame, kind) {
                Ok(Some(msg)) => Box::new(Inbound::Request(msg)),
                Ok(None) => continue,
                Err(()) => return false,
            };
            // Waits while the user actor is busy: backpressure. Fails once
            // the actor has moved to another connection.
            if inbound.send(req).await.is_err() {
                return false;
            }
        }
    }

    /// Our side is closing: give the client a moment to answer the close
    /// frame, so it reads everything we sent before the socket goes.
    async fn drain(&mut self) {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            // Wait for the writer to send its close frame first.
            self.done.cancelled().await;
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bad_frames_are_forgiven_one_per_interval() {
        let forgive = Duration::from_secs(10);
        let mut b = BadFrames::new(Instant::now());
        assert_eq!(b.add(Instant::now(), forgive), 1);
        assert_eq!(b.add(Instant::now(), forgive), 2);
        assert_eq!(b.add(Instant::now(), forgive), 3);
        // 9.9 s: nothing forgiven yet.
        tokio::time::advance(Duration::from_millis(9_900)).await;
        assert_eq!(b.add(Instant::now(), forgive), 4);
        // 10 s after the first: one forgiven, one added.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(b.add(Instant::now(), forgive), 4);
        // 25 s later: two more forgiven, and the half interval carries on.
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(b.add(Instant::now(), forgive), 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.add(Instant::now(), forgive), 3);
        // A long quiet spell forgives everything, and no more.
        tokio::time::advance(Duration::from_secs(3_600)).await;
        assert_eq!(b.add(Instant::now(), forgive), 1);
        assert_eq!(b.add(Instant::now(), forgive), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_still_reaches_the_limit() {
        let forgive = Duration::from_secs(10);
        let mut b = BadFrames::new(Instant::now());
        let mut last = 0;
        for _ in 0..8 {
            tokio::time::advance(Duration::from_millis(100)).await;
            last = b.add(Instant::now(), forgive);
        }
        assert_eq!(last, 8);
    }

    /// The reader's task is per-connection memory for the connection's life.
    #[tokio::test]
    async fn an_idle_reader_task_stays_small() {
        use crate::world::LocalFanout;
        use tokio_tungstenite::tungstenite::protocol::Role;

        let mut config = Config::default();
        config.auth.insecure_dev_auth = true;
        let config = Arc::new(config);
        let stats = Arc::new(Stats::default());
        let world = WorldHandle::new(
            config.clone(),
            stats.clone(),
            Box::new(LocalFanout),
            None,
            0,
            Default::default(),
        );
        let ctx = Arc::new(ConnCtx {
            world,
            auth: Arc::new(Authenticator::from_config(&config, Default::default()).unwrap()),
            config,
            stats,
            shutdown: CancellationToken::new(),
            drain: CancellationToken::new(),
            cluster: None,
        });
        let (io, _peer) = tokio::io::duplex(64);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        let reader = serve(
            ws,
            ConnId(1),
            ctx,
            Instant::now() + Duration::from_secs(5),
            None,
        );
        let size = std::mem::size_of_val(&reader);
        // 448 bytes today (see Memory layout in ARCHITECTURE.md).
        assert!(
            size <= 480,
            "reader future is {size} bytes (see Memory layout in ARCHITECTURE.md)"
        );
    }
}
