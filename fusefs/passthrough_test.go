package fusefs_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/zfs"
)

func (w *world) mountWith(t *testing.T, opts fusefs.Options) (*fusefs.Mount, string) {
	t.Helper()
	dir := t.TempDir()
	build := func(ctx context.Context) (*restore.Timeline, []error) { return restore.BuildTimeline(ctx, w.sources) }
	m, err := fusefs.MountTimeline(context.Background(), dir, build, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	return m, dir
}

// A local snapshot's file is read by the kernel directly (FUSE
// passthrough, its backing file in a zfs-fuse clone): no READ reaches the
// process, the bytes are the snapshot's, and the clone and hold last as
// long as the file is open. A kopia-only file is still served by the
// process, and with NoPassthrough everything is.
func TestPassthrough(t *testing.T) {
	w := newWorld(t)
	w.localC.passthrough.Store(true)
	ctx := context.Background()
	m, dir := w.mountWith(t, fusefs.Options{Refresh: time.Minute})
	local := filepath.Join(dir, w.snaps[3].Name, "images", "disk.img")

	// Two opens of the same file at once share the backing file.
	f1, err := os.Open(local)
	if err != nil {
		t.Fatal(err)
	}
	// Closed before the unmount of a failed test: an unmount waits for
	// the files open on the mount.
	t.Cleanup(func() { f1.Close() })
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			if got := copyOut(t, local); !bytes.Equal(got, w.disk[3]) {
				t.Errorf("disk.img read with passthrough differs (%d bytes)", len(got))
			}
		})
	}
	wg.Wait()
	st := m.Stats()
	t.Logf("after the local reads: %+v", st)
	if st.PassthroughOpens != 3 || st.PassthroughRefused != 0 {
		t.Errorf("passthrough opens %d, refused %d; want 3 and 0", st.PassthroughOpens, st.PassthroughRefused)
	}
	if st.Reads != 0 {
		t.Errorf("%d READ requests reached the process for passthrough opens", st.Reads)
	}

	// While a file is open, its snapshot carries this process's hold.
	tag, err := restore.ProcessHoldTag()
	if err != nil {
		t.Fatal(err)
	}
	if !w.held(t, w.snaps[3].FullName(), tag) {
		t.Errorf("%s is open through the mount but not held with %s", w.snaps[3].FullName(), tag)
	}
	f1.Close()

	// A kopia-only file: served by the process.
	old := filepath.Join(dir, w.snaps[0].Name, "images", "disk.img")
	if got := copyOut(t, old); !bytes.Equal(got, w.disk[0]) {
		t.Errorf("disk.img from kopia differs (%d bytes)", len(got))
	}
	st2 := m.Stats()
	if st2.PassthroughOpens != st.PassthroughOpens || st2.Reads == 0 || st2.ReadBytes < diskSize {
		t.Errorf("after the kopia read: %+v; want no new passthrough open and the file's bytes read here", st2)
	}

	if err := m.Unmount(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, "zfs", "list", "-H", "-o", "name", "-r", w.pool.Name).CombinedOutput()
	if err != nil {
		t.Fatalf("zfs list: %v: %s", err, out)
	}
	if strings.Contains(string(out), zfs.ClonePrefix) {
		t.Errorf("clones left behind:\n%s", out)
	}
	if w.held(t, w.snaps[3].FullName(), tag) {
		t.Errorf("%s still held after unmount", w.snaps[3].FullName())
	}

	// Passthrough off: the same file, every byte through the process.
	m, dir = w.mountWith(t, fusefs.Options{Refresh: time.Minute, NoPassthrough: true})
	if got := copyOut(t, filepath.Join(dir, w.snaps[2].Name, "images", "disk.img")); !bytes.Equal(got, w.disk[2]) {
		t.Errorf("disk.img without passthrough differs (%d bytes)", len(got))
	}
	if st := m.Stats(); st.PassthroughOpens != 0 || st.ReadBytes < diskSize || st.Opens != 1 {
		t.Errorf("without passthrough: %+v", st)
	}
}

func (w *world) held(t *testing.T, snapshot, tag string) bool {
	t.Helper()
	held, err := w.pool.ZFS.HoldsWithPrefix(context.Background(), w.dataset, restore.RestoreHoldPrefix)
	if err != nil {
		t.Fatalf("holds of %s: %v", w.dataset, err)
	}
	return slices.Contains(held[snapshot], tag)
}

// fileSource is a source of one snapshot holding one file, disk.img,
// served from path on this host (a restore.LocalFile).
type fileSource struct {
	snap restore.SourceSnapshot
	path string
}

func (s fileSource) Name() string       { return "file" }
func (s fileSource) Kind() restore.Kind { return restore.KindLocal }
func (s fileSource) Snapshots(context.Context) ([]restore.SourceSnapshot, error) {
	return []restore.SourceSnapshot{s.snap}, nil
}

func (s fileSource) Open(context.Context, restore.SourceSnapshot) (restore.Tree, error) {
	return fileTree{s.path}, nil
}

type fileTree struct{ path string }

func (t fileTree) Stat(_ context.Context, rel string) (restore.FileInfo, error) {
	fi, err := os.Stat(t.path)
	if err != nil {
		return restore.FileInfo{}, err
	}
	switch rel {
	case ".":
		return restore.FileInfo{Name: ".", Mode: os.ModeDir | 0o755, ModTime: fi.ModTime()}, nil
	case "disk.img":
		return restore.FileInfo{Name: rel, Size: fi.Size(), Mode: 0o644, ModTime: fi.ModTime()}, nil
	}
	return restore.FileInfo{}, os.ErrNotExist
}

func (t fileTree) ReadDir(ctx context.Context, rel string) ([]restore.FileInfo, error) {
	fi, err := t.Stat(ctx, "disk.img")
	return []restore.FileInfo{fi}, err
}

func (t fileTree) OpenFile(_ context.Context, rel string) (restore.File, error) {
	f, err := os.Open(t.path)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return localFile{f, fi.Size()}, nil
}

func (fileTree) Close() error { return nil }

type localFile struct {
	*os.File
	size int64
}

func (f localFile) Size() int64      { return f.size }
func (f localFile) OSFile() *os.File { return f.File }

// The kernel refuses a backing file stacked too deep: a file on another
// vmhistory mount (a FUSE filesystem using passthrough, stack depth 1)
// cannot back a file of a mount of depth 1 (ELOOP). The open then falls
// back to reads through the process, with the same bytes; a plain file
// (depth 0) is taken.
func TestPassthroughRefusedFallsBack(t *testing.T) {
	w := newWorld(t)
	_, inner := w.mountWith(t, fusefs.Options{Refresh: time.Minute})
	snap := restore.SourceSnapshot{SnapshotRef: restore.SnapshotRef{Dataset: "other", Name: "s1", GUID: 1, Time: time.Now()}, ID: "s1"}
	mountOne := func(path string) (*fusefs.Mount, []byte) {
		dir := t.TempDir()
		src := fileSource{snap: snap, path: path}
		build := func(ctx context.Context) (*restore.Timeline, []error) {
			return restore.BuildTimeline(ctx, []restore.Source{src})
		}
		m, err := fusefs.MountTimeline(context.Background(), dir, build, fusefs.Options{Refresh: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Unmount() })
		return m, copyOut(t, filepath.Join(dir, "s1", "disk.img"))
	}

	m, got := mountOne(filepath.Join(inner, w.snaps[3].Name, "images", "disk.img"))
	if !bytes.Equal(got, w.disk[3]) {
		t.Errorf("file over a vmhistory mount differs (%d bytes)", len(got))
	}
	if st := m.Stats(); st.PassthroughOpens != 0 || st.PassthroughRefused != 1 || st.ReadBytes < diskSize {
		t.Errorf("backing file on a FUSE mount of depth 1: %+v; want passthrough refused and the bytes read here", st)
	}

	plain := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(plain, w.disk[1], 0o644); err != nil {
		t.Fatal(err)
	}
	m, got = mountOne(plain)
	if !bytes.Equal(got, w.disk[1]) {
		t.Errorf("plain file differs (%d bytes)", len(got))
	}
	if st := m.Stats(); st.PassthroughOpens != 1 || st.Reads != 0 {
		t.Errorf("backing file on a plain filesystem: %+v; want passthrough", st)
	}
}
