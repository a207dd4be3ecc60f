#!/usr/bin/env bash
# lua_keys.sh - every script of common/lua/ touches only the keys it is given (tests/checks/lua_keys.py).
exec python3 "$(dirname "$0")/lua_keys.py" "$@"
