package fusefs_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/zfs"
)

// TestMountReleasesIdleSnapshots (issue 11, finding 6): a running mount
// lets go of a snapshot (its hold, its zfs-fuse clone) once nothing has
// used it for the idle time, so prune can destroy it, and opens it again
// on the next lookup; a file kept open keeps it.
func TestMountReleasesIdleSnapshots(t *testing.T) {
	w := newWorld(t)
	const idle = time.Second
	_, dir := w.mountWith(t, fusefs.Options{Refresh: time.Minute, IdleRelease: idle, NoPassthrough: true})
	latest := w.snaps[len(w.snaps)-1]
	images := filepath.Join(dir, latest.Name, "images")

	pinned := func() (clones bool, holds int) {
		t.Helper()
		ctx := context.Background()
		out, err := w.pool.ZFS.Runner().Run(ctx, runner.Cmd{Args: []string{"zfs", "list", "-H", "-o", "name", "-r", w.pool.Name}})
		if err != nil {
			t.Fatal(err)
		}
		held, err := w.pool.ZFS.HoldsWithPrefix(ctx, w.dataset, restore.RestoreHoldPrefix)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(string(out), zfs.ClonePrefix), len(held)
	}
	waitReleased := func(what string) {
		t.Helper()
		deadline := time.Now().Add(idle + 20*time.Second)
		for {
			clones, holds := pinned()
			if !clones && holds == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: still pinned %v past the idle time (clone %v, %d holds)", what, 20*time.Second, clones, holds)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	if _, err := os.ReadDir(images); err != nil {
		t.Fatal(err)
	}
	if clones, holds := pinned(); holds == 0 || !clones {
		t.Fatalf("listing %s pinned nothing (clone %v, %d holds): the test would prove nothing", images, clones, holds)
	}
	waitReleased("after a listing")

	// Opened again on the next lookup; a file kept open keeps it past the
	// idle time.
	f, err := os.Open(filepath.Join(images, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * idle)
	if clones, holds := pinned(); holds == 0 || !clones {
		t.Errorf("released while a file is open (clone %v, %d holds)", clones, holds)
	}
	b := make([]byte, 4096)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatalf("read of the open file: %v", err)
	}
	f.Close()
	waitReleased("after the file was closed")
}
