#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need,
# checks formatting and lints, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests need (protoc comes from the protoc-bin-vendored
# crate, so it is not one of them).
need_apt=(
    prometheus            # promtool: checks the alert rules and the dashboard queries
    libvirt-dev pkg-config # the libvirt provider links libvirt (the virt crate); its
                           # tests run on libvirt's built-in test driver, no daemon
    genisoimage           # isoinfo: reads back the cidata ISO the libvirt provider writes
    # tests/libvirt_vm.rs, a real pod VM: libvirtd and QEMU (TCG) in the test's
    # own namespaces, and what podvm/libvirt/build-image.sh needs installed
    # (it apt-get downloads the kernel, busybox-static and isolinux itself).
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
    dnsmasq-base iptables iproute2 util-linux xorriso
    python3-venv          # scripts/helm-tools.sh: kubernetes-validate in its own venv
    # scripts/build-image.sh builds the container image with buildah;
    # tests/image.rs runs it with podman on runc (crun 1.8 refuses the
    # hybrid cgroup hierarchy of CI's machines).
    buildah podman runc ca-certificates
)
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)
if ((${#need_apt[@]})); then
    "${sudo[@]}" apt-get update -qq
    # The image's qemu-utils (10.0, backports) conflicts with bookworm's
    # qemu-system-x86 (7.2): pin qemu-utils to qemu-system-x86's version in
    # the same install (see podvm/libvirt/README.md).
    qemu_version="$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: //p')"
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends --allow-downgrades \
        "${need_apt[@]}" "qemu-utils=$qemu_version"
fi

# Python packages the tests need: moto's EC2 server, for the AWS provider's
# tests (providers/tests/aws_conformance.rs, tests/aws_e2e.rs), and IBM's
# and Microsoft's official Python SDKs, which check that the IBM Cloud and
# Azure test servers answer what they expect (providers/tests/ibmcloud_fake.rs
# runs ibmcloud_sdk.py, providers/tests/azure_fake.rs azure_sdk.py; msal is
# pinned with azure-identity: the Azure server answers its discovery).
# Pinned: the versions the tests were written against.
python3 -m pip install --quiet 'moto[server]==5.2.1' \
    'ibm-vpc==0.36.0' 'ibm-platform-services==0.77.1' 'ibm-cloud-sdk-core==3.28.0' \
    'azure-identity==1.27.0' 'msal==1.39.0' 'azure-mgmt-compute==39.0.0' \
    'azure-mgmt-network==33.1.0' 'azure-core==1.41.0'

# Helm 4, kubectl and kubernetes-validate for the chart's tests
# (tests/helm.rs), cached outside the clone and reused.
eval "$(scripts/helm-tools.sh)"
export HELM KUBECTL KUBERNETES_VALIDATE
# kube-apiserver, kube-scheduler and kube-controller-manager (built once,
# cached) and etcd for tests/helm_install.rs, tests/kube_harness.rs,
# tests/kube_node.rs and tests/kube_peerpods.rs.
eval "$(scripts/kube-apiserver.sh)"
export KUBE_APISERVER ETCD KUBE_SCHEDULER KUBE_CONTROLLER_MANAGER

# A clean CI build gains nothing from incremental compilation, whose caches
# cost gigabytes of a disk that the test binaries also need.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi

echo "== format (at ${SECONDS}s)"
cargo fmt --all -- --check

echo "== lint (at ${SECONDS}s)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "== image (at ${SECONDS}s)"
# The release binaries in the container image, as a user builds it; the
# image's tests (tests/image.rs) run what this wrote.
# (An assignment, so that a failed build stops the run: `eval "$(…)"` would
# not.)
image_vars="$(scripts/build-image.sh)"
eval "$image_vars"
export PODVISOR_IMAGE

echo "== tests (at ${SECONDS}s)"
# Every test's output is kept so the run can end by saying what was skipped
# (under CI=true a test whose real part cannot start fails instead).
log="$(mktemp)"
set +e
# --no-fail-fast: one failing test binary does not hide the others' results.
cargo test --workspace --all-features --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "== skipped (at ${SECONDS}s)"
grep -h "SKIPPED" "$log" || echo "nothing skipped"
rm -f "$log"
exit "$status"
