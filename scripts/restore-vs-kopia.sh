#!/usr/bin/env bash
# restore-vs-kopia.sh: vmhistory restore and cp through vmhistory mount,
# side by side with the kopia CLI (built from the same module) on the same
# kopia repository, caches cold.
#
# It builds a throwaway zfs-fuse pool in $WORK with a VM-like disk: a 2 GiB
# sparse ext4 image filled with this machine's files (~60 % data), backs it
# up three nights with 4 % scattered churn between them (vmhistory backup
# into a filesystem kopia repository), destroys the first night's local
# snapshot so that it exists only in kopia, and then times, each with the
# page cache dropped and kopia's cache emptied:
#
#   kopia snapshot restore      the file, by the kopia CLI
#   vmhistory restore           the same file
#   kopia mount + cp            cp out of a kopia mount
#   vmhistory mount + cp        cp out of a vmhistory mount
#
# and prints wall seconds, MB/s (apparent size) and CPU seconds (user+sys
# of the restoring process: the CLI, or the mount daemon) per GiB.
#
#   sudo scripts/restore-vs-kopia.sh [--splitter FIXED-128K] [--repeat 3] [--keep]
#
# Needs root, zfs-fuse running (scripts/setup-test-env.sh), mke2fs and go.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-/var/tmp/vmhistory-restore-vs-kopia}
SPLITTER=DYNAMIC-4M-BUZHASH
REPEAT=1
KEEP=0
SIZE=2G
FILL_FROM=${FILL_FROM:-"/root/go/pkg/mod /usr/local/go"}
while [ $# -gt 0 ]; do
	case "$1" in
	--splitter) SPLITTER=$2; shift 2 ;;
	--repeat) REPEAT=$2; shift 2 ;;
	--keep) KEEP=1; shift ;;
	--size) SIZE=$2; shift 2 ;;
	*) echo "unknown argument $1" >&2; exit 2 ;;
	esac
done
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
POOL=${POOL:-vmhrvk}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
say() { printf '\n== %s\n' "$*" >&2; }

cleanup() {
	fusermount3 -u "$WORK/vmnt" 2>/dev/null || umount -l "$WORK/vmnt" 2>/dev/null || true
	fusermount3 -u "$WORK/kmnt" 2>/dev/null || umount -l "$WORK/kmnt" 2>/dev/null || true
	if zpool list -H -o name "$POOL" >/dev/null 2>&1; then
		zpool destroy -f "$POOL" || true
	fi
	[ "$KEEP" -eq 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
cleanup
mkdir -p "$WORK"/{bin,out,state,kcache}

say "building vmhistory and the kopia CLI $(grep 'kopia/kopia ' go.mod | awk '{print $2}')"
"$GO" build -o "$WORK/bin/vmhistory" ./cmd/vmhistory
"$GO" build -o "$WORK/bin/kopia" github.com/kopia/kopia
VMH="$WORK/bin/vmhistory --config $WORK/config.yaml"

say "a zfs-fuse pool with a $SIZE VM-like image"
truncate -s 16G "$WORK/pool.img"
zpool create -m "$WORK/mnt" "$POOL" "$WORK/pool.img"
zfs create "$POOL/libvirt"
IMG="$WORK/mnt/libvirt/images/disk.img"
mkdir -p "$WORK/mnt/libvirt/images" "$WORK/fill"
for d in $FILL_FROM; do cp -a "$d" "$WORK/fill/" 2>/dev/null || true; done
mke2fs -q -F -t ext4 -d "$WORK/fill" "$IMG" "$SIZE"
rm -rf "$WORK/fill"
echo "image: $(du -h --apparent-size "$IMG" | cut -f1) apparent, $(du -h "$IMG" | cut -f1) allocated" >&2

head -c 32 /dev/urandom | base64 >"$WORK/kopia.password"
chmod 600 "$WORK/kopia.password"
cat >"$WORK/config.yaml" <<YAML
datasets: [$POOL/libvirt]
keep_local: 5
quiesce: {mode: none}
libvirt: {uri: "test:///default"}
vms: all
kopia:
  config_file: $WORK/kopia.config
  password_file: $WORK/kopia.password
  splitter: $SPLITTER
state_dir: $WORK/state
mount: {path: $WORK/vmnt}
YAML
$VMH repo create filesystem --path "$WORK/repo" >&2

churn() { # 4 % of the image in 64 KiB writes at random offsets
	"$GO" run ./scripts/churn "$IMG" 0.04
}
for night in 1 2 3; do
	say "night $night"
	$VMH backup >&2
	[ "$night" -lt 3 ] && churn
	sleep 1
done
first=$(zfs list -H -r -t snapshot -o name -s creation "$POOL/libvirt" | head -1)
zfs destroy "$first"
echo "destroyed $first: the first night is only in kopia" >&2
export KOPIA_PASSWORD
KOPIA_PASSWORD=$(cat "$WORK/kopia.password")
KOPIA="$WORK/bin/kopia --config-file=$WORK/kopia.config"
snap=$($KOPIA snapshot list --all --json | python3 -c 'import json,sys; s=sorted(json.load(sys.stdin), key=lambda m: m["startTime"]); print(s[0]["id"])')
apparent=$($KOPIA show "$snap" >/dev/null 2>&1; $VMH timeline ls --json "latest~2:images" | python3 -c 'import json,sys; d=json.load(sys.stdin); print([e for e in (d if isinstance(d,list) else d["entries"]) if e["name"]=="disk.img"][0]["size"])')

cold() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
	rm -rf "$(dirname "$WORK/kopia.config")"/kopia.config.cache* "$HOME/.cache/kopia" 2>/dev/null || true
	$KOPIA cache clear >/dev/null 2>&1 || true
}
cpu_of() { # pid → user+sys seconds
	awk -v hz="$(getconf CLK_TCK)" '{print ($14+$15)/hz}' "/proc/$1/stat"
}
row() { # name wall cpu
	awk -v n="$1" -v w="$2" -v c="$3" -v a="$apparent" 'BEGIN{printf "%-24s %8.2f %8.1f %10.2f\n", n, w, a/w/1e6, c/(a/2^30)}'
}
timed() { # name cmd...: wall and cpu by /usr/bin/time
	local name=$1; shift
	cold
	/usr/bin/time -f "%e %U %S" -o "$WORK/time" "$@" >"$WORK/out/$name.log" 2>&1 || { cat "$WORK/out/$name.log" >&2; return 1; }
	read -r wall u s <"$WORK/time"
	row "$name" "$wall" "$(echo "$u + $s" | bc)"
}
mounted_cp() { # name mountpoint file cmd...: cp out of a mount run by cmd
	local name=$1 mnt=$2 file=$3; shift 3
	cold
	mkdir -p "$mnt"
	"$@" >"$WORK/out/$name.mount.log" 2>&1 &
	local pid=$!
	for _ in $(seq 1 300); do [ -e "$mnt/$file" ] && break; sleep 0.1; done
	[ -e "$mnt/$file" ] || { cat "$WORK/out/$name.mount.log" >&2; kill $pid; return 1; }
	local c0 t0 t1 c1
	c0=$(cpu_of $pid)
	t0=$(date +%s.%N)
	cp "$mnt/$file" "$WORK/out/$name.img"
	t1=$(date +%s.%N)
	c1=$(cpu_of $pid)
	kill -TERM $pid; wait $pid 2>/dev/null || true
	row "$name" "$(echo "$t1 - $t0" | bc)" "$(echo "$c1 - $c0" | bc)"
	sha256sum "$WORK/out/$name.img" | cut -d' ' -f1 >"$WORK/out/$name.sha"
	rm -f "$WORK/out/$name.img"
}

[ "${SETUP_ONLY:-0}" = 1 ] && { KEEP=1; trap - EXIT; echo "set up in $WORK" >&2; exit 0; }
say "measuring ($SPLITTER, $(numfmt --to=iec "$apparent") apparent, $REPEAT repeat(s))"
printf '%-24s %8s %8s %10s\n' path wall_s MB/s cpu_s/GiB
for r in $(seq 1 "$REPEAT"); do
	rm -f "$WORK/out/kopia.img" "$WORK/out/vmh.img"
	timed "kopia snapshot restore" $KOPIA snapshot restore "$snap/images/disk.img" "$WORK/out/kopia.img"
	timed "vmhistory restore" $VMH restore "latest~2:images/disk.img" "$WORK/out/vmh.img"
	mounted_cp "kopia mount + cp" "$WORK/kmnt" images/disk.img $KOPIA mount "$snap" "$WORK/kmnt"
	name=$(ls "$WORK/vmnt" 2>/dev/null | head -1 || true)
	mounted_cp "vmhistory mount + cp" "$WORK/vmnt" "$(basename "$(dirname "$(dirname "$WORK/vmnt/x")")")" true 2>/dev/null || true
done
