#!/usr/bin/env bash
# stack.sh - the real local stack on loopback: Redis, PostgreSQL and a one-node Kafka (KRaft).
#
#   scripts/stack.sh up               start what is not running, create topics, migrate, write env
#   scripts/stack.sh down [SERVER...] stop what `up` started, or only the named servers
#                                     (redis, postgres, kafka); `up` starts them again
#   scripts/stack.sh down --purge     stop everything and delete all its data
#   scripts/stack.sh status           one line per server; exit 0 only if all three run
#   scripts/stack.sh env              print the path of the env file written by `up`
#   scripts/stack.sh pg-promote       promote the PostgreSQL standby (STACK_PG_STANDBY=1) to primary
#   scripts/stack.sh topic create NAME PARTITIONS | topic delete NAME
#                                     a topic of its own for a test or benchmark run (unlimited
#                                     retention like the others); the broker must be running
#
# After `up`:  . var/stack.env   (REDIS_URL, KAFKA_BROKERS, KAFKA_TOPIC, KAFKA_DLQ_TOPIC, PG_DSN)
#
# Everything lives under var/ (ignored by git): var/redis, var/pg, var/kafka (data),
# var/run/*.pid|*.port (what runs, on which port), var/log/*.log, var/stack.env.
# STACK_KAFKA_EXTRA_CONFIG=FILE and STACK_PG_EXTRA_CONFIG=FILE append a file's lines to the
# broker's server.properties / PostgreSQL's settings (a test's TLS listener, say).
# STACK_VAR=/some/dir puts all of that under another directory instead, for a second, private
# stack next to the shared one (give it other ports too); the Kafka jars stay in var/kafka-libs.
# Every server listens on 127.0.0.1 only. Ports and topic settings come from the environment:
#   STACK_REDIS_PORT=16379 STACK_PG_PORT=15432 STACK_KAFKA_PORT=19092
#   STACK_KAFKA_CONTROLLER_PORT=19093 STACK_KAFKA_PARTITIONS=4 STACK_KAFKA_TOPIC=stockpipe.events
# (the dead-letter topic is "$STACK_KAFKA_TOPIC.dlq", 1 partition).
#
# The PostgreSQL cluster is throwaway and local-only: it trusts every connection from 127.0.0.1
# without a password and has no Unix socket. Never point it at a non-loopback address.
#
# `down` only ever signals the pids recorded in var/run (checked against /proc/PID/cmdline),
# never processes found by name.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VAR=${STACK_VAR:-$ROOT/var}
[[ $VAR == /* ]] || VAR=$PWD/$VAR
RUN=$VAR/run
LOGDIR=$VAR/log
ENV_FILE=$VAR/stack.env
DEPLOY=$ROOT/deploy/kafka-local
KAFKA_LIBS=$ROOT/var/kafka-libs # installed by scripts/install-deps.sh, shared by every stack
KAFKA_DIR=$VAR/kafka
KAFKA_CONF=$KAFKA_DIR/server.properties
REDIS_DIR=$VAR/redis
PG_BASE=$VAR/pg
PG_DATADIR_FILE=$VAR/pg.datadir # present only when the data dir had to go under /tmp

REDIS_PORT=${STACK_REDIS_PORT:-16379}
PG_PORT=${STACK_PG_PORT:-15432}
KAFKA_PORT=${STACK_KAFKA_PORT:-19092}
KAFKA_CPORT=${STACK_KAFKA_CONTROLLER_PORT:-19093}
PARTITIONS=${STACK_KAFKA_PARTITIONS:-4}
TOPIC=${STACK_KAFKA_TOPIC:-stockpipe.events}
DLQ_TOPIC=$TOPIC.dlq

# Bounds of every wait, in seconds.
KAFKA_START_TIMEOUT=${STACK_KAFKA_START_TIMEOUT:-90}
KAFKA_STOP_TIMEOUT=${STACK_KAFKA_STOP_TIMEOUT:-30}
REDIS_TIMEOUT=20
PG_TIMEOUT=60
TOPIC_TIMEOUT=30

PG_DB=stockpipe
PG_USER=stockpipe

# JVM flags for the short-lived Kafka tools (StorageTool, TopicCommand): C1 only and a small
# serial heap start them in about half the time of the defaults.
# -XX:-UsePerfData (here and for the broker): no /tmp/hsperfdata_<user>/<pid> files left behind.
TOOL_JVM=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xms32m -Xmx256m -XX:-UsePerfData
    "-Dlog4j2.configurationFile=file:$DEPLOY/log4j2.properties")

say() { printf 'stack: %s\n' "$*"; }
rel() { printf '%s' "${1#"$ROOT"/}"; } # a path as messages show it: relative to the repo if inside
warn() { printf 'stack: warning: %s\n' "$*" >&2; }
die() {
    printf 'stack: error: %s\n' "$*" >&2
    exit 1
}
is_root() { ((EUID == 0)); }

usage() { sed -n '2,/^# After/p' "$0" | sed '$d' | sed '$d' | sed 's/^# \{0,1\}//'; }

# --- processes -------------------------------------------------------------------------------

# proc_is PID NEEDLE...: PID is a live (not zombie) process whose command line contains every
# NEEDLE. Guards against stale pid files and recycled pids.
proc_is() {
    local pid=$1 cmd state
    shift
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$pid/status" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]] || return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    local needle
    for needle in "$@"; do
        [[ $cmd == *"$needle"* ]] || return 1
    done
}

# pid_from FILE NEEDLE...: print the pid in FILE if that process is alive and matches; remove
# FILE (and say so) if it is stale.
pid_from() {
    local file=$1 pid
    shift
    [[ -f $file ]] || return 1
    pid=$(head -n1 "$file" 2>/dev/null | tr -dc '0-9')
    if [[ -n $pid ]] && proc_is "$pid" "$@"; then
        echo "$pid"
        return 0
    fi
    say "removing stale pid file $(rel "$file")" >&2 # stdout is the pid
    rm -f "$file"
    return 1
}

# wait_gone PID SECONDS: wait until PID has exited (or is a zombie awaiting its reaper).
wait_gone() {
    local pid=$1 deadline=$((SECONDS + $2))
    while proc_is "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# port_busy PORT: something accepts connections on 127.0.0.1:PORT.
port_busy() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# check_port_free PORT VAR: fail, naming the variable to change, if PORT is taken.
check_port_free() {
    if port_busy "$1"; then
        die "port $1 on 127.0.0.1 is already in use by another process; choose a free one with $2=<port>"
    fi
}

# launch PIDFILE LOGFILE CMD...: run CMD in the background in its own session (so a Ctrl-C or a
# closed terminal does not reach it), stdin from /dev/null, output appended to LOGFILE. The pid
# is written by the shell that then execs CMD, so it is CMD's pid however setsid forks. Our lock
# (fd 9) is closed in the child, or the server would hold it for its whole life.
launch() {
    local pidfile=$1 logfile=$2
    shift 2
    rm -f "$pidfile"
    # shellcheck disable=SC2016 # $$ and $0 are for the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 9>&- &
    local deadline=$((SECONDS + 5))
    until [[ -s $pidfile ]]; do
        ((SECONDS < deadline)) || die "could not start $1"
        sleep 0.05
    done
}

# running_port NAME REQUESTED VAR: the port a running server was started on ($RUN/NAME.port);
# notes when the requested one differs, since a running server keeps its port until `down`.
running_port() {
    local port
    port=$(cat "$RUN/$1.port" 2>/dev/null) || port=$2
    if [[ $port != "$2" ]]; then
        say "note: $1 keeps running on port $port; $3=$2 applies after scripts/stack.sh down" >&2
    fi
    echo "$port"
}

tail_log() { # tail_log FILE: the end of a log, indented, on stderr
    [[ -f $1 ]] && tail -n "${2:-30}" "$1" | sed 's/^/    | /' >&2
    return 0
}

# --- configuration checks ----------------------------------------------------------------------

check_settings() {
    local v name
    for name in STACK_REDIS_PORT STACK_PG_PORT STACK_KAFKA_PORT STACK_KAFKA_CONTROLLER_PORT; do
        case $name in
            STACK_REDIS_PORT) v=$REDIS_PORT ;;
            STACK_PG_PORT) v=$PG_PORT ;;
            STACK_KAFKA_PORT) v=$KAFKA_PORT ;;
            STACK_KAFKA_CONTROLLER_PORT) v=$KAFKA_CPORT ;;
        esac
        [[ $v =~ ^[0-9]+$ ]] && ((v >= 1024 && v <= 65535)) || die "$name='$v' is not a port in 1024..65535"
    done
    if [[ $(printf '%s\n' "$REDIS_PORT" "$PG_PORT" "$KAFKA_PORT" "$KAFKA_CPORT" | sort -u | wc -l) -ne 4 ]]; then
        die "the four STACK_*_PORT values must differ (got $REDIS_PORT $PG_PORT $KAFKA_PORT $KAFKA_CPORT)"
    fi
    [[ $PARTITIONS =~ ^[0-9]+$ ]] && ((PARTITIONS >= 1)) || die "STACK_KAFKA_PARTITIONS='$PARTITIONS' is not a positive number"
    [[ $TOPIC =~ ^[A-Za-z0-9._-]{1,200}$ ]] || die "STACK_KAFKA_TOPIC='$TOPIC' is not a valid Kafka topic name"
}

# Install what the stack needs only when something is actually missing (the Makefile runs
# install-deps.sh before stack-up anyway).
ensure_deps() {
    local missing=() c
    for c in redis-server redis-cli java kcat psql pg_isready setsid timeout flock; do
        command -v "$c" >/dev/null 2>&1 || missing+=("$c")
    done
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(initdb)
    if is_root; then command -v runuser >/dev/null 2>&1 || missing+=(runuser); fi
    [[ -f $KAFKA_LIBS/.stockpipe-stamp ]] && compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null ||
        missing+=(kafka-jars)
    if ((${#missing[@]})); then
        say "missing: ${missing[*]} - running scripts/install-deps.sh"
        "$ROOT/scripts/install-deps.sh"
    fi
}

# --- Redis -------------------------------------------------------------------------------------

# Redis shows its address in its process title ("redis-server 127.0.0.1:PORT"); matching the port
# keeps one stack's stale pid file from naming another stack's Redis.
redis_pid() {
    local port
    port=$(cat "$RUN/redis.port" 2>/dev/null) || port=$REDIS_PORT
    pid_from "$RUN/redis.pid" redis-server ":$port"
}

redis_up() {
    local pid
    if pid=$(redis_pid); then
        REDIS_PORT=$(running_port redis "$REDIS_PORT" STACK_REDIS_PORT)
        say "redis: already running (pid $pid, port $REDIS_PORT)"
        return 0
    fi
    check_port_free "$REDIS_PORT" STACK_REDIS_PORT
    mkdir -p "$REDIS_DIR"
    # appendonly + everysec: what the pipeline relies on in production (at most ~1 s of
    # reservations lost on a crash); no RDB snapshots.
    launch "$RUN/redis.pid" "$LOGDIR/redis.log" redis-server \
        --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode yes \
        --dir "$REDIS_DIR" --daemonize no --pidfile "$RUN/redis.pid" \
        --logfile "$LOGDIR/redis.log" \
        --appendonly yes --appendfsync everysec --save ''
    echo "$REDIS_PORT" >"$RUN/redis.port"
    pid=$(cat "$RUN/redis.pid")
    local deadline=$((SECONDS + REDIS_TIMEOUT))
    until [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; do
        if ! proc_is "$pid" redis-server; then
            tail_log "$LOGDIR/redis.log"
            die "redis-server exited during start-up (log: $(rel "$LOGDIR/redis.log"))"
        fi
        ((SECONDS < deadline)) || { tail_log "$LOGDIR/redis.log"; die "redis did not answer PING within ${REDIS_TIMEOUT}s"; }
        sleep 0.1
    done
    say "redis: started (pid $pid, port $REDIS_PORT)"
}

redis_down() {
    local pid
    pid=$(redis_pid) || { say "redis: not running"; return 0; }
    # SIGTERM is Redis's clean shutdown: it fsyncs the AOF and exits (no RDB: save "").
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 20; then
        warn "redis (pid $pid) did not exit within 20s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "redis (pid $pid) survived SIGKILL"
    fi
    rm -f "$RUN/redis.pid"
    say "redis: stopped (pid $pid)"
}

# PostgreSQL: the primary (and the optional streaming standby) live in their own file.
# shellcheck source=scripts/stack-postgres.sh
. "$ROOT/scripts/stack-postgres.sh"

# --- Kafka ---------------------------------------------------------------------------------------

kafka_pid() { pid_from "$RUN/kafka.pid" kafka.Kafka "$KAFKA_CONF"; }

kafka_tool() { # kafka_tool CLASS ARGS...: run a Kafka command-line tool from the broker's jars
    java "${TOOL_JVM[@]}" -cp "$KAFKA_LIBS/*" "$@"
}

sed_escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }

kafka_render_config() {
    mkdir -p "$KAFKA_DIR/data"
    local tmp=$KAFKA_CONF.tmp
    sed -e "s|@PORT@|$KAFKA_PORT|g" \
        -e "s|@CONTROLLER_PORT@|$KAFKA_CPORT|g" \
        -e "s|@PARTITIONS@|$PARTITIONS|g" \
        -e "s|@LOG_DIRS@|$(sed_escape "$KAFKA_DIR/data")|g" \
        "$DEPLOY/server.properties.in" >"$tmp"
    if [[ -n ${STACK_KAFKA_EXTRA_CONFIG:-} ]]; then # a test's own settings (a later key wins)
        [[ -r $STACK_KAFKA_EXTRA_CONFIG ]] || die "STACK_KAFKA_EXTRA_CONFIG=$STACK_KAFKA_EXTRA_CONFIG is not a readable file"
        printf '\n# from STACK_KAFKA_EXTRA_CONFIG=%s\n' "$STACK_KAFKA_EXTRA_CONFIG" >>"$tmp"
        cat "$STACK_KAFKA_EXTRA_CONFIG" >>"$tmp"
    fi
    mv "$tmp" "$KAFKA_CONF"
}

# Start the broker without waiting for it (the JVM boots while Redis and PostgreSQL start).
kafka_launch() {
    local pid
    if pid=$(kafka_pid); then
        KAFKA_PORT=$(running_port kafka "$KAFKA_PORT" STACK_KAFKA_PORT)
        KAFKA_CPORT=$(running_port kafka.controller "$KAFKA_CPORT" STACK_KAFKA_CONTROLLER_PORT)
        say "kafka: already running (pid $pid, port $KAFKA_PORT)"
        KAFKA_STARTED=0
        return 0
    fi
    check_port_free "$KAFKA_PORT" STACK_KAFKA_PORT
    check_port_free "$KAFKA_CPORT" STACK_KAFKA_CONTROLLER_PORT
    kafka_render_config

    # The cluster id is made once and kept: the storage is formatted with it.
    if [[ ! -s $KAFKA_DIR/cluster.id ]]; then
        local id
        id=$(kafka_tool kafka.tools.StorageTool random-uuid 2>>"$LOGDIR/kafka.log" | tail -n1)
        [[ $id =~ ^[A-Za-z0-9_-]{22}$ ]] || die "StorageTool random-uuid gave '$id' (log: $(rel "$LOGDIR/kafka.log"))"
        echo "$id" >"$KAFKA_DIR/cluster.id"
    fi
    if [[ ! -f $KAFKA_DIR/data/meta.properties ]]; then
        say "kafka: formatting storage (cluster id $(cat "$KAFKA_DIR/cluster.id"))"
        # No --standalone: the voter set is static (controller.quorum.voters).
        kafka_tool kafka.tools.StorageTool format -t "$(cat "$KAFKA_DIR/cluster.id")" \
            -c "$KAFKA_CONF" >>"$LOGDIR/kafka.log" 2>&1 ||
            { tail_log "$LOGDIR/kafka.log"; die "kafka storage format failed (log: $(rel "$LOGDIR/kafka.log"))"; }
    fi

    echo "--- kafka start $(date '+%F %T')" >>"$LOGDIR/kafka.log"
    # Heap and GC flags as in Kafka's kafka-server-start.sh, with a smaller heap for a 2-core,
    # shared development machine.
    launch "$RUN/kafka.pid" "$LOGDIR/kafka.log" \
        java -Xms256m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
        -XX:+ExitOnOutOfMemoryError -XX:-UsePerfData -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=file:$DEPLOY/log4j2.properties" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_CONF"
    echo "$KAFKA_PORT" >"$RUN/kafka.port"
    echo "$KAFKA_CPORT" >"$RUN/kafka.controller.port"
    KAFKA_STARTED=1
}

# Wait until the broker answers a metadata request and lists itself.
kafka_wait() {
    local pid deadline=$((SECONDS + KAFKA_START_TIMEOUT))
    pid=$(cat "$RUN/kafka.pid")
    until port_busy "$KAFKA_PORT" &&
        kcat -b "127.0.0.1:$KAFKA_PORT" -L -m 5 2>/dev/null | grep -q "broker 1 at 127.0.0.1:$KAFKA_PORT"; do
        if ! proc_is "$pid" kafka.Kafka; then
            tail_log "$LOGDIR/kafka.log" 40
            die "the Kafka broker exited during start-up (log: $(rel "$LOGDIR/kafka.log"))"
        fi
        if ((SECONDS >= deadline)); then
            tail_log "$LOGDIR/kafka.log" 40
            die "the Kafka broker did not answer a metadata request within ${KAFKA_START_TIMEOUT}s (pid $pid still running; log: $(rel "$LOGDIR/kafka.log"); scripts/stack.sh down stops it)"
        fi
        sleep 0.5
    done
    ((KAFKA_STARTED)) && say "kafka: started (pid $pid, port $KAFKA_PORT, controller $KAFKA_CPORT)"
    return 0
}

# topic_state NAME: "missing", or "<partitions> <partitions with a leader>".
topic_state() {
    local md total led
    local re=${1//./\\.} # the name as a regular expression
    md=$(kcat -b "127.0.0.1:$KAFKA_PORT" -L -t "$1" -m 5 2>&1) || true
    # A topic that does not exist is listed as
    #   topic "NAME" with 0 partitions: Broker: Unknown topic or partition
    total=$(sed -n "s/^ *topic \"$re\" with \([0-9]*\) partitions:.*/\1/p" <<<"$md")
    if [[ -z $total ]] || grep -q "^ *topic \"$re\" .*Unknown topic or partition" <<<"$md"; then
        echo missing
        return 0
    fi
    # "partition 3, leader 1, ..." (a partition without a leader shows "leader -1")
    led=$(grep -cE '^ *partition [0-9]+, leader [0-9]+,' <<<"$md" || true)
    echo "$total $led"
}

# Create the missing topics (in parallel: each TopicCommand is a JVM start), then check that each
# has the intended partition count and a leader for every partition.
kafka_topics() {
    local -A want=([$TOPIC]=$PARTITIONS [$DLQ_TOPIC]=1)
    local t state pids=() names=()
    for t in "$TOPIC" "$DLQ_TOPIC"; do
        state=$(topic_state "$t")
        if [[ $state == missing ]]; then
            kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
                --create --if-not-exists --topic "$t" --partitions "${want[$t]}" \
                --replication-factor 1 --config retention.ms=-1 --config retention.bytes=-1 \
                >"$RUN/topic-$t.out" 2>&1 9>&- &
            pids+=($!)
            names+=("$t")
        elif [[ ${state%% *} != "${want[$t]}" ]]; then
            die "topic $t has ${state%% *} partitions, not ${want[$t]} (STACK_KAFKA_PARTITIONS); use the old value or start afresh with scripts/stack.sh down --purge"
        fi
    done
    local i
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            sed 's/^/    | /' "$RUN/topic-${names[$i]}.out" >&2
            die "could not create topic ${names[$i]}"
        fi
        rm -f "$RUN/topic-${names[$i]}.out"
        say "kafka: created topic ${names[$i]} (partitions: ${want[${names[$i]}]})"
    done
    local deadline=$((SECONDS + TOPIC_TIMEOUT))
    for t in "$TOPIC" "$DLQ_TOPIC"; do
        until [[ $(topic_state "$t") == "${want[$t]} ${want[$t]}" ]]; do
            ((SECONDS < deadline)) || die "topic $t: not ${want[$t]} partitions with a leader each after ${TOPIC_TIMEOUT}s (now: $(topic_state "$t"))"
            sleep 0.2
        done
    done
}

kafka_down() {
    local pid
    pid=$(kafka_pid) || { say "kafka: not running"; return 0; }
    # SIGTERM runs the broker's controlled shutdown (flushes logs, writes clean-shutdown markers,
    # so the next start does not recover the segments).
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$KAFKA_STOP_TIMEOUT"; then
        warn "kafka (pid $pid) did not exit within ${KAFKA_STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "kafka (pid $pid) survived SIGKILL"
    fi
    rm -f "$RUN/kafka.pid"
    say "kafka: stopped (pid $pid)"
}

# --- the env file --------------------------------------------------------------------------------

write_env() {
    local tmp=$ENV_FILE.tmp.$$
    cat >"$tmp" <<EOF
# Written by scripts/stack.sh up on $(date '+%F %T'); do not edit. Use: . $(rel "$ENV_FILE")
export STACK_REDIS_PORT=$REDIS_PORT
export STACK_PG_PORT=$PG_PORT
export STACK_KAFKA_PORT=$KAFKA_PORT
export STACK_KAFKA_CONTROLLER_PORT=$KAFKA_CPORT
export STACK_KAFKA_PARTITIONS=$PARTITIONS
export STACK_KAFKA_TOPIC=$TOPIC
export REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
export KAFKA_TOPIC=$TOPIC
export KAFKA_DLQ_TOPIC=$DLQ_TOPIC
export PG_DSN='$(pg_dsn)'
EOF
    mv -f "$tmp" "$ENV_FILE"
}

# --- commands ----------------------------------------------------------------------------------

take_lock() { # one up/down at a time (make -j, two terminals)
    mkdir -p "$RUN" "$LOGDIR"
    exec 9>"$RUN/stack.lock"
    flock -w 300 9 || die "another scripts/stack.sh is still running (lock $(rel "$RUN/stack.lock"))"
}

# Before starting anything: every server that is not running must find its ports free, so a
# busy port fails the whole `up` instead of leaving half a stack behind.
preflight() {
    redis_pid >/dev/null || check_port_free "$REDIS_PORT" STACK_REDIS_PORT
    pg_preflight
    if ! kafka_pid >/dev/null; then
        check_port_free "$KAFKA_PORT" STACK_KAFKA_PORT
        check_port_free "$KAFKA_CPORT" STACK_KAFKA_CONTROLLER_PORT
    fi
}

cmd_up() {
    local t0=$SECONDS
    check_settings
    ensure_deps
    take_lock
    preflight
    KAFKA_STARTED=0
    kafka_launch # first: the JVM is the slowest to come up
    redis_up
    pg_up
    kafka_wait
    kafka_topics
    PG_DSN=$(pg_dsn) "$ROOT/scripts/migrate.sh" | sed 's/^/stack: /'
    write_env
    say "up in $((SECONDS - t0))s: redis 127.0.0.1:$REDIS_PORT, postgres 127.0.0.1:$PG_PORT/$PG_DB," \
        "kafka 127.0.0.1:$KAFKA_PORT ($TOPIC x$PARTITIONS, $DLQ_TOPIC x1)"
    say "env: . $(rel "$ENV_FILE")"
}

# down [--purge | SERVER...]: stop every server, or only the named ones (their data stays, and
# `up` starts just those again on the ports in the environment).
cmd_down() {
    local purge=0 arg
    local -A only=()
    for arg in "$@"; do
        case $arg in
            --purge) purge=1 ;;
            redis | postgres | kafka) only[$arg]=1 ;;
            *) die "down: unknown argument '$arg' (--purge, or server names: redis postgres kafka)" ;;
        esac
    done
    if ((purge && ${#only[@]})); then
        die "down --purge deletes the whole stack's data; it takes no server names"
    fi
    if [[ ! -d $VAR ]]; then
        say "nothing to stop"
        return 0
    fi
    take_lock
    if ((${#only[@]} == 0)); then only=([kafka]=1 [redis]=1 [postgres]=1); fi
    if [[ -n ${only[kafka]:-} ]]; then kafka_down; fi
    if [[ -n ${only[redis]:-} ]]; then redis_down; fi
    if [[ -n ${only[postgres]:-} ]]; then pg_down; fi
    if ((purge)); then
        local extra
        extra=$(pg_purge)
        rm -rf "$REDIS_DIR" "$KAFKA_DIR" "$ENV_FILE" "$RUN"/*.port
        say "purged $(rel "$REDIS_DIR") $extra $(rel "$KAFKA_DIR") $(rel "$ENV_FILE") (kept $(rel "$KAFKA_LIBS"), $(rel "$LOGDIR"))"
    fi
}

cmd_status() {
    local pid all=0 port
    if pid=$(redis_pid 2>/dev/null); then
        port=$(cat "$RUN/redis.port" 2>/dev/null || echo "?")
        printf 'redis     running  pid %-7s port %s\n' "$pid" "$port"
    else
        echo "redis     stopped"
        all=1
    fi
    pg_status || all=1
    if pid=$(kafka_pid 2>/dev/null); then
        port=$(cat "$RUN/kafka.port" 2>/dev/null || echo "?")
        printf 'kafka     running  pid %-7s port %s\n' "$pid" "$port"
    else
        echo "kafka     stopped"
        all=1
    fi
    return "$all"
}

cmd_topic() { # cmd_topic create NAME PARTITIONS | delete NAME
    local action=${1:-} name=${2:-} parts=${3:-}
    [[ $name =~ ^[A-Za-z0-9._-]{1,200}$ ]] || die "topic: '$name' is not a valid Kafka topic name"
    local pid
    pid=$(kafka_pid) || die "topic: the Kafka broker is not running (scripts/stack.sh up)"
    KAFKA_PORT=$(running_port kafka "$KAFKA_PORT" STACK_KAFKA_PORT)
    case "$action" in
        create)
            [[ $parts =~ ^[1-9][0-9]*$ ]] || die "topic create: PARTITIONS must be a positive number"
            kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
                --create --topic "$name" --partitions "$parts" --replication-factor 1 \
                --config retention.ms=-1 --config retention.bytes=-1 >/dev/null ||
                die "topic create: TopicCommand failed for $name"
            ;;
        delete)
            kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
                --delete --topic "$name" >/dev/null || die "topic delete: TopicCommand failed for $name"
            ;;
        *) die "topic: say 'create NAME PARTITIONS' or 'delete NAME'" ;;
    esac
}

case "${1:-}" in
    topic) shift; cmd_topic "$@" ;;
    pg-promote) shift; take_lock; pg_promote "$@" ;;
    up) shift; (($# == 0)) || die "up takes no arguments"; cmd_up ;;
    down) shift; cmd_down "$@" ;;
    status) cmd_status ;;
    env)
        echo "$ENV_FILE"
        [[ -f $ENV_FILE ]] || { warn "$ENV_FILE does not exist yet: run scripts/stack.sh up"; exit 1; }
        ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
