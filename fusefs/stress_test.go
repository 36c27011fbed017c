package fusefs_test

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
)

// stressDuration is how long the concurrent readers of
// TestConcurrentRandomReadsFromKopia read (issue #5: 30 s).
const stressDuration = 30 * time.Second

// stressDiskSize and stressCacheBytes: a file of ~220 FIXED-128K chunks
// read through a shared chunk cache of a fifth of its size, so chunks are
// evicted and fetched again all the time.
const (
	stressDiskSize   = 28<<20 + 4321
	stressCacheBytes = 6 << 20
)

// Eight readers of a kopia-only file at once for stressDuration, through
// the mount, with the kopia source's chunk cache smaller than the file:
// four at random offsets with O_DIRECT (every read reaches the
// filesystem), four sequential-ish through the page cache, which each
// drop the file's pages after every pass (so the kernel's read-ahead
// keeps asking too). Read sizes vary from 1 byte to 1.5 MiB; every byte
// is checked against the original.
func TestConcurrentRandomReadsFromKopia(t *testing.T) {
	w := newWorldWith(t, worldOptions{diskSize: stressDiskSize, nights: 1})
	cache := prefetch.NewLRU(stressCacheBytes)
	w.kopia.Prefetch = prefetch.Options{Cache: cache}
	_, dir := w.mount(t, time.Minute)
	path := filepath.Join(dir, w.snaps[0].Name, "images", "disk.img")
	want := w.disk[0]
	if got := getxattr(t, path, fusefs.XattrSources); got != "kopia" {
		t.Fatalf("%s = %q: the file should be in kopia only", fusefs.XattrSources, got)
	}

	stop := time.Now().Add(stressDuration)
	var wg sync.WaitGroup
	var reads, bytesRead atomic.Int64
	var failed atomic.Bool
	var slowest maxDuration
	check := func(r int, buf []byte, got int, err error, off int64) bool {
		end := min(off+int64(len(buf)), stressDiskSize)
		if err != nil && !(errors.Is(err, io.EOF) && end-off == int64(got)) {
			t.Errorf("reader %d: %d bytes at %d: %v", r, len(buf), off, err)
			return false
		}
		if int64(got) != end-off || !bytes.Equal(buf[:got], want[off:end]) {
			t.Errorf("reader %d: %d bytes at %d differ from the file (got %d)", r, len(buf), off, got)
			return false
		}
		reads.Add(1)
		bytesRead.Add(int64(got))
		return true
	}
	// sizes: mostly small, some as large as the kernel's largest read
	// and more.
	size := func(rng *rand.Rand) int {
		switch rng.IntN(4) {
		case 0:
			return 1 + rng.IntN(4096)
		case 1:
			return 1 + rng.IntN(128<<10)
		case 2:
			return 1 + rng.IntN(1<<20)
		}
		return 1<<20 + rng.IntN(512<<10)
	}
	for r := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(r), 1))
			random := r%2 == 0
			flags := os.O_RDONLY
			if random {
				flags |= syscall.O_DIRECT
			}
			f, err := os.OpenFile(path, flags, 0)
			if err != nil {
				t.Errorf("reader %d: %v", r, err)
				failed.Store(true)
				return
			}
			defer f.Close()
			// O_DIRECT wants nothing of the buffer on FUSE; page-aligned
			// all the same.
			buf := alignedBuf(2 << 20)
			off := int64(0)
			for time.Now().Before(stop) && !failed.Load() {
				n := size(rng)
				switch {
				case random:
					off = rng.Int64N(stressDiskSize)
				case off >= stressDiskSize || rng.IntN(64) == 0:
					// A new pass from a random place, with the file's
					// pages dropped so that it is read from the mount
					// again.
					if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
						t.Errorf("reader %d: fadvise: %v", r, err)
					}
					off = rng.Int64N(stressDiskSize)
				}
				t0 := time.Now()
				got, err := f.ReadAt(buf[:n], off)
				slowest.Update(time.Since(t0))
				if !check(r, buf[:n], got, err, off) {
					failed.Store(true)
					return
				}
				if !random {
					off += int64(got)
				}
			}
		})
	}
	// While they read: the open file is served by kopia.
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := getxattr(t, path, fusefs.XattrSource); got != "kopia" {
		t.Errorf("%s of the open file = %q, want kopia", fusefs.XattrSource, got)
	}
	f.Close()
	wg.Wait()

	time.Sleep(time.Second) // the kernel releases the files (async)
	t.Logf("kopia readers: %+v", w.kopiaC.prefetchStats())
	cs := cache.Stats()
	t.Logf("%d reads (%d MiB) verified, the slowest took %v; kopia served %d MiB to the mount; cache %+v",
		reads.Load(), bytesRead.Load()>>20, slowest.Load(), w.kopiaC.bytes.Load()>>20, cs)
	if cs.MaxBytes >= stressDiskSize || cs.Bytes > cs.MaxBytes {
		t.Errorf("cache holds %d of at most %d bytes: it should be smaller than the file (%d)", cs.Bytes, cs.MaxBytes, int64(stressDiskSize))
	}
	if cs.Evictions == 0 || cs.Misses == 0 || cs.Hits == 0 {
		t.Errorf("cache counters %+v: want hits, misses and evictions", cs)
	}
	// Chunks were fetched again after their eviction: more misses than
	// the file has chunks.
	if chunks := int64(stressDiskSize>>17 + 1); cs.Misses <= chunks {
		t.Errorf("%d cache misses for a file of %d chunks: nothing was fetched twice", cs.Misses, chunks)
	}
	// The reads reached kopia, not only the page cache: the sources
	// served several times the file.
	if got := w.kopiaC.bytes.Load(); got < 4*stressDiskSize {
		t.Errorf("kopia served %d bytes to the mount, want several times the file (%d)", got, stressDiskSize)
	}
	if got := w.localC.bytes.Load(); got != 0 {
		t.Errorf("the local source served %d bytes of a snapshot it does not hold", got)
	}
	if reads.Load() < 200 {
		t.Errorf("only %d reads in %v", reads.Load(), stressDuration)
	}
}

// alignedBuf returns n bytes starting on a page boundary.
func alignedBuf(n int) []byte {
	raw := make([]byte, n+4096)
	skip := (4096 - int(uintptr(unsafe.Pointer(&raw[0]))%4096)) % 4096
	return raw[skip : skip+n]
}

// maxDuration keeps the longest of durations given concurrently.
type maxDuration struct{ ns atomic.Int64 }

func (m *maxDuration) Update(d time.Duration) {
	for {
		cur := m.ns.Load()
		if int64(d) <= cur || m.ns.CompareAndSwap(cur, int64(d)) {
			return
		}
	}
}

func (m *maxDuration) Load() time.Duration { return time.Duration(m.ns.Load()) }
