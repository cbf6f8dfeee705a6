#!/usr/bin/env bash
# Delete by pattern and memory by prefix: dbops vs the redis-cli ways, same server,
# same keys, same run.
#
# Starts its own redis-server on a high port (BENCH_REDIS_PORT, default 16390;
# never 6379), loads 2,000,000 keys (1,000,000 matching bench:del:*, 1,000,000
# bench:keep:*) with DEBUG POPULATE, then for each way of deleting bench:del:*
# reloads and times it while a probe client PINGs the server and records the
# slowest answer:
#   1. dbops redis delete-pattern (SCAN + UNLINK batches of 1000, pipelined);
#   2. redis-cli --scan --pattern P --count 1000 | xargs -n 1000 redis-cli UNLINK;
#   3. the same with redis-cli's default SCAN COUNT (10), as the runbook has it;
#   4. the runbook's one process per key (xargs -L 1 redis-cli DEL) on a smaller
#      set (BENCH_SMALL matching keys, default 20,000), extrapolated.
# Then memory by prefix (dbops redis memory, every key) vs redis-cli --memkeys.
#
# Loopback only; the server, the scratch database and the files are removed at
# the end (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
PORT="${BENCH_REDIS_PORT:-16390}"
KEYS="${BENCH_KEYS:-1000000}"
SMALL="${BENCH_SMALL:-20000}"
BIN=target/release/dbops
WORK=$(mktemp -d /tmp/dbops-bench-redis.XXXXXX)
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$RESULTS/redis_delete-$STAMP.txt"
REDIS_PID=

[ "$PORT" != 6379 ] || { echo "refusing to use port 6379" >&2; exit 2; }

cleanup() {
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null || true
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS dbops_bench_redis WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$BIN" ] || cargo build --release

redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --enable-debug-command yes --dir "$WORK" --daemonize no --logfile "$WORK/redis.log" &
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.1; done
rc() { redis-cli -p "$PORT" "$@"; }

psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS dbops_bench_redis WITH (FORCE)" >/dev/null
psql "$PG/postgres" -qc "CREATE DATABASE dbops_bench_redis" >/dev/null
cat > "$WORK/dbops.toml" <<TOML
database_url = "$PG/dbops_bench_redis"
[[redis]]
name = "bench"
url_env = "BENCH_REDIS_URL"
policy = "dev"
TOML
export BENCH_REDIS_URL="redis://127.0.0.1:$PORT"
export RUST_LOG=warn
DBOPS=("$BIN" --config "$WORK/dbops.toml")

now() { date +%s.%N; }

# load N: N matching + N other keys, nothing else.
load() {
  rc FLUSHALL >/dev/null
  rc DEBUG POPULATE "$1" bench:del 16 >/dev/null
  rc DEBUG POPULATE "$1" bench:keep 16 >/dev/null
}

# timed CMD…: runs it with the probe running; prints "seconds probe_max_ms probe_p99_ms".
timed() {
  rm -f "$WORK/stop"
  python3 bench/redis_probe.py "$PORT" "$WORK/stop" >"$WORK/probe.out" &
  local probe=$! start end
  sleep 0.3
  start=$(now)
  bash -o pipefail -c "$1" >"$WORK/last.out" 2>"$WORK/last.err" || { cat "$WORK/last.err" >&2; touch "$WORK/stop"; wait $probe; return 1; }
  end=$(now)
  touch "$WORK/stop"
  wait $probe
  read -r pmax pp99 _ _ <"$WORK/probe.out"
  echo "$(echo "$end - $start" | bc -l | xargs printf '%.2f') $pmax $pp99"
}

check() { # check EXPECTED_LEFT_MATCHING
  local left keep
  left=$(rc --scan --pattern 'bench:del:*' | wc -l)
  keep=$(rc DBSIZE)
  [ "$left" -eq "$1" ] || { echo "expected $1 matching keys left, found $left" >&2; exit 1; }
  echo "$keep"
}

{
echo "# dbops Redis delete-by-pattern benchmark, $STAMP"
echo "# machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); $(redis-server --version | cut -d' ' -f1-3)"
echo "# keyspace: $((KEYS * 2)) keys, $KEYS matching bench:del:* (16-byte strings)"
echo "# columns: seconds, probe max ms, probe p99 ms"
} | tee "$OUT"

load "$KEYS"
r_dbops=$(timed "${DBOPS[*]} redis delete-pattern --target bench --pattern 'bench:del:*' --yes --skip-preview")
left=$(check 0)
echo "dbops delete-pattern (batch 1000):              $r_dbops   (remaining: $left keys; $(cat "$WORK/last.out"))" | tee -a "$OUT"

# redis-cli --count (SCAN COUNT for --scan) exists from redis-cli 7.2 on.
if redis-cli --help 2>&1 | grep -q -- '--count'; then
  load "$KEYS"
  r_cli=$(timed "redis-cli -p $PORT --scan --pattern 'bench:del:*' --count 1000 | xargs -n 1000 redis-cli -p $PORT UNLINK >/dev/null")
  left=$(check 0)
  echo "redis-cli --scan --count 1000 | xargs -n 1000 UNLINK: $r_cli   (remaining: $left keys)" | tee -a "$OUT"
else
  r_cli=""
  echo "redis-cli --scan --count 1000: not available (redis-cli $(redis-cli --version | cut -d' ' -f2) has no --count)" | tee -a "$OUT"
fi

load "$KEYS"
r_cli10=$(timed "redis-cli -p $PORT --scan --pattern 'bench:del:*' | xargs -n 1000 redis-cli -p $PORT UNLINK >/dev/null")
left=$(check 0)
echo "redis-cli --scan (COUNT 10) | xargs -n 1000 UNLINK: $r_cli10   (remaining: $left keys)" | tee -a "$OUT"

load "$SMALL"
r_one=$(timed "redis-cli -p $PORT --scan --pattern 'bench:del:*' | xargs -L 1 redis-cli -p $PORT DEL >/dev/null")
check 0 >/dev/null
one_s=$(echo "$r_one" | cut -d' ' -f1)
echo "runbook xargs -L 1 DEL, $SMALL keys:           $r_one   (≈ $(echo "$one_s * $KEYS / $SMALL" | bc -l | xargs printf '%.0f') s for $KEYS keys)" | tee -a "$OUT"

d=$(echo "$r_dbops" | cut -d' ' -f1)
c=$(echo "$r_cli" | cut -d' ' -f1 || true)
c10=$(echo "$r_cli10" | cut -d' ' -f1)
{
[ -n "$c" ] && echo "ratio redis-cli(COUNT 1000)/dbops: $(echo "$c / $d" | bc -l | xargs printf '%.2f')x"
echo "ratio redis-cli(COUNT 10)/dbops:   $(echo "$c10 / $d" | bc -l | xargs printf '%.2f')x"
echo "ratio one-process-per-key/dbops:   $(echo "$one_s * $KEYS / $SMALL / $d" | bc -l | xargs printf '%.0f')x (extrapolated)"
} | tee -a "$OUT"

# Memory by prefix over the whole 2,000,000-key keyspace.
load "$KEYS"
r_mem=$(timed "${DBOPS[*]} redis memory --target bench --depth 2")
groups=$(python3 -c "import json,sys; r=json.load(open('$WORK/last.out')); print(', '.join(f\"{g['prefix']} {g['keys']} keys {g['bytes']} B\" for g in r['groups']))")
echo "dbops redis memory (all keys, depth 2):         $r_mem   ($groups)" | tee -a "$OUT"
r_memkeys=$(timed "redis-cli -p $PORT --memkeys")
echo "redis-cli --memkeys:                             $r_memkeys   ($(grep -c . "$WORK/last.out") lines of output, biggest key per type only)" | tee -a "$OUT"
m=$(echo "$r_mem" | cut -d' ' -f1)
k=$(echo "$r_memkeys" | cut -d' ' -f1)
echo "ratio redis-cli --memkeys/dbops memory: $(echo "$k / $m" | bc -l | xargs printf '%.2f')x" | tee -a "$OUT"
echo "# written to $OUT"
