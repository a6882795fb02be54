//! JSON clients: the same protocol in text frames (protobuf canonical JSON),
//! chosen by the `guildchat.json` subprotocol or by a first text frame, and
//! talking to protobuf clients through the same server.

use futures_util::{SinkExt, StreamExt};
use guildchat_protocol::{ChatType, MsgType};
use guildchat_server::stats::Stats;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a raw websocket, offering `subprotocol` if given; returns it with
/// the subprotocol the server answered with.
async fn open(server: &TestServer, subprotocol: Option<&str>) -> (Ws, Option<String>) {
    let mut request = server.url.as_str().into_client_request().unwrap();
    if let Some(p) = subprotocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    let echoed = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    (ws, echoed)
}

fn id(msg: MsgType) -> u32 {
    msg as u32
}

async fn send(ws: &mut Ws, value: Value) {
    ws.send(Message::Text(value.to_string().into()))
        .await
        .unwrap();
}

/// What the server sent next, skipping pings.
enum Got {
    Json(Value),
    Closed(Option<u16>),
}

async fn got(ws: &mut Ws) -> Got {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("nothing from the server");
        match msg {
            Some(Ok(Message::Text(t))) => {
                return Got::Json(serde_json::from_str(t.as_str()).unwrap())
            }
            Some(Ok(Message::Binary(b))) => panic!("a binary frame on a JSON connection: {b:?}"),
            Some(Ok(Message::Close(frame))) => return Got::Closed(frame.map(|f| f.code.into())),
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => return Got::Closed(None),
        }
    }
}

/// The next JSON message.
async fn recv(ws: &mut Ws) -> Value {
    match got(ws).await {
        Got::Json(v) => v,
        Got::Closed(code) => panic!("closed ({code:?}) while waiting for JSON"),
    }
}

/// The next JSON message of type `msgid`, skipping others.
async fn recv_of(ws: &mut Ws, msgid: MsgType) -> Value {
    loop {
        let v = recv(ws).await;
        if v["msghead"]["msgid"] == id(msgid) {
            return v;
        }
    }
}

async fn json_login(ws: &mut Ws, token: &str) -> Value {
    send(
        ws,
        json!({ "msghead": { "msgid": id(MsgType::CchLoginReq), "seq": 1 }, "tokenstr": token }),
    )
    .await;
    let rep = recv(ws).await;
    assert_eq!(rep["msghead"]["msgid"], id(MsgType::ChcLoginRep), "{rep}");
    // RES_OK is the default, so canonical JSON leaves it out.
    assert_eq!(rep.get("res"), None, "{rep}");
    rep
}

async fn json_client(server: &TestServer, user: u64, name: &str, guild: u64) -> Ws {
    let (mut ws, echoed) = open(server, Some("guildchat.json")).await;
    assert_eq!(echoed.as_deref(), Some("guildchat.json"));
    let rep = json_login(&mut ws, &server.token(user, name, guild, 0, 0)).await;
    // 64-bit ids are strings in canonical JSON.
    assert_eq!(rep["userid"], user.to_string(), "{rep}");
    ws
}

#[tokio::test]
async fn a_json_client_chats_with_a_protobuf_client_both_ways() {
    let server = TestServer::start().await;
    let mut js = json_client(&server, 1, "alice", 7).await;
    let mut pb = server.login(2, "bob", 7, 0, 0).await;

    send(
        &mut js,
        json!({
            "msghead": { "msgid": id(MsgType::CchChatReq), "seq": 2 },
            "chattype": "CHAT_GUILD",
            "context": "hello from a browser",
        }),
    )
    .await;
    let rep = recv_of(&mut js, MsgType::CchChatRep).await;
    assert_eq!(rep["msghead"]["seq"], 2);
    assert_eq!(rep.get("res"), None, "RES_OK: {rep}");
    assert!(rep["msgId"].as_str().unwrap().parse::<u64>().unwrap() > 0);
    let heard = next_chat(&mut pb).await;
    assert_eq!(heard.strcontext, "hello from a browser");
    assert_eq!(
        (heard.senderid, heard.chattype),
        (1, ChatType::ChatGuild as i32)
    );

    let rep = say(&mut pb, ChatType::ChatGuild, "hello from a game").await;
    let note = recv_of(&mut js, MsgType::ChcNotifyChat).await;
    let note = if note["strcontext"] == "hello from a browser" {
        // Its own line came back first.
        recv_of(&mut js, MsgType::ChcNotifyChat).await
    } else {
        note
    };
    assert_eq!(note["strcontext"], "hello from a game");
    assert_eq!(note["chattype"], "CHAT_GUILD", "enums by name");
    assert_eq!(note["senderid"], "2");
    assert_eq!(note["sendername"], "bob");
    assert_eq!(note["msgId"], rep.msg_id.to_string());
    // Nothing beyond the schema's fields, in lowerCamelCase.
    let schema = [
        "msghead",
        "chattype",
        "senderid",
        "strcontext",
        "sendername",
        "msgId",
        "timeMs",
        "guildid",
        "teamid",
        "sceneid",
        "targetid",
        "targetname",
    ];
    for key in note.as_object().unwrap().keys() {
        assert!(schema.contains(&key.as_str()), "{key} in {note}");
    }
    server.stop().await;
}

#[tokio::test]
async fn without_a_subprotocol_a_first_text_frame_chooses_json() {
    let server = TestServer::start().await;
    let (mut ws, echoed) = open(&server, None).await;
    assert_eq!(echoed, None, "nothing asked, nothing echoed");
    json_login(&mut ws, &server.token(1, "alice", 0, 0, 0)).await;
    // The original field names are accepted too, and numeric enums.
    send(
        &mut ws,
        json!({
            "msghead": { "msgid": id(MsgType::CchHeartbeatReq), "seq": 3 },
            "client_time_ms": "42",
        }),
    )
    .await;
    let rep = recv_of(&mut ws, MsgType::ChcHeartbeatRep).await;
    assert_eq!(rep["clientTimeMs"], "42");
    assert_eq!(rep["msghead"]["seq"], 3);
    // From now on the connection is JSON: a binary frame is refused, in JSON.
    ws.send(Message::Binary(vec![0x0a, 0x02, 0x08, 0x08].into()))
        .await
        .unwrap();
    let err = recv_of(&mut ws, MsgType::ChcNotifyError).await;
    assert_eq!(err["res"], "RES_BAD_REQUEST", "{err}");

    // A protobuf subprotocol is echoed as well, and the default stays binary.
    let (_ws, echoed) = open(&server, Some("guildchat.proto")).await;
    assert_eq!(echoed.as_deref(), Some("guildchat.proto"));
    server.stop().await;
}

#[tokio::test]
async fn bad_json_gets_json_error_notices_and_too_many_close_the_connection() {
    let server = TestServer::start().await;
    let mut ws = json_client(&server, 1, "alice", 0).await;
    let limit = guildchat_server::Config::default().limits.bad_frame_limit;
    assert_eq!(limit, 8);
    let before = Stats::get(&server.stats.bad_frames);
    send(&mut ws, json!({ "msghead": { "msgid": 9999, "seq": 5 } })).await;
    let err = recv(&mut ws).await;
    assert_eq!(
        err["msghead"],
        json!({ "msgid": id(MsgType::ChcNotifyError), "seq": 5 })
    );
    assert_eq!(err["res"], "RES_UNKNOWN_MSG", "{err}");
    assert_eq!(err["badmsgid"], 9999);
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let err = recv(&mut ws).await;
    assert_eq!(err["res"], "RES_BAD_REQUEST", "{err}");
    // A field the schema does not have.
    send(
        &mut ws,
        json!({ "msghead": { "msgid": id(MsgType::CchSetMaskReq), "seq": 6 }, "colour": 1 }),
    )
    .await;
    let err = recv(&mut ws).await;
    assert_eq!(
        (&err["res"], &err["badmsgid"], &err["msghead"]["seq"]),
        (
            &json!("RES_BAD_REQUEST"),
            &json!(id(MsgType::CchSetMaskReq)),
            &json!(6)
        ),
        "{err}"
    );
    for _ in 3..limit {
        ws.send(Message::Text("[]".into())).await.unwrap();
    }
    let mut kick = None;
    let code = loop {
        match got(&mut ws).await {
            Got::Json(v) if v["msghead"]["msgid"] == id(MsgType::ChcNotifyKick) => kick = Some(v),
            Got::Json(_) => {}
            Got::Closed(code) => break code,
        }
    };
    assert_eq!(code, Some(4006));
    assert_eq!(kick.unwrap()["reason"], "KICK_PROTOCOL_ERROR");
    assert_eq!(
        Stats::get(&server.stats.bad_frames) - before,
        u64::from(limit)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_broadcast_is_transcoded_once_for_all_its_json_recipients() {
    let server = TestServer::start().await;
    let mut a = json_client(&server, 1, "alice", 0).await;
    let mut b = server.login(2, "bob", 0, 0, 0).await;
    let mut c = json_client(&server, 3, "carol", 0).await;
    let before = Stats::get(&server.stats.json_encodes);
    // The sender speaks protobuf, so its reply costs no transcode: only the
    // world line to alice (JSON), bob (protobuf) and carol (JSON) does.
    let rep = say(&mut b, ChatType::ChatWorld, "hear ye").await;
    assert_eq!(rep.res, 0);
    let to_a = recv_of(&mut a, MsgType::ChcNotifyChat).await;
    let to_c = recv_of(&mut c, MsgType::ChcNotifyChat).await;
    assert_eq!(to_a, to_c);
    assert_eq!(to_a["chattype"], "CHAT_WORLD");
    assert_eq!(to_a["strcontext"], "hear ye");
    assert_eq!(Stats::get(&server.stats.json_encodes), before + 1);
    server.stop().await;
}
