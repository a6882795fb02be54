//! Frame codec: one protobuf message per binary websocket frame, typed by the
//! msgid in its leading `ChatMessageHead`.
//!
//! Decoding never panics and never allocates more than the frame it is given
//! holds; the caller enforces [`crate::limits::MAX_FRAME_BYTES`] before it
//! reads a frame at all.

use bytes::Bytes;
use prost::Message;

use crate::pb;
use crate::{MsgType, ResCode};

/// Why a frame could not be turned into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame does not start with a readable `ChatMessageHead`.
    #[error("frame has no message head")]
    NoHead,
    /// The head names a msgid this side does not accept.
    #[error("unknown msgid {0}")]
    UnknownMsg(u32),
    /// The head was readable but the body is not valid protobuf for it.
    #[error("malformed body for msgid {msgid}: {reason}")]
    Malformed { msgid: u32, reason: String },
}

impl DecodeError {
    /// The msgid of the offending frame, when it was readable.
    pub fn msgid(&self) -> u32 {
        match self {
            DecodeError::NoHead => 0,
            DecodeError::UnknownMsg(id) => *id,
            DecodeError::Malformed { msgid, .. } => *msgid,
        }
    }
}

/// Reads the msgid of a frame without decoding it, the way every client of
/// this protocol does: `0x0a, head_len, 0x08, varint(msgid)` with a varint of
/// at most two bytes. Returns `None` if the frame does not start that way.
pub fn peek_msgid(frame: &[u8]) -> Option<u32> {
    if frame.len() < 4 || frame[0] != 0x0a || frame[2] != 0x08 {
        return None;
    }
    let head_len = frame[1] as usize;
    if !(2..=0x7f).contains(&head_len) || frame.len() < 2 + head_len {
        return None;
    }
    let b0 = frame[3] as u32;
    if b0 & 0x80 == 0 {
        return Some(b0);
    }
    let b1 = *frame.get(4)? as u32;
    if b1 & 0x80 != 0 || head_len < 3 {
        return None;
    }
    Some((b0 & 0x7f) | (b1 << 7))
}

/// Finds the msgid and seq of a frame. The head is decoded on its own when it
/// comes first, as the contract requires, so a damaged body still yields the
/// msgid for the error notice; otherwise field 1 is searched for by decoding
/// the frame with every other field skipped.
fn read_head(frame: &[u8]) -> Result<(u32, u32), DecodeError> {
    let head = match frame {
        [0x0a, len, rest @ ..] if (*len as usize) <= rest.len() && *len < 0x80 => {
            pb::ChatMessageHead::decode(&rest[..*len as usize]).map_err(|_| DecodeError::NoHead)?
        }
        _ => pb::ChatMessageOnlineReq::decode(frame)
            .map_err(|_| DecodeError::NoHead)?
            .msghead
            .ok_or(DecodeError::NoHead)?,
    };
    if head.msgid == 0 {
        return Err(DecodeError::NoHead);
    }
    Ok((head.msgid, head.seq))
}

/// The request's `seq`, or 0 when the frame has no readable head. Used to
/// echo `seq` in error notices.
pub fn peek_seq(frame: &[u8]) -> u32 {
    read_head(frame).map(|(_, seq)| seq).unwrap_or(0)
}

fn body<M: Message + Default>(msgid: u32, frame: &[u8]) -> Result<M, DecodeError> {
    M::decode(frame).map_err(|e| DecodeError::Malformed {
        msgid,
        reason: e.to_string(),
    })
}

/// A message a client sends to the server.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    Login(pb::ChatMessageLoginReq),
    Chat(pb::ChatMessageChatReq),
    Heartbeat(pb::ChatMessageHeartbeatReq),
    SetMask(pb::ChatMessageSetMaskReq),
    Online(pb::ChatMessageOnlineReq),
    History(pb::ChatMessageHistoryReq),
    Block(pb::ChatMessageBlockReq),
    Unblock(pb::ChatMessageUnblockReq),
    BlockList(pb::ChatMessageBlockListReq),
}

impl ClientMsg {
    /// The request's sequence number, echoed by the server in its reply.
    pub fn seq(&self) -> u32 {
        self.head().map_or(0, |h| h.seq)
    }

    fn head(&self) -> Option<&pb::ChatMessageHead> {
        match self {
            ClientMsg::Login(m) => m.msghead.as_ref(),
            ClientMsg::Chat(m) => m.msghead.as_ref(),
            ClientMsg::Heartbeat(m) => m.msghead.as_ref(),
            ClientMsg::SetMask(m) => m.msghead.as_ref(),
            ClientMsg::Online(m) => m.msghead.as_ref(),
            ClientMsg::History(m) => m.msghead.as_ref(),
            ClientMsg::Block(m) => m.msghead.as_ref(),
            ClientMsg::Unblock(m) => m.msghead.as_ref(),
            ClientMsg::BlockList(m) => m.msghead.as_ref(),
        }
    }

    /// The reply to this request that refuses it with `res`, of the reply
    /// type the request expects, its seq echoed, and `retry_after_ms` where
    /// the reply has that field. A heartbeat's reply echoes its client time.
    /// A login has no refusal of its own here: `CHC_Login_Rep` says more
    /// than a code, so its callers build it.
    pub fn refusal(&self, res: ResCode, retry_after_ms: u32) -> Bytes {
        let seq = self.seq();
        let code = res as i32;
        match self {
            ClientMsg::Login(_) => encode(&pb::ChatMessageLoginRep {
                msghead: head(MsgType::ChcLoginRep, seq),
                res: code,
                ..Default::default()
            }),
            ClientMsg::Chat(_) => encode(&pb::ChatMessageChatRep {
                msghead: head(MsgType::CchChatRep, seq),
                res: code,
                cooldown_ms: retry_after_ms,
                ..Default::default()
            }),
            ClientMsg::Heartbeat(m) => encode(&pb::ChatMessageHeartbeatRep {
                msghead: head(MsgType::ChcHeartbeatRep, seq),
                client_time_ms: m.client_time_ms,
                res: code,
                retry_after_ms,
                ..Default::default()
            }),
            ClientMsg::SetMask(_) => encode(&pb::ChatMessageSetMaskRep {
                msghead: head(MsgType::ChcSetMaskRep, seq),
                res: code,
                retry_after_ms,
                ..Default::default()
            }),
            ClientMsg::Online(_) => encode(&pb::ChatMessageOnlineRep {
                msghead: head(MsgType::ChcOnlineRep, seq),
                res: code,
                retry_after_ms,
                ..Default::default()
            }),
            ClientMsg::History(_) => encode(&pb::ChatMessageHistoryRep {
                msghead: head(MsgType::ChcHistoryRep, seq),
                res: code,
                retry_after_ms,
                ..Default::default()
            }),
            ClientMsg::Block(m) => encode(&pb::ChatMessageBlockRep {
                msghead: head(MsgType::ChcBlockRep, seq),
                res: code,
                userid: m.userid,
                retry_after_ms,
            }),
            ClientMsg::Unblock(m) => encode(&pb::ChatMessageUnblockRep {
                msghead: head(MsgType::ChcUnblockRep, seq),
                res: code,
                userid: m.userid,
                retry_after_ms,
            }),
            ClientMsg::BlockList(_) => encode(&pb::ChatMessageBlockListRep {
                msghead: head(MsgType::ChcBlockListRep, seq),
                res: code,
                retry_after_ms,
                ..Default::default()
            }),
        }
    }

    /// Encodes the request into one frame.
    pub fn encode(&self) -> Bytes {
        match self {
            ClientMsg::Login(m) => encode(m),
            ClientMsg::Chat(m) => encode(m),
            ClientMsg::Heartbeat(m) => encode(m),
            ClientMsg::SetMask(m) => encode(m),
            ClientMsg::Online(m) => encode(m),
            ClientMsg::History(m) => encode(m),
            ClientMsg::Block(m) => encode(m),
            ClientMsg::Unblock(m) => encode(m),
            ClientMsg::BlockList(m) => encode(m),
        }
    }
}

/// Decodes a frame sent by a client.
pub fn decode_client(frame: &[u8]) -> Result<ClientMsg, DecodeError> {
    let (msgid, _) = read_head(frame)?;
    let msg = match MsgType::try_from(msgid as i32) {
        Ok(MsgType::CchLoginReq) => body(msgid, frame).map(ClientMsg::Login),
        Ok(MsgType::CchChatReq) => body(msgid, frame).map(ClientMsg::Chat),
        Ok(MsgType::CchHeartbeatReq) => body(msgid, frame).map(ClientMsg::Heartbeat),
        Ok(MsgType::CchSetMaskReq) => body(msgid, frame).map(ClientMsg::SetMask),
        Ok(MsgType::CchOnlineReq) => body(msgid, frame).map(ClientMsg::Online),
        Ok(MsgType::CchHistoryReq) => body(msgid, frame).map(ClientMsg::History),
        Ok(MsgType::CchBlockReq) => body(msgid, frame).map(ClientMsg::Block),
        Ok(MsgType::CchUnblockReq) => body(msgid, frame).map(ClientMsg::Unblock),
        Ok(MsgType::CchBlockListReq) => body(msgid, frame).map(ClientMsg::BlockList),
        _ => Err(DecodeError::UnknownMsg(msgid)),
    }?;
    // Protobuf merges a repeated head field, so a frame can name one type
    // in its first head and another in the merged one. Such a frame would
    // be handled as one type while saying it is another: refused.
    if msg.head().map(|h| h.msgid) != Some(msgid) {
        return Err(DecodeError::Malformed {
            msgid,
            reason: "the message head is repeated with another msgid".into(),
        });
    }
    Ok(msg)
}

/// A message the server sends to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMsg {
    LoginRep(pb::ChatMessageLoginRep),
    ChatRep(pb::ChatMessageChatRep),
    Chat(pb::ChatMessageNotifyChat),
    Kick(pb::ChatMessageNotifyKick),
    Error(pb::ChatMessageNotifyError),
    HeartbeatRep(pb::ChatMessageHeartbeatRep),
    SetMaskRep(pb::ChatMessageSetMaskRep),
    OnlineRep(pb::ChatMessageOnlineRep),
    Shed(pb::ChatMessageNotifyShed),
    HistoryRep(pb::ChatMessageHistoryRep),
    Recall(pb::ChatMessageNotifyRecall),
    BlockRep(pb::ChatMessageBlockRep),
    UnblockRep(pb::ChatMessageUnblockRep),
    BlockListRep(pb::ChatMessageBlockListRep),
}

/// Decodes a frame sent by the server.
pub fn decode_server(frame: &[u8]) -> Result<ServerMsg, DecodeError> {
    let (msgid, _) = read_head(frame)?;
    match MsgType::try_from(msgid as i32) {
        Ok(MsgType::ChcLoginRep) => body(msgid, frame).map(ServerMsg::LoginRep),
        Ok(MsgType::CchChatRep) => body(msgid, frame).map(ServerMsg::ChatRep),
        Ok(MsgType::ChcNotifyChat) => body(msgid, frame).map(ServerMsg::Chat),
        Ok(MsgType::ChcNotifyKick) => body(msgid, frame).map(ServerMsg::Kick),
        Ok(MsgType::ChcNotifyError) => body(msgid, frame).map(ServerMsg::Error),
        Ok(MsgType::ChcHeartbeatRep) => body(msgid, frame).map(ServerMsg::HeartbeatRep),
        Ok(MsgType::ChcSetMaskRep) => body(msgid, frame).map(ServerMsg::SetMaskRep),
        Ok(MsgType::ChcOnlineRep) => body(msgid, frame).map(ServerMsg::OnlineRep),
        Ok(MsgType::ChcNotifyShed) => body(msgid, frame).map(ServerMsg::Shed),
        Ok(MsgType::ChcHistoryRep) => body(msgid, frame).map(ServerMsg::HistoryRep),
        Ok(MsgType::ChcNotifyRecall) => body(msgid, frame).map(ServerMsg::Recall),
        Ok(MsgType::ChcBlockRep) => body(msgid, frame).map(ServerMsg::BlockRep),
        Ok(MsgType::ChcUnblockRep) => body(msgid, frame).map(ServerMsg::UnblockRep),
        Ok(MsgType::ChcBlockListRep) => body(msgid, frame).map(ServerMsg::BlockListRep),
        _ => Err(DecodeError::UnknownMsg(msgid)),
    }
}

/// The head every message starts with.
pub fn head(msgid: MsgType, seq: u32) -> Option<pb::ChatMessageHead> {
    Some(pb::ChatMessageHead {
        msgid: msgid as u32,
        seq,
    })
}

/// Encodes a message into one frame. prost writes fields in tag order, so
/// the head (field 1) comes first, as [`peek_msgid`] requires.
pub fn encode<M: Message>(msg: &M) -> Bytes {
    Bytes::from(msg.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChatType;

    /// Found by the `decode_client` and `peek_msgid` fuzz targets: a second
    /// head with another msgid merges into the first.
    #[test]
    fn a_repeated_head_with_another_msgid_is_refused() {
        let frames: [&[u8]; 2] = [
            &[
                0x0a, 0x04, 0x08, 0x04, 0x08, 0x03, 0x0a, 0x04, 0x08, 0x0a, 0x10, 0x05, 0x30, 0x88,
                0x10,
            ],
            &[
                0x0a, 0x04, 0x08, 0x03, 0x10, 0x02, 0x0a, 0x04, 0x08, 0xff, 0xff, 0x4d,
            ],
        ];
        for frame in frames {
            assert!(
                matches!(
                    decode_client(frame),
                    Err(DecodeError::Malformed { msgid: 3, .. })
                ),
                "{frame:?}"
            );
        }
        // A repeated head that agrees is still one message.
        let agreeing = [0x0a, 0x02, 0x08, 0x0c, 0x0a, 0x04, 0x08, 0x0c, 0x10, 0x07];
        assert_eq!(decode_client(&agreeing).unwrap().seq(), 7);
    }

    fn chat_req(seq: u32, text: &str) -> pb::ChatMessageChatReq {
        pb::ChatMessageChatReq {
            msghead: head(MsgType::CchChatReq, seq),
            chattype: ChatType::ChatWorld as i32,
            context: text.into(),
            ..Default::default()
        }
    }

    #[test]
    fn peek_reads_one_and_two_byte_msgids() {
        let cases: &[(u32, u32)] = &[(1, 0), (5, 7), (127, 1), (128, 0), (300, 99), (16383, 1)];
        for &(msgid, seq) in cases {
            let frame = encode(&pb::ChatMessageOnlineReq {
                msghead: Some(pb::ChatMessageHead { msgid, seq }),
            });
            assert_eq!(frame[0], 0x0a, "msgid {msgid}");
            assert_eq!(frame[2], 0x08, "msgid {msgid}");
            assert_eq!(peek_msgid(&frame), Some(msgid), "msgid {msgid}");
        }
    }

    #[test]
    fn peek_rejects_frames_without_a_head() {
        let cases: &[&[u8]] = &[
            &[],
            &[0x0a],
            &[0x0a, 0x00],
            &[0x12, 0x02, 0x08, 0x01],
            &[0x0a, 0x02, 0x10, 0x01],
            &[0x0a, 0x05, 0x08, 0x01],
            &[0x0a, 0x03, 0x08, 0x80, 0x80],
        ];
        for frame in cases {
            assert_eq!(peek_msgid(frame), None, "{frame:?}");
        }
    }

    #[test]
    fn client_messages_round_trip() {
        let msgs = vec![
            ClientMsg::Login(pb::ChatMessageLoginReq {
                msghead: head(MsgType::CchLoginReq, 1),
                userid: 42,
                username: "alice".into(),
                guildid: u64::from(u32::MAX) + 5,
                tokenmd5: "x".into(),
                tokenstr: "a.b.c".into(),
                last_msg_id: 1 << 40,
            }),
            ClientMsg::Chat(chat_req(2, "hello")),
            ClientMsg::Heartbeat(pb::ChatMessageHeartbeatReq {
                msghead: head(MsgType::CchHeartbeatReq, 3),
                client_time_ms: 9,
            }),
            ClientMsg::SetMask(pb::ChatMessageSetMaskReq {
                msghead: head(MsgType::CchSetMaskReq, 4),
                mask: 8,
            }),
            ClientMsg::Online(pb::ChatMessageOnlineReq {
                msghead: head(MsgType::CchOnlineReq, 5),
            }),
            ClientMsg::History(pb::ChatMessageHistoryReq {
                msghead: head(MsgType::CchHistoryReq, 6),
                chattype: ChatType::ChatGuild as i32,
                before_msg_id: 77,
                limit: 20,
                ..Default::default()
            }),
        ];
        for msg in msgs {
            let frame = msg.encode();
            assert_eq!(decode_client(&frame).as_ref(), Ok(&msg));
            assert_eq!(peek_seq(&frame), msg.seq());
        }
    }

    #[test]
    fn server_messages_round_trip() {
        let note = pb::ChatMessageNotifyChat {
            msghead: head(MsgType::ChcNotifyChat, 0),
            chattype: ChatType::ChatGuild as i32,
            senderid: 7,
            strcontext: "héllo".into(),
            msg_id: 99,
            ..Default::default()
        };
        let frame = encode(&note);
        assert_eq!(decode_server(&frame), Ok(ServerMsg::Chat(note)));
        let rep = pb::ChatMessageChatRep {
            msghead: head(MsgType::CchChatRep, 3),
            res: ResCode::ResOnCooldown as i32,
            cooldown_ms: 1500,
            msg_id: 0,
            offline: false,
            muted_ms: 0,
        };
        assert_eq!(decode_server(&encode(&rep)), Ok(ServerMsg::ChatRep(rep)));
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        assert_eq!(decode_client(b""), Err(DecodeError::NoHead));
        assert_eq!(decode_client(&[0xff, 0xff, 0xff]), Err(DecodeError::NoHead));
        // A server message sent to the server is unknown there.
        let rep = encode(&pb::ChatMessageOnlineRep {
            msghead: head(MsgType::ChcOnlineRep, 1),
            ..Default::default()
        });
        assert_eq!(decode_client(&rep), Err(DecodeError::UnknownMsg(13)));
        // A valid head followed by a truncated field.
        let mut frame = encode(&chat_req(1, "hello")).to_vec();
        frame.truncate(frame.len() - 2);
        assert!(matches!(
            decode_client(&frame),
            Err(DecodeError::Malformed { msgid: 3, .. })
        ));
        // Invalid UTF-8 in a string field is a malformed body, not a panic.
        let mut frame = encode(&chat_req(1, "abc")).to_vec();
        let n = frame.len();
        frame[n - 1] = 0xff;
        assert!(matches!(
            decode_client(&frame),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn ids_above_u32_survive_and_u32_clients_interoperate() {
        // A field declared uint32 by an older client is the same varint.
        let frame = encode(&pb::ChatMessageLoginReq {
            msghead: head(MsgType::CchLoginReq, 0),
            userid: 123,
            ..Default::default()
        });
        let ClientMsg::Login(m) = decode_client(&frame).unwrap() else {
            panic!("not a login")
        };
        assert_eq!(m.userid, 123);
    }
}
