-- Credit leases: a gateway node takes a slice of an account's balance in one atomic statement,
-- spends it in memory (holds), settles usage against it, and returns what is left. Leased credit
-- has left `accounts.balance_nano` but is still the customer's, so the balance proof is
-- balance_nano + SUM(leases) = SUM(ledger).
CREATE TABLE credit_leases (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id           INTEGER NOT NULL REFERENCES accounts (id),
    node_id              TEXT    NOT NULL,
    amount_nano          INTEGER NOT NULL CHECK (amount_nano >= 0),
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    UNIQUE (account_id, node_id)
);
CREATE INDEX credit_leases_node ON credit_leases (node_id);
