//! The store's contract: one suite, run against SQLite and against a real PostgreSQL server.
//! Every case runs on both backends, so the repository layer behaves the same on each.

mod support;

use duang::conf::Backend;
use duang::money::NanoUsd;
use duang::store::{
    AccountRef, AccountStatus, KeyStatus, LedgerKind, NewAccount, NewKey, NewLedgerEntry, Role,
    Settlement, Store, StoreError, UsageRecord,
};
use support::TestStore;

fn usd(s: &str) -> NanoUsd {
    s.parse().expect("valid amount")
}

async fn account(store: &Store, email: &str) -> i64 {
    store
        .create_account(&NewAccount {
            email: email.into(),
            password_hash: None,
            role: Role::Customer,
            verified: false,
        })
        .await
        .expect("account created")
        .id
}

fn entry(account_id: i64, kind: LedgerKind, amount: &str, reference: &str) -> NewLedgerEntry {
    NewLedgerEntry {
        account_id,
        kind,
        amount: usd(amount),
        external_ref: reference.into(),
        actor: Some("test".into()),
        reason: Some("test".into()),
    }
}

async fn ledger_rows(store: &Store) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT COUNT(*) FROM ledger")
        .fetch_one(store.pool())
        .await
        .expect("count")
        .get(0)
}

/// Generates one `#[tokio::test]` per backend for each contract case.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let t = super::TestStore::new(super::Backend::Sqlite).await;
                    super::$case(&t.store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let t = super::TestStore::new(super::Backend::Postgres).await;
                    super::$case(&t.store).await;
                }
            )*
        }
    };
}

contract!(
    migrations_are_idempotent,
    accounts_are_unique_by_normalized_email,
    malformed_email_writes_nothing,
    verification_and_status_with_audit,
    terminated_account_stays_terminated,
    keys_are_stored_by_hash_and_revoked_once,
    key_for_missing_account_is_refused,
    ledger_moves_balance_and_proves_it,
    ledger_refuses_duplicates_overdrafts_and_bad_entries,
    ledger_is_append_only,
    concurrent_debits_never_overdraw,
    overflow_is_refused_not_wrapped,
    usage_batches_are_idempotent_and_paged,
    stripe_events_and_sessions_are_unique,
    leases_move_credit_and_settlement_debits_them,
    concurrent_leases_never_exceed_the_balance,
);

async fn migrations_are_idempotent(store: &Store) {
    assert_eq!(store.migrate().await.expect("migrate again"), 0);
}

async fn accounts_are_unique_by_normalized_email(store: &Store) {
    let id = account(store, "Ann@Example.com").await;
    let a = store
        .account(&AccountRef::Email("ann@example.COM".into()))
        .await
        .expect("found by any case");
    assert_eq!(a.id, id);
    assert_eq!(a.email, "ann@example.com");
    assert_eq!(a.balance, NanoUsd::ZERO);
    assert_eq!(a.status, AccountStatus::Active);
    assert!(!a.is_verified());
    let dup = store
        .create_account(&NewAccount {
            email: " ANN@example.com ".into(),
            password_hash: None,
            role: Role::Operator,
            verified: true,
        })
        .await;
    assert!(matches!(dup, Err(StoreError::DuplicateEmail(e)) if e == "ann@example.com"));
    assert!(matches!(
        store.account(&AccountRef::Id(id + 1000)).await,
        Err(StoreError::NotFound {
            what: "account",
            ..
        })
    ));
}

async fn malformed_email_writes_nothing(store: &Store) {
    let r = store
        .create_account(&NewAccount {
            email: "not-an-email".into(),
            password_hash: None,
            role: Role::Customer,
            verified: false,
        })
        .await;
    assert!(matches!(r, Err(StoreError::Invalid(_))));
    assert!(
        store
            .search_accounts("", 10)
            .await
            .expect("list")
            .is_empty()
    );
}

async fn verification_and_status_with_audit(store: &Store) {
    let id = account(store, "bo@example.com").await;
    let verified = store.mark_verified(id).await.expect("verify");
    let first = verified.email_verified_at.expect("verified time");
    // Verifying again keeps the first time.
    assert_eq!(
        store
            .mark_verified(id)
            .await
            .expect("again")
            .email_verified_at,
        Some(first)
    );

    let a = store
        .set_account_status(id, AccountStatus::Suspended, "op", Some("abuse report #1"))
        .await
        .expect("suspend");
    assert_eq!(a.status, AccountStatus::Suspended);
    store
        .set_account_status(id, AccountStatus::Active, "op", None)
        .await
        .expect("reactivate");
    let log = store.audit_log(id).await.expect("audit");
    let actions: Vec<_> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["account.active", "account.suspended"]);
    assert_eq!(log[1].reason.as_deref(), Some("abuse report #1"));
    assert_eq!(log[1].actor, "op");
}

async fn terminated_account_stays_terminated(store: &Store) {
    let id = account(store, "cy@example.com").await;
    store
        .set_account_status(id, AccountStatus::Terminated, "op", Some("fraud"))
        .await
        .expect("terminate");
    let r = store
        .set_account_status(id, AccountStatus::Active, "op", None)
        .await;
    assert!(matches!(r, Err(StoreError::Invalid(m)) if m.contains("terminated")));
    assert_eq!(store.audit_log(id).await.expect("audit").len(), 1);
    // No new keys for a terminated account.
    let r = store
        .create_key(
            &NewKey {
                account_id: id,
                name: "k".into(),
                ..Default::default()
            },
            "h",
            "p",
        )
        .await;
    assert!(matches!(r, Err(StoreError::NotFound { .. })));
}

async fn keys_are_stored_by_hash_and_revoked_once(store: &Store) {
    let id = account(store, "di@example.com").await;
    let material = duang::keys::generate();
    let key = store
        .create_key(
            &NewKey {
                account_id: id,
                name: "laptop".into(),
                allowed_models: Some(vec!["budget".into(), "premium".into()]),
                spend_cap: Some(usd("5")),
                ..Default::default()
            },
            &material.hash,
            &material.display_prefix,
        )
        .await
        .expect("key created");
    assert_eq!(key.status, KeyStatus::Active);
    assert!(key.is_usable_at(duang::time::now_ms()));
    assert_eq!(
        key.allowed_models.as_deref(),
        Some(&["budget".to_string(), "premium".to_string()][..])
    );
    assert_eq!(key.spend_cap, Some(usd("5")));

    // The plaintext is nowhere in the store; the hash finds the key.
    use sqlx::Row;
    let stored: String = sqlx::query("SELECT key_hash FROM api_keys WHERE id = $1")
        .bind(key.id)
        .fetch_one(store.pool())
        .await
        .expect("row")
        .get(0);
    assert_ne!(&stored, material.plaintext.expose());
    let found = store
        .key_by_hash(&duang::keys::hash(material.plaintext.expose()))
        .await
        .expect("lookup")
        .expect("found");
    assert_eq!(found.id, key.id);
    assert!(
        store
            .key_by_hash(&duang::keys::hash("sk-relay_nope"))
            .await
            .expect("lookup")
            .is_none()
    );

    store.touch_key(key.id, 1_000).await.expect("touch");
    store
        .touch_key(key.id, 500)
        .await
        .expect("older touch is ignored");
    assert_eq!(
        store.key(key.id).await.expect("key").last_used_at,
        Some(1_000)
    );

    let revoked = store
        .revoke_key(key.id, "op", Some("leaked"))
        .await
        .expect("revoke");
    assert_eq!(revoked.status, KeyStatus::Revoked);
    assert!(!revoked.is_usable_at(duang::time::now_ms()));
    assert!(matches!(
        store.revoke_key(key.id, "op", None).await,
        Err(StoreError::KeyRevoked(k)) if k == key.id
    ));
    assert!(matches!(
        store.revoke_key(key.id + 1000, "op", None).await,
        Err(StoreError::NotFound { what: "key", .. })
    ));
    let listed = store.list_keys(id).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, KeyStatus::Revoked);
    assert_eq!(
        store.audit_log(id).await.expect("audit")[0].action,
        "key.revoke"
    );
}

async fn key_for_missing_account_is_refused(store: &Store) {
    let r = store
        .create_key(
            &NewKey {
                account_id: 4242,
                name: "x".into(),
                ..Default::default()
            },
            "h",
            "p",
        )
        .await;
    assert!(matches!(r, Err(StoreError::NotFound { .. })));
    let id = account(store, "ed@example.com").await;
    let bad = NewKey {
        account_id: id,
        name: "  ".into(),
        ..Default::default()
    };
    assert!(matches!(
        store.create_key(&bad, "h", "p").await,
        Err(StoreError::Invalid(_))
    ));
    assert!(store.list_keys(id).await.expect("list").is_empty());
}

async fn ledger_moves_balance_and_proves_it(store: &Store) {
    let id = account(store, "flo@example.com").await;
    store
        .append_ledger(&entry(id, LedgerKind::TopUp, "20", "cs_1"))
        .await
        .expect("top-up");
    store
        .append_ledger(&entry(id, LedgerKind::Usage, "-0.000014648", "req_1"))
        .await
        .expect("usage");
    store
        .append_ledger(&entry(id, LedgerKind::Adjustment, "-1.5", "adj_1"))
        .await
        .expect("adjust");
    store
        .append_ledger(&entry(id, LedgerKind::Refund, "-5", "re_1"))
        .await
        .expect("refund");
    let proof = store.balance_proof(id).await.expect("proof");
    assert_eq!(proof.cached, usd("13.499985352"));
    assert_eq!(proof.ledger_sum, proof.cached);
    assert_eq!(proof.entries, 4);
    assert!(proof.holds());
    assert!(store.reconcile().await.expect("reconcile").is_empty());
    let ledger = store.ledger(id, 10).await.expect("ledger");
    assert_eq!(ledger.len(), 4);
    assert_eq!(
        NanoUsd::checked_sum(ledger.iter().map(|e| e.amount)).expect("sum"),
        proof.cached
    );

    // A cached balance edited behind the ledger's back is caught by reconcile.
    sqlx::query("UPDATE accounts SET balance_nano = balance_nano + 1 WHERE id = $1")
        .bind(id)
        .execute(store.pool())
        .await
        .expect("tamper");
    let bad = store.reconcile().await.expect("reconcile");
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].account_id, id);
    assert!(!store.balance_proof(id).await.expect("proof").holds());
}

async fn ledger_refuses_duplicates_overdrafts_and_bad_entries(store: &Store) {
    let id = account(store, "gus@example.com").await;
    store
        .append_ledger(&entry(id, LedgerKind::TopUp, "10", "cs_dup"))
        .await
        .expect("top-up");
    let again = store
        .append_ledger(&entry(id, LedgerKind::TopUp, "10", "cs_dup"))
        .await;
    assert!(matches!(again, Err(StoreError::DuplicateReference(r)) if r == "cs_dup"));
    let over = store
        .append_ledger(&entry(id, LedgerKind::Usage, "-10.000000001", "req_x"))
        .await;
    match over {
        Err(StoreError::InsufficientBalance { needed, available }) => {
            assert_eq!(needed, usd("10.000000001"));
            assert_eq!(available, usd("10"));
        }
        other => panic!("expected insufficient balance, got {other:?}"),
    }
    for (kind, amount, why) in [
        (LedgerKind::TopUp, "-1", "negative top-up"),
        (LedgerKind::Usage, "1", "positive usage"),
        (LedgerKind::Refund, "2", "positive refund"),
        (LedgerKind::Adjustment, "0.000000000", "zero"),
    ] {
        let r = store
            .append_ledger(&entry(id, kind, amount, &format!("bad_{why}")))
            .await;
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{why}: {r:?}");
    }
    let mut no_reason = entry(id, LedgerKind::Adjustment, "-1", "adj_noreason");
    no_reason.reason = None;
    assert!(matches!(
        store.append_ledger(&no_reason).await,
        Err(StoreError::Invalid(_))
    ));
    let missing = store
        .append_ledger(&entry(id + 99, LedgerKind::TopUp, "1", "cs_missing"))
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound { .. })));
    // Nothing above was written.
    assert_eq!(ledger_rows(store).await, 1);
    assert_eq!(
        store.balance_proof(id).await.expect("proof").cached,
        usd("10")
    );
}

async fn ledger_is_append_only(store: &Store) {
    let id = account(store, "hal@example.com").await;
    store
        .append_ledger(&entry(id, LedgerKind::TopUp, "1", "cs_ao"))
        .await
        .expect("top-up");
    let update = sqlx::query("UPDATE ledger SET amount_nano = 999")
        .execute(store.pool())
        .await;
    assert!(update.is_err(), "UPDATE on the ledger must be refused");
    let delete = sqlx::query("DELETE FROM ledger")
        .execute(store.pool())
        .await;
    assert!(delete.is_err(), "DELETE on the ledger must be refused");
    assert_eq!(ledger_rows(store).await, 1);
}

/// 200 debits of $1 race against a $10 balance: exactly ten land, the balance ends at zero and
/// never goes below it, and the ledger proves it.
async fn concurrent_debits_never_overdraw(store: &Store) {
    let id = account(store, "ivy@example.com").await;
    store
        .append_ledger(&entry(id, LedgerKind::TopUp, "10", "cs_race"))
        .await
        .expect("top-up");
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append_ledger(&entry(
                        id,
                        LedgerKind::Usage,
                        "-1",
                        &format!("req_race_{i}"),
                    ))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => ok += 1,
            Err(StoreError::InsufficientBalance { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok, 10);
    let proof = store.balance_proof(id).await.expect("proof");
    assert_eq!(proof.cached, NanoUsd::ZERO);
    assert!(proof.holds());
    assert_eq!(proof.entries, 11);
}

async fn overflow_is_refused_not_wrapped(store: &Store) {
    let id = account(store, "jo@example.com").await;
    let big = NanoUsd::from_nanos(i64::MAX - 5);
    store
        .append_ledger(&NewLedgerEntry {
            amount: big,
            ..entry(id, LedgerKind::TopUp, "1", "cs_big")
        })
        .await
        .expect("largest balance");
    let r = store
        .append_ledger(&NewLedgerEntry {
            amount: NanoUsd::from_nanos(10),
            ..entry(id, LedgerKind::TopUp, "1", "cs_over")
        })
        .await;
    assert!(matches!(r, Err(StoreError::Money(_))), "{r:?}");
    assert_eq!(store.balance_proof(id).await.expect("proof").cached, big);
}

fn usage(request_id: &str, account_id: i64, key_id: i64, started_at: i64) -> UsageRecord {
    UsageRecord {
        request_id: request_id.into(),
        account_id,
        key_id,
        tier: "premium".into(),
        provider: Some("anthropic".into()),
        upstream_model: Some("claude-sonnet-4-5".into()),
        stream: true,
        input_tokens: 1234,
        output_tokens: 567,
        cached_input_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        provider_cost: NanoUsd::from_nanos(1234 * 3000 + 567 * 15000),
        billed: NanoUsd::from_nanos(1234 * 3600 + 567 * 18000),
        http_status: 200,
        error_code: None,
        attempts: 1,
        latency_ms: 840,
        ttft_ms: Some(120),
        started_at,
        finished_at: started_at + 840,
    }
}

async fn usage_batches_are_idempotent_and_paged(store: &Store) {
    let id = account(store, "kim@example.com").await;
    let (_, key_id) = support::new_key(store, id).await;
    let batch: Vec<_> = (0..5)
        .map(|i| usage(&format!("req_{i}"), id, key_id, 1_000 + i))
        .collect();
    assert_eq!(store.insert_usage_batch(&batch).await.expect("batch"), 5);
    // The same batch again (a retry after a lost acknowledgement) records nothing twice.
    assert_eq!(store.insert_usage_batch(&batch).await.expect("retry"), 0);
    let page1 = store.usage_page(id, None, 3).await.expect("page 1");
    assert_eq!(
        page1
            .iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        ["req_4", "req_3", "req_2"]
    );
    assert_eq!(page1[0], batch[4]);
    let page2 = store
        .usage_page(id, Some(page1[2].started_at), 3)
        .await
        .expect("page 2");
    assert_eq!(
        page2
            .iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        ["req_1", "req_0"]
    );
}

async fn stripe_events_and_sessions_are_unique(store: &Store) {
    let id = account(store, "lu@example.com").await;
    assert!(
        store
            .record_stripe_event("evt_1", "checkout.session.completed")
            .await
            .expect("first")
    );
    assert!(
        !store
            .record_stripe_event("evt_1", "checkout.session.completed")
            .await
            .expect("replay")
    );
    store
        .record_checkout_session("cs_test_1", id, 2000, "usd")
        .await
        .expect("session");
    assert!(matches!(
        store
            .record_checkout_session("cs_test_1", id, 2000, "usd")
            .await,
        Err(StoreError::Invalid(_))
    ));
}

async fn leases_move_credit_and_settlement_debits_them(store: &Store) {
    let id = account(store, "mo@example.com").await;
    let (_, key_id) = support::new_key(store, id).await;
    store
        .append_ledger(&entry(id, LedgerKind::TopUp, "3", "cs_lease"))
        .await
        .expect("top-up");
    // Asking for more than the balance grants what there is; the proof still holds.
    assert_eq!(
        store
            .take_lease(id, "node-a", usd("2"))
            .await
            .expect("lease"),
        usd("2")
    );
    assert_eq!(
        store
            .take_lease(id, "node-a", usd("5"))
            .await
            .expect("lease"),
        usd("1")
    );
    assert_eq!(
        store
            .take_lease(id, "node-a", usd("1"))
            .await
            .expect("lease"),
        NanoUsd::ZERO
    );
    let proof = store.balance_proof(id).await.expect("proof");
    assert_eq!((proof.cached, proof.leased), (usd("3"), usd("3")));
    assert!(proof.holds());

    // Settling debits the lease and writes the ledger entry and the usage record together.
    let mut record = usage("req_lease_1", id, key_id, 5_000);
    record.billed = usd("0.25");
    let batch = [Settlement {
        billed: usd("0.25"),
        over_hold: NanoUsd::ZERO,
        capped: false,
        record: record.clone(),
    }];
    store.settle_batch("node-a", &batch).await.expect("settle");
    // The same batch again (lost acknowledgement) bills nothing twice.
    store.settle_batch("node-a", &batch).await.expect("retry");
    assert_eq!(store.lease(id, "node-a").await.expect("lease"), usd("2.75"));
    let proof = store.balance_proof(id).await.expect("proof");
    assert_eq!(
        (proof.cached, proof.ledger_sum, proof.entries),
        (usd("2.75"), usd("2.75"), 2)
    );
    assert_eq!(
        store.usage_page(id, None, 10).await.expect("usage"),
        vec![record]
    );

    // Returning part, then the rest (as a restarted node does).
    assert_eq!(
        store
            .return_lease(id, "node-a", Some(usd("0.75")))
            .await
            .expect("return"),
        usd("0.75")
    );
    assert_eq!(
        store
            .return_node_leases("node-a")
            .await
            .expect("return all"),
        (1, usd("2"))
    );
    assert_eq!(
        store.lease(id, "node-a").await.expect("lease"),
        NanoUsd::ZERO
    );
    let proof = store.balance_proof(id).await.expect("proof");
    assert_eq!((proof.cached, proof.leased), (usd("2.75"), NanoUsd::ZERO));

    // Usage the lease cannot cover (the lease was swept, or the cost passed the hold) is taken
    // from the balance; what the balance cannot pay either is a platform loss, never a debt.
    store
        .take_lease(id, "node-a", usd("1"))
        .await
        .expect("lease");
    let mut above = usage("req_lease_2", id, key_id, 6_000);
    above.billed = usd("2.5");
    store
        .settle_batch(
            "node-a",
            &[Settlement {
                billed: usd("1.5"),
                over_hold: usd("1"),
                capped: false,
                record: above,
            }],
        )
        .await
        .expect("settle above the lease");
    assert_eq!(
        store.lease(id, "node-a").await.expect("lease"),
        NanoUsd::ZERO
    );
    let proof = store.balance_proof(id).await.expect("proof");
    assert_eq!((proof.cached, proof.ledger_sum), (usd("0.25"), usd("0.25")));
    let mut beyond = usage("req_lease_3", id, key_id, 7_000);
    beyond.billed = usd("1");
    store
        .settle_batch(
            "node-b",
            &[Settlement {
                billed: NanoUsd::ZERO,
                over_hold: usd("1"),
                capped: false,
                record: beyond,
            }],
        )
        .await
        .expect("settle beyond the balance");
    let proof = store.balance_proof(id).await.expect("proof");
    assert!(proof.holds(), "{proof:?}");
    assert_eq!(proof.cached, NanoUsd::ZERO);
    let records = store.usage_page(id, None, 10).await.expect("usage");
    let billed: Vec<(String, NanoUsd)> = records
        .iter()
        .map(|r| (r.request_id.clone(), r.billed))
        .collect();
    assert!(
        billed.contains(&("req_lease_2".into(), usd("2.5"))),
        "{billed:?}"
    );
    assert!(
        billed.contains(&("req_lease_3".into(), usd("0.25"))),
        "only what the balance could pay is billed: {billed:?}"
    );
    assert!(store.reconcile().await.expect("reconcile").is_empty());
}

/// Two nodes race for leases against a $10 balance: together they never get more than $10.
async fn concurrent_leases_never_exceed_the_balance(store: &Store) {
    let id = account(store, "ned@example.com").await;
    store
        .append_ledger(&entry(id, LedgerKind::TopUp, "10", "cs_lease_race"))
        .await
        .expect("top-up");
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = store.clone();
            let node = if i % 2 == 0 { "node-a" } else { "node-b" };
            tokio::spawn(async move {
                store
                    .take_lease(id, node, "0.75".parse().expect("amount"))
                    .await
            })
        })
        .collect();
    let mut granted = NanoUsd::ZERO;
    for t in tasks {
        granted = granted
            .checked_add(t.await.expect("task").expect("lease"))
            .expect("sum");
    }
    assert_eq!(granted, usd("10"));
    let total = store
        .lease(id, "node-a")
        .await
        .expect("a")
        .checked_add(store.lease(id, "node-b").await.expect("b"))
        .expect("sum");
    assert_eq!(total, usd("10"));
    let proof = store.balance_proof(id).await.expect("proof");
    assert!(proof.holds());
    assert_eq!(
        store
            .account(&AccountRef::Id(id))
            .await
            .expect("account")
            .balance,
        NanoUsd::ZERO
    );
}
