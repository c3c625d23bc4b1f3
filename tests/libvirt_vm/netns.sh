#!/usr/bin/env bash
# Run by tests/libvirt_vm.rs under `unshare --net --mount --propagation
# private`: makes this private mount and network namespace fit for libvirtd
# and QEMU under TCG, starts virtlogd and libvirtd, prints "ready", then
# holds the namespaces until stdin closes. Everything libvirt writes lives
# under $1 (the test's tempdir); nothing is left on the host.
set -euo pipefail
t="$1"

# On exit, end everything still running in this network namespace (libvirtd,
# virtlogd, dnsmasq, QEMU), by pid: none of it may outlive the test.
end_all() {
    local me pid p
    me="$(readlink /proc/self/ns/net)"
    for signal in TERM KILL; do
        for p in /proc/[0-9]*; do
            pid="${p#/proc/}"
            [ "$pid" = "$$" ] && continue
            [ "$(readlink "$p/ns/net" 2>/dev/null)" = "$me" ] || continue
            kill "-$signal" "$pid" 2>/dev/null || true
        done
        if [ "$signal" = TERM ]; then sleep 1; fi
    done
}
trap end_all EXIT

ip link set lo up

# /dev without /dev/kvm: a masked device still costs libvirtd 30-50 s of
# probing per define; an absent one makes it pick TCG at once.
mount -t tmpfs -o mode=0755,nosuid dev /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/full c 1 7
mknod -m 666 /dev/random c 1 8
mknod -m 666 /dev/urandom c 1 9
mknod -m 666 /dev/tty c 5 0
mkdir -p /dev/net /dev/pts /dev/shm
mknod -m 600 /dev/net/tun c 10 200
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 shm /dev/shm

# libvirt's directories, from the tempdir. The mount points themselves may
# not exist on a fresh machine (the packages that create /var/lib/libvirt
# are not all installed): make them, empty, before binding onto them.
for d in etc run lib log cache; do mkdir -p "$t/libvirt/$d"; done
mkdir -p /etc/libvirt /var/lib/libvirt
mount --bind "$t/libvirt/etc" /etc/libvirt
mount --bind "$t/libvirt/run" /run/libvirt 2>/dev/null || { mkdir -p /run/libvirt; mount --bind "$t/libvirt/run" /run/libvirt; }
mount --bind "$t/libvirt/lib" /var/lib/libvirt
mkdir -p /var/log/libvirt /var/cache/libvirt
mount --bind "$t/libvirt/log" /var/log/libvirt
mount --bind "$t/libvirt/cache" /var/cache/libvirt
cat >/etc/libvirt/libvirtd.conf <<'CONF'
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF
cat >/etc/libvirt/virtlogd.conf <<'CONF'
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
CONF
cat >/etc/libvirt/qemu.conf <<'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
# No per-domain mount namespace: moving /dev/pts into it fails here.
namespaces = []
CONF

# libvirtd looks the libvirt-qemu user up even when qemu.conf says root.
if ! getent passwd libvirt-qemu >/dev/null; then
    cp /etc/passwd "$t/passwd"
    cp /etc/group "$t/group"
    echo "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin" >>"$t/passwd"
    getent group libvirt-qemu >/dev/null || echo "libvirt-qemu:x:64055:" >>"$t/group"
    getent group kvm >/dev/null || echo "kvm:x:64054:" >>"$t/group"
    mount --bind "$t/passwd" /etc/passwd
    mount --bind "$t/group" /etc/group
fi

virtlogd >"$t/libvirt/log/virtlogd.out" 2>&1 &
libvirtd >"$t/libvirt/log/libvirtd.out" 2>&1 &
for _ in $(seq 200); do
    [ -S /run/libvirt/libvirt-sock ] && virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.05
done
virsh -c qemu:///system version >/dev/null
echo "ready"
# Hold the namespaces until the test closes our stdin.
cat >/dev/null || true
