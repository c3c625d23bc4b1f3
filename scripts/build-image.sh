#!/usr/bin/env bash
# Builds podvisor's container image from the release binaries, with buildah
# and no base image: `Containerfile` (FROM scratch) over a staged root file
# system that holds
#
#   /usr/local/bin/podvisor            features local, aws and libvirt
#   /usr/local/bin/podvisor-forwarder  the local provider runs it
#   /usr/local/bin/podvisor-userdata   for pod VM images built from this one
#   the dynamic loader and every shared library they link, as ldd finds them
#   /etc/ssl/certs/ca-certificates.crt the AWS SDK's rustls reads the system roots
#   /tmp                               empty, mode 1777
#
# The image is named localhost/podvisor:<version> and written as an OCI
# archive, target/image/podvisor-<version>.oci.tar; the script's storage is
# a temporary directory, so it needs no containers configuration and leaves
# none behind. Its created time is the last commit's (buildah --timestamp):
# the same commit built the same way gives the same image.
#
# Prints PODVISOR_IMAGE=<absolute path of the archive> on stdout, so a caller
# can `eval` it (tests/image.rs runs it); progress goes to stderr. Needs
# buildah (Debian package) and the build dependencies of the workspace
# (libvirt-dev, pkg-config).
#
#   PODVISOR_IMAGE_DIR  where the archive goes (default target/image)
#
# To push it: skopeo copy oci-archive:target/image/podvisor-<version>.oci.tar \
#   docker://<registry>/podvisor:<version>   (docs/install.md)
set -euo pipefail
cd "$(dirname "$0")/.."

out_dir="${PODVISOR_IMAGE_DIR:-target/image}"

echo "build-image: building the release binaries" >&2
cargo build --release --locked -p podvisor --features libvirt --bin podvisor >&2
cargo build --release --locked -p podvisor-podvm --bins >&2
bins=(target/release/podvisor target/release/podvisor-forwarder target/release/podvisor-userdata)

# Version, licence and source from Cargo.toml, as cargo reads them.
read -r version licenses source < <(
    cargo metadata --no-deps --format-version 1 --locked |
        python3 -c 'import json, sys
p = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "podvisor")
print(p["version"], p["license"], p["repository"])'
)
revision=unknown
created=0
if git rev-parse --git-dir >/dev/null 2>&1; then
    revision="$(git rev-parse HEAD)"
    [ -z "$(git status --porcelain --untracked-files=no)" ] || revision="$revision-dirty"
    created="$(git log -1 --format=%ct)"
fi

stage="$(mktemp -d)"
trap 'buildah --root "$stage/storage" --runroot "$stage/run" --storage-driver vfs rm --all >/dev/null 2>&1 || true; rm -rf "$stage"' EXIT
rootfs="$stage/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs"
install -m 0755 "${bins[@]}" "$rootfs/usr/local/bin/"

# Every library a binary links, at the path the loader will look for it
# (ldd's "name => /path" and the loader's own "/path" lines), dereferenced.
for bin in "${bins[@]}"; do
    if ldd "$bin" | grep -q "not found"; then
        echo "build-image: $bin links a library this machine lacks:" >&2
        ldd "$bin" | grep "not found" >&2
        exit 1
    fi
    ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u | while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
mkdir -m 1777 "$rootfs/tmp"

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
    "${annotations[@]}" -t "$image" "$stage" >&2

mkdir -p "$out_dir"
archive="$(cd "$out_dir" && pwd)/podvisor-$version.oci.tar"
rm -f "$archive"
"${buildah_[@]}" push --quiet "$image" "oci-archive:$archive:$image" >&2
echo "build-image: wrote $archive ($(du -h "$archive" | cut -f1))" >&2
echo "PODVISOR_IMAGE=$archive"
