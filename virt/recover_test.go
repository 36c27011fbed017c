package virt

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A recorded VM that its admin started and shut down after the crash has
// no managed-save image (or state file) any more: Recover leaves it off
// and says so (ErrNoSavedState) instead of booting it from its disks. A
// recorded VM undefined since fails with ErrDomainGone.
func TestRecoverLeavesOffAVMShutDownSince(t *testing.T) {
	c, mnt, doms := modeVMs(t)
	ctx := context.Background()
	mq := &Quiescer{Conn: c, Mode: ModeManagedSave, Mountpoint: mnt}
	if _, err := mq.Quiesce(ctxT(t), doms[:2]); err != nil { // a, b
		t.Fatal(err)
	}
	sq := &Quiescer{Conn: c, Mode: ModeSave, Mountpoint: mnt}
	if _, err := sq.Quiesce(ctxT(t), doms[2:3]); err != nil { // c
		t.Fatal(err)
	}
	// After the crash the admin started b (from its image) and shut it
	// down, and did the same with c, removing its state file.
	b := domainState(t, c, "b")
	if err := c.Client().DomainCreate(b.ref); err != nil {
		t.Fatal(err)
	}
	if err := c.Client().DomainDestroy(b.ref); err != nil {
		t.Fatal(err)
	}
	if err := c.Client().DomainRestore(SaveFile(mnt, "c")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(SaveFile(mnt, "c")); err != nil {
		t.Fatal(err)
	}
	if err := c.Client().DomainDestroy(domainState(t, c, "c").ref); err != nil {
		t.Fatal(err)
	}

	rep := mq.Recover(ctx, []string{"a", "b", "gone"})
	if r := resultFor(t, rep, "a"); !r.Resumed || r.Err != nil {
		t.Errorf("a: %+v", r)
	}
	if r := resultFor(t, rep, "b"); r.Resumed || !errors.Is(r.Err, ErrNoSavedState) {
		t.Errorf("b: %+v, want left off with ErrNoSavedState", r)
	}
	if r := resultFor(t, rep, "gone"); r.Resumed || !errors.Is(r.Err, ErrDomainGone) {
		t.Errorf("gone: %+v, want ErrDomainGone", r)
	}
	rep = sq.Recover(ctx, []string{"c"})
	if r := resultFor(t, rep, "c"); r.Resumed || !errors.Is(r.Err, ErrNoSavedState) {
		t.Errorf("c: %+v, want left off with ErrNoSavedState", r)
	}
	if d := domainState(t, c, "a"); d.State != StateRunning {
		t.Errorf("a: %v", d.State)
	}
	for _, name := range []string{"b", "c", "off"} {
		if d := domainState(t, c, name); d.State != StateShutoff {
			t.Errorf("%s was started (%v): it had no saved state to start from", name, d.State)
		}
	}
}

// A managedsave slower than save_timeout and resume_timeout together
// (libvirt cannot abort the test driver's, as it cannot always abort
// qemu's) ends with the VM saved and shut off: Resume waits for it and
// starts the VM, instead of giving up and leaving it off until the next
// night. The fake only makes the real call slow.
func TestResumeWaitsForASaveSlowerThanResumeTimeout(t *testing.T) {
	c, mnt, doms := modeVMs(t)
	const slow = 1500 * time.Millisecond
	c.wrap = faulty(map[string]time.Duration{"ManagedSave/b": slow}, nil)
	q := &Quiescer{Conn: c, Mode: ModeManagedSave, Mountpoint: mnt,
		SaveTimeout: 100 * time.Millisecond, ResumeTimeout: 200 * time.Millisecond}
	qd, err := q.Quiesce(ctxT(t), doms[:2])
	if err == nil {
		t.Fatal("Quiesce met its 100ms save timeout despite a 1.5s managedsave")
	}
	rep := qd.Resume(context.Background())
	r := resultFor(t, rep, "b")
	if !r.Resumed || r.Err != nil || r.Downtime < slow {
		t.Errorf("b: %+v, want started once its slow save ended", r)
	}
	for _, name := range []string{"a", "b"} {
		if d := domainState(t, c, name); d.State != StateRunning {
			t.Errorf("%s: %v after Resume, want running", name, d.State)
		}
	}
}

// A state file older than the VM's disk (it ran after the save and was
// shut down since) is not restored, and tells the caller the VM is not
// to be brought back (ErrNoSavedState), so the crash record can drop it.
func TestRecoverStaleSaveFileIsNoSavedState(t *testing.T) {
	c, mnt, doms := modeVMs(t)
	q := &Quiescer{Conn: c, Mode: ModeSave, Mountpoint: mnt}
	if _, err := q.Quiesce(ctxT(t), doms[:1]); err != nil { // a
		t.Fatal(err)
	}
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(filepath.Join(mnt, "a.qcow2"), later, later); err != nil {
		t.Fatal(err)
	}
	rep := q.Recover(context.Background(), []string{"a"})
	if r := resultFor(t, rep, "a"); r.Resumed || !errors.Is(r.Err, ErrNoSavedState) {
		t.Errorf("a: %+v, want left off with ErrNoSavedState", r)
	}
	if d := domainState(t, c, "a"); d.State != StateShutoff {
		t.Errorf("a: %v, want left shut off", d.State)
	}
	if _, err := os.Stat(SaveFile(mnt, "a")); err != nil {
		t.Errorf("the stale state file was removed: %v", err)
	}
}
