#!/usr/bin/env bash
# restore-vs-kopia.sh: vmhistory restore and cp through vmhistory mount,
# side by side with the kopia CLI (built from the same module) on the same
# kopia repository, caches cold, on a local repository or through a model
# of a distant drive.
#
# It builds a throwaway zfs-fuse pool in $WORK with a VM-like disk: a
# sparse ext4 image (--size, 2 GiB) filled to ~60 % with this machine's
# files, backs it up three nights with 4 % scattered churn between them
# (vmhistory backup into a kopia repository), destroys the first night's
# local snapshot so that it exists only in kopia, and then times, each with
# the page cache dropped and kopia's cache emptied:
#
#   kopia snapshot restore      the first night's file, by the kopia CLI
#   vmhistory restore --no-sync the same file, returning as kopia does
#                               while the kernel still writes it back
#     ... --no-sha256           and without the result's SHA-256, which
#                               neither kopia nor cp computes
#   kopia mount + cp            cp out of a kopia mount of that snapshot
#   vmhistory mount + cp        cp out of a vmhistory mount: the oldest
#                               snapshot directory (not "latest")
#
# and, with the file on disk when the command returns:
#
#   kopia restore --flush-files kopia's restore, its file fsync'd
#   vmhistory restore           the default: written with O_DIRECT, fsync'd
#   vmhistory mount + cp + sync cp, then sync(1) of the copy (in the time)
#
# The repository, by --preset:
#   none         a filesystem repository in $WORK/repo;
#   drive, seed  a WebDAV repository ("rclone serve webdav" on 127.0.0.1
#                over $WORK/dav). The three nights are uploaded to rclone
#                directly; for the measured reads both the kopia CLI and
#                vmhistory connect through "vmhistory bench drive-proxy",
#                the drive model as an HTTP proxy (drive: 150 ms per
#                request, 20 MiB/s per stream, 400 MiB/s total, 1 % 429/503;
#                seed: 1.2 s per request, 6 MiB/s per stream), one fresh
#                proxy per row so its counters are the row's.
#
# Per row: wall seconds (of the command; of the cp alone for the mounts, the
# mount's start and lookup excluded), MB/s (apparent size), CPU seconds per
# GiB of the restoring process (the CLI by rusage, or the mount daemon by
# /proc/PID/stat over the cp), CPU seconds of rclone and of the proxy over
# the whole row (/proc/PID/stat utime+stime before and after), the proxy's
# requests and MiB fetched, and whether the output's SHA-256 equals the
# kopia restore's (which is checked against the image as it was backed up).
#
#   sudo scripts/restore-vs-kopia.sh [--preset none|drive|seed] [--size 2G]
#        [--splitter FIXED-128K] [--repeat 3] [--keep] [--skip-kopia]
#
# --skip-kopia leaves the kopia CLI's rows out (with FIXED-128K through the
# drive model kopia's restore of 2 GiB takes ~40 minutes: one 128 KiB chunk
# per round trip); every output is then checked against the image itself.
#
# WORK (default /var/tmp/vmhistory-restore-vs-kopia) and POOL (vmhrvk) can
# be set to run beside another copy. Needs root, zfs-fuse running
# (scripts/setup-test-env.sh), mke2fs, rclone (for drive/seed), curl and go.
# It drops the page cache (for the whole machine) before every row.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-/var/tmp/vmhistory-restore-vs-kopia}
POOL=${POOL:-vmhrvk}
SPLITTER=DYNAMIC-4M-BUZHASH
PRESET=none
REPEAT=1
KEEP=0
SKIP_KOPIA=0
SIZE=2G
FILL_FROM=${FILL_FROM:-"/root/go/pkg/mod /usr/local/go"}
while [ $# -gt 0 ]; do
	case "$1" in
	--preset) PRESET=$2; shift 2 ;;
	--splitter) SPLITTER=$2; shift 2 ;;
	--repeat) REPEAT=$2; shift 2 ;;
	--keep) KEEP=1; shift ;;
	--skip-kopia) SKIP_KOPIA=1; shift ;;
	--size) SIZE=$2; shift 2 ;;
	*) echo "unknown argument $1" >&2; exit 2 ;;
	esac
done
case "$PRESET" in
none) REMOTE=0 ;;
drive | seed) REMOTE=1 ;;
*) echo "--preset $PRESET: choose none, drive or seed" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
say() { printf '\n== %s\n' "$*" >&2; }

RCLONE_PID=
PROXY_PID=
PROXY_PORT=0
stop_pid() { # pid: SIGTERM and wait
	[ -n "$1" ] || return 0
	kill -TERM "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}
cleanup() {
	stop_pid "$PROXY_PID"
	fusermount3 -u "$WORK/vmnt" 2>/dev/null || umount -l "$WORK/vmnt" 2>/dev/null || true
	fusermount3 -u "$WORK/kmnt" 2>/dev/null || umount -l "$WORK/kmnt" 2>/dev/null || true
	stop_pid "$RCLONE_PID"
	# zfs-fuse may call the pool busy for a moment after a mount's exit.
	for _ in $(seq 1 20); do
		zpool list -H -o name "$POOL" >/dev/null 2>&1 || break
		zpool destroy -f "$POOL" 2>/dev/null || sleep 1
	done
	if zpool list -H -o name "$POOL" >/dev/null 2>&1; then
		# its pool.img is in $WORK: removing it would leave the pool without its disk
		echo "could not destroy pool $POOL; $WORK kept: zpool destroy -f $POOL && rm -rf $WORK" >&2
		return
	fi
	[ "$KEEP" -eq 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
# What an earlier run left (kept or not) goes before this one starts.
keep=$KEEP KEEP=0
cleanup
KEEP=$keep
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
# This machine's files, up to 60 % of the image.
python3 - "$(numfmt --from=iec "$SIZE")" "$WORK/fill" $FILL_FROM <<'PY'
import os, shutil, sys
budget, dst, srcs = int(int(sys.argv[1]) * 0.6), sys.argv[2], sys.argv[3:]
used = 0
for src in srcs:
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            try:
                n = os.lstat(p).st_size
                if used + n > budget or not os.path.isfile(p) or os.path.islink(p):
                    continue
                q = os.path.join(dst, os.path.basename(src), os.path.relpath(p, src))
                os.makedirs(os.path.dirname(q), exist_ok=True)
                shutil.copy2(p, q)
                used += n
            except OSError:
                pass
print(f"fill: {used / 2**20:.0f} MiB of files", file=sys.stderr)
PY
mke2fs -q -F -t ext4 -d "$WORK/fill" "$IMG" "$SIZE" >&2
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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
if [ "$REMOTE" -eq 1 ]; then
	say "rclone serve webdav on 127.0.0.1"
	mkdir -p "$WORK/dav/kopia"
	: >"$WORK/rclone.conf" # rclone must not read root's own remotes
	DAV_USER=vmhistory
	head -c 24 /dev/urandom | base64 >"$WORK/dav.password"
	chmod 600 "$WORK/dav.password"
	DAV_ADDR=127.0.0.1:$(free_port)
	DAV_URL=http://$DAV_ADDR/
	rclone serve webdav "$WORK/dav" --addr "$DAV_ADDR" --user "$DAV_USER" --pass "$(cat "$WORK/dav.password")" \
		--config "$WORK/rclone.conf" --log-file "$WORK/rclone.log" --log-level NOTICE &
	RCLONE_PID=$!
	for _ in $(seq 1 100); do
		[ "$(curl -s -o /dev/null -w '%{http_code}' -u "$DAV_USER:$(cat "$WORK/dav.password")" "$DAV_URL")" = 200 ] && break
		sleep 0.1
	done
	kill -0 "$RCLONE_PID" || { cat "$WORK/rclone.log" >&2; exit 1; }
	echo "rclone (pid $RCLONE_PID) serves $WORK/dav at $DAV_URL" >&2
	DAV_FLAGS="--username $DAV_USER --webdav-password-file $WORK/dav.password --cache-directory $WORK/kcache"
	# shellcheck disable=SC2086
	$VMH repo create webdav --url "${DAV_URL}kopia/" $DAV_FLAGS >&2
else
	$VMH repo create filesystem --path "$WORK/repo" --cache-directory "$WORK/kcache" >&2
fi

churn() { # 4 % of the image in 64 KiB writes at random offsets
	"$GO" run ./scripts/churn "$IMG" 0.04
}
for night in 1 2 3; do
	say "night $night"
	$VMH backup >&2
	# The image as the first night's snapshot holds it: what every output must be.
	[ "$night" -eq 1 ] && SOURCE_SHA=$(sha256sum "$IMG" | cut -d' ' -f1)
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
apparent=$($VMH timeline ls --json "latest~2:images" | python3 -c 'import json,sys; d=json.load(sys.stdin); print([e for e in (d if isinstance(d,list) else d["entries"]) if e["name"]=="disk.img"][0]["size"])')

proxy_start() { # preset log: a drive-proxy in front of rclone on PROXY_PORT (0 = a free port, then kept)
	local preset=$1 log=$2
	"$WORK/bin/vmhistory" bench drive-proxy --upstream "$DAV_URL" --listen "127.0.0.1:$PROXY_PORT" \
		--preset "$preset" --seed 1 >"$log" 2>"$log.err" &
	PROXY_PID=$!
	local url=
	for _ in $(seq 1 100); do
		url=$(head -1 "$log" 2>/dev/null || true)
		case "$url" in http://*/) break ;; esac
		kill -0 "$PROXY_PID" 2>/dev/null || break
		sleep 0.05
	done
	case "$url" in http://*/) ;; *) cat "$log.err" >&2; return 1 ;; esac
	PROXY_PORT=${url##*:}
	PROXY_PORT=${PROXY_PORT%/}
}
proxy_stop() { stop_pid "$PROXY_PID"; PROXY_PID=; }

if [ "$REMOTE" -eq 1 ]; then
	# From now on both clients reach the repository through the proxy.
	proxy_start none "$WORK/out/connect.proxy"
	# shellcheck disable=SC2086
	$VMH repo connect webdav --url "http://127.0.0.1:$PROXY_PORT/kopia/" $DAV_FLAGS --overwrite >&2
	proxy_stop
	echo "kopia.config now reaches the repository through the drive model at http://127.0.0.1:$PROXY_PORT/" >&2
fi

cold() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
	find "$WORK/kcache" -mindepth 1 -delete
}
cpu_of() { # pid → user+sys seconds, 0 without a process
	if [ -n "$1" ] && [ -r "/proc/$1/stat" ]; then
		# the command name (field 2) may hold spaces: count from its ")"
		sed 's/^.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{print ($12+$13)/hz}'
	else
		echo 0
	fi
}

# A row: row_begin NAME; (the measured step); row_end NAME WALL CPU OUTPUT.
# WARM=1 keeps kopia's cache (the page cache is dropped all the same).
row_begin() {
	if [ "${WARM:-0}" = 1 ]; then
		sync
		echo 3 >/proc/sys/vm/drop_caches
	else
		cold
	fi
	if [ "$REMOTE" -eq 1 ]; then
		proxy_start "$PRESET" "$WORK/out/$1.proxy"
	fi
	R0=$(cpu_of "$RCLONE_PID")
	P0=$(cpu_of "$PROXY_PID")
}
declare -A SHA
FAILED=0
row_end() { # name wall cpu output-file
	local name=$1 wall=$2 cpu=$3 out=$4 rc pc req got sha verdict
	rc=$(echo "$(cpu_of "$RCLONE_PID") - $R0" | bc)
	pc=$(echo "$(cpu_of "$PROXY_PID") - $P0" | bc)
	req=- got=-
	if [ "$REMOTE" -eq 1 ]; then
		proxy_stop
		req=$(awk '$1 == "requests" {print $2}' "$WORK/out/$name.proxy")
		got=$(awk '/^bytes fetched/ {gsub(/[()]/, "", $NF); printf "%.0f", $NF / 2^20}' "$WORK/out/$name.proxy")
	else
		rc=- pc=-
	fi
	sha=$(sha256sum "$out" | cut -d' ' -f1)
	rm -f "$out"
	SHA[$name]=$sha
	if [ "$name" = "kopia snapshot restore" ] || [ "$SKIP_KOPIA" = 1 ]; then
		if [ "$sha" = "$SOURCE_SHA" ]; then verdict="=source"; else verdict="DIFFERS(source)"; FAILED=1; fi
	elif [ "$sha" = "${SHA[kopia snapshot restore]:-}" ]; then
		verdict="=kopia"
	else
		verdict="DIFFERS"
		FAILED=1
	fi
	awk -v n="$name" -v w="$wall" -v c="$cpu" -v a="$apparent" -v rc="$rc" -v pc="$pc" -v req="$req" -v got="$got" -v v="$verdict" \
		'function f(x) { return x == "-" ? x : sprintf("%.2f", x) }
		BEGIN{printf "%-28s %8.2f %8.1f %10.2f %9s %9s %8s %8s  %s\n", n, w, a/w/1e6, c/(a/2^30), f(rc), f(pc), req, got, v}'
}

timed() { # name output cmd...: wall and cpu by /usr/bin/time
	local name=$1 out=$2; shift 2
	row_begin "$name"
	/usr/bin/time -f "%e %U %S" -o "$WORK/time" "$@" >"$WORK/out/$name.log" 2>&1 || { cat "$WORK/out/$name.log" >&2; return 1; }
	read -r wall u s <"$WORK/time"
	row_end "$name" "$wall" "$(echo "$u + $s" | bc)" "$out"
}
kopia_file() { echo images/disk.img; }
vmh_file() { # the oldest snapshot's directory (readdir order is oldest first), not "latest"
	local d
	d=$(ls -1U "$WORK/vmnt" 2>/dev/null | grep -vx latest | head -1 || true)
	[ -n "$d" ] && echo "$d/images/disk.img"
}
mounted_cp() { # name mountpoint file-fn cmd...: cp out of the mount cmd runs in the foreground
	local name=$1 mnt=$2 filefn=$3; shift 3
	row_begin "$name"
	mkdir -p "$mnt"
	"$@" >"$WORK/out/$name.mount.log" 2>&1 &
	local pid=$! file=
	for _ in $(seq 1 1200); do
		if mountpoint -q "$mnt"; then
			file=$($filefn || true)
			[ -n "$file" ] && [ -e "$mnt/$file" ] && break
		fi
		kill -0 $pid 2>/dev/null || break
		sleep 0.1
	done
	[ -n "$file" ] && [ -e "$mnt/$file" ] || { cat "$WORK/out/$name.mount.log" >&2; stop_pid $pid; return 1; }
	local c0 t0 t1 c1
	c0=$(cpu_of $pid)
	t0=$(date +%s.%N)
	cp "$mnt/$file" "$WORK/out/$name.img"
	[ "${SYNC:-0}" = 1 ] && sync "$WORK/out/$name.img"
	t1=$(date +%s.%N)
	c1=$(cpu_of $pid)
	stop_pid $pid
	! mountpoint -q "$mnt" || { echo "$name: $mnt still mounted after SIGTERM" >&2; return 1; }
	echo "$name: copied $file" >>"$WORK/out/$name.mount.log"
	row_end "$name" "$(echo "$t1 - $t0" | bc)" "$(echo "$c1 - $c0" | bc)" "$WORK/out/$name.img"
}

warm_restore() { # the restore with kopia's cache as this host's nightly backups leave it
	# The backups read the previous snapshots' directories and list the
	# repository: a timeline ls of the file's directory leaves the same
	# (format blob, indexes, manifests, the snapshot's directories, the
	# saved index listing), through a fast proxy, not timed.
	cold
	[ "$REMOTE" -eq 1 ] && proxy_start none "$WORK/out/warmup.proxy"
	$VMH timeline ls "latest~2:images" >/dev/null 2>"$WORK/out/warmup.log" || { cat "$WORK/out/warmup.log" >&2; return 1; }
	[ "$REMOTE" -eq 1 ] && proxy_stop
	sleep 31 # past kopia's own list cache (30 s)
	WARM=1 timed "vmhistory restore, warm" "$WORK/out/vmh.img" $VMH restore "latest~2:images/disk.img" "$WORK/out/vmh.img"
	grep -E "first byte|kopia before" "$WORK/out/vmhistory restore, warm.log" >&2 || true
}

bench_readers() { # the bench's readers on the same file, repository and link: kopia-style must land near the CLI
	row_begin "bench kopia-style"
	# shellcheck disable=SC2086
	$VMH bench restore --spec "latest~2:images/disk.img" --window 32 --write --work-dir "$WORK" --json >"$WORK/out/bench.json" 2>"$WORK/out/bench.log" || { cat "$WORK/out/bench.log" >&2; return 1; }
	[ "$REMOTE" -eq 1 ] && proxy_stop
	python3 - "$WORK/out/bench.json" "$apparent" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); size = int(sys.argv[2])
for r in d["rows"]:
    mbps = float(r["mb_per_s"])
    print(f'{"bench " + r["reader"]:<28} {size / mbps / 1e6:8.2f} {mbps:8.1f} {float(r["cpu_s_per_gib"]):10.2f} {"-":>9} {"-":>9} {r["blob_requests"]:>8} {float(r["fetched_mib"]):8.0f}  first byte {float(r["first_byte_s"]):.2f} s (written as kopia restore writes)')
PY
}

[ "${SETUP_ONLY:-0}" = 1 ] && { KEEP=1; trap - EXIT; echo "set up in $WORK" >&2; exit 0; }
say "measuring ($SPLITTER, $(numfmt --to=iec "$apparent") apparent, preset $PRESET, $REPEAT repeat(s))"
printf '%-28s %8s %8s %10s %9s %9s %8s %8s  %s\n' path wall_s MB/s cpu_s/GiB rclone_s proxy_s requests MiB_got sha256
for r in $(seq 1 "$REPEAT"); do
	[ "$SKIP_KOPIA" = 1 ] || timed "kopia snapshot restore" "$WORK/out/kopia.img" $KOPIA snapshot restore "$snap/images/disk.img" "$WORK/out/kopia.img"
	timed "vmhistory restore --no-sync" "$WORK/out/vmh.img" $VMH restore --no-sync "latest~2:images/disk.img" "$WORK/out/vmh.img"
	timed "  ... --no-sha256" "$WORK/out/vmh.img" $VMH restore --no-sync --no-sha256 "latest~2:images/disk.img" "$WORK/out/vmh.img"
	[ "$SKIP_KOPIA" = 1 ] || mounted_cp "kopia mount + cp" "$WORK/kmnt" kopia_file $KOPIA mount "$snap" "$WORK/kmnt"
	mounted_cp "vmhistory mount + cp" "$WORK/vmnt" vmh_file $VMH mount "$WORK/vmnt"
	[ "$SKIP_KOPIA" = 1 ] || timed "kopia restore --flush-files" "$WORK/out/kopia.img" $KOPIA snapshot restore --flush-files "$snap/images/disk.img" "$WORK/out/kopia.img"
	timed "vmhistory restore" "$WORK/out/vmh.img" $VMH restore "latest~2:images/disk.img" "$WORK/out/vmh.img"
	grep -E "first byte|kopia before" "$WORK/out/vmhistory restore.log" >&2 || true
	SYNC=1 mounted_cp "vmhistory mount + cp + sync" "$WORK/vmnt" vmh_file $VMH mount "$WORK/vmnt"
	[ "$SKIP_KOPIA" = 1 ] || bench_readers
	warm_restore
done
[ "$FAILED" -eq 0 ] || { echo "some output differs from the kopia restore (or the kopia restore from the image backed up)" >&2; exit 1; }
