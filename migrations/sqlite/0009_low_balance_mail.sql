-- The low-balance mail. Keep in step with ../postgres/0009_low_balance_mail.sql.

-- When the account was last told its balance fell below admin.low_balance_warning_cents; cleared
-- when the balance is back above it, so the mail goes once per crossing.
ALTER TABLE accounts ADD COLUMN low_balance_mailed_at INTEGER;
