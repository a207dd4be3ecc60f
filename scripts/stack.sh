#!/usr/bin/env bash
# stack.sh - the real local stack on loopback: Redis (one server, or a Redis Cluster of six with
# STACK_REDIS_CLUSTER=1), PostgreSQL and Kafka (KRaft: one node, or a cluster of three with
# STACK_KAFKA_BROKERS=3).
#
#   scripts/stack.sh up [SERVER...]   start what is not running, create topics, migrate, write env;
#                                     or start only the named servers; a Kafka or Redis cluster
#                                     node started again is waited for until it is back in its
#                                     cluster
#   scripts/stack.sh down [SERVER...] stop what `up` started, or only the named servers (redis =
#                                     every Redis node, postgres, kafka = every Kafka node, and
#                                     with STACK_KAFKA_BROKERS=3 kafka-1..3, kafka-controller-1..3,
#                                     with STACK_REDIS_CLUSTER=1 redis-1..6)
#   scripts/stack.sh down --purge     stop everything and delete all its data
#   scripts/stack.sh kill SERVER...   SIGKILL, a crash (chaos tests): redis, kafka, kafka-1..3,
#                                     kafka-controller-1..3, redis-1..6
#   scripts/stack.sh status           one line per server, Kafka node and Redis node (with its
#                                     role in a Redis cluster); exit 0 only if all run
#   scripts/stack.sh env              print the path of the env file written by `up`
#   scripts/stack.sh pg-promote       promote the PostgreSQL standby (STACK_PG_STANDBY=1) to primary
#   scripts/stack.sh topic create NAME PARTITIONS | topic delete NAME
#                                     a topic of its own for a test or benchmark run (unlimited
#                                     retention like the others); a broker must be running
#
# After `up`:  . var/stack.env   (REDIS_URL, KAFKA_BROKERS, KAFKA_TOPIC, KAFKA_DLQ_TOPIC, PG_DSN)
#
# Everything lives under var/ (ignored by git): var/redis (or var/redis-1..6), var/pg, var/kafka
# (data), var/run/*.pid|*.port (what runs, on which port), var/log/*.log, var/stack.env.
# STACK_KAFKA_EXTRA_CONFIG=FILE and STACK_PG_EXTRA_CONFIG=FILE append a file's lines to the
# broker's server.properties / PostgreSQL's settings (a test's TLS listener, say).
# STACK_VAR=/some/dir puts all of that under another directory instead, for a second, private
# stack next to the shared one (give it other ports too); the Kafka jars stay in var/kafka-libs.
# Every server listens on 127.0.0.1 only. Ports and topic settings come from the environment:
#   STACK_REDIS_PORT=16379 STACK_PG_PORT=15432 STACK_KAFKA_PORT=19092
#   STACK_KAFKA_CONTROLLER_PORT=19093 STACK_KAFKA_PARTITIONS=4 STACK_KAFKA_TOPIC=stockpipe.events
# (the dead-letter topic is "$STACK_KAFKA_TOPIC.dlq", 1 partition). STACK_PG_STANDBY_PORT
# (default STACK_PG_PORT+1) is kept free for the PostgreSQL standby.
#
# STACK_KAFKA_BROKERS=3 (default 1) runs a KRaft cluster of six JVMs: the brokers kafka-1..3
# (broker N on STACK_KAFKA_PORT+100*(N-1)) and the controllers kafka-controller-1..3 (three
# voters, a quorum of 2; controller N on STACK_KAFKA_CONTROLLER_PORT+100*(N-1)), each with its
# directory var/NODE (data/ inside), var/run/NODE.pid, var/log/NODE.log; the cluster id is kept
# in var/kafka-cluster.id. The controllers are separate JVMs so that they outlive the brokers a
# chaos test kills (why: deploy/kafka-local/server.properties.in). Every topic has 3 replicas and
# min.insync.replicas=2: with one broker down acks=all writes go on; with two down they fail
# with NOT_ENOUGH_REPLICAS; no unclean leader election. A node whose directory (var/NODE, or
# var/NODE/data) was deleted while it was down - a lost disk - is formatted again by `up` and
# rejoins: a broker's replicas copy from the others, a controller is swapped into the voter set
# (KIP-853); `up` waits for both. Use the same STACK_KAFKA_BROKERS for every command of one
# stack; `down` and `down --purge` stop and delete the Kafka nodes of either kind.
#
# STACK_REDIS_CLUSTER=1 (default 0: one redis-server) runs a Redis Cluster of six redis-server
# nodes redis-1..6 (node N on STACK_REDIS_PORT+100*(N-1), its cluster bus on
# STACK_REDIS_BUS_PORT+100*(N-1), default STACK_REDIS_PORT+10000), each with its directory
# var/redis-N (nodes.conf, AOF), var/run/redis-N.pid, var/log/redis-N.log. The first `up` makes
# them a cluster of 3 primaries with a replica each (redis-cli --cluster create) and keeps its
# ports in var/redis-cluster.ports (a cluster's nodes know each other by address, so its ports
# stay); later `up`s restart the nodes from their nodes.conf. `up` waits until every node that
# runs reports cluster_state:ok with all 16384 slots served (STACK_REDIS_CLUSTER_TIMEOUT, 60 s).
# cluster-node-timeout is STACK_REDIS_NODE_TIMEOUT_MS (3000): a primary killed is replaced by its
# replica within ~5 s. A node whose directory was deleted while it was down - a lost disk - comes
# back empty on `up` and joins as the replica of a primary that has none (its old id forgotten);
# `up` waits until it is synced. REDIS_URL is then redis-cluster://127.0.0.1:P1,127.0.0.1:P2,
# 127.0.0.1:P3 (redis-1..3 as seeds). Use the same STACK_REDIS_CLUSTER for every command of one
# stack; `down redis` and `down --purge` stop and delete Redis of either kind. Details:
# scripts/stack-redis.sh.
#
# The PostgreSQL cluster is throwaway and local-only: it trusts every connection from 127.0.0.1
# without a password and has no Unix socket. Never point it at a non-loopback address.
#
# `down` and `kill` only ever signal the pids recorded in var/run (checked against
# /proc/PID/cmdline), never processes found by name.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VAR=${STACK_VAR:-$ROOT/var}
[[ $VAR == /* ]] || VAR=$PWD/$VAR
RUN=$VAR/run
LOGDIR=$VAR/log
ENV_FILE=$VAR/stack.env
DEPLOY=$ROOT/deploy/kafka-local
KAFKA_LIBS=$ROOT/var/kafka-libs # installed by scripts/install-deps.sh, shared by every stack
KAFKA_DIR=$VAR/kafka # the one broker; kafka-N's directory is $VAR/kafka-N
# STACK_KAFKA_BROKERS=3: kept outside the nodes' directories, so a node that lost its directory
# is formatted again into the same cluster; the ports the cluster was made with (its voters'
# addresses are in its metadata log, so they cannot change while its data lives).
CLUSTER_ID_FILE=$VAR/kafka-cluster.id
CLUSTER_PORTS_FILE=$VAR/kafka-cluster.ports
REDIS_DIR=$VAR/redis
PG_BASE=$VAR/pg
PG_DATADIR_FILE=$VAR/pg.datadir # present only when the data dir had to go under /tmp

REDIS_PORT=${STACK_REDIS_PORT:-16379}
PG_PORT=${STACK_PG_PORT:-15432}
KAFKA_PORT=${STACK_KAFKA_PORT:-19092}
KAFKA_CPORT=${STACK_KAFKA_CONTROLLER_PORT:-19093}
BROKERS=${STACK_KAFKA_BROKERS:-1}
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

# JVMs of the Kafka nodes. G1 as in Kafka's kafka-server-start.sh. STACK_KAFKA_BROKERS=3 runs six
# JVMs on this 2-core machine: smaller heaps for its brokers, and for its controllers (small
# metadata, little work) a serial GC, C1 only and a heap of 128 MB at most.
G1=(-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent)
BROKER_HEAP=(-Xms128m -Xmx384m)
CONTROLLER_JVM=(-Xms64m -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1)

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
    PG_STANDBY_PORT=${STACK_PG_STANDBY_PORT:-$((PG_PORT + 1))}
    for name in STACK_REDIS_PORT STACK_PG_PORT STACK_PG_STANDBY_PORT STACK_KAFKA_PORT STACK_KAFKA_CONTROLLER_PORT; do
        case $name in
            STACK_REDIS_PORT) v=$REDIS_PORT ;;
            STACK_PG_PORT) v=$PG_PORT ;;
            STACK_PG_STANDBY_PORT) v=$PG_STANDBY_PORT ;;
            STACK_KAFKA_PORT) v=$KAFKA_PORT ;;
            STACK_KAFKA_CONTROLLER_PORT) v=$KAFKA_CPORT ;;
        esac
        [[ $v =~ ^[0-9]+$ ]] && ((v >= 1024 && v <= 65535)) || die "$name='$v' is not a port in 1024..65535"
    done
    # Every port the stack may listen on, with the setting it comes from (brokers and controllers
    # 2 and 3 take theirs at +100 and +200, Redis cluster nodes 2..6 at +100..+500).
    local -a ports=() what=()
    local node port i j redis_ports
    redis_ports=$(redis_check_settings) || exit 1
    while IFS=$'\t' read -r port node; do
        ports+=("$port")
        what+=("$node")
    done <<<"$redis_ports"
    ports+=("$PG_PORT" "$PG_STANDBY_PORT")
    what+=(STACK_PG_PORT "STACK_PG_STANDBY_PORT (the PostgreSQL standby; default STACK_PG_PORT+1)")
    for node in $(kafka_nodes); do
        for port in $(node_ports "$node"); do
            ports+=("$port")
            what+=("$(port_setting "$node" "$port")")
        done
    done
    for i in "${!ports[@]}"; do
        ((ports[i] <= 65535)) || die "${what[i]} would be ${ports[i]}, not a port; choose a lower STACK_KAFKA_PORT / STACK_KAFKA_CONTROLLER_PORT"
        for ((j = i + 1; j < ${#ports[@]}; j++)); do
            ((ports[i] != ports[j])) || die "port ${ports[i]} would serve both ${what[i]} and ${what[j]}; the stack's ports must all differ"
        done
    done
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

# Redis: the one server, or the cluster of six (STACK_REDIS_CLUSTER=1), lives in its own file.
# shellcheck source=scripts/stack-redis.sh
. "$ROOT/scripts/stack-redis.sh"

# PostgreSQL: the primary (and the optional streaming standby) live in their own file.
# shellcheck source=scripts/stack-postgres.sh
. "$ROOT/scripts/stack-postgres.sh"

# --- Kafka ---------------------------------------------------------------------------------------

# The nodes. One broker: "kafka", broker and controller in one JVM. STACK_KAFKA_BROKERS=3: the
# brokers kafka-1..kafka-3 (node ids 1..3) and the controllers kafka-controller-1..3 (node ids
# 101..103), one JVM each (why separate: deploy/kafka-local/server.properties.in). A node's files
# are named after it: $VAR/NODE/ (server.properties, data/), $RUN/NODE.pid, $RUN/NODE.port (a
# controller's: its controller port), $LOGDIR/NODE.log; the one broker keeps its controller port
# in $RUN/kafka.controller.port.
kafka_brokers() {
    if ((BROKERS == 1)); then echo kafka; else seq -f 'kafka-%g' 1 "$BROKERS"; fi
}
kafka_controllers() { if ((BROKERS > 1)); then seq -f 'kafka-controller-%g' 1 "$BROKERS"; fi; }
kafka_nodes() { kafka_controllers; kafka_brokers; } # controllers first: the brokers need them
# Every node either kind of stack may have left running (down, kill and status look at all).
ALL_KAFKA_NODES=(kafka kafka-1 kafka-2 kafka-3 kafka-controller-1 kafka-controller-2 kafka-controller-3)
case $BROKERS in # replication factor and min.insync.replicas of every topic
    1) RF=1 MIN_ISR=1 ;; # topics are created without a min.insync.replicas of their own
    3) RF=3 MIN_ISR=2 ;;
    *) [[ ${1:-} == @(-h|--help|help) ]] || die "STACK_KAFKA_BROKERS='$BROKERS' must be 1 (one broker) or 3 (a cluster)" ;;
esac

node_index() { if [[ $1 == kafka ]]; then echo 1; else echo "${1##*-}"; fi; }
is_controller() { [[ $1 == kafka-controller-* ]]; }
node_id() { if is_controller "$1"; then echo $((100 + $(node_index "$1"))); else node_index "$1"; fi; }
node_port() { echo $((KAFKA_PORT + 100 * ($(node_index "$1") - 1))); }        # a broker's
node_cport() { echo $((KAFKA_CPORT + 100 * ($(node_index "$1") - 1))); }      # a controller's
node_ports() { # the ports NODE listens on
    case $1 in
        kafka) echo "$KAFKA_PORT $KAFKA_CPORT" ;;
        kafka-controller-*) node_cport "$1" ;;
        *) node_port "$1" ;;
    esac
}

# port_setting NODE PORT: the setting NODE's PORT comes from, for messages.
port_setting() {
    local node=$1 setting=STACK_KAFKA_PORT off
    if [[ $node == kafka-controller-* || ($node == kafka && $2 == "$KAFKA_CPORT") ]]; then
        setting=STACK_KAFKA_CONTROLLER_PORT
    fi
    off=$((100 * ($(node_index "$node") - 1)))
    if ((off)); then echo "$node's port ($setting+$off)"; else echo "$setting"; fi
}

# check_node_ports_free NODE: fail, naming the setting, if a port of NODE is taken.
check_node_ports_free() {
    local port
    for port in $(node_ports "$1"); do
        check_port_free "$port" "$(port_setting "$1" "$port")"
    done
}

kafka_node_pid() { pid_from "$RUN/$1.pid" kafka.Kafka "$VAR/$1/server.properties"; }
kafka_pid() { kafka_node_pid kafka; }

# kafka_live_brokers: the brokers of this stack that run, one a line.
kafka_live_brokers() {
    local node
    for node in $(kafka_brokers); do
        if kafka_node_pid "$node" >/dev/null 2>&1; then echo "$node"; fi
    done
}

# kafka_nodes_running: every node of either kind with a live recorded pid, brokers first (the
# order to stop them in: a broker's controlled shutdown needs the controllers).
kafka_nodes_running() {
    local node
    for node in kafka kafka-1 kafka-2 kafka-3 kafka-controller-1 kafka-controller-2 kafka-controller-3; do
        if kafka_node_pid "$node" >/dev/null 2>&1; then echo "$node"; fi
    done
}

# kafka_bootstrap [BROKER...]: "127.0.0.1:P1,127.0.0.1:P2,..." (default: every broker of this
# stack), for a client that may reach any of them (kcat -b, --bootstrap-server).
kafka_bootstrap() {
    local node list=()
    if (($# == 0)); then mapfile -t list < <(kafka_brokers); set -- "${list[@]}"; list=(); fi
    for node in "$@"; do list+=("127.0.0.1:$(node_port "$node")"); done
    local IFS=,
    echo "${list[*]}"
}

kafka_tool() { # kafka_tool CLASS ARGS...: run a Kafka command-line tool from the broker's jars
    java "${TOOL_JVM[@]}" -cp "$KAFKA_LIBS/*" "$@"
}

sed_escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }

# new_uuid: a Kafka Uuid (16 random bytes, URL-safe base64 without padding) made here, not by a
# JVM (StorageTool random-uuid takes a second); never starting with "-", like Kafka's own.
new_uuid() {
    local id=-
    while [[ $id == -* ]]; do
        id=$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    done
    echo "$id"
}

# kafka_render_config NODE: its server.properties from the template.
kafka_render_config() {
    local node=$1 dir=$VAR/$1 roles quorum listeners advertised autojoin=false
    mkdir -p "$dir/data"
    case $node in
        kafka)
            roles=broker,controller
            quorum="controller.quorum.voters=1@127.0.0.1:$KAFKA_CPORT"
            listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CPORT
            advertised=PLAINTEXT://127.0.0.1:$KAFKA_PORT
            ;;
        kafka-controller-*)
            roles=controller
            # Advertised: a controller that joins the quorum announces it as its voter endpoint.
            listeners=CONTROLLER://127.0.0.1:$(node_cport "$node")
            advertised=$listeners
            autojoin=true
            ;;
        *)
            roles=broker
            listeners=PLAINTEXT://127.0.0.1:$(node_port "$node")
            advertised=$listeners
            ;;
    esac
    if ((BROKERS > 1)); then # the voters are in the log; these are only the places to ask
        local n c=()
        for n in $(kafka_controllers); do c+=("127.0.0.1:$(node_cport "$n")"); done
        quorum="controller.quorum.bootstrap.servers=$(IFS=,; echo "${c[*]}")"
    fi
    local tmp=$dir/server.properties.tmp
    sed -e "s|@ROLES@|$roles|g" \
        -e "s|@NODE_ID@|$(node_id "$node")|g" \
        -e "s|@QUORUM@|$quorum|g" \
        -e "s|@AUTO_JOIN@|$autojoin|g" \
        -e "s|@LISTENERS@|$listeners|g" \
        -e "s|@ADVERTISED_LISTENERS@|$advertised|g" \
        -e "s|@PARTITIONS@|$PARTITIONS|g" \
        -e "s|@REPLICATION_FACTOR@|$RF|g" \
        -e "s|@MIN_ISR@|$MIN_ISR|g" \
        -e "s|@LOG_DIRS@|$(sed_escape "$dir/data")|g" \
        "$DEPLOY/server.properties.in" >"$tmp"
    if [[ -n ${STACK_KAFKA_EXTRA_CONFIG:-} ]]; then # a test's own settings (a later key wins)
        [[ -r $STACK_KAFKA_EXTRA_CONFIG ]] || die "STACK_KAFKA_EXTRA_CONFIG=$STACK_KAFKA_EXTRA_CONFIG is not a readable file"
        printf '\n# from STACK_KAFKA_EXTRA_CONFIG=%s\n' "$STACK_KAFKA_EXTRA_CONFIG" >>"$tmp"
        cat "$STACK_KAFKA_EXTRA_CONFIG" >>"$tmp"
    fi
    mv "$tmp" "$dir/server.properties"
}

# The one broker's storage: the cluster id is made once and kept in its directory.
kafka_format_single() {
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
            -c "$KAFKA_DIR/server.properties" >>"$LOGDIR/kafka.log" 2>&1 ||
            { tail_log "$LOGDIR/kafka.log"; die "kafka storage format failed (log: $(rel "$LOGDIR/kafka.log"))"; }
    fi
}

# kafka_cluster_check_ports: the cluster's data was made with these ports (CLUSTER_PORTS_FILE).
kafka_cluster_check_ports() {
    local node made
    [[ -s $CLUSTER_PORTS_FILE ]] || return 0
    made=$(cat "$CLUSTER_PORTS_FILE")
    [[ $made != "$KAFKA_PORT $KAFKA_CPORT" ]] || return 0
    for node in $(kafka_controllers); do
        if [[ -f $VAR/$node/data/meta.properties ]]; then
            die "the 3-broker Kafka cluster's data was made with STACK_KAFKA_PORT=${made% *} STACK_KAFKA_CONTROLLER_PORT=${made#* } (the controllers' addresses are in its log); use those, or start afresh with scripts/stack.sh down --purge"
        fi
    done
}

has_storage() { [[ -f $VAR/$1/data/meta.properties ]] || kafka_node_pid "$1" >/dev/null 2>&1; }

# kafka_format_cluster NODE...: format the storage of the given (stopped) nodes that have none;
# the decision looks at all six (a running node counts as having its storage).
#  - No controller has any: a new cluster. All three controllers are formatted with the same
#    voter set (--initial-controllers: node id, controller address and a metadata directory id
#    each), the brokers with the cluster id alone.
#  - One controller lost its storage, two kept theirs: it is formatted with
#    --no-initial-controllers, starts as an observer, copies the metadata log, and auto-join
#    (controller.quorum.auto.join.enable) swaps the voter entry of its old directory for the new
#    one. The marker NODE/joining makes `up` wait until the quorum lists it (kafka_quorum_wait),
#    however often `up` is re-run.
#  - Two or three controllers of a formed cluster lost theirs: the one voter left is no quorum,
#    and forcing one would risk committed metadata; only a fresh start helps.
#  - A broker that lost its storage is formatted again with the cluster id: it registers anew
#    and its replicas copy the partitions from the leaders (kafka_replicas_wait) - unless every
#    broker lost its storage while the controllers kept the topics: then the messages are gone.
kafka_format_cluster() {
    local node have=() lost=() brokers_lost=() brokers_have=() starting
    starting=$(printf '%s\n' "$@")
    for node in $(kafka_controllers); do
        if has_storage "$node"; then have+=("$node"); else lost+=("$node"); fi
    done
    for node in $(kafka_brokers); do
        if has_storage "$node"; then brokers_have+=("$node"); else brokers_lost+=("$node"); fi
    done
    if ((${#have[@]} == 0 && ${#brokers_have[@]})); then
        die "the controllers' storage is gone but ${brokers_have[*]} kept theirs: their topics are unknown to new controllers; start afresh with scripts/stack.sh down --purge"
    fi
    if ((${#have[@]} && ${#lost[@]} > 1)); then
        die "${lost[*]} lost their storage and only ${have[*]} kept it: the controller quorum needs 2 of its 3 voters, so the cluster cannot be restored; start afresh with scripts/stack.sh down --purge"
    fi
    if ((${#have[@]} && ${#brokers_have[@]} == 0)); then
        die "every broker (${brokers_lost[*]}) lost its storage: the topics' messages are gone; start afresh with scripts/stack.sh down --purge"
    fi
    if [[ ! -s $CLUSTER_ID_FILE ]]; then # made once; recovered from a node if the file went
        local id=""
        for node in "${have[@]}" "${brokers_have[@]}"; do
            id=$(sed -n 's/^cluster\.id=//p' "$VAR/$node/data/meta.properties" 2>/dev/null) && [[ -n $id ]] && break
        done
        [[ -n $id ]] || id=$(new_uuid)
        echo "$id" >"$CLUSTER_ID_FILE"
    fi
    local cid
    cid=$(cat "$CLUSTER_ID_FILE")
    if ((${#have[@]} == 0)); then
        for node in "${lost[@]}"; do
            grep -qx -- "$node" <<<"$starting" ||
                die "$node has no storage yet: a new cluster is started whole (scripts/stack.sh up, no server names)"
        done
    fi
    # Only the nodes `up` starts now are formatted; the others when they are started.
    local keep=() n
    for n in "${lost[@]}"; do if grep -qx -- "$n" <<<"$starting"; then keep+=("$n"); fi; done
    lost=("${keep[@]}")
    keep=()
    for n in "${brokers_lost[@]}"; do if grep -qx -- "$n" <<<"$starting"; then keep+=("$n"); fi; done
    brokers_lost=("${keep[@]}")
    ((${#lost[@]} + ${#brokers_lost[@]})) || return 0

    local pids=() names=() voters=() initial=""
    if ((${#have[@]} == 0)); then
        for n in $(kafka_controllers); do
            voters+=("$(node_id "$n")@127.0.0.1:$(node_cport "$n"):$(new_uuid)")
        done
        initial=$(IFS=,; echo "${voters[*]}")
        say "kafka: formatting the storage of a new cluster (cluster id $cid; voters $initial)"
        echo "$KAFKA_PORT $KAFKA_CPORT" >"$CLUSTER_PORTS_FILE"
    elif ((${#lost[@]})); then
        say "${lost[0]}: its storage is gone (a lost disk?): formatting it afresh; it rejoins the quorum as a new voter"
    fi
    if ((${#have[@]})); then
        for node in "${brokers_lost[@]}"; do
            say "$node: its storage is gone (a lost disk?): formatting it afresh; its replicas copy from ${brokers_have[*]}"
        done
    fi
    for node in "${lost[@]}" "${brokers_lost[@]}"; do # in parallel: each StorageTool is a JVM start
        local how=()
        if is_controller "$node"; then
            if [[ -n $initial ]]; then how=(--initial-controllers "$initial"); else how=(--no-initial-controllers); fi
        fi
        kafka_tool kafka.tools.StorageTool format -t "$cid" -c "$VAR/$node/server.properties" \
            "${how[@]}" >>"$LOGDIR/$node.log" 2>&1 9>&- &
        pids+=($!)
        names+=("$node")
    done
    local i failed=0
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            tail_log "$LOGDIR/${names[$i]}.log"
            warn "${names[$i]}: kafka storage format failed (log: $(rel "$LOGDIR/${names[$i]}.log"))"
            failed=1
        fi
    done
    if ((failed)); then
        # A new cluster is formatted whole or not at all: a retry must not take the nodes
        # formatted this time for survivors.
        if ((${#have[@]} == 0)); then
            for node in "${names[@]}"; do rm -rf "${VAR:?}/$node/data"; done
        fi
        die "kafka storage format failed"
    fi
    if ((${#have[@]} && ${#lost[@]})); then touch "$VAR/${lost[0]}/joining"; fi
}

# kafka_start NODE: launch its JVM (no waiting: it boots while the others and Redis and
# PostgreSQL start).
kafka_start() {
    local node=$1 jvm
    case $node in
        # Heap and GC flags as in Kafka's kafka-server-start.sh, with a smaller heap for a 2-core,
        # shared development machine.
        kafka) jvm=(-Xms256m -Xmx768m "${G1[@]}") ;;
        kafka-controller-*) jvm=("${CONTROLLER_JVM[@]}") ;;
        *) jvm=("${BROKER_HEAP[@]}" "${G1[@]}") ;;
    esac
    echo "--- kafka start $(date '+%F %T')" >>"$LOGDIR/$node.log"
    launch "$RUN/$node.pid" "$LOGDIR/$node.log" \
        java "${jvm[@]}" -XX:+ExitOnOutOfMemoryError -XX:-UsePerfData -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=file:$DEPLOY/log4j2.properties" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$VAR/$node/server.properties"
    case $node in
        kafka) echo "$KAFKA_PORT" >"$RUN/kafka.port"; echo "$KAFKA_CPORT" >"$RUN/kafka.controller.port" ;;
        kafka-controller-*) node_cport "$node" >"$RUN/$node.port" ;;
        *) node_port "$node" >"$RUN/$node.port" ;;
    esac
    KAFKA_STARTED+=("$node")
}

# kafka_other_kind: die if nodes of the other kind (one broker vs. three) of this stack run:
# they hold the ports, and the env file would name the wrong ones.
kafka_other_kind() {
    local node running=()
    for node in $(kafka_nodes_running); do
        if ! grep -qx -- "$node" <<<"$(kafka_nodes)"; then running+=("$node"); fi
    done
    ((${#running[@]} == 0)) ||
        die "this stack runs ${running[*]}, Kafka of the other kind than STACK_KAFKA_BROKERS=$BROKERS; stop it first (scripts/stack.sh down kafka) or use the STACK_KAFKA_BROKERS it was started with"
}

# kafka_wanted NODE: `up` is to start NODE: all nodes, or those named (KAFKA_ONLY, set by `up`
# with server names; maybe empty).
kafka_wanted() { [[ -z ${KAFKA_ONLY+x} ]] || grep -qx -- "$1" <<<"$KAFKA_ONLY"; }

# Start the nodes that do not run and are wanted (formatting storage first where needed), without
# waiting. KAFKA_EXPECTED: the nodes that should then run (those running and those started).
kafka_launch() {
    local node pid todo=()
    KAFKA_STARTED=() KAFKA_EXPECTED=()
    kafka_other_kind
    ((BROKERS == 1)) || kafka_cluster_check_ports
    for node in $(kafka_nodes); do
        if pid=$(kafka_node_pid "$node"); then
            KAFKA_EXPECTED+=("$node")
            if ((BROKERS == 1)); then
                KAFKA_PORT=$(running_port kafka "$KAFKA_PORT" STACK_KAFKA_PORT)
                KAFKA_CPORT=$(running_port kafka.controller "$KAFKA_CPORT" STACK_KAFKA_CONTROLLER_PORT)
            elif [[ $(cat "$RUN/$node.port" 2>/dev/null) != "$(node_ports "$node")" ]]; then
                die "$node runs on port $(cat "$RUN/$node.port" 2>/dev/null || echo '?'), not $(node_ports "$node") (STACK_KAFKA_PORT=$KAFKA_PORT STACK_KAFKA_CONTROLLER_PORT=$KAFKA_CPORT); use the ports it was started with, or scripts/stack.sh down kafka first"
            fi
            if kafka_wanted "$node"; then
                say "$node: already running (pid $pid, port $(node_ports "$node" | sed 's/ .*//'))"
            fi
        elif kafka_wanted "$node"; then
            todo+=("$node")
        fi
    done
    ((${#todo[@]})) || return 0
    for node in "${todo[@]}"; do
        check_node_ports_free "$node"
        kafka_render_config "$node"
    done
    if ((BROKERS == 1)); then kafka_format_single; else kafka_format_cluster "${todo[@]}"; fi
    for node in "${todo[@]}"; do kafka_start "$node"; done
    KAFKA_EXPECTED+=("${todo[@]}")
}

# Wait until the metadata (asked of any broker) lists every broker that should run
# (KAFKA_EXPECTED): a broker is listed once the controller quorum has registered and unfenced it.
# Every node that should run must stay up meanwhile.
kafka_wait() {
    local node pid md missing deadline=$((SECONDS + KAFKA_START_TIMEOUT)) all brokers=()
    for node in "${KAFKA_EXPECTED[@]}"; do
        if ! is_controller "$node"; then brokers+=("$node"); fi
    done
    ((${#brokers[@]})) || return 0 # only controllers (up kafka-controller-N): nothing to list
    while :; do
        missing=()
        all=1
        for node in "${brokers[@]}"; do port_busy "$(node_port "$node")" || { all=0; break; }; done
        if ((all)) && md=$(kcat -b "$(kafka_bootstrap "${brokers[@]}")" -L -m 5 2>/dev/null); then
            for node in "${brokers[@]}"; do
                grep -q "broker $(node_id "$node") at 127.0.0.1:$(node_port "$node")" <<<"$md" ||
                    missing+=("$node")
            done
        else
            missing=("${brokers[@]}")
        fi
        ((${#missing[@]})) || break
        for node in "${KAFKA_EXPECTED[@]}"; do
            pid=$(cat "$RUN/$node.pid" 2>/dev/null) || pid=""
            if [[ -z $pid ]] || ! proc_is "$pid" kafka.Kafka; then
                tail_log "$LOGDIR/$node.log" 40
                die "the Kafka node $node exited during start-up (log: $(rel "$LOGDIR/$node.log"))"
            fi
        done
        if ((SECONDS >= deadline)); then
            node=${missing[0]}
            tail_log "$LOGDIR/$node.log" 40
            die "the Kafka metadata did not list ${missing[*]} within ${KAFKA_START_TIMEOUT}s (STACK_KAFKA_START_TIMEOUT; the JVMs still run; log: $(rel "$LOGDIR/$node.log"); scripts/stack.sh down stops them)"
        fi
        sleep 0.5
    done
    for node in "${KAFKA_STARTED[@]}"; do
        case $node in
            kafka) say "kafka: started (pid $(cat "$RUN/kafka.pid"), port $KAFKA_PORT, controller $KAFKA_CPORT)" ;;
            kafka-controller-*) say "$node: started (pid $(cat "$RUN/$node.pid"), controller port $(node_cport "$node"))" ;;
            *) say "$node: started (pid $(cat "$RUN/$node.pid"), port $(node_port "$node"))" ;;
        esac
    done
    return 0
}

# kafka_quorum_wait: a controller formatted after a lost disk (NODE/joining) is a voter again,
# with its new metadata directory, in the quorum's own view (DescribeQuorum). Until then the
# loss of one more controller would leave the quorum without a majority.
kafka_quorum_wait() {
    local node joining=() dirid out voters deadline=$((SECONDS + KAFKA_START_TIMEOUT)) t0=$SECONDS
    for node in $(kafka_controllers); do
        if [[ -f $VAR/$node/joining ]] && kafka_node_pid "$node" >/dev/null 2>&1; then joining+=("$node"); fi
    done
    ((${#joining[@]})) || return 0
    for node in "${joining[@]}"; do
        dirid=$(sed -n 's/^directory\.id=//p' "$VAR/$node/data/meta.properties")
        until
            out=$(kafka_tool org.apache.kafka.tools.MetadataQuorumCommand --bootstrap-controller \
                "$(quorum_bootstrap)" describe --status 2>&1) &&
                voters=$(sed -n 's/^CurrentVoters:[[:space:]]*//p' <<<"$out") &&
                grep -q "\"id\": *$(node_id "$node"), *\"directoryId\": *\"$dirid\"" <<<"$voters"
        do
            if ((SECONDS >= deadline)); then
                sed 's/^/    | /' <<<"$out" >&2
                die "$node did not rejoin the controller quorum (directory $dirid) within ${KAFKA_START_TIMEOUT}s (STACK_KAFKA_START_TIMEOUT; log: $(rel "$LOGDIR/$node.log"))"
            fi
            sleep 1
        done
        rm -f "$VAR/$node/joining"
        say "$node: a voter of the controller quorum again (directory $dirid, $((SECONDS - t0))s)"
    done
}

quorum_bootstrap() { # the controllers that run, for --bootstrap-controller
    local node list=()
    for node in $(kafka_controllers); do
        if kafka_node_pid "$node" >/dev/null 2>&1; then list+=("127.0.0.1:$(node_cport "$node")"); fi
    done
    local IFS=,
    echo "${list[*]}"
}

# kafka_metadata [TOPIC...]: kcat's metadata of the topics (all topics if none), asked of any
# running broker of the stack; a partition reads
#   partition 3, leader 1, replicas: 1,2,3, isrs: 1,3   (no leader: "leader -1")
kafka_metadata() {
    local args=() t live
    for t in "$@"; do args+=(-t "$t"); done
    live=$(kafka_live_brokers)
    # shellcheck disable=SC2086 # one node name a word
    kcat -b "$(kafka_bootstrap $live)" -L "${args[@]}" -m 5 2>&1
}

# topic_state NAME: "missing", or "<partitions> <partitions with a leader> <partitions whose ISR
# holds RF replicas>".
topic_state() {
    local md total
    local re=${1//./\\.} # the name as a regular expression
    md=$(kafka_metadata "$1") || true
    # A topic that does not exist is listed as
    #   topic "NAME" with 0 partitions: Broker: Unknown topic or partition
    total=$(sed -n "s/^ *topic \"$re\" with \([0-9]*\) partitions:.*/\1/p" <<<"$md")
    if [[ -z $total ]] || grep -q "^ *topic \"$re\" .*Unknown topic or partition" <<<"$md"; then
        echo missing
        return 0
    fi
    awk -v total="$total" -v rf="$RF" '
        /^ *partition [0-9]+, leader [0-9]+,/ {
            led++
            if (match($0, /isrs: [0-9]+(,[0-9]+)*/) && split(substr($0, RSTART + 6, RLENGTH - 6), a, ",") >= rf) full++
        }
        END { print total, led + 0, full + 0 }' <<<"$md"
}

# kafka_replicas_wait: with three brokers, wait until every partition of every topic has a
# leader and every replica on a running broker is in its ISR: a broker started again (or
# formatted afresh) has caught up.
kafka_replicas_wait() {
    ((BROKERS > 1)) || return 0
    local md behind deadline=$((SECONDS + KAFKA_START_TIMEOUT)) t0=$SECONDS said=0 live node
    live=$(for node in $(kafka_live_brokers); do printf '%s,' "$(node_id "$node")"; done)
    [[ -n $live ]] || return 0
    while :; do
        md=$(kafka_metadata) || true
        # "topic[partition]" of each partition without a leader, or with a replica on a running
        # broker that is not in its ISR.
        behind=$(awk -v live="$live" '
            /^ *topic "/ { t = $2; gsub(/"/, "", t) }
            /^ *partition [0-9]+,/ {
                p = $2; sub(/,/, "", p)
                nr = match($0, /replicas: [0-9]+(,[0-9]+)*/) ? split(substr($0, RSTART + 10, RLENGTH - 10), r, ",") : 0
                isr = match($0, /isrs: [0-9]+(,[0-9]+)*/) ? "," substr($0, RSTART + 6, RLENGTH - 6) "," : ","
                short = $0 ~ /leader -1/
                for (i = 1; i <= nr; i++)
                    if (index("," live, "," r[i] ",") && !index(isr, "," r[i] ",")) short = 1
                if (short) printf "%s[%s] ", t, p
            }' <<<"$md")
        if grep -q "^Metadata for" <<<"$md" && [[ -z $behind ]]; then break; fi
        if ((!said)) && [[ -n $behind ]]; then
            say "kafka: waiting for $(wc -w <<<"$behind") partitions to have all replicas in sync"
            said=1
        fi
        ((SECONDS < deadline)) ||
            die "kafka: partitions still without a leader or short of in-sync replicas after ${KAFKA_START_TIMEOUT}s (STACK_KAFKA_START_TIMEOUT): ${behind:-no metadata}"
        sleep 0.5
    done
    ((!said)) || say "kafka: every partition has all its replicas in sync ($((SECONDS - t0))s)"
}

# topic_create_args: the replication settings of our topics, for TopicCommand --create.
topic_create_args() {
    printf '%s\n' --replication-factor "$RF" --config retention.ms=-1 --config retention.bytes=-1
    ((BROKERS == 1)) || printf '%s\n' --config "min.insync.replicas=$MIN_ISR"
}

# Create the missing topics (in parallel: each TopicCommand is a JVM start), then check that each
# has the intended partition count, a leader for every partition and an ISR of RF replicas.
kafka_topics() {
    local -A want=([$TOPIC]=$PARTITIONS [$DLQ_TOPIC]=1)
    local t state pids=() names=() extra
    mapfile -t extra < <(topic_create_args)
    for t in "$TOPIC" "$DLQ_TOPIC"; do
        state=$(topic_state "$t")
        if [[ $state == missing ]]; then
            kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(kafka_bootstrap)" \
                --create --if-not-exists --topic "$t" --partitions "${want[$t]}" "${extra[@]}" \
                >"$RUN/topic-$t.out" 2>&1 9>&- &
            pids+=($!)
            names+=("$t")
        elif [[ ${state%% *} != "${want[$t]}" ]]; then
            die "topic $t has ${state%% *} partitions, not ${want[$t]} (STACK_KAFKA_PARTITIONS); use the old value or start afresh with scripts/stack.sh down --purge"
        fi
    done
    local i detail=""
    ((BROKERS == 1)) || detail=", replicas: $RF, min.insync.replicas: $MIN_ISR"
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            sed 's/^/    | /' "$RUN/topic-${names[$i]}.out" >&2
            die "could not create topic ${names[$i]}"
        fi
        rm -f "$RUN/topic-${names[$i]}.out"
        say "kafka: created topic ${names[$i]} (partitions: ${want[${names[$i]}]}$detail)"
    done
    local deadline=$((SECONDS + TOPIC_TIMEOUT)) n
    for t in "$TOPIC" "$DLQ_TOPIC"; do
        n=${want[$t]}
        until [[ $(topic_state "$t") == "$n $n $n" ]]; do
            ((SECONDS < deadline)) || die "topic $t: not $n partitions with a leader and $RF in-sync replicas each after ${TOPIC_TIMEOUT}s (now partitions, led, in sync: $(topic_state "$t"))"
            sleep 0.2
        done
    done
}

# kafka_down NODE...: SIGTERM to the brokers among them, together (each runs its controlled
# shutdown - its leaderships move, its logs are flushed - which needs the controllers), then to
# the controllers.
kafka_down() {
    local node brokers=() controllers=()
    for node in "$@"; do
        if is_controller "$node"; then controllers+=("$node"); else brokers+=("$node"); fi
    done
    if ((${#brokers[@]})); then kafka_stop "${brokers[@]}"; fi
    if ((${#controllers[@]})); then kafka_stop "${controllers[@]}"; fi
}

# stop_nodes PID_FN TIMEOUT NODE...: SIGTERM to each recorded node at once (PID_FN NODE prints its
# recorded pid, or fails when it does not run), SIGKILL to what still runs TIMEOUT s later.
stop_nodes() {
    local pid_fn=$1 timeout=$2 node pid pids=() names=() i
    shift 2
    for node in "$@"; do
        if pid=$("$pid_fn" "$node"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$node")
        else
            say "$node: not running"
        fi
    done
    local deadline=$((SECONDS + timeout))
    for i in "${!pids[@]}"; do
        pid=${pids[$i]} node=${names[$i]}
        if ! wait_gone "$pid" $((deadline > SECONDS ? deadline - SECONDS : 0)); then
            warn "$node (pid $pid) did not exit within ${timeout}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone "$pid" 10 || die "$node (pid $pid) survived SIGKILL"
        fi
        rm -f "$RUN/$node.pid"
        say "$node: stopped (pid $pid)"
    done
}

# kafka_stop NODE...: stop_nodes with KAFKA_STOP_TIMEOUT (a broker whose controller quorum is gone
# would wait for it up to 5 minutes).
kafka_stop() { stop_nodes kafka_node_pid "$KAFKA_STOP_TIMEOUT" "$@"; }

# --- the env file --------------------------------------------------------------------------------

write_env() {
    local tmp=$ENV_FILE.tmp.$$
    cat >"$tmp" <<EOF
# Written by scripts/stack.sh up on $(date '+%F %T'); do not edit. Use: . $(rel "$ENV_FILE")
export STACK_REDIS_PORT=$REDIS_PORT
export STACK_REDIS_CLUSTER=$REDIS_CLUSTER$(if ((REDIS_CLUSTER)); then printf '\nexport STACK_REDIS_BUS_PORT=%s' "$REDIS_BUS_PORT"; fi)
export STACK_PG_PORT=$PG_PORT
export STACK_KAFKA_PORT=$KAFKA_PORT
export STACK_KAFKA_CONTROLLER_PORT=$KAFKA_CPORT
export STACK_KAFKA_BROKERS=$BROKERS
export STACK_KAFKA_PARTITIONS=$PARTITIONS
export STACK_KAFKA_TOPIC=$TOPIC
export REDIS_URL=$(redis_url)
export KAFKA_BROKERS=$(kafka_bootstrap)
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
# The servers to start are cmd_up's `only`, KAFKA_ONLY and REDIS_ONLY.
preflight() {
    if [[ -n ${REDIS_ONLY:-} ]]; then redis_preflight; fi
    if [[ -n ${only[postgres]:-} ]]; then pg_preflight; fi
    kafka_other_kind
    local node
    for node in $(kafka_nodes); do
        if kafka_wanted "$node"; then
            kafka_node_pid "$node" >/dev/null || check_node_ports_free "$node"
        fi
    done
}

# up [SERVER...]: start what is not running - everything, or only the named servers (redis =
# every Redis node, redis-1..6, postgres, kafka = every Kafka node, kafka-1..3,
# kafka-controller-1..3) of a stack that was up before: a chaos test brings back one broker of two
# it killed. With names, the topics, the migrations and the env file are left alone.
cmd_up() {
    local t0=$SECONDS arg node
    local -A only=()
    for arg in "$@"; do
        case $arg in
            redis | postgres | kafka) only[$arg]=1 ;;
            kafka-[1-3] | kafka-controller-[1-3])
                ((BROKERS > 1)) || die "up: $arg exists only with STACK_KAFKA_BROKERS=3 (this stack has the one broker 'kafka')"
                only[$arg]=1 ;;
            redis-[1-6])
                ((REDIS_CLUSTER)) || die "up: $arg exists only with STACK_REDIS_CLUSTER=1 (this stack has the one Redis server 'redis')"
                only[$arg]=1 ;;
            *) die "up: unknown server '$arg' (redis postgres kafka kafka-1 kafka-2 kafka-3 kafka-controller-1 kafka-controller-2 kafka-controller-3$(
                if ((REDIS_CLUSTER)); then echo " redis-1 ... redis-6"; fi))" ;;
        esac
    done
    if ((!$#)); then only=([kafka]=1 [redis]=1 [postgres]=1); fi
    if [[ -z ${only[kafka]:-} ]]; then # the Kafka nodes to start (maybe none)
        KAFKA_ONLY=$(for node in $(kafka_nodes); do if [[ -n ${only[$node]:-} ]]; then echo "$node"; fi; done)
    fi
    # The Redis nodes to start (maybe none): "redis", or those of redis-1..6 named.
    REDIS_ONLY=$(for node in $(redis_nodes); do
        if [[ -n ${only[redis]:-} || -n ${only[$node]:-} ]]; then echo "$node"; fi
    done)
    check_settings
    ensure_deps
    take_lock
    preflight
    local kafka_too=0
    if [[ -n ${only[kafka]:-} || -n ${KAFKA_ONLY:-} ]]; then kafka_too=1; fi
    if ((kafka_too)); then kafka_launch; fi # first: the JVMs are the slowest to come up
    if [[ -n $REDIS_ONLY ]]; then redis_start; fi
    if [[ -n ${only[postgres]:-} ]]; then pg_up; fi
    if ((kafka_too)); then
        kafka_wait
        kafka_quorum_wait
        kafka_replicas_wait
    fi
    if (($#)); then
        say "up $* in $((SECONDS - t0))s"
        return 0
    fi
    kafka_topics
    PG_DSN=$(pg_dsn) "$ROOT/scripts/migrate.sh" | sed 's/^/stack: /'
    write_env
    local kafka="kafka 127.0.0.1:$KAFKA_PORT ($TOPIC x$PARTITIONS, $DLQ_TOPIC x1)"
    if ((BROKERS > 1)); then
        kafka="kafka $(kafka_bootstrap) ($TOPIC x$PARTITIONS, $DLQ_TOPIC x1; $RF replicas, min.insync.replicas $MIN_ISR)"
    fi
    say "up in $((SECONDS - t0))s: $(redis_summary), postgres 127.0.0.1:$PG_PORT/$PG_DB, $kafka"
    say "env: . $(rel "$ENV_FILE")"
}

# down [--purge | SERVER...]: stop every server, or only the named ones (their data stays, and
# `up` starts just those again on the ports in the environment). "kafka" is every broker that
# runs, of either kind (the one broker, or kafka-1..kafka-3); "redis" every Redis node that runs,
# of either kind (the one server, or redis-1..redis-6).
cmd_down() {
    local purge=0 arg kafka=() node redis_nodes=()
    local -A only=()
    for arg in "$@"; do
        case $arg in
            --purge) purge=1 ;;
            redis | postgres | kafka | kafka-[1-3] | kafka-controller-[1-3]) only[$arg]=1 ;;
            redis-[1-6]) only[$arg]=1 redis_nodes+=("$arg") ;;
            *) die "down: unknown argument '$arg' (--purge, or server names: redis postgres kafka kafka-1 kafka-2 kafka-3 kafka-controller-1 kafka-controller-2 kafka-controller-3 redis-1 ... redis-6)" ;;
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
    if [[ -n ${only[kafka]:-} ]]; then
        mapfile -t kafka < <(kafka_nodes_running)
        if ((${#kafka[@]} == 0)); then mapfile -t kafka < <(kafka_nodes); fi # to say "not running"
    else
        for node in "${ALL_KAFKA_NODES[@]}"; do
            if [[ $node != kafka && -n ${only[$node]:-} ]]; then kafka+=("$node"); fi
        done
    fi
    if ((${#kafka[@]})); then kafka_down "${kafka[@]}"; fi
    if [[ -n ${only[redis]:-} ]]; then
        redis_down_all
    elif ((${#redis_nodes[@]})); then
        redis_stop_nodes "${redis_nodes[@]}"
    fi
    if [[ -n ${only[postgres]:-} ]]; then pg_down; fi
    if ((purge)); then
        local extra dirs=() d shown="" redis_gone
        extra=$(pg_purge)
        redis_gone=$(redis_purge)
        for d in "${ALL_KAFKA_NODES[@]}"; do
            if [[ -e $VAR/$d ]]; then dirs+=("$VAR/$d"); fi
        done
        rm -rf "${dirs[@]}" "$CLUSTER_ID_FILE" "$CLUSTER_PORTS_FILE" "$ENV_FILE" "$RUN"/*.port
        for d in "${dirs[@]:-$KAFKA_DIR}"; do shown+="$(rel "$d") "; done
        say "purged $redis_gone $extra $shown$(rel "$ENV_FILE") (kept $(rel "$KAFKA_LIBS"), $(rel "$LOGDIR"))"
    fi
}

# kill SERVER...: SIGKILL to the recorded pid, as a crash would (no controlled shutdown, nothing
# flushed): kafka-1..kafka-3, kafka-controller-1..3, kafka (every Kafka node that runs), redis
# (every Redis node that runs), redis-1..redis-6.
cmd_kill() {
    local arg node pid targets=()
    (($#)) || die "kill: name the servers (kafka-1 kafka-2 kafka-3, kafka-controller-1..3, kafka, redis)"
    for arg in "$@"; do
        case $arg in
            redis | kafka) ;;
            kafka-[1-3] | kafka-controller-[1-3])
                ((BROKERS > 1)) || die "kill: $arg exists only with STACK_KAFKA_BROKERS=3 (this stack has the one broker 'kafka')" ;;
            redis-[1-6])
                ((REDIS_CLUSTER)) || die "kill: $arg exists only with STACK_REDIS_CLUSTER=1 (this stack has the one Redis server 'redis')" ;;
            postgres) die "kill: postgres is not handled by kill (scripts/stack.sh down postgres stops it)" ;;
            *) die "kill: unknown server '$arg' (kafka-1 kafka-2 kafka-3, kafka-controller-1..3, kafka, redis)" ;;
        esac
    done
    [[ -d $RUN ]] || { say "nothing to kill"; return 0; }
    take_lock
    for arg in "$@"; do
        case $arg in
            kafka) mapfile -t -O "${#targets[@]}" targets < <(kafka_nodes_running) ;;
            redis) mapfile -t -O "${#targets[@]}" targets < <(redis_kill_targets redis) ;;
            *) targets+=("$arg") ;;
        esac
    done
    for node in "${targets[@]}"; do
        if [[ $node == redis ]]; then
            pid=$(redis_pid) || { say "redis: not running"; continue; }
        elif [[ $node == redis-* ]]; then
            pid=$(redis_node_pid "$node") || { say "$node: not running"; continue; }
        else
            pid=$(kafka_node_pid "$node") || { say "$node: not running"; continue; }
        fi
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "$node (pid $pid) survived SIGKILL"
        rm -f "$RUN/$node.pid"
        say "$node: killed (pid $pid)"
    done
}

cmd_status() {
    local pid all=0 port node
    redis_status || all=1
    pg_status || all=1
    for node in $(kafka_brokers) $(kafka_controllers); do
        if pid=$(kafka_node_pid "$node" 2>/dev/null); then
            port=$(cat "$RUN/$node.port" 2>/dev/null || echo "?")
            printf '%-9s running  pid %-7s port %s%s\n' "$node" "$pid" "$port" \
                "$(if is_controller "$node"; then echo " (controller)"; fi)"
        else
            printf '%-9s stopped\n' "$node"
            all=1
        fi
    done
    for node in $(kafka_nodes_running 2>/dev/null); do # brokers of the other kind
        if ! grep -qx -- "$node" <<<"$(kafka_nodes)"; then
            printf '%-9s running  pid %-7s port %s  (not STACK_KAFKA_BROKERS=%s; scripts/stack.sh down kafka stops it)\n' \
                "$node" "$(kafka_node_pid "$node")" "$(cat "$RUN/$node.port" 2>/dev/null || echo "?")" "$BROKERS"
        fi
    done
    return "$all"
}

cmd_topic() { # cmd_topic create NAME PARTITIONS | delete NAME
    local action=${1:-} name=${2:-} parts=${3:-}
    [[ $name =~ ^[A-Za-z0-9._-]{1,200}$ ]] || die "topic: '$name' is not a valid Kafka topic name"
    local pid live bootstrap
    if ((BROKERS == 1)); then
        pid=$(kafka_pid) || die "topic: the Kafka broker is not running (scripts/stack.sh up)"
        KAFKA_PORT=$(running_port kafka "$KAFKA_PORT" STACK_KAFKA_PORT)
        bootstrap=127.0.0.1:$KAFKA_PORT
    else
        live=$(kafka_live_brokers)
        [[ -n $live ]] || die "topic: no Kafka broker of this stack is running (scripts/stack.sh up)"
        # shellcheck disable=SC2086 # one node name a word
        bootstrap=$(kafka_bootstrap $live)
    fi
    case "$action" in
        create)
            [[ $parts =~ ^[1-9][0-9]*$ ]] || die "topic create: PARTITIONS must be a positive number"
            if ((BROKERS > 1)) && [[ $(wc -l <<<"$live") -lt $BROKERS ]]; then # else a replica starts out of sync
                die "topic create: every broker must run for $RF in-sync replicas; running: ${live//$'\n'/ } (scripts/stack.sh up)"
            fi
            local extra
            mapfile -t extra < <(topic_create_args)
            kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" \
                --create --topic "$name" --partitions "$parts" "${extra[@]}" >/dev/null ||
                die "topic create: TopicCommand failed for $name"
            if ((BROKERS > 1)); then # every partition led and fully in sync before anyone writes
                local deadline=$((SECONDS + TOPIC_TIMEOUT))
                until [[ $(topic_state "$name") == "$parts $parts $parts" ]]; do
                    ((SECONDS < deadline)) || die "topic $name: not $parts partitions with a leader and $RF in-sync replicas each after ${TOPIC_TIMEOUT}s (now: $(topic_state "$name"))"
                    sleep 0.2
                done
            fi
            ;;
        delete)
            kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" \
                --delete --topic "$name" >/dev/null || die "topic delete: TopicCommand failed for $name"
            ;;
        *) die "topic: say 'create NAME PARTITIONS' or 'delete NAME'" ;;
    esac
}

case "${1:-}" in
    topic) shift; cmd_topic "$@" ;;
    pg-promote) shift; take_lock; pg_promote "$@" ;;
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    kill) shift; cmd_kill "$@" ;;
    status) cmd_status ;;
    env)
        echo "$ENV_FILE"
        [[ -f $ENV_FILE ]] || { warn "$ENV_FILE does not exist yet: run scripts/stack.sh up"; exit 1; }
        ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
