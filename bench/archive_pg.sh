#!/usr/bin/env bash
# STATUS (2026-12-03): unfinished — it stops after preparing the catch-up WAL
# (set -e trips in the plain pg_receivewal step, not yet debugged); no figures yet.
# dbops' continuous WAL archiving vs plain `pg_receivewal` into a directory, same
# server, same WAL, same run.
#
# 1. Throughput (catch-up): two physical slots are created, then pgbench writes
#    for $BENCH_WRITE_SECONDS (default 30) with nobody streaming, so both slots hold
#    the same WAL. Then each archiver drains it up to the same end position:
#      plain:  pg_receivewal --synchronous --endpos END into a directory
#      dbops:  `dbops serve` with [postgres.archive] until its stored position
#              reaches END (start-up included; every segment is copied into the
#              storage through SHA-256 and recorded in the console database)
#    and the ratio dbops/plain of the wall times is printed.
# 2. Recovery point under load: while pgbench runs for $BENCH_LOAD_SECONDS
#    (default 60), dbops' recovery point lag (now - stored_through_at) and plain
#    pg_receivewal's flush lag (pg_stat_replication.flush_lag) are sampled every
#    0.5 s; p50/p99/max printed.
#
# Uses the PostgreSQL at $BENCH_PG (default the machine's, loopback only); its
# wal_level must be replica. Everything it creates (databases, slots, files) is
# removed at the end (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
SCALE="${BENCH_SCALE:-10}"
WRITE="${BENCH_WRITE_SECONDS:-30}"
LOAD="${BENCH_LOAD_SECONDS:-60}"
BIN=${BENCH_BIN:-target/release/dbops}
WORK=$(mktemp -d /tmp/dbops-bench-archive.XXXXXX)
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$RESULTS/archive_pg-$STAMP.txt"
SERVE_PID=""
PLAIN_PID=""

sql() { psql "$PG/postgres" -qAtc "$1"; }
drop() { psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null 2>&1 || true; }
drop_slot() { sql "SELECT pg_drop_replication_slot('$1') FROM pg_replication_slots WHERE slot_name = '$1' AND NOT active" >/dev/null 2>&1 || true; }
cleanup() {
  [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null || true
  [ -n "$PLAIN_PID" ] && kill "$PLAIN_PID" 2>/dev/null && wait "$PLAIN_PID" 2>/dev/null || true
  sleep 1
  drop_slot dbops_bench_plain; drop_slot dbops_bench_arch
  drop dbops_bench_wsrc; drop dbops_bench_wconsole
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$BIN" ] || cargo build --release
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
command -v pgbench >/dev/null || PATH="$PATH:$PGBIN"
command -v pg_receivewal >/dev/null || PATH="$PATH:$PGBIN"

now() { date +%s.%N; }
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int(NR*p/100+0.999); if (i<1) i=1; if (i>NR) i=NR; print a[i]}'; }

export BENCH_TARGET_URL="$PG/dbops_bench_wsrc"
export RUST_LOG=warn

{
echo "# dbops WAL archiving benchmark, $STAMP"
echo "# machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); $(pg_receivewal --version); server $(sql 'SHOW server_version')"
echo "# pgbench scale $SCALE; catch-up WAL written in ${WRITE}s; load ${LOAD}s"
} | tee "$OUT"

# Leftovers of an interrupted run.
drop_slot dbops_bench_plain; drop_slot dbops_bench_arch; drop dbops_bench_wsrc; drop dbops_bench_wconsole
cat > "$WORK/dbops.toml" <<TOML
database_url = "$PG/dbops_bench_wconsole"
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
snapshot_seconds = 1
TOML

sql "CREATE DATABASE dbops_bench_wsrc" >/dev/null
pgbench -q -i -s "$SCALE" "$BENCH_TARGET_URL" >/dev/null 2>&1
"$BIN" --config "$WORK/dbops.toml" migrate >/dev/null

# 1. Both slots hold the same WAL.
sql "SELECT pg_create_physical_replication_slot('dbops_bench_plain', true)" >/dev/null
sql "SELECT pg_create_physical_replication_slot('dbops_bench_arch', true)" >/dev/null
START=$(sql "SELECT pg_current_wal_flush_lsn()")
pgbench -c 2 -j 2 -T "$WRITE" "$BENCH_TARGET_URL" >/dev/null 2>&1
sql "SELECT pg_switch_wal()" >/dev/null
sql "CHECKPOINT" >/dev/null
END=$(sql "SELECT pg_current_wal_flush_lsn()")
BYTES=$(sql "SELECT pg_wal_lsn_diff('$END', '$START')::bigint")
echo "WAL to drain: $(numfmt --to=iec "$BYTES") ($START .. $END)" | tee -a "$OUT"

mkdir -p "$WORK/plain"
s=$(now)
PGAPPNAME=bench-plain pg_receivewal -d "$PG/postgres?replication=true" -D "$WORK/plain" -S dbops_bench_plain \
  --synchronous --no-loop -E "$END" >/dev/null 2>&1 || true
plain=$(echo "$(now) - $s" | bc -l)
plain_files=$(ls "$WORK/plain" | wc -l)

s=$(now)
"$BIN" --config "$WORK/dbops.toml" serve >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
while :; do
  got=$(psql "$PG/dbops_bench_wconsole" -qAtc "SELECT coalesce(stored_lsn, 0) >= pg_wal_lsn_diff('$END', '0/0') FROM wal_streams WHERE target = 'bench'" 2>/dev/null || true)
  [ "$got" = "t" ] && break
  kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
  sleep 0.1
done
dbops=$(echo "$(now) - $s" | bc -l)
segs=$(psql "$PG/dbops_bench_wconsole" -qAtc "SELECT count(*) FROM wal_segments")
printf 'catch-up  plain pg_receivewal %7.2f s (%s files)   dbops archive %7.2f s (%s segments stored)   ratio %.3f   (%s MB/s vs %s MB/s)\n' \
  "$plain" "$plain_files" "$dbops" "$segs" "$(echo "$dbops / $plain" | bc -l)" \
  "$(echo "$BYTES / 1048576 / $plain" | bc)" "$(echo "$BYTES / 1048576 / $dbops" | bc)" | tee -a "$OUT"

# 2. Lag under load, both streaming live.
rm -rf "$WORK/plain"; mkdir -p "$WORK/plain"
PGAPPNAME=bench-plain pg_receivewal -d "$PG/postgres?replication=true" -D "$WORK/plain" -S dbops_bench_plain \
  --synchronous --no-loop >/dev/null 2>&1 &
PLAIN_PID=$!
sleep 2
pgbench -c 2 -j 2 -T "$LOAD" "$BENCH_TARGET_URL" >"$WORK/pgbench.out" 2>&1 &
LOAD_PID=$!
: >"$WORK/lag.dbops"; : >"$WORK/lag.plain"
while kill -0 "$LOAD_PID" 2>/dev/null; do
  psql "$PG/dbops_bench_wconsole" -qAtc "SELECT extract(epoch FROM now() - stored_through_at) FROM wal_streams WHERE target = 'bench'" >>"$WORK/lag.dbops" 2>/dev/null || true
  sql "SELECT coalesce(extract(epoch FROM flush_lag), 0) FROM pg_stat_replication WHERE application_name = 'bench-plain'" >>"$WORK/lag.plain" 2>/dev/null || true
  sleep 0.5
done
tps=$(awk '/^tps/ {print int($3)}' "$WORK/pgbench.out" | head -1)
for who in dbops plain; do
  f="$WORK/lag.$who"
  printf 'lag under load (%s tps)  %-6s p50 %5.2f s  p99 %5.2f s  max %5.2f s  (%s samples)\n' "$tps" "$who" \
    "$(pct 50 <"$f")" "$(pct 99 <"$f")" "$(pct 100 <"$f")" "$(wc -l <"$f")" | tee -a "$OUT"
done
echo "results: $OUT"
