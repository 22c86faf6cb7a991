//! Time-based one-time passwords (RFC 6238 over RFC 4226's HOTP: HMAC-SHA1, 30-second steps,
//! six digits, the parameters every authenticator app reads from an `otpauth://` link) and the
//! one-time recovery codes that stand in for a lost phone.

use data_encoding::BASE32_NOPAD;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Seconds per step.
pub const STEP_S: i64 = 30;
/// Steps either side of now a code may come from (a phone's clock one step off still works).
pub const SKEW_STEPS: i64 = 1;
const DIGITS: u32 = 6;
/// How many recovery codes an enrolment hands out.
pub const RECOVERY_CODES: usize = 10;

/// A shared secret: 160 random bits (RFC 4226's recommended length).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 20]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    pub fn generate() -> Secret {
        Secret(rand::random())
    }

    /// From the base32 text [`Secret::base32`] wrote (spaces and case ignored).
    pub fn from_base32(text: &str) -> Option<Secret> {
        let clean: String = text
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let bytes = BASE32_NOPAD.decode(clean.as_bytes()).ok()?;
        bytes.try_into().ok().map(Secret)
    }

    /// RFC 4648 base32 without padding: what apps take when typed in (32 letters and digits).
    pub fn base32(&self) -> String {
        BASE32_NOPAD.encode(&self.0)
    }

    /// The HOTP value for counter `step` (RFC 4226, section 5.3).
    pub fn code_at(&self, step: i64) -> u32 {
        let mut mac = Hmac::<Sha1>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(&(step as u64).to_be_bytes());
        let h = mac.finalize().into_bytes();
        let offset = (h[19] & 0x0f) as usize;
        let bin = u32::from_be_bytes([h[offset], h[offset + 1], h[offset + 2], h[offset + 3]])
            & 0x7fff_ffff;
        bin % 10u32.pow(DIGITS)
    }

    /// The step within [`SKEW_STEPS`] of `now_s` whose code is `code`, if any. The caller must
    /// still refuse a step already used (a replayed code).
    pub fn matching_step(&self, code: &str, now_s: i64) -> Option<i64> {
        let code = parse_code(code)?;
        let now = now_s.div_euclid(STEP_S);
        (now - SKEW_STEPS..=now + SKEW_STEPS).find(|&step| {
            // Constant time per candidate: compare all digits, not the first that differs.
            let want = format!("{:06}", self.code_at(step));
            let got = format!("{code:06}");
            want.bytes()
                .zip(got.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        })
    }

    /// The `otpauth://` link an authenticator app scans (as a QR code) or opens.
    pub fn uri(&self, issuer: &str, account: &str) -> String {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        // The label's colon separates issuer and account; `+` is a space only in queries.
        let label = format!("{}:{}", enc(issuer), enc(account)).replace('+', "%20");
        format!(
            "otpauth://totp/{label}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_S}",
            self.base32(),
            enc(issuer).replace('+', "%20"),
        )
    }
}

/// Six digits, spaces allowed between them (`123 456`).
fn parse_code(code: &str) -> Option<u32> {
    let digits: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    (digits.len() == DIGITS as usize && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Whether `code` looks like a TOTP code (six digits) rather than a recovery code.
pub fn is_totp_code(code: &str) -> bool {
    parse_code(code).is_some()
}

/// Fresh recovery codes, shown once: ten of `xxxxx-xxxxx` (50 random bits each, lower-case
/// base32 without the letters people misread).
pub fn recovery_codes() -> Vec<String> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let raw: [u8; 7] = rand::random();
            let text = BASE32_NOPAD.encode(&raw).to_ascii_lowercase();
            format!("{}-{}", &text[..5], &text[5..10])
        })
        .collect()
}

/// What is stored of a recovery code: the SHA-256 of its letters, lower case, without spaces
/// or dashes (enough for a random code; the codes are never stored as typed).
pub fn recovery_hash(code: &str) -> String {
    let clean: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    hex::encode(Sha256::digest(clean.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238, appendix B: the SHA-1 rows (the key is "12345678901234567890"; the RFC prints
    /// eight digits, apps use the last six).
    #[test]
    fn matches_the_rfc_test_vectors() {
        let s = Secret(*b"12345678901234567890");
        for (t, eight) in [
            (59_i64, 94287082_u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(s.code_at(t / STEP_S), eight % 1_000_000, "t = {t}");
        }
    }

    #[test]
    fn accepts_one_step_of_skew_and_no_more() {
        let s = Secret::generate();
        let now = 1_700_000_000;
        let step = now / STEP_S;
        for (d, ok) in [(-2, false), (-1, true), (0, true), (1, true), (2, false)] {
            let code = format!("{:06}", s.code_at(step + d));
            assert_eq!(
                s.matching_step(&code, now).is_some(),
                ok || s.code_at(step + d) == s.code_at(step),
                "skew {d}"
            );
        }
        let code = format!("{:06}", s.code_at(step));
        let spaced = format!("{} {}", &code[..3], &code[3..]);
        assert_eq!(s.matching_step(&spaced, now), Some(step));
        assert_eq!(s.matching_step("12345", now), None);
        assert_eq!(s.matching_step("abcdef", now), None);
    }

    #[test]
    fn secrets_and_recovery_codes_round_trip() {
        let s = Secret::generate();
        let text = s.base32();
        assert_eq!(text.len(), 32);
        assert_eq!(Secret::from_base32(&text.to_lowercase()), Some(s.clone()));
        assert!(Secret::from_base32("AAAA").is_none());
        let uri = s.uri("Duang Duang", "a@example.com");
        assert!(uri.starts_with("otpauth://totp/Duang%20Duang:a%40example.com?secret="));
        let codes = recovery_codes();
        assert_eq!(codes.len(), RECOVERY_CODES);
        assert!(codes.iter().all(|c| c.len() == 11 && !is_totp_code(c)));
        assert_eq!(
            recovery_hash(&codes[0]),
            recovery_hash(&codes[0].to_uppercase().replace('-', " "))
        );
    }
}
