//! Login: turning a `ChatMessageLoginReq` into a verified [`Identity`].
//!
//! The token is the truth. A non-empty request field that disagrees with it
//! is a mismatch; empty fields are filled from it. `tokenmd5` is ignored:
//! the token's AEAD tag or signature already protects its integrity.
//!
//! This module owns the key ring in force and the development-key bootstrap.
//! It never talks to the world or a socket; it is called from a
//! connection's reader, so verification cost is spread over connections
//! instead of serialised in an actor.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use guildchat_auth::{KeyRing, TokenError, Verifier};
use guildchat_protocol::{limits::MAX_NAME_CHARS, pb, ResCode};
use tracing::{info, warn};

use crate::config::Config;
use crate::ids::{GuildId, SceneId, TeamId, UserId};
use crate::world::Identity;

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read key ring {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write development keys to {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("key ring {path}: {source}")]
    Invalid {
        path: String,
        source: guildchat_auth::KeyError,
    },
}

/// Verifies login requests.
pub struct Authenticator {
    verifier: Option<Verifier>,
}

/// Reads the key ring, generating development keys when the default file
/// does not exist yet. Returns the ring and whether it was just generated.
pub fn load_or_create_keys(config: &Config) -> Result<(KeyRing, bool), KeysError> {
    let path = config.keys_file();
    let shown = path.display().to_string();
    let generate = config.auth.keys_file.is_none() && !path.exists();
    if generate {
        let ring = KeyRing::dev().map_err(|source| KeysError::Invalid {
            path: shown.clone(),
            source,
        })?;
        write_private(&path, &ring.to_toml_string()).map_err(|source| KeysError::Write {
            path: shown.clone(),
            source,
        })?;
        return Ok((ring, true));
    }
    let text = std::fs::read_to_string(&path).map_err(|source| KeysError::Read {
        path: shown.clone(),
        source,
    })?;
    let ring = KeyRing::from_toml_str(&text).map_err(|source| KeysError::Invalid {
        path: shown,
        source,
    })?;
    Ok((ring, false))
}

/// Writes a secret file readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    options.open(path)?.write_all(text.as_bytes())
}

impl Authenticator {
    /// Builds the verifier from the configured keys. With
    /// `insecure_dev_auth` no key is needed and every token is accepted.
    pub fn from_config(config: &Config) -> Result<Authenticator, KeysError> {
        if config.auth.insecure_dev_auth {
            warn!("INSECURE: --insecure-dev-auth accepts ANY token and trusts the login request; never use it with real players");
            return Ok(Authenticator { verifier: None });
        }
        let (ring, generated) = load_or_create_keys(config)?;
        if generated {
            info!(path = %config.keys_file().display(), "generated development keys (one AES key, one Ed25519 key pair)");
        }
        let verifier = Verifier::new(&ring, &config.auth.audience, config.auth.leeway_secs)
            .map_err(|source| KeysError::Invalid {
                path: config.keys_file().display().to_string(),
                source,
            })?;
        Ok(Authenticator {
            verifier: Some(verifier),
        })
    }

    /// Checks a login request.
    pub fn check(&self, req: &pb::ChatMessageLoginReq) -> Result<Identity, ResCode> {
        let identity = match &self.verifier {
            None => Identity {
                user: UserId(req.userid),
                name: req.username.clone(),
                guild: GuildId(req.guildid),
                team: TeamId(0),
                scene: SceneId(0),
            },
            Some(verifier) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let claims = verifier.verify(&req.tokenstr, now).map_err(token_code)?;
                let mismatch = (req.userid != 0 && req.userid != claims.user_id)
                    || (!req.username.is_empty() && req.username != claims.name)
                    || (req.guildid != 0 && req.guildid != claims.guild);
                if mismatch {
                    return Err(ResCode::ResTokenMismatch);
                }
                Identity {
                    user: UserId(claims.user_id),
                    name: claims.name,
                    guild: GuildId(claims.guild),
                    team: TeamId(claims.team),
                    scene: SceneId(claims.scene),
                }
            }
        };
        if identity.user.0 == 0 || identity.name.is_empty() {
            return Err(ResCode::ResBadRequest);
        }
        if identity.name.chars().count() > MAX_NAME_CHARS {
            return Err(ResCode::ResNameTooLong);
        }
        Ok(identity)
    }
}

fn token_code(e: TokenError) -> ResCode {
    match e {
        TokenError::Expired | TokenError::NotYetValid => ResCode::ResTokenExpired,
        _ => ResCode::ResBadToken,
    }
}
