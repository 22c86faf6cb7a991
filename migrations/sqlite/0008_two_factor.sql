-- Two-factor authentication. Keep in step with ../postgres/0008_two_factor.sql.

-- An account's TOTP secret (RFC 6238, base32). A row with `enabled_at` NULL is an enrolment
-- not yet confirmed with a code. `last_step` is the newest 30-second step a code was accepted
-- for: a code is taken only for a later step, so a code seen once cannot be replayed.
CREATE TABLE two_factor (
    account_id   INTEGER PRIMARY KEY REFERENCES accounts (id),
    secret       TEXT    NOT NULL,
    enabled_at   INTEGER,
    last_step    INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL
);

-- One-time recovery codes, by the SHA-256 of their letters; `used_at` is set when one is spent.
CREATE TABLE recovery_codes (
    account_id   INTEGER NOT NULL REFERENCES accounts (id),
    code_hash    TEXT    NOT NULL,
    used_at      INTEGER,
    PRIMARY KEY (account_id, code_hash)
);

-- When this session last passed the second factor (at log-in, or again before a sensitive action).
ALTER TABLE web_sessions ADD COLUMN second_factor_at INTEGER;
