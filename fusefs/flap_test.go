package fusefs_test

import (
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestCpFromMountWhileReplicaSSHDFlaps: cp of a file the replica holds
// (kopia made to fail every read, so only the replica can serve it) while
// the replica's sshd is stopped and started again every 3 s: cp waits
// through each outage and completes with identical bytes.
func TestCpFromMountWhileReplicaSSHDFlaps(t *testing.T) {
	w := newWorldWith(t, worldOptions{replica: true, diskSize: 8<<20 + 4321, nights: 2})
	_, dir := w.mount(t, time.Minute)
	path := filepath.Join(dir, w.snaps[0].Name, "images", "disk.img")
	errKopiaAway := errors.New("kopia made unavailable by the test")
	w.kopiaC.setOnRead(func(off int64, n int) (int, error) { return 0, errKopiaAway })
	defer w.kopiaC.setOnRead(nil)
	// Reads paced to 1.5 MiB/s, so that the 8 MiB copy spans at least two
	// outages (3 s down, 3 s up).
	w.replicaC.setOnRead(func(off int64, n int) (int, error) {
		time.Sleep(time.Duration(n) * time.Second / (3 << 19))
		return n, nil
	})
	defer w.replicaC.setOnRead(nil)

	var outages atomic.Int32
	done := make(chan struct{})
	var flapper sync.WaitGroup
	flapper.Go(func() {
		for {
			select {
			case <-done:
				return
			case <-time.After(time.Second):
			}
			w.sshd.Stop()
			outages.Add(1)
			select {
			case <-done:
			case <-time.After(3 * time.Second):
			}
			w.sshd.Restart()
			select {
			case <-done:
				return
			case <-time.After(3 * time.Second):
			}
		}
	})
	dst := filepath.Join(t.TempDir(), "disk.img")
	start := time.Now()
	out, err := exec.Command("/bin/cp", path, dst).CombinedOutput()
	close(done)
	flapper.Wait()
	t.Logf("cp took %v across %d outages; replica served %d bytes", time.Since(start).Round(time.Millisecond), outages.Load(), w.replicaC.bytes.Load())
	if err != nil {
		t.Fatalf("cp while the replica flaps: %v: %s", err, out)
	}
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(w.disk[0]) {
		t.Fatalf("cp while the replica flaps: %d bytes, sha256 differs from the snapshot's file", len(got))
	}
	if outages.Load() < 2 {
		t.Errorf("the copy spanned %d outages, want at least 2", outages.Load())
	}
}
