#!/usr/bin/env bash
# slurm_local.sh - a real single-node SLURM cluster (plus its PBS/Torque front end) on this
# machine, for tests and for trying the jobs/ scripts by hand.
#
# Usage:
#   tools/slurm_local.sh start  [--state-dir DIR]   start munged, slurmctld, slurmd (idempotent)
#   tools/slurm_local.sh stop   [--state-dir DIR]   cancel jobs, stop the daemons, clean up
#   tools/slurm_local.sh status [--state-dir DIR]   exit 0 when munge + both daemons + node are up
#   tools/slurm_local.sh env    [--state-dir DIR]   print `export SLURM_CONF=...` (for eval)
#   --purge (with stop): also delete the state dir (configs, logs, job-completion log)
#
# Everything lives in the state dir (default /tmp/mlbfgs-slurm, or $MLBFGS_SLURM_DIR); nothing
# is written to /etc. Every Slurm command finds the cluster through SLURM_CONF, so after
# `start` run `export SLURM_CONF=<state dir>/slurm.conf` (the script prints the line).
# The daemons run as root (SlurmUser=root); munged runs as user munge with its own key and
# socket in the state dir, so a system munged (if any) is left alone.
#
# Choices (see README "Local SLURM cluster"):
# - Oversubscription: the node reports CPUs = nproc x MLBFGS_SLURM_CPU_FACTOR (default 4, so 8
#   on a 2-core box) with SlurmdParameters=config_overrides; `sbatch -n 4` then runs 4 ranks on
#   2 real cores without --overcommit, and a few small jobs can run side by side.
# - AuthInfo cred_expire (default 5 s, the minimum Slurm accepts; Slurm's default is 120 s) is
#   what a requeued job waits before it may run again; sched_interval=1 makes the scheduler
#   notice that promptly. Measured: requeue -> next run starts 6.0 s later.
# - KillWait (SIGTERM -> SIGKILL at the time limit) = MLBFGS_SLURM_KILL_WAIT (default 5 s).
# - No accounting DB: finished jobs stay in `scontrol show job` for MinJobAge
#   (MLBFGS_SLURM_MIN_JOB_AGE, default 60 s), and every job end (also each requeue) is appended to
#   <state dir>/log/jobcomp.txt (jobcomp/filetxt) - the reliable source for final state/exit code.
# - spank_pbs.so is enabled (own plugstack.conf), so jobs see PBS_JOBID, PBS_O_WORKDIR, ...
# - Not configurable in Slurm: --signal=SIG@N is checked on slurmctld's 30 s tick and sent once
#   at most N+30 s remain, i.e. 0-30 s early - and at job start if N+30 >= the time limit.
#
# Environment knobs: MLBFGS_SLURM_DIR, MLBFGS_SLURM_CPU_FACTOR, MLBFGS_SLURM_CPUS (overrides the
# factor), MLBFGS_SLURM_CRED_EXPIRE, MLBFGS_SLURM_KILL_WAIT, MLBFGS_SLURM_MIN_JOB_AGE,
# MLBFGS_SLURM_CTLD_PORT (6817), MLBFGS_SLURM_SLURMD_PORT (6818), MLBFGS_SLURM_START_TIMEOUT (30 s).
set -euo pipefail

STATE_DIR="${MLBFGS_SLURM_DIR:-/tmp/mlbfgs-slurm}"
PURGE=0
CMD=""

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
    echo "slurm_local.sh: error: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        start|stop|status|env) CMD="$1" ;;
        --state-dir) [ $# -ge 2 ] || die "--state-dir needs a directory"; STATE_DIR="$2"; shift ;;
        --state-dir=*) STATE_DIR="${1#--state-dir=}" ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
    shift
done
[ -n "$CMD" ] || { usage >&2; die "missing command (start|stop|status|env)"; }

# Absolute path: the config file stores paths and daemons chdir to /.
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
CONF="$STATE_DIR/slurm.conf"
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
RUN_DIR="$STATE_DIR/run"
LOG_DIR="$STATE_DIR/log"
export SLURM_CONF="$CONF"

NODE_NAME="$(hostname -s)"
REAL_CPUS="$(nproc)"
CPUS="${MLBFGS_SLURM_CPUS:-$(( REAL_CPUS * ${MLBFGS_SLURM_CPU_FACTOR:-4} ))}"
CRED_EXPIRE="${MLBFGS_SLURM_CRED_EXPIRE:-5}"
KILL_WAIT="${MLBFGS_SLURM_KILL_WAIT:-5}"
MIN_JOB_AGE="${MLBFGS_SLURM_MIN_JOB_AGE:-60}"
CTLD_PORT="${MLBFGS_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${MLBFGS_SLURM_SLURMD_PORT:-6818}"
START_TIMEOUT="${MLBFGS_SLURM_START_TIMEOUT:-30}"
SLURM_PLUGIN_DIR="/usr/lib/x86_64-linux-gnu/slurm-wlm"

print_usage_hint() {
    cat <<EOF
SLURM is up on node $NODE_NAME ($CPUS schedulable CPUs on $REAL_CPUS real cores). Use it with:
  export SLURM_CONF=$CONF
  sinfo; sbatch job.sh; srun --mpi=pmix -n 2 hostname; qsub job.pbs; squeue; qstat
Job completion log: $LOG_DIR/jobcomp.txt   daemon logs: $LOG_DIR/
Stop it with: $0 stop --state-dir $STATE_DIR
EOF
}

pid_alive() {  # pid_alive PIDFILE -> 0 when the pid in PIDFILE runs
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

munge_ok() {
    # A live socket that round-trips a credential is the only real check (a pid can be stale).
    [ -S "$MUNGE_SOCKET" ] && munge -n --socket="$MUNGE_SOCKET" 2>/dev/null \
        | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1
}

node_state() {  # the node's state as sinfo reports it, empty when slurmctld does not answer
    timeout 10 sinfo -h -N -n "$NODE_NAME" -o '%T' 2>/dev/null | head -n1 || true
}

check_binaries() {
    local b
    for b in munged munge unmunge slurmctld slurmd sinfo scontrol sbatch; do
        command -v "$b" >/dev/null 2>&1 \
            || die "'$b' not found; install with: apt-get install -y slurm-wlm slurm-wlm-torque munge"
    done
    [ -f "$SLURM_PLUGIN_DIR/spank_pbs.so" ] || die "$SLURM_PLUGIN_DIR/spank_pbs.so missing (slurm-wlm-basic-plugins)"
}

show_logs() {
    local f
    for f in "$LOG_DIR"/munged.log "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log; do
        [ -f "$f" ] && { echo "---- tail $f" >&2; tail -n 15 "$f" >&2; }
    done
    return 0
}

write_configs() {
    local mem_mb
    # RealMemory a bit under the real total so slurmd never reports "low memory".
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/ctld" "$STATE_DIR/slurmd"
    cat > "$CONF" <<EOF
# Generated by tools/slurm_local.sh - single-node test cluster. Edits are overwritten on start.
ClusterName=mlbfgs
SlurmctldHost=$NODE_NAME
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$STATE_DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
JobRequeue=1
ReturnToService=2
# Trust the CPU count below even though it exceeds the real cores (oversubscription on purpose).
SlurmdParameters=config_overrides
MinJobAge=$MIN_JOB_AGE
KillWait=$KILL_WAIT
InactiveLimit=0
SchedulerType=sched/backfill
# Run the main scheduler every second so requeued jobs start as soon as their begin time passes.
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.txt
MailProg=/bin/true
NodeName=$NODE_NAME NodeAddr=$NODE_NAME CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE_NAME Default=YES MaxTime=INFINITE State=UP
EOF
    # spank_pbs sets PBS_JOBID, PBS_O_WORKDIR, PBS_ARRAY_INDEX, ... in every job.
    echo "optional $SLURM_PLUGIN_DIR/spank_pbs.so" > "$STATE_DIR/plugstack.conf"
}

start_munged() {
    if munge_ok; then
        return 0
    fi
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        mungekey --create --keyfile="$MUNGE_DIR/munge.key" --force
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0600 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # munged refuses world-writable log dirs, so its log sits in the munge dir, linked from log/.
    runuser -u munge -- munged \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || { show_logs; die "munged failed to start"; }
    ln -sf "$MUNGE_DIR/munged.log" "$LOG_DIR/munged.log"
    local i
    for i in $(seq 1 50); do
        munge_ok && return 0
        sleep 0.1
    done
    show_logs
    die "munged started but 'munge -n | unmunge' fails on $MUNGE_SOCKET"
}

wait_node_idle() {
    local deadline state
    deadline=$(( $(date +%s) + START_TIMEOUT ))
    while :; do
        state="$(node_state)"
        case "$state" in
            idle*|mixed*|allocated*) return 0 ;;
        esac
        if ! pid_alive "$RUN_DIR/slurmctld.pid" || ! pid_alive "$RUN_DIR/slurmd.pid"; then
            show_logs
            die "slurmctld or slurmd exited during start-up (port $CTLD_PORT/$SLURMD_PORT taken?)"
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            show_logs
            die "node $NODE_NAME not idle after ${START_TIMEOUT}s (sinfo state: '${state:-no answer}')"
        fi
        sleep 0.2
    done
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (slurmd needs root; SlurmUser=root)"
    check_binaries
    if pid_alive "$RUN_DIR/slurmctld.pid" && pid_alive "$RUN_DIR/slurmd.pid" && munge_ok; then
        case "$(node_state)" in
            idle*|mixed*|allocated*) echo "already running (state dir $STATE_DIR)"; print_usage_hint; return 0 ;;
        esac
    fi
    write_configs
    start_munged
    if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
        # A cold start numbers jobs from 1 again, so older completion records would collide.
        [ -f "$LOG_DIR/jobcomp.txt" ] && mv -f "$LOG_DIR/jobcomp.txt" "$LOG_DIR/jobcomp.txt.prev"
        # -c: cold start, forget jobs of an earlier run (stale state would confuse tests).
        slurmctld -c || { show_logs; die "slurmctld failed to start"; }
    fi
    if ! pid_alive "$RUN_DIR/slurmd.pid"; then
        slurmd -c || { show_logs; die "slurmd failed to start"; }
    fi
    wait_node_idle
    print_usage_hint
}

stop_pidfiles() {  # stop_pidfiles PIDFILE...: TERM all at once, wait up to 10 s, then KILL
    local f pid i alive pids=()
    for f in "$@"; do
        pid_alive "$f" && pids+=("$(cat "$f")")
    done
    [ "${#pids[@]}" -gt 0 ] || return 0
    # In parallel: each daemon takes 1-2 s to save state and exit, one after the other adds up.
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for i in $(seq 1 100); do
        alive=0
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" -eq 1 ] || return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            echo "slurm_local.sh: pid $pid ignored SIGTERM for 10 s, sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

cmd_stop() {
    local i
    if pid_alive "$RUN_DIR/slurmctld.pid"; then
        # Cancel jobs first so slurmd tears down their steps instead of leaving orphans behind.
        timeout 10 scancel --full --quiet --user=root >/dev/null 2>&1 || true
        for i in $(seq 1 50); do
            [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_pidfiles "$RUN_DIR/slurmd.pid" "$RUN_DIR/slurmctld.pid" "$MUNGE_DIR/munged.pid"
    rm -rf "$STATE_DIR/ctld" "$STATE_DIR/slurmd" "$RUN_DIR" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$STATE_DIR"
        echo "stopped; removed $STATE_DIR"
    else
        echo "stopped; configs and logs kept in $STATE_DIR (stop --purge removes them)"
    fi
}

cmd_status() {
    local rc=0 state=""
    if munge_ok; then echo "munged:    up ($MUNGE_SOCKET)"; else echo "munged:    DOWN"; rc=3; fi
    if pid_alive "$RUN_DIR/slurmctld.pid"; then
        echo "slurmctld: up (pid $(cat "$RUN_DIR/slurmctld.pid"))"
    else
        echo "slurmctld: DOWN"; rc=3
    fi
    if pid_alive "$RUN_DIR/slurmd.pid"; then
        echo "slurmd:    up (pid $(cat "$RUN_DIR/slurmd.pid"))"
    else
        echo "slurmd:    DOWN"; rc=3
    fi
    # Only ask slurmctld when it runs: sinfo retries a dead controller for many seconds.
    [ "$rc" -eq 0 ] && state="$(node_state)"
    echo "node:      $NODE_NAME ${state:-unknown}"
    case "$state" in idle*|mixed*|allocated*) ;; *) rc=3 ;; esac
    if [ "$rc" -eq 0 ]; then
        echo "Use it with: export SLURM_CONF=$CONF"
    fi
    return "$rc"
}

case "$CMD" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
esac
