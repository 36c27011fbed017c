package safefile

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// victim is a file an attacker would like root to overwrite; unchanged
// reports whether it still has its content, mode and mtime.
type victim struct {
	path  string
	data  []byte
	mode  os.FileMode
	mtime time.Time
}

func newVictim(t *testing.T) *victim {
	t.Helper()
	v := &victim{path: filepath.Join(t.TempDir(), "victim"), data: []byte("precious\n"), mode: 0o640,
		mtime: time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)}
	if err := os.WriteFile(v.path, v.data, v.mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(v.path, v.mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(v.path, v.mtime, v.mtime); err != nil {
		t.Fatal(err)
	}
	return v
}

func (v *victim) check(t *testing.T) {
	t.Helper()
	got, err := os.ReadFile(v.path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(v.path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, v.data) || fi.Mode() != v.mode || !fi.ModTime().Equal(v.mtime) {
		t.Errorf("the symlink's target changed: %q mode %v mtime %v", got, fi.Mode(), fi.ModTime())
	}
}

func wantRefused(t *testing.T, err error, path, what string) {
	t.Helper()
	if !errors.Is(err, ErrNotRegular) {
		t.Fatalf("want a refusal of %s, got %v", path, err)
	}
	if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), what) {
		t.Errorf("the error should name %s and say it is %s: %v", path, what, err)
	}
}

func TestOpenFileRefusesSymlink(t *testing.T) {
	v := newVictim(t)
	link := filepath.Join(t.TempDir(), "state")
	if err := os.Symlink(v.path, link); err != nil {
		t.Fatal(err)
	}
	for _, flag := range []int{os.O_RDWR | os.O_CREATE, os.O_WRONLY | os.O_CREATE | os.O_TRUNC, os.O_RDONLY} {
		f, err := OpenFile(link, flag, 0o600)
		if err == nil {
			f.Close()
		}
		wantRefused(t, err, link, "symbolic link")
	}
	_, err := ReadFile(link)
	wantRefused(t, err, link, "symbolic link")
	v.check(t)
}

func TestOpenFileRefusesSpecialFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	dev := filepath.Join(dir, "null")
	if err := unix.Mknod(dev, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	for path, what := range map[string]string{fifo: "fifo", dev: "character device", sub: "directory"} {
		// Write-only on a fifo would block without a reader: it must not.
		done := make(chan error, 1)
		go func() {
			f, err := OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
			if err == nil {
				f.Close()
			}
			done <- err
		}()
		select {
		case err := <-done:
			wantRefused(t, err, path, what)
		case <-time.After(10 * time.Second):
			t.Fatalf("OpenFile(%s) blocked", path)
		}
		wantRefused(t, WriteFileAtomic(path, []byte("x"), 0o600), path, what)
	}
}

func TestOpenFileRefusesHardLink(t *testing.T) {
	v := newVictim(t)
	link := filepath.Join(filepath.Dir(v.path), "lock")
	if err := os.Link(v.path, link); err != nil {
		t.Fatal(err)
	}
	f, err := OpenFile(link, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err == nil {
		f.Close()
	}
	wantRefused(t, err, link, "hard links")
	v.check(t)
}

func TestWriteFileAtomicRefusesSymlink(t *testing.T) {
	v := newVictim(t)
	link := filepath.Join(t.TempDir(), "metrics.prom")
	if err := os.Symlink(v.path, link); err != nil {
		t.Fatal(err)
	}
	wantRefused(t, WriteFileAtomic(link, []byte("new\n"), 0o644), link, "symbolic link")
	v.check(t)
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the planted link should be left as it is: %v %v", fi, err)
	}
	entries, _ := os.ReadDir(filepath.Dir(link))
	if len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
}

// Directories the admin names may be symbolic links: followed.
func TestWriteThroughSymlinkedDirectory(t *testing.T) {
	real := t.TempDir()
	dirLink := filepath.Join(t.TempDir(), "state")
	if err := os.Symlink(real, dirLink); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dirLink, "stopped-vms.json")
	if err := WriteFileAtomic(path, []byte("one\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(path, []byte("two\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	got, err := ReadFile(filepath.Join(real, "stopped-vms.json"))
	if err != nil || string(got) != "two\n" {
		t.Fatalf("got %q, %v", got, err)
	}
	if fi, _ := os.Stat(path); fi.Mode() != 0o640 {
		t.Errorf("mode %v, want 0640", fi.Mode())
	}
	f, err := OpenFile(filepath.Join(dirLink, "backup.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if entries, _ := os.ReadDir(real); len(entries) != 2 {
		t.Errorf("want the file and the lock in %s, got %v", real, entries)
	}
}
