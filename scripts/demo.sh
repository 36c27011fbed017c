#!/usr/bin/env bash
# make demo: the nightly job on an embedded default, on this machine alone.
# Builds a sandbox — zfs-fuse pools on sparse files, three VMs whose disks
# live on the dataset, a local kopia repository — runs three nights of
# `vmhistory backup` with the disks changing in between, then shows the
# history. The VMs are real tiny QEMU guests (qemu:///system, TCG, 128 MiB,
# the test guests of testenv: they write records to their disks and print a
# heartbeat kept in RAM) where QEMU can start them; elsewhere VMs of
# libvirt's test driver, and the demo says so. Everything lives under $DEMO_DIR; `scripts/demo.sh
# --clean` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_DIR=${DEMO_DIR:-/var/tmp/vmhistory-demo}
SRC_POOL=vmhdemo-src
REPLICA_POOL=vmhdemo-replica
BIN=$PWD/bin/vmhistory
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
GUESTS=(web db mail)
GUEST_PREFIX=vmhdemo-
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Real guests of an earlier demo: their disks are on the pool.
remove_guests() {
	for vm in "${GUESTS[@]}"; do
		virsh -q -c qemu:///system destroy "$GUEST_PREFIX$vm" >/dev/null 2>&1 || true
		virsh -q -c qemu:///system undefine --managed-save "$GUEST_PREFIX$vm" >/dev/null 2>&1 || true
	done
}

clean() {
	remove_guests
	for pool in "$SRC_POOL" "$REPLICA_POOL"; do
		if zpool list -H -o name "$pool" >/dev/null 2>&1; then
			zpool destroy "$pool" 2>/dev/null || zpool destroy -f "$pool"
		fi
	done
	rm -rf "$DEMO_DIR"
}

if [ "${1:-}" = "--clean" ]; then
	clean
	echo "demo sandbox removed"
	exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "make demo must run as root (zfs-fuse pools, libvirt)" >&2; exit 1; }
scripts/setup-test-env.sh
make --no-print-directory build >/dev/null

say "A fresh sandbox in $DEMO_DIR"
clean
mkdir -p "$DEMO_DIR"/{pools,state,metrics}
truncate -s 1G "$DEMO_DIR/pools/src.img" "$DEMO_DIR/pools/replica.img"
zpool create -m "$DEMO_DIR/mnt/src" "$SRC_POOL" "$DEMO_DIR/pools/src.img"
zpool create -m "$DEMO_DIR/mnt/replica" "$REPLICA_POOL" "$DEMO_DIR/pools/replica.img"
zfs create "$SRC_POOL/libvirt"
MNT="$DEMO_DIR/mnt/src/libvirt"
mkdir -p "$MNT/images"

# VM disks: mixed data like a real image — random blocks, text, zeros.
make_disk() { # name size_mib
	local f="$MNT/images/$1.qcow2"
	truncate -s "${2}M" "$f"
	dd if=/dev/urandom of="$f" bs=1M count=$(($2 / 4)) conv=notrunc status=none
	# yes ends on SIGPIPE when head has enough: not a failure here.
	(set +o pipefail; yes "vmhistory demo disk $1 $(date)" | head -c $(($2 * 1024 * 1024 / 4)) |
		dd of="$f" bs=1M seek=$(($2 / 2)) conv=notrunc status=none)
}
change_disk() { # name: rewrite a few scattered ranges, as a night of a VM does
	local f="$MNT/images/$1.qcow2"
	for off in 3 11 29; do
		dd if=/dev/urandom of="$f" bs=64K count=4 seek=$((off * 16)) conv=notrunc status=none
	done
}

# Real guests where QEMU starts them: an ext4 disk each on the dataset,
# booted from the test guest's kernel and initramfs.
start_real_guests() {
	timeout 30 virsh -q -c qemu:///system list >/dev/null 2>&1 || { echo "qemu:///system does not answer"; return 1; }
	"$GO" build -o "$DEMO_DIR/buildguest" ./testenv/buildguest || return 1
	"$DEMO_DIR/buildguest" >/dev/null || return 1
	mkdir -p "$DEMO_DIR/console" "$DEMO_DIR/empty"
	: >"$DEMO_DIR/empty/records"
	for vm in "${GUESTS[@]}"; do
		mke2fs -q -F -t ext4 -d "$DEMO_DIR/empty" "$MNT/images/$vm.img" 32M >/dev/null || return 1
		"$DEMO_DIR/buildguest" xml "$GUEST_PREFIX$vm" "$MNT/images/$vm.img" "$DEMO_DIR/console/$vm.log" >"$DEMO_DIR/$vm.xml"
		virsh -q -c qemu:///system define "$DEMO_DIR/$vm.xml" >/dev/null || return 1
		virsh -q -c qemu:///system start "$GUEST_PREFIX$vm" >/dev/null || return 1
	done
	local start=$SECONDS
	for vm in "${GUESTS[@]}"; do
		# The console's lines end in CR LF.
		until grep -q 'vmht: heartbeat 3' "$DEMO_DIR/console/$vm.log" 2>/dev/null; do
			[ $((SECONDS - start)) -lt 300 ] || { echo "$GUEST_PREFIX$vm did not boot within 300 s"; return 1; }
			sleep 1
		done
	done
	echo "three guests booted in $((SECONDS - start)) s: ${GUESTS[*]/#/$GUEST_PREFIX}"
}

REAL=0
say "Three VMs with their disks on $SRC_POOL/libvirt"
if why=$(start_real_guests 2>&1); then
	REAL=1
	echo "$why"
	echo "(Each night's report warns that their managed-save images, in /var/lib/libvirt/qemu/save, are not on the dataset: true here, as on any host where that directory is not on a selected dataset.)"
	DISK=web.img
	LIBVIRT_URI=qemu:///system
else
	remove_guests
	echo "Real QEMU guests cannot start here ($(echo "$why" | tail -1)): using libvirt's test driver, whose VMs have no RAM or running disk."
	DISK=web.qcow2
	LIBVIRT_URI="test://$DEMO_DIR/node.xml"
	for vm in "${GUESTS[@]}"; do make_disk "$vm" 32; done

	# libvirt's test driver: VMs whose disks are the files above. Each
	# connection to this URI starts with these VMs running.
	cat >"$DEMO_DIR/node.xml" <<XML
<node>
$(for vm in "${GUESTS[@]}"; do cat <<DOM
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>$vm</name>
    <memory>262144</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type='file' device='disk'><source file='$MNT/images/$vm.qcow2'/><target dev='vda' bus='virtio'/></disk>
    </devices>
    <test:runstate>1</test:runstate>
  </domain>
DOM
done)
</node>
XML
fi

head -c 32 /dev/urandom | base64 >"$DEMO_DIR/kopia.password"
chmod 600 "$DEMO_DIR/kopia.password"

cat >"$DEMO_DIR/config.yaml" <<YAML
# The demo's configuration: the same file format as /etc/vmhistory/config.yaml.
datasets: [$SRC_POOL/libvirt]
keep_local: 2
quiesce: {mode: managedsave}
libvirt: {uri: "$LIBVIRT_URI"}
replica: {target: $REPLICA_POOL/libvirt}
kopia:
  config_file: $DEMO_DIR/kopia.config
  password_file: $DEMO_DIR/kopia.password
  compression: zstd-fastest
  splitter: FIXED-128K
metrics: {textfile: $DEMO_DIR/metrics/vmhistory.prom}
state_dir: $DEMO_DIR/state
mount: {path: $DEMO_DIR/timeline}
YAML

say "A local kopia repository"
"$BIN" --config "$DEMO_DIR/config.yaml" repo create filesystem --path "$DEMO_DIR/kopia-repo"

for night in 1 2 3; do
	say "Night $night"
	extra=()
	[ "$night" -eq 1 ] && extra=(--allow-full) # the first replication is a full send
	"$BIN" --config "$DEMO_DIR/config.yaml" backup "${extra[@]}"
	if [ "$REAL" -eq 1 ]; then
		sleep 5 # the guests write their records meanwhile
	else
		for vm in "${GUESTS[@]}"; do change_disk "$vm"; done
		sleep 1 # snapshot names have one-second resolution
	fi
done

if [ "$REAL" -eq 1 ]; then
	say "The guests lived through three managed saves"
	for vm in "${GUESTS[@]}"; do
		log="$DEMO_DIR/console/$vm.log"
		tr -d '\r' <"$log" >"$log.txt"
		log="$log.txt"
		echo "$GUEST_PREFIX$vm: booted $(grep -c 'vmht: mounted' "$log") time(s), now at $(grep 'vmht: heartbeat' "$log" | tail -1 | sed 's/.*vmht: //'), $(grep -c 'vmht: synced' "$log") records synced to its disk"
	done
fi

say "The history: one timeline of local ZFS, the replica and kopia"
"$BIN" --config "$DEMO_DIR/config.yaml" timeline
echo
echo "The first night's disk now lives only in kopia (keep_local 2, keep_replica 2). Restoring it:"
mkdir -p "$DEMO_DIR/restored"
"$BIN" --config "$DEMO_DIR/config.yaml" restore "latest~2:images/$DISK" "$DEMO_DIR/restored/"
echo "restored: $(du -h --apparent-size "$DEMO_DIR/restored/$DISK" | cut -f1) apparent, $(du -h "$DEMO_DIR/restored/$DISK" | cut -f1) on disk (holes kept)"
echo "and its definition: $("$BIN" --config "$DEMO_DIR/config.yaml" timeline ls "latest~2:.vmhistory/domains" | tr '\n' ' ')"

say "The timeline mounted at $DEMO_DIR/timeline"
mkdir -p "$DEMO_DIR/timeline"
"$BIN" --config "$DEMO_DIR/config.yaml" mount --force "$DEMO_DIR/timeline" 2>"$DEMO_DIR/mount.log" &
mount_pid=$!
for _ in $(seq 1 100); do
	[ -e "$DEMO_DIR/timeline/latest" ] && break
	sleep 0.2
done
ls -l "$DEMO_DIR/timeline/" | sed 's/^/  /'
oldest=$(ls "$DEMO_DIR/timeline/" | grep -v latest | head -1)
echo "sources of $oldest: $(getfattr --only-values -n user.vmhistory.sources "$DEMO_DIR/timeline/$oldest" 2>/dev/null || echo '(getfattr not installed)')"
cp "$DEMO_DIR/timeline/$oldest/images/$DISK" "$DEMO_DIR/restored/via-mount-$DISK"
if cmp -s "$DEMO_DIR/restored/$DISK" "$DEMO_DIR/restored/via-mount-$DISK"; then
	echo "cp of $oldest/images/$DISK through the mount: identical to the restored file"
else
	echo "cp through the mount DIFFERS from the restored file" >&2
fi
kill -TERM "$mount_pid"
wait "$mount_pid" || true
grep -q " $DEMO_DIR/timeline " /proc/mounts && echo "still mounted!" >&2 || echo "unmounted cleanly"

echo
echo "kopia:"
"$BIN" --config "$DEMO_DIR/config.yaml" repo status | sed 's/^/  /'
echo "metrics for node_exporter ($DEMO_DIR/metrics/vmhistory.prom):"
grep -E '^vmhistory_backup_(success|duration_seconds|vm_downtime)' "$DEMO_DIR/metrics/vmhistory.prom" | sed 's/^/  /'

if [ "$REAL" -eq 1 ]; then
	remove_guests # they would burn CPU; their disks stay in the sandbox
	echo "the demo's guests are stopped and undefined"
fi

say "Done"
echo "The sandbox is in $DEMO_DIR (config: $DEMO_DIR/config.yaml)."
echo "Try: $BIN --config $DEMO_DIR/config.yaml backup --dry-run"
echo "     $BIN --config $DEMO_DIR/config.yaml timeline ls latest:images"
echo "Remove it with: scripts/demo.sh --clean"
