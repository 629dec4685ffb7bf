#!/usr/bin/env bash
# Stop the test SLURM cluster started by tests/slurm/start.sh [STATEDIR].
#
#   tests/slurm/stop.sh [STATEDIR]      # default STATEDIR=/tmp/esmshard-slurm
#
# Stops exactly what start.sh started, by the PIDs it recorded in STATEDIR:
# slurmd, slurmctld, and munged only if start.sh started it (a munged that was
# already running is left alone). Waits up to ~15 s in all, then SIGKILL.
# Exits 0 when nothing was running. The state dir itself (logs) is kept.
set -uo pipefail

STATE=${1:-/tmp/esmshard-slurm}
log() { echo "[slurm/stop] $*" >&2; }

if [ ! -d "$STATE" ]; then
    log "no state dir $STATE; nothing to stop"
    exit 0
fi

ours() { # ours NAME: print the PID recorded in $STATE/NAME.pid if it still runs NAME
    local pid
    pid=$(cat "$STATE/$1.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]; then
        echo "$pid"
    else
        rm -f "$STATE/$1.pid" # not running any more, or the PID was reused
    fi
}

drop_link() { # remove /run/slurm/conf if start.sh pointed it at this state dir
    if [ -f "$STATE/run-slurm-conf.link" ] && [ -L /run/slurm/conf ] &&
        [ "$(readlink /run/slurm/conf)" = "$(cat "$STATE/run-slurm-conf.link")" ]; then
        rm -f /run/slurm/conf
        rmdir /run/slurm 2>/dev/null || true
    fi
    rm -f "$STATE/run-slurm-conf.link"
}

# Cancel jobs still queued or running (their slurmstepd/payload processes are
# not children of slurmd and would outlive it), bounded to ~10 s.
if [ -n "$(ours slurmctld)" ] && [ -f "$STATE/slurm.conf" ]; then
    export SLURM_CONF="$STATE/slurm.conf"
    jobs=$(timeout 5 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        timeout 5 scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(timeout 5 squeue -h -t PD,R,CG,CF,S -o %A 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

# SIGTERM all of ours at once (each takes ~2 s to exit), wait up to 15 s,
# then SIGKILL what is left.
declare -A pids=()
for name in slurmd slurmctld munged; do
    pid=$(ours "$name")
    [ -n "$pid" ] || continue
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    pids[$name]=$pid
done
[ ${#pids[@]} -gt 0 ] || { drop_link; log "nothing running"; exit 0; }

# A zombie counts as exited (in containers PID 1 may not reap orphans).
is_alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
running() { local n; for n in "${!pids[@]}"; do is_alive "${pids[$n]}" && echo "$n"; done; }
for _ in $(seq 75); do [ -z "$(running)" ] && break; sleep 0.2; done
for name in $(running); do
    log "$name (pid ${pids[$name]}) still running after 15s; sending SIGKILL"
    kill -KILL "${pids[$name]}" 2>/dev/null || true
done
for _ in $(seq 25); do [ -z "$(running)" ] && break; sleep 0.2; done

rc=0
drop_link
for name in "${!pids[@]}"; do
    if is_alive "${pids[$name]}"; then
        log "ERROR: $name (pid ${pids[$name]}) did not exit"
        rc=1
    else
        rm -f "$STATE/$name.pid"
    fi
done
exit $rc
