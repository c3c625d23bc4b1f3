#!/usr/bin/env bash
# Builds podvisor's container image from the release binaries, with buildah
# and no base image: `Containerfile` (FROM scratch) over a staged root file
# system that holds
#
#   /usr/local/bin/podvisor            features local, aws, azure, ibmcloud and libvirt
#   /usr/local/bin/podvisor-forwarder  the local provider runs it
#   /usr/local/bin/podvisor-userdata   for pod VM images built from this one
#   /usr/sbin/iptables, iptables-save, iptables-restore
#                                      iptables' nf_tables backend (xtables-nft-multi
#                                      and its extensions): the pod network's NOTRACK
#                                      rules, on the daemon's side and the local
#                                      provider's pod VMs'
#   the dynamic loader and every shared library they link, as ldd finds them
#   /etc/ssl/certs/ca-certificates.crt the clouds' HTTPS clients read the system roots
#   /tmp                               empty, mode 1777
#
# The image is named localhost/podvisor:<version> and written as an OCI
# archive, target/image/podvisor-<version>.oci.tar; the script's storage is
# a temporary directory, so it needs no containers configuration and leaves
# none behind. Its created time is the last commit's (buildah --timestamp),
# not the build's; the binaries and libraries are what this machine's
# toolchain and packages give.
#
# Prints PODVISOR_IMAGE=<absolute path of the archive> on stdout, so a caller
# can `eval` it (tests/image.rs runs it); progress goes to stderr. Needs
# buildah (Debian package), iptables (Debian package: the nf_tables
# backend, xtables-nft-multi) and the build dependencies of the workspace
# (libvirt-dev, pkg-config).
#
#   PODVISOR_IMAGE_DIR  where the archive goes (default target/image)
#
# To push it: skopeo copy oci-archive:target/image/podvisor-<version>.oci.tar \
#   docker://<registry>/podvisor:<version>   (docs/install.md)
set -euo pipefail
caller="$PWD"
cd "$(dirname "$0")/.."
# The image's directories and files readable by all, whatever the caller's umask.
umask 022

if ! command -v buildah >/dev/null; then
    echo "build-image: buildah is not installed (Debian: apt-get install buildah)" >&2
    exit 1
fi
# iptables with the nf_tables backend, as Debian, Ubuntu, RHEL 8+ and
# kube-proxy's own image use by default: the image's rules are nf_tables
# rules whichever backend the node's tools use (the kernel runs both).
xtables_multi="$(PATH="$PATH:/usr/sbin:/sbin" command -v xtables-nft-multi || true)"
xtables_dir=""
for candidate in /usr/lib/*/xtables /usr/lib64/xtables /usr/lib/xtables; do
    if [ -d "$candidate" ]; then xtables_dir="$candidate"; break; fi
done
if [ -z "$xtables_multi" ] || [ -z "$xtables_dir" ]; then
    echo "build-image: iptables' nf_tables backend is not installed (Debian: apt-get install iptables)" >&2
    exit 1
fi
out_dir="${PODVISOR_IMAGE_DIR:-target/image}"
case "$out_dir" in /*) ;; *) [ -n "${PODVISOR_IMAGE_DIR:-}" ] && out_dir="$caller/$out_dir" ;; esac

echo "build-image: building the release binaries" >&2
cargo build --release --locked -p podvisor --features libvirt --bin podvisor >&2
cargo build --release --locked -p podvisor-podvm --bins >&2

# Version, licence, source and the target directory, as cargo reads them
# (one a line: a licence may hold spaces).
metadata="$(cargo metadata --no-deps --format-version 1 --locked)"
fields="$(python3 -c 'import json, sys
m = json.load(sys.stdin)
p = next(p for p in m["packages"] if p["name"] == "podvisor")
for v in (p["version"], p["license"], p["repository"], m["target_directory"]):
    if not v:
        sys.exit("build-image: Cargo.toml lacks the version, license or repository of podvisor")
    print(v)' <<<"$metadata")"
{ read -r version; read -r licenses; read -r source; read -r target_dir; } <<<"$fields"
bins=("$target_dir/release/podvisor" "$target_dir/release/podvisor-forwarder" "$target_dir/release/podvisor-userdata")
revision=unknown
created=0
if git rev-parse --git-dir >/dev/null 2>&1; then
    revision="$(git rev-parse HEAD)"
    [ -z "$(git status --porcelain)" ] || revision="$revision-dirty"
    created="$(git log -1 --format=%ct)"
fi

stage="$(mktemp -d)"
trap 'buildah --root "$stage/storage" --runroot "$stage/run" --storage-driver vfs rm --all >/dev/null 2>&1 || true; rm -rf "$stage"' EXIT
context="$stage/context"
rootfs="$context/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs"
install -m 0755 "${bins[@]}" "$rootfs/usr/local/bin/"
# iptables: the multi-call binary under the three names the daemon and the
# forwarder run, and every extension it may load (by dlopen, from the
# directory it was built with: the host's path).
mkdir -p "$rootfs/usr/sbin" "$rootfs$xtables_dir"
install -m 0755 "$xtables_multi" "$rootfs/usr/sbin/xtables-nft-multi"
for name in iptables iptables-save iptables-restore; do
    ln -s xtables-nft-multi "$rootfs/usr/sbin/$name"
done
cp -L "$xtables_dir"/*.so "$rootfs$xtables_dir/"
# `-p udp` by name, as iptables-save prints it.
[ ! -f /etc/protocols ] || cp -L /etc/protocols "$rootfs/etc/"
linked=("${bins[@]}" "$xtables_multi" "$xtables_dir"/*.so)

# Every library a binary links, at the path the loader will look for it
# (ldd's "name => /path" and the loader's own "/path" lines), dereferenced.
for bin in "${linked[@]}"; do
    if ! links="$(ldd "$bin")"; then
        echo "build-image: ldd $bin failed (not a dynamic executable?)" >&2
        exit 1
    fi
    if [[ "$links" == *"not found"* ]]; then
        echo "build-image: $bin links a library this machine lacks:" >&2
        grep "not found" <<<"$links" >&2
        exit 1
    fi
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$links"
done | sort -u | while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
mkdir -m 1777 "$rootfs/tmp"
# Name lookups: /etc/hosts before DNS (glibc's default without this file is
# DNS first, so the node's /etc/hosts and hostAliases would be read only
# when no DNS server answers); users and groups from files, with root only
# (a PODVISOR_SOCKET_GROUP given by name must be in the image: give a number).
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
# root's home is /root, where the AWS SDK looks for .aws/ (--aws-profile).
printf 'root:x:0:0:root:/root:/sbin/nologin\n' >"$rootfs/etc/passwd"
mkdir -m 0700 "$rootfs/root"
printf 'root:x:0:\n' >"$rootfs/etc/group"
# libvirt's client looks for libvirtd's socket under /run/libvirt; a mount
# at /var/run/libvirt (the node's path) reaches it through this link.
mkdir -p "$rootfs/run" "$rootfs/var"
ln -s ../run "$rootfs/var/run"

image="localhost/podvisor:$version"
echo "build-image: building $image ($revision)" >&2
buildah_=(buildah --root "$stage/storage" --runroot "$stage/run" --storage-driver vfs)
annotations=()
for kv in "org.opencontainers.image.version=$version" \
    "org.opencontainers.image.revision=$revision" \
    "org.opencontainers.image.source=$source" \
    "org.opencontainers.image.licenses=$licenses"; do
    annotations+=(--annotation "$kv")
done
"${buildah_[@]}" build --quiet --timestamp "$created" --identity-label=false \
    -f Containerfile \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    --build-arg "SOURCE=$source" --build-arg "LICENSES=$licenses" \
    "${annotations[@]}" -t "$image" "$context" >&2

mkdir -p "$out_dir"
archive="$(cd "$out_dir" && pwd)/podvisor-$version.oci.tar"
rm -f "$archive"
"${buildah_[@]}" push --quiet "$image" "oci-archive:$archive:$image" >&2
echo "build-image: wrote $archive ($(du -h "$archive" | cut -f1))" >&2
printf 'PODVISOR_IMAGE=%q\n' "$archive"
