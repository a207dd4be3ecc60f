#!/bin/sh
# image.sh - the steps of the container image (deploy/Dockerfile) that can also run outside it, so
# that the image and its test (tests/deploy/image_build.sh) cannot drift apart.
#
#   deploy/image.sh packages LIST...   the Debian packages of deploy/packages/LIST.txt, one a line
#   deploy/image.sh build OUT          compile bin/producer, bin/consumer, bin/reaper into OUT/bin
#                                      (objects in OUT/obj) with the image's flags
#   deploy/image.sh cflags             print those flags
#
# POSIX sh: it runs in the bare Debian images before anything is installed.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)

# The Makefile's own -O2 -g, plus the hardening Debian builds its packages with (dpkg-buildflags:
# stack protector, fortified libc calls, stack clash protection; gcc 12 makes PIE by default).
IMAGE_CFLAGS="-O2 -g -fstack-protector-strong -fstack-clash-protection -D_FORTIFY_SOURCE=2"

case "${1:-}" in
    packages)
        shift
        if [ $# -eq 0 ]; then
            echo "image.sh: packages needs a list: build, runtime-libs or runtime-tools" >&2
            exit 2
        fi
        for list in "$@"; do
            file=$ROOT/deploy/packages/$list.txt
            [ -f "$file" ] || { echo "image.sh: no package list $file" >&2; exit 2; }
            # Comments and blank lines out, one name a line.
            sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$file"
        done
        ;;
    build)
        out=${2:?"image.sh: build needs an output directory"}
        # OBJ and BIN on the command line override the Makefile's build/release and bin.
        make -C "$ROOT" --no-print-directory -j"$(nproc)" OBJ="$out/obj" BIN="$out/bin" \
            CFLAGS="$IMAGE_CFLAGS" all
        ;;
    cflags)
        echo "$IMAGE_CFLAGS"
        ;;
    *)
        sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
