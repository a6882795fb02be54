//! Conversions between a live notification and a stored history record.
//!
//! Both carry the same fields, so a history page or an offline whisper
//! reaches the client exactly as the live message would have. Pure
//! functions: nothing here touches the store's thread or a socket.

use guildchat_protocol::{codec, pb, MsgType};
use tokio::sync::oneshot;

use crate::history::{Conversation, HistoryError, HistoryHandle, StoredMsg};

/// The record of a notification in a conversation; `nonce` is the
/// sender's client message id (0: none).
pub fn stored(n: &pb::ChatMessageNotifyChat, conversation: Conversation, nonce: u64) -> StoredMsg {
    StoredMsg {
        nonce,
        msg_id: n.msg_id,
        conversation,
        chattype: n.chattype,
        sender_id: n.senderid,
        sender_name: n.sendername.clone(),
        text: n.strcontext.clone(),
        time_ms: n.time_ms,
        guild_id: n.guildid,
        team_id: n.teamid,
        scene_id: n.sceneid,
        target_id: n.targetid,
        target_name: n.targetname.clone(),
    }
}

/// The notification a record stands for.
pub fn notification(m: &StoredMsg) -> pb::ChatMessageNotifyChat {
    pb::ChatMessageNotifyChat {
        msghead: codec::head(MsgType::ChcNotifyChat, 0),
        chattype: m.chattype,
        senderid: m.sender_id,
        strcontext: m.text.clone(),
        sendername: m.sender_name.clone(),
        msg_id: m.msg_id,
        time_ms: m.time_ms,
        guildid: m.guild_id,
        teamid: m.team_id,
        sceneid: m.scene_id,
        targetid: m.target_id,
        targetname: m.target_name.clone(),
    }
}

/// Queues a record for the next group commit. The receiver resolves when
/// it is durable; a store that cannot even take it resolves at once with
/// the error, so callers handle one path.
pub fn append(
    history: &HistoryHandle,
    msg: StoredMsg,
) -> oneshot::Receiver<Result<(), HistoryError>> {
    match history.append(msg) {
        Ok(rx) => rx,
        Err(e) => {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(e));
            rx
        }
    }
}
