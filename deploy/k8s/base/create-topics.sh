#!/usr/bin/env bash
# create-topics.sh - the events topic and its dead-letter topic: created when missing, brought to
# the settings stockpipe relies on when they exist, then checked (docs/operations.md, "What the
# backends must be"). Run by the Job stockpipe-kafka-topics (kafka-topics-job.yaml) in the
# apache/kafka image, with Kafka's own tools; safe to run again and again (every deploy does).
#
# For each topic:
#   1. kafka-topics.sh --create --if-not-exists: partitions, replication factor, configs;
#   2. kafka-topics.sh --describe: the partition count must be the one asked for and the
#      replication factor at least the one asked for, else exit 1 naming what differs, with
#      nothing changed;
#   3. kafka-configs.sh --alter --add-config with the same configs, so that a topic made earlier
#      (by hand, by an older release) gets them too; then --describe again: every config must
#      hold its value, else exit 1. Partitions with fewer in-sync replicas than
#      min.insync.replicas are reported (the producers cannot publish to them) but do not fail
#      the run.
# It never adds partitions (the SKUs would move: one SKU's events in two partitions, unordered)
# and never changes a replication factor (that is a partition reassignment, a person's job).
#
# Environment:
#   KAFKA_BROKERS, KAFKA_TOPIC, KAFKA_DLQ_TOPIC       the workers' ConfigMap: the same names
#   KAFKA_SECURITY_PROTOCOL (plaintext | ssl | sasl_plaintext | sasl_ssl; default plaintext),
#   KAFKA_SASL_MECHANISM (SCRAM-SHA-512 | SCRAM-SHA-256 | PLAIN), KAFKA_SSL_CA_LOCATION,
#   KAFKA_SSL_CERTIFICATE_LOCATION, KAFKA_SSL_KEY_LOCATION    the ConfigMap, as the workers read
#   KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD, KAFKA_SSL_KEY_PASSWORD   the Secret, as the workers
#   REPLICATION_FACTOR, EVENTS_PARTITIONS, EVENTS_CONFIG, DLQ_PARTITIONS, DLQ_CONFIG   the Job's;
#     a *_CONFIG is name=value[,name=value...] and must set min.insync.replicas, at least 2 and
#     below REPLICATION_FACTOR (an acknowledged event is on two brokers, and one may be down)
#   KAFKA_BIN  where kafka-topics.sh and kafka-configs.sh are (default /opt/kafka/bin)
#   WORK_DIR   a writable directory (default /tmp): the client properties, mode 0600, removed at
#              exit
# The security settings become a client properties file (--command-config), the Java clients'
# equivalent of what librdkafka makes of them in the workers. Secrets go into that file only:
# never to the output, never on a command line (ps shows those).
set -euo pipefail

KAFKA_BIN=${KAFKA_BIN:-/opt/kafka/bin}
WORK_DIR=${WORK_DIR:-/tmp}

say() { printf 'create-topics: %s\n' "$*"; }
fail() {
    printf 'create-topics: error: %s\n' "$*" >&2
    exit 1
}

need() { # need NAME...: each variable set and not empty
    local v
    for v in "$@"; do
        [[ -n ${!v:-} ]] || fail "$v is not set (it comes from the ConfigMap, the Secret or the Job's env)"
    done
}

# Java properties files are read as ISO-8859-1 with backslash escapes: a value is written with
# its backslashes doubled, and only printable ASCII is accepted (anything else would reach the
# client changed, a password that then fails to log in for no visible reason).
printable() { # printable NAME: the variable holds printable ASCII only
    local LC_ALL=C
    [[ ${!1} != *[![:print:]]* ]] ||
        fail "$1 holds a character outside printable ASCII (newline, tab, non-ASCII): not supported here"
}
prop() { # prop KEY VALUE: one line of the client properties
    local v=${2//\\/\\\\}
    [[ $v == ' '* ]] && v="\\$v" # a leading blank would be dropped
    printf '%s=%s\n' "$1" "$v" >>"$PROPS"
}
jaas_quote() { # jaas_quote VALUE: VALUE as a JAAS quoted string
    local v=${1//\\/\\\\}
    printf '"%s"' "${v//\"/\\\"}"
}

# --- what to create --------------------------------------------------------------------------
need KAFKA_BROKERS KAFKA_TOPIC KAFKA_DLQ_TOPIC REPLICATION_FACTOR EVENTS_PARTITIONS EVENTS_CONFIG \
    DLQ_PARTITIONS DLQ_CONFIG
for v in REPLICATION_FACTOR EVENTS_PARTITIONS DLQ_PARTITIONS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || fail "$v=${!v} is not a positive number"
done
for v in KAFKA_TOPIC KAFKA_DLQ_TOPIC; do
    [[ ${!v} =~ ^[A-Za-z0-9._-]{1,249}$ ]] || fail "$v=${!v} is not a Kafka topic name"
done
[[ $KAFKA_DLQ_TOPIC != "$KAFKA_TOPIC" ]] || fail "KAFKA_DLQ_TOPIC is the events topic itself"

# check_config NAME [name=value...]: a list of name=value whose min.insync.replicas fits, holding
# each name=value given (what an accepted order's survival rests on: no unclean election, and for
# the events topic no deletion ever, since PostgreSQL is rebuilt by replaying it).
check_config() {
    local name=$1 kv min= want
    shift
    local -a kvs
    IFS=, read -ra kvs <<<"${!name}"
    for kv in "${kvs[@]}"; do
        [[ $kv =~ ^[a-z0-9.]+=[^=[:space:]]+$ ]] || fail "$name: '$kv' is not name=value"
        [[ $kv == min.insync.replicas=* ]] && min=${kv#*=}
    done
    [[ $min =~ ^[0-9]+$ ]] || fail "$name does not set min.insync.replicas"
    ((min >= 2 && min < REPLICATION_FACTOR)) ||
        fail "$name: min.insync.replicas=$min must be at least 2 and below REPLICATION_FACTOR=$REPLICATION_FACTOR"
    for want in "$@"; do
        [[ ,${!name}, == *",$want,"* ]] || fail "$name must hold $want"
    done
}
check_config EVENTS_CONFIG unclean.leader.election.enable=false retention.ms=-1 retention.bytes=-1
check_config DLQ_CONFIG unclean.leader.election.enable=false

# --- the client properties (security) --------------------------------------------------------
mkdir -p "$WORK_DIR"
umask 077
TEMP_FILES=()
trap 'rm -f "${TEMP_FILES[@]}"' EXIT
temp_file() { # temp_file NAME: a new private file in WORK_DIR, removed at exit, its path in NAME
    local path
    path=$(mktemp "$WORK_DIR/stockpipe-$1.XXXXXX") || fail "cannot write in WORK_DIR=$WORK_DIR"
    TEMP_FILES+=("$path")
    printf -v "$1" '%s' "$path"
}
temp_file PROPS

protocol=${KAFKA_SECURITY_PROTOCOL:-plaintext}
protocol=${protocol,,}
case $protocol in
    plaintext | ssl | sasl_plaintext | sasl_ssl) ;;
    *) fail "KAFKA_SECURITY_PROTOCOL=$protocol: use plaintext, ssl, sasl_plaintext or sasl_ssl" ;;
esac
prop security.protocol "${protocol^^}"
# Bounds: a broker that does not answer fails the run (the Job retries) instead of hanging it.
prop request.timeout.ms 30000
prop default.api.timeout.ms 60000
summary="security $protocol"

if [[ $protocol == sasl_* ]]; then
    mechanism=${KAFKA_SASL_MECHANISM:-}
    mechanism=${mechanism^^}
    case $mechanism in
        SCRAM-SHA-512 | SCRAM-SHA-256) module=org.apache.kafka.common.security.scram.ScramLoginModule ;;
        PLAIN) module=org.apache.kafka.common.security.plain.PlainLoginModule ;;
        *) fail "KAFKA_SASL_MECHANISM='${KAFKA_SASL_MECHANISM:-}': with $protocol use" \
            "SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN" ;;
    esac
    need KAFKA_SASL_USERNAME KAFKA_SASL_PASSWORD
    printable KAFKA_SASL_USERNAME
    printable KAFKA_SASL_PASSWORD
    prop sasl.mechanism "$mechanism"
    login="username=$(jaas_quote "$KAFKA_SASL_USERNAME")"
    login+=" password=$(jaas_quote "$KAFKA_SASL_PASSWORD")"
    prop sasl.jaas.config "$module required $login;"
    summary+=", $mechanism as user $KAFKA_SASL_USERNAME"
fi

if [[ $protocol == *ssl ]]; then
    # The brokers' certificates are checked against KAFKA_SSL_CA_LOCATION (a PEM file, or a
    # directory of them, as for the workers), or else the JVM's own CA store; the host name is
    # checked too (ssl.endpoint.identification.algorithm=https, the Java clients' default).
    if [[ -n ${KAFKA_SSL_CA_LOCATION:-} ]]; then
        ca=$KAFKA_SSL_CA_LOCATION
        printable KAFKA_SSL_CA_LOCATION
        if [[ -d $ca ]]; then # one PEM file of every certificate in the directory
            temp_file ca
            for f in "$KAFKA_SSL_CA_LOCATION"/*; do
                [[ -f $f ]] && grep -q -- '-----BEGIN CERTIFICATE-----' "$f" && cat "$f" >>"$ca"
            done
        fi
        [[ -r $ca ]] && grep -q -- '-----BEGIN CERTIFICATE-----' "$ca" ||
            fail "KAFKA_SSL_CA_LOCATION=$KAFKA_SSL_CA_LOCATION: no PEM certificate readable" \
                "there (is the file in the Secret stockpipe-tls or the ConfigMap stockpipe-ca?)"
        prop ssl.truststore.type PEM
        prop ssl.truststore.location "$ca"
        summary+=", CA $KAFKA_SSL_CA_LOCATION"
    else
        summary+=", the JVM's CA store"
    fi
    # Mutual TLS: Java reads the key and its certificate chain from one PEM file, the key first
    # and in PKCS#8 ("BEGIN PRIVATE KEY", or "BEGIN ENCRYPTED PRIVATE KEY" with
    # KAFKA_SSL_KEY_PASSWORD). Java 17 refuses OpenSSL 3's default encryption of a key ("PBES2
    # SecretKeyFactory not available"): encrypt it with openssl pkcs8 -topk8 -v1 PBE-SHA1-3DES.
    cert=${KAFKA_SSL_CERTIFICATE_LOCATION:-}
    key=${KAFKA_SSL_KEY_LOCATION:-}
    if [[ -n $cert || -n $key ]]; then
        [[ -n $cert && -n $key ]] ||
            fail "mutual TLS needs both KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION"
        [[ -r $cert ]] || fail "KAFKA_SSL_CERTIFICATE_LOCATION=$cert cannot be read"
        [[ -r $key ]] || fail "KAFKA_SSL_KEY_LOCATION=$key cannot be read"
        grep -qE -- '-----BEGIN (ENCRYPTED )?PRIVATE KEY-----' "$key" ||
            fail "KAFKA_SSL_KEY_LOCATION=$key is not a PKCS#8 PEM key (BEGIN PRIVATE KEY);" \
                "convert it: openssl pkcs8 -topk8 -in KEY -out KEY8 (-nocrypt for no passphrase)"
        temp_file keystore
        cat "$key" "$cert" >"$keystore"
        prop ssl.keystore.type PEM
        prop ssl.keystore.location "$keystore"
        if [[ -n ${KAFKA_SSL_KEY_PASSWORD:-} ]]; then
            printable KAFKA_SSL_KEY_PASSWORD
            prop ssl.key.password "$KAFKA_SSL_KEY_PASSWORD"
        fi
        summary+=", client certificate $cert"
    fi
fi
say "brokers $KAFKA_BROKERS, $summary"
CLIENT=(--bootstrap-server "$KAFKA_BROKERS" --command-config "$PROPS")

run_tool() { # run_tool WHAT TOOL ARGS...: the tool's output on success, else it and exit 1
    local what=$1 tool=$2 out
    shift 2
    if ! out=$("$KAFKA_BIN/$tool" "$@" 2>&1); then
        printf '%s\n' "$out" | sed 's/^/    | /' >&2
        fail "$what failed ($tool)"
    fi
    printf '%s\n' "$out"
}

# The fields of kafka-topics --describe, tab-separated (busybox awk and sed: no grep -P here):
#   Topic: T<TAB>TopicId: ...<TAB>PartitionCount: 12<TAB>ReplicationFactor: 3<TAB>Configs: a=b,c=d
#   <TAB>Topic: T<TAB>Partition: 0<TAB>Leader: 1<TAB>Replicas: 1,2,3<TAB>Isr: 1,2,3<TAB>...
# topic_field OUTPUT TOPIC NAME: the value of field NAME on TOPIC's first line.
topic_field() {
    awk -F'\t' -v t="Topic: $2" -v f="$3: " '
        $1 == t { for (i = 2; i <= NF; i++) if (index($i, f) == 1) print substr($i, length(f) + 1); exit }
    ' <<<"$1"
}
# partition_isrs OUTPUT TOPIC: "PARTITION ISR-LIST" per partition of TOPIC.
partition_isrs() {
    awk -F'\t' -v t="Topic: $2" '
        $1 == "" && $2 == t {
            p = ""; isr = ""
            for (i = 3; i <= NF; i++) {
                if (index($i, "Partition: ") == 1) p = substr($i, 12)
                if (index($i, "Isr: ") == 1) isr = substr($i, 6)
            }
            print p, isr
        }
    ' <<<"$1"
}

join() { # join ITEM...: the items separated by "; "
    local IFS=$'\x1f'
    local s="$*"
    printf '%s' "${s//$'\x1f'/; }"
}

# describe TOPIC: sets out, got_partitions, got_rf, got_configs (",a=b,c=d,") of the caller.
# --topic is a regular expression: the dots of the name are escaped, and only the lines of this
# very topic are read.
describe() {
    out=$(run_tool "describing $1" kafka-topics.sh "${CLIENT[@]}" --describe --topic "${1//./\\.}")
    got_partitions=$(topic_field "$out" "$1" PartitionCount)
    got_rf=$(topic_field "$out" "$1" ReplicationFactor)
    got_configs=,$(topic_field "$out" "$1" Configs),
    [[ $got_partitions =~ ^[0-9]+$ && $got_rf =~ ^[0-9]+$ ]] ||
        fail "$1: no partition count and replication factor in the output of kafka-topics --describe: $out"
}

# --- each topic ------------------------------------------------------------------------------
ensure_topic() { # ensure_topic TOPIC PARTITIONS CONFIG
    local topic=$1 partitions=$2 config=$3 out kv msg got_partitions got_rf got_configs min p isr
    local -a kvs ids args=() wrong=() short=()
    IFS=, read -ra kvs <<<"$config"
    for kv in "${kvs[@]}"; do args+=(--config "$kv"); done

    out=$(run_tool "creating $topic" kafka-topics.sh "${CLIENT[@]}" --create --if-not-exists \
        --topic "$topic" --partitions "$partitions" --replication-factor "$REPLICATION_FACTOR" \
        "${args[@]}")
    if grep -q '^Created topic' <<<"$out"; then
        say "$topic: created ($partitions partitions, replication factor $REPLICATION_FACTOR)"
    else
        say "$topic: exists already"
    fi

    # The partition count and replication factor first: a topic that does not fit is left as it
    # is (min.insync.replicas=2 on a topic of one replica would stop every publish at once).
    describe "$topic"
    if [[ $got_partitions != "$partitions" ]]; then
        msg="$got_partitions partitions, not $partitions: never add partitions to it; set the Job's"
        msg+=" EVENTS_PARTITIONS or DLQ_PARTITIONS to $got_partitions in your overlay (and the"
        msg+=" consumers to at most that), or make a new topic"
        wrong+=("$msg")
    fi
    if ((got_rf < REPLICATION_FACTOR)); then
        msg="replication factor $got_rf, below $REPLICATION_FACTOR: raise it with"
        wrong+=("$msg kafka-reassign-partitions.sh (docs/operations.md)")
    fi
    ((${#wrong[@]} == 0)) || fail "$topic: $(join "${wrong[@]}"); nothing changed"

    run_tool "setting the configs of $topic" kafka-configs.sh "${CLIENT[@]}" --alter \
        --entity-type topics --entity-name "$topic" --add-config "$config" >/dev/null
    describe "$topic"
    for kv in "${kvs[@]}"; do
        [[ $got_configs == *",$kv,"* ]] || wrong+=("config $kv not in effect (has: ${got_configs//,/ })")
    done
    ((${#wrong[@]} == 0)) || fail "$topic: $(join "${wrong[@]}")"

    min=${config#*min.insync.replicas=}
    min=${min%%,*}
    while read -r p isr; do
        IFS=, read -ra ids <<<"$isr"
        ((${#ids[@]} >= min)) || short+=("$p (in sync: ${isr:-none})")
    done < <(partition_isrs "$out" "$topic")
    if ((${#short[@]} > 0)); then
        say "$topic: WARNING: ${#short[@]} partition(s) below min.insync.replicas=$min, the" \
            "producers cannot publish to them until a broker is back: ${short[*]}"
    fi
    say "$topic: ok: $got_partitions partitions, replication factor $got_rf, ${config//,/ }"
}

ensure_topic "$KAFKA_TOPIC" "$EVENTS_PARTITIONS" "$EVENTS_CONFIG"
ensure_topic "$KAFKA_DLQ_TOPIC" "$DLQ_PARTITIONS" "$DLQ_CONFIG"
say "done"
