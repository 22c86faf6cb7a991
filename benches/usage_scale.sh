#!/usr/bin/env bash
# Usage at scale (issue #16): seeds millions of usage records, then times every dashboard and
# operator page, and the CSV export of one busy account, through the real admin HTTP server.
#
#   benches/usage_scale.sh postgres            # 10,000,000 rows into PostgreSQL
#   benches/usage_scale.sh sqlite              # 1,000,000 rows into a SQLite file
#   ROWS=1000000 benches/usage_scale.sh postgres
#
# Settings (environment): ROWS (10M on PostgreSQL, 1M on SQLite), ACCOUNTS (1000), DAYS the rows
# span up to now (90), RUNS timed requests per page (20, after 2 warm-up requests),
# PG_ADMIN_URL (postgres://postgres@127.0.0.1:5432/postgres), BIN (a folder with a built
# duang-admin; default: build this tree's release binary). The database `duang_bench_usage` is
# dropped and made anew.
#
# Rows are written the way they are in a busy store: request ids in time order, one account in
# ten rows being the busy one (account 1, two keys), the rest spread over ACCOUNTS accounts of
# two keys each, five tier/upstream pairs, 2% upstream errors, 1% refused before any upstream.
# The roll-ups are computed from them with the migration's own backfill query, as if the usage
# writer had kept them. Prints one line per page: p50 and p95 over RUNS requests, and the CSV
# export's time, size and the admin's peak memory before and after it.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKEND=${1:-postgres}
case "$BACKEND" in
  postgres) ROWS=${ROWS:-10000000} ;;
  sqlite) ROWS=${ROWS:-1000000} ;;
  *) echo "usage: $0 postgres|sqlite" >&2; exit 2 ;;
esac
ACCOUNTS=${ACCOUNTS:-1000}
DAYS=${DAYS:-90}
RUNS=${RUNS:-20}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
CHUNK=1000000

if [ -n "${BIN:-}" ]; then
  admin=$BIN/duang-admin
else
  cargo build --release --locked --quiet --bin duang-admin
  admin=target/release/duang-admin
fi

work=$(mktemp -d)
admin_pid=
cleanup() {
  if [ -n "$admin_pid" ]; then kill "$admin_pid" 2>/dev/null || true; wait "$admin_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

case "$BACKEND" in
  postgres)
    db_url=${PG_ADMIN_URL%/*}/duang_bench_usage
    psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS duang_bench_usage WITH (FORCE)" -c "CREATE DATABASE duang_bench_usage"
    sql() { psql -q -v ON_ERROR_STOP=1 "$db_url" "$@"; }
    ;;
  sqlite)
    db_file=$work/usage.db
    db_url=sqlite://$db_file
    sql() { sqlite3 -bail "$db_file" "$@"; }
    ;;
esac

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s#sqlite://data/duang.db#$db_url#" \
    -e "s#127.0.0.1:8081#127.0.0.1:$port#" \
    -e "s#retention_days = 90#retention_days = 0#" \
    -e "s#\"data/outbox\"#\"$work/outbox\"#" conf/duang.toml > "$work/duang.toml"
export DUANG_CONF=$work/duang.toml
"$admin" migrate >/dev/null

now_ms=$(($(date +%s) * 1000))
span_ms=$((DAYS * 86400000))
start_ms=$((now_ms - span_ms))
busy=1

echo "seeding $ROWS usage records into $BACKEND ($ACCOUNTS accounts, $DAYS days)..." >&2
t_seed=$(date +%s)
# Accounts 1..ACCOUNTS (1 is the busy one), two keys each: key ids (account-1)*2+1 and +2.
if [ "$BACKEND" = postgres ]; then
  series() { echo "generate_series(CAST($1 AS BIGINT), CAST($2 AS BIGINT)) AS s(g)"; }
  rid="'req_' || lpad(to_hex(t), 12, '0') || lpad(to_hex(g), 12, '0')"
else
  series() { echo "(WITH RECURSIVE s(g) AS (SELECT $1 UNION ALL SELECT g + 1 FROM s WHERE g < $2) SELECT g FROM s) AS s"; }
  rid="printf('req_%012x%012x', t, g)"
fi
sql <<SQL
INSERT INTO accounts (email, email_verified_at, created_at, updated_at)
SELECT 'bench' || g || '@example.com', 0, 0, 0 FROM $(series 1 "$ACCOUNTS") ORDER BY g;
INSERT INTO api_keys (account_id, key_hash, display_prefix, name, created_at, updated_at)
SELECT (g + 1) / 2, 'bench-key-' || g, 'sk-relay_bench', 'key ' || g, 0, 0 FROM $(series 1 $((ACCOUNTS * 2))) ORDER BY g;
SQL
lo=1
while [ "$lo" -le "$ROWS" ]; do
  hi=$((lo + CHUNK - 1)); [ "$hi" -gt "$ROWS" ] && hi=$ROWS
  sql <<SQL
INSERT INTO usage_records (request_id, account_id, key_id, tier, provider, upstream_model, stream,
    input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, provider_cost_nano,
    billed_nano, http_status, error_code, attempts, latency_ms, ttft_ms, started_at, finished_at,
    created_at)
SELECT $rid, acc, (acc - 1) * 2 + 1 + g % 2,
    CASE m WHEN 0 THEN 'budget' WHEN 1 THEN 'budget' WHEN 2 THEN 'standard' ELSE 'premium' END,
    CASE WHEN x < 10 THEN NULL WHEN m = 0 THEN 'gemini' WHEN m IN (1, 2) THEN 'openai' ELSE 'anthropic' END,
    CASE WHEN x < 10 THEN NULL WHEN m = 0 THEN 'gemini-2.5-flash-lite' WHEN m = 1 THEN 'gpt-4.1-nano'
         WHEN m = 2 THEN 'gpt-4.1-mini' WHEN m = 3 THEN 'claude-sonnet-4-5' ELSE 'claude-opus-4-1' END,
    g % 2, 200 + x * 3, 50 + x, x, x / 4,
    CASE WHEN x < 10 THEN 0 ELSE (200 + x * 3) * 100 + (50 + x) * 400 END,
    CASE WHEN x < 10 THEN 0 ELSE (200 + x * 3) * 120 + (50 + x) * 480 END,
    CASE WHEN x < 10 THEN 402 WHEN x < 30 THEN 502 ELSE 200 END,
    CASE WHEN x < 10 THEN 'insufficient_credits' WHEN x < 30 THEN 'upstream_unavailable' END,
    CASE WHEN x % 25 = 0 THEN 2 ELSE 1 END, 300 + x * 7, CASE WHEN x % 3 = 0 THEN NULL ELSE 80 + x END,
    t, t + 300 + x * 7, t + 400 + x * 7
FROM (SELECT g, $start_ms + g * $span_ms / $ROWS AS t,
             CASE WHEN g % 10 = 0 THEN $busy ELSE 2 + (g * 7919) % ($ACCOUNTS - 1) END AS acc,
             (g * 31) % 5 AS m, (g * 2654435761) % 1000 AS x
      FROM $(series "$lo" "$hi")) AS r;
SQL
  echo "  $hi rows" >&2
  lo=$((hi + 1))
done
# The roll-ups, as the migration backfills them (the usage writer keeps them the same way). A
# tree from before the roll-ups (to compare with BIN= of its build) has none: its pages read the
# raw rows.
rollups=migrations/$BACKEND/0010_usage_rollups.sql
if [ -f "$rollups" ]; then
  sed -n '/^-- Backfill from the rows already stored./,/^GROUP BY hour_ms, tier, provider, upstream_model;/p' \
    "$rollups" | sed 's/^SET LOCAL work_mem/SET work_mem/' > "$work/backfill.sql"
  sql < "$work/backfill.sql"
fi
# An operator with two-factor on, and a signed-in session for it and for the busy account
# (session ids are 32 random bytes in base64url: these two are fixed for the bench).
op_token=benchOperatorSession0000000000000000000000A
customer_token=benchCustomerSession0000000000000000000000A
hash() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
sql <<SQL
INSERT INTO accounts (email, email_verified_at, role, created_at, updated_at)
VALUES ('operator@example.com', 0, 'operator', 0, 0);
INSERT INTO two_factor (account_id, secret, enabled_at, created_at)
SELECT id, 'JBSWY3DPEHPK3PXP', 0, 0 FROM accounts WHERE email = 'operator@example.com';
INSERT INTO web_sessions (token_hash, account_id, created_at, expires_at, second_factor_at)
SELECT '$(hash $op_token)', id, 0, $((now_ms + 86400000)), $now_ms FROM accounts WHERE email = 'operator@example.com';
INSERT INTO web_sessions (token_hash, account_id, created_at, expires_at)
VALUES ('$(hash $customer_token)', $busy, 0, $((now_ms + 86400000)));
ANALYZE;
SQL
echo "seeded in $(($(date +%s) - t_seed)) s" >&2
if [ "$BACKEND" = postgres ]; then
  sql -At -c "SELECT 'usage_records ' || pg_size_pretty(pg_total_relation_size('usage_records')
      + COALESCE((SELECT SUM(pg_total_relation_size(inhrelid)) FROM pg_inherits WHERE inhparent = 'usage_records'::regclass), 0))
      || ' with its indexes and partitions'" >&2
fi
if [ -f "$rollups" ]; then
  counts="SELECT 'roll-up rows: usage_hourly ' || (SELECT COUNT(*) FROM usage_hourly) || ', usage_hourly_platform ' || (SELECT COUNT(*) FROM usage_hourly_platform);"
  if [ "$BACKEND" = postgres ]; then sql -At -c "$counts" >&2; else sql "$counts" >&2; fi
fi

"$admin" serve > "$work/admin.log" 2>&1 &
admin_pid=$!
base=http://127.0.0.1:$port
for _ in $(seq 1 100); do
  curl -sf "$base/healthz" >/dev/null && break
  sleep 0.1
done

day() { date -u -d "@$(( $1 / 1000 ))" +%F; }
today=$(day "$now_ms")
first=$(day $((now_ms - 89 * 86400000)))
year=$(day $((now_ms - 365 * 86400000)))

# p50 and p95 of RUNS requests (after two warm-up requests), in ms.
time_page() {
  local who=$1 path=$2 cookie
  if [ "$who" = operator ]; then cookie=$op_token; else cookie=$customer_token; fi
  local status
  status=$(curl -s -o /dev/null -w '%{http_code}' -b "duang_sid=$cookie" "$base$path")
  if [ "$status" != 200 ]; then
    echo "$path answered $status" >&2
    exit 1
  fi
  curl -s -o /dev/null -b "duang_sid=$cookie" "$base$path"
  for _ in $(seq 1 "$RUNS"); do
    curl -s -o /dev/null -w '%{time_total}\n' -b "duang_sid=$cookie" "$base$path"
  done | sort -n | awk -v path="$path" -v who="$who" '
    { t[NR] = $1 * 1000 }
    END {
      p50 = t[int((NR + 1) * 0.5)]; i95 = int(NR * 0.95 + 0.999); p95 = t[i95]
      printf "| %s | `%s` | %.1f | %.1f |\n", who, path, p50, p95
    }'
}

rss_kib() { awk '/^VmHWM/ { print $2 }' "/proc/$admin_pid/status"; }

echo
echo "$BACKEND, $ROWS usage records, $ACCOUNTS accounts, $DAYS days; $RUNS requests per page"
echo
echo "| who | page | p50 ms | p95 ms |"
echo "|---|---|---:|---:|"
time_page customer /dashboard
time_page customer "/dashboard?days=90"
time_page customer /usage
time_page customer "/usage?from=$first&to=$today"
time_page customer "/usage?from=$first&to=$today&status=error"
time_page customer /keys
time_page customer "/api/v1/usage/daily?from=$first&to=$today"
time_page customer "/api/v1/requests?from=$first&to=$today&limit=500"
time_page operator /operator
time_page operator "/operator/accounts/$busy"
time_page operator /operator/revenue
time_page operator "/operator/revenue?from=$year&to=$today"
time_page operator /operator/upstreams
time_page operator "/api/v1/operator/revenue?from=$year&to=$today"
time_page operator /api/v1/operator/upstreams

before=$(rss_kib)
csv_path="/usage.csv?from=$first&to=$today"
read -r csv_s csv_bytes < <(curl -s -o "$work/export.csv" -w '%{time_total} %{size_download}\n' -b "duang_sid=$customer_token" "$base$csv_path")
after=$(rss_kib)
echo
echo "CSV export of the busy account (\`$csv_path\`): $(($(wc -l < "$work/export.csv") - 1)) rows, $((csv_bytes / 1024)) KiB in $(awk -v s="$csv_s" 'BEGIN { printf "%.0f", s * 1000 }') ms; admin peak RSS $((before / 1024)) MiB before, $((after / 1024)) MiB after"
