#!/usr/bin/env bash
# The operations log at 1,000,000 rows: dbops' pages and CSV export, timed side by
# side with the same queries run by hand through psql, on the same data, in one run.
#
#   bench/operations_log.sh
#
# Environment (all optional):
#   BENCH_PG       server to use, without a database   (postgres://postgres@127.0.0.1:5432)
#   BENCH_DB       scratch console database, DROPPED and recreated   (dbops_bench_oplog)
#   BENCH_ROWS     rows to put in the operations table   (1000000)
#   BENCH_BATCH    rows per fill transaction   (500)
#   BENCH_RUNS     timed runs per command   (10)
#   BENCH_WARMUP   untimed runs per command first   (2)
#   BENCH_TRIGGER_DEMO  1 = also time single-statement inserts of 5k/10k/20k rows,
#                  rolled back, to show how the chain trigger scales within one
#                  transaction   (1)
#   BENCH_KEEP     1 = keep the database and leave the server stopped (for poking at it)   (0)
#   BENCH_DB_SETTINGS  what-if planner settings for the scratch database, as
#                  space-separated name=value pairs, applied with ALTER DATABASE … SET
#                  after the fill and before dbops connects, so they hold for dbops'
#                  pool and for the psql side alike, e.g.
#                  "random_page_cost=1.1 plan_cache_mode=force_custom_plan"   (unset)
#   BENCH_EXTRA_SQL  what-if SQL run on the scratch database after the fill (then
#                  ANALYZE), e.g. "CREATE INDEX ON operations (kind, outcome, id)"   (unset)
#
# Needs: psql, curl, python3; hyperfine if installed (else a date +%s%N loop).
# Writes bench/results/operations_log-<UTC stamp>.{log,md} and hyperfine JSON files
# in bench/results/operations_log-<UTC stamp>/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
BENCH_PG=${BENCH_PG%/}
DB=${BENCH_DB:-dbops_bench_oplog}
ROWS=${BENCH_ROWS:-1000000}
BATCH=${BENCH_BATCH:-500}
RUNS=${BENCH_RUNS:-10}
WARMUP=${BENCH_WARMUP:-2}
TRIGGER_DEMO=${BENCH_TRIGGER_DEMO:-1}
KEEP=${BENCH_KEEP:-0}
DB_SETTINGS=${BENCH_DB_SETTINGS:-}
EXTRA_SQL=${BENCH_EXTRA_SQL:-}
DBOPS=$ROOT/target/release/dbops

# The console database comes from --config only.
unset DATABASE_URL DBOPS_CONFIG PGOPTIONS || true

case $DB in
  *[!a-z0-9_]*|'') echo "BENCH_DB must be a plain lower-case identifier" >&2; exit 2 ;;
esac
for tool in psql curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 2; }
done

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$ROOT/bench/results
OUT=$RESULTS/operations_log-$STAMP
LOG=$OUT.log
SUMMARY=$OUT.md
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/dbops-bench-oplog.XXXXXX)
SERVER_PID=""
DB_CREATED=0

say() { printf '%s\n' "$*" | tee -a "$LOG"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
admin() { psql -X -q -v ON_ERROR_STOP=1 -d "$BENCH_PG/postgres" "$@"; }
db() { psql -X -q -v ON_ERROR_STOP=1 -d "$BENCH_PG/$DB" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null
  fi
  if [[ $DB_CREATED == 1 && $KEEP != 1 ]]; then
    admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 \
      && echo "Dropped database $DB." \
      || echo "warning: could not drop database $DB" >&2
  elif [[ $DB_CREATED == 1 ]]; then
    echo "BENCH_KEEP=1: database $DB kept ($BENCH_PG/$DB)."
  fi
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

: > "$LOG"
say "# dbops operations log benchmark, $STAMP"
say "log: $LOG"

# ---------------------------------------------------------------- 1. binary
if [[ ! -x $DBOPS ]]; then
  say "Building target/release/dbops …"
  (cd "$ROOT" && cargo build --release)
fi

# ---------------------------------------------------------------- machine
PG_VERSION=$(admin -Atc "SHOW server_version")
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo "machine: $(nproc) CPUs ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)), $(free -h | awk '/^Mem:/ {print $2}') RAM, kernel $(uname -r)"
  echo "PostgreSQL $PG_VERSION; shared_buffers $(admin -Atc 'SHOW shared_buffers'), work_mem $(admin -Atc 'SHOW work_mem'), random_page_cost $(admin -Atc 'SHOW random_page_cost'), jit $(admin -Atc 'SHOW jit')"
  echo "dbops: $DBOPS ($(stat -c %y "$DBOPS" | cut -d. -f1)); load average at start: $LOAD_START"
  echo "hyperfine: $(command -v hyperfine >/dev/null && hyperfine --version || echo 'not installed, using a date +%s%N loop')"
} | tee -a "$LOG"

# ---------------------------------------------------------------- 2. database
say ""
say "## Fresh console database $DB"
admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
admin -c "CREATE DATABASE $DB" >/dev/null
DB_CREATED=1
CONFIG=$TMP/dbops.toml
echo "database_url = \"$BENCH_PG/$DB\"" > "$CONFIG"
RUST_LOG=warn "$DBOPS" --config "$CONFIG" migrate 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------- 3. fill
# Rows go in through the append-only trigger, as the app writes them, so every row
# gets its hash-chain link. Batches of $BATCH rows per transaction, with the one-row
# chain head vacuumed between batches: within one transaction every row leaves a
# dead version of the chain head that the next row's lookup has to step over, so a
# single INSERT of n rows costs O(n^2) (see the trigger demo at the end).
say ""
say "## Filling operations with $ROWS rows ($BATCH rows per transaction, through the trigger)"
FILL=$TMP/fill.sql
cat > "$FILL" <<'SQL'
\set ON_ERROR_STOP 1
SELECT setseed(0.20261121);
SELECT date_trunc('minute', now() - interval '180 days') AS t0,
       180 * 86400.0 / :rows AS step \gset

-- ~30 kinds, weights per mille; tclass decides the target; dur_ms the typical length.
CREATE TEMP TABLE bench_kind AS
SELECT kind, tclass, dur_ms,
       (sum(w) OVER (ORDER BY ord) - w)::int AS lo,
       (sum(w) OVER (ORDER BY ord))::int AS hi
FROM (VALUES
  ( 1, 'auth.login',           220, 'none',    150),
  ( 2, 'auth.logout',          120, 'none',     20),
  ( 3, 'auth.login.failed',     25, 'none',    150),
  ( 4, 'auth.lockout',           2, 'none',     10),
  ( 5, 'auth.denied',           10, 'none',      5),
  ( 6, 'auth.csrf.rejected',     2, 'none',      5),
  ( 7, 'user.create',            2, 'none',    200),
  ( 8, 'user.disable',           1, 'none',     30),
  ( 9, 'user.enable',            1, 'none',     30),
  (10, 'user.role.change',       1, 'none',     30),
  (11, 'user.password.reset',    2, 'none',    200),
  (12, 'console.start',          1, 'none',   1500),
  (13, 'console.stop',           1, 'none',    800),
  (14, 'operations.export',      8, 'none',   2500),
  (15, 'pg.query.run',         150, 'pg',      400),
  (16, 'pg.explain',            60, 'pg',      250),
  (17, 'pg.activity.view',      90, 'pg',       40),
  (18, 'pg.query.cancel',       15, 'pg',       20),
  (19, 'pg.backend.terminate',   6, 'pg',       20),
  (20, 'pg.vacuum.run',         10, 'pg',    45000),
  (21, 'pg.locks.view',         40, 'pg',       60),
  (22, 'backup.create',         30, 'pg',   180000),
  (23, 'backup.verify',         20, 'pg',    60000),
  (24, 'restore.run',            2, 'pg',   900000),
  (25, 'pg.replication.view',   25, 'pg',       50),
  (26, 'redis.info.view',       60, 'redis',    15),
  (27, 'redis.keys.scan',       50, 'redis',   300),
  (28, 'redis.keys.delete',     12, 'redis',   500),
  (29, 'redis.key.ttl.set',      8, 'redis',    10),
  (30, 'redis.flushdb',          1, 'redis',  2000),
  (31, 'redis.slowlog.view',    25, 'redis',    20)
) v(ord, kind, w, tclass, dur_ms);
SELECT max(hi) = 1000 AS weights_ok FROM bench_kind \gset
\if :weights_ok
\else
  \echo 'bench: the kind weights must add up to 1000'
  SELECT 1/0;
\endif

-- 50 actors: 5 admins, 10 approvers, 20 operators, 15 viewers; the first ones busiest.
CREATE TEMP TABLE bench_actor AS
SELECT i::int, name,
       CASE WHEN i <= 5 THEN 'admin' WHEN i <= 15 THEN 'approver' WHEN i <= 35 THEN 'operator' ELSE 'viewer' END AS role
FROM unnest(ARRAY[
  'alice','bob','carol','dave','erin','frank','grace','heidi','ivan','judy',
  'karl','laura','mallory','nina','oscar','peggy','quentin','rupert','sybil','trent',
  'ursula','victor','walter','xena','yusuf','zoe','amir','beatriz','chen','dmitri',
  'elif','fatima','gunnar','hana','igor','jonas','kemal','lena','mateo','noor',
  'olga','pavel','quinn','rosa','sanjay','tariq','uma','vera','wen','yara'
]) WITH ORDINALITY a(name, i);

PREPARE fill(bigint, bigint) AS
INSERT INTO operations (request_id, actor_id, actor_name, actor_role, kind, target, params,
                        started_at, ended_at, outcome, error, result, approval_id, client_addr)
SELECT gen_random_uuid()::text,
       CASE WHEN anon THEN NULL ELSE ai + 1 END,
       CASE WHEN anon THEN NULL ELSE name END,
       CASE WHEN anon THEN NULL ELSE role END,
       kind, target,
       CASE
         WHEN kind LIKE 'auth.%' THEN jsonb_build_object(
           'username', coalesce(name, 'guest' || n % 97),
           'user_agent', 'Mozilla/5.0 (X11; Linux x86_64; rv:14' || n % 10 || '.0) Gecko/20100101 Firefox/14' || n % 10 || '.0')
         WHEN kind LIKE 'user.%' THEN jsonb_build_object('user_id', 2 + n % 50, 'username', 'user' || n % 50)
         WHEN kind IN ('pg.query.run', 'pg.explain') THEN jsonb_build_object(
           'database', dbname,
           'sql', 'SELECT id, status, total FROM orders WHERE customer_id = ' || n || ' ORDER BY created_at DESC LIMIT 100',
           'read_only', kind = 'pg.explain' OR n % 3 > 0)
         WHEN kind IN ('pg.query.cancel', 'pg.backend.terminate') THEN jsonb_build_object(
           'pid', 1000 + n % 60000, 'reason', 'long-running query')
         WHEN kind LIKE 'backup.%' OR kind = 'restore.run' THEN jsonb_build_object(
           'database', dbname, 'backup_id', 'bk-' || to_char(started_at, 'YYYYMMDD') || '-' || n % 1000, 'format', 'custom')
         WHEN tclass = 'redis' THEN jsonb_build_object(
           'db', n % 16, 'pattern', (ARRAY['session:*', 'cache:product:*', 'queue:jobs:*', 'rate:*'])[1 + n % 4], 'count', 1 + n % 500)
         WHEN tclass = 'pg' THEN jsonb_build_object('database', dbname)
         ELSE '{}'::jsonb
       END,
       started_at,
       started_at + make_interval(secs => dur_ms / 1000.0 * (0.05 - ln(1 - rd))),
       outcome,
       CASE outcome
         WHEN 'failed' THEN CASE WHEN kind LIKE 'auth.%' THEN 'wrong username or password'
           ELSE (ARRAY['connection refused', 'canceling statement due to statement timeout',
                       'permission denied for table orders', 'relation "order_items_tmp" does not exist',
                       'deadlock detected', 'READONLY You can''t write against a read only replica.',
                       'server closed the connection unexpectedly'])[1 + n % 7] END
         WHEN 'denied' THEN CASE WHEN kind LIKE 'auth.%' THEN 'not allowed for this role'
           ELSE 'role ' || role || ' may not run ' || kind || coalesce(' on ' || target, '') END
         WHEN 'interrupted' THEN 'dbops restarted while the operation was running'
         WHEN 'cancelled' THEN 'cancelled by ' || name
       END,
       CASE
         WHEN outcome <> 'succeeded' THEN NULL
         WHEN kind IN ('pg.query.run', 'pg.explain', 'pg.activity.view', 'pg.locks.view', 'pg.replication.view',
                       'redis.keys.scan', 'redis.slowlog.view')
           THEN jsonb_build_object('rows', n % 1000, 'truncated', n % 1000 = 999)
         WHEN kind = 'backup.create' THEN jsonb_build_object(
           'bytes', n::bigint * 123457, 'path', 's3://dbops-backups/' || target || '/' || n || '.dump')
         WHEN kind = 'redis.keys.delete' THEN jsonb_build_object('deleted', n % 500)
         WHEN kind = 'user.create' THEN jsonb_build_object('user_id', 2 + n % 50)
       END,
       CASE WHEN outcome = 'succeeded'
             AND kind IN ('restore.run', 'redis.flushdb', 'pg.backend.terminate', 'redis.keys.delete')
            THEN 1 + n % 5000 END,
       CASE WHEN anon THEN '203.0.113.' || n % 250 ELSE '10.20.' || ai || '.' || 1 + n % 4 END
FROM (
  SELECT r.*, k.kind, k.tclass, k.dur_ms, a.name, a.role,
         (k.kind = 'auth.login.failed' AND ra < 0.3) AS anon,
         (ARRAY['app', 'app', 'reporting', 'postgres'])[1 + n % 4] AS dbname,
         CASE
           WHEN k.kind IN ('auth.login.failed', 'auth.lockout', 'auth.csrf.rejected') THEN 'failed'
           WHEN k.kind = 'auth.denied' THEN 'denied'
           WHEN k.kind LIKE 'auth.%' THEN 'succeeded'
           WHEN ro < 0.940 THEN 'succeeded'
           WHEN ro < 0.982 THEN 'failed'
           WHEN ro < 0.998 THEN 'denied'
           WHEN ro < 0.999 THEN 'interrupted'
           ELSE 'cancelled'
         END AS outcome,
         CASE k.tclass
           WHEN 'pg' THEN CASE WHEN rt < 0.35 THEN 'orders-pg' WHEN rt < 0.55 THEN 'billing-pg'
                               WHEN rt < 0.70 THEN 'users-pg' WHEN rt < 0.82 THEN 'analytics-pg'
                               WHEN rt < 0.92 THEN 'search-pg' WHEN rt < 0.995 THEN 'ledger-pg'
                               ELSE 'legacy-pg' END
           WHEN 'redis' THEN CASE WHEN rt < 0.5 THEN 'cache-redis' WHEN rt < 0.8 THEN 'sessions-redis'
                                  ELSE 'queue-redis' END
         END AS target,
         :'t0'::timestamptz + make_interval(secs => (g - 1) * :step + rx * :step * 0.9) AS started_at
  FROM (
    SELECT g, floor(random() * 1000)::int AS rk, 1 + floor(50 * power(random(), 1.7))::int AS ai,
           random() AS ro, random() AS rt, random() AS rd, random() AS rx, random() AS ra,
           floor(random() * 100000)::int AS n
    FROM generate_series($1, $2) g
    OFFSET 0  -- each random() drawn once per row
  ) r
  JOIN bench_kind k ON r.rk >= k.lo AND r.rk < k.hi
  JOIN bench_actor a ON a.i = r.ai
) x
ORDER BY g;
SQL
# The batches, each its own transaction.
python3 - "$FILL" "$ROWS" "$BATCH" <<'PY'
import sys
path, rows, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "a") as f:
    for lo in range(1, rows + 1, batch):
        hi = min(lo + batch - 1, rows)
        f.write(f"EXECUTE fill({lo}, {hi});\nVACUUM operations_chain_head;\n")
PY
t=$(now_ms)
db -v rows="$ROWS" -f "$FILL" >/dev/null
FILL_MS=$(( $(now_ms) - t ))
t=$(now_ms)
db -c "VACUUM (ANALYZE) operations" >/dev/null
VACUUM_MS=$(( $(now_ms) - t ))
TABLE_SIZE=$(db -Atc "SELECT pg_size_pretty(pg_table_size('operations')) || ' table + ' || pg_size_pretty(pg_indexes_size('operations')) || ' indexes'")
TOTAL_ROWS=$(db -Atc "SELECT count(*) FROM operations")
say "filled $ROWS rows in $(( FILL_MS / 1000 )).$(printf %03d $(( FILL_MS % 1000 ))) s ($(( ROWS * 1000 / (FILL_MS > 0 ? FILL_MS : 1) )) rows/s); VACUUM (ANALYZE) $(( VACUUM_MS / 1000 )).$(printf %03d $(( VACUUM_MS % 1000 ))) s"
say "operations: $TOTAL_ROWS rows, $TABLE_SIZE"
db -c "SELECT outcome, count(*) FROM operations GROUP BY 1 ORDER BY 2 DESC" | tee -a "$LOG"

# ---------------------------------------------------------------- 4. server + login
if [[ -n $EXTRA_SQL ]]; then
  t=$(now_ms)
  db -c "$EXTRA_SQL" >/dev/null
  db -c "ANALYZE operations" >/dev/null
  say "what-if SQL ($(( $(now_ms) - t )) ms with ANALYZE): $EXTRA_SQL"
fi
for kv in $DB_SETTINGS; do
  [[ $kv =~ ^[a-z_]+=[A-Za-z0-9_.]+$ ]] || { echo "BENCH_DB_SETTINGS: bad item '$kv' (want name=value)" >&2; exit 2; }
  admin -c "ALTER DATABASE $DB SET ${kv%%=*} = '${kv#*=}'" >/dev/null
  say "what-if: ALTER DATABASE $DB SET ${kv%%=*} = '${kv#*=}' (dbops' pool and psql alike)"
done
PW="bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "$PW" | RUST_LOG=warn "$DBOPS" --config "$CONFIG" user add --username bench --role viewer --password-stdin >/dev/null
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT
RUST_LOG=warn "$DBOPS" --config "$CONFIG" serve --listen "127.0.0.1:$PORT" >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 150); do
  curl -fsS -o /dev/null "$BASE/healthz" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$TMP/server.log" >&2; echo "dbops serve exited" >&2; exit 1; }
  sleep 0.1
done
curl -fsS -o /dev/null "$BASE/healthz"
JAR=$TMP/cookies
curl -fsS -c "$JAR" -b "$JAR" -o "$TMP/login.html" "$BASE/login"
CSRF=$(sed -n 's/.*name="csrf_token" value="\([^"]*\)".*/\1/p' "$TMP/login.html" | head -1)
[[ -n $CSRF ]] || { echo "no csrf_token on /login" >&2; exit 1; }
code=$(curl -sS -c "$JAR" -b "$JAR" -o /dev/null -w '%{http_code}' \
  --data-urlencode username=bench --data-urlencode "password=$PW" --data-urlencode "csrf_token=$CSRF" \
  "$BASE/login")
[[ $code == 303 ]] || { echo "login answered $code, not 303" >&2; exit 1; }
grep -q dbops_session "$JAR" || { echo "no dbops_session cookie after login" >&2; exit 1; }
say ""
say "dbops serving on $BASE (pid $SERVER_PID), logged in as bench (viewer)"

# ---------------------------------------------------------------- 5. cases
COLS="id, request_id, actor_id, actor_name, actor_role, kind, target, params, started_at, ended_at, outcome, error, result, approval_id, client_addr"
# Parameters picked from the data, so that each case means what it says.
read -r MIN_ID DEEP_BEFORE <<<"$(db -Atc "SELECT min(id), min(id) + 1000 FROM operations" | tr '|' ' ')"
ACTOR=heidi
RARE_TARGET=legacy-pg
read -r FROM_DAY TO_DAY <<<"$(db -Atc "SELECT to_char(min(started_at) + interval '60 days', 'YYYY-MM-DD'), to_char(min(started_at) + interval '90 days', 'YYYY-MM-DD') FROM operations" | tr '|' ' ')"
# The CSV case: the kind whose row count is closest to 30,000.
read -r CSV_KIND CSV_N <<<"$(db -Atc "SELECT kind, count(*) FROM operations GROUP BY kind ORDER BY abs(count(*) - 30000) LIMIT 1" | tr '|' ' ')"
say "parameters: deep page before=$DEEP_BEFORE (min id $MIN_ID); actor=$ACTOR; rare target=$RARE_TARGET ($(db -Atc "SELECT count(*) FROM operations WHERE target = '$RARE_TARGET'") rows) from $FROM_DAY to $TO_DAY; CSV kind=$CSV_KIND ($CSV_N rows)"

CASES=$TMP/cases.tsv
: > "$CASES"
# name | dbops path | psql command (-c text) | EXPLAIN sql | PREPARE types | PREPARE sql (the app's, with $n) | EXECUTE args
add_case() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$CASES"; }
add_case "floor: /readyz vs SELECT 1" "/readyz" "SELECT 1" "" "" "" ""
add_case "newest page" "/operations" \
  "SELECT $COLS FROM operations ORDER BY id DESC LIMIT 51" \
  "SELECT $COLS FROM operations ORDER BY id DESC LIMIT 51" \
  "bigint" "SELECT $COLS FROM operations WHERE true ORDER BY id DESC LIMIT \$1" "51"
add_case "deep page (before=$DEEP_BEFORE)" "/operations?before=$DEEP_BEFORE" \
  "SELECT $COLS FROM operations WHERE id < $DEEP_BEFORE ORDER BY id DESC LIMIT 51" \
  "SELECT $COLS FROM operations WHERE id < $DEEP_BEFORE ORDER BY id DESC LIMIT 51" \
  "bigint, bigint" "SELECT $COLS FROM operations WHERE true AND id < \$1 ORDER BY id DESC LIMIT \$2" "$DEEP_BEFORE, 51"
add_case "kind=restore.run" "/operations?kind=restore.run" \
  "SELECT $COLS FROM operations WHERE kind = 'restore.run' ORDER BY id DESC LIMIT 51" \
  "SELECT $COLS FROM operations WHERE kind = 'restore.run' ORDER BY id DESC LIMIT 51" \
  "text, bigint" "SELECT $COLS FROM operations WHERE true AND kind = \$1 ORDER BY id DESC LIMIT \$2" "'restore.run', 51"
add_case "actor=$ACTOR & outcome=failed" "/operations?actor=$ACTOR&outcome=failed" \
  "SELECT $COLS FROM operations WHERE actor_name = '$ACTOR' AND outcome = 'failed' ORDER BY id DESC LIMIT 51" \
  "SELECT $COLS FROM operations WHERE actor_name = '$ACTOR' AND outcome = 'failed' ORDER BY id DESC LIMIT 51" \
  "text, text, bigint" "SELECT $COLS FROM operations WHERE true AND actor_name = \$1 AND outcome = \$2 ORDER BY id DESC LIMIT \$3" "'$ACTOR', 'failed', 51"
add_case "target=$RARE_TARGET & $FROM_DAY..$TO_DAY" "/operations?target=$RARE_TARGET&from=$FROM_DAY&to=$TO_DAY" \
  "SELECT $COLS FROM operations WHERE target = '$RARE_TARGET' AND started_at >= '${FROM_DAY}T00:00:00Z' AND started_at < '${TO_DAY}T00:00:00Z' ORDER BY id DESC LIMIT 51" \
  "SELECT $COLS FROM operations WHERE target = '$RARE_TARGET' AND started_at >= '${FROM_DAY}T00:00:00Z' AND started_at < '${TO_DAY}T00:00:00Z' ORDER BY id DESC LIMIT 51" \
  "text, timestamptz, timestamptz, bigint" "SELECT $COLS FROM operations WHERE true AND target = \$1 AND started_at >= \$2 AND started_at < \$3 ORDER BY id DESC LIMIT \$4" "'$RARE_TARGET', '${FROM_DAY}T00:00:00Z', '${TO_DAY}T00:00:00Z', 51"
# Extra: the same statement as the case above with a 5-month window, run after it on
# the same pooled connections (whose plan cache may have switched to the generic plan).
read -r WIDE_FROM WIDE_TO <<<"$(db -Atc "SELECT to_char(min(started_at) + interval '7 days', 'YYYY-MM-DD'), to_char(min(started_at) + interval '160 days', 'YYYY-MM-DD') FROM operations" | tr '|' ' ')"
add_case "extra: target=$RARE_TARGET & $WIDE_FROM..$WIDE_TO" "/operations?target=$RARE_TARGET&from=$WIDE_FROM&to=$WIDE_TO" \
  "SELECT $COLS FROM operations WHERE target = '$RARE_TARGET' AND started_at >= '${WIDE_FROM}T00:00:00Z' AND started_at < '${WIDE_TO}T00:00:00Z' ORDER BY id DESC LIMIT 51" \
  "SELECT $COLS FROM operations WHERE target = '$RARE_TARGET' AND started_at >= '${WIDE_FROM}T00:00:00Z' AND started_at < '${WIDE_TO}T00:00:00Z' ORDER BY id DESC LIMIT 51" \
  "text, timestamptz, timestamptz, bigint" "SELECT $COLS FROM operations WHERE true AND target = \$1 AND started_at >= \$2 AND started_at < \$3 ORDER BY id DESC LIMIT \$4" "'$RARE_TARGET', '${WIDE_FROM}T00:00:00Z', '${WIDE_TO}T00:00:00Z', 51"
# Extra: two filters that are common alone but never together (a failed login is
# kind auth.login.failed), so nothing matches.
add_case "extra: kind=auth.login & outcome=failed (no match)" "/operations?kind=auth.login&outcome=failed" \
  "SELECT $COLS FROM operations WHERE kind = 'auth.login' AND outcome = 'failed' ORDER BY id DESC LIMIT 51" \
  "SELECT $COLS FROM operations WHERE kind = 'auth.login' AND outcome = 'failed' ORDER BY id DESC LIMIT 51" \
  "text, text, bigint" "SELECT $COLS FROM operations WHERE true AND kind = \$1 AND outcome = \$2 ORDER BY id DESC LIMIT \$3" "'auth.login', 'failed', 51"
# Last, because every export writes an operations.export row.
MID_ID=$(db -Atc "SELECT (min(id) + max(id)) / 2 FROM operations")
add_case "CSV export kind=$CSV_KIND ($CSV_N rows)" "/operations/export.csv?kind=$CSV_KIND" \
  "\\copy (SELECT $COLS FROM operations WHERE kind = '$CSV_KIND' ORDER BY id DESC) TO STDOUT WITH CSV HEADER" \
  "SELECT $COLS FROM operations WHERE kind = '$CSV_KIND' ORDER BY id DESC" \
  "text, bigint, bigint" "SELECT $COLS FROM operations WHERE true AND kind = \$1 AND id < \$2 ORDER BY id DESC LIMIT \$3" "'$CSV_KIND', $MID_ID, 2001"

# Sanity first: every page is a 200 with the rows the same query gives psql, and the
# CSV has as many rows as psql's.
say ""
say "## Checking that dbops and psql return the same rows"
while IFS=$'\t' read -r -u 3 name path sql _; do
  code=$(curl -sS -b "$JAR" -o "$TMP/body" -w '%{http_code}' "$BASE$path")
  [[ $code == 200 ]] || { echo "$name: GET $path answered $code" >&2; exit 1; }
  if [[ $path == /operations/export.csv* ]]; then
    got=$(( $(wc -l < "$TMP/body") - 1 ))
    want=$(( $(db -c "$sql" | wc -l) - 1 ))
  elif [[ $path == /operations* ]]; then
    got=$({ grep -o 'href="/operations/[0-9]*"' "$TMP/body" || true; } | sort -u | wc -l)
    want=$(db -Atc "SELECT count(*) FROM (${sql%LIMIT 51} LIMIT 50) q")
  else
    got=1; want=1
  fi
  say "  $name: dbops $got rows, psql $want rows"
  [[ $got == "$want" ]] || { echo "$name: dbops and psql disagree" >&2; exit 1; }
done 3< "$CASES"

# Timing.
HAVE_HYPERFINE=0
command -v hyperfine >/dev/null && HAVE_HYPERFINE=1
time_pair() { # json-file dbops-argv… -- psql-argv…
  local json=$1; shift
  local -a a=() b=()
  while [[ $1 != -- ]]; do a+=("$1"); shift; done; shift
  b=("$@")
  if [[ $HAVE_HYPERFINE == 1 ]]; then
    # -N: no intermediate shell, so both sides pay only their own process start.
    hyperfine -N --style basic --warmup "$WARMUP" --runs "$RUNS" --export-json "$json" \
      -n dbops "$(printf '%q ' "${a[@]}")" -n psql "$(printf '%q ' "${b[@]}")" >>"$LOG" 2>&1
  else
    local -a names=(dbops psql) ; local i
    : > "$json.times"
    for i in 0 1; do
      local -a cmd
      if [[ $i == 0 ]]; then cmd=("${a[@]}"); else cmd=("${b[@]}"); fi
      for _ in $(seq 1 "$WARMUP"); do "${cmd[@]}" >/dev/null; done
      local times=()
      for _ in $(seq 1 "$RUNS"); do
        local s e; s=$(date +%s%N); "${cmd[@]}" >/dev/null; e=$(date +%s%N)
        times+=("$(( e - s ))")
      done
      echo "${names[$i]} ${times[*]}" >> "$json.times"
    done
    python3 - "$json" <<'PY'
import json, statistics, sys
out = sys.argv[1]
results = []
for line in open(out + ".times"):
    name, *ns = line.split()
    t = [int(x) / 1e9 for x in ns]
    results.append({"command": name, "median": statistics.median(t), "mean": statistics.mean(t),
                    "min": min(t), "max": max(t), "times": t})
json.dump({"results": results}, open(out, "w"), indent=1)
PY
  fi
}

SUMMARIZE=$TMP/plan_summary.py
cat > "$SUMMARIZE" <<'PY'
import re, sys
nodes, exec_ms = [], ""
for line in sys.stdin:
    m = re.match(r"^\s*(?:->\s+)?([A-Z][^(]*?)\s+\(cost=", line)
    if m:
        nodes.append(m.group(1))
    m = re.match(r"^\s*Execution Time: ([0-9.]+) ms", line)
    if m:
        exec_ms = m.group(1)
print(exec_ms + "\t" + " > ".join(nodes))
PY

say ""
say "## Timing ($RUNS runs after $WARMUP warm-up runs each; psql's time includes its own start-up and connection)"
RESULTS_TSV=$TMP/results.tsv
: > "$RESULTS_TSV"
i=0
while IFS=$'\t' read -r -u 3 name path sql explain_sql ptypes psql_param pargs; do
  i=$((i + 1))
  json=$OUT/case$i.json
  say "  timing: $name"
  time_pair "$json" curl -sS -f -o /dev/null -b "$JAR" "$BASE$path" -- \
    psql -X -q -d "$BENCH_PG/$DB" -c "$sql" </dev/null
  custom="" generic="" plancache=""
  if [[ -n $explain_sql ]]; then
    {
      echo ""
      echo "=== $name: EXPLAIN (ANALYZE, BUFFERS), literal values (what psql runs; the app's custom plan)"
      echo "$explain_sql;"
    } >> "$LOG"
    db -c "EXPLAIN (ANALYZE, BUFFERS) $explain_sql" > "$TMP/plan" 2>&1
    cat "$TMP/plan" >> "$LOG"
    custom=$(python3 "$SUMMARIZE" < "$TMP/plan")
    {
      echo ""
      echo "=== $name: EXPLAIN (ANALYZE, BUFFERS) of the app's statement with its parameters, forced generic plan"
      echo "PREPARE q($ptypes) AS $psql_param;  EXECUTE q($pargs);"
    } >> "$LOG"
    db > "$TMP/plan" 2>&1 <<SQL
SET plan_cache_mode = force_generic_plan;
PREPARE q($ptypes) AS $psql_param;
EXPLAIN (ANALYZE, BUFFERS) EXECUTE q($pargs);
SQL
    cat "$TMP/plan" >> "$LOG"
    generic=$(python3 "$SUMMARIZE" < "$TMP/plan")
    # Which plan would the app get? sqlx prepares each statement once per pooled
    # connection and re-executes it; after five executions PostgreSQL's plan cache
    # switches to the generic plan if that looks no dearer than the custom ones.
    {
      echo "PREPARE q($ptypes) AS $psql_param;"
      echo '\o /dev/null'
      for _ in $(seq 1 10); do echo "EXECUTE q($pargs);"; done
      echo '\o'
      echo "SELECT custom_plans || ' custom, ' || generic_plans || ' generic' FROM pg_prepared_statements WHERE name = 'q';"
    } > "$TMP/plancache.sql"
    plancache=$(db -At -f "$TMP/plancache.sql")
    echo "=== $name: plan cache after 10 EXECUTEs of the app's statement: $plancache" >> "$LOG"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$json" "$plancache" "$custom" "$generic" >> "$RESULTS_TSV"
done 3< "$CASES"

# The trigger's cost inside one transaction (rolled back, so the data stays as it is).
TRIGGER_LINES=""
if [[ $TRIGGER_DEMO == 1 ]]; then
  say ""
  say "## Chain trigger: one INSERT … SELECT of n rows in one transaction (rolled back)"
  for n in 5000 10000 20000; do
    t=$(now_ms)
    db >/dev/null <<SQL
BEGIN;
INSERT INTO operations (kind, actor_name, outcome, started_at, ended_at)
SELECT 'bench.trigger', 'bench', 'succeeded', now(), now() FROM generate_series(1, $n);
ROLLBACK;
SQL
    ms=$(( $(now_ms) - t ))
    say "  $n rows in one statement: $ms ms ($(( n * 1000 / (ms > 0 ? ms : 1) )) rows/s)"
    TRIGGER_LINES+="| $n | $ms | $(( n * 1000 / (ms > 0 ? ms : 1) )) |"$'\n'
  done
fi

# ---------------------------------------------------------------- report
say ""
python3 - "$RESULTS_TSV" "$SUMMARY" "$FILL_MS" "$ROWS" "$BATCH" "$VACUUM_MS" "$TABLE_SIZE" "$TRIGGER_LINES" "${DB_SETTINGS:-none (server defaults)}" "${EXTRA_SQL:-none}" <<'PY' | tee -a "$LOG"
import json, sys
tsv, summary, fill_ms, rows, batch, vacuum_ms, size, trigger, pcm, extra = sys.argv[1:11]
lines = []
lines.append(f"What-if database settings: {pcm}; what-if SQL: {extra}")
lines.append("")
lines.append(f"Fill: {int(rows):,} rows through the chain trigger in {int(fill_ms)/1000:.1f} s "
             f"({int(rows) * 1000 // max(int(fill_ms), 1):,} rows/s, {batch} rows per transaction); "
             f"VACUUM (ANALYZE) {int(vacuum_ms)/1000:.1f} s; {size}.")
lines.append("")
lines.append("| case | dbops ms (p50) | psql ms (p50) | ratio dbops/psql | dbops min–max ms | SQL exec ms (literal / generic plan) |")
lines.append("|---|---:|---:|---:|---:|---:|")
plans = []
for row in open(tsv):
    # name, json, then EXPLAIN summaries "exec ms<TAB>nodes" for the literal and generic plans
    name, path, pc, cx, cn, gx, gn = (row.rstrip("\n").split("\t") + [""] * 6)[:7]
    res = {r["command"]: r for r in json.load(open(path))["results"]}
    d, p = res["dbops"], res["psql"]
    dm, pm = d["median"] * 1000, p["median"] * 1000
    ex = f"{float(cx):.2f} / {float(gx):.2f}" if cx and gx else "–"
    lines.append(f"| {name} | {dm:.1f} | {pm:.1f} | {dm / pm:.2f} | {d['min']*1000:.1f}–{d['max']*1000:.1f} | {ex} |")
    if cn:
        plans.append(f"- {name} (plan cache after 10 executions of the app's statement: {pc})")
        plans.append(f"  - literal: {cn} ({cx} ms)")
        plans.append(f"  - generic: {gn} ({gx} ms)")
lines.append("")
lines.append("psql's figure includes starting psql and connecting (no pooling), as when a person "
             "runs the query by hand; dbops' includes curl's start-up, the session check and rendering "
             "the page. 'SQL exec ms' is EXPLAIN ANALYZE's Execution Time, warm cache.")
lines.append("")
lines.append("Plans (EXPLAIN (ANALYZE, BUFFERS), full text in the .log):")
lines.extend(plans)
if trigger.strip():
    lines.append("")
    lines.append("Chain trigger, n rows in ONE statement/transaction (rolled back):")
    lines.append("")
    lines.append("| rows in one INSERT | ms | rows/s |")
    lines.append("|---:|---:|---:|")
    lines.extend(l for l in trigger.strip().split("\n"))
text = "\n".join(lines) + "\n"
open(summary, "w").write(text)
print(text)
PY
echo "Load average (1/5/15 min) at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)." | tee -a "$SUMMARY" "$LOG"
say "summary: $SUMMARY"
say "plans and raw output: $LOG; hyperfine JSON: $OUT/"
