//! The store's contract for usage at scale, on SQLite and on a real PostgreSQL: hourly roll-ups
//! always equal the sums over the raw rows (after batches, replays, duplicates, platform losses
//! and concurrent writers), the migration backfills them from existing rows (and on PostgreSQL
//! moves the rows into monthly partitions), and retention removes only old raw rows, in batches
//! or whole partitions, keeping the roll-ups.

mod support;

use duang::conf::Backend;
use duang::money::NanoUsd;
use duang::store::{LedgerKind, NewAccount, NewLedgerEntry, Role, Settlement, Store, UsageRecord};
use sqlx::Row;
use std::time::Duration;
use support::{TestStore, on_both_stores};

on_both_stores!(
    rollups_equal_the_rows_after_batches_replays_and_losses,
    concurrent_writers_keep_rollups_exact,
    the_migration_backfills_rollups_from_existing_rows,
    retention_removes_old_rows_and_keeps_rollups,
);

const DAY_MS: i64 = 86_400_000;

/// A verified account with $1,000 of credit.
async fn account(store: &Store, email: &str) -> i64 {
    let id = store
        .create_account(&NewAccount {
            email: email.into(),
            password_hash: None,
            role: Role::Customer,
            verified: true,
        })
        .await
        .expect("account")
        .id;
    store
        .append_ledger(&NewLedgerEntry {
            account_id: id,
            kind: LedgerKind::TopUp,
            amount: NanoUsd::from_nanos(1_000_000_000_000),
            external_ref: format!("cs_{email}"),
            actor: None,
            reason: None,
        })
        .await
        .expect("top-up");
    id
}

/// A varied record: tiers, upstreams (or none), statuses, fallbacks, first tokens and token
/// details all change with `n`.
fn record(n: u64, account_id: i64, key_id: i64, started_at: i64) -> UsageRecord {
    let x = n
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407)
        >> 33;
    let (tier, provider, model) = match x % 5 {
        0 => ("budget", Some("gemini"), Some("gemini-2.5-flash-lite")),
        1 => ("budget", Some("openai"), Some("gpt-4.1-nano")),
        2 => ("standard", Some("openai"), Some("gpt-4.1-mini")),
        3 => ("premium", Some("anthropic"), Some("claude-sonnet-4-5")),
        _ => ("premium", None, None),
    };
    let status = match x % 7 {
        0 => 502,
        1 => 402,
        2 if provider.is_some() => 500,
        _ => 200,
    };
    let input = (x % 3000) as i64;
    let output = (x % 700) as i64;
    UsageRecord {
        request_id: format!("req_{account_id}_{n}"),
        account_id,
        key_id,
        tier: tier.into(),
        provider: provider.map(Into::into),
        upstream_model: model.map(Into::into),
        stream: x.is_multiple_of(2),
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: input / 4,
        cache_write_tokens: input / 8,
        reasoning_tokens: output / 3,
        provider_cost: NanoUsd::from_nanos(input * 100 + output * 400),
        billed: NanoUsd::from_nanos(input * 120 + output * 480),
        http_status: status,
        error_code: (status != 200).then(|| "upstream_error".into()),
        attempts: 1 + i64::from(x.is_multiple_of(4)),
        latency_ms: (x % 5000) as i64,
        ttft_ms: (!x.is_multiple_of(3)).then_some((x % 900) as i64),
        started_at,
        finished_at: started_at + 10,
    }
}

fn settled(r: &UsageRecord) -> Settlement {
    Settlement {
        billed: r.billed,
        over_hold: NanoUsd::ZERO,
        capped: false,
        record: r.clone(),
    }
}

/// The roll-up columns computed from the raw rows (what the migration's backfill computes).
const RAW_HOURLY: &str =
    "SELECT (started_at / 3600000) * 3600000 AS hour_ms, account_id, key_id, tier,
        COALESCE(provider, '') AS provider, COALESCE(upstream_model, '') AS upstream_model,
        CAST(COUNT(*) AS BIGINT),
        CAST(SUM(CASE WHEN http_status < 200 OR http_status > 299 THEN 1 ELSE 0 END) AS BIGINT),
        CAST(SUM(CASE WHEN http_status >= 500 THEN 1 ELSE 0 END) AS BIGINT),
        CAST(SUM(CASE WHEN attempts > 1 THEN 1 ELSE 0 END) AS BIGINT),
        CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(output_tokens) AS BIGINT),
        CAST(SUM(cached_input_tokens) AS BIGINT), CAST(SUM(cache_write_tokens) AS BIGINT),
        CAST(SUM(reasoning_tokens) AS BIGINT), CAST(SUM(billed_nano) AS BIGINT),
        CAST(SUM(provider_cost_nano) AS BIGINT), CAST(SUM(platform_loss_nano) AS BIGINT),
        CAST(SUM(latency_ms) AS BIGINT), CAST(COUNT(ttft_ms) AS BIGINT),
        CAST(COALESCE(SUM(ttft_ms), 0) AS BIGINT),
        MAX(CASE WHEN http_status >= 500 THEN started_at END)
    FROM usage_records
    GROUP BY (started_at / 3600000) * 3600000, account_id, key_id, tier,
             COALESCE(provider, ''), COALESCE(upstream_model, '')
    ORDER BY 1, 2, 3, 4, 5, 6";

const SUMS: &str = "requests, failed, server_errors, fallbacks, input_tokens, output_tokens,
    cached_input_tokens, cache_write_tokens, reasoning_tokens, billed_nano, provider_cost_nano,
    platform_loss_nano, latency_ms_sum, ttft_count, ttft_ms_sum, last_error_at";

/// Rows as text: `keys` leading text-or-integer columns, then integers (the last may be NULL).
async fn rows(store: &Store, sql: &str, ints: usize, texts: usize) -> Vec<String> {
    sqlx::query(sql)
        .fetch_all(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| {
            let mut out = Vec::new();
            for i in 0..ints {
                out.push(r.get::<i64, _>(i).to_string());
            }
            for i in ints..ints + texts {
                out.push(r.get::<String, _>(i));
            }
            for i in ints + texts..r.len() {
                out.push(format!("{:?}", r.get::<Option<i64>, _>(i)));
            }
            out.join(" ")
        })
        .collect()
}

async fn hourly(store: &Store) -> Vec<String> {
    rows(
        store,
        &format!(
            "SELECT hour_ms, account_id, key_id, tier, provider, upstream_model, {SUMS}
             FROM usage_hourly ORDER BY 1, 2, 3, 4, 5, 6"
        ),
        3,
        3,
    )
    .await
}

/// The roll-ups equal the raw rows, and the platform roll-ups equal the account roll-ups.
async fn assert_rollups_exact(store: &Store) {
    let from_rows = rows(store, RAW_HOURLY, 3, 3).await;
    assert!(!from_rows.is_empty());
    assert_eq!(hourly(store).await, from_rows);
    let summed = rows(
        store,
        "SELECT hour_ms, tier, provider, upstream_model,
                CAST(SUM(requests) AS BIGINT), CAST(SUM(failed) AS BIGINT),
                CAST(SUM(server_errors) AS BIGINT), CAST(SUM(fallbacks) AS BIGINT),
                CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(output_tokens) AS BIGINT),
                CAST(SUM(cached_input_tokens) AS BIGINT), CAST(SUM(cache_write_tokens) AS BIGINT),
                CAST(SUM(reasoning_tokens) AS BIGINT), CAST(SUM(billed_nano) AS BIGINT),
                CAST(SUM(provider_cost_nano) AS BIGINT), CAST(SUM(platform_loss_nano) AS BIGINT),
                CAST(SUM(latency_ms_sum) AS BIGINT), CAST(SUM(ttft_count) AS BIGINT),
                CAST(SUM(ttft_ms_sum) AS BIGINT), MAX(last_error_at)
         FROM usage_hourly GROUP BY hour_ms, tier, provider, upstream_model ORDER BY 1, 2, 3, 4",
        1,
        3,
    )
    .await;
    let platform = rows(
        store,
        &format!(
            "SELECT hour_ms, tier, provider, upstream_model, {SUMS}
             FROM usage_hourly_platform ORDER BY 1, 2, 3, 4"
        ),
        1,
        3,
    )
    .await;
    assert_eq!(platform, summed);
}

async fn rollups_equal_the_rows_after_batches_replays_and_losses(backend: Backend) {
    let t = TestStore::new(backend).await;
    let store = &t.store;
    let a = account(store, "ada@example.com").await;
    let b = account(store, "bo@example.com").await;
    let (_, ka1) = support::new_key(store, a).await;
    let (_, ka2) = support::new_key(store, a).await;
    let (_, kb) = support::new_key(store, b).await;
    let t0 = 1_780_000_000_000;
    let all: Vec<UsageRecord> = (0..600)
        .map(|n| {
            let (acc, key) = [(a, ka1), (a, ka2), (b, kb)][n as usize % 3];
            record(n, acc, key, t0 + n as i64 * 37_000)
        })
        .collect();
    // Half through the gateway's settlement path, half through plain usage batches.
    let (settle, plain) = all.split_at(300);
    let settlements: Vec<Settlement> = settle.iter().map(settled).collect();
    for chunk in settlements.chunks(200) {
        store.settle_batch("node-a", chunk).await.expect("settle");
    }
    assert_eq!(store.insert_usage_batch(plain).await.expect("insert"), 300);
    assert_rollups_exact(store).await;
    let before = hourly(store).await;

    // Replays: a retried batch, a journal replayed on another node, a batch overlapping an
    // earlier one, and a request id twice in one batch. Nothing is counted twice.
    store
        .settle_batch("node-a", &settlements[..200])
        .await
        .expect("retry");
    store
        .settle_batch("node-b", &settlements[100..300])
        .await
        .expect("replay");
    assert_eq!(store.insert_usage_batch(plain).await.expect("again"), 0);
    assert_eq!(hourly(store).await, before);
    let twice = record(10_000, a, ka1, t0);
    assert_eq!(
        store
            .insert_usage_batch(&[twice.clone(), twice.clone()])
            .await
            .expect("twice"),
        1
    );
    let thrice = record(10_001, b, kb, t0 + 5);
    store
        .settle_batch("node-a", &[settled(&thrice), settled(&thrice)])
        .await
        .expect("twice in one batch");
    assert_rollups_exact(store).await;

    // Usage the balance cannot pay: the stored row keeps what was billed, the rest is a
    // platform loss, and the roll-up says the same.
    let poor = store
        .create_account(&NewAccount {
            email: "cy@example.com".into(),
            password_hash: None,
            role: Role::Customer,
            verified: true,
        })
        .await
        .expect("account")
        .id;
    let (_, kp) = support::new_key(store, poor).await;
    let mut lost = record(20_000, poor, kp, t0 + 60_000);
    lost.http_status = 200;
    lost.billed = NanoUsd::from_nanos(1_000_000);
    store
        .settle_batch(
            "node-a",
            &[Settlement {
                billed: NanoUsd::ZERO,
                over_hold: lost.billed,
                capped: false,
                record: lost,
            }],
        )
        .await
        .expect("settle a loss");
    assert_rollups_exact(store).await;
    assert_eq!(
        store.platform_loss(poor).await.expect("loss"),
        NanoUsd::from_nanos(1_000_000)
    );

    // What the pages read agrees with the raw rows.
    let spent: i64 = sqlx::query_scalar(
        "SELECT CAST(SUM(billed_nano) AS BIGINT) FROM usage_records WHERE key_id = $1",
    )
    .bind(ka1)
    .fetch_one(store.pool())
    .await
    .expect("raw spend");
    assert_eq!(
        store.key_spent(&[ka1]).await.expect("key spent"),
        vec![(ka1, NanoUsd::from_nanos(spent))]
    );
    assert_eq!(store.cap_use(ka1).await.expect("cap").spent.nanos(), spent);
    let days = store
        .usage_daily(a, t0 - t0 % DAY_MS, t0 - t0 % DAY_MS + 2 * DAY_MS)
        .await
        .expect("daily");
    let raw_requests: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE account_id = $1")
            .bind(a)
            .fetch_one(store.pool())
            .await
            .expect("raw count");
    assert_eq!(days.iter().map(|d| d.requests).sum::<i64>(), raw_requests);
    let stats = store.upstream_stats(t0).await.expect("upstreams");
    let raw_upstream: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE provider IS NOT NULL")
            .fetch_one(store.pool())
            .await
            .expect("raw count");
    assert_eq!(stats.iter().map(|s| s.requests).sum::<i64>(), raw_upstream);
}

/// Four gateway nodes settle overlapping hours and tiers at once: no deadlock, nothing lost.
async fn concurrent_writers_keep_rollups_exact(backend: Backend) {
    let t = TestStore::new(backend).await;
    let a = account(&t.store, "dee@example.com").await;
    let (_, key) = support::new_key(&t.store, a).await;
    let t0 = 1_780_000_000_000;
    let mut tasks = Vec::new();
    for node in 0..4u64 {
        let store = t.store.clone();
        tasks.push(tokio::spawn(async move {
            for batch in 0..5u64 {
                let settlements: Vec<Settlement> = (0..40u64)
                    .map(|i| {
                        let n = node * 1_000 + batch * 100 + i;
                        settled(&record(n, a, key, t0 + (i as i64 % 8) * 900_000))
                    })
                    .collect();
                store
                    .settle_batch(&format!("node-{node}"), &settlements)
                    .await
                    .expect("settle");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    assert_rollups_exact(&t.store).await;
    let requests: i64 =
        sqlx::query_scalar("SELECT CAST(SUM(requests) AS BIGINT) FROM usage_hourly")
            .fetch_one(t.store.pool())
            .await
            .expect("sum");
    assert_eq!(requests, 800);
}

/// A database with the migrations before roll-ups, rows written the old way, then migrated.
async fn the_migration_backfills_rollups_from_existing_rows(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let (url, pg) = match backend {
        Backend::Sqlite => (
            format!("sqlite://{}", dir.path().join("old.db").display()),
            None,
        ),
        Backend::Postgres => {
            let db = support::create_pg_database().await;
            (support::pg_url_for(&db), Some(PgDrop(db)))
        }
    };
    let store = Store::connect(&support::store_conf(&url, backend))
        .await
        .expect("connect");
    let folder = match backend {
        Backend::Sqlite => "migrations/sqlite",
        Backend::Postgres => "migrations/postgres",
    };
    let mut before =
        sqlx::migrate::Migrator::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(folder))
            .await
            .expect("migrations");
    let at = before
        .migrations
        .iter()
        .position(|m| m.version == 10)
        .expect("migration 10");
    before.migrations = before.migrations[..at].to_vec().into();
    before.run(store.pool()).await.expect("migrate to 9");

    let a = account(&store, "eve@example.com").await;
    let (_, key) = support::new_key(&store, a).await;
    let t0 = 1_700_000_000_000; // 2023-11-14, and every 17 hours for 85 days
    let old: Vec<UsageRecord> = (0..120)
        .map(|n| record(n, a, key, t0 + n as i64 * 17 * 3_600_000))
        .collect();
    for r in &old {
        sqlx::query(
            "INSERT INTO usage_records (request_id, account_id, key_id, tier, provider,
                 upstream_model, stream, input_tokens, output_tokens, provider_cost_nano,
                 billed_nano, http_status, error_code, attempts, latency_ms, ttft_ms, started_at,
                 finished_at, created_at, cached_input_tokens, cache_write_tokens, reasoning_tokens)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                 $18, $18, $19, $20, $21)",
        )
        .bind(&r.request_id)
        .bind(r.account_id)
        .bind(r.key_id)
        .bind(&r.tier)
        .bind(r.provider.as_deref())
        .bind(r.upstream_model.as_deref())
        .bind(i64::from(r.stream))
        .bind(r.input_tokens)
        .bind(r.output_tokens)
        .bind(r.provider_cost.nanos())
        .bind(r.billed.nanos())
        .bind(r.http_status)
        .bind(r.error_code.as_deref())
        .bind(r.attempts)
        .bind(r.latency_ms)
        .bind(r.ttft_ms)
        .bind(r.started_at)
        .bind(r.finished_at)
        .bind(r.cached_input_tokens)
        .bind(r.cache_write_tokens)
        .bind(r.reasoning_tokens)
        .execute(store.pool())
        .await
        .expect("old row");
    }
    // 0010 (the roll-ups and their backfill), and whatever came after it.
    assert!(store.migrate().await.expect("migrate") >= 1);
    assert_rollups_exact(&store).await;
    assert_eq!(
        store.usage_page(a, None, 1000).await.expect("rows").len(),
        120
    );
    // New rows are written as before, with their roll-ups, and old ones are still refused twice.
    let new = record(500, a, key, t0 + 200 * 3_600_000);
    assert_eq!(
        store
            .insert_usage_batch(&[new, old[7].clone()])
            .await
            .expect("insert"),
        1
    );
    assert_rollups_exact(&store).await;
    if backend == Backend::Postgres {
        let parts: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT CAST(tableoid::regclass AS TEXT) FROM usage_records ORDER BY 1",
        )
        .fetch_all(store.pool())
        .await
        .expect("partitions");
        assert_eq!(
            parts,
            [
                "usage_records_202311",
                "usage_records_202312",
                "usage_records_202401",
                "usage_records_202402"
            ]
        );
    }
    store.close().await;
    drop(pg);
}

struct PgDrop(String);

impl Drop for PgDrop {
    fn drop(&mut self) {
        support::drop_pg_database(std::mem::take(&mut self.0));
    }
}

async fn retention_removes_old_rows_and_keeps_rollups(backend: Backend) {
    let t = TestStore::new(backend).await;
    let store = &t.store;
    let a = account(store, "fay@example.com").await;
    let (_, key) = support::new_key(store, a).await;
    let day = |d: &str| duang::time::parse_date(d).expect("date");
    let now = day("2026-06-15");
    let mut rows = Vec::new();
    for i in 0..6 {
        rows.push(record(i, a, key, day("2026-01-10") + i as i64 * 60_000));
    }
    for i in 6..10 {
        rows.push(record(i, a, key, day("2026-03-05") + i as i64 * 60_000));
    }
    for i in 10..13 {
        rows.push(record(i, a, key, day("2026-06-01") + i as i64 * 60_000));
    }
    assert_eq!(store.insert_usage_batch(&rows).await.expect("rows"), 13);
    let rollups = hourly(store).await;
    let spent = store.key_spent(&[key]).await.expect("spent");

    let report = store
        .apply_usage_retention(
            now,
            Some(Duration::from_secs(90 * 86_400)),
            4,
            Duration::ZERO,
        )
        .await
        .expect("retention");
    let left: Vec<String> = store
        .usage_page(a, None, 100)
        .await
        .expect("rows")
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    let ids = |r: std::ops::Range<u64>| -> Vec<String> {
        r.rev().map(|n| format!("req_{a}_{n}")).collect()
    };
    match backend {
        Backend::Sqlite => {
            // Rows older than 90 days before `now` (2026-03-17) go, four per statement.
            assert_eq!((report.rows_deleted, report.batches), (10, 3));
            assert_eq!(left, ids(10..13));
        }
        Backend::Postgres => {
            // Whole months go: January's partition is dropped; March's ends after the cutoff
            // and stays whole. The rows that had landed in the default partition were moved
            // into their months' partitions first.
            assert_eq!(report.partitions_dropped, 1);
            assert_eq!(report.rows_deleted, 0);
            assert!(
                report
                    .partitions
                    .contains(&"usage_records_202606".to_owned())
                    && report
                        .partitions
                        .contains(&"usage_records_202608".to_owned()),
                "{:?}",
                report.partitions
            );
            assert_eq!(left, ids(6..13));
            let default_rows: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM usage_records_default")
                    .fetch_one(store.pool())
                    .await
                    .expect("default");
            assert_eq!(default_rows, 0);
            let january: Option<String> =
                sqlx::query_scalar("SELECT CAST(to_regclass('usage_records_202601') AS TEXT)")
                    .fetch_one(store.pool())
                    .await
                    .expect("regclass");
            assert_eq!(january, None);
        }
    }
    // The roll-ups, and what is read from them, are untouched.
    assert_eq!(hourly(store).await, rollups);
    assert_eq!(store.key_spent(&[key]).await.expect("spent"), spent);
    // A second run has nothing left to do; keeping forever removes nothing.
    let again = store
        .apply_usage_retention(
            now,
            Some(Duration::from_secs(90 * 86_400)),
            4,
            Duration::ZERO,
        )
        .await
        .expect("again");
    assert_eq!((again.rows_deleted, again.partitions_dropped), (0, 0));
    let forever = store
        .apply_usage_retention(now + 1000 * DAY_MS, None, 4, Duration::ZERO)
        .await
        .expect("forever");
    assert_eq!((forever.rows_deleted, forever.partitions_dropped), (0, 0));
    assert_eq!(
        store.usage_page(a, None, 100).await.expect("rows").len(),
        left.len()
    );
}
