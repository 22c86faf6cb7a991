-- Usage at scale (issue #16): hourly roll-ups that the charts and reports read instead of the
-- raw rows, and indexes for the retention task and the per-account request log. Keep in step
-- with ../postgres/0010_usage_rollups.sql (which also partitions usage_records by month).
--
-- A roll-up row sums the usage records of one UTC hour (of `started_at`) for one account, key,
-- tier and upstream (provider and model; '' when no upstream was chosen). The usage writer adds
-- each batch's new records to it in the transaction that inserts them, so the roll-ups always
-- equal the sums over the rows, until retention deletes old rows (the roll-ups stay).
CREATE TABLE usage_hourly (
    hour_ms              INTEGER NOT NULL,
    account_id           INTEGER NOT NULL,
    key_id               INTEGER NOT NULL,
    tier                 TEXT    NOT NULL,
    provider             TEXT    NOT NULL,
    upstream_model       TEXT    NOT NULL,
    requests             INTEGER NOT NULL,
    -- Answers outside 2xx; and of them, 500 or more (no upstream answer included).
    failed               INTEGER NOT NULL,
    server_errors        INTEGER NOT NULL,
    -- Requests that needed more than one upstream.
    fallbacks            INTEGER NOT NULL,
    input_tokens         INTEGER NOT NULL,
    output_tokens        INTEGER NOT NULL,
    cached_input_tokens  INTEGER NOT NULL,
    cache_write_tokens   INTEGER NOT NULL,
    reasoning_tokens     INTEGER NOT NULL,
    billed_nano          INTEGER NOT NULL,
    provider_cost_nano   INTEGER NOT NULL,
    platform_loss_nano   INTEGER NOT NULL,
    latency_ms_sum       INTEGER NOT NULL,
    -- Of requests with a first token: how many, and their times' sum.
    ttft_count           INTEGER NOT NULL,
    ttft_ms_sum          INTEGER NOT NULL,
    -- The start of the hour's last request answered 500 or more.
    last_error_at        INTEGER,
    PRIMARY KEY (hour_ms, account_id, key_id, tier, provider, upstream_model)
);
CREATE INDEX usage_hourly_account ON usage_hourly (account_id, hour_ms);
CREATE INDEX usage_hourly_key ON usage_hourly (key_id, hour_ms);

-- The same sums over every account, per hour, tier and upstream: what the operator's revenue and
-- upstream pages read, so their cost does not grow with the number of customers.
CREATE TABLE usage_hourly_platform (
    hour_ms              INTEGER NOT NULL,
    tier                 TEXT    NOT NULL,
    provider             TEXT    NOT NULL,
    upstream_model       TEXT    NOT NULL,
    requests             INTEGER NOT NULL,
    failed               INTEGER NOT NULL,
    server_errors        INTEGER NOT NULL,
    fallbacks            INTEGER NOT NULL,
    input_tokens         INTEGER NOT NULL,
    output_tokens        INTEGER NOT NULL,
    cached_input_tokens  INTEGER NOT NULL,
    cache_write_tokens   INTEGER NOT NULL,
    reasoning_tokens     INTEGER NOT NULL,
    billed_nano          INTEGER NOT NULL,
    provider_cost_nano   INTEGER NOT NULL,
    platform_loss_nano   INTEGER NOT NULL,
    latency_ms_sum       INTEGER NOT NULL,
    ttft_count           INTEGER NOT NULL,
    ttft_ms_sum          INTEGER NOT NULL,
    last_error_at        INTEGER,
    PRIMARY KEY (hour_ms, tier, provider, upstream_model)
);

-- Backfill from the rows already stored.
INSERT INTO usage_hourly
SELECT (started_at / 3600000) * 3600000, account_id, key_id, tier,
       COALESCE(provider, ''), COALESCE(upstream_model, ''),
       COUNT(*),
       SUM(CASE WHEN http_status < 200 OR http_status > 299 THEN 1 ELSE 0 END),
       SUM(CASE WHEN http_status >= 500 THEN 1 ELSE 0 END),
       SUM(CASE WHEN attempts > 1 THEN 1 ELSE 0 END),
       SUM(input_tokens), SUM(output_tokens), SUM(cached_input_tokens),
       SUM(cache_write_tokens), SUM(reasoning_tokens),
       SUM(billed_nano), SUM(provider_cost_nano), SUM(platform_loss_nano),
       SUM(latency_ms), COUNT(ttft_ms), COALESCE(SUM(ttft_ms), 0),
       MAX(CASE WHEN http_status >= 500 THEN started_at END)
FROM usage_records
GROUP BY (started_at / 3600000) * 3600000, account_id, key_id, tier,
         COALESCE(provider, ''), COALESCE(upstream_model, '');

INSERT INTO usage_hourly_platform
SELECT hour_ms, tier, provider, upstream_model,
       SUM(requests), SUM(failed), SUM(server_errors), SUM(fallbacks),
       SUM(input_tokens), SUM(output_tokens), SUM(cached_input_tokens),
       SUM(cache_write_tokens), SUM(reasoning_tokens),
       SUM(billed_nano), SUM(provider_cost_nano), SUM(platform_loss_nano),
       SUM(latency_ms_sum), SUM(ttft_count), SUM(ttft_ms_sum), MAX(last_error_at)
FROM usage_hourly
GROUP BY hour_ms, tier, provider, upstream_model;

-- The request log pages an account's rows by start time (newest first, the id breaking ties);
-- retention and the operator's export walk all rows by start time.
DROP INDEX usage_account_created;
-- Nothing reads usage by key any more (key spend comes from the roll-ups): one index fewer to
-- write per request.
DROP INDEX usage_key_created;
CREATE INDEX usage_account_started ON usage_records (account_id, started_at, id);
CREATE INDEX usage_started ON usage_records (started_at);

-- The operator's exports for accounting walk the ledger and the audit log by time.
CREATE INDEX ledger_created ON ledger (created_at);
CREATE INDEX audit_created ON audit_log (created_at);
