#!/usr/bin/env bash
# dbops under load: 50 logged-in sessions on the main pages for a minute while
# backups run, on loopback; plus start-up time and idle memory of `dbops serve`.
#
#   bench/load.sh
#
# What it does (everything on 127.0.0.1; everything it creates is removed at the
# end, also on failure or Ctrl-C):
#   1. creates a scratch console database (dbops_bench_load) and a pgbench target
#      database (dbops_bench_load_pg, scale $BENCH_SCALE) and points a Redis target
#      at the machine's Redis ($BENCH_REDIS, read-only pages only);
#   2. start-up: starts `dbops serve` $BENCH_STARTS times (first on the empty
#      console database, so the first start includes the migrations) and times exec
#      -> first 200 from /readyz; idle RSS (VmRSS) 10 s after the last start;
#   3. creates 10 users (operators, approvers, an admin) and logs 50 sessions in
#      with curl (GET /login for cookie + CSRF token, POST /login -> 303, GET /);
#   4. takes one backup to have a backup page, then keeps a backup of the target
#      running for the whole load phase (a new one is queued through the web form
#      as soon as the last one ends) and counts them;
#   5. for each phase ("paced": each connection waits ~$BENCH_THINK_MS ms between
#      requests, like busy people clicking; "flat out": no wait, the machine
#      saturated) runs one wrk per page at the same time, $BENCH_CONNS connections
#      each, for $BENCH_SECONDS s; every request carries one of the 50 session
#      cookies in turn (bench/load_wrk.lua); anything but 200 is an error;
#   6. RSS after the load; the server's log is checked for errors;
#   7. with BENCH_SOAK_MINUTES=N (e.g. 10): a paced soak of N minutes with
#      backups running throughout, the server's RSS sampled every minute; prints
#      RSS after 1 minute, after N minutes (and their ratio) and after 30 s idle.
#
# DBOPS_BIN picks the binary (default target/release/dbops).
# BENCH_SERVER_ENV: extra environment for `dbops serve` only, e.g.
#   "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2" (another allocator) or
#   "MALLOC_ARENA_MAX=16" (glibc's own default on 2 cores: dbops then does not
#   limit the arenas itself).
# BENCH_REUSE_TARGET=1 reuses the pgbench database when it exists (no refill);
# BENCH_KEEP_TARGET=1 leaves it at the end (drop dbops_bench_load_pg yourself).
# BENCH_QUIET: see bench/lib.sh; the fill runs before the first window, which
# covers start-up to the last phase; the soak has a window of its own.
#
# Needs: wrk (apt-get install -y wrk), curl, psql, pgbench, python3; PostgreSQL at
# $BENCH_PG (a role that may create databases); Redis at $BENCH_REDIS.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
REDIS="${BENCH_REDIS:-redis://127.0.0.1:6379/0}"
SCALE="${BENCH_SCALE:-100}"
SECONDS_LOAD="${BENCH_SECONDS:-60}"
CONNS="${BENCH_CONNS:-5}"
THINK="${BENCH_THINK_MS:-100}"
STARTS="${BENCH_STARTS:-5}"
PHASES="${BENCH_PHASES:-paced flat}"   # also: paced-nobackup, flat-nobackup
DB=dbops_bench_load
TDB=dbops_bench_load_pg
SOAK_MINUTES="${BENCH_SOAK_MINUTES:-0}"   # 10: a 10-minute paced soak after the phases
BIN="${DBOPS_BIN:-target/release/dbops}"
WORK=$(mktemp -d /tmp/dbops-bench-load.XXXXXX)
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$RESULTS/load-$STAMP.txt"
SERVER_PID=""
FEEDER_PID=""

for tool in wrk curl psql pgbench python3; do
  command -v "$tool" >/dev/null || {
    [ "$tool" = pgbench ] && PATH="$PATH:$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)" && continue
    echo "needs $tool (wrk: apt-get install -y wrk)" >&2; exit 2; }
done
case "$PG$REDIS" in *127.0.0.1*|*localhost*) ;; *) echo "loopback only" >&2; exit 2 ;; esac

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
cleanup() {
  quiet_end
  [ -n "$FEEDER_PID" ] && kill "$FEEDER_PID" 2>/dev/null || true
  stop_server
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  [ "${BENCH_KEEP_TARGET:-0}" = 1 ] || psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $TDB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

say() { echo "$*" | tee -a "$OUT"; }
now_ms() { date +%s%3N; }
rss_mib() { awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
db() { psql "$PG/$DB" -X -At "$@"; }

[ -x "$BIN" ] || cargo build --release

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT
cat > "$WORK/dbops.toml" <<TOML
database_url = "$PG/$DB"
listen = "127.0.0.1:$PORT"
[backups]
directory = "$WORK/store"
[[postgres]]
name = "pg"
url_env = "LOAD_PG_URL"
policy = "production"
description = "pgbench, scale $SCALE"
[postgres.backup]
keep_last = 2
[[redis]]
name = "cache"
url_env = "LOAD_REDIS_URL"
policy = "staging"
TOML
export LOAD_PG_URL="$PG/$TDB" LOAD_REDIS_URL="$REDIS" RUST_LOG=warn

{
  echo "# dbops load benchmark, $STAMP"
  echo "# machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r)"
  echo "# $(psql "$PG/postgres" -Atc 'SELECT version()' | cut -d, -f1); $(redis-cli -u "$REDIS" INFO server 2>/dev/null | grep redis_version | tr -d '\r' || true); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
  echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# server environment: ${BENCH_SERVER_ENV:-(none)}; MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-(unset: dbops limits glibc to 2 arenas itself)}"
} | tee "$OUT"

# ---------------------------------------------------------------- 1. databases
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
psql "$PG/postgres" -qc "CREATE DATABASE $DB" >/dev/null
if [ "${BENCH_REUSE_TARGET:-0}" = 1 ] && [ "$(psql "$PG/postgres" -Atc "SELECT count(*) FROM pg_database WHERE datname = '$TDB'")" = 1 ]; then
  say "target: pgbench scale $SCALE, $(psql "$PG/$TDB" -Atc "SELECT pg_size_pretty(pg_database_size(current_database()))") (reused)"
else
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $TDB WITH (FORCE)" >/dev/null
  psql "$PG/postgres" -qc "CREATE DATABASE $TDB" >/dev/null
  t=$(now_ms)
  pgbench -q -i -s "$SCALE" "$PG/$TDB" >/dev/null 2>&1
  psql "$PG/$TDB" -qc "CHECKPOINT" >/dev/null
  say "target: pgbench scale $SCALE, $(psql "$PG/$TDB" -Atc "SELECT pg_size_pretty(pg_database_size(current_database()))") (filled in $(( ($(now_ms) - t) / 1000 )) s)"
fi
quiet_begin
say "load average when the measurements started: $QUIET_LOAD"

# ---------------------------------------------------------------- 2. start-up, idle RSS
# Starts the server; sets SERVER_PID and STARTUP_MS (exec -> first 200 from /readyz).
start_server() {
  local t0 code
  t0=$(now_ms)
  env ${BENCH_SERVER_ENV:-} "$BIN" --config "$WORK/dbops.toml" serve >>"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 3000); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$BASE/readyz" 2>/dev/null || true)
    [ "$code" = 200 ] && { STARTUP_MS=$(( $(now_ms) - t0 )); return 0; }
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; echo "dbops serve exited" >&2; return 1; }
    sleep 0.005
  done
  echo "no 200 from /readyz after 15 s" >&2; return 1
}
start_server; first=$STARTUP_MS
stop_server
starts=()
for _ in $(seq 2 "$STARTS"); do
  start_server; starts+=("$STARTUP_MS")
  stop_server
done
say "start-up (exec -> /readyz 200): first start on an empty console database (runs the migrations) $first ms; then median $(printf '%s\n' "${starts[@]}" | median) ms of $(( STARTS - 1 )) (${starts[*]} ms)"
start_server
sleep 10
IDLE_RSS=$(rss_mib "$SERVER_PID")
say "idle RSS 10 s after start: $IDLE_RSS MiB (pid $SERVER_PID)"

# ---------------------------------------------------------------- 3. users, sessions
ROLES=(operator operator operator operator approver approver approver admin operator operator)
for u in $(seq 1 10); do
  echo "load-password-$u" | "$BIN" --config "$WORK/dbops.toml" user add \
    --username "load$u" --role "${ROLES[$((u - 1))]}" --password-stdin >/dev/null
done
: >"$WORK/cookies"
t=$(now_ms)
for s in $(seq 1 50); do
  u=$(( (s - 1) % 10 + 1 ))
  jar="$WORK/jar$s"
  curl -fsS -c "$jar" -b "$jar" -o "$WORK/login.html" "$BASE/login"
  csrf=$(sed -n 's/.*name="csrf_token" value="\([^"]*\)".*/\1/p' "$WORK/login.html" | head -1)
  code=$(curl -sS -c "$jar" -b "$jar" -o /dev/null -w '%{http_code}' \
    --data-urlencode "username=load$u" --data-urlencode "password=load-password-$u" \
    --data-urlencode "csrf_token=$csrf" "$BASE/login")
  [ "$code" = 303 ] || { echo "login of load$u answered $code" >&2; exit 1; }
  curl -fsS -c "$jar" -b "$jar" -o "$WORK/home$s.html" "$BASE/"
  cookie=$(awk '$6 == "dbops_session" {print "dbops_session=" $7}' "$jar")
  echo "$cookie" >>"$WORK/cookies"
done
say "$(sort -u "$WORK/cookies" | wc -l) distinct sessions logged in (10 users: operators, approvers, an admin; 5 sessions each) in $(( $(now_ms) - t )) ms"
# Session 1 (load1, an operator) queues the backups.
OPJAR="$WORK/jar1"
OPCSRF=$(sed -n 's/.*name="csrf_token" value="\([^"]*\)".*/\1/p' "$WORK/home1.html" | head -1)

# ---------------------------------------------------------------- 4. backups
queue_backup() {
  curl -sS -c "$OPJAR" -b "$OPJAR" -o /dev/null -w '%{http_code}' \
    --data-urlencode "csrf_token=$OPCSRF" --data-urlencode format=custom \
    "$BASE/targets/pg/backups"
}
active_backups() { db -c "SELECT count(*) FROM backups WHERE status IN ('queued', 'running')"; }
[ "$(queue_backup)" = 303 ] || { echo "could not queue a backup" >&2; exit 1; }
while [ "$(active_backups)" != 0 ]; do sleep 0.5; done
BACKUP_ID=$(db -c "SELECT max(id) FROM backups WHERE status = 'good'")
[ -n "$BACKUP_ID" ] || { echo "the first backup failed: $(db -c "SELECT error FROM backups ORDER BY id DESC LIMIT 1")" >&2; exit 1; }
say "first backup #$BACKUP_ID: $(db -c "SELECT pg_size_pretty(bytes) || ' in ' || round(extract(epoch FROM finished_at - started_at)::numeric, 1) || ' s' FROM backups WHERE id = $BACKUP_ID")"

# Keeps one backup queued or running until killed.
feeder() {
  while true; do
    if [ "$(active_backups)" = 0 ]; then queue_backup >/dev/null; fi
    # What-if (BENCH_RENICE=N): the server's pg_dump children at a lower CPU priority.
    if [ -n "${BENCH_RENICE:-}" ]; then
      for c in $(pgrep -P "$SERVER_PID" -x pg_dump 2>/dev/null); do renice -n "$BENCH_RENICE" -p "$c" >/dev/null 2>&1 || true; done
    fi
    sleep 0.2
  done
}

PAGES=(
  "/" "/operations" "/backups" "/approvals" "/jobs" "/backups/$BACKUP_ID"
  "/targets/pg/backups" "/targets/pg/migrations" "/targets/pg/activity" "/targets/cache/redis"
)
LIVE="/ /targets/pg/migrations /targets/pg/activity /targets/cache/redis"
is_live() { case " $LIVE " in *" $1 "*) echo yes ;; *) echo no ;; esac; }

# Every page answers 200 with its own content before the load starts.
for p in "${PAGES[@]}"; do
  code=$(curl -sS -b "$OPJAR" -o "$WORK/check.html" -w '%{http_code}' "$BASE$p")
  [ "$code" = 200 ] || { echo "$p answered $code" >&2; exit 1; }
  grep -q '<h1' "$WORK/check.html" || { echo "$p has no heading" >&2; exit 1; }
done

# ---------------------------------------------------------------- 5. load
for phase in $PHASES; do
  delay=0; case "$phase" in paced*) delay=$THINK ;; esac
  id0=$(db -c "SELECT coalesce(max(id), 0) FROM backups")
  during="backups running throughout"
  case "$phase" in
    *-nobackup) during="no backup running" ;;
    *) feeder & FEEDER_PID=$!; sleep 1 ;;
  esac
  say ""
  say "== phase: $phase ($(( ${#PAGES[@]} * CONNS )) connections, $CONNS per page, think time ${delay} ms ±50 %, ${SECONDS_LOAD} s, $during; load average $(cut -d' ' -f1-3 /proc/loadavg))"
  pids=()
  for i in "${!PAGES[@]}"; do
    LOAD_COOKIES="$WORK/cookies" LOAD_PATH="${PAGES[$i]}" LOAD_DELAY_MS=$delay \
      wrk -t1 -c"$CONNS" -d"${SECONDS_LOAD}s" --timeout 10s -s bench/load_wrk.lua "$BASE" \
      >"$WORK/wrk-$phase-$i.txt" 2>&1 &
    pids+=($!)
  done
  peak=0
  while kill -0 "${pids[0]}" 2>/dev/null; do
    r=$(awk '/^VmRSS/ {print $2}' "/proc/$SERVER_PID/status"); [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.5
  done
  for p in "${pids[@]}"; do wait "$p"; done
  if [ -n "$FEEDER_PID" ]; then kill "$FEEDER_PID"; wait "$FEEDER_PID" 2>/dev/null || true; FEEDER_PID=""; fi
  printf '%-28s %5s %9s %8s %8s %8s %8s %7s %s\n' page live requests req/s p50_ms p99_ms max_ms errors statuses | tee -a "$OUT"
  for i in "${!PAGES[@]}"; do
    line=$(grep '^RESULT' "$WORK/wrk-$phase-$i.txt" || { cat "$WORK/wrk-$phase-$i.txt" >&2; echo "RESULT requests=0"; })
    get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $line"; }
    errors=$(( $(get non200) + $(get socket_errors) + $(get timeouts) ))
    printf '%-28s %5s %9s %8s %8s %8s %8s %7s %s\n' "${PAGES[$i]}" "$(is_live "${PAGES[$i]}")" \
      "$(get requests)" "$(get rps)" "$(get p50_ms)" "$(get p99_ms)" "$(get max_ms)" "$errors" "$(get statuses)" | tee -a "$OUT"
  done
  while [ "$(active_backups)" != 0 ]; do sleep 0.5; done
  say "backups during the phase (by status now; retention keeps the last 2 good, older ones end 'deleted'): $(db -c "SELECT string_agg(n || ' ' || status, ', ') FROM (SELECT status, count(*) n FROM backups WHERE id > $id0 GROUP BY status) s"); $(db -c "SELECT coalesce(pg_size_pretty(sum(bytes)), '0') || ' written, ' || coalesce(round(avg(extract(epoch FROM finished_at - started_at))::numeric, 1), 0) || ' s each on average' FROM backups WHERE id > $id0 AND bytes IS NOT NULL")"
  say "server RSS: peak $(( peak / 1024 )) MiB during the phase; load average $(cut -d' ' -f1-3 /proc/loadavg)"
done

# ---------------------------------------------------------------- 6. after
sleep 5
say ""
AFTER5=$(rss_mib "$SERVER_PID")
quiet_end
sleep 25
say "RSS after the load: $AFTER5 MiB after 5 s idle, $(rss_mib "$SERVER_PID") MiB after 30 s idle; idle RSS before it: $IDLE_RSS MiB"
errs=$(grep -c -E '"level":"ERROR"| ERROR ' "$WORK/server.log" || true)
say "server log: $errs ERROR lines"
[ "$errs" = 0 ] || grep -E '"level":"ERROR"| ERROR ' "$WORK/server.log" | head -5 | tee -a "$OUT"

# ---------------------------------------------------------------- 7. soak
if [ "$SOAK_MINUTES" -gt 0 ]; then
  say ""
  quiet_begin
  say "== soak: paced ($THINK ms think time), $(( ${#PAGES[@]} * CONNS )) connections, backups running throughout, $SOAK_MINUTES min; RSS before: $(rss_mib "$SERVER_PID") MiB"
  feeder & FEEDER_PID=$!
  pids=()
  for i in "${!PAGES[@]}"; do
    LOAD_COOKIES="$WORK/cookies" LOAD_PATH="${PAGES[$i]}" LOAD_DELAY_MS=$THINK \
      wrk -t1 -c"$CONNS" -d"$(( SOAK_MINUTES * 60 ))s" --timeout 10s -s bench/load_wrk.lua "$BASE" \
      >"$WORK/wrk-soak-$i.txt" 2>&1 &
    pids+=($!)
  done
  samples=()
  for m in $(seq 1 "$SOAK_MINUTES"); do
    sleep 60
    samples+=("$(rss_mib "$SERVER_PID")")
    say "  minute $m: RSS ${samples[-1]} MiB, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  done
  for p in "${pids[@]}"; do wait "$p"; done
  kill "$FEEDER_PID"; wait "$FEEDER_PID" 2>/dev/null || true; FEEDER_PID=""
  say "  end of the soak: load average $(loadavg)"
  quiet_end
  total=0; errors=0; worst=0
  for i in "${!PAGES[@]}"; do
    line=$(grep '^RESULT' "$WORK/wrk-soak-$i.txt" || echo "RESULT requests=0")
    get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $line"; }
    total=$(( total + $(get requests) ))
    errors=$(( errors + $(get non200) + $(get socket_errors) + $(get timeouts) ))
    worst=$(echo "$(get p99_ms) $worst" | awk '{print ($1 > $2) ? $1 : $2}')
  done
  while [ "$(active_backups)" != 0 ]; do sleep 0.5; done
  sleep 30
  idle=$(rss_mib "$SERVER_PID")
  say "soak: $total requests, $errors errors, worst page p99 $worst ms; RSS after 1 min ${samples[0]} MiB, after $SOAK_MINUTES min ${samples[-1]} MiB (ratio $(echo "${samples[-1]} / ${samples[0]}" | bc -l | cut -c1-5)), after 30 s idle $idle MiB"
fi
say "results: $OUT"
