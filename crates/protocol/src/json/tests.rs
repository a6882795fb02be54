use super::*;
use crate::codec::{decode_client as decode_proto_client, encode as encode_proto, head};
use crate::{ChatType, KickReason, ResCode};

/// Above 2^53: a JSON number would lose it, a string does not.
const BIG: u64 = (1 << 60) + 3;

fn note(seq: u32) -> pb::ChatMessageNotifyChat {
    pb::ChatMessageNotifyChat {
        msghead: head(MsgType::ChcNotifyChat, seq),
        chattype: ChatType::ChatGuild as i32,
        senderid: BIG,
        strcontext: "héllo \"world\"".into(),
        sendername: "alice".into(),
        msg_id: 99,
        time_ms: 1_700_000_000_000,
        guildid: 5,
        teamid: 6,
        sceneid: 7,
        targetid: 8,
        targetname: "bob".into(),
    }
}

fn client_msgs() -> Vec<ClientMsg> {
    vec![
        ClientMsg::Login(pb::ChatMessageLoginReq {
            msghead: head(MsgType::CchLoginReq, 1),
            userid: BIG,
            username: "alice".into(),
            guildid: 9,
            tokenmd5: "x".into(),
            tokenstr: "a.b.c".into(),
            last_msg_id: 1 << 40,
        }),
        ClientMsg::Chat(pb::ChatMessageChatReq {
            msghead: head(MsgType::CchChatReq, 2),
            chattype: ChatType::ChatPrivate as i32,
            context: "hi ✓".into(),
            targetid: 3,
            targetname: "bob".into(),
            client_msg_id: BIG,
        }),
        ClientMsg::Heartbeat(pb::ChatMessageHeartbeatReq {
            msghead: head(MsgType::CchHeartbeatReq, 3),
            client_time_ms: 12,
        }),
        ClientMsg::SetMask(pb::ChatMessageSetMaskReq {
            msghead: head(MsgType::CchSetMaskReq, 4),
            mask: 0b1010,
        }),
        ClientMsg::Online(pb::ChatMessageOnlineReq {
            msghead: head(MsgType::CchOnlineReq, 5),
        }),
        ClientMsg::History(pb::ChatMessageHistoryReq {
            msghead: head(MsgType::CchHistoryReq, 6),
            chattype: ChatType::ChatTeam as i32,
            peerid: 4,
            before_msg_id: 77,
            limit: 20,
            groupid: BIG,
        }),
        ClientMsg::Block(pb::ChatMessageBlockReq {
            msghead: head(MsgType::CchBlockReq, 7),
            userid: BIG,
        }),
        ClientMsg::Unblock(pb::ChatMessageUnblockReq {
            msghead: head(MsgType::CchUnblockReq, 8),
            userid: 2,
        }),
        ClientMsg::BlockList(pb::ChatMessageBlockListReq {
            msghead: head(MsgType::CchBlockListReq, 9),
        }),
    ]
}

fn server_msgs() -> Vec<ServerMsg> {
    let ok = ResCode::ResOk as i32;
    vec![
        ServerMsg::LoginRep(pb::ChatMessageLoginRep {
            msghead: head(MsgType::ChcLoginRep, 1),
            res: ok,
            userid: BIG,
            username: "alice".into(),
            guildid: 2,
            teamid: 3,
            sceneid: 4,
            mask: 5,
            resumed: true,
            last_msg_id: 6,
            replayed: 7,
            replay_gap: true,
            missed: 8,
            banned_ms: 9,
        }),
        ServerMsg::ChatRep(pb::ChatMessageChatRep {
            msghead: head(MsgType::CchChatRep, 2),
            res: ResCode::ResOnCooldown as i32,
            cooldown_ms: 1500,
            msg_id: BIG,
            offline: true,
            muted_ms: 3,
        }),
        ServerMsg::Chat(note(0)),
        ServerMsg::Kick(pb::ChatMessageNotifyKick {
            msghead: head(MsgType::ChcNotifyKick, 0),
            reason: KickReason::KickBanned as i32,
            detail: "bye".into(),
        }),
        ServerMsg::Error(pb::ChatMessageNotifyError {
            msghead: head(MsgType::ChcNotifyError, 3),
            res: ResCode::ResBadRequest as i32,
            badmsgid: 3,
            detail: "nope".into(),
        }),
        ServerMsg::HeartbeatRep(pb::ChatMessageHeartbeatRep {
            msghead: head(MsgType::ChcHeartbeatRep, 4),
            client_time_ms: 1,
            server_time_ms: BIG,
            res: ok,
            retry_after_ms: 2,
        }),
        ServerMsg::SetMaskRep(pb::ChatMessageSetMaskRep {
            msghead: head(MsgType::ChcSetMaskRep, 5),
            res: ok,
            mask: 6,
            retry_after_ms: 7,
        }),
        ServerMsg::OnlineRep(pb::ChatMessageOnlineRep {
            msghead: head(MsgType::ChcOnlineRep, 6),
            res: ok,
            online: 10,
            max_online: 20,
            retry_after_ms: 30,
        }),
        ServerMsg::Shed(pb::ChatMessageNotifyShed {
            msghead: head(MsgType::ChcNotifyShed, 0),
            count: 4,
            total: BIG,
        }),
        ServerMsg::HistoryRep(pb::ChatMessageHistoryRep {
            msghead: head(MsgType::ChcHistoryRep, 7),
            res: ok,
            msgs: vec![note(0), note(0)],
            has_more: true,
            retry_after_ms: 1,
        }),
        ServerMsg::Recall(pb::ChatMessageNotifyRecall {
            msghead: head(MsgType::ChcNotifyRecall, 0),
            msg_id: BIG,
        }),
        ServerMsg::BlockRep(pb::ChatMessageBlockRep {
            msghead: head(MsgType::ChcBlockRep, 8),
            res: ok,
            userid: BIG,
            retry_after_ms: 1,
        }),
        ServerMsg::UnblockRep(pb::ChatMessageUnblockRep {
            msghead: head(MsgType::ChcUnblockRep, 9),
            res: ResCode::ResNotLoggedIn as i32,
            userid: 3,
            retry_after_ms: 2,
        }),
        ServerMsg::BlockListRep(pb::ChatMessageBlockListRep {
            msghead: head(MsgType::ChcBlockListRep, 10),
            res: ok,
            userids: vec![1, BIG],
            retry_after_ms: 3,
        }),
    ]
}

fn encode_server_proto(msg: &ServerMsg) -> Bytes {
    match msg {
        ServerMsg::LoginRep(m) => encode_proto(m),
        ServerMsg::ChatRep(m) => encode_proto(m),
        ServerMsg::Chat(m) => encode_proto(m),
        ServerMsg::Kick(m) => encode_proto(m),
        ServerMsg::Error(m) => encode_proto(m),
        ServerMsg::HeartbeatRep(m) => encode_proto(m),
        ServerMsg::SetMaskRep(m) => encode_proto(m),
        ServerMsg::OnlineRep(m) => encode_proto(m),
        ServerMsg::Shed(m) => encode_proto(m),
        ServerMsg::HistoryRep(m) => encode_proto(m),
        ServerMsg::Recall(m) => encode_proto(m),
        ServerMsg::BlockRep(m) => encode_proto(m),
        ServerMsg::UnblockRep(m) => encode_proto(m),
        ServerMsg::BlockListRep(m) => encode_proto(m),
    }
}

#[test]
fn every_client_message_round_trips_between_json_and_protobuf() {
    let msgs = client_msgs();
    assert_eq!(msgs.len(), 9, "one of each ClientMsg variant");
    for msg in msgs {
        let from_proto = decode_proto_client(&msg.encode()).unwrap();
        let json = from_proto.to_json().unwrap();
        let back = decode_client(&json).unwrap();
        assert_eq!(back, msg, "{}", String::from_utf8_lossy(&json));
        assert_eq!(back.encode(), msg.encode());
        assert_eq!(peek_seq(&json), msg.seq());
    }
}

#[test]
fn every_server_message_round_trips_between_json_and_protobuf() {
    let msgs = server_msgs();
    assert_eq!(msgs.len(), 14, "one of each ServerMsg variant");
    for msg in msgs {
        let proto = encode_server_proto(&msg);
        let json = transcode_server(&proto).unwrap();
        assert_eq!(json, msg.to_json().unwrap());
        let back = decode_server(&json).unwrap();
        assert_eq!(back, msg, "{}", String::from_utf8_lossy(&json));
        assert_eq!(encode_server_proto(&back), proto);
    }
}

#[test]
fn output_is_canonical_json() {
    let json = ServerMsg::Chat(note(4)).to_json().unwrap();
    let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let expected = serde_json::json!({
        "msghead": { "msgid": MsgType::ChcNotifyChat as u32, "seq": 4 },
        "chattype": "CHAT_GUILD",
        "senderid": BIG.to_string(),
        "strcontext": "héllo \"world\"",
        "sendername": "alice",
        "msgId": "99",
        "timeMs": "1700000000000",
        "guildid": "5",
        "teamid": "6",
        "sceneid": "7",
        "targetid": "8",
        "targetname": "bob",
    });
    assert_eq!(value, expected);
    // Default values are left out, and nothing beyond the schema is added.
    let rep = pb::ChatMessageChatRep {
        msghead: head(MsgType::CchChatRep, 0),
        res: ResCode::ResOk as i32,
        msg_id: 5,
        ..Default::default()
    };
    assert_eq!(
        &encode(&rep).unwrap()[..],
        br#"{"msghead":{"msgid":4},"msgId":"5"}"#
    );
}

#[test]
fn original_field_names_and_numeric_enums_are_accepted() {
    let text = format!(
        r#"{{"msghead":{{"msgid":{},"seq":3}},"chattype":{},"context":"hi",
            "client_msg_id":"{BIG}","targetid":7}}"#,
        MsgType::CchChatReq as u32,
        ChatType::ChatWorld as i32,
    );
    let ClientMsg::Chat(req) = decode_client(text.as_bytes()).unwrap() else {
        panic!("not a chat request")
    };
    assert_eq!(req.chattype, ChatType::ChatWorld as i32);
    assert_eq!(req.client_msg_id, BIG);
    assert_eq!(req.targetid, 7, "a 64-bit id may be a number too");
    let camel = format!(
        r#"{{"msghead":{{"msgid":{}}},"chattype":"CHAT_WORLD","clientMsgId":"{BIG}"}}"#,
        MsgType::CchChatReq as u32,
    );
    let ClientMsg::Chat(same) = decode_client(camel.as_bytes()).unwrap() else {
        panic!("not a chat request")
    };
    assert_eq!((same.chattype, same.client_msg_id), (req.chattype, BIG));
    let login = r#"{"msghead":{"msgid":1},"userid":"42","last_msg_id":"9","tokenstr":"t"}"#;
    let ClientMsg::Login(login) = decode_client(login.as_bytes()).unwrap() else {
        panic!("not a login")
    };
    assert_eq!((login.userid, login.last_msg_id), (42, 9));
}

#[test]
fn bad_json_is_a_typed_error() {
    let chat = MsgType::CchChatReq as u32;
    let cases: Vec<(String, DecodeError)> = vec![
        ("".into(), DecodeError::NoHead),
        ("not json".into(), DecodeError::NoHead),
        ("[1,2]".into(), DecodeError::NoHead),
        // Not a whole JSON document: its head is not trusted either.
        (
            format!(r#"{{"msghead":{{"msgid":{chat}}},"context":"x""#),
            DecodeError::NoHead,
        ),
        (r#"{"context":"no head"}"#.into(), DecodeError::NoHead),
        (r#"{"msghead":{"seq":1}}"#.into(), DecodeError::NoHead),
        (r#"{"msghead":{"msgid":"x"}}"#.into(), DecodeError::NoHead),
        (
            format!(
                r#"{{"msghead":{{"msgid":{}}}}}"#,
                MsgType::ChcOnlineRep as u32
            ),
            DecodeError::UnknownMsg(MsgType::ChcOnlineRep as u32),
        ),
        (
            r#"{"msghead":{"msgid":9999}}"#.into(),
            DecodeError::UnknownMsg(9999),
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(decode_client(text.as_bytes()), Err(expected), "{text}");
    }
    let malformed = [
        // A field the schema does not have.
        format!(r#"{{"msghead":{{"msgid":{chat}}},"colour":"red"}}"#),
        // An enum name the schema does not have.
        format!(r#"{{"msghead":{{"msgid":{chat}}},"chattype":"CHAT_MARS"}}"#),
        // A string where a number belongs, and a number out of range.
        format!(r#"{{"msghead":{{"msgid":{chat}}},"context":5}}"#),
        format!(r#"{{"msghead":{{"msgid":{chat}}},"targetid":"-1"}}"#),
    ];
    for text in malformed {
        assert!(
            matches!(
                decode_client(text.as_bytes()),
                Err(DecodeError::Malformed { msgid, .. }) if msgid == chat
            ),
            "{text}: {:?}",
            decode_client(text.as_bytes())
        );
    }
}

#[test]
fn subprotocols_choose_a_codec() {
    assert_eq!(Codec::choose("guildchat.json"), Some(Codec::Json));
    assert_eq!(Codec::choose("guildchat.proto"), Some(Codec::Protobuf));
    assert_eq!(
        Codec::choose("chat.v2, guildchat.json , guildchat.proto"),
        Some(Codec::Json)
    );
    assert_eq!(Codec::choose("GUILDCHAT.JSON"), None);
    assert_eq!(Codec::choose(""), None);
    for codec in [Codec::Protobuf, Codec::Json] {
        assert_eq!(Codec::from_subprotocol(codec.subprotocol()), Some(codec));
    }
}

#[test]
fn an_enum_number_the_schema_does_not_name_cannot_be_written() {
    let frame = encode_proto(&pb::ChatMessageNotifyKick {
        msghead: head(MsgType::ChcNotifyKick, 0),
        reason: 999,
        detail: String::new(),
    });
    assert!(matches!(
        transcode_server(&frame),
        Err(EncodeError::Unrepresentable(_))
    ));
    assert!(matches!(
        transcode_server(b"\xff"),
        Err(EncodeError::Decode(DecodeError::NoHead))
    ));
}

proptest::proptest! {
    /// Whatever a client sends, decoding returns; a frame that decodes
    /// survives the trip through protobuf and back.
    #[test]
    fn any_text_decodes_or_is_refused(
        pick in 0usize..9,
        cut in 0usize..400,
        junk in proptest::collection::vec(proptest::num::u8::ANY, 0..8),
    ) {
        let mut text = client_msgs()[pick].to_json().unwrap().to_vec();
        let at = cut.min(text.len());
        text.splice(at..at, junk);
        if let Ok(msg) = decode_client(&text) {
            proptest::prop_assert_eq!(decode_proto_client(&msg.encode()).unwrap(), msg);
        }
    }
}
