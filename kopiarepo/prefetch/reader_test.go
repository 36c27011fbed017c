package prefetch_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob/webdav"
	"github.com/kopia/kopia/repo/object"

	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
	"github.com/vmhistory/vmhistory/testenv"
)

// fixture is one repository holding the same 40 MiB of VM-like data
// written with both splitters (compressible chunks compressed), shared by
// the tests of this file.
type fixture struct {
	tr   *testRepo
	data []byte
	oids map[string]object.ID // by splitter
}

const fixtureBytes = 40 << 20

var (
	fixtureOnce sync.Once
	theFixture  *fixture
	fixtureDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if fixtureDir != "" {
		os.RemoveAll(fixtureDir)
	}
	os.Exit(code)
}

// fixtureTB lets the shared fixture outlive the first test that uses it.
type fixtureTB struct {
	testing.TB
	dir string
}

func (f fixtureTB) TempDir() string {
	d, err := os.MkdirTemp(f.dir, "")
	if err != nil {
		f.Fatal(err)
	}
	return d
}
func (f fixtureTB) Cleanup(func()) {}

func getFixture(t *testing.T) *fixture {
	t.Helper()
	fixtureOnce.Do(func() {
		var err error
		fixtureDir, err = os.MkdirTemp("", "prefetch-fixture-")
		if err != nil {
			t.Fatal(err)
		}
		tb := fixtureTB{TB: t, dir: fixtureDir}
		f := &fixture{tr: newTestRepo(tb), data: vmData(fixtureBytes, 1), oids: map[string]object.ID{}}
		for _, s := range []string{dynamic, fixed128K} {
			f.oids[s] = f.tr.write(tb, f.data, s, "s2-default")
		}
		theFixture = f
	})
	if theFixture == nil {
		t.Fatal("fixture failed")
	}
	return theFixture
}

func openReader(t *testing.T, rep repo.Repository, oid object.ID, opts prefetch.Options) *prefetch.Reader {
	t.Helper()
	r, err := prefetch.Open(context.Background(), rep, oid, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// checkRandomReads compares ReadAt at many offsets and lengths (within a
// chunk, across chunks, at the end) with want.
func checkRandomReads(t *testing.T, r io.ReaderAt, want []byte, n int, seed uint64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 99))
	for i := range n {
		var off, ln int64
		switch i % 4 {
		case 0: // small, anywhere
			off, ln = rng.Int64N(int64(len(want))), rng.Int64N(64<<10)+1
		case 1: // large, crossing chunks
			off, ln = rng.Int64N(int64(len(want))), rng.Int64N(9<<20)+1
		case 2: // at the end
			ln = min(rng.Int64N(256<<10)+1, int64(len(want)))
			off = int64(len(want)) - ln + rng.Int64N(ln)
		default: // exact 128 KiB boundaries
			off, ln = rng.Int64N(int64(len(want))/(128<<10)+1)*(128<<10), 128<<10
			if off >= int64(len(want)) {
				off = 0
			}
		}
		buf := make([]byte, ln)
		got, err := r.ReadAt(buf, off)
		wantN := min(ln, int64(len(want))-off)
		if int64(got) != wantN {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v; want %d", ln, off, got, err, wantN)
		}
		if wantN < ln && !errors.Is(err, io.EOF) {
			t.Fatalf("short ReadAt(%d bytes at %d) = %d without io.EOF: %v", ln, off, got, err)
		}
		if wantN == ln && err != nil {
			t.Fatalf("ReadAt(%d bytes at %d): %v", ln, off, err)
		}
		if !bytes.Equal(buf[:got], want[off:off+int64(got)]) {
			t.Fatalf("ReadAt(%d bytes at %d) returned other bytes", ln, off)
		}
	}
}

func TestReadIdentical(t *testing.T) {
	f := getFixture(t)
	for _, splitter := range []string{dynamic, fixed128K} {
		for _, tc := range []struct {
			name string
			opts prefetch.Options
		}{
			{"auto", prefetch.Options{}},
			{"objects", prefetch.Options{Mode: prefetch.ModeObjects}},
			{"kopia-prefetch", prefetch.Options{Mode: prefetch.ModeKopiaPrefetch}},
			{"stripes", prefetch.Options{StripeBytes: 300_001, Window: 5}},
		} {
			mode := tc.opts.Mode
			t.Run(splitter+"/"+tc.name, func(t *testing.T) {
				rep, _ := f.tr.open(t)
				oid := f.oids[splitter]

				// io.Copy: the WriteTo path.
				r := openReader(t, rep, oid, tc.opts)
				if r.Length() != int64(len(f.data)) {
					t.Fatalf("Length %d, want %d", r.Length(), len(f.data))
				}
				var out bytes.Buffer
				if _, err := io.Copy(&out, r); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(out.Bytes(), f.data) {
					t.Fatal("sequential copy differs")
				}
				s := r.Stats()
				t.Logf("%s: %+v", mode, s)
				if mode == prefetch.ModeAuto && s.Mode != prefetch.ModePackRanges {
					t.Errorf("auto mode on a direct repository used %v", s.Mode)
				}

				// Read with an odd buffer size after a Seek.
				if _, err := r.Seek(12345, io.SeekStart); err != nil {
					t.Fatal(err)
				}
				out.Reset()
				buf := make([]byte, 100_003)
				for {
					n, err := r.Read(buf)
					out.Write(buf[:n])
					if errors.Is(err, io.EOF) {
						break
					}
					if err != nil {
						t.Fatal(err)
					}
				}
				if !bytes.Equal(out.Bytes(), f.data[12345:]) {
					t.Fatal("Read loop differs")
				}

				// Random ReadAt on a fresh reader.
				checkRandomReads(t, openReader(t, rep, oid, tc.opts), f.data, 120, 7)
			})
		}
	}
}

// TestRandomReadFetchesOnlyItsChunks: one small random read fetches the
// chunk it falls in, not the file nor a window.
func TestRandomReadFetchesOnlyItsChunks(t *testing.T) {
	f := getFixture(t)
	for _, splitter := range []string{dynamic, fixed128K} {
		t.Run(splitter, func(t *testing.T) {
			rep, model := f.tr.open(t)
			r := openReader(t, rep, f.oids[splitter], prefetch.Options{})
			for i, off := range []int64{fixtureBytes / 3, fixtureBytes/3 + 17<<20, 5 << 20} {
				model.Reset()
				before := r.Stats()
				buf := make([]byte, 4096)
				if _, err := r.ReadAt(buf, off); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(buf, f.data[off:off+4096]) {
					t.Fatal("ReadAt differs")
				}
				ms, rs := model.Stats(), r.Stats()
				chunks := rs.ChunksFetched - before.ChunksFetched
				t.Logf("read %d: 4 KiB at %d: %d blob request(s), %d bytes fetched, %d chunk(s)", i, off, ms.Gets, ms.BytesFetched, chunks)
				maxChunk := int64(8 << 20)
				if splitter == fixed128K {
					maxChunk = 128<<10 + 1024
				}
				if ms.Gets != 1 || chunks != 1 || ms.BytesFetched > maxChunk {
					t.Errorf("4 KiB random read: %d requests, %d chunks, %d bytes; want 1 request of one chunk (≤ %d bytes)", ms.Gets, chunks, ms.BytesFetched, maxChunk)
				}
			}
			// A read across a chunk boundary of FIXED-128K fetches two
			// chunks with one request (they are adjacent in the pack).
			if splitter == fixed128K {
				model.Reset()
				before := r.Stats()
				off := int64(20<<20) + 3*(128<<10) - 100 // crosses a chunk boundary
				buf := make([]byte, 200)
				if _, err := r.ReadAt(buf, off); err != nil {
					t.Fatal(err)
				}
				ms, rs := model.Stats(), r.Stats()
				t.Logf("200 bytes across a chunk boundary: %d request(s), %d bytes, %d chunks", ms.Gets, ms.BytesFetched, rs.ChunksFetched-before.ChunksFetched)
				if rs.ChunksFetched-before.ChunksFetched != 2 || ms.BytesFetched > 2*(128<<10+1024) {
					t.Errorf("read across a boundary fetched %d chunks, %d bytes", rs.ChunksFetched-before.ChunksFetched, ms.BytesFetched)
				}
			}
		})
	}
}

// TestWindowAndMemoryBound reads sequentially through a drive with
// latency: fetches overlap up to the window, the Reader never holds more
// than its bound, and the window beats one chunk per round trip.
func TestWindowAndMemoryBound(t *testing.T) {
	f := getFixture(t)
	for _, tc := range []struct {
		splitter string
		window   int
	}{{dynamic, 4}, {fixed128K, 4}, {dynamic, 16}, {fixed128K, 16}} {
		t.Run(fmt.Sprintf("%s/window-%d", tc.splitter, tc.window), func(t *testing.T) {
			rep, model := f.tr.open(t)
			r := openReader(t, rep, f.oids[tc.splitter], prefetch.Options{Window: tc.window})
			model.SetParams(drivemodel.Params{Latency: 100 * time.Millisecond, StreamBytesPerSecond: 200 << 20})
			model.Reset()
			start := time.Now()
			var out bytes.Buffer
			buf := make([]byte, 128<<10) // as FUSE reads
			for {
				n, err := r.Read(buf)
				out.Write(buf[:n])
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			took := time.Since(start)
			if !bytes.Equal(out.Bytes(), f.data) {
				t.Fatal("sequential read differs")
			}
			ms, rs := model.Stats(), r.Stats()
			t.Logf("window %d: %v, %d chunks in %d fetches, %d blob requests, max %d concurrent, max buffered %.1f MiB of bound %.1f MiB",
				tc.window, took.Round(time.Millisecond), rs.Chunks, rs.Fetches, ms.Gets, ms.MaxConcurrentGets,
				float64(rs.MaxBufferedBytes)/(1<<20), float64(rs.MemoryBound)/(1<<20))
			if rs.MaxBufferedBytes > rs.MemoryBound {
				t.Errorf("held %d bytes, more than the bound %d", rs.MaxBufferedBytes, rs.MemoryBound)
			}
			if rs.MemoryBound > int64(tc.window)*(8<<20) {
				t.Errorf("bound %d exceeds window × 8 MiB", rs.MemoryBound)
			}
			if ms.MaxConcurrentGets > int64(tc.window*prefetch.MaxRangesPerFetch) {
				t.Errorf("%d concurrent requests with a window of %d", ms.MaxConcurrentGets, tc.window)
			}
			if ms.MaxConcurrentGets < int64(min(tc.window, 4)) {
				t.Errorf("only %d concurrent requests with a window of %d", ms.MaxConcurrentGets, tc.window)
			}
			// Fetching one range after the other would take a round trip
			// per request plus the transfer of all bytes at stream speed.
			serial := time.Duration(rs.Requests)*100*time.Millisecond + time.Duration(float64(ms.BytesFetched)/(200<<20)*float64(time.Second))
			if took > serial*2/3 && !raceEnabled {
				t.Errorf("took %v, serial fetches would take %v", took, serial)
			}
			if tc.splitter == fixed128K && rs.Fetches*8 > int64(rs.Chunks) {
				t.Errorf("FIXED-128K: %d fetches for %d chunks: chunks sharing a pack are not grouped", rs.Fetches, rs.Chunks)
			}
			r.Close()
			if s := r.Stats(); s.BufferedBytes != 0 {
				t.Errorf("%d bytes still buffered after Close", s.BufferedBytes)
			}
		})
	}
}

// TestSequentialReadAtUsesWindow: ReadAt calls that follow each other (as
// a FUSE mount's) move the window like Read.
func TestSequentialReadAtUsesWindow(t *testing.T) {
	f := getFixture(t)
	rep, model := f.tr.open(t)
	r := openReader(t, rep, f.oids[dynamic], prefetch.Options{Window: 8})
	model.SetParams(drivemodel.Params{Latency: 30 * time.Millisecond})
	buf := make([]byte, 128<<10)
	for off := int64(0); off < int64(len(f.data)); off += int64(len(buf)) {
		n, err := r.ReadAt(buf, off)
		if err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		if !bytes.Equal(buf[:n], f.data[off:off+int64(n)]) {
			t.Fatalf("ReadAt at %d differs", off)
		}
	}
	if ms := model.Stats(); ms.MaxConcurrentGets < 4 {
		t.Errorf("sequential ReadAt: at most %d concurrent requests, want the window", ms.MaxConcurrentGets)
	}
}

func TestSharedCache(t *testing.T) {
	f := getFixture(t)
	rep, model := f.tr.open(t)
	cache := prefetch.NewLRU(64 << 20)
	r1 := openReader(t, rep, f.oids[fixed128K], prefetch.Options{Cache: cache})
	if _, err := io.Copy(io.Discard, r1); err != nil {
		t.Fatal(err)
	}
	model.Reset()
	r2 := openReader(t, rep, f.oids[fixed128K], prefetch.Options{Cache: cache})
	var out bytes.Buffer
	if _, err := io.Copy(&out, r2); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), f.data) {
		t.Fatal("read from the shared cache differs")
	}
	if ms := model.Stats(); ms.Gets != 0 {
		t.Errorf("second reader fetched %d blobs though the shared cache holds the file", ms.Gets)
	}
	cs := cache.Stats()
	t.Logf("cache: %+v; second reader: %+v", cs, r2.Stats())
	if cs.Bytes > cs.MaxBytes || r2.Stats().CacheHits == 0 {
		t.Errorf("cache stats %+v", cs)
	}
}

func TestLRU(t *testing.T) {
	c := prefetch.NewLRU(10)
	c.Put("a", []byte("1234"))
	c.Put("b", []byte("5678"))
	if _, ok := c.Get("a"); !ok { // a is now the most recent
		t.Fatal("a missing")
	}
	c.Put("c", []byte("90")) // 10 bytes: fits
	c.Put("d", []byte("x"))  // 11: evicts b, the least recently used
	if _, ok := c.Get("b"); ok {
		t.Error("b not evicted")
	}
	for _, k := range []string{"a", "c", "d"} {
		if _, ok := c.Get(k); !ok {
			t.Errorf("%s evicted", k)
		}
	}
	c.Put("big", make([]byte, 11))
	if _, ok := c.Get("big"); ok {
		t.Error("a chunk larger than the cache was kept")
	}
	if s := c.Stats(); s.Bytes != 7 || s.Chunks != 3 || s.Evictions != 1 {
		t.Errorf("stats %+v", s)
	}
}

// TestNoGoroutineLeft: after Close, and after the context is cancelled in
// the middle of a read, every goroutine the Reader started has ended.
func TestNoGoroutineLeft(t *testing.T) {
	f := getFixture(t)
	rep, model := f.tr.open(t)
	// Let kopia start whatever it starts on a first read.
	if _, err := prefetch.CopyKopiaStyle(context.Background(), rep, f.oids[fixed128K], io.Discard); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)

	model.SetParams(drivemodel.Params{Latency: 200 * time.Millisecond})
	t.Run("close", func(t *testing.T) {
		base := runtime.NumGoroutine()
		// Close after reading the whole file.
		r, err := prefetch.Open(context.Background(), rep, f.oids[dynamic], prefetch.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, r); err != nil {
			t.Fatal(err)
		}
		r.Close()
		waitGoroutines(t, base, "after a full read and Close")

		// Close while a read waits and fetches are in flight.
		// (A window the 40 MiB file fills: FIXED-128K groups 4 MiB.)
		const window = 6
		r, err = prefetch.Open(context.Background(), rep, f.oids[fixed128K], prefetch.Options{Window: window})
		if err != nil {
			t.Fatal(err)
		}
		errc := make(chan error, 1)
		go func() {
			_, err := io.Copy(io.Discard, r)
			errc <- err
		}()
		time.Sleep(100 * time.Millisecond) // within the 200 ms round trip
		if n := runtime.NumGoroutine(); n < base+window {
			t.Errorf("%d goroutines during the read, want the window's %d fetches more than %d", n, window, base)
		}
		r.Close()
		if err := <-errc; !errors.Is(err, prefetch.ErrClosed) {
			t.Errorf("read interrupted by Close: %v", err)
		}
		waitGoroutines(t, base, "after Close during a read")
		if _, err := r.Read(make([]byte, 10)); !errors.Is(err, prefetch.ErrClosed) {
			t.Errorf("Read after Close: %v", err)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		base := runtime.NumGoroutine()
		ctx, cancel := context.WithCancel(context.Background())
		// Two 4 MiB fetches per 200 ms round trip: the 40 MiB file takes
		// about a second, so 300 ms in is mid-way.
		r, err := prefetch.Open(ctx, rep, f.oids[fixed128K], prefetch.Options{Window: 2})
		if err != nil {
			t.Fatal(err)
		}
		errc := make(chan error, 1)
		go func() {
			_, err := io.Copy(io.Discard, r)
			errc <- err
		}()
		time.Sleep(300 * time.Millisecond)
		start := time.Now()
		cancel()
		select {
		case err := <-errc:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("read cancelled mid-way: %v", err)
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("read returned %v after cancel", took)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("read did not return after cancel")
		}
		waitGoroutines(t, base, "after cancel, before Close")
		r.Close()
		waitGoroutines(t, base, "after cancel and Close")
	})
}

// TestRetriesAfterKopiaGivesUp: a drive that fails every request for
// longer than kopia's own retries last; the Reader's retries carry the
// read through once the drive recovers.
func TestRetriesAfterKopiaGivesUp(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for kopia's retries (~10 s)")
	}
	f := getFixture(t)
	rep, model := f.tr.open(t)
	r := openReader(t, rep, f.oids[dynamic], prefetch.Options{Window: 2, RetryBackoff: 2 * time.Second, Retries: 3})
	model.SetParams(drivemodel.Params{ErrorRate: 1, Seed: 1})
	go func() {
		time.Sleep(9 * time.Second) // kopia gives up after ~7.5 s
		model.SetParams(drivemodel.Params{ErrorRate: 0.05, Seed: 2})
	}()
	buf := make([]byte, 3<<20)
	if _, err := r.ReadAt(buf, 1<<20); err != nil {
		t.Fatalf("read across an outage: %v", err)
	}
	if !bytes.Equal(buf, f.data[1<<20:4<<20]) {
		t.Fatal("read differs")
	}
	ms, rs := model.Stats(), r.Stats()
	t.Logf("reader %+v; drive %+v", rs, ms)
	if rs.Retries == 0 || ms.InjectedErrors < 10 {
		t.Errorf("no retry by the reader (%d) or too few errors (%d)", rs.Retries, ms.InjectedErrors)
	}
}

// TestInjectedErrorsDuringRead: the drive preset's 1% errors (here 10%)
// are absorbed by kopia's retries; the bytes are identical.
func TestInjectedErrorsDuringRead(t *testing.T) {
	f := getFixture(t)
	rep, model := f.tr.open(t)
	r := openReader(t, rep, f.oids[fixed128K], prefetch.Options{})
	model.SetParams(drivemodel.Params{ErrorRate: 0.1, Seed: 5})
	var out bytes.Buffer
	if _, err := io.Copy(&out, r); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), f.data) {
		t.Fatal("read with injected errors differs")
	}
	if ms := model.Stats(); ms.InjectedErrors == 0 {
		t.Errorf("no error injected: %+v", ms)
	}
}

// TestCorruptPackDetected flips one byte of a pack blob: the read fails
// (every chunk is verified), it does not return other bytes.
func TestCorruptPackDetected(t *testing.T) {
	ctx := context.Background()
	tr := newTestRepo(t)
	data := randomData(6<<20, 3)
	oid := tr.write(t, data, fixed128K, "")
	var packs []string
	filepath.Walk(filepath.Join(tr.dir, "repo"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && strings.Contains(p, "/repo/p/") && fi.Size() > 1<<20 {
			packs = append(packs, p)
		}
		return nil
	})
	if len(packs) == 0 {
		t.Fatal("no pack blob found")
	}
	b, err := os.ReadFile(packs[0])
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	if err := os.WriteFile(packs[0], b, 0o600); err != nil {
		t.Fatal(err)
	}
	rep, _ := tr.open(t)
	// The pack reader's authenticated decryption catches it, with and
	// without the extra hash of every content.
	for _, c := range []struct {
		mode prefetch.Mode
		hash bool
	}{{prefetch.ModePackRanges, false}, {prefetch.ModePackRanges, true}, {prefetch.ModeObjects, false}} {
		r, err := prefetch.Open(ctx, rep, oid, prefetch.Options{Mode: c.mode, VerifyHash: c.hash, RetryBackoff: time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.Copy(io.Discard, r)
		r.Close()
		t.Logf("%v (hash %v): %v", c.mode, c.hash, err)
		if err == nil {
			t.Errorf("%v (hash %v): a corrupted pack read without error", c.mode, c.hash)
		}
	}
}

func TestDirectAndEmptyObjects(t *testing.T) {
	ctx := context.Background()
	tr := newTestRepo(t)
	small := randomData(100_000, 4)
	oidSmall := tr.write(t, small, dynamic, "")
	oidEmpty := tr.write(t, nil, dynamic, "")
	if _, ok := oidSmall.IndexObjectID(); ok {
		t.Fatalf("a 100 kB object is indirect: %v", oidSmall)
	}
	rep, _ := tr.open(t)
	r := openReader(t, rep, oidSmall, prefetch.Options{})
	got, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(got, small) {
		t.Fatalf("direct object: %v", err)
	}
	checkRandomReads(t, r, small, 40, 3)
	e, err := prefetch.Open(ctx, rep, oidEmpty, prefetch.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if n, err := e.Read(make([]byte, 10)); n != 0 || !errors.Is(err, io.EOF) {
		t.Errorf("empty object: %d, %v", n, err)
	}
}

// TestWebDAVRepository reads through a repository served by rclone's
// WebDAV server on 127.0.0.1.
func TestWebDAVRepository(t *testing.T) {
	ctx := context.Background()
	w := testenv.StartWebDAV(t)
	st, err := webdav.New(ctx, &webdav.Options{URL: w.URL, Username: w.Username, Password: w.Password}, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(context.Background()) })
	tr := initRepo(t, t.TempDir(), st)
	data := vmData(12<<20, 9)
	for _, splitter := range []string{dynamic, fixed128K} {
		oid := tr.write(t, data, splitter, "zstd-fastest")
		rep, model := tr.open(t)
		r := openReader(t, rep, oid, prefetch.Options{})
		var out bytes.Buffer
		if _, err := io.Copy(&out, r); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), data) {
			t.Fatalf("%s over WebDAV differs", splitter)
		}
		checkRandomReads(t, openReader(t, rep, oid, prefetch.Options{}), data, 40, 5)
		t.Logf("%s over WebDAV: %+v; drive %+v", splitter, r.Stats(), model.Stats())
	}
}

// TestRepeatedChunksKeepGroups: a FIXED-128K file whose every fourth
// chunk repeats one of a few blocks (stored once, early, in an older
// pack) is still fetched in GroupBytes-sized units, each unique content
// once: a repeat does not end a group nor cost a fetch of its own.
func TestRepeatedChunksKeepGroups(t *testing.T) {
	const (
		chunk   = 128 << 10
		nChunks = 256 // 32 MiB
		group   = 4 << 20
	)
	fillers := [][]byte{randomData(chunk, 1), randomData(chunk, 2), randomData(chunk, 3)}
	unique := randomData(nChunks*chunk, 4)
	data := make([]byte, 0, nChunks*chunk)
	var uniqueBytes int64
	for i := range nChunks {
		if i%4 == 3 {
			data = append(data, fillers[i%3]...)
			continue
		}
		data = append(data, unique[i*chunk:(i+1)*chunk]...)
		uniqueBytes += chunk
	}
	uniqueBytes += int64(len(fillers)) * chunk

	tr := newTestRepo(t)
	oid := tr.write(t, data, fixed128K, "")
	rep, model := tr.open(t)
	r := openReader(t, rep, oid, prefetch.Options{Window: 4, GroupBytes: group})
	model.Reset()
	var out bytes.Buffer
	if _, err := r.WriteTo(&out); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), data) {
		t.Fatal("read differs")
	}
	rs, ms := r.Stats(), model.Stats()
	t.Logf("%d chunks: %d fetches, %d requests, %d cache hits, %d bytes requested (%d unique)", rs.Chunks, rs.Fetches, rs.Requests, rs.CacheHits, rs.BytesRequested, uniqueBytes)
	if want := int64(len(data)/group) + 2; rs.Fetches > want {
		t.Errorf("%d fetches, want at most %d: repeats split the groups", rs.Fetches, want)
	}
	if rs.Requests > 2*rs.Fetches {
		t.Errorf("%d requests for %d fetches", rs.Requests, rs.Fetches)
	}
	// Gaps a group reads over are bounded by MaxGap per request.
	if limit := uniqueBytes + rs.Requests*prefetch.DefaultMaxGap; ms.BytesFetched > limit {
		t.Errorf("fetched %d bytes; the unique contents are %d bytes", ms.BytesFetched, uniqueBytes)
	}
	if ms.BytesFetched < uniqueBytes {
		t.Errorf("fetched %d bytes, less than the %d unique bytes", ms.BytesFetched, uniqueBytes)
	}
}

// TestReadAheadRampsUp: a ReadAt that merely follows a random one (the
// kernel splits a large random read in two) fetches a small window, not
// a whole one; a run of sequential ReadAts grows it to Window.
func TestReadAheadRampsUp(t *testing.T) {
	f := getFixture(t)
	rep, _ := f.tr.open(t)
	const window = 8
	r := openReader(t, rep, f.oids[fixed128K], prefetch.Options{Window: window, GroupBytes: 1 << 20})
	buf := make([]byte, 1<<20)
	off := int64(7 << 20)
	read := func() {
		t.Helper()
		if _, err := r.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, f.data[off:off+int64(len(buf))]) {
			t.Fatalf("ReadAt at %d differs", off)
		}
		off += int64(len(buf))
	}
	read() // random
	read() // follows it
	if s := r.Stats(); s.Fetches > 1+2+1 {
		t.Errorf("two reads of 1 MiB started %d fetches of 1 MiB", s.Fetches)
	}
	for range 6 {
		read()
	}
	// The window now runs Window units ahead of the reads.
	if s := r.Stats(); s.Fetches < 8+window-1 {
		t.Errorf("after 8 sequential reads of 1 MiB, %d fetches of 1 MiB: the window did not grow to %d", s.Fetches, window)
	}
}

// TestCachedRunsDoNotStarveTheWindow: runs of chunks already cached (the
// zero blocks of a disk) ride along in the units around them instead of
// taking window slots, so that the window keeps Window fetches in flight.
func TestCachedRunsDoNotStarveTheWindow(t *testing.T) {
	const (
		block  = 1 << 20
		blocks = 32
		window = 4
	)
	data := make([]byte, 0, blocks*block)
	for i := range blocks {
		if i%2 == 0 {
			data = append(data, randomData(block, byte(10+i))...)
		} else {
			data = append(data, make([]byte, block)...) // 8 chunks of one content
		}
	}
	tr := newTestRepo(t)
	oid := tr.write(t, data, fixed128K, "")
	rep, model := tr.open(t)
	r := openReader(t, rep, oid, prefetch.Options{Window: window, GroupBytes: block})
	model.SetParams(drivemodel.Params{Latency: 100 * time.Millisecond})
	model.Reset()
	start := time.Now()
	var out bytes.Buffer
	if _, err := r.WriteTo(&out); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if !bytes.Equal(out.Bytes(), data) {
		t.Fatal("read differs")
	}
	rs, ms := r.Stats(), model.Stats()
	// One request after the other would take a round trip each; a full
	// window overlaps them Window at a time. Slots spent on cached
	// chunks leave one fetch in flight at the start of every cached run.
	serial := time.Duration(ms.Gets) * 100 * time.Millisecond
	t.Logf("%d fetches, %d requests, at most %d concurrent, %v (serial %v)", rs.Fetches, ms.Gets, ms.MaxConcurrentGets, took.Round(time.Millisecond), serial)
	if took > serial/2 && !raceEnabled {
		t.Errorf("took %v, serial requests would take %v: the window is not kept full", took, serial)
	}
}

// TestFirstReadAtZeroOpensTheWindow: the first read of a fresh Reader at
// offset 0 (a cp through the mount) starts a sequential read: half the
// window, its head, is in flight after one small read and the whole
// window after the next, where a ReadAt elsewhere starts at one unit and
// a ReadAt that follows it at two.
func TestFirstReadAtZeroOpensTheWindow(t *testing.T) {
	f := getFixture(t)
	rep, _ := f.tr.open(t)
	const window = 8
	opts := prefetch.Options{Window: window, GroupBytes: 1 << 20}
	r := openReader(t, rep, f.oids[fixed128K], opts)
	buf := make([]byte, 128<<10)
	if _, err := r.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, f.data[:len(buf)]) {
		t.Fatal("ReadAt at 0 differs")
	}
	s := r.Stats()
	t.Logf("after one read of 128 KiB at 0: %d fetches, %.1f MiB buffered (bound %.1f MiB)", s.Fetches,
		float64(s.BufferedBytes)/(1<<20), float64(s.MemoryBound)/(1<<20))
	if s.Fetches != window/2 {
		t.Errorf("one read at offset 0 of a fresh reader started %d fetches, want half the window's %d", s.Fetches, window)
	}
	if _, err := r.ReadAt(buf, int64(len(buf))); err != nil {
		t.Fatal(err)
	}
	if s := r.Stats(); s.Fetches < window {
		t.Errorf("the next sequential read: %d fetches, want the window's %d", s.Fetches, window)
	}
	if s.MaxBufferedBytes > s.MemoryBound {
		t.Errorf("held %d bytes, more than the bound %d", s.MaxBufferedBytes, s.MemoryBound)
	}
	// The same small read anywhere else is a random read: one unit.
	r2 := openReader(t, rep, f.oids[fixed128K], opts)
	if _, err := r2.ReadAt(buf, 3<<20); err != nil {
		t.Fatal(err)
	}
	if s := r2.Stats(); s.Fetches != 1 {
		t.Errorf("a first read at 3 MiB started %d fetches, want 1", s.Fetches)
	}
	// A second read at 0 of a reader that has read before is not the
	// start of a file's read.
	if _, err := r2.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if s := r2.Stats(); s.Fetches != 2 {
		t.Errorf("a later read at 0 started %d fetches in all, want 2", s.Fetches)
	}
}

// TestHeadIsStriped: the first units of a read from offset 0 are fetched
// with ranged requests of at most HeadStripeBytes, the rest of the window
// with one request per pack range; the same read started at offset 1
// makes one request per range throughout.
func TestHeadIsStriped(t *testing.T) {
	const size = 8 << 20
	data := randomData(size, 77)
	tr := newTestRepo(t)
	oid := tr.write(t, data, fixed128K, "")
	gets := func(start int64) (prefetch.Stats, int64) {
		rep, model := tr.open(t)
		// One unit holds the file; with Window 2 it is the head.
		r := openReader(t, rep, oid, prefetch.Options{Window: 2, GroupBytes: size})
		model.Reset()
		if _, err := r.Seek(start, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		if _, err := r.WriteTo(&out); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), data[start:]) {
			t.Fatal("read differs")
		}
		return r.Stats(), model.Stats().Gets
	}
	s0, g0 := gets(0)
	s1, g1 := gets(1)
	t.Logf("from 0: %d fetches, %d pack ranges, %d requests; from 1: %d fetches, %d ranges, %d requests",
		s0.Fetches, s0.Requests, g0, s1.Fetches, s1.Requests, g1)
	if s0.Requests != s1.Requests {
		t.Fatalf("%d pack ranges from 0, %d from 1: the units differ", s0.Requests, s1.Requests)
	}
	if s0.Fetches != 1 || g1 != s1.Requests {
		t.Errorf("from offset 1: %d requests for %d pack ranges in %d fetches, want one fetch, one request per range", g1, s1.Requests, s1.Fetches)
	}
	// 8 MiB of data in requests of at most HeadStripeBytes.
	if want := int64(size / prefetch.HeadStripeBytes); g0 < want {
		t.Errorf("from offset 0: %d requests for %d pack ranges, want at least %d: the head is not striped", g0, s0.Requests, want)
	}
}

// TestReadsInParallelKeepTheWindow: a FUSE mount's reads of a file come
// several at a time and are served out of order, so that a read can
// arrive after a later one has moved the window past it. It is served
// where it is, without dropping the window and planning it again, and
// without resetting the ramp: the file takes about the fetches of one
// sequential read.
func TestReadsInParallelKeepTheWindow(t *testing.T) {
	f := getFixture(t)
	const (
		window = 8
		step   = 1 << 20
		batch  = 3
	)
	// Units of 4 MiB (the default), reads of 1 MiB, and a chunk cache
	// larger than the window, as the mount has (restore.KopiaSource): a
	// late read finds the chunks of the units the window has passed.
	opts := func() prefetch.Options {
		return prefetch.Options{Window: window, Cache: prefetch.NewLRU(2 * window * prefetch.DefaultGroupBytes)}
	}
	size := int64(len(f.data))

	rep, model := f.tr.open(t)
	model.SetParams(drivemodel.Params{Latency: 20 * time.Millisecond})
	seqReader := openReader(t, rep, f.oids[fixed128K], opts())
	buf := make([]byte, step)
	for off := int64(0); off < size; off += step {
		if _, err := seqReader.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
	}
	sequential := seqReader.Stats().Fetches

	rep2, model2 := f.tr.open(t)
	model2.SetParams(drivemodel.Params{Latency: 20 * time.Millisecond})
	r := openReader(t, rep2, f.oids[fixed128K], opts())
	if _, err := r.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	for base := int64(step); base < size; base += batch * step {
		var wg sync.WaitGroup
		errs := make([]error, batch)
		// The later reads go first, as they do when the kernel's reads
		// are served out of order.
		for k := batch - 1; k >= 0; k-- {
			off := base + int64(k)*step
			if off >= size {
				continue
			}
			wg.Go(func() {
				b := make([]byte, step)
				n, err := r.ReadAt(b, off)
				if err != nil && !errors.Is(err, io.EOF) {
					errs[k] = err
				} else if !bytes.Equal(b[:n], f.data[off:off+int64(n)]) {
					errs[k] = fmt.Errorf("ReadAt at %d differs", off)
				}
			})
			time.Sleep(2 * time.Millisecond)
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
	}
	s := r.Stats()
	t.Logf("%d chunks: %d fetches read in parallel batches of %d, %d read in order", s.Chunks, s.Fetches, batch, sequential)
	if s.Fetches > sequential+2 {
		t.Errorf("%d fetches for reads in parallel, %d for the same reads in order: the window was planned again", s.Fetches, sequential)
	}
}

// TestLateReadKeepsTheWindow: a read of a unit the window has just moved
// past (a FUSE read served after a later one) neither moves the window
// back nor resets its ramp: the next read finds the window refilled as
// if the late one had not come.
func TestLateReadKeepsTheWindow(t *testing.T) {
	f := getFixture(t)
	const window = 8
	rep, _ := f.tr.open(t)
	buf := make([]byte, 1<<20)
	run := func(late bool) prefetch.Stats {
		r := openReader(t, rep, f.oids[fixed128K], prefetch.Options{Window: window, GroupBytes: 1 << 20,
			Cache: prefetch.NewLRU(4 * window << 20)})
		read := func(off int64) {
			t.Helper()
			if _, err := r.ReadAt(buf, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, f.data[off:off+int64(len(buf))]) {
				t.Fatalf("ReadAt at %d differs", off)
			}
		}
		for i := range int64(10) {
			read(i << 20)
		}
		before := r.Stats()
		if late {
			read(7 << 20) // two units back
			if s := r.Stats(); s.Fetches != before.Fetches {
				t.Errorf("the late read made %d fetches, want none (its chunks are cached)", s.Fetches-before.Fetches)
			}
		}
		read(10 << 20) // the window refills behind it
		return r.Stats()
	}
	ref, got := run(false), run(true)
	t.Logf("fetches: %d in order, %d with a late read", ref.Fetches, got.Fetches)
	if got.Fetches != ref.Fetches {
		t.Errorf("%d fetches after a late read, %d without: the window moved or its ramp dropped", got.Fetches, ref.Fetches)
	}
}
