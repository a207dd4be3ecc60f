#!/usr/bin/env bash
# stack-redis.sh - the Redis of the local stack: one server, or with STACK_REDIS_CLUSTER=1 a Redis
# Cluster of six (sourced by scripts/stack.sh, which defines the variables and helpers used here:
# VAR, RUN, LOGDIR, REDIS_PORT, REDIS_TIMEOUT, say, die, launch, pid_from, check_port_free...).
#
# Functions scripts/stack.sh calls: redis_check_settings, redis_preflight, redis_start,
# redis_down_all, redis_stop_nodes, redis_kill_targets, redis_status, redis_purge, redis_url,
# redis_summary; and redis_pid, redis_node_pid.
#
# By default one server, "redis": var/redis (its AOF), var/run/redis.pid|port, var/log/redis.log,
# on STACK_REDIS_PORT.
#
# STACK_REDIS_CLUSTER=1: six cluster nodes redis-1..redis-6 (redis-server 7.0), node N on
# STACK_REDIS_PORT+100*(N-1) and its cluster bus on STACK_REDIS_BUS_PORT+100*(N-1) (default
# STACK_REDIS_PORT+10000: 26379..26879 for the default 16379), each with its directory var/redis-N
# (nodes.conf and its AOF: the single server's persistence), var/run/redis-N.pid|port,
# var/log/redis-N.log. The first `up` starts all six and makes them a cluster with
#   redis-cli --cluster create <six addresses> --cluster-replicas 1 --cluster-yes
# (3 primaries with a replica each; redis-cli's output in var/log/redis-cluster.log) and records
# the ports in var/redis-cluster.ports: the nodes know each other by address (nodes.conf), so the
# ports cannot change while the cluster's data lives. Later `up`s start the nodes from their
# nodes.conf and the cluster re-forms. `up` (all of them, or `up redis-N`) returns once every node
# that runs reports cluster_state:ok with all 16384 slots served, knows every other node that runs
# (connected, not failed), and each node started now that is a replica has done its first sync.
# cluster-node-timeout is STACK_REDIS_NODE_TIMEOUT_MS (3000): a primary killed is replaced by its
# replica about 4-5 s later. cluster-replica-validity-factor is 0: a replica may always be
# promoted, however long it has not heard from its primary; with the default (10) a replica that
# was restarted while its primary was gone (the whole cluster stopped and started, a primary's
# disk lost) would never take over, and a third of the slots would stay down for good.
# cluster-require-full-coverage stays on (the default): while slots have no primary the whole
# cluster refuses commands, as it would in production. repl-diskless-sync-delay is 0 (default 5 s,
# to serve several replicas with one transfer): each primary has one replica, and a replica's
# first sync - after `up`, a restart, a lost disk - starts at once.
# A node whose directory (or nodes.conf) was deleted while it was down - a lost disk - is started
# empty, after the others are up and the cluster is ok without it (its replica promoted if it was
# a primary); its old node id is forgotten (CLUSTER FORGET) on every node that runs, it meets the
# cluster (CLUSTER MEET) and becomes the replica of a primary that has none (CLUSTER REPLICATE);
# `up` waits until its first sync is done. A node that still lists a node id no longer at its
# address (one that was down while the other lost its disk) forgets it during `up`'s wait.
# `redis` as a server name means every Redis node: in `down` and `kill` every one that runs, of
# either kind.

# --- one server ---------------------------------------------------------------------------------

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

# --- the cluster: settings and names --------------------------------------------------------------

REDIS_CLUSTER=${STACK_REDIS_CLUSTER:-0}
case $REDIS_CLUSTER in
    0 | 1) ;;
    *) [[ ${1:-} == @(-h|--help|help) ]] || die "STACK_REDIS_CLUSTER='$REDIS_CLUSTER' must be 0 (one server) or 1 (a cluster of six nodes)" ;;
esac
REDIS_BUS_PORT=${STACK_REDIS_BUS_PORT:-}
if [[ -z $REDIS_BUS_PORT && $REDIS_PORT =~ ^[0-9]+$ ]]; then REDIS_BUS_PORT=$((REDIS_PORT + 10000)); fi
REDIS_NODE_TIMEOUT_MS=${STACK_REDIS_NODE_TIMEOUT_MS:-3000}
REDIS_CLUSTER_TIMEOUT=${STACK_REDIS_CLUSTER_TIMEOUT:-60} # seconds: a cluster ok, a node synced
REDIS_CLUSTER_PORTS_FILE=$VAR/redis-cluster.ports        # "STACK_REDIS_PORT STACK_REDIS_BUS_PORT"
REDIS_CLUSTER_NODES=(redis-1 redis-2 redis-3 redis-4 redis-5 redis-6)
REDIS_SLOTS=16384

redis_nodes() { if ((REDIS_CLUSTER)); then printf '%s\n' "${REDIS_CLUSTER_NODES[@]}"; else echo redis; fi; }
rnode_index() { echo "${1#redis-}"; }
rnode_port() { echo $((REDIS_PORT + 100 * ($(rnode_index "$1") - 1))); }
rnode_bus() { echo $((REDIS_BUS_PORT + 100 * ($(rnode_index "$1") - 1))); }
rnode_dir() { echo "$VAR/$1"; }
rnode_conf() { echo "$VAR/$1/nodes.conf"; }
rnode_by_port() { # rnode_by_port PORT: the cluster node configured on PORT, if any
    local node
    for node in "${REDIS_CLUSTER_NODES[@]}"; do
        if [[ $(rnode_port "$node") == "$1" ]]; then echo "$node"; return 0; fi
    done
    return 1
}

# rnode_port_setting NODE client|bus: the setting a node's port comes from, for messages.
rnode_port_setting() {
    local off=$((100 * ($(rnode_index "$1") - 1))) setting=STACK_REDIS_PORT what="port"
    if [[ $2 == bus ]]; then
        setting="STACK_REDIS_BUS_PORT" what="cluster bus port"
        [[ -n ${STACK_REDIS_BUS_PORT:-} ]] || setting="STACK_REDIS_BUS_PORT (default STACK_REDIS_PORT+10000)"
    fi
    if ((off)); then echo "$1's $what ($setting+$off)"; else echo "$1's $what ($setting)"; fi
}

# redis_node_pid NODE: the pid of a cluster node that runs (its title is
# "redis-server 127.0.0.1:PORT [cluster]"; the port is the one it was started on).
redis_node_pid() {
    local port
    port=$(cat "$RUN/$1.port" 2>/dev/null) || port=$(rnode_port "$1")
    pid_from "$RUN/$1.pid" redis-server ":$port"
}

# redis_nodes_running: the Redis nodes of either kind with a live recorded pid, one a line.
redis_nodes_running() {
    local node
    if redis_pid >/dev/null 2>&1; then echo redis; fi
    for node in "${REDIS_CLUSTER_NODES[@]}"; do
        if redis_node_pid "$node" >/dev/null 2>&1; then echo "$node"; fi
    done
}

# rnode_run_port NODE: the port a cluster node was started on (else the configured one).
rnode_run_port() {
    local port=""
    if [[ -r $RUN/$1.port ]]; then read -r port <"$RUN/$1.port" || true; fi
    if [[ -n $port ]]; then echo "$port"; else rnode_port "$1"; fi
}

# rnode_alive NODE: its recorded pid is a live redis-server on its port - redis_node_pid's test
# without a process forked (the waits ask it for six nodes many times a second) and without
# removing a stale pid file. A zombie's command line is empty.
rnode_alive() {
    local pid="" port args=()
    [[ -r $RUN/$1.pid ]] && read -r pid <"$RUN/$1.pid" 2>/dev/null
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    port=$(rnode_run_port "$1")
    mapfile -d '' args <"/proc/$pid/cmdline" 2>/dev/null || return 1
    [[ "${args[*]}" == *redis-server*":$port"* ]]
}

# redis_cluster_live: the cluster nodes that run, one a line.
redis_cluster_live() {
    local node
    for node in "${REDIS_CLUSTER_NODES[@]}"; do
        if rnode_alive "$node"; then echo "$node"; fi
    done
}

# rcli NODE ARGS...: redis-cli to a cluster node (at the port it was started on), bounded.
rcli() {
    local port
    port=$(rnode_run_port "$1")
    shift
    timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
}
rinfo() { # rinfo NODE SECTION FIELD: one field of INFO or CLUSTER INFO ("cluster" section)
    local out
    if [[ $2 == cluster ]]; then out=$(rcli "$1" CLUSTER INFO) || return 1; else out=$(rcli "$1" INFO "$2") || return 1; fi
    sed -n "s/^$3:\([^[:space:]]*\).*/\1/p" <<<"$out"
}

# conf_knows_others FILE: a nodes.conf that lists other nodes than the node itself (the node has
# been part of a cluster; a node started afresh writes one listing only itself).
conf_knows_others() {
    [[ -f $1 ]] && (($(grep -cE '^[0-9a-f]{40} ' "$1" 2>/dev/null || true) > 1))
}

# redis_cluster_formed: a cluster was made (some node's nodes.conf knows others).
redis_cluster_formed() {
    local node
    for node in "${REDIS_CLUSTER_NODES[@]}"; do
        if conf_knows_others "$(rnode_conf "$node")"; then return 0; fi
    done
    return 1
}

# redis_check_settings: STACK_REDIS_* of the cluster; prints "PORT<TAB>WHAT" for every port the
# Redis part listens on (check_settings checks that all the stack's ports differ).
redis_check_settings() {
    if ((!REDIS_CLUSTER)); then
        printf '%s\tSTACK_REDIS_PORT\n' "$REDIS_PORT"
        return 0
    fi
    [[ $REDIS_BUS_PORT =~ ^[0-9]+$ ]] && ((REDIS_BUS_PORT >= 1024 && REDIS_BUS_PORT <= 65535)) ||
        die "STACK_REDIS_BUS_PORT='$REDIS_BUS_PORT' is not a port in 1024..65535"
    [[ $REDIS_NODE_TIMEOUT_MS =~ ^[0-9]+$ ]] && ((REDIS_NODE_TIMEOUT_MS >= 100)) ||
        die "STACK_REDIS_NODE_TIMEOUT_MS='$REDIS_NODE_TIMEOUT_MS' is not a number of milliseconds >= 100"
    [[ $REDIS_CLUSTER_TIMEOUT =~ ^[0-9]+$ ]] && ((REDIS_CLUSTER_TIMEOUT >= 1)) ||
        die "STACK_REDIS_CLUSTER_TIMEOUT='$REDIS_CLUSTER_TIMEOUT' is not a positive number of seconds"
    ((REDIS_PORT + 500 <= 65535)) || die "redis-6's port would be $((REDIS_PORT + 500)) (STACK_REDIS_PORT+500), not a port; choose a lower STACK_REDIS_PORT"
    ((REDIS_BUS_PORT + 500 <= 65535)) || die "redis-6's cluster bus port would be $((REDIS_BUS_PORT + 500)), not a port; choose a lower STACK_REDIS_BUS_PORT (default STACK_REDIS_PORT+10000)"
    local node
    for node in "${REDIS_CLUSTER_NODES[@]}"; do
        printf '%s\t%s\n' "$(rnode_port "$node")" "$(rnode_port_setting "$node" client)"
        printf '%s\t%s\n' "$(rnode_bus "$node")" "$(rnode_port_setting "$node" bus)"
    done
}

# redis_other_kind: die if Redis of the other kind (one server vs. the cluster) of this stack runs:
# it holds the ports, and the env file would name the wrong ones.
redis_other_kind() {
    local running
    if ((REDIS_CLUSTER)); then
        if redis_pid >/dev/null 2>&1; then
            die "this stack runs the one Redis server 'redis', not the cluster STACK_REDIS_CLUSTER=1 asks for; stop it first (scripts/stack.sh down redis) or use the STACK_REDIS_CLUSTER it was started with"
        fi
    else
        running=$(redis_cluster_live)
        if [[ -n $running ]]; then
            die "this stack runs the Redis cluster nodes ${running//$'\n'/ }, not the one server STACK_REDIS_CLUSTER=0 asks for; stop them first (scripts/stack.sh down redis) or use STACK_REDIS_CLUSTER=1"
        fi
    fi
}

# redis_cluster_check_ports: the cluster's nodes.conf files were made with these ports.
redis_cluster_check_ports() {
    local made
    [[ -s $REDIS_CLUSTER_PORTS_FILE ]] || return 0
    made=$(cat "$REDIS_CLUSTER_PORTS_FILE")
    [[ $made != "$REDIS_PORT $REDIS_BUS_PORT" ]] || return 0
    redis_cluster_formed || return 0 # nothing left of it: a new cluster gets the new ports
    die "the Redis cluster was made with STACK_REDIS_PORT=${made% *} STACK_REDIS_BUS_PORT=${made#* } (its nodes know each other by address, in their nodes.conf), not STACK_REDIS_PORT=$REDIS_PORT STACK_REDIS_BUS_PORT=$REDIS_BUS_PORT; use those, or start afresh with scripts/stack.sh down --purge"
}

# redis_wanted NODE: `up` is to start NODE (REDIS_ONLY, set by cmd_up).
redis_wanted() { grep -qx -- "$1" <<<"${REDIS_ONLY:-}"; }

# redis_preflight: before `up` starts anything, every Redis node it is to start finds its ports
# free (REDIS_ONLY: the nodes to start).
redis_preflight() {
    redis_other_kind
    if ((!REDIS_CLUSTER)); then
        redis_pid >/dev/null || check_port_free "$REDIS_PORT" STACK_REDIS_PORT
        return 0
    fi
    redis_cluster_check_ports
    local node
    for node in "${REDIS_CLUSTER_NODES[@]}"; do
        if redis_wanted "$node" && ! redis_node_pid "$node" >/dev/null; then
            check_port_free "$(rnode_port "$node")" "$(rnode_port_setting "$node" client)"
            check_port_free "$(rnode_bus "$node")" "$(rnode_port_setting "$node" bus)"
        fi
    done
}

# redis_start: `up`'s Redis part: the one server, or the cluster nodes in REDIS_ONLY.
redis_start() {
    if ((REDIS_CLUSTER)); then
        local nodes
        mapfile -t nodes <<<"$REDIS_ONLY"
        redis_cluster_up "${nodes[@]}"
    else
        redis_up
    fi
}

redis_url() {
    if ((REDIS_CLUSTER)); then
        echo "redis-cluster://127.0.0.1:$(rnode_port redis-1),127.0.0.1:$(rnode_port redis-2),127.0.0.1:$(rnode_port redis-3)"
    else
        echo "redis://127.0.0.1:$REDIS_PORT"
    fi
}

redis_summary() { # for `up`'s last line
    if ((REDIS_CLUSTER)); then
        echo "redis cluster 127.0.0.1:$(rnode_port redis-1)..$(rnode_port redis-6) (3 primaries, 3 replicas)"
    else
        echo "redis 127.0.0.1:$REDIS_PORT"
    fi
}

# --- the cluster: start -------------------------------------------------------------------------

# rnode_launch NODE: start a cluster node (no waiting).
rnode_launch() {
    local node=$1 port bus
    port=$(rnode_port "$node")
    bus=$(rnode_bus "$node")
    mkdir -p "$(rnode_dir "$node")"
    echo "--- redis-server start $(date '+%F %T')" >>"$LOGDIR/$node.log"
    # The single server's persistence (appendonly, everysec, no RDB snapshots); the cluster
    # settings are explained at the top of this file.
    launch "$RUN/$node.pid" "$LOGDIR/$node.log" redis-server \
        --port "$port" --bind 127.0.0.1 --protected-mode yes \
        --dir "$(rnode_dir "$node")" --daemonize no --pidfile "$RUN/$node.pid" \
        --logfile "$LOGDIR/$node.log" \
        --appendonly yes --appendfsync everysec --save '' \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port "$bus" \
        --cluster-node-timeout "$REDIS_NODE_TIMEOUT_MS" --cluster-replica-validity-factor 0 \
        --repl-diskless-sync-delay 0
    echo "$port" >"$RUN/$node.port"
}

# rnode_wait_ping NODE...: each answers PING within REDIS_TIMEOUT (or exited: die with its log).
rnode_wait_ping() {
    local node pid deadline=$((SECONDS + REDIS_TIMEOUT))
    for node in "$@"; do
        pid=$(cat "$RUN/$node.pid")
        until [[ $(rcli "$node" ping) == PONG ]]; do
            if ! proc_is "$pid" redis-server; then
                tail_log "$LOGDIR/$node.log"
                die "$node: redis-server exited during start-up (log: $(rel "$LOGDIR/$node.log"))"
            fi
            ((SECONDS < deadline)) || { tail_log "$LOGDIR/$node.log"; die "$node did not answer PING within ${REDIS_TIMEOUT}s (log: $(rel "$LOGDIR/$node.log"))"; }
            sleep 0.1
        done
    done
}

# redis_cluster_up NODE...: start those of the named cluster nodes that do not run, make the
# cluster if there is none yet, bring back nodes that lost their data, and wait until the cluster
# is ok (redis_cluster_wait).
redis_cluster_up() {
    local node pid todo=() lost=() started=() formed=0
    redis_other_kind
    redis_cluster_check_ports
    if redis_cluster_formed; then formed=1; fi
    for node in "$@"; do
        if pid=$(redis_node_pid "$node"); then
            if [[ $(cat "$RUN/$node.port" 2>/dev/null) != "$(rnode_port "$node")" ]]; then
                die "$node runs on port $(cat "$RUN/$node.port" 2>/dev/null || echo '?'), not $(rnode_port "$node") (STACK_REDIS_PORT=$REDIS_PORT); use the ports it was started with, or scripts/stack.sh down redis first"
            fi
            say "$node: already running (pid $pid, port $(rnode_port "$node"))"
        else
            todo+=("$node")
        fi
    done
    if ((!formed)); then
        for node in "${REDIS_CLUSTER_NODES[@]}"; do
            if ! redis_node_pid "$node" >/dev/null 2>&1 && ! grep -qx -- "$node" <<<"$(printf '%s\n' "${todo[@]}")"; then
                die "no Redis cluster was made yet (and $node does not run): a new cluster is started whole (scripts/stack.sh up, or up redis)"
            fi
        done
    fi
    for node in "${todo[@]}"; do
        check_port_free "$(rnode_port "$node")" "$(rnode_port_setting "$node" client)"
        check_port_free "$(rnode_bus "$node")" "$(rnode_port_setting "$node" bus)"
        if ((formed)) && [[ ! -f $(rnode_conf "$node") ]]; then
            lost+=("$node")
        else
            rnode_launch "$node"
            started+=("$node")
        fi
    done
    if ((${#started[@]})); then rnode_wait_ping "${started[@]}"; fi
    for node in "${started[@]}"; do
        say "$node: started (pid $(cat "$RUN/$node.pid"), port $(rnode_port "$node"))"
    done
    if ((!formed)); then
        redis_cluster_create
        redis_cluster_wait "${started[@]}"
        return 0
    fi
    # Nodes that lost their data come last, into a cluster that is ok without them.
    for node in "${lost[@]}"; do
        say "$node: its directory or nodes.conf is gone (a lost disk?): it starts empty and joins the cluster as a replica, once the cluster is ok without it"
        redis_cluster_wait_ok "$node"
        redis_forget_address "$node"
        rm -rf "${VAR:?}/$node"
        rnode_launch "$node"
        rnode_wait_ping "$node"
        say "$node: started (pid $(cat "$RUN/$node.pid"), port $(rnode_port "$node"))"
        started+=("$node")
    done
    # A node that runs but is no member (it lost its data, or an earlier `up` stopped half-way
    # through its joining): into the cluster as a replica.
    for node in $(redis_cluster_live); do
        if [[ $(rinfo "$node" cluster cluster_known_nodes) == 1 ]] || rnode_is_empty_primary "$node"; then
            redis_join "$node"
        fi
    done
    redis_cluster_wait "${started[@]}"
}

# rnode_is_empty_primary NODE: a primary that serves no slot (a node that joined but was never
# made a replica; this stack moves no slots).
rnode_is_empty_primary() {
    local me
    me=$(rcli "$1" CLUSTER NODES | awk '$3 ~ /myself/') || return 1
    [[ -n $me ]] && awk '$3 ~ /master/ && NF <= 8 { found = 1 } END { exit !found }' <<<"$me"
}

# redis_cluster_create: the six nodes (started, empty) made a cluster of 3 primaries with a replica
# each. The ports are recorded first: whatever happens next, the nodes.conf files name them.
redis_cluster_create() {
    local node addrs=() t0=$SECONDS out
    for node in "${REDIS_CLUSTER_NODES[@]}"; do
        if [[ $(rinfo "$node" cluster cluster_known_nodes) != 1 || $(rcli "$node" DBSIZE) != 0 ]]; then
            die "$node is not an empty node (it knows other nodes or holds keys) although no cluster was made; start afresh with scripts/stack.sh down --purge"
        fi
        addrs+=("127.0.0.1:$(rnode_port "$node")")
    done
    echo "$REDIS_PORT $REDIS_BUS_PORT" >"$REDIS_CLUSTER_PORTS_FILE"
    say "redis: making the cluster of ${addrs[*]} (3 primaries, 3 replicas)"
    echo "--- redis-cli --cluster create $(date '+%F %T')" >>"$LOGDIR/redis-cluster.log"
    if ! out=$(timeout "$REDIS_CLUSTER_TIMEOUT" redis-cli --cluster create "${addrs[@]}" \
        --cluster-replicas 1 --cluster-yes </dev/null 2>&1); then
        printf '%s\n' "$out" >>"$LOGDIR/redis-cluster.log"
        tail_log "$LOGDIR/redis-cluster.log"
        die "redis-cli --cluster create failed (log: $(rel "$LOGDIR/redis-cluster.log"); scripts/stack.sh down --purge starts afresh)"
    fi
    printf '%s\n' "$out" >>"$LOGDIR/redis-cluster.log"
    say "redis: cluster made in $((SECONDS - t0))s"
}

# redis_cluster_wait_ok NODE: before NODE, which lost its data, is started: the nodes that run are
# a cluster that is ok without it, and if it was a primary, its replica has taken its slots over.
# Not earlier: a node that answers at the old one's address under another id makes the others mark
# the old id "noaddr", and Redis never declares a noaddr node failed - its replica would never be
# promoted.
redis_cluster_wait_ok() {
    local node=$1 live deadline=$((SECONDS + REDIS_CLUSTER_TIMEOUT)) why
    live=$(redis_cluster_live)
    [[ -n $live ]] || die "$node lost its data and can only join a running cluster, but no other Redis node runs; start them first (scripts/stack.sh up redis-1 ..., or up redis), or start afresh with scripts/stack.sh down --purge"
    until why=$(redis_cluster_check) && why=$(rnode_old_serves_none "$node"); do
        if ((SECONDS >= deadline)); then
            die "$node lost its data; it can join only a cluster that is ok without it, and after ${REDIS_CLUSTER_TIMEOUT}s it is not: $why$(redis_unserved_slots) (STACK_REDIS_CLUSTER_TIMEOUT; if both copies of some slots are gone, start afresh with scripts/stack.sh down --purge)"
        fi
        sleep 0.3
    done
}

# rnode_old_serves_none NODE: no cluster node that runs lists a node id at NODE's address that
# still serves slots (else prints which and fails).
rnode_old_serves_none() {
    local n addr line
    addr="127.0.0.1:$(rnode_port "$1")@"
    for n in $(redis_cluster_live); do
        line=$(rcli "$n" CLUSTER NODES | awk -v a="$addr" 'index($2, a) == 1 && NF > 8')
        if [[ -n $line ]]; then
            echo "$n still sees $1's old node id $(cut -d' ' -f1 <<<"$line") serving slots $(cut -d' ' -f9- <<<"$line") (its replica has not taken over)"
            return 1
        fi
    done
}

# redis_unserved_slots: ", slots A-B held by failed NODE" for what the cluster cannot serve.
redis_unserved_slots() {
    local n live nodes line
    live=$(redis_cluster_live)
    for n in $live; do nodes=$(rcli "$n" CLUSTER NODES) && break; done
    [[ -n ${nodes:-} ]] || return 0
    while read -r line; do
        printf ', slots %s held by the failed node %s' "$(cut -d' ' -f9- <<<"$line")" "$(cut -d' ' -f2 <<<"$line" | sed 's/@.*//')"
    done < <(awk '$3 ~ /master/ && $3 ~ /fail/ && NF > 8' <<<"$nodes")
}

# redis_forget_address NODE: every node that runs forgets the node id listed at NODE's address
# (NODE is stopped and lost its data; it comes back with a new id). No id that serves slots.
redis_forget_address() {
    local n addr ids id forgot=() which=()
    addr="127.0.0.1:$(rnode_port "$1")@"
    for n in $(redis_cluster_live); do
        ids=$(rcli "$n" CLUSTER NODES | awk -v a="$addr" 'index($2, a) == 1 && $3 !~ /myself/ && NF <= 8 { print $1 }')
        for id in $ids; do
            rcli "$n" CLUSTER FORGET "$id" >/dev/null || true
            forgot+=("$n")
            which+=("$id")
        done
    done
    if ((${#forgot[@]})); then
        say "redis: ${forgot[*]} forgot $1's old node id $(printf '%s\n' "${which[@]}" | sort -u | paste -sd' ')"
    fi
}

# redis_join NODE: NODE (it runs, holds no slot) meets the cluster if it knows no other node, then
# becomes the replica of the primary with the fewest replicas.
redis_join() {
    local node=$1 seed="" n me nodes deadline=$((SECONDS + REDIS_CLUSTER_TIMEOUT)) live out
    live=$(redis_cluster_live | grep -vx -- "$node" || true)
    for n in $live; do
        if [[ $(rinfo "$n" cluster cluster_known_nodes) -gt 1 ]]; then seed=$n; break; fi
    done
    [[ -n $seed ]] || die "$node is to join the cluster, but no other node of it runs; start them first (scripts/stack.sh up redis)"
    [[ $(rcli "$node" DBSIZE) == 0 ]] || die "$node is to join the cluster as a replica but holds keys; start afresh with scripts/stack.sh down --purge"
    me=$(rcli "$node" CLUSTER MYID)
    if [[ $(rinfo "$node" cluster cluster_known_nodes) == 1 ]]; then
        rcli "$node" CLUSTER MEET 127.0.0.1 "$(rnode_port "$seed")" "$(rnode_bus "$seed")" >/dev/null ||
            die "$node: CLUSTER MEET of $seed failed"
    fi
    # Until it knows every node that runs and every one knows it, none in handshake.
    until redis_all_know "$node" "$me"; do
        ((SECONDS < deadline)) || die "$node did not join the cluster (CLUSTER MEET of $seed) within ${REDIS_CLUSTER_TIMEOUT}s (log: $(rel "$LOGDIR/$node.log"))"
        sleep 0.2
    done
    # The primary with the fewest replicas (a replica that is down still counts: it comes back),
    # as the seed sees it; the lowest port of those.
    nodes=$(rcli "$seed" CLUSTER NODES)
    local primary
    primary=$(awk -v me="$me" '
        $3 ~ /master/ && $3 !~ /fail|noaddr|handshake/ && $8 == "connected" && NF > 8 && $1 != me { n[$1] += 0; port[$1] = $2 }
        $3 ~ /slave/ && $3 !~ /noaddr|handshake/ && $1 != me { n[$4]++ }
        END { for (id in port) print n[id], port[id], id }' <<<"$nodes" |
        sed 's/ 127\.0\.0\.1:\([0-9]*\)@[0-9]* / \1 /' | sort -n -k1,1 -k2,2 | awk 'NR == 1 { print $2, $3 }')
    [[ -n $primary ]] || die "$node: no primary to replicate found in $seed's view of the cluster"
    local pnode
    pnode=$(rnode_by_port "${primary% *}") || pnode="127.0.0.1:${primary% *}"
    until out=$(rcli "$node" CLUSTER REPLICATE "${primary#* }") && [[ $out == OK ]]; do
        ((SECONDS < deadline)) || die "$node: CLUSTER REPLICATE of $pnode (${primary#* }) failed: ${out:-no answer}"
        sleep 0.2
    done
    # Until every node that runs sees it as a replica (gossip spreads the new role; a view asked
    # right after the REPLICATE may still call it a primary).
    until redis_all_see_replica "$me"; do
        ((SECONDS < deadline)) || die "$node: not every node sees it as a replica within ${REDIS_CLUSTER_TIMEOUT}s"
        sleep 0.2
    done
    say "$node: joined the cluster as the replica of $pnode"
}

# redis_all_see_replica ID: every cluster node that runs lists node ID as a replica.
redis_all_see_replica() {
    local n view
    for n in $(redis_cluster_live); do
        view=$(rcli "$n" CLUSTER NODES) || return 1
        awk -v id="$1" '$1 == id && $3 ~ /slave/ { f = 1 } END { exit !f }' <<<"$view" || return 1
    done
}

# redis_all_know NODE ID: NODE knows every cluster node that runs, and each of them knows NODE (by
# ID), none of those entries in handshake.
redis_all_know() {
    local node=$1 id=$2 n other mine theirs
    mine=$(rcli "$node" CLUSTER NODES) || return 1
    for n in $(redis_cluster_live); do
        [[ $n != "$node" ]] || continue
        other=$(rcli "$n" CLUSTER MYID) || return 1
        awk -v id="$other" '$1 == id && $3 !~ /handshake/ { f = 1 } END { exit !f }' <<<"$mine" || return 1
        theirs=$(rcli "$n" CLUSTER NODES) || return 1
        awk -v id="$id" '$1 == id && $3 !~ /handshake/ { f = 1 } END { exit !f }' <<<"$theirs" || return 1
    done
}

# redis_forget_ghosts: on every node that runs, forget the entries of node ids no longer there: at
# the address of a node that runs under another id, or without an address (noaddr: a node that
# answered with another id), and serving no slot. Such a ghost is left in a node that was down
# while another lost its disk and came back under a new id.
redis_forget_ghosts() {
    local n live port id flags addr ids=() ghost
    local -A at=()
    live=$(redis_cluster_live)
    for n in $live; do
        id=$(rcli "$n" CLUSTER MYID) || continue
        at[$(rnode_port "$n")]=$id
    done
    for n in $live; do
        while read -r id addr flags; do
            [[ -n $id ]] || continue
            ghost=0
            port=${addr#*:}
            port=${port%%@*}
            if [[ $flags == *noaddr* ]]; then ghost=1; fi
            if [[ -n ${at[$port]:-} && ${at[$port]} != "$id" ]]; then ghost=1; fi
            if ((ghost)); then
                rcli "$n" CLUSTER FORGET "$id" >/dev/null || true
                ids+=("$n:$id")
            fi
        done < <(rcli "$n" CLUSTER NODES | awk '$3 !~ /myself/ && NF <= 8 { print $1, $2, $3 }')
    done
    if ((${#ids[@]})); then say "redis: forgot node ids no longer in the cluster: ${ids[*]}"; fi
}

# redis_cluster_check [STARTED...]: prints why not and fails, unless every cluster node that runs
# reports cluster_state:ok and all 16384 slots served, knows every other node that runs
# (connected, not failed, not in handshake), all of them agree which node serves which slots (an
# old primary restarted believes in its slots until it hears that its replica took them), and
# each of STARTED that runs and is a replica has its replication link up and its sync done.
redis_cluster_check() {
    local node other live info nodes v line slots first="" first_node=""
    local -A myid=()
    live=$(redis_cluster_live)
    [[ -n $live ]] || { echo "no Redis cluster node runs"; return 1; }
    for node in $live; do
        myid[$node]=$(rcli "$node" CLUSTER MYID) && [[ ${myid[$node]} =~ ^[0-9a-f]{40}$ ]] ||
            { echo "$node does not answer CLUSTER MYID"; return 1; }
    done
    for node in $live; do
        info=$(rcli "$node" CLUSTER INFO) || { echo "$node does not answer CLUSTER INFO"; return 1; }
        v=$(sed -n 's/^cluster_state:\([a-z]*\).*/\1/p' <<<"$info")
        [[ $v == ok ]] || { echo "$node reports cluster_state:${v:-?}"; return 1; }
        v=$(sed -n 's/^cluster_slots_ok:\([0-9]*\).*/\1/p' <<<"$info")
        [[ $v == "$REDIS_SLOTS" ]] || { echo "$node sees ${v:-?} of $REDIS_SLOTS slots served"; return 1; }
        nodes=$(rcli "$node" CLUSTER NODES) || { echo "$node does not answer CLUSTER NODES"; return 1; }
        slots=$(awk '$3 ~ /master/ && NF > 8 { s = $1; for (i = 9; i <= NF; i++) s = s " " $i; print s }' <<<"$nodes" | sort)
        if [[ -z $first_node ]]; then
            first=$slots first_node=$node
        elif [[ $slots != "$first" ]]; then
            echo "$node and $first_node do not agree yet on which node serves which slots"
            return 1
        fi
        for other in $live; do
            [[ $other != "$node" ]] || continue
            line=$(awk -v id="${myid[$other]}" '$1 == id' <<<"$nodes")
            [[ -n $line ]] || { echo "$node does not know $other (${myid[$other]}) yet"; return 1; }
            read -r _ _ v _ _ _ _ info _ <<<"$line"
            if [[ $v == *fail* || $v == *handshake* || $v == *noaddr* || $info != connected ]]; then
                echo "$node sees $other as $v, $info"
                return 1
            fi
        done
    done
    for node in "$@"; do
        grep -qx -- "$node" <<<"$live" || continue
        info=$(rcli "$node" INFO replication) || { echo "$node does not answer INFO"; return 1; }
        grep -q '^role:slave' <<<"$info" || continue
        grep -q '^master_link_status:up' <<<"$info" && grep -q '^master_sync_in_progress:0' <<<"$info" ||
            { echo "$node (a replica) has not finished its sync with its primary"; return 1; }
    done
}

# redis_cluster_wait [STARTED...]: until redis_cluster_check passes, within
# REDIS_CLUSTER_TIMEOUT; ghosts are forgotten on the way; a node of STARTED that exits fails it.
redis_cluster_wait() {
    local deadline=$((SECONDS + REDIS_CLUSTER_TIMEOUT)) t0=$SECONDS why node pid n=0
    until why=$(redis_cluster_check "$@"); do
        for node in "$@"; do
            pid=$(cat "$RUN/$node.pid" 2>/dev/null) || pid=""
            if [[ -z $pid ]] || ! proc_is "$pid" redis-server; then
                tail_log "$LOGDIR/$node.log"
                die "$node exited while the cluster formed (log: $(rel "$LOGDIR/$node.log"))"
            fi
        done
        if ((SECONDS >= deadline)); then
            node=$(grep -o '^redis-[1-6]' <<<"$why" || echo redis-1)
            tail_log "$LOGDIR/$node.log"
            die "the Redis cluster is not ok after ${REDIS_CLUSTER_TIMEOUT}s (STACK_REDIS_CLUSTER_TIMEOUT): $why$(redis_unserved_slots) (log: $(rel "$LOGDIR/$node.log"))"
        fi
        if ((n++ % 5 == 0)); then redis_forget_ghosts; fi
        sleep 0.2
    done
    redis_forget_ghosts
    say "redis: cluster ok, $REDIS_SLOTS slots served, $(redis_cluster_live | wc -l) nodes ($((SECONDS - t0))s)"
}

# --- the cluster: stop, kill, status, purge ---------------------------------------------------------

# redis_stop_nodes NODE...: SIGTERM to each cluster node at once (Redis's clean shutdown: its AOF
# and nodes.conf written), SIGKILL to what still runs 20 s later (stop_nodes, scripts/stack.sh).
redis_stop_nodes() { stop_nodes redis_node_pid 20 "$@"; }

# redis_down_all: `down redis`: every Redis node that runs, of either kind.
redis_down_all() {
    local running cluster=()
    running=$(redis_nodes_running)
    if [[ -z $running ]]; then
        if ((REDIS_CLUSTER)); then redis_stop_nodes "${REDIS_CLUSTER_NODES[@]}"; else redis_down; fi
        return 0
    fi
    mapfile -t cluster < <(grep '^redis-' <<<"$running" || true)
    if ((${#cluster[@]})); then redis_stop_nodes "${cluster[@]}"; fi
    if grep -qx redis <<<"$running"; then redis_down; fi
}

# redis_kill_targets NAME...: the Redis nodes `kill` is to signal ("redis": every one that runs).
redis_kill_targets() {
    local arg running
    for arg in "$@"; do
        if [[ $arg == redis ]]; then
            running=$(redis_nodes_running)
            if [[ -n $running ]]; then echo "$running"; else echo redis; fi
        else
            echo "$arg"
        fi
    done
}

# rnode_role NODE: "primary, slots A-B" or "replica of redis-K" (from CLUSTER NODES), and the
# cluster state it reports when that is not ok.
rnode_role() {
    local nodes me master port state role
    nodes=$(rcli "$1" CLUSTER NODES) || { echo "role ? (no answer)"; return 0; }
    me=$(awk '$3 ~ /myself/' <<<"$nodes")
    if [[ $me == *master* ]]; then
        role="primary, slots $(cut -d' ' -f9- <<<"$me")"
        [[ $(wc -w <<<"$me") -gt 8 ]] || role="primary, no slots"
    elif [[ -n $me ]]; then
        master=$(cut -d' ' -f4 <<<"$me")
        port=$(awk -v id="$master" '$1 == id { sub(/^[^:]*:/, "", $2); sub(/@.*/, "", $2); print $2 }' <<<"$nodes")
        role="replica of $(rnode_by_port "$port" || echo "127.0.0.1:${port:-?}")"
        if [[ $(rinfo "$1" replication master_link_status) != up ]]; then role+=" (link down)"; fi
    else
        role="role ?"
    fi
    state=$(rinfo "$1" cluster cluster_state)
    [[ $state == ok ]] || role+=", cluster_state ${state:-?}"
    echo "$role"
}

# redis_status: `status`'s Redis lines; returns 1 if one of this stack's kind is not running.
redis_status() {
    local pid port all=0 node
    if ((!REDIS_CLUSTER)); then
        if pid=$(redis_pid 2>/dev/null); then
            port=$(cat "$RUN/redis.port" 2>/dev/null || echo "?")
            printf 'redis     running  pid %-7s port %s\n' "$pid" "$port"
        else
            echo "redis     stopped"
            all=1
        fi
        for node in $(redis_cluster_live 2>/dev/null); do # nodes of the other kind
            printf '%-9s running  pid %-7s port %s  (not STACK_REDIS_CLUSTER=0; scripts/stack.sh down redis stops it)\n' \
                "$node" "$(redis_node_pid "$node")" "$(cat "$RUN/$node.port" 2>/dev/null || echo "?")"
        done
        return "$all"
    fi
    for node in "${REDIS_CLUSTER_NODES[@]}"; do
        if pid=$(redis_node_pid "$node" 2>/dev/null); then
            port=$(cat "$RUN/$node.port" 2>/dev/null || echo "?")
            printf '%-9s running  pid %-7s port %s  %s\n' "$node" "$pid" "$port" "$(rnode_role "$node")"
        else
            printf '%-9s stopped\n' "$node"
            all=1
        fi
    done
    if pid=$(redis_pid 2>/dev/null); then
        printf 'redis     running  pid %-7s port %s  (not STACK_REDIS_CLUSTER=1; scripts/stack.sh down redis stops it)\n' \
            "$pid" "$(cat "$RUN/redis.port" 2>/dev/null || echo "?")"
    fi
    return "$all"
}

# redis_purge: delete Redis's data (stopped already) of either kind; prints what went, for
# `down --purge`.
redis_purge() {
    local node shown
    shown=$(rel "$REDIS_DIR")
    for node in "${REDIS_CLUSTER_NODES[@]}"; do
        if [[ -e $VAR/$node ]]; then shown+=" $(rel "$VAR/$node")"; fi
    done
    rm -rf "$REDIS_DIR" "${REDIS_CLUSTER_NODES[@]/#/$VAR/}" "$REDIS_CLUSTER_PORTS_FILE"
    echo "$shown"
}
