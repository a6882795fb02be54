//! The interactive terminal client behind `guildchat chat`.
//!
//! Plain lines go to the current scene; `/w`, `/g`, `/t` send to world,
//! guild and team; `/p ID text` whispers (a non-numeric ID is taken as a
//! name); `/mask N` sets the channel mask; `/online` asks the player count;
//! `/quit` leaves. Every notification is printed with time, channel and
//! sender. It only uses [`Client`], so it doubles as a reference for game
//! client authors.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use guildchat_protocol::{codec, pb, ChatType, ClientMsg, KickReason, MsgType, ResCode, ServerMsg};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{Client, Event};

/// What a typed line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Say {
        channel: ChatType,
        text: String,
        target_id: u64,
        target_name: String,
    },
    Mask(u32),
    Online,
    Quit,
    Help,
    Nothing,
}

/// Parses one typed line.
pub fn parse_line(line: &str) -> Command {
    let line = line.trim();
    if line.is_empty() {
        return Command::Nothing;
    }
    let say = |channel, text: &str| Command::Say {
        channel,
        text: text.trim().to_owned(),
        target_id: 0,
        target_name: String::new(),
    };
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    match cmd {
        "/w" => say(ChatType::ChatWorld, rest),
        "/g" => say(ChatType::ChatGuild, rest),
        "/t" => say(ChatType::ChatTeam, rest),
        "/s" => say(ChatType::ChatNormal, rest),
        "/p" => {
            let (who, text) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
            let (target_id, target_name) = match who.parse::<u64>() {
                Ok(id) => (id, String::new()),
                Err(_) => (0, who.to_owned()),
            };
            Command::Say {
                channel: ChatType::ChatPrivate,
                text: text.trim().to_owned(),
                target_id,
                target_name,
            }
        }
        "/mask" => rest.trim().parse().map_or(Command::Help, Command::Mask),
        "/online" => Command::Online,
        "/quit" => Command::Quit,
        _ if cmd.starts_with('/') => Command::Help,
        _ => say(ChatType::ChatNormal, line),
    }
}

const HELP: &str = "commands: <text> (scene)  /w <text> (world)  /g <text> (guild)  /t <text> (team)  /p <id|name> <text> (whisper)  /mask <bits>  /online  /quit";

fn channel_name(chattype: i32) -> &'static str {
    match ChatType::try_from(chattype) {
        Ok(ChatType::ChatNormal) => "scene",
        Ok(ChatType::ChatGuild) => "guild",
        Ok(ChatType::ChatWorld) => "world",
        Ok(ChatType::ChatAll) => "SYSTEM",
        Ok(ChatType::ChatPrivate) => "whisper",
        Ok(ChatType::ChatTeam) => "team",
        _ => "?",
    }
}

fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

fn res_name(res: i32) -> String {
    ResCode::try_from(res).map_or_else(|_| format!("code {res}"), |r| r.as_str_name().to_owned())
}

/// Renders one server message as a line of text.
pub fn render(msg: &ServerMsg) -> String {
    match msg {
        ServerMsg::Chat(n) => {
            let to = if n.targetid != 0 {
                format!(" -> {}({})", n.targetname, n.targetid)
            } else {
                String::new()
            };
            format!(
                "[{}] [{}] {}({}){}: {}",
                clock(n.time_ms),
                channel_name(n.chattype),
                n.sendername,
                n.senderid,
                to,
                n.strcontext
            )
        }
        ServerMsg::LoginRep(r) => format!(
            "login: {} user={} name={} guild={} team={} scene={}",
            res_name(r.res),
            r.userid,
            r.username,
            r.guildid,
            r.teamid,
            r.sceneid
        ),
        ServerMsg::ChatRep(r) if r.res == ResCode::ResOk as i32 => String::new(),
        ServerMsg::ChatRep(r) => format!(
            "chat refused: {} (cooldown {} ms)",
            res_name(r.res),
            r.cooldown_ms
        ),
        ServerMsg::Kick(k) => format!(
            "kicked: {}",
            KickReason::try_from(k.reason).map_or("?", |r| r.as_str_name())
        ),
        ServerMsg::Error(e) => format!("error: {} {}", res_name(e.res), e.detail),
        ServerMsg::HeartbeatRep(_) => String::new(),
        ServerMsg::SetMaskRep(r) => format!("mask: {} ({})", r.mask, res_name(r.res)),
        ServerMsg::OnlineRep(r) => format!("online: {} of {}", r.online, r.max_online),
        ServerMsg::HistoryRep(h) => {
            let mut lines = vec![format!(
                "history: {} ({} messages{})",
                res_name(h.res),
                h.msgs.len(),
                if h.has_more { ", more available" } else { "" }
            )];
            // Newest first on the wire; oldest first on screen.
            lines.extend(
                h.msgs
                    .iter()
                    .rev()
                    .map(|n| render(&ServerMsg::Chat(n.clone()))),
            );
            lines.join("\n")
        }
        ServerMsg::Shed(s) => format!(
            "({} world/scene messages skipped: connection too slow)",
            s.count
        ),
        ServerMsg::Recall(r) => format!("(message {} was removed by a game master)", r.msg_id),
        ServerMsg::BlockRep(r) => format!("block {}: {}", r.userid, res_name(r.res)),
        ServerMsg::UnblockRep(r) => format!("unblock {}: {}", r.userid, res_name(r.res)),
        ServerMsg::BlockListRep(r) => format!("blocked: {:?} ({})", r.userids, res_name(r.res)),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the interactive client until `/quit`, end of input or a close.
pub async fn run(url: &str, token: &str) -> anyhow::Result<()> {
    let mut client = Client::connect(url).await?;
    let rep = client.login(token).await?;
    println!("{}", render(&ServerMsg::LoginRep(rep.clone())));
    if rep.res != ResCode::ResOk as i32 {
        anyhow::bail!("login refused: {}", res_name(rep.res));
    }
    println!("{HELP}");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                match parse_line(&line) {
                    Command::Say { channel, text, target_id, target_name } => {
                        client.send_chat(channel, &text, target_id, &target_name).await?;
                    }
                    Command::Mask(mask) => { client.send_mask(mask).await?; }
                    Command::Online => {
                        let seq = client.next_seq();
                        client.send(&ClientMsg::Online(pb::ChatMessageOnlineReq {
                            msghead: codec::head(MsgType::CchOnlineReq, seq),
                        })).await?;
                    }
                    Command::Quit => break,
                    Command::Help => println!("{HELP}"),
                    Command::Nothing => {}
                }
            }
            event = client.recv() => match event? {
                Event::Msg(msg) => {
                    let text = render(&msg);
                    if !text.is_empty() {
                        println!("{text}");
                        let _ = std::io::stdout().flush();
                    }
                }
                Event::Closed(code) => {
                    println!("connection closed by server (code {code:?})");
                    return Ok(());
                }
            },
            _ = heartbeat.tick() => {
                let seq = client.next_seq();
                client.send(&ClientMsg::Heartbeat(pb::ChatMessageHeartbeatReq {
                    msghead: codec::head(MsgType::CchHeartbeatReq, seq),
                    client_time_ms: now_ms(),
                })).await?;
            }
        }
    }
    client.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_to_commands() {
        let say = |channel, text: &str, id, name: &str| Command::Say {
            channel,
            text: text.into(),
            target_id: id,
            target_name: name.into(),
        };
        let cases = [
            (
                "hello there",
                say(ChatType::ChatNormal, "hello there", 0, ""),
            ),
            ("/w hi all", say(ChatType::ChatWorld, "hi all", 0, "")),
            ("/g gg", say(ChatType::ChatGuild, "gg", 0, "")),
            ("/t go", say(ChatType::ChatTeam, "go", 0, "")),
            ("/p 42 psst", say(ChatType::ChatPrivate, "psst", 42, "")),
            ("/p bob psst", say(ChatType::ChatPrivate, "psst", 0, "bob")),
            ("/mask 8", Command::Mask(8)),
            ("/mask x", Command::Help),
            ("/online", Command::Online),
            ("/quit", Command::Quit),
            ("/nope", Command::Help),
            ("   ", Command::Nothing),
        ];
        for (line, want) in cases {
            assert_eq!(parse_line(line), want, "{line:?}");
        }
    }

    #[test]
    fn notifications_render_channel_sender_and_time() {
        let line = render(&ServerMsg::Chat(pb::ChatMessageNotifyChat {
            chattype: ChatType::ChatGuild as i32,
            senderid: 7,
            sendername: "alice".into(),
            strcontext: "hi".into(),
            time_ms: 3_723_000,
            ..Default::default()
        }));
        assert_eq!(line, "[01:02:03] [guild] alice(7): hi");
    }
}
