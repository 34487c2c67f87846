#!/usr/bin/env bash
# Offline checks of the deployment artefacts, run by CI before the tests:
#   - builds Helm from its Go module at a pinned version into .tools/bin (once);
#   - fetches the pinned schemas into .tools/schemas: the Compose Specification,
#     and the Prometheus Operator CRDs (ServiceMonitor, PrometheusRule);
#   - `helm lint --strict` and `helm template` with every ci/*-values.yaml;
#   - validates every rendered object: Kubernetes kinds against the Kubernetes
#     schemas (kubernetes-validate, strict: unknown fields fail) of the oldest and
#     newest supported versions, the two CRD kinds against their CRD's schema,
#     closed the same way; no kind is skipped;
#   - misspelt values must be rejected by values.schema.json;
#   - docker-compose.yml against the Compose Specification schema.
# Exits non-zero if anything fails. Needs go and .venv; no cluster, no Docker.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/helm/webhook-dispatcher"
TOOLS="$ROOT/.tools"
HELM="$TOOLS/bin/helm"
SCHEMAS="$TOOLS/schemas"
PY="$ROOT/.venv/bin/python"

# Pinned versions. Bumping HELM_VERSION rebuilds helm on the next run.
HELM_VERSION="v3.22.0"
# Go module carrying schema/compose-spec.json.
COMPOSE_GO_VERSION="v2.16.2"
# Go module carrying example/prometheus-operator-crd/*.yaml.
PROMETHEUS_OPERATOR_VERSION="v0.85.0"
# Kubernetes version the chart is rendered for, and the versions whose schemas
# the rendered objects must satisfy: the chart's minimum kubeVersion and the
# newest that kubernetes-validate knows.
RENDER_KUBE_VERSION="1.37.0"
VALIDATE_KUBE_VERSIONS="1.29.0,1.37.0"

started=$SECONDS
failures=0
passes=0
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

say() { printf '%s\n' "$*"; }
ok() { passes=$((passes + 1)); say "ok    $*"; }
bad() { failures=$((failures + 1)); say "FAIL  $*"; }

# --- prerequisites ---------------------------------------------------------
if [[ ! -x "$PY" ]]; then
    say "FAIL  $PY is missing: create the project's venv first" >&2
    exit 2
fi
if ! command -v go > /dev/null; then
    say "FAIL  go is not on PATH: it is needed to build helm and fetch the schemas" >&2
    exit 2
fi
if ! "$PY" -c 'import kubernetes_validate, jsonschema, yaml' 2> /dev/null; then
    say "installing kubernetes-validate, jsonschema and pyyaml into .venv"
    "$PY" -m pip install --quiet --disable-pip-version-check \
        'kubernetes-validate>=1.37,<2' 'jsonschema>=4.21' 'pyyaml>=6'
fi

# `go mod download -json` prints where a module version lies in the module
# cache; it runs outside any go.mod so that nothing of the project's interferes.
module_field() {  # module@version field
    (cd "$WORK" && GOFLAGS=-mod=mod go mod download -json "$1") |
        "$PY" -c 'import json, sys; d = json.load(sys.stdin); e = d.get("Error"); sys.exit(e) if e else print(d[sys.argv[1]])' "$2"
}

# --- helm ------------------------------------------------------------------
helm_is_pinned() {
    [[ -x "$HELM" ]] && [[ "$("$HELM" version --template '{{.Version}}' 2> /dev/null)" == "$HELM_VERSION" ]]
}
if helm_is_pinned; then
    say "helm $HELM_VERSION: already built"
else
    # Helm's own release build stamps its version and the Kubernetes version of
    # its client-go (the default for .Capabilities.KubeVersion); do the same.
    helm_gomod="$(module_field "helm.sh/helm/v3@$HELM_VERSION" GoMod)"
    kube_minor="$(sed -n 's/^[[:space:]]*k8s\.io\/client-go v0\.\([0-9][0-9]*\)\..*/\1/p' "$helm_gomod" | head -n 1)"
    [[ -n "$kube_minor" ]] || { say "FAIL  cannot read client-go's version from $helm_gomod"; exit 2; }
    say "building helm $HELM_VERSION (Kubernetes 1.$kube_minor) into $TOOLS/bin; the first build takes a few minutes"
    build_started=$SECONDS
    mkdir -p "$TOOLS/bin"
    (cd "$WORK" && GOBIN="$TOOLS/bin" CGO_ENABLED=0 GOFLAGS=-mod=mod go install -trimpath -ldflags "\
-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kube_minor \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kube_minor" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
    helm_is_pinned || { say "FAIL  $HELM does not report $HELM_VERSION after the build"; exit 2; }
    say "helm $HELM_VERSION built in $((SECONDS - build_started)) s"
fi

# --- schemas ---------------------------------------------------------------
# Refreshed on every run (the module cache makes it a fraction of a second), so
# a changed pin can never leave a stale schema behind.
mkdir -p "$SCHEMAS"
compose_dir="$(module_field "github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION" Dir)"
operator_dir="$(module_field "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" Dir)"
"$PY" - "$compose_dir" "$operator_dir" "$SCHEMAS" << 'PY'
"""Copies the Compose schema; turns each CRD into a closed JSON Schema.

A CRD's openAPIV3Schema leaves additionalProperties open, and the API server
drops or rejects unknown fields; closing every object that lists its properties
(and does not ask to keep unknown fields) makes a misspelt field fail here.
"""
import json, pathlib, shutil, sys
import yaml

compose_dir, operator_dir, out = map(pathlib.Path, sys.argv[1:])
shutil.copyfile(compose_dir / "schema" / "compose-spec.json", out / "compose-spec.json")

def close(node):
    if isinstance(node, dict):
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            close(value)
    elif isinstance(node, list):
        for value in node:
            close(value)

for plural in ("servicemonitors", "prometheusrules"):
    crd = yaml.safe_load((operator_dir / "example" / "prometheus-operator-crd" /
                          f"monitoring.coreos.com_{plural}.yaml").read_text())
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        close(schema)
        # apiVersion, kind and metadata are checked by the API server itself.
        schema["properties"]["metadata"] = {"type": "object"}
        name = f"{crd['spec']['group']}_{version['name']}_{crd['spec']['names']['kind']}.json"
        (out / name).write_text(json.dumps(schema, indent=1))
PY
say "schemas: compose-spec $COMPOSE_GO_VERSION, prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION"

# --- lint and render every ci values file ----------------------------------
mkdir -p "$WORK/rendered"
shopt -s nullglob
ci_files=("$CHART"/ci/*-values.yaml)
[[ ${#ci_files[@]} -gt 0 ]] || { bad "no $CHART/ci/*-values.yaml"; ci_files=(); }
for values in "${ci_files[@]}"; do
    name="$(basename "$values" -values.yaml)"
    if "$HELM" lint --strict --quiet --kube-version "$RENDER_KUBE_VERSION" "$CHART" -f "$values" > "$WORK/lint-$name.log" 2>&1; then
        ok "helm lint      $name"
    else
        bad "helm lint      $name"; sed 's/^/      /' "$WORK/lint-$name.log"
    fi
    if "$HELM" template ci "$CHART" --namespace ci --kube-version "$RENDER_KUBE_VERSION" -f "$values" \
            > "$WORK/rendered/$name.yaml" 2> "$WORK/template-$name.log"; then
        ok "helm template  $name"
    else
        bad "helm template  $name"; sed 's/^/      /' "$WORK/template-$name.log"
        rm -f "$WORK/rendered/$name.yaml"
    fi
done

# --- validate the rendered objects and the compose file --------------------
if "$PY" - "$WORK/rendered" "$SCHEMAS" "$VALIDATE_KUBE_VERSIONS" "$ROOT/docker-compose.yml" << 'PY'
import collections, json, pathlib, sys
import jsonschema, yaml
import kubernetes_validate

rendered, schemas = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
versions, compose_file = sys.argv[3].split(","), pathlib.Path(sys.argv[4])
crds = {p.stem: json.loads(p.read_text()) for p in schemas.glob("*_*_*.json")}
failed = 0
for path in sorted(rendered.glob("*.yaml")):
    kinds = collections.Counter()
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        kinds[doc["kind"]] += 1
        what = f"{path.stem}: {doc['kind']}/{doc['metadata']['name']}"
        group, _, version = doc["apiVersion"].rpartition("/")
        crd = crds.get(f"{group}_{version}_{doc['kind']}")
        try:
            if crd is not None:
                jsonschema.Draft4Validator(crd).validate(doc)
            else:
                for kube in versions:
                    kubernetes_validate.validate(doc, kube, strict=True)
        except Exception as exc:  # every way of failing is reported the same
            failed += 1
            print(f"FAIL  validate       {what}: {getattr(exc, 'message', exc)}")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"ok    validate       {path.stem}: {summary}" if kinds else f"FAIL  validate       {path.stem}: no objects")
    failed += 0 if kinds else 1

spec = json.loads((schemas / "compose-spec.json").read_text())
validator = jsonschema.validators.validator_for(spec)(spec)
errors = sorted(validator.iter_errors(yaml.safe_load(compose_file.read_text())), key=str)
for error in errors:
    print(f"FAIL  compose        {'.'.join(map(str, error.absolute_path))}: {error.message}")
if not errors:
    print("ok    compose        docker-compose.yml matches the Compose Specification")
sys.exit(1 if failed or errors else 0)
PY
then
    ok "manifests valid against Kubernetes $VALIDATE_KUBE_VERSIONS and the CRDs; compose file valid"
else
    bad "validation (see above)"
fi

# --- misspelt values must be rejected ---------------------------------------
# One typo per level of nesting: the schema is closed at every level.
misspelt=(
    "replicaCuont|replicaCuont: 3"
    "drain_timout_s|config: {drain_timout_s: 5}"
    "mechansim|kafka: {sasl: {mechansim: PLAIN}}"
    "treshold|prometheusRule: {rules: {deadLetters: {treshold: 1}}}"
)
for entry in "${misspelt[@]}"; do
    key="${entry%%|*}"
    printf '%s\n' "${entry#*|}" > "$WORK/typo.yaml"
    # The required value is given separately so only the typo can fail.
    printf 'kafka:\n  bootstrapServers: k:9092\n' > "$WORK/base.yaml"
    if "$HELM" template ci "$CHART" --kube-version "$RENDER_KUBE_VERSION" -f "$WORK/base.yaml" -f "$WORK/typo.yaml" \
            > /dev/null 2> "$WORK/typo.log"; then
        bad "schema rejects misspelt '$key' (helm template accepted it)"
    elif ! grep -q "$key" "$WORK/typo.log"; then
        bad "schema rejects misspelt '$key' (failed, but not naming the key)"; sed 's/^/      /' "$WORK/typo.log"
    elif "$HELM" lint --kube-version "$RENDER_KUBE_VERSION" "$CHART" -f "$WORK/base.yaml" -f "$WORK/typo.yaml" > /dev/null 2>&1; then
        bad "schema rejects misspelt '$key' (helm lint accepted it)"
    else
        ok "schema rejects misspelt '$key'"
    fi
done

say ""
say "check-chart: $passes checks passed, $failures failed ($((SECONDS - started)) s)"
[[ $failures -eq 0 ]]
