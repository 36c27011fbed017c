package fusefs_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

const password = "fusefs test password"

const diskSize = 3<<20 + 4321

// countingSource counts the files opened on a source's trees and the
// bytes read from them; onRead, when set, is called before every read
// (to inject a fault or hold a read back).
type countingSource struct {
	restore.Source
	c *counters
}

// counters are what a countingSource saw.
type counters struct {
	opens, bytes atomic.Int64
	// onRead is called with the offset and length of every read, and
	// says how many of the bytes to read and what error to return then
	// (a fault injected after some bytes); nil reads as usual.
	onRead atomic.Pointer[func(off int64, n int) (int, error)]
	// passthrough lets the mount hand the source's local files to the
	// kernel (FUSE passthrough); off by default, since the reads of such
	// files bypass the counters and onRead.
	passthrough atomic.Bool

	mu       sync.Mutex
	prefetch prefetch.Stats // summed over the closed kopia readers
}

func (c *counters) prefetchStats() prefetch.Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.prefetch
}

func (c *counters) setOnRead(f func(off int64, n int) (int, error)) { c.onRead.Store(&f) }

func (s countingSource) Open(ctx context.Context, snap restore.SourceSnapshot) (restore.Tree, error) {
	t, err := s.Source.Open(ctx, snap)
	if err != nil {
		return nil, err
	}
	return countingTree{t, s.c}, nil
}

type countingTree struct {
	restore.Tree
	c *counters
}

func (t countingTree) OpenFile(ctx context.Context, rel string) (restore.File, error) {
	t.c.opens.Add(1)
	f, err := t.Tree.OpenFile(ctx, rel)
	if err != nil {
		return nil, err
	}
	return countingFile{f, t.c}, nil
}

type countingFile struct {
	restore.File
	c *counters
}

func (f countingFile) ReadAt(p []byte, off int64) (int, error) {
	var injected error
	if hook := f.c.onRead.Load(); hook != nil && *hook != nil {
		var allow int
		allow, injected = (*hook)(off, len(p))
		p = p[:allow]
	}
	n := 0
	var err error
	if len(p) > 0 {
		n, err = f.File.ReadAt(p, off)
	}
	f.c.bytes.Add(int64(n))
	if err == nil {
		err = injected
	}
	return n, err
}

// OSFile implements restore.LocalFile when the counters allow passthrough.
func (f countingFile) OSFile() *os.File {
	if lf, ok := f.File.(restore.LocalFile); ok && f.c.passthrough.Load() {
		return lf.OSFile()
	}
	return nil
}

// Close adds a kopia reader's counters to the source's.
func (f countingFile) Close() error {
	if ps, ok := f.File.(interface{ PrefetchStats() prefetch.Stats }); ok {
		st := ps.PrefetchStats()
		f.c.mu.Lock()
		p := &f.c.prefetch
		p.Chunks = st.Chunks
		p.Fetches += st.Fetches
		p.ChunksFetched += st.ChunksFetched
		p.BytesRequested += st.BytesRequested
		p.CacheHits += st.CacheHits
		p.Retries += st.Retries
		p.Fallbacks += st.Fallbacks
		p.MaxBufferedBytes = max(p.MaxBufferedBytes, st.MaxBufferedBytes)
		f.c.mu.Unlock()
	}
	return f.File.Close()
}

// SetReadAhead passes on to the wrapped reader (the kopia prefetcher).
func (f countingFile) SetReadAhead(on bool) {
	if s, ok := f.File.(interface{ SetReadAhead(bool) }); ok {
		s.SetReadAhead(on)
	}
}

type world struct {
	pool    *testenv.Pool
	dataset string
	mnt     string
	snaps   []zfs.Snapshot
	disk    [][]byte
	sources []restore.Source
	// kopia is the kopia source before wrapping: set its Prefetch
	// options before the first mount. kopiaC counts its files and bytes.
	kopia  *restore.KopiaSource
	kopiaC *counters

	// With worldOptions.replica: the replica pool, its sshd and what
	// the replica-ssh source (between local and kopia) saw.
	replicaPool *testenv.Pool
	replicaDS   string
	sshd        *testenv.SSHD
	replicaC    *counters
	localC      *counters
}

// worldOptions shape a world; the zero value is newWorld's.
type worldOptions struct {
	diskSize int // bytes of images/disk.img; 0 means diskSize
	nights   int // 0 means 4
	// replica replicates every night to a second pool, read over ssh
	// (sftp) from a test sshd on 127.0.0.1.
	replica bool
}

// newWorld makes a dataset with four nights: the first uploaded to kopia
// and pruned here (kopia-only), the others local, the last in kopia too.
func newWorld(t *testing.T) *world { return newWorldWith(t, worldOptions{}) }

// newWorldWith makes a dataset with opts.nights nights of images/disk.img
// (each night rewrites a few scattered 64 KiB ranges) and images/note.txt:
// the first and the last uploaded to kopia (FIXED-128K), the first
// pruned here (kopia-only, and on the replica with opts.replica).
func newWorldWith(t *testing.T, opts worldOptions) *world {
	t.Helper()
	if opts.diskSize == 0 {
		opts.diskSize = diskSize
	}
	if opts.nights == 0 {
		opts.nights = 4
	}
	ctx := context.Background()
	w := &world{pool: testenv.NewPool(t, 128+2*opts.diskSize>>20), kopiaC: &counters{}, replicaC: &counters{}, localC: &counters{}}
	w.dataset, w.mnt = w.pool.Dataset(t, "libvirt")
	if err := os.MkdirAll(filepath.Join(w.mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("images/note.txt", filepath.Join(w.mnt, "inner")); err != nil {
		t.Fatal(err)
	}
	if opts.replica {
		w.sshd = testenv.StartSSHD(t)
		// A clone the mount could not remove while sshd was down ("a
		// later run removes it") goes with the pool; its mountpoint
		// directory is removed here, after the pool (cleanups run last
		// first).
		var replicaPool string
		t.Cleanup(func() {
			dirs, _ := filepath.Glob(filepath.Join(testenv.PoolDir, "clones", replicaPool+"_"+zfs.ClonePrefix+"*"))
			for _, d := range dirs {
				os.Remove(d) // only if empty: never a mounted clone's files
			}
		})
		w.replicaPool = testenv.NewPool(t, 128+2*opts.diskSize>>20)
		replicaPool = w.replicaPool.Name
		w.replicaDS = w.replicaPool.Name + "/libvirt"
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "kopia.config")
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(dir, "repo")}, cfg, password, kopiarepo.CreateOptions{
		ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	repo, err := kopiarepo.Open(ctx, cfg, password)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { repo.Close(context.Background()) })

	rng := rand.New(rand.NewPCG(7, 9))
	disk := make([]byte, opts.diskSize)
	for i := 0; i+8 <= len(disk); i += 8 {
		binary.LittleEndian.PutUint64(disk[i:], rng.Uint64())
	}
	for i := len(disk) &^ 7; i < len(disk); i++ {
		disk[i] = byte(rng.Uint32())
	}
	diskPath := filepath.Join(w.mnt, "images", "disk.img")
	for night := range opts.nights {
		var changed [][2]int
		for range 6 {
			off := rng.IntN(len(disk) - 65536)
			for i := off; i < off+65536; i++ {
				disk[i] = byte(rng.Uint32())
			}
			changed = append(changed, [2]int{off, off + 65536})
		}
		w.disk = append(w.disk, bytes.Clone(disk))
		if night == 0 {
			if err := os.WriteFile(diskPath, disk, 0o640); err != nil {
				t.Fatal(err)
			}
		} else if err := patchFile(diskPath, disk, changed); err != nil { // as a VM writes: in place
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(w.mnt, "images", "note.txt"), []byte("night "+strconv.Itoa(night)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		mtime := time.Date(2023, 3, 4+night, 4, 0, 0, 0, time.Local)
		for _, f := range []string{"disk.img", "note.txt"} {
			if err := os.Chtimes(filepath.Join(w.mnt, "images", f), mtime, mtime); err != nil {
				t.Fatal(err)
			}
		}
		s, err := w.pool.ZFS.CreateSnapshot(ctx, w.dataset, "2023-03-0"+strconv.Itoa(4+night)+"_05:00:01", nil)
		if err != nil {
			t.Fatal(err)
		}
		if opts.replica {
			send := zfs.SendOptions{Snapshot: s.FullName()}
			if night > 0 {
				send.From = w.snaps[night-1].FullName()
			}
			if _, err := zfs.Transfer(ctx, w.pool.ZFS, send, w.replicaPool.ZFS, w.replicaDS, zfs.ReceiveOptions{}); err != nil {
				t.Fatalf("replicate night %d: %v", night, err)
			}
			if night == 0 {
				if err := w.replicaPool.ZFS.Set(ctx, w.replicaDS, "readonly", "on"); err != nil {
					t.Fatal(err)
				}
			}
		}
		w.snaps = append(w.snaps, s)
		if night == 0 || night == opts.nights-1 {
			view, err := w.pool.ZFS.OpenSnapshot(ctx, s.FullName())
			if err != nil {
				t.Fatal(err)
			}
			if _, err := repo.Upload(ctx, kopiarepo.UploadRequest{
				Dir: view.Root, SourcePath: w.mnt, Host: "kvmhost", User: "root", StartTime: s.Creation,
				Tags: map[string]string{
					kopiarepo.TagDataset:  s.Dataset,
					kopiarepo.TagSnapshot: s.Name,
					kopiarepo.TagGUID:     strconv.FormatUint(s.GUID, 10),
				},
				Splitter: "FIXED-128K", SkipMaintenance: true,
			}); err != nil {
				t.Fatal(err)
			}
			if err := closeView(ctx, view); err != nil {
				t.Fatal(err)
			}
		}
		if night < opts.nights-1 {
			time.Sleep(1100 * time.Millisecond) // distinct creation times (whole seconds)
		}
	}
	if err := w.pool.ZFS.Destroy(ctx, w.snaps[0].FullName()); err != nil {
		t.Fatal(err)
	}
	local := restore.NewZFSSource("local", restore.KindLocal, w.pool.ZFS, map[string]string{w.dataset: w.dataset})
	t.Cleanup(func() { local.Close() })
	w.kopia = restore.NewKopiaSource(repo, "kvmhost", "root")
	w.sources = []restore.Source{countingSource{local, w.localC}}
	if opts.replica {
		z := zfs.New(w.sshd.SharedRunner(t), zfs.Options{CommandTimeout: time.Minute, CloneMountDir: filepath.Join(testenv.PoolDir, "clones")})
		replica := restore.NewZFSSource("replica-ssh", restore.KindReplica, z, map[string]string{w.dataset: w.replicaDS})
		t.Cleanup(func() { replica.Close() })
		w.sources = append(w.sources, countingSource{replica, w.replicaC})
	}
	w.sources = append(w.sources, countingSource{w.kopia, w.kopiaC})
	return w
}

// patchFile writes the ranges of data into the file at path, in place.
func patchFile(path string, data []byte, ranges [][2]int) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	for _, r := range ranges {
		if _, err := f.WriteAt(data[r[0]:r[1]], int64(r[0])); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

func closeView(ctx context.Context, v *zfs.SnapshotView) error {
	var err error
	for range 20 {
		if err = v.Close(ctx); err == nil || !errors.Is(err, zfs.ErrBusy) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
	return err
}

func (w *world) mount(t *testing.T, refresh time.Duration) (*fusefs.Mount, string) {
	t.Helper()
	return mountSources(t, w.sources, refresh)
}

// mountSources mounts the timeline of sources on a temporary directory,
// unmounted when the test ends.
func mountSources(t *testing.T, sources []restore.Source, refresh time.Duration) (*fusefs.Mount, string) {
	t.Helper()
	dir := t.TempDir()
	build := func(ctx context.Context) (*restore.Timeline, []error) { return restore.BuildTimeline(ctx, sources) }
	m, err := fusefs.MountTimeline(context.Background(), dir, build, fusefs.Options{Refresh: refresh})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	return m, dir
}

func names(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func getxattr(t *testing.T, path, name string) string {
	t.Helper()
	buf := make([]byte, 256)
	n, err := unix.Getxattr(path, name, buf)
	if err != nil {
		t.Fatalf("getxattr %s %s: %v", path, name, err)
	}
	return string(buf[:n])
}

func copyOut(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b bytes.Buffer
	if _, err := io.Copy(&b, f); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func mounted(t *testing.T, dir string) bool {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

func TestMountTimeline(t *testing.T) {
	w := newWorld(t)
	m, dir := w.mount(t, time.Second)
	snapNames := func(from int) []string {
		var out []string
		for _, s := range w.snaps[from:] {
			out = append(out, s.Name)
		}
		return out
	}

	var st0 syscall.Stat_t
	if err := syscall.Stat(dir, &st0); err == nil {
		ra, _ := os.ReadFile(bdiReadAhead(st0.Dev))
		t.Logf("read_ahead_kb of the mount: %s", strings.TrimSpace(string(ra)))
	}

	// The top level: every snapshot, oldest first, and latest.
	want := append(snapNames(0), fusefs.LatestName)
	if got := names(t, dir); !slices.Equal(got, want) {
		t.Errorf("ls %s = %v, want %v", dir, got, want)
	}
	if target, err := os.Readlink(filepath.Join(dir, "latest")); err != nil || target != w.snaps[3].Name {
		t.Errorf("latest -> %q, %v; want %s", target, err, w.snaps[3].Name)
	}

	// Listing the kopia-only snapshot reads directory metadata only.
	old := filepath.Join(dir, w.snaps[0].Name)
	if got := names(t, old); !slices.Equal(got, []string{"images", "inner"}) {
		t.Errorf("ls %s = %v", old, got)
	}
	if got := names(t, filepath.Join(old, "images")); !slices.Equal(got, []string{"disk.img", "note.txt"}) {
		t.Errorf("ls images = %v", got)
	}
	st, err := os.Stat(filepath.Join(old, "images", "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != diskSize || st.Mode() != 0o640 || !st.ModTime().Equal(time.Date(2023, 3, 4, 4, 0, 0, 0, time.Local)) {
		t.Errorf("disk.img: size %d mode %v mtime %v", st.Size(), st.Mode(), st.ModTime())
	}
	if target, err := os.Readlink(filepath.Join(old, "inner")); err != nil || target != "images/note.txt" {
		t.Errorf("inner -> %q, %v", target, err)
	}
	if n := w.kopiaC.opens.Load(); n != 0 {
		t.Errorf("listing the kopia-only snapshot opened %d files", n)
	}

	// xattrs.
	if got := getxattr(t, old, fusefs.XattrSources); got != "kopia" {
		t.Errorf("%s of the oldest = %q", fusefs.XattrSources, got)
	}
	newest := filepath.Join(dir, "latest", "images", "disk.img")
	if got := getxattr(t, newest, fusefs.XattrSources); got != "local,kopia" {
		t.Errorf("%s of the newest disk = %q", fusefs.XattrSources, got)
	}
	if got := getxattr(t, filepath.Join(dir, w.snaps[3].Name), fusefs.XattrSource); got != "local" {
		t.Errorf("%s of the newest dir = %q", fusefs.XattrSource, got)
	}
	oldDisk := filepath.Join(old, "images", "disk.img")
	f, err := os.Open(oldDisk)
	if err != nil {
		t.Fatal(err)
	}
	if got := getxattr(t, oldDisk, fusefs.XattrSource); got != "kopia" {
		t.Errorf("%s of an open kopia file = %q", fusefs.XattrSource, got)
	}
	f.Close()

	// cp from each source kind is byte-identical.
	if got := copyOut(t, oldDisk); !bytes.Equal(got, w.disk[0]) {
		t.Errorf("disk.img from kopia differs (%d bytes)", len(got))
	}
	for i := 1; i < 4; i++ {
		p := filepath.Join(dir, w.snaps[i].Name, "images", "disk.img")
		if got := copyOut(t, p); !bytes.Equal(got, w.disk[i]) {
			t.Errorf("disk.img of night %d from local differs (%d bytes)", i, len(got))
		}
	}
	if got := copyOut(t, filepath.Join(dir, w.snaps[2].Name, "inner")); string(got) != "night 2\n" {
		t.Errorf("through the inner link: %q", got)
	}

	// Read-only.
	snap := filepath.Join(dir, w.snaps[2].Name)
	file := filepath.Join(snap, "images", "note.txt")
	for name, op := range map[string]func() error{
		"create":      func() error { return os.WriteFile(filepath.Join(snap, "new"), nil, 0o644) },
		"create-top":  func() error { return os.WriteFile(filepath.Join(dir, "new"), nil, 0o644) },
		"write":       func() error { _, err := os.OpenFile(file, os.O_WRONLY, 0); return err },
		"truncate":    func() error { return os.Truncate(file, 0) },
		"unlink":      func() error { return os.Remove(file) },
		"rmdir":       func() error { return syscall.Rmdir(filepath.Join(snap, "images")) },
		"rename":      func() error { return os.Rename(file, file+".x") },
		"chmod":       func() error { return os.Chmod(file, 0o600) },
		"chtimes":     func() error { return os.Chtimes(file, time.Now(), time.Now()) },
		"mkdir":       func() error { return os.Mkdir(filepath.Join(snap, "d"), 0o755) },
		"symlink":     func() error { return os.Symlink("x", filepath.Join(snap, "l")) },
		"setxattr":    func() error { return unix.Setxattr(file, "user.x", []byte("y"), 0) },
		"unlink-snap": func() error { return syscall.Rmdir(snap) },
	} {
		if err := op(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", name, err)
		}
	}

	// A new snapshot appears without remounting.
	ctx := context.Background()
	s, err := w.pool.ZFS.CreateSnapshot(ctx, w.dataset, "2023-03-08_05:00:01", nil)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(names(t, dir), s.Name) {
		if time.Now().After(deadline) {
			t.Fatalf("new snapshot %s not shown: %v", s.Name, names(t, dir))
		}
		time.Sleep(200 * time.Millisecond)
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		target, _ := os.Readlink(filepath.Join(dir, "latest"))
		if target == s.Name {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("latest -> %s, want %s", target, s.Name)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// Unmounting leaves no mount and no clone.
	if err := m.Unmount(); err != nil {
		t.Fatal(err)
	}
	if mounted(t, dir) {
		t.Errorf("%s still mounted", dir)
	}
	out, err := exec.Command("zfs", "list", "-H", "-o", "name", "-r", w.pool.Name).CombinedOutput()
	if err != nil {
		t.Fatalf("zfs list: %v: %s", err, out)
	}
	if strings.Contains(string(out), zfs.ClonePrefix) {
		t.Errorf("clones left behind:\n%s", out)
	}
}

func bdiReadAhead(dev uint64) string {
	return "/sys/class/bdi/" + strconv.Itoa(int(unix.Major(dev))) + ":" + strconv.Itoa(int(unix.Minor(dev))) + "/read_ahead_kb"
}
