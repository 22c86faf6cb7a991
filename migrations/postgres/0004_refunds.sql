-- Refund requests and how much of each payment has been refunded. Keep in step with
-- ../sqlite/0004_refunds.sql.

-- What has gone back to the customer from each paid Checkout Session (through this relay or
-- straight from Stripe's dashboard); never more than amount_cents.
ALTER TABLE stripe_checkout_sessions ADD COLUMN refunded_cents BIGINT NOT NULL DEFAULT 0
    CHECK (refunded_cents >= 0);

-- A customer's request to refund unused balance, and the operator's decision.
CREATE TABLE refund_requests (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id           BIGINT  NOT NULL REFERENCES accounts (id),
    amount_cents         BIGINT  NOT NULL CHECK (amount_cents > 0),
    reason               TEXT    NOT NULL,
    status               TEXT    NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'processing', 'approved', 'declined', 'failed')),
    -- What the operator wrote (a decline's note; what failed).
    note                 TEXT,
    decided_by           TEXT,
    -- Stripe refund ids, comma-separated.
    stripe_refunds       TEXT,
    created_at           BIGINT  NOT NULL,
    decided_at           BIGINT
);
CREATE INDEX refund_requests_account_created ON refund_requests (account_id, created_at);
CREATE INDEX refund_requests_status ON refund_requests (status, created_at);
-- One open request per account at a time.
CREATE UNIQUE INDEX refund_requests_one_open ON refund_requests (account_id)
    WHERE status IN ('pending', 'processing');
