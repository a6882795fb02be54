//! `wss://`: with a certificate and key configured, the same protocol runs
//! over TLS.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use guildchat_protocol::{codec, pb, ClientMsg, MsgType, ResCode, ServerMsg};
use guildchat_server::config::TlsConfig;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test]
async fn login_over_wss() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let server = TestServer::start_with(|c| {
        c.tls = Some(TlsConfig {
            cert: cert_path,
            key: key_path,
        })
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
    let addr = server.url.trim_start_matches("ws://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let port = addr.rsplit(':').next().unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://localhost:{port}"), tls)
        .await
        .unwrap();
    let login = ClientMsg::Login(pb::ChatMessageLoginReq {
        msghead: codec::head(MsgType::CchLoginReq, 1),
        tokenstr: server.token(1, "alice", 0, 0, 0),
        ..Default::default()
    });
    ws.send(Message::Binary(login.encode())).await.unwrap();
    let frame = loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => break b,
            _ => continue,
        }
    };
    let ServerMsg::LoginRep(rep) = codec::decode_server(&frame).unwrap() else {
        panic!("no login reply")
    };
    assert_eq!((rep.res, rep.userid), (ResCode::ResOk as i32, 1));

    // A plain-text client cannot talk to a TLS listener.
    assert!(guildchat_client::Client::connect(&server.url)
        .await
        .is_err());
    server.stop().await;
}
