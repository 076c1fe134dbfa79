#!/usr/bin/env bash
# Stop a cluster started by start.sh: cancel its jobs, wait for their steps to end, then stop exactly the
# slurmd, slurmctld and munged whose pid files are in STATE_DIR (never anything found by name alone).
#
#   bash slurm/local-cluster/stop.sh [STATE_DIR]   (default: $LOCAL_SLURM_STATE_DIR)
#   LOCAL_SLURM_KEEP_STATE=1 keeps STATE_DIR (logs); otherwise it is removed once every daemon is gone.
set -uo pipefail
log() { echo "[local-slurm] $*" >&2; }

STATE_DIR=${1:-${LOCAL_SLURM_STATE_DIR:-}}
[ -n "$STATE_DIR" ] && [ -d "$STATE_DIR" ] || { log "usage: stop.sh STATE_DIR (got '${STATE_DIR}')"; exit 2; }
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)

alive() {  # a zombie waiting for its parent to reap it counts as stopped
  local state
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2> /dev/null)
  [ -n "$state" ] && [ "$state" != Z ]
}
ours() {  # pid of daemon $1 of this state dir, if it runs (guards against a recycled pid)
  local pid_file="$STATE_DIR/pids/$1.pid" pid
  [ -s "$pid_file" ] || return 0
  pid=$(tr -dc '0-9' < "$pid_file")
  [ -n "$pid" ] && alive "$pid" || return 0
  [[ "$(cat "/proc/$pid/comm" 2> /dev/null)" == "$1"* ]] || return 0
  [[ "$(tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null)" == *"$STATE_DIR/"* ]] || return 0
  echo "$pid"
}

# 1. Jobs first, so that no job process outlives slurmd.
if [ -n "$(ours slurmctld)" ]; then
  export SLURM_CONF="$STATE_DIR/slurm.conf"
  jobs=$(squeue -h -o %i 2> /dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2> /dev/null || true
  fi
  for _ in $(seq 60); do
    running=$(squeue -h -o %i 2> /dev/null | wc -l)
    steps=$(find "$STATE_DIR/slurmd-spool" -maxdepth 1 -type s 2> /dev/null | wc -l)
    [ "$running" = 0 ] && [ "$steps" = 0 ] && break
    sleep 0.5
  done
fi

# 2. Daemons: slurmd and slurmctld, then munged (which both use). TERM, up to 10 s, then KILL.
rc=0
stop_daemons() {
  local daemon pid pids=""
  for daemon in "$@"; do
    pid=$(ours "$daemon")
    [ -n "$pid" ] || continue
    log "stopping $daemon (pid $pid)"
    kill -TERM "$pid" 2> /dev/null && pids="$pids $pid"
  done
  for _ in $(seq 100); do
    local left=""
    for pid in $pids; do alive "$pid" && left="$left $pid"; done
    [ -z "$left" ] && return 0
    sleep 0.1
  done
  for pid in $left; do kill -KILL "$pid" 2> /dev/null; done
  sleep 0.5
  for pid in $left; do alive "$pid" && { log "pid $pid is still running"; rc=1; }; done
}
stop_daemons slurmd slurmctld
stop_daemons munged

if [ "$rc" = 0 ] && [ "${LOCAL_SLURM_KEEP_STATE:-0}" != 1 ]; then
  rm -rf "$STATE_DIR"
  log "stopped; removed $STATE_DIR"
else
  log "state kept in $STATE_DIR"
fi
exit "$rc"
