#!/usr/bin/env bash
# Reports on a 20,000-table catalog: a fresh computation through dbops
# (`dbops report refresh`), the cached report page served by `dbops serve`, and the
# plain SQL an operator would paste into psql for the same report — timed side by
# side in one run, with the ratios.
#
#   bench/reports_catalog.sh
#
# Environment (all optional):
#   BENCH_PG       server to use, without a database   (postgres://postgres@127.0.0.1:5432)
#   BENCH_TABLES   tables to create (each: serial primary key, one more index, 5 rows)   (20000)
#   BENCH_RUNS     timed runs of each page / psql query   (5)
#   BENCH_KEEP     1 = keep both scratch databases   (0)
#   BENCH_REUSE_CATALOG  1 = use an existing dbops_bench_catalog with BENCH_TABLES tables
#                  (from a run with BENCH_KEEP=1) instead of recreating it, and keep it   (0)
#   BENCH_FRESH_RUNS  fresh computations of space and indexes per strategy (median)   (3)
#   DBOPS_BIN      the binary   (target/release/dbops)
#
# Scratch databases (DROPPED and recreated): dbops_bench_catalog (the target) and
# dbops_bench_reports (the console). Needs psql, curl, python3. Builds
# target/release/dbops if missing (run `cargo build --release` after changing src/).
# Writes bench/results/reports_catalog-<UTC stamp>.log.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
BENCH_PG=${BENCH_PG%/}
TABLES=${BENCH_TABLES:-20000}
RUNS=${BENCH_RUNS:-5}
FRESH_RUNS=${BENCH_FRESH_RUNS:-3}
KEEP=${BENCH_KEEP:-0}
REUSE=${BENCH_REUSE_CATALOG:-0}
TARGET_DB=dbops_bench_catalog
CONSOLE_DB=dbops_bench_reports
DBOPS=${DBOPS_BIN:-$ROOT/target/release/dbops}
unset DATABASE_URL DBOPS_CONFIG PGOPTIONS || true

case $BENCH_PG in
  postgres://*@127.0.0.1:*|postgres://*@localhost:*|postgresql://*@127.0.0.1:*) ;;
  *) echo "BENCH_PG must point at 127.0.0.1 (this benchmark creates 20,000 tables)" >&2; exit 2 ;;
esac
for tool in psql curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 2; }
done

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$ROOT/bench/results"
LOG=$ROOT/bench/results/reports_catalog-$STAMP.log
TMP=$(mktemp -d /tmp/dbops-bench-reports.XXXXXX)
SERVER_PID=""

say() { printf '%s\n' "$*" | tee -a "$LOG"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
admin() { psql -X -q -v ON_ERROR_STOP=1 -d "$BENCH_PG/postgres" "$@"; }
tdb() { psql -X -q -v ON_ERROR_STOP=1 -d "$BENCH_PG/$TARGET_DB" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null
  fi
  if [[ $KEEP != 1 ]]; then
    [[ $REUSE == 1 ]] || admin -c "DROP DATABASE IF EXISTS $TARGET_DB WITH (FORCE)" >/dev/null 2>&1
    admin -c "DROP DATABASE IF EXISTS $CONSOLE_DB WITH (FORCE)" >/dev/null 2>&1
  fi
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT INT TERM

[[ -x $DBOPS ]] || (cd "$ROOT" && cargo build --release)

say "# reports on a $TABLES-table catalog — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, PostgreSQL $(admin -Atc 'SHOW server_version')"
say "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

# ------------------------------------------------------------------ 1. the catalog
admin -c "DROP DATABASE IF EXISTS $CONSOLE_DB WITH (FORCE)" >/dev/null
HAVE=0
if [[ $REUSE == 1 ]]; then
  HAVE=$(tdb -Atc "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.relkind = 'r' AND n.nspname ~ '^s[0-9]+$'" 2>/dev/null || echo 0)
fi
if [[ $HAVE == "$TABLES" ]]; then
  FILL_MS=0 ANALYZE_MS=0
  say "catalog: reusing $TARGET_DB (BENCH_REUSE_CATALOG=1)"
else
  admin -c "DROP DATABASE IF EXISTS $TARGET_DB WITH (FORCE)" >/dev/null
  admin -c "CREATE DATABASE $TARGET_DB" >/dev/null
  t0=$(now_ms)
  # 250 tables per transaction: creating a table locks it until commit, and a
  # transaction holding tens of thousands of locks would exhaust the lock table.
  BATCH=250
  for ((start = 1; start <= TABLES; start += BATCH)); do
    end=$(( start + BATCH - 1 )); (( end > TABLES )) && end=$TABLES
    schema="s$(( (start - 1) / 2000 ))"
    tdb -c "SET client_min_messages = warning" -c "CREATE SCHEMA IF NOT EXISTS $schema" -c "DO \$\$
      BEGIN
        FOR i IN $start..$end LOOP
          EXECUTE format('CREATE TABLE $schema.t%s (id serial PRIMARY KEY, v int, note text)', i);
          EXECUTE format('CREATE INDEX t%s_v ON $schema.t%s (v)', i, i);
          EXECUTE format('INSERT INTO $schema.t%s (v, note) SELECT g, ''row '' || g FROM generate_series(1, 5) g', i);
        END LOOP;
      END \$\$" >/dev/null
  done
  FILL_MS=$(( $(now_ms) - t0 ))
  t0=$(now_ms)
  tdb -c "ANALYZE" >/dev/null
  ANALYZE_MS=$(( $(now_ms) - t0 ))
fi
RELS=$(tdb -Atc "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname LIKE 's%'")
say "catalog: $TABLES tables, $RELS relations in their schemas (tables, indexes, sequences, TOAST); created in $(( FILL_MS / 1000 )) s, ANALYZE $(( ANALYZE_MS / 1000 )) s"

# ------------------------------------------------------------------ 2. dbops, fresh
cat >"$TMP/dbops.toml" <<EOF
database_url = "$BENCH_PG/$CONSOLE_DB"
[targets]
connect_timeout_seconds = 5
[[postgres]]
name = "bench"
url_env = "BENCH_TARGET_URL"
policy = "production"
EOF
export BENCH_TARGET_URL="$BENCH_PG/$TARGET_DB"
RUST_LOG=warn "$DBOPS" --config "$TMP/dbops.toml" migrate >/dev/null

# The same target measured by opening relations (what a role that may not call
# pg_ls_dir / pg_stat_file gets), on two connections and on one.
sed 's/^\[targets\]/[reports]\nsizes_from_files = false\n[targets]/' "$TMP/dbops.toml" >"$TMP/dbops-open.toml"
sed 's/^\[targets\]/[reports]\nsizes_from_files = false\nconnections = 1\n[targets]/' "$TMP/dbops.toml" >"$TMP/dbops-open1.toml"

declare -A FRESH
fresh() { # config report -> ms of `dbops report refresh` (the whole command); prints its line
  local t0 out
  t0=$(now_ms)
  out=$(RUST_LOG=warn "$DBOPS" --config "$1" report refresh --target bench --report "$2")
  LAST_MS=$(( $(now_ms) - t0 ))
  say "  $out   [$(basename "$1" .toml), $LAST_MS ms]"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
say ""
say "## fresh computation (dbops report refresh: connect, compute, store the snapshot; median of $FRESH_RUNS)"
for cfg in dbops dbops-open dbops-open1; do
  for r in space indexes; do
    times=()
    for _ in $(seq 1 "$FRESH_RUNS"); do fresh "$TMP/$cfg.toml" "$r"; times+=( "$LAST_MS" ); done
    FRESH[$cfg.$r]=$(printf '%s\n' "${times[@]}" | median)
  done
done
for r in bloat health; do fresh "$TMP/dbops.toml" "$r"; FRESH[dbops.$r]=$LAST_MS; done

# ------------------------------------------------------------------ 3. psql, plain SQL
# What the runbooks paste: one statement each, no lock timeout, nothing kept.
SPACE_SQL="SELECT n.nspname, c.relname, pg_total_relation_size(c.oid) AS total,
  pg_indexes_size(c.oid) AS indexes,
  CASE WHEN c.reltoastrelid = 0 THEN 0 ELSE pg_total_relation_size(c.reltoastrelid) END AS toast
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname !~ '^pg_toast' ORDER BY total DESC"
UNUSED_SQL="SELECT s.schemaname, s.relname, s.indexrelname, pg_relation_size(s.indexrelid)
  FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
  WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary
  ORDER BY pg_relation_size(s.indexrelid) DESC"

median_psql() { # sql -> median ms over RUNS
  local sql=$1 times=()
  for _ in $(seq 1 "$RUNS"); do
    local s; s=$(now_ms)
    tdb -Atc "$sql" >/dev/null
    times+=( $(( $(now_ms) - s )) )
  done
  printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
PSQL_SPACE=$(median_psql "$SPACE_SQL")
PSQL_UNUSED=$(median_psql "$UNUSED_SQL")
say ""
say "## plain SQL through psql (median of $RUNS)"
say "  space (sizes of every table, one statement): $PSQL_SPACE ms"
say "  unused indexes (one statement):               $PSQL_UNUSED ms"

# ------------------------------------------------------------------ 4. the cached pages
PW=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')
echo "$PW" | RUST_LOG=warn "$DBOPS" --config "$TMP/dbops.toml" user add --username bench --role operator --password-stdin >/dev/null
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT
RUST_LOG=warn "$DBOPS" --config "$TMP/dbops.toml" serve --listen "127.0.0.1:$PORT" >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
  curl -fsS -o /dev/null "$BASE/healthz" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$TMP/server.log" >&2; echo "dbops serve exited" >&2; exit 1; }
  sleep 0.1
done
JAR=$TMP/cookies
curl -fsS -c "$JAR" -b "$JAR" -o "$TMP/login.html" "$BASE/login"
CSRF=$(sed -n 's/.*name="csrf_token" value="\([^"]*\)".*/\1/p' "$TMP/login.html" | head -1)
code=$(curl -sS -o /dev/null -w '%{http_code}' -c "$JAR" -b "$JAR" \
  --data-urlencode username=bench --data-urlencode "password=$PW" --data-urlencode "csrf_token=$CSRF" \
  "$BASE/login")
[[ $code == 303 ]] || { echo "login answered $code, not 303" >&2; exit 1; }

median_page() { # path -> median ms over RUNS (after one warm-up)
  local path=$1 times=()
  curl -fsS -b "$JAR" -o "$TMP/page.html" "$BASE$path"
  for _ in $(seq 1 "$RUNS"); do
    local t; t=$(curl -fsS -b "$JAR" -o /dev/null -w '%{time_total}' "$BASE$path")
    times+=( "$(python3 -c "print(round($t * 1000, 1))")" )
  done
  printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
PAGE_SPACE=$(median_page "/targets/bench/reports/space")
grep -q 'data-section="relations"' "$TMP/page.html" || { echo "the space page has no table" >&2; exit 1; }
PAGE_SORTED=$(median_page "/targets/bench/reports/space?s=relations&sort=name&dir=asc&page=200")
PAGE_FILTER=$(median_page "/targets/bench/reports/space?s=relations&q=t1999")
PAGE_INDEXES=$(median_page "/targets/bench/reports/indexes")
CSV_MS=$(median_page "/targets/bench/reports/space/export.csv?s=relations")
say ""
say "## cached pages through dbops serve (median of $RUNS, curl time_total)"
say "  space report, first page (50 of $TABLES rows): $PAGE_SPACE ms"
say "  space report sorted by name, page 200:        $PAGE_SORTED ms"
say "  space report filtered (q=t1999):              $PAGE_FILTER ms"
say "  indexes report, first pages:                  $PAGE_INDEXES ms"
say "  space CSV export (all rows):                  $CSV_MS ms"

say ""
say "## ratios"
python3 - "$PSQL_SPACE" "$PSQL_UNUSED" "$PAGE_SPACE" "$PAGE_INDEXES" \
  "${FRESH[dbops.space]}" "${FRESH[dbops.indexes]}" \
  "${FRESH[dbops-open.space]}" "${FRESH[dbops-open.indexes]}" \
  "${FRESH[dbops-open1.space]}" "${FRESH[dbops-open1.indexes]}" <<'PY' | tee -a "$LOG"
import sys
ps, pi, cs, ci, *fresh = map(float, sys.argv[1:])
names = ["sizes from files, 2 connections (default)", "opening relations, 2 connections", "opening relations, 1 connection"]
for i, name in enumerate(names):
    fs, fi = fresh[2 * i], fresh[2 * i + 1]
    print(f"  {name}:")
    print(f"    space:   fresh dbops {fs:.0f} ms vs psql {ps:.0f} ms -> {fs/ps:.2f}x the plain SQL")
    print(f"    indexes: fresh dbops {fi:.0f} ms vs psql (unused only) {pi:.0f} ms -> {fi/pi:.2f}x")
print(f"  cached pages: space {cs:.1f} ms -> {ps/cs:.0f}x faster than psql; indexes {ci:.1f} ms -> {pi/ci:.0f}x")
PY
say "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
say ""
say "log: $LOG"
