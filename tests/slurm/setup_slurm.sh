#!/usr/bin/env bash
# Install and start a real single-node SLURM (controller + compute node + accounting) on
# 127.0.0.1 from Debian 12 packages, for tests/test_slurm.py. Needs root; no systemd needed.
#
#   tests/slurm/setup_slurm.sh          install (if needed) and start; idempotent
#   tests/slurm/setup_slurm.sh status   say whether the cluster answers (exit 0) or not (exit 1)
#   tests/slurm/setup_slurm.sh stop     stop the SLURM daemons this script starts
#
# Environment: HISTOFLOW_SLURM_STATE (default /var/spool/histoflow-slurm) holds spool and pid
# files, HISTOFLOW_SLURM_LOGS (default /var/log/histoflow-slurm) the daemons' logs,
# HISTOFLOW_SLURM_MEM_MARGIN_MB (default 2048) is kept back from the node's memory for the OS.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
STATE_DIR="${HISTOFLOW_SLURM_STATE:-/var/spool/histoflow-slurm}"
LOG_DIR="${HISTOFLOW_SLURM_LOGS:-/var/log/histoflow-slurm}"
MEM_MARGIN_MB="${HISTOFLOW_SLURM_MEM_MARGIN_MB:-2048}"
CONF_DIR=/etc/slurm
ACCOUNT=histoflow
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

say() { echo "setup_slurm: $*"; }
die() { echo "setup_slurm: error: $*" >&2; exit 1; }

# Poll a command until it succeeds (daemons start asynchronously).
wait_for() {
    local what="$1" tries="$2"; shift 2
    for _ in $(seq "$tries"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    die "$what did not come up (see $LOG_DIR/)"
}

running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

cluster_ready() {
    # controller answers, the node accepts jobs, and accounting (sacct) works
    command -v scontrol >/dev/null || return 1
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    sinfo -h -n localhost -o %T 2>/dev/null | grep -Eq "^(idle|mixed|allocated|completing)" || return 1
    sacct -n -X -o JobID --starttime now-1minutes >/dev/null 2>&1 || return 1
}

stop_daemons() {
    for d in "$@"; do
        if running "$STATE_DIR/$d.pid"; then kill "$(cat "$STATE_DIR/$d.pid")" && say "stopped $d"; fi
    done
    for _ in $(seq 30); do
        local alive=0
        for d in "$@"; do running "$STATE_DIR/$d.pid" && alive=1; done
        (( alive )) || return 0
        sleep 1
    done
}

case "${1:-start}" in
    status) if cluster_ready; then say "running"; sinfo; exit 0; else say "not running"; exit 1; fi ;;
    stop) stop_daemons slurmd slurmctld slurmdbd; exit 0 ;;
    start) ;;
    *) die "unknown command '$1' (use: start, status, stop)" ;;
esac

# --- configuration (rendered first: a running cluster with an outdated config is restarted) --
CPUS="$(nproc)"
TOTAL_MB="$(free -m | awk '/^Mem:/ {print $2}')"
REAL_MEMORY=$(( TOTAL_MB - MEM_MARGIN_MB ))
(( REAL_MEMORY >= 1024 )) || die "only ${TOTAL_MB} MB of memory: SLURM needs at least $(( 1024 + MEM_MARGIN_MB )) MB"
DEF_MEM_PER_CPU=$(( REAL_MEMORY / CPUS < 1024 ? REAL_MEMORY / CPUS : 1024 ))
mkdir -p "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR" "$CONF_DIR"
DB_PASS_FILE="$STATE_DIR/db_pass"
[[ -s "$DB_PASS_FILE" ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE")
DB_PASS="$(cat "$DB_PASS_FILE")"
render() {
    sed -e "s#@STATE_DIR@#$STATE_DIR#g" -e "s#@LOG_DIR@#$LOG_DIR#g" -e "s#@CPUS@#$CPUS#g" \
        -e "s#@REAL_MEMORY@#$REAL_MEMORY#g" -e "s#@DEF_MEM_PER_CPU@#$DEF_MEM_PER_CPU#g" \
        -e "s#@DB_PASS@#$DB_PASS#g" "$1"
}
conf_current() {
    cmp -s <(render "$HERE/slurm.conf.in") "$CONF_DIR/slurm.conf" &&
        cmp -s <(render "$HERE/gres.conf.in") "$CONF_DIR/gres.conf"
}

if cluster_ready && conf_current; then
    say "already running"; sinfo; exit 0
fi
[[ $(id -u) -eq 0 ]] || die "run as root (it installs Debian packages and starts system daemons)"
if ! conf_current; then
    # node definitions (CPUs, memory, GRES) are only read when the daemons start
    stop_daemons slurmd slurmctld
fi

# --- packages ---------------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- munge (authentication between SLURM daemons and commands) -------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
    wait_for munged 20 bash -c "munge -n | unmunge"
fi

# --- MariaDB + slurmdbd (accounting: sacct, and the executor plugin's default status query) -
db_ping() { mariadb-admin --protocol=socket ping; }
if ! db_ping >/dev/null 2>&1; then
    say "starting mariadb"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then mariadb-install-db --user=mysql >/dev/null; fi
    (cd / && nohup mysqld_safe --user=mysql --bind-address=127.0.0.1 >"$LOG_DIR/mysqld_safe.log" 2>&1 &)
    wait_for mariadb 60 db_ping
fi
mariadb --protocol=socket <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# --- configuration files -----------------------------------------------------------------
render "$HERE/slurm.conf.in" >"$CONF_DIR/slurm.conf"
render "$HERE/gres.conf.in" >"$CONF_DIR/gres.conf"
chmod 644 "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"
(umask 077; render "$HERE/slurmdbd.conf.in" >"$CONF_DIR/slurmdbd.conf")
chmod 600 "$CONF_DIR/slurmdbd.conf"   # slurmdbd refuses a readable file (it holds the DB password)
say "node localhost: CPUs=$CPUS RealMemory=${REAL_MEMORY} MB DefMemPerCPU=${DEF_MEM_PER_CPU} MB Gres=gpu:1 (counted only)"

# --- daemons ------------------------------------------------------------------------------
if ! running "$STATE_DIR/slurmdbd.pid"; then
    say "starting slurmdbd"
    slurmdbd
fi
wait_for slurmdbd 60 sacctmgr -n show cluster
# Register cluster, account and user before slurmctld starts, so jobs are accounted from the first.
sacctmgr -i add cluster histoflow >/dev/null 2>&1 || true
sacctmgr -i add account "$ACCOUNT" description="histoflow CI" organization=histoflow >/dev/null 2>&1 || true
sacctmgr -i add user root account="$ACCOUNT" defaultaccount="$ACCOUNT" >/dev/null 2>&1 || true
if ! running "$STATE_DIR/slurmctld.pid"; then
    say "starting slurmctld"
    slurmctld
fi
wait_for slurmctld 60 bash -c "scontrol ping | grep -q 'is UP'"
if ! running "$STATE_DIR/slurmd.pid"; then
    say "starting slurmd"
    slurmd -N localhost
fi
wait_for "node localhost" 60 bash -c "sinfo -h -n localhost -o %T | grep -Evq '^(unknown|down|not_responding)'"
if sinfo -h -n localhost -o %T | grep -Eq "drain|down"; then
    scontrol update nodename=localhost state=resume || true
fi
wait_for "the whole cluster" 60 cluster_ready

# Smoke test: a job runs and is accounted.
job=$(sbatch --parsable -A "$ACCOUNT" -t 1 --mem 100 -o /dev/null --wrap true)
wait_for "job $job" 60 bash -c "sacct -n -X -j $job -o State | grep -q COMPLETED"
say "ready (smoke job $job completed)"
sinfo
