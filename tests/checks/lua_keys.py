#!/usr/bin/env python3
"""lua_keys.py - every Redis key a script of common/lua/ touches is one it was given in KEYS.

Redis Cluster routes a script by its KEYS, and Redis documents that a script must only touch the
keys it is passed; a key a script builds from ARGV or from a value it read works on one server and
breaks on a cluster, where it may live in another slot (issue 15, hole 10). This reads each script
and checks the first argument of every redis.call / redis.pcall of a command that takes a key: it
must be KEYS[...] or a local variable that only ever holds KEYS[...], or unpack(KEYS, ...) (a
slice of KEYS, as the call's last argument: every key it passes was given). Commands without a
key (TIME) are skipped. Prints "ok - ..." / "not ok - ..." per script and last "N passed, M
failed".
"""
import glob
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
NO_KEY = {"TIME", "PING", "ECHO", "DBSIZE", "INFO"}
CALL = re.compile(r"redis\.p?call\(\s*'([A-Za-z]+)'\s*(?:,\s*([^,)]+))?")
# local a, b = KEYS[1], KEYS[2]  /  local idem = k > 0 and KEYS[k] or nil
ASSIGN = re.compile(r"^\s*local\s+([\w\s,]+?)\s*=\s*(.+)$")


def key_names(src):
    """Local names assigned only KEYS[...] (or nil) anywhere in the script."""
    good, bad = set(), set()
    for line in src.splitlines():
        m = ASSIGN.match(line.split("--", 1)[0])
        if not m:
            continue
        names = [n.strip() for n in m.group(1).split(",")]
        values = [v.strip() for v in m.group(2).split(",")]
        for i, n in enumerate(names):
            v = values[i] if i < len(values) else ""
            # "k > 0 and KEYS[k] or nil" holds a key or nil
            only_keys = re.fullmatch(r"KEYS\[[^\]]+\]", v) or re.fullmatch(
                r".*\band\s+KEYS\[[^\]]+\]\s+or\s+nil", v)
            (good if only_keys else bad).add(n)
    return good - bad


def main():
    passed = failed = 0
    for path in sorted(glob.glob(os.path.join(ROOT, "common", "lua", "*.lua"))):
        src = open(path).read()
        names = key_names(src)
        wrong = []
        for n, line in enumerate(src.splitlines(), 1):
            code = line.split("--", 1)[0]
            for m in CALL.finditer(code):
                cmd, arg = m.group(1).upper(), (m.group(2) or "").strip()
                if cmd in NO_KEY:
                    continue
                if re.fullmatch(r"KEYS\[[^\]]+\]", arg) or arg in names:
                    continue
                # the last argument of the call, so every value it expands to is one of KEYS
                if re.match(r"unpack\(KEYS\s*(,[^()]*)?\)\s*\)", code[m.start(2):]):
                    continue
                wrong.append("line %d: %s %s" % (n, cmd, arg or "(no key)"))
        name = os.path.basename(path)
        if wrong:
            failed += 1
            print("not ok - %s touches keys not given in KEYS: %s" % (name, "; ".join(wrong)))
        else:
            passed += 1
            print("ok - %s touches only the keys given in KEYS" % name)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
