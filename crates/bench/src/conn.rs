//! One bench connection: a websocket from a chosen loopback source address,
//! sized like a game client's, that hands back raw frames.
//!
//! [`crate::Client`] decodes every frame into owned protobuf messages, which
//! is right for a game client and the tests. A load generator sharing two
//! cores with the server it measures cannot afford that on every delivery,
//! and must also read the reference server's frames, so this connection
//! returns bytes and leaves decoding to the caller. It never interprets chat
//! traffic itself; only the login handshake is decoded here.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use guildchat_protocol::{codec, pb, ClientMsg, MsgType, ResCode, ServerMsg};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// Why a connection or login failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket: {0}")]
    Ws(#[from] tungstenite::Error),
    #[error("timed out")]
    Timeout,
    #[error("login refused: {0:?}")]
    Refused(ResCode),
    #[error("closed by the server (close code {0:?})")]
    Closed(Option<u16>),
    #[error("unexpected frame during login")]
    Unexpected,
}

/// What the server sent next.
#[derive(Debug)]
pub enum Frame {
    Binary(Bytes),
    Pong(Bytes),
    /// The connection ended, with the server's close code if it sent one.
    Closed(Option<u16>),
}

/// One websocket to the server under test.
pub struct BenchConn {
    ws: WebSocketStream<TcpStream>,
    seq: u32,
}

/// Only loopback targets: the bench generates real load and must never
/// aim it anywhere else.
pub fn loopback_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{url}: expected ws://127.x.y.z:port"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = hostport.replace("localhost", "127.0.0.1");
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|_| format!("{url}: expected ws://127.x.y.z:port (a literal loopback address)"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{url}: the bench only targets loopback addresses"));
    }
    Ok(addr)
}

impl BenchConn {
    /// Connects from `local` (port chosen by the kernel) with an optional
    /// small receive buffer, and upgrades to a websocket.
    pub async fn connect(
        url: &str,
        addr: SocketAddr,
        local: Option<IpAddr>,
        recv_buffer: Option<u32>,
    ) -> Result<BenchConn, ConnError> {
        let tcp = guildchat_client::tcp_connect(addr, local, recv_buffer).await?;
        // A game client's sizes: a small read buffer (the protocol's frames
        // are small) and a write buffer that lets a sender batch a burst
        // before its one flush.
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(16 * 1024);
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
        Ok(BenchConn { ws, seq: 0 })
    }

    /// The next request sequence number.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends a login request and waits for its reply. On a resume the
    /// replayed notifications follow the reply; they are left unread.
    pub async fn login(
        &mut self,
        token: &str,
        last_msg_id: u64,
        limit: Duration,
    ) -> Result<pb::ChatMessageLoginRep, ConnError> {
        let seq = self.next_seq();
        let req = ClientMsg::Login(pb::ChatMessageLoginReq {
            msghead: codec::head(MsgType::CchLoginReq, seq),
            tokenstr: token.to_owned(),
            last_msg_id,
            ..Default::default()
        });
        self.ws.send(Message::Binary(req.encode())).await?;
        let wait = async {
            // Bounded: a login reply is the first frame the server sends;
            // a few pings may come first on a slow start.
            for _ in 0..16 {
                match self.next_frame().await? {
                    Frame::Binary(b) => {
                        return match codec::decode_server(&b) {
                            Ok(ServerMsg::LoginRep(rep)) if rep.res == ResCode::ResOk as i32 => {
                                Ok(rep)
                            }
                            Ok(ServerMsg::LoginRep(rep)) => Err(ConnError::Refused(
                                ResCode::try_from(rep.res).unwrap_or(ResCode::ResInternal),
                            )),
                            _ => Err(ConnError::Unexpected),
                        }
                    }
                    Frame::Pong(_) => continue,
                    Frame::Closed(code) => return Err(ConnError::Closed(code)),
                }
            }
            Err(ConnError::Unexpected)
        };
        tokio::time::timeout(limit, wait)
            .await
            .map_err(|_| ConnError::Timeout)?
    }

    /// Waits for the next frame. Pings are answered by tungstenite and
    /// skipped. Cancel-safe: the websocket keeps any partial frame.
    pub async fn next_frame(&mut self) -> Result<Frame, ConnError> {
        loop {
            return match self.ws.next().await {
                None | Some(Err(tungstenite::Error::ConnectionClosed)) => Ok(Frame::Closed(None)),
                Some(Err(tungstenite::Error::Io(e)))
                    if e.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    Ok(Frame::Closed(None))
                }
                Some(Err(e)) => Err(e.into()),
                Some(Ok(Message::Binary(b))) => Ok(Frame::Binary(b)),
                Some(Ok(Message::Pong(b))) => Ok(Frame::Pong(b)),
                Some(Ok(Message::Close(frame))) => {
                    Ok(Frame::Closed(frame.map(|f| u16::from(f.code))))
                }
                Some(Ok(_)) => continue,
            };
        }
    }

    /// Queues a frame without flushing; [`BenchConn::flush`] sends the
    /// batch.
    pub async fn feed(&mut self, msg: Message) -> Result<(), ConnError> {
        self.ws.feed(msg).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ConnError> {
        self.ws.flush().await?;
        Ok(())
    }

    /// Sends one frame and flushes.
    pub async fn send(&mut self, msg: Message) -> Result<(), ConnError> {
        self.ws.send(msg).await?;
        Ok(())
    }

    /// Starts a polite close and waits briefly for the server's answer, so
    /// the server sees a clean close rather than a reset.
    pub async fn close(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            if self.ws.close(None).await.is_err() {
                return;
            }
            // Bounded by the timeout above; frames still in flight are
            // dropped unread.
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(loopback_addr("ws://127.0.0.1:7000").is_ok());
        assert!(loopback_addr("ws://127.3.2.1:7000/chat").is_ok());
        assert!(loopback_addr("ws://localhost:7000").is_ok());
        assert!(loopback_addr("ws://[::1]:7000").is_ok());
        assert!(loopback_addr("ws://10.0.0.1:7000").is_err());
        assert!(loopback_addr("ws://example.com:7000").is_err());
        assert!(loopback_addr("http://127.0.0.1:7000").is_err());
    }
}
