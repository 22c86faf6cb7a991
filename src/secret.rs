//! A wrapper that keeps secrets (API keys, database passwords, Stripe secrets) out of logs: its
//! `Debug` and `Display` print a placeholder, and the value is reached only by `expose()`.

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself. Call it where the value is used, never where it could be logged.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("sk-relay_abcdef".to_string());
        assert!(!format!("{s:?} {s}").contains("abcdef"));
        assert_eq!(s.expose(), "sk-relay_abcdef");
    }
}
