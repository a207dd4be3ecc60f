#!/usr/bin/env bash
# producer_api.sh - the producer HTTP API integration test (see producer_api.py); BIN_DIR picks the build.
exec python3 "$(dirname "$0")/producer_api.py" "$@"
