//! `guildchat admin`: a game master's client for the admin HTTP API of a
//! running server. One command is one request; the reply is shown as a
//! small aligned table, or as the raw JSON body with `--json`.
//!
//! It speaks plain HTTP/1.1 and nothing else: the admin listener is meant
//! for loopback or a private network, never the open internet. It never
//! prints the key.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct AdminArgs {
    /// Base URL of the server's admin listener (plain http:// only).
    #[arg(
        long,
        env = "GUILDCHAT_ADMIN_URL",
        default_value = "http://127.0.0.1:7001"
    )]
    url: String,
    /// An `[[admin.keys]]` key from the server's config.
    #[arg(long, env = "GUILDCHAT_ADMIN_KEY", hide_env_values = true)]
    key: String,
    /// Print the raw JSON body of the reply instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Players online, connections and every counter.
    Stats,
    /// Drain this node for a restart: it stops accepting connections,
    /// moves its players to other nodes a batch at a time (they reconnect
    /// and resume), and exits when empty.
    Drain,
    /// A player's session state, groups and sanctions.
    Who { id: u64 },
    /// Disconnect a player now (they may log in again).
    Kick {
        id: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Stop a player from chatting for a while.
    Mute {
        id: u64,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift a mute.
    Unmute { id: u64 },
    /// Refuse a player's logins for a while (and disconnect them now).
    Ban {
        id: u64,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift a ban.
    Unban { id: u64 },
    /// Refuse every login token issued to a player until now.
    Revoke { id: u64 },
    /// Move an online player to another guild, team or scene (0 = none).
    #[command(group = clap::ArgGroup::new("change").required(true).multiple(true))]
    Groups {
        id: u64,
        #[arg(long, group = "change")]
        guild: Option<u64>,
        #[arg(long, group = "change")]
        team: Option<u64>,
        #[arg(long, group = "change")]
        scene: Option<u64>,
    },
    /// Send a system announcement to everyone, or to one guild, team,
    /// scene or player.
    #[command(group = clap::ArgGroup::new("to").multiple(false))]
    Announce {
        text: String,
        #[arg(long, group = "to")]
        guild: Option<u64>,
        #[arg(long, group = "to")]
        team: Option<u64>,
        #[arg(long, group = "to")]
        scene: Option<u64>,
        #[arg(long, group = "to")]
        player: Option<u64>,
        /// The same key within a few minutes announces only once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// The latest admin actions, newest first.
    Audit {
        #[arg(long)]
        limit: Option<u32>,
    },
}

/// How long one request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One request to send.
struct Call {
    method: &'static str,
    path: String,
    body: Option<Value>,
}

impl AdminCommand {
    fn call(&self) -> Call {
        let (method, path, body) = match self {
            AdminCommand::Stats => ("GET", "/v1/stats".to_owned(), None),
            AdminCommand::Drain => ("POST", "/v1/drain".to_owned(), None),
            AdminCommand::Who { id } => ("GET", format!("/v1/players/{id}"), None),
            AdminCommand::Kick { id, reason } => (
                "POST",
                format!("/v1/players/{id}/kick"),
                Some(json!({ "reason": reason })),
            ),
            AdminCommand::Mute {
                id,
                seconds,
                reason,
            } => (
                "PUT",
                format!("/v1/players/{id}/mute"),
                Some(json!({ "seconds": seconds, "reason": reason })),
            ),
            AdminCommand::Unmute { id } => ("DELETE", format!("/v1/players/{id}/mute"), None),
            AdminCommand::Ban {
                id,
                seconds,
                reason,
            } => (
                "PUT",
                format!("/v1/players/{id}/ban"),
                Some(json!({ "seconds": seconds, "reason": reason })),
            ),
            AdminCommand::Unban { id } => ("DELETE", format!("/v1/players/{id}/ban"), None),
            AdminCommand::Revoke { id } => {
                ("POST", format!("/v1/players/{id}/revoke-tokens"), None)
            }
            AdminCommand::Groups {
                id,
                guild,
                team,
                scene,
            } => {
                let mut body = serde_json::Map::new();
                for (name, value) in [("guild", guild), ("team", team), ("scene", scene)] {
                    if let Some(v) = value {
                        body.insert(name.into(), json!(v));
                    }
                }
                (
                    "PUT",
                    format!("/v1/players/{id}/groups"),
                    Some(Value::Object(body)),
                )
            }
            AdminCommand::Announce {
                text,
                guild,
                team,
                scene,
                player,
                idempotency_key,
            } => {
                let mut body = serde_json::Map::new();
                body.insert("text".into(), json!(text));
                for (name, value) in [
                    ("guild", guild),
                    ("team", team),
                    ("scene", scene),
                    ("player", player),
                ] {
                    if let Some(v) = value {
                        body.insert(name.into(), json!(v));
                    }
                }
                if let Some(k) = idempotency_key {
                    body.insert("idempotency_key".into(), json!(k));
                }
                ("POST", "/v1/announce".to_owned(), Some(Value::Object(body)))
            }
            AdminCommand::Audit { limit } => (
                "GET",
                match limit {
                    Some(n) => format!("/v1/audit?limit={n}"),
                    None => "/v1/audit".to_owned(),
                },
                None,
            ),
        };
        Call { method, path, body }
    }
}

/// Runs one admin command. Exit codes: 0 done, 1 refused by the server or
/// unreachable, 2 a usage error.
pub fn run(args: AdminArgs) -> ExitCode {
    let base = args.url.trim_end_matches('/');
    if !base.starts_with("http://") {
        eprintln!("error: --url must be an http:// URL (the admin API speaks plain HTTP)");
        return ExitCode::from(2);
    }
    let call = args.command.call();
    let url = format!("{base}{}", call.path);
    let (status, body) = match send(&url, &args.key, &call) {
        Ok(reply) => reply,
        Err(e) => {
            eprintln!("error: {} {url}: {e}", call.method);
            return ExitCode::from(1);
        }
    };
    if !(200..300).contains(&status) {
        eprintln!("error: {}", refusal(status, &body));
        return ExitCode::from(1);
    }
    if args.json {
        if !body.is_empty() {
            println!("{}", body.trim_end());
        }
        return ExitCode::SUCCESS;
    }
    let value: Value = if body.trim().is_empty() {
        Value::Null
    } else {
        match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: the reply is not JSON ({e}): {body}");
                return ExitCode::from(1);
            }
        }
    };
    print!("{}", render(&args.command, &value, now_ms()));
    ExitCode::SUCCESS
}

/// Sends the request; any HTTP status is a reply, only a transport failure
/// is an error.
fn send(url: &str, key: &str, call: &Call) -> Result<(u16, String), ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(REQUEST_TIMEOUT))
        .build()
        .into();
    let auth = format!("Bearer {key}");
    let mut reply = match (call.method, &call.body) {
        ("GET", _) => agent.get(url).header("authorization", &auth).call()?,
        ("DELETE", _) => agent.delete(url).header("authorization", &auth).call()?,
        (method, body) => {
            let builder = match method {
                "PUT" => agent.put(url),
                _ => agent.post(url),
            }
            .header("authorization", &auth);
            match body {
                Some(body) => builder.send_json(body)?,
                None => builder.send_empty()?,
            }
        }
    };
    let status = reply.status().as_u16();
    let body = reply.body_mut().read_to_string()?;
    Ok((status, body))
}

/// `code: message` from the API's error shape, or the status and body when
/// the reply is something else (a proxy's page, say).
fn refusal(status: u16, body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let code = error.and_then(|e| e.get("code")).and_then(Value::as_str);
    let message = error.and_then(|e| e.get("message")).and_then(Value::as_str);
    match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => format!("HTTP {status}: {}", body.trim()),
    }
}

/// The human-readable form of a reply.
fn render(command: &AdminCommand, v: &Value, now_ms: u64) -> String {
    let field = |name: &str| text(v.get(name));
    let until = |name: &str| until(v.get(name).and_then(Value::as_u64).unwrap_or(0), now_ms);
    match command {
        AdminCommand::Stats => {
            let mut rows: Vec<(String, String)> =
                ["online", "max_online", "connections", "lingering"]
                    .iter()
                    .map(|k| ((*k).to_owned(), field(k)))
                    .collect();
            if let Some(counters) = v.get("counters").and_then(Value::as_object) {
                rows.extend(counters.iter().map(|(k, c)| (k.clone(), text(Some(c)))));
            }
            table(&rows)
        }
        AdminCommand::Who { .. } | AdminCommand::Groups { .. } => {
            let mut rows: Vec<(String, String)> =
                ["id", "name", "state", "guild", "team", "scene", "mask"]
                    .iter()
                    .map(|k| ((*k).to_owned(), field(k)))
                    .collect();
            rows.push(("muted until".into(), until("muted_until_ms")));
            rows.push(("banned until".into(), until("banned_until_ms")));
            table(&rows)
        }
        AdminCommand::Kick { id, .. } => format!("kicked player {id}\n"),
        AdminCommand::Unmute { id } => format!("unmuted player {id}\n"),
        AdminCommand::Unban { id } => format!("unbanned player {id}\n"),
        AdminCommand::Mute { .. } | AdminCommand::Ban { .. } => table(&[
            ("id".into(), field("id")),
            ("until".into(), until("until_ms")),
            ("reason".into(), field("reason")),
        ]),
        AdminCommand::Revoke { .. } => table(&[
            ("id".into(), field("id")),
            (
                "before".into(),
                utc(v.get("before_s").and_then(Value::as_u64).unwrap_or(0) * 1000),
            ),
        ]),
        AdminCommand::Announce { .. } => table(&[("msg_id".into(), field("msg_id"))]),
        AdminCommand::Drain => format!("draining {} players\n", field("players")),
        AdminCommand::Audit { .. } => {
            let entries = v.get("entries").and_then(Value::as_array);
            let mut rows = vec![["time", "key", "action", "target", "reason", "result"]
                .map(str::to_owned)
                .to_vec()];
            for e in entries.into_iter().flatten() {
                let time = utc(e.get("time_ms").and_then(Value::as_u64).unwrap_or(0));
                let mut row = vec![time];
                row.extend(
                    ["key_id", "action", "target", "reason", "result"].map(|k| text(e.get(k))),
                );
                rows.push(row);
            }
            columns(&rows)
        }
    }
}

/// A JSON scalar as plain text (strings without quotes).
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// `key  value` lines, values aligned.
fn table(rows: &[(String, String)]) -> String {
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{k:width$}  {v}");
    }
    out
}

/// Rows of cells, each column as wide as its widest cell; the last column
/// is not padded.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A sanction's end: `-` when there is none, else the UTC time and how
/// long is left.
fn until(until_ms: u64, now_ms: u64) -> String {
    if until_ms == 0 || until_ms <= now_ms {
        return "-".into();
    }
    format!(
        "{} (in {})",
        utc(until_ms),
        span((until_ms - now_ms) / 1000)
    )
}

/// `1d 2h`, `5m 3s`, `42s`: the two largest units.
fn span(secs: u64) -> String {
    let units = [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)];
    let parts: Vec<String> = units
        .iter()
        .scan(secs, |left, &(name, size)| {
            let n = *left / size;
            *left %= size;
            Some((n, name))
        })
        .skip_while(|&(n, _)| n == 0)
        .take(2)
        .filter(|&(n, _)| n > 0)
        .map(|(n, name)| format!("{n}{name}"))
        .collect();
    if parts.is_empty() {
        "0s".into()
    } else {
        parts.join(" ")
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_735_689_599_000), "2024-12-31 23:59:59 UTC");
        assert_eq!(utc(4_107_542_400_000), "2100-03-01 00:00:00 UTC");
    }

    #[test]
    fn spans() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(42), "42s");
        assert_eq!(span(600), "10m");
        assert_eq!(span(3 * 3600 + 5), "3h");
        assert_eq!(span(86_400 + 7200 + 60), "1d 2h");
        assert_eq!(span(61), "1m 1s");
    }

    #[test]
    fn tables_align_their_values() {
        let rows = [
            ("id".to_owned(), "42".to_owned()),
            ("state".to_owned(), "offline".to_owned()),
        ];
        assert_eq!(table(&rows), "id     42\nstate  offline\n");
        let rows = vec![
            vec!["a".to_owned(), "bbb".to_owned(), "c".to_owned()],
            vec!["aaa".to_owned(), "b".to_owned(), String::new()],
        ];
        assert_eq!(columns(&rows), "a    bbb  c\naaa  b\n");
    }

    #[test]
    fn refusals_show_the_code_and_message() {
        let body = r#"{"error":{"code":"not_found","message":"player 42 was never seen"}}"#;
        assert_eq!(refusal(404, body), "not_found: player 42 was never seen");
        assert_eq!(refusal(502, "Bad Gateway"), "HTTP 502: Bad Gateway");
    }

    #[test]
    fn sanctions_show_the_end_and_what_is_left() {
        let now = 1_735_689_000_000;
        assert_eq!(until(0, now), "-");
        assert_eq!(until(now - 1, now), "-");
        assert_eq!(
            until(now + 600_000, now),
            "2025-01-01 00:00:00 UTC (in 10m)"
        );
    }
}
