//! The JSON codec: the same messages as [`crate::codec`], one per websocket
//! text frame, in the protobuf canonical JSON mapping.
//!
//! The mapping is pbjson's, generated from the same descriptors as the
//! prost types, so it cannot drift from the schema: field names are written
//! in lowerCamelCase (`lastMsgId`) and read in either spelling
//! (`last_msg_id` too); enums are written by name (`"CHAT_WORLD"`) and read
//! by name or number; default values are left out; fields the schema does
//! not have are refused. As the mapping requires, 64-bit integers (every id
//! in this protocol) are written as decimal strings, since JavaScript
//! numbers lose precision above 2^53; they are read as strings or numbers.
//!
//! A frame's type is its `msghead.msgid`, as in the binary codec, and a bad
//! frame gets the same [`DecodeError`] (so the same error notice). This
//! module must never hand-write JSON: every byte comes from the generated
//! serde impls.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::codec::{self, ClientMsg, DecodeError, ServerMsg};
use crate::pb;
use crate::MsgType;

/// The websocket subprotocol of the binary (protobuf) codec, the default.
pub const PROTOBUF_SUBPROTOCOL: &str = "guildchat.proto";
/// The websocket subprotocol of the JSON codec.
pub const JSON_SUBPROTOCOL: &str = "guildchat.json";

/// How a connection's messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// One protobuf message per binary frame.
    Protobuf,
    /// One canonical-JSON message per text frame.
    Json,
}

impl Codec {
    /// The `Sec-WebSocket-Protocol` value that selects this codec.
    pub const fn subprotocol(self) -> &'static str {
        match self {
            Codec::Protobuf => PROTOBUF_SUBPROTOCOL,
            Codec::Json => JSON_SUBPROTOCOL,
        }
    }

    /// The codec a subprotocol name selects (names are case-sensitive, as
    /// RFC 6455 says).
    pub fn from_subprotocol(name: &str) -> Option<Codec> {
        match name {
            PROTOBUF_SUBPROTOCOL => Some(Codec::Protobuf),
            JSON_SUBPROTOCOL => Some(Codec::Json),
            _ => None,
        }
    }

    /// The first codec this server speaks among a `Sec-WebSocket-Protocol`
    /// header's comma-separated offers, in the client's order of preference.
    pub fn choose(offers: &str) -> Option<Codec> {
        offers
            .split(',')
            .find_map(|o| Codec::from_subprotocol(o.trim()))
    }
}

/// Only the head, every other field skipped: what decides a frame's type.
#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    msghead: Option<pb::ChatMessageHead>,
}

fn read_head(text: &[u8]) -> Result<(u32, u32), DecodeError> {
    let peek: Peek = serde_json::from_slice(text).map_err(|_| DecodeError::NoHead)?;
    match peek.msghead {
        Some(head) if head.msgid != 0 => Ok((head.msgid, head.seq)),
        _ => Err(DecodeError::NoHead),
    }
}

/// The request's `seq`, or 0 when the frame has no readable head. Used to
/// echo `seq` in error notices.
pub fn peek_seq(text: &[u8]) -> u32 {
    read_head(text).map(|(_, seq)| seq).unwrap_or(0)
}

fn body<M: DeserializeOwned>(msgid: u32, text: &[u8]) -> Result<M, DecodeError> {
    serde_json::from_slice(text).map_err(|e| DecodeError::Malformed {
        msgid,
        reason: e.to_string(),
    })
}

/// Decodes a JSON frame sent by a client. The caller has already bounded
/// its size; a websocket text frame is valid UTF-8 by the time it gets
/// here, but bytes are taken so that nothing depends on it.
pub fn decode_client(text: &[u8]) -> Result<ClientMsg, DecodeError> {
    let (msgid, _) = read_head(text)?;
    match MsgType::try_from(msgid as i32) {
        Ok(MsgType::CchLoginReq) => body(msgid, text).map(ClientMsg::Login),
        Ok(MsgType::CchChatReq) => body(msgid, text).map(ClientMsg::Chat),
        Ok(MsgType::CchHeartbeatReq) => body(msgid, text).map(ClientMsg::Heartbeat),
        Ok(MsgType::CchSetMaskReq) => body(msgid, text).map(ClientMsg::SetMask),
        Ok(MsgType::CchOnlineReq) => body(msgid, text).map(ClientMsg::Online),
        Ok(MsgType::CchHistoryReq) => body(msgid, text).map(ClientMsg::History),
        Ok(MsgType::CchBlockReq) => body(msgid, text).map(ClientMsg::Block),
        Ok(MsgType::CchUnblockReq) => body(msgid, text).map(ClientMsg::Unblock),
        Ok(MsgType::CchBlockListReq) => body(msgid, text).map(ClientMsg::BlockList),
        _ => Err(DecodeError::UnknownMsg(msgid)),
    }
}

/// Decodes a JSON frame sent by the server.
pub fn decode_server(text: &[u8]) -> Result<ServerMsg, DecodeError> {
    let (msgid, _) = read_head(text)?;
    match MsgType::try_from(msgid as i32) {
        Ok(MsgType::ChcLoginRep) => body(msgid, text).map(ServerMsg::LoginRep),
        Ok(MsgType::CchChatRep) => body(msgid, text).map(ServerMsg::ChatRep),
        Ok(MsgType::ChcNotifyChat) => body(msgid, text).map(ServerMsg::Chat),
        Ok(MsgType::ChcNotifyKick) => body(msgid, text).map(ServerMsg::Kick),
        Ok(MsgType::ChcNotifyError) => body(msgid, text).map(ServerMsg::Error),
        Ok(MsgType::ChcHeartbeatRep) => body(msgid, text).map(ServerMsg::HeartbeatRep),
        Ok(MsgType::ChcSetMaskRep) => body(msgid, text).map(ServerMsg::SetMaskRep),
        Ok(MsgType::ChcOnlineRep) => body(msgid, text).map(ServerMsg::OnlineRep),
        Ok(MsgType::ChcNotifyShed) => body(msgid, text).map(ServerMsg::Shed),
        Ok(MsgType::ChcHistoryRep) => body(msgid, text).map(ServerMsg::HistoryRep),
        Ok(MsgType::ChcNotifyRecall) => body(msgid, text).map(ServerMsg::Recall),
        Ok(MsgType::ChcBlockRep) => body(msgid, text).map(ServerMsg::BlockRep),
        Ok(MsgType::ChcUnblockRep) => body(msgid, text).map(ServerMsg::UnblockRep),
        Ok(MsgType::ChcBlockListRep) => body(msgid, text).map(ServerMsg::BlockListRep),
        _ => Err(DecodeError::UnknownMsg(msgid)),
    }
}

/// Why a message could not be written as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The protobuf frame to transcode did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A field holds a value the mapping cannot write, such as an enum
    /// number the schema does not name.
    #[error("not representable as JSON: {0}")]
    Unrepresentable(String),
}

fn to_json<M: serde::Serialize>(msg: &M) -> Result<Bytes, EncodeError> {
    serde_json::to_vec(msg)
        .map(Bytes::from)
        .map_err(|e| EncodeError::Unrepresentable(e.to_string()))
}

/// Writes one message as a JSON frame.
pub fn encode<M: serde::Serialize>(msg: &M) -> Result<Bytes, EncodeError> {
    to_json(msg)
}

impl ClientMsg {
    /// Encodes the request into one JSON frame.
    pub fn to_json(&self) -> Result<Bytes, EncodeError> {
        match self {
            ClientMsg::Login(m) => to_json(m),
            ClientMsg::Chat(m) => to_json(m),
            ClientMsg::Heartbeat(m) => to_json(m),
            ClientMsg::SetMask(m) => to_json(m),
            ClientMsg::Online(m) => to_json(m),
            ClientMsg::History(m) => to_json(m),
            ClientMsg::Block(m) => to_json(m),
            ClientMsg::Unblock(m) => to_json(m),
            ClientMsg::BlockList(m) => to_json(m),
        }
    }
}

impl ServerMsg {
    /// Encodes the message into one JSON frame.
    pub fn to_json(&self) -> Result<Bytes, EncodeError> {
        match self {
            ServerMsg::LoginRep(m) => to_json(m),
            ServerMsg::ChatRep(m) => to_json(m),
            ServerMsg::Chat(m) => to_json(m),
            ServerMsg::Kick(m) => to_json(m),
            ServerMsg::Error(m) => to_json(m),
            ServerMsg::HeartbeatRep(m) => to_json(m),
            ServerMsg::SetMaskRep(m) => to_json(m),
            ServerMsg::OnlineRep(m) => to_json(m),
            ServerMsg::Shed(m) => to_json(m),
            ServerMsg::HistoryRep(m) => to_json(m),
            ServerMsg::Recall(m) => to_json(m),
            ServerMsg::BlockRep(m) => to_json(m),
            ServerMsg::UnblockRep(m) => to_json(m),
            ServerMsg::BlockListRep(m) => to_json(m),
        }
    }
}

/// Transcodes a protobuf frame the server encoded into its JSON frame: how
/// a message encoded once reaches a JSON connection.
pub fn transcode_server(frame: &[u8]) -> Result<Bytes, EncodeError> {
    codec::decode_server(frame)?.to_json()
}

#[cfg(test)]
mod tests;
