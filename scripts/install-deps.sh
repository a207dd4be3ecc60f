#!/usr/bin/env bash
# install-deps.sh - install what stockpipe needs to build, test and run its local stack.
#
#   scripts/install-deps.sh            install whatever is missing, then the Kafka broker jars
#   scripts/install-deps.sh --check    only report what is missing (exit 1 if anything is)
#
# Idempotent and quick: when everything is present it only inspects dpkg's database and a stamp
# file (well under a second) and never runs `apt-get update`. When something is missing it runs
# `apt-get update` once and installs exactly the missing Debian packages (Debian 12 names).
#
# The Kafka broker is not a Debian package: its jars (pinned in deploy/kafka-local/pom.xml) are
# resolved from Maven Central into var/kafka-libs/, stamped with the Kafka version and the pom's
# checksum so that editing the pom re-resolves them. Maven settings such as a local repository
# can be passed through MAVEN_OPTS, e.g. MAVEN_OPTS=-Dmaven.repo.local=/tmp/m2 (a cold download).
#
# The checks of deploy/ (tests/deploy/) need pinned tools, kept under var/tools/ and stamped with
# their versions: kustomize, built by `go install` from the Go module proxy, and from PyPI into a
# Python venv kubernetes-validate (with the Kubernetes schemas it ships) and hadolint.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KAFKA_VERSION=4.2.0 # keep in step with <kafka.version> in deploy/kafka-local/pom.xml
KAFKA_POM=$ROOT/deploy/kafka-local/pom.xml
KAFKA_LIBS=$ROOT/var/kafka-libs
KAFKA_STAMP=$KAFKA_LIBS/.stockpipe-stamp
# v5.8.2 is the newest kustomize that this machine's Go (1.26) builds: v5.8.3 asks for Go 1.27.
KUSTOMIZE_VERSION=v5.8.2
TOOLS=$ROOT/var/tools
VALIDATE_REQS=$ROOT/tests/deploy/requirements.txt

CHECK_ONLY=0
case "${1:-}" in
    "") ;;
    --check) CHECK_ONLY=1 ;;
    -h | --help)
        sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "install-deps: unknown argument '$1' (try --help)" >&2
        exit 2
        ;;
esac

say() { printf 'install-deps: %s\n' "$*"; }
die() {
    printf 'install-deps: error: %s\n' "$*" >&2
    exit 1
}

# --- what is installed -----------------------------------------------------------------------

# Every package name we may ask about, queried from dpkg in one call (one call per package would
# cost ~10 ms each). Packages dpkg never heard of are simply absent from the table.
ALL_PKGS=(build-essential pkg-config librdkafka-dev libhiredis-dev libpq-dev libjansson-dev
    libevent-dev libcmocka-dev redis-server redis-tools redis-sentinel postgresql
    postgresql-client kcat openjdk-17-jre-headless maven wrk clang-format valgrind procps
    util-linux python3 python3-venv clang-14 libclang-rt-14-dev faketime)
declare -A INSTALLED=()
while read -r pkg status; do
    [[ $status == installed ]] && INSTALLED[${pkg%%:*}]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${ALL_PKGS[@]}" 2>/dev/null || true)

have_pkg() { [[ -n ${INSTALLED[$1]:-} ]]; }
have_cmd() { command -v "$1" >/dev/null 2>&1; }

# A server build of PostgreSQL, any version (stack.sh takes the newest).
have_pg_server() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }

# Any `java` on PATH of major version >= 17 will do. Read the JDK's `release` file when there is
# one (free), else ask the JVM (~50 ms).
have_java17() {
    have_cmd java || return 1
    local bin home ver=""
    bin=$(readlink -f "$(command -v java)")
    home=$(dirname "$(dirname "$bin")")
    if [[ -r $home/release ]]; then
        ver=$(sed -n 's/^JAVA_VERSION="\([^"]*\)".*/\1/p' "$home/release")
    fi
    if [[ -z $ver ]]; then
        ver=$(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)
    fi
    ver=${ver#1.} # "1.8.0_x" -> "8.0_x"
    [[ ${ver%%[!0-9]*} =~ ^[0-9]+$ ]] && ((${ver%%[!0-9]*} >= 17))
}

MISSING=()
need() { # need PACKAGE CHECK...: PACKAGE is missing unless the check command succeeds
    local pkg=$1
    shift
    "$@" || MISSING+=("$pkg")
}

# Where a command is what we really need, an equivalent install (e.g. postgresql-client-15
# without the postgresql-client metapackage, a JDK not from Debian) counts as present.
need build-essential eval 'have_pkg build-essential || { have_cmd gcc && have_cmd make; }'
need pkg-config have_cmd pkg-config
for p in librdkafka-dev libhiredis-dev libpq-dev libjansson-dev libevent-dev libcmocka-dev; do
    need "$p" have_pkg "$p"
done
need redis-server have_cmd redis-server
need redis-tools have_cmd redis-cli
need redis-sentinel eval 'have_pkg redis-sentinel || have_cmd redis-sentinel'
need postgresql have_pg_server
need postgresql-client eval 'have_cmd psql && have_cmd pg_isready'
need kcat have_cmd kcat
need openjdk-17-jre-headless have_java17
need maven have_cmd mvn
need wrk have_cmd wrk
need clang-format have_cmd clang-format
# The fuzz targets (tests/fuzz/): Debian's clang 14 and its libFuzzer and sanitizer runtimes.
need clang-14 have_cmd clang-14
need libclang-rt-14-dev have_pkg libclang-rt-14-dev
need valgrind have_cmd valgrind
# libfaketime: the clock-skew tests run workers with a shifted clock (tests/reaper/).
need faketime have_pkg faketime
need procps eval 'have_cmd ps && have_cmd pgrep'
need util-linux have_cmd runuser
# openssl: the security test (tests/common/integration_security.sh) makes its own CA.
need openssl have_cmd openssl
need python3 have_cmd python3
# The venv module needs ensurepip, which Debian ships apart (python3-venv). Asked only while the
# deploy tools' venv is not there yet: it costs a Python start.
[[ -f $TOOLS/venv/.stockpipe-stamp ]] ||
    need python3-venv eval 'have_pkg python3-venv || python3 -c "import ensurepip" 2>/dev/null'

kustomize_ok() {
    [[ -x $TOOLS/bin/kustomize ]] && [[ $(cat "$TOOLS/bin/.kustomize-version" 2>/dev/null) == "$KUSTOMIZE_VERSION" ]]
}
validator_stamp() { printf 'requirements=%s\n' "$(sha256sum <"$VALIDATE_REQS" | cut -d' ' -f1)"; }
validator_ok() {
    [[ -x $TOOLS/venv/bin/python ]] && [[ $(cat "$TOOLS/venv/.stockpipe-stamp" 2>/dev/null) == "$(validator_stamp)" ]]
}

kafka_stamp() { printf 'kafka=%s pom=%s\n' "$KAFKA_VERSION" "$(sha256sum <"$KAFKA_POM" | cut -d' ' -f1)"; }
kafka_jars_ok() {
    [[ -f $KAFKA_STAMP ]] && [[ $(cat "$KAFKA_STAMP") == "$(kafka_stamp)" ]] &&
        compgen -G "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null
}

if ((CHECK_ONLY)); then
    rc=0
    if ((${#MISSING[@]})); then
        say "missing packages: ${MISSING[*]}"
        rc=1
    fi
    if ! kafka_jars_ok; then
        say "missing Kafka $KAFKA_VERSION jars in ${KAFKA_LIBS#"$ROOT"/}"
        rc=1
    fi
    if ! kustomize_ok; then
        say "missing kustomize $KUSTOMIZE_VERSION in ${TOOLS#"$ROOT"/}/bin"
        rc=1
    fi
    if ! validator_ok; then
        say "missing the checkers of ${VALIDATE_REQS#"$ROOT"/} in ${TOOLS#"$ROOT"/}/venv"
        rc=1
    fi
    ((rc == 0)) && say "all present"
    exit "$rc"
fi

# --- Debian packages ---------------------------------------------------------------------------

if ((${#MISSING[@]})); then
    SUDO=()
    if ((EUID != 0)); then
        have_cmd sudo || die "not root and no sudo: cannot install ${MISSING[*]}"
        SUDO=(sudo)
    fi
    say "missing: ${MISSING[*]}"
    say "apt-get update"
    "${SUDO[@]}" apt-get update -qq
    say "apt-get install ${MISSING[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${MISSING[@]}"
else
    say "Debian packages: all present"
fi

# --- deploy tools: kustomize; kubernetes-validate and hadolint --------------------------------

if kustomize_ok; then
    say "kustomize $KUSTOMIZE_VERSION: present"
else
    have_cmd go || die "go not found: kustomize $KUSTOMIZE_VERSION is built with Go >= 1.26 (go install)"
    say "building kustomize $KUSTOMIZE_VERSION (go install from the Go module proxy) into ${TOOLS#"$ROOT"/}/bin ..."
    start=$SECONDS
    mkdir -p "$TOOLS/bin"
    rm -f "$TOOLS/bin/.kustomize-version"
    # GOTOOLCHAIN=local: build with this Go or fail, never fetch another toolchain.
    GOBIN=$TOOLS/bin GOTOOLCHAIN=local go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" ||
        die "go install of kustomize $KUSTOMIZE_VERSION failed (is the Go module proxy reachable? Go >= 1.26?)"
    echo "$KUSTOMIZE_VERSION" >"$TOOLS/bin/.kustomize-version"
    say "kustomize $KUSTOMIZE_VERSION: built in $((SECONDS - start)) s"
fi

if validator_ok; then
    say "kubernetes-validate, hadolint: present"
else
    say "installing kubernetes-validate, hadolint (${VALIDATE_REQS#"$ROOT"/}, from PyPI) into ${TOOLS#"$ROOT"/}/venv ..."
    start=$SECONDS
    # The stamp is written last: an interrupted install is redone from scratch next time.
    rm -rf "$TOOLS/venv"
    python3 -m venv "$TOOLS/venv" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    # --no-deps: exactly the pinned list, nothing the resolver would pick; wheels only, no builds.
    "$TOOLS/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
        --only-binary=:all: -r "$VALIDATE_REQS" || die "pip could not install ${VALIDATE_REQS#"$ROOT"/} (is PyPI reachable?)"
    validator_stamp >"$TOOLS/venv/.stockpipe-stamp"
    say "kubernetes-validate, hadolint: installed in $((SECONDS - start)) s"
fi

# --- Kafka broker jars -------------------------------------------------------------------------

if kafka_jars_ok; then
    say "Kafka $KAFKA_VERSION jars: present ($(find "$KAFKA_LIBS/" -name '*.jar' | wc -l) jars in ${KAFKA_LIBS#"$ROOT"/})"
    exit 0
fi

have_cmd mvn || die "mvn not found after installing maven"
say "resolving Kafka $KAFKA_VERSION jars with Maven into ${KAFKA_LIBS#"$ROOT"/} ..."
mkdir -p "$ROOT/var"
# Resolve into a scratch directory and swap it in only on success: an interrupted download never
# leaves a half-filled var/kafka-libs that looks complete.
tmp=$(mktemp -d "$ROOT/var/kafka-libs.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
# Debian's Maven 3.8 prints stray ANSI resets (ESC[0m) even with -B -q: strip them (pipefail
# keeps Maven's exit status).
if ! mvn -q -B -f "$KAFKA_POM" dependency:copy-dependencies \
    -DoutputDirectory="$tmp" -DincludeScope=runtime 2>&1 | sed 's/\x1b\[[0-9;]*m//g'; then
    die "Maven could not resolve the Kafka jars (is Maven Central reachable?)"
fi
[[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is not there"
kafka_stamp >"$tmp/.stockpipe-stamp"
rm -rf "$KAFKA_LIBS"
mv "$tmp" "$KAFKA_LIBS"
trap - EXIT
say "Kafka jars: $(find "$KAFKA_LIBS/" -name '*.jar' | wc -l) jars, $(du -sh "$KAFKA_LIBS" | cut -f1), in $((SECONDS - start)) s"
