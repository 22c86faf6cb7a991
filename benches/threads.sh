#!/usr/bin/env bash
# How the gateway scales with `gateway.threads`: for each thread count, the gateway (every
# feature on) and the bare Pingora pass-through with as many threads, each pinned to that many
# proxy cores, against the mock upstream on cores of its own and wrk on others. Prints req/s
# and CPU per request for each, and the gateway's req/s per thread against one thread's.
#
#   benches/threads.sh                                  # a 2-core machine: the smoke run
#   THREADS="1 2 4 8" PROXY_CORES=0-7 MOCK_CORES=8-11 MOCK_WORKERS=4 \
#     CLIENT_CORES=12-15 CLIENT_THREADS=4 CONNS=256 benches/threads.sh   # 16 cores
#
# On a 2-core machine everything shares the cores (a smoke test: the script runs and the
# figures are sane); the scaling figures need a machine with cores for each side.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
MODES=${MODES:-json sse}
THREADS=${THREADS:-1 2}
PROXY_CORES=${PROXY_CORES:-$([ "$(nproc)" -le 2 ] && echo 0-1 || echo 1)}
MOCK_CORES=${MOCK_CORES:-1}
MOCK_WORKERS=${MOCK_WORKERS:-1}
CLIENT_CORES=${CLIENT_CORES:-0}
CLIENT_THREADS=${CLIENT_THREADS:-1}

# The first N cores of a taskset list such as "0-7" or "2,4,6".
first_cores() {
  python3 - "$1" "$2" <<'PY'
import sys
spec, n = sys.argv[1], int(sys.argv[2])
cores = []
for part in spec.split(","):
    a, _, b = part.partition("-")
    cores += range(int(a), int(b or a) + 1)
print(",".join(map(str, cores[: max(1, min(n, len(cores)))])))
PY
}

bench_init
MOCK_PORT=$(free_port)
start_mock "$MOCK_CORES" "$MOCK_PORT" "$MOCK_WORKERS"
write_wrk_scripts
KEY=""

declare -A R
for n in $THREADS; do
  cores=$(first_cores "$PROXY_CORES" "$n")
  PASS_PORT=$(free_port); GW_PORT=$(free_port); METRICS_PORT=$(free_port)
  taskset -c "$cores" "$bin/duang-bench-passthrough" "127.0.0.1:$PASS_PORT" "127.0.0.1:$MOCK_PORT" "$n" 2>/dev/null &
  pass_pid=$!; pids+=($pass_pid)
  write_gateway_conf "$work/duang-$n.toml" "$GW_PORT" "$METRICS_PORT" "$MOCK_PORT" "$n"
  [ -n "$KEY" ] || bootstrap_key "$work/duang-$n.toml"
  start_gateway "$cores" "$work/duang-$n.toml" "$work/gateway-$n.log"
  wait_port "$PASS_PORT"
  for mode in $MODES; do
    R[$mode.pass.$n]=$(measure "$pass_pid" "http://127.0.0.1:$PASS_PORT/v1/chat/completions" "$work/$mode.lua" "$CONNS" "$CLIENT_CORES" "$CLIENT_THREADS")
    R[$mode.gw.$n]=$(measure "$GW_PID" "http://127.0.0.1:$GW_PORT/v1/chat/completions" "$work/$mode.lua" "$CONNS" "$CLIENT_CORES" "$CLIENT_THREADS")
  done
  kill "$GW_PID" "$pass_pid"; wait "$GW_PID" "$pass_pid" 2>/dev/null || true
done

echo
echo "Threads: wrk -t$CLIENT_THREADS -c$CONNS -d$DURATION on cores $CLIENT_CORES; mock ($MOCK, $MOCK_WORKERS worker(s)) on $MOCK_CORES; proxies on the first N of $PROXY_CORES; $(nproc) cores, $(date -u +%F), binaries from $bin"
printf '%-5s %7s %14s %14s %14s %14s %16s\n' mode threads "pass req/s" "pass cpu_us" "gw req/s" "gw cpu_us" "gw req/s / 1t"
for mode in $MODES; do
  base=""
  for n in $THREADS; do
    read -r prps _ _ pcpu <<<"${R[$mode.pass.$n]}"
    read -r grps _ _ gcpu <<<"${R[$mode.gw.$n]}"
    [ -n "$base" ] || base=$grps
    printf '%-5s %7s %14s %14s %14s %14s %16s\n' "$mode" "$n" "$prps" "$pcpu" "$grps" "$gcpu" \
      "$(python3 -c "print(f'{$grps / $base:.2f}x')")"
  done
done
