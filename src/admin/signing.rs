//! HMAC-SHA256 signatures for what the admin hands out and must recognise later: CSRF tokens
//! (bound to the browser's session cookie) and e-mailed links (bound to the account, an expiry
//! and a value that changes when the link has served its purpose).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a signed link was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// Not a link we made, or made for a state that has changed (already used).
    Invalid,
    Expired,
}

/// A parsed link token: `{account_id}.{expires_ms}.{signature}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkToken {
    pub account_id: i64,
    pub expires_ms: i64,
    signature: Vec<u8>,
}

impl LinkToken {
    pub fn parse(token: &str) -> Result<LinkToken, LinkError> {
        let mut parts = token.trim().splitn(3, '.');
        let (Some(id), Some(exp), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(LinkError::Invalid);
        };
        Ok(LinkToken {
            account_id: id.parse().map_err(|_| LinkError::Invalid)?,
            expires_ms: exp.parse().map_err(|_| LinkError::Invalid)?,
            signature: URL_SAFE_NO_PAD
                .decode(sig)
                .map_err(|_| LinkError::Invalid)?,
        })
    }
}

pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    pub fn new(key: &[u8]) -> Signer {
        Signer { key: key.to_vec() }
    }

    /// A MAC over length-prefixed parts, so `("ab", "c")` and `("a", "bc")` never collide.
    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        for p in parts {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        m
    }

    pub fn csrf_token(&self, session_id: &str) -> String {
        URL_SAFE_NO_PAD.encode(
            self.mac(&[b"csrf", session_id.as_bytes()])
                .finalize()
                .into_bytes(),
        )
    }

    /// Constant-time check of a CSRF token against the session it must belong to.
    pub fn check_csrf(&self, session_id: &str, token: &str) -> bool {
        let Ok(sig) = URL_SAFE_NO_PAD.decode(token.trim()) else {
            return false;
        };
        self.mac(&[b"csrf", session_id.as_bytes()])
            .verify_slice(&sig)
            .is_ok()
    }

    /// A link token for `purpose`, valid until `expires_ms` and only while `bound` is unchanged
    /// (the e-mail for verification, the password hash for a reset: a used reset link dies).
    pub fn link_token(
        &self,
        purpose: &str,
        account_id: i64,
        expires_ms: i64,
        bound: &str,
    ) -> String {
        let sig = self
            .link_mac(purpose, account_id, expires_ms, bound)
            .finalize()
            .into_bytes();
        format!("{account_id}.{expires_ms}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    pub fn check_link(
        &self,
        purpose: &str,
        token: &LinkToken,
        bound: &str,
        now_ms: i64,
    ) -> Result<(), LinkError> {
        self.link_mac(purpose, token.account_id, token.expires_ms, bound)
            .verify_slice(&token.signature)
            .map_err(|_| LinkError::Invalid)?;
        if token.expires_ms <= now_ms {
            return Err(LinkError::Expired);
        }
        Ok(())
    }

    fn link_mac(&self, purpose: &str, account_id: i64, expires_ms: i64, bound: &str) -> HmacSha256 {
        self.mac(&[
            b"link",
            purpose.as_bytes(),
            &account_id.to_be_bytes(),
            &expires_ms.to_be_bytes(),
            bound.as_bytes(),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_belong_to_one_session_and_one_key() {
        let s = Signer::new(b"k1");
        let t = s.csrf_token("sid-a");
        assert!(s.check_csrf("sid-a", &t));
        assert!(!s.check_csrf("sid-b", &t));
        assert!(!Signer::new(b"k2").check_csrf("sid-a", &t));
        assert!(!s.check_csrf("sid-a", "garbage!"));
        assert!(!s.check_csrf("sid-a", ""));
    }

    #[test]
    fn links_expire_and_die_when_their_bound_value_changes() {
        let s = Signer::new(b"k");
        let token = s.link_token("reset", 7, 1_000, "hash-1");
        let t = LinkToken::parse(&token).expect("parses");
        assert_eq!(t.account_id, 7);
        assert_eq!(s.check_link("reset", &t, "hash-1", 999), Ok(()));
        assert_eq!(
            s.check_link("reset", &t, "hash-1", 1_000),
            Err(LinkError::Expired)
        );
        assert_eq!(
            s.check_link("reset", &t, "hash-2", 999),
            Err(LinkError::Invalid)
        );
        assert_eq!(
            s.check_link("verify", &t, "hash-1", 999),
            Err(LinkError::Invalid)
        );
        // A longer expiry written into the token breaks the signature.
        let forged = token.replacen("1000", "9999", 1);
        let f = LinkToken::parse(&forged).expect("parses");
        assert_eq!(
            s.check_link("reset", &f, "hash-1", 999),
            Err(LinkError::Invalid)
        );
        assert_eq!(LinkToken::parse("1.2"), Err(LinkError::Invalid));
        assert_eq!(LinkToken::parse("x.2.abc"), Err(LinkError::Invalid));
    }
}
