#!/usr/bin/env bash
# Installs (if absent) and starts (or restarts, if stuck) the real services
# vmhistory's tests use: zfs-fuse, libvirtd with the test driver and the
# QEMU driver (virtlogd, the Debian packages the real test guests are built
# from), FUSE, rclone (WebDAV) and OpenSSH. Idempotent; run as root on
# Debian 12.
# `make test` runs it before the tests, so a fresh machine needs nothing else.
set -euo pipefail

log() { printf 'setup-test-env: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (zfs-fuse pools, libvirtd and FUSE mounts need it)"

PACKAGES=(zfs-fuse libvirt-daemon libvirt-clients fuse3 rclone openssh-server openssh-client psmisc procps attr
	# Real guests (testenv/guest.go): QEMU for libvirt's qemu:///system,
	# cpio for their initramfs, e2fsprogs for their disks (mke2fs -d,
	# e2fsck, debugfs), and the shared libraries of the guest agent, which
	# is copied into the initramfs with the libraries ldd finds here.
	libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils cpio e2fsprogs
	libglib2.0-0 libnuma1 liburing2 libudev1)

# libvirtd refuses to start without the user and group its Debian
# packaging would create; libvirt-daemon alone does not create them.
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 ||
	useradd --system --gid kvm --groups libvirt-qemu --home-dir /var/lib/libvirt --no-create-home --shell /usr/sbin/nologin libvirt-qemu

missing=()
for p in "${PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
apt_updated=0
apt_update() {
	if [ "$apt_updated" -eq 0 ]; then
		apt-get update -q >/dev/null
		apt_updated=1
	fi
}
if [ "${#missing[@]}" -gt 0 ]; then
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt_update
	apt-get install -y -q "${missing[@]}" >/dev/null
fi

# --- the real test guests' packages -----------------------------------------
# testenv builds its guests (kernel, busybox initramfs, guest agent) from
# these .debs without installing them, and caches what it builds next to
# them. Downloaded once; a later run reuses them.
GUEST_CACHE=/var/cache/vmhistory-test/guest
mkdir -p "$GUEST_CACHE"
guest_debs_present() {
	compgen -G "$GUEST_CACHE/linux-image-6.*-amd64_*.deb" >/dev/null &&
		compgen -G "$GUEST_CACHE/busybox-static_*.deb" >/dev/null &&
		compgen -G "$GUEST_CACHE/qemu-guest-agent_*.deb" >/dev/null
}
if ! guest_debs_present; then
	apt_update
	kernel=$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-6/ {print $2; exit}')
	[ -n "$kernel" ] || die "cannot tell which kernel package linux-image-amd64 depends on"
	log "downloading the test guests' packages ($kernel, busybox-static, qemu-guest-agent) into $GUEST_CACHE"
	(cd "$GUEST_CACHE" && apt-get download -q -o APT::Sandbox::User=root "$kernel" busybox-static qemu-guest-agent >/dev/null) ||
		die "apt-get download of the test guests' packages failed"
	guest_debs_present || die "the test guests' packages are not in $GUEST_CACHE after apt-get download"
fi

# --- zfs-fuse -------------------------------------------------------------
zfs_answers() { timeout 20 zpool list -H -o name >/dev/null 2>&1; }

start_zfs_fuse() {
	rm -f /run/zfs-fuse.pid /var/run/zfs-fuse.pid
	zfs-fuse --pidfile /run/zfs-fuse.pid
	for _ in $(seq 1 50); do
		zfs_answers && return 0
		sleep 0.2
	done
	die "zfs-fuse did not answer within 10 s after start"
}

if pgrep -x zfs-fuse >/dev/null && zfs_answers; then
	log "zfs-fuse is running"
else
	if pgrep -x zfs-fuse >/dev/null; then
		# zfs-fuse may ignore SIGTERM while a pool is busy.
		log "zfs-fuse does not answer: killing and restarting it"
		pkill -KILL -x zfs-fuse || true
		sleep 1
	fi
	# Mounts of a dead daemon stay as dead FUSE mounts until lazily unmounted.
	awk '$3 == "fuse.zfs" {print $2}' /proc/mounts | sort -r | while read -r m; do
		umount -l "$(printf '%b' "$m")" 2>/dev/null || true
	done
	start_zfs_fuse
	log "zfs-fuse started"
fi
# Test pools whose backing file is gone come back FAULTED after a restart.
zpool list -H -o name,health 2>/dev/null | while read -r name health; do
	case "$name" in
	vmht-* | vmhdemo-*)
		if [ "$health" != ONLINE ]; then
			log "destroying leftover $health pool $name"
			zpool destroy -f "$name" || true
		fi
		;;
	esac
done

# --- libvirtd ---------------------------------------------------------------
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt
libvirt_answers() { timeout 20 virsh -q -c 'test+unix:///default' list --all >/dev/null 2>&1; }
if pgrep -x libvirtd >/dev/null && libvirt_answers; then
	log "libvirtd is running"
else
	if pgrep -x libvirtd >/dev/null; then
		log "libvirtd does not answer: restarting it"
		pkill -KILL -x libvirtd || true
		sleep 1
	fi
	rm -f /var/run/libvirtd.pid /run/libvirtd.pid
	libvirtd -d
	ok=0
	for _ in $(seq 1 50); do
		if libvirt_answers; then ok=1; break; fi
		sleep 0.2
	done
	[ "$ok" -eq 1 ] || die "libvirtd did not answer on its socket within 10 s"
	log "libvirtd started"
fi

# --- the QEMU driver -------------------------------------------------------------
# libvirtd's QEMU driver hands each guest's console log to virtlogd and
# refuses to start a domain without it.
if ! pgrep -x virtlogd >/dev/null; then
	virtlogd -d
	log "virtlogd started"
fi
for _ in $(seq 1 50); do
	[ -S /run/libvirt/virtlogd-sock ] && break
	sleep 0.2
done
[ -S /run/libvirt/virtlogd-sock ] || die "virtlogd's socket /run/libvirt/virtlogd-sock did not appear"
# QEMU runs as libvirt-qemu (group kvm); the device node may be root-only.
if [ -c /dev/kvm ]; then
	chgrp kvm /dev/kvm
	chmod 0660 /dev/kvm
fi
timeout 30 virsh -q -c qemu:///system list --all >/dev/null 2>&1 ||
	die "libvirtd does not open qemu:///system (is libvirt-daemon-driver-qemu installed?)"

# --- OpenSSH, FUSE ------------------------------------------------------------
# Tests start their own sshd on 127.0.0.1; it needs its privilege separation
# directory.
mkdir -p /run/sshd
chmod 0755 /run/sshd
[ -c /dev/fuse ] || die "/dev/fuse is missing: FUSE mounts cannot work on this machine"

log "ready"
