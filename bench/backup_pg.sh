#!/usr/bin/env bash
# dbops' PostgreSQL backup vs plain pg_dump, same database, same settings, same run.
#
# For each pgbench scale in $BENCH_SCALES (default "25 50": the second doubles the
# first), it times `pg_dump -Fc -f FILE` and `dbops backup run --wait` (custom
# format), then `pg_dump -Fd -j 2 -f DIR` and dbops' directory format with 2 jobs,
# prints the ratio dbops/pg_dump, and samples the dbops process's resident memory
# (VmRSS every 100 ms, its own, not pg_dump's) to report its peak.
#
# Loopback only; everything it creates is removed at the end (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
SCALES="${BENCH_SCALES:-25 50}"
RUNS="${BENCH_RUNS:-2}"
BIN=target/release/dbops
WORK=$(mktemp -d /tmp/dbops-bench-backup.XXXXXX)
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$RESULTS/backup_pg-$STAMP.txt"

cleanup() {
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS dbops_bench_pgbench WITH (FORCE)" >/dev/null 2>&1 || true
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS dbops_bench_backup WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$BIN" ] || cargo build --release
command -v pgbench >/dev/null || PATH="$PATH:$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

cat > "$WORK/dbops.toml" <<TOML
database_url = "$PG/dbops_bench_backup"
[backups]
directory = "$WORK/store"
[[postgres]]
name = "bench"
url_env = "BENCH_TARGET_URL"
policy = "dev"
[postgres.backup]
keep_last = 1000
TOML
export BENCH_TARGET_URL="$PG/dbops_bench_pgbench"
export RUST_LOG=warn

now() { date +%s.%N; }

# Runs "$@" in the background, samples its VmRSS (kB) until it exits; prints
# "seconds peak_kb" and fails if the command did.
timed_rss() {
  local start end peak=0 rss pid
  start=$(now)
  "$@" >"$WORK/last.out" 2>"$WORK/last.err" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ -n "$rss" ] && [ "$rss" -gt "$peak" ] && peak=$rss
    sleep 0.1
  done
  wait "$pid" || { echo "FAILED: $*" >&2; cat "$WORK/last.err" >&2; return 1; }
  end=$(now)
  echo "$(echo "$end - $start" | bc -l) $peak"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

{
echo "# dbops backup benchmark, $STAMP"
echo "# machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); $(pg_dump --version)"
echo "# runs per case: $RUNS (median reported)"
} | tee "$OUT"

for scale in $SCALES; do
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS dbops_bench_pgbench WITH (FORCE)" >/dev/null
  psql "$PG/postgres" -qc "CREATE DATABASE dbops_bench_pgbench" >/dev/null
  echo "== pgbench -i -s $scale …" | tee -a "$OUT"
  pgbench -q -i -s "$scale" "$PG/dbops_bench_pgbench" >/dev/null 2>&1
  size=$(psql "$PG/dbops_bench_pgbench" -Atc "SELECT pg_size_pretty(pg_database_size(current_database()))")
  echo "database size: $size" | tee -a "$OUT"
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS dbops_bench_backup WITH (FORCE)" >/dev/null
  "$BIN" --config "$WORK/dbops.toml" migrate >/dev/null

  for fmt in custom directory; do
    plain_times=(); dbops_times=(); peaks=()
    for i in $(seq "$RUNS"); do
      rm -rf "$WORK/plain"
      if [ "$fmt" = custom ]; then
        r=$(timed_rss pg_dump -Fc -f "$WORK/plain" "$BENCH_TARGET_URL")
      else
        r=$(timed_rss pg_dump -Fd -j 2 -f "$WORK/plain" "$BENCH_TARGET_URL")
      fi
      plain_times+=("${r%% *}")
      r=$(timed_rss "$BIN" --config "$WORK/dbops.toml" backup run --target bench --format "$fmt" --wait)
      dbops_times+=("${r%% *}"); peaks+=("${r##* }")
      rm -rf "$WORK/store"/bench
    done
    p=$(printf '%s\n' "${plain_times[@]}" | median)
    d=$(printf '%s\n' "${dbops_times[@]}" | median)
    peak=$(printf '%s\n' "${peaks[@]}" | sort -n | tail -1)
    ratio=$(echo "$d / $p" | bc -l)
    printf 'scale %-4s %-9s pg_dump %7.2f s   dbops %7.2f s   ratio %.3f   dbops peak RSS %d MiB\n' \
      "$scale" "$fmt" "$p" "$d" "$ratio" $((peak / 1024)) | tee -a "$OUT"
  done
done
echo "(dbops' time includes its start-up, the streaming SHA-256, committing the artifact and verifying it by re-reading it through pg_restore --list; the directory format also archives the directory into one file)" | tee -a "$OUT"
echo "results: $OUT"
