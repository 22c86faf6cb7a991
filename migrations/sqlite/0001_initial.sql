-- Duang Duang relay: initial schema (SQLite). Keep in step with ../postgres/0001_initial.sql:
-- the same tables, columns, constraints and indexes; only the dialect differs.
-- Money is integer nano-USD; times are integer milliseconds since the Unix epoch.

CREATE TABLE accounts (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    email                TEXT    NOT NULL UNIQUE,
    password_hash        TEXT,
    email_verified_at    INTEGER,
    status               TEXT    NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'suspended', 'terminated')),
    role                 TEXT    NOT NULL DEFAULT 'customer'
                         CHECK (role IN ('customer', 'operator')),
    -- Cached sum of this account's ledger entries; `reconcile` proves it equal to the ledger.
    balance_nano         INTEGER NOT NULL DEFAULT 0 CHECK (balance_nano >= 0),
    requests_per_minute  INTEGER CHECK (requests_per_minute > 0),
    tokens_per_minute    INTEGER CHECK (tokens_per_minute > 0),
    in_flight            INTEGER CHECK (in_flight > 0),
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id           INTEGER NOT NULL REFERENCES accounts (id),
    key_hash             TEXT    NOT NULL UNIQUE,
    display_prefix       TEXT    NOT NULL,
    name                 TEXT    NOT NULL,
    status               TEXT    NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'revoked', 'suspended')),
    expires_at           INTEGER,
    requests_per_minute  INTEGER CHECK (requests_per_minute > 0),
    tokens_per_minute    INTEGER CHECK (tokens_per_minute > 0),
    in_flight            INTEGER CHECK (in_flight > 0),
    spend_cap_nano       INTEGER CHECK (spend_cap_nano > 0),
    -- Comma-separated tier names; NULL means every tier.
    allowed_models       TEXT,
    last_used_at         INTEGER,
    revoked_at           INTEGER,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);
CREATE INDEX api_keys_account_created ON api_keys (account_id, created_at);

-- Append-only: the triggers below refuse UPDATE and DELETE.
CREATE TABLE ledger (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id           INTEGER NOT NULL REFERENCES accounts (id),
    kind                 TEXT    NOT NULL CHECK (kind IN ('topup', 'usage', 'refund', 'adjustment')),
    amount_nano          INTEGER NOT NULL CHECK (amount_nano <> 0),
    external_ref         TEXT    NOT NULL UNIQUE,
    actor                TEXT,
    reason               TEXT,
    created_at           INTEGER NOT NULL,
    CHECK (kind <> 'topup' OR amount_nano > 0),
    CHECK (kind NOT IN ('usage', 'refund') OR amount_nano < 0),
    CHECK (kind <> 'adjustment' OR (actor IS NOT NULL AND reason IS NOT NULL))
);
CREATE INDEX ledger_account_created ON ledger (account_id, created_at);
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;

CREATE TABLE usage_records (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id           TEXT    NOT NULL UNIQUE,
    account_id           INTEGER NOT NULL REFERENCES accounts (id),
    key_id               INTEGER NOT NULL REFERENCES api_keys (id),
    tier                 TEXT    NOT NULL,
    provider             TEXT,
    upstream_model       TEXT,
    stream               INTEGER NOT NULL DEFAULT 0 CHECK (stream IN (0, 1)),
    input_tokens         INTEGER NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens        INTEGER NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    provider_cost_nano   INTEGER NOT NULL DEFAULT 0 CHECK (provider_cost_nano >= 0),
    billed_nano          INTEGER NOT NULL DEFAULT 0 CHECK (billed_nano >= 0),
    http_status          INTEGER NOT NULL,
    error_code           TEXT,
    attempts             INTEGER NOT NULL DEFAULT 1,
    latency_ms           INTEGER NOT NULL CHECK (latency_ms >= 0),
    ttft_ms              INTEGER CHECK (ttft_ms >= 0),
    started_at           INTEGER NOT NULL,
    finished_at          INTEGER NOT NULL,
    created_at           INTEGER NOT NULL
);
CREATE INDEX usage_account_created ON usage_records (account_id, created_at);
CREATE INDEX usage_key_created ON usage_records (key_id, created_at);

CREATE TABLE stripe_checkout_sessions (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id           TEXT    NOT NULL UNIQUE,
    account_id           INTEGER NOT NULL REFERENCES accounts (id),
    amount_cents         INTEGER NOT NULL CHECK (amount_cents > 0),
    currency             TEXT    NOT NULL,
    status               TEXT    NOT NULL DEFAULT 'open'
                         CHECK (status IN ('open', 'paid', 'expired')),
    payment_intent_id    TEXT    UNIQUE,
    created_at           INTEGER NOT NULL,
    completed_at         INTEGER
);
CREATE INDEX stripe_sessions_account_created ON stripe_checkout_sessions (account_id, created_at);

CREATE TABLE stripe_events (
    event_id             TEXT    PRIMARY KEY,
    event_type           TEXT    NOT NULL,
    received_at          INTEGER NOT NULL
);

-- Who did what to whom, and why (suspensions, adjustments, revocations).
CREATE TABLE audit_log (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    actor                TEXT    NOT NULL,
    action               TEXT    NOT NULL,
    account_id           INTEGER REFERENCES accounts (id),
    key_id               INTEGER REFERENCES api_keys (id),
    reason               TEXT,
    created_at           INTEGER NOT NULL
);
CREATE INDEX audit_account_created ON audit_log (account_id, created_at);
