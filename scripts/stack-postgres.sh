#!/usr/bin/env bash
# stack-postgres.sh - the PostgreSQL of the local stack (sourced by scripts/stack.sh, which
# defines the variables and helpers used here: VAR, RUN, LOGDIR, PG_*, say, die, launch...).
#
# Functions scripts/stack.sh calls: pg_preflight, pg_up, pg_down, pg_status, pg_purge, pg_dsn.

# --- PostgreSQL ----------------------------------------------------------------------------------

# PostgreSQL refuses to run as root: as root, run its programs as the `postgres` system user,
# from / (it may not be allowed into the current directory).
as_pg() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

pg_bindir() { # the bin dir of the data dir's version if known, else of the newest install
    local v=""
    [[ -f ${PGDATA:-}/PG_VERSION ]] && v=$(cat "$PGDATA/PG_VERSION")
    if [[ -n $v && -x /usr/lib/postgresql/$v/bin/pg_ctl ]]; then
        echo "/usr/lib/postgresql/$v/bin"
        return 0
    fi
    [[ -z $v ]] || die "the data dir $PGDATA is from PostgreSQL $v, which is not installed (purge: scripts/stack.sh down --purge)"
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
# named after the stack's directory, and record it in var/pg.datadir.
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

pg_pid() { # the postmaster's pid, from the data dir's own pid file
    [[ -f $PGDATA/postmaster.pid ]] || { rm -f "$RUN/postgres.pid"; return 1; }
    local pid
    pid=$(head -n1 "$PGDATA/postmaster.pid" | tr -dc '0-9')
    if [[ -n $pid ]] && proc_is "$pid" postgres "$PGDATA"; then
        echo "$pid"
        return 0
    fi
    rm -f "$RUN/postgres.pid" # pg_ctl itself copes with a stale postmaster.pid
    return 1
}

pg_psql_admin() { # psql as the cluster's superuser, to the maintenance database
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@"
}

pg_up() {
    pg_datadir_prepare
    local pid bin
    if pid=$(pg_pid); then
        PG_PORT=$(running_port postgres "$PG_PORT" STACK_PG_PORT)
        echo "$pid" >"$RUN/postgres.pid"
        say "postgres: already running (pid $pid, port $PG_PORT)"
    else
        check_port_free "$PG_PORT" STACK_PG_PORT
        bin=$(pg_bindir)
        if [[ ! -f $PGDATA/PG_VERSION ]]; then
            if [[ -d $PGDATA ]] && [[ -n $(ls -A "$PGDATA" 2>/dev/null) ]]; then
                die "$PGDATA exists but holds no cluster (a failed initdb?); remove it or run scripts/stack.sh down --purge"
            fi
            say "postgres: initdb $PGDATA ($(basename "$(dirname "$bin")"))"
            # Trust auth: this cluster listens on 127.0.0.1 only and is for development/tests.
            as_pg "$bin/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --no-locale \
                --no-instructions >>"$LOGDIR/postgres.log" 2>&1 ||
                { tail_log "$LOGDIR/postgres.log"; die "initdb failed (log: $(rel "$LOGDIR/postgres.log"))"; }
            # Only TCP from 127.0.0.1; no socket, no other address.
            cat >"$PGDATA/pg_hba.conf" <<'EOF'
# stockpipe local stack: loopback TCP only, no password (throwaway development cluster).
# TYPE  DATABASE  USER  ADDRESS       METHOD
host    all       all   127.0.0.1/32  trust
EOF
            echo "include_if_exists = 'stockpipe.conf'" >>"$PGDATA/postgresql.conf"
        fi
        # Rewritten on every start so that STACK_PG_PORT changes take effect.
        cat >"$PGDATA/stockpipe.conf" <<EOF
# Written by scripts/stack.sh on every start; edits are lost.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = ''
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 128MB
max_connections = 200
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
EOF
        if [[ -n ${STACK_PG_EXTRA_CONFIG:-} ]]; then # a test's own settings (a later one wins)
            [[ -r $STACK_PG_EXTRA_CONFIG ]] || die "STACK_PG_EXTRA_CONFIG=$STACK_PG_EXTRA_CONFIG is not a readable file"
            cat "$STACK_PG_EXTRA_CONFIG" >>"$PGDATA/stockpipe.conf"
        fi
        if is_root; then chown postgres:postgres "$PGDATA/pg_hba.conf" "$PGDATA/stockpipe.conf"; fi
        # No -l: the server's output goes to pg_ctl's stdout, a file we (maybe root) opened, so
        # the postgres user needs no write access to var/log.
        echo "--- pg_ctl start $(date '+%F %T')" >>"$LOGDIR/postgres.log"
        if ! as_pg "$bin/pg_ctl" -D "$PGDATA" -w -t "$PG_TIMEOUT" -s start \
            >>"$LOGDIR/postgres.log" 2>&1 9>&-; then
            tail_log "$LOGDIR/postgres.log"
            die "PostgreSQL did not start (log: $(rel "$LOGDIR/postgres.log"))"
        fi
        echo "$PG_PORT" >"$RUN/postgres.port"
        pid=$(pg_pid) || die "PostgreSQL started but its pid file is not readable"
        echo "$pid" >"$RUN/postgres.pid"
        say "postgres: started (pid $pid, port $PG_PORT)"
    fi

    local deadline=$((SECONDS + PG_TIMEOUT))
    until pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2 &&
        [[ $(pg_psql_admin -At -c 'select 1' 2>/dev/null) == 1 ]]; do
        ((SECONDS < deadline)) || { tail_log "$LOGDIR/postgres.log"; die "PostgreSQL not ready within ${PG_TIMEOUT}s"; }
        sleep 0.2
    done
    # The application role and database, created once. CREATEDB lets tests make scratch databases.
    pg_psql_admin <<EOF >/dev/null || die "could not create role/database $PG_USER"
SELECT 'CREATE ROLE $PG_USER LOGIN CREATEDB' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') \gexec
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB') \gexec
EOF
    [[ $(psql -X -At -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -c 'select 1' 2>&1) == 1 ]] ||
        die "cannot connect to database $PG_DB as $PG_USER"
}

pg_down() {
    pg_datadir_lookup
    local pid bin
    pid=$(pg_pid) || { say "postgres: not running"; return 0; }
    bin=$(pg_bindir)
    if ! as_pg "$bin/pg_ctl" -D "$PGDATA" -m fast -w -t 30 -s stop >>"$LOGDIR/postgres.log" 2>&1; then
        warn "pg_ctl stop -m fast failed; trying -m immediate"
        as_pg "$bin/pg_ctl" -D "$PGDATA" -m immediate -w -t 30 -s stop >>"$LOGDIR/postgres.log" 2>&1 ||
            die "could not stop PostgreSQL (pid $pid); see $(rel "$LOGDIR/postgres.log")"
    fi
    wait_gone "$pid" 10 || die "PostgreSQL (pid $pid) still there after pg_ctl stop"
    rm -f "$RUN/postgres.pid"
    say "postgres: stopped (pid $pid)"
}


pg_preflight() { # before `up` starts anything: a PostgreSQL that is not running finds its port free
    pg_datadir_lookup
    pg_pid >/dev/null || check_port_free "$PG_PORT" STACK_PG_PORT
}

pg_status() { # one line; returns 1 if not running
    local pid port
    pg_datadir_lookup
    if pid=$(pg_pid); then
        port=$(cat "$RUN/postgres.port" 2>/dev/null || echo "?")
        printf 'postgres  running  pid %-7s port %s  data %s\n' "$pid" "$port" "$PGDATA"
    else
        echo "postgres  stopped"
        return 1
    fi
}

pg_purge() { # delete PostgreSQL's data (stopped already); prints what went, for `down --purge`
    pg_datadir_lookup
    local pgbase extra=""
    pgbase=$(dirname "$PGDATA")
    rm -rf "$PG_BASE"
    # The /tmp fallback, only if it is ours (named after this stack's directory).
    if [[ -f $PG_DATADIR_FILE && $pgbase == /tmp/stockpipe-pg-* ]]; then
        rm -rf "$pgbase"
        extra=" $pgbase"
    fi
    rm -f "$PG_DATADIR_FILE"
    printf '%s%s' "$(rel "$PG_BASE")" "$extra"
}

pg_dsn() { # the workers' PG_DSN for this stack
    printf 'host=127.0.0.1 port=%s dbname=%s user=%s connect_timeout=5' "$PG_PORT" "$PG_DB" "$PG_USER"
}

pg_promote() { # promote the standby (STACK_PG_STANDBY=1) to primary
    die "pg-promote: this stack runs no standby (start it with STACK_PG_STANDBY=1)"
}
