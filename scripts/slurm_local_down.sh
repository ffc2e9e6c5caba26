#!/usr/bin/env bash
# slurm_local_down.sh: stop the one-node cluster of slurm_local_up.sh.
#
# Cancels the jobs still there, then stops slurmd, slurmctld and (only if
# slurm_local_up.sh started it) munged, each by the PID in its PID file under
# $SLURM_LOCAL_DIR and only if that PID still runs the daemon of that name;
# never by name. Packages stay installed; logs and state stay in
# $SLURM_LOCAL_DIR (delete the folder yourself, or set SLURM_LOCAL_PURGE=1).
set -uo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/fairchem-dens-slurm}
export SLURM_CONF=$DIR/slurm.conf

say() { echo "[slurm_local_down] $*" >&2; }
alive() { # alive PID: that process exists and is not a zombie
  case "$(ps -o stat= -p "$1" 2>/dev/null)" in "" | Z*) return 1 ;; *) return 0 ;; esac
}
running() { # running NAME PIDFILE: as in slurm_local_up.sh (alive, and it is NAME)
  local pid
  pid=$(cat "$2" 2>/dev/null) && [ -n "$pid" ] && alive "$pid" &&
    [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$1" ]
}
stop() { # stop NAME PIDFILE: SIGTERM that one process, wait up to 10 s, then SIGKILL it
  running "$1" "$2" || return 0
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 0
  say "stopping $1 (pid $pid)"
  kill "$pid" 2>/dev/null
  for _ in $(seq 100); do alive "$pid" || return 0; sleep 0.1; done
  say "$1 (pid $pid) still running after 10 s: SIGKILL"
  kill -9 "$pid" 2>/dev/null
}

if running slurmctld "$DIR/slurmctld.pid"; then
  # every job still queued or running on this cluster, then a moment for them to go
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  [ -n "$jobs" ] && { say "cancelling jobs: $(echo $jobs)"; scancel --quiet $jobs 2>/dev/null; }
  for _ in $(seq 50); do
    [ -z "$(squeue -h -t PENDING,RUNNING,SUSPENDED,COMPLETING -o %i 2>/dev/null)" ] && break
    sleep 0.2
  done
fi
stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
stop munged "$DIR/munge/munged.pid" # absent unless slurm_local_up.sh started it

if [ "${SLURM_LOCAL_PURGE:-0}" = 1 ]; then
  say "removing $DIR"
  rm -rf -- "$DIR"
fi
exit 0
