"""check_manifests.py - the Kubernetes manifests of deploy/k8s, as kustomize rendered them, checked
offline: against the Kubernetes API schemas (kubernetes-validate's own copy, strict) and against
the policies that matter for stockpipe. The topics Job's script (deploy/k8s/base/create-topics.sh)
is run as the Job would run it, against stand-ins of Kafka's tools: what it creates, changes,
refuses, and that no secret reaches its output or a command line (a stand-in proves only what we
believed about Kafka's tools: their output formats were copied from Kafka 4.2.0's).

    python check_manifests.py --root REPO NAME=RENDERED.yaml [NAME=RENDERED.yaml ...]

Run by tests/deploy/manifests.sh with var/tools/venv's Python (PyYAML, kubernetes-validate). Prints
one "ok - ..." or "not ok - ..." line per check and rendering; exits 1 when one failed.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

# Checked against the oldest Kubernetes the manifests are meant for and the newest the validator
# knows. Every field they use is on by default from 1.27 on (topology spread's matchLabelKeys and
# the PodDisruptionBudget's unhealthyPodEvictionPolicy were the last, beta in 1.27).
KUBE_VERSIONS = ["1.30", "1.37"]

# Kafka's security secrets: optional keys of the Secret (a cluster without SASL or an encrypted
# client key has none of them), handed to every Kafka client: the workers, the recovery Jobs and
# the topics Job (common/config.c reads them, deploy/k8s/base/create-topics.sh too).
KAFKA_SECRETS = {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SSL_KEY_PASSWORD"}
# Settings that are secrets: only ever from a Secret, never a value in a manifest.
SECRET_SETTINGS = {"PG_DSN", "ADMIN_TOKEN", "PAYMENT_TOKEN"} | KAFKA_SECRETS
# Which worker needs which: the others must not be handed the API tokens.
SECRETS_OF = {
    "producer": {"PG_DSN", "ADMIN_TOKEN", "PAYMENT_TOKEN"} | KAFKA_SECRETS,
    "consumer": {"PG_DSN"} | KAFKA_SECRETS,
    "reaper": {"PG_DSN"} | KAFKA_SECRETS,
}
# Kafka's non-secret security settings: from the ConfigMap, like the broker list.
KAFKA_PROTOCOLS = {"plaintext", "ssl", "sasl_plaintext", "sasl_ssl"}
KAFKA_SASL_MECHANISMS = {"SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"}
KAFKA_SSL_FILES = ["KAFKA_SSL_CA_LOCATION", "KAFKA_SSL_CERTIFICATE_LOCATION",
                   "KAFKA_SSL_KEY_LOCATION"]
# Where every pod finds the CA bundles and client certificates: PG_DSN's sslrootcert and the
# KAFKA_SSL_* files (the optional Secret stockpipe-tls and ConfigMap stockpipe-ca).
TLS_VOLUME, TLS_MOUNT = "tls", "/etc/stockpipe/tls"
TLS_SOURCES = {("secret", "stockpipe-tls"), ("configMap", "stockpipe-ca")}

# The topics Job (deploy/k8s/base/kafka-topics-job.yaml) and its script.
TOPICS_JOB = "stockpipe-kafka-topics"
TOPICS_SCRIPT = "deploy/k8s/base/create-topics.sh"
TOPICS_IMAGE = "apache/kafka"
# What the topics must be (docs/operations.md): an acknowledged event is on two brokers and one
# broker may be lost; the events topic keeps every event (replay rebuilds PostgreSQL from it).
MIN_REPLICATION_FACTOR = 3
EVENTS_MUST = {"retention.ms": "-1", "retention.bytes": "-1",
               "unclean.leader.election.enable": "false"}
DLQ_MUST = {"retention.ms": "-1", "unclean.leader.election.enable": "false"}
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


def check_rendering(name, docs, repo, version):
    drain_ms = repo["drain_ms"]
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
        ("Job", "stockpipe-migrate"), ("Job", TOPICS_JOB), ("CronJob", "stockpipe-replay"),
        ("CronJob", "stockpipe-reconcile"), ("CronJob", "stockpipe-audit")] + [
        ("PodDisruptionBudget", "stockpipe-" + w) for w in WORKERS]
    missing = ["%s/%s" % kr for kr in want if find(*kr) is None]
    configmaps = [c for c in by_kind.get("ConfigMap", [])
                  if c["metadata"]["name"].startswith("stockpipe-config")]
    if len(configmaps) != 1:
        missing.append("one ConfigMap stockpipe-config-<hash>")
    report(True, "%s: Deployments, Service, HPA, PDBs, migration Job, topics Job, recovery Job "
           "templates, ConfigMap" % name, missing)
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
        kafka_tools = res["metadata"]["name"] == TOPICS_JOB
        if not tag or tag == "latest":
            problems.append("%s %s: image %r has no tag or 'latest'" % (kn(res), c["name"], image))
        elif kafka_tools and tag != repo["kafka_version"]:
            # A mirror may rename it (an overlay's newName), never change the version.
            problems.append("%s %s: image tag %s is not the Kafka version %s of "
                            "deploy/kafka-local/pom.xml" % (kn(res), c["name"], tag,
                                                            repo["kafka_version"]))
        elif kafka_tools and version and image.split(":")[0] != TOPICS_IMAGE:
            problems.append("%s %s: image %r is not the official %s"
                            % (kn(res), c["name"], image, TOPICS_IMAGE))
        elif not kafka_tools and version and tag != version:
            problems.append("%s %s: image tag %s is not the Makefile's VERSION %s"
                            % (kn(res), c["name"], tag, version))
    report(True, "%s: every image has an explicit tag, never 'latest'%s; the topics Job's is "
           "Kafka %s (deploy/kafka-local/pom.xml)" %
           (name, " (the base's is the Makefile's VERSION %s)" % version if version else "",
            repo["kafka_version"]), problems)

    # --- no secret values ---
    problems = ["%s: a Secret in the manifests" % kn(r) for r in by_kind.get("Secret", [])]
    for cm in by_kind.get("ConfigMap", []):
        if repo_files(repo, cm):
            continue  # files of the repository (the topics Job's script): code, not values
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
                elif e["name"] in KAFKA_SECRETS and ref.get("optional") is not True:
                    problems.append(where + " is not optional: a pod without it would not start")
                elif e["name"] not in KAFKA_SECRETS and ref.get("optional"):
                    problems.append(where + " is optional: a worker would start without it")
    for w in WORKERS:
        dep = find("Deployment", "stockpipe-" + w)
        if dep is None:
            continue
        for c in containers(pod_specs(dep)[1]):
            got = {e["name"] for e in c.get("env", []) if e["name"] in SECRET_SETTINGS}
            if got != SECRETS_OF[w]:
                problems.append("%s %s gets secrets %s, needs exactly %s"
                                % (kn(dep), c["name"], sorted(got), sorted(SECRETS_OF[w])))
    report(True, "%s: no Secret or secret value; PG_DSN, ADMIN_TOKEN, PAYMENT_TOKEN, %s only by "
           "secretKeyRef (the Kafka ones optional), each worker only those it needs"
           % (name, ", ".join(sorted(KAFKA_SECRETS))), problems)

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

    check_kafka_security(name, settings, all_containers)
    check_topics_job(name, repo, find, settings)


def repo_files(repo, cm):
    """True when every key of ConfigMap cm is a file of deploy/k8s/base with that very content
    (a configMapGenerator's files:, such as the topics Job's script)."""
    data = cm.get("data") or {}
    for key, value in data.items():
        path = os.path.join(repo["root"], "deploy/k8s/base", key)
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            if f.read() != value:
                return False
    return bool(data)


def env_entry(c, var):
    for e in c.get("env", []):
        if e["name"] == var:
            return e
    return None


def config_refs(c):
    return [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]


def mount_path(c, volume):
    for m in c.get("volumeMounts", []):
        if m["name"] == volume:
            return m["mountPath"]
    return None


def kv_list(text):
    """{name: value} of "a=b,c=d"."""
    return dict(kv.split("=", 1) for kv in str(text).split(",") if "=" in kv)


def check_kafka_security(name, settings, all_containers):
    """Kafka's security settings reach every Kafka client the same way, and the TLS files are
    where the settings say, in every pod that may need them."""
    # The ConfigMap's values make sense together.
    problems = []
    protocol = settings.get("KAFKA_SECURITY_PROTOCOL", "")
    if protocol.lower() not in KAFKA_PROTOCOLS:
        problems.append("KAFKA_SECURITY_PROTOCOL=%r is not one of %s"
                        % (protocol, ", ".join(sorted(KAFKA_PROTOCOLS))))
    if protocol.lower().startswith("sasl_") and \
            settings.get("KAFKA_SASL_MECHANISM", "").upper() not in KAFKA_SASL_MECHANISMS:
        problems.append("%s needs KAFKA_SASL_MECHANISM, one of %s"
                        % (protocol, ", ".join(sorted(KAFKA_SASL_MECHANISMS))))
    for var in KAFKA_SSL_FILES:
        path = settings.get(var)
        if path and not path.startswith(TLS_MOUNT + "/"):
            problems.append("%s=%s is not under the TLS volume's %s" % (var, path, TLS_MOUNT))
    if bool(settings.get("KAFKA_SSL_CERTIFICATE_LOCATION")) != \
            bool(settings.get("KAFKA_SSL_KEY_LOCATION")):
        problems.append("mutual TLS needs both KAFKA_SSL_CERTIFICATE_LOCATION and "
                        "KAFKA_SSL_KEY_LOCATION")
    report(True, "%s: the ConfigMap's Kafka security (KAFKA_SECURITY_PROTOCOL=%s) is complete, "
           "its files under %s" % (name, protocol or "?", TLS_MOUNT), problems)

    # Every Kafka client (a container that reads the ConfigMap): the three workers, the recovery
    # Jobs, the topics Job. Each gets the optional Kafka secrets and the TLS volume.
    problems, clients = [], []
    for res, c in all_containers:
        where = "%s %s" % (kn(res), c["name"])
        if not any(n.startswith("stockpipe-config") for n in config_refs(c)):
            continue
        clients.append(res["metadata"]["name"])
        for var in sorted(KAFKA_SECRETS):
            ref = (env_entry(c, var) or {}).get("valueFrom", {}).get("secretKeyRef", {})
            if ref.get("name") != "stockpipe" or ref.get("key") != var \
                    or ref.get("optional") is not True:
                problems.append("%s: %s is not an optional secretKeyRef to the Secret "
                                "stockpipe" % (where, var))
        for var in ["KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM"] + KAFKA_SSL_FILES:
            if env_entry(c, var):
                problems.append("%s: %s set in env, over the ConfigMap every other client "
                                "reads" % (where, var))
    for want in ["stockpipe-" + w for w in WORKERS] + [TOPICS_JOB]:
        if want not in clients:
            problems.append("%s does not read the ConfigMap (KAFKA_SECURITY_PROTOCOL, ...)" % want)
    report(True, "%s: every Kafka client (%d containers: workers, recovery Jobs, topics Job) gets "
           "KAFKA_SECURITY_PROTOCOL and the rest from the ConfigMap, %s as optional "
           "secretKeyRefs" % (name, len(clients), ", ".join(sorted(KAFKA_SECRETS))), problems)

    # The TLS volume: in every container that reads PG_DSN (sslrootcert) or the ConfigMap
    # (KAFKA_SSL_*), at one path, from optional sources only, readable by the pod's user.
    problems, n = [], 0
    for res, c in all_containers:
        if not (env_entry(c, "PG_DSN") or
                any(r.startswith("stockpipe-config") for r in config_refs(c))):
            continue
        n += 1
        where = "%s %s" % (kn(res), c["name"])
        if mount_path(c, TLS_VOLUME) != TLS_MOUNT:
            problems.append("%s: no volume %s at %s" % (where, TLS_VOLUME, TLS_MOUNT))
            continue
        spec = pod_specs(res)[1]
        vol = next((v for v in spec.get("volumes", []) if v["name"] == TLS_VOLUME), {})
        sources = vol.get("projected", {}).get("sources", [])
        got = {(kind, src[kind].get("name")) for src in sources for kind in src}
        if got != TLS_SOURCES or any(src[kind].get("optional") is not True
                                     for src in sources for kind in src):
            problems.append("%s: volume %s is not the optional Secret stockpipe-tls and "
                            "ConfigMap stockpipe-ca" % (kn(res), TLS_VOLUME))
        mode = vol.get("projected", {}).get("defaultMode", 0o644)
        if not mode & 0o004 and spec.get("securityContext", {}).get("fsGroup") is None:
            problems.append("%s: files of mode %o and no fsGroup: unreadable" % (kn(res), mode))
    report(True, "%s: the %d containers that read PG_DSN or the ConfigMap mount the optional TLS "
           "volume (Secret stockpipe-tls, ConfigMap stockpipe-ca) at %s" % (name, n, TLS_MOUNT),
           problems)


def check_topics_job(name, repo, find, settings):
    job = find("Job", TOPICS_JOB)
    if job is None:
        return  # reported missing above
    spec = job["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}

    # What the topics will be.
    problems = []
    topic, dlq = settings.get("KAFKA_TOPIC"), settings.get("KAFKA_DLQ_TOPIC")
    if not topic or dlq != "%s.dlq" % topic:
        problems.append("the ConfigMap's KAFKA_DLQ_TOPIC=%s is not KAFKA_TOPIC=%s + '.dlq'"
                        % (dlq, topic))
    if not any(n.startswith("stockpipe-config") for n in config_refs(c)) or \
            {"KAFKA_BROKERS", "KAFKA_TOPIC", "KAFKA_DLQ_TOPIC"} & set(env):
        problems.append("brokers and topic names not (only) from the workers' ConfigMap")
    try:
        rf = int(env.get("REPLICATION_FACTOR"))
        partitions = int(env.get("EVENTS_PARTITIONS"))
        dlq_partitions = int(env.get("DLQ_PARTITIONS"))
    except (TypeError, ValueError):
        rf = partitions = dlq_partitions = 0
        problems.append("REPLICATION_FACTOR, EVENTS_PARTITIONS, DLQ_PARTITIONS not all numbers")
    if rf < MIN_REPLICATION_FACTOR:
        problems.append("replication factor %s, below %d" % (rf, MIN_REPLICATION_FACTOR))
    for var, must in (("EVENTS_CONFIG", EVENTS_MUST), ("DLQ_CONFIG", DLQ_MUST)):
        got = kv_list(env.get(var, ""))
        isr = got.get("min.insync.replicas", "")
        if not isr.isdigit() or not 2 <= int(isr) < rf:
            problems.append("%s: min.insync.replicas=%s, not at least 2 and below the "
                            "replication factor %s" % (var, isr, rf))
        for k, v in must.items():
            if got.get(k) != v:
                problems.append("%s: %s=%s, not %s" % (var, k, got.get(k), v))
        if "compact" in got.get("cleanup.policy", ""):
            problems.append("%s: cleanup.policy compact (the key is the SKU)" % var)
    consumers = (find("Deployment", "stockpipe-consumer") or {}).get("spec", {}).get("replicas")
    if consumers and partitions and consumers > partitions:
        problems.append("%d consumers for %d partitions: %d would stand idle"
                        % (consumers, partitions, consumers - partitions))
    if dlq_partitions < 1:
        problems.append("no partition for the dead-letter topic")
    report(True, "%s: the topics Job makes %s (%s partitions) and %s with replication factor %s, "
           "min.insync.replicas=2, no unclean election, the events kept forever "
           "(retention.ms=-1, retention.bytes=-1)" % (name, topic, partitions, dlq, rf), problems)

    # How it runs: like the migration Job, and its script is the repository's.
    problems = []
    for field in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if field not in spec:
            problems.append("no " + field)
    if pod.get("restartPolicy") != "Never":
        problems.append("restartPolicy is not Never")
    work = env.get("WORK_DIR", "/tmp")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    if "emptyDir" not in vols.get(mounts.get(work), {}):
        problems.append("WORK_DIR %s is not an emptyDir (the root filesystem is read-only)" % work)
    command = c.get("command", []) + c.get("args", [])
    script = next((a for a in command if a.endswith("/create-topics.sh")), None)
    text = None
    if script:
        volume = vols.get(mounts.get(os.path.dirname(script)), {})
        cm = find("ConfigMap", volume.get("configMap", {}).get("name"))
        text = ((cm or {}).get("data") or {}).get(os.path.basename(script))
    with open(os.path.join(repo["root"], TOPICS_SCRIPT)) as f:
        if text != f.read():
            problems.append("the command does not run %s from its ConfigMap" % TOPICS_SCRIPT)
            text = None
    if text is not None:
        syntax = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        if syntax.returncode != 0:
            problems.append("bash -n: " + syntax.stderr.strip())
    report(True, "%s: the topics Job has backoffLimit, activeDeadlineSeconds, "
           "ttlSecondsAfterFinished, an emptyDir for what it writes, and runs %s from its "
           "ConfigMap" % (name, TOPICS_SCRIPT), problems)
    if text is not None and not problems:
        run_topics_script(name, text, c, settings)


# A stand-in for Kafka's kafka-topics.sh and kafka-configs.sh (the output formats of Kafka
# 4.2's TopicCommand and ConfigCommand): a cluster of three brokers kept in the JSON file
# $STUB_STATE, every call recorded there with a copy of its --command-config file.
STUB_TOOL = r'''
import json, os, re, sys
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
path = os.environ["STUB_STATE"]
with open(path) as f:
    state = json.load(f)
opt = lambda o: args[args.index(o) + 1] if o in args else None
cc = opt("--command-config")
state["calls"].append({"tool": tool, "args": args, "properties": open(cc).read() if cc else None})
topics, rc = state["topics"], 0
if tool == "kafka-topics.sh" and "--create" in args:
    t = opt("--topic")
    if t not in topics:
        topics[t] = {"partitions": int(opt("--partitions")), "rf": int(opt("--replication-factor")),
                     "configs": dict(args[i + 1].split("=", 1) for i, a in enumerate(args)
                                     if a == "--config")}
        print("Created topic %s." % t)
    elif "--if-not-exists" not in args:
        print("Error while executing topic command : Topic '%s' already exists." % t)
        rc = 1
elif tool == "kafka-topics.sh" and "--describe" in args:
    found = [t for t in sorted(topics) if re.fullmatch(opt("--topic"), t)]
    if not found:
        print("Error while executing topic command : Topic '%s' does not exist" % opt("--topic"))
        rc = 1
    for t in found:
        d = topics[t]
        print("Topic: %s\tTopicId: AAAAAAAAAAAAAAAAAAAAAA\tPartitionCount: %d\t"
              "ReplicationFactor: %d\tConfigs: %s" % (t, d["partitions"], d["rf"], ",".join(
                  "%s=%s" % kv for kv in sorted(d["configs"].items()))))
        replicas = ",".join(str(i) for i in range(1, d["rf"] + 1))
        for p in range(d["partitions"]):
            print("\tTopic: %s\tPartition: %d\tLeader: 1\tReplicas: %s\tIsr: %s\tElr: \t"
                  "LastKnownElr: " % (t, p, replicas, d.get("isr", {}).get(str(p), replicas)))
elif tool == "kafka-configs.sh" and "--alter" in args:
    t = opt("--entity-name")
    topics[t]["configs"].update(kv.split("=", 1) for kv in opt("--add-config").split(","))
    print("Completed updating config for topic %s." % t)
else:
    print("stub: unexpected call %s %s" % (tool, args))
    rc = 1
with open(path, "w") as f:
    json.dump(state, f)
sys.exit(rc)
'''

# A test password with everything a properties file and a JAAS string escape.
TEST_PASSWORD = 'pa"ss\\w rd$x'


def java_property(properties, key):
    """The value of key in a Java properties file (the escapes this script writes)."""
    for line in properties.splitlines():
        if line.startswith(key + "="):
            return re.sub(r"\\(.)", r"\1", line[len(key) + 1:])
    return None


def run_topics_script(name, text, c, settings):
    """The Job's script, run with its own environment (the rendered ConfigMap, the Job's values,
    test secrets) against stand-ins of Kafka's tools: what it creates, changes and refuses, and
    that no secret reaches its output."""
    tmp = tempfile.mkdtemp(prefix="stockpipe-topics-")
    try:
        bindir = os.path.join(tmp, "bin")
        os.makedirs(bindir)
        for tool in ("kafka-topics.sh", "kafka-configs.sh"):
            with open(os.path.join(bindir, tool), "w") as f:
                f.write("#!%s\n%s" % (sys.executable, STUB_TOOL))
            os.chmod(os.path.join(bindir, tool), 0o755)
        script = os.path.join(tmp, "create-topics.sh")
        with open(script, "w") as f:
            f.write(text)
        # The TLS volume's files, as the settings name them, in a directory of our own.
        tls = os.path.join(tmp, "tls")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KAFKA_BIN": bindir,
               "WORK_DIR": os.path.join(tmp, "work"), "STUB_STATE": os.path.join(tmp, "state")}
        env.update({k: str(v) for k, v in settings.items()})
        env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
        env.update({k: "stockpipe" if k == "KAFKA_SASL_USERNAME" else TEST_PASSWORD
                    for k in KAFKA_SECRETS})
        env["WORK_DIR"] = os.path.join(tmp, "work")
        for var in KAFKA_SSL_FILES:
            if env.get(var, "").startswith(TLS_MOUNT + "/"):
                env[var] = tls + env[var][len(TLS_MOUNT):]
                os.makedirs(os.path.dirname(env[var]), exist_ok=True)
                with open(env[var], "w") as f:
                    f.write("-----BEGIN %s-----\nMIIB\n-----END %s-----\n" % (
                        "PRIVATE KEY" if var.endswith("KEY_LOCATION") else "CERTIFICATE",
                        "PRIVATE KEY" if var.endswith("KEY_LOCATION") else "CERTIFICATE"))
        topic, dlq = env["KAFKA_TOPIC"], env["KAFKA_DLQ_TOPIC"]
        partitions, rf = int(env["EVENTS_PARTITIONS"]), int(env["REPLICATION_FACTOR"])
        want = {topic: (partitions, kv_list(env["EVENTS_CONFIG"])),
                dlq: (int(env["DLQ_PARTITIONS"]), kv_list(env["DLQ_CONFIG"]))}

        def run(topics):
            with open(env["STUB_STATE"], "w") as f:
                json.dump({"topics": topics, "calls": []}, f)
            p = subprocess.run(["bash", script], env=env, capture_output=True, text=True,
                               timeout=60)
            with open(env["STUB_STATE"]) as f:
                state = json.load(f)
            return p.returncode, p.stdout + p.stderr, state

        problems = []

        def leaks(what, out, state):
            if TEST_PASSWORD in out:
                problems.append("%s: a secret in the output" % what)
            if any(TEST_PASSWORD in " ".join(call["args"]) for call in state["calls"]):
                problems.append("%s: a secret on a command line" % what)
            if os.path.isdir(env["WORK_DIR"]) and os.listdir(env["WORK_DIR"]):
                problems.append("%s: files left in WORK_DIR" % what)

        # 1. No topics yet: both are created as the Job says, with its security settings.
        rc, out, state = run({})
        leaks("new topics", out, state)
        if rc != 0:
            problems.append("new topics: exit %d: %s" % (rc, out.strip()[-300:]))
        for t, (n, configs) in want.items():
            got = state["topics"].get(t)
            if not got or (got["partitions"], got["rf"]) != (n, rf) or \
                    any(got["configs"].get(k) != v for k, v in configs.items()):
                problems.append("new topics: %s is %s, not %d partitions, replication factor "
                                "%d, %s" % (t, got, n, rf, configs))
        props = next((call["properties"] for call in state["calls"] if call["properties"]), "")
        protocol = env.get("KAFKA_SECURITY_PROTOCOL", "plaintext").lower()
        if java_property(props, "security.protocol") != protocol.upper():
            problems.append("client properties: security.protocol is not %s" % protocol.upper())
        if protocol.startswith("sasl_"):
            jaas = java_property(props, "sasl.jaas.config") or ""
            m = re.search(r'password="((?:[^"\\]|\\.)*)"', jaas)
            mechanism = env.get("KAFKA_SASL_MECHANISM", "").upper()
            if java_property(props, "sasl.mechanism") != mechanism or \
                    not m or re.sub(r"\\(.)", r"\1", m.group(1)) != TEST_PASSWORD:
                problems.append("client properties: the SASL mechanism or password does not "
                                "come through as given")
        if protocol.endswith("ssl") and env.get("KAFKA_SSL_CA_LOCATION") and \
                java_property(props, "ssl.truststore.location") != env["KAFKA_SSL_CA_LOCATION"]:
            problems.append("client properties: the CA is not KAFKA_SSL_CA_LOCATION")

        # 2. Topics made earlier with a week's retention and min.insync.replicas=1: set right.
        drifted = {t: {"partitions": n, "rf": rf, "isr": {"0": "1"},
                       "configs": {"retention.ms": "604800000", "min.insync.replicas": "1"}}
                   for t, (n, _) in want.items()}
        rc, out, state = run(drifted)
        leaks("existing topics", out, state)
        if rc != 0:
            problems.append("existing topics: exit %d: %s" % (rc, out.strip()[-300:]))
        for t, (n, configs) in want.items():
            got = state["topics"][t]
            if any(got["configs"].get(k) != v for k, v in configs.items()):
                problems.append("existing topics: %s keeps %s" % (t, got["configs"]))
        if "WARNING" not in out:
            problems.append("existing topics: a partition below min.insync.replicas not reported")

        # 3. A topic with another partition count, or too few replicas: refused, left as it is.
        for what, shape in (("other partition count", {"partitions": partitions + 1, "rf": rf}),
                            ("too few replicas", {"partitions": partitions, "rf": 1})):
            before = dict(shape, configs={"retention.ms": "604800000"})
            rc, out, state = run({topic: json.loads(json.dumps(before))})
            leaks(what, out, state)
            if rc == 0 or state["topics"][topic] != before or \
                    any(call["tool"] == "kafka-configs.sh" for call in state["calls"]):
                problems.append("%s: exit %d, topic %s (must fail and change nothing)"
                                % (what, rc, state["topics"][topic]))
        report(True, "%s: create-topics.sh (run with the Job's environment, %s, against stand-ins "
               "of Kafka's tools) creates both topics, sets the configs of existing ones, refuses "
               "a topic of another partition count or fewer replicas, never prints a secret"
               % (name, protocol), problems)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("renderings", nargs="+", help="NAME=FILE")
    args = ap.parse_args()

    def read(path):
        with open(os.path.join(args.root, path)) as f:
            return f.read()

    version = re.search(r"^VERSION\s*:?=\s*(\S+)", read("Makefile"), re.M)
    drain = re.search(r"#define\s+DRAIN_MS\s+(\d+)", read("producer/main.c"))
    kafka = re.search(r"<kafka.version>([^<]+)</kafka.version>", read("deploy/kafka-local/pom.xml"))
    if not version or not drain or not kafka:
        report(False, "read VERSION from the Makefile, DRAIN_MS from producer/main.c and "
               "kafka.version from deploy/kafka-local/pom.xml")
        return 1
    repo = {"root": args.root, "drain_ms": int(drain.group(1)), "kafka_version": kafka.group(1)}
    for item in args.renderings:
        name, path = item.split("=", 1)
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        # The base pins the image to the release; an overlay may pin another tag.
        check_rendering(name, docs, repo, version.group(1) if name == "base" else None)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
