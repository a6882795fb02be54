//! The `guildchat` binary: a thin command line over the server library and
//! the client crate (`serve` in [`serve`], the admin API's client in
//! [`admin`]). Parses arguments, sets up logging and signals, and
//! hands off; no chat logic lives here.

#![forbid(unsafe_code)]

mod admin;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use guildchat_auth::{Claims, KeyAlg, KeyRing, Signer, TokenFormat};
use guildchat_server::auth;

#[derive(Parser)]
#[command(
    name = "guildchat",
    version,
    about = "Real-time chat server for online games"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the chat server.
    Serve(serve::ServeArgs),
    /// Make a key ring for production: the private ring for the game's
    /// logic server and the public ring for the chat server.
    Keygen(KeygenArgs),
    /// Mint a login token from the keys in a data dir (development).
    Token(TokenArgs),
    /// Interactive terminal client.
    Chat(ChatArgs),
    /// Load generator: real clients against a guildchat (and a reference
    /// relay), on loopback only.
    Bench(Box<guildchat_bench::BenchArgs>),
    /// Game master's client for a running server's admin API.
    Admin(admin::AdminArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum AlgArg {
    /// JWE dir + A256GCM (shared secret; claims hidden from the client)
    Aes,
    /// JWS EdDSA (Ed25519)
    Ed25519,
    /// JWS ES256 (P-256)
    Es256,
}

#[derive(clap::Args)]
struct KeygenArgs {
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "ed25519")]
    alg: AlgArg,
    /// Key id (put in the token header; lets keys rotate).
    #[arg(long)]
    kid: String,
    /// Write the full ring (with secrets) here, for the logic server.
    #[arg(long)]
    private_out: PathBuf,
    /// Write the ring the chat server needs here (public keys only for
    /// EdDSA/ES256; AES keys are shared secrets and stay).
    #[arg(long)]
    public_out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Jws,
    Jwe,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// Data directory holding keys.toml.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    #[arg(long)]
    user: u64,
    #[arg(long)]
    name: String,
    #[arg(long, default_value_t = 0)]
    guild: u64,
    #[arg(long, default_value_t = 0)]
    team: u64,
    #[arg(long, default_value_t = 0)]
    scene: u64,
    /// Lifetime, like 1s, 10m or 2h.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: Duration,
    #[arg(long, value_enum, default_value = "jws")]
    format: FormatArg,
    /// Audience claim.
    #[arg(long, default_value = "guildchat")]
    audience: String,
}

#[derive(clap::Args)]
struct ChatArgs {
    #[arg(long, default_value = "ws://127.0.0.1:7000")]
    url: String,
    /// Login token. Without it, --data-dir and --user mint one.
    #[arg(long)]
    token: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    user: Option<u64>,
    /// Name for a minted token [default: player<user>]
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value_t = 0)]
    guild: u64,
    #[arg(long, default_value_t = 0)]
    team: u64,
    #[arg(long, default_value_t = 0)]
    scene: u64,
}

/// Parses `1s`, `10m`, `2h`, `1d` (a bare number is seconds).
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a number followed by s, m, h or d"))?;
    let per = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use s, m, h or d)")),
    };
    // Checked: the token's `exp` is now + ttl as an i64 of seconds.
    let secs = n
        .checked_mul(per)
        .filter(|&secs| i64::try_from(secs).is_ok())
        .ok_or_else(|| format!("`{s}`: too long"))?;
    if secs == 0 {
        return Err("ttl must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[allow(clippy::too_many_arguments)]
fn mint(
    data_dir: &std::path::Path,
    user: u64,
    name: &str,
    guild: u64,
    team: u64,
    scene: u64,
    ttl: Duration,
    format: TokenFormat,
    audience: &str,
) -> anyhow::Result<String> {
    let path = data_dir.join("keys.toml");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (start the server once to create dev keys)",
            path.display()
        )
    })?;
    let ring = KeyRing::from_toml_str(&text)?;
    let signer = Signer::new(&ring, format, None)?;
    let now = unix_now();
    let claims = Claims {
        user_id: user,
        name: name.to_owned(),
        exp: i64::try_from(ttl.as_secs())
            .ok()
            .and_then(|ttl| now.checked_add(ttl))
            .context("ttl too long")?,
        guild,
        team,
        scene,
        iat: Some(now),
        nbf: None,
        aud: vec![audience.to_owned()],
    };
    Ok(signer.mint(&claims))
}

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let alg = match args.alg {
        AlgArg::Aes => KeyAlg::Dir,
        AlgArg::Ed25519 => KeyAlg::EdDSA,
        AlgArg::Es256 => KeyAlg::Es256,
    };
    let ring = KeyRing {
        keys: vec![KeyRing::generate(alg, &args.kid)?],
    };
    auth::write_private(&args.private_out, &ring.to_toml_string())
        .with_context(|| format!("writing {}", args.private_out.display()))?;
    auth::write_private(&args.public_out, &ring.public_only().to_toml_string())
        .with_context(|| format!("writing {}", args.public_out.display()))?;
    eprintln!(
        "wrote {} (logic server) and {} (chat server: auth.keys_file)",
        args.private_out.display(),
        args.public_out.display()
    );
    Ok(())
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let done = match cli.command {
        Command::Keygen(args) => keygen(args),
        Command::Token(a) => {
            let format = match a.format {
                FormatArg::Jws => TokenFormat::Jws,
                FormatArg::Jwe => TokenFormat::Jwe,
            };
            let token = mint(
                &a.data_dir,
                a.user,
                &a.name,
                a.guild,
                a.team,
                a.scene,
                a.ttl,
                format,
                &a.audience,
            )?;
            println!("{token}");
            Ok(())
        }
        Command::Serve(args) => {
            let _logs = serve::init_logging(args.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve::serve(args))
        }
        Command::Chat(a) => {
            let token = match (a.token, a.data_dir, a.user) {
                (Some(t), _, _) => t,
                (None, Some(dir), Some(user)) => {
                    let name = a.name.unwrap_or_else(|| format!("player{user}"));
                    mint(
                        &dir,
                        user,
                        &name,
                        a.guild,
                        a.team,
                        a.scene,
                        Duration::from_secs(3600),
                        TokenFormat::Jws,
                        "guildchat",
                    )?
                }
                _ => bail!("give --token, or --data-dir and --user to mint one"),
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(guildchat_client::chat::run(&a.url, &token))
        }
        Command::Bench(args) => guildchat_bench::main(*args),
        // Blocking HTTP, outside any runtime; it picks its own exit code.
        Command::Admin(args) => return Ok(admin::run(args)),
    };
    done.map(|()| ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_forms() {
        assert_eq!(parse_ttl("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_ttl("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_ttl("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("5y").is_err());
        assert!(parse_ttl("m").is_err());
        assert_eq!(parse_ttl("1d"), Ok(Duration::from_secs(86_400)));
    }

    #[test]
    fn an_overflowing_ttl_is_an_error() {
        assert!(parse_ttl("18446744073709551615d").is_err());
        assert!(parse_ttl("213503982334601d").is_err());
        assert!(parse_ttl("99999999999999999999").is_err());
        // Fits u64 seconds but not the i64 of a token's `exp`.
        assert!(parse_ttl(&format!("{}", u64::MAX)).is_err());
    }
}
