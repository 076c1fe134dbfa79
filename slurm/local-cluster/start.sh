#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster (munged + slurmctld + slurmd) whose whole state lives in one
# directory: for the tests (tests/slurm) and for trying `kedro run --env=hpcc_local` on one machine.
#
#   eval "$(bash slurm/local-cluster/start.sh [STATE_DIR])"     # prints only `export …` lines
#   bash slurm/local-cluster/stop.sh                            # cancels its jobs, stops its daemons
#
# Needs root and `apt-get install slurm-wlm munge` (Debian 12: slurm 22.05). Nothing under /etc or /var is
# used or changed; a system munged, if any, is left alone. Knobs: LOCAL_SLURM_PARTITION (debug),
# LOCAL_SLURM_CTLD_PORT / LOCAL_SLURM_SLURMD_PORT (6817/6818 when free), LOCAL_SLURM_TIMEOUT (60 s).
set -euo pipefail
log() { echo "[local-slurm] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (slurmd starts job steps as their users)"
for tool in munged munge unmunge slurmctld slurmd sinfo scontrol sbatch; do
  command -v "$tool" > /dev/null || die "'$tool' not found: apt-get install -y slurm-wlm munge"
done

STATE_DIR=${1:-$(mktemp -d "${TMPDIR:-/tmp}/local-slurm.XXXXXX")}
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
# slurm.conf and munge's AuthInfo cannot quote these characters.
case "$STATE_DIR" in *[[:space:],#=]*) die "state dir must not contain blanks, ',', '#' or '=': $STATE_DIR" ;; esac
for daemon in munged slurmctld slurmd; do
  pid_file="$STATE_DIR/pids/$daemon.pid"
  if [ -s "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2> /dev/null; then
    die "$daemon of $STATE_DIR is already running; stop it first: bash $(dirname "$0")/stop.sh $STATE_DIR"
  fi
done
# munged refuses a socket below a directory that others cannot enter (e.g. pytest's 0700 tmp dirs).
parent=$(dirname "$STATE_DIR")
while [ "$parent" != / ]; do
  [ "$(( 0$(stat -c %a "$parent") & 1 ))" = 1 ] || die "munged needs every parent of the state dir to be world-executable; $parent is not (choose another STATE_DIR)"
  parent=$(dirname "$parent")
done
NODE=$(hostname -s)
# torch.distributed meets at the first node's name (SLURM_JOB_NODELIST), so it must resolve.
getent hosts "$NODE" > /dev/null || die "host name '$NODE' does not resolve; add '127.0.0.1 $NODE' to /etc/hosts"

# If anything below fails, take down what already started (the logs stay for a look).
started=0
on_exit() {
  if [ "$started" != 1 ]; then
    log "start failed; stopping what was started (logs in $STATE_DIR/logs)"
    LOCAL_SLURM_KEEP_STATE=1 bash "$(dirname "${BASH_SOURCE[0]}")/stop.sh" "$STATE_DIR" || true
  fi
}
trap on_exit EXIT

# munged refuses a socket whose directories are not world-executable, and a key directory others can write.
mkdir -p "$STATE_DIR"/{munge,munge-socket,logs,pids,ctld-state,slurmd-spool}
chmod 755 "$STATE_DIR" "$STATE_DIR/munge-socket" "$STATE_DIR/pids"
chmod 700 "$STATE_DIR/munge"

listening() {  # is TCP port $1 in LISTEN state (read from /proc: no extra tools needed)?
  awk -v port="$(printf ':%04X' "$1")" \
    'FNR > 1 && $4 == "0A" && substr($2, length($2) - 4) == port { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2> /dev/null
}
free_port() {  # $1 preferred, then random; never one in "$2"
  local port=$1
  while listening "$port" || [ "$port" = "${2:-}" ]; do port=$((20000 + RANDOM % 20000)); done
  echo "$port"
}
CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-$(free_port 6817)}
SLURMD_PORT=${LOCAL_SLURM_SLURMD_PORT:-$(free_port 6818 "$CTLD_PORT")}

SOCKET="$STATE_DIR/munge-socket/munge.socket"
KEY="$STATE_DIR/munge/munge.key"
[ -s "$KEY" ] || dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none
chmod 400 "$KEY"
log "starting munged"
munged --socket="$SOCKET" --key-file="$KEY" --pid-file="$STATE_DIR/pids/munged.pid" \
  --log-file="$STATE_DIR/logs/munged.log" --seed-file="$STATE_DIR/munge/munged.seed" \
  || { tail -n 20 "$STATE_DIR/logs/munged.log" >&2 || true; die "munged did not start"; }
munge -n -S "$SOCKET" | unmunge -S "$SOCKET" > /dev/null || die "munge credential round trip failed"

HARDWARE=$(slurmd -C | sed -n '1s/^NodeName=[^ ]* //p')  # CPUs, cores, RealMemory of this machine
[ -n "$HARDWARE" ] || die "slurmd -C printed no node line"
CONF="$STATE_DIR/slurm.conf"
cat > "$CONF" << CONF
# Written by slurm/local-cluster/start.sh; the reasons are in slurm/README.md ("A cluster on one machine").
ClusterName=localslurm
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$STATE_DIR/ctld-state
SlurmdSpoolDir=$STATE_DIR/slurmd-spool
SlurmctldPidFile=$STATE_DIR/pids/slurmctld.pid
SlurmdPidFile=$STATE_DIR/pids/slurmd.pid
SlurmctldLogFile=$STATE_DIR/logs/slurmctld.log
SlurmdLogFile=$STATE_DIR/logs/slurmd.log
PlugStackConfig=$STATE_DIR/plugstack.conf
MailProg=/bin/true
# containers and small VMs have no delegated cgroup tree: no cgroup plugins (nothing is enforced)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# schedule every 2 s, so a requeued job restarts ~12 s after its requeue instead of up to a minute
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $HARDWARE State=UNKNOWN
PartitionName=${LOCAL_SLURM_PARTITION:-debug} Nodes=$NODE Default=YES MaxTime=24:00:00 DefaultTime=01:00:00 State=UP
CONF
: > "$STATE_DIR/plugstack.conf"
export SLURM_CONF="$CONF"

log "starting slurmctld (port $CTLD_PORT) and slurmd (port $SLURMD_PORT)"
slurmctld -f "$CONF" || { tail -n 30 "$STATE_DIR/logs/slurmctld.log" >&2 || true; die "slurmctld did not start"; }
slurmd -f "$CONF" || { tail -n 30 "$STATE_DIR/logs/slurmd.log" >&2 || true; die "slurmd did not start"; }

deadline=$((SECONDS + ${LOCAL_SLURM_TIMEOUT:-60}))
until [ "$(sinfo -h -N -n "$NODE" -o %T 2> /dev/null | head -n 1)" = idle ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    scontrol show node "$NODE" >&2 || true
    tail -n 30 "$STATE_DIR/logs/slurmctld.log" "$STATE_DIR/logs/slurmd.log" >&2 || true
    die "node $NODE did not become idle (logs: $STATE_DIR/logs)"
  fi
  sleep 0.5
done
started=1
log "node $NODE is idle; stop with: bash $(dirname "$0")/stop.sh $STATE_DIR"
echo "export SLURM_CONF=$CONF"
echo "export LOCAL_SLURM_STATE_DIR=$STATE_DIR"
