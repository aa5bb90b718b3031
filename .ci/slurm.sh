#!/usr/bin/env bash
# A real single-node SLURM on this machine, for CI and for trying the cluster launcher (docs/cluster.md):
#   .ci/slurm.sh start|stop|status|env [DIR]
# munge, MariaDB on 127.0.0.1, slurmdbd (submitit reads job states with sacct, which needs it), slurmctld, slurmd.
# Every config, state, log and PID file lives under DIR (default $SWEEP_SLURM_DIR or /tmp/sweep-slurm); clients
# find the cluster through SLURM_CONF=DIR/slurm.conf (`eval "$(.ci/slurm.sh env)"`). Installs nothing; runs as
# root without systemd (daemons are started by hand and stopped by their PIDs).
set -euo pipefail

CMD="${1:-}"
DIR="$(realpath -m "${2:-${SWEEP_SLURM_DIR:-/tmp/sweep-slurm}}")"
CLUSTER=sweep
# Ports apart from a system SLURM/MariaDB's defaults, so that this cluster never talks to another one.
CTLD_PORT="${SWEEP_SLURM_PORT:-16817}"
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
DB_PORT=$((CTLD_PORT + 3))
PACKAGES="slurm-wlm slurmdbd mariadb-server munge"
export SLURM_CONF="$DIR/slurm.conf"

die() { echo "error: $*" >&2; exit 2; }

check_installed() {
    local missing=()
    for tool in munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sacctmgr sinfo \
                sbatch sacct scancel; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] || die "SLURM's packages are not installed (missing ${missing[*]}): run" \
        "apt-get update && apt-get install -y --no-install-recommends $PACKAGES"
    [ "$(id -u)" -eq 0 ] || die "$0 must run as root (it starts munged as the munge user and slurmd as root)"
}

alive() {  # the PID file's process runs (a zombie does not: PID 1 in a container may never reap the daemons)
    local pid
    pid="$(cat "$1" 2>/dev/null)" && [ -n "$pid" ] || return 1  # the daemon may remove it while we look
    kill -0 "$pid" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
    local limit=$1 what=$2
    local deadline=$((SECONDS + limit))
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "$what did not come up within $limit s (logs in $DIR/log)"
        sleep 0.2
    done
}

node_idle() { [ "$(sinfo -h -N -o %T 2>/dev/null)" = idle ]; }

write_configs() {
    mkdir -p "$DIR"/{log,state,spool,db,munge}
    runuser -u munge -- test -x "$DIR" || die "the munge user cannot reach $DIR (a parent directory is private):" \
        "choose a directory every user can traverse, e.g. /tmp/sweep-slurm"
    chown munge:munge "$DIR/munge"
    chmod 711 "$DIR/munge"  # clients must reach the socket; the key itself stays 600
    [ -s "$DIR/munge/munge.key" ] || runuser -u munge -- mungekey --create --keyfile="$DIR/munge/munge.key"
    local node
    node="$(slurmd -C | head -n1)"  # NodeName=<host> CPUs=... RealMemory=...: what slurmd will report
    local host="${node#NodeName=}"
    host="${host%% *}"
    local auth="socket=$DIR/munge/munge.socket"
    cat >"$DIR/slurm.conf" <<EOF
# Written by .ci/slurm.sh: a single-node cluster for sweep's cluster tests.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=$auth,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups (no systemd here): processes tracked by /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that asks no memory would otherwise take the whole node.
DefMemPerCPU=1024
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# With slurmdbd this names the munge socket for talking to it (else clients try the system's default socket).
AccountingStoragePass=$DIR/munge/munge.socket
MpiDefault=none
# Short scheduler intervals: a requeued or freed task starts again in seconds, not minutes.
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
KillWait=10
MailProg=/bin/true
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=$auth
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=sweep
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/slurmdbd.conf"  # slurmdbd refuses a config others can read (it holds the DB password)
}

sql() { mariadb --no-defaults -S "$DIR/db.sock" -u root -e "$1"; }

start_db() {
    if [ ! -d "$DIR/db/mysql" ]; then
        mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --skip-test-db \
            >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
    fi
    if ! alive "$DIR/mariadbd.pid"; then
        # slurmdbd speaks TCP to the database: listen on 127.0.0.1 only.
        setsid mariadbd --no-defaults --datadir="$DIR/db" --socket="$DIR/db.sock" --port="$DB_PORT" \
            --bind-address=127.0.0.1 --skip-name-resolve --user=root --pid-file="$DIR/mariadbd.pid" \
            --log-error="$DIR/log/mariadbd.log" </dev/null >/dev/null 2>&1 &
        wait_for 30 MariaDB sql "SELECT 1"
        sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'sweep';
             GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    fi
}

start() {
    check_installed
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_idle; then
        echo "SLURM already running: $DIR (SLURM_CONF=$SLURM_CONF)"
        return
    fi
    local t0=$SECONDS
    [ -s "$DIR/slurm.conf" ] && alive "$DIR/slurmctld.pid" || write_configs
    if ! alive "$DIR/munge/munged.pid"; then
        runuser -u munge -- munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
            --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/seed"
    fi
    start_db
    alive "$DIR/slurmdbd.pid" || slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    alive "$DIR/slurmctld.pid" || slurmctld -i
    alive "$DIR/slurmd.pid" || slurmd
    wait_for 60 "the node (idle)" node_idle
    echo "SLURM started in $((SECONDS - t0)) s: $DIR (SLURM_CONF=$SLURM_CONF)"
}

stop_pid() {  # stop_pid NAME PIDFILE: TERM, then KILL after 15 s
    local pidfile=$2
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    local pid t=0
    pid="$(cat "$pidfile" 2>/dev/null)" || return 0
    kill "$pid" 2>/dev/null || true
    while alive "$pidfile" && [ $t -lt 75 ]; do sleep 0.2; t=$((t + 1)); done
    alive "$pidfile" && { echo "$1 ($pid) ignored TERM: killed" >&2; kill -9 "$pid"; }
    rm -f "$pidfile"
}

stop() {
    [ -d "$DIR" ] || { echo "SLURM not running: $DIR does not exist"; return; }
    if alive "$DIR/slurmctld.pid"; then
        scancel --user="$(id -un)" 2>/dev/null || true  # this cluster's jobs only (SLURM_CONF is ours)
    fi
    stop_pid slurmd "$DIR/slurmd.pid"
    stop_pid slurmctld "$DIR/slurmctld.pid"
    stop_pid slurmdbd "$DIR/slurmdbd.pid"
    stop_pid mariadbd "$DIR/mariadbd.pid"
    stop_pid munged "$DIR/munge/munged.pid"
    echo "SLURM stopped: $DIR"
}

status() {
    local down=0
    for d in munge/munged mariadbd slurmdbd slurmctld slurmd; do
        if alive "$DIR/$d.pid"; then echo "${d#munge/} running (pid $(cat "$DIR/$d.pid"))"
        else echo "${d#munge/} not running"; down=1; fi
    done
    [ $down -eq 0 ] && sinfo -N -o "%N %T %C %m" || true
    return $down
}

case "$CMD" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *) die "usage: $0 start|stop|status|env [DIR] (DIR defaults to \$SWEEP_SLURM_DIR or /tmp/sweep-slurm)" ;;
esac
