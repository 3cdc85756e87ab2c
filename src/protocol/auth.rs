//! JWT (HS256) issue and check, SPEC §2. Tokens are never logged.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Kept here too: tests and embedders name it as `protocol::auth::now_secs`.
pub use crate::domain::clock::now_secs;
use crate::domain::error::Error;

/// Signs and checks tokens with the server's secret.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    leeway: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(deserialize_with = "sub_as_string")]
    sub: String,
    exp: serde_json::Number,
    /// Absent is `None`; present, it must be a number (`null` included is
    /// refused), like `exp`.
    #[serde(
        default,
        deserialize_with = "present_number",
        skip_serializing_if = "Option::is_none"
    )]
    nbf: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// A claim that, once present, must be a JSON number: `Option`'s own
/// deserializer would take `null` for "absent" and let `"nbf": null` through.
fn present_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Number>, D::Error> {
    serde_json::Number::deserialize(d).map(Some)
}

/// SPEC §2: a numeric `sub` is read as its decimal string.
fn sub_as_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Sub {
        Text(String),
        Number(serde_json::Number),
    }
    Ok(match Sub::deserialize(d)? {
        Sub::Text(s) => s,
        Sub::Number(n) => n.to_string(),
    })
}

/// Now with its fraction: `nbf` compares against the real time, so a token
/// whose `nbf` is the current second is valid within that second already.
fn now_precise() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// RFC 7515 §4.1.11: a receiver must refuse a `crit` extension it does not
/// understand, and we understand none. jsonwebtoken's `Header` reads
/// `"crit": null` as no `crit` at all, so the header's own JSON is looked at:
/// the parameter being there, with any value, makes the token invalid.
fn has_crit(token: &str) -> bool {
    let Some(segment) = token.split('.').next() else {
        return true;
    };
    // jsonwebtoken decoded this very segment with the same engine before us,
    // so a failure here cannot reject a token it accepted; fail closed anyway.
    let Ok(json) = URL_SAFE_NO_PAD.decode(segment) else {
        return true;
    };
    match serde_json::from_slice::<Map<String, Value>>(&json) {
        Ok(header) => header.contains_key("crit"),
        Err(_) => true,
    }
}

impl Tokens {
    pub fn new(secret: &[u8], leeway: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked here rather than by jsonwebtoken: SPEC wants a token
        // whose `exp` is *now* to be expired already, jsonwebtoken accepts it.
        validation.validate_exp = false;
        // `nbf` too, for the same exactness and so that a non-numeric one is
        // refused rather than ignored.
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            leeway,
        }
    }

    /// Checks signature, `crit`, `nbf`, then expiry (SPEC §2; an invalid token
    /// is reported before an expired one, as SPEC §3's check order has it);
    /// returns the user id (`sub`) and `exp`.
    pub fn verify(&self, token: &str) -> Result<Verified, Error> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Error::TokenExpired,
                _ => Error::InvalidToken,
            })?;
        if has_crit(token) {
            return Err(Error::InvalidToken);
        }
        // `nbf` equal to now is valid (RFC 7519 §4.1.5: not *before* it).
        if let Some(nbf) = &data.claims.nbf {
            let nbf = nbf.as_f64().ok_or(Error::InvalidToken)?;
            if nbf > now_precise() + self.leeway as f64 {
                return Err(Error::InvalidToken);
            }
        }
        let exp = data.claims.exp.as_f64().ok_or(Error::InvalidToken)?;
        if exp + self.leeway as f64 <= now_secs() as f64 {
            return Err(Error::TokenExpired);
        }
        Ok(Verified {
            user_id: data.claims.sub,
            exp: exp.max(0.0) as u64,
        })
    }

    /// Issues a token for `user_id` valid for `ttl_secs`.
    pub fn issue(&self, user_id: &str, ttl_secs: u64) -> Result<String, Error> {
        let now = now_secs();
        let claims = Claims {
            sub: user_id.to_string(),
            exp: (now + ttl_secs).into(),
            nbf: None,
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::Internal(format!("signing a token: {e}")))
    }
}

/// A checked token.
#[derive(Debug, Clone)]
pub struct Verified {
    pub user_id: String,
    /// Seconds since the epoch; kept so a session can be closed when it passes.
    pub exp: u64,
}

/// The token from `Authorization: Bearer <JWT>` (scheme case-insensitive).
pub(crate) fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("sign")
    }

    #[test]
    fn round_trip_and_failures() {
        let t = Tokens::new(b"s3cret", 0);
        let tok = t.issue("alice", 60).expect("issue");
        assert_eq!(t.verify(&tok).expect("valid").user_id, "alice");
        let other = Tokens::new(b"other", 0);
        assert!(matches!(other.verify(&tok), Err(Error::InvalidToken)));
        assert!(matches!(t.verify("not.a.jwt"), Err(Error::InvalidToken)));
        assert!(matches!(t.verify(""), Err(Error::InvalidToken)));
    }

    #[test]
    fn numeric_sub_and_exact_expiry() {
        let t = Tokens::new(b"k", 0);
        let now = now_secs();
        let tok = sign(b"k", serde_json::json!({"sub": 42, "exp": now + 60}));
        assert_eq!(t.verify(&tok).expect("valid").user_id, "42");
        let tok = sign(b"k", serde_json::json!({"sub": "u", "exp": now}));
        assert!(matches!(t.verify(&tok), Err(Error::TokenExpired)));
        let lenient = Tokens::new(b"k", 30);
        assert!(lenient.verify(&tok).is_ok());
        let tok = sign(b"k", serde_json::json!({"sub": "u"}));
        assert!(matches!(t.verify(&tok), Err(Error::InvalidToken)));
        let tok = sign(b"k", serde_json::json!({"exp": now + 60}));
        assert!(matches!(t.verify(&tok), Err(Error::InvalidToken)));
    }

    fn sign_with_header(header: Header, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(b"k")).expect("sign")
    }

    #[test]
    fn nbf_is_honoured_with_the_leeway() {
        let t = Tokens::new(b"k", 0);
        let now = now_secs();
        let with_nbf = |nbf: serde_json::Value| {
            sign(
                b"k",
                serde_json::json!({"sub": "u", "exp": now + 600, "nbf": nbf}),
            )
        };
        for nbf in [now - 3600, now - 1, now] {
            let tok = with_nbf(nbf.into());
            assert!(t.verify(&tok).is_ok(), "nbf {nbf} (now {now}) is valid");
        }
        assert!(t.verify(&with_nbf((now as f64 - 0.5).into())).is_ok());
        let future = with_nbf((now + 20).into());
        assert!(matches!(t.verify(&future), Err(Error::InvalidToken)));
        let fraction = with_nbf((now as f64 + 2.5).into());
        assert!(matches!(t.verify(&fraction), Err(Error::InvalidToken)));
        // The leeway covers `nbf` as it covers `exp`.
        let lenient = Tokens::new(b"k", 30);
        assert!(lenient.verify(&future).is_ok());
        let far = with_nbf((now + 100).into());
        assert!(matches!(lenient.verify(&far), Err(Error::InvalidToken)));
        for bad in [
            serde_json::json!("soon"),
            serde_json::json!(null),
            serde_json::json!(true),
            serde_json::json!([now]),
        ] {
            let tok = with_nbf(bad.clone());
            assert!(
                matches!(t.verify(&tok), Err(Error::InvalidToken)),
                "nbf {bad} is refused"
            );
        }
        // Invalid before expired (SPEC §3's order): a future `nbf` on an
        // expired token is an invalid token.
        let both = sign(
            b"k",
            serde_json::json!({"sub": "u", "exp": now - 5, "nbf": now + 60}),
        );
        assert!(matches!(t.verify(&both), Err(Error::InvalidToken)));
    }

    #[test]
    fn a_crit_header_parameter_makes_a_token_invalid() {
        let t = Tokens::new(b"k", 0);
        let claims = serde_json::json!({"sub": "u", "exp": now_secs() + 600});
        let plain = sign_with_header(Header::new(Algorithm::HS256), claims.clone());
        assert!(t.verify(&plain).is_ok());
        let mut listed = Header::new(Algorithm::HS256);
        listed.crit = Some(vec!["exp".into()]);
        let mut empty = Header::new(Algorithm::HS256);
        empty.crit = Some(Vec::new());
        let mut null = Header::new(Algorithm::HS256);
        null.extras.insert("crit", serde_json::Value::Null);
        let mut number = Header::new(Algorithm::HS256);
        number.extras.insert("crit", 1);
        for (what, header) in [
            ("[\"exp\"]", listed),
            ("[]", empty),
            ("null", null),
            ("1", number),
        ] {
            let tok = sign_with_header(header, claims.clone());
            assert!(
                matches!(t.verify(&tok), Err(Error::InvalidToken)),
                "crit {what} is refused"
            );
        }
        // Other unknown header parameters are not critical.
        let mut other = Header::new(Algorithm::HS256);
        other.extras.insert("x-note", "hello");
        assert!(t.verify(&sign_with_header(other, claims)).is_ok());
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
