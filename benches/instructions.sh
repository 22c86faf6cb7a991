#!/usr/bin/env bash
# Instructions per request: the proxies' user-space work counted by valgrind's callgrind, which
# does not move with the machine's load the way CPU time does (this VM's runs of one build spread
# by ±8% in `load.sh`; counted instructions repeat within about 1%). Use it to see a change of a
# few percent; `load.sh` stays the measure of CPU time (kernel work included: system calls,
# wake-ups, copies, which callgrind does not count).
#
# For each mode (json, sse) and arm (the bare Pingora pass-through, the gateway with every
# feature on: key auth, limits, holds, billing, usage written to its SQLite file), the proxy runs
# under callgrind with its counting off while it starts and takes a warm-up; then counting goes
# on, wrk sends requests over 4 connections for $DURATION, the usage writer is given time to
# write them, and the count is read. Prints instructions per request, the gateway's as a ratio to
# the pass-through's, and (TOP=N) each gateway run's N costliest functions.
#
#   benches/instructions.sh
#   BIN=/tmp/before benches/instructions.sh     # binaries built earlier
#   MODES=sse TOP=30 benches/instructions.sh
#   KEEP=/tmp/cg benches/instructions.sh          # keep the gateway's profiles
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

command -v valgrind >/dev/null || { echo "valgrind is required: apt-get install valgrind" >&2; exit 1; }
DURATION=${DURATION:-10s}
MODES=${MODES:-json sse}
TOP=${TOP:-0}

bench_init
MOCK_PORT=$(free_port)
start_mock 1 "$MOCK_PORT"
write_wrk_scripts
# The pass-through runs first and needs no key; the gateway's is made before it starts.
export KEY=none

# start_counted NAME CMD...: starts CMD under callgrind with counting off; its profiles go to
# $work/cg-NAME.
start_counted() {
  local name=$1
  shift
  CG_DIR="$work/cg-$name"
  rm -rf "$CG_DIR"; mkdir -p "$CG_DIR"
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$CG_DIR/out" \
    "$@" >"$work/$name.out" 2>&1 &
  COUNTED_PID=$!
  pids+=($COUNTED_PID)
}

# count PID URL SCRIPT: sets COUNTED to "requests instructions_per_request" (and leaves the
# profile in $work/last.cg). Run in this shell, not a subshell, so a failure stops the script.
count() {
  local pid=$1 url=$2 script=$3 reqs
  # Warm-up, not counted (caches filled, connections pooled, the tokenizer loaded).
  taskset -c 0 wrk -t1 -c4 -d3s -s "$script" "$url" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  callgrind_control -i on "$pid" >/dev/null 2>&1
  taskset -c 0 wrk -t1 -c4 -d"$DURATION" -s "$script" "$url" >"$work/wrk.out"
  # The settlements of the last requests reach the store in the writer's next batch (20 ms).
  sleep 2
  callgrind_control -i off "$pid" >/dev/null 2>&1
  rm -f "$CG_DIR"/out*
  callgrind_control -d "$pid" >/dev/null 2>&1
  reqs=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' "$work/wrk.out")
  if grep -q 'Non-2xx' "$work/wrk.out"; then
    echo "failed responses:" >&2
    cat "$work/wrk.out" >&2
    exit 1
  fi
  # One dump file per thread or one in all, depending on valgrind's version: add them.
  cat "$CG_DIR"/out* >"$work/last.cg"
  local ir
  ir=$(awk '/^totals:/ {s += $2} END {print s}' "$CG_DIR"/out*)
  COUNTED=$(python3 -c "print($reqs, round($ir / $reqs))")
}

declare -A R
for mode in $MODES; do
  # The pass-through.
  port=$(free_port)
  start_counted passthrough "$bin/duang-bench-passthrough" "127.0.0.1:$port" "127.0.0.1:$MOCK_PORT" 1
  wait_port "$port"
  count "$COUNTED_PID" "http://127.0.0.1:$port/v1/chat/completions" "$work/$mode.lua"
  R[$mode.passthrough]=$COUNTED
  kill "$COUNTED_PID"; wait "$COUNTED_PID" 2>/dev/null || true

  # The gateway, on a fresh store.
  rm -rf "$work"/duang.db*
  port=$(free_port); metrics=$(free_port)
  write_gateway_conf "$work/duang.toml" "$port" "$metrics" "$MOCK_PORT" 1
  bootstrap_key "$work/duang.toml"
  RUST_LOG=error start_counted gateway "$bin/duang-gateway" --conf "$work/duang.toml"
  for _ in $(seq 1 1200); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
    sleep 0.1
  done
  count "$COUNTED_PID" "http://127.0.0.1:$port/v1/chat/completions" "$work/$mode.lua"
  R[$mode.gateway]=$COUNTED
  if [ "$TOP" -gt 0 ]; then
    echo "== $mode: the gateway's $TOP costliest functions (self, whole run of ${COUNTED%% *} requests)"
    callgrind_annotate --inclusive=no "$work/last.cg" 2>/dev/null | sed -n '/^Ir/,$p' | sed -n "1,$((TOP + 8))p"
  fi
  # KEEP=DIR keeps each gateway profile, for callgrind_annotate or kcachegrind.
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$work/last.cg" "$KEEP/gateway-$mode.cg"; fi
  kill "$COUNTED_PID"; wait "$COUNTED_PID" 2>/dev/null || true
done

echo
echo "Instructions per request (callgrind, user space only; wrk -c4 for $DURATION), $(date -u +%F), binaries from $bin"
printf '%-5s %-12s %9s %14s\n' mode arm requests instr/req
for mode in $MODES; do
  for arm in passthrough gateway; do
    read -r n ir <<<"${R[$mode.$arm]}"
    printf '%-5s %-12s %9s %14s\n' "$mode" "$arm" "$n" "$ir"
  done
done
for mode in $MODES; do
  read -r _ p <<<"${R[$mode.passthrough]}"
  read -r _ g <<<"${R[$mode.gateway]}"
  python3 -c "print(f'$mode: gateway {$g:,} instructions per request = {$g / $p:.2f}x the pass-through ({$p:,})')"
done
