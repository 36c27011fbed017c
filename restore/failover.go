package restore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
)

// Opener opens the Tree of one source's copy of an entry. release is
// called once when the caller is done with the tree; broken says the
// source failed while it was used (a cache should not hand the tree out
// again).
type Opener interface {
	OpenTree(ctx context.Context, es EntrySource) (tree Tree, release func(broken bool), err error)
}

// DirectOpener opens a Tree for every call and closes it on release.
var DirectOpener Opener = directOpener{}

type directOpener struct{}

func (directOpener) OpenTree(ctx context.Context, es EntrySource) (Tree, func(bool), error) {
	t, err := es.Source.Open(ctx, es.Snapshot)
	if err != nil {
		return nil, nil, err
	}
	return t, func(bool) { t.Close() }, nil
}

// TreeCache is an Opener that keeps trees open and shares them among the
// files and directories read from them (a clone or a kopia snapshot root
// is opened once), until Close, or, in a cache made by NewIdleTreeCache,
// until no one has used the tree for the idle time. A tree released as
// broken is dropped, and closed when its last user releases it.
type TreeCache struct {
	mu     sync.Mutex
	trees  map[treeKey]*cachedTree
	closed bool
	idle   time.Duration
	stop   chan struct{}
	done   chan struct{}
}

type treeKey struct {
	source string // name; a timeline's sources have distinct names
	kind   Kind
	id     string
}

type cachedTree struct {
	tree      Tree
	refs      int
	dropped   bool
	idleSince time.Time // when refs last went to 0
}

// NewTreeCache returns an empty cache that keeps its trees until Close.
func NewTreeCache() *TreeCache { return &TreeCache{trees: map[treeKey]*cachedTree{}} }

// NewIdleTreeCache returns an empty cache that closes a tree no file or
// lookup has used for idle: a long-running mount must not pin (hold, and on
// zfs-fuse keep a clone of) every snapshot it was ever asked about, or
// prune could never destroy them. idle 0 keeps trees until Close.
func NewIdleTreeCache(idle time.Duration) *TreeCache {
	c := NewTreeCache()
	if idle <= 0 {
		return c
	}
	c.idle, c.stop, c.done = idle, make(chan struct{}), make(chan struct{})
	go c.releaseIdle()
	return c
}

// releaseIdle closes the trees idle for c.idle, until Close.
func (c *TreeCache) releaseIdle() {
	defer close(c.done)
	tick := time.NewTicker(max(c.idle/4, 100*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-tick.C:
		}
		var idle []*cachedTree
		c.mu.Lock()
		for key, ct := range c.trees {
			if ct.refs == 0 && time.Since(ct.idleSince) >= c.idle {
				ct.dropped = true
				delete(c.trees, key)
				idle = append(idle, ct)
			}
		}
		c.mu.Unlock()
		for _, ct := range idle {
			if err := ct.tree.Close(); err != nil {
				slog.Warn("releasing an idle snapshot", "err", err)
			}
		}
	}
}

// OpenTree implements Opener.
func (c *TreeCache) OpenTree(ctx context.Context, es EntrySource) (Tree, func(bool), error) {
	key := treeKey{es.Source.Name(), es.Source.Kind(), es.Snapshot.ID}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, nil, errors.New("tree cache closed")
	}
	ct := c.trees[key]
	if ct == nil {
		// Opening may take seconds (a clone over ssh); other keys wait
		// meanwhile, which keeps two opens of one snapshot from racing.
		t, err := es.Source.Open(ctx, es.Snapshot)
		if err != nil {
			c.mu.Unlock()
			return nil, nil, err
		}
		ct = &cachedTree{tree: t}
		c.trees[key] = ct
	}
	ct.refs++
	c.mu.Unlock()
	var once sync.Once
	return ct.tree, func(broken bool) {
		once.Do(func() {
			c.mu.Lock()
			ct.refs--
			if ct.refs == 0 {
				ct.idleSince = time.Now()
			}
			if broken && !ct.dropped {
				ct.dropped = true
				if c.trees[key] == ct {
					delete(c.trees, key)
				}
			}
			closeNow := ct.dropped && ct.refs == 0
			c.mu.Unlock()
			if closeNow {
				ct.tree.Close()
			}
		})
	}, nil
}

// Close closes every tree of the cache.
func (c *TreeCache) Close() error {
	c.mu.Lock()
	wasClosed := c.closed
	c.closed = true
	c.mu.Unlock()
	if c.stop != nil && !wasClosed {
		close(c.stop)
		<-c.done // an idle release in progress ends before the rest closes
	}
	c.mu.Lock()
	trees := c.trees
	c.trees = map[treeKey]*cachedTree{}
	c.mu.Unlock()
	var errs []error
	for _, ct := range trees {
		errs = append(errs, ct.tree.Close())
	}
	return errors.Join(errs...)
}

// definitive reports whether an error says something about the snapshot
// itself (the path is missing, is not a regular file, would leave the
// snapshot) rather than about the source: every source holding the same
// snapshot would answer the same, so the others are not asked.
func definitive(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, ErrNotRegular) ||
		errors.Is(err, errSymlinkDir) || errors.Is(err, errNotDir)
}

// SourceBytes are the bytes one source served to a FailoverFile.
type SourceBytes struct {
	Source string `json:"source"`
	Kind   string `json:"kind"`
	Bytes  int64  `json:"bytes"`
	// Failed is why the source was left, empty while it is fine.
	Failed string `json:"failed,omitempty"`
	// Retries counts how often the source was tried again after failing.
	Retries int `json:"retries,omitempty"`
	// For a kopia source read with seeds (see SeedFinder): Seeded are the
	// bytes of Bytes taken from copies on this host instead of the store,
	// by seed; SeedMismatches and SeedReadErrors the seed candidates that
	// failed verification or could not be read (their chunks came from
	// the next candidate or the store); SeedProbeMisses the chunks a seed
	// was probed for at their own offset and held other bytes (changed
	// since). Fetched is what its reader asked the store for (pack ranges,
	// gaps included).
	Seeded          map[string]int64 `json:"seeded_bytes,omitempty"`
	SeedMismatches  int64            `json:"seed_mismatches,omitempty"`
	SeedReadErrors  int64            `json:"seed_read_errors,omitempty"`
	SeedProbeMisses int64            `json:"seed_probe_misses,omitempty"`
	Fetched         int64            `json:"fetched_bytes,omitempty"`
}

// SeededBytes is the sum of Seeded.
func (s SourceBytes) SeededBytes() int64 {
	var n int64
	for _, b := range s.Seeded {
		n += b
	}
	return n
}

// FailoverFile is a file of a timeline entry read from the fastest source
// that has it. When a read fails on the source serving it, the read goes
// on from the next source (opened then) at the same offset; a source whose
// copy has another size is refused. ReadAt may be called concurrently.
type FailoverFile struct {
	entry  *Entry
	rel    string
	opener Opener
	log    *slog.Logger
	size   int64
	ctx    context.Context //nolint:containedctx // opens failover sources; cancelled by Close
	cancel context.CancelFunc

	mu          sync.Mutex
	cands       []*candidate
	cur         int
	closed      bool
	noReadAhead bool
	streaming   bool
	// retryWindow, lastProgress and revivals drive the retry of sources
	// that were away (see reviveLocked).
	retryWindow  time.Duration
	lastProgress atomic.Int64 // unix nanoseconds of the last byte served
	revivals     int
	cleanups     sync.WaitGroup
}

// DefaultRetryWindow is how long a FailoverFile whose every source failed
// keeps trying them again before a read fails: a replica rebooting, an ssh
// link dropping, a store answering 503 for a while end within it.
const DefaultRetryWindow = 2 * time.Minute

// errSizeMismatch marks a source whose copy of the file has another size:
// it will not get better by asking again.
var errSizeMismatch = errors.New("size differs from the first source's")

type candidate struct {
	es      EntrySource
	opened  bool
	tree    Tree
	release func(bool)
	file    File
	failed  error
	bytes   atomic.Int64
	// reading is held (shared) by every read of file, so that a failed
	// candidate's file is closed only once no read uses it.
	reading sync.RWMutex
	cleaned bool
}

// OpenFile opens rel (cleaned with CleanPath) of entry from its first
// source that has it, in the entry's order (local, replica, kopia). A
// source whose Open or OpenFile fails is skipped (logged at debug level);
// a missing path or one that is not a regular file is reported at once.
// opener nil means DirectOpener.
func OpenFile(ctx context.Context, entry *Entry, rel string, opener Opener) (*FailoverFile, error) {
	rel, err := CleanPath(rel)
	if err != nil {
		return nil, err
	}
	if opener == nil {
		opener = DirectOpener
	}
	life, cancel := context.WithCancel(context.WithoutCancel(ctx))
	f := &FailoverFile{entry: entry, rel: rel, opener: opener, log: slog.Default(), size: -1, ctx: life, cancel: cancel,
		retryWindow: DefaultRetryWindow}
	f.lastProgress.Store(time.Now().UnixNano())
	for _, es := range entry.Sources {
		f.cands = append(f.cands, &candidate{es: es})
	}
	f.mu.Lock()
	_, err = f.currentLocked(ctx, true)
	f.mu.Unlock()
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// currentLocked returns the serving candidate, opening the next ones as
// needed. first is set for the open in OpenFile, where a definitive error
// ends the search.
func (f *FailoverFile) currentLocked(ctx context.Context, first bool) (*candidate, error) {
	if f.closed {
		return nil, fs.ErrClosed
	}
	for ; f.cur < len(f.cands); f.cur++ {
		c := f.cands[f.cur]
		if c.failed != nil {
			continue
		}
		if c.opened {
			return c, nil
		}
		err := f.openLocked(ctx, c)
		if err == nil {
			return c, nil
		}
		c.failed = err
		f.log.Debug("source cannot serve the file, trying the next", "file", f.Name(), "source", c.es.Source.Name(), "err", err)
		if first && definitive(err) {
			return nil, fmt.Errorf("%s: %w", f.Name(), unwrapPath(err))
		}
	}
	return nil, f.exhaustedLocked()
}

func (f *FailoverFile) openLocked(ctx context.Context, c *candidate) error {
	tree, release, err := f.opener.OpenTree(ctx, c.es)
	if err != nil {
		return err
	}
	file, err := tree.OpenFile(ctx, f.rel)
	if err != nil {
		release(!definitive(err))
		return err
	}
	if f.size >= 0 && file.Size() != f.size {
		file.Close()
		release(false)
		return fmt.Errorf("its copy has %d bytes, not %d like the first source's: refused: %w", file.Size(), f.size, errSizeMismatch)
	}
	if f.size < 0 { // the first open, before the file is handed out: size never changes after
		f.size = file.Size()
	}
	if f.noReadAhead {
		setReadAhead(file, false)
	}
	if f.streaming {
		setStreaming(file, true)
	}
	c.opened, c.tree, c.release, c.file = true, tree, release, file
	return nil
}

// readAheadSetter is a File whose read-ahead can be turned off (the
// prefetching kopia reader).
type readAheadSetter interface{ SetReadAhead(on bool) }

// streamer is a File whose reads are fastest issued in order, one after
// the other: its own read-ahead keeps many fetches in flight (the
// prefetching kopia reader). SetStreaming tells it they will be.
type streamer interface{ SetStreaming(on bool) }

// prefersStreaming reports whether f is best read in order by one reader:
// a streamer, or a FailoverFile serving from one.
func prefersStreaming(f File) bool {
	if ff, ok := f.(*FailoverFile); ok {
		f = ff.ServingFile()
	}
	_, ok := f.(streamer)
	return ok
}

func setStreaming(f File, on bool) {
	if s, ok := f.(streamer); ok {
		s.SetStreaming(on)
	}
}

func setReadAhead(f File, on bool) {
	if s, ok := f.(readAheadSetter); ok {
		s.SetReadAhead(on)
	}
}

// SetStreaming tells the sources' readers that the file will be read in
// order (see streamer), for the files open now and those opened on
// failover later.
func (f *FailoverFile) SetStreaming(on bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.streaming = on
	for _, c := range f.cands {
		if c.file != nil {
			setStreaming(c.file, on)
		}
	}
}

// SetReadAhead turns read-ahead of the sources' readers on or off, for the
// files open now and those opened on failover later.
func (f *FailoverFile) SetReadAhead(on bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.noReadAhead = !on
	for _, c := range f.cands {
		if c.file != nil {
			setReadAhead(c.file, on)
		}
	}
}

func (f *FailoverFile) exhaustedLocked() error {
	if len(f.cands) == 0 {
		return fmt.Errorf("%s: no source holds snapshot %s", f.Name(), f.entry.FullName())
	}
	var reasons []string
	for _, c := range f.cands {
		if c.failed != nil {
			reasons = append(reasons, c.es.Source.Name()+": "+oneLine(c.failed))
		}
	}
	return fmt.Errorf("%s: no source could serve it (%s)", f.Name(), strings.Join(reasons, "; "))
}

func unwrapPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func oneLine(err error) string { return strings.Join(strings.Fields(err.Error()), " ") }

// Name is SNAPSHOT:PATH, for messages.
func (f *FailoverFile) Name() string { return f.entry.FullName() + ":" + f.rel }

// Entry is the timeline entry the file belongs to.
func (f *FailoverFile) Entry() *Entry { return f.entry }

// Path is the file's cleaned path in the snapshot.
func (f *FailoverFile) Path() string { return f.rel }

// Size implements File.
func (f *FailoverFile) Size() int64 { return f.size }

// Serving names the source reads go to now ("" once every source failed).
func (f *FailoverFile) Serving() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cur < len(f.cands) && f.cands[f.cur].opened {
		return f.cands[f.cur].es.Source.Name()
	}
	return ""
}

// Stats returns the bytes each source served, in the entry's order. A
// source tried again after it failed counts once: Failed is why it was
// left last, empty while it serves, and Retries how often it came back.
func (f *FailoverFile) Stats() []SourceBytes {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]SourceBytes, 0, len(f.cands))
	at := map[string]int{}
	for _, c := range f.cands {
		name := c.es.Source.Name()
		i, seen := at[name]
		if !seen {
			i = len(out)
			at[name] = i
			out = append(out, SourceBytes{Source: name, Kind: c.es.Source.Kind().String()})
		} else {
			out[i].Retries++
		}
		out[i].Bytes += c.bytes.Load()
		if pf, ok := c.file.(interface{ PrefetchStats() prefetch.Stats }); ok {
			ps := pf.PrefetchStats()
			out[i].Fetched += ps.BytesRequested
			out[i].SeedMismatches += ps.Seeds.SeedMismatches
			out[i].SeedReadErrors += ps.Seeds.SeedReadErrors
			out[i].SeedProbeMisses += ps.Seeds.ProbeMisses
			for origin, n := range ps.Seeds.SeedBytesByOrigin {
				if out[i].Seeded == nil {
					out[i].Seeded = map[string]int64{}
				}
				out[i].Seeded[origin] += n
			}
		}
		out[i].Failed = ""
		if c.failed != nil {
			out[i].Failed = oneLine(c.failed)
		}
	}
	return out
}

// ServingFile returns the serving source's File (e.g. to read a kopia
// reader's prefetch counters), or nil.
func (f *FailoverFile) ServingFile() File {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cur < len(f.cands) && f.cands[f.cur].opened {
		return f.cands[f.cur].file
	}
	return nil
}

// ReadAt implements io.ReaderAt. A read that fails on one source (for a
// reason other than the end of the file) goes on from the next source at
// the offset where it stopped; the error is returned only when no source
// is left.
func (f *FailoverFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: negative offset %d", f.Name(), off)
	}
	if off >= f.size {
		return 0, io.EOF
	}
	want := p
	if rest := f.size - off; int64(len(want)) > rest {
		want = want[:rest]
	}
	done := 0
	for done < len(want) {
		f.mu.Lock()
		c, err := f.currentLocked(f.ctx, false)
		if err != nil {
			wait, again := f.reviveLocked()
			f.mu.Unlock()
			if !again || sleepCtx(f.ctx, wait) != nil {
				return done, err
			}
			continue
		}
		c.reading.RLock()
		f.mu.Unlock()
		n, rerr := c.file.ReadAt(want[done:], off+int64(done))
		c.reading.RUnlock()
		c.bytes.Add(int64(n))
		if n > 0 {
			f.lastProgress.Store(time.Now().UnixNano())
		}
		done += n
		if done == len(want) {
			break
		}
		switch {
		case rerr == nil && n > 0:
			continue
		case rerr == nil:
			rerr = io.ErrNoProgress
		case errors.Is(rerr, io.EOF):
			// Short of the size every source agreed on: truncated.
			rerr = fmt.Errorf("ended at %d of %d bytes: %w", off+int64(done), f.size, io.ErrUnexpectedEOF)
		}
		f.fail(c, off+int64(done), rerr)
	}
	if len(want) < len(p) {
		return done, io.EOF
	}
	return done, nil
}

// SetRetryWindow sets how long reads keep trying sources again once every
// one failed (DefaultRetryWindow); 0 fails a read as soon as none is left.
func (f *FailoverFile) SetRetryWindow(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.retryWindow = d
}

// reviveLocked is called when every source failed. Where a source's
// failure may pass (it was away, not wrong about the file), it is given a
// fresh try: a new candidate opens a new tree (the failed one was released
// as broken, so a cache does not hand out a dead ssh session again). It
// returns how long to wait before that try, and false when the file has
// served nothing for the retry window or no source is worth a retry.
func (f *FailoverFile) reviveLocked() (time.Duration, bool) {
	if f.closed || f.ctx.Err() != nil {
		return 0, false
	}
	if time.Since(time.Unix(0, f.lastProgress.Load())) > f.retryWindow {
		return 0, false
	}
	latest := map[string]*candidate{}
	var order []string
	for _, c := range f.cands {
		key := c.es.Source.Name() + "\x00" + c.es.Snapshot.ID
		if _, ok := latest[key]; !ok {
			order = append(order, key)
		}
		latest[key] = c
	}
	first := len(f.cands)
	for _, key := range order {
		c := latest[key]
		if c.failed == nil || !transient(c.failed) {
			continue
		}
		f.cands = append(f.cands, &candidate{es: c.es})
	}
	if len(f.cands) == first {
		return 0, false
	}
	f.cur = first
	wait := min(250*time.Millisecond<<min(f.revivals, 5), 5*time.Second)
	f.revivals++
	f.log.Info("every source failed; trying them again", "file", f.Name(), "in", wait, "try", f.revivals)
	return wait, true
}

// transient reports whether a source's failure may pass by itself.
func transient(err error) bool {
	return !definitive(err) && !errors.Is(err, errSizeMismatch) &&
		!errors.Is(err, fs.ErrClosed) && !errors.Is(err, context.Canceled)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// cleanupLocked closes a failed candidate's file and releases its tree as
// broken once no read uses them, in the background: a dead source can be
// slow to answer even its close.
func (f *FailoverFile) cleanupLocked(c *candidate) {
	if !c.opened || c.cleaned {
		return
	}
	c.cleaned = true
	f.cleanups.Go(func() {
		c.reading.Lock()
		defer c.reading.Unlock()
		c.file.Close()
		c.release(true)
	})
}

// fail leaves source c after a failed read; its file is closed once the
// reads still using it are done.
func (f *FailoverFile) fail(c *candidate, at int64, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if c.failed != nil {
		return
	}
	c.failed = err
	f.cleanupLocked(c)
	next := "none left"
	for _, o := range f.cands {
		if o.failed == nil {
			next = o.es.Source.Name()
			break
		}
	}
	f.log.Warn("source failed mid-read; continuing from the next", "file", f.Name(), "source", c.es.Source.Name(),
		"offset", at, "next", next, "err", err)
}

// Close closes the file on every source it was opened on.
func (f *FailoverFile) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	cands := f.cands
	f.mu.Unlock()
	f.cancel()
	f.cleanups.Wait()
	var errs []error
	for _, c := range cands {
		if !c.opened || c.cleaned {
			continue
		}
		if err := c.file.Close(); err != nil && c.failed == nil {
			errs = append(errs, err)
		}
		c.release(c.failed != nil)
	}
	return errors.Join(errs...)
}

// Stat returns what rel of entry is (an lstat: a symbolic link is
// described, not followed), from the first source that answers.
func Stat(ctx context.Context, entry *Entry, rel string, opener Opener) (FileInfo, error) {
	return firstAnswer(ctx, entry, rel, opener, func(t Tree, rel string) (FileInfo, error) { return t.Stat(ctx, rel) })
}

// ReadDir lists the directory rel of entry, from the first source that
// answers.
func ReadDir(ctx context.Context, entry *Entry, rel string, opener Opener) ([]FileInfo, error) {
	return firstAnswer(ctx, entry, rel, opener, func(t Tree, rel string) ([]FileInfo, error) { return t.ReadDir(ctx, rel) })
}

func firstAnswer[T any](ctx context.Context, entry *Entry, rel string, opener Opener, do func(Tree, string) (T, error)) (T, error) {
	var zero T
	rel, err := CleanPath(rel)
	if err != nil {
		return zero, err
	}
	if opener == nil {
		opener = DirectOpener
	}
	name := entry.FullName() + ":" + rel
	var reasons []string
	for _, es := range entry.Sources {
		tree, release, err := opener.OpenTree(ctx, es)
		if err != nil {
			reasons = append(reasons, es.Source.Name()+": "+oneLine(err))
			continue
		}
		v, err := do(tree, rel)
		release(err != nil && !definitive(err))
		if err == nil {
			return v, nil
		}
		if definitive(err) {
			return zero, fmt.Errorf("%s: %w", name, unwrapPath(err))
		}
		slog.Debug("source cannot answer, trying the next", "path", name, "source", es.Source.Name(), "err", err)
		reasons = append(reasons, es.Source.Name()+": "+oneLine(err))
	}
	if len(reasons) == 0 {
		return zero, fmt.Errorf("%s: no source holds snapshot %s", name, entry.FullName())
	}
	return zero, fmt.Errorf("%s: no source could answer (%s)", name, strings.Join(reasons, "; "))
}

// BytesBySource returns the bytes each source served, by source name
// (for CopyOptions.SourceBytes).
func (f *FailoverFile) BytesBySource() map[string]int64 {
	out := map[string]int64{}
	for _, s := range f.Stats() {
		out[s.Source] += s.Bytes
	}
	return out
}
