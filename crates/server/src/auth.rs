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
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use guildchat_auth::{KeyRing, TokenError, Verifier};
use guildchat_protocol::{limits::MAX_NAME_CHARS, pb, ResCode};
use tracing::warn;

use crate::config::Config;
use crate::ids::{GuildId, SceneId, TeamId, UserId};
use crate::moderation::Moderation;
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
    /// The verifier in force; a reload swaps it whole, and a login being
    /// checked keeps the one it started with. `None` with
    /// `insecure_dev_auth`.
    verifier: Option<RwLock<Arc<Verifier>>>,
    /// Revocations refuse old tokens of a player; bans refuse the player.
    moderation: Arc<Moderation>,
}

/// Why a login was refused, with what the reply says beyond the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Code(ResCode),
    /// RES_BANNED, with the time left.
    Banned(Duration),
}

impl From<ResCode> for Refusal {
    fn from(code: ResCode) -> Self {
        Refusal::Code(code)
    }
}

impl Refusal {
    pub fn code(self) -> ResCode {
        match self {
            Refusal::Code(c) => c,
            Refusal::Banned(_) => ResCode::ResBanned,
        }
    }
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
    if let Some(mode) = loose_mode(&path) {
        warn!(
            path = %shown,
            mode = format!("{mode:o}"),
            "key ring is readable by group or others: it may hold shared secrets; chmod 600 it"
        );
    }
    Ok((read_ring(&path)?, false))
}

/// Reads and parses a key ring file.
pub fn read_ring(path: &Path) -> Result<KeyRing, KeysError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
        path: shown.clone(),
        source,
    })?;
    KeyRing::from_toml_str(&text).map_err(|source| KeysError::Invalid {
        path: shown,
        source,
    })
}

fn verifier_for(config: &Config, ring: &KeyRing) -> Result<Verifier, KeysError> {
    Verifier::new(ring, &config.auth.audience, config.auth.leeway_secs).map_err(|source| {
        KeysError::Invalid {
            path: config.keys_file().display().to_string(),
            source,
        }
    })
}

/// The permission bits of a file that group or others may access, if so
/// (unix only; elsewhere nothing is checked).
fn loose_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Writes a secret file readable by its owner only. A parent directory it
/// has to create is made accessible to its owner only (0700), so the
/// secret's name and its neighbours are private too.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(dir)?;
        }
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
    pub fn from_config(
        config: &Config,
        moderation: Arc<Moderation>,
    ) -> Result<Authenticator, KeysError> {
        if config.auth.insecure_dev_auth {
            warn!("INSECURE: --insecure-dev-auth accepts ANY token and trusts the login request; never use it with real players");
            return Ok(Authenticator {
                verifier: None,
                moderation,
            });
        }
        let (ring, generated) = load_or_create_keys(config)?;
        if generated {
            warn!(path = %config.keys_file().display(), "generated DEVELOPMENT keys (one AES key, one Ed25519 key pair): tokens from a real logic server will fail; set auth.keys_file in production");
        }
        let verifier = verifier_for(config, &ring)?;
        Ok(Authenticator {
            verifier: Some(RwLock::new(Arc::new(verifier))),
            moderation,
        })
    }

    /// Reads the key ring file again and builds its verifier, without
    /// putting it in force (see [`Authenticator::install`]). Never
    /// generates keys. `None` with `insecure_dev_auth`.
    pub fn prepare_reload(&self, config: &Config) -> Result<Option<Verifier>, KeysError> {
        if self.verifier.is_none() {
            return Ok(None);
        }
        let ring = read_ring(&config.keys_file())?;
        verifier_for(config, &ring).map(Some)
    }

    /// Puts a verifier from [`Authenticator::prepare_reload`] in force for
    /// every login from now on.
    pub fn install(&self, verifier: Verifier) {
        if let Some(slot) = &self.verifier {
            *slot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(verifier);
        }
    }

    /// Time left on the player's ban, if banned now.
    pub fn ban_left(&self, user: UserId) -> Option<Duration> {
        self.moderation.ban_left(user)
    }

    fn current(&self) -> Option<Arc<Verifier>> {
        self.verifier
            .as_ref()
            .map(|v| v.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Checks a login request: the token, then the player's revocations
    /// and ban.
    pub fn check(&self, req: &pb::ChatMessageLoginReq) -> Result<Identity, Refusal> {
        let identity = match self.current() {
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
                if self
                    .moderation
                    .is_revoked(UserId(claims.user_id), claims.iat)
                {
                    return Err(ResCode::ResTokenRevoked.into());
                }
                let mismatch = (req.userid != 0 && req.userid != claims.user_id)
                    || (!req.username.is_empty() && req.username != claims.name)
                    || (req.guildid != 0 && req.guildid != claims.guild);
                if mismatch {
                    return Err(ResCode::ResTokenMismatch.into());
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
            return Err(ResCode::ResBadRequest.into());
        }
        if identity.name.chars().count() > MAX_NAME_CHARS {
            return Err(ResCode::ResNameTooLong.into());
        }
        if let Some(left) = self.moderation.ban_left(identity.user) {
            return Err(Refusal::Banned(left));
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("the file exists")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn write_private_makes_owner_only_file_and_new_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a/b/keys.toml");
        write_private(&path, "x").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&tmp.path().join("a/b")), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        assert_eq!(loose_mode(&path), None);
        // An existing directory keeps its mode.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        write_private(&tmp.path().join("other.toml"), "y").unwrap();
        assert_eq!(mode(tmp.path()), 0o755);
    }

    #[test]
    fn group_or_world_access_is_noticed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("keys.toml");
        std::fs::write(&path, "x").unwrap();
        for (bits, loose) in [
            (0o600, None),
            (0o640, Some(0o640)),
            (0o604, Some(0o604)),
            (0o400, None),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bits)).unwrap();
            assert_eq!(loose_mode(&path), loose, "{bits:o}");
        }
    }
}
