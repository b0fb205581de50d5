#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by scripts/slurm/start.sh.
#
# Only the daemons recorded in $DFKD_SLURM_STATE/pids (default
# /tmp/dfkd-slurm/pids) are signalled, and only while the recorded pid still
# runs the expected program: SIGTERM, then SIGKILL after a few seconds.
# Idempotent: nothing running is not an error.  State (job records, the
# accounting database) is kept, so start.sh brings back the same cluster.
set -euo pipefail

STATE="${DFKD_SLURM_STATE:-/tmp/dfkd-slurm}"
PIDS="$STATE/pids"
GRACE="${DFKD_SLURM_STOP_GRACE:-10}"  # seconds between SIGTERM and SIGKILL

if [[ $(id -u) -ne 0 ]]; then
    echo "stop.sh: must run as root (the daemons run as root/slurm/munge/mysql)" >&2
    exit 2
fi

# pid NAME COMM: print the recorded pid if it is alive and runs COMM.
running_pid() {
    local f="$PIDS/$1.pid" pid comm
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$2" ]] || return 1
    # a zombie (exited, not yet reaped by its parent) counts as stopped
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    echo "$pid"
}

stopped=()
# Order matters: compute daemons first, the database last, munge after all.
for entry in slurmd:slurmd slurmctld:slurmctld slurmdbd:slurmdbd mariadb:mariadbd munged:munged; do
    name=${entry%%:*}
    comm=${entry#*:}
    if pid=$(running_pid "$name" "$comm"); then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + GRACE))
        while running_pid "$name" "$comm" >/dev/null && ((SECONDS < deadline)); do
            sleep 0.2
        done
        if running_pid "$name" "$comm" >/dev/null; then
            echo "stop.sh: $name (pid $pid) ignored SIGTERM for ${GRACE}s: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            for _ in {1..50}; do
                running_pid "$name" "$comm" >/dev/null || break
                sleep 0.1
            done
        fi
        stopped+=("$name($pid)")
    fi
    rm -f "$PIDS/$name.pid"
done

if ((${#stopped[@]})); then
    echo "stop.sh: stopped ${stopped[*]}"
else
    echo "stop.sh: nothing was running (state dir $STATE)"
fi
