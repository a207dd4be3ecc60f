#!/usr/bin/env bash
# manifests.sh - the Kubernetes manifests of deploy/k8s, rendered by kustomize (the base and the
# example overlay) and checked offline by tests/deploy/check_manifests.py: against the Kubernetes
# API schemas that kubernetes-validate ships (strict), and against stockpipe's policies (probes,
# limits, non-root, no secret values, pinned image tags, Kafka's security settings and the TLS
# volume in every pod that needs them, the topics Job's replication factor 3,
# min.insync.replicas=2 and retention, ...). The topics Job's script runs too, with the Job's
# rendered environment, against stand-ins of Kafka's tools.
#
# The tools are pinned and installed by scripts/install-deps.sh under var/tools/. When the
# machine allows it (root, util-linux unshare) everything runs in a network namespace of its own
# with no network at all, so nothing can be fetched while rendering or validating.
# Prints "ok - ..." / "not ok - ..." per check and last "N passed, M failed"; exits 1 on a failure.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

KUSTOMIZE=$ROOT/var/tools/bin/kustomize
PYTHON=$ROOT/var/tools/venv/bin/python
tmp=$(mktemp -d "${TMPDIR:-/tmp}/stockpipe-manifests.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

if [ ! -x "$KUSTOMIZE" ] || [ ! -x "$PYTHON" ]; then
    echo "not ok - kustomize and kubernetes-validate are in var/tools (run scripts/install-deps.sh)"
    echo "0 passed, 1 failed"
    exit 1
fi

# No network: a private, empty network namespace when we may make one.
NONET=()
if unshare --net true 2>/dev/null; then
    NONET=(unshare --net)
    net_note="in a network namespace without network"
else
    net_note="with the network reachable (unshare --net not permitted here); nothing fetches"
fi

{
    rc=0
    for k in base overlays/example; do
        out=$tmp/${k//\//-}.yaml
        if "${NONET[@]}" "$KUSTOMIZE" build "deploy/k8s/$k" >"$out" 2>"$tmp/err"; then
            n=$(grep -c '^kind:' "$out")
            echo "ok - kustomize build deploy/k8s/$k ($n resources, $net_note)"
        else
            echo "not ok - kustomize build deploy/k8s/$k: $(tr '\n' ' ' <"$tmp/err")"
            rc=1
        fi
    done
    if [ "$rc" = 0 ]; then
        "${NONET[@]}" "$PYTHON" tests/deploy/check_manifests.py --root "$ROOT" \
            base="$tmp/base.yaml" overlays/example="$tmp/overlays-example.yaml" 2>&1 ||
            echo "(check_manifests.py exited $?)"
    fi
} | tee "$tmp/out"

passed=$(grep -c '^ok - ' "$tmp/out")
failed=$(grep -c '^not ok - ' "$tmp/out")
# A crash of the checker with no "not ok" line is still a failure.
grep -q '^(check_manifests.py exited' "$tmp/out" && [ "$failed" -eq 0 ] && failed=1
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
