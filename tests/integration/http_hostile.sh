#!/usr/bin/env bash
# http_hostile.sh - slow-loris, floods of invalid requests and connections over the bound against
# a real producer, while a well-behaved buyer keeps ordering (see http_hostile.py). BIN_DIR picks
# the build.
exec python3 "$(dirname "$0")/http_hostile.py" "$@"
