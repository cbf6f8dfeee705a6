#!/usr/bin/env bash
# dbops' continuous WAL archiving vs plain `pg_receivewal` into a directory, same
# server, same WAL, same run (issue #17).
#
# The source is a throwaway cluster (initdb from the machine's PostgreSQL server
# binaries, wal_level = replica, a free loopback port, removed at the end); the
# console database is a scratch database on $BENCH_PG.
#
# 1. Throughput (catch-up): two physical slots are created, then pgbench writes
#    for $BENCH_WRITE_SECONDS (default 60) with nobody streaming, so both slots hold
#    the same WAL. Then each archiver drains it up to the same end position, while
#    pgbench keeps writing at a fixed $BENCH_DRAIN_TPS (default 100; 0 = no load):
#      plain:  pg_receivewal --synchronous --no-loop --endpos END into a directory
#      dbops:  `dbops serve` with [postgres.archive] until its stored position
#              reaches END (start-up, lease and first tick included; every segment
#              is copied into the storage through SHA-256 and recorded in the
#              console database)
#    Printed: both wall times and their ratio, and dbops' streaming rate (between
#    its first and its last stored segment, start-up excluded).
# 2. Recovery point under load: both stream live while pgbench runs unthrottled
#    for $BENCH_LOAD_SECONDS (default 60); dbops' recovery point lag (now -
#    stored_through_at, snapshot_seconds = $BENCH_SNAPSHOT_SECONDS, default 1) and
#    plain pg_receivewal's flush lag (pg_stat_replication.flush_lag) are sampled
#    every 0.5 s; p50/p99/max printed.
#
# DBOPS_BIN picks the binary (default target/release/dbops); BENCH_QUIET: see
# bench/lib.sh (the fill and the catch-up WAL are written before the window).
# Everything it creates (cluster, database, files) is removed at the end (trap).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
SCALE="${BENCH_SCALE:-10}"
WRITE="${BENCH_WRITE_SECONDS:-60}"
LOAD="${BENCH_LOAD_SECONDS:-60}"
DRAIN_TPS="${BENCH_DRAIN_TPS:-100}"
SNAPSHOT="${BENCH_SNAPSHOT_SECONDS:-1}"
BIN="${DBOPS_BIN:-${BENCH_BIN:-target/release/dbops}}"
WORK=$(mktemp -d /tmp/dbops-bench-archive.XXXXXX)
chmod 755 "$WORK"
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$RESULTS/archive_pg-$STAMP.txt"
SERVE_PID=""
PLAIN_PID=""
LOAD_PID=""
CONSOLE=dbops_bench_wconsole

stop_pid() { if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then kill "$1" 2>/dev/null; wait "$1" 2>/dev/null || true; fi; }
cleanup() {
  quiet_end
  stop_pid "$LOAD_PID"; stop_pid "$SERVE_PID"; stop_pid "$PLAIN_PID"
  cluster_stop "$WORK/src"
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $CONSOLE WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$BIN" ] || cargo build --release
command -v pgbench >/dev/null || PATH="$PATH:$PGBIN"
command -v pg_receivewal >/dev/null || PATH="$PATH:$PGBIN"

PORT=$(cluster_init "$WORK/src" "max_wal_size = 4GB" "checkpoint_timeout = 30min")
cluster_start "$WORK/src"
SRC="postgres://postgres@127.0.0.1:$PORT"
sql() { psql "$SRC/postgres" -qAtc "$1"; }
console() { psql "$PG/$CONSOLE" -qAt -F " " -c "$1"; }
export BENCH_TARGET_URL="$SRC/postgres"
export RUST_LOG=warn

{
echo "# dbops WAL archiving benchmark, $STAMP"
echo "# machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); $(pg_receivewal --version); source: throwaway cluster, server $(sql 'SHOW server_version'), 127.0.0.1:$PORT"
echo "# pgbench scale $SCALE; catch-up WAL written in ${WRITE}s, drained under pgbench -R $DRAIN_TPS; live load ${LOAD}s; dbops snapshot_seconds = $SNAPSHOT"
} | tee "$OUT"

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
slot = "dbops_bench_arch"
snapshot_seconds = $SNAPSHOT
TOML
"$BIN" --config "$WORK/dbops.toml" migrate >/dev/null
pgbench -q -i -s "$SCALE" "$BENCH_TARGET_URL" >/dev/null 2>&1

# 1. Both slots hold the same WAL.
sql "SELECT pg_create_physical_replication_slot('dbops_bench_plain', true)" >/dev/null
sql "SELECT pg_create_physical_replication_slot('dbops_bench_arch', true)" >/dev/null
START=$(sql "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'dbops_bench_arch'")
pgbench -c 2 -j 2 -T "$WRITE" "$BENCH_TARGET_URL" >/dev/null 2>&1
sql "SELECT pg_switch_wal()" >/dev/null
sql "CHECKPOINT" >/dev/null
END=$(sql "SELECT pg_current_wal_flush_lsn()")
BYTES=$(sql "SELECT pg_wal_lsn_diff('$END', '$START')::bigint")
END_NUM=$(sql "SELECT pg_wal_lsn_diff('$END', '0/0')::bigint")
echo "WAL to drain: $(numfmt --to=iec "$BYTES") ($START .. $END)" | tee -a "$OUT"

drain_load() {
  LOAD_PID=""
  if [ "$DRAIN_TPS" -gt 0 ]; then
    pgbench -c 2 -j 2 -R "$DRAIN_TPS" -T 600 "$BENCH_TARGET_URL" >/dev/null 2>&1 &
    LOAD_PID=$!
  fi
}

quiet_begin
echo "# load average when the measurements started: $QUIET_LOAD" | tee -a "$OUT"

mkdir -p "$WORK/plain"
drain_load
s=$(now)
# pg_receivewal exits 0 at --endpos; anything else is a failure of the run.
PGAPPNAME=bench-plain pg_receivewal -d "$SRC/postgres?replication=true" -D "$WORK/plain" -S dbops_bench_plain \
  --synchronous --no-loop -E "$END" >"$WORK/plain.log" 2>&1 \
  || { echo "pg_receivewal failed:" >&2; cat "$WORK/plain.log" >&2; exit 1; }
plain=$(echo "$(now) - $s" | bc -l)
stop_pid "$LOAD_PID"; LOAD_PID=""
plain_files=$(find "$WORK/plain" -type f | wc -l)
plain_bytes=$(du -sb "$WORK/plain" | cut -f1)

drain_load
s=$(now)
"$BIN" --config "$WORK/dbops.toml" serve >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
while :; do
  got=$(console "SELECT coalesce(stored_lsn, 0) >= $END_NUM FROM wal_streams WHERE target = 'bench'" 2>/dev/null || true)
  [ "$got" = "t" ] && break
  kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
  sleep 0.1
done
dbops=$(echo "$(now) - $s" | bc -l)
stop_pid "$LOAD_PID"; LOAD_PID=""
read -r segs seg_bytes span < <(console "SELECT count(*), sum(size_bytes), extract(epoch FROM max(archived_at) - min(archived_at)) FROM wal_segments WHERE kind = 'segment' AND end_lsn <= $END_NUM")
printf 'catch-up  plain pg_receivewal %7.2f s (%s files, %s MB/s)   dbops archive %7.2f s (%s segments stored, %s MB/s)   ratio %.3f\n' \
  "$plain" "$plain_files" "$(echo "$BYTES / 1048576 / $plain" | bc)" "$dbops" "$segs" "$(echo "$BYTES / 1048576 / $dbops" | bc)" \
  "$(echo "$dbops / $plain" | bc -l)" | tee -a "$OUT"
if [ "$segs" -gt 1 ]; then
  printf '          dbops streaming rate, first to last stored segment (start-up excluded): %s MB/s over %.2f s; the same rate for plain would be %.2f s (ratio %.3f)\n' \
    "$(echo "($segs - 1) * 16 / $span" | bc)" "$span" "$(echo "$BYTES / 1048576 / (($segs - 1) * 16 / $span)" | bc -l)" \
    "$(echo "($BYTES / 1048576 / (($segs - 1) * 16 / $span)) / $plain" | bc -l)" | tee -a "$OUT"
fi
echo "          dbops start-up to first stored segment: $(console "SELECT round(extract(epoch FROM min(archived_at))::numeric - $s, 2) FROM wal_segments") s" | tee -a "$OUT"

# 2. Lag under load, both streaming live (the plain one from where it stopped).
PGAPPNAME=bench-plain pg_receivewal -d "$SRC/postgres?replication=true" -D "$WORK/plain" -S dbops_bench_plain \
  --synchronous --no-loop >"$WORK/plain-live.log" 2>&1 &
PLAIN_PID=$!
sleep 3
pgbench -c 2 -j 2 -T "$LOAD" "$BENCH_TARGET_URL" >"$WORK/pgbench.out" 2>&1 &
LOAD_PID=$!
w0=$(sql "SELECT pg_current_wal_lsn()")
: >"$WORK/lag.dbops"; : >"$WORK/lag.plain"
while kill -0 "$LOAD_PID" 2>/dev/null; do
  console "SELECT extract(epoch FROM now() - stored_through_at) FROM wal_streams WHERE target = 'bench'" >>"$WORK/lag.dbops" 2>/dev/null || true
  sql "SELECT coalesce(extract(epoch FROM flush_lag), 0) FROM pg_stat_replication WHERE application_name = 'bench-plain'" >>"$WORK/lag.plain" 2>/dev/null || true
  sleep 0.5
done
wait "$LOAD_PID" || true; LOAD_PID=""
wal_mb=$(sql "SELECT round(pg_wal_lsn_diff(pg_current_wal_lsn(), '$w0') / 1048576)")
tps=$(awk '/^tps/ {print int($3)}' "$WORK/pgbench.out" | head -1)
echo "# load average at the end: $(loadavg)" | tee -a "$OUT"
quiet_end
for who in dbops plain; do
  f="$WORK/lag.$who"
  sed -i '/^$/d' "$f"
  printf 'lag under load (%s tps, %s MB of WAL in %ss)  %-6s p50 %5.2f s  p99 %5.2f s  max %5.2f s  (%s samples)\n' "$tps" "$wal_mb" "$LOAD" "$who" \
    "$(pct 50 <"$f")" "$(pct 99 <"$f")" "$(pct 100 <"$f")" "$(wc -l <"$f")" | tee -a "$OUT"
done
echo "dbops stream: $(console "SELECT state || ', ' || restarts || ' restarts, ' || coalesce(message, '') FROM wal_streams WHERE target = 'bench'"); server log ERROR lines: $(grep -c -E '"level":"ERROR"| ERROR ' "$WORK/serve.log" || true)" | tee -a "$OUT"
echo "results: $OUT"
