//! JWT (HS256) issue and check, SPEC §2. Tokens are never logged.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::Error;

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
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

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Tokens {
    pub fn new(secret: &[u8], leeway: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked here rather than by jsonwebtoken: SPEC wants a token
        // whose `exp` is *now* to be expired already, jsonwebtoken accepts it.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            leeway,
        }
    }

    /// Checks signature, then expiry; returns the user id (`sub`) and `exp`.
    pub fn verify(&self, token: &str) -> Result<Verified, Error> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Error::TokenExpired,
                _ => Error::InvalidToken,
            })?;
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
pub fn bearer(header: Option<&str>) -> Option<&str> {
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

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
