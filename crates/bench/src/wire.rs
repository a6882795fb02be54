//! The bench's own bytes on top of the protocol: the tag every bench chat
//! line carries in its text, and a zero-copy reader for `CHC_Notify_Chat`.
//!
//! The tag is what makes loss, duplicates and latency measurable end to end:
//! it names the step, the sending bench client, that sender's own sequence
//! number and the wall-clock microsecond the line was handed to the socket.
//! Wall-clock time is used because senders and receivers live in different
//! processes; they share one machine, hence one clock.
//!
//! This module only formats and parses bytes. It never touches a socket and
//! never allocates on the receive path: every receiver runs it once per
//! delivery, and the generator shares the machine's two cores with the
//! server it measures.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use guildchat_protocol::{codec, pb, ChatType, MsgType};

/// Start of every bench chat text; anything else is not ours.
const MAGIC: &str = "gcb:";

/// What a bench line says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The fan-out step (0 outside the `fanout` and `slow` scenarios).
    pub step: u32,
    /// The sending client's global index.
    pub sender: u32,
    /// The sender's own sequence number, from 1, never reused in a run.
    pub seq: u64,
    /// Wall-clock microseconds when the line was sent.
    pub sent_us: u64,
}

/// Wall-clock microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The chat text for `tag`, padded with `x` to `len` characters (the tag
/// itself is never cut, so a text may be longer than `len`).
pub fn write_text(tag: &Tag, len: usize) -> String {
    let mut s = format!(
        "{MAGIC}{}:{}:{}:{}:",
        tag.step, tag.sender, tag.seq, tag.sent_us
    );
    while s.len() < len {
        s.push('x');
    }
    s
}

fn parse_u64(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in field {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// Reads the tag back from a chat text; `None` for text that is not a
/// bench line.
pub fn parse_text(text: &[u8]) -> Option<Tag> {
    let rest = text.strip_prefix(MAGIC.as_bytes())?;
    let mut fields = rest.splitn(5, |&b| b == b':');
    let step = parse_u64(fields.next()?)?;
    let sender = parse_u64(fields.next()?)?;
    let seq = parse_u64(fields.next()?)?;
    let sent_us = parse_u64(fields.next()?)?;
    // The fifth piece (the padding) must exist: it proves the sent_us field
    // was not cut short.
    fields.next()?;
    Some(Tag {
        step: u32::try_from(step).ok()?,
        sender: u32::try_from(sender).ok()?,
        seq,
        sent_us,
    })
}

/// The fields of a `CHC_Notify_Chat` the bench looks at, borrowed from the
/// frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notify<'a> {
    pub chattype: u64,
    pub msg_id: u64,
    pub text: &'a [u8],
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Scans a frame for the fields of a `CHC_Notify_Chat` without decoding it
/// into owned strings. Returns `None` if the frame is not a well-formed
/// notification. Unknown fields are skipped, as protobuf requires, so a
/// server that adds fields stays readable.
pub fn scan_notify(frame: &[u8]) -> Option<Notify<'_>> {
    if codec::peek_msgid(frame)? != MsgType::ChcNotifyChat as u32 {
        return None;
    }
    let mut out = Notify {
        chattype: 0,
        msg_id: 0,
        text: &[],
    };
    let mut pos = 0;
    while pos < frame.len() {
        let key = varint(frame, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(frame, &mut pos)?;
                match field {
                    2 => out.chattype = v,
                    6 => out.msg_id = v,
                    _ => {}
                }
            }
            1 => pos = pos.checked_add(8)?,
            2 => {
                let len = usize::try_from(varint(frame, &mut pos)?).ok()?;
                let end = pos.checked_add(len)?;
                let bytes = frame.get(pos..end)?;
                if field == 4 {
                    out.text = bytes;
                }
                pos = end;
            }
            5 => pos = pos.checked_add(4)?,
            _ => return None,
        }
    }
    (pos == frame.len()).then_some(out)
}

/// The frame a bench client sends to the reference server: already a
/// `CHC_Notify_Chat`, since the reference relays frames verbatim. Receivers
/// then read exactly the same bytes from either server, so the generator's
/// cost per delivery is the same for both. The id is made up by the sender
/// (`sender` in the high bits, `seq` in the low 40).
pub fn reference_frame(tag: &Tag, text_len: usize) -> Bytes {
    codec::encode(&pb::ChatMessageNotifyChat {
        msghead: codec::head(MsgType::ChcNotifyChat, 0),
        chattype: ChatType::ChatWorld as i32,
        senderid: u64::from(tag.sender),
        strcontext: write_text(tag, text_len),
        msg_id: (u64::from(tag.sender) + 1) << 40 | (tag.seq & ((1 << 40) - 1)),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_pads() {
        let cases = [
            Tag {
                step: 0,
                sender: 0,
                seq: 1,
                sent_us: 0,
            },
            Tag {
                step: 17,
                sender: 4_000_000,
                seq: u64::MAX,
                sent_us: 1_800_000_000_000_000,
            },
        ];
        for tag in cases {
            for len in [0, 40, 200] {
                let text = write_text(&tag, len);
                assert!(text.len() >= len, "{text}");
                assert_eq!(parse_text(text.as_bytes()), Some(tag), "{text}");
            }
        }
    }

    #[test]
    fn foreign_or_cut_texts_are_not_tags() {
        let cases: &[&[u8]] = &[
            b"",
            b"hello",
            b"gcb:1:2:3",
            b"gcb:1:2:3:4",
            b"gcb:1:2:x:4:",
            b"gcb:99999999999:2:3:4:",
            b"gcb:1:2:3:99999999999999999999999:",
        ];
        for text in cases {
            assert_eq!(
                parse_text(text),
                None,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn scan_matches_prost() {
        let note = pb::ChatMessageNotifyChat {
            msghead: codec::head(MsgType::ChcNotifyChat, 0),
            chattype: ChatType::ChatGuild as i32,
            senderid: 7,
            strcontext: "héllo".into(),
            sendername: "bob".into(),
            msg_id: 1 << 50,
            time_ms: 12345,
            guildid: 3,
            targetname: "x".into(),
            ..Default::default()
        };
        let frame = codec::encode(&note);
        let got = scan_notify(&frame).unwrap();
        assert_eq!(got.msg_id, 1 << 50);
        assert_eq!(got.chattype, ChatType::ChatGuild as u64);
        assert_eq!(got.text, "héllo".as_bytes());
        // A truncated frame is refused or read as the shorter message it
        // happens to be (protobuf cannot tell a cut at a field boundary),
        // never misread and never a panic.
        for cut in 0..frame.len() {
            if let Some(short) = scan_notify(&frame[..cut]) {
                assert!(short.msg_id == 0 || short.msg_id == 1 << 50, "cut {cut}");
                assert!("héllo".as_bytes().starts_with(short.text), "cut {cut}");
            }
        }
        // Other messages are not notifications.
        let rep = codec::encode(&pb::ChatMessageChatRep {
            msghead: codec::head(MsgType::CchChatRep, 1),
            ..Default::default()
        });
        assert_eq!(scan_notify(&rep), None);
    }

    #[test]
    fn reference_frames_carry_the_tag() {
        let tag = Tag {
            step: 2,
            sender: 5,
            seq: 9,
            sent_us: 77,
        };
        let frame = reference_frame(&tag, 64);
        let note = scan_notify(&frame).unwrap();
        assert_eq!(parse_text(note.text), Some(tag));
        assert_eq!(note.msg_id, (6 << 40) | 9);
    }
}
