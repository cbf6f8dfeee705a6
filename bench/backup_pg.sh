#!/usr/bin/env bash
# dbops' PostgreSQL backup vs plain pg_dump, same database, same run, side by side.
#
# Datasets ($BENCH_DATASETS, default "hex pgbench:30 pgbench:60"):
#   hex          one table of md5 hex text (BENCH_HEX_ROWS rows, default 2,000,000:
#                ~330 MB on disk, ~270 MB of dump), which gzip barely shrinks;
#   pgbench:N    pgbench -i -s N (compresses ~50×); the second scale doubles the first.
# For each it times `pg_dump -Fc -f FILE` against `dbops backup run --wait` (custom
# format, the target's default compression: pg_dump -Z0 into dbops' zstd), then
# `pg_dump -Fd -j 2 -f DIR` against dbops' directory format with 2 jobs, and prints
# the wall-time ratio dbops/pg_dump, the artifact-size ratio, and the peak resident
# memory of the dbops process (VmRSS every 100 ms; its own, not pg_dump's).
# Also, for reference, once per dataset: `pg_dump -Fc -Z0 | zstd -T2 -3` by hand.
#
# dbops' time includes its start-up, the streaming SHA-256, committing the artifact
# and verifying it by re-reading it (decompressed) through pg_restore --list.
#
# BENCH_BACKUP_SETTINGS: extra lines for the target's [postgres.backup] (e.g.
# "compression_level = 1" or "compression_threads = 1"), to try settings.
# BENCH_QUIET: see bench/lib.sh (the datasets are filled before the window).
# DBOPS_BIN picks the binary (default target/release/dbops). Loopback only;
# everything it creates is removed at the end (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
DATASETS="${BENCH_DATASETS:-hex pgbench:30 pgbench:60}"
HEX_ROWS="${BENCH_HEX_ROWS:-2000000}"
RUNS="${BENCH_RUNS:-2}"
BIN="${DBOPS_BIN:-target/release/dbops}"
WORK=$(mktemp -d /tmp/dbops-bench-backup.XXXXXX)
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$RESULTS/backup_pg-$STAMP.txt"

source bench/lib.sh
dsdb() { echo "dbops_bench_bk_$(echo "$1" | tr -c 'a-z0-9\n' '_')"; }
cleanup() {
  quiet_end
  for ds in $DATASETS; do
    psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $(dsdb "$ds") WITH (FORCE)" >/dev/null 2>&1 || true
  done
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
${BENCH_BACKUP_SETTINGS:-}
TOML
export RUST_LOG=warn

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

mb() { echo "scale=1; $1 / 1000000" | bc -l; }

{
echo "# dbops backup benchmark, $STAMP"
echo "# machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); $(pg_dump --version); $(zstd --version | head -1)"
echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg); runs per case: $RUNS (median time, size of the last, highest peak RSS)"
} | tee "$OUT"

# The datasets are made first (outside the quiet window), one database each.
for ds in $DATASETS; do
  export BENCH_TARGET_URL="$PG/$(dsdb "$ds")"
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $(dsdb "$ds") WITH (FORCE)" >/dev/null
  psql "$PG/postgres" -qc "CREATE DATABASE $(dsdb "$ds")" >/dev/null
  case "$ds" in
    hex)
      echo "== hex: $HEX_ROWS rows of 4 md5 hex strings …" | tee -a "$OUT"
      psql "$BENCH_TARGET_URL" -qc "CREATE TABLE hex (id int PRIMARY KEY, a text, b text, c text, d text);
        INSERT INTO hex SELECT g, md5(g::text), md5((g * 7)::text), md5((g * 13)::text), md5((g * 17)::text)
        FROM generate_series(1, $HEX_ROWS) g" -c "VACUUM ANALYZE hex" >/dev/null ;;
    pgbench:*)
      scale=${ds#pgbench:}
      echo "== pgbench -i -s $scale …" | tee -a "$OUT"
      pgbench -q -i -s "$scale" "$BENCH_TARGET_URL" >/dev/null 2>&1 ;;
    *) echo "unknown dataset $ds" >&2; exit 2 ;;
  esac
  psql "$BENCH_TARGET_URL" -qc "CHECKPOINT" >/dev/null
done
psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS dbops_bench_backup WITH (FORCE)" >/dev/null
"$BIN" --config "$WORK/dbops.toml" migrate >/dev/null

quiet_begin
echo "# load average when the measurements started: $QUIET_LOAD" | tee -a "$OUT"
for ds in $DATASETS; do
  export BENCH_TARGET_URL="$PG/$(dsdb "$ds")"
  size=$(psql "$BENCH_TARGET_URL" -Atc "SELECT pg_size_pretty(pg_database_size(current_database()))")
  echo "== $ds: database size $size; load average $(loadavg)" | tee -a "$OUT"

  # Reference: pg_dump uncompressed, piped through the zstd command by hand.
  s=$(now)
  pg_dump -Fc -Z0 "$BENCH_TARGET_URL" | zstd -q -T2 -3 > "$WORK/byhand.dump.zst"
  printf '%-12s by hand: pg_dump -Fc -Z0 | zstd -T2 -3   %7.2f s  %8s MB\n' "$ds" \
    "$(echo "$(now) - $s" | bc -l)" "$(mb "$(stat -c %s "$WORK/byhand.dump.zst")")" | tee -a "$OUT"
  rm -f "$WORK/byhand.dump.zst"

  for fmt in custom directory; do
    plain_times=(); dbops_times=(); peaks=(); psize=0; dsize=0
    for i in $(seq "$RUNS"); do
      rm -rf "$WORK/plain"
      if [ "$fmt" = custom ]; then
        r=$(timed_rss pg_dump -Fc -f "$WORK/plain" "$BENCH_TARGET_URL")
      else
        r=$(timed_rss pg_dump -Fd -j 2 -f "$WORK/plain" "$BENCH_TARGET_URL")
      fi
      plain_times+=("${r%% *}")
      psize=$(du -sb "$WORK/plain" | cut -f1)
      rm -rf "$WORK/plain"
      r=$(timed_rss "$BIN" --config "$WORK/dbops.toml" backup run --target bench --format "$fmt" --wait)
      dbops_times+=("${r%% *}"); peaks+=("${r##* }")
      dsize=$(psql "$PG/dbops_bench_backup" -Atc "SELECT bytes FROM backups WHERE status = 'good' ORDER BY id DESC LIMIT 1")
      rm -rf "$WORK/store"/bench
    done
    p=$(printf '%s\n' "${plain_times[@]}" | median)
    d=$(printf '%s\n' "${dbops_times[@]}" | median)
    peak=$(printf '%s\n' "${peaks[@]}" | sort -n | tail -1)
    echo "  runs (s): plain ${plain_times[*]} / dbops ${dbops_times[*]}" >>"$OUT"
    plain_name=$([ "$fmt" = custom ] && echo "pg_dump -Fc" || echo "pg_dump -Fd -j 2")
    printf '%-12s %-9s %-16s %7.2f s %8s MB | dbops %7.2f s %8s MB | time ratio %.3f  size ratio %.3f | dbops peak RSS %d MiB\n' \
      "$ds" "$fmt" "$plain_name" "$p" "$(mb "$psize")" "$d" "$(mb "$dsize")" \
      "$(echo "$d / $p" | bc -l)" "$(echo "$dsize / $psize" | bc -l)" $((peak / 1024)) | tee -a "$OUT"
  done
done
echo "# load average at the end: $(loadavg)" | tee -a "$OUT"
quiet_end
echo "(dbops: pg_dump -Z0 streamed through zstd level 3 on 2 threads at nice 10, SHA-256 of the stored bytes, commit, then verification: the stored file re-read, decompressed, through pg_restore --list)" | tee -a "$OUT"
echo "results: $OUT"
