#!/usr/bin/env bash
# A real Slurm (Debian's slurm-wlm + munge) on this machine, with emulated nodes n1..nN, for
# testing the sbatch scripts end to end. Everything it writes lives under one state dir, so it
# never touches /etc, /run or /var (the packaged daemons can keep running beside it), and the
# daemons are started and stopped by pid, never by name.
#
#   slurm/local_cluster.sh start     # install-free start; `install` first on a fresh machine
#   slurm/local_cluster.sh status    # exit 0 when every daemon runs and every node is up
#   slurm/local_cluster.sh stop      # cancel jobs, stop daemons by pid
#   slurm/local_cluster.sh env       # prints `export SLURM_CONF=...` for the client commands
#   slurm/local_cluster.sh install   # apt-get install slurm-wlm munge (root, Debian/Ubuntu)
#
# Knobs (environment): DISCO_SLURM_DIR (state dir, default /tmp/disco-slurm),
# DISCO_SLURM_NODES (default 2), DISCO_SLURM_PORT (controller port, default 16817; node k
# listens on PORT+k), DISCO_SLURM_CPUS (CPUs per node, default: this machine's).
set -euo pipefail

STATE="${DISCO_SLURM_DIR:-/tmp/disco-slurm}"
NODES="${DISCO_SLURM_NODES:-2}"
PORT="${DISCO_SLURM_PORT:-16817}"
CONF="$STATE/slurm.conf"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MUNGE_PID="$MUNGE_DIR/munged.pid"
CTLD_PID="$STATE/slurmctld.pid"
export SLURM_CONF="$CONF"

node_names() { seq -f "n%g" 1 "$NODES"; }
node_pid_file() { echo "$STATE/slurmd_$1.pid"; }

log() { echo "local_cluster: $*" >&2; }

pid_alive() { # pid_alive FILE: the pid in FILE names a live process
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

all_pid_files() {
  echo "$MUNGE_PID"
  echo "$CTLD_PID"
  for n in $(node_names); do node_pid_file "$n"; done
}

install_packages() {
  # Debian's packages: slurm-wlm pulls slurmctld, slurmd and the client commands (~10 s).
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || { log "no apt-get: install slurm-wlm and munge yourself"; return 1; }
  [[ $(id -u) == 0 ]] || { log "installing needs root"; return 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_munge_files() {
  # munged refuses keys that others can read and dirs that others can write, and clients must
  # reach its socket: the dir belongs to the munge user (created by the package), mode 0755. The key is the package's if there is
  # one, so that this node could talk to the system munged too; otherwise a fresh random key.
  mkdir -p "$MUNGE_DIR"
  if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
    if [[ -r /etc/munge/munge.key ]]; then
      cp /etc/munge/munge.key "$MUNGE_DIR/munge.key"
    else
      head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key"
    fi
  fi
  chown -R munge:munge "$MUNGE_DIR"
  chmod 0755 "$MUNGE_DIR"
  chmod 0400 "$MUNGE_DIR/munge.key"
}

write_slurm_conf() {
  local host mem cpus
  host="$(hostname -s)"
  cpus="${DISCO_SLURM_CPUS:-$(nproc)}"
  # RealMemory above what slurmd measures would drain the node; split the machine's memory.
  mem=$(($(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') / NODES))
  mkdir -p "$STATE/state" "$STATE/log"
  for n in $(node_names); do mkdir -p "$STATE/spool_$n"; done
  cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh; edits are lost at the next start.
ClusterName=disco-local
# The explicit address keeps the controller reachable even if the hostname does not resolve.
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
# Our own munged socket, and a short credential lifetime: it is also how long a requeued job
# waits before it may start again (default 120 s), which would dominate the preemption test.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=${DISCO_SLURM_CRED_EXPIRE:-5}
MpiDefault=none
# No cgroups in a container: track processes by parent pid and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule every few seconds instead of every minute: tests wait on requeued jobs.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=10
# Trust the node lines below over what slurmd detects, so DISCO_SLURM_CPUS may oversubscribe
# (tests run several 2-task jobs at once on a 2-core machine).
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool_%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$STATE/slurmd_%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd_%n.log
EOF
  local k=0
  for n in $(node_names); do
    k=$((k + 1))
    # Every emulated node is this machine; each slurmd listens on its own port.
    echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + k)) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

nodes_up() { # every node idle, mixed or allocated (not down, drained or unknown)
  local states
  states="$(sinfo -h -N -o '%N %T' 2>/dev/null)" || return 1
  [[ $(grep -cE ' (idle|mixed|allocated|completing)$' <<<"$states") == "$NODES" ]]
}

daemons_alive() {
  local f
  for f in $(all_pid_files); do pid_alive "$f" || return 1; done
}

start() {
  command -v slurmctld >/dev/null || { log "slurmctld not installed (run: $0 install)"; return 1; }
  if daemons_alive && nodes_up; then
    log "already running ($CONF)"
    return 0
  fi
  stop_daemons # leftovers of a half-started cluster
  mkdir -p "$STATE"
  write_munge_files
  write_slurm_conf
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_PID" \
    --key-file="$MUNGE_DIR/munge.key" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed"
  # -c: start with no jobs from an earlier run. Both daemons fork and write their pid files.
  slurmctld -c
  for n in $(node_names); do slurmd -N "$n"; done
  local i
  for i in $(seq 60); do
    if nodes_up; then
      log "up after ${i}s: $NODES nodes, SLURM_CONF=$CONF"
      return 0
    fi
    sleep 1
  done
  log "nodes did not come up; see $STATE/log"
  sinfo -N >&2 || true
  return 1
}

stop_daemons() {
  local f pids=()
  for f in $(all_pid_files); do
    if pid_alive "$f"; then pids+=("$(cat "$f")"); fi
  done
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true
    local i
    for i in $(seq 50); do
      kill -0 "${pids[@]}" 2>/dev/null || break
      sleep 0.2
    done
  fi
  for f in $(all_pid_files); do rm -f "$f"; done
}

stop() {
  # Cancel jobs through Slurm first: their processes are children of slurmstepd, not of the
  # daemons we hold pids for, and Slurm is what knows them.
  if pid_alive "$CTLD_PID"; then
    local jobs i
    jobs="$(squeue -h -o %i 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
      # shellcheck disable=SC2086  # one word per job id
      scancel $jobs 2>/dev/null || true
      for i in $(seq 30); do
        [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
        sleep 0.5
      done
    fi
  fi
  stop_daemons
  log "stopped"
}

status() {
  local f ok=0
  for f in $(all_pid_files); do
    if pid_alive "$f"; then echo "running  $(basename "$f" .pid) pid $(cat "$f")"; else
      echo "stopped  $(basename "$f" .pid)"
      ok=1
    fi
  done
  if ((ok == 0)); then
    sinfo -N || ok=1
    nodes_up || ok=1
  fi
  return $ok
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  install) install_packages ;;
  *)
    echo "usage: $0 start|stop|status|env|install" >&2
    exit 2
    ;;
esac
