#!/usr/bin/env bash
# Bring up / tear down a real one-node SLURM cluster on this machine, for the
# sourceflow SLURM integration tests (snakemake --executor slurm).
#
#   tests/slurm/local-cluster.sh start    # install (if needed), configure, start, smoke-test
#   tests/slurm/local-cluster.sh status   # sinfo/squeue; exit 0 iff the node is usable
#   tests/slurm/local-cluster.sh stop     # stop slurmd, slurmctld, munged
#
# Assumes Debian/Ubuntu (apt) and no systemd: daemons are started directly.
# The config must live at /etc/slurm/slurm.conf: the snakemake slurm executor
# plugin drops SLURM_CONF from the job environment. There is no accounting, so
# `sacct` exits 1 ("accounting storage is disabled"): run snakemake with
# `--slurm-status-command squeue` or it never notices that jobs finished.
#
# The node is declared as a cluster node (32 CPUs, 256 GB; SLURM_NODE_CPUS / SLURM_NODE_MEM_MB, at least
# this machine's) with SlurmdParameters=config_overrides, so the jobs of profiles/slurm, with their
# real per-rule requests (64 GB, 16 CPUs), are accepted unchanged. Nothing enforces the requests here
# (no cgroups, memory not consumable): they only have to fit, and the machine is shared as usual.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# managed-by: sourceflow tests/slurm/local-cluster.sh"
PARTITION=debug
HOST=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)
TIMEOUT=${SLURM_START_TIMEOUT:-60}
NODE_CPUS=${SLURM_NODE_CPUS:-32}
NODE_MEM_MB=${SLURM_NODE_MEM_MB:-262144}

log() { echo "[local-cluster] $*"; }
die() { echo "[local-cluster] ERROR: $*" >&2; exit 1; }

as_root() {
  [[ $EUID -eq 0 ]] && return 0
  command -v sudo >/dev/null || die "must run as root (sudo not available)"
  log "re-running with sudo"
  exec sudo -E bash "$0" "$@"
}

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1 || true; }

is_up() {
  pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null || return 1
  case "$(node_state)" in idle* | mixed* | allocated* | completing*) return 0 ;; *) return 1 ;; esac
}

install_packages() {
  local c missing=0
  for c in sbatch slurmctld slurmd munged pgrep; do command -v "$c" >/dev/null || missing=1; done
  ((missing)) || return 0
  log "installing slurm + munge with apt"
  export DEBIAN_FRONTEND=noninteractive
  local pkgs=(slurm-wlm slurmctld slurmd slurm-client munge procps)
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 || {
    log "apt-get install failed; running apt-get update and retrying"
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
  } || die "apt-get install ${pkgs[*]} failed"
}

setup_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
}

write_conf() {
  if [[ -f $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
    local bak
    bak="$CONF.bak.$(date +%s)"
    log "backing up foreign $CONF to $bak"
    cp -p "$CONF" "$bak"
  fi
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  ((cpus >= NODE_CPUS)) || cpus=$NODE_CPUS
  ((mem_mb >= NODE_MEM_MB)) || mem_mb=$NODE_MEM_MB
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
  # 127.0.0.1 as address: the hostname may not resolve (or resolve elsewhere) in CI.
  local tmp
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARKER
ClusterName=sourceflow
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; return 0; fi
  install -m 0644 "$tmp" "$CONF" && rm -f "$tmp"
  log "wrote $CONF"
  if pgrep -x slurmctld >/dev/null; then
    log "config changed under running daemons: scontrol reconfigure"
    # a new node size needs a restart ("require restart of the slurmctld daemon"): start() does it
    scontrol reconfigure || stop_for_restart
  fi
}

# Whether the running node already has the sizes the config declares (a reconfigure does not resize it).
node_sized() {
  local want_cpus want_mem
  want_cpus=$(sed -n 's/^NodeName=.* CPUs=\([0-9]*\) .*/\1/p' "$CONF")
  want_mem=$(sed -n 's/^NodeName=.* RealMemory=\([0-9]*\) .*/\1/p' "$CONF")
  scontrol show node "$HOST" 2>/dev/null | grep -q "CPUTot=$want_cpus " &&
    scontrol show node "$HOST" 2>/dev/null | grep -q "RealMemory=$want_mem "
}

# Stop slurmd and slurmctld by their pid files, for start() to start them with the new config (running
# jobs survive a restart: their slurmstepd stay).
stop_for_restart() {
  local d pid
  for d in slurmd slurmctld; do
    pid=$(cat "/run/slurm/$d.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
      log "stopping $d (pid $pid) to restart it with the new node size"
      kill "$pid"
      for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
  done
}

start() {
  if is_up && grep -qxF "SlurmdParameters=config_overrides" "$CONF" 2>/dev/null && node_sized; then
    log "already up (node $HOST: $(node_state))"
    exit 0
  fi
  as_root start
  install_packages
  setup_munge
  write_conf
  if is_up && ! node_sized; then stop_for_restart; fi
  pgrep -x munged >/dev/null || { log "starting munged"; runuser -u munge -- /usr/sbin/munged; }
  munge -n </dev/null | unmunge >/dev/null || die "munge self-test failed"
  pgrep -x slurmctld >/dev/null || { log "starting slurmctld"; slurmctld; }
  pgrep -x slurmd >/dev/null || { log "starting slurmd"; slurmd; }
  log "waiting up to ${TIMEOUT}s for node $HOST to become idle"
  local state="" deadline=$((SECONDS + TIMEOUT))
  while ((SECONDS < deadline)); do
    state=$(node_state)
    case "$state" in
      idle* | mixed* | allocated*) break ;;
      down* | drain* | fail*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  is_up || die "node $HOST not ready after ${TIMEOUT}s (state '${state}'); see /var/log/slurm/*.log"
  log "smoke test: sbatch --wait"
  local out
  out=$(mktemp /tmp/local-cluster-smoke.XXXXXX)
  timeout 120 sbatch -Q --wait -p "$PARTITION" -t 1 -o "$out" --wrap 'echo ok' >/dev/null ||
    die "smoke-test job failed; see /var/log/slurm/*.log"
  grep -qx ok "$out" || die "smoke-test job produced no output"
  rm -f "$out"
  log "cluster up: node $HOST (declared $(scontrol show node "$HOST" | grep -o 'CPUTot=[0-9]*'), $(nproc) real CPUs), partition $PARTITION"
}

any_running() { # pgrep -x cannot take 'a|b' here: names > 15 chars never match
  local d
  for d in slurmd slurmctld munged; do pgrep -x "$d" >/dev/null && return 0; done
  return 1
}

stop() {
  as_root stop
  local d
  for d in slurmd slurmctld munged; do
    if pgrep -x "$d" >/dev/null; then log "stopping $d"; pkill -x "$d" || true; fi
  done
  for _ in $(seq 30); do any_running || break; sleep 0.5; done
  ! any_running || die "daemons still running after 15s"
  log "stopped"
}

status() {
  sinfo 2>&1 || true
  squeue 2>&1 || true
  if is_up; then log "up (node $HOST: $(node_state))"; else log "DOWN"; exit 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
