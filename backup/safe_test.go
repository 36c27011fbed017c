package backup

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/safefile"
)

// planted is a symbolic link at a file the backup writes, to a file of
// someone else's, which must come through unchanged.
type planted struct {
	link, target string
	data         []byte
	mtime        time.Time
}

func plant(t *testing.T, link string) *planted {
	t.Helper()
	p := &planted{link: link, target: filepath.Join(t.TempDir(), "precious"), data: []byte("precious\n"),
		mtime: time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)}
	if err := os.WriteFile(p.target, p.data, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(p.target, p.mtime, p.mtime); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(link), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(p.target, link); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *planted) check(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, safefile.ErrNotRegular) || !strings.Contains(err.Error(), p.link) {
		t.Errorf("%s through a planted symlink: %v, want a refusal naming %s", what, err, p.link)
	}
	got, rerr := os.ReadFile(p.target)
	fi, serr := os.Stat(p.target)
	if rerr != nil || serr != nil || !bytes.Equal(got, p.data) || fi.Mode().Perm() != 0o640 || !fi.ModTime().Equal(p.mtime) {
		t.Errorf("%s changed the link's target: %q %v %v", what, got, fi.Mode(), fi.ModTime())
	}
	if fi, err := os.Lstat(p.link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("%s replaced the planted link (%v)", what, err)
	}
}

func TestLockRefusesPlantedSymlink(t *testing.T) {
	dir := t.TempDir()
	p := plant(t, filepath.Join(dir, "backup.lock"))
	l, err := AcquireLock(dir)
	if err == nil {
		l.Release()
	}
	p.check(t, "lock", err)
}

func TestLockRefusesFifo(t *testing.T) {
	dir := t.TempDir()
	if err := unix.Mkfifo(filepath.Join(dir, "backup.lock"), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := AcquireLock(dir)
	if err == nil {
		l.Release()
	}
	if !errors.Is(err, safefile.ErrNotRegular) || !strings.Contains(err.Error(), "fifo") {
		t.Errorf("lock on a fifo: %v, want a refusal", err)
	}
}

func TestStoppedVMsRefusesPlantedSymlink(t *testing.T) {
	dir := t.TempDir()
	s, err := LoadStoppedVMs(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Begin("run1"); err != nil {
		t.Fatal(err)
	}
	p := plant(t, filepath.Join(dir, stoppedVMsFile))
	p.check(t, "stopped-VM record", s.Add(StoppedVM{Name: "web", Mode: "managedsave"}))
	_, err = LoadStoppedVMs(dir)
	p.check(t, "loading the stopped-VM record", err)
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("temporary files left in the state directory: %v", entries)
	}
}

func TestMetricsTextfileRefusesPlantedSymlink(t *testing.T) {
	dir := t.TempDir()
	r := &Report{Started: time.Now(), Finished: time.Now(), Success: true}
	path := filepath.Join(dir, "vmhistory.prom")
	if err := r.WriteTextfile(path, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o644 {
		t.Errorf("textfile mode %v, want 0644 (node_exporter reads it)", fi.Mode())
	}
	if b, _ := os.ReadFile(path); !bytes.Contains(b, []byte("vmhistory_backup_success 1")) {
		t.Errorf("textfile:\n%s", b)
	}
	os.Remove(path)
	p := plant(t, path)
	p.check(t, "metrics textfile", r.WriteTextfile(path, time.Time{}))

	// The outcome record in the state directory, likewise.
	state := t.TempDir()
	o := plant(t, filepath.Join(state, lastSuccessFile))
	if got := RecordOutcome(state, r); !got.Equal(r.Finished) && !got.IsZero() {
		t.Errorf("RecordOutcome returned %v", got)
	}
	o.check(t, "outcome record", safefile.CheckRegular(o.link))
}
