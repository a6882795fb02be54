//! Admission: who may open a connection, and how far a connection may get
//! before it has logged in.
//!
//! It owns the connection limits (global, pre-login, per IP), the per-IP
//! login rate, the PROXY protocol header, and the HTTP request that opens a
//! websocket: it answers a request that is not a valid upgrade with an HTTP
//! status of its own, and writes the `101` itself for one that is.
//!
//! Every limit is a semaphore permit or a count owned by [`Admitted`], the
//! stream wrapper a connection's task keeps for its whole life, so a limit
//! is given back exactly when the connection ends, however it ends. The
//! pre-login permit is given back earlier, when the server's successful
//! login reply passes through the wrapper.
//!
//! It never reads or writes a websocket message and never touches chat
//! state; a refused connection costs at most one short write.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use guildchat_protocol::{codec, json, Codec, ResCode, ServerMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::info;

use crate::config::AdmissionConfig;
use crate::stats::Stats;

/// Descriptors kept back from the global connection limit for what is not
/// a client: the listener, the history database and its journal, the key
/// file, logs, and the runtime's own.
pub const FD_RESERVE: u64 = 64;

/// Largest HTTP request head (request line and headers) read before the
/// upgrade; a longer one gets `431`. Browsers and game clients send well
/// under 2 KiB.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Most headers in the upgrade request; more get `431`.
const MAX_HEADERS: usize = 32;

/// After an HTTP refusal, how long the socket keeps reading (and
/// discarding) what the client still sends before it closes. Closing with
/// unread bytes would make the kernel reset the connection, and the client
/// could lose the answer.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// Most bytes discarded in [`REFUSAL_LINGER`].
const REFUSAL_LINGER_BYTES: usize = 64 * 1024;

/// Longest PROXY header accepted: v1 lines are at most 107 bytes; v2 may
/// carry TLVs (balancers add a few), which this bounds.
const MAX_PROXY_HEADER: usize = 1024;

/// The login reply is a small frame; frames above this are not looked at.
const MAX_WATCHED_FRAME: usize = 1024;

/// How much later than the login deadline the stream itself cuts a
/// connection that has not logged in. The reader's login timer runs to the
/// same deadline and tells the client why (`KickLoginTimeout`); this cut is
/// the backstop should that kick not get through.
pub const LOGIN_CUT_SLACK: Duration = Duration::from_secs(1);

/// Answer to a connection refused before the upgrade for want of room.
const RESPONSE_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nserver busy\n";

/// Why a connection was refused before its websocket existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("connection limit reached")]
    Connections,
    #[error("pre-login limit reached")]
    PreLogin,
    #[error("per-IP connection limit reached")]
    PerIp,
    #[error("per-IP login rate exceeded")]
    LoginRate,
    #[error("missing or invalid PROXY protocol header")]
    Proxy,
}

impl Refusal {
    /// Counts the refusal, in its own counter and in the total.
    pub fn count(self, stats: &Stats) {
        Stats::bump(&stats.admission_refused);
        Stats::bump(match self {
            Refusal::Connections => &stats.refused_connections,
            Refusal::PreLogin => &stats.refused_prelogin,
            Refusal::PerIp => &stats.refused_per_ip,
            Refusal::LoginRate => &stats.refused_login_rate,
            Refusal::Proxy => &stats.refused_proxy,
        });
    }
}

/// The limits every connection passes, shared by the accept loop and the
/// connection tasks.
pub(crate) struct Admission {
    connections: Arc<Semaphore>,
    prelogin: Arc<Semaphore>,
    /// Open connections per source address; an address leaves the map when
    /// its last connection ends, so the map never outgrows the connections.
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    max_per_ip: u32,
    /// One connection carries one login, so a connection is a login
    /// attempt: the rate is taken when the address is known.
    logins: DefaultKeyedRateLimiter<IpAddr>,
    pub proxy_protocol: bool,
    pub stats: Arc<Stats>,
}

/// The permits a connection holds from its accept on.
pub(crate) struct Permits {
    connection: Place,
    prelogin: Place,
}

/// A place under one of the limits, counted in its gauge in [`Stats`]
/// (`open_connections` or `prelogin`) for exactly as long as it is held,
/// however the connection ends.
struct Place {
    _permit: OwnedSemaphorePermit,
    stats: Arc<Stats>,
    gauge: fn(&Stats) -> &std::sync::atomic::AtomicU64,
}

impl Place {
    fn new(
        permit: OwnedSemaphorePermit,
        stats: Arc<Stats>,
        gauge: fn(&Stats) -> &std::sync::atomic::AtomicU64,
    ) -> Place {
        Stats::bump(gauge(&stats));
        Place {
            _permit: permit,
            stats,
            gauge,
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        (self.gauge)(&self.stats).fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The global connection limit in force: `max_connections`, lowered to
/// leave [`FD_RESERVE`] descriptors of the soft `RLIMIT_NOFILE` free (each
/// connection is one descriptor), and never below 1.
pub fn effective_max_connections(max_connections: u32, nofile_soft: Option<u64>) -> u32 {
    let by_fds = nofile_soft
        .map(|soft| soft.saturating_sub(FD_RESERVE))
        .unwrap_or(u64::MAX);
    (u64::from(max_connections).min(by_fds)).max(1) as u32
}

/// The process's soft descriptor limit; `None` when it is unlimited.
fn nofile_soft_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

impl Admission {
    pub fn new(config: &AdmissionConfig, stats: Arc<Stats>) -> Admission {
        let soft = nofile_soft_limit();
        let max = effective_max_connections(config.max_connections, soft);
        let prelogin = config.max_prelogin.min(max);
        info!(
            max_connections = max,
            max_prelogin = prelogin,
            configured = config.max_connections,
            rlimit_nofile = ?soft,
            "admission limits"
        );
        // unwrap_or: validation guarantees both are > 0; 1 is a safe floor.
        let rate = NonZeroU32::new(config.logins_per_ip_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.login_burst_per_ip).unwrap_or(NonZeroU32::MIN);
        Admission {
            connections: Arc::new(Semaphore::new(max as usize)),
            prelogin: Arc::new(Semaphore::new(prelogin as usize)),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: config.max_per_ip,
            logins: RateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
            proxy_protocol: config.proxy_protocol,
            stats,
        }
    }

    /// Takes a connection's global and pre-login permits, or says why not.
    /// Never waits: a full server refuses instead of queueing.
    pub fn admit(&self) -> Result<Permits, Refusal> {
        let connection = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Connections)?;
        let prelogin = self
            .prelogin
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::PreLogin)?;
        Ok(Permits {
            connection: Place::new(connection, self.stats.clone(), |s| &s.open_connections),
            prelogin: Place::new(prelogin, self.stats.clone(), |s| &s.prelogin),
        })
    }

    /// Counts a connection against its source address: the per-IP cap,
    /// then the per-IP login rate.
    pub fn admit_ip(self: &Arc<Self>, ip: IpAddr) -> Result<IpGuard, Refusal> {
        let ip = ip_key(ip);
        {
            let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let open = map.entry(ip).or_insert(0);
            if *open >= self.max_per_ip {
                return Err(Refusal::PerIp);
            }
            *open += 1;
        }
        // From here on the guard gives the count back, whatever happens.
        let guard = IpGuard {
            admission: self.clone(),
            ip,
        };
        self.logins.check_key(&ip).map_err(|_| Refusal::LoginRate)?;
        Ok(guard)
    }

    /// Forgets the login rate of addresses that are back to a full bucket,
    /// so the limiter's memory follows the addresses seen recently.
    pub fn prune(&self) {
        self.logins.retain_recent();
        self.logins.shrink_to_fit();
    }

    /// Addresses with an open connection (for tests).
    #[cfg(test)]
    fn tracked_ips(&self) -> usize {
        self.per_ip.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// The address a connection is counted against: an IPv4 address (also
/// when it arrives IPv4-mapped on a dual-stack socket), or an IPv6 /64,
/// the smallest block a host is given: counting single IPv6 addresses
/// would let one host take as many places as it likes.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

/// One connection counted against its address; dropping it gives it back.
pub(crate) struct IpGuard {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut map = self
            .admission
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(open) = map.get_mut(&self.ip) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Refuses a connection at once, from the accept loop: one non-blocking
/// write of `503` on a plain socket (a TLS one has no way to say it before
/// its handshake), then the socket is dropped.
pub(crate) fn refuse_now(tcp: TcpStream, plain: bool) {
    if plain {
        let _ = tcp.try_write(RESPONSE_503);
    }
}

/// Reads the PROXY protocol header (v1 or v2) and returns the client's
/// address. Reads exactly the header, so what follows is left for TLS or
/// HTTP. `Ok(None)` for a header that names no address (a balancer's own
/// health check: `UNKNOWN` or `LOCAL`), whose peer stays the balancer.
pub(crate) async fn read_proxy_header(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, Refusal> {
    const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut buf = vec![0u8; 16];
    tcp.read_exact(&mut buf[..6])
        .await
        .map_err(|_| Refusal::Proxy)?;
    if &buf[..6] == b"PROXY " {
        // A v1 line ends at CRLF: read it a byte at a time so that nothing
        // after it is consumed (at most 107 reads, once per connection).
        buf.truncate(6);
        while !buf.ends_with(b"\r\n") {
            if buf.len() >= 107 {
                return Err(Refusal::Proxy);
            }
            let b = tcp.read_u8().await.map_err(|_| Refusal::Proxy)?;
            buf.push(b);
        }
        return match ppp::v1::Header::try_from(
            std::str::from_utf8(&buf).map_err(|_| Refusal::Proxy)?,
        ) {
            Ok(h) => Ok(match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => None,
            }),
            Err(_) => Err(Refusal::Proxy),
        };
    }
    if buf[..6] != V2_SIG[..6] {
        return Err(Refusal::Proxy);
    }
    tcp.read_exact(&mut buf[6..16])
        .await
        .map_err(|_| Refusal::Proxy)?;
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if 16 + len > MAX_PROXY_HEADER {
        return Err(Refusal::Proxy);
    }
    buf.resize(16 + len, 0);
    tcp.read_exact(&mut buf[16..])
        .await
        .map_err(|_| Refusal::Proxy)?;
    let header = ppp::v2::Header::try_from(&buf[..]).map_err(|_| Refusal::Proxy)?;
    if header.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            Ok(Some(SocketAddr::from((a.source_address, a.source_port))))
        }
        ppp::v2::Addresses::IPv6(a) => {
            Ok(Some(SocketAddr::from((a.source_address, a.source_port))))
        }
        ppp::v2::Addresses::Unspecified => Ok(None),
        // A unix-socket peer has no IP to count or to log.
        ppp::v2::Addresses::Unix(_) => Err(Refusal::Proxy),
    }
}

/// An HTTP answer to a request that is not a websocket upgrade we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpRefusal {
    /// 400: not a GET, not HTTP/1.1, not an upgrade, or no key.
    BadRequest(&'static str),
    /// 426: a websocket version other than 13.
    UpgradeRequired,
    /// 431: the request head is too long or has too many headers.
    HeadersTooLarge,
}

impl HttpRefusal {
    fn response(self) -> String {
        let (status, extra, body) = match self {
            HttpRefusal::BadRequest(why) => ("400 Bad Request", "", why),
            HttpRefusal::UpgradeRequired => (
                "426 Upgrade Required",
                "Sec-WebSocket-Version: 13\r\n",
                "websocket version 13 required",
            ),
            HttpRefusal::HeadersTooLarge => (
                "431 Request Header Fields Too Large",
                "",
                "request headers too large",
            ),
        };
        format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}\n",
            body.len() + 1
        )
    }
}

/// What was read of the upgrade request.
pub(crate) enum Head {
    /// A valid upgrade: the `Sec-WebSocket-Accept` to answer with, and the
    /// bytes the client sent after the request (frames it did not wait to
    /// send), which belong to the websocket.
    Upgrade {
        accept: String,
        rest: Vec<u8>,
        /// The codec the client asked for with `Sec-WebSocket-Protocol`,
        /// if it offered one this server speaks.
        codec: Option<Codec>,
    },
    Refused(HttpRefusal),
    /// The client went away, or sent something that is not HTTP at all.
    Gone,
}

/// Reads the request head (bounded by [`MAX_REQUEST_HEAD`]) and checks it.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Head {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Head::Gone,
            Ok(n) => n,
        };
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            break from + i + 4;
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Head::Refused(HttpRefusal::HeadersTooLarge);
        }
    };
    if end > MAX_REQUEST_HEAD {
        return Head::Refused(HttpRefusal::HeadersTooLarge);
    }
    match check_head(&buf[..end]) {
        Ok((accept, codec)) => Head::Upgrade {
            accept,
            rest: buf[end..].to_vec(),
            codec,
        },
        Err(refusal) => Head::Refused(refusal),
    }
}

/// Checks a complete request head; returns the `Sec-WebSocket-Accept` and
/// the codec chosen from the offered subprotocols. An offer of none we
/// speak is not refused: such a client gets no subprotocol back, and its
/// first frame decides.
fn check_head(head: &[u8]) -> Result<(String, Option<Codec>), HttpRefusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HttpRefusal::BadRequest("malformed request")),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpRefusal::HeadersTooLarge),
        Err(_) => return Err(HttpRefusal::BadRequest("malformed request")),
    }
    if req.method != Some("GET") {
        return Err(HttpRefusal::BadRequest("websocket upgrade requires GET"));
    }
    if req.version != Some(1) {
        return Err(HttpRefusal::BadRequest(
            "websocket upgrade requires HTTP/1.1",
        ));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has_token = |name: &str, token: &str| {
        header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(HttpRefusal::BadRequest(
            "this port serves websocket only: expected an upgrade to websocket",
        ));
    }
    let key = match header("sec-websocket-key") {
        Some(k) if !k.is_empty() => k,
        _ => return Err(HttpRefusal::BadRequest("missing Sec-WebSocket-Key")),
    };
    if header("sec-websocket-version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(HttpRefusal::UpgradeRequired);
    }
    // The header may be repeated; its offers are read in order.
    let codec = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .find_map(Codec::choose);
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.trim_ascii());
    Ok((accept, codec))
}

/// The `101` that completes the upgrade, echoing the chosen subprotocol
/// (a browser fails a connection that asked for one and got none).
pub(crate) fn switching_protocols(accept: &str, codec: Option<Codec>) -> String {
    let protocol = codec.map_or(String::new(), |c| {
        format!("Sec-WebSocket-Protocol: {}\r\n", c.subprotocol())
    });
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
    )
}

/// Writes an HTTP refusal, closes the write side, and lingers briefly so
/// that the answer is not lost to a reset (see [`REFUSAL_LINGER`]).
pub(crate) async fn answer<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, response: &[u8]) {
    if stream.write_all(response).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let mut sink = [0u8; 1024];
        let mut total = 0;
        while total < REFUSAL_LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Writes an HTTP refusal for `refusal`.
pub(crate) async fn answer_http<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    refusal: HttpRefusal,
) {
    answer(stream, refusal.response().as_bytes()).await;
}

/// Writes the `503` for a plain connection refused after its accept (by a
/// per-IP limit). Cheaper than [`answer`]: it does not linger, since a
/// client over its limit could otherwise hold pre-login places with
/// refusals; it only discards what has already arrived, so that the close
/// does not reset the connection under the answer.
pub(crate) async fn answer_busy(tcp: &mut TcpStream) {
    if tcp.write_all(RESPONSE_503).await.is_err() {
        return;
    }
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 1024];
    let mut total = 0;
    while total < REFUSAL_LINGER_BYTES {
        match tcp.try_read(&mut sink) {
            Ok(n) if n > 0 => total += n,
            _ => break,
        }
    }
}

/// A connection's stream, holding its admission for as long as it lives.
///
/// Before login it also carries the login cut (a timer polled by reads)
/// and a watcher of the server's outgoing frames, which drops the pre-login
/// permit when the successful login reply goes out. Both are boxed and
/// freed at login (see Memory layout in ARCHITECTURE.md).
pub struct Admitted<S> {
    inner: S,
    pre: Option<Box<PreLogin>>,
    _connection: Place,
    _ip: Option<IpGuard>,
}

struct PreLogin {
    _place: Place,
    stats: Arc<Stats>,
    /// The cut fired (counted once, however often the reader polls again).
    cut_fired: bool,
    /// Boxed on its own: `Sleep` cannot move once polled.
    cut: Pin<Box<Sleep>>,
    watch: FrameWatch,
}

impl<S> Admitted<S> {
    pub(crate) fn new(
        inner: S,
        permits: Permits,
        ip: Option<IpGuard>,
        cut_at: Instant,
        stats: Arc<Stats>,
    ) -> Self {
        Admitted {
            inner,
            pre: Some(Box::new(PreLogin {
                _place: permits.prelogin,
                stats,
                cut_fired: false,
                cut: Box::pin(tokio::time::sleep_until(cut_at)),
                watch: FrameWatch::default(),
            })),
            _connection: permits.connection,
            _ip: ip,
        }
    }

    /// Whether the connection still holds its pre-login permit.
    #[cfg(test)]
    fn pre_login(&self) -> bool {
        self.pre.is_some()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(pre) = this.pre.as_mut() {
            if pre.cut.as_mut().poll(cx).is_ready() {
                if !pre.cut_fired {
                    pre.cut_fired = true;
                    Stats::bump(&pre.stats.handshake_timeouts);
                    // Tell the client at once: the reader that sees this
                    // error may still wait a while for its writer before
                    // the socket is dropped. Best effort (a TLS close_notify
                    // may not fit at once), and only this once.
                    let _ = Pin::new(&mut this.inner).poll_shutdown(cx);
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "not logged in within the login deadline",
                )));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(pre)) = (&written, this.pre.as_mut()) {
            if pre.watch.feed(&buf[..*n]) {
                // Logged in: the pre-login permit, the cut and the watcher
                // go; the connection keeps its other permits.
                this.pre = None;
            }
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Follows the websocket frames the server writes, to see the successful
/// login reply go out. Server frames are unmasked and unfragmented
/// (tungstenite writes each message as one frame).
#[derive(Default)]
struct FrameWatch {
    head: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// The current frame's payload, when it is a small binary or text
    /// frame, and whether it is text (a JSON connection's).
    capture: Option<Vec<u8>>,
    text: bool,
    in_payload: bool,
}

impl FrameWatch {
    /// Feeds written bytes; true once a successful login reply was seen.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            if !self.in_payload {
                self.head[self.have] = bytes[0];
                self.have += 1;
                bytes = &bytes[1..];
                let Some((len, need)) = self.header_len() else {
                    continue;
                };
                if self.have < need {
                    continue;
                }
                // Final binary (0x82) or text (0x81) frames.
                let data_final = matches!(self.head[0], 0x81 | 0x82);
                self.text = self.head[0] == 0x81;
                self.have = 0;
                self.left = len;
                self.in_payload = true;
                self.capture = (data_final && len <= MAX_WATCHED_FRAME as u64)
                    .then(|| Vec::with_capacity(len as usize));
            } else {
                let take = (self.left.min(bytes.len() as u64)) as usize;
                if let Some(c) = self.capture.as_mut() {
                    c.extend_from_slice(&bytes[..take]);
                }
                self.left -= take as u64;
                bytes = &bytes[take..];
            }
            if self.in_payload && self.left == 0 {
                self.in_payload = false;
                if let Some(frame) = self.capture.take() {
                    if is_login_ok(&frame, self.text) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// The payload length and header size, once enough of the header is in.
    fn header_len(&self) -> Option<(u64, usize)> {
        if self.have < 2 {
            return None;
        }
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        let (len, ext) = match self.head[1] & 0x7f {
            126 => (None, 2),
            127 => (None, 8),
            n => (Some(u64::from(n)), 0),
        };
        let need = 2 + ext + mask;
        if self.have < 2 + ext {
            return Some((0, need));
        }
        let len = len.unwrap_or_else(|| {
            self.head[2..2 + ext]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        });
        Some((len, need))
    }
}

fn is_login_ok(frame: &[u8], text: bool) -> bool {
    let decoded = if text {
        json::decode_server(frame)
    } else {
        codec::decode_server(frame)
    };
    matches!(decoded, Ok(ServerMsg::LoginRep(rep)) if rep.res == ResCode::ResOk as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_are_counted_by_their_64() {
        let key = |s: &str| ip_key(s.parse().unwrap()).to_string();
        assert_eq!(key("10.0.0.1"), "10.0.0.1");
        assert_eq!(key("::ffff:10.0.0.1"), "10.0.0.1");
        assert_eq!(key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff::1"), "2001:db8:1:2::");
    }

    #[test]
    fn the_global_limit_leaves_descriptors_free() {
        assert_eq!(effective_max_connections(20_000, Some(1024)), 960);
        assert_eq!(effective_max_connections(20_000, Some(1_048_576)), 20_000);
        assert_eq!(effective_max_connections(20_000, None), 20_000);
        assert_eq!(effective_max_connections(500, Some(20_064)), 500);
        // A tiny descriptor limit still admits someone.
        assert_eq!(effective_max_connections(20_000, Some(10)), 1);
    }

    fn req(lines: &str) -> Result<String, HttpRefusal> {
        check_head(format!("{lines}\r\n\r\n").as_bytes()).map(|(accept, _)| accept)
    }

    #[test]
    fn the_subprotocol_chooses_the_codec() {
        let good = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13";
        let codec = |extra: &str| {
            check_head(format!("{good}{extra}\r\n\r\n").as_bytes())
                .unwrap()
                .1
        };
        assert_eq!(codec(""), None);
        assert_eq!(
            codec("\r\nSec-WebSocket-Protocol: guildchat.json"),
            Some(Codec::Json)
        );
        assert_eq!(
            codec("\r\nSec-WebSocket-Protocol: mqtt, guildchat.proto"),
            Some(Codec::Protobuf)
        );
        assert_eq!(
            codec("\r\nsec-websocket-protocol: mqtt\r\nSec-WebSocket-Protocol: guildchat.json"),
            Some(Codec::Json)
        );
        assert_eq!(codec("\r\nSec-WebSocket-Protocol: mqtt"), None);
        let answer = switching_protocols("k", Some(Codec::Json));
        assert!(answer.contains("\r\nSec-WebSocket-Protocol: guildchat.json\r\n\r\n"));
        assert!(!switching_protocols("k", None).contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn upgrade_requests_are_checked() {
        let good = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13";
        // The accept key of RFC 6455's example.
        assert_eq!(req(good).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(matches!(
            req("GET / HTTP/1.1\r\nHost: x"),
            Err(HttpRefusal::BadRequest(_))
        ));
        assert!(matches!(
            req("POST / HTTP/1.1\r\nContent-Length: 0"),
            Err(HttpRefusal::BadRequest(_))
        ));
        assert!(matches!(
            req("GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13"),
            Err(HttpRefusal::BadRequest("missing Sec-WebSocket-Key"))
        ));
        assert_eq!(
            req(&good.replace("Version: 13", "Version: 8")),
            Err(HttpRefusal::UpgradeRequired)
        );
        let many: String = (0..40).map(|i| format!("\r\nX-{i}: y")).collect();
        assert_eq!(
            req(&format!("GET / HTTP/1.1{many}")),
            Err(HttpRefusal::HeadersTooLarge)
        );
        assert!(matches!(
            req("\u{1}\u{2} nonsense"),
            Err(HttpRefusal::BadRequest(_))
        ));
    }

    fn login_rep(res: ResCode) -> Vec<u8> {
        use guildchat_protocol::{pb, MsgType};
        codec::encode(&pb::ChatMessageLoginRep {
            msghead: codec::head(MsgType::ChcLoginRep, 1),
            res: res as i32,
            ..Default::default()
        })
        .to_vec()
    }

    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n < 65_536 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn the_watcher_sees_a_successful_login_reply_however_it_is_split() {
        let mut stream = frame(0x9, b"ping");
        stream.extend(frame(0x2, &vec![7u8; 70_000]));
        stream.extend(frame(0x2, &login_rep(ResCode::ResBadToken)));
        stream.extend(frame(0x2, &vec![1u8; 300]));
        let ok_at = stream.len();
        stream.extend(frame(0x2, &login_rep(ResCode::ResOk)));
        for chunk in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut w = FrameWatch::default();
            let mut seen = None;
            for (i, piece) in stream.chunks(chunk).enumerate() {
                if w.feed(piece) {
                    seen = Some((i + 1) * chunk);
                    break;
                }
            }
            let seen = seen.unwrap_or_else(|| panic!("chunk {chunk}: not seen"));
            assert!(seen > ok_at, "chunk {chunk}: seen too early");
        }
        // A failed login is never taken for a success.
        let mut w = FrameWatch::default();
        assert!(!w.feed(&frame(0x2, &login_rep(ResCode::ResBadToken))));
        // A JSON connection's login reply is a text frame.
        let json = |res: ResCode| json::transcode_server(&login_rep(res)).unwrap().to_vec();
        let mut w = FrameWatch::default();
        assert!(!w.feed(&frame(0x1, &json(ResCode::ResBadToken))));
        assert!(
            !w.feed(&frame(0x2, &json(ResCode::ResOk))),
            "JSON is never binary"
        );
        assert!(w.feed(&frame(0x1, &json(ResCode::ResOk))));
    }

    #[tokio::test]
    async fn ip_counts_are_given_back() {
        let config = AdmissionConfig {
            max_per_ip: 2,
            ..AdmissionConfig::default()
        };
        let a = Arc::new(Admission::new(&config, Arc::new(Stats::default())));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let one = a.admit_ip(ip).unwrap();
        let two = a.admit_ip(ip).unwrap();
        assert_eq!(a.admit_ip(ip).err(), Some(Refusal::PerIp));
        drop(one);
        let three = a.admit_ip(ip).unwrap();
        drop((two, three));
        assert_eq!(a.tracked_ips(), 0);
    }

    #[tokio::test]
    async fn the_pre_login_permit_goes_with_the_login_reply() {
        let a = Admission::new(&AdmissionConfig::default(), Arc::new(Stats::default()));
        let before = a.prelogin.available_permits();
        let permits = a.admit().unwrap();
        let (client, server) = tokio::io::duplex(4096);
        let cut_at = Instant::now() + Duration::from_secs(60);
        let mut s = Admitted::new(server, permits, None, cut_at, a.stats.clone());
        assert_eq!(a.prelogin.available_permits(), before - 1);
        assert_eq!(Stats::get(&a.stats.prelogin), 1);
        s.write_all(&frame(0x2, &login_rep(ResCode::ResOk)))
            .await
            .unwrap();
        assert!(!s.pre_login());
        assert_eq!(a.prelogin.available_permits(), before);
        assert_eq!(Stats::get(&a.stats.prelogin), 0);
        assert_eq!(
            a.connections.available_permits(),
            a.connections.available_permits()
        );
        drop(client);
    }
}
