package restore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"sync"
	"testing"

	"github.com/vmhistory/vmhistory/restore"
)

// faultSource wraps a source so that its files fail reads past failAt: an
// injected fault, standing for a disk error or a snapshot destroyed under
// the reader.
type faultSource struct {
	restore.Source
	failAt int64
}

var errInjected = errors.New("injected read error")

func (s faultSource) Open(ctx context.Context, snap restore.SourceSnapshot) (restore.Tree, error) {
	t, err := s.Source.Open(ctx, snap)
	if err != nil {
		return nil, err
	}
	return faultTree{t, s.failAt}, nil
}

type faultTree struct {
	restore.Tree
	failAt int64
}

func (t faultTree) OpenFile(ctx context.Context, rel string) (restore.File, error) {
	f, err := t.Tree.OpenFile(ctx, rel)
	if err != nil {
		return nil, err
	}
	return faultFile{f, t.failAt}, nil
}

type faultFile struct {
	restore.File
	failAt int64
}

func (f faultFile) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) <= f.failAt {
		return f.File.ReadAt(p, off)
	}
	if off >= f.failAt {
		return 0, errInjected
	}
	n, err := f.File.ReadAt(p[:f.failAt-off], off)
	if err == nil {
		err = errInjected
	}
	return n, err
}

// withSources returns a copy of e served by the given sources instead.
func withSources(e *restore.Entry, keep ...restore.EntrySource) *restore.Entry {
	c := *e
	c.Sources = keep
	return &c
}

func sourceOf(t *testing.T, e *restore.Entry, name string) restore.EntrySource {
	t.Helper()
	for _, es := range e.Sources {
		if es.Source.Name() == name {
			return es
		}
	}
	t.Fatalf("%s is not held by %s", e.Name, name)
	return restore.EntrySource{}
}

func TestFailoverAfterInjectedFault(t *testing.T) {
	ctx := context.Background()
	w := newTLWorld(t)
	tl, errs := restore.BuildTimeline(ctx, w.sources())
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	e := tl.Entries[1]
	const failAt = 700_000
	local := sourceOf(t, e, "local")
	local.Source = faultSource{local.Source, failAt}
	entry := withSources(e, local, sourceOf(t, e, "replica"), sourceOf(t, e, "kopia"))

	cache := restore.NewTreeCache()
	defer cache.Close()
	f, err := restore.OpenFile(ctx, entry, "images/disk.img", cache)
	if err != nil {
		t.Fatal(err)
	}
	if f.Serving() != "local" {
		t.Errorf("serving %q, want local", f.Serving())
	}
	// Concurrent reads of 64 KiB pieces, as the copy engine does.
	got := make([]byte, f.Size())
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			for off := int64(g) * 65536; off < f.Size(); off += 8 * 65536 {
				end := min(off+65536, f.Size())
				if n, err := f.ReadAt(got[off:end], off); err != nil && !(errors.Is(err, io.EOF) && n == int(end-off)) {
					errc <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if !bytes.Equal(got, w.disk[1]) {
		t.Fatal("bytes read across the failover differ from the file")
	}
	if f.Serving() != "replica" {
		t.Errorf("serving %q after the fault, want replica", f.Serving())
	}
	st := f.Stats()
	if st[0].Bytes == 0 || st[0].Bytes > failAt || st[0].Failed == "" || st[1].Bytes == 0 || st[2].Bytes != 0 {
		t.Errorf("per-source bytes %+v: want local ≤ %d and failed, the rest from replica", st, failAt)
	}
	if sum := st[0].Bytes + st[1].Bytes; sum != f.Size() {
		t.Errorf("sources served %d bytes in all, the file has %d", sum, f.Size())
	}
	// A read after the end.
	if n, err := f.ReadAt(make([]byte, 10), f.Size()-4); n != 4 || err != io.EOF {
		t.Errorf("read over the end: %d, %v", n, err)
	}
	if err := f.Close(); err != nil {
		t.Error(err)
	}

	// A missing file is one clear error, from the first source.
	if _, err := restore.OpenFile(ctx, entry, "images/missing", cache); err == nil || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if _, err := restore.OpenFile(ctx, entry, "images/escape", cache); !errors.Is(err, restore.ErrNotRegular) {
		t.Errorf("link: %v", err)
	}
	if _, err := restore.OpenFile(ctx, entry, "../../etc/passwd", cache); err == nil {
		t.Error("../../etc/passwd opened")
	}
}

func TestFailoverWhenReplicaSSHDStops(t *testing.T) {
	ctx := context.Background()
	w := newTLWorld(t)
	tl, errs := restore.BuildTimeline(ctx, w.sources())
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	e := tl.Entries[0] // pruned here: on the replica and in kopia
	entry := withSources(e, sourceOf(t, e, "replica-ssh"), sourceOf(t, e, "kopia"))
	f, err := restore.OpenFile(ctx, entry, "images/disk.img", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Serving() != "replica-ssh" {
		t.Fatalf("serving %q, want replica-ssh", f.Serving())
	}
	got := make([]byte, f.Size())
	const half = 1 << 20
	if _, err := f.ReadAt(got[:half], 0); err != nil {
		t.Fatal(err)
	}
	w.sshd.Stop()
	for off := int64(half); off < f.Size(); off += 128 << 10 {
		end := min(off+128<<10, f.Size())
		if _, err := f.ReadAt(got[off:end], off); err != nil {
			t.Fatalf("read at %d after sshd stopped: %v", off, err)
		}
	}
	if !bytes.Equal(got, w.disk[0]) {
		t.Fatal("bytes read across the failover differ from the file")
	}
	st := f.Stats()
	if f.Serving() != "kopia" || st[0].Bytes < half || st[0].Failed == "" || st[1].Bytes == 0 || st[0].Bytes+st[1].Bytes != f.Size() {
		t.Errorf("serving %q, per-source bytes %+v", f.Serving(), st)
	}
	// The failed replica's snapshot was closed while the replica was
	// away, which could not remove the clone and the hold there; once it
	// is back, the source's next listing does.
	if err := f.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	w.sshd.Restart()
	if _, err := w.replicaSSH.Snapshots(ctx); err != nil {
		t.Fatal(err)
	}
	assertNoClonesOrHolds(t, w.dst, w.replicaDataset)
	// And the source reads again over a new session.
	tree, err := w.replicaSSH.Open(ctx, sourceOf(t, e, "replica-ssh").Snapshot)
	if err != nil {
		t.Fatal(err)
	}
	rf, err := tree.OpenFile(ctx, "images/disk.img")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, rf), w.disk[0]) {
		t.Error("replica over a new sftp session reads other bytes")
	}
	rf.Close()
	if err := tree.Close(); err != nil {
		t.Error(err)
	}
	assertNoClonesOrHolds(t, w.dst, w.replicaDataset)
}
