//! Admission: connection limits, the per-IP login rate, the login deadline
//! from the accept, HTTP answers on the game port, and the PROXY header.
//! Several source addresses come from 127.0.0.0/8 (Linux routes all of it
//! to loopback).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use guildchat_client::Client;
use guildchat_protocol::{ChatType, ResCode};
use guildchat_server::stats::Stats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::*;

/// A valid upgrade request.
const UPGRADE: &str =
    "GET / HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn server_addr(server: &TestServer) -> SocketAddr {
    server.url.trim_start_matches("ws://").parse().unwrap()
}

/// A raw TCP connection from a chosen loopback address.
async fn raw_from(server: &TestServer, from: IpAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(server_addr(server)).await.unwrap()
}

/// Everything the server sends until it closes (bounded in time and size).
async fn read_all(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(WAIT, async {
        while out.len() < 64 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `request` and returns the whole answer.
async fn ask(server: &TestServer, request: &[u8]) -> String {
    let mut s = raw_from(server, ip(1)).await;
    s.write_all(request).await.unwrap();
    read_all(&mut s).await
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

fn get(c: &AtomicU64) -> u64 {
    Stats::get(c)
}

/// A player of `guild` logged in from `from`.
async fn login_from(server: &TestServer, from: IpAddr, user: u64, guild: u64) -> Client {
    let mut c = Client::connect_from(&server.url, Some(from)).await.unwrap();
    let rep = c
        .login(&server.token(user, &format!("p{user}"), guild, 0, 0))
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32, "login of {user}");
    c
}

/// Chats within a second on the guild channel, and the other one hears it.
async fn chat_quickly(from: &mut Client, to: &mut Client, text: &str) {
    let started = Instant::now();
    assert_eq!(
        say(from, ChatType::ChatGuild, text).await.res,
        ResCode::ResOk as i32
    );
    assert_eq!(next_chat(to).await.strcontext, text);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn over_the_pre_login_cap_connections_are_refused_and_players_go_on() {
    const CAP: usize = 50;
    const EXTRA: usize = 100;
    let server = TestServer::start_with(|c| {
        c.admission.max_prelogin = CAP as u32;
        c.limits.login_timeout_ms = 30_000;
        no_cooldowns(c);
    })
    .await;
    let mut alice = login_from(&server, ip(1), 1, 7).await;
    let mut bob = login_from(&server, ip(1), 2, 7).await;

    // Connections that upgrade and never log in, from four addresses.
    let mut idle = Vec::new();
    for i in 0..CAP {
        let from = ip(2 + (i % 4) as u8);
        let c = tokio::time::timeout(WAIT, Client::connect_from(&server.url, Some(from)))
            .await
            .expect("connect in time")
            .unwrap();
        idle.push(c);
    }
    for i in 0..EXTRA {
        let from = ip(2 + (i % 4) as u8);
        let refused = tokio::time::timeout(WAIT, Client::connect_from(&server.url, Some(from)))
            .await
            .expect("refused in time");
        assert!(refused.is_err(), "extra connection {i} was admitted");
    }
    assert_eq!(get(&server.stats.refused_prelogin), EXTRA as u64);
    assert_eq!(get(&server.stats.admission_refused), EXTRA as u64);

    // Logged-in players do not notice.
    chat_quickly(&mut alice, &mut bob, "still here").await;

    // One idle connection goes: a new player gets its place (within the 2 s
    // a reader that closes before login waits for its writer) and chats.
    drop(idle.pop());
    let mut carol = None;
    for _ in 0..500 {
        match Client::connect_from(&server.url, Some(ip(1))).await {
            Ok(c) => {
                carol = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let mut carol = carol.expect("a pre-login place came free");
    let rep = carol
        .login(&server.token(3, "carol", 7, 0, 0))
        .await
        .unwrap();
    assert_eq!(rep.res, ResCode::ResOk as i32);
    chat_quickly(&mut carol, &mut alice, "made it").await;

    // Carol's login gave its pre-login place back: one more connection fits.
    let another = Client::connect_from(&server.url, Some(ip(1))).await;
    assert!(
        another.is_ok(),
        "the logged-in player still held a pre-login place"
    );
    server.stop().await;
}

#[tokio::test]
async fn over_the_global_limit_connections_get_503() {
    let server = TestServer::start_with(|c| {
        c.admission.max_connections = 3;
        no_cooldowns(c);
    })
    .await;
    let mut a = login_from(&server, ip(1), 1, 7).await;
    let mut b = login_from(&server, ip(2), 2, 7).await;
    let _idle = Client::connect_from(&server.url, Some(ip(3)))
        .await
        .unwrap();
    let mut refused = raw_from(&server, ip(4)).await;
    let answer = read_all(&mut refused).await;
    assert_eq!(status_line(&answer), "HTTP/1.1 503 Service Unavailable");
    assert!(Client::connect_from(&server.url, Some(ip(5)))
        .await
        .is_err());
    assert_eq!(get(&server.stats.refused_connections), 2);
    assert_eq!(get(&server.stats.admission_refused), 2);
    chat_quickly(&mut a, &mut b, "full house").await;
    server.stop().await;
}

#[tokio::test]
async fn one_address_may_hold_only_so_many_connections() {
    let server = TestServer::start_with(|c| c.admission.max_per_ip = 5).await;
    let mut five = Vec::new();
    for _ in 0..5 {
        five.push(
            Client::connect_from(&server.url, Some(ip(2)))
                .await
                .unwrap(),
        );
    }
    let mut sixth = raw_from(&server, ip(2)).await;
    assert_eq!(
        status_line(&read_all(&mut sixth).await),
        "HTTP/1.1 503 Service Unavailable"
    );
    assert_eq!(get(&server.stats.refused_per_ip), 1);
    // Another address is not concerned.
    login_from(&server, ip(3), 1, 0).await;
    // A connection that ends gives its place back once the server has
    // seen it end (a reader that closes before login waits up to 2 s for
    // its writer).
    drop(five.pop());
    let mut again = None;
    for _ in 0..500 {
        if let Ok(c) = Client::connect_from(&server.url, Some(ip(2))).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(again.is_some(), "the place never came back");
    server.stop().await;
}

#[tokio::test]
async fn one_address_may_log_in_only_so_often() {
    let server = TestServer::start_with(|c| {
        c.admission.logins_per_ip_per_sec = 1;
        c.admission.login_burst_per_ip = 4;
    })
    .await;
    // The burst, then a refusal: each connection is one login attempt.
    for user in 0..4 {
        login_from(&server, ip(4), 10 + user, 0).await;
    }
    assert!(Client::connect_from(&server.url, Some(ip(4)))
        .await
        .is_err());
    assert_eq!(get(&server.stats.refused_login_rate), 1);
    assert_eq!(get(&server.stats.admission_refused), 1);
    // Another address has its own bucket.
    login_from(&server, ip(5), 20, 0).await;
    // A second later the bucket has a token again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    login_from(&server, ip(4), 30, 0).await;
    server.stop().await;
}

#[tokio::test]
async fn the_login_deadline_starts_at_the_accept() {
    let server = TestServer::start_with(|c| c.limits.login_timeout_ms = 300).await;
    // Silent, then half a request: neither gets past the deadline.
    let mut silent = raw_from(&server, ip(1)).await;
    let mut slow = raw_from(&server, ip(1)).await;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(read_all(&mut silent).await, "");
    assert_eq!(read_all(&mut slow).await, "");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(get(&server.stats.handshake_timeouts), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_upgrade_does_not_buy_a_longer_login() {
    let server = TestServer::start_with(|c| c.limits.login_timeout_ms = 1_500).await;
    let mut s = raw_from(&server, ip(1)).await;
    let started = Instant::now();
    // The upgrade comes late in the deadline; the login never comes. The
    // reader's own login timer would wait 1.5 s from the upgrade; the
    // deadline from the accept (plus its 1 s slack) cuts first.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    s.write_all(UPGRADE.as_bytes()).await.unwrap();
    let answer = read_all(&mut s).await;
    let waited = started.elapsed();
    assert_eq!(status_line(&answer), "HTTP/1.1 101 Switching Protocols");
    assert!(
        waited >= Duration::from_millis(2_300) && waited < Duration::from_millis(2_750),
        "{waited:?}"
    );
    assert_eq!(get(&server.stats.handshake_timeouts), 1);
    server.stop().await;
}

#[tokio::test]
async fn bad_http_on_the_game_port_gets_http() {
    let server = TestServer::start().await;
    let cases: [(String, &str); 5] = [
        (
            "GET / HTTP/1.1\r\nHost: chat\r\n\r\n".into(),
            "HTTP/1.1 400 Bad Request",
        ),
        (
            "POST /login HTTP/1.1\r\nHost: chat\r\nContent-Length: 5\r\n\r\nhello".into(),
            "HTTP/1.1 400 Bad Request",
        ),
        (
            UPGRADE.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            "HTTP/1.1 400 Bad Request",
        ),
        (
            UPGRADE.replace("Version: 13", "Version: 8"),
            "HTTP/1.1 426 Upgrade Required",
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nHost: chat\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(16 * 1024)
            ),
            "HTTP/1.1 431 Request Header Fields Too Large",
        ),
    ];
    for (request, status) in &cases {
        let answer = ask(&server, request.as_bytes()).await;
        assert_eq!(status_line(&answer), *status, "{:.60?}: {answer}", request);
        let (_, body) = answer.split_once("\r\n\r\n").expect("a complete answer");
        assert!(!body.trim().is_empty(), "a short body");
        if status.contains("426") {
            assert!(
                answer.contains("\r\nSec-WebSocket-Version: 13\r\n"),
                "{answer}"
            );
        }
    }
    assert_eq!(get(&server.stats.http_refused), cases.len() as u64);
    // A valid upgrade is still answered with 101.
    let mut s = raw_from(&server, ip(1)).await;
    s.write_all(UPGRADE.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert_eq!(status_line(&head), "HTTP/1.1 101 Switching Protocols");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    server.stop().await;
}

/// A PROXY v2 header for a TCP/IPv4 client.
fn proxy_v2(client: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(client) = client else {
        unreachable!("the tests use IPv4")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client.ip().octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&7000u16.to_be_bytes());
    h
}

#[tokio::test]
async fn behind_a_balancer_the_proxy_header_names_the_client() {
    let server = TestServer::start_with(|c| {
        c.admission.proxy_protocol = true;
        c.admission.max_per_ip = 1;
    })
    .await;
    let upgraded = |answer: &str| status_line(answer) == "HTTP/1.1 101 Switching Protocols";
    // Every connection comes from the balancer (127.0.0.1); the per-IP
    // cap counts the addresses the headers carry.
    let mut v1 = raw_from(&server, ip(1)).await;
    v1.write_all(format!("PROXY TCP4 10.1.2.3 127.0.0.1 5555 7000\r\n{UPGRADE}").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, v1.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(upgraded(&String::from_utf8_lossy(&buf[..n])));

    let mut v2 = raw_from(&server, ip(1)).await;
    let mut req = proxy_v2("10.9.9.9:4444".parse().unwrap());
    req.extend_from_slice(UPGRADE.as_bytes());
    v2.write_all(&req).await.unwrap();
    let n = tokio::time::timeout(WAIT, v2.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(upgraded(&String::from_utf8_lossy(&buf[..n])));

    // 10.1.2.3 already has its one connection.
    let mut again = raw_from(&server, ip(1)).await;
    let mut req = proxy_v2("10.1.2.3:6666".parse().unwrap());
    req.extend_from_slice(UPGRADE.as_bytes());
    again.write_all(&req).await.unwrap();
    assert_eq!(
        status_line(&read_all(&mut again).await),
        "HTTP/1.1 503 Service Unavailable"
    );
    assert_eq!(get(&server.stats.refused_per_ip), 1);

    // No header, or a broken one: refused without an answer.
    assert_eq!(ask(&server, UPGRADE.as_bytes()).await, "");
    assert_eq!(ask(&server, b"PROXY TCP4 nonsense\r\n").await, "");
    assert_eq!(get(&server.stats.refused_proxy), 2);
    server.stop().await;
}

/// A `wss://` server, and a TLS connector that trusts it.
async fn tls_server(
    adjust: impl FnOnce(&mut guildchat_server::Config),
) -> (TestServer, tokio_rustls::TlsConnector, tempfile::TempDir) {
    use std::sync::Arc;
    use tokio_rustls::rustls;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let server = TestServer::start_with(|c| {
        c.tls = Some(guildchat_server::config::TlsConfig {
            cert: cert_path,
            key: key_path,
        });
        adjust(c);
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    (
        server,
        tokio_rustls::TlsConnector::from(Arc::new(config)),
        dir,
    )
}

async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    tcp: TcpStream,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn over_tls_the_deadline_covers_the_handshake_and_the_upgrade_together() {
    let (server, connector, _dir) = tls_server(|c| c.limits.login_timeout_ms = 1_000).await;
    let tcp = raw_from(&server, ip(1)).await;
    let started = Instant::now();
    // TLS late in the deadline, then no upgrade request: the upgrade does
    // not get a deadline of its own.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut tls = tls_connect(&connector, tcp).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, tls.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(1_500),
        "{waited:?}"
    );
    assert_eq!(get(&server.stats.handshake_timeouts), 1);
    server.stop().await;
}

#[tokio::test]
async fn over_tls_bad_http_gets_http_and_a_login_frees_its_pre_login_place() {
    use futures_util::SinkExt;
    use guildchat_protocol::{codec, pb, ClientMsg, MsgType};
    use tokio_tungstenite::tungstenite::Message;

    let (server, connector, _dir) = tls_server(|c| c.admission.max_prelogin = 1).await;
    let mut tls = tls_connect(&connector, raw_from(&server, ip(1)).await).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: chat\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_line(&answer), "HTTP/1.1 400 Bad Request");
    drop(tls);

    // The one pre-login place: taken by a login over wss, given back by it.
    let port = server_addr(&server).port();
    let mut ws = None;
    for _ in 0..500 {
        let tcp = raw_from(&server, ip(1)).await;
        let Ok(tls) = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
        else {
            // The refused connection of the 400 may not have ended yet.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if let Ok((s, _)) =
            tokio_tungstenite::client_async(format!("wss://localhost:{port}"), tls).await
        {
            ws = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut ws = ws.expect("the pre-login place came free");
    let login = ClientMsg::Login(pb::ChatMessageLoginReq {
        msghead: codec::head(MsgType::CchLoginReq, 1),
        tokenstr: server.token(1, "alice", 0, 0, 0),
        ..Default::default()
    });
    ws.send(Message::Binary(login.encode())).await.unwrap();
    let frame = loop {
        let msg = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Binary(b) = msg {
            break b;
        }
    };
    let Ok(guildchat_protocol::ServerMsg::LoginRep(rep)) = codec::decode_server(&frame) else {
        panic!("no login reply")
    };
    assert_eq!(rep.res, ResCode::ResOk as i32);
    // Logged in: the next connection gets the place at once.
    let mut next = tls_connect(&connector, raw_from(&server, ip(1)).await).await;
    next.write_all(UPGRADE.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, next.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status_line(&String::from_utf8_lossy(&buf[..n])),
        "HTTP/1.1 101 Switching Protocols"
    );
    assert_eq!(
        get(&server.stats.refused_prelogin),
        get(&server.stats.admission_refused)
    );
    server.stop().await;
}

#[tokio::test]
async fn over_tls_a_slow_handshake_and_upgrade_leave_one_login_deadline() {
    use futures_util::StreamExt;
    use guildchat_protocol::{close_code, codec, KickReason, ServerMsg};
    use tokio_tungstenite::tungstenite::Message;

    let (server, connector, _dir) = tls_server(|c| c.limits.login_timeout_ms = 1_000).await;
    let tcp = raw_from(&server, ip(1)).await;
    let accepted = Instant::now();
    // TLS and the upgrade both come late, then no login. A login timer
    // started at the upgrade would fire at about 1.7 s, and the stream's
    // own cut at 2 s; the one deadline from the accept fires at 1 s, with
    // the reader's kick (not the cut).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let tls = tls_connect(&connector, tcp).await;
    let port = server_addr(&server).port();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://localhost:{port}"), tls)
        .await
        .unwrap();
    assert!(
        accepted.elapsed() < Duration::from_millis(900),
        "set-up too slow"
    );
    let mut kick = None;
    let code = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("closed") {
            Some(Ok(Message::Binary(b))) => {
                if let Ok(ServerMsg::Kick(k)) = codec::decode_server(&b) {
                    kick = Some(k.reason);
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    let waited = accepted.elapsed();
    assert_eq!(kick, Some(KickReason::KickLoginTimeout as i32));
    assert_eq!(code, Some(close_code::LOGIN_TIMEOUT));
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(1_600),
        "closed {waited:?} after the accept"
    );
    assert_eq!(get(&server.stats.handshake_timeouts), 0, "the cut fired");
    server.stop().await;
}

#[tokio::test]
async fn a_peer_that_leaves_before_logging_in_is_not_waited_for() {
    const PEERS: usize = 40;
    let server = TestServer::start_with(|c| {
        c.admission.max_prelogin = PEERS as u32;
        c.limits.login_timeout_ms = 30_000;
    })
    .await;
    // Every pre-login place taken by a peer that upgrades and never logs in.
    let mut peers = Vec::new();
    for i in 0..PEERS {
        let from = ip(2 + (i % 4) as u8);
        peers.push(Client::connect_from(&server.url, Some(from)).await.unwrap());
    }
    assert_eq!(get(&server.stats.prelogin), PEERS as u64);
    assert!(
        Client::connect_from(&server.url, Some(ip(1)))
            .await
            .is_err(),
        "the pre-login places are not all taken"
    );

    // They leave: half with a close frame, half by dropping the socket.
    let left = Instant::now();
    for (i, peer) in peers.into_iter().enumerate() {
        if i % 2 == 0 {
            peer.close().await;
        } else {
            drop(peer);
        }
    }
    // Each reader lets its place go as soon as it sees the peer gone,
    // rather than after the close grace (2 s) it gives a peer it closes.
    while get(&server.stats.prelogin) != 0 {
        assert!(
            left.elapsed() < Duration::from_secs(1),
            "{} pre-login places still held",
            get(&server.stats.prelogin)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // An honest player gets a place at once, logs in and gives it back.
    let mut alice = login_from(&server, ip(1), 1, 7).await;
    let mut bob = login_from(&server, ip(1), 2, 7).await;
    assert_eq!(get(&server.stats.prelogin), 0);
    chat_quickly(&mut alice, &mut bob, "nobody waited").await;
    server.stop().await;
}
