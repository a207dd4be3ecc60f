"""check_manifests.py - the Kubernetes manifests of deploy/k8s, as kustomize rendered them, checked
offline: against the Kubernetes API schemas (kubernetes-validate's own copy, strict) and against
the policies that matter for stockpipe.

    python check_manifests.py --root REPO NAME=RENDERED.yaml [NAME=RENDERED.yaml ...]

Run by tests/deploy/manifests.sh with var/tools/venv's Python (PyYAML, kubernetes-validate). Prints
one "ok - ..." or "not ok - ..." line per check and rendering; exits 1 when one failed.
"""

import argparse
import re
import sys

import kubernetes_validate
import yaml

# Checked against the oldest Kubernetes the manifests are meant for and the newest the validator
# knows. Every field they use is on by default from 1.27 on (topology spread's matchLabelKeys and
# the PodDisruptionBudget's unhealthyPodEvictionPolicy were the last, beta in 1.27).
KUBE_VERSIONS = ["1.30", "1.37"]

# Settings that are secrets: only ever from a Secret, never a value in a manifest.
SECRET_SETTINGS = {"PG_DSN", "ADMIN_TOKEN", "PAYMENT_TOKEN"}
# Which worker needs which: the others must not be handed the API tokens.
SECRETS_OF = {
    "producer": {"PG_DSN", "ADMIN_TOKEN", "PAYMENT_TOKEN"},
    "consumer": {"PG_DSN"},
    "reaper": {"PG_DSN"},
}
# A password in a URL's user info, or a conninfo "password=".
CREDENTIAL = re.compile(r"://[^/@\s]*:[^/@\s]+@|password\s*=", re.IGNORECASE)

WORKERS = ["producer", "consumer", "reaper"]
SAFE_VOLUMES = {"emptyDir", "configMap", "secret", "projected", "downwardAPI"}
# The producer's SIGTERM path after its drain (producer/main.c: sp_order_api_flush(p.api, 5000)).
PRODUCER_FLUSH_S = 5
# A Deployment's pods are named NAME-<10-character hash>-<5 random>, at most 63 characters; when
# NAME is longer than this the name is cut and the order id's last 20 characters of WORKER_ID
# (producer/order_id.h) would no longer hold the hash and the random suffix whole.
MAX_DEPLOYMENT_NAME = 63 - 1 - 10 - 1 - 5

results = []


def report(ok, what, problems=()):
    problems = list(problems)
    ok = ok and not problems
    line = ("ok - " if ok else "not ok - ") + what
    if problems:
        line += ": " + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
    print(line)
    results.append(ok)


def kn(res):
    return "%s/%s" % (res.get("kind", "?"), res.get("metadata", {}).get("name", "?"))


def pod_specs(res):
    """(pod template, pod spec) of a workload, or None."""
    kind = res.get("kind")
    if kind in ("Deployment", "Job"):
        tpl = res["spec"]["template"]
    elif kind == "CronJob":
        tpl = res["spec"]["jobTemplate"]["spec"]["template"]
    else:
        return None
    return tpl, tpl["spec"]


def containers(spec):
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def cpu(q):
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def memory(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    q = str(q)
    for u, f in units.items():
        if q.endswith(u):
            return float(q[: -len(u)]) * f
    return float(q)


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_rendering(name, docs, version, drain_ms):
    by_kind = {}
    for res in docs:
        by_kind.setdefault(res["kind"], []).append(res)

    def find(kind, rname):
        for res in by_kind.get(kind, []):
            if res["metadata"]["name"] == rname:
                return res
        return None

    # --- the Kubernetes API schemas ---
    for kv in KUBE_VERSIONS:
        problems = []
        for res in docs:
            try:
                kubernetes_validate.validate(res, kv, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append("%s: %s: %s" % (kn(res), path, e.message))
            except (kubernetes_validate.SchemaNotFoundError,
                    kubernetes_validate.InvalidSchemaError) as e:
                problems.append("%s: %s" % (kn(res), e.message))
        report(True, "%s: %d resources valid against the Kubernetes %s API schemas (strict, "
               "offline)" % (name, len(docs), kv), problems)

    # --- what is there ---
    want = [("Deployment", "stockpipe-" + w) for w in WORKERS] + [
        ("Service", "stockpipe-producer"), ("HorizontalPodAutoscaler", "stockpipe-producer"),
        ("Job", "stockpipe-migrate"), ("CronJob", "stockpipe-replay"),
        ("CronJob", "stockpipe-reconcile"), ("CronJob", "stockpipe-audit")] + [
        ("PodDisruptionBudget", "stockpipe-" + w) for w in WORKERS]
    missing = ["%s/%s" % kr for kr in want if find(*kr) is None]
    configmaps = [c for c in by_kind.get("ConfigMap", [])
                  if c["metadata"]["name"].startswith("stockpipe-config")]
    if len(configmaps) != 1:
        missing.append("one ConfigMap stockpipe-config-<hash>")
    report(True, "%s: Deployments, Service, HPA, PDBs, migration Job, recovery Job templates, "
           "ConfigMap" % name, missing)
    settings = configmaps[0].get("data", {}) if configmaps else {}
    http_port = int(settings.get("HTTP_PORT", "8080"))

    workloads = [r for r in docs if pod_specs(r)]
    all_containers = [(r, c) for r in workloads for c in containers(pod_specs(r)[1])]

    # --- every container: resources, security, image ---
    problems = []
    for res, c in all_containers:
        where = "%s %s" % (kn(res), c["name"])
        req = c.get("resources", {}).get("requests", {})
        lim = c.get("resources", {}).get("limits", {})
        for r, parse in (("cpu", cpu), ("memory", memory)):
            if r not in req or r not in lim:
                problems.append("%s: no %s request and limit" % (where, r))
            elif parse(req[r]) > parse(lim[r]):
                problems.append("%s: %s request above its limit" % (where, r))
    report(True, "%s: all %d containers have cpu and memory requests and limits (requests <= "
           "limits)" % (name, len(all_containers)), problems)

    problems = []
    for res, c in all_containers:
        where = "%s %s" % (kn(res), c["name"])
        pod = pod_specs(res)[1].get("securityContext", {})
        sc = c.get("securityContext", {})
        if not (sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True):
            problems.append(where + ": runAsNonRoot is not true")
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            problems.append(where + ": runAsUser 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(where + ": readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(where + ": allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(where + ": capabilities do not drop ALL")
        if sc.get("capabilities", {}).get("add") or sc.get("privileged"):
            problems.append(where + ": adds capabilities or is privileged")
        seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(where + ": no RuntimeDefault seccomp profile")
    report(True, "%s: every container runs as non-root, read-only root filesystem, no privilege "
           "escalation, all capabilities dropped, seccomp RuntimeDefault" % name, problems)

    problems = []
    for res in workloads:
        spec = pod_specs(res)[1]
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(kn(res) + ": mounts a service account token")
        for h in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(h):
                problems.append("%s: %s" % (kn(res), h))
        for v in spec.get("volumes", []):
            if not SAFE_VOLUMES & set(v):
                problems.append("%s: volume %s is not emptyDir, configMap, secret"
                                % (kn(res), v["name"]))
    report(True, "%s: no pod mounts a token, uses the host's namespaces or host paths" % name,
           problems)

    problems = []
    for res, c in all_containers:
        image = c.get("image", "")
        last = image.rsplit("/", 1)[-1]
        tag = last.split(":", 1)[1] if ":" in last.split("@")[0] else ""
        if not tag or tag == "latest":
            problems.append("%s %s: image %r has no tag or 'latest'" % (kn(res), c["name"], image))
        elif version and tag != version:
            problems.append("%s %s: image tag %s is not the Makefile's VERSION %s"
                            % (kn(res), c["name"], tag, version))
    report(True, "%s: every image has an explicit tag, never 'latest'%s" %
           (name, " (the base's is the Makefile's VERSION %s)" % version if version else ""),
           problems)

    # --- no secret values ---
    problems = ["%s: a Secret in the manifests" % kn(r) for r in by_kind.get("Secret", [])]
    for cm in by_kind.get("ConfigMap", []):
        for k, v in (cm.get("data") or {}).items():
            if k in SECRET_SETTINGS:
                problems.append("%s: holds %s" % (kn(cm), k))
            if CREDENTIAL.search(str(v)):
                problems.append("%s: %s holds a password" % (kn(cm), k))
    for res, c in all_containers:
        for e in c.get("env", []):
            where = "%s %s: %s" % (kn(res), c["name"], e["name"])
            if "value" in e and CREDENTIAL.search(str(e["value"])):
                problems.append(where + " holds a password")
            if e["name"] in SECRET_SETTINGS:
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if "value" in e or not ref or ref.get("key") != e["name"]:
                    problems.append(where + " is not a secretKeyRef to key " + e["name"])
    for w in WORKERS:
        dep = find("Deployment", "stockpipe-" + w)
        if dep is None:
            continue
        for c in containers(pod_specs(dep)[1]):
            got = {e["name"] for e in c.get("env", []) if e["name"] in SECRET_SETTINGS}
            if got != SECRETS_OF[w]:
                problems.append("%s %s gets secrets %s, needs exactly %s"
                                % (kn(dep), c["name"], sorted(got), sorted(SECRETS_OF[w])))
    report(True, "%s: no Secret or secret value; PG_DSN, ADMIN_TOKEN, PAYMENT_TOKEN only by "
           "secretKeyRef, each worker only those it needs" % name, problems)

    # --- the three worker Deployments ---
    probes, identity, grace, spread, scrape, budgets = [], [], [], [], [], []
    for w in WORKERS:
        dep = find("Deployment", "stockpipe-" + w)
        if dep is None:
            continue
        tpl, spec = pod_specs(dep)
        labels = tpl["metadata"].get("labels", {})
        for c in spec["containers"]:
            where = "%s %s" % (kn(dep), c["name"])
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            if http_port not in ports.values():
                probes.append("%s: no containerPort %d (HTTP_PORT)" % (where, http_port))
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = c.get(probe, {}).get("httpGet", {})
                port = ports.get(get.get("port"), get.get("port"))
                if get.get("path") != path or port != http_port:
                    probes.append("%s: %s is not GET %s on HTTP_PORT" % (where, probe, path))
            ids = [e for e in c.get("env", []) if e["name"] == "WORKER_ID"]
            ref = ids[0].get("valueFrom", {}).get("fieldRef", {}) if ids else {}
            field = ref.get("fieldPath")
            if field != "metadata.name":
                identity.append(where + ": WORKER_ID is not the pod's name (downward API)")
        ann = tpl["metadata"].get("annotations", {})
        if (ann.get("prometheus.io/scrape") != "true"
                or ann.get("prometheus.io/port") != str(http_port)
                or ann.get("prometheus.io/path", "/metrics") != "/metrics"):
            scrape.append(kn(dep) + ": no Prometheus scrape annotations for /metrics on HTTP_PORT")
        tgp = spec.get("terminationGracePeriodSeconds")
        if tgp is None:
            grace.append(kn(dep) + ": no explicit terminationGracePeriodSeconds")
        elif w == "producer":
            pre = spec["containers"][0].get("lifecycle", {}).get("preStop", {})
            cmd = pre.get("exec", {}).get("command", [])
            sleep_s = int(cmd[1]) if cmd[:1] == ["sleep"] and len(cmd) == 2 else 0
            need = sleep_s + drain_ms / 1000 + PRODUCER_FLUSH_S
            if tgp < need:
                grace.append("%s: %d s < preStop %d s + drain %g s + flush %d s"
                             % (kn(dep), tgp, sleep_s, drain_ms / 1000, PRODUCER_FLUSH_S))
        if not any(t.get("topologyKey") == "kubernetes.io/hostname"
                   and selects(t.get("labelSelector", {}).get("matchLabels"), labels)
                   for t in spec.get("topologySpreadConstraints", [])):
            spread.append(kn(dep) + ": not spread across nodes (kubernetes.io/hostname)")
        if not any(selects(p["spec"].get("selector", {}).get("matchLabels"), labels)
                   for p in by_kind.get("PodDisruptionBudget", [])):
            budgets.append(kn(dep) + ": no PodDisruptionBudget selects its pods")
    report(True, "%s: every worker has liveness /healthz and readiness /readyz probes on HTTP_PORT "
           "(%d)" % (name, http_port), probes)
    report(True, "%s: every worker's WORKER_ID is its pod's name (downward API)" % name, identity)
    report(True, "%s: every worker is scraped by Prometheus (annotations)" % name, scrape)
    report(True, "%s: every worker has a terminationGracePeriodSeconds; the producer's covers "
           "preStop + drain (%d ms, producer/main.c) + Kafka flush" % (name, drain_ms), grace)
    report(True, "%s: every worker is spread across nodes and has a PodDisruptionBudget" % name,
           spread + budgets)

    # --- the producer: autoscaled, behind its Service, order ids unique ---
    problems = []
    dep = find("Deployment", "stockpipe-producer")
    hpa = find("HorizontalPodAutoscaler", "stockpipe-producer")
    svc = find("Service", "stockpipe-producer")
    if dep and hpa and svc:
        tpl, spec = pod_specs(dep)
        labels = tpl["metadata"]["labels"]
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref.get("kind"), ref.get("name")) != ("Deployment", dep["metadata"]["name"]):
            problems.append("the HPA does not scale the producer's Deployment")
        if "replicas" in dep["spec"]:
            problems.append("the Deployment fixes replicas the HPA owns")
        if not selects(svc["spec"].get("selector"), labels):
            problems.append("the Service does not select the producer's pods")
        for w in ("consumer", "reaper"):
            other = find("Deployment", "stockpipe-" + w)
            other_labels = pod_specs(other)[0]["metadata"]["labels"] if other else {}
            if other and selects(svc["spec"].get("selector"), other_labels):
                problems.append("the Service also selects the %s's pods" % w)
        names = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in names:
                problems.append("Service port %s targets no container port" % p.get("name"))
        if len(dep["metadata"]["name"]) > MAX_DEPLOYMENT_NAME:
            problems.append("name longer than %d characters: pod names get cut and order ids "
                            "lose the pod's unique suffix" % MAX_DEPLOYMENT_NAME)
    report(True, "%s: the producer is scaled by its HPA, served by its Service, and its pod names "
           "keep order ids unique" % name, problems)

    # --- recovery templates never run by themselves ---
    problems = [kn(r) + ": not suspended" for r in by_kind.get("CronJob", [])
                if r["spec"].get("suspend") is not True]
    report(True, "%s: the recovery Job templates (CronJobs) are suspended" % name, problems)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("renderings", nargs="+", help="NAME=FILE")
    args = ap.parse_args()

    version = re.search(r"^VERSION\s*:?=\s*(\S+)", open(args.root + "/Makefile").read(), re.M)
    drain = re.search(r"#define\s+DRAIN_MS\s+(\d+)", open(args.root + "/producer/main.c").read())
    if not version or not drain:
        report(False, "read VERSION from the Makefile and DRAIN_MS from producer/main.c")
        return 1
    for item in args.renderings:
        name, path = item.split("=", 1)
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        # The base pins the image to the release; an overlay may pin another tag.
        check_rendering(name, docs, version.group(1) if name == "base" else None,
                        int(drain.group(1)))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
