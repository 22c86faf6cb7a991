-- Duang Duang relay: initial schema (PostgreSQL). Keep in step with ../sqlite/0001_initial.sql:
-- the same tables, columns, constraints and indexes; only the dialect differs.
-- Money is integer nano-USD; times are integer milliseconds since the Unix epoch.

CREATE TABLE accounts (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email                TEXT    NOT NULL UNIQUE,
    password_hash        TEXT,
    email_verified_at    BIGINT,
    status               TEXT    NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'suspended', 'terminated')),
    role                 TEXT    NOT NULL DEFAULT 'customer'
                         CHECK (role IN ('customer', 'operator')),
    -- Cached sum of this account's ledger entries; `reconcile` proves it equal to the ledger.
    balance_nano         BIGINT  NOT NULL DEFAULT 0 CHECK (balance_nano >= 0),
    requests_per_minute  BIGINT  CHECK (requests_per_minute > 0),
    tokens_per_minute    BIGINT  CHECK (tokens_per_minute > 0),
    in_flight            BIGINT  CHECK (in_flight > 0),
    created_at           BIGINT  NOT NULL,
    updated_at           BIGINT  NOT NULL
);

CREATE TABLE api_keys (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id           BIGINT  NOT NULL REFERENCES accounts (id),
    key_hash             TEXT    NOT NULL UNIQUE,
    display_prefix       TEXT    NOT NULL,
    name                 TEXT    NOT NULL,
    status               TEXT    NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'revoked', 'suspended')),
    expires_at           BIGINT,
    requests_per_minute  BIGINT  CHECK (requests_per_minute > 0),
    tokens_per_minute    BIGINT  CHECK (tokens_per_minute > 0),
    in_flight            BIGINT  CHECK (in_flight > 0),
    spend_cap_nano       BIGINT  CHECK (spend_cap_nano > 0),
    -- Comma-separated tier names; NULL means every tier.
    allowed_models       TEXT,
    last_used_at         BIGINT,
    revoked_at           BIGINT,
    created_at           BIGINT  NOT NULL,
    updated_at           BIGINT  NOT NULL
);
CREATE INDEX api_keys_account_created ON api_keys (account_id, created_at);

-- Append-only: the triggers below refuse UPDATE and DELETE.
CREATE TABLE ledger (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id           BIGINT  NOT NULL REFERENCES accounts (id),
    kind                 TEXT    NOT NULL CHECK (kind IN ('topup', 'usage', 'refund', 'adjustment')),
    amount_nano          BIGINT  NOT NULL CHECK (amount_nano <> 0),
    external_ref         TEXT    NOT NULL UNIQUE,
    actor                TEXT,
    reason               TEXT,
    created_at           BIGINT  NOT NULL,
    CHECK (kind <> 'topup' OR amount_nano > 0),
    CHECK (kind NOT IN ('usage', 'refund') OR amount_nano < 0),
    CHECK (kind <> 'adjustment' OR (actor IS NOT NULL AND reason IS NOT NULL))
);
CREATE INDEX ledger_account_created ON ledger (account_id, created_at);
CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'ledger is append-only'; END $$;
CREATE TRIGGER ledger_no_update BEFORE UPDATE OR DELETE ON ledger
FOR EACH ROW EXECUTE FUNCTION ledger_append_only();

CREATE TABLE usage_records (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id           TEXT    NOT NULL UNIQUE,
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
    created_at           BIGINT  NOT NULL
);
CREATE INDEX usage_account_created ON usage_records (account_id, created_at);
CREATE INDEX usage_key_created ON usage_records (key_id, created_at);

CREATE TABLE stripe_checkout_sessions (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id           TEXT    NOT NULL UNIQUE,
    account_id           BIGINT  NOT NULL REFERENCES accounts (id),
    amount_cents         BIGINT  NOT NULL CHECK (amount_cents > 0),
    currency             TEXT    NOT NULL,
    status               TEXT    NOT NULL DEFAULT 'open'
                         CHECK (status IN ('open', 'paid', 'expired')),
    payment_intent_id    TEXT    UNIQUE,
    created_at           BIGINT  NOT NULL,
    completed_at         BIGINT
);
CREATE INDEX stripe_sessions_account_created ON stripe_checkout_sessions (account_id, created_at);

CREATE TABLE stripe_events (
    event_id             TEXT    PRIMARY KEY,
    event_type           TEXT    NOT NULL,
    received_at          BIGINT  NOT NULL
);

-- Who did what to whom, and why (suspensions, adjustments, revocations).
CREATE TABLE audit_log (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor                TEXT    NOT NULL,
    action               TEXT    NOT NULL,
    account_id           BIGINT  REFERENCES accounts (id),
    key_id               BIGINT  REFERENCES api_keys (id),
    reason               TEXT,
    created_at           BIGINT  NOT NULL
);
CREATE INDEX audit_account_created ON audit_log (account_id, created_at);
