package restore_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
)

// osFile is a real file as a restore.File.
type osFile struct {
	*os.File
	size int64
}

func (f *osFile) Size() int64 { return f.size }

func openFile(t testing.TB, name string) *osFile {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return &osFile{File: f, size: fi.Size()}
}

// countingFile counts the bytes read through it and the reads in flight,
// and calls after once when the count passes at (to cancel a copy).
type countingFile struct {
	restore.File
	read     atomic.Int64
	inFlight atomic.Int64
	peak     atomic.Int64
	delay    time.Duration
	at       int64
	after    func()
	once     sync.Once
}

func (c *countingFile) ReadAt(p []byte, off int64) (int, error) {
	n := c.inFlight.Add(1)
	for {
		pk := c.peak.Load()
		if n <= pk || c.peak.CompareAndSwap(pk, n) {
			break
		}
	}
	defer c.inFlight.Add(-1)
	if c.delay > 0 {
		time.Sleep(c.delay)
	}
	got, err := c.File.ReadAt(p, off)
	if c.read.Add(int64(got)) >= c.at && c.after != nil {
		c.once.Do(c.after)
	}
	return got, err
}

// vmImage writes a file shaped like a VM disk image: data regions, large
// zero regions sprinkled with isolated 4 KiB blocks, a tail that is not a
// whole range. Zero regions are left as holes in the source too. It
// returns the number of bytes in non-zero 4 KiB blocks.
func vmImage(t testing.TB, name string, seed uint64) (size, nonZero int64) {
	t.Helper()
	size = 50<<20 + 12345
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, 7))
	write := func(off, n int64) {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32() | 1) // never a whole zero block
		}
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		nonZero += n
	}
	write(0, 6<<20)      // boot sector, OS
	write(20<<20, 5<<20) // some files
	for i := int64(0); i < 40; i++ {
		write(30<<20+i*(256<<10), 4<<10) // scattered blocks in free space
	}
	write(size-(1<<20)-12345, 1<<20+12345) // the tail, to the odd end
	return size, nonZero
}

func fileSHA(t testing.TB, name string) string {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func diskBytes(t testing.TB, name string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(name, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func assertNoLeftovers(t *testing.T, dest string) {
	t.Helper()
	for _, suffix := range []string{restore.PartialSuffix, restore.JournalSuffix} {
		if _, err := os.Stat(dest + suffix); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind (%v)", dest+suffix, err)
		}
	}
}

// tempImage writes a VM-like image (vmImage) as disk.img in a new
// temporary directory.
func tempImage(t testing.TB, seed uint64) (dir, name string, size, nonZero int64) {
	dir = t.TempDir()
	name = filepath.Join(dir, "disk.img")
	size, nonZero = vmImage(t, name, seed)
	return dir, name, size, nonZero
}

func TestCopySparseIdenticalModeAndHash(t *testing.T) {
	dir, srcName, size, nonZero := tempImage(t, 1)
	src := openFile(t, srcName)
	dest := filepath.Join(dir, "restored.img")
	mtime := time.Date(2023, 3, 4, 5, 0, 1, 0, time.UTC)

	var (
		mu      sync.Mutex
		reports []restore.Progress
	)
	res, err := restore.Copy(context.Background(), src, dest, restore.CopyOptions{
		Identity: restore.SourceIdentity{Snapshot: "123", Path: "images/disk.img"},
		Mode:     0o640, ModTime: mtime,
		Progress: func(p restore.Progress) {
			mu.Lock()
			reports = append(reports, p)
			mu.Unlock()
		},
		ProgressInterval: time.Millisecond,
		SourceBytes:      func() map[string]int64 { return map[string]int64{"local": size} },
	})
	if err != nil {
		t.Fatal(err)
	}
	want := fileSHA(t, srcName)
	if got := fileSHA(t, dest); got != want {
		t.Fatalf("restored file's sha256 %s, source's %s", got, want)
	}
	if res.SHA256 != want {
		t.Errorf("result says sha256 %s, the file's is %s", res.SHA256, want)
	}
	fi, err := os.Stat(dest)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o640 || !fi.ModTime().Equal(mtime) || fi.Size() != size {
		t.Errorf("restored file: mode %v mtime %v size %d, want 0640 %v %d", fi.Mode(), fi.ModTime(), fi.Size(), mtime, size)
	}
	du := diskBytes(t, dest)
	t.Logf("size %d, non-zero %d, du %d (%.1f%% of size), zero bytes per result %d; %.0f MB/s",
		size, nonZero, du, 100*float64(du)/float64(size), res.ZeroBytes, res.Rate/1e6)
	if du < nonZero || du > nonZero+(1<<20) {
		t.Errorf("restored file uses %d bytes on disk, want about its %d non-zero bytes", du, nonZero)
	}
	if res.DiskBytes != du {
		t.Errorf("result says %d bytes on disk, du says %d", res.DiskBytes, du)
	}
	if res.ZeroBytes != size-nonZero {
		t.Errorf("result counts %d zero bytes, want %d", res.ZeroBytes, size-nonZero)
	}
	if res.Written != nonZero || res.Fetched != size || res.Resumed != 0 || res.Size != size {
		t.Errorf("result written %d fetched %d resumed %d size %d, want %d %d 0 %d",
			res.Written, res.Fetched, res.Resumed, res.Size, nonZero, size, size)
	}
	if res.BySource["local"] != size || res.Dest != dest || res.Verified {
		t.Errorf("result %+v", res)
	}
	if res.PeakBuffers < 1 || res.PeakBuffers > restore.DefaultParallel {
		t.Errorf("peak buffers %d, want 1..%d", res.PeakBuffers, restore.DefaultParallel)
	}
	assertNoLeftovers(t, dest)

	mu.Lock()
	defer mu.Unlock()
	if len(reports) == 0 {
		t.Fatal("no progress reported")
	}
	last := reports[len(reports)-1]
	if last.Phase != restore.PhaseRestore || last.Done != size || last.Total != size || last.ETA != 0 {
		t.Errorf("last progress %+v, want all %d bytes done", last, size)
	}
	for i := 1; i < len(reports); i++ {
		if reports[i].Done < reports[i-1].Done {
			t.Errorf("progress went back: %d after %d", reports[i].Done, reports[i-1].Done)
		}
	}
}

func TestCopyResumesAfterCancel(t *testing.T) {
	dir := t.TempDir()
	srcName := filepath.Join(dir, "disk.img")
	size, _ := vmImage(t, srcName, 2)
	want := fileSHA(t, srcName)
	dest := filepath.Join(dir, "out.img")
	id := restore.SourceIdentity{Snapshot: "guid-1", Path: "disk.img", ModTime: time.Unix(1700000000, 0)}
	opts := restore.CopyOptions{Identity: id, Parallel: 4, RangeSize: 1 << 20, Mode: 0o600}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first := &countingFile{File: openFile(t, srcName), at: size / 2, after: cancel}
	_, err := restore.Copy(ctx, first, dest, opts)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted copy returned %v, want context.Canceled", err)
	}
	t.Logf("interrupted: %v", err)
	if _, err := os.Stat(dest); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("an interrupted restore left something under the final name: %v", err)
	}
	for _, suffix := range []string{restore.PartialSuffix, restore.JournalSuffix} {
		if _, err := os.Stat(dest + suffix); err != nil {
			t.Fatalf("interrupted restore did not keep %s: %v", suffix, err)
		}
	}

	second := &countingFile{File: openFile(t, srcName)}
	var notices []string
	opts.Notice = func(s string) { notices = append(notices, s) }
	res, err := restore.Copy(context.Background(), second, dest, opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := fileSHA(t, dest); got != want || res.SHA256 != want {
		t.Fatalf("resumed restore: file sha256 %s, result %s, want %s", got, res.SHA256, want)
	}
	read := second.read.Load()
	t.Logf("first run read %d bytes, second %d of %d (%.0f%%); resumed %d",
		first.read.Load(), read, size, 100*float64(read)/float64(size), res.Resumed)
	if read >= size*60/100 {
		t.Errorf("the resumed restore read %d of %d bytes, want < 60%%", read, size)
	}
	if res.Resumed == 0 || res.Resumed+res.Fetched != size || res.Fetched != read {
		t.Errorf("resumed %d + fetched %d != size %d (read %d)", res.Resumed, res.Fetched, size, read)
	}
	if len(notices) != 0 || res.Restarted != "" {
		t.Errorf("a matching journal was discarded: %q %q", notices, res.Restarted)
	}
	assertNoLeftovers(t, dest)
}

func TestCopyRestartsForAnotherSource(t *testing.T) {
	dir := t.TempDir()
	oldName, newName := filepath.Join(dir, "old.img"), filepath.Join(dir, "new.img")
	size, _ := vmImage(t, oldName, 3)
	vmImage(t, newName, 4)
	dest := filepath.Join(dir, "out.img")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first := &countingFile{File: openFile(t, oldName), at: size / 2, after: cancel}
	opts := restore.CopyOptions{Identity: restore.SourceIdentity{Snapshot: "guid-old", Path: "disk.img"}, Parallel: 2, RangeSize: 1 << 20}
	if _, err := restore.Copy(ctx, first, dest, opts); !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted copy returned %v", err)
	}

	second := &countingFile{File: openFile(t, newName)}
	var notices []string
	opts.Identity.Snapshot = "guid-new"
	opts.Notice = func(s string) { notices = append(notices, s) }
	res, err := restore.Copy(context.Background(), second, dest, opts)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fileSHA(t, dest), fileSHA(t, newName); got != want {
		t.Fatalf("restore over another snapshot's partial file: sha256 %s, want %s", got, want)
	}
	if second.read.Load() != size || res.Resumed != 0 {
		t.Errorf("restarted restore read %d of %d bytes, resumed %d", second.read.Load(), size, res.Resumed)
	}
	if len(notices) != 1 || !strings.Contains(notices[0], "guid-old") || !strings.Contains(res.Restarted, "guid-new") {
		t.Errorf("restart not told: notices %q, restarted %q", notices, res.Restarted)
	}
	t.Logf("notice: %s", notices)
	assertNoLeftovers(t, dest)
}

func TestCopyResumesAfterReadError(t *testing.T) {
	dir := t.TempDir()
	srcName := filepath.Join(dir, "disk.img")
	size, _ := vmImage(t, srcName, 5)
	dest := filepath.Join(dir, "out.img")
	opts := restore.CopyOptions{Identity: restore.SourceIdentity{Snapshot: "g", Path: "disk.img"}, Parallel: 3, RangeSize: 1 << 20}

	bad := &failingFile{File: openFile(t, srcName), failFrom: 30 << 20}
	_, err := restore.Copy(context.Background(), bad, dest, opts)
	if err == nil || !strings.Contains(err.Error(), "source went away") {
		t.Fatalf("copy from a failing source returned %v", err)
	}
	good := &countingFile{File: openFile(t, srcName)}
	res, err := restore.Copy(context.Background(), good, dest, opts)
	if err != nil {
		t.Fatal(err)
	}
	if fileSHA(t, dest) != fileSHA(t, srcName) {
		t.Fatal("restore resumed after a read error differs from the source")
	}
	if good.read.Load() > size-(25<<20) {
		t.Errorf("the rerun read %d bytes; the first 30 MiB were done", good.read.Load())
	}
	t.Logf("rerun read %d of %d bytes, resumed %d", good.read.Load(), size, res.Resumed)
}

type failingFile struct {
	restore.File
	failFrom int64
}

func (f *failingFile) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.failFrom {
		return 0, errors.New("source went away")
	}
	return f.File.ReadAt(p, off)
}

func TestCopyShortSourceFails(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "small")
	if err := os.WriteFile(name, bytes.Repeat([]byte("x"), 100_000), 0o644); err != nil {
		t.Fatal(err)
	}
	src := openFile(t, name)
	src.size = 300_000 // claims more than it has
	_, err := restore.Copy(context.Background(), src, filepath.Join(dir, "out"), restore.CopyOptions{Identity: restore.SourceIdentity{Path: "small"}, RangeSize: 64 << 10})
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("copy of a source shorter than its size returned %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "out")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("failed restore left a file under the final name")
	}
}

func TestCopyDestinationRules(t *testing.T) {
	dir := t.TempDir()
	srcName := filepath.Join(dir, "vm.qcow2")
	content := bytes.Repeat([]byte("restore me "), 10_000)
	if err := os.WriteFile(srcName, content, 0o600); err != nil {
		t.Fatal(err)
	}
	src := openFile(t, srcName)
	id := restore.SourceIdentity{Snapshot: "g", Path: "images/vm.qcow2"}
	ctx := context.Background()

	existing := filepath.Join(dir, "existing")
	if err := os.WriteFile(existing, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := restore.Copy(ctx, src, existing, restore.CopyOptions{Identity: id})
	if !errors.Is(err, restore.ErrDestExists) {
		t.Errorf("restore over an existing file: %v, want ErrDestExists", err)
	}
	if b, _ := os.ReadFile(existing); string(b) != "keep me" {
		t.Errorf("the existing file was changed to %q", b)
	}
	assertNoLeftovers(t, existing)
	if _, err := restore.Copy(ctx, src, existing, restore.CopyOptions{Identity: id, Force: true}); err != nil {
		t.Errorf("restore with force: %v", err)
	} else if b, _ := os.ReadFile(existing); !bytes.Equal(b, content) {
		t.Errorf("force did not replace the file")
	}

	missing := filepath.Join(dir, "no", "such", "dir", "vm.qcow2")
	_, err = restore.Copy(ctx, src, missing, restore.CopyOptions{Identity: id})
	if !errors.Is(err, restore.ErrDestDir) || strings.Contains(err.Error(), "\n") {
		t.Errorf("restore into a missing directory: %v, want one line with ErrDestDir", err)
	}
	t.Logf("missing dir: %v", err)
	_, err = restore.Copy(ctx, src, filepath.Join(existing, "x"), restore.CopyOptions{Identity: id})
	if !errors.Is(err, restore.ErrDestDir) {
		t.Errorf("restore under a regular file: %v, want ErrDestDir", err)
	}

	into := filepath.Join(dir, "into")
	if err := os.Mkdir(into, 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := restore.Copy(ctx, src, into, restore.CopyOptions{Identity: id})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(into, "vm.qcow2"); res.Dest != want {
		t.Errorf("restore into a directory went to %s, want %s", res.Dest, want)
	}
	if b, _ := os.ReadFile(filepath.Join(into, "vm.qcow2")); !bytes.Equal(b, content) {
		t.Errorf("restore into a directory: wrong content")
	}
	if _, err := restore.Copy(ctx, src, into, restore.CopyOptions{Identity: id}); !errors.Is(err, restore.ErrDestExists) {
		t.Errorf("second restore into the directory: %v, want ErrDestExists", err)
	}
	if err := os.Mkdir(filepath.Join(into, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := restore.Copy(ctx, src, into, restore.CopyOptions{Identity: restore.SourceIdentity{Path: "sub"}, Force: true}); err == nil {
		t.Errorf("restore over a directory succeeded")
	}

	// An empty file is a file too.
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	res, err = restore.Copy(ctx, openFile(t, empty), filepath.Join(dir, "empty-out"), restore.CopyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.SHA256 != "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" {
		t.Errorf("empty file's sha256 %s", res.SHA256)
	}
}

func TestCopyVerify(t *testing.T) {
	dir := t.TempDir()
	srcName := filepath.Join(dir, "disk.img")
	vmImage(t, srcName, 6)
	data, err := os.ReadFile(srcName)
	if err != nil {
		t.Fatal(err)
	}
	const changed = 37<<20 + 123
	data[changed] ^= 0x40
	otherName := filepath.Join(dir, "other.img")
	if err := os.WriteFile(otherName, data, 0o644); err != nil {
		t.Fatal(err)
	}
	id := restore.SourceIdentity{Snapshot: "g", Path: "disk.img"}

	good := filepath.Join(dir, "good.img")
	res, err := restore.Copy(context.Background(), openFile(t, srcName), good,
		restore.CopyOptions{Identity: id, Verify: openFile(t, srcName), Parallel: 4})
	if err != nil || !res.Verified {
		t.Fatalf("verify against the same bytes: %v, verified %v", err, res.Verified)
	}
	if res.PeakBuffers > 4 {
		t.Errorf("verify used %d buffers, want at most 4", res.PeakBuffers)
	}

	bad := filepath.Join(dir, "bad.img")
	_, err = restore.Copy(context.Background(), openFile(t, srcName), bad,
		restore.CopyOptions{Identity: id, Verify: openFile(t, otherName)})
	if !errors.Is(err, restore.ErrVerify) || !strings.Contains(err.Error(), fmt.Sprintf("offset %d ", changed)) {
		t.Fatalf("verify against a changed byte at %d: %v", changed, err)
	}
	t.Logf("verify: %v", err)
	if _, err := os.Stat(bad); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a restore that failed verification was given its final name")
	}
}

// settleGoroutines waits for the goroutine count to fall to at most want.
func settleGoroutines(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= want {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines left, want %d:\n%s", n, want, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCopyCancelLeavesNoGoroutine(t *testing.T) {
	dir := t.TempDir()
	srcName := filepath.Join(dir, "disk.img")
	vmImage(t, srcName, 7)
	before := runtime.NumGoroutine()

	ctx, cancel := context.WithCancel(context.Background())
	src := &countingFile{File: openFile(t, srcName), delay: 20 * time.Millisecond, at: 8 << 20, after: cancel}
	done := make(chan error, 1)
	go func() {
		_, err := restore.Copy(ctx, src, filepath.Join(dir, "out"), restore.CopyOptions{
			Identity: restore.SourceIdentity{Path: "disk.img"}, RangeSize: 1 << 20, Verify: src,
			Progress: func(restore.Progress) {}, ProgressInterval: time.Millisecond,
		})
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled copy returned %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("copy did not return after cancel")
	}
	cancel()
	settleGoroutines(t, before)
}

func TestCopyMemoryBounded(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "data")
	b := make([]byte, 8<<20)
	for i := range b {
		b[i] = byte(i*7 + 1)
	}
	if err := os.WriteFile(name, b, 0o644); err != nil {
		t.Fatal(err)
	}
	src := &countingFile{File: openFile(t, name), delay: 2 * time.Millisecond}
	res, err := restore.Copy(context.Background(), src, filepath.Join(dir, "out"), restore.CopyOptions{
		Identity: restore.SourceIdentity{Path: "data"}, Parallel: 3, RangeSize: 64 << 10,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("128 ranges, parallel 3: peak buffers %d, peak concurrent reads %d", res.PeakBuffers, src.peak.Load())
	if res.PeakBuffers > 3 || src.peak.Load() > 3 {
		t.Errorf("peak buffers %d, concurrent reads %d; want at most 3", res.PeakBuffers, src.peak.Load())
	}
	if src.peak.Load() < 2 {
		t.Errorf("at most %d reads ran at once; the copy is not parallel", src.peak.Load())
	}
}

// TestCopyFromZFSSnapshot restores an old version of a file from a real
// zfs-fuse snapshot while the live file has changed.
func TestCopyFromZFSSnapshot(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 256)
	ds, mnt := pool.Dataset(t, "libvirt")
	if err := os.MkdirAll(filepath.Join(mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	live := filepath.Join(mnt, "images", "vm.img")
	_, nonZero := vmImage(t, live, 8)
	if err := os.Chmod(live, 0o640); err != nil {
		t.Fatal(err)
	}
	want := fileSHA(t, live)
	snap, err := pool.ZFS.CreateSnapshot(ctx, ds, "2023-03-04_05:00:01", nil)
	if err != nil {
		t.Fatal(err)
	}
	vmImage(t, live, 9) // the VM writes on

	view, err := pool.ZFS.OpenSnapshot(ctx, snap.FullName())
	if err != nil {
		t.Fatal(err)
	}
	defer view.Close(ctx)
	name := filepath.Join(view.Root, "images", "vm.img")
	fi, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	src := &osFile{File: f, size: fi.Size()}
	dest := t.TempDir()
	res, err := restore.Copy(ctx, src, dest, restore.CopyOptions{
		Identity: restore.SourceIdentity{Snapshot: fmt.Sprint(snap.GUID), Path: "images/vm.img", ModTime: fi.ModTime()},
		Mode:     fi.Mode(), ModTime: fi.ModTime(),
	})
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dest, "vm.img")
	if got := fileSHA(t, out); got != want || res.SHA256 != want {
		t.Fatalf("restored from the snapshot: sha256 %s (result %s), want the snapshot's %s", got, res.SHA256, want)
	}
	ofi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if ofi.Mode().Perm() != 0o640 || !ofi.ModTime().Equal(fi.ModTime()) {
		t.Errorf("restored mode %v mtime %v, want 0640 %v", ofi.Mode(), ofi.ModTime(), fi.ModTime())
	}
	if du := diskBytes(t, out); du > nonZero+(1<<20) {
		t.Errorf("restored file uses %d bytes on disk, want about %d", du, nonZero)
	}
	t.Logf("from zfs-fuse: %d bytes in %v (%.0f MB/s), %d on disk", res.Size, res.Duration.Round(time.Millisecond), res.Rate/1e6, res.DiskBytes)
	assertNoLeftovers(t, out)
}

// BenchmarkCopyLocalFile copies a 256 MiB file (half data, half zeros)
// that is in the page cache: the engine's own throughput.
func BenchmarkCopyLocalFile(b *testing.B) {
	dir := b.TempDir()
	name := filepath.Join(dir, "src")
	f, err := os.Create(name)
	if err != nil {
		b.Fatal(err)
	}
	const size = 256 << 20
	rng := rand.New(rand.NewPCG(1, 1))
	chunk := make([]byte, 8<<20)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		if (off/int64(len(chunk)))%2 == 0 {
			for i := range chunk {
				chunk[i] = byte(rng.Uint32())
			}
			if _, err := f.WriteAt(chunk, off); err != nil {
				b.Fatal(err)
			}
		}
	}
	f.Truncate(size)
	f.Close()
	src := openFile(b, name)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		dest := filepath.Join(dir, fmt.Sprint("out", i))
		res, err := restore.Copy(context.Background(), src, dest, restore.CopyOptions{Identity: restore.SourceIdentity{Path: "src"}})
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(res.DiskBytes)/size, "disk/size")
		os.Remove(dest)
	}
}

// TestCopyDirectIOAndPageCache restores with O_DIRECT where the
// filesystem takes it (this machine's disk, tmpfs since Linux 6.6) and
// through the page cache when asked: each result is the source's bytes
// with its holes, hashed right, and says which way the data went.
func TestCopyDirectIOAndPageCache(t *testing.T) {
	dir := t.TempDir()
	srcName := filepath.Join(dir, "disk.img")
	size, nonZero := vmImage(t, srcName, 9)
	want := fileSHA(t, srcName)
	shm, err := os.MkdirTemp("/dev/shm", "vmhistory-copy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	for _, c := range []struct {
		name, dir string
		pageCache bool
		direct    bool
	}{
		{"disk", dir, false, directSupported(t, dir)},
		{"disk, page cache", dir, true, false},
		{"tmpfs", shm, false, directSupported(t, shm)},
	} {
		dest := filepath.Join(c.dir, "restored.img")
		os.Remove(dest)
		res, err := restore.Copy(context.Background(), openFile(t, srcName), dest, restore.CopyOptions{
			Identity:  restore.SourceIdentity{Snapshot: "1", Path: "images/disk.img"},
			PageCache: c.pageCache,
		})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got := fileSHA(t, dest); got != want || res.SHA256 != want {
			t.Errorf("%s: file sha256 %s, result's %s, source's %s", c.name, got, res.SHA256, want)
		}
		if res.DirectIO != c.direct {
			t.Errorf("%s: result says O_DIRECT %v, the filesystem takes it: %v", c.name, res.DirectIO, c.direct)
		}
		if du := diskBytes(t, dest); du < nonZero || du > nonZero+(1<<20) || res.ZeroBytes != size-nonZero {
			t.Errorf("%s: %d bytes on disk, %d zero bytes counted; want about %d and %d", c.name, du, res.ZeroBytes, nonZero, size-nonZero)
		}
		t.Logf("%s: O_DIRECT %v, %.0f MB/s", c.name, res.DirectIO, res.Rate/1e6)
	}
}

// directSupported opens a file in dir with O_DIRECT, as the restore does.
func directSupported(t *testing.T, dir string) bool {
	t.Helper()
	name := filepath.Join(dir, "probe")
	fd, err := syscall.Open(name, syscall.O_CREAT|syscall.O_WRONLY|syscall.O_DIRECT, 0o600)
	os.Remove(name)
	if err != nil {
		return false
	}
	syscall.Close(fd)
	return true
}

// TestCopyBeforePublish: the hook runs once, after every byte is written
// and before the final name; its error keeps the partial file (the spec
// names another snapshot now: the rerun decides), and nil publishes.
func TestCopyBeforePublish(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "src")
	data := bytes.Repeat([]byte("vmhistory"), 50_000)
	if err := os.WriteFile(name, data, 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	calls := 0
	refuse := errors.New("the spec names another snapshot now")
	opts := restore.CopyOptions{Identity: restore.SourceIdentity{Path: "src"}, RangeSize: 64 << 10,
		BeforePublish: func(context.Context) error {
			calls++
			fi, err := os.Stat(out + restore.PartialSuffix)
			if err != nil || fi.Size() != int64(len(data)) {
				t.Errorf("BeforePublish before the partial file is complete: %v, %v", fi, err)
			}
			return refuse
		}}
	if _, err := restore.Copy(context.Background(), openFile(t, name), out, opts); !errors.Is(err, refuse) {
		t.Fatalf("Copy with BeforePublish refusing: %v", err)
	}
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("published although BeforePublish refused: %v", err)
	}
	if _, err := os.Stat(out + restore.PartialSuffix); err != nil {
		t.Errorf("the partial file is gone: %v", err)
	}
	opts.BeforePublish = func(context.Context) error { calls++; return nil }
	if _, err := restore.Copy(context.Background(), openFile(t, name), out, opts); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, data) || calls != 2 {
		t.Errorf("after BeforePublish allowed it: %d bytes, %d calls", len(got), calls)
	}
}

// A --no-sync restore returns before the disk has the file, and one
// interrupted resumes: what it wrote is journaled as this boot's, and
// made durable when it stops.
func TestCopyNoSync(t *testing.T) {
	dir, srcName, size, _ := tempImage(t, 12)
	want := fileSHA(t, srcName)
	dest := filepath.Join(dir, "out.img")
	opts := restore.CopyOptions{Identity: restore.SourceIdentity{Snapshot: "g", Path: "disk.img"},
		Parallel: 4, RangeSize: 1 << 20, NoSync: true, CommitInterval: time.Millisecond}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first := &countingFile{File: openFile(t, srcName), at: size / 2, after: cancel}
	if _, err := restore.Copy(ctx, first, dest, opts); !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted copy returned %v", err)
	}
	journal, err := os.ReadFile(dest + restore.JournalSuffix)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(journal), "~") {
		t.Errorf("the journal of a --no-sync restore has no record of this boot:\n%s", journal)
	}
	second := &countingFile{File: openFile(t, srcName)}
	res, err := restore.Copy(context.Background(), second, dest, opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := fileSHA(t, dest); got != want || res.SHA256 != want {
		t.Fatalf("file sha256 %s, result's %s, source's %s", got, res.SHA256, want)
	}
	if res.Synced || res.DirectIO {
		t.Errorf("--no-sync restore says synced %v, O_DIRECT %v", res.Synced, res.DirectIO)
	}
	if res.Resumed == 0 || second.read.Load() >= size*60/100 {
		t.Errorf("the rerun resumed %d bytes and read %d of %d", res.Resumed, second.read.Load(), size)
	}
	assertNoLeftovers(t, dest)

	os.Remove(dest)
	opts.NoSync = false
	res, err = restore.Copy(context.Background(), openFile(t, srcName), dest, opts)
	if err != nil || !res.Synced {
		t.Fatalf("default restore: synced %v, %v", res.Synced, err)
	}
}

// NoSHA256 leaves the result's hash out and nothing else: the same bytes,
// the same holes counted, resumed or not.
func TestCopyNoSHA256(t *testing.T) {
	dir, srcName, size, _ := tempImage(t, 12)
	want := fileSHA(t, srcName)
	dest := filepath.Join(dir, "out.img")
	opts := restore.CopyOptions{Identity: restore.SourceIdentity{Snapshot: "g", Path: "disk.img"},
		Parallel: 4, RangeSize: 1 << 20, CommitInterval: time.Millisecond}
	full, err := restore.Copy(context.Background(), openFile(t, srcName), dest, opts)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(dest)

	opts.NoSHA256 = true
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first := &countingFile{File: openFile(t, srcName), at: size / 2, after: cancel}
	if _, err := restore.Copy(ctx, first, dest, opts); !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted copy returned %v", err)
	}
	res, err := restore.Copy(context.Background(), openFile(t, srcName), dest, opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := fileSHA(t, dest); got != want {
		t.Fatalf("file sha256 %s, source's %s", got, want)
	}
	if res.SHA256 != "" {
		t.Errorf("NoSHA256 restore reports sha256 %q", res.SHA256)
	}
	if res.Resumed == 0 || res.ZeroBytes != full.ZeroBytes || res.Size != full.Size {
		t.Errorf("NoSHA256 restore: resumed %d, zeros %d (with the hash: %d), size %d", res.Resumed, res.ZeroBytes, full.ZeroBytes, res.Size)
	}
	assertNoLeftovers(t, dest)
}
