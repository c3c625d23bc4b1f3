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
)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
    fi
fi

# Python packages the tests need: moto's EC2 server, for the AWS provider's
# tests (providers/tests/aws_conformance.rs, tests/aws_e2e.rs). Pinned: the
# version the tests were written against.
python3 -m pip install --quiet 'moto[server]==5.2.1'

echo "== format"
cargo fmt --all -- --check

echo "== lint"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "== tests"
cargo test --workspace --all-features --locked
