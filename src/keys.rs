//! Customer API keys: `sk-relay_` followed by 40 random base62 characters (about 238 bits).
//!
//! Only a SHA-256 hash of the whole key is stored; with that much entropy a fast hash is safe
//! (no dictionary to try) and lets the gateway look a key up in one hash-map probe. A short
//! prefix is kept for display so a customer can tell keys apart.

use crate::secret::Secret;
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "sk-relay_";
const RANDOM_LEN: usize = 40;
/// How many random characters the display prefix shows after `sk-relay_`.
const DISPLAY_CHARS: usize = 6;

/// A freshly made key: the plaintext (shown once) and what the store keeps.
#[derive(Debug)]
pub struct NewKeyMaterial {
    pub plaintext: Secret<String>,
    pub hash: String,
    pub display_prefix: String,
}

pub fn generate() -> NewKeyMaterial {
    let random: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(RANDOM_LEN)
        .map(char::from)
        .collect();
    let plaintext = format!("{KEY_PREFIX}{random}");
    NewKeyMaterial {
        hash: hash(&plaintext),
        display_prefix: format!("{KEY_PREFIX}{}", &random[..DISPLAY_CHARS]),
        plaintext: Secret::new(plaintext),
    }
}

/// The stored form of a key: lowercase hex SHA-256.
pub fn hash(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

/// Whether a presented string has the shape of one of our keys (checked before any look-up).
pub fn looks_like_key(s: &str) -> bool {
    s.strip_prefix(KEY_PREFIX)
        .is_some_and(|r| r.len() == RANDOM_LEN && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_well_formed_and_hashed() {
        let a = generate();
        let b = generate();
        assert_ne!(a.plaintext.expose(), b.plaintext.expose());
        assert!(looks_like_key(a.plaintext.expose()));
        assert_eq!(a.hash, hash(a.plaintext.expose()));
        assert_eq!(a.hash.len(), 64);
        assert!(a.plaintext.expose().starts_with(&a.display_prefix));
        assert!(!looks_like_key("sk-relay_short"));
        assert!(!looks_like_key(
            "sk-other_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        ));
    }
}
