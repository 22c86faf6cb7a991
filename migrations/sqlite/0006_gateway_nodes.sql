-- Gateway instances and what they lose. Keep in step with ../postgres/0006_gateway_nodes.sql.
--
-- Each running gateway process is an instance (`instance_id` = its node id, a slash and its
-- start): it registers at start, renews `heartbeat_at` every few seconds, and holds its credit
-- leases under its instance id (`credit_leases.node_id`). An instance whose heartbeat is older
-- than the conf's lease expiry is gone: any gateway (or the operator, `duang-admin leases
-- release`) returns its leases to the balances and removes it.
CREATE TABLE gateway_nodes (
    instance_id   TEXT   PRIMARY KEY,
    node_id       TEXT   NOT NULL,
    started_at    INTEGER NOT NULL,
    heartbeat_at  INTEGER NOT NULL
);
CREATE INDEX gateway_nodes_heartbeat ON gateway_nodes (heartbeat_at);

-- Usage that cost more than its hold and than the balance could pay: the part nobody was billed
-- for (a platform loss, also counted in the metric duang_platform_loss_nano_total).
ALTER TABLE usage_records ADD COLUMN platform_loss_nano INTEGER NOT NULL DEFAULT 0 CHECK (platform_loss_nano >= 0);

-- A recall: another gateway (short of credit for a request) or a debit (a dispute, a refund, an
-- operator's adjustment) asks the holder to give back what it has not promised to a request.
-- The holder sees it within a fraction of a second, returns that part, and clears it.
ALTER TABLE credit_leases ADD COLUMN recall_at INTEGER;
-- Who asked: of two nodes both short of an account's credit, the one whose instance id sorts
-- later gives way, so their fragments end up in one place instead of going back and forth.
ALTER TABLE credit_leases ADD COLUMN recall_by TEXT;

-- Spend-cap leases: a key's spend cap is money too, so gateway instances lease room under it the
-- way they lease credit. A key's room is its cap less its billed usage less every instance's
-- cap lease; a lease shrinks in the same transaction as the usage it pays for is written.
CREATE TABLE cap_leases (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id       INTEGER NOT NULL REFERENCES api_keys (id),
    node_id      TEXT   NOT NULL,
    amount_nano  INTEGER NOT NULL CHECK (amount_nano >= 0),
    recall_at    INTEGER,
    recall_by    TEXT,
    updated_at   INTEGER NOT NULL,
    UNIQUE (key_id, node_id)
);
CREATE INDEX cap_leases_node ON cap_leases (node_id);
