package fusefs_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestUnmountWithFileLeftOpen: a file of the mount left open by this very
// process does not keep Unmount (and so the process's exit) waiting
// forever: the mount is detached, and its connection aborted when the
// file stays open.
func TestUnmountWithFileLeftOpen(t *testing.T) {
	w := newWorld(t)
	m, dir := w.mount(t, time.Minute)
	f, err := os.Open(filepath.Join(dir, w.snaps[0].Name, "images", "disk.img")) // kopia only: served by this process
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Read(make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- m.Unmount() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("unmount: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("Unmount still waits for the file left open")
	}
	if mounted(t, dir) {
		t.Error("still mounted")
	}
	if _, err := f.ReadAt(make([]byte, 4096), 8<<20); err == nil {
		t.Error("a read on the aborted mount succeeded")
	}
}
