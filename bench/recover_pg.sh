#!/usr/bin/env bash
# Time to recover a given point: `dbops pitr --target T --to TIME --into NAME` vs
# `pgbackrest restore --type=time` (Debian's pgbackrest), same cluster, same data,
# same WAL, same run (issue #17).
#
# 1. A throwaway cluster (initdb from the machine's server binaries, wal_level =
#    replica, a free loopback port) archives its WAL twice: dbops streams it
#    (`dbops serve` with [postgres.archive], snapshot_seconds = 1) and
#    `archive_command = 'pgbackrest … archive-push %p'` pushes every segment into
#    a pgBackRest repository (compress-type $BENCH_PGBR_COMPRESS, default none:
#    dbops stores its base backups and WAL uncompressed, so both move the same
#    bytes). pgbench -i -s $BENCH_SCALE (default 20) in database `bench`.
# 2. Base backups: `dbops basebackup run --wait`, then `pgbackrest backup
#    --type=full` (taken second, so pgBackRest has slightly less WAL to replay).
# 3. pgbench writes for $BENCH_LOAD_SECONDS (default 60); the point T is taken
#    from the server's clock (to the second, UTC) after 2/3 of it. Then
#    pg_switch_wal, and the script waits until both archives hold WAL past T;
#    `dbops serve` is stopped.
# 4. Timed, $BENCH_RUNS times each (default 1), alternating:
#    pgbackrest: `pgbackrest restore --type=time --target=T --target-action=promote
#                --process-max=2` into a new data directory, a free port set in
#                postgresql.auto.conf (archive_mode off), pg_ctl start, wait until
#                promoted (pg_is_in_recovery() = false)  -> "recovered";
#                then, as dbops does, the database copied into a NEW database on
#                the source (`createdb` + `pg_dump -Fc | pg_restore`), the
#                recovered cluster stopped and removed            -> "whole";
#    dbops:      `dbops pitr --target bench --to T --into NAME` (recover on a
#                scratch server, copy into NAME, remove the scratch server)
#                -> "whole"; "recovered" is the recovery's recorded ready_at
#                minus the command's start.
#    Both copies are checked: same pgbench_history row count (T's), and the
#    marker tables written before and after T.
#
# DBOPS_BIN picks the binary (default target/release/dbops); BENCH_QUIET: see
# bench/lib.sh (everything before step 4 runs outside the window). Needs
# pgbackrest (apt-get install -y pgbackrest). Everything it creates is removed at
# the end (trap).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
SCALE="${BENCH_SCALE:-20}"
LOAD="${BENCH_LOAD_SECONDS:-60}"
RUNS="${BENCH_RUNS:-1}"
PGBR_COMPRESS="${BENCH_PGBR_COMPRESS:-none}"
BIN="$(realpath "${DBOPS_BIN:-target/release/dbops}")"
WORK=$(mktemp -d /tmp/dbops-bench-rec.XXXXXX)
chmod 755 "$WORK"
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$RESULTS/recover_pg-$STAMP.txt"
CONSOLE=dbops_bench_recconsole
SERVE_PID=""
LOAD_PID=""

command -v pgbackrest >/dev/null || { echo "needs pgbackrest (apt-get install -y pgbackrest)" >&2; exit 2; }
command -v pgbench >/dev/null || PATH="$PATH:$PGBIN"

stop_pid() { if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then kill "$1" 2>/dev/null; wait "$1" 2>/dev/null || true; fi; }
cleanup() {
  quiet_end
  stop_pid "$LOAD_PID"; stop_pid "$SERVE_PID"
  cluster_stop "$WORK/rec"
  cluster_stop "$WORK/src"
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $CONSOLE WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

CONF="$WORK/pgbackrest.conf"
PORT=$(cluster_init "$WORK/src" "max_wal_size = 4GB" "archive_mode = on" \
  "archive_command = 'pgbackrest --config=$CONF --stanza=bench archive-push %p'")
SRC="postgres://postgres@127.0.0.1:$PORT"
mkdir -p "$WORK/pgbr" "$WORK/pgbr-log" "$WORK/pgbr-lock" "$WORK/pgbr-spool"
cat > "$CONF" <<CONF
[global]
repo1-path=$WORK/pgbr
repo1-retention-full=4
log-path=$WORK/pgbr-log
lock-path=$WORK/pgbr-lock
spool-path=$WORK/pgbr-spool
log-level-console=warn
log-level-file=info
start-fast=y
compress-type=$PGBR_COMPRESS
process-max=2

[bench]
pg1-path=$WORK/src/data
pg1-port=$PORT
pg1-socket-path=$WORK/src
pg1-user=postgres
CONF
[ "$(id -u)" = 0 ] && chown -R postgres: "$WORK/pgbr" "$WORK/pgbr-log" "$WORK/pgbr-lock" "$WORK/pgbr-spool" "$CONF"
pgbr() { as_pg pgbackrest --config="$CONF" --stanza=bench "$@"; }
cluster_start "$WORK/src"
sql() { psql "$SRC/${2:-bench}" -qAtc "$1"; }
console() { psql "$PG/$CONSOLE" -qAt -F " " -c "$1"; }
psql "$SRC/postgres" -qc "CREATE DATABASE bench" >/dev/null
pgbr stanza-create >/dev/null
pgbr check >/dev/null

export BENCH_TARGET_URL="$SRC/bench"
export RUST_LOG=warn
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $CONSOLE WITH (FORCE)" >/dev/null
psql "$PG/postgres" -qc "CREATE DATABASE $CONSOLE" >/dev/null
cat > "$WORK/dbops.toml" <<TOML
database_url = "$PG/$CONSOLE"
listen = "127.0.0.1:0"
[backups]
directory = "$WORK/store"
[jobs]
workers = 1
[[postgres]]
name = "bench"
url_env = "BENCH_TARGET_URL"
policy = "dev"
[postgres.archive]
slot = "dbops_bench_rec"
snapshot_seconds = 1
TOML
"$BIN" --config "$WORK/dbops.toml" migrate >/dev/null
# The recovery's scratch server runs as the postgres user (when we are root) under
# <backups directory>/.pitr: the directory must be traversable (dbops would make
# it 0700).
mkdir -p "$WORK/store"; chmod 755 "$WORK/store"

{
echo "# dbops point-in-time recovery benchmark, $STAMP"
echo "# machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); source: throwaway cluster, server $(sql 'SHOW server_version'); $(pgbackrest version) (compress-type=$PGBR_COMPRESS, process-max=2)"
echo "# pgbench scale $SCALE; ${LOAD}s of pgbench writes after the base backups; runs per side: $RUNS"
} | tee "$OUT"

pgbench -q -i -s "$SCALE" "$BENCH_TARGET_URL" >/dev/null 2>&1
"$BIN" --config "$WORK/dbops.toml" serve >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 120); do
  [ "$(console "SELECT state FROM wal_streams WHERE target = 'bench'" 2>/dev/null || true)" = streaming ] && break
  sleep 0.5
done
"$BIN" --config "$WORK/dbops.toml" basebackup run --target bench --wait >"$WORK/bb.out" 2>&1 || { cat "$WORK/bb.out"; exit 1; }
pgbr backup --type=full >/dev/null
echo "base backups: dbops $(console "SELECT pg_size_pretty(bytes) FROM base_backups WHERE status = 'good' ORDER BY id DESC LIMIT 1"); pgbackrest $(pgbr info | grep -m1 'database size' | xargs)" | tee -a "$OUT"

sql "CREATE TABLE marker_before_start (at timestamptz DEFAULT now()); INSERT INTO marker_before_start DEFAULT VALUES"
w0=$(sql "SELECT pg_current_wal_lsn()")
pgbench -c 2 -j 2 -T "$LOAD" "$BENCH_TARGET_URL" >"$WORK/pgbench.out" 2>&1 &
LOAD_PID=$!
sleep $(( LOAD * 2 / 3 - 1 ))
sql "CREATE TABLE marker_before (at timestamptz DEFAULT now()); INSERT INTO marker_before DEFAULT VALUES"
sleep 1.2
T=$(sql "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')")
sleep 1.2
sql "CREATE TABLE marker_after (at timestamptz DEFAULT now()); INSERT INTO marker_after DEFAULT VALUES"
wait "$LOAD_PID"; LOAD_PID=""
wal_mb=$(sql "SELECT round(pg_wal_lsn_diff(pg_current_wal_lsn(), '$w0') / 1048576)")
last=$(sql "SELECT pg_walfile_name(pg_switch_wal())")
# Wait until both archives hold everything up to now.
for _ in $(seq 1 600); do
  a=$(sql "SELECT coalesce(last_archived_wal, '') >= '$last' FROM pg_stat_archiver")
  d=$(console "SELECT stored_through_at > '$T+00'::timestamptz + interval '5 s' FROM wal_streams WHERE target = 'bench'")
  [ "$a" = t ] && [ "$d" = t ] && break
  sleep 0.5
done
[ "$a" = t ] && [ "$d" = t ] || { echo "the archives did not catch up (pgbackrest $a, dbops $d)" >&2; exit 1; }
stop_pid "$SERVE_PID"; SERVE_PID=""
echo "WAL written after the base backups: $wal_mb MB ($(grep -m1 '^tps' "$WORK/pgbench.out" | cut -d' ' -f1-3)); point T = $T UTC (after 2/3 of it); WAL segments stored by dbops: $(console "SELECT count(*) FROM wal_segments"); pgbackrest archive: $(pgbr info | grep -m1 'wal archive min/max' | xargs)" | tee -a "$OUT"

check_copy() { # url -> "history_rows markers"
  psql "$1" -qAtc "SELECT (SELECT count(*) FROM pgbench_history) || ' ' || (SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relname LIKE 'marker%' AND relkind = 'r')"
}

quiet_begin
echo "# load average when the measurements started: $QUIET_LOAD" | tee -a "$OUT"
pb_rec=(); pb_all=(); db_rec=(); db_all=()
for i in $(seq "$RUNS"); do
  # --- pgbackrest
  cluster_stop "$WORK/rec"; rm -rf "$WORK/rec"; mkdir -p "$WORK/rec/data"; chmod 700 "$WORK/rec/data"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$WORK/rec"
  port2=$(free_port)
  s=$(now)
  pgbr --pg1-path="$WORK/rec/data" restore --type=time --target="$T+00" --target-action=promote --process-max=2 >"$WORK/pgbr-restore.log" 2>&1 \
    || { cat "$WORK/pgbr-restore.log"; exit 1; }
  printf "port = %s\nunix_socket_directories = '%s'\narchive_mode = off\n" "$port2" "$WORK/rec" | as_pg tee -a "$WORK/rec/data/postgresql.auto.conf" >/dev/null
  cluster_start "$WORK/rec"
  until [ "$(psql "postgres://postgres@127.0.0.1:$port2/postgres" -qAtc "SELECT pg_is_in_recovery()" 2>/dev/null)" = f ]; do sleep 0.05; done
  pb_rec+=("$(echo "$(now) - $s" | bc -l)")
  psql "$SRC/postgres" -qc "DROP DATABASE IF EXISTS pgbr_at_t" >/dev/null
  createdb -h 127.0.0.1 -p "$PORT" -U postgres pgbr_at_t
  pg_dump -Fc "postgres://postgres@127.0.0.1:$port2/bench" | pg_restore --no-owner --exit-on-error -d "$SRC/pgbr_at_t"
  cluster_stop "$WORK/rec"; rm -rf "$WORK/rec"
  pb_all+=("$(echo "$(now) - $s" | bc -l)")
  pb_check=$(check_copy "$SRC/pgbr_at_t")
  psql "$SRC/postgres" -qc "DROP DATABASE IF EXISTS pgbr_at_t" >/dev/null

  # --- dbops
  psql "$SRC/postgres" -qc "DROP DATABASE IF EXISTS dbops_at_t" >/dev/null
  s=$(now)
  "$BIN" --config "$WORK/dbops.toml" pitr --target bench --to "$T" --into dbops_at_t >"$WORK/pitr.out" 2>&1 \
    || { cat "$WORK/pitr.out"; exit 1; }
  db_all+=("$(echo "$(now) - $s" | bc -l)")
  db_rec+=("$(console "SELECT extract(epoch FROM ready_at) - $s FROM recoveries ORDER BY id DESC LIMIT 1")")
  db_check=$(check_copy "$SRC/dbops_at_t")
  psql "$SRC/postgres" -qc "DROP DATABASE IF EXISTS dbops_at_t" >/dev/null
  echo "  run $i: pgbackrest recovered ${pb_rec[-1]} s, whole ${pb_all[-1]} s; dbops recovered ${db_rec[-1]} s, whole ${db_all[-1]} s; copies: pgbackrest [$pb_check] dbops [$db_check]" | tee -a "$OUT"
done
echo "# load average at the end: $(loadavg)" | tee -a "$OUT"
quiet_end
pr=$(printf '%s\n' "${pb_rec[@]}" | median); pa=$(printf '%s\n' "${pb_all[@]}" | median)
dr=$(printf '%s\n' "${db_rec[@]}" | median); da=$(printf '%s\n' "${db_all[@]}" | median)
printf 'recovered (promoted server at T):  pgbackrest restore + start %7.2f s   dbops pitr %7.2f s   ratio %.3f\n' "$pr" "$dr" "$(echo "$dr / $pr" | bc -l)" | tee -a "$OUT"
printf 'whole (database copied into a new one, scratch removed): pgbackrest path %7.2f s   dbops pitr %7.2f s   ratio %.3f\n' "$pa" "$da" "$(echo "$da / $pa" | bc -l)" | tee -a "$OUT"
[ "$pb_check" = "$db_check" ] && echo "both copies agree: pgbench_history rows and markers [$db_check]" | tee -a "$OUT" \
  || echo "THE COPIES DIFFER: pgbackrest [$pb_check] dbops [$db_check]" | tee -a "$OUT"
echo "dbops recovery: $(console "SELECT outcome FROM recoveries ORDER BY id DESC LIMIT 1")" | tee -a "$OUT"
echo "results: $OUT"
