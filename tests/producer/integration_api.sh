#!/usr/bin/env bash
# integration_api.sh - the producer HTTP API integration test (see integration_api.py); BIN_DIR picks the build.
exec python3 "$(dirname "$0")/integration_api.py" "$@"
