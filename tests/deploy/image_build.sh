#!/usr/bin/env bash
# image_build.sh - the container image (deploy/Dockerfile), checked without a container engine.
#
# No engine runs here or in CI, so the image itself is never built by the tests. Instead this
# suite does on the host what the Dockerfile's build stage does, with the same inputs, and checks
# that the runtime stage installs exactly what the result needs:
#   - the host is Debian 12, as both stages are (else the comparison says nothing);
#   - every package of deploy/packages/build.txt is installed here;
#   - `deploy/image.sh build` (the Dockerfile's compile step) builds the three workers into a
#     scratch directory with the image's flags, pkg-config seeing only the modules of build.txt's
#     packages (and what apt brings with them), and every system header the sources read belongs
#     to one of those packages;
#   - ldd finds every library of each binary;
#   - the packages holding the binaries' NEEDED libraries are exactly deploy/packages/
#     runtime-libs.txt (plus libc6, which the base image has): nothing missing, nothing extra;
#   - every library ldd loads belongs to a package that runtime-libs.txt brings in (their
#     Depends, followed through dpkg's database);
#   - hadolint finds nothing in the Dockerfile; it installs and builds through deploy/image.sh,
#     and each file it copies from the build context exists and is let in by /.dockerignore.
# Prints "ok - ..." / "not ok - ..." per check and last "N passed, M failed"; exits 1 on a failure.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

passed=0
failed=0
ok() { echo "ok - $*"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $*"; failed=$((failed + 1)); }
check() { # check DESCRIPTION DETAIL-IF-FAILED CONDITION-COMMAND...
    local what=$1 detail=$2
    shift 2
    if "$@"; then ok "$what"; else not_ok "$what${detail:+: $detail}"; fi
}
finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/stockpipe-image.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
WORKERS=(producer consumer reaper)

# dpkg's view of the installed packages: each one's Pre-Depends and Depends.
declare -A DEPS=() INSTALLED=()
while IFS=$'\t' read -r status pkg deps; do
    [ "$status" = installed ] || continue
    INSTALLED[$pkg]=1
    DEPS[$pkg]=$deps
done < <(dpkg-query -W -f='${db:Status-Status}\t${Package}\t${Pre-Depends}, ${Depends}\n')

# closure NAME PACKAGE...: fills the associative array NAME with the packages and everything apt
# installs with them, following Pre-Depends and Depends and taking the first installed
# alternative, as apt would.
closure() {
    local -n into=$1
    shift
    local queue=("$@") p g a groups alts
    while [ ${#queue[@]} -gt 0 ]; do
        p=${queue[0]}
        queue=("${queue[@]:1}")
        [ -n "${into[$p]:-}" ] && continue
        into[$p]=1
        IFS=',' read -ra groups <<<"${DEPS[$p]:-}"
        for g in "${groups[@]}"; do
            IFS='|' read -ra alts <<<"$g"
            for a in "${alts[@]}"; do
                a=${a%%(*}
                a=${a//[[:space:]]/}
                a=${a%%:*}
                if [ -n "$a" ] && [ -n "${INSTALLED[$a]:-}" ]; then
                    queue+=("$a")
                    break
                fi
            done
        done
    done
}

# --- the host is what the image builds on -----------------------------------------------------

major=$(cut -d. -f1 /etc/debian_version 2>/dev/null)
check "host is Debian 12 like the image's stages (found ${major:-no /etc/debian_version})" "" \
    test "$major" = 12
dockerfile_debian=$(sed -n 's/^ARG DEBIAN=\([0-9.]*\).*/\1/p' deploy/Dockerfile)
[ "${dockerfile_debian%%.*}" = 12 ] && [ -n "$dockerfile_debian" ] ||
    not_ok "the Dockerfile's ARG DEBIAN is Debian 12 (found '${dockerfile_debian}')"

mapfile -t build_pkgs < <(deploy/image.sh packages build)
mapfile -t runtime_libs < <(deploy/image.sh packages runtime-libs)
mapfile -t runtime_tools < <(deploy/image.sh packages runtime-tools)
missing=()
for p in "${build_pkgs[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
check "the build stage's ${#build_pkgs[@]} packages are installed here (${build_pkgs[*]})" \
    "missing ${missing[*]:-}" test ${#missing[@]} -eq 0

# --- build as the Dockerfile's build stage does ------------------------------------------------

# The build stage has only build.txt and what apt brings with it, while this host has more (the
# test packages, say). pkg-config is where the Makefile finds its libraries, so the build here
# sees only the .pc files of those packages: a library the list lacks fails this build as it
# would fail the image's.
declare -A BUILD_CLOSURE=()
closure BUILD_CLOSURE "${build_pkgs[@]}"
mkdir -p "$tmp/pkgconfig"
npc=0
while read -r pc; do
    ln -sf "$pc" "$tmp/pkgconfig/" && npc=$((npc + 1))
done < <(dpkg -L "${!BUILD_CLOSURE[@]}" 2>/dev/null | grep '/pkgconfig/[^/]*\.pc$' | sort -u)
if ! PKG_CONFIG_LIBDIR=$tmp/pkgconfig PKG_CONFIG_PATH= \
    deploy/image.sh build "$tmp/out" >"$tmp/build.log" 2>&1; then
    not_ok "deploy/image.sh build compiles the workers (log below)"
    tail -n 30 "$tmp/build.log" | sed 's/^/#   /'
    finish
fi
flags=$(deploy/image.sh cflags)
built=0
for w in "${WORKERS[@]}"; do [ -x "$tmp/out/bin/$w" ] && built=$((built + 1)); done
check "deploy/image.sh build compiles producer, consumer, reaper with '$flags', seeing only\
 the $npc pkg-config modules of build.txt's ${#BUILD_CLOSURE[@]} packages" "" test "$built" -eq 3
check "the compiler really got the image's flags" "" grep -qF -- "$flags" "$tmp/build.log"

# Headers are found in /usr/include whether or not pkg-config named their package. gcc -M lists
# every header a source reads (the build's own -MMD files leave out the system ones), with the
# include paths of the build: -iquote common and pkg-config's flags for the Makefile's PKGS. Each
# must belong to a package the build stage has.
pc_modules=$(make -s --no-print-directory --eval 'stockpipe-pkgs: ; @echo $(PKGS)' stockpipe-pkgs)
pc_cflags=$(PKG_CONFIG_LIBDIR=$tmp/pkgconfig PKG_CONFIG_PATH= pkg-config --cflags $pc_modules)
mapfile -t headers < <(gcc -M -std=c17 -D_GNU_SOURCE -iquote common $pc_cflags $flags \
    common/*.c producer/*.c consumer/*.c reaper/*.c 2>/dev/null |
    tr ' \\' '\n\n' | grep '^/usr/' | sort -u)
declare -A HEADER_PKG=()
while IFS= read -r line; do # "libpq-dev: /usr/include/postgresql/libpq-fe.h"
    pkg=${line%%: *}
    HEADER_PKG[${line#*: }]=${pkg%%:*}
done < <(dpkg -S "${headers[@]}" 2>/dev/null)
outside=()
for h in "${headers[@]}"; do
    p=${HEADER_PKG[$h]:-}
    if [ -z "$p" ] || [ -z "${BUILD_CLOSURE[$p]:-}" ]; then outside+=("$h${p:+ ($p)}"); fi
done
check "the ${#headers[@]} system headers the build read all come from build.txt's packages" \
    "${outside[*]:-}" test ${#headers[@]} -gt 0 -a ${#outside[@]} -eq 0

# --- what the binaries need -------------------------------------------------------------------

# Which package holds each library ldd names. dpkg records the paths its packages shipped, which
# on a merged-/usr system may differ from ldd's by the /usr prefix: both spellings are asked, all
# in one dpkg -S call (it costs ~0.3 s per call).
declare -A OWNER=()
not_found=()
for w in "${WORKERS[@]}"; do
    ldd "$tmp/out/bin/$w" >"$tmp/ldd.$w" 2>&1 || not_ok "ldd $w"
    while read -r lib _ path _; do
        [ "$path" = "not" ] && not_found+=("$w:$lib")
    done <"$tmp/ldd.$w"
done
# Every file ldd loads: the "name => /path" lines and the loader's own absolute path.
mapfile -t lib_paths < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' \
    "$tmp"/ldd.* | sort -u)
spellings=()
for path in "${lib_paths[@]}"; do
    case $path in
        /usr/*) spellings+=("$path" "${path#/usr}") ;;
        *) spellings+=("$path" "/usr$path") ;;
    esac
done
while IFS= read -r line; do # "libpq5:amd64: /usr/lib/x86_64-linux-gnu/libpq.so.5"
    pkg=${line%%: *}
    OWNER[${line#*: }]=${pkg%%:*}
done < <(dpkg -S "${spellings[@]}" 2>/dev/null)
pkg_of() { # pkg_of PATH: prints the owning package, or fails
    local alt
    case $1 in /usr/*) alt=${1#/usr} ;; *) alt=/usr$1 ;; esac
    [ -n "${OWNER[$1]:-}${OWNER[$alt]:-}" ] || return 1
    echo "${OWNER[$1]:-${OWNER[$alt]}}"
}

declare -A NEEDED_PKGS=() LOADED_PKGS=() CLOSURE=()
unowned=()
for path in "${lib_paths[@]}"; do
    if p=$(pkg_of "$path"); then LOADED_PKGS[$p]=1; else unowned+=("$path"); fi
done
# The libraries each binary itself asks for (its NEEDED entries), as ldd resolved them.
for w in "${WORKERS[@]}"; do
    for lib in $(objdump -p "$tmp/out/bin/$w" | awk '$1 == "NEEDED" { print $2 }'); do
        path=$(awk -v l="$lib" '$1 == l && $2 == "=>" { print $3 }' "$tmp/ldd.$w")
        if p=$(pkg_of "$path"); then NEEDED_PKGS[$p]=1; else unowned+=("$w:$lib"); fi
    done
done
check "ldd finds every library of the three binaries" "not found: ${not_found[*]:-}" \
    test ${#not_found[@]} -eq 0
check "every library the binaries load belongs to a Debian package" "${unowned[*]:-}" \
    test ${#unowned[@]} -eq 0

# NEEDED packages minus the base image's libc6 must equal runtime-libs.txt.
unset 'NEEDED_PKGS[libc6]'
want=$(printf '%s\n' "${!NEEDED_PKGS[@]}" | sort | tr '\n' ' ')
have=$(printf '%s\n' "${runtime_libs[@]}" | sort | tr '\n' ' ')
check "runtime-libs.txt is exactly the packages of the binaries' NEEDED libraries (${want% })" \
    "runtime-libs.txt has '${have% }'" test "$want" = "$have"

# What apt brings with runtime-libs (and what the base image's libc6 brings).
closure CLOSURE "${runtime_libs[@]}" libc6
uncovered=()
for p in "${!LOADED_PKGS[@]}"; do [ -n "${CLOSURE[$p]:-}" ] || uncovered+=("$p"); done
check "apt brings every library ldd loads (${#LOADED_PKGS[@]} packages) with runtime-libs.txt" \
    "not brought: ${uncovered[*]:-}" test ${#uncovered[@]} -eq 0

# runtime-tools.txt: programs, not libraries; psql is there for the migration Job.
tools_ok=1
for p in "${runtime_tools[@]}"; do [ -n "${NEEDED_PKGS[$p]:-}" ] && tools_ok=0; done
check "runtime-tools.txt names no library package the binaries link" "" test "$tools_ok" = 1
psql_ok=0
for p in "${runtime_tools[@]}"; do
    [ "$p" = postgresql-client ] && psql_ok=1
done
check "the runtime stage gets psql (postgresql-client) for scripts/migrate.sh" "" \
    test "$psql_ok" = 1

# --- the Dockerfile uses those same steps -----------------------------------------------------

HADOLINT=$ROOT/var/tools/venv/bin/hadolint
if [ -x "$HADOLINT" ]; then
    if "$HADOLINT" --no-color deploy/Dockerfile >"$tmp/hadolint" 2>&1; then
        version=$("$HADOLINT" --version | awk '{ print $NF }')
        ok "hadolint $version finds nothing in deploy/Dockerfile"
    else
        not_ok "hadolint finds problems in deploy/Dockerfile: $(tr '\n' ' ' <"$tmp/hadolint")"
    fi
else
    not_ok "hadolint is installed in var/tools/venv (run scripts/install-deps.sh)"
fi

# The Dockerfile with its continued lines joined.
sed -e ':a' -e '/\\$/N; s/\\\n//; ta' deploy/Dockerfile >"$tmp/Dockerfile.joined"
check "the build stage installs deploy/packages/build.txt through image.sh" "" \
    grep -Eq 'image\.sh packages build +\| *xargs apt-get install' "$tmp/Dockerfile.joined"
check "the build stage compiles through 'deploy/image.sh build'" "" \
    grep -q '^RUN deploy/image.sh build ' "$tmp/Dockerfile.joined"
check "the runtime stage installs runtime-libs and runtime-tools through image.sh" "" \
    grep -Eq 'image\.sh packages runtime-libs runtime-tools +\| *xargs apt-get install' \
    "$tmp/Dockerfile.joined"

# Each COPY source from the context (not --from=) must exist and be let in by the allow-list
# .dockerignore ("*" then "!path" lines).
bad=()
while read -r src; do
    [ -e "$src" ] || { bad+=("$src (missing)"); continue; }
    allowed=0
    while read -r pat; do
        pat=${pat#!}
        pat=${pat%/}
        case ${src%/} in "$pat" | "$pat"/*) allowed=1 ;; esac
    done < <(grep '^!' .dockerignore)
    [ "$allowed" = 1 ] || bad+=("$src (not in .dockerignore's allow-list)")
done < <(awk '$1 == "COPY" && $2 !~ /^--from=/ {
                 for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i
             }' "$tmp/Dockerfile.joined")
check "every file the Dockerfile copies exists and passes .dockerignore" "${bad[*]:-}" \
    test ${#bad[@]} -eq 0
# The bind-mounted deploy/ of the runtime stage needs image.sh and the lists let in as well.
check ".dockerignore lets in deploy/image.sh and deploy/packages/" "" \
    grep -qx '!deploy/image.sh' .dockerignore
check ".dockerignore keeps everything else out (starts from '*')" "" grep -qx '\*' .dockerignore

finish
