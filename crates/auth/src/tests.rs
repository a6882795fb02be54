//! Table-driven tests. Tokens are built two ways: with [`Signer`], and by
//! hand straight from the primitive crates, so that a bug shared by `mint`
//! and `verify` cannot hide itself.

use aes_gcm::aead::{AeadInOut, KeyInit, Nonce};
use aes_gcm::Aes256Gcm;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::Signer as _;

use crate::{
    Claims, KeyAlg, KeyEntry, KeyError, KeyRing, Signer, TokenError, TokenFormat, Verifier,
};

const AUD: &str = "guildchat";
const NOW: i64 = 1_750_000_000;
const LEEWAY: u64 = 30;

/// Fixed key material for hand-built tokens.
const ED_SEED: [u8; 32] = [7; 32];
const ES_SCALAR: [u8; 32] = [9; 32];
const AES_KEY: [u8; 32] = [5; 32];

/// (kid, format) of the three keys every test ring has.
const KIDS: [(&str, TokenFormat); 3] = [
    ("aes", TokenFormat::Jwe),
    ("ed", TokenFormat::Jws),
    ("es", TokenFormat::Jws),
];

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(text)
        .expect("test data is base64url")
}

fn claims() -> Claims {
    Claims {
        user_id: 42,
        name: "Aria".into(),
        exp: NOW + 600,
        guild: 7,
        team: 2,
        scene: 11,
        iat: Some(NOW),
        nbf: Some(NOW - 5),
        aud: vec![AUD.into()],
    }
}

fn generated_ring() -> KeyRing {
    KeyRing {
        keys: vec![
            KeyRing::generate(KeyAlg::Dir, "aes").unwrap(),
            KeyRing::generate(KeyAlg::EdDSA, "ed").unwrap(),
            KeyRing::generate(KeyAlg::Es256, "es").unwrap(),
        ],
    }
}

fn ed_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&ED_SEED)
}

fn es_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&ES_SCALAR).unwrap()
}

/// A ring over the fixed keys, with public keys computed here rather than by
/// the crate.
fn fixed_ring() -> KeyRing {
    KeyRing {
        keys: vec![
            KeyEntry {
                kid: "aes".into(),
                alg: KeyAlg::Dir,
                secret: Some(b64(&AES_KEY)),
                public: None,
            },
            KeyEntry {
                kid: "ed".into(),
                alg: KeyAlg::EdDSA,
                secret: Some(b64(&ED_SEED)),
                public: Some(b64(ed_key().verifying_key().as_bytes())),
            },
            KeyEntry {
                kid: "es".into(),
                alg: KeyAlg::Es256,
                secret: Some(b64(&ES_SCALAR)),
                public: Some(b64(es_key()
                    .verifying_key()
                    .to_sec1_point(false)
                    .as_bytes())),
            },
        ],
    }
}

fn verifier(ring: &KeyRing) -> Verifier {
    Verifier::new(ring, AUD, LEEWAY).unwrap()
}

fn mint(ring: &KeyRing, kid: &str, claims: &Claims) -> String {
    let format = KIDS.iter().find(|(k, _)| *k == kid).unwrap().1;
    Signer::new(ring, format, Some(kid)).unwrap().mint(claims)
}

/// A hand-built JWS: `header` and `payload` are the exact JSON texts.
fn jws_with(header: &str, payload: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

fn ed_sign(input: &[u8]) -> Vec<u8> {
    ed_key().sign(input).to_bytes().to_vec()
}

fn es_sign(input: &[u8]) -> Vec<u8> {
    let sig: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(&es_key(), input);
    sig.to_bytes().to_vec()
}

/// A hand-built `dir` + `A256GCM` JWE, with `aad_header` used as the AAD
/// (normally the same text as `header`).
fn jwe_with(header: &str, aad_header: &str, payload: &str, iv: [u8; 12]) -> String {
    let cipher = Aes256Gcm::new_from_slice(&AES_KEY).unwrap();
    let mut data = payload.as_bytes().to_vec();
    let tag = cipher
        .encrypt_inout_detached(
            &Nonce::<Aes256Gcm>::from(iv),
            b64(aad_header.as_bytes()).as_bytes(),
            data.as_mut_slice().into(),
        )
        .unwrap();
    format!(
        "{}..{}.{}.{}",
        b64(header.as_bytes()),
        b64(&iv),
        b64(&data),
        b64(&tag)
    )
}

fn jwe(header: &str, payload: &str) -> String {
    jwe_with(header, header, payload, [3; 12])
}

const ED_HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT","kid":"ed"}"#;
const ES_HEADER: &str = r#"{"alg":"ES256","typ":"JWT","kid":"es"}"#;
const DIR_HEADER: &str = r#"{"alg":"dir","enc":"A256GCM","kid":"aes"}"#;

/// A claims JSON text that verifies at `NOW`.
const GOOD_PAYLOAD: &str =
    r#"{"sub":"1001","name":"Bram","exp":1750000600,"guild":3,"aud":"guildchat"}"#;

fn good_payload_claims() -> Claims {
    Claims {
        user_id: 1001,
        name: "Bram".into(),
        exp: 1_750_000_600,
        guild: 3,
        team: 0,
        scene: 0,
        iat: None,
        nbf: None,
        aud: vec![AUD.into()],
    }
}

/// Replaces part `index` of a compact token with `f(decoded part)`.
fn edit_part(token: &str, index: usize, f: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut bytes = unb64(&parts[index]);
    f(&mut bytes);
    parts[index] = b64(&bytes);
    parts.join(".")
}

#[test]
fn mint_then_verify_round_trips_for_each_alg() {
    let minimal = Claims {
        user_id: u64::MAX,
        name: "Ünïcode \"quoted\" \u{1F600}".into(),
        exp: NOW,
        guild: 0,
        team: 0,
        scene: 0,
        iat: None,
        nbf: None,
        aud: vec!["other".into(), AUD.into()],
    };
    for ring in [generated_ring(), fixed_ring()] {
        let v = verifier(&ring);
        for (kid, format) in KIDS {
            for c in [claims(), minimal.clone()] {
                let token = mint(&ring, kid, &c);
                let want_parts = if format == TokenFormat::Jwe { 5 } else { 3 };
                assert_eq!(token.split('.').count(), want_parts, "{kid}: {token}");
                assert_eq!(v.verify(&token, NOW), Ok(c), "{kid}");
            }
        }
    }
}

#[test]
fn minted_headers_are_standard_jose() {
    let ring = fixed_ring();
    let cases = [
        (
            "aes",
            r#"{"alg":"dir","enc":"A256GCM","typ":"JWT","kid":"aes"}"#,
        ),
        ("ed", r#"{"alg":"EdDSA","typ":"JWT","kid":"ed"}"#),
        ("es", r#"{"alg":"ES256","typ":"JWT","kid":"es"}"#),
    ];
    for (kid, header) in cases {
        let token = mint(&ring, kid, &claims());
        let first = token.split('.').next().unwrap();
        assert_eq!(String::from_utf8(unb64(first)).unwrap(), header);
    }
}

#[test]
fn jwe_ivs_are_fresh_per_token() {
    let ring = fixed_ring();
    let a = mint(&ring, "aes", &claims());
    let b = mint(&ring, "aes", &claims());
    let iv = |t: &str| t.split('.').nth(2).unwrap().to_owned();
    assert_eq!(unb64(&iv(&a)).len(), 12);
    assert_ne!(iv(&a), iv(&b));
    assert_ne!(a, b);
}

#[test]
fn signer_selection() {
    let g = generated_ring();
    let reordered = KeyRing {
        keys: vec![g.keys[2].clone(), g.keys[0].clone(), g.keys[1].clone()],
    };
    let only_dir = KeyRing {
        keys: vec![g.keys[0].clone()],
    };
    type Case<'a> = (
        &'a KeyRing,
        TokenFormat,
        Option<&'a str>,
        Result<&'a str, &'a str>,
    );
    let cases: [Case; 7] = [
        (&reordered, TokenFormat::Jws, None, Ok("es")),
        (&reordered, TokenFormat::Jwe, None, Ok("aes")),
        (&reordered, TokenFormat::Jws, Some("ed"), Ok("ed")),
        (
            &reordered,
            TokenFormat::Jwe,
            Some("ed"),
            Err("cannot make JWE"),
        ),
        (
            &reordered,
            TokenFormat::Jws,
            Some("aes"),
            Err("cannot make JWS"),
        ),
        (
            &reordered,
            TokenFormat::Jws,
            Some("nope"),
            Err("no key with kid \"nope\""),
        ),
        (
            &only_dir,
            TokenFormat::Jws,
            None,
            Err("no key with a secret that can mint JWS"),
        ),
    ];
    for (ring, format, kid, want) in cases {
        match (Signer::new(ring, format, kid), want) {
            (Ok(s), Ok(kid)) => assert_eq!(s.kid(), kid),
            (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{e}"),
            (got, want) => panic!("{format:?} {kid:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn tampering_is_bad_signature() {
    let ring = generated_ring();
    let v = verifier(&ring);
    // (kid, parts whose bytes are flipped): the JWE's IV, ciphertext and
    // tag; the JWS's payload and signature.
    let cases: [(&str, &[usize]); 3] = [("aes", &[2, 3, 4]), ("ed", &[1, 2]), ("es", &[1, 2])];
    for (kid, parts) in cases {
        let token = mint(&ring, kid, &claims());
        for &part in parts {
            let len = unb64(token.split('.').nth(part).unwrap()).len();
            for pos in [0, len / 2, len - 1] {
                let forged = edit_part(&token, part, |b| b[pos] ^= 0x01);
                assert_eq!(
                    v.verify(&forged, NOW),
                    Err(TokenError::BadSignature),
                    "{kid} part {part} byte {pos}"
                );
            }
        }
        // The header is authenticated too (JWS signing input, JWE AAD):
        // a header re-encoded with an extra member no longer verifies.
        let forged = edit_part(&token, 0, |h| {
            h.pop();
            h.extend_from_slice(br#","x":1}"#);
        });
        assert_eq!(
            v.verify(&forged, NOW),
            Err(TokenError::BadSignature),
            "{kid} header"
        );
    }
}

#[test]
fn jwe_aad_is_the_encoded_header() {
    let v = verifier(&fixed_ring());
    let good = jwe(DIR_HEADER, GOOD_PAYLOAD);
    assert_eq!(v.verify(&good, NOW), Ok(good_payload_claims()));
    let wrong_aad = jwe_with(
        DIR_HEADER,
        r#"{"alg":"dir","enc":"A256GCM","kid":"other"}"#,
        GOOD_PAYLOAD,
        [3; 12],
    );
    assert_eq!(v.verify(&wrong_aad, NOW), Err(TokenError::BadSignature));
}

#[test]
fn a_different_key_with_the_same_kid_is_bad_signature() {
    let ring = generated_ring();
    let impostor = generated_ring();
    let v = verifier(&ring);
    for (kid, _) in KIDS {
        let token = mint(&impostor, kid, &claims());
        assert_eq!(
            v.verify(&token, NOW),
            Err(TokenError::BadSignature),
            "{kid}"
        );
    }
}

#[test]
fn unknown_kid_is_unknown_key() {
    let ring = generated_ring();
    let v = verifier(&ring);
    let mut other = generated_ring();
    for e in &mut other.keys {
        e.kid.push_str("-other");
    }
    for (kid, format) in KIDS {
        let token = Signer::new(&other, format, Some(&format!("{kid}-other")))
            .unwrap()
            .mint(&claims());
        assert_eq!(v.verify(&token, NOW), Err(TokenError::UnknownKey), "{kid}");
    }
}

#[test]
fn kidless_tokens_need_exactly_one_key_of_their_alg() {
    let single = fixed_ring();
    let mut double = fixed_ring();
    let mut second_ed = KeyRing::generate(KeyAlg::EdDSA, "ed2").unwrap();
    second_ed.secret = None;
    double.keys.push(second_ed);
    let ed_token = jws_with(r#"{"alg":"EdDSA"}"#, GOOD_PAYLOAD, ed_sign);
    let es_token = jws_with(r#"{"alg":"ES256","typ":"JWT"}"#, GOOD_PAYLOAD, es_sign);
    let dir_token = jwe(r#"{"alg":"dir","enc":"A256GCM"}"#, GOOD_PAYLOAD);
    let ok = Ok(good_payload_claims());
    let cases = [
        (&single, &ed_token, ok.clone()),
        (&single, &es_token, ok.clone()),
        (&single, &dir_token, ok.clone()),
        (&double, &ed_token, Err(TokenError::UnknownKey)),
        (&double, &es_token, ok),
    ];
    for (i, (ring, token, want)) in cases.into_iter().enumerate() {
        assert_eq!(verifier(ring).verify(token, NOW), want, "case {i}");
    }
    let only_ed = KeyRing {
        keys: vec![fixed_ring().keys[1].clone()],
    };
    assert_eq!(
        verifier(&only_ed).verify(&es_token, NOW),
        Err(TokenError::UnknownKey)
    );
}

#[test]
fn a_header_alg_other_than_the_keys_is_refused() {
    let ring = fixed_ring();
    let v = verifier(&ring);
    let ed_token = mint(&ring, "ed", &claims());
    let es_token = mint(&ring, "es", &claims());
    let relabel = |token: &str, header: &str| {
        let rest = token.split_once('.').unwrap().1;
        format!("{}.{rest}", b64(header.as_bytes()))
    };
    let jwe_shape = |header: &str| {
        format!(
            "{}..{}.{}.{}",
            b64(header.as_bytes()),
            b64(&[0; 12]),
            b64(b"{}"),
            b64(&[0; 16])
        )
    };
    let cases = [
        // An EdDSA key's token relabelled ES256, and the reverse.
        relabel(&ed_token, r#"{"alg":"ES256","kid":"ed"}"#),
        relabel(&es_token, r#"{"alg":"EdDSA","kid":"es"}"#),
        // Unsigned tokens, with and without a kid.
        format!(
            "{}.{}.",
            b64(br#"{"alg":"none","kid":"ed"}"#),
            b64(GOOD_PAYLOAD.as_bytes())
        ),
        format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(GOOD_PAYLOAD.as_bytes())
        ),
        format!(
            "{}.{}.",
            b64(br#"{"alg":"None","kid":"ed"}"#),
            b64(GOOD_PAYLOAD.as_bytes())
        ),
        // HMAC, e.g. keyed with a public key or the AES secret.
        jws_with(r#"{"alg":"HS256","kid":"aes"}"#, GOOD_PAYLOAD, |_| {
            vec![1; 32]
        }),
        jws_with(r#"{"alg":"HS256","kid":"ed"}"#, GOOD_PAYLOAD, |_| {
            vec![1; 32]
        }),
        jws_with(r#"{"alg":"HS256"}"#, GOOD_PAYLOAD, |_| vec![1; 32]),
        // Other algorithms and case variants.
        jws_with(r#"{"alg":"RS256","kid":"es"}"#, GOOD_PAYLOAD, es_sign),
        jws_with(r#"{"alg":"eddsa","kid":"ed"}"#, GOOD_PAYLOAD, ed_sign),
        jws_with(r#"{"alg":"Ed25519","kid":"ed"}"#, GOOD_PAYLOAD, ed_sign),
        // A JWS naming the AES key, and a JWE naming a signing key.
        jws_with(r#"{"alg":"EdDSA","kid":"aes"}"#, GOOD_PAYLOAD, ed_sign),
        jws_with(r#"{"alg":"dir","kid":"aes"}"#, GOOD_PAYLOAD, ed_sign),
        jwe_shape(r#"{"alg":"dir","enc":"A256GCM","kid":"ed"}"#),
        // JWE with another enc or key management algorithm.
        jwe_shape(r#"{"alg":"dir","enc":"A128GCM","kid":"aes"}"#),
        jwe_shape(r#"{"alg":"dir","enc":"A256CBC-HS512","kid":"aes"}"#),
        jwe_shape(r#"{"alg":"A256KW","enc":"A256GCM","kid":"aes"}"#),
        jwe_shape(r#"{"alg":"none","enc":"A256GCM","kid":"aes"}"#),
    ];
    for token in cases {
        assert_eq!(
            v.verify(&token, NOW),
            Err(TokenError::AlgNotAllowed),
            "{token}"
        );
    }
}

#[test]
fn expiry_and_not_before_honour_the_leeway() {
    let ring = fixed_ring();
    let v = verifier(&ring);
    let leeway = LEEWAY as i64;
    let cases = [
        (NOW - leeway - 1, None, Err(TokenError::Expired)),
        (NOW - leeway, None, Ok(())),
        (NOW - 1, None, Ok(())),
        (NOW, None, Ok(())),
        (i64::MIN, None, Err(TokenError::Expired)),
        (i64::MAX, None, Ok(())),
        (
            NOW + 600,
            Some(NOW + leeway + 1),
            Err(TokenError::NotYetValid),
        ),
        (NOW + 600, Some(NOW + leeway), Ok(())),
        (NOW + 600, Some(NOW - 100), Ok(())),
        (NOW + 600, Some(i64::MAX), Err(TokenError::NotYetValid)),
        (NOW + 600, Some(i64::MIN), Ok(())),
    ];
    for (exp, nbf, want) in cases {
        let c = Claims {
            exp,
            nbf,
            ..claims()
        };
        for (kid, _) in KIDS {
            let token = mint(&ring, kid, &c);
            let got = v.verify(&token, NOW);
            assert_eq!(got.map(drop), want.clone(), "{kid} exp={exp} nbf={nbf:?}");
        }
    }
    // A huge leeway must not overflow either.
    let lax = Verifier::new(&ring, AUD, u64::MAX).unwrap();
    let c = Claims {
        exp: i64::MIN,
        nbf: Some(i64::MAX),
        ..claims()
    };
    assert!(lax.verify(&mint(&ring, "ed", &c), i64::MAX).is_ok());
}

#[test]
fn audience_must_name_this_server() {
    let ring = fixed_ring();
    let v = verifier(&ring);
    let cases: [(&[&str], Result<(), TokenError>); 6] = [
        (&[AUD], Ok(())),
        (&["other", AUD], Ok(())),
        (&[], Err(TokenError::WrongAudience)),
        (&["other"], Err(TokenError::WrongAudience)),
        (&["GuildChat"], Err(TokenError::WrongAudience)),
        (&["guildchat "], Err(TokenError::WrongAudience)),
    ];
    for (aud, want) in cases {
        let c = Claims {
            aud: aud.iter().map(|a| a.to_string()).collect(),
            ..claims()
        };
        for (kid, _) in KIDS {
            let got = v.verify(&mint(&ring, kid, &c), NOW).map(drop);
            assert_eq!(got, want.clone(), "{kid} {aud:?}");
        }
    }
}

#[test]
fn claims_are_checked_after_the_signature() {
    let v = verifier(&fixed_ring());
    let exp = NOW + 60;
    let with = |sub: &str| format!(r#"{{"sub":{sub},"name":"n","exp":{exp},"aud":"guildchat"}}"#);
    let bad = |why: &'static str| Err(TokenError::BadClaims(why));
    let shape = bad("not a JSON claims set with sub, name and exp");
    let cases: Vec<(String, Result<u64, TokenError>)> = vec![
        (with(r#""42""#), Ok(42)),
        (with(r#""18446744073709551615""#), Ok(u64::MAX)),
        (with(r#""abc""#), bad("sub is not a decimal user id")),
        (with(r#""""#), bad("sub is not a decimal user id")),
        (with(r#""-1""#), bad("sub is not a decimal user id")),
        (with(r#""+5""#), bad("sub is not a decimal user id")),
        (with(r#"" 5""#), bad("sub is not a decimal user id")),
        (with(r#""1.5""#), bad("sub is not a decimal user id")),
        (with(r#""0x1f""#), bad("sub is not a decimal user id")),
        (with(r#""0""#), bad("sub is zero")),
        (with(r#""007""#), bad("sub has leading zeros")),
        (
            with(r#""18446744073709551616""#),
            bad("sub does not fit in 64 bits"),
        ),
        (with("42"), shape.clone()),
        (with("null"), shape.clone()),
        (
            format!(r#"{{"name":"n","exp":{exp},"aud":"guildchat"}}"#),
            shape.clone(),
        ),
        (
            format!(r#"{{"sub":"1","exp":{exp},"aud":"guildchat"}}"#),
            shape.clone(),
        ),
        (
            r#"{"sub":"1","name":"n","aud":"guildchat"}"#.into(),
            shape.clone(),
        ),
        (
            r#"{"sub":"1","name":"n","exp":"soon","aud":"guildchat"}"#.into(),
            shape.clone(),
        ),
        (
            r#"{"sub":"1","name":"n","exp":1.5,"aud":"guildchat"}"#.into(),
            shape.clone(),
        ),
        (
            format!(r#"{{"sub":"1","name":"n","exp":{exp},"guild":-1,"aud":"x"}}"#),
            shape.clone(),
        ),
        (
            format!(r#"{{"sub":"1","name":"n","exp":{exp},"aud":5}}"#),
            shape.clone(),
        ),
        (
            format!(r#"{{"sub":"1","name":"n","exp":{exp},"aud":[5]}}"#),
            shape.clone(),
        ),
        (
            format!(r#"{{"sub":"1","sub":"2","name":"n","exp":{exp},"aud":"x"}}"#),
            shape.clone(),
        ),
        ("[1,2]".into(), shape.clone()),
        ("not json".into(), shape.clone()),
        (String::new(), shape.clone()),
        // Unknown registered or private claims are ignored.
        (
            format!(
                r#"{{"iss":"game","jti":"x","sub":"9","name":"n","exp":{exp},"aud":["guildchat"]}}"#
            ),
            Ok(9),
        ),
    ];
    for (payload, want) in cases {
        for token in [
            jws_with(ED_HEADER, &payload, ed_sign),
            jws_with(ES_HEADER, &payload, es_sign),
            jwe(DIR_HEADER, &payload),
        ] {
            let got = v.verify(&token, NOW).map(|c| c.user_id);
            assert_eq!(got, want.clone(), "{payload}");
        }
    }
}

#[test]
fn garbage_is_malformed_and_never_panics() {
    let v = verifier(&fixed_ring());
    let h = |json: &str| b64(json.as_bytes());
    let p = b64(GOOD_PAYLOAD.as_bytes());
    let sig = b64(&[0; 64]);
    let iv = b64(&[0; 12]);
    let tag = b64(&[0; 16]);
    let cases: Vec<String> = vec![
        String::new(),
        ".".into(),
        "a".into(),
        "a.b".into(),
        "a.b.c.d".into(),
        "a.b.c.d.e.f".into(),
        "......".into(),
        "..".into(),
        "....".into(),
        "a".repeat(5000),
        format!("{}.{p}.{sig}", "a".repeat(4100)),
        "!!!.e30.AA".into(),
        format!("{}=.{p}.{sig}", h(ED_HEADER)),
        format!("{}.{p}.{sig}", h("not json")),
        format!("{}.{p}.{sig}", h("[]")),
        format!("{}.{p}.{sig}", h("{}")),
        format!("{}.{p}.{sig}", h(r#"{"alg":5,"kid":"ed"}"#)),
        format!("{}.{p}.{sig}", h(r#"{"alg":"EdDSA","kid":7}"#)),
        // Duplicate members would let two parsers disagree on the header.
        format!(
            "{}.{p}.{sig}",
            h(r#"{"alg":"EdDSA","alg":"none","kid":"ed"}"#)
        ),
        format!(
            "{}.{p}.{sig}",
            h(r#"{"alg":"EdDSA","kid":"ed","crit":["exp"]}"#)
        ),
        format!(
            "{}.{p}.{sig}",
            h(r#"{"alg":"EdDSA","kid":"ed","typ":"at+jwt"}"#)
        ),
        format!(
            "{}.{p}.{sig}",
            h(r#"{"alg":"EdDSA","kid":"ed","enc":"A256GCM"}"#)
        ),
        format!("{}.{p}.@@", h(ED_HEADER)),
        format!("{}.{p}.{sig}=", h(ED_HEADER)),
        format!("{}.e31.{sig}", h(ED_HEADER)),
        format!("{}.{p} .{sig}", h(ED_HEADER)),
        format!("{}..{iv}.{p}.{tag}", h(r#"{"alg":"dir","kid":"aes"}"#)),
        format!(
            "{}..{iv}.{p}.{tag}",
            h(r#"{"alg":"dir","enc":"A256GCM","kid":"aes","zip":"DEF"}"#)
        ),
        format!(
            "{}..{iv}.{p}.{tag}",
            h(r#"{"alg":"dir","enc":"A256GCM","kid":"aes","zip":null}"#)
        ),
        format!(
            "{}..{iv}.{p}.{tag}",
            h(r#"{"alg":"dir","enc":"A256GCM","kid":"aes","crit":[]}"#)
        ),
        format!("{}.AAAA.{iv}.{p}.{tag}", h(DIR_HEADER)),
        format!("{}..{}.{p}.{tag}", h(DIR_HEADER), b64(&[0; 11])),
        format!("{}..{}.{p}.{tag}", h(DIR_HEADER), b64(&[0; 16])),
        format!("{}..{iv}.{p}.{}", h(DIR_HEADER), b64(&[0; 15])),
        format!("{}..{iv}.!.{tag}", h(DIR_HEADER)),
        format!("{}..{iv}.{p}.{tag}", h(ED_HEADER)),
    ];
    for token in &cases {
        assert!(
            matches!(v.verify(token, NOW), Err(TokenError::Malformed(_))),
            "{token:.80}: {:?}",
            v.verify(token, NOW)
        );
    }
    // The size limit is inclusive: 4096 bytes get past it (and then fail
    // for another reason), 4097 do not.
    let too_long = Err(TokenError::Malformed("token longer than 4096 bytes"));
    let pad = |n: usize| format!("{}.{p}.{}", h(ED_HEADER), "A".repeat(n));
    let base = pad(0).len();
    assert_ne!(v.verify(&pad(4096 - base), NOW), too_long);
    assert_eq!(v.verify(&pad(4097 - base), NOW), too_long);
}

#[test]
fn mutated_tokens_never_verify_and_never_panic() {
    let ring = fixed_ring();
    let v = verifier(&ring);
    for (kid, _) in KIDS {
        let token = mint(&ring, kid, &claims());
        assert!(v.verify(&token, NOW).is_ok());
        for cut in 0..token.len() {
            assert!(v.verify(&token[..cut], NOW).is_err(), "{kid} cut {cut}");
        }
        for pos in 0..token.len() {
            for c in ['.', 'A', '_', '!'] {
                if token.as_bytes()[pos] == c as u8 {
                    continue;
                }
                let mut m = token.clone().into_bytes();
                m[pos] = c as u8;
                // unwrap: only ASCII bytes were swapped.
                let m = String::from_utf8(m).unwrap();
                assert!(v.verify(&m, NOW).is_err(), "{kid} {pos} {c}");
            }
        }
    }
}

#[test]
fn es256_signatures_are_raw_r_s_not_der() {
    let v = verifier(&fixed_ring());
    let good = jws_with(ES_HEADER, GOOD_PAYLOAD, es_sign);
    assert_eq!(v.verify(&good, NOW), Ok(good_payload_claims()));
    let der = jws_with(ES_HEADER, GOOD_PAYLOAD, |input| {
        let sig: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(&es_key(), input);
        sig.to_der().as_bytes().to_vec()
    });
    assert_eq!(v.verify(&der, NOW), Err(TokenError::BadSignature));
    // r = 0 or s = 0 is never a valid signature.
    let zero = jws_with(ES_HEADER, GOOD_PAYLOAD, |_| vec![0; 64]);
    assert_eq!(v.verify(&zero, NOW), Err(TokenError::BadSignature));
    let short = jws_with(ED_HEADER, GOOD_PAYLOAD, |i| ed_sign(i)[..63].to_vec());
    assert_eq!(v.verify(&short, NOW), Err(TokenError::BadSignature));
}

/// A JWS built by hand from the seed [7; 32] with the primitive crate, so
/// the verify path is checked independently of `mint`; the token text is
/// frozen too, since Ed25519 is deterministic.
#[test]
fn fixed_ed25519_vector_verifies() {
    let ring = KeyRing {
        keys: vec![KeyEntry {
            kid: "fixed-ed".into(),
            alg: KeyAlg::EdDSA,
            secret: None,
            public: Some(b64(ed_key().verifying_key().as_bytes())),
        }],
    };
    let header = r#"{"alg":"EdDSA","typ":"JWT","kid":"fixed-ed"}"#;
    let token = jws_with(header, GOOD_PAYLOAD, ed_sign);
    assert_eq!(
        token,
        concat!(
            "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCIsImtpZCI6ImZpeGVkLWVkIn0.",
            "eyJzdWIiOiIxMDAxIiwibmFtZSI6IkJyYW0iLCJleHAiOjE3NTAwMDA2MDAsImd1aWxkIjozLCJhdWQiOiJndWlsZGNoYXQifQ.",
            // Also what OpenSSL (Python `cryptography`) signs for this input.
            "0WBFgwxcYf3oHUNkvjjC5KHgc0msC0zY9H1luLx_RUVrihd_bqws57t9kZO8iV1KY0PAv8aX2BNRrNvGtX3iDg"
        )
    );
    assert_eq!(
        verifier(&ring).verify(&token, NOW),
        Ok(good_payload_claims())
    );
}

/// Tokens minted outside Rust (OpenSSL through Python's `cryptography`) with
/// the fixed keys: AES key [5; 32] with IV [3; 12], and ES256 scalar [9; 32].
#[test]
fn tokens_minted_by_another_implementation_verify() {
    let v = verifier(&fixed_ring());
    let jwe = concat!(
        "eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIiwia2lkIjoiYWVzIn0..AwMDAwMDAwMDAwMD.",
        "fdPwPRyO6tcbhEn9jXpUYOpIah0KxLa_AC1IWX4u_RJlZ_kMBQ_0HqmIX1Uuj5dpwTa3QeCrNoJnwKUNocY9dI0lqvE0JtqrVQ.",
        "IItqfPTpQ0aNeojV0MUlPQ"
    );
    let es = concat!(
        "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImVzIn0.",
        "eyJzdWIiOiIxMDAxIiwibmFtZSI6IkJyYW0iLCJleHAiOjE3NTAwMDA2MDAsImd1aWxkIjozLCJhdWQiOiJndWlsZGNoYXQifQ.",
        "_2ovTwPNrjCC5LCGExM1xCsSzjk-6ysFgm1tJGCie7IKYQmaouggOpsT69wh_VrIbY1J9BmCqZ7g6Revdn1eaQ"
    );
    for token in [jwe, es] {
        assert_eq!(v.verify(token, NOW), Ok(good_payload_claims()), "{token}");
    }
    // The hand-built JWE helper agrees byte for byte.
    assert_eq!(jwe_with(DIR_HEADER, DIR_HEADER, GOOD_PAYLOAD, [3; 12]), jwe);
}

/// A signature whose R is the identity point (small order), made with the
/// secret scalar of seed [7; 32] as s = k·a: plain (cofactorless) Ed25519
/// verification accepts it, `verify_strict` must not. Computed outside Rust
/// with integer arithmetic.
#[test]
fn small_order_r_is_refused() {
    let token = concat!(
        "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCIsImtpZCI6ImVkIn0.",
        "eyJzdWIiOiIxMDAxIiwibmFtZSI6IkJyYW0iLCJleHAiOjE3NTAwMDA2MDAsImd1aWxkIjozLCJhdWQiOiJndWlsZGNoYXQifQ.",
        "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABdUQrnEndicEGZwxEBARDg6u0xF43Ulkok8ccL70mFDw"
    );
    let sig =
        ed25519_dalek::Signature::from_slice(&unb64(token.rsplit('.').next().unwrap())).unwrap();
    let input = token.rsplit_once('.').unwrap().0.as_bytes();
    let public = ed_key().verifying_key();
    // The vector is meaningful only if the lax check really accepts it.
    assert!(ed25519_dalek::Verifier::verify(&public, input, &sig).is_ok());
    assert!(public.verify_strict(input, &sig).is_err());
    assert_eq!(
        verifier(&fixed_ring()).verify(token, NOW),
        Err(TokenError::BadSignature)
    );
}

/// Published vectors: RFC 8037 A.4 (Ed25519) and RFC 7515 A.3 (ES256). Their
/// payloads are not guildchat claims, so a correct verifier gets past the
/// signature and stops at the claims (`BadClaims`), and a flipped signature
/// byte gives `BadSignature`. Their private keys must derive their public
/// keys.
#[test]
fn rfc_vectors() {
    let ed_x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
    let ed_d = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
    let ed_token = concat!(
        "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.",
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    );
    let es_x = unb64("f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU");
    let es_y = unb64("x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0");
    let es_public = b64(&[&[4u8][..], &es_x, &es_y].concat());
    let es_d = "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI";
    let es_token = concat!(
        "eyJhbGciOiJFUzI1NiJ9.",
        "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.",
        "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q"
    );
    let cases = [
        (KeyAlg::EdDSA, ed_x.to_owned(), ed_d, ed_token),
        (KeyAlg::Es256, es_public, es_d, es_token),
    ];
    for (alg, public, secret, token) in cases {
        let text = format!("[[keys]]\nkid = \"rfc\"\nalg = \"{alg}\"\nsecret = \"{secret}\"\n");
        let derived = KeyRing::from_toml_str(&text).unwrap();
        assert_eq!(
            derived.keys[0].public.as_deref(),
            Some(public.as_str()),
            "{alg}"
        );

        let ring = derived.public_only();
        let v = verifier(&ring);
        let shape = Err(TokenError::BadClaims(
            "not a JSON claims set with sub, name and exp",
        ));
        assert_eq!(v.verify(token, 0), shape, "{alg}");
        let forged = edit_part(token, 2, |s| s[10] ^= 0x80);
        assert_eq!(v.verify(&forged, 0), Err(TokenError::BadSignature), "{alg}");
    }
}

#[test]
fn key_ring_toml_round_trip() {
    let mut ring = generated_ring();
    ring.keys.push(KeyEntry {
        secret: None,
        ..KeyRing::generate(KeyAlg::Es256, "es-public").unwrap()
    });
    let text = ring.to_toml_string();
    assert_eq!(text.matches("[[keys]]").count(), 4, "{text}");
    assert!(text.contains(r#"alg = "dir+A256GCM""#), "{text}");
    assert!(text.contains(r#"alg = "EdDSA""#), "{text}");
    assert!(text.contains(r#"alg = "ES256""#), "{text}");
    assert_eq!(KeyRing::from_toml_str(&text).unwrap(), ring);

    let dev = KeyRing::dev().unwrap();
    let kinds: Vec<_> = dev.keys.iter().map(|k| (k.kid.as_str(), k.alg)).collect();
    assert_eq!(
        kinds,
        [("dev-aes", KeyAlg::Dir), ("dev-ed25519", KeyAlg::EdDSA)]
    );
    let dev = KeyRing::from_toml_str(&dev.to_toml_string()).unwrap();
    let v = verifier(&dev);
    for format in [TokenFormat::Jwe, TokenFormat::Jws] {
        let token = Signer::new(&dev, format, None).unwrap().mint(&claims());
        assert_eq!(v.verify(&token, NOW), Ok(claims()), "{format}");
    }
    assert_ne!(KeyRing::dev().unwrap(), KeyRing::dev().unwrap());

    // An empty file is an empty ring (which no verifier accepts).
    assert_eq!(KeyRing::from_toml_str("").unwrap(), KeyRing::default());
}

#[test]
fn a_missing_public_key_is_derived_from_the_secret() {
    for alg in [KeyAlg::EdDSA, KeyAlg::Es256] {
        let full = KeyRing::generate(alg, "k").unwrap();
        let text = KeyRing {
            keys: vec![KeyEntry {
                public: None,
                ..full.clone()
            }],
        }
        .to_toml_string();
        assert!(!text.contains("public"), "{text}");
        assert_eq!(KeyRing::from_toml_str(&text).unwrap().keys, [full], "{alg}");
    }
}

#[test]
fn bad_key_rings_are_refused_with_the_kid_named() {
    let ed = KeyRing::generate(KeyAlg::EdDSA, "x").unwrap();
    let ed2 = KeyRing::generate(KeyAlg::EdDSA, "x").unwrap();
    let es = KeyRing::generate(KeyAlg::Es256, "x").unwrap();
    let es2 = KeyRing::generate(KeyAlg::Es256, "x").unwrap();
    let aes = KeyRing::generate(KeyAlg::Dir, "x").unwrap();
    let s = |o: &Option<String>| o.clone().unwrap();
    let entry = |alg: &str, secret: Option<&str>, public: Option<&str>| {
        let mut t = format!("[[keys]]\nkid = \"k-bad\"\nalg = \"{alg}\"\n");
        if let Some(v) = secret {
            t.push_str(&format!("secret = \"{v}\"\n"));
        }
        if let Some(v) = public {
            t.push_str(&format!("public = \"{v}\"\n"));
        }
        t
    };
    let weak_ed = b64(&[&[1u8][..], &[0; 31]].concat());
    let off_curve = b64(&[&[4u8][..], &[1; 64]].concat());
    let compressed = b64(&[&[2u8][..], &unb64(&s(&es.public))[1..33]].concat());
    let cases: Vec<(String, &str)> = vec![
        (
            entry("dir+A256GCM", Some(&s(&aes.secret)), None).repeat(2),
            "used by more than one key",
        ),
        (
            entry("dir+A256GCM", Some("!!!"), None),
            "`secret` is not base64url",
        ),
        (
            entry("dir+A256GCM", Some(&b64(&[1; 16])), None),
            "`secret` is 16 bytes, expected 32",
        ),
        (entry("dir+A256GCM", None, None), "needs a `secret`"),
        (
            entry("dir+A256GCM", Some(&s(&aes.secret)), Some(&s(&ed.public))),
            "takes no `public`",
        ),
        (entry("EdDSA", None, None), "needs a `public` or a `secret`"),
        (
            entry("EdDSA", Some(&s(&ed.secret)), Some(&s(&ed2.public))),
            "does not belong",
        ),
        (
            entry("EdDSA", None, Some(&weak_ed)),
            "`public` is not a valid EdDSA key",
        ),
        (
            entry("EdDSA", None, Some(&s(&es.public))),
            "`public` is 65 bytes, expected 32",
        ),
        (
            entry("ES256", Some(&s(&es.secret)), Some(&s(&es2.public))),
            "does not belong",
        ),
        (
            entry("ES256", None, Some(&off_curve)),
            "`public` is not a valid ES256 key",
        ),
        (
            entry("ES256", None, Some(&compressed)),
            "`public` is 33 bytes, expected 65",
        ),
        (
            entry("ES256", Some(&b64(&[0; 32])), None),
            "`secret` is not a valid ES256 key",
        ),
        (
            entry("ES256", Some(&b64(&[0xff; 32])), None),
            "`secret` is not a valid ES256 key",
        ),
        (
            entry("ES256", Some(&format!("{}=", s(&es.secret))), None),
            "not base64url",
        ),
    ];
    for (text, want) in &cases {
        let err = KeyRing::from_toml_str(text).unwrap_err().to_string();
        assert!(err.contains("k-bad"), "{text}\n{err}");
        assert!(err.contains(want), "{text}\n{err}");
    }
    let toml_cases = [
        (
            "[[keys]]\nkid = \"a\"\nalg = \"HS256\"\nsecret = \"AA\"\n",
            "HS256",
        ),
        (
            "[[keys]]\nkid = \"a\"\nalg = \"EdDSA\"\nsecert = \"AA\"\n",
            "secert",
        ),
        ("[[keys]]\nalg = \"EdDSA\"\npublic = \"AA\"\n", "kid"),
        ("[[key]]\nkid = \"a\"\n", "key"),
        ("keys = 5", "keys"),
    ];
    for (text, want) in toml_cases {
        let err = KeyRing::from_toml_str(text).unwrap_err();
        assert!(matches!(err, KeyError::Toml(_)), "{text}: {err:?}");
        assert!(err.to_string().contains(want), "{text}: {err}");
    }
    let empty_kid = entry("dir+A256GCM", Some(&s(&aes.secret)), None).replace("k-bad", "");
    assert!(matches!(
        KeyRing::from_toml_str(&empty_kid),
        Err(KeyError::EmptyKid)
    ));
    assert!(matches!(
        KeyRing::generate(KeyAlg::Dir, ""),
        Err(KeyError::EmptyKid)
    ));
}

#[test]
fn verifier_construction_is_checked() {
    let ring = fixed_ring();
    assert!(matches!(
        Verifier::new(&ring, "", 0),
        Err(KeyError::EmptyAudience)
    ));
    assert!(matches!(
        Verifier::new(&KeyRing::default(), AUD, 0),
        Err(KeyError::EmptyRing)
    ));
    let mut dup = fixed_ring();
    dup.keys[1].kid = "aes".into();
    assert!(matches!(Verifier::new(&dup, AUD, 0), Err(KeyError::DuplicateKid(k)) if k == "aes"));
    let mut bad = fixed_ring();
    bad.keys[2].public = Some(b64(&[4; 65]));
    let err = Verifier::new(&bad, AUD, 0).unwrap_err();
    assert!(err.to_string().contains("\"es\""), "{err}");
    assert!(Signer::new(&bad, TokenFormat::Jwe, None).is_err());
}

#[test]
fn public_only_rings_verify_but_cannot_sign_jws() {
    let ring = generated_ring();
    let mut no_public = ring.clone();
    no_public.keys[1].public = None;
    for source in [&ring, &no_public] {
        let public = source.public_only();
        for (e, orig) in public.keys.iter().zip(&ring.keys) {
            assert_eq!(e.public, orig.public, "{}", e.kid);
            let kept = e.alg == KeyAlg::Dir;
            assert_eq!(e.secret.is_some(), kept, "{}", e.kid);
        }
        let v = verifier(&public);
        for (kid, _) in KIDS {
            assert_eq!(
                v.verify(&mint(&ring, kid, &claims()), NOW),
                Ok(claims()),
                "{kid}"
            );
        }
        assert!(matches!(
            Signer::new(&public, TokenFormat::Jws, None),
            Err(KeyError::NoUsableKey(TokenFormat::Jws))
        ));
        for kid in ["ed", "es"] {
            assert!(matches!(
                Signer::new(&public, TokenFormat::Jws, Some(kid)),
                Err(KeyError::MissingSecret { .. })
            ));
        }
        assert!(Signer::new(&public, TokenFormat::Jwe, None).is_ok());
    }
}

#[test]
fn debug_output_never_shows_secrets() {
    let ring = generated_ring();
    for entry in &ring.keys {
        let secret = entry.secret.as_deref().unwrap();
        let shown = format!("{entry:?} {ring:?} {ring:#?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains(&entry.kid), "{shown}");
    }
    let shown = format!(
        "{:?} {:?}",
        verifier(&ring),
        Signer::new(&ring, TokenFormat::Jwe, None).unwrap()
    );
    for entry in &ring.keys {
        assert!(!shown.contains(entry.secret.as_deref().unwrap()), "{shown}");
    }
}

#[test]
fn claims_json_shape() {
    let one = serde_json::to_value(claims()).unwrap();
    assert_eq!(one["sub"], "42");
    assert_eq!(one["aud"], AUD);
    assert_eq!(one["guild"], 7);
    let many = serde_json::to_value(Claims {
        aud: vec!["a".into(), "b".into()],
        ..claims()
    })
    .unwrap();
    assert_eq!(many["aud"], serde_json::json!(["a", "b"]));
    let none = serde_json::to_string(&Claims {
        aud: vec![],
        guild: 0,
        team: 0,
        scene: 0,
        iat: None,
        nbf: None,
        ..claims()
    })
    .unwrap();
    assert_eq!(
        none,
        format!(r#"{{"sub":"42","name":"Aria","exp":{}}}"#, NOW + 600)
    );
    let back: Claims = serde_json::from_value(many).unwrap();
    assert_eq!(back.aud, ["a", "b"]);
    assert!(serde_json::from_str::<Claims>(r#"{"sub":"0","name":"n","exp":1}"#).is_err());
}

#[test]
fn token_formats_and_algs_have_names() {
    assert_eq!("JWE".parse::<TokenFormat>(), Ok(TokenFormat::Jwe));
    assert_eq!("jws".parse::<TokenFormat>(), Ok(TokenFormat::Jws));
    assert!("jwt".parse::<TokenFormat>().is_err());
    let names = [
        (KeyAlg::Dir, "dir+A256GCM"),
        (KeyAlg::EdDSA, "EdDSA"),
        (KeyAlg::Es256, "ES256"),
    ];
    for (alg, name) in names {
        assert_eq!(alg.to_string(), name);
        assert_eq!(serde_json::to_string(&alg).unwrap(), format!("\"{name}\""));
    }
}

#[test]
fn verifier_and_signer_are_shareable() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Verifier>();
    shareable::<Signer>();
    shareable::<KeyRing>();
}
