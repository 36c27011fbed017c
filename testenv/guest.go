package testenv

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
)

// QEMUURI is libvirt's QEMU driver, where real test guests run.
const QEMUURI = "qemu:///system"

// GuestCache holds the Debian packages real test guests are built from
// (downloaded by scripts/setup-test-env.sh) and the kernel and initramfs
// built from them, one directory per build.
const GuestCache = "/var/cache/vmhistory-test/guest"

// guestRunDir holds each guest's serial console log. QEMU runs as
// libvirt-qemu, so it must be reachable for others (t.TempDir is not).
const guestRunDir = PoolDir + "/guests"

// guestModules are the kernel modules the guest's /init loads, in this
// order: the Debian kernel has virtio, ext4 and the virtio console (for the
// guest agent's port) as modules.
var guestModules = []string{"virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
	"virtio_pci", "virtio_blk", "crc16", "crc32c_generic", "mbcache", "jbd2", "ext4", "virtio_console"}

// GuestRecordFile is the file on the guest's disk its workload appends to.
const GuestRecordFile = "/records"

// HeartbeatPeriod is how long the guest sleeps between heartbeats.
const HeartbeatPeriod = 500 * time.Millisecond

// guestInit is the guest's /init (busybox sh, PID 1). It mounts /dev/vda,
// starts the guest agent on its virtio port, appends a record to
// GuestRecordFile every second with an fsync after each ("seq=N up=UPTIME
// sum=S", see recordSum; "vmht: synced seq=N" printed once fsynced) and
// prints "vmht: heartbeat N" every HeartbeatPeriod, N held only in the
// shell's memory. Three guests share two cores with the tests under TCG,
// where every fork is dear: the loops use shell builtins but for sync and
// sleep.
const guestInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in ` + "@MODULES@" + `; do
	insmod /lib/modules/$m.ko || echo "vmht: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /mnt
if ! mount -t ext4 /dev/vda /mnt; then
	echo "vmht: cannot mount /dev/vda"
	poweroff -f
fi
echo "vmht: mounted /dev/vda"
port=
for p in /sys/class/virtio-ports/*; do
	[ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=${p##*/}
done
if [ -n "$port" ]; then
	[ -c /dev/$port ] || mknod /dev/$port c $(tr : ' ' < /sys/class/virtio-ports/$port/dev)
	mkdir -p /var/run
	/usr/sbin/qemu-ga -m virtio-serial -p /dev/$port -l /dev/null &
	echo "vmht: agent on /dev/$port"
else
	echo "vmht: no agent port"
fi
n=$(wc -l < /mnt` + GuestRecordFile + ` 2>/dev/null || echo 0)
(
	while :; do
		n=$((n+1))
		read up idle < /proc/uptime
		sum=$(( (n * 1000003 + (${up%.*} * 100 + 1${up#*.} - 100) * 7919 + 12345) % 4294967291 ))
		echo "seq=$n up=$up sum=$sum" >> /mnt` + GuestRecordFile + `
		sync /mnt` + GuestRecordFile + `
		echo "vmht: synced seq=$n"
		sleep 1
	done
) &
hb=0
while :; do
	hb=$((hb+1))
	echo "vmht: heartbeat $hb"
	sleep 0.5
done
`

// GuestBoot is a built guest: a kernel and an initramfs for direct boot.
type GuestBoot struct {
	Kernel, Initrd string
}

var (
	guestBootOnce sync.Once
	guestBoot     GuestBoot
	guestBootErr  error
)

// BuildGuest returns the guest's kernel and initramfs, built from the
// Debian packages in GuestCache the first time and reused afterwards (by
// this process and later ones).
func BuildGuest(t testing.TB) GuestBoot {
	t.Helper()
	boot, err := BuildGuestImage()
	if err != nil {
		t.Fatalf("build the test guest: %v", err)
	}
	return boot
}

// BuildGuestImage is BuildGuest for programs (make demo).
func BuildGuestImage() (GuestBoot, error) {
	guestBootOnce.Do(func() { guestBoot, guestBootErr = buildGuest() })
	return guestBoot, guestBootErr
}

func newestDeb(pattern string) (string, error) {
	debs, _ := filepath.Glob(filepath.Join(GuestCache, pattern))
	if len(debs) == 0 {
		return "", fmt.Errorf("no %s in %s: %s", pattern, GuestCache, setupHint)
	}
	sort.Strings(debs)
	return debs[len(debs)-1], nil
}

func buildGuest() (GuestBoot, error) {
	var debs []string
	for _, p := range []string{"linux-image-6.*-amd64_*.deb", "busybox-static_*.deb", "qemu-guest-agent_*.deb"} {
		d, err := newestDeb(p)
		if err != nil {
			return GuestBoot{}, err
		}
		debs = append(debs, d)
	}
	init := strings.Replace(guestInit, "@MODULES@", strings.Join(guestModules, " "), 1)
	key := sha256.New()
	for _, d := range debs {
		fmt.Fprintln(key, filepath.Base(d))
	}
	io.WriteString(key, init)
	dir := filepath.Join(GuestCache, "build-"+hex.EncodeToString(key.Sum(nil))[:16])
	boot := GuestBoot{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img")}
	if _, err := os.Stat(boot.Initrd); err == nil {
		return boot, nil
	}

	work, err := os.MkdirTemp(GuestCache, ".build-")
	if err != nil {
		return GuestBoot{}, err
	}
	defer os.RemoveAll(work)
	x := filepath.Join(work, "x")
	for _, d := range debs {
		if out, err := command(5*time.Minute, "dpkg-deb", "-x", d, x); err != nil {
			return GuestBoot{}, fmt.Errorf("dpkg-deb -x %s: %v: %s", d, err, out)
		}
	}
	kernels, _ := filepath.Glob(filepath.Join(x, "boot", "vmlinuz-*"))
	mods, _ := filepath.Glob(filepath.Join(x, "lib", "modules", "*"))
	if len(kernels) != 1 || len(mods) != 1 {
		return GuestBoot{}, fmt.Errorf("want one kernel and one module tree in %s, got %v and %v", debs[0], kernels, mods)
	}

	root := filepath.Join(work, "root")
	for _, d := range []string{"bin", "lib/modules", "proc", "sys", "dev", "mnt", "usr/sbin"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return GuestBoot{}, err
		}
	}
	copyTo := func(src, dst string, mode os.FileMode) error {
		data, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		return os.WriteFile(dst, data, mode)
	}
	if err := copyTo(filepath.Join(x, "bin", "busybox"), filepath.Join(root, "bin", "busybox"), 0o755); err != nil {
		return GuestBoot{}, err
	}
	for _, m := range guestModules {
		found, _ := filepath.Glob(filepath.Join(mods[0], "kernel", "*", m+".ko"))
		found2, _ := filepath.Glob(filepath.Join(mods[0], "kernel", "*", "*", m+".ko"))
		found = append(found, found2...)
		if len(found) != 1 {
			return GuestBoot{}, fmt.Errorf("module %s: found %v in %s", m, found, mods[0])
		}
		if err := copyTo(found[0], filepath.Join(root, "lib", "modules", m+".ko"), 0o644); err != nil {
			return GuestBoot{}, err
		}
	}
	// The agent is dynamically linked: it takes this host's libraries
	// (the same Debian release), as ldd finds them.
	agent := filepath.Join(x, "usr", "sbin", "qemu-ga")
	if err := copyTo(agent, filepath.Join(root, "usr", "sbin", "qemu-ga"), 0o755); err != nil {
		return GuestBoot{}, err
	}
	libs, err := sharedLibraries(agent)
	if err != nil {
		return GuestBoot{}, err
	}
	for _, lib := range libs {
		if err := copyTo(lib, filepath.Join(root, lib), 0o755); err != nil {
			return GuestBoot{}, fmt.Errorf("guest agent library: %w", err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "init"), []byte(init), 0o755); err != nil {
		return GuestBoot{}, err
	}

	out := filepath.Join(work, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		return GuestBoot{}, err
	}
	if err := copyTo(kernels[0], filepath.Join(out, "vmlinuz"), 0o644); err != nil {
		return GuestBoot{}, err
	}
	sh := "find . -print0 | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 > " + shellQuote(filepath.Join(out, "initrd.img"))
	c := exec.Command("sh", "-c", sh)
	c.Dir = root
	if o, err := c.CombinedOutput(); err != nil {
		return GuestBoot{}, fmt.Errorf("initramfs: %v: %s", err, o)
	}
	if err := os.Chmod(out, 0o755); err != nil {
		return GuestBoot{}, err
	}
	// Another process may have built the same guest meanwhile: either
	// copy is as good.
	if err := os.Rename(out, dir); err != nil {
		if _, serr := os.Stat(boot.Initrd); serr != nil {
			return GuestBoot{}, fmt.Errorf("install the built guest in %s: %w", dir, err)
		}
	}
	return boot, nil
}

// sharedLibraries lists the absolute paths of the libraries (and the
// dynamic loader) that ldd says bin needs.
func sharedLibraries(bin string) ([]string, error) {
	out, err := command(time.Minute, "ldd", bin)
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %v: %s", bin, err, out)
	}
	var libs []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		case strings.Contains(line, "not found"):
			return nil, fmt.Errorf("ldd %s: %s: %s", bin, strings.TrimSpace(line), setupHint)
		}
	}
	return libs, nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Guest is a real QEMU guest (TCG, 128 MiB) defined on qemu:///system.
type Guest struct {
	Name string
	// Disk is its ext4 raw image.
	Disk string
	// Console is its serial console, written by QEMU.
	Console *Console
	// Dom is its domain on the connection it was defined with.
	Dom libvirt.Domain
	l   *libvirt.Libvirt
}

// NewGuestDisk creates an ext4 raw image of sizeMiB at path (its directory
// too), holding an empty GuestRecordFile.
func NewGuestDisk(t testing.TB, path string, sizeMiB int) {
	t.Helper()
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, strings.TrimPrefix(GuestRecordFile, "/")), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := command(time.Minute, "mke2fs", "-q", "-F", "-t", "ext4", "-d", src, path, fmt.Sprintf("%dM", sizeMiB)); err != nil {
		t.Fatalf("mke2fs %s: %v: %s", path, err, out)
	}
}

// GuestXML is the persistent definition of a guest booting boot with disk
// as /dev/vda, its serial console appended to console, and a guest agent
// channel.
func GuestXML(name string, boot GuestBoot, disk, console string) string {
	return fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>console=ttyS0 edd=off panic=-1 quiet</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='%s'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='%s' append='on'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
`, esc(name), esc(boot.Kernel), esc(boot.Initrd), esc(disk), esc(console))
}

// NewGuest defines a guest named name on l, a qemu:///system connection,
// with its disk at disk (created with NewGuestDisk when missing), and
// starts it. It is destroyed and undefined (with its managed-save image)
// when the test ends.
//
// name must be GuestName(...): it carries the test process's pid, so that
// guests left by a killed test binary are destroyed by the next one.
func NewGuest(t testing.TB, l *libvirt.Libvirt, name, disk string) *Guest {
	t.Helper()
	if pid, ok := guestOwner(name); !ok || pid != os.Getpid() {
		t.Fatalf("guest name %q is not from GuestName", name)
	}
	sweepGuestsOnce.Do(func() { sweepStaleGuests(t, l) })
	boot := BuildGuest(t)
	if _, err := os.Stat(disk); err != nil {
		NewGuestDisk(t, disk, 32)
	}
	runDir := filepath.Join(guestRunDir, fmt.Sprintf("%s-%d", name, os.Getpid()))
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(guestRunDir, 0o755)
	consolePath := filepath.Join(runDir, "console.log")
	os.Remove(consolePath)
	g := &Guest{Name: name, Disk: disk, l: l}
	dom, err := l.DomainDefineXML(GuestXML(name, boot, disk, consolePath))
	if err != nil {
		t.Fatalf("define guest %s: %v", name, err)
	}
	g.Dom = dom
	t.Cleanup(func() {
		g.Destroy(t)
		if err := l.DomainUndefineFlags(dom, libvirt.DomainUndefineManagedSave|libvirt.DomainUndefineNvram); err != nil && !libvirt.IsNotFound(err) {
			t.Errorf("undefine guest %s: %v", name, err)
		}
		os.RemoveAll(runDir)
	})
	g.Console = TailConsole(t, consolePath)
	start := time.Now()
	if err := l.DomainCreate(dom); err != nil {
		t.Fatalf("start guest %s: %v", name, err)
	}
	g.Console.WaitFor(t, "vmht: heartbeat 1", 5*time.Minute)
	t.Logf("guest %s: booted to its first heartbeat in %v", name, time.Since(start).Round(10*time.Millisecond))
	return g
}

// GuestName is a guest name for NewGuest: vmht-<pid>-<what>.
func GuestName(what string) string { return fmt.Sprintf("%s%d-%s", poolPrefix, os.Getpid(), what) }

func guestOwner(name string) (int, bool) { return poolOwner(name) }

var sweepGuestsOnce sync.Once

// sweepStaleGuests destroys and undefines the guests of test binaries
// that no longer run (killed before their cleanup): a TCG guest left
// running takes CPU from every later test.
func sweepStaleGuests(t testing.TB, l *libvirt.Libvirt) {
	doms, _, err := l.ConnectListAllDomains(1, libvirt.ConnectListDomainsActive|libvirt.ConnectListDomainsInactive)
	if err != nil {
		return
	}
	for _, d := range doms {
		pid, ok := guestOwner(d.Name)
		if !ok || processExists(pid) {
			continue
		}
		t.Logf("removing stale test guest %s", d.Name)
		l.DomainDestroy(d)
		l.DomainUndefineFlags(d, libvirt.DomainUndefineManagedSave|libvirt.DomainUndefineNvram)
	}
}

// Destroy stops the guest's QEMU at once if it runs.
func (g *Guest) Destroy(t testing.TB) {
	t.Helper()
	state, _, err := g.l.DomainGetState(g.Dom, 0)
	if err != nil {
		if !libvirt.IsNotFound(err) {
			t.Errorf("guest %s: state: %v", g.Name, err)
		}
		return
	}
	if libvirt.DomainState(state) == libvirt.DomainShutoff {
		return
	}
	if err := g.l.DomainDestroy(g.Dom); err != nil && !libvirt.IsNotFound(err) {
		t.Errorf("destroy guest %s: %v", g.Name, err)
	}
}

// ConsoleLine is one line of a guest's serial console, stamped with the
// host's clock when the tail read it.
type ConsoleLine struct {
	At   time.Time
	Text string
}

// Console follows a serial console log file as QEMU appends to it.
type Console struct {
	path   string
	cancel context.CancelFunc
	done   chan struct{} // closed when the follower stopped

	mu      sync.Mutex
	lines   []ConsoleLine
	changed chan struct{} // closed and replaced at each new line
}

// TailConsole follows path (which may not exist yet) until the test ends,
// polling every 20 ms.
func TailConsole(t testing.TB, path string) *Console {
	c := FollowConsole(context.Background(), path)
	t.Cleanup(c.Close)
	return c
}

// FollowConsole follows path (which may not exist yet), polling every
// 20 ms, until ctx is done or Close: TailConsole for programs.
func FollowConsole(ctx context.Context, path string) *Console {
	ctx, cancel := context.WithCancel(ctx)
	c := &Console{path: path, cancel: cancel, done: make(chan struct{}), changed: make(chan struct{})}
	go func() {
		defer close(c.done)
		var f *os.File
		defer func() {
			if f != nil {
				f.Close()
			}
		}()
		var partial []byte
		buf := make([]byte, 64<<10)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			if f == nil {
				f, _ = os.Open(path)
			}
			if f != nil {
				for {
					n, _ := f.Read(buf)
					if n == 0 {
						break
					}
					now := time.Now()
					partial = append(partial, buf[:n]...)
					for {
						i := strings.IndexByte(string(partial), '\n')
						if i < 0 {
							break
						}
						c.add(ConsoleLine{At: now, Text: strings.TrimRight(string(partial[:i]), "\r")})
						partial = partial[i+1:]
					}
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return c
}

// Close stops following the file (the lines so far stay) and waits for
// the follower to end.
func (c *Console) Close() {
	c.cancel()
	<-c.done
}

func (c *Console) add(l ConsoleLine) {
	c.mu.Lock()
	c.lines = append(c.lines, l)
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

// Lines returns every line so far.
func (c *Console) Lines() []ConsoleLine {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]ConsoleLine(nil), c.lines...)
}

// Len is the number of lines so far, to wait for lines after it.
func (c *Console) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.lines)
}

// Text is the whole console so far, for failure messages (the last 4 KiB).
func (c *Console) Text() string {
	var b strings.Builder
	for _, l := range c.Lines() {
		b.WriteString(l.Text)
		b.WriteByte('\n')
	}
	s := b.String()
	if len(s) > 4096 {
		s = "..." + s[len(s)-4096:]
	}
	return s
}

// WaitFunc waits until a line at index from or later satisfies ok and
// returns it; it fails the test after timeout.
func (c *Console) WaitFunc(t testing.TB, from int, what string, timeout time.Duration, ok func(string) bool) ConsoleLine {
	t.Helper()
	l, err := c.Wait(context.Background(), from, what, timeout, ok)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Wait waits until a line at index from or later satisfies ok and returns
// it: WaitFunc for programs. After timeout its error names what and holds
// the console so far; when ctx is done first, it is ctx's cause.
func (c *Console) Wait(ctx context.Context, from int, what string, timeout time.Duration, ok func(string) bool) (ConsoleLine, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		for i := from; i < len(c.lines); i++ {
			if ok(c.lines[i].Text) {
				l := c.lines[i]
				c.mu.Unlock()
				return l, nil
			}
		}
		from = max(from, len(c.lines))
		changed := c.changed
		c.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return ConsoleLine{}, context.Cause(ctx)
		case <-deadline.C:
			return ConsoleLine{}, fmt.Errorf("console %s: no %s within %v; console so far:\n%s", c.path, what, timeout, c.Text())
		}
	}
}

// WaitFor waits for a line containing s.
func (c *Console) WaitFor(t testing.TB, s string, timeout time.Duration) ConsoleLine {
	t.Helper()
	return c.WaitFunc(t, 0, fmt.Sprintf("line with %q", s), timeout, func(l string) bool { return strings.Contains(l, s) })
}

// Heartbeat parses a heartbeat line.
func Heartbeat(line string) (int, bool) {
	_, rest, ok := strings.Cut(line, "vmht: heartbeat ")
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(strings.TrimSpace(rest))
	return n, err == nil
}

// Heartbeats are the heartbeat lines so far, in order.
func (c *Console) Heartbeats() []Beat {
	var out []Beat
	for _, l := range c.Lines() {
		if n, ok := Heartbeat(l.Text); ok {
			out = append(out, Beat{N: n, At: l.At})
		}
	}
	return out
}

// Beat is one heartbeat as the host saw it.
type Beat struct {
	N  int
	At time.Time
}

// HeartbeatsSince are the heartbeats on the lines from index from on,
// preceded by the last heartbeat before it: the gaps of what happened
// since from.
func (c *Console) HeartbeatsSince(from int) []Beat {
	var out []Beat
	for i, l := range c.Lines() {
		n, ok := Heartbeat(l.Text)
		switch {
		case !ok:
		case i < from:
			out = append(out[:0], Beat{N: n, At: l.At})
		default:
			out = append(out, Beat{N: n, At: l.At})
		}
	}
	return out
}

// Resumed checks that the guest's heartbeat went on across whatever
// happened since line from, once it runs again (call it then): it waits
// for a heartbeat after the call, and then the largest gap since from must
// be between consecutive heartbeats, with no boot. It returns the
// heartbeat before that gap (where the guest stopped) and the gap.
func (c *Console) Resumed(t testing.TB, from int) (stoppedAt int, gap time.Duration) {
	t.Helper()
	c.WaitFunc(t, c.Len(), "a heartbeat after the guest was brought back", time.Minute, func(s string) bool {
		_, ok := Heartbeat(s)
		return ok
	})
	beats := c.HeartbeatsSince(from)
	if len(beats) < 2 {
		t.Fatalf("console %s: no heartbeat before and after line %d:\n%s", c.path, from, c.Text())
	}
	gap, after := LargestGap(beats)
	var before Beat
	for i := 1; i < len(beats); i++ {
		if beats[i] == after {
			before = beats[i-1]
		}
	}
	if after.N != before.N+1 {
		t.Errorf("console %s: heartbeat %d came after %d: the guest did not resume where it stopped\n%s", c.path, after.N, before.N, c.Text())
	}
	for _, l := range c.Lines()[from:] {
		if strings.Contains(l.Text, "vmht: mounted") {
			t.Errorf("console %s: the guest booted again: %q", c.path, l.Text)
		}
	}
	return before.N, gap
}

// LastHeartbeat is the last heartbeat so far (zero when none).
func (c *Console) LastHeartbeat() Beat {
	b := c.Heartbeats()
	if len(b) == 0 {
		return Beat{}
	}
	return b[len(b)-1]
}

// WaitHeartbeat waits for a heartbeat of at least n.
func (c *Console) WaitHeartbeat(t testing.TB, n int, timeout time.Duration) Beat {
	t.Helper()
	l := c.WaitFunc(t, 0, fmt.Sprintf("heartbeat >= %d", n), timeout, func(s string) bool {
		v, ok := Heartbeat(s)
		return ok && v >= n
	})
	v, _ := Heartbeat(l.Text)
	return Beat{N: v, At: l.At}
}

// LargestGap is the largest time between two consecutive heartbeats, and
// the beat after it.
func LargestGap(beats []Beat) (time.Duration, Beat) {
	var gap time.Duration
	var after Beat
	for i := 1; i < len(beats); i++ {
		if d := beats[i].At.Sub(beats[i-1].At); d > gap {
			gap, after = d, beats[i]
		}
	}
	return gap, after
}

// Synced are the record numbers the guest reported fsynced, with the time
// the host saw each report.
func (c *Console) Synced() []Beat {
	var out []Beat
	for _, l := range c.Lines() {
		_, rest, ok := strings.Cut(l.Text, "vmht: synced seq=")
		if !ok {
			continue
		}
		if n, err := strconv.Atoi(strings.TrimSpace(rest)); err == nil {
			out = append(out, Beat{N: n, At: l.At})
		}
	}
	return out
}

// Records is the guest's record file read from an ext4 image.
type Records struct {
	// Valid are the sequence numbers of the complete records with a good
	// checksum, in file order.
	Valid []int
	// Bad are the lines that are not such a record (a torn last line).
	Bad []string
}

// ReadRecords reads GuestRecordFile out of an ext4 image with debugfs,
// without mounting it (and so without replaying its journal: run
// e2fsck on a copy first for that).
func ReadRecords(t testing.TB, image string) Records {
	t.Helper()
	c := exec.Command("debugfs", "-R", "cat "+GuestRecordFile, image)
	out, err := c.Output()
	if err != nil {
		t.Fatalf("debugfs cat %s in %s: %v", GuestRecordFile, image, err)
	}
	return ParseRecords(string(out))
}

// ParseRecords checks each line of a record file.
func ParseRecords(data string) Records {
	var r Records
	sc := bufio.NewScanner(strings.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		body, sum, ok := strings.Cut(line, " sum=")
		var seq int
		if ok {
			f := strings.Fields(body)
			ok = len(f) == 2 && strings.HasPrefix(f[0], "seq=") && strings.HasPrefix(f[1], "up=")
			if ok {
				var up int64
				seq, up, ok = parseRecord(f[0][len("seq="):], f[1][len("up="):])
				ok = ok && strconv.FormatInt(recordSum(int64(seq), up), 10) == sum
			}
		}
		if ok {
			r.Valid = append(r.Valid, seq)
		} else {
			r.Bad = append(r.Bad, line)
		}
	}
	if !strings.HasSuffix(data, "\n") && data != "" && len(r.Bad) == 0 {
		// A last line without its newline was not complete, checksum or not.
		last := r.Valid[len(r.Valid)-1]
		r.Valid = r.Valid[:len(r.Valid)-1]
		r.Bad = append(r.Bad, fmt.Sprintf("seq=%d without its newline", last))
	}
	return r
}

// recordSum is a record's checksum as the guest's shell computes it, from
// its sequence number and its uptime in hundredths of a second.
func recordSum(seq, up int64) int64 {
	return (seq*1000003 + up*7919 + 12345) % 4294967291
}

// parseRecord reads a record's "N" and "SECONDS.HH".
func parseRecord(seqText, upText string) (int, int64, bool) {
	seq, err := strconv.Atoi(seqText)
	if err != nil {
		return 0, 0, false
	}
	whole, frac, ok := strings.Cut(upText, ".")
	if !ok || len(frac) != 2 {
		return 0, 0, false
	}
	w, err1 := strconv.ParseInt(whole, 10, 64)
	f, err2 := strconv.ParseInt(frac, 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return seq, w*100 + f, true
}

// CheckRecords fails the test unless r's valid records are 1..n in order
// with nothing bad, and returns n.
func CheckRecords(t testing.TB, r Records) int {
	t.Helper()
	for i, s := range r.Valid {
		if s != i+1 {
			t.Fatalf("record %d has seq %d: records %v", i+1, s, r.Valid)
		}
	}
	if len(r.Bad) > 0 {
		t.Fatalf("bad records after seq %d: %q", len(r.Valid), r.Bad)
	}
	return len(r.Valid)
}

// Fsck runs e2fsck -fn (read-only) on image and returns its output and
// whether it found the image clean.
func Fsck(image string) (string, bool) {
	out, err := exec.Command("e2fsck", "-fn", image).CombinedOutput()
	return string(out), err == nil
}

// ReplayJournal runs e2fsck -fy on image (a copy: it changes it) and
// returns its output; it fails the test when e2fsck leaves errors.
func ReplayJournal(t testing.TB, image string) string {
	t.Helper()
	out, err := exec.Command("e2fsck", "-fy", image).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() <= 1 {
		err = nil // 1: errors corrected (the journal replayed)
	}
	if err != nil {
		t.Fatalf("e2fsck -fy %s: %v\n%s", image, err, out)
	}
	return string(out)
}

// DialQEMU opens qemu:///system through LibvirtSocket and closes it when
// the test ends. It fails the test when the QEMU driver does not answer.
func DialQEMU(t testing.TB) *libvirt.Libvirt {
	t.Helper()
	RequireLibvirt(t)
	l, err := dialLibvirt(QEMUURI)
	if err != nil {
		t.Fatalf("open %s through %s: %v: %s", QEMUURI, LibvirtSocket, err, setupHint)
	}
	t.Cleanup(func() { disconnect(l) })
	return l
}
