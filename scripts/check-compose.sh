#!/usr/bin/env bash
# Checks docker-compose.yml without a container engine: valid YAML, valid
# against the Compose specification's JSON schema (check-jsonschema's copy
# of it), every long-running service with a health check and every
# dependency waiting for health (or a completed migration), every file it
# mounts present; and Prometheus's configuration valid (promtool).
# Installs check-jsonschema (PyPI) and promtool (Debian's prometheus) when
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "check-compose: $*" >&2; }
command -v check-jsonschema >/dev/null || pip install -q check-jsonschema >/dev/null 2>&1
command -v promtool >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null

check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
python3 - <<'PY'
import os, sys, yaml

compose = yaml.safe_load(open("docker-compose.yml"))
problems = []
for name, service in compose["services"].items():
    health = service.get("healthcheck", {})
    one_shot = service.get("restart") == "no"
    if not one_shot and (not health or health.get("disable")):
        problems.append(f"{name}: no health check")
    for dependency, how in (service.get("depends_on") or {}).items():
        wanted = "service_completed_successfully" if compose["services"][dependency].get("restart") == "no" else "service_healthy"
        if how.get("condition") != wanted:
            problems.append(f"{name}: depends on {dependency} without waiting for {wanted}")
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("./") and not os.path.exists(source):
            problems.append(f"{name}: mounts {source}, which does not exist")
if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"check-compose: {len(compose['services'])} services, each healthy before its dependants")
PY
promtool check config --syntax-only deploy/prometheus/prometheus.yml >/dev/null
log "docker-compose.yml and deploy/prometheus/prometheus.yml are valid"
