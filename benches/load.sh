#!/usr/bin/env bash
# Load benchmark for the gateway. One run, for JSON and for SSE, of these arms:
#   direct       client → mock upstream
#   nginx        client → nginx proxy_pass → mock (the reference: ../shared/bench)
#   passthrough  client → bare Pingora pass-through (benches/passthrough.rs) → mock
#   gateway      client → duang-gateway (key auth, limits in process, credit holds, billing,
#                usage written) → mock
#   gw_redis     the same gateway with its rate limits in Redis (one Lua script per request),
#                when a Redis answers at $REDIS (default redis://127.0.0.1:6379; REDIS= skips it)
# and the memory that 1,000 idle concurrent streams cost the gateway.
#
# The mock is the nginx + Lua fixed-body mock of ../shared/bench when nginx-light and
# libnginx-mod-http-lua are installed (MOCK=duang: the project's own mock, and no nginx arm).
# Layout as in ARCHITECTURE.md: wrk on core 0; the proxy under test and the mock on core 1.
# Prints requests/s, p50 and p99 latency per arm, each proxy's CPU time per request, and the
# gateway's CPU per request as a ratio to nginx's and to the pass-through's. Loopback only;
# stops by itself.
#
#   benches/load.sh                       # 10 s per arm, 64 connections
#   DURATION=30s CONNS=128 benches/load.sh
#   BIN=/tmp/before benches/load.sh       # binaries built earlier, no build
#   PROFILE=dist benches/load.sh          # the fat-LTO deployment build
#   PERF_ARM=sse.gateway PERF_OUT=sse.perf benches/load.sh   # a CPU profile of one arm
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

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

bench_init
MOCK_PORT=$(free_port); PASS_PORT=$(free_port); GW_PORT=$(free_port); METRICS_PORT=$(free_port)

start_mock "$SERVER_CORE" "$MOCK_PORT"
taskset -c "$SERVER_CORE" "$bin/duang-bench-passthrough" "127.0.0.1:$PASS_PORT" "127.0.0.1:$MOCK_PORT" 1 2>/dev/null &
pids+=($!); PASS_PID=$!
ARMS="direct"
if [ "$MOCK" = nginx ]; then
  NGINX_PORT=$(free_port)
  start_nginx_proxy "$SERVER_CORE" "$NGINX_PORT" "$MOCK_PORT"
  ARMS="$ARMS nginx"
fi
ARMS="$ARMS passthrough gateway"

write_gateway_conf "$work/duang.toml" "$GW_PORT" "$METRICS_PORT" "$MOCK_PORT" 1
bootstrap_key "$work/duang.toml"
start_gateway "$SERVER_CORE" "$work/duang.toml" "$work/gateway.log"
MAIN_GW_PID=$GW_PID

# The same gateway with Redis rate limits, on its own port (one of the two runs at a time).
if [ -n "$REDIS" ] && redis-cli -u "$REDIS" ping >/dev/null 2>&1; then
  GW2_PORT=$(free_port); METRICS2_PORT=$(free_port)
  sed -e "s/127.0.0.1:$GW_PORT/127.0.0.1:$GW2_PORT/" -e "s/127.0.0.1:$METRICS_PORT/127.0.0.1:$METRICS2_PORT/" \
    "$work/duang.toml" >"$work/duang-redis.toml"
  printf '[redis]\nurl = "%s"\nkey_prefix = "bench%s"\n' "$REDIS" "$RANDOM" >>"$work/duang-redis.toml"
  start_gateway "$SERVER_CORE" "$work/duang-redis.toml" "$work/gateway-redis.log"
  GW2_PID=$GW_PID
  ARMS="$ARMS gw_redis"
else
  echo "no Redis at ${REDIS:-(none)}: the gw_redis arm is skipped" >&2
fi
GW_PID=$MAIN_GW_PID
write_wrk_scripts

declare -A R
for mode in $MODES; do
  for arm in $ARMS; do
    case $arm in
      direct) url="http://127.0.0.1:$MOCK_PORT/v1/chat/completions"; pid="" ;;
      nginx) url="http://127.0.0.1:$NGINX_PORT/v1/chat/completions"; pid=$NGINX_PID ;;
      passthrough) url="http://127.0.0.1:$PASS_PORT/v1/chat/completions"; pid=$PASS_PID ;;
      gateway) url="http://127.0.0.1:$GW_PORT/v1/chat/completions"; pid=$GW_PID ;;
      gw_redis) url="http://127.0.0.1:$GW2_PORT/v1/chat/completions"; pid=$GW2_PID ;;
    esac
    perf_pid=""
    if [ "${PERF_ARM:-}" = "$mode.$arm" ] && [ -n "$pid" ]; then
      perf record -F 2999 ${PERF_CALLGRAPH:---call-graph dwarf,16384} -p "$pid" -o "${PERF_OUT:-perf.data}" -- sleep "${DURATION%s}" >/dev/null 2>&1 &
      perf_pid=$!
    fi
    read -r rps p50 p99 cpu < <(measure "$pid" "$url" "$work/$mode.lua" "$CONNS" "$CLIENT_CORE")
    [ -n "$perf_pid" ] && wait "$perf_pid"
    # Latency without queueing: one connection, so each figure is the request's own time.
    read -r _ l50 l99 _ < <(run_wrk "$url" "$work/$mode.lua" 1 "$CLIENT_CORE")
    R[$mode.$arm]="$rps $p50 $p99 $cpu $l50 $l99"
  done
done

echo
echo "Load: wrk -t1 -c$CONNS -d$DURATION on core $CLIENT_CORE (latency: -c1); proxy and mock ($MOCK) on core $SERVER_CORE; $(nproc) cores, $(date -u +%F), binaries from $bin"
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
  ncpu=""
  [ -n "${R[$mode.nginx]:-}" ] && read -r _ _ _ ncpu _ _ <<<"${R[$mode.nginx]}"
  python3 - "$mode" "$gcpu" "$pcpu" "${ncpu:-0}" <<'PY'
import sys
mode, g, p, n = sys.argv[1], *map(float, sys.argv[2:])
vs_nginx = f"{g / n:.2f}x nginx ({n:.1f} us)" if n else "no nginx arm"
print(f"{mode}: gateway CPU per request {g:.1f} us = {g / p:.2f}x the pass-through ({p:.1f} us), {vs_nginx}   (targets: <= 1.00x pass-through, then <= 1.50x nginx)")
PY
  python3 -c "print(f'$mode: gateway adds p50 {int($gl50) - int($pl50)} us, p99 {int($gl99) - int($pl99)} us over the pass-through (one connection), at {100 * $grps / $prps:.0f}% of its req/s under load')"
  if [ -n "${R[$mode.gw_redis]:-}" ]; then
    read -r rrps _ _ rcpu rl50 rl99 <<<"${R[$mode.gw_redis]}"
    python3 -c "print(f'$mode: Redis limits add p50 {int($rl50) - int($gl50)} us, p99 {int($rl99) - int($gl99)} us (one connection), {float($rcpu) - float($gcpu):.1f} us of gateway CPU per request, and run at {100 * $rrps / $grps:.0f}% of the in-process limits req/s')"
  fi
done

[ "$IDLE_STREAMS" -gt 0 ] || exit 0
if [ "$MOCK" = nginx ]; then
  # Idle streams need a mock that sends one chunk and then waits: the project's own.
  IDLE_MOCK_PORT=$(free_port)
  MOCK=duang start_mock "$SERVER_CORE" "$IDLE_MOCK_PORT"
  sed -i "s#127.0.0.1:$MOCK_PORT/v1#127.0.0.1:$IDLE_MOCK_PORT/v1#" "$work/duang.toml"
  kill "$GW_PID"; wait "$GW_PID" 2>/dev/null || true
  start_gateway "$SERVER_CORE" "$work/duang.toml" "$work/gateway-idle.log"
fi
# Memory: idle concurrent streams (the mock sends one chunk, then waits a minute).
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
before=$(rss_kib "$GW_PID")
python3 - "$GW_PORT" "$IDLE_STREAMS" "$KEY" "$GW_PID" >"$work/idle.out" <<'PY' || true
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
PY
read -r streams during <"$work/idle.out" || { streams=0; during=0; }
if [ "$streams" -gt 0 ]; then
  echo "idle streams: $streams open, gateway RSS $before KiB -> $during KiB: $(( (during - before) * 1024 / streams )) bytes per stream (target < 65536)"
fi
