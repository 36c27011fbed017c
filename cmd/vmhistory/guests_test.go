package main

import (
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmhistory/vmhistory/backup"
	"github.com/vmhistory/vmhistory/testenv"
)

// TestBackupSIGKILLDuringQuiesceOfRealGuests: `vmhistory backup` killed
// with SIGKILL while it managed-saves three real guests leaves them shut
// off with their images; the next run starts exactly those three, each
// resuming where it was (its heartbeat goes on, it does not boot), and not
// the guest the admin had shut off.
func TestBackupSIGKILLDuringQuiesceOfRealGuests(t *testing.T) {
	l := testenv.DialQEMU(t)
	pool := testenv.NewPool(t, 512)
	ds, mnt := pool.Dataset(t, "libvirt")
	testenv.BuildGuest(t)
	guests := make([]*testenv.Guest, 3)
	var wg sync.WaitGroup
	for i := range guests {
		name := testenv.GuestName(fmt.Sprintf("kill-%d", i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			guests[i] = testenv.NewGuest(t, l, name, filepath.Join(mnt, "images", name+".img"))
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	// Shut off by the admin, its disk on the dataset: never started.
	off := testenv.GuestName("kill-off")
	offDisk := filepath.Join(mnt, "images", off+".img")
	testenv.NewGuestDisk(t, offDisk, 8)
	offDom, err := l.DomainDefineXML(testenv.GuestXML(off, testenv.BuildGuest(t), offDisk, filepath.Join(t.TempDir(), "off.log")))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.DomainUndefineFlags(offDom, libvirt.DomainUndefineManagedSave) })

	stateDir := t.TempDir()
	config := writeTempConfig(t, fmt.Sprintf("datasets: [%s]\nquiesce: {mode: managedsave, save_timeout: 2m, resume_timeout: 2m}\nlibvirt: {uri: %q}\nstate_dir: %s\n",
		ds, testenv.QEMUURI, stateDir))
	marks := make([]int, len(guests))
	for i, g := range guests {
		g.Console.WaitHeartbeat(t, 4, time.Minute)
		marks[i] = g.Console.Len()
	}

	state := func(g *testenv.Guest) libvirt.DomainState {
		st, _, err := l.DomainGetState(g.Dom, 0)
		if err != nil {
			t.Fatal(err)
		}
		return libvirt.DomainState(st)
	}
	// Killed once all three are recorded and libvirt is saving one of
	// them (libvirt pauses a guest before writing its RAM out).
	child := startVMHistory(t, "backup", "--config", config)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		rec, err := backup.LoadStoppedVMs(stateDir)
		saving := false
		for _, g := range guests {
			saving = saving || state(g) == libvirt.DomainPaused
		}
		if err == nil && len(rec.Names()) == len(guests) && saving {
			break
		}
		select {
		case <-child.done:
			t.Fatalf("vmhistory backup ended (%v) before it was saving the guests:\n%s", child.err, child.output)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the three guests were never recorded and saving:\n%s", child.output)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := child.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	child.wait(t, 30*time.Second)

	// libvirtd finishes the saves it was asked for; a guest whose save
	// the killed run had recorded but not yet asked for runs on.
	states := func() []libvirt.DomainState {
		var out []libvirt.DomainState
		for _, g := range guests {
			out = append(out, state(g))
		}
		return out
	}
	var settled []libvirt.DomainState
	for giveUp := time.Now().Add(2 * time.Minute); ; {
		a := states()
		if !slices.Contains(a, libvirt.DomainPaused) {
			time.Sleep(3 * time.Second) // a save asked for last may only be starting
			if b := states(); slices.Equal(a, b) {
				settled = a
				break
			}
		}
		if time.Now().After(giveUp) {
			t.Fatalf("the guests did not settle after the kill: states %v", a)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var stopped []*testenv.Guest
	for i, g := range guests {
		switch settled[i] {
		case libvirt.DomainShutoff:
			stopped = append(stopped, g)
		case libvirt.DomainRunning:
		default:
			t.Fatalf("guest %s is in state %d after the kill", g.Name, settled[i])
		}
	}
	if len(stopped) == 0 {
		t.Fatalf("no guest was saved by the killed run")
	}
	var names []string
	for _, g := range stopped {
		names = append(names, g.Name)
	}
	t.Logf("the killed run left %v saved", names)
	if rec, _ := backup.LoadStoppedVMs(stateDir); len(rec.Names()) != len(guests) {
		t.Fatalf("the killed run's record lists %v", rec.Names())
	}

	stdout, stderr, err := runConfigCmd(t, "backup", "--recover", "--config", config)
	if err != nil {
		t.Fatalf("backup --recover: %v\n%s\n%s", err, stdout, stderr)
	}
	t.Logf("backup --recover:\n%s", stdout)
	for i, g := range guests {
		if state(g) != libvirt.DomainRunning {
			t.Errorf("guest %s is not running after recovery", g.Name)
			continue
		}
		at, gap := g.Console.Resumed(t, marks[i])
		t.Logf("guest %s: resumed at heartbeat %d after %v", g.Name, at+1, gap)
	}
	if st, _, err := l.DomainGetState(offDom, 0); err != nil || libvirt.DomainState(st) != libvirt.DomainShutoff {
		t.Errorf("the guest the admin shut off is in state %d (%v)", st, err)
	}
	if rec, _ := backup.LoadStoppedVMs(stateDir); !rec.Empty() {
		t.Errorf("the record still lists %v after recovery", rec.Names())
	}
}
