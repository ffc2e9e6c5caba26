#!/usr/bin/env bash
# slurm_local_up.sh: start a real one-node SLURM cluster on this machine, for
# tests/system/test_slurm.py and for trying `fairchem-dens submit` without a cluster.
#
#   scripts/slurm_local_up.sh               # (as root) install if needed, start, wait until idle
#   source "$SLURM_LOCAL_DIR/env.sh"        # SLURM_CONF + the sacct stand-in for this shell
#   scripts/slurm_local_down.sh             # stop what this script started
#
# Needs root and apt (Debian's slurm-wlm and munge are installed only when
# missing). Works without systemd: each daemon is started by hand and keeps a
# PID file. Everything this script writes lives in $SLURM_LOCAL_DIR: the config
# (clients find it through SLURM_CONF, so /etc/slurm is left alone), state,
# logs, PID files, and a `sacct` stand-in in $SLURM_LOCAL_DIR/bin. Running it
# again while the cluster is up changes nothing (the slurm daemons are
# restarted only when the generated config changed).
#
# Knobs (environment):
#   SLURM_LOCAL_DIR        state folder                     [/tmp/fairchem-dens-slurm]
#   SLURM_LOCAL_CPUS       CPUs the node advertises         [8]
#   SLURM_LOCAL_MEM_MB     memory the node advertises (MB)  [131072]
#   SLURM_LOCAL_GPUS       fake GPUs (GRES) it advertises   [0]
#   SLURM_LOCAL_PARTITION  partition name                   [debug]
#   SLURM_LOCAL_TIMEOUT_S  how long to wait for the node    [60]
# Nothing is enforced (no cgroups), so the node may advertise more than the
# hardware has; that way requests like fairchem's default --slurm-mem 80 fit.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/fairchem-dens-slurm}
CPUS=${SLURM_LOCAL_CPUS:-8}
MEM_MB=${SLURM_LOCAL_MEM_MB:-131072}
GPUS=${SLURM_LOCAL_GPUS:-0}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
WAIT_S=${SLURM_LOCAL_TIMEOUT_S:-60}
CONF=$DIR/slurm.conf

say() { echo "[slurm_local_up] $*" >&2; }
die() {  # die MESSAGE [LOG...]: say why, show the end of the logs named, fail
  local msg=$1 f
  shift
  say "ERROR: $msg"
  for f in "$@"; do
    if [ -s "$f" ]; then echo "----- last lines of $f" >&2; tail -n 25 "$f" >&2; fi
  done
  exit 1
}
alive() { # alive PID: that process exists and is not a zombie
  case "$(ps -o stat= -p "$1" 2>/dev/null)" in "" | Z*) return 1 ;; *) return 0 ;; esac
}
# running NAME PIDFILE: the PID in PIDFILE is alive and runs NAME. The name
# check guards against a stale PID file whose number now belongs to another process.
running() {
  local pid
  pid=$(cat "$2" 2>/dev/null) && [ -n "$pid" ] && alive "$pid" &&
    [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$1" ]
}
# stop NAME PIDFILE: SIGTERM that one process and wait (up to 10 s) until it is gone.
stop() {
  running "$1" "$2" || return 0
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 0
  say "stopping $1 (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do alive "$pid" || return 0; sleep 0.1; done
  die "$1 (pid $pid) did not stop within 10 s"
}
# wait_for SECONDS COMMAND...: retry COMMAND every 0.2 s until it succeeds.
wait_for() {
  local end=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.2
  done
}

[ "$(id -u)" = 0 ] || die "must run as root (munged and slurmd are system daemons)"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/bin"

# ---------------------------------------------------------------- 1. packages
# Only what is missing. apt starts no service here (no systemd; the image's
# policy-rc.d refuses), which is what we want: the daemons are started below.
missing=()
command -v slurmctld >/dev/null || missing+=(slurmctld)
command -v slurmd >/dev/null || missing+=(slurmd)
command -v sbatch >/dev/null || missing+=(slurm-client)
command -v munged >/dev/null || missing+=(munge)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install ${missing[*]}"
  say "installing ${missing[*]} (apt-get)"
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  } </dev/null >"$DIR/apt.log" 2>&1 || die "apt-get could not install ${missing[*]}" "$DIR/apt.log"
fi

# ---------------------------------------------------------------- 2. config
# Written to *.new first; the live files are replaced only when they differ.
gres_types="" node_gres=""
if [ "$GPUS" -gt 0 ]; then
  # Fake GPUs: slurm wants one character device per GPU in gres.conf (regular
  # files are rejected), so each is a clone of /dev/null; the nvidiaN names make
  # slurm number them and set CUDA_VISIBLE_DEVICES for jobs that ask for GPUs.
  gres_types="GresTypes=gpu" node_gres="Gres=gpu:$GPUS"
  mkdir -p "$DIR/fakegpu"
  : >"$DIR/gres.conf.new"
  for ((i = 0; i < GPUS; i++)); do
    [ -c "$DIR/fakegpu/nvidia$i" ] || mknod "$DIR/fakegpu/nvidia$i" c 1 3
    echo "NodeName=localhost Name=gpu File=$DIR/fakegpu/nvidia$i" >>"$DIR/gres.conf.new"
  done
fi
cat >"$CONF.new" <<EOF
# one-node cluster of fairchem-dens scripts/slurm_local_up.sh
ClusterName=fairchemdens
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# no mail, no MPI, no cgroups, no accounting database (see bin/sacct)
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
# CR_Core (not CR_Core_Memory): jobs share the node instead of each taking all memory
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
# impossible requests fail at sbatch instead of pending forever
EnforcePartLimits=ALL
ReturnToService=2
# advertise the CPUs/memory below even if the hardware has fewer
SlurmdParameters=config_overrides
KillWait=5
# finished jobs stay visible to squeue for an hour (the sacct stand-in reads them)
MinJobAge=3600
$gres_types
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB $node_gres State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
for f in slurm.conf gres.conf; do
  if [ -e "$DIR/$f.new" ]; then
    if cmp -s "$DIR/$f.new" "$DIR/$f"; then rm "$DIR/$f.new"; else mv "$DIR/$f.new" "$DIR/$f" && changed=1; fi
  elif [ -e "$DIR/$f" ]; then
    rm "$DIR/$f" && changed=1 # gres.conf of an earlier run with fake GPUs
  fi
done
export SLURM_CONF=$CONF

# For shells: `source $DIR/env.sh` points the slurm clients at this cluster.
cat >"$DIR/env.sh" <<EOF
export SLURM_CONF=$CONF
export PATH=$DIR/bin:\$PATH
EOF

# sacct stand-in. Without an accounting database the real sacct only says
# "accounting storage is disabled"; submitit polls job states with
#   sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]
# and, getting nothing, never sees a job that died without writing its result
# (scancel, node failure) as finished. This answers that call from squeue
# (which keeps finished jobs for MinJobAge).
cat >"$DIR/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in of scripts/slurm_local_up.sh: `-o/--format` and `-j/--jobs`, from squeue
fields=JobID,State,NodeList ids=()
while [ $# -gt 0 ]; do
  case "$1" in
    -j | --jobs) ids+=("$2"); shift ;;
    --jobs=*) ids+=("${1#--jobs=}") ;;
    -j*) ids+=("${1#-j}") ;;
    -o | --format) fields=$2; shift ;;
    --format=*) fields=${1#--format=} ;;
  esac
  shift
done
fmt="" state_col=0 n=0
IFS=, read -ra names <<<"$fields"
for name in "${names[@]}"; do
  n=$((n + 1))
  case "${name,,}" in
    jobid) code=%i ;; state) code=%T state_col=$n ;; nodelist) code=%N ;;
    jobname) code=%j ;; partition) code=%P ;; *) code="" ;; # other fields: empty
  esac
  fmt+="${fmt:+|}$code"
done
(IFS='|'; echo "${names[*]}")
for id in "${ids[@]}"; do
  for one in ${id//,/ }; do squeue -h -t all -j "$one" -o "$fmt" 2>/dev/null || true; done
done |
  # squeue shows transient states sacct never reports; submitit would take them
  # for "finished" (SIGNALING shows up during a requeue), so map them like sacct.
  awk -F'|' -v OFS='|' -v c="$state_col" '
    c > 0 && $c ~ /^(SIGNALING|CONFIGURING|STAGE_OUT|RESIZING|POWER_UP_NODE|UPDATE_DB)$/ { $c = "RUNNING" }
    c > 0 && $c ~ /^REQUEUE_(HOLD|FED)$/ { $c = "REQUEUED" }
    { print }'
EOF
chmod 755 "$DIR/bin/sacct"

# ---------------------------------------------------------------- 3. munged
# Reuse a munged that already answers (the system's, or ours from an earlier
# run); otherwise start one as the munge user on the default socket, with its
# PID file, log and seed in $DIR/munge. Only that one is ours to stop later.
if ! { munge -n | unmunge; } >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge "$DIR/munge"
  chown munge:munge /run/munge "$DIR/munge"
  chmod 755 /run/munge
  chmod 700 "$DIR/munge"
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" ||
    die "munged did not start" "$DIR/munge/munged.log"
  wait_for 10 bash -c 'munge -n | unmunge' || die "munged does not answer" "$DIR/munge/munged.log"
fi

# ---------------------------------------------------------------- 4. slurm daemons
if [ "$changed" = 1 ]; then # new config: restart whatever of ours runs
  stop slurmd "$DIR/slurmd.pid"
  stop slurmctld "$DIR/slurmctld.pid"
fi
cd "$DIR" # the daemons' working directory (core files, if any, land here)
if ! running slurmctld "$DIR/slurmctld.pid"; then
  say "starting slurmctld"
  # -c: start with no jobs left over from an earlier run; it daemonizes itself
  slurmctld -c || die "slurmctld did not start" "$DIR/slurmctld.log"
fi
if ! running slurmd "$DIR/slurmd.pid"; then
  say "starting slurmd"
  # -N: the node is "localhost" in the config, whatever this machine's hostname
  slurmd -N localhost || die "slurmd did not start" "$DIR/slurmd.log"
fi

# ---------------------------------------------------------------- 5. wait until idle
node_ready() {
  local state
  state=$(sinfo -h -n localhost -o %T 2>/dev/null) || return 1
  case "$state" in
    idle | mixed | allocated | completing) return 0 ;;
    down* | drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 ;;
  esac
  return 1
}
wait_for "$WAIT_S" node_ready ||
  die "node not ready after ${WAIT_S}s (sinfo: $(sinfo -h -n localhost -o '%T %E' 2>&1))" \
    "$DIR/slurmctld.log" "$DIR/slurmd.log"
say "up: partition $PARTITION, node localhost ($CPUS CPUs, $MEM_MB MB, $GPUS GPUs); use: source $DIR/env.sh"
