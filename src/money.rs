//! Money: integer nano-USD amounts and per-million-token prices.
//!
//! No float ever touches money. The ledger unit is the nano-dollar (10⁻⁹ USD), which makes every
//! seed price an exact whole number per token ($0.12 per million tokens is 120 nano-USD per token).
//! Prices are kept per *million* tokens in nano-USD, so a price with up to nine decimals of a dollar
//! per million tokens is represented exactly; only such a price that is not a whole number of
//! nano-USD per token forces rounding, and the rounding rule lives here, once:
//!
//! * what the customer is **billed** rounds down (the customer never pays for a fraction of a
//!   nano-dollar they did not use; see [`Rounding::FavourCustomer`]);
//! * what the upstream **costs us** rounds up, so the margin an operator sees is never flattering
//!   ([`Rounding::Conservative`]).
//!
//! All arithmetic is checked: an overflow is an error, never a wrap and never a panic.

use std::fmt;
use std::iter::Sum;
use std::str::FromStr;

/// Nano-USD in one US cent.
pub const NANOS_PER_CENT: i64 = 10_000_000;
/// Nano-USD in one US dollar.
pub const NANOS_PER_USD: i64 = 1_000_000_000;
const TOKENS_PER_MTOK: u128 = 1_000_000;

/// Why a money operation could not produce an exact value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount out of range (more than ±$9,223,372,036.85)")]
    Overflow,
    #[error(
        "{0:?} is not a decimal amount in USD (expected digits with an optional '.', e.g. \"0.12\")"
    )]
    NotADecimal(String),
    #[error("{0:?} has more than 9 decimal places (the ledger counts in nano-USD)")]
    TooPrecise(String),
    #[error("{0:?} is negative; a price must be positive")]
    NegativePrice(String),
}

/// A signed amount of money in nano-USD (10⁻⁹ USD). Ledger entries, balances, costs and holds are
/// all of this type.
///
/// ```
/// use duang::money::NanoUsd;
/// let top_up = NanoUsd::from_cents(2_000).unwrap();
/// let spent: NanoUsd = "0.0146484".parse().unwrap();
/// assert_eq!(top_up.checked_sub(spent).unwrap().to_string(), "$19.9853516");
/// ```
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct NanoUsd(i64);

impl NanoUsd {
    pub const ZERO: NanoUsd = NanoUsd(0);

    pub const fn from_nanos(nanos: i64) -> Self {
        NanoUsd(nanos)
    }

    pub const fn nanos(self) -> i64 {
        self.0
    }

    /// Whole US cents (what Stripe charges) as an exact amount.
    pub fn from_cents(cents: i64) -> Result<Self, MoneyError> {
        cents
            .checked_mul(NANOS_PER_CENT)
            .map(NanoUsd)
            .ok_or(MoneyError::Overflow)
    }

    /// The amount rounded to the nearest cent (halves away from zero), as customers read a
    /// balance: `$4.99999496` shows as `$5.00`.
    pub fn rounded_to_cents(self) -> NanoUsd {
        let half = NANOS_PER_CENT / 2;
        let cents = if self.0 >= 0 {
            (self.0 / NANOS_PER_CENT) + i64::from(self.0 % NANOS_PER_CENT >= half)
        } else {
            (self.0 / NANOS_PER_CENT) - i64::from(-(self.0 % NANOS_PER_CENT) >= half)
        };
        NanoUsd(cents * NANOS_PER_CENT)
    }

    /// The amount in whole cents, if it is a whole number of cents.
    pub fn as_whole_cents(self) -> Option<i64> {
        (self.0 % NANOS_PER_CENT == 0).then_some(self.0 / NANOS_PER_CENT)
    }

    pub fn checked_add(self, other: NanoUsd) -> Result<Self, MoneyError> {
        self.0
            .checked_add(other.0)
            .map(NanoUsd)
            .ok_or(MoneyError::Overflow)
    }

    pub fn checked_sub(self, other: NanoUsd) -> Result<Self, MoneyError> {
        self.0
            .checked_sub(other.0)
            .map(NanoUsd)
            .ok_or(MoneyError::Overflow)
    }

    pub fn checked_neg(self) -> Result<Self, MoneyError> {
        self.0
            .checked_neg()
            .map(NanoUsd)
            .ok_or(MoneyError::Overflow)
    }

    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub const fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// Sums amounts exactly, failing instead of wrapping.
    pub fn checked_sum<I: IntoIterator<Item = NanoUsd>>(items: I) -> Result<Self, MoneyError> {
        items
            .into_iter()
            .try_fold(NanoUsd::ZERO, |acc, x| acc.checked_add(x))
    }
}

/// Parses a decimal USD amount such as `12`, `12.5`, `-0.000000120` exactly.
impl FromStr for NanoUsd {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let (negative, digits) = match trimmed.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, trimmed.strip_prefix('$').unwrap_or(trimmed)),
        };
        let digits = digits.strip_prefix('$').unwrap_or(digits);
        let magnitude = parse_nanos(digits, s)?;
        let value = if negative { -magnitude } else { magnitude };
        i64::try_from(value)
            .map(NanoUsd)
            .map_err(|_| MoneyError::Overflow)
    }
}

/// Parses unsigned decimal dollars into nano-dollars (as i128 so callers choose the range).
fn parse_nanos(digits: &str, original: &str) -> Result<i128, MoneyError> {
    let bad = || MoneyError::NotADecimal(original.to_owned());
    let (whole, frac) = match digits.split_once('.') {
        Some((w, f)) => (w, f),
        None => (digits, ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if digits.ends_with('.') {
        return Err(bad());
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > 9 {
        return Err(MoneyError::TooPrecise(original.to_owned()));
    }
    // At most 20 significant whole digits fit comfortably in i128 after scaling.
    let whole = whole.trim_start_matches('0');
    if whole.len() > 20 {
        return Err(MoneyError::Overflow);
    }
    let whole: i128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let mut frac_nanos: i128 = 0;
    for (i, b) in frac.bytes().enumerate() {
        frac_nanos += i128::from(b - b'0') * 10i128.pow(8 - i as u32);
    }
    Ok(whole * i128::from(NANOS_PER_USD) + frac_nanos)
}

impl NanoUsd {
    /// The sign, whole dollars and fraction (at least two decimals, no trailing zeros beyond).
    fn parts(self) -> (&'static str, u64, String) {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let mut frac_str = format!("{:09}", abs % NANOS_PER_USD as u64);
        while frac_str.len() > 2 && frac_str.ends_with('0') {
            frac_str.pop();
        }
        (sign, abs / NANOS_PER_USD as u64, frac_str)
    }

    /// A plain decimal for machines: `1.50`, `-0.00000012`, `1234.00` (no `$`, no grouping).
    pub fn decimal(self) -> String {
        let (sign, whole, frac) = self.parts();
        format!("{sign}{whole}.{frac}")
    }
}

/// `$1.50`, `-$0.00000012`, `$1,234.00`: exact, at least two decimals, no trailing zeros beyond.
impl fmt::Display for NanoUsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sign, whole, frac) = self.parts();
        write!(f, "{sign}${}.{frac}", group_thousands(whole))
    }
}

fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl Sum for NanoUsd {
    /// Panics on overflow; use [`NanoUsd::checked_sum`] where the inputs are not bounded.
    fn sum<I: Iterator<Item = NanoUsd>>(iter: I) -> Self {
        NanoUsd::checked_sum(iter).expect("sum of amounts overflowed i64 nano-USD")
    }
}

/// Which way a cost that is not a whole number of nano-USD is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Round down: for everything the customer is billed or held for.
    FavourCustomer,
    /// Round up: for what an upstream provider charges us.
    Conservative,
}

/// A price per million tokens, in nano-USD (so `$0.12 / 1M tokens` is 120,000,000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PricePerMtok(u64);

impl PricePerMtok {
    pub const fn from_nanos_per_mtok(nanos: u64) -> Self {
        PricePerMtok(nanos)
    }

    pub const fn nanos_per_mtok(self) -> u64 {
        self.0
    }

    /// The exact per-token price in nano-USD, when the price is a whole number of them.
    pub fn nanos_per_token(self) -> Option<u64> {
        self.0
            .is_multiple_of(1_000_000)
            .then_some(self.0 / 1_000_000)
    }

    /// The cost of `tokens` tokens, rounded as asked.
    pub fn cost(self, tokens: u64, rounding: Rounding) -> Result<NanoUsd, MoneyError> {
        // u64 × u64 always fits in u128 (an i128 could overflow at the extremes).
        let product = u128::from(tokens) * u128::from(self.0);
        let whole = product / TOKENS_PER_MTOK;
        let rem = product % TOKENS_PER_MTOK;
        let rounded = match rounding {
            Rounding::FavourCustomer => whole,
            Rounding::Conservative if rem > 0 => whole + 1,
            Rounding::Conservative => whole,
        };
        i64::try_from(rounded)
            .map(NanoUsd)
            .map_err(|_| MoneyError::Overflow)
    }

    /// As USD per million tokens, e.g. `0.12`, for display and for the `/v1/models` pricing.
    pub fn usd_per_mtok_string(self) -> String {
        NanoUsd(i64::try_from(self.0).unwrap_or(i64::MAX)).decimal()
    }
}

/// Parses a positive decimal USD-per-million-tokens price such as `"0.12"` or `"18"`.
impl FromStr for PricePerMtok {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        if trimmed.starts_with('-') {
            return Err(MoneyError::NegativePrice(s.to_owned()));
        }
        let nanos = parse_nanos(trimmed.strip_prefix('$').unwrap_or(trimmed), s)?;
        u64::try_from(nanos)
            .map(PricePerMtok)
            .map_err(|_| MoneyError::Overflow)
    }
}

/// Input and output prices of one tier (the customer's rate) or one upstream model (our cost).
///
/// ```
/// use duang::money::{Rounding, TokenPrices};
/// // The premium tier: $3.60 in, $18.00 out per million tokens.
/// let premium = TokenPrices { input: "3.60".parse().unwrap(), output: "18.00".parse().unwrap() };
/// let cost = premium.cost(1_234, 567, Rounding::FavourCustomer).unwrap();
/// assert_eq!(cost.nanos(), 1_234 * 3_600 + 567 * 18_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPrices {
    pub input: PricePerMtok,
    pub output: PricePerMtok,
}

/// Prompt-cache prices of one upstream model (our cost) or one tier (the customer's rate; a
/// tier has no cache-write price: writes are billed as fresh input). `None`: as fresh input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachePrices {
    pub cached_input: Option<PricePerMtok>,
    pub cache_write: Option<PricePerMtok>,
}

/// A request's tokens by price: `input` counts all input, `cached_input` and `cache_write`
/// among it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
}

impl TokenPrices {
    /// The cost of tokens some of whose input came from, or went to, a prompt cache: each
    /// price's tokens rounded as asked, then added, all checked. Tokens at the same price are
    /// rounded together, so without cache prices this is exactly [`TokenPrices::cost`].
    pub fn cost_with_cache(
        &self,
        cache: &CachePrices,
        t: TokenCounts,
        rounding: Rounding,
    ) -> Result<NanoUsd, MoneyError> {
        let cached = t.cached_input.min(t.input);
        let written = t.cache_write.min(t.input - cached);
        let mut fresh = t.input - cached - written;
        let mut total = NanoUsd::ZERO;
        for (price, tokens) in [(cache.cached_input, cached), (cache.cache_write, written)] {
            match price {
                Some(p) if p != self.input => {
                    total = total.checked_add(p.cost(tokens, rounding)?)?;
                }
                _ => fresh += tokens,
            }
        }
        total
            .checked_add(self.input.cost(fresh, rounding)?)?
            .checked_add(self.output.cost(t.output, rounding)?)
    }

    /// The cost of one request's tokens: each side rounded as asked, then added, all checked.
    pub fn cost(
        &self,
        input_tokens: u64,
        output_tokens: u64,
        rounding: Rounding,
    ) -> Result<NanoUsd, MoneyError> {
        self.input
            .cost(input_tokens, rounding)?
            .checked_add(self.output.cost(output_tokens, rounding)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_the_nearest_cent() {
        for (exact, shown) in [
            ("4.99999496", "$5.00"),
            ("4.994", "$4.99"),
            ("4.995", "$5.00"),
            ("0.00000012", "$0.00"),
            ("-2.505", "-$2.51"),
            ("1234.5", "$1,234.50"),
        ] {
            let n: NanoUsd = exact.parse().expect("usd");
            assert_eq!(n.rounded_to_cents().to_string(), shown, "{exact}");
        }
    }

    #[test]
    fn cache_prices_price_their_tokens_and_nothing_else() {
        let tier = TokenPrices {
            input: "3.60".parse().expect("p"),
            output: "18".parse().expect("p"),
        };
        let t = TokenCounts {
            input: 1_001,
            cached_input: 400,
            cache_write: 100,
            output: 7,
        };
        // Without cache prices: exactly the plain cost, rounded as one.
        for r in [Rounding::FavourCustomer, Rounding::Conservative] {
            assert_eq!(
                tier.cost_with_cache(&CachePrices::default(), t, r),
                tier.cost(1_001, 7, r)
            );
        }
        let cache = CachePrices {
            cached_input: Some("0.30".parse().expect("p")),
            cache_write: Some("4.50".parse().expect("p")),
        };
        assert_eq!(
            tier.cost_with_cache(&cache, t, Rounding::FavourCustomer)
                .expect("cost")
                .nanos(),
            501 * 3_600 + 400 * 300 + 100 * 4_500 + 7 * 18_000
        );
        // Counts that claim more cached input than input are capped by it.
        let over = TokenCounts {
            input: 10,
            cached_input: 50,
            cache_write: 50,
            output: 0,
        };
        assert_eq!(
            tier.cost_with_cache(&cache, over, Rounding::FavourCustomer)
                .expect("cost")
                .nanos(),
            10 * 300
        );
    }

    fn p(s: &str) -> PricePerMtok {
        s.parse().expect("valid price")
    }

    #[test]
    fn seed_prices_are_exact_per_token() {
        let cases = [
            ("0.12", 120),
            ("0.48", 480),
            ("0.36", 360),
            ("3.00", 3000),
            ("3.60", 3600),
            ("18.00", 18000),
        ];
        for (price, per_token) in cases {
            assert_eq!(p(price).nanos_per_token(), Some(per_token), "{price}");
        }
    }

    #[test]
    fn premium_request_cost_is_exact() {
        let premium = TokenPrices {
            input: p("3.60"),
            output: p("18.00"),
        };
        // 1,234 input and 567 output tokens: 1234*3600 + 567*18000 nano-USD.
        let cost = premium
            .cost(1234, 567, Rounding::FavourCustomer)
            .expect("fits");
        assert_eq!(cost.nanos(), 1234 * 3600 + 567 * 18000);
        assert_eq!(cost.to_string(), "$0.0146484");
    }

    #[test]
    fn rounding_directions() {
        let odd = p("0.0000005"); // half a nano-USD per million tokens... per token 5e-7 nano
        assert_eq!(
            odd.cost(1, Rounding::FavourCustomer).expect("fits").nanos(),
            0
        );
        assert_eq!(
            odd.cost(1, Rounding::Conservative).expect("fits").nanos(),
            1
        );
    }

    #[test]
    fn formats_usd() {
        assert_eq!(NanoUsd::from_nanos(1_500_000_000).to_string(), "$1.50");
        assert_eq!(NanoUsd::from_nanos(-120).to_string(), "-$0.00000012");
        assert_eq!(NanoUsd::ZERO.to_string(), "$0.00");
        assert_eq!(
            NanoUsd::from_nanos(-1_234_500_000_000).decimal(),
            "-1234.50"
        );
        assert_eq!(NanoUsd::from_nanos(120).decimal(), "0.00000012");
        assert_eq!(
            NanoUsd::from_cents(123_456_789).expect("fits").to_string(),
            "$1,234,567.89"
        );
    }

    #[test]
    fn parses_usd() {
        assert_eq!(
            "10".parse::<NanoUsd>().expect("ok").nanos(),
            10 * NANOS_PER_USD
        );
        assert_eq!(
            "-0.5".parse::<NanoUsd>().expect("ok").nanos(),
            -NANOS_PER_USD / 2
        );
        assert_eq!(
            "$0.25".parse::<NanoUsd>().expect("ok").nanos(),
            NANOS_PER_USD / 4
        );
        for bad in ["", ".", "1.", "abc", "1.2.3", "--1", "1e3", " - 1"] {
            assert!(bad.parse::<NanoUsd>().is_err(), "{bad:?} should not parse");
        }
        assert_eq!(
            "0.0000000001".parse::<NanoUsd>(),
            Err(MoneyError::TooPrecise("0.0000000001".into()))
        );
        assert_eq!("99999999999".parse::<NanoUsd>(), Err(MoneyError::Overflow));
    }

    #[test]
    fn price_rejects_negative() {
        assert!(matches!(
            "-0.12".parse::<PricePerMtok>(),
            Err(MoneyError::NegativePrice(_))
        ));
        assert_eq!(p("0.12").usd_per_mtok_string(), "0.12");
        assert_eq!(p("18").usd_per_mtok_string(), "18.00");
    }
}
