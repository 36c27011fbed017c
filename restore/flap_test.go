package restore_test

import (
	"bytes"
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/restore"
)

// TestFailoverWhenReplicaSSHDFlaps reads a file that only the replica (over
// ssh) holds while the replica's sshd is stopped and started again every
// 3 s: every read waits for the replica to come back and the file comes out
// byte-identical, the source tried again after each outage.
func TestFailoverWhenReplicaSSHDFlaps(t *testing.T) {
	ctx := context.Background()
	w := newTLWorld(t)
	tl, errs := restore.BuildTimeline(ctx, w.sources())
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	e := tl.Entries[0]
	entry := withSources(e, sourceOf(t, e, "replica-ssh"))
	f, err := restore.OpenFile(ctx, entry, "images/disk.img", restore.NewTreeCache())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	const piece = 64 << 10
	got := make([]byte, f.Size())
	if _, err := f.ReadAt(got[:piece], 0); err != nil {
		t.Fatal(err)
	}
	var outages atomic.Int32
	done := make(chan struct{})
	var flapper sync.WaitGroup
	flapper.Go(func() {
		for {
			w.sshd.Stop()
			outages.Add(1)
			select {
			case <-done:
				w.sshd.Restart()
				return
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
	// Paced so that the read spans at least two outages.
	start := time.Now()
	for off := int64(piece); off < f.Size(); off += piece {
		end := min(off+piece, f.Size())
		if _, err := f.ReadAt(got[off:end], off); err != nil {
			close(done)
			flapper.Wait()
			t.Fatalf("read at %d after %d outages: %v", off, outages.Load(), err)
		}
		if outages.Load() < 2 {
			time.Sleep(200 * time.Millisecond)
		}
	}
	close(done)
	flapper.Wait()
	t.Logf("read %d bytes across %d outages in %v; sources %+v", f.Size(), outages.Load(), time.Since(start).Round(time.Millisecond), f.Stats())
	if !bytes.Equal(got, w.disk[0]) {
		t.Fatal("bytes read across the outages differ from the file")
	}
	st := f.Stats()
	if outages.Load() < 2 || len(st) != 1 || st[0].Retries < 2 || st[0].Bytes != f.Size() {
		t.Errorf("%d outages, sources %+v: want the replica tried again after each, serving every byte", outages.Load(), st)
	}
}

// TestFailoverGivesUpAfterRetryWindow: a source that stays away fails the
// read once the retry window has passed without a byte served.
func TestFailoverGivesUpAfterRetryWindow(t *testing.T) {
	ctx := context.Background()
	w := newTLWorld(t)
	tl, errs := restore.BuildTimeline(ctx, w.sources())
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	e := tl.Entries[0]
	// The window runs from the file's open, its last progress: stopping
	// sshd may take a second of it.
	start := time.Now()
	f, err := restore.OpenFile(ctx, withSources(e, sourceOf(t, e, "replica-ssh")), "images/disk.img", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.SetRetryWindow(3 * time.Second)
	w.sshd.Stop()
	_, err = f.ReadAt(make([]byte, 4096), 0)
	took := time.Since(start)
	w.sshd.Restart()
	if err == nil {
		t.Fatal("read succeeded with the only source away")
	}
	if took < 3*time.Second || took > 30*time.Second {
		t.Errorf("gave up after %v, want just past the 3 s window", took)
	}
}
