//! E-mail addresses: one normal form (trimmed, lowercase) and a deliberately plain validity check
//! (one `@`, a local part, a dotted domain, no spaces) that the mailer's own parser must accept
//! too, so no account is made for an address no mail can reach. Real proof of an address is the
//! verification mail, not a regex.

/// Trims and lowercases an address so `Ann@Example.com` and `ann@example.com` are one account.
pub fn normalize(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

pub fn is_valid(email: &str) -> bool {
    let e = email.trim();
    if e.len() > 254 || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = e.split_once('@') else {
        return false;
    };
    e.parse::<lettre::Address>().is_ok()
        && !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        for ok in ["a@b.co", "Ann.Lee+relay@Example.com", " x@y.io "] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "a@",
            "@b.co",
            "a@b",
            "a@@b.co",
            "a b@c.co",
            "a@b..co",
            "a@.b.co",
            "a@b.co.",
            "<script>x</script>@example.com",
            "a\"b@example.com",
            "a,b@example.com",
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
        assert_eq!(normalize(" Ann@Example.COM "), "ann@example.com");
    }
}
