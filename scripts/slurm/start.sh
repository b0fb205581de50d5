#!/usr/bin/env bash
# Start a single-node SLURM cluster (munged, MariaDB, slurmdbd, slurmctld,
# slurmd) on this machine, for the `slurm` tests of dfkd-bench.
#
#   sudo scripts/slurm/start.sh          # idempotent; fast when already up
#   DFKD_SLURM_STATE=/some/dir scripts/slurm/start.sh
#
# All state (configs, logs, pid files, spool dirs, the MariaDB datadir) lives
# under $DFKD_SLURM_STATE (default /tmp/dfkd-slurm); slurm.conf and
# slurmdbd.conf are written to /etc/slurm/ where the daemons and the client
# commands read them.  scripts/slurm/stop.sh stops exactly what this started.
# Made for a sandbox without systemd and without cgroups (see README.md).
set -euo pipefail

STATE="${DFKD_SLURM_STATE:-/tmp/dfkd-slurm}"
CLUSTER="${DFKD_SLURM_CLUSTER:-dfkd}"
ETC=/etc/slurm
PIDS="$STATE/pids"
LOGS="$STATE/log"
MYSQL_DIR="$STATE/mysql"
MYSQL_SOCK="$MYSQL_DIR/mysqld.sock"
MARKER="# managed by dfkd-bench scripts/slurm/start.sh"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
T0=$SECONDS

die() { echo "start.sh: $*" >&2; exit 1; }
log() { echo "start.sh: $*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "start.sh: must run as root (it installs packages and starts system daemons)" >&2
    exit 2
fi

# ---------------------------------------------------------------- packages
missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    log "installing ${missing[*]} ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$STATE" "$PIDS" "$LOGS"
chmod 755 "$STATE" "$PIDS"

# One start.sh at a time.
exec 9>"$STATE/start.lock"
flock -w 120 9 || die "another start.sh holds $STATE/start.lock"

# ---------------------------------------------------------------- helpers
# pid_alive NAME COMM: the pid recorded in $PIDS/NAME.pid is running COMM.
pid_alive() {
    local f="$PIDS/$1.pid" pid comm
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$2" ]] || return 1
    # a zombie (exited, not yet reaped) is not alive
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

# wait_for SECONDS NAME LOGFILE COMMAND...: poll COMMAND every 0.5 s; on
# timeout show the tails of LOGFILE and of the daemon's stdout/stderr.
wait_for() {
    local secs=$1 what=$2 logfile=$3
    shift 3
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "start.sh: timed out after ${secs}s waiting for $what" >&2
            for f in "$logfile" "$LOGS/$what.out"; do
                if [[ -s $f ]]; then
                    echo "---- tail of $f" >&2
                    tail -n 30 "$f" >&2
                fi
            done
            exit 1
        fi
        sleep 0.5
    done
}

# launch NAME COMM LOGFILE ENV... -- COMMAND...: run a daemon in the foreground,
# in its own session, in the background; record its pid; fail if it dies at once.
launch() {
    local name=$1 comm=$2 logfile=$3
    shift 3
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    # fd 9 (the start.lock) must not leak into the daemon.
    env "${envs[@]}" setsid "$@" </dev/null >>"$LOGS/$name.out" 2>&1 9>&- &
    local pid=$!
    echo "$pid" >"$PIDS/$name.pid"
    # `setsid` execs (we are not a process-group leader), so $! is the daemon.
    local i
    for i in 1 2 3 4 5 6; do
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] && break
        sleep 0.1
    done
    sleep 0.3
    if ! pid_alive "$name" "$comm"; then
        echo "start.sh: $name exited right after start" >&2
        for f in "$logfile" "$LOGS/$name.out"; do
            if [[ -s $f ]]; then echo "---- tail of $f" >&2; tail -n 30 "$f" >&2; fi
        done
        exit 1
    fi
    log "started $name (pid $pid)"
}

stop_one() {  # stop_one NAME COMM
    local f="$PIDS/$1.pid" pid i
    if pid_alive "$1" "$2"; then
        pid=$(<"$f")
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [[ -d /proc/$pid ]] || break
            sleep 0.2
        done
        if pid_alive "$1" "$2"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$f"
}

node_state() { sinfo -h -o %T 2>/dev/null | head -n 1; }
node_ok() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
munge_ok() { munge -n </dev/null | unmunge >/dev/null; }
mysql_ok() { mariadb-admin --no-defaults -S "$MYSQL_SOCK" -u root ping; }
dbd_ok() { sacctmgr -n -P list cluster format=cluster; }

# ---------------------------------------------------------------- configs
HOST=$(hostname -s)
# e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
HW=$(slurmd -C | head -n 1)
field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$HW"; }
CPUS=$(field CPUs)
SOCKETS=$(field SocketsPerBoard)
CORES=$(field CoresPerSocket)
THREADS=$(field ThreadsPerCore)
MEM=$(field RealMemory)
[[ -n $CPUS && -n $SOCKETS && -n $CORES && -n $THREADS && -n $MEM ]] \
    || die "cannot parse \`slurmd -C\`: $HW"
MEM=$((MEM * 80 / 100))  # below what slurmd measures, or the node drains

PASSFILE="$STATE/slurmdbd.pass"
if [[ ! -s $PASSFILE ]]; then
    (umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$PASSFILE")
fi
DBPASS=$(<"$PASSFILE")

SLURM_CONF=$(cat <<EOF
$MARKER
# state dir: $STATE
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
# no cgroups in the sandbox
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# accounting (sacct) through slurmdbd + MariaDB
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
# scheduling: several jobs per node, memory tracked
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
# fast cancel / requeue / recovery
KillWait=5
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=10
MessageTimeout=10
InactiveLimit=0
MinJobAge=120
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

SLURMDBD_CONF=$(cat <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=$LOGS/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
# MariaDB listens on its unix socket only: "localhost" means the socket, whose
# path slurmdbd gets from MYSQL_UNIX_PORT (StorageParameters has no socket key).
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
)

# write_conf PATH CONTENT MODE OWNER: sets changed=1 if the file changed.
changed=0
write_conf() {
    local path=$1 content=$2 mode=$3 owner=$4
    if [[ -f $path ]] && [[ $(<"$path") == "$content" ]]; then
        chmod "$mode" "$path"; chown "$owner" "$path"
        return 0
    fi
    if [[ -f $path ]] && ! grep -qF "$MARKER" "$path"; then
        cp -p "$path" "$path.dfkd-bak"
        log "saved the previous $path as $path.dfkd-bak"
    fi
    (umask 077; printf '%s\n' "$content" >"$path.tmp")
    chmod "$mode" "$path.tmp"; chown "$owner" "$path.tmp"
    mv -f "$path.tmp" "$path"
    changed=1
}

mkdir -p "$ETC"
write_conf "$ETC/slurm.conf" "$SLURM_CONF" 644 root:root
write_conf "$ETC/slurmdbd.conf" "$SLURMDBD_CONF" 600 slurm:slurm

summary() {
    local state
    state=$(node_state)
    echo "SLURM up: cluster=$CLUSTER node=$HOST ($CPUS CPUs, ${MEM} MB) state=$state," \
        "partition=debug, accounting=slurmdbd+mariadb, state dir=$STATE ($((SECONDS - T0))s)"
}

# ---------------------------------------------------------------- fast path
all_alive() {
    pid_alive munged munged && pid_alive mariadb mariadbd && pid_alive slurmdbd slurmdbd \
        && pid_alive slurmctld slurmctld && pid_alive slurmd slurmd
}
if ((changed == 0)) && all_alive && ctld_up && node_ok && sacct -n >/dev/null 2>&1; then
    summary
    exit 0
fi
if ((changed)); then
    # New configuration: restart the slurm daemons (munged and MariaDB stay).
    for d in slurmd slurmctld slurmdbd; do
        if pid_alive "$d" "$d"; then log "config changed: restarting $d"; fi
        stop_one "$d" "$d"
    done
fi

# ---------------------------------------------------------------- munge
if ! pid_alive munged munged; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
        log "created /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge "$STATE/munge"
    chown munge:munge /run/munge "$STATE/munge"
    chmod 755 /run/munge
    chmod 700 "$STATE/munge"
    if munge_ok 2>/dev/null; then
        die "a munged not started by this script already serves /run/munge; stop it first"
    fi
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    launch munged munged "$STATE/munge/munged.log" -- setpriv --reuid=munge --regid=munge --init-groups \
        munged -F --key-file=/etc/munge/munge.key --log-file="$STATE/munge/munged.log" \
        --pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munged.seed"
fi
wait_for 20 munged "$STATE/munge/munged.log" munge_ok

# ---------------------------------------------------------------- MariaDB
if ! pid_alive mariadb mariadbd; then
    mkdir -p "$MYSQL_DIR"
    chown mysql:mysql "$MYSQL_DIR"
    chmod 755 "$MYSQL_DIR"  # slurmdbd (user slurm) must reach the socket
    if [[ ! -d $MYSQL_DIR/data/mysql ]]; then
        log "initialising MariaDB datadir $MYSQL_DIR/data ..."
        rm -rf "$MYSQL_DIR/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$MYSQL_DIR/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOGS/mariadb-install-db.out" 2>&1 \
            || { tail -n 30 "$LOGS/mariadb-install-db.out" >&2; die "mariadb-install-db failed"; }
    fi
    rm -f "$MYSQL_SOCK"
    launch mariadb mariadbd "$MYSQL_DIR/mariadb.log" -- mariadbd --no-defaults --user=mysql \
        --datadir="$MYSQL_DIR/data" --socket="$MYSQL_SOCK" --skip-networking \
        --pid-file="$MYSQL_DIR/mariadb.pid" --log-error="$MYSQL_DIR/mariadb.log" \
        --innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --max-connections=50
fi
wait_for 60 mariadb "$MYSQL_DIR/mariadb.log" mysql_ok
mariadb --no-defaults -S "$MYSQL_SOCK" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

# ---------------------------------------------------------------- slurm dirs
mkdir -p "$STATE/slurmctld" "$STATE/slurmd" "$STATE/run"
chown slurm:slurm "$STATE/slurmctld" "$STATE/run" "$LOGS"
chmod 755 "$STATE/slurmctld" "$STATE/slurmd" "$STATE/run" "$LOGS"

# ---------------------------------------------------------------- slurmdbd
if ! pid_alive slurmdbd slurmdbd; then
    launch slurmdbd slurmdbd "$LOGS/slurmdbd.log" MYSQL_UNIX_PORT="$MYSQL_SOCK" -- slurmdbd -D
fi
wait_for 60 slurmdbd "$LOGS/slurmdbd.log" dbd_ok
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    log "registered cluster $CLUSTER in slurmdbd"
fi

# ---------------------------------------------------------------- slurmctld
if ! pid_alive slurmctld slurmctld; then
    launch slurmctld slurmctld "$LOGS/slurmctld.log" -- slurmctld -D
fi
wait_for 60 slurmctld "$LOGS/slurmctld.log" ctld_up

# ---------------------------------------------------------------- slurmd
if ! pid_alive slurmd slurmd; then
    launch slurmd slurmd "$LOGS/slurmd.log" -- slurmd -D
fi

# A node left DRAIN/DOWN by an earlier run is put back into service.
deadline=$((SECONDS + 60))
resumed=""
until node_ok; do
    st=$(node_state)
    # "down*" / "idle*" = not responding yet: slurmd is still registering.
    if [[ $st =~ drain|down|fail ]] && [[ $st != *'*' && $resumed != "$st" ]]; then
        log "node $HOST is $st: resuming it"
        scontrol update nodename="$HOST" state=resume 2>/dev/null || true
        resumed=$st
    fi
    if ((SECONDS >= deadline)); then
        echo "start.sh: node $HOST still '$st' after 60s:" >&2
        scontrol show node "$HOST" | grep -E 'State|Reason' >&2 || true
        echo "---- tail of $LOGS/slurmd.log" >&2; tail -n 30 "$LOGS/slurmd.log" >&2 || true
        echo "---- tail of $LOGS/slurmctld.log" >&2; tail -n 30 "$LOGS/slurmctld.log" >&2 || true
        exit 1
    fi
    sleep 0.5
done
wait_for 30 slurmdbd "$LOGS/slurmdbd.log" sacct -n
summary
