#!/usr/bin/env bash
# Builds a small x86_64 pod VM image for the libvirt provider: a Debian
# kernel and a busybox initramfs holding podvisor-userdata and
# podvisor-forwarder, on an isohybrid ISO 9660 image (isolinux) that SeaBIOS
# boots as a plain SATA disk, converted to qcow2 so that the provider's
# overlays can be backed by it. No loop mounts, no root needed (apt-get
# download works as any user).
#
#   podvm/libvirt/build-image.sh [-o OUT.qcow2] [-b BIN_DIR] [-c CACHE_DIR]
#
#   -o  the image to write             [podvm-base.qcow2]
#   -b  where podvisor-userdata and podvisor-forwarder are [target/debug]
#   -c  where the Debian packages are downloaded and unpacked, kept between
#       runs                            [${XDG_CACHE_HOME:-~/.cache}/podvisor-podvm]
#
# Needs: apt-get (Debian 12 sources), dpkg-deb, xorriso, qemu-img, ldd,
# gzip; strip (binutils) if present.
# isolinux, syslinux-common, busybox-static, linux-image-amd64 and iptables
# (with libxtables12, libnftnl11, libmnl0: the pod network's NOTRACK rules)
# are downloaded with `apt-get download` and unpacked, not installed.
#
# What the image does is the init written below: see podvm/libvirt/README.md.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="podvm-base.qcow2"
bin_dir="$repo/target/debug"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/podvisor-podvm"
while getopts "o:b:c:h" opt; do
    case "$opt" in
    o) out="$OPTARG" ;;
    b) bin_dir="$OPTARG" ;;
    c) cache="$OPTARG" ;;
    *) sed -n '2,19p' "$0"; exit 2 ;;
    esac
done

die() { echo "build-image: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb xorriso qemu-img ldd; do
    command -v "$tool" >/dev/null || die "needs $tool"
done
for b in podvisor-userdata podvisor-forwarder; do
    [ -x "$bin_dir/$b" ] || die "no $bin_dir/$b (cargo build -p podvisor-podvm, or -b DIR)"
done

# --- Debian packages, downloaded once into the cache --------------------------
mkdir -p "$cache/debs"
# linux-image-amd64 is a metapackage: the kernel is its one dependency.
kernel_pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)"
[ -n "$kernel_pkg" ] || die "apt-cache does not know linux-image-amd64 (apt-get update?)"
fetch() { # fetch PACKAGE: its .deb, unpacked into $cache/root/PACKAGE
    local pkg="$1"
    if [ ! -d "$cache/root/$pkg" ]; then
        (cd "$cache/debs" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
        local deb
        deb="$(ls -t "$cache/debs/${pkg}"_*.deb 2>/dev/null | head -n1)"
        [ -n "$deb" ] || die "apt-get download $pkg failed"
        mkdir -p "$cache/root/$pkg.tmp"
        dpkg-deb -x "$deb" "$cache/root/$pkg.tmp"
        mv "$cache/root/$pkg.tmp" "$cache/root/$pkg"
    fi
}
iptables_pkgs=(iptables libxtables12 libnftnl11 libmnl0)
for p in "$kernel_pkg" busybox-static isolinux syslinux-common "${iptables_pkgs[@]}"; do fetch "$p"; done
kroot="$cache/root/$kernel_pkg"
kver="$(ls "$kroot/lib/modules" | head -n1)"
busybox="$cache/root/busybox-static/bin/busybox"

# --- the initramfs ------------------------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
ird="$work/initramfs"
mkdir -p "$ird"/{bin,dev,proc,sys,run,tmp,etc,media/cidata,lib/modules}
cp "$busybox" "$ird/bin/busybox"
for applet in $("$busybox" --list); do
    [ -e "$ird/bin/$applet" ] || ln -s busybox "$ird/bin/$applet"
done

# The podvisor binaries and the shared libraries they load.
for b in podvisor-userdata podvisor-forwarder; do
    # Debug builds carry ~70 MB of debug info: strip it where strip exists.
    if command -v strip >/dev/null; then
        strip -o "$ird/bin/$b" "$bin_dir/$b"
    else
        cp "$bin_dir/$b" "$ird/bin/$b"
    fi
    for lib in $(ldd "$bin_dir/$b" | grep -o '/[^ ]*'); do
        mkdir -p "$ird$(dirname "$lib")"
        cp -L "$lib" "$ird$lib"
    done
done

# iptables' nf_tables backend, for the forwarder's pod network (its
# NOTRACK rules): the multi-call binary as iptables, its extensions (loaded
# by dlopen from the directory it was built with) and its libraries, at the
# paths the packages give them; the C library is the one copied above.
multiarch="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)"
mkdir -p "$ird/usr/sbin" "$ird/usr/lib/$multiarch/xtables" "$ird/lib/$multiarch"
cp "$cache/root/iptables/usr/sbin/xtables-nft-multi" "$ird/usr/sbin/"
for name in iptables iptables-save iptables-restore; do ln -s xtables-nft-multi "$ird/usr/sbin/$name"; done
cp "$cache/root/iptables/usr/lib/$multiarch/xtables/"*.so "$ird/usr/lib/$multiarch/xtables/"
for p in libxtables12 libnftnl11 libmnl0; do
    find "$cache/root/$p" -name '*.so.*' -exec cp -P {} "$ird/lib/$multiarch/" \;
done

# Kernel modules for the devices of the provider's x86_64 domain XML
# (providers/src/libvirt/xml.rs): SATA disks (AHCI) with the cidata ISO as a
# CD-ROM, a virtio NIC. Each with its dependencies, in load order.
# Debian's package ships no modules.dep (depmod writes it at install): read
# each module's dependencies from its .modinfo section instead.
mroot="$kroot/lib/modules/$kver"
declare -A module_path=() loaded=()
while IFS= read -r f; do
    n="$(basename "$f" .ko)"
    module_path[${n//-/_}]="$f"
done < <(cd "$mroot" && find kernel -name '*.ko')
[ "${#module_path[@]}" -gt 0 ] || die "$kernel_pkg has no uncompressed modules"
order=()
add_module() { # add_module NAME: it and what it needs, dependencies first
    local name="${1//-/_}" path d
    path="${module_path[$name]:-}"
    [ -n "$path" ] || die "$kernel_pkg has no module $name"
    [ -n "${loaded[$name]:-}" ] && return 0
    loaded[$name]=1
    for d in $(tr '\0' '\n' <"$mroot/$path" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
        add_module "$d"
    done
    order+=("$path")
}
for m in ahci sd_mod sr_mod isofs virtio_pci virtio_net; do add_module "$m"; done
# The pod network: the VXLAN tunnel to the worker, and the raw table's
# NOTRACK rules as iptables-nft writes them (nf_tables, the x_tables
# matches and target through nft_compat).
# libcrc32c (under nf_tables and nf_conntrack) asks the crypto API for
# "crc32c" when it loads, which a modprobe would load as its soft
# dependency; insmod does not, so its provider goes first.
for m in crc32c_generic vxlan nf_tables nft_compat xt_comment xt_tcpudp xt_CT; do add_module "$m"; done
for path in "${order[@]}"; do
    cp "$mroot/$path" "$ird/lib/modules/"
    basename "$path" >>"$ird/etc/modules"
done

# udhcpc's hook: configure the lease on the interface (busybox ip).
cat >"$ird/etc/udhcpc.script" <<'EOF'
#!/bin/sh
case "$1" in
deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    echo "podvm: $interface has $ip/${mask:-24}" >/dev/console ;;
esac
exit 0
EOF
chmod +x "$ird/etc/udhcpc.script"

cat >"$ird/init" <<'EOF'
#!/bin/sh
# The pod VM's init (podvm/libvirt/build-image.sh): modules, network,
# cidata user data, then the agent-protocol forwarder.
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=0755 run /run
mount -t tmpfs tmp /tmp
log() { echo "podvm: $*" >/dev/console; }
log "modules $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /etc/modules); do insmod "/lib/modules/$m" || log "insmod $m failed"; done
log "modules loaded $(cut -d' ' -f1 /proc/uptime)s"
ip link set lo up
nic=""
for _ in $(seq 100); do
    for n in /sys/class/net/*; do
        n="${n##*/}"
        [ "$n" = lo ] || { nic="$n"; break; }
    done
    [ -n "$nic" ] && break
    sleep 0.1
done
[ -n "$nic" ] || log "no network interface"
udhcpc -i "$nic" -s /etc/udhcpc.script -t 30 -T 1 -A 1 -n -q || log "no DHCP lease on $nic"
log "network $(cut -d' ' -f1 /proc/uptime)s"
# The cidata volume: an ISO 9660 whose primary volume descriptor (sector 16)
# has the volume id "cidata" (read directly: busybox's findfs prefers the
# Joliet label, which not every writer sets).
iso_label() { dd if="$1" bs=8 skip=4101 count=4 2>/dev/null | tr -d ' \000' | tr 'A-Z' 'a-z'; }
dev=""
for _ in $(seq 50); do
    for d in /dev/sr* /dev/sd* /dev/vd*; do
        [ -b "$d" ] && [ "$(iso_label "$d")" = cidata ] && { dev="$d"; break; }
    done
    [ -n "$dev" ] && break
    sleep 0.2
done
if [ -z "$dev" ] || ! mount -t iso9660 -o ro "$dev" /media/cidata; then
    log "no cidata volume among: $(ls /dev | grep -E '^(sr|sd|vd)' | tr '\n' ' '); powering off"
    poweroff -f
fi
log "user data $(cut -d' ' -f1 /proc/uptime)s"
# Without its user data the forwarder would serve without TLS: never.
if ! podvisor-userdata --source cidata --root / --timeout 20; then
    log "podvisor-userdata failed; powering off"
    poweroff -f
fi
log "forwarder $(cut -d' ' -f1 /proc/uptime)s"
podvisor-forwarder --config /run/peerpod/apf.json
log "podvisor-forwarder exited ($?); powering off"
poweroff -f
EOF
chmod +x "$ird/init"

# --- the bootable image -------------------------------------------------------
iso="$work/iso"
mkdir -p "$iso/isolinux" "$iso/boot"
cp "$kroot/boot/vmlinuz-$kver" "$iso/boot/vmlinuz"
(cd "$ird" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -6 >"$iso/boot/initrd.gz"
cp "$cache/root/isolinux/usr/lib/ISOLINUX/isolinux.bin" "$iso/isolinux/"
cp "$cache/root/syslinux-common/usr/lib/syslinux/modules/bios/ldlinux.c32" "$iso/isolinux/"
cat >"$iso/isolinux/isolinux.cfg" <<'EOF'
DEFAULT podvm
PROMPT 0
TIMEOUT 0
LABEL podvm
  KERNEL /boot/vmlinuz
  APPEND initrd=/boot/initrd.gz console=ttyS0 quiet panic=-1
EOF
xorriso -as mkisofs -quiet -o "$work/podvm.iso" -V PODVM \
    -isohybrid-mbr "$cache/root/isolinux/usr/lib/ISOLINUX/isohdpfx.bin" \
    -c isolinux/boot.cat -b isolinux/isolinux.bin \
    -no-emul-boot -boot-load-size 4 -boot-info-table "$iso"
qemu-img convert -f raw -O qcow2 "$work/podvm.iso" "$out"
echo "build-image: $out ($kernel_pkg, $(du -h "$out" | cut -f1))"
