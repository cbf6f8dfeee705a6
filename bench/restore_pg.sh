#!/usr/bin/env bash
# dbops' restore into a new database vs plain `pg_restore -j 2`, same data, same run.
#
# Builds a pgbench database (scale $BENCH_SCALE, default 50) and compares, each
# $BENCH_RUNS times into a fresh database:
#   1. plain: createdb + pg_restore -j 2 --no-owner --no-privileges --exit-on-error
#      of a `pg_dump -Fc` archive of the database (what a person with the tools
#      has), against `dbops restore --backup ID --into NAME --jobs 2` of dbops'
#      own backup of it (target "bench": compressed by dbops with zstd, so dbops
#      decompresses straight into the scratch file the parallel pg_restore reads);
#   2. the same archive file for both: a backup compressed by pg_dump itself
#      (target "benchgz", `compression = "pg_dump"`, as every backup from before
#      dbops compressed), restored by pg_restore -j 2 from the file and by dbops,
#      which reads that local file in place (no scratch copy).
# dbops' time includes its start-up, re-reading the whole artifact to re-check its
# SHA-256 (and, for zstd, that it decompresses) before anything is created, and
# counting the rows of every restored table afterwards.
#
# BENCH_QUIET: see bench/lib.sh (the database and the archives are made before
# the window; only the restores are timed inside it).
# DBOPS_BIN picks the binary (default target/release/dbops).
# Loopback only; everything it creates is removed at the end (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
SCALE="${BENCH_SCALE:-50}"
RUNS="${BENCH_RUNS:-3}"
BIN="${DBOPS_BIN:-target/release/dbops}"
WORK=$(mktemp -d /tmp/dbops-bench-restore.XXXXXX)
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$RESULTS/restore_pg-$STAMP.txt"

source bench/lib.sh
drop() { psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null 2>&1 || true; }
cleanup() {
  quiet_end
  drop dbops_bench_rsrc; drop dbops_bench_rconsole; drop dbops_bench_rplain; drop dbops_bench_rdbops
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$BIN" ] || cargo build --release
command -v pgbench >/dev/null || PATH="$PATH:$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

cat > "$WORK/dbops.toml" <<TOML
database_url = "$PG/dbops_bench_rconsole"
[backups]
directory = "$WORK/store"
[jobs]
workers = 0
[[postgres]]
name = "bench"
url_env = "BENCH_TARGET_URL"
policy = "dev"
[[postgres]]
name = "benchgz"
url_env = "BENCH_TARGET_URL"
policy = "dev"
[postgres.backup]
compression = "pg_dump"
TOML
export BENCH_TARGET_URL="$PG/dbops_bench_rsrc"
export RUST_LOG=warn


{
echo "# dbops restore benchmark, $STAMP"
echo "# machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); $(pg_restore --version)"
echo "# runs per case: $RUNS (median reported)"
} | tee "$OUT"

drop dbops_bench_rsrc; drop dbops_bench_rconsole
psql "$PG/postgres" -qc "CREATE DATABASE dbops_bench_rsrc" >/dev/null
echo "== pgbench -i -s $SCALE …" | tee -a "$OUT"
pgbench -q -i -s "$SCALE" "$BENCH_TARGET_URL" >/dev/null 2>&1
echo "database size: $(psql "$BENCH_TARGET_URL" -Atc "SELECT pg_size_pretty(pg_database_size(current_database()))")" | tee -a "$OUT"
"$BIN" --config "$WORK/dbops.toml" migrate >/dev/null
"$BIN" --config "$WORK/dbops.toml" backup run --target bench --format custom --wait >/dev/null
read -r ID KEY < <(psql "$PG/dbops_bench_rconsole" -Atc "SELECT id, storage_key FROM backups WHERE status = 'good' AND target = 'bench' ORDER BY id DESC LIMIT 1" -F ' ')
"$BIN" --config "$WORK/dbops.toml" backup run --target benchgz --format custom --wait >/dev/null
read -r GZID GZKEY < <(psql "$PG/dbops_bench_rconsole" -Atc "SELECT id, storage_key FROM backups WHERE status = 'good' AND target = 'benchgz' ORDER BY id DESC LIMIT 1" -F ' ')
pg_dump -Fc -f "$WORK/plain.dump" "$BENCH_TARGET_URL"
echo "pg_dump -Fc archive: $(du -h "$WORK/plain.dump" | cut -f1); dbops backup #$ID (zstd): $(du -h "$WORK/store/$KEY" | cut -f1); dbops backup #$GZID (pg_dump's gzip): $(du -h "$WORK/store/$GZKEY" | cut -f1)" | tee -a "$OUT"

# Restores "$1" (an archive file) with pg_restore -j 2, then backup "$2" with
# dbops --jobs 2; appends the seconds to the arrays plain and dbops.
one_round() {
  local s
  drop dbops_bench_rplain
  s=$(now)
  createdb -h 127.0.0.1 -U postgres dbops_bench_rplain
  pg_restore -j 2 --no-owner --no-privileges --exit-on-error -d "$PG/dbops_bench_rplain" "$1"
  plain+=("$(echo "$(now) - $s" | bc -l)")
  drop dbops_bench_rplain
  drop dbops_bench_rdbops
  s=$(now)
  "$BIN" --config "$WORK/dbops.toml" restore --backup "$2" --into dbops_bench_rdbops --jobs 2 >"$WORK/out" 2>&1 \
    || { cat "$WORK/out"; exit 1; }
  dbops+=("$(echo "$(now) - $s" | bc -l)")
  drop dbops_bench_rdbops
}
report() {
  local p d
  p=$(printf '%s\n' "${plain[@]}" | median)
  d=$(printf '%s\n' "${dbops[@]}" | median)
  printf 'scale %s  %-62s pg_restore -j 2 %7.2f s   dbops restore %7.2f s   ratio %.3f\n' "$SCALE" "$1" "$p" "$d" "$(echo "$d / $p" | bc -l)" | tee -a "$OUT"
  echo "  runs: plain ${plain[*]} / dbops ${dbops[*]}" | tee -a "$OUT"
}
psql "$BENCH_TARGET_URL" -qc "CHECKPOINT" >/dev/null
quiet_begin
echo "# load average when the measurements started: $QUIET_LOAD" | tee -a "$OUT"
plain=(); dbops=()
for i in $(seq "$RUNS"); do one_round "$WORK/plain.dump" "$ID"; done
report "pg_dump -Fc archive vs dbops' zstd backup"
plain=(); dbops=()
for i in $(seq "$RUNS"); do one_round "$WORK/store/$GZKEY" "$GZID"; done
report "the same pg_dump-compressed file (dbops reads it in place)"
echo "# load average at the end: $(loadavg)" | tee -a "$OUT"
quiet_end
echo "results: $OUT"
