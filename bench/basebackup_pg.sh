#!/usr/bin/env bash
# dbops' base backup vs plain `pg_basebackup -Ft -X none --checkpoint=fast` into a
# directory (one base.tar + backup_manifest), same cluster, same run (issue #17).
#
# For each pgbench scale in $BENCH_SCALES (default "30 60": the second doubles the
# first), each on a throwaway cluster of its own (initdb from the machine's server binaries,
# wal_level = replica, a free loopback port), alternating $BENCH_RUNS times
# (default 3):
#   plain: pg_basebackup -D DIR -Ft -X none --checkpoint=fast (writes and fsyncs
#          base.tar and backup_manifest)
#   dbops: dbops basebackup run --target bench --wait (pg_basebackup -D - -Ft -X
#          none --checkpoint=fast streamed through SHA-256 into the storage,
#          committed, then verified: the stored tar re-read, checksum re-checked,
#          unpacked into a scratch directory and checked with pg_verifybackup)
# Printed: median wall times and their ratio (the whole command, start-up and
# verification included), the copy phase alone (the base backup's recorded
# started_at..finished_at, i.e. until the tar is stored), sizes, and dbops' peak
# RSS (its own process, VmRSS every 100 ms).
#
# DBOPS_BIN picks the binary (default target/release/dbops); BENCH_QUIET: see
# bench/lib.sh (the clusters are filled before the window). Everything it creates is
# removed at the end (trap).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
SCALES="${BENCH_SCALES:-30 60}"
RUNS="${BENCH_RUNS:-3}"
BIN="${DBOPS_BIN:-target/release/dbops}"
WORK=$(mktemp -d /tmp/dbops-bench-bb.XXXXXX)
chmod 755 "$WORK"
RESULTS=bench/results
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$RESULTS/basebackup_pg-$STAMP.txt"
CONSOLE=dbops_bench_bbconsole

cleanup() {
  quiet_end
  for scale in $SCALES; do cluster_stop "$WORK/src$scale"; done
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $CONSOLE WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$BIN" ] || cargo build --release
command -v pgbench >/dev/null || PATH="$PATH:$PGBIN"
command -v pg_basebackup >/dev/null || PATH="$PATH:$PGBIN"

export RUST_LOG=warn
console() { psql "$PG/$CONSOLE" -qAt -F " " -c "$1"; }

{
echo "# dbops base backup benchmark, $STAMP"
echo "# machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r); $(pg_basebackup --version); sources: throwaway clusters of $("$PGBIN/postgres" --version)"
echo "# runs per case: $RUNS (median time, highest peak RSS)"
} | tee "$OUT"

psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $CONSOLE WITH (FORCE)" >/dev/null
psql "$PG/postgres" -qc "CREATE DATABASE $CONSOLE" >/dev/null
cat > "$WORK/dbops.toml" <<TOML
database_url = "$PG/$CONSOLE"
[backups]
directory = "$WORK/store"
[jobs]
workers = 0
TOML
for scale in $SCALES; do
  port=$(cluster_init "$WORK/src$scale" "max_wal_size = 4GB")
  cluster_start "$WORK/src$scale"
  export "BENCH_URL_$scale=postgres://postgres@127.0.0.1:$port/postgres"
  cat >> "$WORK/dbops.toml" <<TOML
[[postgres]]
name = "bench$scale"
url_env = "BENCH_URL_$scale"
policy = "dev"
[postgres.archive]
slot = "dbops_bench_bb"
keep_base_backups = 1000
TOML
  url="postgres://postgres@127.0.0.1:$port/postgres"
  pgbench -q -i -s "$scale" "$url" >/dev/null 2>&1
  psql "$url" -qc "CHECKPOINT" >/dev/null
done
"$BIN" --config "$WORK/dbops.toml" migrate >/dev/null

quiet_begin
echo "# load average when the measurements started: $QUIET_LOAD" | tee -a "$OUT"
for scale in $SCALES; do
  var="BENCH_URL_$scale"; url=${!var}
  size=$(psql "$url" -Atc "SELECT pg_size_pretty(sum(pg_database_size(datname))) FROM pg_database")
  echo "== pgbench scale $scale: cluster $size; load average $(loadavg)" | tee -a "$OUT"
  plain_t=(); dbops_t=(); copy_t=(); peaks=()
  for i in $(seq "$RUNS"); do
    rm -rf "$WORK/plain"
    r=$(timed_rss "$WORK/plain-run" pg_basebackup -d "$url" -D "$WORK/plain" -Ft -X none --checkpoint=fast)
    plain_t+=("${r%% *}")
    psize=$(du -sb "$WORK/plain" | cut -f1)
    rm -rf "$WORK/plain"
    r=$(timed_rss "$WORK/dbops-run" "$BIN" --config "$WORK/dbops.toml" basebackup run --target "bench$scale" --wait)
    dbops_t+=("${r%% *}"); peaks+=("${r##* }")
    read -r id dsize copy < <(console "SELECT id, bytes, extract(epoch FROM finished_at - started_at) FROM base_backups WHERE status = 'good' ORDER BY id DESC LIMIT 1")
    copy_t+=("$copy")
    verification=$(console "SELECT verification->>'summary' FROM base_backups WHERE id = $id")
    rm -rf "$WORK/store/bench$scale"
  done
  p=$(printf '%s\n' "${plain_t[@]}" | median)
  d=$(printf '%s\n' "${dbops_t[@]}" | median)
  c=$(printf '%s\n' "${copy_t[@]}" | median)
  peak=$(printf '%s\n' "${peaks[@]}" | sort -n | tail -1)
  printf 'scale %-4s pg_basebackup -Ft %6.2f s %7s MB | dbops %6.2f s %7s MB (copy phase %5.2f s) | ratio %.3f (copy phase %.3f) | dbops peak RSS %d MiB\n' \
    "$scale" "$p" "$(echo "$psize / 1000000" | bc)" "$d" "$(echo "$dsize / 1000000" | bc)" "$c" \
    "$(echo "$d / $p" | bc -l)" "$(echo "$c / $p" | bc -l)" $((peak / 1024)) | tee -a "$OUT"
  echo "  runs (s): plain ${plain_t[*]} / dbops ${dbops_t[*]} / dbops copy phase ${copy_t[*]}; verification: $verification" | tee -a "$OUT"
done
echo "# load average at the end: $(loadavg)" | tee -a "$OUT"
quiet_end
echo "results: $OUT"
