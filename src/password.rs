//! Password hashing with argon2id (the crate's default parameters, a random salt per hash).

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// Shortest password we accept.
pub const MIN_LEN: usize = 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordError {
    #[error("the password is too short: use at least {MIN_LEN} characters")]
    TooShort,
    #[error("the password is too long: use at most 1024 characters")]
    TooLong,
    #[error("the password is too weak: mix letters with digits or symbols")]
    TooWeak,
}

/// Rejects passwords a customer should not be allowed to pick.
pub fn check_strength(password: &str) -> Result<(), PasswordError> {
    let n = password.chars().count();
    if n < MIN_LEN {
        return Err(PasswordError::TooShort);
    }
    if n > 1024 {
        return Err(PasswordError::TooLong);
    }
    let letters = password.chars().any(char::is_alphabetic);
    let others = password.chars().any(|c| !c.is_alphabetic());
    if !(letters && others) {
        return Err(PasswordError::TooWeak);
    }
    Ok(())
}

/// A PHC string (`$argon2id$v=19$...`) for storage.
pub fn hash(password: &str) -> String {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .expect("argon2id with default parameters cannot fail on a valid salt")
}

pub fn verify(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_strength() {
        let h = hash("correct horse 1");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("correct horse 1", &h));
        assert!(!verify("correct horse 2", &h));
        assert_eq!(check_strength("short1"), Err(PasswordError::TooShort));
        assert_eq!(
            check_strength("onlyletterslong"),
            Err(PasswordError::TooWeak)
        );
        assert!(check_strength("letters and 1 digit").is_ok());
    }
}
