package restore_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
)

// deadPid returns the pid of a process that has exited.
func deadPid(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

// TestRestoreHoldsPerProcess: each process holds with its own tag; a
// source that starts releases the holds of this host's dead processes and
// keeps those of live ones and of other hosts; two Trees of one snapshot
// in this process, from two sources, keep the hold until both close.
func TestRestoreHoldsPerProcess(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 64)
	dataset, _ := pool.Dataset(t, "libvirt")
	z := pool.ZFS
	s1, err := z.CreateSnapshot(ctx, dataset, "2023-03-04_05:00:01", nil)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := z.CreateSnapshot(ctx, dataset, "2023-03-05_05:00:01", nil)
	if err != nil {
		t.Fatal(err)
	}

	own, err := restore.ProcessHoldTag()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(own, restore.RestoreHoldPrefix) || !strings.Contains(own, fmt.Sprintf("-%d-", os.Getpid())) {
		t.Fatalf("process hold tag %q does not name this process", own)
	}
	// This host's part of a tag: own without -<pid>-<start>.
	hostPart := own[:strings.LastIndexByte(own[:strings.LastIndexByte(own, '-')], '-')]
	dead := fmt.Sprintf("%s-%d-%d", hostPart, deadPid(t), 4242)
	reused := fmt.Sprintf("%s-%d-%d", hostPart, os.Getpid(), 1) // this pid, another start: a reused pid
	other := restore.RestoreHoldPrefix + "otherhost-1-1"
	for _, h := range []struct{ snap, tag string }{
		{s1.FullName(), dead}, {s1.FullName(), own}, {s2.FullName(), reused}, {s2.FullName(), other},
	} {
		if err := z.Hold(ctx, h.snap, h.tag); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, h := range []struct{ snap, tag string }{{s1.FullName(), own}, {s2.FullName(), other}} {
			z.Release(context.Background(), h.snap, h.tag)
		}
	})

	src := restore.NewZFSSource("local", restore.KindLocal, z, map[string]string{dataset: dataset})
	defer src.Close()
	snaps, err := src.Snapshots(ctx) // the first use sweeps
	if err != nil {
		t.Fatal(err)
	}
	held, err := z.HoldsWithPrefix(ctx, dataset, restore.RestoreHoldPrefix)
	if err != nil {
		t.Fatal(err)
	}
	if got := held[s1.FullName()]; !slices.Equal(got, []string{own}) {
		t.Errorf("%s holds %v after the sweep, want only this process's %s (dead %s released)", s1.FullName(), got, own, dead)
	}
	if got := held[s2.FullName()]; !slices.Equal(got, []string{other}) {
		t.Errorf("%s holds %v after the sweep, want only the other host's %s (reused pid %s released)", s2.FullName(), got, other, reused)
	}
	userRefs := func(snap string) uint64 {
		t.Helper()
		got, err := z.GetSnapshot(ctx, snap)
		if err != nil {
			t.Fatal(err)
		}
		return got.UserRefs
	}
	if n := userRefs(s2.FullName()); n != 1 {
		t.Errorf("%s has %d user holds after the sweep, want 1 (the released ones really released)", s2.FullName(), n)
	}

	// Two Trees of s2 from two sources of this process.
	var snap2 restore.SourceSnapshot
	for _, s := range snaps {
		if s.ID == s2.FullName() {
			snap2 = s
		}
	}
	src2 := restore.NewZFSSource("local-2", restore.KindLocal, z, map[string]string{dataset: dataset})
	defer src2.Close()
	t1, err := src.Open(ctx, snap2)
	if err != nil {
		t.Fatal(err)
	}
	t2, err := src2.Open(ctx, snap2)
	if err != nil {
		t.Fatal(err)
	}
	ownHeld := func() bool {
		t.Helper()
		tags, err := z.Holds(ctx, s2.FullName())
		if err != nil {
			t.Fatal(err)
		}
		return slices.Contains(tags, own)
	}
	if !ownHeld() || userRefs(s2.FullName()) != 2 {
		t.Fatalf("with two Trees open, %s is not held by %s (user holds %d)", s2.FullName(), own, userRefs(s2.FullName()))
	}
	if err := t1.Close(); err != nil {
		t.Fatal(err)
	}
	if !ownHeld() || userRefs(s2.FullName()) != 2 {
		t.Fatalf("closing one of two Trees released the hold on %s", s2.FullName())
	}
	if err := t2.Close(); err != nil {
		t.Fatal(err)
	}
	if ownHeld() || userRefs(s2.FullName()) != 1 {
		t.Fatalf("closing both Trees left this process's hold on %s (user holds %d)", s2.FullName(), userRefs(s2.FullName()))
	}
	if err := z.Destroy(ctx, s2.FullName()); err == nil {
		t.Errorf("%s was destroyed while another host's restore held it", s2.FullName())
	}
}
