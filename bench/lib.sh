# Helpers sourced by the bench/ scripts (not run on its own).
#
# Quiet windows. On a shared machine the scripts can tell other jobs to hold off
# while they measure: with BENCH_QUIET=/path/to/file, quiet_begin creates that
# file, waits BENCH_QUIET_WAIT seconds (60) for running work to notice, then up to
# BENCH_QUIET_EXTRA more seconds (120) until the 1-minute load average is below 1.5;
# quiet_end removes the file. Without BENCH_QUIET they only record the load
# average. A window starts at least BENCH_QUIET_GAP (180) seconds after the last
# one of any of these scripts ended. QUIET_LOAD holds the load average seen when the measurement started.
# A script must keep each window short (the convention here: under 12 minutes)
# and release it between long steps.

QUIET_FILE="${BENCH_QUIET:-}"
QUIET_HELD=""
QUIET_SINCE=0

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

quiet_begin() {
  if [ -z "$QUIET_FILE" ]; then QUIET_LOAD=$(loadavg); return 0; fi
  # At least BENCH_QUIET_GAP seconds (180) since the last window of any bench
  # script ended, so that others get to build in between.
  local last; last=$(cat /tmp/dbops-bench-quiet.released 2>/dev/null || echo 0)
  local gap=$(( last + ${BENCH_QUIET_GAP:-180} - $(date +%s) ))
  if [ "$gap" -gt 0 ]; then
    echo "# quiet window: waiting $gap s more since the last one ended" >&2
    sleep "$gap"
  fi
  touch "$QUIET_FILE"; QUIET_HELD=1; QUIET_SINCE=$(date +%s)
  echo "# quiet window: $QUIET_FILE created $(date -u +%H:%M:%S), load $(loadavg); waiting ${BENCH_QUIET_WAIT:-60} s" >&2
  sleep "${BENCH_QUIET_WAIT:-60}"
  local until=$(( $(date +%s) + ${BENCH_QUIET_EXTRA:-120} ))
  while awk '{exit !($1 >= 1.5)}' /proc/loadavg && [ "$(date +%s)" -lt "$until" ]; do sleep 5; done
  QUIET_LOAD=$(loadavg)
  echo "# quiet window: measuring from $(date -u +%H:%M:%S), load $QUIET_LOAD" >&2
}

quiet_end() {
  if [ -n "$QUIET_HELD" ]; then
    rm -f "$QUIET_FILE"; QUIET_HELD=""
    date +%s > /tmp/dbops-bench-quiet.released
    echo "# quiet window: released $(date -u +%H:%M:%S) after $(( $(date +%s) - QUIET_SINCE )) s, load $(loadavg)" >&2
  fi
  return 0
}

# Throwaway PostgreSQL clusters (wal_level = replica) from the machine's server
# binaries, on a free loopback port, trust authentication, run as the postgres
# system user when the script runs as root (PostgreSQL refuses root).
# cluster_init DIR -> sets CL_PORT; cluster_start DIR PORT; cluster_stop DIR.
PGBIN="${BENCH_PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}"

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# cluster_init DIR [extra postgresql.conf lines...]: initdb into DIR/data with the
# socket in DIR; prints the port it will use.
cluster_init() {
  local dir=$1; shift
  set -e
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  as_pg "$PGBIN/initdb" -U postgres -A trust -D "$dir/data" >/dev/null
  local port; port=$(free_port)
  {
    echo "port = $port"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$dir'"
    echo "wal_level = replica"
    echo "max_wal_senders = 10"
    echo "max_replication_slots = 10"
    echo "fsync = on"
    for line in "$@"; do echo "$line"; done
  } | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
  echo "$port"
}

cluster_start() {
  as_pg "$PGBIN/pg_ctl" -D "$1/data" -l "$1/server.log" -w -t 120 start >/dev/null
}

cluster_stop() {
  [ -f "$1/data/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$1/data" -m fast -w stop >/dev/null 2>&1
  return 0
}

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int(NR*p/100+0.999); if (i<1) i=1; if (i>NR) i=NR; print a[i]}'; }

# timed_rss OUTFILE CMD...: runs CMD in the background (stdout/stderr to
# OUTFILE.out/.err), samples its VmRSS every 100 ms until it exits; prints
# "seconds peak_kb"; fails (showing its stderr) if it failed.
timed_rss() {
  local outf=$1; shift
  local start end peak=0 rss pid
  start=$(now)
  "$@" >"$outf.out" 2>"$outf.err" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ -n "$rss" ] && [ "$rss" -gt "$peak" ] && peak=$rss
    sleep 0.1
  done
  wait "$pid" || { echo "FAILED: $*" >&2; cat "$outf.err" >&2; return 1; }
  end=$(now)
  echo "$(echo "$end - $start" | bc -l) $peak"
}
