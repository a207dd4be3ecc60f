#!/usr/bin/env bash
# fresh_machine.sh - `make demo` and `make test` on a machine without the packages, in ONE run each.
#
# A clean copy of the tree (what git tracks, plus new files not yet committed) is built with
# stand-ins on PATH that make this machine look as a fresh one does until the install step runs:
#   dpkg-query  reports no package installed, so the real scripts/install-deps.sh decides that the
#               libraries are missing and calls apt-get;
#   apt-get     records its calls and, for `install`, writes the "installed" stamp;
#   pkg-config  fails, as it does for a module whose -dev package is absent, until the stamp is
#               there; then it is the real pkg-config.
# The real Makefile and the real install script run unchanged; only scripts/demo.sh and
# tests/run-all.sh are replaced in the copy by stubs that check the build they were handed (the
# stack, the sale and the suites are tested elsewhere). The Kafka jars and the deploy tools
# already resolved into var/ are linked into the copy, so nothing is downloaded.
#
# Checks:
#   1. `make demo`: one run exits 0, apt-get install ran before the first compile, and the stub
#      saw working binaries.
#   2. `make test`: the same for the test build (the workers, the tests, the sanitized build).
#   3. A missing pkg-config module stops the build with a sentence naming the Debian package,
#      never with an empty flag list (`make all` with the stamp removed).
# Prints "N passed, M failed" last. KEEP=1 keeps the copy (its path is printed).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

passed=0
failed=0
ok() {
    echo "ok: $*"
    passed=$((passed + 1))
}
fail() {
    echo "FAIL: $*"
    failed=$((failed + 1))
}
finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
}

for d in var/kafka-libs var/tools; do
    if [ ! -d "$d" ]; then
        fail "$d is missing: run scripts/install-deps.sh first (make test does)"
        finish
    fi
done

work=$(mktemp -d /tmp/stockpipe-fresh.XXXXXX)
if [ "${KEEP:-0}" = 1 ]; then
    echo "fresh_machine: keeping $work"
else
    trap 'rm -rf "$work"' EXIT
fi
tree=$work/tree
fake=$work/fakebin
stamp=$work/installed
mkdir -p "$tree/var" "$fake"

# The copy: tracked files and untracked ones that are not ignored (so an uncommitted change is
# tested too); no build/, bin/ or var/ of this tree.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        tar -c --null -T - -f - | tar -x -C "$tree" -f -
else
    tar -c --exclude=./build --exclude=./bin --exclude=./var -f - . | tar -x -C "$tree" -f -
fi
ln -s "$ROOT/var/kafka-libs" "$tree/var/kafka-libs"
ln -s "$ROOT/var/tools" "$tree/var/tools"

real_pkg_config=$(command -v pkg-config)
cat >"$fake/pkg-config" <<EOF
#!/bin/sh
# stand-in: no module is there until apt-get install has run
[ -f "$stamp" ] && exec "$real_pkg_config" "\$@"
for a in "\$@"; do case "\$a" in -*) ;; *) echo "Package \$a was not found in the pkg-config search path." >&2 ;; esac; done
exit 1
EOF
real_dpkg_query=$(command -v dpkg-query)
cat >"$fake/dpkg-query" <<EOF
#!/bin/sh
# stand-in: nothing is installed until apt-get install has run
[ -f "$stamp" ] && exec "$real_dpkg_query" "\$@"
exit 1
EOF
cat >"$fake/apt-get" <<EOF
#!/bin/sh
# stand-in: records the call; install writes the stamp
echo "apt-get \$*" >>"$work/apt.log"
for a in "\$@"; do [ "\$a" = install ] && echo "FAKE-APT-INSTALL" && touch "$stamp"; done
exit 0
EOF
chmod +x "$fake"/*

# The stubs stand where the real demo and suite would run; they prove the binaries work.
cat >"$tree/scripts/demo.sh" <<'EOF'
#!/bin/sh
for w in producer consumer reaper; do bin/$w --help >/dev/null || { echo "STUB: bin/$w --help failed"; exit 1; }; done
echo "STUB-DEMO-RAN"
EOF
cat >"$tree/tests/run-all.sh" <<'EOF'
#!/bin/sh
for w in producer consumer reaper asan/producer asan/consumer asan/reaper; do
    bin/$w --help >/dev/null || { echo "STUB: bin/$w --help failed"; exit 1; }
done
n=$(find build/release/tests build/asan/tests -type f -perm -u+x 2>/dev/null | wc -l)
[ "$n" -gt 0 ] || { echo "STUB: no test program was built"; exit 1; }
echo "STUB-TESTS-RAN ($n test programs)"
EOF
chmod +x "$tree/scripts/demo.sh" "$tree/tests/run-all.sh"

# run_fresh TARGET: one `make TARGET` in the copy, as on a fresh machine; output in $work/TARGET.log
run_fresh() {
    rm -f "$stamp" "$work/apt.log"
    (cd "$tree" && make clean >/dev/null 2>&1)
    (cd "$tree" && env -u MAKEFLAGS -u MAKELEVEL -u MFLAGS PATH="$fake:$PATH" make "$1") \
        >"$work/$1.log" 2>&1
}

# first_line LOG PATTERN: the line number of the first line matching PATTERN (0 if none)
first_line() { grep -n -m1 -E "$2" "$1" | cut -d: -f1 || true; }

check_ordering() { # TARGET STUB-MARKER
    local log=$work/$1.log inst compile
    inst=$(first_line "$log" '^FAKE-APT-INSTALL')
    compile=$(first_line "$log" '(^| )(gcc|cc|clang-14) .* -c ')
    if [ -n "$inst" ] && [ -n "$compile" ] && [ "$inst" -lt "$compile" ]; then
        ok "make $1: apt-get install (line $inst) ran before the first compile (line $compile)"
    else
        fail "make $1: install at line '${inst:-none}', first compile at line '${compile:-none}'"
    fi
    if grep -q "$2" "$log"; then ok "make $1: the build it handed on works ($(grep -m1 "$2" "$log"))"; else fail "make $1: $2 not printed"; fi
}

echo "=== make demo on a fresh machine (copy in $work)"
if run_fresh demo; then ok "make demo: one run exited 0"; else
    fail "make demo exited non-zero; its last lines:"
    tail -n 15 "$work/demo.log" | sed 's/^/    /'
fi
check_ordering demo STUB-DEMO-RAN

echo "=== make test on a fresh machine"
if run_fresh test; then ok "make test: one run exited 0"; else
    fail "make test exited non-zero; its last lines:"
    tail -n 15 "$work/test.log" | sed 's/^/    /'
fi
check_ordering test STUB-TESTS-RAN

echo "=== a missing pkg-config module stops the build with a sentence"
rm -f "$stamp"
(cd "$tree" && make clean >/dev/null 2>&1)
out=$(cd "$tree" && env -u MAKEFLAGS -u MAKELEVEL PATH="$fake:$PATH" make all 2>&1)
rc=$?
if [ "$rc" -ne 0 ] && printf '%s\n' "$out" | grep -q 'librdkafka-dev' &&
    ! printf '%s\n' "$out" | grep -qE '(^| )(gcc|cc) .* -c '; then
    ok "make all without the packages: stopped before compiling: $(printf '%s\n' "$out" | grep -m1 librdkafka-dev)"
else
    fail "make all without the packages: rc=$rc, expected a stop naming librdkafka-dev before any compile; got:"
    printf '%s\n' "$out" | tail -n 5 | sed 's/^/    /'
fi

finish
