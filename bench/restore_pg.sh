#!/usr/bin/env bash
# dbops' restore into a new database vs plain `pg_restore -j 2`, same backup, same run.
#
# Builds a pgbench database (scale $BENCH_SCALE, default 50), takes one
# custom-format backup with dbops, then restores that same archive file
# $BENCH_RUNS times each way into a fresh database:
#   plain:  createdb + pg_restore -j 2 --no-owner --no-privileges --exit-on-error
#   dbops:  dbops restore --backup ID --into NAME --jobs 2
# and prints the medians and the ratio dbops/plain. dbops' time includes its
# start-up, re-reading the whole artifact to re-check its SHA-256 before anything
# is created, and counting the rows of every restored table afterwards.
#
# Loopback only; everything it creates is removed at the end (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
SCALE="${BENCH_SCALE:-50}"
RUNS="${BENCH_RUNS:-3}"
BIN=target/release/dbops
WORK=$(mktemp -d /tmp/dbops-bench-restore.XXXXXX)
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$RESULTS/restore_pg-$STAMP.txt"

drop() { psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null 2>&1 || true; }
cleanup() {
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
TOML
export BENCH_TARGET_URL="$PG/dbops_bench_rsrc"
export RUST_LOG=warn

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

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
read -r ID KEY < <(psql "$PG/dbops_bench_rconsole" -Atc "SELECT id, storage_key FROM backups WHERE status = 'good' ORDER BY id DESC LIMIT 1" -F ' ')
FILE="$WORK/store/$KEY"
echo "backup #$ID: $(du -h "$FILE" | cut -f1) custom-format archive" | tee -a "$OUT"

plain=(); dbops=()
for i in $(seq "$RUNS"); do
  drop dbops_bench_rplain
  s=$(now)
  createdb -h 127.0.0.1 -U postgres dbops_bench_rplain
  pg_restore -j 2 --no-owner --no-privileges --exit-on-error -d "$PG/dbops_bench_rplain" "$FILE"
  plain+=("$(echo "$(now) - $s" | bc -l)")
  drop dbops_bench_rplain

  drop dbops_bench_rdbops
  s=$(now)
  "$BIN" --config "$WORK/dbops.toml" restore --backup "$ID" --into dbops_bench_rdbops --jobs 2 >"$WORK/out" 2>&1 \
    || { cat "$WORK/out"; exit 1; }
  dbops+=("$(echo "$(now) - $s" | bc -l)")
  drop dbops_bench_rdbops
done
p=$(printf '%s\n' "${plain[@]}" | median)
d=$(printf '%s\n' "${dbops[@]}" | median)
printf 'scale %s  pg_restore -j 2 %7.2f s   dbops restore %7.2f s   ratio %.3f\n' "$SCALE" "$p" "$d" "$(echo "$d / $p" | bc -l)" | tee -a "$OUT"
echo "runs: plain ${plain[*]} / dbops ${dbops[*]}" | tee -a "$OUT"
echo "results: $OUT"
