#!/usr/bin/env bash
# stack-postgres.sh - the PostgreSQL of the local stack: a primary and, with STACK_PG_STANDBY=1, a
# synchronous streaming standby (sourced by scripts/stack.sh, which defines the variables and
# helpers used here: VAR, RUN, LOGDIR, PG_*, say, die, launch...).
#
# Functions scripts/stack.sh calls: pg_preflight, pg_up, pg_down, pg_status, pg_purge, pg_dsn,
# pg_promote.
#
# By default one node: the cluster initdb makes in var/pg/data (or under /tmp, see
# pg_datadir_prepare) on STACK_PG_PORT; var/run/postgres.pid|port, var/log/postgres.log.
#
# STACK_PG_STANDBY=1 adds a second node, a streaming standby that pg_basebackup -R copies from the
# primary into var/pg/standby (beside the first node's data dir), on STACK_PG_STANDBY_PORT
# (default STACK_PG_PORT+1), loopback only; var/run/postgres-standby.pid|port,
# var/log/postgres-standby.log. A node keeps its directory, port and files whatever its role. The
# standby connects as application_name "standby"; the primary names it in
# synchronous_standby_names, with synchronous_commit = on, so a COMMIT returns only once the
# standby has the transaction on disk too: a promotion loses no commit a client was told of. The
# standby's own settings name no synchronous standby, so once promoted it commits alone instead of
# waiting for a standby it does not have. PG_DSN then names both nodes,
#   host=127.0.0.1,127.0.0.1 port=P1,P2 ... target_session_attrs=read-write
# so every client (libpq) finds the node that takes writes, whichever it is now. The mode sticks:
# a stack that has a standby keeps it on every `up`; STACK_PG_STANDBY=0 is refused then (`down
# --purge` starts afresh).
#
# Failover, `scripts/stack.sh pg-promote`: the primary is stopped first if it still runs (never
# two primaries), the new primary is recorded in var/pg/primary (beside the data dirs), and the
# standby is promoted (pg_ctl promote; done once it takes a write). The old primary stays down:
# its data may end in a tail the standby never got (commits that were waiting for the standby's
# acknowledgement when it died: no client was told of them), so it must never run as a primary
# again. The next `scripts/stack.sh up` deletes its data dir and rebuilds it as a standby of the
# new primary (a fresh pg_basebackup), which then names it its synchronous standby; until then
# the new primary commits without a standby. `down postgres` stops both nodes, `down --purge`
# deletes both.

# --- PostgreSQL ----------------------------------------------------------------------------------

# Present while the primary's commits wait for its standby (written when pg_standby_up saw it
# synchronous, removed when a primary starts or a standby is promoted).
PG_SYNC_FILE=$RUN/postgres.sync
# The standby's application_name, which the primary's synchronous_standby_names names.
PG_STANDBY_NAME=standby
# scripts/stack.sh's check_settings may have set it already (the same default).
if [[ -z ${PG_STANDBY_PORT:-} ]]; then
    PG_STANDBY_PORT=${STACK_PG_STANDBY_PORT:-}
    if [[ -z $PG_STANDBY_PORT && $PG_PORT =~ ^[0-9]+$ ]]; then PG_STANDBY_PORT=$((PG_PORT + 1)); fi
fi
PG_FRESH_PRIMARY=0 # set by an initdb in this run: any standby left from before is not its copy

# PostgreSQL refuses to run as root: as root, run its programs as the `postgres` system user,
# from / (it may not be allowed into the current directory).
as_pg() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

pg_bindir() { # pg_bindir [DATADIR]: the bin dir of the data dir's version if known, else the newest
    local dir=${1:-${PGDATA:-}} v=""
    [[ -f $dir/PG_VERSION ]] && v=$(cat "$dir/PG_VERSION")
    if [[ -n $v && -x /usr/lib/postgresql/$v/bin/pg_ctl ]]; then
        echo "/usr/lib/postgresql/$v/bin"
        return 0
    fi
    [[ -z $v ]] || die "the data dir $dir is from PostgreSQL $v, which is not installed (purge: scripts/stack.sh down --purge)"
    local d
    d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n1)
    [[ -n $d && -x $d/initdb ]] || die "no PostgreSQL server found under /usr/lib/postgresql (run scripts/install-deps.sh)"
    echo "$d"
}

# The data dir without creating anything (for down/status): var/pg/data unless recorded.
pg_datadir_lookup() {
    if [[ -f $PG_DATADIR_FILE ]]; then
        PGDATA=$(cat "$PG_DATADIR_FILE")
    else
        PGDATA=$PG_BASE/data
    fi
}

# The data dir for `up`: var/pg/data, owned by postgres when we are root. If the postgres user
# cannot reach it (a repo under a 0700 home directory, say), fall back to a directory under /tmp
# named after the stack's directory, and record it in var/pg.datadir. The standby's data dir and
# the record of which node is the primary go beside it.
pg_datadir_prepare() {
    pg_datadir_lookup
    if [[ -f $PG_DATADIR_FILE ]]; then # decided on an earlier `up`
        mkdir -p "$(dirname "$PGDATA")"
        chown_pg "$(dirname "$PGDATA")"
        return 0
    fi
    mkdir -p "$PG_BASE"
    is_root || return 0
    chown postgres:postgres "$PG_BASE"
    chmod 700 "$PG_BASE"
    if ! as_pg test -w "$PG_BASE" -a -x "$PG_BASE"; then
        local base
        # Named after the stack's directory, so a private stack (STACK_VAR) gets its own.
        base=/tmp/stockpipe-pg-$(printf '%s' "$VAR" | sha256sum | cut -c1-12)
        warn "user postgres cannot reach $PG_BASE; using $base instead (recorded in $(rel "$PG_DATADIR_FILE"))"
        mkdir -p "$base"
        chown_pg "$base"
        PGDATA=$base/data
        echo "$PGDATA" >"$PG_DATADIR_FILE"
    fi
}

chown_pg() { if is_root; then chown postgres:postgres "$1" && chmod 700 "$1"; fi; }

# --- the two nodes ---------------------------------------------------------------------------------
# Node a is the cluster initdb made ($PGDATA, STACK_PG_PORT); node b the standby's copy beside it
# (STACK_PG_STANDBY_PORT). Which of them is the primary: pg_primary_node. PGDATA must be set
# (pg_datadir_lookup).

pg_node_dir() { if [[ $1 == a ]]; then echo "$PGDATA"; else echo "$(dirname "$PGDATA")/standby"; fi; }
pg_node_stem() { if [[ $1 == a ]]; then echo postgres; else echo postgres-standby; fi; }
pg_node_file() { # pg_node_file NODE pid|port|log
    if [[ $2 == log ]]; then echo "$LOGDIR/$(pg_node_stem "$1").log"; else echo "$RUN/$(pg_node_stem "$1").$2"; fi
}
pg_node_setting() { if [[ $1 == a ]]; then echo STACK_PG_PORT; else echo STACK_PG_STANDBY_PORT; fi; }
pg_node_conf_port() { if [[ $1 == a ]]; then echo "$PG_PORT"; else echo "$PG_STANDBY_PORT"; fi; }
pg_node_set_port() { if [[ $1 == a ]]; then PG_PORT=$2; else PG_STANDBY_PORT=$2; fi; }
# The port a node runs on (its port file, written at its start), else the configured one.
pg_node_port() { cat "$(pg_node_file "$1" port)" 2>/dev/null || pg_node_conf_port "$1"; }
pg_other() { if [[ $1 == a ]]; then echo b; else echo a; fi; }
pg_role_file() { echo "$(dirname "$PGDATA")/primary"; }

pg_primary_node() { # a or b: the node recorded by the last pg-promote (a when none was)
    local f node=a
    f=$(pg_role_file)
    [[ -f $f ]] && node=$(head -n1 "$f")
    [[ $node == a || $node == b ]] || die "$f names '$node' as the primary node, not a or b; start afresh with scripts/stack.sh down --purge"
    echo "$node"
}

pg_record_primary() { # pg_record_primary NODE: NODE is the primary from now on
    local f tmp
    f=$(pg_role_file)
    tmp=$f.tmp.$$
    printf '%s\n# The primary is node %s (%s); written by scripts/stack.sh pg-promote on %s. The other\n# node never runs as a primary again: scripts/stack.sh up rebuilds it as a standby.\n' \
        "$1" "$1" "$(pg_node_dir "$1")" "$(date '+%F %T')" >"$tmp"
    mv -f "$tmp" "$f"
}

# The stack has a standby: STACK_PG_STANDBY=1, or an earlier `up` made one (the mode sticks).
pg_standby_on() {
    [[ ${STACK_PG_STANDBY:-} == 1 ]] && return 0
    [[ -f $(pg_role_file) || -d $(pg_node_dir b) ]]
}

# "postgres" alone, or "postgres ROLE" on a stack with a standby (for messages).
pg_label() { if pg_standby_on; then echo "postgres $1"; else echo postgres; fi; }

pg_node_pid() { # pg_node_pid NODE: the postmaster's pid, from the data dir's own pid file
    local dir pidfile pid
    dir=$(pg_node_dir "$1")
    pidfile=$(pg_node_file "$1" pid)
    [[ -f $dir/postmaster.pid ]] || { rm -f "$pidfile"; return 1; }
    pid=$(head -n1 "$dir/postmaster.pid" | tr -dc '0-9')
    if [[ -n $pid ]] && proc_is "$pid" postgres "$dir"; then
        echo "$pid"
        return 0
    fi
    rm -f "$pidfile" # pg_ctl itself copes with a stale postmaster.pid
    return 1
}

pg_node_admin() { # pg_node_admin NODE ARGS...: psql as the cluster's superuser, to the maintenance database
    local node=$1
    shift
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$(pg_node_port "$node")" -U postgres -d postgres "$@"
}

pg_node_sql() { # pg_node_sql NODE SQL: one value; fails when the node does not answer within 10 s
    PGCONNECT_TIMEOUT=3 timeout 10 psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 \
        -p "$(pg_node_port "$1")" -U postgres -d postgres -c "$2" 2>/dev/null
}

pg_node_role() { # primary, standby, or "?" (no answer) of a running node, by pg_is_in_recovery()
    case $(pg_node_sql "$1" 'SELECT pg_is_in_recovery()') in
        t) echo standby ;;
        f) echo primary ;;
        *) echo "?" ;;
    esac
}

# pg_write_conf DIR PORT ROLE SYNC: the node's own settings, stockpipe.conf (included by its
# postgresql.conf), written on every start so that STACK_PG_PORT changes take effect. With a
# standby, SYNC 1 names it in synchronous_standby_names (the primary, once the standby streams);
# every other node (a standby, the primary until then) names none.
pg_write_conf() {
    local dir=$1 port=$2 role=$3 sync=$4 conf=$1/stockpipe.conf names=""
    ((sync)) && names=$PG_STANDBY_NAME
    {
        cat <<EOF
# Written by scripts/stack.sh on every start; edits are lost.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = ''
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 128MB
max_connections = 200
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
EOF
        if pg_standby_on; then
            cat <<EOF
# Streaming replication (STACK_PG_STANDBY=1); this node is the $role. A standby that was down
# for a while catches up from the WAL kept here.
wal_level = replica
max_wal_senders = 10
wal_keep_size = '1GB'
hot_standby = on
synchronous_standby_names = '$names'
EOF
        fi
        if [[ -n ${STACK_PG_EXTRA_CONFIG:-} ]]; then # a test's own settings (a later one wins)
            [[ -r $STACK_PG_EXTRA_CONFIG ]] || die "STACK_PG_EXTRA_CONFIG=$STACK_PG_EXTRA_CONFIG is not a readable file"
            cat "$STACK_PG_EXTRA_CONFIG"
        fi
    } >"$conf"
    if is_root; then chown postgres:postgres "$conf"; fi
}

# pg_hba_replication DIR: the line that lets a standby stream from 127.0.0.1 (a cluster made
# before initdb wrote it gets it too). 0 when it was added, 1 when it was there.
pg_hba_replication() {
    local hba=$1/pg_hba.conf
    grep -qE '^[[:space:]]*host[[:space:]]+replication[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba" &&
        return 1
    printf 'host    replication  all   127.0.0.1/32  trust\n' >>"$hba"
}

# pg_set_upstream DIR PORT: the standby in DIR streams from the primary on PORT, as
# application_name "standby" (in postgresql.auto.conf, where pg_basebackup -R put it; rewritten on
# every start, so that a port change or a new primary takes effect).
pg_set_upstream() {
    local auto=$1/postgresql.auto.conf content
    content=$(grep -v '^primary_conninfo' "$auto" 2>/dev/null || true)
    printf '%s\nprimary_conninfo = '\''host=127.0.0.1 port=%s user=postgres application_name=%s'\''\n' \
        "$content" "$2" "$PG_STANDBY_NAME" >"$auto"
    if is_root; then chown postgres:postgres "$auto"; fi
}

pg_initdb() { # pg_initdb DIR: a new cluster (node a), trusting loopback TCP only
    local dir=$1 bin=$2 log
    log=$(pg_node_file a log)
    if [[ -d $dir ]] && [[ -n $(ls -A "$dir" 2>/dev/null) ]]; then
        die "$dir exists but holds no cluster (a failed initdb?); remove it or run scripts/stack.sh down --purge"
    fi
    say "postgres: initdb $dir ($(basename "$(dirname "$bin")"))"
    # Trust auth: this cluster listens on 127.0.0.1 only and is for development/tests.
    as_pg "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --no-locale \
        --no-instructions >>"$log" 2>&1 ||
        { tail_log "$log"; die "initdb failed (log: $(rel "$log"))"; }
    # Only TCP from 127.0.0.1; no socket, no other address. The replication line lets a standby
    # (STACK_PG_STANDBY=1) stream from it.
    cat >"$dir/pg_hba.conf" <<'EOF'
# stockpipe local stack: loopback TCP only, no password (throwaway development cluster).
# TYPE  DATABASE     USER  ADDRESS       METHOD
host    all          all   127.0.0.1/32  trust
host    replication  all   127.0.0.1/32  trust
EOF
    echo "include_if_exists = 'stockpipe.conf'" >>"$dir/postgresql.conf"
    if is_root; then chown postgres:postgres "$dir/pg_hba.conf"; fi
    PG_FRESH_PRIMARY=1
}

# pg_node_start NODE ROLE [UPSTREAM_PORT]: starts NODE as ROLE (primary, or standby streaming from
# UPSTREAM_PORT) unless it runs; node a is made by initdb first when it has no cluster yet. Sets
# the node's port (PG_PORT / PG_STANDBY_PORT) to the one it runs on.
pg_node_start() {
    local node=$1 role=$2 upstream=${3:-} dir pid port bin log setting label
    dir=$(pg_node_dir "$node")
    log=$(pg_node_file "$node" log)
    setting=$(pg_node_setting "$node")
    label=$(pg_label "$role")
    if pid=$(pg_node_pid "$node"); then
        port=$(running_port "$(pg_node_stem "$node")" "$(pg_node_conf_port "$node")" "$setting")
        pg_node_set_port "$node" "$port"
        echo "$pid" >"$(pg_node_file "$node" pid)"
        if [[ $role == primary ]] && pg_standby_on && pg_hba_replication "$dir"; then
            pg_node_sql "$node" 'SELECT pg_reload_conf()' >/dev/null || die "could not reload $label (port $port) after adding its replication line to pg_hba.conf"
        fi
        say "$label: already running (pid $pid, port $port)"
        return 0
    fi
    port=$(pg_node_conf_port "$node")
    check_port_free "$port" "$setting"
    bin=$(pg_bindir "$dir")
    if [[ ! -f $dir/PG_VERSION ]]; then
        [[ $node == a && $role == primary ]] || die "$label: no cluster in $dir"
        pg_initdb "$dir" "$bin"
    fi
    if [[ $role == primary && -f $dir/standby.signal ]]; then
        die "$label: $(pg_role_file) names $dir as the primary, but it is still a standby (a scripts/stack.sh pg-promote did not finish): run scripts/stack.sh pg-promote again"
    fi
    pg_hba_replication "$dir" || true
    # A primary starts committing alone, until pg_standby_up sees its standby synchronous.
    if [[ $role == primary ]]; then rm -f "$PG_SYNC_FILE"; fi
    pg_write_conf "$dir" "$port" "$role" 0
    if [[ $role == standby ]]; then
        [[ -f $dir/standby.signal ]] || die "$label: $dir is not a standby (no standby.signal)"
        pg_set_upstream "$dir" "$upstream"
    fi
    # No -l: the server's output goes to pg_ctl's stdout, a file we (maybe root) opened, so
    # the postgres user needs no write access to var/log.
    echo "--- pg_ctl start ($role) $(date '+%F %T')" >>"$log"
    if ! as_pg "$bin/pg_ctl" -D "$dir" -w -t "$PG_TIMEOUT" -s start >>"$log" 2>&1 9>&-; then
        tail_log "$log"
        die "$label did not start (log: $(rel "$log"))"
    fi
    echo "$port" >"$(pg_node_file "$node" port)"
    pid=$(pg_node_pid "$node") || die "$label started but its pid file is not readable"
    echo "$pid" >"$(pg_node_file "$node" pid)"
    say "$label: started (pid $pid, port $port)"
}

pg_node_wait_ready() { # pg_node_wait_ready NODE LABEL: it answers a query, within PG_TIMEOUT
    local port deadline=$((SECONDS + PG_TIMEOUT)) log
    port=$(pg_node_port "$1")
    log=$(pg_node_file "$1" log)
    until pg_isready -q -h 127.0.0.1 -p "$port" -t 2 && [[ $(pg_node_sql "$1" 'select 1') == 1 ]]; do
        ((SECONDS < deadline)) || { tail_log "$log"; die "$2 (port $port) not ready within ${PG_TIMEOUT}s"; }
        sleep 0.2
    done
}

# pg_node_stop NODE LABEL: fast shutdown (immediate if that fails), bounded.
pg_node_stop() {
    local node=$1 label=$2 pid bin dir log
    dir=$(pg_node_dir "$node")
    log=$(pg_node_file "$node" log)
    pid=$(pg_node_pid "$node") || { say "$label: not running"; return 0; }
    bin=$(pg_bindir "$dir")
    if ! as_pg "$bin/pg_ctl" -D "$dir" -m fast -w -t 30 -s stop >>"$log" 2>&1; then
        warn "pg_ctl stop -m fast failed; trying -m immediate"
        as_pg "$bin/pg_ctl" -D "$dir" -m immediate -w -t 30 -s stop >>"$log" 2>&1 ||
            die "could not stop $label (pid $pid); see $(rel "$log")"
    fi
    wait_gone "$pid" 10 || die "$label (pid $pid) still there after pg_ctl stop"
    rm -f "$(pg_node_file "$node" pid)"
    say "$label: stopped (pid $pid)"
}

# pg_dir_unused DIR SECONDS: no process works in DIR any more (the backends of a postmaster killed
# with -9 outlive it until they notice). 1, printing the pid of one, if some still do at the end.
pg_dir_unused() {
    local dir p busy deadline=$((SECONDS + $2))
    dir=$(readlink -f "$1") || return 0
    while :; do
        busy=
        for p in /proc/[0-9]*; do
            if [[ $(readlink "$p/cwd" 2>/dev/null) == "$dir" ]]; then
                busy=${p#/proc/}
                break
            fi
        done
        [[ -z $busy ]] && return 0
        ((SECONDS < deadline)) || { echo "$busy"; return 1; }
        sleep 0.2
    done
}

ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); } # ms_since NANOSECONDS

# pg_standby_build PRIMARY STANDBY: STANDBY's data dir made afresh by pg_basebackup -R from the
# running PRIMARY (whatever was in it is deleted).
pg_standby_build() {
    local prim=$1 sec=$2 dir bin log t0 busy
    dir=$(pg_node_dir "$sec")
    log=$(pg_node_file "$sec" log)
    t0=$(date +%s%N)
    if [[ -e $dir ]]; then
        busy=$(pg_dir_unused "$dir" 15) ||
            die "process $busy still works in $dir (a backend of a killed postmaster?); it must end before the standby is rebuilt there"
        rm -rf "$dir"
    fi
    bin=$(pg_bindir "$(pg_node_dir "$prim")")
    echo "--- pg_basebackup from port $(pg_node_port "$prim") $(date '+%F %T')" >>"$log"
    # -X stream: the WAL written meanwhile comes along; -c fast: no wait for a scheduled checkpoint.
    if ! as_pg timeout "$PG_TIMEOUT" "$bin/pg_basebackup" -D "$dir" -R -X stream -c fast -w \
        -d "host=127.0.0.1 port=$(pg_node_port "$prim") user=postgres application_name=$PG_STANDBY_NAME" \
        >>"$log" 2>&1 9>&-; then
        tail_log "$log"
        die "pg_basebackup from the primary (port $(pg_node_port "$prim")) into $dir failed or took over ${PG_TIMEOUT}s (log: $(rel "$log"))"
    fi
    say "postgres standby: made by pg_basebackup in $(ms_since "$t0") ms ($dir)"
}

# pg_standby_up PRIMARY STANDBY: STANDBY runs as a standby of the running PRIMARY and streams from
# it, and PRIMARY names it its synchronous standby. A standby data dir that is not one (the old
# primary after a pg-promote) or not a copy of this primary (made before an initdb of this run) is
# rebuilt first.
pg_standby_up() {
    local prim=$1 sec=$2 dir pid pport deadline log t0
    dir=$(pg_node_dir "$sec")
    log=$(pg_node_file "$sec" log)
    pport=$(pg_node_port "$prim")
    t0=$(date +%s%N)
    if ! pid=$(pg_node_pid "$sec"); then
        check_port_free "$(pg_node_conf_port "$sec")" "$(pg_node_setting "$sec")"
        if [[ ! -f $dir/PG_VERSION ]] || ((PG_FRESH_PRIMARY)); then
            pg_standby_build "$prim" "$sec"
        elif [[ ! -f $dir/standby.signal ]]; then
            warn "$dir held the old primary (a pg-promote made the other node the primary); rebuilding it as a standby of the new primary, with what it had not replicated discarded"
            pg_standby_build "$prim" "$sec"
        fi
    fi
    pg_node_start "$sec" standby "$pport"
    pid=$(pg_node_pid "$sec") || die "postgres standby: not running after its start"
    deadline=$((SECONDS + PG_TIMEOUT))
    until [[ $(pg_node_sql "$prim" "SELECT count(*) FROM pg_stat_replication WHERE application_name = '$PG_STANDBY_NAME' AND state = 'streaming'") == 1 ]]; do
        proc_is "$pid" postgres || { tail_log "$log"; die "postgres standby (pid $pid) exited (log: $(rel "$log"))"; }
        ((SECONDS < deadline)) || { tail_log "$log"; die "postgres standby (port $(pg_node_port "$sec")) does not stream from the primary (port $pport) after ${PG_TIMEOUT}s (log: $(rel "$log"))"; }
        sleep 0.2
    done
    # Only now, or every commit on the primary would wait for a standby still on its way.
    pg_write_conf "$(pg_node_dir "$prim")" "$pport" primary 1
    pg_node_sql "$prim" 'SELECT pg_reload_conf()' >/dev/null || die "could not reload the primary (port $pport) to make the standby synchronous"
    until [[ $(pg_node_sql "$prim" "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$PG_STANDBY_NAME' AND state = 'streaming'") == sync ]]; do
        ((SECONDS < deadline)) || die "the primary (port $pport) does not take its standby as synchronous after ${PG_TIMEOUT}s (synchronous_standby_names = '$PG_STANDBY_NAME')"
        sleep 0.1
    done
    date '+%F %T' >"$PG_SYNC_FILE" # pg-promote checks it: no commit acknowledged by the primary alone
    say "postgres standby: streaming from the primary (port $pport), synchronous (ready in $(ms_since "$t0") ms)"
}

pg_up() {
    pg_datadir_prepare
    local prim sec pid
    if ! pg_standby_on; then
        pg_node_start a primary
        prim=a
    else
        prim=$(pg_primary_node)
        sec=$(pg_other "$prim")
        # Never two primaries: the other node runs only as a standby.
        if pid=$(pg_node_pid "$sec") && [[ $(pg_node_role "$sec") == primary ]]; then
            warn "the node in $(pg_node_dir "$sec") (pid $pid) runs but is not a standby, while $(pg_role_file) names the other one the primary; stopping it"
            pg_node_stop "$sec" "postgres (old primary)"
        fi
        pg_node_start "$prim" primary
    fi
    pg_node_wait_ready "$prim" "$(pg_label primary)"
    # The application role and database, created once. CREATEDB lets tests make scratch databases.
    pg_node_admin "$prim" <<EOF >/dev/null || die "could not create role/database $PG_USER"
SELECT 'CREATE ROLE $PG_USER LOGIN CREATEDB' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') \gexec
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB') \gexec
EOF
    [[ $(psql -X -At -h 127.0.0.1 -p "$(pg_node_port "$prim")" -U "$PG_USER" -d "$PG_DB" -c 'select 1' 2>&1) == 1 ]] ||
        die "cannot connect to database $PG_DB as $PG_USER"
    if pg_standby_on; then pg_standby_up "$prim" "$sec"; fi
}

pg_down() { # both nodes, the primary first (a fast shutdown sends the standby all it wrote)
    pg_datadir_lookup
    local prim
    if ! pg_standby_on; then
        pg_node_stop a postgres
        return 0
    fi
    prim=$(pg_primary_node)
    pg_node_stop "$prim" "postgres primary"
    pg_node_stop "$(pg_other "$prim")" "postgres standby"
}

pg_preflight() { # before `up` starts anything: a node that is not running finds its port free
    pg_datadir_lookup
    case ${STACK_PG_STANDBY:-} in
        "" | 0 | 1) ;;
        *) die "STACK_PG_STANDBY='$STACK_PG_STANDBY' must be 1 (a streaming standby) or 0" ;;
    esac
    if [[ ${STACK_PG_STANDBY:-} == 0 ]] && pg_standby_on; then
        die "this stack's PostgreSQL has a standby ($(pg_node_dir b)); STACK_PG_STANDBY=0 cannot drop it: leave it unset, or start afresh with scripts/stack.sh down --purge"
    fi
    pg_node_pid a >/dev/null || check_port_free "$PG_PORT" STACK_PG_PORT
    if pg_standby_on; then
        [[ $PG_STANDBY_PORT =~ ^[0-9]+$ ]] && ((PG_STANDBY_PORT >= 1024 && PG_STANDBY_PORT <= 65535)) ||
            die "STACK_PG_STANDBY_PORT='$PG_STANDBY_PORT' is not a port in 1024..65535"
        local p
        for p in "$REDIS_PORT" "$PG_PORT" "$KAFKA_PORT" "$KAFKA_CPORT"; do
            [[ $p != "$PG_STANDBY_PORT" ]] || die "STACK_PG_STANDBY_PORT=$PG_STANDBY_PORT is taken by another server of the stack; choose another"
        done
        pg_node_pid b >/dev/null || check_port_free "$PG_STANDBY_PORT" STACK_PG_STANDBY_PORT
    fi
}

pg_status() { # one line per node (role by pg_is_in_recovery); returns 1 if one is not running
    local pid node prim rc=0 role
    pg_datadir_lookup
    if ! pg_standby_on; then
        if pid=$(pg_node_pid a); then
            printf 'postgres  running  pid %-7s port %s  data %s\n' "$pid" "$(pg_node_port a)" "$PGDATA"
        else
            echo "postgres  stopped"
            return 1
        fi
        return 0
    fi
    prim=$(pg_primary_node)
    for node in "$prim" "$(pg_other "$prim")"; do
        if pid=$(pg_node_pid "$node"); then
            printf 'postgres  running  pid %-7s port %s  %-7s  data %s\n' "$pid" "$(pg_node_port "$node")" \
                "$(pg_node_role "$node")" "$(pg_node_dir "$node")"
        else
            if [[ $node == "$prim" ]]; then
                role=primary
            elif [[ -f $(pg_node_dir "$node")/PG_VERSION && ! -f $(pg_node_dir "$node")/standby.signal ]]; then
                role="old primary, rebuilt as a standby by the next up"
            else
                role=standby
            fi
            printf 'postgres  stopped              port %s  %s  data %s\n' "$(pg_node_port "$node")" "$role" "$(pg_node_dir "$node")"
            rc=1
        fi
    done
    return "$rc"
}

pg_purge() { # delete PostgreSQL's data (stopped already); prints what went, for `down --purge`
    pg_datadir_lookup
    local pgbase extra=""
    pgbase=$(dirname "$PGDATA")
    rm -rf "$PG_BASE" # both nodes and the record of the primary, unless under /tmp:
    # The /tmp fallback, only if it is ours (named after this stack's directory).
    if [[ -f $PG_DATADIR_FILE && $pgbase == /tmp/stockpipe-pg-* ]]; then
        rm -rf "$pgbase"
        extra=" $pgbase"
    fi
    rm -f "$PG_DATADIR_FILE"
    printf '%s%s' "$(rel "$PG_BASE")" "$extra"
}

pg_dsn() { # the workers' PG_DSN for this stack: with a standby, both nodes; libpq takes the writable one
    pg_datadir_lookup
    if pg_standby_on; then
        printf 'host=127.0.0.1,127.0.0.1 port=%s,%s dbname=%s user=%s connect_timeout=5 target_session_attrs=read-write' \
            "$PG_PORT" "$PG_STANDBY_PORT" "$PG_DB" "$PG_USER"
    else
        printf 'host=127.0.0.1 port=%s dbname=%s user=%s connect_timeout=5' "$PG_PORT" "$PG_DB" "$PG_USER"
    fi
}

# pg_promote: the standby becomes the primary (see the header). Runs under stack.sh's lock.
pg_promote() {
    (($# == 0)) || die "pg-promote takes no arguments"
    pg_datadir_lookup
    pg_standby_on || die "pg-promote: this stack runs no standby (start it with STACK_PG_STANDBY=1)"
    local cur target old dir pid bin log t0 deadline
    cur=$(pg_primary_node)
    if [[ -f $(pg_node_dir "$cur")/standby.signal ]]; then # recorded, not promoted: finish it
        target=$cur
    else
        target=$(pg_other "$cur")
    fi
    old=$(pg_other "$target")
    dir=$(pg_node_dir "$target")
    log=$(pg_node_file "$target" log)
    [[ -f $dir/PG_VERSION ]] || die "pg-promote: there is no standby in $dir (scripts/stack.sh up with STACK_PG_STANDBY=1 makes one)"
    [[ -f $dir/standby.signal ]] || die "pg-promote: $dir is not a standby (the old primary of an earlier pg-promote, waiting for scripts/stack.sh up to rebuild it): nothing to promote"
    # A primary that committed alone (its standby not yet synchronous, or down since) may have
    # acknowledged commits the standby lacks: promoting it then would lose them.
    [[ -f $dir/standby.signal && $target != "$cur" && ! -f $PG_SYNC_FILE ]] &&
        die "pg-promote: the standby was not seen synchronous since the primary started (it may lack commits the primary acknowledged alone); scripts/stack.sh up (which waits for it to be synchronous) first"
    t0=$(date +%s%N)
    # Never two primaries: the primary stops first if it still runs (a switchover, then; with a
    # synchronous standby a fast shutdown leaves it nothing the standby lacks).
    if pid=$(pg_node_pid "$old"); then
        warn "pg-promote: the primary (pid $pid, port $(pg_node_port "$old")) still runs; stopping it first"
        pg_node_stop "$old" "postgres primary"
    fi
    rm -f "$PG_SYNC_FILE"        # the new primary commits alone until `up` rebuilds a standby
    pg_record_primary "$target" # before the promotion: an `up` from here on never starts $old as a primary
    if ! pid=$(pg_node_pid "$target"); then
        check_port_free "$(pg_node_conf_port "$target")" "$(pg_node_setting "$target")"
        pg_node_start "$target" standby "$(pg_node_port "$old")"
    fi
    bin=$(pg_bindir "$dir")
    echo "--- pg_ctl promote $(date '+%F %T')" >>"$log"
    as_pg "$bin/pg_ctl" -D "$dir" -w -t "$PG_TIMEOUT" -s promote >>"$log" 2>&1 ||
        { tail_log "$log"; die "pg_ctl promote of $dir failed or took over ${PG_TIMEOUT}s (log: $(rel "$log"))"; }
    # Done once it takes a write (a transaction id is refused during recovery).
    deadline=$((SECONDS + PG_TIMEOUT))
    until [[ $(pg_node_sql "$target" 'SELECT txid_current() > 0') == t ]]; do
        ((SECONDS < deadline)) || { tail_log "$log"; die "the promoted node (port $(pg_node_port "$target")) takes no write ${PG_TIMEOUT}s after pg_ctl promote (log: $(rel "$log"))"; }
        sleep 0.1
    done
    say "postgres: standby promoted in $(ms_since "$t0") ms: the primary is now pid $(pg_node_pid "$target") on port $(pg_node_port "$target") ($dir)"
    say "postgres: the old primary ($(pg_node_dir "$old")) stays down; scripts/stack.sh up rebuilds it as a standby of the new primary (until then commits wait for no standby)"
}
