package fusefs_test

import (
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/fusefs"
)

var errInjected = errors.New("injected read error")

// failAt is where the first source fails in the failover tests: past the
// first read-ahead of cp, not on a page or chunk boundary.
const failAt = 1_234_567

// cpAcrossFailover runs /bin/cp of path (on the mount) to a temporary
// file while the source failing fails mid-read (set up by the caller
// through failing's hook, which must set tripped), and checks that the
// copy completes with the bytes of want, that failing served between
// minFailing and maxFailing bytes and kopia the rest, and
// that the file showed kopia as its serving source meanwhile: the first
// kopia read is held until the test has read user.vmhistory.source.
func cpAcrossFailover(t *testing.T, w *world, path string, want []byte, failing *counters, tripped *atomic.Bool, minFailing, maxFailing int64) {
	t.Helper()
	kopiaReading := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	w.kopiaC.setOnRead(func(off int64, n int) (int, error) {
		once.Do(func() {
			close(kopiaReading)
			select {
			case <-release:
			case <-time.After(30 * time.Second): // the test gave up; let cp end
			}
		})
		return n, nil
	})
	defer w.kopiaC.setOnRead(nil)
	failingBefore, kopiaBefore := failing.bytes.Load(), w.kopiaC.bytes.Load()

	dst := filepath.Join(t.TempDir(), "disk.img")
	cp := exec.Command("/bin/cp", path, dst)
	out := &lockedBuffer{}
	cp.Stdout, cp.Stderr = out, out
	if err := cp.Start(); err != nil {
		t.Fatal(err)
	}
	cpDone := make(chan error, 1)
	go func() { cpDone <- cp.Wait() }()
	select {
	case <-kopiaReading:
		if got := getxattr(t, path, fusefs.XattrSource); got != "kopia" {
			t.Errorf("%s while cp reads past the fault = %q, want kopia", fusefs.XattrSource, got)
		}
		close(release)
	case err := <-cpDone:
		close(release)
		t.Fatalf("cp ended (%v: %s) without kopia being read: the fault never struck (tripped %v)", err, out, tripped.Load())
	case <-time.After(60 * time.Second):
		close(release)
		t.Fatal("cp never reached kopia")
	}
	select {
	case err := <-cpDone:
		if err != nil {
			t.Fatalf("cp across the failover: %v: %s", err, out)
		}
	case <-time.After(2 * time.Minute):
		cp.Process.Kill()
		t.Fatal("cp did not finish")
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(want) {
		t.Fatalf("cp across the failover: %d bytes, sha256 differs from the snapshot's file (%d bytes)", len(got), len(want))
	}
	if !tripped.Load() {
		t.Error("the fault never struck")
	}
	fromFailing := failing.bytes.Load() - failingBefore
	fromKopia := w.kopiaC.bytes.Load() - kopiaBefore
	t.Logf("served: %d bytes by the failing source, %d by kopia", fromFailing, fromKopia)
	if fromFailing < minFailing || fromFailing > maxFailing {
		t.Errorf("the failing source served %d bytes, want %d to %d", fromFailing, minFailing, maxFailing)
	}
	if fromKopia == 0 || fromFailing+fromKopia < int64(len(want)) {
		t.Errorf("kopia served %d bytes, the failing source %d: short of the file's %d", fromKopia, fromFailing, len(want))
	}
}

// copyOutUncached reads the file at path after dropping its pages from
// the page cache (the mount keeps them across opens), so that every byte
// is read from the sources again.
func copyOutUncached(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type lockedBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.b = append(b.b, p...)
	return len(p), nil
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.b)
}

// The local source fails reads past failAt (a disk error, a snapshot
// destroyed under the reader) in the middle of a cp from the mount: cp
// completes from kopia with identical bytes.
func TestCpFromMountAcrossLocalFault(t *testing.T) {
	w := newWorldWith(t, worldOptions{nights: 2}) // night 0 in kopia only, night 1 here and in kopia
	_, dir := w.mount(t, time.Minute)
	path := filepath.Join(dir, w.snaps[1].Name, "images", "disk.img")
	if got := getxattr(t, path, fusefs.XattrSources); got != "local,kopia" {
		t.Fatalf("%s = %q, want local,kopia", fusefs.XattrSources, got)
	}
	var tripped atomic.Bool
	w.localC.setOnRead(func(off int64, n int) (int, error) {
		if off+int64(n) <= failAt {
			return n, nil
		}
		tripped.Store(true)
		return int(max(0, failAt-off)), errInjected
	})
	cpAcrossFailover(t, w, path, w.disk[1], w.localC, &tripped, 1, failAt)

	// The next open starts on the local source again; without the fault
	// it serves the whole file.
	w.localC.setOnRead(nil)
	before := w.localC.bytes.Load()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if got := getxattr(t, path, fusefs.XattrSource); got != "local" {
		t.Errorf("%s of a new open = %q, want local", fusefs.XattrSource, got)
	}
	if got := copyOutUncached(t, path); sha256.Sum256(got) != sha256.Sum256(w.disk[1]) {
		t.Error("the file read again after the fault differs")
	}
	if got := w.localC.bytes.Load() - before; got != int64(len(w.disk[1])) {
		t.Errorf("the local source served %d bytes after the fault, want the whole file (%d)", got, len(w.disk[1]))
	}
}

// The replica's sshd dies in the middle of a cp from the mount of a
// snapshot held by the replica (read over sftp) and kopia: cp completes
// from kopia with identical bytes. sshd is stopped from inside the first
// replica read that starts once the replica has served failAt bytes, so
// the connection drops mid-cp, with that read (and any other in flight)
// failing on the dead connection.
func TestCpFromMountAcrossReplicaSSHDStop(t *testing.T) {
	// 8 MiB: the kernel's read-ahead (1 MiB requests, a few in flight)
	// cannot have asked for the whole file before the replica served
	// failAt bytes.
	w := newWorldWith(t, worldOptions{replica: true, diskSize: 8<<20 + 4321, nights: 2})
	_, dir := w.mount(t, time.Minute)
	path := filepath.Join(dir, w.snaps[0].Name, "images", "disk.img")
	if got := getxattr(t, path, fusefs.XattrSources); got != "replica-ssh,kopia" {
		t.Fatalf("%s = %q, want replica-ssh,kopia", fusefs.XattrSources, got)
	}
	var tripped atomic.Bool
	var once sync.Once
	w.replicaC.setOnRead(func(off int64, n int) (int, error) {
		if w.replicaC.bytes.Load() >= failAt {
			once.Do(func() {
				w.sshd.Stop()
				tripped.Store(true)
			})
		}
		return n, nil
	})
	cpAcrossFailover(t, w, path, w.disk[0], w.replicaC, &tripped, failAt, int64(len(w.disk[0]))-1)
	w.replicaC.setOnRead(nil)

	// The replica comes back: a new open reads from it again, over a
	// new ssh connection.
	w.sshd.Restart()
	before := w.replicaC.bytes.Load()
	if got := copyOutUncached(t, path); sha256.Sum256(got) != sha256.Sum256(w.disk[0]) {
		t.Error("read from the replica after it came back differs")
	}
	if got := w.replicaC.bytes.Load() - before; got != int64(len(w.disk[0])) {
		t.Errorf("the replica served %d bytes after it came back, want the whole file (%d)", got, len(w.disk[0]))
	}
}
