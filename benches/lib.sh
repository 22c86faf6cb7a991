# Shared pieces of the load benchmarks (sourced by load.sh and threads.sh; not run alone).
#
# The reference arms come from ../shared/bench (SHARED_BENCH): an nginx + Lua mock upstream that
# answers fixed bodies (a chat completion, or 22 SSE chunks, a usage chunk and [DONE] in one
# write) and nginx as a plain reverse proxy. Both need Debian's nginx-light and
# libnginx-mod-http-lua; without them (or with MOCK=duang) the project's own mock upstream
# (benches/mock_upstream.rs) serves instead and there is no nginx arm.

SHARED_BENCH=${SHARED_BENCH:-../shared/bench}
NGINX_LUA=/usr/lib/nginx/modules/ngx_http_lua_module.so

bench_init() {
  command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }
  # BIN=/some/dir runs binaries built earlier (say, a copy of the last commit's, to compare two
  # builds on one machine) instead of building this tree's; PROFILE picks the cargo profile
  # (release, the default, or dist: the fat-LTO build for deployments).
  PROFILE=${PROFILE:-release}
  if [ -n "${BIN:-}" ]; then
    bin=$BIN
  else
    cargo build --profile "$PROFILE" --quiet --bins
    bin=target/$PROFILE
  fi
  if [ -z "${MOCK:-}" ]; then
    if command -v nginx >/dev/null && [ -f "$NGINX_LUA" ] && [ -d "$SHARED_BENCH/bodies" ]; then
      MOCK=nginx
    else
      echo "no nginx with Lua (apt-get install nginx-light libnginx-mod-http-lua) or no $SHARED_BENCH:" \
        "the project's own mock serves and there is no nginx arm" >&2
      MOCK=duang
    fi
  fi
  work=$(mktemp -d)
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_http() {
  for _ in $(seq 1 400); do
    curl -sf "$1" >/dev/null && return 0
    sleep 0.05
  done
  echo "nothing answered at $1" >&2
  exit 1
}

# Waits until something answers HTTP on the port, whatever its status.
wait_port() {
  for _ in $(seq 1 400); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  exit 1
}

# start_mock CORES PORT [WORKERS]: the mock upstream on those cores.
start_mock() {
  local cores=$1 port=$2 workers=${3:-1}
  if [ "$MOCK" = nginx ]; then
    local dir="$work/mock-$port"
    mkdir -p "$dir"
    sed -e "s#@BODIES@#$(cd "$SHARED_BENCH" && pwd)/bodies#g" \
      -e "s#127.0.0.1:18080#127.0.0.1:$port#" \
      -e "s#^worker_processes 1;#worker_processes $workers;#" \
      "$SHARED_BENCH/mock-upstream.nginx.conf.in" >"$dir/mock.conf"
    taskset -c "$cores" nginx -p "$dir/" -c "$dir/mock.conf" -e "$dir/error.log" &
    pids+=($!)
    wait_http "http://127.0.0.1:$port/health"
  else
    taskset -c "$cores" "$bin/duang-mock-upstream" --listen "127.0.0.1:$port" --chunks 8 >/dev/null &
    pids+=($!)
    wait_http "http://127.0.0.1:$port/_mock/stats"
  fi
}

# start_nginx_proxy CORES PORT UPSTREAM_PORT: nginx as a plain reverse proxy; sets NGINX_PID
# (its master; the CPU counted is the master's and its worker's).
start_nginx_proxy() {
  local cores=$1 port=$2 upstream=$3
  local dir="$work/proxy-$port"
  mkdir -p "$dir"
  sed -e "s#@UPSTREAM@#127.0.0.1:$upstream#g" -e "s#127.0.0.1:18101#127.0.0.1:$port#" \
    "$SHARED_BENCH/proxy.nginx.conf.in" >"$dir/proxy.conf"
  taskset -c "$cores" nginx -p "$dir/" -c "$dir/proxy.conf" -e "$dir/error.log" &
  NGINX_PID=$!
  pids+=($NGINX_PID)
}

# write_gateway_conf FILE PORT METRICS_PORT MOCK_PORT THREADS: a gateway with every feature on
# (auth, limits in process, holds, billing, usage written to its own SQLite file, or to
# STORE_URL) and limits far above what the benchmark sends.
write_gateway_conf() {
  local file=$1 port=$2 metrics=$3 mock=$4 threads=${5:-1}
  cat >"$file" <<EOF
[gateway]
listen = "127.0.0.1:$port"
metrics_listen = "127.0.0.1:$metrics"
threads = $threads
max_client_connections = 100000
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
base_url = "http://127.0.0.1:$mock/v1"
first_byte_timeout_ms = 120000
idle_timeout_ms = 120000
models."mock-small" = { input_usd_per_mtok = "0.10", output_usd_per_mtok = "0.40" }
EOF
}

# bootstrap_key CONF: an account with credit and a key for it, exported as KEY.
bootstrap_key() {
  local conf=$1
  "$bin/duang-admin" --conf "$conf" account create --email bench@example.com --verified >/dev/null
  "$bin/duang-admin" --conf "$conf" credits grant bench@example.com --usd 100000 >/dev/null
  KEY=$("$bin/duang-admin" --conf "$conf" key create bench@example.com --name bench 2>/dev/null)
  export KEY
}

# start_gateway CORES CONF LOG: sets GW_PID; waits until it answers /healthz.
start_gateway() {
  local cores=$1 conf=$2 log=$3 port
  port=$(sed -n 's/^listen = "127.0.0.1:\([0-9]*\)"/\1/p' "$conf" | head -1)
  RUST_LOG=error taskset -c "$cores" "$bin/duang-gateway" --conf "$conf" 2>"$log" &
  GW_PID=$!
  pids+=($GW_PID)
  wait_http "http://127.0.0.1:$port/healthz"
}

write_wrk_scripts() {
  cat >"$work/json.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("KEY")
wrk.body = '{"model":"budget","messages":[{"role":"user","content":"Say ok in one word."}]}'
EOF
  sed 's/"messages"/"stream":true,"messages"/' "$work/json.lua" >"$work/sse.lua"
}

# CPU ticks (user + system) of a process and of its live children (nginx's worker).
cpu_ticks() {
  local total=0 p
  for p in "$@" $(pgrep -P "$1" 2>/dev/null); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# run_wrk URL SCRIPT CONNS CORES [THREADS] → "rps p50_us p99_us requests"
run_wrk() {
  local url=$1 script=$2 conns=$3 cores=$4 threads=${5:-1}
  taskset -c "$cores" wrk -t"$threads" -c"$conns" -d"$DURATION" --latency -s "$script" "$url" >"$work/wrk.out"
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

# measure PID URL SCRIPT CONNS CORES [THREADS] → "rps p50 p99 cpu_us_per_request"
measure() {
  local pid=$1 url=$2 script=$3 conns=$4 cores=$5 threads=${6:-1} before after rps p50 p99 reqs cpu="-"
  [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  read -r rps p50 p99 reqs < <(run_wrk "$url" "$script" "$conns" "$cores" "$threads")
  if [ -n "$pid" ]; then
    after=$(cpu_ticks "$pid")
    cpu=$(python3 -c "print(round(($after - $before) * 1e6 / $(getconf CLK_TCK) / $reqs, 1))")
  fi
  echo "$rps $p50 $p99 $cpu"
}
