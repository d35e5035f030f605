#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests/test_slurm.py: Debian's slurmctld, slurmd and munge
# packages (installed when absent: needs root and apt), a minimal slurm.conf (one partition `debug` holding
# this machine's cores), the three daemons started, and a wait until the node is idle.
# A machine whose Slurm already answers (sinfo shows a node) is left as it is.
set -euo pipefail
if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then
    exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd munge
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge /var/spool/slurmctld /var/spool/slurmd
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if [ ! -f /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
fi
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
if [ ! -f /etc/slurm/slurm.conf ]; then
    cat >/etc/slurm/slurm.conf <<EOF
# written by tests/start_slurm.sh: one node, no accounting, no cgroups
ClusterName=local
SlurmctldHost=$(hostname -s)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurmctld.log
SlurmdLogFile=/var/log/slurmd.log
NodeName=$(hostname -s) CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -q idle; then
        exit 0
    fi
    sleep 1
done
echo "start_slurm.sh: the Slurm node is not idle after 60 s; see /var/log/slurmctld.log and /var/log/slurmd.log" >&2
exit 1
