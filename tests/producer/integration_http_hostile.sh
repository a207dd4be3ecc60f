#!/usr/bin/env bash
# integration_http_hostile.sh - slow-loris, floods of invalid requests and connections over the bound against
# a real producer, while a well-behaved buyer keeps ordering (see integration_http_hostile.py). BIN_DIR picks
# the build.
exec python3 "$(dirname "$0")/integration_http_hostile.py" "$@"
