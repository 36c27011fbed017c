package boot_test

// Acceptance on a real QEMU guest (qemu:///system, TCG): a guest backed
// up in save mode, its snapshot then only in kopia, booted through the
// vmhistory mount with kopia behind the drive model. The guest's
// heartbeat (held only in RAM) tells a resumed guest from a booted one;
// its fsynced records tell what its disk held.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmhistory/vmhistory/backup"
	"github.com/vmhistory/vmhistory/boot"
	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/testenv"
)

const testPassword = "boot-test-password"

// guestWorld is one guest on a dataset, backed up once in save mode to a
// kopia filesystem repository, the snapshot then destroyed on ZFS.
type guestWorld struct {
	l        *libvirt.Libvirt
	pool     *testenv.Pool
	dataset  string
	mnt      string
	guest    *testenv.Guest
	dir      string
	stateDir string
	direct   string // kopia config, no model
	pwFile   string
	snap     string // dataset@name
	atSave   int    // the heartbeat before the save
	yaml     string // configuration, %s for the kopia config file
}

// fillerMiB is data on the guest's disk the guest never reads: a restore
// copies it, a boot does not.
const fillerMiB = 384

func newGuestWorld(t *testing.T) *guestWorld {
	t.Helper()
	ctx := context.Background()
	w := &guestWorld{l: testenv.DialQEMU(t), pool: testenv.NewPool(t, 1536)}
	w.dataset, w.mnt = w.pool.Dataset(t, "libvirt")
	w.dir = t.TempDir()
	// QEMU (libvirt-qemu) opens the overlays under the state directory.
	w.stateDir = filepath.Join(testenv.PoolDir, fmt.Sprintf("boot-state-%d", os.Getpid()))
	os.RemoveAll(w.stateDir)
	if err := os.MkdirAll(w.stateDir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(w.stateDir) })
	name := testenv.GuestName("boot")
	disk := filepath.Join(w.mnt, "images", name+".img")
	newFilledDisk(t, disk, 512, fillerMiB)
	// As libvirt leaves a stopped VM's image: only root reads it. The
	// mount's ReadAllUIDs lets QEMU in.
	if err := os.Chmod(disk, 0o600); err != nil {
		t.Fatal(err)
	}

	w.pwFile = filepath.Join(w.dir, "password")
	if err := os.WriteFile(w.pwFile, []byte(testPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	w.direct = filepath.Join(w.dir, "direct.config")
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(w.dir, "repo")}, w.direct, testPassword,
		kopiarepo.CreateOptions{ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(w.dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	w.yaml = fmt.Sprintf(`datasets: [%s]
keep_local: 20
quiesce: {mode: save, save_timeout: 2m, resume_timeout: 2m}
libvirt: {uri: "%s"}
state_dir: %s
kopia: {config_file: %%s, password_file: %s, host: kvmhost, user: root, splitter: FIXED-128K}
`, w.dataset, testenv.QEMUURI, w.stateDir, w.pwFile)

	w.guest = testenv.NewGuest(t, w.l, name, disk)
	w.guest.Console.WaitFor(t, "vmht: synced seq=3", time.Minute)
	mark := w.guest.Console.Len()
	p, problems := backup.Open(ctx, w.config(t, w.direct), nil)
	if len(problems) > 0 {
		t.Fatalf("open the pipeline: %v", problems)
	}
	rep := p.Run(ctx, backup.Options{})
	p.Close()
	if err := rep.Err(); err != nil || len(rep.Snapshots) != 1 {
		t.Fatalf("the night: %v, snapshots %+v", err, rep.Snapshots)
	}
	w.atSave, _ = w.guest.Console.Resumed(t, mark)
	w.snap = w.dataset + "@" + rep.Snapshots[0].Name
	// Pruned locally: kopia alone holds night 1 now.
	if err := w.pool.ZFS.Destroy(ctx, w.snap); err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *guestWorld) config(t *testing.T, kopiaConfig string) *config.Config {
	t.Helper()
	cfg, err := config.Options{SkipFileChecks: true}.Parse([]byte(fmt.Sprintf(w.yaml, kopiaConfig)), "boot.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

var modelSeq int

// driveConfig is a kopia config reading the repository through the drive
// preset, with a cache of its own (cold).
func (w *guestWorld) driveConfig(t *testing.T) (string, *drivemodel.Model) {
	t.Helper()
	modelSeq++
	name := fmt.Sprintf("boot-%d-%d", os.Getpid(), modelSeq)
	path := filepath.Join(w.dir, name+".config")
	if err := drivemodel.WriteConfig(w.direct, path, drivemodel.ConfigOptions{Preset: "drive", Model: name,
		CacheDirectory: filepath.Join(w.dir, name+"-cache")}); err != nil {
		t.Fatal(err)
	}
	return path, drivemodel.Shared(name)
}

// newFilledDisk makes an ext4 image of sizeMiB holding an empty record
// file and fillerMiB of random data in a file the guest never reads.
func newFilledDisk(t *testing.T, path string, sizeMiB, fillerMiB int) {
	t.Helper()
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, strings.TrimPrefix(testenv.GuestRecordFile, "/")), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(src, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(f, newRandReader(), int64(fillerMiB)<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mke2fs", "-q", "-F", "-t", "ext4", "-d", src, path, fmt.Sprintf("%dM", sizeMiB)).CombinedOutput(); err != nil {
		t.Fatalf("mke2fs %s: %v: %s", path, err, out)
	}
}

// randReader is incompressible bytes that never repeat (a VM disk's
// data): kopia must not find a chunk twice.
type randReader struct{ r *rand.ChaCha8 }

func newRandReader() randReader {
	return randReader{rand.NewChaCha8([32]byte{'b', 'o', 'o', 't'})}
}

func (r randReader) Read(p []byte) (int, error) { return r.r.Read(p) }

// mountTimeline mounts the timeline of cfg (allow_other, for QEMU) under
// testenv.PoolDir, where libvirt-qemu can reach it.
func mountTimeline(t *testing.T, cfg *config.Config) (*fusefs.Mount, *restore.Session) {
	t.Helper()
	ctx := context.Background()
	sess, err := restore.Open(ctx, cfg, restore.SessionOptions{Logger: slog.Default(), NoSeed: true})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(testenv.PoolDir, fmt.Sprintf("boot-mnt-%d-%d", os.Getpid(), modelSeq))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// A short idle release: it must pass over the files a booted domain
	// holds open.
	qemu, err := boot.QEMUUID()
	if err != nil {
		t.Fatal(err)
	}
	m, err := fusefs.MountTimeline(ctx, dir, sess.Refresher(), fusefs.Options{AllowOther: true, ReadAllUIDs: []uint32{qemu},
		Logger: slog.Default(), IdleRelease: 2 * time.Second})
	if err != nil {
		sess.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
		sess.Close()
		os.Remove(dir)
	})
	return m, sess
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// restoreDisk restores the guest's disk of w.snap as vmhistory restore
// does, through a fresh session on the drive preset, and returns the time
// from the session's open to the synced file, the file and its SHA-256.
func (w *guestWorld) restoreDisk(t *testing.T) (time.Duration, string, string) {
	t.Helper()
	ctx := context.Background()
	cfgPath, _ := w.driveConfig(t)
	start := time.Now()
	sess, err := restore.Open(ctx, w.config(t, cfgPath), restore.SessionOptions{Start: start, NoSeed: true, Logger: slog.Default()})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	rel, _ := filepath.Rel(w.mnt, w.guest.Disk)
	target, err := sess.Locate(ctx, w.snap+":"+rel, "")
	if err != nil {
		t.Fatal(err)
	}
	if target.Entry.Has(restore.KindLocal) {
		t.Fatalf("%s is still on the pool", w.snap)
	}
	f, err := sess.OpenFile(ctx, target.Entry, target.Rel)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dest := filepath.Join(t.TempDir(), "disk.img")
	cr, err := restore.Copy(ctx, f, dest, restore.CopyOptions{Identity: target.Identity(), SourceBytes: f.BytesBySource})
	if err != nil {
		t.Fatal(err)
	}
	return time.Since(start), dest, cr.SHA256
}

func (w *guestWorld) boot(t *testing.T, m *fusefs.Mount, sess *restore.Session, o boot.Options) *boot.Booted {
	t.Helper()
	ctx := context.Background()
	running, err := boot.CheckMount(m.Dir, "")
	if err != nil {
		t.Fatal(err)
	}
	if !running.ChecksItself {
		t.Fatalf("the mount with ReadAllUIDs is not seen as checking access itself")
	}
	loc, err := boot.Locate(ctx, sess.Timeline(), running.Dir, w.snap, "", &runner.Local{}, "")
	if err != nil {
		t.Fatal(err)
	}
	o.MountChecksItself = true
	o.Conn, o.Runner, o.Registry = w.l, &runner.Local{}, boot.NewRegistry(w.stateDir)
	o.Mount, o.SnapDir, o.Snapshot, o.GUID, o.Mountpoint = loc.Mount, loc.SnapDir, loc.Snapshot, loc.GUID, loc.Mountpoint
	o.VM = w.guest.Name
	b, err := boot.Boot(ctx, o)
	if err != nil {
		t.Fatalf("boot %s of %s: %v", o.VM, w.snap, err)
	}
	t.Cleanup(func() {
		if _, err := boot.Stop(ctx, w.l, o.Registry, b.Name); err != nil && !strings.Contains(err.Error(), "no such booted domain") {
			t.Errorf("stop %s: %v", b.Name, err)
		}
	})
	return b
}

func consoleOf(t *testing.T, b *boot.Booted) *testenv.Console {
	t.Helper()
	for _, f := range b.Files {
		if strings.HasSuffix(f, "serial0.log") {
			return testenv.TailConsole(t, f)
		}
	}
	t.Fatalf("%s has no serial log among %v", b.Name, b.Files)
	return nil
}

func firstSynced(t *testing.T, c *testenv.Console) int {
	t.Helper()
	l := c.WaitFunc(t, 0, "a synced record", 2*time.Minute, func(s string) bool { return strings.Contains(s, "vmht: synced seq=") })
	_, after, _ := strings.Cut(l.Text, "seq=")
	n, err := strconv.Atoi(strings.TrimSpace(after))
	if err != nil {
		t.Fatalf("synced line %q", l.Text)
	}
	return n
}

// TestBootRealGuest: a guest backed up in save mode, kopia alone holding
// its snapshot, comes back through the mount under the drive preset:
// first beside the running original as a fresh boot whose disk holds
// exactly the night's records, then, the original gone, by resuming the
// saved state. Its writes go to the overlay; the snapshot and the original
// are untouched; the mount will not stop under it.
func TestBootRealGuest(t *testing.T) {
	w := newGuestWorld(t)
	ctx := context.Background()

	restoreTook, restored, snapSHA := w.restoreDisk(t)
	t.Logf("vmhistory restore of the %s disk under drive: %v", "512 MiB", restoreTook.Round(10*time.Millisecond))
	testenv.ReplayJournal(t, restored)
	night1 := testenv.CheckRecords(t, testenv.ReadRecords(t, restored))
	if night1 < 3 {
		t.Fatalf("the snapshot's disk holds %d records", night1)
	}

	cfgPath, model := w.driveConfig(t)
	m, sess := mountTimeline(t, w.config(t, cfgPath))
	reg := boot.NewRegistry(w.stateDir)

	// (b) the original runs: a fresh boot as a new domain.
	origDef, err := w.l.DomainGetXMLDesc(w.guest.Dom, libvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}
	origMark := w.guest.Console.Len()
	start := time.Now()
	fresh := w.boot(t, m, sess, boot.Options{})
	if fresh.Mode != boot.FreshBoot || fresh.Name == w.guest.Name || fresh.UUID == "" {
		t.Fatalf("booted %+v beside the running original", fresh.Record)
	}
	con := consoleOf(t, fresh)
	con.WaitFor(t, "vmht: heartbeat 1", 5*time.Minute)
	freshFirst := time.Since(start)
	if n := firstSynced(t, con); n != night1+1 {
		t.Errorf("the fresh boot's first record is seq=%d: its disk held %d records, night 1's disk %d", n, n-1, night1)
	}
	t.Logf("fresh boot: first heartbeat %v after vmhistory boot began (restore: %v, %.2f×); %d MiB from the store",
		freshFirst.Round(10*time.Millisecond), restoreTook.Round(10*time.Millisecond), freshFirst.Seconds()/restoreTook.Seconds(),
		model.Stats().BytesFetched>>20)
	xml, err := w.l.DomainGetXMLDesc(mustLookup(t, w.l, fresh.Name), 0)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(xml, w.guest.Disk) || strings.Contains(xml, "<interface") {
		t.Errorf("the fresh boot's XML names the original disk or a NIC:\n%s", xml)
	}
	overlay := fresh.Disks[0].Overlay
	con.WaitFor(t, fmt.Sprintf("vmht: synced seq=%d", night1+3), time.Minute)
	if fi, err := os.Stat(overlay); err != nil || fi.Size() < 256<<10 {
		t.Errorf("the overlay %s did not take the guest's writes: %v %v", overlay, fi, err)
	}
	if deps := reg.Dependents(m.Dir, m.OpenFiles()); !slices.Contains(deps, fresh.Name) {
		t.Errorf("the mount would stop under %s: dependents %v, open files %v", fresh.Name, deps, m.OpenFiles())
	}
	listed, errs := boot.List(w.l, reg)
	if len(errs) > 0 || len(listed) != 1 || listed[0].State != "running" {
		t.Errorf("boot list: %+v %v", listed, errs)
	}
	// The original ran on throughout, on its own disk.
	w.guest.Console.WaitFunc(t, w.guest.Console.Len(), "a heartbeat of the original", time.Minute, func(s string) bool {
		_, ok := testenv.Heartbeat(s)
		return ok
	})
	if gap, _ := testenv.LargestGap(w.guest.Console.HeartbeatsSince(origMark)); gap > 10*time.Second {
		t.Errorf("the original's heartbeat stopped for %v while the copy booted", gap)
	}
	noIOErrors(t, con)
	if _, err := boot.Stop(ctx, w.l, reg, fresh.Name); err != nil {
		t.Fatal(err)
	}
	if after, err := w.l.DomainGetXMLDesc(w.guest.Dom, libvirt.DomainXMLInactive); err != nil || after != origDef {
		t.Errorf("the original's definition changed across the boot and stop of its copy (%v):\n%s\n---\n%s", err, origDef, after)
	}
	if _, err := os.Stat(fresh.Dir); !os.IsNotExist(err) {
		t.Errorf("the boot's directory is still there after --stop: %v", err)
	}
	if deps := reg.Dependents(m.Dir, m.OpenFiles()); len(deps) > 0 {
		t.Errorf("after --stop the mount still has dependents %v", deps)
	}

	// (a) the host died: the original is gone, its saved state resumes.
	w.guest.Destroy(t)
	if err := w.l.DomainUndefineFlags(w.guest.Dom, libvirt.DomainUndefineManagedSave|libvirt.DomainUndefineNvram); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	saved := w.boot(t, m, sess, boot.Options{})
	if saved.Mode != boot.SavedState || saved.Name != w.guest.Name {
		t.Fatalf("with the original undefined, booted %+v", saved.Record)
	}
	con = consoleOf(t, saved)
	first := con.WaitFunc(t, 0, "a heartbeat of the resumed guest", 5*time.Minute, func(s string) bool {
		_, ok := testenv.Heartbeat(s)
		return ok
	})
	savedFirst := time.Since(start)
	if n, _ := testenv.Heartbeat(first.Text); n != w.atSave+1 {
		t.Errorf("the resumed guest's first heartbeat is %d; it was saved at %d", n, w.atSave)
	}
	for _, l := range con.Lines() {
		if strings.Contains(l.Text, "vmht: mounted") {
			t.Errorf("the saved state booted instead of resuming: %q", l.Text)
		}
	}
	t.Logf("saved state: first heartbeat %v after vmhistory boot began (restore: %v, %.2f×)",
		savedFirst.Round(10*time.Millisecond), restoreTook.Round(10*time.Millisecond), savedFirst.Seconds()/restoreTook.Seconds())
	con.WaitFunc(t, 0, "a record synced after the resume", time.Minute, func(s string) bool { return strings.Contains(s, "vmht: synced seq=") })
	if deps := reg.Dependents(m.Dir, m.OpenFiles()); !slices.Contains(deps, saved.Name) {
		t.Errorf("the mount would stop under %s: dependents %v", saved.Name, deps)
	}

	// --live-restore: the disk is copied out while the guest runs; then
	// it needs nothing of vmhistory.
	liveDir := filepath.Join(testenv.PoolDir, fmt.Sprintf("boot-live-%d", os.Getpid()))
	os.RemoveAll(liveDir)
	if err := os.MkdirAll(liveDir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(liveDir) })
	var reports int
	start = time.Now()
	rec, err := boot.RestoreLive(ctx, w.l, reg, saved.Name, boot.LiveOptions{Dir: liveDir, Interval: 200 * time.Millisecond,
		Progress: func(p restore.Progress) { reports++ }})
	if err != nil {
		t.Fatalf("live restore: %v", err)
	}
	copied := rec.LiveRestore.Disks[saved.Disks[0].Target]
	t.Logf("live restore: %v, %d progress reports, into %s", time.Since(start).Round(10*time.Millisecond), reports, copied)
	if !rec.LiveRestore.Done || reports == 0 {
		t.Errorf("live restore record %+v, %d progress reports", rec.LiveRestore, reports)
	}
	if deps := reg.Dependents(m.Dir, m.OpenFiles()); len(deps) > 0 {
		t.Errorf("after the live restore the mount still has dependents %v (open: %v)", deps, m.OpenFiles())
	}
	// The snapshot is as it was.
	if got := sha256File(t, saved.Disks[0].Chain[0].Path); got != snapSHA {
		t.Errorf("the snapshot's disk through the mount has SHA-256 %s after the boots, %s before", got, snapSHA)
	}
	if err := m.Unmount(); err != nil {
		t.Fatalf("unmount after the live restore: %v", err)
	}
	mark := con.Len()
	last := firstSyncedAfter(t, con, mark)
	con.WaitFor(t, fmt.Sprintf("vmht: synced seq=%d", last+3), time.Minute)
	noIOErrors(t, con)
	// A clean stop: the guest agent freezes the filesystem (journal
	// flushed), then the domain goes.
	dom := mustLookup(t, w.l, saved.Name)
	if _, err := w.l.DomainFsfreeze(dom, nil, 0); err != nil {
		t.Fatalf("freeze the guest's filesystem: %v", err)
	}
	final := con.Len()
	if _, err := boot.Stop(ctx, w.l, reg, saved.Name); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(copied); err != nil {
		t.Fatalf("--stop removed the live restore's copy: %v", err)
	}
	if out, err := exec.Command("e2fsck", "-fn", copied).CombinedOutput(); err != nil {
		t.Errorf("e2fsck of the live-restored disk: %v\n%s", err, out)
	}
	got := testenv.ReadRecords(t, copied)
	n := testenv.CheckRecords(t, got)
	synced := lastSynced(con, final)
	if n < synced || n <= night1 {
		t.Errorf("the live-restored disk holds %d records; night 1 held %d, the guest synced up to %d", n, night1, synced)
	}
	if a, b := debugfsSHA(t, restored, "/filler"), debugfsSHA(t, copied, "/filler"); a != b {
		t.Errorf("the guest's untouched file differs on the live-restored disk: %s, snapshot %s", b, a)
	}
}

// noIOErrors fails the test for a disk error on the guest's console.
func noIOErrors(t *testing.T, c *testenv.Console) {
	t.Helper()
	for _, l := range c.Lines() {
		if strings.Contains(l.Text, "I/O error") || strings.Contains(l.Text, "EXT4-fs error") {
			t.Errorf("the guest saw an I/O error: %q", l.Text)
		}
	}
}

// firstSyncedAfter waits for a synced record after line from.
func firstSyncedAfter(t *testing.T, c *testenv.Console, from int) int {
	t.Helper()
	l := c.WaitFunc(t, from, "a synced record", time.Minute, func(s string) bool { return strings.Contains(s, "vmht: synced seq=") })
	_, after, _ := strings.Cut(l.Text, "seq=")
	n, _ := strconv.Atoi(strings.TrimSpace(after))
	return n
}

// lastSynced is the last synced record up to line upto.
func lastSynced(c *testenv.Console, upto int) int {
	n := 0
	for _, l := range c.Lines()[:upto] {
		if _, after, ok := strings.Cut(l.Text, "vmht: synced seq="); ok {
			n, _ = strconv.Atoi(strings.TrimSpace(after))
		}
	}
	return n
}

// debugfsSHA is the SHA-256 of a file inside an ext4 image.
func debugfsSHA(t *testing.T, image, path string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "dump")
	if b, err := exec.Command("debugfs", "-R", "dump "+path+" "+out, image).CombinedOutput(); err != nil {
		t.Fatalf("debugfs dump %s from %s: %v: %s", path, image, err, b)
	}
	return sha256File(t, out)
}

func mustLookup(t *testing.T, l *libvirt.Libvirt, name string) libvirt.Domain {
	t.Helper()
	d, err := l.DomainLookupByName(name)
	if err != nil {
		t.Fatalf("look up %s: %v", name, err)
	}
	return d
}
