-- Dashboard sessions and server settings. Keep in step with ../sqlite/0003_web_sessions.sql.

-- A logged-in browser: only the SHA-256 of the session cookie is stored, so a leaked table
-- cannot be replayed as cookies. Rows die at `expires_at`, on logout, and on a password change.
CREATE TABLE web_sessions (
    token_hash           TEXT    PRIMARY KEY,
    account_id           BIGINT  NOT NULL REFERENCES accounts (id),
    created_at           BIGINT  NOT NULL,
    expires_at           BIGINT  NOT NULL
);
CREATE INDEX web_sessions_account ON web_sessions (account_id);

-- Values the admin makes once and keeps (the key that signs e-mailed links and CSRF tokens when
-- the conf names none).
CREATE TABLE settings (
    name                 TEXT    PRIMARY KEY,
    value                TEXT    NOT NULL,
    created_at           BIGINT  NOT NULL
);
