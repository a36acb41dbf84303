#!/usr/bin/env bash
# Checks the alerting and the dashboard without a Prometheus server:
#   1. helm/connected-apps/files/prometheus-rules.yml is valid
#      (`promtool check rules`);
#   2. every alert has its labels (severity, team, category), its
#      annotations (summary, description, runbook_url), a section of
#      docs/runbooks.md under its name, and unit tests in
#      deploy/prometheus/tests/ where it fires and where it stays silent;
#      every test file orders every rule group (promtool's default order is
#      random);
#   3. the unit tests pass (`promtool test rules`);
#   4. deploy/alertmanager/alertmanager.yml is valid (`amtool
#      check-config`) and sends every alert where the specification says:
#      critical billing alerts to PagerDuty and Slack, other critical ones
#      to PagerDuty, Slack and email, warnings to Slack;
#   5. helm/connected-apps/files/grafana-dashboard.json is JSON and every
#      query in it parses as PromQL.
# Installs promtool (Debian's prometheus), amtool (Debian's
# prometheus-alertmanager) and PyYAML (python3-yaml) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

RULES=helm/connected-apps/files/prometheus-rules.yml
TESTS=deploy/prometheus/tests
ALERTMANAGER=deploy/alertmanager/alertmanager.yml
DASHBOARD=helm/connected-apps/files/grafana-dashboard.json
RUNBOOKS=docs/runbooks.md

log() { echo "check-alerts: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    log "need root (or sudo) to run: $*"
    exit 1
  fi
}

# apt-get install, refreshing the package lists first if they are stale.
apt_install() {
  local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@")
  if ! as_root "${install[@]}" >/dev/null 2>&1; then
    as_root apt-get update -qq >/dev/null
    as_root "${install[@]}" >/dev/null
  fi
}

missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v amtool >/dev/null || missing+=(prometheus-alertmanager)
python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

start=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The rules.
promtool check rules "$RULES" >/dev/null
log "$RULES is valid"

# 2. Every alert labelled, annotated, documented and tested both ways;
# writes one line per alert for step 4: name, then its labels.
python3 - "$RULES" "$TESTS" "$RUNBOOKS" "$work/alerts" <<'PY'
import glob, os, re, sys, yaml

rules_path, tests_dir, runbooks_path, out_path = sys.argv[1:]
rules = yaml.safe_load(open(rules_path))
groups = [g["name"] for g in rules["groups"]]
alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
headings = {
    line[3:].strip().lower()
    for line in open(runbooks_path, encoding="utf-8")
    if line.startswith("## ")
}
problems = []

fires, silent = set(), set()
for path in sorted(glob.glob(os.path.join(tests_dir, "*.yml"))):
    suite = yaml.safe_load(open(path))
    order = suite.get("group_eval_order") or []
    if sorted(order) != sorted(groups) or order[0] != groups[0]:
        problems.append(f"{path}: group_eval_order must list every group, {groups[0]} first")
    for test in suite.get("tests", []):
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])

lines = []
for rule in alerts:
    name, labels = rule["alert"], rule.get("labels", {})
    annotations = rule.get("annotations", {})
    for label in ("severity", "team", "category"):
        if label not in labels:
            problems.append(f"{name}: no {label} label")
    if labels.get("severity") not in ("critical", "warning"):
        problems.append(f"{name}: severity must be critical or warning")
    for annotation in ("summary", "description", "runbook_url"):
        if annotation not in annotations:
            problems.append(f"{name}: no {annotation} annotation")
    if not annotations.get("runbook_url", "").endswith("#" + name.lower()):
        problems.append(f"{name}: runbook_url must end with #{name.lower()}")
    if name.lower() not in headings:
        problems.append(f"{name}: {runbooks_path} has no section '## {name}'")
    if name not in fires:
        problems.append(f"{name}: no unit test where it fires")
    if name not in silent:
        problems.append(f"{name}: no unit test where it stays silent")
    lines.append(" ".join([name] + [f"{k}={v}" for k, v in sorted(labels.items())]))

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
open(out_path, "w").write("\n".join(lines) + "\n")
print(f"check-alerts: {len({r['alert'] for r in alerts})} alerts ({len(alerts)} rules) "
      "labelled, annotated, in the runbooks, tested firing and silent", file=sys.stderr)
PY

# 3. The unit tests.
tests=("$TESTS"/*.yml)
promtool test rules "${tests[@]}" >"$work/tests.log" 2>&1 || { cat "$work/tests.log" >&2; exit 1; }
log "unit tests pass (${#tests[@]} files, $((SECONDS - start)) s so far)"

# 4. Alertmanager: valid, and each alert routed as the specification lists.
amtool check-config "$ALERTMANAGER" >/dev/null
while read -r name labels; do
  want=slack
  if [[ " $labels " == *" severity=critical "* ]]; then
    want=pagerduty-slack-email
    [[ " $labels " == *" category=billing "* ]] && want=pagerduty-slack
  fi
  # shellcheck disable=SC2086 # the labels are words on purpose
  if ! amtool config routes test --config.file="$ALERTMANAGER" --verify.receivers="$want" \
      alertname="$name" $labels >/dev/null 2>&1; then
    log "$name ($labels) is not routed to $want"
    exit 1
  fi
done <"$work/alerts"
log "$ALERTMANAGER is valid and routes every alert as the specification lists"

# 5. The dashboard: JSON, and every query parses (as a recording rule,
# with Grafana's interval variables given a value).
python3 - "$DASHBOARD" "$work/dashboard-rules.yml" <<'PY'
import json, re, sys, yaml

dashboard = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for panel in panels:
        walk(panel.get("panels", []))
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append((panel.get("title", "?"), target["expr"]))
walk(dashboard.get("panels", []))
for annotation in dashboard.get("annotations", {}).get("list", []):
    if annotation.get("expr"):
        exprs.append(("annotation " + annotation.get("name", "?"), annotation["expr"]))
if not exprs:
    sys.exit("check-alerts: the dashboard has no queries")
# Each query a recording rule named after its panel, so promtool names it.
rules = [
    {"record": "dashboard:" + re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") + f":query{i}",
     "expr": expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1d")}
    for i, (title, expr) in enumerate(exprs)
]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"check-alerts: {len(exprs)} dashboard queries", file=sys.stderr)
PY
promtool check rules "$work/dashboard-rules.yml" >/dev/null
log "$DASHBOARD is valid"

log "all checks passed in $((SECONDS - start)) s"
