#!/usr/bin/env bash
# Builds real Kubernetes control-plane binaries for the tests that need
# them, once, into a cache directory outside the clone, keyed by the source
# version; a second run reuses them. kube-apiserver is for every test that
# talks to an API server (tests/helm_install.rs, tests/kube_harness.rs);
# kube-scheduler and kube-controller-manager are for the tests that need
# pods bound to a node and the garbage collector (tests/common/kube.rs
# starts them on demand). etcd comes from Debian's etcd-server package.
#
# No registry ships these binaries, so they are built from Debian's
# `kubernetes` source package (1.20.2) with the distribution's Go, in GOPATH
# mode as Debian's rules do, with two fixes:
#   - the vendored modern-go/reflect2 1.0.1 (and the json-iterator that uses
#     it) crashes the server under Go >= 1.18; both are replaced by Debian's
#     golang-github-modern-go-reflect2-dev and golang-github-json-iterator-go-dev
#   - the tarball lacks the generated OpenAPI definitions: `make gen_openapi`
#
# Only the binaries missing from the cache are built (a cache made before
# kube-scheduler and kube-controller-manager were added gets just those two,
# from a fresh extraction of the source); each is moved in by itself, so
# the ones already there are not touched.
#
# The machine's apt sources carry only binary entries; the matching deb-src
# entries go into a private apt state (derived from the machine's own
# sources), so the system's apt configuration is not touched.
#
# Prints the binaries' paths as shell assignments (KUBE_APISERVER=…,
# KUBE_SCHEDULER=…, KUBE_CONTROLLER_MANAGER=…, ETCD=…) on stdout, so a
# caller can `eval` them; progress goes to stderr.
#
#   PODVISOR_TOOLS_DIR  the cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/podvisor-tools)
set -euo pipefail

src_version=1.20.5+really1.20.2-1.1+deb12u1
k8s_version=v1.20.2

cache="${PODVISOR_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/podvisor-tools}"
# The directory's name predates the other two binaries; kept, so existing
# caches are reused.
dir="$cache/kube-apiserver-$src_version"
binaries=(kube-apiserver kube-scheduler kube-controller-manager)

sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "kube-apiserver: apt-get install ${missing[*]}" >&2
        "${sudo[@]}" apt-get update -qq >&2
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

apt_install etcd-server

missing=()
for binary in "${binaries[@]}"; do
    [ -x "$dir/$binary" ] || missing+=("$binary")
done

if ((${#missing[@]})); then
    apt_install golang-go rsync make dpkg-dev
    echo "kube-apiserver: building ${missing[*]} of kubernetes $src_version into $dir (several minutes)" >&2
    mkdir -p "$cache"
    work="$(mktemp -d "$cache/.kube-apiserver-build.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    chmod 755 "$work" # apt-get download runs as _apt

    # A private apt state with the deb-src twin of the machine's Debian
    # archive entry.
    uri="$(
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
            awk '/^URIs:/ { print $2 }' | grep -m1 '/debian/\?$' || true
    )"
    if [ -z "$uri" ]; then
        uri="$(
            cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { print $2; exit }' || true
        )"
    fi
    [ -n "$uri" ] || { echo "kube-apiserver: no Debian archive in the apt sources" >&2; exit 1; }
    mkdir -p "$work/apt/lists/partial" "$work/apt/sources"
    cat >"$work/apt/sources/debian-src.sources" <<EOF
Types: deb-src
URIs: $uri
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt_opts=(
        -o Dir::Etc::SourceList=/dev/null
        -o "Dir::Etc::SourceParts=$work/apt/sources"
        -o "Dir::State::Lists=$work/apt/lists"
    )
    apt-get "${apt_opts[@]}" update -qq >&2
    (cd "$work" && apt-get "${apt_opts[@]}" source -qq --download-only "kubernetes=$src_version" >&2)
    (cd "$work" && dpkg-source --no-check -x ./kubernetes_*.dsc src >&2)

    # Fix 1: reflect2 and json-iterator from Debian's -dev packages.
    (cd "$work" && apt-get download -qq golang-github-modern-go-reflect2-dev \
        golang-github-json-iterator-go-dev >&2)
    for deb in "$work"/golang-github-*.deb; do dpkg -x "$deb" "$work/gocode"; done
    gocode="$work/gocode/usr/share/gocode/src/github.com"
    for pkg in modern-go/reflect2 json-iterator/go; do
        rm -rf "$work/src/vendor/github.com/$pkg"
        cp -r "$gocode/$pkg" "$work/src/vendor/github.com/$pkg"
    done

    # GOPATH mode, as Debian builds it.
    mkdir -p "$work/src/.go/src/k8s.io"
    ln -s "$work/src" "$work/src/.go/src/k8s.io/kubernetes"
    cd "$work/src/.go/src/k8s.io/kubernetes"
    export GOPATH="$work/src/.go" GO111MODULE=off CGO_ENABLED=0 GOFLAGS=
    export GOCACHE="$work/gocache"

    # Fix 2: the generated OpenAPI definitions.
    make gen_openapi >&2

    # The version stamp, where hack/lib/version.sh puts it: component-base
    # (--version) and client-go (the /version endpoint, which Helm checks
    # against a chart's kubeVersion). The vendor-prefixed paths: GOPATH mode.
    ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        v="k8s.io/kubernetes/vendor/$pkg"
        ldflags+=" -X $v.gitVersion=$k8s_version -X $v.gitMajor=1 -X $v.gitMinor=20"
    done
    for binary in "${missing[@]}"; do
        go build -o "$work/out/$binary" -ldflags "$ldflags" "./cmd/$binary" >&2
        "$work/out/$binary" --version >&2
    done
    cd /
    mkdir -p "$dir"
    for binary in "${missing[@]}"; do
        mv -f "$work/out/$binary" "$dir/$binary"
    done
fi

echo "KUBE_APISERVER=$dir/kube-apiserver"
echo "KUBE_SCHEDULER=$dir/kube-scheduler"
echo "KUBE_CONTROLLER_MANAGER=$dir/kube-controller-manager"
echo "ETCD=$(command -v etcd || echo /usr/bin/etcd)"
