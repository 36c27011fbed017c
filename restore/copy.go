package restore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/safefile"
)

// Defaults of CopyOptions.
const (
	DefaultParallel  = 16
	DefaultRangeSize = 4 << 20
	// SparseBlock is the granularity of holes: an aligned 4 KiB block of
	// zeros is not written, so it stays a hole of the file (which is
	// truncated to its full size first). 4 KiB is the block size of ext4
	// and xfs, and the page size a guest writes, so a VM image's unused
	// space becomes holes wherever it is; runs of non-zero blocks are
	// written with one call each, so the finer grain costs no syscalls on
	// dense data.
	SparseBlock = 4 << 10

	defaultProgressInterval = 200 * time.Millisecond
	defaultCommitInterval   = time.Second
	// commitRanges makes the journal commit early when this many ranges
	// are waiting, so a fast copy does not lose more than that on a crash.
	commitRanges = 64
	hashBufSize  = 1 << 20
	// hashSlack is how many range buffers there are beyond one per worker,
	// so that the workers go on while the hasher catches up.
	hashSlack = 4
	// directAlign is the alignment O_DIRECT wants of a buffer's address.
	directAlign = 4096
)

// Errors a caller may want to tell apart, with errors.Is; the errors
// themselves name the path.
var (
	// ErrDestExists: the destination exists and Force was not given.
	ErrDestExists = errors.New("destination exists")
	// ErrDestDir: the destination's directory does not exist or is not a
	// directory.
	ErrDestDir = errors.New("destination directory missing")
	// ErrVerify: the restored file differs from the second source.
	ErrVerify = errors.New("verification failed")
)

// destError is a one-line error about the destination that errors.Is
// matches to its kind.
type destError struct {
	msg  string
	kind error
}

func (e *destError) Error() string        { return e.msg }
func (e *destError) Is(target error) bool { return target == e.kind }

// CopyOptions tune Copy. The zero value works.
type CopyOptions struct {
	// Parallel is the number of ranges fetched at once (default 16).
	// Memory is bounded by (Parallel + 4) × RangeSize (the 4 let the
	// fetching go on while the hash catches up), plus 1 MiB to hash ranges
	// an earlier run left.
	Parallel int
	// RangeSize is the unit of fetching, writing and the journal (default
	// 4 MiB, rounded up to a multiple of SparseBlock). A resumed restore
	// keeps the range size its journal was written with.
	RangeSize int64
	// Force replaces an existing destination file.
	Force bool
	// PageCache writes through the page cache instead of with O_DIRECT
	// (see CopyResult.DirectIO, copier.writeAt).
	PageCache bool
	// NoSync writes through the page cache and never waits for the disk:
	// no fsync as ranges are journaled nor at the end, so the restore
	// returns while the kernel still writes the file back, as cp, rsync and
	// "kopia snapshot restore" (without --flush-files) do. A power loss
	// soon after can lose what was not written back yet. The journal still
	// lets an interrupted restore resume (see journal): ranges recorded
	// without a sync count only until the machine restarts, and a restore
	// that stops on an error or an interrupt syncs what it wrote before it
	// returns. Where this boot's ID cannot be read, NoSync is ignored.
	NoSync bool
	// Identity is recorded in the journal: a rerun resumes only a partial
	// restore of the same identity. Its Size is the source's; its Path's
	// base name is the file's name when the destination is a directory.
	Identity SourceIdentity
	// Mode is the restored file's mode (permission, setuid, setgid and
	// sticky bits are applied); 0 means 0644. ModTime, when set, becomes
	// its modification time.
	Mode    fs.FileMode
	ModTime time.Time
	// Verify, when set, is a second source of the same file: the result
	// is re-read and compared with it before it gets its final name.
	Verify File
	// Progress is called from one goroutine at a time, every
	// ProgressInterval (default 200 ms) and when a phase ends.
	Progress         func(Progress)
	ProgressInterval time.Duration
	// SourceBytes returns bytes read per source so far (a FailoverFile's
	// counters); the result carries what it returns at the end.
	SourceBytes func() map[string]int64
	// Notice receives one-line messages worth telling the user, such as
	// why a partial restore was discarded.
	Notice func(string)
	// CommitInterval is how often finished ranges are made durable and
	// journaled (default 1 s; also every 64 ranges).
	CommitInterval time.Duration
	// NoSHA256 leaves the result's SHA-256 out (CopyResult.SHA256 is ""):
	// every byte is still verified against its source (a kopia content
	// against its ID), but the hash of the whole file, one pass over every
	// byte that no other step can share, is the one serial stage of a
	// restore and bounds it where the store and the disk are fast (2 GiB
	// of it is ~1.5 CPU-seconds on the 2-core test machine).
	NoSHA256 bool
	// BeforePublish, when set, is called once every byte is written and
	// before the file gets its final name; an error keeps the partial
	// file and journal and is Copy's (see Session.CheckOpen: whether what
	// was restored is still what the spec names).
	BeforePublish func(context.Context) error
}

func (o *CopyOptions) setDefaults() {
	if o.Parallel <= 0 {
		o.Parallel = DefaultParallel
	}
	if o.RangeSize <= 0 {
		o.RangeSize = DefaultRangeSize
	}
	o.RangeSize = (o.RangeSize + SparseBlock - 1) / SparseBlock * SparseBlock
	if o.ProgressInterval <= 0 {
		o.ProgressInterval = defaultProgressInterval
	}
	if o.CommitInterval <= 0 {
		o.CommitInterval = defaultCommitInterval
	}
	if o.Notice == nil {
		o.Notice = func(string) {}
	}
}

// CopyResult is what a finished Copy did.
type CopyResult struct {
	Dest string `json:"dest"`
	Size int64  `json:"size"`
	// Fetched counts bytes read from the source by this run; Resumed the
	// bytes an earlier, interrupted run had restored already.
	Fetched int64 `json:"fetched_bytes"`
	Resumed int64 `json:"resumed_bytes"`
	// Written counts the non-zero bytes this run wrote. ZeroBytes counts
	// the file's bytes in all-zero blocks, left as holes; DiskBytes is what
	// the file occupies on disk.
	Written   int64 `json:"written_bytes"`
	ZeroBytes int64 `json:"zero_bytes"`
	DiskBytes int64 `json:"disk_bytes"`
	// DirectIO says the data went to disk with O_DIRECT, past the page
	// cache (false where the destination's filesystem refuses it).
	DirectIO bool `json:"direct_io"`
	// Synced says the file was on disk (fsync'd) when Copy returned; false
	// with NoSync.
	Synced bool `json:"synced"`
	// Sequential says the source was read in order by one reader, its own
	// read-ahead keeping the fetches in flight (kopia's prefetching
	// reader), rather than by Parallel readers at once.
	Sequential bool `json:"sequential_read"`
	// FirstByte is when the first bytes fetched by this run were in
	// hand (zero when nothing was fetched).
	FirstByte time.Time `json:"-"`
	// BySource is CopyOptions.SourceBytes at the end.
	BySource map[string]int64 `json:"bytes_by_source,omitempty"`
	Duration time.Duration    `json:"-"`
	Seconds  float64          `json:"seconds"`
	// Rate is Fetched per second of Duration.
	Rate float64 `json:"bytes_per_second"`
	// SHA256 is the hash of the whole restored file, resumed parts
	// included; "" with NoSHA256.
	SHA256   string `json:"sha256"`
	Verified bool   `json:"verified"`
	// Restarted says why a partial restore found beside the destination
	// was discarded, if one was.
	Restarted string `json:"restarted,omitempty"`
	RangeSize int64  `json:"range_size"`
	Parallel  int    `json:"parallel"`
	// PeakBuffers is the most range buffers that were in use at once: at
	// most Parallel (2 with Parallel 1 and Verify, which compares two
	// buffers).
	PeakBuffers int `json:"peak_buffers"`
}

// DestPath resolves where a restore of a file named name goes: dest
// itself, or dest/name when dest is an existing directory. It refuses a
// destination whose directory does not exist, and an existing file unless
// force.
func DestPath(dest, name string, force bool) (string, error) {
	if dest == "" {
		return "", errors.New("no destination given")
	}
	if fi, err := os.Stat(dest); err == nil && fi.IsDir() {
		if name == "" || name == "." || name == "/" || name == ".." {
			return "", fmt.Errorf("%s is a directory and the file has no name to restore under", dest)
		}
		dest = filepath.Join(dest, name)
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
		return "", err
	}
	dir := filepath.Dir(dest)
	switch fi, err := os.Stat(dir); {
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR):
		return "", &destError{"the destination directory " + dir + " does not exist", ErrDestDir}
	case err != nil:
		return "", err
	case !fi.IsDir():
		return "", &destError{"the destination directory " + dir + " is not a directory", ErrDestDir}
	}
	switch fi, err := os.Lstat(dest); {
	case err == nil && fi.IsDir():
		return "", fmt.Errorf("%s is a directory", dest)
	case err == nil && !replaceable(fi.Mode()):
		return "", fmt.Errorf("%s is %s: a restore writes only a regular file (or a new name)", dest, safefile.Describe(fi.Mode()))
	case err == nil && !force:
		return "", &destError{dest + " already exists", ErrDestExists}
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return "", err
	}
	return dest, nil
}

// Copy restores src into dest: Parallel ranges at a time, read with ReadAt
// and written with positional writes into dest+PartialSuffix, all-zero
// blocks left as holes, each batch of finished ranges fsync'd and then
// recorded in dest+JournalSuffix. When every range is in, the file gets
// Mode and ModTime, is fsync'd and renamed to dest (which must not exist
// unless Force), and the journal is removed.
//
// The SHA-256 of the result is computed by reading the partial file back in
// order as the finished ranges form a growing prefix, alongside the
// fetching: it covers what is on disk, ranges resumed from an earlier run
// included, and costs no extra pass over a slow source.
//
// If ctx is cancelled, or a read or write fails, Copy stops its workers
// (a read in progress is waited for), journals what is durable, and
// returns with the partial file and journal kept: calling Copy again with
// the same Identity fetches only the missing ranges. No goroutine outlives
// Copy.
func Copy(ctx context.Context, src File, dest string, opts CopyOptions) (CopyResult, error) {
	start := time.Now()
	opts.setDefaults()
	size := src.Size()
	if size < 0 {
		return CopyResult{}, fmt.Errorf("source reports a negative size %d", size)
	}
	id := opts.Identity
	id.Size = size
	id.ModTime = id.ModTime.UTC()
	name := path.Base(id.Path)
	if id.Path == "" {
		name = ""
	}
	final, err := DestPath(dest, name, opts.Force)
	if err != nil {
		return CopyResult{}, err
	}
	if err := ctx.Err(); err != nil {
		return CopyResult{}, err
	}
	partialPath, journalPath := final+PartialSuffix, final+JournalSuffix
	// Names planted beside the destination (a symbolic link to another
	// file, a device) are refused before anything is written, and again
	// on the files opened.
	for _, p := range []string{partialPath, journalPath} {
		if err := safefile.CheckRegular(p); err != nil {
			return CopyResult{}, err
		}
	}
	warnSharedDir(filepath.Dir(final))

	j, done, restart, err := openJournal(journalPath, journalHeader{Source: id, RangeSize: opts.RangeSize, Started: start.UTC()})
	if err != nil {
		return CopyResult{}, err
	}
	closeJournal := true
	defer func() {
		if closeJournal {
			j.Close()
		}
	}()
	_, statErr := os.Lstat(partialPath)
	if len(done) > 0 && statErr != nil {
		restart, done = "its partial file "+partialPath+" is gone", nil
		if err := j.reset(journalHeader{Source: id, RangeSize: opts.RangeSize, Started: start.UTC()}); err != nil {
			return CopyResult{}, err
		}
	}
	if restart != "" {
		opts.Notice(fmt.Sprintf("discarding the partial restore beside %s: %s; starting over", final, restart))
	}
	rangeSize := j.header.RangeSize

	f, err := safefile.OpenFile(partialPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		if errors.Is(err, safefile.ErrNotRegular) {
			return CopyResult{}, err
		}
		return CopyResult{}, fmt.Errorf("create %s: %w", partialPath, err)
	}
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	if len(done) == 0 {
		// Nothing of the file is recorded: whatever it holds (an earlier
		// restore of something else) must go, or its bytes would show
		// through the holes of this one. The journal was reset first, so
		// a crash here cannot leave records that vouch for stale bytes.
		if err := truncateToZero(f); err != nil {
			return CopyResult{}, fmt.Errorf("truncate %s: %w", partialPath, err)
		}
	}
	if err := f.Truncate(size); err != nil {
		return CopyResult{}, fmt.Errorf("size %s: %w", partialPath, err)
	}

	c := &copier{
		src: src, f: f, size: size, rangeSize: rangeSize,
		n:    int((size + rangeSize - 1) / rangeSize),
		kick: make(chan struct{}, 1), noSHA256: opts.NoSHA256,
	}
	c.done = make([]bool, c.n)
	c.prior = make([]bool, c.n)
	c.ready = map[int]fetchedRange{}
	var pending []int
	for i := 0; i < c.n; i++ {
		if done[i] {
			c.done[i] = true
			c.prior[i] = true
			c.resumed += c.length(i)
		} else {
			pending = append(pending, i)
		}
	}
	if c.resumed > 0 {
		// The workers fetch exactly the missing ranges in parallel; a
		// source's own read-ahead would refetch ranges already on disk.
		setReadAhead(src, false)
	} else if prefersStreaming(src) {
		// A source with its own read-ahead (kopia's prefetching reader)
		// is read in order by one reader, its whole window in flight.
		c.stream = true
		setStreaming(src, true)
	}
	res := CopyResult{Dest: final, Size: size, Resumed: c.resumed, Restarted: restart,
		RangeSize: rangeSize, Parallel: opts.Parallel}

	if opts.NoSync {
		c.unsyncedBoot = currentBootID()
		if c.unsyncedBoot == "" {
			opts.Notice("this boot's ID (/proc/sys/kernel/random/boot_id) cannot be read: the restore syncs as it goes, as without --no-sync")
		}
	}
	if !opts.PageCache && c.unsyncedBoot == "" {
		if d := openDirect(f); d != nil {
			// Closed here, not where a write finds O_DIRECT refused: other
			// workers may be writing through it at that moment.
			defer d.Close()
			c.direct.Store(d)
		}
	}
	if err := c.fetch(ctx, j, pending, opts, start); err != nil {
		res.Fetched, res.Written = c.fetched.Load(), c.written.Load()
		res.PeakBuffers = int(c.peak.Load())
		return res, err
	}
	res.Fetched, res.Written = c.fetched.Load(), c.written.Load()
	res.DirectIO = c.direct.Load() != nil
	res.Sequential = c.stream
	if t := c.firstByte.Load(); t != nil {
		res.FirstByte = *t
	}
	res.ZeroBytes = c.zeroBytes
	if c.sum != nil {
		res.SHA256 = hex.EncodeToString(c.sum)
	}

	if opts.Verify != nil {
		if err := c.verify(ctx, opts.Verify, opts); err != nil {
			res.PeakBuffers = int(c.peak.Load())
			return res, err
		}
		res.Verified = true
	}
	res.PeakBuffers = int(c.peak.Load())
	if opts.BeforePublish != nil {
		if err := opts.BeforePublish(ctx); err != nil {
			return res, err
		}
	}

	mode := opts.Mode & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
	if opts.Mode == 0 {
		mode = 0o644
	}
	if err := f.Chmod(mode); err != nil {
		return res, fmt.Errorf("set mode of %s: %w", partialPath, err)
	}
	if !opts.ModTime.IsZero() {
		if err := setModTime(f, opts.ModTime); err != nil {
			return res, fmt.Errorf("set mtime of %s: %w", partialPath, err)
		}
	}
	if c.unsyncedBoot == "" {
		if err := f.Sync(); err != nil {
			return res, fmt.Errorf("sync %s: %w", partialPath, err)
		}
		res.Synced = true
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err == nil {
		res.DiskBytes = st.Blocks * 512
	}
	if err := f.Close(); err != nil {
		f = nil
		return res, fmt.Errorf("close %s: %w", partialPath, err)
	}
	f = nil
	if err := publish(partialPath, final, opts.Force); err != nil {
		return res, err
	}
	if res.Synced {
		syncDir(filepath.Dir(final))
	}
	closeJournal = false
	if err := j.remove(); err != nil {
		return res, err
	}
	if opts.SourceBytes != nil {
		res.BySource = opts.SourceBytes()
	}
	res.Duration = time.Since(start)
	res.Seconds = res.Duration.Seconds()
	if res.Seconds > 0 {
		res.Rate = float64(res.Fetched) / res.Seconds
	}
	return res, nil
}

// copier is one Copy's shared state.
type copier struct {
	src       File
	f         *os.File
	size      int64
	rangeSize int64
	n         int
	resumed   int64
	// stream: one reader takes the ranges in order (see prefersStreaming).
	stream   bool
	noSHA256 bool // CopyOptions.NoSHA256
	// unsyncedBoot is this boot's ID when the restore does not wait for
	// the disk (CopyOptions.NoSync), else "".
	unsyncedBoot string

	// direct is the partial file opened again with O_DIRECT, nil where the
	// filesystem refuses it (see openDirect); Copy closes it.
	direct atomic.Pointer[os.File]

	// pageCacheMu serializes writes through the page cache (writeAt).
	pageCacheMu sync.Mutex

	mu    sync.Mutex
	done  []bool // ranges written (durable or not yet)
	prior []bool // ranges the journal had before this run
	// ready holds the ranges fetched this run that the hasher has not
	// taken yet, with their bytes: each byte is hashed from memory while
	// it is hot, never read back.
	ready map[int]fetchedRange
	kick  chan struct{}
	bufs  chan []byte // free range buffers

	fetched atomic.Int64 // bytes read from the source this run
	written atomic.Int64 // non-zero bytes written this run
	inUse   atomic.Int64 // range buffers in use
	peak    atomic.Int64

	firstByte atomic.Pointer[time.Time]

	// Set by the hasher when it finishes.
	sum       []byte
	zeroBytes int64
}

// fetchedRange is a range's bytes on their way from a worker to the hasher.
type fetchedRange struct {
	buf   []byte
	zeros int64 // bytes of all-zero SparseBlocks in it
}

func (c *copier) offset(i int) int64 { return int64(i) * c.rangeSize }

func (c *copier) length(i int) int64 {
	return min(c.rangeSize, c.size-c.offset(i))
}

// acquire counts a range buffer in use; release gives it back.
func (c *copier) acquire() {
	n := c.inUse.Add(1)
	for {
		p := c.peak.Load()
		if n <= p || c.peak.CompareAndSwap(p, n) {
			return
		}
	}
}

func (c *copier) release() { c.inUse.Add(-1) }

// fetch runs the workers over pending, the journal commits and the hasher,
// until every range is in or something stops them.
func (c *copier) fetch(ctx context.Context, j *journal, pending []int, opts CopyOptions, start time.Time) error {
	workCtx, cancel := context.WithCancel(ctx)
	defer cancel()

	var (
		errMu    sync.Mutex
		firstErr error
	)
	fail := func(err error) {
		errMu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		errMu.Unlock()
		cancel()
	}

	work := make(chan int, len(pending))
	for _, i := range pending {
		work <- i
	}
	close(work)
	finished := make(chan int, len(pending))

	// Each worker takes a free buffer before it takes a range, so the range
	// the hasher waits for always has a buffer: the hasher, which frees
	// them, can never be starved of it. A few more buffers than workers let
	// the workers run on while the hasher catches up.
	nworkers := min(opts.Parallel, max(len(pending), 1))
	c.bufs = make(chan []byte, nworkers+hashSlack)
	for range nworkers + hashSlack {
		c.bufs <- nil // allocated on first use
	}
	var workers sync.WaitGroup
	// done hands a written range on to the hasher and the journal.
	done := func(i int, buf []byte, zeros int64) {
		c.mu.Lock()
		c.ready[i] = fetchedRange{buf: buf[:c.length(i)], zeros: zeros}
		c.mu.Unlock()
		c.signal()
		finished <- i
	}
	if c.stream {
		// One reader takes the ranges in order, so the source's own
		// read-ahead sees one sequential stream from the start and keeps
		// its whole window in flight; the workers write.
		type readRange struct {
			i   int
			buf []byte
		}
		filled := make(chan readRange, nworkers)
		workers.Add(1)
		go func() {
			defer workers.Done()
			defer close(filled)
			for i := range work {
				var buf []byte
				select {
				case buf = <-c.bufs:
				case <-workCtx.Done():
					return
				}
				if buf == nil {
					buf = alignedBuffer(int(c.rangeSize))
				}
				c.acquire()
				b := buf[:c.length(i)]
				if err := readFull(c.src, b, c.offset(i)); err != nil {
					c.release()
					c.bufs <- buf
					fail(err)
					return
				}
				c.gotBytes(int64(len(b)))
				filled <- readRange{i: i, buf: b}
			}
		}()
		for w := 0; w < nworkers; w++ {
			workers.Add(1)
			go func() {
				defer workers.Done()
				for r := range filled {
					i := r.i
					zeros, err := c.writeRange(i, r.buf)
					c.release()
					if err != nil {
						c.bufs <- r.buf[:cap(r.buf)]
						fail(err)
						continue // drain filled so the reader can stop
					}
					done(i, r.buf, zeros)
				}
			}()
		}
	} else {
		for w := 0; w < nworkers; w++ {
			workers.Add(1)
			go func() {
				defer workers.Done()
				for {
					var buf []byte
					select {
					case buf = <-c.bufs:
					case <-workCtx.Done():
						return
					}
					i, ok := <-work
					if !ok || workCtx.Err() != nil {
						c.bufs <- buf
						return
					}
					if buf == nil {
						buf = alignedBuffer(int(c.rangeSize))
					}
					zeros, err := c.copyRange(i, buf)
					if err != nil {
						c.bufs <- buf
						fail(err)
						return
					}
					done(i, buf, zeros)
				}
			}()
		}
	}
	go func() {
		workers.Wait()
		close(finished)
	}()

	var hasher sync.WaitGroup
	hasher.Add(1)
	go func() {
		defer hasher.Done()
		if err := c.hash(workCtx); err != nil && workCtx.Err() == nil {
			fail(err)
		}
	}()
	c.signal()

	m := newMeter(start)
	rep := startReporter(opts.Progress, opts.ProgressInterval, func() Progress {
		now := time.Now()
		fetched := c.fetched.Load()
		done := c.resumed + fetched
		rate := m.observe(now, fetched)
		return Progress{Phase: PhaseRestore, Done: done, Total: c.size, Resumed: c.resumed,
			Rate: rate, ETA: eta(c.size-done, rate), Elapsed: now.Sub(start)}
	})

	// Commit: make the written ranges durable, then journal them; without
	// a sync (NoSync), journal them as this boot's.
	var toJournal, unsynced []int
	commit := func() error {
		if len(toJournal) == 0 {
			return nil
		}
		if c.unsyncedBoot != "" {
			if err := j.recordUnsynced(toJournal, c.unsyncedBoot); err != nil {
				return err
			}
			unsynced = append(unsynced, toJournal...)
			toJournal = toJournal[:0]
			return nil
		}
		if err := c.f.Sync(); err != nil {
			return fmt.Errorf("sync %s: %w", c.f.Name(), err)
		}
		if err := j.record(toJournal); err != nil {
			return err
		}
		toJournal = toJournal[:0]
		return nil
	}
	ticker := time.NewTicker(opts.CommitInterval)
	defer ticker.Stop()
	var commitErr error
loop:
	for {
		select {
		case i, ok := <-finished:
			if !ok {
				break loop
			}
			c.mu.Lock()
			c.done[i] = true
			c.mu.Unlock()
			c.signal()
			toJournal = append(toJournal, i)
			if len(toJournal) >= commitRanges && commitErr == nil {
				if commitErr = commit(); commitErr != nil {
					fail(commitErr)
				}
			}
		case <-ticker.C:
			if commitErr == nil {
				if commitErr = commit(); commitErr != nil {
					fail(commitErr)
				}
			}
		}
	}
	// The workers are gone: journal what they finished, whatever stopped them.
	errMu.Lock()
	stopped := firstErr != nil
	errMu.Unlock()
	if stopped || ctx.Err() != nil {
		// A restore that stops leaves its partial file durable, so that a
		// rerun after a reboot resumes it too.
		toJournal = append(unsynced, toJournal...)
		c.unsyncedBoot = ""
	}
	if commitErr == nil {
		if commitErr = commit(); commitErr != nil {
			fail(commitErr)
		}
	}
	errMu.Lock()
	err := firstErr
	errMu.Unlock()
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	if err != nil {
		cancel()
		hasher.Wait()
		rep.stop(false)
		done := c.resumed + c.fetched.Load()
		what := "stopped"
		if ctx.Err() != nil {
			what = "interrupted"
		}
		return fmt.Errorf("restore of %s %s with %d of %d bytes done (%s and its journal are kept; run it again to resume): %w",
			strings.TrimSuffix(c.f.Name(), PartialSuffix), what, done, c.size, c.f.Name(), err)
	}
	hasher.Wait()
	rep.stop(true)
	errMu.Lock()
	err = firstErr
	errMu.Unlock()
	return err
}

// signal wakes the hasher.
func (c *copier) signal() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// copyRange fetches range i into buf and writes its non-zero blocks; it
// returns how many bytes were in all-zero blocks.
func (c *copier) copyRange(i int, buf []byte) (int64, error) {
	c.acquire()
	defer c.release()
	off, n := c.offset(i), c.length(i)
	b := buf[:n]
	if err := readFull(c.src, b, off); err != nil {
		return 0, err
	}
	c.gotBytes(n)
	return c.writeRange(i, b)
}

// gotBytes counts n bytes fetched, noting when the first came.
func (c *copier) gotBytes(n int64) {
	if c.fetched.Add(n) == n {
		now := time.Now()
		c.firstByte.CompareAndSwap(nil, &now)
	}
}

// writeRange writes range i's bytes b, its all-zero blocks left as holes,
// and returns how many bytes those were.
func (c *copier) writeRange(i int, b []byte) (int64, error) {
	off := c.offset(i)
	zeros, w, err := c.writeSparse(b, off)
	c.written.Add(w)
	if err != nil {
		return 0, fmt.Errorf("write %s at offset %d: %w", c.f.Name(), off, err)
	}
	return zeros, nil
}

// readFull reads len(b) bytes at off, as io.ReaderAt promises.
func readFull(r io.ReaderAt, b []byte, off int64) error {
	n, err := r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("source ended at offset %d, before its size: %w", off+int64(n), io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("read at offset %d: %w", off+int64(n), err)
}

var zeroBlock [SparseBlock]byte

// writeSparse writes b at off except its all-zero SparseBlocks, each run of
// non-zero blocks with one call, and returns the bytes of zero blocks it
// skipped and the bytes it wrote. off is SparseBlock-aligned.
func (c *copier) writeSparse(b []byte, off int64) (zeros, written int64, err error) {
	runStart := -1
	flush := func(end int) error {
		if runStart < 0 {
			return nil
		}
		err := c.writeAt(b[runStart:end], off+int64(runStart))
		written += int64(end - runStart)
		runStart = -1
		return err
	}
	for p := 0; p < len(b); p += SparseBlock {
		end := min(p+SparseBlock, len(b))
		if bytes.Equal(b[p:end], zeroBlock[:end-p]) {
			zeros += int64(end - p)
			if err := flush(p); err != nil {
				return zeros, written, err
			}
		} else if runStart < 0 {
			runStart = p
		}
	}
	return zeros, written, flush(len(b))
}

// writeAt writes b at off, its whole SparseBlocks with O_DIRECT where the
// filesystem takes it. A restore writes each byte once and does not read
// it back (the hasher hashes it from memory), so passing it through the
// page cache only costs: on a VM host it would push the running VMs'
// cache out for a 50 GiB file, and the kernel's write-back of that much
// dirty cache costs more CPU than the restore itself (measured here: 3.4 s
// of system time per 1.2 GiB, against 0.1 s written direct). The tail of
// the file that is not a whole block goes through the page cache.
func (c *copier) writeAt(b []byte, off int64) error {
	if d := c.direct.Load(); d != nil {
		whole := len(b) &^ (SparseBlock - 1)
		if whole > 0 {
			_, err := d.WriteAt(b[:whole], off)
			if err == nil {
				b, off = b[whole:], off+int64(whole)
			} else if !errors.Is(err, unix.EINVAL) {
				return err
			} else {
				// The filesystem opened it but refuses the write (an
				// alignment it wants larger than SparseBlock): from now
				// on through the page cache.
				c.direct.CompareAndSwap(d, nil)
			}
		}
	}
	// Through the page cache, in pieces of at most pageCacheWrite, one
	// writer at a time: each piece's copy into the cache then stays within
	// the CPU's caches, and the kernel, which takes a buffered write to a
	// file under the file's exclusive lock, is not left spinning on it
	// (measured here, 1.2 GiB: 4 MiB calls from 16 writers cost 0.8–1.0 s
	// of system time and 1.0 s wall; 1 MiB calls from one writer 0.4–0.5 s
	// and 0.5–0.6 s wall).
	c.pageCacheMu.Lock()
	defer c.pageCacheMu.Unlock()
	for len(b) > 0 {
		n := min(len(b), pageCacheWrite)
		if _, err := c.f.WriteAt(b[:n], off); err != nil {
			return err
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// pageCacheWrite is the largest write through the page cache.
const pageCacheWrite = 1 << 20

// openDirect opens f's file again with O_DIRECT, through /proc/self/fd so
// that it is the same file whatever happens to its name, or returns nil
// where the filesystem does not support O_DIRECT (tmpfs, some FUSE
// filesystems).
func openDirect(f *os.File) *os.File {
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), unix.O_WRONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	return os.NewFile(uintptr(fd), f.Name())
}

// alignedBuffer returns n bytes whose start is aligned for O_DIRECT.
func alignedBuffer(n int) []byte {
	b := make([]byte, n+directAlign)
	skip := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) & (directAlign - 1)); r != 0 {
		skip = directAlign - r
	}
	return b[skip : skip+n : skip+n]
}

// hash feeds the file into SHA-256 in order, as the finished ranges grow
// into a longer prefix: the ranges fetched this run from the bytes the
// workers hand over (and then frees their buffers), the ranges an earlier
// run left from the partial file. It counts the bytes of all-zero blocks.
func (c *copier) hash(ctx context.Context) error {
	var h hash.Hash
	if !c.noSHA256 {
		h = sha256.New()
	}
	var readBuf []byte
	var zeros int64
	for next := 0; next < c.n; {
		c.mu.Lock()
		r, fetched := c.ready[next]
		if fetched {
			delete(c.ready, next)
		}
		prior := c.prior[next]
		c.mu.Unlock()
		switch {
		case fetched:
			if h != nil {
				h.Write(r.buf)
			}
			zeros += r.zeros
			c.bufs <- r.buf[:cap(r.buf)]
			next++
		case prior:
			if readBuf == nil {
				readBuf = make([]byte, hashBufSize)
			}
			z, err := c.hashBack(ctx, h, readBuf, next)
			if err != nil {
				return err
			}
			zeros += z
			next++
		default:
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-c.kick:
			}
		}
	}
	if h != nil {
		c.sum = h.Sum(nil)
	}
	c.zeroBytes = zeros
	return nil
}

// hashBack hashes range i as the partial file holds it.
func (c *copier) hashBack(ctx context.Context, h hash.Hash, buf []byte, i int) (int64, error) {
	var zeros int64
	for off, end := c.offset(i), c.offset(i)+c.length(i); off < end; {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		b := buf[:min(int64(len(buf)), end-off)]
		if err := readFull(c.f, b, off); err != nil {
			return 0, fmt.Errorf("read back %s: %w", c.f.Name(), err)
		}
		if h != nil {
			h.Write(b)
		}
		for p := 0; p < len(b); p += SparseBlock {
			e := min(p+SparseBlock, len(b))
			if bytes.Equal(b[p:e], zeroBlock[:e-p]) {
				zeros += int64(e - p)
			}
		}
		off += int64(len(b))
	}
	return zeros, nil
}

// verify compares the partial file with a second source of the same
// file, Parallel/2 ranges at a time (two buffers each), and reports the
// first offset where they differ.
func (c *copier) verify(ctx context.Context, other File, opts CopyOptions) error {
	if other.Size() != c.size {
		return fmt.Errorf("%w: the second source's file is %d bytes, the restored one %d", ErrVerify, other.Size(), c.size)
	}
	start := time.Now()
	workers := max(1, opts.Parallel/2)
	work := make(chan int, c.n)
	for i := 0; i < c.n; i++ {
		work <- i
	}
	close(work)

	var (
		compared atomic.Int64
		mu       sync.Mutex
		diffAt   int64 = -1
		diffA    byte
		diffB    byte
		firstErr error
	)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	m := newMeter(start)
	rep := startReporter(opts.Progress, opts.ProgressInterval, func() Progress {
		now := time.Now()
		done := compared.Load()
		rate := m.observe(now, done)
		return Progress{Phase: PhaseVerify, Done: done, Total: c.size, Rate: rate,
			ETA: eta(c.size-done, rate), Elapsed: now.Sub(start)}
	})
	var wg sync.WaitGroup
	for w := 0; w < min(workers, max(c.n, 1)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine, theirs []byte
			for i := range work {
				if ctx.Err() != nil {
					return
				}
				off, n := c.offset(i), c.length(i)
				mu.Lock()
				past := diffAt >= 0 && diffAt < off
				mu.Unlock()
				if past {
					continue
				}
				if mine == nil {
					mine, theirs = make([]byte, c.rangeSize), make([]byte, c.rangeSize)
				}
				c.acquire()
				c.acquire()
				err := readFull(c.f, mine[:n], off)
				if err == nil {
					if err = readFull(other, theirs[:n], off); err != nil {
						err = fmt.Errorf("verify: read the second source: %w", err)
					}
				} else {
					err = fmt.Errorf("verify: read back %s: %w", c.f.Name(), err)
				}
				if err == nil && !bytes.Equal(mine[:n], theirs[:n]) {
					for k := int64(0); k < n; k++ {
						if mine[k] != theirs[k] {
							mu.Lock()
							if diffAt < 0 || off+k < diffAt {
								diffAt, diffA, diffB = off+k, mine[k], theirs[k]
							}
							mu.Unlock()
							break
						}
					}
				}
				c.release()
				c.release()
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					cancel()
					return
				}
				compared.Add(n)
			}
		}()
	}
	wg.Wait()
	rep.stop(firstErr == nil && diffAt < 0)
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("verify stopped (%s and its journal are kept): %w", c.f.Name(), err)
	}
	if diffAt >= 0 {
		return fmt.Errorf("%w: the restored file differs from the second source at offset %d (0x%02x, the second source has 0x%02x); it is kept as %s, not renamed",
			ErrVerify, diffAt, diffA, diffB, c.f.Name())
	}
	return nil
}

// replaceable reports whether a restore with Force may give its file the
// name of a file of this mode: a regular file, or a symbolic link (the
// rename replaces the link itself, never writes through it), but never a
// device, fifo or socket.
func replaceable(mode fs.FileMode) bool {
	return mode.IsRegular() || mode&fs.ModeSymlink != 0
}

// publish gives the finished file its final name, atomically. Without
// force an existing file is never replaced, even one that appeared while
// the restore ran: renameat2(RENAME_NOREPLACE), or a hard link where the
// filesystem lacks it.
func publish(tmp, final string, force bool) error {
	if fi, err := os.Lstat(final); err == nil && !replaceable(fi.Mode()) {
		return fmt.Errorf("%s became %s while restoring; the restored file is kept as %s", final, safefile.Describe(fi.Mode()), tmp)
	}
	if force {
		// rename replaces a symbolic link at final itself, never the
		// file it points to.
		if err := os.Rename(tmp, final); err != nil {
			return fmt.Errorf("rename the restored file into place: %w", err)
		}
		return nil
	}
	err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, final, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.ENOTSUP) {
		err = os.Link(tmp, final)
		if err == nil {
			err = os.Remove(tmp)
		}
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fs.ErrExist):
		return &destError{final + " appeared while restoring; the restored file is kept as " + tmp, ErrDestExists}
	default:
		return fmt.Errorf("rename the restored file into place: %w", err)
	}
}

// truncateToZero empties f, and leaves a file that is empty already alone:
// ext4 marks a file truncated to zero (even one that was empty) to have its
// dirty pages written out when it is closed (auto_da_alloc, for programs
// that rewrite a file in place without fsync), and that close then waits
// for the I/O to be queued — 0.5–0.6 s for a 1.2 GiB restore here, and as
// long again for the journal's close queued behind it.
func truncateToZero(f *os.File) error {
	fi, err := f.Stat()
	if err == nil && fi.Size() == 0 {
		return nil
	}
	return f.Truncate(0)
}

// setModTime sets f's modification (and access) time through its
// descriptor, so that no name, and no symbolic link, is followed.
func setModTime(f *os.File, t time.Time) error {
	ts := []unix.Timespec{unix.NsecToTimespec(t.UnixNano()), unix.NsecToTimespec(t.UnixNano())}
	return unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", f.Fd()), ts, 0)
}

// warnSharedDir warns when users other than the owner can write the
// destination's directory: they could plant names where the restore
// writes (refused, but the restore then fails), or replace the restored
// file after it is in place.
func warnSharedDir(dir string) {
	if shared, mode, err := safefile.SharedDir(dir); err == nil && shared {
		slog.Warn("the restore's destination directory is writable by other users; a file restored there can be replaced by them",
			"dir", dir, "mode", fmt.Sprintf("%04o", mode.Perm()))
	}
}

// syncDir makes a rename in dir durable; filesystems that cannot fsync a
// directory are not an error.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}
