#!/usr/bin/env bash
# Start a real two-node SLURM cluster on this machine (Debian's slurm-wlm + munge).
#
#   tests/slurm/start_cluster.sh [STATE_DIR]        # default /tmp/shapeflow-slurm
#   eval "$(tests/slurm/start_cluster.sh)"           # also exports SLURM_CONF
#
# Two slurmd daemons ("nodes" n1 and n2) listen on 127.0.0.1 with different ports, one
# slurmctld schedules them, one partition ("debug") covers both. Progress goes to stderr;
# the only line on stdout is `export SLURM_CONF=...`.
#
# Idempotent: installs packages only if missing, creates the munge key only if absent, and
# starts only the daemons that are not already running; a second run with a running
# cluster just waits for the nodes and prints the export line.
#
# Environment (all optional):
#   SHAPEFLOW_SLURM_CPUS      CPUs each node advertises (default 2: a preprocess array task
#                             can ask for --cpus-per-task=2; the nodes share this machine's cores)
#   SHAPEFLOW_SLURM_PORT      slurmctld port; the two slurmd use PORT+1 and PORT+2 (default 16817)
#   SHAPEFLOW_SLURM_TIMEOUT   seconds to wait for both nodes to become idle (default 90)
#
# Exit codes: 0 cluster up; 3 slurm/munge missing and cannot be installed (not root / no
# apt-get); 1 anything else (daemon failed, nodes not idle in time; logs are in STATE_DIR).
set -euo pipefail

STATE_DIR=${1:-${SHAPEFLOW_SLURM_DIR:-/tmp/shapeflow-slurm}}
CPUS=${SHAPEFLOW_SLURM_CPUS:-2}
CTLD_PORT=${SHAPEFLOW_SLURM_PORT:-16817}
TIMEOUT=${SHAPEFLOW_SLURM_TIMEOUT:-90}
NODES=(n1 n2)
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "start_cluster: $*" >&2; }
die() { log "error: $*"; exit "${2:-1}"; }

# True if the pid in file $1 belongs to a live process.
alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "${missing[*]} not installed and not running as root" 3
  command -v apt-get >/dev/null || die "${missing[*]} not installed and no apt-get here" 3
  log "installing ${missing[*]} (apt-get)"
  # The package scripts try to start the services; a policy-rc.d forbidding that keeps
  # them from racing with the daemons we start ourselves below.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die "apt-get update failed" 3
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 || die "apt-get install slurm-wlm munge failed" 3
  [[ $created_policy -eq 1 ]] && rm -f "$policy"
  return 0
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [[ $(id -u) -eq 0 ]] || die "munged is not running and only root can start it" 3
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  log "starting munged"
  runuser -u munge -- munged --force
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged does not answer (see /var/log/munge/munged.log)"
}

# Node names are not real hosts: make them resolve to loopback so jobs can use
# `scontrol show hostnames` output as an address (the launchers also fall back to NodeAddr).
resolve_node_names() {
  local name
  for name in "${NODES[@]}"; do
    getent hosts "$name" >/dev/null && continue
    if [[ -w /etc/hosts ]]; then
      log "adding $name to /etc/hosts as 127.0.0.1"
      echo "127.0.0.1 $name" >>/etc/hosts
    else
      log "warning: $name does not resolve and /etc/hosts is not writable (launchers use NodeAddr)"
    fi
  done
}

write_config() {
  local conf=$STATE_DIR/slurm.conf tmp user
  user=$(id -un)
  mkdir -p "$STATE_DIR/ctld"
  tmp=$(mktemp "$STATE_DIR/slurm.conf.XXXXXX")
  {
    echo "# written by tests/slurm/start_cluster.sh: two slurmd on loopback, one partition"
    echo "ClusterName=shapeflow"
    echo "SlurmctldHost=localhost"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmUser=$user"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CryptoType=crypto/munge"
    # a requeued job may start again only cred_expire seconds after it stopped (default 120 s, the
    # bulk of the preemption test's time); 20 s still covers a step launch on a loaded machine.
    # bf_interval: the backfill pass that starts it comes every 2 s instead of 30 s.
    echo "AuthInfo=cred_expire=20"
    echo "SchedulerParameters=bf_interval=2"
    echo "StateSaveLocation=$STATE_DIR/ctld"
    echo "SlurmctldPidFile=$STATE_DIR/slurmctld.pid"
    echo "SlurmctldLogFile=$STATE_DIR/slurmctld.log"
    echo "SlurmdSpoolDir=$STATE_DIR/spool-%n"
    echo "SlurmdPidFile=$STATE_DIR/slurmd-%n.pid"
    echo "SlurmdLogFile=$STATE_DIR/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    echo "ReturnToService=2"
    # config_overrides: trust CPUs= below even though both nodes share this machine's cores
    echo "SlurmdParameters=config_overrides"
    echo "SlurmdTimeout=60"
    echo "KillWait=10"
    local i=1 name
    for name in "${NODES[@]}"; do
      echo "NodeName=$name NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((CTLD_PORT + i)) CPUs=$CPUS State=UNKNOWN"
      i=$((i + 1))
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } >"$tmp"
  if [[ -f $conf ]] && cmp -s "$tmp" "$conf"; then
    rm -f "$tmp"
  else
    if alive "$STATE_DIR/slurmctld.pid"; then
      log "slurm.conf changed: restarting the cluster"
      "$(dirname "$0")/stop_cluster.sh" "$STATE_DIR" >&2
    fi
    mv "$tmp" "$conf"
  fi
  chmod 0644 "$conf"
}

start_daemons() {
  export SLURM_CONF=$STATE_DIR/slurm.conf
  if ! alive "$STATE_DIR/slurmctld.pid"; then
    log "starting slurmctld (port $CTLD_PORT)"
    # -c: a test cluster starts with no jobs left over from an earlier run
    slurmctld -c -f "$SLURM_CONF" || die "slurmctld failed (see $STATE_DIR/slurmctld.log)"
  fi
  local name
  for name in "${NODES[@]}"; do
    mkdir -p "$STATE_DIR/spool-$name"
    if ! alive "$STATE_DIR/slurmd-$name.pid"; then
      log "starting slurmd $name"
      slurmd -f "$SLURM_CONF" -N "$name" || die "slurmd $name failed (see $STATE_DIR/slurmd-$name.log)"
    fi
  done
}

wait_for_idle_nodes() {
  local deadline=$((SECONDS + TIMEOUT)) states resumed=0
  while ((SECONDS < deadline)); do
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
    if [[ -n $states ]] && ! grep -qvE ' (idle|mix|alloc)$' <<<"$states" \
      && [[ $(wc -l <<<"$states") -eq ${#NODES[@]} ]]; then
      log "nodes ready: $(tr '\n' ' ' <<<"$states")"
      return 0
    fi
    # A node left down/drained by an earlier run does not come back by itself.
    if [[ $resumed -eq 0 ]] && grep -qE ' (down|drain|drng|fail)[*~#]?$' <<<"$states"; then
      scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true
      resumed=1
    fi
    sleep 1
  done
  die "nodes not idle after ${TIMEOUT}s: $(tr '\n' ' ' <<<"${states:-no answer from slurmctld}") (logs in $STATE_DIR)"
}

install_packages
start_munge
resolve_node_names
mkdir -p "$STATE_DIR"
write_config
start_daemons
wait_for_idle_nodes
echo "export SLURM_CONF=$STATE_DIR/slurm.conf"
