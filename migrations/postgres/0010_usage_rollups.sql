-- Usage at scale (issue #16): hourly roll-ups that the charts and reports read instead of the
-- raw rows, and usage_records partitioned by month so retention drops whole partitions. Keep
-- the roll-ups and indexes in step with ../sqlite/0010_usage_rollups.sql.
--
-- A roll-up row sums the usage records of one UTC hour (of `started_at`) for one account, key,
-- tier and upstream (provider and model; '' when no upstream was chosen). The usage writer adds
-- each batch's new records to it in the transaction that inserts them, so the roll-ups always
-- equal the sums over the rows, until retention deletes old rows (the roll-ups stay).
CREATE TABLE usage_hourly (
    hour_ms              BIGINT  NOT NULL,
    account_id           BIGINT  NOT NULL,
    key_id               BIGINT  NOT NULL,
    tier                 TEXT    NOT NULL,
    provider             TEXT    NOT NULL,
    upstream_model       TEXT    NOT NULL,
    requests             BIGINT  NOT NULL,
    -- Answers outside 2xx; and of them, 500 or more (no upstream answer included).
    failed               BIGINT  NOT NULL,
    server_errors        BIGINT  NOT NULL,
    -- Requests that needed more than one upstream.
    fallbacks            BIGINT  NOT NULL,
    input_tokens         BIGINT  NOT NULL,
    output_tokens        BIGINT  NOT NULL,
    cached_input_tokens  BIGINT  NOT NULL,
    cache_write_tokens   BIGINT  NOT NULL,
    reasoning_tokens     BIGINT  NOT NULL,
    billed_nano          BIGINT  NOT NULL,
    provider_cost_nano   BIGINT  NOT NULL,
    platform_loss_nano   BIGINT  NOT NULL,
    latency_ms_sum       BIGINT  NOT NULL,
    -- Of requests with a first token: how many, and their times' sum.
    ttft_count           BIGINT  NOT NULL,
    ttft_ms_sum          BIGINT  NOT NULL,
    -- The start of the hour's last request answered 500 or more.
    last_error_at        BIGINT,
    PRIMARY KEY (hour_ms, account_id, key_id, tier, provider, upstream_model)
);
CREATE INDEX usage_hourly_account ON usage_hourly (account_id, hour_ms);
CREATE INDEX usage_hourly_key ON usage_hourly (key_id, hour_ms);

-- The same sums over every account, per hour, tier and upstream: what the operator's revenue and
-- upstream pages read, so their cost does not grow with the number of customers.
CREATE TABLE usage_hourly_platform (
    hour_ms              BIGINT  NOT NULL,
    tier                 TEXT    NOT NULL,
    provider             TEXT    NOT NULL,
    upstream_model       TEXT    NOT NULL,
    requests             BIGINT  NOT NULL,
    failed               BIGINT  NOT NULL,
    server_errors        BIGINT  NOT NULL,
    fallbacks            BIGINT  NOT NULL,
    input_tokens         BIGINT  NOT NULL,
    output_tokens        BIGINT  NOT NULL,
    cached_input_tokens  BIGINT  NOT NULL,
    cache_write_tokens   BIGINT  NOT NULL,
    reasoning_tokens     BIGINT  NOT NULL,
    billed_nano          BIGINT  NOT NULL,
    provider_cost_nano   BIGINT  NOT NULL,
    platform_loss_nano   BIGINT  NOT NULL,
    latency_ms_sum       BIGINT  NOT NULL,
    ttft_count           BIGINT  NOT NULL,
    ttft_ms_sum          BIGINT  NOT NULL,
    last_error_at        BIGINT,
    PRIMARY KEY (hour_ms, tier, provider, upstream_model)
);

-- Backfill from the rows already stored (in this migration's transaction only: memory enough to
-- group millions of rows by hashing instead of sorting on disk).
SET LOCAL work_mem = '256MB';
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
GROUP BY 1, 2, 3, 4, 5, 6;

INSERT INTO usage_hourly_platform
SELECT hour_ms, tier, provider, upstream_model,
       SUM(requests), SUM(failed), SUM(server_errors), SUM(fallbacks),
       SUM(input_tokens), SUM(output_tokens), SUM(cached_input_tokens),
       SUM(cache_write_tokens), SUM(reasoning_tokens),
       SUM(billed_nano), SUM(provider_cost_nano), SUM(platform_loss_nano),
       SUM(latency_ms_sum), SUM(ttft_count), SUM(ttft_ms_sum), MAX(last_error_at)
FROM usage_hourly
GROUP BY hour_ms, tier, provider, upstream_model;

-- usage_records, partitioned by month of started_at (UTC), so that retention drops a month's
-- partition instead of deleting its rows one by one. A partitioned table's unique constraints
-- must include the partition key, so request ids are unique together with started_at: a
-- settlement written twice (a retried batch, a replayed journal) carries the same request id
-- and the same started_at, and is skipped as before (README, "Store").
ALTER TABLE usage_records RENAME TO usage_records_unpartitioned;
ALTER TABLE usage_records_unpartitioned RENAME CONSTRAINT usage_records_pkey TO usage_records_unpartitioned_pkey;
ALTER TABLE usage_records_unpartitioned RENAME CONSTRAINT usage_records_request_id_key TO usage_records_unpartitioned_request_id_key;
ALTER SEQUENCE usage_records_id_seq RENAME TO usage_records_unpartitioned_id_seq;
DROP INDEX usage_account_created;
DROP INDEX usage_key_created;

CREATE TABLE usage_records (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY,
    request_id           TEXT    NOT NULL,
    account_id           BIGINT  NOT NULL REFERENCES accounts (id),
    key_id               BIGINT  NOT NULL REFERENCES api_keys (id),
    tier                 TEXT    NOT NULL,
    provider             TEXT,
    upstream_model       TEXT,
    stream               BIGINT  NOT NULL DEFAULT 0 CHECK (stream IN (0, 1)),
    input_tokens         BIGINT  NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens        BIGINT  NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    provider_cost_nano   BIGINT  NOT NULL DEFAULT 0 CHECK (provider_cost_nano >= 0),
    billed_nano          BIGINT  NOT NULL DEFAULT 0 CHECK (billed_nano >= 0),
    http_status          BIGINT  NOT NULL,
    error_code           TEXT,
    attempts             BIGINT  NOT NULL DEFAULT 1,
    latency_ms           BIGINT  NOT NULL CHECK (latency_ms >= 0),
    ttft_ms              BIGINT  CHECK (ttft_ms >= 0),
    started_at           BIGINT  NOT NULL,
    finished_at          BIGINT  NOT NULL,
    created_at           BIGINT  NOT NULL,
    platform_loss_nano   BIGINT  NOT NULL DEFAULT 0 CHECK (platform_loss_nano >= 0),
    cached_input_tokens  BIGINT  NOT NULL DEFAULT 0 CHECK (cached_input_tokens >= 0),
    cache_write_tokens   BIGINT  NOT NULL DEFAULT 0 CHECK (cache_write_tokens >= 0),
    reasoning_tokens     BIGINT  NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
    PRIMARY KEY (id, started_at),
    UNIQUE (request_id, started_at)
) PARTITION BY RANGE (started_at);
-- Rows of a month without a partition of its own land here; the retention task moves them into
-- their month's partition when it creates it.
CREATE TABLE usage_records_default PARTITION OF usage_records DEFAULT;

-- Makes sure the month holding `at_ms` (UTC) has its partition, usage_records_YYYYMM, moving any
-- of its rows out of the default partition first. Returns the partition's name. Safe to call
-- from several processes at once (an advisory lock serialises them).
CREATE FUNCTION usage_records_month_partition(at_ms BIGINT) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    month_start TIMESTAMP := date_trunc('month', to_timestamp(at_ms / 1000.0) AT TIME ZONE 'UTC');
    lo BIGINT := (extract(epoch FROM month_start) * 1000)::BIGINT;
    hi BIGINT := (extract(epoch FROM month_start + INTERVAL '1 month') * 1000)::BIGINT;
    name TEXT := 'usage_records_' || to_char(month_start, 'YYYYMM');
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN name;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('usage_records_month_partition'));
    IF to_regclass(name) IS NOT NULL THEN
        RETURN name;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE usage_records INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
    EXECUTE format(
        'WITH moved AS (DELETE FROM usage_records_default WHERE started_at >= %s AND started_at < %s RETURNING *)
         INSERT INTO %I SELECT * FROM moved', lo, hi, name);
    EXECUTE format('ALTER TABLE usage_records ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', name, lo, hi);
    RETURN name;
END $$;

-- Detaches and drops every month partition that ends at or before `cutoff_ms`; returns how many.
CREATE FUNCTION usage_records_drop_months(cutoff_ms BIGINT) RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    part RECORD;
    dropped INTEGER := 0;
BEGIN
    FOR part IN
        SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'usage_records'::regclass AND c.relname ~ '^usage_records_[0-9]{6}$'
        ORDER BY c.relname
    LOOP
        IF extract(epoch FROM to_date(right(part.name, 6), 'YYYYMM') + INTERVAL '1 month') * 1000 <= cutoff_ms THEN
            EXECUTE format('ALTER TABLE usage_records DETACH PARTITION %I', part.name);
            EXECUTE format('DROP TABLE %I', part.name);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END $$;

-- A partition for every month that has rows, then the rows themselves.
SELECT usage_records_month_partition(m)
FROM (SELECT DISTINCT (extract(epoch FROM date_trunc('month', to_timestamp(started_at / 1000.0) AT TIME ZONE 'UTC')) * 1000)::BIGINT AS m
      FROM usage_records_unpartitioned) months;
SELECT usage_records_month_partition((extract(epoch FROM now()) * 1000)::BIGINT);
INSERT INTO usage_records (id, request_id, account_id, key_id, tier, provider, upstream_model, stream,
    input_tokens, output_tokens, provider_cost_nano, billed_nano, http_status, error_code, attempts,
    latency_ms, ttft_ms, started_at, finished_at, created_at, platform_loss_nano, cached_input_tokens,
    cache_write_tokens, reasoning_tokens)
OVERRIDING SYSTEM VALUE
SELECT id, request_id, account_id, key_id, tier, provider, upstream_model, stream,
    input_tokens, output_tokens, provider_cost_nano, billed_nano, http_status, error_code, attempts,
    latency_ms, ttft_ms, started_at, finished_at, created_at, platform_loss_nano, cached_input_tokens,
    cache_write_tokens, reasoning_tokens
FROM usage_records_unpartitioned;
SELECT setval(pg_get_serial_sequence('usage_records', 'id'), MAX(id))
FROM usage_records_unpartitioned HAVING MAX(id) IS NOT NULL;
DROP TABLE usage_records_unpartitioned;

-- The request log pages an account's rows by start time (newest first, the id breaking ties);
-- retention and the operator's export walk all rows by start time.
-- Nothing reads usage by key any more (key spend comes from the roll-ups): no index on key_id,
-- one fewer to write per request.
CREATE INDEX usage_account_started ON usage_records (account_id, started_at, id);
CREATE INDEX usage_started ON usage_records (started_at);

-- The operator's exports for accounting walk the ledger and the audit log by time.
CREATE INDEX ledger_created ON ledger (created_at);
CREATE INDEX audit_created ON audit_log (created_at);
