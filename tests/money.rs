//! Property tests for money: cost arithmetic, rounding, overflow handling and ledger sums.

use duang::money::{MoneyError, NanoUsd, PricePerMtok, Rounding, TokenPrices};
use proptest::prelude::*;

/// The seeds' customer prices in nano-USD per token.
const SEED_PER_TOKEN: [(u64, u64); 3] = [(120, 480), (360, 3000), (3600, 18000)];

fn seed_tier() -> impl Strategy<Value = TokenPrices> {
    prop::sample::select(SEED_PER_TOKEN.to_vec()).prop_map(|(i, o)| TokenPrices {
        input: PricePerMtok::from_nanos_per_mtok(i * 1_000_000),
        output: PricePerMtok::from_nanos_per_mtok(o * 1_000_000),
    })
}

proptest! {
    /// With the seed prices every cost is exact: tokens × per-token price, whatever the rounding.
    #[test]
    fn seed_costs_are_exact(prices in seed_tier(), input in 0u64..10_000_000, output in 0u64..10_000_000) {
        let per_in = prices.input.nanos_per_token().expect("whole nanos per token");
        let per_out = prices.output.nanos_per_token().expect("whole nanos per token");
        let expected = i64::try_from(input * per_in + output * per_out).expect("fits");
        prop_assert_eq!(prices.cost(input, output, Rounding::FavourCustomer)?.nanos(), expected);
        prop_assert_eq!(prices.cost(input, output, Rounding::Conservative)?.nanos(), expected);
    }

    /// For any price, the billed cost is the exact value rounded down, the provider cost rounded up,
    /// and they differ by at most one nano-USD.
    #[test]
    fn rounding_brackets_the_exact_cost(price in 0u64..100_000_000_000, tokens in 0u64..1_000_000_000) {
        let p = PricePerMtok::from_nanos_per_mtok(price);
        let exact_times_mtok = u128::from(price) * u128::from(tokens);
        let down = p.cost(tokens, Rounding::FavourCustomer)?.nanos();
        let up = p.cost(tokens, Rounding::Conservative)?.nanos();
        prop_assert!(u128::try_from(down).expect("non-negative") * 1_000_000 <= exact_times_mtok);
        prop_assert!(u128::try_from(up).expect("non-negative") * 1_000_000 >= exact_times_mtok);
        prop_assert!(up - down <= 1);
    }

    /// More tokens never cost less (so a hold for the worst case always covers the settlement).
    #[test]
    fn cost_is_monotonic(price in 0u64..100_000_000_000, a in 0u64..1_000_000_000, b in 0u64..1_000_000_000) {
        let p = PricePerMtok::from_nanos_per_mtok(price);
        let (lo, hi) = (a.min(b), a.max(b));
        for r in [Rounding::FavourCustomer, Rounding::Conservative] {
            prop_assert!(p.cost(lo, r)? <= p.cost(hi, r)?);
        }
    }

    /// Billing a request in two parts never charges more than billing it whole.
    #[test]
    fn split_billing_never_overcharges(price in 0u64..100_000_000_000, a in 0u64..1_000_000_000, b in 0u64..1_000_000_000) {
        let p = PricePerMtok::from_nanos_per_mtok(price);
        let parts = p.cost(a, Rounding::FavourCustomer)?.checked_add(p.cost(b, Rounding::FavourCustomer)?)?;
        prop_assert!(parts <= p.cost(a + b, Rounding::FavourCustomer)?);
    }

    /// Huge inputs give an overflow error, never a wrapped value and never a panic.
    #[test]
    fn overflow_is_an_error(price in 1u64..=u64::MAX, tokens in 0u64..=u64::MAX) {
        let p = PricePerMtok::from_nanos_per_mtok(price);
        let exact = u128::from(price) * u128::from(tokens) / 1_000_000;
        match p.cost(tokens, Rounding::FavourCustomer) {
            Ok(c) => prop_assert_eq!(u128::try_from(c.nanos()).expect("non-negative"), exact),
            Err(e) => {
                prop_assert_eq!(e, MoneyError::Overflow);
                prop_assert!(exact > i64::MAX as u128);
            }
        }
    }

    /// A ledger sum is the exact integer sum, or an overflow error when that does not fit.
    #[test]
    fn ledger_sums_are_exact_or_refused(entries in prop::collection::vec(any::<i64>(), 0..50)) {
        let exact: i128 = entries.iter().map(|&e| i128::from(e)).sum();
        let amounts = entries.iter().map(|&e| NanoUsd::from_nanos(e));
        match NanoUsd::checked_sum(amounts) {
            Ok(sum) => prop_assert_eq!(i128::from(sum.nanos()), exact),
            // Checked addition fails as soon as a running total leaves the range.
            Err(e) => prop_assert_eq!(e, MoneyError::Overflow),
        }
    }

    /// Small ledgers (realistic amounts) always sum, in any order, to the same balance.
    #[test]
    fn ledger_sum_is_order_independent(mut entries in prop::collection::vec(-1_000_000_000_000i64..1_000_000_000_000, 0..100)) {
        let forward = NanoUsd::checked_sum(entries.iter().map(|&e| NanoUsd::from_nanos(e)))?;
        entries.reverse();
        let backward = NanoUsd::checked_sum(entries.iter().map(|&e| NanoUsd::from_nanos(e)))?;
        prop_assert_eq!(forward, backward);
    }

    /// Formatting then parsing gives back the same amount.
    #[test]
    fn display_round_trips(nanos in any::<i64>().prop_filter("not MIN", |n| *n != i64::MIN)) {
        let a = NanoUsd::from_nanos(nanos);
        let shown = a.to_string().replace(',', "");
        prop_assert_eq!(shown.parse::<NanoUsd>()?, a);
    }

    /// Cents convert exactly and back.
    #[test]
    fn cents_are_exact(cents in -922_337_203_685i64..922_337_203_685) {
        let a = NanoUsd::from_cents(cents)?;
        prop_assert_eq!(a.as_whole_cents(), Some(cents));
    }
}

#[test]
fn cents_overflow_is_refused() {
    assert_eq!(
        NanoUsd::from_cents(i64::MAX / 1000),
        Err(MoneyError::Overflow)
    );
    assert_eq!(
        NanoUsd::from_nanos(i64::MAX).checked_add(NanoUsd::from_nanos(1)),
        Err(MoneyError::Overflow)
    );
    assert_eq!(
        NanoUsd::from_nanos(i64::MIN).checked_neg(),
        Err(MoneyError::Overflow)
    );
}
