// Package prefetch reads a file of a kopia repository fast from a distant
// store: the prefetching reader.
//
// kopia's own object reader (what "kopia mount" and "kopia restore" use)
// fetches one chunk at a time, each a round trip to the store, so on a
// store with a 1.2 s round trip it moves one ~4 MiB chunk per ~1.9 s. The
// Reader here reads the file's chunk table (the indirect object's index:
// every chunk's offset, length and object ID) and
//
//   - on sequential reads keeps a window of fetches in flight concurrently
//     (Options.Window, default 32) and hands the bytes back in order;
//   - fetches consecutive small chunks together (Options.GroupBytes of
//     data per fetch) with a few concurrent ranged reads of their pack
//     blobs, so a FIXED-128K repository does not pay a round trip per
//     128 KiB, even where repeated blocks point back into older packs;
//   - keeps the contents its file holds more than once (zero and filler
//     blocks) so that it fetches each once;
//   - serves a random ReadAt by fetching just the chunks it covers;
//   - optionally splits each fetch into concurrent ranged requests
//     (Options.StripeBytes) for stores that limit each request's speed;
//   - retries what kopia's storage layer gave up on, with backoff;
//   - keeps a shared, bounded cache of chunks (ChunkCache, LRU);
//   - stops every goroutine it started on Close or when its context ends.
//
// # Fetching and verification
//
// For a direct repository (the normal case), a fetch reads a byte range
// of one pack blob through the repository's own blob storage
// (DirectRepository.BlobReader: kopia's throttler, metrics and the
// backend's retry loop apply) and decodes each content in it as kopia's
// content manager does: authenticated decryption (AES-GCM or
// ChaCha20-Poly1305 with a key derived from the content ID: tampered or
// misplaced bytes fail), then decompression, so every byte handed out is
// verified once against its content ID. kopia's own read path verifies
// contents the same way (decryptContentAndVerify relies on the
// authenticated decryption). The decryption runs in the pack range's own
// buffer (see inPlaceDecryptor) once it has agreed with kopia's Decrypt,
// which copies every byte three times. For an encryption not known to authenticate,
// or with Options.VerifyHash, the data is also hashed and compared with
// the content ID. If a content cannot be
// decoded here (a format this code does not know) or a fetch keeps
// failing, the chunk is read through kopia's object reader instead
// (ModeObjects), which verifies it by kopia's own means.
//
// # Memory
//
// A fetch unit is one chunk, or a group of consecutive chunks of at most
// GroupBytes of data. Its size is at most
//
//	unitMax = max(GroupBytes, largest chunk of the file)
//
// (DYNAMIC-4M-BUZHASH chunks are at most 8 MiB, FIXED-128K groups 4 MiB
// by default). The sequential window holds at most Window units, fetched
// or in flight, so the data a Reader holds is bounded by
//
//	Window × unitMax (MemoryBound), plus one unit per concurrent random
//	ReadAt that is not served from the window or the cache,
//
// about 32 × 4–8 MiB = 128–256 MiB by default (a window only fills that
// far on a sequential read: at once for Read, WriteTo and the first read
// of a fresh Reader at offset 0, from 2 units up for a ReadAt that
// follows another). A seeded Reader (Options.Seeds) plans FarFactor ×
// Window more units past those once its window is whole; until one of
// them is among the first Window it reads no seed and holds only what it
// fetched of the chunks no seed offers, all of them together at most
// half of Window × unitMax (the far budget), which MemoryBound includes:
// most of a seeded unit's bytes come from the seeds, so its small store
// fetch can go out long before the reader gets there. While a pack range is being
// decoded its encrypted bytes are held too (at most as many again for the
// units being decoded at that moment, one per CPU in practice). The chunk
// cache is bounded separately (NewLRU's size; without Options.Cache a
// private one of PrivateCacheBytes), and so is the Reader's own cache of
// repeated contents (RepeatCacheBytes, only for a file that has some).
//
// # Retries
//
// kopia's backends already retry at the blob layer (repo/blob/retrying:
// 10 attempts, exponential backoff from 100 ms, on every error but
// not-found and a few other permanent ones; the filesystem backend has
// its own loop). An error that reaches the Reader has survived those, so
// the Reader retries only a few more times (Options.Retries, default 2)
// with a longer backoff (Options.RetryBackoff, 1 s doubling), and never
// for permanent errors (not found, invalid range, bad credentials) or
// cancellation; then a pack-range fetch falls back once to kopia's object
// reader. A request is thus attempted at most 10 × (1+2) + 10 times.
package prefetch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/object"
)

// Mode says how chunks are fetched.
type Mode int

const (
	// ModeAuto is ModePackRanges on a direct repository, else ModeObjects.
	ModeAuto Mode = iota
	// ModePackRanges reads ranges of pack blobs covering one chunk or a
	// group of adjacent chunks, and decodes and verifies them here.
	ModePackRanges
	// ModeObjects reads each chunk through kopia's object reader
	// (repo.OpenObject on the chunk), one chunk per fetch: no grouping.
	ModeObjects
	// ModeKopiaPrefetch groups chunks by pack as ModePackRanges does, but
	// fetches a group by rep.PrefetchContents (with PrefetchHint) and
	// then reads each chunk through kopia's object reader. It is here to
	// measure kopia's own prefetch: see PrefetchHint.
	ModeKopiaPrefetch
)

func (m Mode) String() string {
	switch m {
	case ModeAuto:
		return "auto"
	case ModePackRanges:
		return "pack-ranges"
	case ModeObjects:
		return "objects"
	case ModeKopiaPrefetch:
		return "kopia-prefetch"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Defaults.
const (
	DefaultWindow       = 32
	DefaultGroupBytes   = 4 << 20
	DefaultMaxGap       = 256 << 10
	DefaultRetries      = 2
	DefaultRetryBackoff = time.Second
	// PrivateCacheBytes is the size of the cache of a Reader given none.
	PrivateCacheBytes = 16 << 20
	// HeadStripeBytes is the most one ranged request of the head of a
	// sequential read from offset 0 asks for (see Reader.headUnits),
	// unless Options.StripeBytes is smaller. Not smaller: the head's
	// requests share the link, so past the per-request bandwidth limit
	// more of them bring its bytes no sooner, while each is one more
	// chance of a throttled answer that costs a retry (through the drive
	// model, 16 units of 4 MiB in 1 MiB requests were 64 chances of 1 %:
	// the median first 64 MiB of a cp through the mount came at 40 % of
	// the steady rate).
	HeadStripeBytes = 2 << 20
	// RepeatCacheBytes bounds a Reader's own cache of the contents its
	// file holds more than once.
	RepeatCacheBytes = 32 << 20
)

// Options tune a Reader. The zero value means the defaults.
type Options struct {
	// Window is the number of fetch units kept in flight or ready ahead
	// of a sequential reader (default 32: on a store 150 ms away at
	// 20 MiB/s per request, 16 kept a cp through the mount just under 10×
	// kopia's own read, 32 makes it about 14×).
	Window int
	// GroupBytes bounds the data of a group of consecutive chunks
	// fetched together, and the span of each ranged pack read it makes
	// (default 4 MiB; negative: never group).
	GroupBytes int64
	// MaxGap is the most unrelated pack bytes one ranged read of a group
	// reads over (default 256 KiB; negative: none).
	MaxGap int64
	// Cache is a chunk cache to share with other Readers; nil gives the
	// Reader a private LRU of PrivateCacheBytes.
	Cache ChunkCache
	// Mode is how chunks are fetched (default ModeAuto).
	Mode Mode
	// StripeBytes, when positive, splits a fetch larger than it into
	// concurrent ranged requests of at most StripeBytes each (as
	// multi-stream downloaders do), for stores whose throughput per
	// request is limited: a 5 MiB chunk at 6 MiB/s per request takes
	// latency + 0.85 s as one request, latency + 0.33 s as three of 2 MiB.
	// It multiplies the requests in flight (up to Window × unitMax /
	// StripeBytes) and the requests per byte. Default 0: one request per
	// fetch. ModePackRanges only. The head of a sequential read from
	// offset 0 is striped anyway, at HeadStripeBytes (see headUnits).
	StripeBytes int64
	// PrefetchHint is the hint ModeKopiaPrefetch passes to
	// rep.PrefetchContents. kopia v0.22.3 fetches a whole pack blob into
	// its on-disk content cache when the hint is "blobs", or with the
	// default hint "" when a pack holds ≥2 of the contents totalling
	// ≥5 MB; otherwise it fetches the contents one by one, 5 at a time.
	// Whole-pack fetches need a kopia cache directory: without one
	// (passthrough cache) they do nothing. Default "blobs".
	PrefetchHint string
	// Retries is how many more times a failed fetch is attempted after
	// kopia's own retries (default 2; negative: none). RetryBackoff is
	// the first pause, doubled each time (default 1 s).
	Retries      int
	RetryBackoff time.Duration
	// VerifyHash hashes every content fetched from a pack and compares it
	// with its content ID, also where the repository's authenticated
	// encryption has already verified it against that ID (see
	// contentCodec). It costs a second pass over every byte.
	VerifyHash bool
	// Seeds, when set, proposes copies of chunks on this host, taken
	// instead of fetching them once they hash to the chunk's content ID
	// (see Seeder). ModePackRanges only: it needs the repository's hash
	// function.
	Seeds Seeder
}

func (o Options) withDefaults() Options {
	if o.Window <= 0 {
		o.Window = DefaultWindow
	}
	if o.GroupBytes == 0 {
		o.GroupBytes = DefaultGroupBytes
	}
	if o.MaxGap == 0 {
		o.MaxGap = DefaultMaxGap
	}
	if o.MaxGap < 0 {
		o.MaxGap = 0
	}
	if o.Retries == 0 {
		o.Retries = DefaultRetries
	}
	if o.Retries < 0 {
		o.Retries = 0
	}
	if o.RetryBackoff <= 0 {
		o.RetryBackoff = DefaultRetryBackoff
	}
	if o.PrefetchHint == "" {
		o.PrefetchHint = "blobs"
	}
	return o
}

// ErrClosed is returned by reads on a closed Reader.
var ErrClosed = errors.New("prefetch: reader closed")

// Stats are a Reader's counters.
type Stats struct {
	// Chunks is the number of chunks of the file; Mode the fetch mode used.
	Chunks int
	Mode   Mode
	// Fetches counts fetch units started, ChunksFetched the chunks they
	// covered, Requests the ranged reads of pack blobs they made
	// (ModePackRanges: one per segment of a unit, retries included, not
	// counting StripeBytes splits), BytesRequested the bytes they asked
	// the storage for (pack ranges, gaps included; chunk lengths
	// otherwise).
	Fetches, ChunksFetched, Requests, BytesRequested int64
	// CacheHits counts chunks served from the chunk cache.
	CacheHits int64
	// Retries counts fetch attempts repeated after an error; Fallbacks
	// the units read through kopia's object reader after pack reads failed.
	Retries, Fallbacks int64
	// BufferedBytes is the chunk data the Reader holds now (planned size
	// of units in flight, data of fetched units not yet released),
	// MaxBufferedBytes its peak, MemoryBound the bound it stays within
	// for a single sequential reader (Window × unitMax).
	BufferedBytes, MaxBufferedBytes, MemoryBound int64
	// Seeds counts the chunks taken from Options.Seeds.
	Seeds SeedStats
}

// Reader reads one kopia object (a file) with prefetch. Its methods are
// safe for concurrent use; ReadAt calls may run in parallel. Read, Seek
// and WriteTo share one position.
type Reader struct {
	// noReadAhead makes every ReadAt fetch just its own chunks (see
	// SetReadAhead).
	noReadAhead atomic.Bool
	// streaming makes every ReadAt use the whole window at once, as Read
	// does (see SetStreaming).
	streaming atomic.Bool

	rep     repo.Repository
	oid     object.ID
	opts    Options
	chunks  []chunk
	length  int64
	unitMax int64
	mode    Mode
	cache   ChunkCache
	// repeats keeps the contents that occur more than once in the file
	// (repeated is their set, from the chunk table), so that a later
	// occurrence is not fetched again once the shared cache has moved
	// on: a VM disk repeats zero and filler blocks all along.
	repeats  *LRU
	repeated map[object.ID]bool

	loc   *locator      // pack locations (ModePackRanges, ModeKopiaPrefetch)
	codec *contentCodec // ModePackRanges
	blobs blob.Reader   // ModePackRanges

	ctx    context.Context //nolint:containedctx // the lifetime of the reader's fetches
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	pos     int64   // Read/Seek/WriteTo position
	lastEnd int64   // end of the last read, to detect sequential ReadAt
	win     []*unit // the sequential window: contiguous units, in order
	// ramp is how many units the window may hold now: it doubles with
	// each sequential ReadAt up to Window and drops on a random one, so
	// that one read that happens to follow another (the second half of a
	// large random read the kernel split) does not fetch a whole window.
	// The first read of a fresh Reader at offset 0 (a cp, a restore)
	// sets it to Window at once.
	ramp int
	// began is set by the first read. next is the end of the latest read
	// started, lastEnd that of the latest finished: a FUSE file's reads
	// come in parallel (the kernel's read-ahead), so the next read of a
	// sequential reader often arrives before the one before it is done.
	began bool
	next  int64
	// passed holds the first chunks of the last units the window moved
	// past, oldest first (see stragglerLocked).
	passed []int
	// headUnits is how many more units the window plans as the head of a
	// sequential read from offset 0 of a fresh Reader (Window/2 of them).
	// Their pack ranges are read in requests of at most HeadStripeBytes:
	// the whole window is planned at once and its fetches share the
	// link, so the head's bytes, spread over more requests, arrive
	// sooner than in one request per range (on a store that bounds each
	// request's speed, the first 64 MiB of a cp through the mount took
	// about as long as the whole window). Zero once that window is
	// dropped.
	headUnits int
	ahead     int           // first chunk after the window
	owner     map[int]*unit // chunk index -> unit holding or fetching it
	// fetching maps a repeated content to the unit fetching it, so that
	// a later occurrence waits for that fetch instead of making its own.
	fetching map[object.ID]*unit
	// farBytes is the far budget in use: the store bytes far units have
	// fetched or are fetching (see unit.near), at most farBudget. It is
	// granted in file order: farQueue holds the far units that have not
	// had theirs yet, in order, and farTurn (on mu) wakes them when the
	// budget or the queue changes. Taken as the units come, the budget
	// went to whichever far units were first to ask, and the nearest ones
	// often were not: they then fetched once near, a round trip each for
	// the reader to wait for.
	farBytes int64
	farQueue []*unit
	farTurn  *sync.Cond
	stats    Stats
}

// unit is one fetch: chunks [first, last] of the file.
type unit struct {
	first, last int
	size        int64 // bytes of data (sum of chunk lengths)
	stripe      int64 // ranged reads of at most this many bytes (0: Options.StripeBytes)

	ctx    context.Context //nolint:containedctx
	cancel context.CancelFunc
	done   chan struct{}
	pre    [][]byte // nil, or one per chunk: chunks the cache held when the unit was planned
	// seeded, nil or one per chunk: chunks taken from Options.Seeds, set
	// by the unit's own goroutine before it fetches.
	seeded [][]byte
	// deps, nil or one per chunk: the unit already fetching the chunk's
	// content (a repeat), whose data the chunk takes when it is done.
	deps []*unit
	// near is set for a unit planned far, past the first Window units of
	// a seeded sequential window (see advanceLocked), and closed when the
	// unit becomes near (nearLocked). Until then it holds little: it
	// fetches from the store only the chunks no seed offers (stored), if
	// the far budget allows, and reads no seed, so that a window whose
	// units are mostly seeded keeps its small store fetches in flight far
	// ahead of the reader (on a store 1.2 s away, every unit holding one
	// changed chunk cost the window a round trip) without holding more
	// than Window units of data.
	near      chan struct{}
	isNear    bool
	cands     [][]Seed // per chunk, found far: the seeds to read once near (nil: ask the Seeder)
	stored    [][]byte // per chunk: fetched far
	reserved  int64    // far budget held (see Reader.farBytes)
	accounted int64    // bytes counted in Stats.BufferedBytes
	data      [][]byte // one per chunk, set before done is closed
	err       error

	refs      int  // reads using the unit
	inWindow  bool // part of the sequential window
	released  bool // no longer reachable; its bytes are freed when finished
	finished  bool
	ephemeral bool // served from the cache, not registered anywhere
	pinned    bool // never released (a direct object's only chunk)
}

// Open opens object oid of rep for reading. ctx bounds the life of the
// Reader: when it ends, reads fail and fetches stop. Close the Reader when
// done with it.
func Open(ctx context.Context, rep repo.Repository, oid object.ID, opts Options) (*Reader, error) {
	opts = opts.withDefaults()
	r := &Reader{rep: rep, oid: oid, opts: opts, owner: map[int]*unit{}, fetching: map[object.ID]*unit{}}
	r.farTurn = sync.NewCond(&r.mu)
	r.ctx, r.cancel = context.WithCancel(ctx)

	chunks, direct, err := loadChunks(r.ctx, rep, oid)
	if err != nil {
		r.cancel()
		return nil, fmt.Errorf("open kopia object %v: %w", oid, err)
	}
	r.chunks = chunks
	var maxChunk int64
	for _, c := range chunks {
		maxChunk = max(maxChunk, c.length)
	}
	if n := len(chunks); n > 0 {
		r.length = chunks[n-1].start + chunks[n-1].length
	}
	r.unitMax = maxChunk
	if opts.GroupBytes > 0 {
		r.unitMax = max(maxChunk, opts.GroupBytes)
	}
	r.cache = opts.Cache
	if r.cache == nil {
		r.cache = NewLRU(PrivateCacheBytes)
	}
	r.repeated = repeatedContents(chunks)
	if len(r.repeated) > 0 {
		r.repeats = NewLRU(RepeatCacheBytes)
	}

	r.mode = opts.Mode
	if r.mode == ModeAuto || r.mode == ModePackRanges {
		r.mode = ModeObjects
		if dr, ok := rep.(repo.DirectRepository); ok {
			if codec, err := newContentCodec(dr.ContentReader().ContentFormat(), opts.VerifyHash); err == nil {
				r.mode, r.codec, r.blobs = ModePackRanges, codec, dr.BlobReader()
			}
		}
	}
	if r.mode != ModeObjects && direct == nil {
		r.loc = newLocator(rep, chunks)
	}
	r.stats = Stats{Chunks: len(chunks), Mode: r.mode, MemoryBound: r.MemoryBound()}

	if direct != nil {
		u := &unit{first: 0, last: 0, size: int64(len(direct)), data: [][]byte{direct}, done: make(chan struct{}), finished: true, pinned: true}
		close(u.done)
		r.owner[0] = u
		r.accountLocked(u, u.size)
	}
	return r, nil
}

// Length returns the size of the object in bytes.
func (r *Reader) Length() int64 { return r.length }

// ObjectID returns the object being read.
func (r *Reader) ObjectID() object.ID { return r.oid }

// MemoryBound returns Window × unitMax, plus the far budget of a seeded
// Reader, the most chunk data a single sequential reader makes the Reader
// hold (see the package doc).
func (r *Reader) MemoryBound() int64 { return int64(r.opts.Window)*r.unitMax + r.farBudget() }

// farBudget is the most store bytes the far units of a seeded window hold
// (see unit.near): half the window's bound.
func (r *Reader) farBudget() int64 {
	if !r.farCapable() {
		return 0
	}
	return int64(r.opts.Window) * r.unitMax / 2
}

// farCapable reports whether a sequential window plans far units: only a
// seeded Reader that groups chunks, whose units are mostly read from
// seeds and fetch little from the store.
func (r *Reader) farCapable() bool {
	return r.seedable() && r.loc != nil && r.opts.GroupBytes > 0
}

// FarFactor is how many times Window units a seeded sequential window
// plans past its first Window (see unit.near).
const FarFactor = 3

// Stats returns the Reader's counters.
func (r *Reader) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.stats
	s.Seeds = s.Seeds.clone()
	return s
}

// Read reads the next bytes, prefetching ahead.
func (r *Reader) Read(p []byte) (int, error) {
	r.mu.Lock()
	pos := r.pos
	r.mu.Unlock()
	n, err := r.readAt(p, pos, true)
	r.mu.Lock()
	r.pos = pos + int64(n)
	r.mu.Unlock()
	if n > 0 && errors.Is(err, io.EOF) {
		err = nil
	}
	return n, err
}

// ReadAt reads len(p) bytes at offset off. A ReadAt that starts where the
// previous read ended (or where one still in progress will end), within
// the prefetch window or just behind it (a read the kernel sent before a
// later one that has moved the window on), counts as sequential and
// moves the window, which grows from 2 units to Window as sequential
// reads follow each other; any other fetches just the chunks it covers.
// The first read of a fresh Reader at offset 0 counts as the start of a
// sequential read and opens the whole window; so do Read and WriteTo.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	return r.readAt(p, off, r.streaming.Load())
}

// SetStreaming tells the Reader that its ReadAt calls will read the file
// in order, one after the other, as a restore does: each then moves the
// window at once, with all of it in flight from the first call, instead of
// the window growing from 2 units with each sequential call.
func (r *Reader) SetStreaming(on bool) { r.streaming.Store(on) }

// SetReadAhead turns the sequential detection of ReadAt on (the default)
// or off. A caller that already reads in parallel and knows which ranges
// it needs — a restore resuming after a crash — turns it off, so the
// window does not fetch ahead into ranges it already has. Read and
// WriteTo always read ahead.
func (r *Reader) SetReadAhead(on bool) { r.noReadAhead.Store(!on) }

// Seek sets the position of Read and WriteTo.
func (r *Reader) Seek(offset int64, whence int) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += r.pos
	case io.SeekEnd:
		offset += r.length
	default:
		return 0, fmt.Errorf("prefetch: invalid whence %d", whence)
	}
	if offset < 0 {
		return 0, fmt.Errorf("prefetch: negative position %d", offset)
	}
	r.pos = offset
	return offset, nil
}

// WriteTo writes the object from the current position to w, handing w the
// chunks' bytes directly (no copy), with prefetch.
func (r *Reader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		r.mu.Lock()
		pos := r.pos
		r.mu.Unlock()
		if pos >= r.length {
			return total, nil
		}
		c := chunkIndex(r.chunks, pos)
		r.mu.Lock()
		r.beginLocked(pos, true)
		r.ramp = r.opts.Window
		r.mu.Unlock()
		u, err := r.acquire(c, true, len(r.chunks)-1)
		if err != nil {
			return total, err
		}
		ch := r.chunks[c]
		n, err := w.Write(u.data[c-u.first][pos-ch.start:])
		r.unref(u)
		total += int64(n)
		r.mu.Lock()
		r.pos = pos + int64(n)
		r.lastEnd = r.pos
		r.mu.Unlock()
		if err != nil {
			return total, err
		}
	}
}

// Close stops all fetches and waits for their goroutines to end.
func (r *Reader) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.dropWindowLocked()
	r.mu.Unlock()
	r.cancel()
	r.wg.Wait()
	return nil
}

func (r *Reader) errDone() error {
	r.mu.Lock()
	closed := r.closed
	r.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if err := context.Cause(r.ctx); err != nil {
		return err
	}
	return ErrClosed
}

func (r *Reader) readAt(p []byte, off int64, stream bool) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("prefetch: negative offset %d", off)
	}
	if r.ctx.Err() != nil {
		return 0, r.errDone()
	}
	if off >= r.length {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	end := min(off+int64(len(p)), r.length)
	first, last := chunkIndex(r.chunks, off), chunkIndex(r.chunks, end-1)
	r.mu.Lock()
	readAhead := !r.noReadAhead.Load()
	fresh := r.beginLocked(off, readAhead)
	straggler := readAhead && r.stragglerLocked(first)
	sequential := readAhead &&
		(fresh || (off > 0 && (off == r.lastEnd || off == r.next)) || r.inWindowLocked(first) || straggler)
	switch {
	case stream:
		r.ramp = r.opts.Window
	case fresh:
		// Half the window, the head: units planned at once share the
		// link, so a first read waits until all of them are nearly in
		// (the first 64 MiB of a cp through the mount came at 40 % of
		// the steady rate with the whole window planned at once); the
		// next read, arriving as the head does, doubles it.
		r.ramp = max(r.opts.Window/2, 1)
	case straggler:
		// The same sequential reader: the ramp stays.
	case sequential:
		r.ramp = min(max(2*r.ramp, 2), r.opts.Window)
	default:
		r.ramp = 1
	}
	r.next = end
	seq := stream || sequential
	r.mu.Unlock()

	n := 0
	for pos := off; pos < end; {
		c := chunkIndex(r.chunks, pos)
		u, err := r.acquire(c, seq, last)
		if err != nil {
			return n, err
		}
		ch := r.chunks[c]
		k := copy(p[pos-off:end-off], u.data[c-u.first][pos-ch.start:])
		r.unref(u)
		pos += int64(k)
		n += k
	}
	r.mu.Lock()
	r.lastEnd = end
	r.mu.Unlock()
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// beginLocked notes a read at off and reports whether it is the first
// read of the Reader and at offset 0: the start of a sequential read
// (cp, dd, a restore), whose window then opens at once, its head striped
// (see headUnits) when readAhead.
func (r *Reader) beginLocked(off int64, readAhead bool) bool {
	if r.began {
		return false
	}
	r.began = true
	if off != 0 || !readAhead {
		return false
	}
	r.headUnits = max(r.opts.Window/2, 1)
	return true
}

func (r *Reader) inWindowLocked(c int) bool {
	return len(r.win) > 0 && c >= r.win[0].first && c < r.ahead
}

// stragglerLocked reports whether chunk c is in one of the last units the
// window moved past (r.passed) and not beyond where the window starts: a
// read of the sequential reader that arrives after a later one moved the
// window on (the kernel sends a FUSE file's reads in parallel, and they
// are served out of order). It is served without moving the window back,
// which would drop the fetches in flight ahead and plan them again.
func (r *Reader) stragglerLocked(c int) bool {
	if len(r.passed) == 0 {
		return false
	}
	front := r.ahead
	if len(r.win) > 0 {
		front = r.win[0].first
	}
	return c >= r.passed[0] && c < front
}

// stragglerUnits is how many of the units the window moved past still
// count as its own for a read that arrives late (see stragglerLocked):
// more than a kernel's reads in flight on one file span.
func (r *Reader) stragglerUnits() int { return max(r.opts.Window/4, 2) }

// stripeOf is the most one ranged read of unit u asks for (0: no limit).
func (r *Reader) stripeOf(u *unit) int64 {
	if u.stripe > 0 && (r.opts.StripeBytes <= 0 || u.stripe < r.opts.StripeBytes) {
		return u.stripe
	}
	return r.opts.StripeBytes
}

// lookahead is how many chunks past c the window may plan: enough for
// Window groups of GroupBytes, and the far units of a seeded Reader.
func (r *Reader) lookahead(c int) int {
	per := 1
	if r.opts.GroupBytes > 0 && r.length > 0 {
		avg := max(r.length/int64(len(r.chunks)), 1)
		per = int(r.opts.GroupBytes/avg) + 1
	}
	units := r.opts.Window + 1
	if r.farCapable() {
		units += FarFactor * r.opts.Window
	}
	return c + units*per
}

// acquire returns the unit holding chunk c, fetched, with a reference the
// caller must give back with unref. seq moves the sequential window to c
// first; otherwise a missing chunk is fetched alone, grouped at most with
// the following chunks up to limit.
func (r *Reader) acquire(c int, seq bool, limit int) (*unit, error) {
	if r.loc != nil {
		// Look the chunks' packs up before taking the lock: a lookup can
		// read from storage when kopia refreshes its indexes.
		if seq {
			r.loc.ensure(r.ctx, c, r.lookahead(c))
		} else {
			r.loc.ensure(r.ctx, c, limit)
		}
	}
	r.mu.Lock()
	if r.closed || r.ctx.Err() != nil {
		r.mu.Unlock()
		return nil, r.errDone()
	}
	if seq {
		r.advanceLocked(c)
	}
	u := r.owner[c]
	if u == nil {
		if data, ok := r.cached(c); ok {
			r.stats.CacheHits++
			r.mu.Unlock()
			return &unit{first: c, last: c, data: [][]byte{data}, ephemeral: true}, nil
		}
		u = r.planLocked(c, limit)
		r.startLocked(u)
	}
	r.nearLocked(u)
	u.refs++
	r.mu.Unlock()

	select {
	case <-u.done:
	case <-r.ctx.Done():
		r.unref(u)
		return nil, r.errDone()
	}
	if u.err != nil {
		err := u.err
		r.unref(u)
		return nil, err
	}
	return u, nil
}

func (r *Reader) unref(u *unit) {
	if u.ephemeral {
		return
	}
	r.mu.Lock()
	u.refs--
	r.maybeReleaseLocked(u)
	r.mu.Unlock()
}

// advanceLocked moves the window so that it starts at the unit holding c
// and fills it up to ramp units; a chunk the window has just moved past
// (a straggling read, see stragglerLocked) leaves it where it is.
func (r *Reader) advanceLocked(c int) {
	if r.stragglerLocked(c) {
		return
	}
	for len(r.win) > 0 && r.win[0].last < c {
		u := r.win[0]
		r.win[0] = nil
		r.win = r.win[1:]
		u.inWindow = false
		r.maybeReleaseLocked(u)
		if len(r.passed) == r.stragglerUnits() {
			r.passed = append(r.passed[:0], r.passed[1:]...)
		}
		r.passed = append(r.passed, u.first)
	}
	if len(r.win) == 0 || c < r.win[0].first || c >= r.ahead {
		r.dropWindowLocked()
		r.ahead = c
	}
	nearUnits := max(r.ramp, 1)
	limit := nearUnits
	if r.farCapable() && r.ramp >= r.opts.Window {
		limit += FarFactor * r.opts.Window
	}
	for len(r.win) < limit && r.ahead < len(r.chunks) {
		a := r.ahead
		u := r.owner[a]
		if u == nil {
			// A cached chunk gets a unit of its own only when chunks are
			// not grouped: a grouped unit takes it in (see planLocked),
			// so that a window slot is not spent on a chunk already here.
			if data, ok := r.cached(a); ok && (r.loc == nil || r.opts.GroupBytes <= 0) {
				r.stats.CacheHits++
				u = &unit{first: a, last: a, size: int64(len(data)), data: [][]byte{data}, done: make(chan struct{}), finished: true}
				close(u.done)
				r.owner[a] = u
				r.accountLocked(u, u.size)
			} else {
				u = r.planLocked(a, len(r.chunks)-1)
				if r.headUnits > 0 {
					r.headUnits--
					u.stripe = HeadStripeBytes
				}
				if len(r.win) >= nearUnits {
					u.near = make(chan struct{})
				}
				r.startLocked(u)
			}
		}
		u.inWindow = true
		r.win = append(r.win, u)
		r.ahead = u.last + 1
	}
	for _, u := range r.win[:min(nearUnits, len(r.win))] {
		r.nearLocked(u)
	}
}

// nearLocked makes a far unit near: it may now read its seeds and hold
// all its data, and gives back the far budget it held.
func (r *Reader) nearLocked(u *unit) {
	if u.near == nil || u.isNear {
		return
	}
	u.isNear = true
	close(u.near)
	r.giveBackFarLocked(u)
	if !u.released {
		r.accountLocked(u, u.size)
	}
}

// giveBackFarLocked gives back u's far budget and its place in the queue
// for it, waking the far units that wait.
func (r *Reader) giveBackFarLocked(u *unit) {
	r.farBytes -= u.reserved
	u.reserved = 0
	if i := slices.Index(r.farQueue, u); i >= 0 {
		r.farQueue = slices.Delete(r.farQueue, i, i+1)
	}
	r.farTurn.Broadcast()
}

// reserveFar waits until far unit u, needing need bytes from the store,
// is the first far unit waiting and the far budget has room for it, and
// takes that room; false, its place in the queue given up, when u has
// nothing to fetch far or no longer should (it is near, released, or
// needs more than the whole budget).
func (r *Reader) reserveFar(ctx context.Context, u *unit, need int64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		switch {
		case need == 0 || u.isNear || u.released || ctx.Err() != nil || need > r.farBudget():
			r.giveBackFarLocked(u)
			return false
		case len(r.farQueue) > 0 && r.farQueue[0] == u && r.farBytes+need <= r.farBudget():
			r.farQueue = r.farQueue[1:]
			r.farBytes += need
			u.reserved = need
			r.accountLocked(u, need)
			r.farTurn.Broadcast()
			return true
		}
		r.farTurn.Wait()
	}
}

// accountLocked sets the bytes u counts in Stats.BufferedBytes.
func (r *Reader) accountLocked(u *unit, n int64) {
	r.addBuffered(n - u.accounted)
	u.accounted = n
}

func (r *Reader) dropWindowLocked() {
	win := r.win
	r.win = nil
	r.passed = r.passed[:0]
	if len(win) > 0 {
		r.headUnits = 0 // the head was planned, or the reader moved away
	}
	for _, u := range win {
		u.inWindow = false
		r.maybeReleaseLocked(u)
	}
}

// maybeReleaseLocked forgets a unit nobody uses any more: it cancels it if
// it is still fetching, and frees its bytes once it has finished.
func (r *Reader) maybeReleaseLocked(u *unit) {
	if u.inWindow || u.refs > 0 || u.released || u.pinned || u.ephemeral {
		return
	}
	u.released = true
	for i := u.first; i <= u.last; i++ {
		if r.owner[i] == u {
			delete(r.owner, i)
		}
	}
	r.giveBackFarLocked(u)
	if u.finished {
		r.accountLocked(u, 0)
	} else {
		u.cancel()
	}
}

func (r *Reader) addBuffered(n int64) {
	r.stats.BufferedBytes += n
	r.stats.MaxBufferedBytes = max(r.stats.MaxBufferedBytes, r.stats.BufferedBytes)
}

// planLocked makes the unit starting at chunk a: a alone, or with the
// following chunks (up to limit) while their data fits GroupBytes and
// their contents fit a few ranged reads of pack blobs (segments, see
// packRanges). A file's chunks are not always laid out one after the
// other in one pack: a chunk whose content was already stored (a
// repeated block of a VM disk, more common the smaller the chunks) points
// back into an older pack, and the next new chunk continues where the
// previous new one ended. Such a chunk costs the group one more, small,
// concurrent read instead of ending it. Chunks the cache holds (a
// repeated zero block, say) and repeats of a content already in the
// group join it without being fetched.
func (r *Reader) planLocked(a, limit int) *unit {
	u := &unit{first: a, last: a - 1}
	if r.loc == nil || r.opts.GroupBytes <= 0 {
		u.last, u.size = a, r.chunks[a].length
		return u
	}
	ranges := packRanges{maxSpan: r.opts.GroupBytes, maxGap: r.opts.MaxGap}
	var (
		pre  [][]byte
		deps []*unit
	)
	for b := a; b <= limit; b++ {
		if b > a && (r.owner[b] != nil || u.size+r.chunks[b].length > r.opts.GroupBytes) {
			break
		}
		var (
			data []byte
			dep  *unit
		)
		if d, ok := r.cached(b); ok {
			r.stats.CacheHits++
			data = d
		} else if dep = r.fetching[r.chunks[b].oid]; dep == nil {
			lb, ok := r.loc.get(r.ctx, b)
			switch {
			case ok && ranges.fits(lb, MaxRangesPerFetch):
				ranges.add(lb)
			case b == a:
				// Not locatable: fetched alone, through kopia's object
				// reader if need be (see fetchWithRetry).
				u.last, u.size = a, r.chunks[a].length
				return u
			default:
				// The ranges are full, or a chunk that cannot be located
				// gets a unit of its own.
				u.pre, u.deps = pre, deps
				return u
			}
		}
		if data != nil && pre == nil {
			pre = make([][]byte, b-a, b-a+16)
		}
		if pre != nil {
			pre = append(pre, data)
		}
		if dep != nil && deps == nil {
			deps = make([]*unit, b-a, b-a+16)
		}
		if deps != nil {
			deps = append(deps, dep)
		}
		u.last = b
		u.size += r.chunks[b].length
	}
	u.pre, u.deps = pre, deps
	return u
}

// held reports whether the unit has chunk i (relative to u.first) without
// fetching it: from the cache, a seed, a fetch made far, or the unit it
// depends on.
func (u *unit) held(i int) bool {
	return (u.pre != nil && u.pre[i] != nil) || (u.deps != nil && u.deps[i] != nil) ||
		(u.seeded != nil && u.seeded[i] != nil) || (u.stored != nil && u.stored[i] != nil)
}

// heldData is the data of chunk i (relative to u.first) the unit holds
// without fetching: from the cache or a seed; nil for one it takes from
// the unit it depends on (see takeDeps), or does not hold.
func (u *unit) heldData(i int) []byte {
	if u.pre != nil && u.pre[i] != nil {
		return u.pre[i]
	}
	if u.stored != nil && u.stored[i] != nil {
		return u.stored[i]
	}
	if u.seeded != nil {
		return u.seeded[i]
	}
	return nil
}

// takeDeps fills in the chunks u takes from the units it depends on,
// waiting for them; a chunk whose unit failed or was dropped is read here
// through kopia's object reader.
func (r *Reader) takeDeps(ctx context.Context, u *unit, out [][]byte) error {
	for i, dep := range u.deps {
		if dep == nil {
			continue
		}
		// A far unit waits to be near: it must not wait for u.
		r.mu.Lock()
		r.nearLocked(dep)
		r.mu.Unlock()
		select {
		case <-dep.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		oid := r.chunks[u.first+i].oid
		if dep.err == nil {
			for j := dep.first; j <= dep.last; j++ {
				if r.chunks[j].oid == oid && dep.data[j-dep.first] != nil {
					out[i] = dep.data[j-dep.first]
					break
				}
			}
		}
		if out[i] == nil {
			data, err := readObject(ctx, r, r.chunks[u.first+i])
			if err != nil {
				return err
			}
			out[i] = data
		}
	}
	return nil
}

// MaxRangesPerFetch bounds the ranged reads of pack blobs one fetch unit
// makes, concurrently: enough to step over the repeats scattered through
// a FIXED-128K file, few enough that a unit stays one round trip. A
// Reader thus has at most Window × MaxRangesPerFetch requests in flight
// (times the stripes of Options.StripeBytes or, for the head of a read
// from offset 0, of HeadStripeBytes).
const MaxRangesPerFetch = 4

// segment is one ranged read of a pack blob: bytes [start, end) of pack,
// need of which belong to the unit's contents.
type segment struct {
	pack       int32
	start, end int64
	need       int64
}

// packRanges gathers the pack locations of a unit's contents into
// segments. A content joins a segment of its pack when the segment then
// spans at most maxSpan bytes of which at most maxGap are not needed
// (contents need not be in order: kopia may store a file's chunks out of
// order); otherwise it starts a segment of its own. A content seen before
// (same pack and offset) is read once.
type packRanges struct {
	maxSpan, maxGap int64
	segs            []segment
	seen            map[[2]uint32]int // pack, offset -> segment
}

func (p *packRanges) find(lc loc) (seg int, dup bool) {
	if i, ok := p.seen[[2]uint32{uint32(lc.pack), lc.off}]; ok { //nolint:gosec
		return i, true
	}
	off, end := int64(lc.off), int64(lc.off)+int64(lc.plen)
	for i, s := range p.segs {
		if s.pack != lc.pack {
			continue
		}
		span := max(s.end, end) - min(s.start, off)
		if span <= p.maxSpan && span-(s.need+int64(lc.plen)) <= p.maxGap {
			return i, false
		}
	}
	return -1, false
}

// fits reports whether lc can be read with at most limit segments.
func (p *packRanges) fits(lc loc, limit int) bool {
	i, _ := p.find(lc)
	return i >= 0 || len(p.segs) < limit
}

// add places lc and returns its segment.
func (p *packRanges) add(lc loc) int {
	i, dup := p.find(lc)
	if dup {
		return i
	}
	off, end := int64(lc.off), int64(lc.off)+int64(lc.plen)
	if i < 0 {
		p.segs = append(p.segs, segment{pack: lc.pack, start: off, end: end})
		i = len(p.segs) - 1
	} else {
		s := &p.segs[i]
		s.start, s.end = min(s.start, off), max(s.end, end)
	}
	p.segs[i].need += int64(lc.plen)
	if p.seen == nil {
		p.seen = map[[2]uint32]int{}
	}
	p.seen[[2]uint32{uint32(lc.pack), lc.off}] = i //nolint:gosec
	return i
}

// repeatedContents returns the objects that occur more than once in the
// chunk table.
func repeatedContents(chunks []chunk) map[object.ID]bool {
	seen := make(map[object.ID]bool, len(chunks))
	repeated := map[object.ID]bool{}
	for _, c := range chunks {
		if seen[c.oid] {
			repeated[c.oid] = true
		}
		seen[c.oid] = true
	}
	return repeated
}

// cached returns chunk c's data if a cache holds it.
func (r *Reader) cached(c int) ([]byte, bool) {
	oid := r.chunks[c].oid
	key := oid.String()
	if r.repeated[oid] {
		if data, ok := r.repeats.Get(key); ok {
			return data, true
		}
	}
	return r.cache.Get(key)
}

// startLocked registers u and starts fetching it.
func (r *Reader) startLocked(u *unit) {
	u.done = make(chan struct{})
	u.ctx, u.cancel = context.WithCancel(r.ctx)
	for i := u.first; i <= u.last; i++ {
		r.owner[i] = u
		if oid := r.chunks[i].oid; r.repeated[oid] && !u.held(i-u.first) && r.fetching[oid] == nil {
			r.fetching[oid] = u
		}
	}
	if u.near == nil {
		r.accountLocked(u, u.size)
	} else {
		r.farQueue = append(r.farQueue, u) // planned in file order
	}
	r.stats.Fetches++
	r.stats.ChunksFetched += int64(u.last - u.first + 1)
	r.wg.Add(1)
	go r.run(u)
}

func (r *Reader) run(u *unit) {
	defer r.wg.Done()
	data, err := r.fetchWithRetry(u.ctx, u)
	if err == nil {
		for i, d := range data {
			ch := r.chunks[u.first+i]
			r.cache.Put(ch.oid.String(), d)
			if r.repeated[ch.oid] {
				// A chunk decrypted in place is a part of its pack range's
				// buffer, which it would keep alive as long as it is
				// held: the repeats are kept long, so on their own bytes.
				// Once: every later unit with the content (a VM disk's
				// zero block, thousands of times) takes it from there.
				key := ch.oid.String()
				if _, ok := r.repeats.Get(key); !ok {
					r.repeats.Put(key, bytes.Clone(d))
				}
			}
		}
	} else if u.ctx.Err() != nil {
		err = r.errDone()
		if !errors.Is(err, ErrClosed) && r.ctx.Err() == nil {
			err = context.Canceled // the unit was dropped, not the reader
		}
	}
	r.mu.Lock()
	u.data, u.err = data, err
	for i := u.first; i <= u.last; i++ {
		if oid := r.chunks[i].oid; r.fetching[oid] == u {
			delete(r.fetching, oid)
		}
	}
	if u.released {
		// Released while in flight: its bytes are free now.
		r.accountLocked(u, 0)
	}
	u.finished = true
	if err != nil {
		// Forget a failed unit, so that the next read fetches again.
		for i := u.first; i <= u.last; i++ {
			if r.owner[i] == u {
				delete(r.owner, i)
			}
		}
		if u.inWindow {
			r.dropWindowLocked()
		}
	}
	r.mu.Unlock()
	u.cancel()
	close(u.done)
}
