package fusefs_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/restore"
)

// emptyBuild is a timeline without snapshots: the mount checks do not
// need any.
func emptyBuild(context.Context) (*restore.Timeline, []error) { return &restore.Timeline{}, nil }

func oneLine(t *testing.T, err error, want ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want one with %q", want)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q lacks %q", err, w)
		}
	}
	if strings.Contains(err.Error(), "\n") {
		t.Errorf("error is not one line: %q", err)
	}
}

// Issue 11, finding 10: a second mount on a live mount is refused, naming
// the directory and the process serving it, and the first mount goes on.
func TestMountRefusesLiveMount(t *testing.T) {
	dir := t.TempDir()
	m, err := fusefs.MountTimeline(context.Background(), dir, emptyBuild, fusefs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	_, err = fusefs.MountTimeline(context.Background(), dir, emptyBuild, fusefs.Options{NonEmpty: true})
	oneLine(t, err, dir, "already mounted by vmhistory", "process "+strconv.Itoa(os.Getpid()))
	var me *fusefs.MountedError
	if !errors.As(err, &me) || me.PID != os.Getpid() {
		t.Errorf("want a *MountedError naming pid %d: %#v", os.Getpid(), me)
	}
	// Through a symbolic link to the mounted directory too.
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	oneLine(t, fusefs.CheckMountpoint(link, true), "already mounted by vmhistory")
	if n := countMounts(t, dir); n != 1 {
		t.Errorf("%d mounts on %s, want 1", n, dir)
	}
	if _, err := os.ReadDir(dir); err != nil {
		t.Errorf("the first mount broke: %v", err)
	}

	// Another filesystem's mount point likewise.
	other := t.TempDir()
	if err := syscall.Mount("vmht-tmpfs", other, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(other, syscall.MNT_DETACH) })
	_, err = fusefs.MountTimeline(context.Background(), other, emptyBuild, fusefs.Options{})
	oneLine(t, err, other, "already a mount point", "tmpfs", "vmht-tmpfs")
	if n := countMounts(t, other); n != 1 {
		t.Errorf("%d mounts on %s, want 1", n, other)
	}
}

// A directory holding files is refused (the mount would hide them)
// unless NonEmpty; with it the files are hidden while mounted and there
// again afterwards.
func TestMountRefusesNonEmptyDirectory(t *testing.T) {
	dir := t.TempDir()
	keep := filepath.Join(dir, "keep.txt")
	if err := os.WriteFile(keep, []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := fusefs.MountTimeline(context.Background(), dir, emptyBuild, fusefs.Options{})
	oneLine(t, err, dir, "not empty", "keep.txt", "--nonempty")
	if n := countMounts(t, dir); n != 0 {
		t.Fatalf("%s mounted after the refusal", dir)
	}
	m, err := fusefs.MountTimeline(context.Background(), dir, emptyBuild, fusefs.Options{NonEmpty: true})
	if err != nil {
		t.Fatalf("mount with NonEmpty: %v", err)
	}
	if _, err := os.Stat(keep); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("keep.txt visible through the mount (%v)", err)
	}
	if err := m.Unmount(); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(keep); err != nil || string(b) != "mine" {
		t.Errorf("keep.txt after unmount: %q %v", b, err)
	}
}

// A missing directory gets one line that says how to make it.
func TestMountMissingDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "no", "such")
	_, err := fusefs.MountTimeline(context.Background(), dir, emptyBuild, fusefs.Options{})
	oneLine(t, err, "mountpoint "+dir+" does not exist", "mkdir -p "+dir)
	if strings.Contains(err.Error(), "stat ") {
		t.Errorf("raw stat error: %v", err)
	}
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	oneLine(t, fusefs.CheckMountpoint(file, false), file, "not a directory")
	oneLine(t, fusefs.CheckMountpoint(filepath.Join(file, "x"), false), "not a directory")
}

func countMounts(t *testing.T, dir string) int {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			n++
		}
	}
	return n
}
