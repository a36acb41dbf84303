#!/usr/bin/env python3
"""Checks what helm-render made of helm/connected-apps for one value set.

    validate.py --values merged.json --schema values.schema.json \
        --kube-version 1.30 --kube-version 1.37 rendered.yaml

1. The merged values against the chart's values.schema.json (JSON Schema
   draft-07), as Helm checks them before rendering.
2. Every manifest against the Kubernetes OpenAPI schemas of each
   --kube-version, strictly (no unknown field), with kubernetes-validate.
   A kind it has no schema for is an error, except the Prometheus
   Operator's ServiceMonitor and PrometheusRule, which are checked against
   the subsets of their CRDs below (strict too), and their rule groups with
   `promtool check rules`.
3. What no schema sees: selectors that select what they should, names
   that resolve, the pod security the chart promises, the hook Job not
   depending on resources a pre-install hook runs before, $(VAR)
   references defined earlier, the API's preStop within its grace period.

Prints one line per problem and exits 1 if there is any.
"""

import argparse
import ipaddress
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import yaml

import kubernetes_validate
import kubernetes_validate.utils as kv_utils

# The schemas are big (1.8 MB of definitions per version): read each once.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)

HOOK = "helm.sh/hook"

# --- Prometheus Operator CRDs (monitoring.coreos.com/v1), the fields this
# chart can emit, with their types; unknown fields are refused, as with
# kubectl's strict validation.
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": LABELS,
        "annotations": LABELS,
    },
    "additionalProperties": False,
}
RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {"type": "string", "enum": [
            "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
            "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
            "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
            "dropequal", "DropEqual"]},
    },
}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": LABELS,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "selector": LABEL_SELECTOR,
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "targetPort": {"type": ["integer", "string"]},
                        "path": {"type": "string"},
                        "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "honorLabels": {"type": "boolean"},
                        "honorTimestamps": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": RELABEL},
                        "metricRelabelings": {"type": "array", "items": RELABEL},
                    },
                }},
            },
        },
    },
}
RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "minLength": 1},
        "record": {"type": "string", "minLength": 1},
        "expr": {"type": ["string", "integer"]},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": LABELS,
        "annotations": LABELS,
    },
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": DURATION,
                        "limit": {"type": "integer"},
                        "query_offset": DURATION,
                        "labels": LABELS,
                        "partial_response_strategy": {"type": "string"},
                        "rules": {"type": "array", "items": RULE},
                    },
                }},
            },
        },
    },
}
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
ROLES = ("api", "flusher", "scheduler")
COMPONENT = "app.kubernetes.io/component"


class Report:
    def __init__(self):
        self.problems = []

    def __call__(self, doc, message):
        self.problems.append(f"{describe(doc)}: {message}")


def describe(doc):
    if doc is None:
        return "chart"
    md = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{md.get('name')}"


def selects(selector, labels):
    """True when a matchLabels selector (a dict) selects these labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_spec(doc):
    if doc["kind"] in ("Deployment", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def pod_labels(doc):
    return doc["spec"]["template"]["metadata"].get("labels") or {}


def check_values(values, schema, report):
    validator = jsonschema.Draft7Validator(schema)
    for e in sorted(validator.iter_errors(values), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in e.absolute_path) or "(top)"
        report(None, f"values.schema.json: {path}: {e.message}")


def check_schemas(docs, versions, report):
    for doc in docs:
        crd = CRDS.get((doc.get("apiVersion"), doc.get("kind")))
        if crd is not None:
            for e in jsonschema.Draft7Validator(crd).iter_errors(doc):
                path = ".".join(str(p) for p in e.absolute_path)
                report(doc, f"{doc['kind']} (CRD subset): {path}: {e.message}")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                report(doc, f"Kubernetes {e.version}: {path}: {e.message}")
            except kv_utils.SchemaNotFoundError as e:
                report(doc, f"Kubernetes {version}: {e.message}")


def check_rules(docs, report):
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    if not rules:
        return
    promtool = shutil.which("promtool")
    if promtool is None:
        report(rules[0], "promtool is not installed: cannot check the rule groups")
        return
    for doc in rules:
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump({"groups": doc["spec"]["groups"]}, f)
            f.flush()
            run = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
            if run.returncode != 0:
                report(doc, "promtool check rules: " + (run.stdout + run.stderr).strip().replace("\n", " | "))


def check_pods(docs, by_kind, report):
    chart_secrets = {d["metadata"]["name"]: d for d in by_kind.get("Secret", [])}
    chart_configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    chart_accounts = {d["metadata"]["name"] for d in by_kind.get("ServiceAccount", [])}
    for doc in by_kind.get("Deployment", []) + by_kind.get("Job", []):
        spec = pod_spec(doc)
        is_hook = HOOK in (doc["metadata"].get("annotations") or {})
        if doc["kind"] == "Deployment":
            sel = doc["spec"]["selector"].get("matchLabels") or {}
            if not selects(sel, pod_labels(doc)):
                report(doc, "selector does not select the pod template's labels")
            annotations = doc["spec"]["template"]["metadata"].get("annotations") or {}
            for key in ("checksum/config", "checksum/secret"):
                if not re.fullmatch(r"[0-9a-f]{64}", annotations.get(key, "")):
                    report(doc, f"pod template lacks the {key} annotation")
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            report(doc, "pod securityContext.runAsNonRoot is not true")
        if spec.get("automountServiceAccountToken") is not False:
            report(doc, "automountServiceAccountToken is not false")
        sa = spec.get("serviceAccountName", "default")
        if is_hook and sa in chart_accounts:
            report(doc, f"hook pod uses ServiceAccount {sa}, which a pre-install hook runs before")
        if not is_hook and sa != "default" and chart_accounts and sa not in chart_accounts:
            report(doc, f"ServiceAccount {sa} is not the chart's")
        volumes = {v["name"] for v in spec.get("volumes") or []}
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            where = f"container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem") is not True:
                report(doc, f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                report(doc, f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                report(doc, f"{where}: privileged")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                report(doc, f"{where}: capabilities are not all dropped")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(part) or {}):
                        report(doc, f"{where}: no {part}.{r}")
            if doc["kind"] == "Deployment":
                for probe in ("readinessProbe", "livenessProbe"):
                    if probe not in c:
                        report(doc, f"{where}: no {probe}")
            if not any(m.get("mountPath") == "/tmp" for m in c.get("volumeMounts") or []):
                report(doc, f"{where}: /tmp is not mounted (the root filesystem is read-only)")
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes:
                    report(doc, f"{where}: volumeMount {m['name']} has no volume")
            check_env(doc, c, is_hook, chart_secrets, chart_configmaps, report)


def hook_of(doc):
    return (doc["metadata"].get("annotations") or {}).get(HOOK)


def check_env(doc, c, is_hook, chart_secrets, chart_configmaps, report):
    where = f"container {c['name']}"
    defined = set()

    def secret_ref(name):
        # A name the chart does not render is a Secret the user made (it
        # exists before install). One the chart renders must be a hook of
        # its own for a hook pod, and a plain resource otherwise.
        s = chart_secrets.get(name)
        if s is not None and is_hook and not hook_of(s):
            report(doc, f"{where}: hook pod reads Secret {name}, which a pre-install hook runs before")
        if s is not None and not is_hook and hook_of(s):
            report(doc, f"{where}: reads Secret {name}, a hook resource deleted after the hook")

    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            name = src["configMapRef"]["name"]
            cm = chart_configmaps.get(name)
            if is_hook and cm is not None and not hook_of(cm):
                report(doc, f"{where}: hook pod reads ConfigMap {name}, which a pre-install hook runs before")
            if cm is not None:
                defined.update(cm.get("data") or {})
        if "secretRef" in src:
            secret_ref(src["secretRef"]["name"])
    for e in c.get("env") or []:
        value = e.get("value")
        if value is not None:
            for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                if ref not in defined:
                    report(doc, f"{where}: {e['name']} refers to $({ref}), not defined before it")
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref is not None:
            secret_ref(ref["name"])
            s = chart_secrets.get(ref["name"])
            if s is not None and not ref.get("optional") and ref["key"] not in (s.get("data") or {}):
                report(doc, f"{where}: {e['name']} reads key {ref['key']} missing from Secret {ref['name']}")
        defined.add(e["name"])


def check_roles(by_kind, values, report):
    deployments = {(d["spec"]["template"]["metadata"].get("labels") or {}).get(COMPONENT): d
                   for d in by_kind.get("Deployment", [])}
    for role in ROLES:
        d = deployments.get(role)
        if d is None:
            report(None, f"no Deployment for the {role} role")
            continue
        c = d["spec"]["template"]["spec"]["containers"][0]
        argv = (c.get("command") or []) + (c.get("args") or [])
        if argv[1:4] != ["serve", "--roles", role]:
            report(d, f"runs {argv}, not <binary> serve --roles {role}")
        env = {e["name"]: e for e in c.get("env") or []}
        cms = [x for x in by_kind.get("ConfigMap", [])
               if any((s.get("configMapRef") or {}).get("name") == x["metadata"]["name"] for s in c.get("envFrom") or [])]
        merged = {}
        for cm in cms:
            merged.update(cm.get("data") or {})
        merged.update({k: v.get("value") for k, v in env.items() if "value" in v})
        if merged.get("MIGRATE_ON_START") != "false":
            report(d, "MIGRATE_ON_START is not false (the hook Job migrates)")
        if role == "flusher":
            field = ((env.get("FLUSHER_CONSUMER") or {}).get("valueFrom") or {}).get("fieldRef") or {}
            if field.get("fieldPath") != "metadata.name":
                report(d, "FLUSHER_CONSUMER does not come from the pod name")
        if role == "api":
            grace = d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            pre = ((c.get("lifecycle") or {}).get("preStop") or {})
            pause = (pre.get("sleep") or {}).get("seconds")
            if pause is None and "exec" in pre:
                cmd = pre["exec"]["command"]
                pause = int(cmd[-1]) if cmd[0].endswith("sleep") else 0
            if pause and grace <= pause + 30:
                report(d, f"terminationGracePeriodSeconds {grace} does not exceed preStop {pause} s + 30 s of drain")
            hpa = values["api"]["autoscaling"]["enabled"]
            if hpa and "replicas" in d["spec"]:
                report(d, "sets replicas while an HPA scales it")
    migrate = [j for j in by_kind.get("Job", []) if hook_of(j)]
    if values["migrations"]["enabled"]:
        if not migrate:
            report(None, "no migration hook Job")
        for j in migrate:
            hooks = set(hook_of(j).split(","))
            if not {"pre-install", "pre-upgrade"} <= hooks:
                report(j, f"hook is {hook_of(j)}, not pre-install,pre-upgrade")
            c = j["spec"]["template"]["spec"]["containers"][0]
            argv = (c.get("command") or []) + (c.get("args") or [])
            if argv[1:] != ["migrate"]:
                report(j, f"runs {argv}, not <binary> migrate")


def check_services(by_kind, report):
    workloads = by_kind.get("Deployment", [])
    services = {(s["metadata"]["name"]): s for s in by_kind.get("Service", [])}
    for s in services.values():
        sel = s["spec"].get("selector") or {}
        chosen = [d for d in workloads if selects(sel, pod_labels(d))]
        if not chosen:
            report(s, "selects no Deployment's pods")
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            for d in chosen:
                names = {cp.get("name") for c in d["spec"]["template"]["spec"]["containers"] for cp in c.get("ports") or []}
                numbers = {cp["containerPort"] for c in d["spec"]["template"]["spec"]["containers"] for cp in c.get("ports") or []}
                if target not in names | numbers:
                    report(s, f"targetPort {target} is no port of {describe(d)}")
    metrics = [s for s in services.values() if s["spec"].get("clusterIP") == "None"]
    for s in metrics:
        roles = {pod_labels(d).get(COMPONENT) for d in workloads if selects(s["spec"]["selector"], pod_labels(d))}
        if set(ROLES) - roles:
            report(s, f"metrics Service misses the pods of {sorted(set(ROLES) - roles)}")
    for ing in by_kind.get("Ingress", []):
        for rule in ing["spec"].get("rules", []):
            for path in rule["http"]["paths"]:
                svc = path["backend"]["service"]
                s = services.get(svc["name"])
                if s is None:
                    report(ing, f"backend Service {svc['name']} is not rendered")
                elif svc["port"].get("name") not in {p.get("name") for p in s["spec"]["ports"]} and \
                        svc["port"].get("number") not in {p["port"] for p in s["spec"]["ports"]}:
                    report(ing, f"backend port {svc['port']} is not a port of Service {svc['name']}")
        tls_hosts = {h for t in ing["spec"].get("tls") or [] for h in t.get("hosts") or []}
        for rule in ing["spec"].get("rules", []):
            if tls_hosts and rule.get("host") not in tls_hosts:
                report(ing, f"host {rule.get('host')} has no TLS")
    deployments = {d["metadata"]["name"]: d for d in workloads}
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] != "Deployment" or ref["name"] not in deployments:
            report(hpa, f"scaleTargetRef {ref['kind']}/{ref['name']} is not rendered")
        elif "replicas" in deployments[ref["name"]]["spec"]:
            report(hpa, f"its Deployment {ref['name']} also sets replicas")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        sel = pdb["spec"]["selector"].get("matchLabels") or {}
        if not any(selects(sel, pod_labels(d)) for d in workloads):
            report(pdb, "selects no Deployment's pods")
    for np in by_kind.get("NetworkPolicy", []):
        sel = np["spec"]["podSelector"].get("matchLabels") or {}
        if not any(selects(sel, pod_labels(d)) for d in workloads):
            report(np, "selects no Deployment's pods")
        check_https_egress(np, report)
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"].get("matchLabels") or {}
        names = (sm["spec"].get("namespaceSelector") or {}).get("matchNames")
        chosen = [s for s in services.values() if selects(sel, s["metadata"].get("labels") or {})
                  and (names is None or s["metadata"].get("namespace") in names)]
        if len(chosen) != 1:
            report(sm, f"selects {len(chosen)} Services, want exactly the metrics Service")
            continue
        ports = {p.get("name") for p in chosen[0]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in ports:
                report(sm, f"endpoint port {ep.get('port')} is not a port of Service {chosen[0]['metadata']['name']}")
        job_label = sm["spec"].get("jobLabel")
        if job_label and job_label not in (chosen[0]["metadata"].get("labels") or {}):
            report(sm, f"jobLabel {job_label} is not a label of the Service")
    for cm in by_kind.get("ConfigMap", []):
        for key, value in (cm.get("data") or {}).items():
            if key.endswith(".json"):
                try:
                    json.loads(value)
                except ValueError as e:
                    report(cm, f"{key} is not JSON: {e}")


# Addresses HTTPS egress must never reach: merchants name webhook URLs
# (the cloud metadata service, a private address, the node, CGNAT).
FORBIDDEN_HTTPS = ["169.254.169.254", "10.0.0.5", "172.16.0.1", "192.168.1.1",
                   "100.64.0.1", "127.0.0.1", "fd00::1", "fe80::1"]


def check_https_egress(np, report):
    """Every egress rule open on 443 keeps the forbidden addresses out."""
    for rule in np["spec"].get("egress") or []:
        if not any(p.get("port") == 443 for p in rule.get("ports") or []):
            continue
        peers = rule.get("to")
        if not peers:
            report(np, "egress on 443 is open to every address (the metadata service, the cluster)")
            continue
        for peer in peers:
            block = peer.get("ipBlock")
            if not block:
                continue
            net = ipaddress.ip_network(block["cidr"])
            excepted = [ipaddress.ip_network(e) for e in block.get("except") or []]
            for address in map(ipaddress.ip_address, FORBIDDEN_HTTPS):
                if address.version == net.version and address in net \
                        and not any(address in e for e in excepted):
                    report(np, f"egress on 443 reaches {address} through {block['cidr']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", required=True, help="merged values (helm-render --values-out)")
    ap.add_argument("--schema", required=True, help="the chart's values.schema.json")
    ap.add_argument("--kube-version", action="append", required=True)
    ap.add_argument("manifests")
    args = ap.parse_args()

    report = Report()
    with open(args.values) as f:
        values = json.load(f)
    with open(args.schema) as f:
        schema = json.load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    check_values(values, schema, report)

    with open(args.manifests) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    keys = set()
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        key = (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        if key in keys:
            report(d, "rendered twice")
        keys.add(key)

    check_schemas(docs, args.kube_version, report)
    check_rules(docs, report)
    check_pods(docs, by_kind, report)
    check_roles(by_kind, values, report)
    check_services(by_kind, report)

    kinds = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
    if report.problems:
        for p in report.problems:
            print(f"  FAIL {p}")
        return 1
    print(f"  ok: {len(docs)} manifests ({kinds}); Kubernetes {', '.join(args.kube_version)} strict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
