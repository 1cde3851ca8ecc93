#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing sweeps through hydra/launcher=slurm.
#
#   bash scripts/local_slurm.sh start    # install (apt, as root), start the daemons, wait until the node is usable
#   bash scripts/local_slurm.sh status   # sinfo; exit 0 only when the node is usable (idle / mix / alloc)
#   bash scripts/local_slurm.sh stop     # stop the daemons (configuration, accounting database and state stay)
# Every command is idempotent: start on a running cluster only checks it (and restarts the Slurm
# daemons if the configuration it would write changed), stop on a stopped one does nothing.
#
# Facts found while writing this (Debian 12 "bookworm": slurm-wlm 22.05.8, munge 0.5.15, MariaDB 10.11,
# in a container without systemd, under gVisor):
# - Packages: slurm-wlm (slurmctld, slurmd, sinfo/sbatch/srun/scontrol/scancel/squeue/sacct), munge,
#   slurmdbd + mariadb-server. The postinsts cannot start services here (no systemd): we start every
#   daemon ourselves, in order munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd.
# - Accounting is not optional for submitit: its job watcher asks `sacct` for job states (never squeue).
#   With AccountingStorageType=accounting_storage/none, sacct answers "Slurm accounting storage is
#   disabled", every job stays UNKNOWN to submitit, and the submitting `python train.py -m` would wait
#   forever for a cancelled job (one that writes no result). accounting_storage/filetxt no longer exists,
#   so we run slurmdbd on a local MariaDB. slurmdbd runs as root (SlurmUser=root) and connects as the
#   MariaDB user root through the unix socket (Debian's root@localhost uses unix_socket authentication:
#   no password anywhere); it creates its database slurm_acct_db itself. The cluster is registered with
#   `sacctmgr -i add cluster local` once. Without AccountingStorageEnforce no user association is needed.
# - munge: the postinst already writes /etc/munge/munge.key (0400, owner munge); if missing we create it
#   with `mungekey --create`. munged runs as user munge and needs /run/munge (munge.socket.2) owned by it.
#   Check: `munge -n | unmunge`.
# - The Debian build reads /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf (no SLURM_CONF needed for
#   the client commands). We write them only when absent or written by this script (marker line); someone
#   else's configuration is never replaced (LOCAL_SLURM_FORCE=1 to do it). slurmdbd.conf must be 0600 and
#   owned by SlurmUser, or slurmdbd refuses to start.
# - No cgroups in a container: ProctrackType=proctrack/linuxproc (process tree from /proc),
#   TaskPlugin=task/none, JobAcctGatherType=jobacct_gather/none. SelectType=select/cons_tres with
#   CR_CPU_Memory: CPUs and memory are consumable, so cpus_per_task/mem_gb of the submitit launcher are
#   honoured and several 1-CPU array tasks run side by side; DefMemPerCPU gives a job that asks for no
#   memory one CPU's share instead of the whole node (which would serialize all jobs).
# - The node is `hostname -s` with `nproc` CPUs and RealMemory = 90% of `free -m` total (slurmd drains a
#   node reporting less memory than configured); SlurmdParameters=config_overrides keeps it usable if the
#   detected layout differs. `slurmd -C` prints what slurmd detects. ReturnToService=2 brings the node
#   back after a restart; start also resumes a node left down/drained.
# - slurmctld and slurmd run as root: state in /var/spool/slurmctld, spool in /var/spool/slurmd, logs in
#   /var/log/slurm/, pid files in /run. Ports: 6817 (slurmctld), 6818 (slurmd), 6819 (slurmdbd), MariaDB on
#   its unix socket /run/mysqld/mysqld.sock only (skip-networking).
# - Requeue (what submitit does on SIGUSR2): JobRequeue=1. `scontrol requeue` sends the job's steps SIGTERM
#   (submitit's job process only logs it) and SIGKILL KillWait seconds later; then the job is PENDING with
#   Reason=BeginTime for AuthInfo cred_expire seconds (Slurm default 120 s; 10 s here,
#   LOCAL_SLURM_CRED_EXPIRE) and starts again at the next scheduling pass (sched_interval/bf_interval
#   5 s here, Slurm defaults 60/30 s), with the same job/array ids and SLURM_RESTART_COUNT=1. Measured here:
#   a submitit job that exits right after its requeue runs again ~14 s later; one that ignores the SIGTERM
#   ~25 s later (KillWait=10 s). Output files survive only with --open-mode=append (submitit sets it).
# - Time limits: sbatch --signal=USR2@<signal_delay_s> arrives up to 60 s earlier than asked (Slurm's
#   event resolution); with hydra.launcher.timeout_min=1 signal_delay_s=20 the signal came ~30 s into
#   each attempt, submitit counted it as a time-out, requeued 3 times (max_num_timeout=3) and then
#   ended the job ("timed-out too many times"); the run was left "interrupted" with its checkpoint.
# - `scancel --signal=USR2 <jobid>` signals the job steps (the srun'd python), not the batch shell:
#   how to simulate a time limit or a preemption by hand. A plain `scancel` sends SIGCONT+SIGTERM, then
#   SIGKILL after KillWait.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
PACKAGES="slurm-wlm slurmdbd munge mariadb-server"
MARKER="# written by lily scripts/local_slurm.sh"
LOGDIR=/var/log/slurm
CLUSTER=local
NODE=$(hostname -s)
WAIT_S=${LOCAL_SLURM_WAIT_S:-60}

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: $*" >&2; exit 1; }

install_packages() {
    local missing="" cmd
    for cmd in slurmctld slurmd sinfo sacct sacctmgr munged slurmdbd mariadbd; do
        command -v "$cmd" >/dev/null || missing="$missing $cmd"
    done
    [ -z "$missing" ] && return 0
    [ "$(id -u)" = 0 ] || die "missing:$missing; as root: apt-get install $PACKAGES"
    command -v apt-get >/dev/null || die "missing:$missing, and there is no apt-get to install $PACKAGES"
    say "missing:$missing; installing $PACKAGES with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null || die "apt-get install $PACKAGES failed"
}

# install_conf FILE MODE: move the candidate $FILE.new into place; return 0 if FILE changed
install_conf() {
    local file=$1 mode=$2
    if [ -f "$file" ] && ! grep -qF "$MARKER" "$file" && [ "${LOCAL_SLURM_FORCE:-0}" != 1 ]; then
        rm -f "$file.new"
        die "$file exists and was not written by this script: refusing to replace it (LOCAL_SLURM_FORCE=1 to do so)"
    fi
    if [ -f "$file" ] && cmp -s "$file.new" "$file"; then rm -f "$file.new"; return 1; fi
    chmod "$mode" "$file.new"
    mv "$file.new" "$file"
    say "wrote $file"
    return 0
}

write_confs() {
    local cpus mem_total mem defmem changed=1
    cpus=$(nproc)
    mem_total=$(free -m | awk '/^Mem:/ {print $2}')
    mem=$(( mem_total * 90 / 100 ))
    defmem=$(( mem / cpus ))
    mkdir -p /etc/slurm
    cat >"$CONF.new" <<EOF
$MARKER (one node: $NODE, $cpus CPUs, ${mem} MB)
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=${LOCAL_SLURM_CRED_EXPIRE:-10}
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$defmem
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$CLUSTER Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DBD_CONF.new" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=/run/slurmdbd.pid
LogFile=$LOGDIR/slurmdbd.log
EOF
    install_conf "$CONF" 644 && changed=0
    install_conf "$DBD_CONF" 600 && changed=0
    return $changed
}

# pid of a running daemon from its pid file, or nothing (status 1)
running() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 1
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...
    local what=$1 n=$2
    shift 2
    for _ in $(seq 1 $((n * 2))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$what did not come up within ${n}s (logs: $LOGDIR/, /var/log/munge/)"
}

start_munge() {
    if [ ! -f /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge && chown munge:munge /etc/munge && chmod 700 /etc/munge
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    munge_ok && return 0
    say "starting munged (user munge)"
    runuser -u munge -- /usr/sbin/munged
    wait_for munged 10 munge_ok
}
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_mariadb() {
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    mariadb -e "select 1" >/dev/null 2>&1 && return 0
    say "starting mariadbd (user mysql, unix socket only)"
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mysqld.pid \
        >>"$LOGDIR/mariadb.log" 2>&1 </dev/null &
    wait_for mariadbd 60 mariadb -e "select 1"
}

start_slurmdbd() {
    if ! running /run/slurmdbd.pid >/dev/null; then
        say "starting slurmdbd"
        /usr/sbin/slurmdbd
    fi
    wait_for slurmdbd 60 sacctmgr -n list cluster
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        say "registering cluster $CLUSTER with slurmdbd"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

node_state() { sinfo -h -n "$NODE" -o "%t" 2>/dev/null | head -1; }

usable() {
    case "$(node_state)" in
        idle|mix|alloc|comp|idle[~+#]|mix[~+#-]|alloc[~+#]) return 0 ;;
        *) return 1 ;;
    esac
}

start() {
    install_packages
    mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
    local changed=1
    write_confs && changed=0
    start_munge
    start_mariadb
    if [ $changed = 0 ] && { running /run/slurmdbd.pid >/dev/null || running /run/slurmctld.pid >/dev/null \
                                 || running /run/slurmd.pid >/dev/null; }; then
        say "configuration changed: restarting the Slurm daemons"
        stop_slurm
    fi
    start_slurmdbd
    if ! running /run/slurmctld.pid >/dev/null; then
        say "starting slurmctld"
        /usr/sbin/slurmctld
    fi
    if ! running /run/slurmd.pid >/dev/null; then
        say "starting slurmd"
        /usr/sbin/slurmd
    fi
    for _ in $(seq 1 "$WAIT_S"); do
        if usable; then status; return 0; fi
        case "$(node_state)" in  # a node left down/drained by an earlier life of the cluster
            down*|drain*|drng*|inval*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    sinfo 2>&1 || true
    tail -n 5 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" 2>/dev/null || true
    die "node $NODE did not become usable within ${WAIT_S}s"
}

stop_one() {
    local name=$1 pidfile=$2 pid
    pid=$(running "$pidfile") || return 0
    say "stopping $name ($pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
}

stop_slurm() {
    stop_one slurmd /run/slurmd.pid
    stop_one slurmctld /run/slurmctld.pid
    stop_one slurmdbd /run/slurmdbd.pid
}

stop() {
    stop_slurm
    stop_one mariadbd /run/mysqld/mysqld.pid
    stop_one munged /run/munge/munged.pid
}

status() {
    command -v sinfo >/dev/null || { say "sinfo not found: Slurm is not installed"; return 1; }
    sinfo 2>&1 || return 1
    usable
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
