package restore_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/safefile"
)

// target is a file a planted symbolic link points to: a restore must
// leave its bytes, mode and mtime as they were.
type target struct {
	path  string
	data  []byte
	mode  os.FileMode
	mtime time.Time
}

func newTarget(t *testing.T, dir, name string) *target {
	t.Helper()
	tg := &target{path: filepath.Join(dir, name), data: []byte("not yours: " + name + "\n"), mode: 0o640,
		mtime: time.Date(2021, 6, 7, 8, 9, 10, 0, time.UTC)}
	if err := os.WriteFile(tg.path, tg.data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tg.path, tg.mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(tg.path, tg.mtime, tg.mtime); err != nil {
		t.Fatal(err)
	}
	return tg
}

func (tg *target) assertUnchanged(t *testing.T) {
	t.Helper()
	got, err := os.ReadFile(tg.path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(tg.path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, tg.data) {
		t.Errorf("%s was written through the link: it starts with %q", tg.path, got[:min(len(got), 40)])
	}
	if fi.Mode() != tg.mode || !fi.ModTime().Equal(tg.mtime) {
		t.Errorf("%s changed: mode %v mtime %v, was %v %v", tg.path, fi.Mode(), fi.ModTime(), tg.mode, tg.mtime)
	}
}

func symlink(t *testing.T, to, at string) {
	t.Helper()
	if err := os.Symlink(to, at); err != nil {
		t.Fatal(err)
	}
}

// The scenario of issue 11, finding 1: the journal and the partial file
// beside the destination planted as symbolic links to other files.
func TestCopyRefusesPlantedSymlinks(t *testing.T) {
	dir := t.TempDir()
	srcName := filepath.Join(dir, "web.qcow2")
	content := bytes.Repeat([]byte("image "), 200_000)
	if err := os.WriteFile(srcName, content, 0o600); err != nil {
		t.Fatal(err)
	}
	src := openFile(t, srcName)
	id := restore.SourceIdentity{Snapshot: "g", Path: "images/web.qcow2"}
	opts := restore.CopyOptions{Identity: id, Mode: 0o644, ModTime: time.Date(2023, 3, 4, 5, 0, 1, 0, time.UTC)}
	elsewhere := t.TempDir()
	dest := filepath.Join(t.TempDir(), "DEST")
	if err := os.Mkdir(dest, 0o755); err != nil {
		t.Fatal(err)
	}
	final := filepath.Join(dest, "web.qcow2")
	journalTarget := newTarget(t, elsewhere, "journal-target")
	partialTarget := newTarget(t, elsewhere, "partial-target")

	check := func(what string, planted ...string) {
		t.Helper()
		_, err := restore.Copy(context.Background(), src, dest, opts)
		if !errors.Is(err, safefile.ErrNotRegular) {
			t.Fatalf("%s: restore returned %v, want a refusal", what, err)
		}
		named := false
		for _, p := range planted {
			named = named || strings.Contains(err.Error(), p)
		}
		if !named || !strings.Contains(err.Error(), "symbolic link") {
			t.Errorf("%s: the error should name the planted link: %v", what, err)
		}
		journalTarget.assertUnchanged(t)
		partialTarget.assertUnchanged(t)
		if _, err := os.Lstat(final); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: %s exists after a refused restore (%v)", what, final, err)
		}
	}
	symlink(t, journalTarget.path, final+restore.JournalSuffix)
	symlink(t, partialTarget.path, final+restore.PartialSuffix)
	check("both planted", final+restore.JournalSuffix, final+restore.PartialSuffix)

	os.Remove(final + restore.JournalSuffix)
	check("the partial planted", final+restore.PartialSuffix)

	os.Remove(final + restore.PartialSuffix)
	symlink(t, journalTarget.path, final+restore.JournalSuffix)
	check("the journal planted", final+restore.JournalSuffix)

	os.Remove(final + restore.JournalSuffix)
	if _, err := restore.Copy(context.Background(), src, dest, opts); err != nil {
		t.Fatalf("restore once the links are gone: %v", err)
	}
	if got, _ := os.ReadFile(final); !bytes.Equal(got, content) {
		t.Error("restored file differs")
	}
}

// A planted fifo or device beside the destination is refused, without
// blocking on the fifo.
func TestCopyRefusesPlantedSpecialFiles(t *testing.T) {
	dir := t.TempDir()
	srcName := filepath.Join(dir, "vm.img")
	if err := os.WriteFile(srcName, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	src := openFile(t, srcName)
	dest := filepath.Join(t.TempDir(), "vm.img")
	for name, mk := range map[string]func(string) error{
		"fifo":   func(p string) error { return unix.Mkfifo(p, 0o600) },
		"device": func(p string) error { return unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))) },
	} {
		for _, suffix := range []string{restore.PartialSuffix, restore.JournalSuffix} {
			p := dest + suffix
			if err := mk(p); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() {
				_, err := restore.Copy(context.Background(), src, dest, restore.CopyOptions{})
				done <- err
			}()
			select {
			case err := <-done:
				if !errors.Is(err, safefile.ErrNotRegular) || !strings.Contains(err.Error(), p) {
					t.Errorf("%s at %s: restore returned %v, want a refusal naming it", name, p, err)
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("restore blocked on a %s at %s", name, p)
			}
			os.Remove(p)
		}
	}
	// A device as the destination itself: refused even with Force.
	if err := unix.Mknod(dest, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	if _, err := restore.Copy(context.Background(), src, dest, restore.CopyOptions{Force: true}); err == nil || !strings.Contains(err.Error(), "character device") {
		t.Errorf("restore over a device with force: %v, want a refusal", err)
	}
	if fi, err := os.Lstat(dest); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		t.Errorf("the device was replaced: %v %v", fi, err)
	}
}

// The destination itself a symbolic link: refused without Force; with
// Force the link is replaced by the restored file, its target untouched.
func TestCopyNeverWritesThroughDestinationSymlink(t *testing.T) {
	dir := t.TempDir()
	srcName := filepath.Join(dir, "vm.img")
	content := []byte("restored content\n")
	if err := os.WriteFile(srcName, content, 0o600); err != nil {
		t.Fatal(err)
	}
	src := openFile(t, srcName)
	tg := newTarget(t, t.TempDir(), "passwd")
	dest := filepath.Join(t.TempDir(), "vm.img")
	symlink(t, tg.path, dest)
	opts := restore.CopyOptions{Identity: restore.SourceIdentity{Path: "vm.img"}}
	if _, err := restore.Copy(context.Background(), src, dest, opts); !errors.Is(err, restore.ErrDestExists) {
		t.Errorf("restore onto a symlink: %v, want ErrDestExists", err)
	}
	tg.assertUnchanged(t)
	opts.Force = true
	if _, err := restore.Copy(context.Background(), src, dest, opts); err != nil {
		t.Fatalf("restore onto a symlink with force: %v", err)
	}
	tg.assertUnchanged(t)
	fi, err := os.Lstat(dest)
	if err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("%s should now be the restored regular file: %v %v", dest, fi, err)
	}
	if got, _ := os.ReadFile(dest); !bytes.Equal(got, content) {
		t.Errorf("restored %q", got)
	}
}

// A DEST directory that is a symbolic link to a directory is the admin's
// choice: the restore goes into the directory it points to.
func TestCopyIntoSymlinkedDirectory(t *testing.T) {
	dir := t.TempDir()
	srcName := filepath.Join(dir, "vm.img")
	content := []byte("restored content\n")
	if err := os.WriteFile(srcName, content, 0o600); err != nil {
		t.Fatal(err)
	}
	real := t.TempDir()
	link := filepath.Join(t.TempDir(), "restore-here")
	symlink(t, real, link)
	res, err := restore.Copy(context.Background(), openFile(t, srcName), link, restore.CopyOptions{Identity: restore.SourceIdentity{Path: "images/vm.img"}})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(real, "vm.img")); !bytes.Equal(got, content) {
		t.Errorf("restore through a symlinked directory went to %s", res.Dest)
	}
	assertNoLeftovers(t, filepath.Join(real, "vm.img"))
}

// A destination directory other users can write gets a warning (they
// could replace the restored file); one only its owner writes does not.
func TestCopyWarnsOfSharedDestinationDirectory(t *testing.T) {
	var logs bytes.Buffer
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&logs, nil)))
	t.Cleanup(func() { slog.SetDefault(old) })
	srcName := filepath.Join(t.TempDir(), "vm.img")
	if err := os.WriteFile(srcName, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	private := t.TempDir()
	if err := os.Chmod(private, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := restore.Copy(context.Background(), openFile(t, srcName), filepath.Join(private, "a.img"), restore.CopyOptions{}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs.String(), "writable by other users") {
		t.Errorf("warning for a 0755 directory: %s", logs.String())
	}
	shared := t.TempDir()
	if err := os.Chmod(shared, 0o1777); err != nil {
		t.Fatal(err)
	}
	if _, err := restore.Copy(context.Background(), openFile(t, srcName), filepath.Join(shared, "a.img"), restore.CopyOptions{}); err != nil {
		t.Fatal(err)
	}
	if out := logs.String(); !strings.Contains(out, "level=WARN") || !strings.Contains(out, "writable by other users") || !strings.Contains(out, shared) {
		t.Errorf("no warning naming the shared directory %s: %q", shared, out)
	}
}
