package restore

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
)

// SessionOptions configure Open.
type SessionOptions struct {
	// Logger receives the sources' messages; nil means slog.Default().
	Logger *slog.Logger
	// Start is when the command began: OpenTimes.Total counts from it, so
	// that what came before Open (loading the configuration) is in it.
	// The zero time means the call to Open.
	Start time.Time
	// PrefetchWindow, when positive, is the chunk fetches a kopia reader
	// keeps in flight (prefetch.Options.Window); 0 keeps the default.
	PrefetchWindow int
	// NoSeed reads kopia files from the store alone. By default a kopia
	// file is seeded from the same file in the local snapshots nearest to
	// it (see LocalSeeds): only what they do not hold is fetched.
	NoSeed bool
	// SeedIdleRelease is how long a local snapshot opened for seeding
	// stays open once no file uses it (0: until Close), as a mount's
	// other snapshots.
	SeedIdleRelease time.Duration
}

// SeedMapDir is the directory of the state directory that keeps what
// seeding learned about local files kopia does not hold (see LocalSeeds).
const SeedMapDir = "seed-maps"

// Session is the read side opened once for a command: the configured
// sources, the timeline of their snapshots, the trees of the snapshots
// read so far, what did not answer, and how long each step took. Restore,
// the timeline commands and the mount all start from one; its methods
// are safe for concurrent use. Close it when done, after the files it
// opened.
type Session struct {
	sources      []Source
	closeSources func() error
	trees        *TreeCache
	seeds        *LocalSeeds // nil with SessionOptions.NoSeed
	unavailable  []error
	start        time.Time

	mu       sync.Mutex
	tl       *Timeline
	unlisted []error
	times    OpenTimes
	handed   bool // Refresher gave out the first timeline

	closeOnce sync.Once
	closeErr  error
}

// SourceTime is how long one source took to open and to list.
type SourceTime struct {
	Source string
	// Open is setting the source up: for kopia, opening the repository
	// (its format blob, indexes and manifests); for ZFS, next to nothing
	// (an ssh replica connects when it is first listed).
	Open time.Duration
	// List is listing its snapshots for the timeline (0 for a source that
	// could not be opened).
	List time.Duration
	// Failed says why the source could not be opened or listed.
	Failed string
}

// OpenTimes is how long a session took to get to the first byte. The
// sources open concurrently, and are listed concurrently, so Total is at
// least the slowest source's Open, plus Timeline, plus File.
type OpenTimes struct {
	// Sources are the configured sources in the timeline's order (local,
	// replica, kopia), also those that could not be opened.
	Sources []SourceTime
	// Timeline is listing every source and merging the lists.
	Timeline time.Duration
	// File is resolving specs, stat and opening files, all the calls of
	// the session together.
	File time.Duration
	// Total runs from SessionOptions.Start to the last file the session
	// opened (to the timeline when it opened none).
	Total time.Duration
	// KopiaRequests, when the kopia repository was opened, are the storage
	// requests kopia made up to the session's first open file: on a distant
	// store, the round trips before the first byte.
	KopiaRequests *kopiarepo.RequestLog
}

// MarshalJSON gives the times in seconds, as numbers:
//
//	{"seconds": 1.2, "timeline_seconds": 0.05, "file_seconds": 0.02,
//	 "sources": [{"source": "kopia", "open_seconds": 1.1, "list_seconds": 0.03}]}
func (t OpenTimes) MarshalJSON() ([]byte, error) {
	type source struct {
		Source string  `json:"source"`
		Open   float64 `json:"open_seconds"`
		List   float64 `json:"list_seconds"`
		Failed string  `json:"failed,omitempty"`
	}
	sources := make([]source, 0, len(t.Sources))
	for _, s := range t.Sources {
		sources = append(sources, source{s.Source, s.Open.Seconds(), s.List.Seconds(), s.Failed})
	}
	type requests struct {
		RoundTrips int     `json:"round_trips"`
		Requests   int     `json:"requests"`
		Before     float64 `json:"format_blob_seconds"`
		Summary    string  `json:"summary"`
	}
	var reqs *requests
	if l := t.KopiaRequests; l != nil {
		reqs = &requests{len(l.Sequential()), len(l.Requests()), l.Before().Seconds(), l.Summary()}
	}
	return json.Marshal(struct {
		Seconds  float64   `json:"seconds"`
		Timeline float64   `json:"timeline_seconds"`
		File     float64   `json:"file_seconds"`
		Sources  []source  `json:"sources"`
		Kopia    *requests `json:"kopia_requests,omitempty"`
	}{t.Total.Seconds(), t.Timeline.Seconds(), t.File.Seconds(), sources, reqs})
}

// Open opens the sources the configuration names, concurrently (see
// OpenSources), and builds their timeline. A source that cannot be opened
// or listed is left out and named in Unavailable or Unlisted; Open fails
// only when ctx ends first (NoneAnswered tells whether any source did).
func Open(ctx context.Context, cfg *config.Config, opts SessionOptions) (*Session, error) {
	start := opts.Start
	if start.IsZero() {
		start = time.Now()
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	sources, times, closeSources, unavailable := openSources(ctx, cfg, log)
	s := &Session{sources: sources, closeSources: closeSources, trees: NewTreeCache(), unavailable: unavailable, start: start}
	if !opts.NoSeed {
		s.seeds = NewLocalSeeds(s.Timeline, opts.SeedIdleRelease, log)
		if cfg.StateDir != "" {
			s.seeds.MapDir = filepath.Join(cfg.StateDir, SeedMapDir)
		}
	}
	for _, src := range sources {
		k, ok := src.(*KopiaSource)
		if !ok {
			continue
		}
		if k.Requests != nil {
			s.times.KopiaRequests = k.Requests
		}
		if opts.PrefetchWindow > 0 {
			k.Prefetch.Window = opts.PrefetchWindow
		}
		if s.seeds != nil {
			k.Seeds = s.seeds
		}
	}
	if err := ctx.Err(); err != nil {
		s.Close()
		return nil, fmt.Errorf("opening the snapshot sources: %w", err)
	}
	built := time.Now()
	tl, unlisted, took := buildTimeline(ctx, sources)
	s.times.Timeline = time.Since(built)
	if err := ctx.Err(); err != nil {
		s.Close()
		return nil, fmt.Errorf("opening the snapshot sources: %w", err)
	}
	s.tl, s.unlisted = tl, unlisted
	for i, src := range sources {
		for j := range times {
			if times[j].Source == src.Name() && times[j].Failed == "" {
				times[j].List = took[i]
			}
		}
	}
	for _, p := range unlisted {
		if se, ok := p.(*SourceError); ok {
			for j := range times {
				if times[j].Source == se.Source && times[j].Failed == "" {
					times[j].Failed = oneLine(se.Err)
				}
			}
		}
	}
	s.times.Sources = times
	s.times.Total = time.Since(start)
	return s, nil
}

// Sources are the sources that were opened, fastest first.
func (s *Session) Sources() []Source { return s.sources }

// Timeline is the session's timeline: the one Open built, or the latest
// Rebuild's.
func (s *Session) Timeline() *Timeline {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tl
}

// Unavailable are the configured sources that could not be opened and
// were left out (a *SourceError each): the replica's ssh settings are
// wrong, the kopia repository is unreachable or its password missing.
func (s *Session) Unavailable() []error { return s.unavailable }

// Unlisted are the sources that failed to list when the timeline was last
// built (a *SourceError each); what they listed before failing is used.
func (s *Session) Unlisted() []error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unlisted
}

// NoneAnswered reports whether no source gave the timeline anything: all
// that were opened failed to list, and nothing is in the timeline. (A
// source that failed for one dataset may have answered for another.)
func (s *Session) NoneAnswered() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.unlisted) == len(s.sources) && len(s.unavailable)+len(s.unlisted) > 0 && len(s.tl.Entries) == 0
}

// Rebuild lists the sources again and makes the result the session's
// timeline; the errors are the sources that failed (see Unlisted).
func (s *Session) Rebuild(ctx context.Context) (*Timeline, []error) {
	tl, errs := BuildTimeline(ctx, s.sources)
	s.mu.Lock()
	s.tl, s.unlisted = tl, errs
	s.mu.Unlock()
	return tl, errs
}

// CheckOpen makes sure the session's timeline is not older than the
// repository: a kopia source may have opened from the index listing this
// host saved (kopiarepo.WithCachedIndexList), which costs no round trip
// but may miss what another client wrote since. CheckOpen waits for the
// listing the open started alongside (one round trip from the start) and,
// when the index changed, rebuilds the timeline and returns true: what was
// resolved before may have moved. Bytes read in the meantime were
// verified content by content all the same.
func (s *Session) CheckOpen(ctx context.Context) (bool, error) {
	changed := false
	for _, src := range s.sources {
		k, ok := src.(*KopiaSource)
		if !ok {
			continue
		}
		c, err := k.repo.CheckOpen(ctx)
		if err != nil {
			return c, fmt.Errorf("%s: %w", k.Name(), err)
		}
		changed = changed || c
	}
	if changed {
		s.Rebuild(ctx)
	}
	return changed, nil
}

// Refresher returns a build function for a mount that rebuilds its
// timeline now and then (fusefs.BuildFunc): its first call gives the
// timeline Open built, with no errors (Unlisted has them, for the command
// to report with Unavailable), and every later call Rebuild's.
func (s *Session) Refresher() func(ctx context.Context) (*Timeline, []error) {
	return func(ctx context.Context) (*Timeline, []error) {
		s.mu.Lock()
		if !s.handed {
			s.handed = true
			tl := s.tl
			s.mu.Unlock()
			return tl, nil
		}
		s.mu.Unlock()
		return s.Rebuild(ctx)
	}
}

// Times returns how long the session has taken so far.
func (s *Session) Times() OpenTimes {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.times
	t.Sources = append([]SourceTime(nil), t.Sources...)
	return t
}

// fileStep adds the time since start to the file steps; opened moves
// Total to now.
func (s *Session) fileStep(start time.Time, opened bool) {
	now := time.Now()
	s.mu.Lock()
	s.times.File += now.Sub(start)
	if opened {
		s.times.Total = now.Sub(s.start)
		if r := s.times.KopiaRequests; r != nil {
			r.Stop()
		}
	}
	s.mu.Unlock()
}

// Resolve resolves "SNAPSHOT:PATH" (or a bare SNAPSHOT, its root) in the
// session's timeline, within dataset when it is not "" (see
// Timeline.ResolvePath).
func (s *Session) Resolve(spec, dataset string) (*Entry, string, error) {
	defer s.fileStep(time.Now(), false)
	return s.Timeline().ResolvePath(spec, dataset)
}

// ResolveFile is Resolve for a spec that must name something in the
// snapshot, not its root.
func (s *Session) ResolveFile(spec, dataset string) (*Entry, string, error) {
	entry, rel, err := s.Resolve(spec, dataset)
	if err != nil {
		return nil, "", err
	}
	if rel == "." {
		return nil, "", fmt.Errorf("%s names the root of %s; name a file in it, like %s:images/disk.qcow2", spec, entry.FullName(), entry.Name)
	}
	return entry, rel, nil
}

// Target is one file of one snapshot, located in a session: what a
// restore (and, later, a boot from a snapshot) copies or serves.
type Target struct {
	Spec, Dataset string // as given, to resolve it again (StillNames)
	Entry         *Entry
	Rel           string // the file's path in the snapshot
	Info          FileInfo
}

// Identity is what a restore's journal records of t.
func (t *Target) Identity() SourceIdentity {
	return SourceIdentity{Snapshot: snapshotIdentity(t.Entry), Path: t.Rel, ModTime: t.Info.ModTime}
}

// snapshotIdentity is what ties a partial restore to its snapshot: the
// guid, shared by every source of the snapshot, else its name.
func snapshotIdentity(e *Entry) string {
	if e.GUID != 0 {
		return "guid:" + strconv.FormatUint(e.GUID, 10)
	}
	return e.FullName()
}

// Locate resolves spec ("SNAPSHOT:PATH") to a file, stats it, and refuses
// a directory: the steps between the timeline and opening the file, each
// counted in Times.
func (s *Session) Locate(ctx context.Context, spec, dataset string) (*Target, error) {
	entry, rel, err := s.ResolveFile(spec, dataset)
	if err != nil {
		return nil, err
	}
	info, err := s.Stat(ctx, entry, rel)
	if err != nil {
		return nil, err
	}
	if info.Mode.IsDir() {
		return nil, fmt.Errorf("%s:%s is a directory; restore copies one file (vmhistory mount shows whole snapshots)", entry.FullName(), rel)
	}
	return &Target{Spec: spec, Dataset: dataset, Entry: entry, Rel: rel, Info: info}, nil
}

// StillNames checks, before a restored file is published, that t's spec
// still names the same file: the session may have opened the repository
// from this host's saved index listing (see CheckOpen), and another client
// may have uploaded a snapshot since.
func (s *Session) StillNames(ctx context.Context, t *Target) error {
	changed, err := s.CheckOpen(ctx)
	if err != nil || !changed {
		return err
	}
	now, nowRel, err := s.ResolveFile(t.Spec, t.Dataset)
	if err != nil {
		return fmt.Errorf("the kopia repository changed while the restore ran: %w", err)
	}
	if snapshotIdentity(now) != snapshotIdentity(t.Entry) || nowRel != t.Rel {
		return fmt.Errorf("the kopia repository changed while the restore ran: %s now names %s, not %s; the partial file is kept, run the command again", t.Spec, now.FullName(), t.Entry.FullName())
	}
	return nil
}

// Stat returns what rel of entry is, from the first source that answers
// (see Stat).
func (s *Session) Stat(ctx context.Context, entry *Entry, rel string) (FileInfo, error) {
	defer s.fileStep(time.Now(), false)
	return Stat(ctx, entry, rel, s.trees)
}

// ReadDir lists the directory rel of entry, from the first source that
// answers.
func (s *Session) ReadDir(ctx context.Context, entry *Entry, rel string) ([]FileInfo, error) {
	defer s.fileStep(time.Now(), false)
	return ReadDir(ctx, entry, rel, s.trees)
}

// OpenFile opens rel of entry from its fastest source, failing over to
// the next (see OpenFile). Close the file before the session.
func (s *Session) OpenFile(ctx context.Context, entry *Entry, rel string) (*FailoverFile, error) {
	start := time.Now()
	f, err := OpenFile(ctx, entry, rel, s.trees)
	s.fileStep(start, err == nil)
	return f, err
}

// OpenFileExcept opens rel of entry from its sources other than the one
// named except (the one serving a copy, to compare it with a second), or
// returns nil when there is none.
func (s *Session) OpenFileExcept(ctx context.Context, entry *Entry, rel, except string) (*FailoverFile, error) {
	others := *entry
	others.Sources = nil
	for _, es := range entry.Sources {
		if es.Source.Name() != except {
			others.Sources = append(others.Sources, es)
		}
	}
	if len(others.Sources) == 0 {
		return nil, nil
	}
	return s.OpenFile(ctx, &others, rel)
}

// Close closes the trees the session opened, then the sources. It may be
// called more than once; later calls return the first one's error.
func (s *Session) Close() error {
	s.closeOnce.Do(func() {
		err := s.trees.Close()
		if s.seeds != nil {
			if cerr := s.seeds.Close(); err == nil {
				err = cerr
			}
		}
		if cerr := s.closeSources(); err == nil {
			err = cerr
		}
		s.closeErr = err
	})
	return s.closeErr
}
