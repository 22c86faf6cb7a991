-- Operator throttles: temporarily lower rate limits for an account or a key, until a time.
-- Keep in step with ../postgres/0005_throttle.sql.
ALTER TABLE accounts ADD COLUMN throttle_requests_per_minute INTEGER CHECK (throttle_requests_per_minute > 0);
ALTER TABLE accounts ADD COLUMN throttle_tokens_per_minute INTEGER CHECK (throttle_tokens_per_minute > 0);
ALTER TABLE accounts ADD COLUMN throttle_until INTEGER;
ALTER TABLE api_keys ADD COLUMN throttle_requests_per_minute INTEGER CHECK (throttle_requests_per_minute > 0);
ALTER TABLE api_keys ADD COLUMN throttle_tokens_per_minute INTEGER CHECK (throttle_tokens_per_minute > 0);
ALTER TABLE api_keys ADD COLUMN throttle_until INTEGER;
