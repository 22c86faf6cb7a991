#!/usr/bin/env bash
# Load benchmark for the gateway. One run, three arms, for JSON and for SSE:
#   direct       client → mock upstream
#   passthrough  client → bare Pingora pass-through (benches/passthrough.rs) → mock
#   gateway      client → duang-gateway (key auth, limits in process, credit holds, billing,
#                usage logging) → mock
#   gw_redis     the same gateway with its rate limits in Redis (one Lua script per request),
#                when a Redis answers at $REDIS (default redis://127.0.0.1:6379; REDIS= skips it)
# and the memory that 1,000 idle concurrent streams cost the gateway.
#
# Layout as in ARCHITECTURE.md: wrk on core 0; the proxy under test and the mock on core 1.
# Prints requests/s, p50 and p99 latency per arm, the gateway's CPU time per request, and what
# the gateway adds over the pass-through. Loopback only; stops by itself.
#
#   benches/load.sh                       # 10 s per arm, 64 connections
#   DURATION=30s CONNS=128 benches/load.sh
#   BIN=/tmp/before benches/load.sh       # binaries built earlier, no build
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
IDLE_STREAMS=${IDLE_STREAMS:-1000}
MODES=${MODES:-json sse}
CLIENT_CORE=${CLIENT_CORE:-0}
SERVER_CORE=${SERVER_CORE:-1}
REDIS=${REDIS-redis://127.0.0.1:6379}
# The store the gateway writes usage to: a SQLite file of its own by default; STORE_URL (an
# existing, empty PostgreSQL database) moves that work out of the gateway's process.
STORE_URL=${STORE_URL:-}

command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }
# BIN=/some/dir runs binaries built earlier (say, a copy of the last commit's, to compare two
# builds on one machine) instead of building this tree's.
if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  cargo build --release --quiet --bins
  bin=target/release
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK_PORT=$(free_port); PASS_PORT=$(free_port); GW_PORT=$(free_port); METRICS_PORT=$(free_port)

taskset -c "$SERVER_CORE" "$bin/duang-mock-upstream" --listen "127.0.0.1:$MOCK_PORT" --chunks 8 >/dev/null &
pids+=($!)
taskset -c "$SERVER_CORE" "$bin/duang-bench-passthrough" "127.0.0.1:$PASS_PORT" "127.0.0.1:$MOCK_PORT" 1 2>/dev/null &
pids+=($!); PASS_PID=$!

cat >"$work/duang.toml" <<EOF
[gateway]
listen = "127.0.0.1:$GW_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
threads = 1
[store]
url = "${STORE_URL:-sqlite://$work/duang.db}"
[limits.default_key]
requests_per_minute = 10000000
tokens_per_minute = 1000000000000
in_flight = 100000
[limits.default_account]
requests_per_minute = 10000000
tokens_per_minute = 1000000000000
in_flight = 100000
[tiers.budget]
input_usd_per_mtok = "0.12"
output_usd_per_mtok = "0.48"
default_max_output_tokens = 100
upstreams = [{ provider = "mock", model = "mock-small" }]
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
first_byte_timeout_ms = 120000
idle_timeout_ms = 120000
models."mock-small" = { input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }
EOF
admin() { "$bin/duang-admin" --conf "$work/duang.toml" "$@"; }
admin account create --email bench@example.com --verified >/dev/null
admin credits grant bench@example.com --usd 100000 >/dev/null
KEY=$(admin key create bench@example.com --name bench 2>/dev/null)
export KEY

RUST_LOG=error taskset -c "$SERVER_CORE" "$bin/duang-gateway" --conf "$work/duang.toml" 2>"$work/gateway.log" &
pids+=($!); GW_PID=$!
for _ in $(seq 1 200); do
  curl -sf "http://127.0.0.1:$GW_PORT/healthz" >/dev/null && break
  sleep 0.05
done

# The same gateway with Redis rate limits, on its own port (one of the two runs at a time).
ARMS="direct passthrough gateway"
if [ -n "$REDIS" ] && redis-cli -u "$REDIS" ping >/dev/null 2>&1; then
  GW2_PORT=$(free_port); METRICS2_PORT=$(free_port)
  sed -e "s/127.0.0.1:$GW_PORT/127.0.0.1:$GW2_PORT/" -e "s/127.0.0.1:$METRICS_PORT/127.0.0.1:$METRICS2_PORT/" \
    "$work/duang.toml" >"$work/duang-redis.toml"
  printf '[redis]\nurl = "%s"\nkey_prefix = "bench%s"\n' "$REDIS" "$RANDOM" >>"$work/duang-redis.toml"
  RUST_LOG=error taskset -c "$SERVER_CORE" "$bin/duang-gateway" --conf "$work/duang-redis.toml" 2>"$work/gateway-redis.log" &
  pids+=($!); GW2_PID=$!
  for _ in $(seq 1 200); do
    curl -sf "http://127.0.0.1:$GW2_PORT/healthz" >/dev/null && break
    sleep 0.05
  done
  ARMS="$ARMS gw_redis"
else
  echo "no Redis at ${REDIS:-(none)}: the gw_redis arm is skipped" >&2
fi

cat >"$work/json.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("KEY")
wrk.body = '{"model":"budget","messages":[{"role":"user","content":"Say ok in one word."}]}'
EOF
sed 's/"messages"/"stream":true,"messages"/' "$work/json.lua" >"$work/sse.lua"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# wrk → "rps p50_us p99_us requests"
run_wrk() {
  local url=$1 script=$2 conns=${3:-$CONNS}
  taskset -c "$CLIENT_CORE" wrk -t1 -c"$conns" -d"$DURATION" --latency -s "$script" "$url" >"$work/wrk.out"
  python3 - "$work/wrk.out" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
def us(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        sys.exit(f"cannot read latency {v!r} in wrk's output:\n{text}")
    n, unit = m.groups()
    return float(n) * {"us": 1, "ms": 1000, "s": 1e6, "m": 6e7}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = us(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))
p99 = us(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))
reqs = int(re.search(r"(\d+) requests in", text).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
if errors:
    sys.exit(f"wrk saw {errors.group(1)} failed responses:\n{text}")
print(f"{rps:.0f} {p50:.0f} {p99:.0f} {reqs}")
EOF
}

declare -A R
for mode in $MODES; do
  for arm in $ARMS; do
    case $arm in
      direct) url="http://127.0.0.1:$MOCK_PORT/v1/chat/completions"; pid="" ;;
      passthrough) url="http://127.0.0.1:$PASS_PORT/v1/chat/completions"; pid=$PASS_PID ;;
      gateway) url="http://127.0.0.1:$GW_PORT/v1/chat/completions"; pid=$GW_PID ;;
      gw_redis) url="http://127.0.0.1:$GW2_PORT/v1/chat/completions"; pid=$GW2_PID ;;
    esac
    before=0; [ -n "$pid" ] && before=$(cpu_ticks "$pid")
    # PERF_ARM=sse.gateway (say) records a CPU profile of that arm into $PERF_OUT.
    perf_pid=""
    if [ "${PERF_ARM:-}" = "$mode.$arm" ] && [ -n "$pid" ]; then
      perf record -F 2999 ${PERF_CALLGRAPH:---call-graph fp} -p "$pid" -o "${PERF_OUT:-perf.data}" -- sleep "${DURATION%s}" >/dev/null 2>&1 &
      perf_pid=$!
    fi
    read -r rps p50 p99 reqs < <(run_wrk "$url" "$work/$mode.lua")
    [ -n "$perf_pid" ] && wait "$perf_pid"
    cpu="-"
    if [ -n "$pid" ]; then
      after=$(cpu_ticks "$pid")
      cpu=$(python3 -c "print(round(($after - $before) * 1e6 / $(getconf CLK_TCK) / $reqs))")
    fi
    # Latency without queueing: one connection, so each figure is the request's own time.
    read -r _ l50 l99 _ < <(run_wrk "$url" "$work/$mode.lua" 1)
    R[$mode.$arm]="$rps $p50 $p99 $cpu $l50 $l99"
  done
done

echo
echo "Load: wrk -t1 -c$CONNS -d$DURATION on core $CLIENT_CORE (latency: -c1); proxy and mock on core $SERVER_CORE; $(nproc) cores, $(date -u +%F)"
printf '%-5s %-12s %9s %11s %11s %11s %11s %11s\n' mode arm req/s "p50_us@$CONNS" "p99_us@$CONNS" cpu_us/req p50_us@1 p99_us@1
for mode in $MODES; do
  for arm in $ARMS; do
    read -r rps p50 p99 cpu l50 l99 <<<"${R[$mode.$arm]}"
    printf '%-5s %-12s %9s %11s %11s %11s %11s %11s\n' "$mode" "$arm" "$rps" "$p50" "$p99" "$cpu" "$l50" "$l99"
  done
done
echo
for mode in $MODES; do
  read -r prps _ _ pcpu pl50 pl99 <<<"${R[$mode.passthrough]}"
  read -r grps _ _ gcpu gl50 gl99 <<<"${R[$mode.gateway]}"
  python3 -c "print(f'$mode: gateway adds p50 {int($gl50) - int($pl50)} us, p99 {int($gl99) - int($pl99)} us over the pass-through (one connection), {int($gcpu) - int($pcpu)} us of CPU per request, at {100 * $grps / $prps:.0f}% of its req/s under load (targets: <= 100 us, <= 500 us, >= 70%)')"
  if [ -n "${R[$mode.gw_redis]:-}" ]; then
    read -r rrps _ _ rcpu rl50 rl99 <<<"${R[$mode.gw_redis]}"
    python3 -c "print(f'$mode: Redis limits add p50 {int($rl50) - int($gl50)} us, p99 {int($rl99) - int($gl99)} us (one connection), {int($rcpu) - int($gcpu)} us of gateway CPU per request, and run at {100 * $rrps / $grps:.0f}% of the in-process limits req/s')"
  fi
done

# Memory: idle concurrent streams (the mock sends one chunk, then waits a minute).
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
before=$(rss_kib "$GW_PID")
python3 - "$GW_PORT" "$IDLE_STREAMS" "$KEY" "$GW_PID" >"$work/idle.out" <<'EOF' || true
import asyncio, json, sys
port, n, key, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
body = json.dumps({"model": "budget", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                   "mock": {"chunks": 2, "gap_ms": 60000}}).encode()
req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
async def one():
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(req)
    await w.drain()
    got = b""
    while b"tok0" not in got:
        got += await r.read(4096)
    return r, w
async def main():
    conns = []
    for i in range(0, n, 100):
        conns += await asyncio.gather(*(one() for _ in range(min(100, n - i))))
    rss = [l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0].split()[1]
    print(f"{len(conns)} {rss}")
    for _, w in conns:
        w.close()
asyncio.run(main())
EOF
read -r streams during <"$work/idle.out" || { streams=0; during=0; }
if [ "$streams" -gt 0 ]; then
  echo "idle streams: $streams open, gateway RSS $before KiB -> $during KiB: $(( (during - before) * 1024 / streams )) bytes per stream (target < 65536)"
fi
