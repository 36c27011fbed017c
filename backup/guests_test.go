package backup

// Acceptance tests on real QEMU guests (qemu:///system, TCG): the nightly
// job through Open and Run, as `vmhistory backup` runs it, with each
// quiesce mode. The guests' heartbeat (held only in RAM) tells a resumed
// guest from a rebooted one, and their fsynced records tell what the
// snapshot's disk must hold.

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/virt"
)

// guestBed is a dataset with real guests' disks on it and a configuration
// for qemu:///system.
type guestBed struct {
	t          *testing.T
	pool       *testenv.Pool
	dataset    string
	mountpoint string
	l          *libvirt.Libvirt
	guests     []*testenv.Guest
	cfg        *config.Config
}

// newGuestBed boots n guests (in parallel) with their disks on a fresh
// dataset and writes a configuration for mode.
func newGuestBed(t *testing.T, mode string, n int, extraYAML string) *guestBed {
	t.Helper()
	return newGuestBedOnPool(t, mode, n, extraYAML, 512)
}

// newGuestBedOnPool is newGuestBed on a pool of poolMiB.
func newGuestBedOnPool(t *testing.T, mode string, n int, extraYAML string, poolMiB int) *guestBed {
	t.Helper()
	b := &guestBed{t: t, l: testenv.DialQEMU(t), pool: testenv.NewPool(t, poolMiB)}
	b.dataset, b.mountpoint = b.pool.Dataset(t, "libvirt")
	testenv.BuildGuest(t)
	b.guests = make([]*testenv.Guest, n)
	var wg sync.WaitGroup
	for i := range n {
		name := testenv.GuestName(fmt.Sprintf("%s-%d", mode, i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			b.guests[i] = testenv.NewGuest(t, b.l, name, filepath.Join(b.mountpoint, "images", name+".img"))
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	yaml := fmt.Sprintf(`datasets: [%s]
keep_local: 20
quiesce: {mode: %s, save_timeout: 2m, resume_timeout: 2m}
libvirt: {uri: "%s"}
state_dir: %s
%s`, b.dataset, mode, testenv.QEMUURI, t.TempDir(), extraYAML)
	cfg, err := config.Options{SkipFileChecks: true}.Parse([]byte(yaml), "guests.yaml")
	if err != nil {
		t.Fatal(err)
	}
	b.cfg = cfg
	return b
}

// run runs one night as `vmhistory backup` does.
func (b *guestBed) run() *Report {
	b.t.Helper()
	ctx := context.Background()
	p, problems := Open(ctx, b.cfg, nil)
	defer p.Close()
	if len(problems) > 0 {
		b.t.Fatalf("open the pipeline: %v", problems)
	}
	start := time.Now()
	rep := p.Run(ctx, Options{})
	var text strings.Builder
	rep.WriteText(&text)
	b.t.Logf("night took %v:\n%s", time.Since(start).Round(10*time.Millisecond), text.String())
	if err := rep.Err(); err != nil {
		b.t.Fatalf("the night failed: %v", err)
	}
	if len(rep.Snapshots) != 1 {
		b.t.Fatalf("snapshots taken: %+v", rep.Snapshots)
	}
	return rep
}

// snapshotView opens the night's snapshot and returns the path of a file
// of the live dataset in it.
func (b *guestBed) snapshotView(rep *Report) func(live string) string {
	b.t.Helper()
	ctx := context.Background()
	view, err := b.pool.ZFS.OpenSnapshot(ctx, b.dataset+"@"+rep.Snapshots[0].Name)
	if err != nil {
		b.t.Fatal(err)
	}
	b.t.Cleanup(func() { view.Close(ctx) })
	return func(live string) string {
		rel, err := filepath.Rel(b.mountpoint, live)
		if err != nil {
			b.t.Fatal(err)
		}
		return filepath.Join(view.Root, rel)
	}
}

// downtime is the report's downtime of g.
func downtime(t *testing.T, rep *Report, g *testenv.Guest) time.Duration {
	t.Helper()
	for _, vm := range rep.VMs {
		if vm.Name == g.Name {
			return vm.Downtime
		}
	}
	t.Fatalf("the report has no VM %s: %+v", g.Name, rep.VMs)
	return 0
}

// resumedNotRebooted checks that g's heartbeat went on after the night
// (from), and returns the heartbeat it stopped at and the gap.
func resumedNotRebooted(t *testing.T, g *testenv.Guest, from int) (int, time.Duration) {
	t.Helper()
	return g.Console.Resumed(t, from)
}

// syncedBefore is the highest record the guest reported fsynced before t0.
func syncedBefore(g *testenv.Guest, t0 time.Time) int {
	n := 0
	for _, s := range g.Console.Synced() {
		if s.At.Before(t0) {
			n = max(n, s.N)
		}
	}
	return n
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestRealGuestSave: mode save puts the guest's state and definition in
// the snapshot; the guest restored from a clone of that snapshot (only its
// disk's source changed) resumes at the heartbeat it had when saved, with
// its records intact.
func TestRealGuestSave(t *testing.T) {
	b := newGuestBed(t, "save", 1, "")
	g := b.guests[0]
	g.Console.WaitFor(t, "vmht: synced seq=3", time.Minute)
	mark := g.Console.Len()
	rep := b.run()
	atSave, gap := resumedNotRebooted(t, g, mark)
	t.Logf("save: downtime %v in the report, largest heartbeat gap %v", downtime(t, rep, g), gap)
	synced := syncedBefore(g, rep.Snapshots[0].Creation)

	in := b.snapshotView(rep)
	saveFile := in(virt.SaveFile(b.mountpoint, g.Name))
	if fi, err := os.Stat(saveFile); err != nil || fi.Size() == 0 {
		t.Fatalf("the snapshot lacks the state file: %v", err)
	}
	def, err := os.ReadFile(in(virt.DefinitionFile(b.mountpoint, g.Name)))
	if err != nil || !strings.Contains(string(def), "<name>"+g.Name+"</name>") || !strings.Contains(string(def), g.Disk) {
		t.Fatalf("the snapshot's definition of %s: %v\n%s", g.Name, err, def)
	}

	// Back to the night's state: the live guest goes (its definition
	// stays), and the state in a writable clone is restored onto the
	// clone's disk.
	g.Destroy(t)
	ctx := context.Background()
	clone := b.pool.Name + "/restored"
	cloneMnt := filepath.Join(testenv.PoolDir, "mnt", clone)
	if out, err := exec.CommandContext(ctx, "zfs", "clone", "-o", "mountpoint="+cloneMnt, b.dataset+"@"+rep.Snapshots[0].Name, clone).CombinedOutput(); err != nil {
		t.Fatalf("clone the snapshot: %v: %s", err, out)
	}
	cloneDisk := filepath.Join(cloneMnt, "images", filepath.Base(g.Disk))
	cloneSave := virt.SaveFile(cloneMnt, g.Name)
	saved, err := b.l.DomainSaveImageGetXMLDesc(cloneSave, 0)
	if err != nil {
		t.Fatalf("read the saved state's XML: %v", err)
	}
	if strings.Count(saved, "'"+g.Disk+"'") != 1 {
		t.Fatalf("the saved XML names the disk %s other than once:\n%s", g.Disk, saved)
	}
	restoreXML := strings.Replace(saved, "'"+g.Disk+"'", "'"+cloneDisk+"'", 1)
	mark = g.Console.Len()
	start := time.Now()
	if err := b.l.DomainRestoreFlags(cloneSave, libvirt.OptString{restoreXML}, 0); err != nil {
		t.Fatalf("restore the snapshot's state onto its clone: %v", err)
	}
	t.Logf("restore from the clone took %v", time.Since(start).Round(10*time.Millisecond))
	first := g.Console.WaitFunc(t, mark, "a heartbeat after the restore", time.Minute, func(s string) bool {
		_, ok := testenv.Heartbeat(s)
		return ok
	})
	if n, _ := testenv.Heartbeat(first.Text); n != atSave+1 {
		t.Errorf("the restored guest's first heartbeat is %d, want %d (it was at %d when saved)", n, atSave+1, atSave)
	}
	g.Console.WaitFunc(t, mark, "a record synced after the restore", time.Minute, func(s string) bool {
		return strings.Contains(s, "vmht: synced seq=")
	})
	g.Destroy(t) // before its clone goes, with the pool
	copyPath := filepath.Join(t.TempDir(), "disk.img")
	copyFile(t, cloneDisk, copyPath)
	testenv.ReplayJournal(t, copyPath)
	if n := testenv.CheckRecords(t, testenv.ReadRecords(t, copyPath)); n < synced {
		t.Errorf("the restored disk holds %d records; %d were synced before the snapshot", n, synced)
	}
}

// TestRealGuestManagedSave: the guest is saved by libvirt, snapshotted and
// started from its image: its heartbeat goes on (no boot), and the
// report's downtime matches what the guest's heartbeat shows.
func TestRealGuestManagedSave(t *testing.T) {
	b := newGuestBed(t, "managedsave", 1, "")
	g := b.guests[0]
	g.Console.WaitHeartbeat(t, 3, time.Minute)
	mark := g.Console.Len()
	rep := b.run()
	_, gap := resumedNotRebooted(t, g, mark)
	down := downtime(t, rep, g)
	t.Logf("managedsave: downtime %v in the report, largest heartbeat gap %v", down, gap)
	// The guest's clock stands still while it is saved, so the gap
	// between its heartbeats is the time it was stopped plus one period.
	// The report's downtime ends when the guest agent answers again (the
	// guest runs its own software), not when libvirt starts its vCPUs: a
	// restored TCG guest translates its code afresh and, on a loaded
	// machine, ran again seconds after libvirt said it was running.
	d := gap - testenv.HeartbeatPeriod - down
	if d < -500*time.Millisecond || d > 500*time.Millisecond {
		t.Errorf("downtime %v is not within 0.5 s of the heartbeat gap %v less one period %v (off by %v)", down, gap, testenv.HeartbeatPeriod, d)
	}
	for _, vm := range rep.VMs {
		if vm.Name == g.Name && !strings.Contains(vm.Action, "guest agent answering") {
			t.Errorf("the report does not say the guest agent answered again: %+v", vm)
		}
	}
	if !strings.Contains(strings.Join(rep.Warnings, "\n"), "/var/lib/libvirt/qemu/save") {
		t.Errorf("no warning that the managed-save images are not on a selected dataset: %q", rep.Warnings)
	}
	in := b.snapshotView(rep)
	if _, err := os.Stat(in(virt.DefinitionFile(b.mountpoint, g.Name))); err != nil {
		t.Errorf("the snapshot lacks the definition: %v", err)
	}
}

// TestRealGuestFSFreeze: the agent froze the guest's filesystem for the
// snapshot, so its image needs no journal replay and its last record is
// whole.
func TestRealGuestFSFreeze(t *testing.T) {
	b := newGuestBed(t, "fsfreeze", 1, "")
	g := b.guests[0]
	g.Console.WaitFor(t, "vmht: synced seq=3", time.Minute)
	mark := g.Console.Len()
	rep := b.run()
	t.Logf("fsfreeze: frozen for %v", downtime(t, rep, g))
	image := b.snapshotView(rep)(g.Disk)
	out, clean := testenv.Fsck(image)
	if !clean || strings.Contains(out, "journal") {
		t.Errorf("e2fsck -fn on the snapshot's image (clean %v):\n%s", clean, out)
	}
	n := testenv.CheckRecords(t, testenv.ReadRecords(t, image))
	if synced := syncedBefore(g, rep.Snapshots[0].Creation); n < synced {
		t.Errorf("the snapshot holds %d records; %d were synced before it", n, synced)
	}
	g.Console.WaitFunc(t, mark, "a record synced after the thaw", time.Minute, func(s string) bool {
		_, rest, ok := strings.Cut(s, "vmht: synced seq=")
		return ok && rest > "" && atoi(rest) > n
	})
}

func atoi(s string) int {
	n := 0
	fmt.Sscanf(strings.TrimSpace(s), "%d", &n)
	return n
}

// TestRealGuestCrashConsistent: with suspend and none the snapshot is what
// a power cut leaves: after journal replay the image is clean and holds
// every record synced before the snapshot.
func TestRealGuestCrashConsistent(t *testing.T) {
	for _, mode := range []string{"suspend", "none"} {
		t.Run(mode, func(t *testing.T) {
			b := newGuestBed(t, mode, 1, "")
			g := b.guests[0]
			g.Console.WaitFor(t, "vmht: synced seq=3", time.Minute)
			mark := g.Console.Len()
			started := time.Now()
			rep := b.run()
			if mode == "suspend" {
				_, gap := resumedNotRebooted(t, g, mark)
				t.Logf("suspend: downtime %v in the report, largest heartbeat gap %v", downtime(t, rep, g), gap)
			}
			// zfs keeps the creation time to the second, rounded down.
			before := rep.Snapshots[0].Creation
			if before.Before(started) {
				before = started
			}
			synced := syncedBefore(g, before)
			copyPath := filepath.Join(t.TempDir(), "disk.img")
			copyFile(t, b.snapshotView(rep)(g.Disk), copyPath)
			t.Logf("journal replay:\n%s", testenv.ReplayJournal(t, copyPath))
			if out, clean := testenv.Fsck(copyPath); !clean {
				t.Errorf("the image is not clean after journal replay:\n%s", out)
			}
			if n := testenv.CheckRecords(t, testenv.ReadRecords(t, copyPath)); n < synced {
				t.Errorf("the snapshot holds %d records; %d were synced before it", n, synced)
			}
		})
	}
}

// TestRealGuestsParallelAgainstSerial quiesces three guests all at once
// (quiesce.parallel 0, the default) and one after the other (1), in each
// mode that stops or freezes them: every guest comes back each night
// without a boot, and the downtimes are logged side by side (the closing
// note of the issue quotes them). One after the other, the first guest
// stopped waits for the others' saves and the snapshot, so its downtime is
// at least the sum of theirs.
func TestRealGuestsParallelAgainstSerial(t *testing.T) {
	b := newGuestBedOnPool(t, "managedsave", 3, "", 2048)
	for _, g := range b.guests {
		g.Console.WaitHeartbeat(t, 3, time.Minute)
	}
	type night struct {
		mode     string
		parallel int
		down     []time.Duration
		took     time.Duration
	}
	var nights []night
	for _, mode := range []string{"managedsave", "save", "suspend", "fsfreeze"} {
		for _, parallel := range []int{0, 1} {
			b.cfg.Quiesce.Mode = config.QuiesceMode(mode)
			b.cfg.Quiesce.Parallel = parallel
			marks := make([]int, len(b.guests))
			for i, g := range b.guests {
				marks[i] = g.Console.Len()
			}
			// Snapshot names have one-second resolution, and a night of
			// suspend takes less than that.
			time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
			start := time.Now()
			rep := b.run()
			n := night{mode: mode, parallel: parallel, took: time.Since(start)}
			for i, g := range b.guests {
				if mode != "fsfreeze" {
					resumedNotRebooted(t, g, marks[i])
				}
				n.down = append(n.down, downtime(t, rep, g))
			}
			nights = append(nights, n)
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "three 128 MiB TCG guests, downtime per guest (sorted), night's wall time:\n")
	for _, n := range nights {
		slices.Sort(n.down)
		how := "all at once"
		if n.parallel == 1 {
			how = "one after the other"
		}
		fmt.Fprintf(&sb, "  %-11s %-19s %v  night %v\n", n.mode, how, roundAll(n.down), n.took.Round(10*time.Millisecond))
	}
	t.Log(sb.String())
}

func roundAll(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(10 * time.Millisecond)
	}
	return out
}
