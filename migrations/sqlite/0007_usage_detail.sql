-- Usage detail (issue #13): what of a request's input came from, or went to, the upstream's
-- prompt cache, and what of its output was reasoning, where upstreams report it. Each is part
-- of input_tokens or output_tokens, never in addition. Keep in step with
-- ../postgres/0007_usage_detail.sql.
ALTER TABLE usage_records ADD COLUMN cached_input_tokens INTEGER NOT NULL DEFAULT 0 CHECK (cached_input_tokens >= 0);
ALTER TABLE usage_records ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0 CHECK (cache_write_tokens >= 0);
ALTER TABLE usage_records ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0);
