#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine, for tests and CI.
#
#   eval "$(tests/slurm/start.sh [STATEDIR])"     # default STATEDIR=/tmp/esmshard-slurm
#
# Needs root (it installs Debian packages and runs slurmctld/slurmd as root).
# Everything slurm-related (slurm.conf, gres.conf, logs, spool, state, PIDs)
# lives under STATEDIR; munge uses the system key /etc/munge/munge.key and the
# system socket /run/munge/munge.socket.2 (the one SLURM's auth/munge uses by
# default), and an already running munged is reused.
#
# The node "localhost" (NodeAddr=127.0.0.1) advertises CPUs=8, RealMemory=16000
# and 4 fake GPUs (gres.conf File= entries are symlinks to /dev/null), so jobs
# asking --gpus=N get CUDA_VISIBLE_DEVICES set by SLURM. Partition: debug.
#
# Progress goes to stderr; the only stdout line is `export SLURM_CONF=...`.
# Idempotent: when our daemons already run and the node is up, it only prints
# that line. Bounded: ~60 s for the node to come up, ~30 s for the smoke job.
# Stop with tests/slurm/stop.sh [STATEDIR].
set -euo pipefail

STATE=${1:-/tmp/esmshard-slurm}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd -P)
CONF="$STATE/slurm.conf"
export SLURM_CONF="$CONF"
NODE=localhost
UP_TIMEOUT=${SLURM_START_TIMEOUT:-60}
SMOKE_TIMEOUT=${SLURM_SMOKE_TIMEOUT:-30}

log() { echo "[slurm/start] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

alive() { # alive PIDFILE [NAME]: the recorded process runs, is no zombie (and is NAME)
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
    [ -z "${2:-}" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

node_state() { sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1 || true; }

node_up() { case "$(node_state)" in idle | mix | alloc | comp) return 0 ;; *) return 1 ;; esac; }

show_logs() {
    local f
    for f in "$STATE/munge/munged.log" "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" \
        "$STATE/log/slurmctld.out" "$STATE/log/slurmd.out"; do
        [ -s "$f" ] || continue
        echo "----- tail $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

# --- 1. packages ------------------------------------------------------------
PKGS="slurmctld slurmd slurm-client munge"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
    ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing $PKGS"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -qq --no-install-recommends $PKGS >&2; }
    if ! apt_install; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -qq >&2
        apt_install
    fi
fi

# --- 2. already running? ----------------------------------------------------
if alive "$STATE/slurmctld.pid" slurmctld && alive "$STATE/slurmd.pid" slurmd &&
    [ -f "$CONF" ] && node_up; then
    log "already running (node $NODE: $(node_state))"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

# Some of ours may be left over (one daemon died, node down): stop them first,
# but keep a munged we started (it is shared, and harmless).
for d in slurmd slurmctld; do
    if alive "$STATE/$d.pid" "$d"; then
        pid=$(cat "$STATE/$d.pid")
        log "stopping leftover $d (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do alive "$STATE/$d.pid" || break; sleep 0.2; done
        alive "$STATE/$d.pid" && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$d.pid"
done

START=$SECONDS

# --- 3. munge -----------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key

mkdir -p "$STATE/log" "$STATE/munge"
rm -f "$STATE/log"/* # fresh logs for each cold start (munged's own log is appended to)
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "reusing running munged"
else
    log "starting munged"
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    chown munge:munge "$STATE/munge"
    chmod 700 "$STATE/munge"
    rm -f "$STATE/munge/munged.pid"
    # munged forks only after it is ready, so its exit status means something.
    setpriv --reuid=munge --regid=munge --init-groups \
        munged --force --pid-file="$STATE/munge/munged.pid" \
        --log-file="$STATE/munge/munged.log" </dev/null >"$STATE/log/munged.out" 2>&1 ||
        { cat "$STATE/log/munged.out" >&2; show_logs; die "munged failed to start"; }
    cp "$STATE/munge/munged.pid" "$STATE/munged.pid" # we started it: stop.sh stops it
    munge -n </dev/null | unmunge >/dev/null || die "munge does not work"
fi

# --- 4. configuration -------------------------------------------------------
mkdir -p "$STATE/dev" "$STATE/spool/slurmd" "$STATE/state" "$STATE/run"
for i in 0 1 2 3; do ln -sfn /dev/null "$STATE/dev/nvidia$i"; done

cat >"$CONF" <<EOF
# Generated by tests/slurm/start.sh -- single-node test cluster.
ClusterName=esmshard
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
InactiveLimit=0
KillWait=5
Waittime=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=8 RealMemory=16000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

cat >"$STATE/gres.conf" <<EOF
# Fake GPUs: SLURM wants device files; symlinks to /dev/null are accepted.
AutoDetect=off
Name=gpu File=$STATE/dev/nvidia[0-3]
EOF

# Commands that run without SLURM_CONF look at /etc/slurm/slurm.conf, then at
# /run/slurm/conf/slurm.conf (the configless cache link). The Snakemake SLURM
# jobstep plugin strips all SLURM_* variables (SLURM_CONF too) before calling
# `srun` inside the job, so point that link at our state dir (removed by stop.sh).
if [ -L /run/slurm/conf ] || [ ! -e /run/slurm/conf ]; then
    mkdir -p /run/slurm
    ln -sfn "$STATE" /run/slurm/conf
    echo "$STATE" >"$STATE/run-slurm-conf.link"
else
    rm -f "$STATE/run-slurm-conf.link"
    log "WARNING: /run/slurm/conf exists and is not a link; srun without SLURM_CONF will not find $CONF"
fi
if [ -e /etc/slurm/slurm.conf ]; then
    log "WARNING: /etc/slurm/slurm.conf exists; commands run without SLURM_CONF (srun in Snakemake jobs) will use it"
fi

# --- 5. daemons ---------------------------------------------------------------
# Run in the foreground (-D) under setsid so $! is the daemon's PID; all stdio
# goes to files so `eval "$(start.sh)"` does not wait on the daemons.
log "starting slurmctld"
setsid slurmctld -D -c -f "$CONF" </dev/null >"$STATE/log/slurmctld.out" 2>&1 &
echo $! >"$STATE/slurmctld.pid"

# Wait for the controller to answer before starting slurmd.
until timeout 5 scontrol ping 2>/dev/null | grep -q ' is UP'; do
    alive "$STATE/slurmctld.pid" || { show_logs; die "slurmctld exited"; }
    [ $((SECONDS - START)) -lt "$UP_TIMEOUT" ] || { show_logs; die "slurmctld did not answer within ${UP_TIMEOUT}s"; }
    sleep 0.2
done

log "starting slurmd"
rm -rf "$STATE/spool/slurmd"/*
setsid slurmd -D -N "$NODE" -f "$CONF" </dev/null >"$STATE/log/slurmd.out" 2>&1 &
echo $! >"$STATE/slurmd.pid"

until node_up; do
    alive "$STATE/slurmd.pid" || { show_logs; die "slurmd exited"; }
    alive "$STATE/slurmctld.pid" || { show_logs; die "slurmctld exited"; }
    if [ $((SECONDS - START)) -ge "$UP_TIMEOUT" ]; then
        sinfo -N -l >&2 || true
        show_logs
        die "node $NODE not idle within ${UP_TIMEOUT}s (state: $(node_state))"
    fi
    sleep 0.3
done
log "node $NODE is $(node_state) after $((SECONDS - START))s"

# --- 6. smoke test: a GPU job gets exactly one CUDA_VISIBLE_DEVICES index ----
# It also runs an `srun` step without SLURM_CONF, as the Snakemake jobstep does.
rm -f "$STATE/smoke.out" "$STATE/smoke.srun.out"
jobid=$(sbatch --parsable --gpus=1 --job-name=smoke --chdir="$STATE" \
    --output="$STATE/log/smoke-%j.log" --wrap "
echo \$CUDA_VISIBLE_DEVICES > smoke.out.tmp
env -u SLURM_CONF srun -n1 --gpus=1 sh -c 'echo \$CUDA_VISIBLE_DEVICES' > smoke.srun.out 2>&1
mv smoke.out.tmp smoke.out") || { show_logs; die "sbatch failed"; }
t0=$SECONDS
until [ -s "$STATE/smoke.out" ]; do
    jstate=$(squeue -h -t all -j "$jobid" -o %T 2>/dev/null || true)
    case "$jstate" in
    PENDING | CONFIGURING | RUNNING | COMPLETING | "") ;;
    *)
        sleep 0.5
        [ -s "$STATE/smoke.out" ] && break
        cat "$STATE/log/smoke-$jobid.log" >&2 2>/dev/null || true
        scontrol show job "$jobid" >&2 || true
        show_logs
        die "smoke job $jobid ended in state $jstate without output"
        ;;
    esac
    if [ $((SECONDS - t0)) -ge "$SMOKE_TIMEOUT" ]; then
        squeue -t all >&2 || true
        scontrol show job "$jobid" >&2 || true
        show_logs
        die "smoke job $jobid did not finish within ${SMOKE_TIMEOUT}s"
    fi
    sleep 0.2
done
gpus=$(cat "$STATE/smoke.out")
[[ "$gpus" =~ ^[0-9]+$ ]] || { show_logs; die "smoke job: CUDA_VISIBLE_DEVICES='$gpus', expected one index"; }
step=$(cat "$STATE/smoke.srun.out" 2>/dev/null || true)
if ! [[ "$step" =~ ^[0-9]+$ ]]; then
    log "srun step in smoke job (no SLURM_CONF) printed: $step"
    if [ -f "$STATE/run-slurm-conf.link" ]; then show_logs; die "srun inside a job does not work"; fi
    log "WARNING: srun without SLURM_CONF fails; Snakemake's slurm executor jobs will fail"
fi
log "smoke job $jobid ok (CUDA_VISIBLE_DEVICES=$gpus, srun step: $step); cluster up in $((SECONDS - START))s"

echo "export SLURM_CONF=$CONF"
