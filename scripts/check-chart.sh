#!/usr/bin/env bash
# Checks the Helm chart helm/connected-apps without Helm:
#
#   1. builds helm/render (Helm's template engine: text/template, sprig,
#      include, tpl, toYaml, required, ...) from Debian's golang-go and
#      golang-github-masterminds-sprig-dev, offline;
#   2. renders the chart for four value sets: the defaults (and again with
#      the NetworkPolicies on), ci/production-values.yaml and
#      ci/minimal-values.yaml;
#   3. checks each (helm/render/validate.py): the merged values against
#      values.schema.json; every manifest against the Kubernetes schemas of
#      KUBE_VERSIONS with kubernetes-validate --strict; ServiceMonitor and
#      PrometheusRule against their CRDs' fields, the rules with
#      `promtool check rules`; selectors, references and pod security;
#   4. renders value sets that must fail (a missing required secret, a
#      grace period shorter than the preStop pause plus the drain, a value
#      the schema refuses) and fails if any of them does not;
#   5. checks that every value has a "# --" description in values.yaml and
#      its row in the chart README's table (helm/render/values_doc.py).
#
# Installs what it needs when missing (apt: golang-go,
# golang-github-masterminds-sprig-dev, prometheus for promtool; pip:
# kubernetes-validate), as root or through sudo. Exits non-zero naming the
# value set that failed. CHECK_CHART_OUT=DIR keeps the rendered manifests.
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=helm/connected-apps
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion: the
# preStop sleep action is GA in 1.30) and the newest kubernetes-validate
# knows.
KUBE_VERSIONS=(1.30 1.37)
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
RELEASE=connected-apps
NAMESPACE=connected-apps

started=$SECONDS
say() { printf '==> %s\n' "$*"; }
die() { printf 'check-chart: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_install() {
    local log
    log=$(mktemp)
    say "installing $* (apt)"
    if ! { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "apt-get install $* failed"
    fi
    rm -f "$log"
}

# --- tools
missing=()
command -v go >/dev/null || missing+=(golang-go)
[ -d /usr/share/gocode/src/github.com/Masterminds/sprig ] || missing+=(golang-github-masterminds-sprig-dev)
command -v promtool >/dev/null || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

kv_supports() {
    python3 - "${KUBE_VERSIONS[@]}" <<'EOF' 2>/dev/null
import sys
import kubernetes_validate.utils as u
known = {v.rsplit(".", 1)[0] for v in u.all_versions()}
sys.exit(0 if all(v in known for v in sys.argv[1:]) else 1)
EOF
}
if ! kv_supports; then
    say "installing $KUBERNETES_VALIDATE (pip)"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE" \
        || die "pip install $KUBERNETES_VALIDATE failed"
    kv_supports || die "kubernetes-validate does not know Kubernetes ${KUBE_VERSIONS[*]}"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=${CHECK_CHART_OUT:-$work/out}
mkdir -p "$out"

# --- the renderer: GOPATH mode over Debian's Go sources, no network.
say "building helm/render ($(go version | cut -d' ' -f3))"
(
    cd helm/render
    GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS='' GOPROXY=off go vet .
    GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS='' GOPROXY=off go build -o "$work/helm-render" .
) || die "building helm/render failed"

newest=${KUBE_VERSIONS[${#KUBE_VERSIONS[@]}-1]}
render() { # NAME [helm-render flags...]: renders into $out/NAME.yaml, values into $out/NAME.values.json
    local name=$1
    shift
    "$work/helm-render" --name "$RELEASE" --namespace "$NAMESPACE" --kube-version "v$newest.0" \
        --values-out "$out/$name.values.json" "$@" "$CHART" >"$out/$name.yaml"
}

failed=()
check() { # NAME [helm-render flags...]
    local name=$1
    say "value set '$name': render"
    if ! render "$@" 2>"$out/$name.err"; then
        cat "$out/$name.err" >&2
        printf '  FAIL value set %s: the chart does not render\n' "$name" >&2
        failed+=("$name")
        return
    fi
    say "value set '$name': validate (values schema, Kubernetes ${KUBE_VERSIONS[*]} strict, CRDs, promtool, references)"
    local kv=()
    local v
    for v in "${KUBE_VERSIONS[@]}"; do kv+=(--kube-version "$v"); done
    if ! python3 helm/render/validate.py --values "$out/$name.values.json" \
        --schema "$CHART/values.schema.json" "${kv[@]}" "$out/$name.yaml"; then
        printf '  FAIL value set %s: see above\n' "$name" >&2
        failed+=("$name")
    fi
}

check default
check production -f "$CHART/ci/production-values.yaml"
check minimal -f "$CHART/ci/minimal-values.yaml"
# The defaults with the NetworkPolicies on: HTTPS egress kept off the
# private, metadata and cluster ranges by default.
check networkpolicy --set networkPolicy.enabled=true

# --- what must be refused, and with which message.
must_fail() { # NAME EXPECTED-MESSAGE [helm-render flags...]
    local name=$1 expected=$2
    shift 2
    say "value set '$name': must be refused"
    if render "$name" "$@" 2>"$out/$name.err"; then
        # Rendered: the schema must refuse it then.
        if python3 helm/render/validate.py --values "$out/$name.values.json" \
            --schema "$CHART/values.schema.json" --kube-version "$newest" "$out/$name.yaml" >"$out/$name.err" 2>&1; then
            printf '  FAIL value set %s: accepted, should fail with "%s"\n' "$name" "$expected" >&2
            failed+=("$name")
            return
        fi
    fi
    if ! grep -qF -- "$expected" "$out/$name.err"; then
        cat "$out/$name.err" >&2
        printf '  FAIL value set %s: refused, but not with "%s"\n' "$name" "$expected" >&2
        failed+=("$name")
        return
    fi
    local line
    line=$(grep -F -m1 -- "$expected" "$out/$name.err")
    line=${line#*"$expected"}
    printf '  ok: refused: %s%s\n' "$expected" "${line:0:100}"
}

must_fail secret-without-values "secrets.values.databaseUrl is required" --set secrets.create=true
must_fail short-jwt-secret "secrets.values.jwtSecret must be at least 32 bytes" \
    -f "$CHART/ci/minimal-values.yaml" --set secrets.values.jwtSecret=short
must_fail bad-encryption-keys "dataEncryptionKeys must be <id>:<base64 of 32 bytes>" \
    -f "$CHART/ci/minimal-values.yaml" --set secrets.values.dataEncryptionKeys=k1:notbase64
must_fail grace-shorter-than-drain "must exceed api.lifecycle.preStopSleepSeconds" \
    --set api.terminationGracePeriodSeconds=20
must_fail ingress-without-hosts "ingress.hosts needs at least one host" \
    --set ingress.enabled=true --set ingress.hosts=null
printf 'networkPolicy:\n  enabled: true\n  egress:\n    https:\n      exceptCidrs: [10.0.0.0/8]\n' \
    >"$out/https-egress-anywhere.in.yaml"
must_fail https-egress-anywhere "egress on 443 reaches 169.254.169.254" \
    -f "$out/https-egress-anywhere.in.yaml"
must_fail schema-zero-shards "config.usageStreamShards" --set config.usageStreamShards=0
must_fail schema-unknown-value "Additional properties are not allowed ('replicas' was unexpected)" \
    --set api.replicas=5

say "values documented: values.yaml's '# --' comments and the README's table"
python3 helm/render/values_doc.py "$CHART/values.yaml" --check "$CHART/README.md" || failed+=(values-doc)

elapsed=$((SECONDS - started))
if [ "${#failed[@]}" -gt 0 ]; then
    die "FAILED value sets: ${failed[*]} (${elapsed}s)"
fi
say "chart OK: 4 value sets rendered and valid for Kubernetes ${KUBE_VERSIONS[*]}, 8 bad ones refused, values documented (${elapsed}s)"
