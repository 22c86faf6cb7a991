-- Upstream prepaid credit (issue #16): what the operator prepaid to each provider, an append-only
-- record like the ledger. Keep in step with ../postgres/0011_upstream_credit.sql.
--
-- `spent_before` is the provider's whole provider cost (over every usage record) when the row was
-- written: the first row of a provider is where its spend starts to count against its credit, so
-- usage from before the operator first recorded a prepayment is not taken from it.
CREATE TABLE upstream_credits (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    provider      TEXT    NOT NULL,
    amount        INTEGER NOT NULL,
    reference     TEXT    NOT NULL UNIQUE,
    note          TEXT,
    actor         TEXT,
    spent_before  INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE INDEX upstream_credits_provider ON upstream_credits (provider, id);
CREATE TRIGGER upstream_credits_no_update BEFORE UPDATE ON upstream_credits
BEGIN SELECT RAISE(ABORT, 'upstream_credits is append-only'); END;
CREATE TRIGGER upstream_credits_no_delete BEFORE DELETE ON upstream_credits
BEGIN SELECT RAISE(ABORT, 'upstream_credits is append-only'); END;

-- When the operators were last mailed that a provider's remaining credit fell below its
-- `prepaid_alert_below_usd`; deleted when it is back above, so the mail goes once per crossing.
CREATE TABLE upstream_credit_alerts (
    provider   TEXT    PRIMARY KEY,
    mailed_at  INTEGER NOT NULL
);

-- What each provider has cost, summed from the roll-ups by the gateways every 5 s while credit is
-- recorded: read by provider, not by walking every hour.
CREATE INDEX usage_hourly_platform_provider ON usage_hourly_platform (provider, hour_ms);
