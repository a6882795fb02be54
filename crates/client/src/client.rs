//! [`Client`]: one protocol connection. It sends requests with increasing
//! `seq` numbers and returns server messages as [`Event`]s, including the
//! close code when the server hangs up.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use guildchat_protocol::{codec, pb, ChatType, ClientMsg, MsgType, ServerMsg};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad url {0}: expected ws://host:port[/path]")]
    Url(String),
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("undecodable frame from server: {0}")]
    Decode(#[from] guildchat_protocol::DecodeError),
    #[error("timed out")]
    Timeout,
    #[error("server closed the connection (close code {0:?})")]
    Closed(Option<u16>),
}

/// Something the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Msg(ServerMsg),
    /// The server closed the connection, with its close code if it sent one.
    Closed(Option<u16>),
}

/// One connection to a guildchat server.
pub struct Client {
    ws: WebSocketStream<TcpStream>,
    seq: u32,
}

fn parse_url(url: &str) -> Result<SocketAddr, ClientError> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| ClientError::Url(url.into()))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    hostport
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            hostport
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| ClientError::Url(url.into()))
}

/// Opens a TCP connection the way every client here does: from a chosen
/// local address, with an optional SO_RCVBUF, Nagle off.
pub async fn tcp_connect(
    addr: SocketAddr,
    local: Option<IpAddr>,
    recv_buffer: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

impl Client {
    /// Connects to `ws://host:port`.
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        Self::connect_from(url, None).await
    }

    /// Connects from a chosen local address (the load generator spreads
    /// clients over 127.0.0.x to get past the ephemeral port range).
    pub async fn connect_from(url: &str, local: Option<IpAddr>) -> Result<Client, ClientError> {
        Self::connect_with(url, local, None).await
    }

    /// Connects with a chosen local address and SO_RCVBUF (a small receive
    /// buffer makes a client that stops reading stall quickly, for tests
    /// and the `slow` benchmark).
    pub async fn connect_with(
        url: &str,
        local: Option<IpAddr>,
        recv_buffer: Option<u32>,
    ) -> Result<Client, ClientError> {
        let addr = parse_url(url)?;
        let tcp = tcp_connect(addr, local, recv_buffer).await?;
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
        Ok(Client { ws, seq: 0 })
    }

    /// The next request sequence number.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request.
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), ClientError> {
        self.send_raw(Message::Binary(msg.encode())).await
    }

    /// Sends any websocket message, valid or not (for tests of bad input).
    pub async fn send_raw(&mut self, msg: Message) -> Result<(), ClientError> {
        self.ws.send(msg).await?;
        Ok(())
    }

    /// Sends raw bytes as one binary frame.
    pub async fn send_bytes(&mut self, bytes: Bytes) -> Result<(), ClientError> {
        self.send_raw(Message::Binary(bytes)).await
    }

    /// Sends a login request; returns its seq.
    pub async fn send_login(
        &mut self,
        token: &str,
        userid: u64,
        username: &str,
    ) -> Result<u32, ClientError> {
        self.send_login_from(token, userid, username, 0).await
    }

    /// Sends a login request that resumes after `last_msg_id` (0: no
    /// resume); returns its seq.
    pub async fn send_login_from(
        &mut self,
        token: &str,
        userid: u64,
        username: &str,
        last_msg_id: u64,
    ) -> Result<u32, ClientError> {
        let seq = self.next_seq();
        self.send(&ClientMsg::Login(pb::ChatMessageLoginReq {
            msghead: codec::head(MsgType::CchLoginReq, seq),
            userid,
            username: username.into(),
            tokenstr: token.into(),
            last_msg_id,
            ..Default::default()
        }))
        .await?;
        Ok(seq)
    }

    /// Logs in and waits for the reply.
    pub async fn login(&mut self, token: &str) -> Result<pb::ChatMessageLoginRep, ClientError> {
        self.login_from(token, 0).await
    }

    /// Logs in resuming after `last_msg_id` and waits for the reply; the
    /// replayed notifications follow it.
    pub async fn login_from(
        &mut self,
        token: &str,
        last_msg_id: u64,
    ) -> Result<pb::ChatMessageLoginRep, ClientError> {
        self.send_login_from(token, 0, "", last_msg_id).await?;
        loop {
            match self.recv().await? {
                Event::Msg(ServerMsg::LoginRep(rep)) => return Ok(rep),
                Event::Msg(_) => continue,
                Event::Closed(code) => return Err(ClientError::Closed(code)),
            }
        }
    }

    /// Sends a chat request; returns its seq.
    pub async fn send_chat(
        &mut self,
        channel: ChatType,
        text: &str,
        targetid: u64,
        targetname: &str,
    ) -> Result<u32, ClientError> {
        self.send_chat_with_id(channel, text, targetid, targetname, 0)
            .await
    }

    /// Sends a chat line with a client message id (0: none): sending the
    /// same id again is how a client retries safely, the server answers a
    /// retry with the original result and delivers the line once. Returns
    /// its seq.
    pub async fn send_chat_with_id(
        &mut self,
        channel: ChatType,
        text: &str,
        targetid: u64,
        targetname: &str,
        client_msg_id: u64,
    ) -> Result<u32, ClientError> {
        let seq = self.next_seq();
        self.send(&ClientMsg::Chat(pb::ChatMessageChatReq {
            msghead: codec::head(MsgType::CchChatReq, seq),
            chattype: channel as i32,
            context: text.into(),
            targetid,
            targetname: targetname.into(),
            client_msg_id,
        }))
        .await?;
        Ok(seq)
    }

    /// Sends a mask request; returns its seq.
    pub async fn send_mask(&mut self, mask: u32) -> Result<u32, ClientError> {
        let seq = self.next_seq();
        self.send(&ClientMsg::SetMask(pb::ChatMessageSetMaskReq {
            msghead: codec::head(MsgType::CchSetMaskReq, seq),
            mask,
        }))
        .await?;
        Ok(seq)
    }

    /// Sends a heartbeat and waits for its reply, returning whatever else
    /// arrived first. Because the server handles a connection's frames in
    /// order, the reply also proves everything sent before it (pongs
    /// included) was handled; a chat reply still waiting for its commit may
    /// come after it.
    pub async fn heartbeat(&mut self) -> Result<Vec<ServerMsg>, ClientError> {
        let seq = self.next_seq();
        self.send(&ClientMsg::Heartbeat(pb::ChatMessageHeartbeatReq {
            msghead: codec::head(MsgType::CchHeartbeatReq, seq),
            client_time_ms: 0,
        }))
        .await?;
        let mut before = Vec::new();
        loop {
            match self.recv().await? {
                Event::Msg(ServerMsg::HeartbeatRep(r))
                    if r.msghead.is_some_and(|h| h.seq == seq) =>
                {
                    return Ok(before)
                }
                Event::Msg(m) => before.push(m),
                Event::Closed(code) => return Err(ClientError::Closed(code)),
            }
        }
    }

    /// Waits for the next thing the server sends. Pings are answered and
    /// skipped.
    pub async fn recv(&mut self) -> Result<Event, ClientError> {
        loop {
            match self.ws.next().await {
                None => return Ok(Event::Closed(None)),
                Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) => {
                    return Ok(Event::Closed(None))
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Binary(b))) => {
                    return Ok(Event::Msg(codec::decode_server(&b)?));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Event::Closed(frame.map(|f| u16::from(f.code))));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// [`Client::recv`] with a deadline.
    pub async fn recv_timeout(&mut self, limit: Duration) -> Result<Event, ClientError> {
        tokio::time::timeout(limit, self.recv())
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
