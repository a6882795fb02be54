//! The claims set a login token carries.
//!
//! The JSON shape is what other languages mint, so it follows JWT names
//! (`sub`, `exp`, `aud`, ...) and JWT conventions (`sub` is a string, `aud`
//! is a string or an array). [`Claims`] is the parsed, checked form: a
//! `Claims` value always has a non-zero `user_id`.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Who the token is for and where they are in the game.
///
/// JSON names: `sub` (the user id as a decimal string), `name`, `exp`,
/// `guild`, `team`, `scene` (numbers, 0 when absent), `iat`, `nbf` (seconds
/// since the Unix epoch, integers) and `aud` (a string or an array of
/// strings; serialized as a string when it has one element and left out when
/// empty). Unknown claims (`iss`, `jti`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub user_id: u64,
    pub name: String,
    pub exp: i64,
    pub guild: u64,
    pub team: u64,
    pub scene: u64,
    pub iat: Option<i64>,
    pub nbf: Option<i64>,
    pub aud: Vec<String>,
}

/// The JSON form, before `sub` is checked.
#[derive(Serialize, Deserialize)]
pub(crate) struct WireClaims {
    sub: String,
    name: String,
    exp: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    guild: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    team: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    scene: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Audience::is_empty")]
    aud: Audience,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `aud` per RFC 7519 §4.1.3: one string or an array of strings.
#[derive(Default)]
struct Audience(Vec<String>);

impl Audience {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum AudienceForm {
    One(String),
    Many(Vec<String>),
}

impl Serialize for Audience {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Audience {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Audience(match AudienceForm::deserialize(d)? {
            AudienceForm::One(one) => vec![one],
            AudienceForm::Many(many) => many,
        }))
    }
}

/// Parses `sub` as a user id. Only the canonical decimal form is accepted
/// (no sign, no leading zeros, no spaces) so that one user has exactly one
/// spelling, and 0 is refused because the server uses it as "nobody".
fn parse_user_id(sub: &str) -> Result<u64, &'static str> {
    if sub.is_empty() || !sub.bytes().all(|b| b.is_ascii_digit()) {
        return Err("sub is not a decimal user id");
    }
    if sub.len() > 1 && sub.starts_with('0') {
        return Err("sub has leading zeros");
    }
    let id: u64 = sub.parse().map_err(|_| "sub does not fit in 64 bits")?;
    if id == 0 {
        return Err("sub is zero");
    }
    Ok(id)
}

impl WireClaims {
    pub(crate) fn into_claims(self) -> Result<Claims, &'static str> {
        Ok(Claims {
            user_id: parse_user_id(&self.sub)?,
            name: self.name,
            exp: self.exp,
            guild: self.guild,
            team: self.team,
            scene: self.scene,
            iat: self.iat,
            nbf: self.nbf,
            aud: self.aud.0,
        })
    }
}

impl From<&Claims> for WireClaims {
    fn from(c: &Claims) -> Self {
        WireClaims {
            sub: c.user_id.to_string(),
            name: c.name.clone(),
            exp: c.exp,
            guild: c.guild,
            team: c.team,
            scene: c.scene,
            iat: c.iat,
            nbf: c.nbf,
            aud: Audience(c.aud.clone()),
        }
    }
}

impl Serialize for Claims {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WireClaims::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Claims {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WireClaims::deserialize(d)?
            .into_claims()
            .map_err(D::Error::custom)
    }
}
