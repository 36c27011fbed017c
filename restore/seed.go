package restore

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/kopia/kopia/repo/content"

	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
)

// SeedFinder finds this host's copies of the chunks of a kopia file, so
// that reading it fetches from the store only what this host lacks (see
// prefetch.Seeder: every byte it proposes is verified against its content
// ID before it is used).
type SeedFinder interface {
	// SeedsFor returns the seeder for file rel of snapshot snap of kopia
	// source src and a function releasing what it holds (called when the
	// file is closed); nil when there is nothing to seed from.
	SeedsFor(ctx context.Context, src *KopiaSource, snap SourceSnapshot, rel string) (prefetch.Seeder, func())
}

// DefaultSeedSnapshots is how many local snapshots a kopia file is seeded
// from: the ones nearest to it in time, which share the most with it.
const DefaultSeedSnapshots = 2

// seedBuildTimeout bounds how long finding a file's seeds may take (the
// local snapshots opened, the twins' chunk tables read: for a large file
// through a slow link, megabytes of index objects).
const seedBuildTimeout = 2 * time.Minute

// seedWait is how long the file's first reads wait for its seeds; past
// it, reads go to the store until the seeds are found, so that a slow
// build costs the first byte no more than this.
var seedWait = 10 * time.Second

// LocalSeeds seeds a kopia file from the same file in the local snapshots
// of its dataset nearest to it in time (local: on the local source, or on
// a replica whose pool is on this host; a replica over ssh is not read
// for seeds, its link is no cheaper than the store's). A local snapshot that is also in
// kopia (the same ZFS guid: the same bytes) is used through its twin's
// chunk table, read from kopia's index objects: each content is proposed
// where the twin holds it, and a content it does not hold is not read at
// all. A local snapshot not yet uploaded is proposed at each chunk's own
// offset (a VM disk's data does not move), which costs a read and a hash
// for each chunk that changed. The local snapshots are opened through a
// TreeCache of its own (held, and on zfs-fuse cloned, like any tree
// read), released when the files seeded from them are closed and the
// cache's idle time has passed.
type LocalSeeds struct {
	// Timeline gives the current timeline, in which the file's snapshot
	// and its local neighbours are found.
	Timeline func() *Timeline
	// Snapshots is how many local snapshots to seed from (default
	// DefaultSeedSnapshots).
	Snapshots int
	// MapDir, when set, keeps what was learned about local files kopia
	// does not hold (see prefetch.LearnedMap) across runs, one file per
	// repository, snapshot guid and path.
	MapDir string
	Log    *slog.Logger

	trees *TreeCache
}

// NewLocalSeeds returns a LocalSeeds whose trees are let go once unused
// for idle (0: kept until Close).
func NewLocalSeeds(timeline func() *Timeline, idle time.Duration, log *slog.Logger) *LocalSeeds {
	if log == nil {
		log = slog.Default()
	}
	return &LocalSeeds{Timeline: timeline, Log: log, trees: NewIdleTreeCache(idle)}
}

// Close closes the local snapshots still open for seeding.
func (l *LocalSeeds) Close() error { return l.trees.Close() }

// SeedsFor implements SeedFinder. The seeds are found in the background:
// the first reads that need them wait for them, seedWait at most.
func (l *LocalSeeds) SeedsFor(ctx context.Context, src *KopiaSource, snap SourceSnapshot, rel string) (prefetch.Seeder, func()) {
	tl := l.Timeline()
	if tl == nil {
		return nil, nil
	}
	var target *Entry
	for _, e := range tl.Entries {
		for _, es := range e.Sources {
			if es.Source.Kind() == KindKopia && es.Snapshot.ID == snap.ID {
				target = e
			}
		}
	}
	if target == nil || target.Has(KindLocal) {
		// A snapshot this host holds is read from here, not seeded.
		return nil, nil
	}
	var near []*Entry
	for _, e := range tl.Entries {
		if e != target && e.Dataset == target.Dataset && seedSource(e) != nil {
			near = append(near, e)
		}
	}
	if len(near) == 0 {
		return nil, nil
	}
	slices.SortStableFunc(near, func(a, b *Entry) int {
		return cmp.Compare(absDuration(a.Time.Sub(target.Time)), absDuration(b.Time.Sub(target.Time)))
	})
	n := cmp.Or(l.Snapshots, DefaultSeedSnapshots)
	near = near[:min(n, len(near))]

	life, cancel := context.WithTimeout(context.WithoutCancel(ctx), seedBuildTimeout)
	s := &lazySeeder{done: make(chan struct{}), ctx: life, cancel: cancel, src: src, waitUntil: time.Now().Add(seedWait)}
	go s.build(l, target, near, rel)
	return s, s.release
}

func absDuration(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// lazySeeder is one file's seeds, found in the background.
type lazySeeder struct {
	done   chan struct{}
	ctx    context.Context //nolint:containedctx // bounds the build and the waits for it
	cancel context.CancelFunc
	src    *KopiaSource // the file's
	// waitUntil ends the reads' waits for the build.
	waitUntil time.Time

	seeds    prefetch.Seeders // set before done is closed
	mu       sync.Mutex
	releases []func() // complete once done is closed
	once     sync.Once
}

func (s *lazySeeder) SeedsFor(cid content.ID, offset, length int64) []prefetch.Seed {
	select {
	case <-s.done:
		return s.seeds.SeedsFor(cid, offset, length)
	default:
	}
	wait := time.NewTimer(time.Until(s.waitUntil))
	defer wait.Stop()
	select {
	case <-s.done:
		return s.seeds.SeedsFor(cid, offset, length)
	case <-s.ctx.Done():
	case <-wait.C:
	}
	return nil
}

// release stops the build and lets go of the seeds' files and trees.
func (s *lazySeeder) release() {
	s.once.Do(func() {
		s.cancel()
		<-s.done
		for i := len(s.releases) - 1; i >= 0; i-- {
			s.releases[i]()
		}
	})
}

func (s *lazySeeder) build(l *LocalSeeds, target *Entry, near []*Entry, rel string) {
	defer close(s.done)
	// Concurrently: each is a clone to make and a chunk table to read,
	// and the file's first reads wait for all of them.
	seeders := make([]prefetch.Seeder, len(near))
	var wg sync.WaitGroup
	for i, e := range near {
		wg.Go(func() {
			began := time.Now()
			seeder, err := s.seedFrom(l, e, rel)
			if err != nil {
				// The restore ending cancels the build; a file the
				// snapshot does not hold is no seed. Neither is worth a
				// line.
				if s.ctx.Err() == nil {
					level := slog.LevelInfo
					if definitive(err) {
						level = slog.LevelDebug
					}
					l.Log.Log(s.ctx, level, "not seeding from a local snapshot", "file", target.FullName()+":"+rel, "seed", e.FullName(), "err", err)
				}
				return
			}
			l.Log.Debug("seeding from a local snapshot", "file", target.FullName()+":"+rel, "seed", e.FullName(), "took", time.Since(began))
			seeders[i] = seeder
		})
	}
	wg.Wait()
	for _, sd := range seeders {
		if sd != nil {
			s.seeds = append(s.seeds, sd)
		}
	}
}

// onRelease adds f to what release calls.
func (s *lazySeeder) onRelease(f func()) {
	s.mu.Lock()
	s.releases = append(s.releases, f)
	s.mu.Unlock()
}

// seedSource is the source of e that seeds are read from: the local one,
// else a replica on a pool of this host; nil when neither holds e (a
// replica over ssh is a source to read from, not a free seed).
func seedSource(e *Entry) *EntrySource {
	var replica *EntrySource
	for i := range e.Sources {
		es := &e.Sources[i]
		switch es.Source.Kind() {
		case KindLocal:
			return es
		case KindReplica:
			if z, ok := es.Source.(*ZFSSource); ok && z.OnThisHost() && replica == nil {
				replica = es
			}
		}
	}
	return replica
}

// seedFrom opens rel of local snapshot e, and its twin's chunk table when
// kopia holds e too.
func (s *lazySeeder) seedFrom(l *LocalSeeds, e *Entry, rel string) (prefetch.Seeder, error) {
	local := seedSource(e)
	var twin *EntrySource
	for i := range e.Sources {
		if es := &e.Sources[i]; es.Source.Kind() == KindKopia {
			twin = cmp.Or(twin, es)
		}
	}
	tree, releaseTree, err := l.trees.OpenTree(s.ctx, *local)
	if err != nil {
		return nil, err
	}
	f, err := tree.OpenFile(s.ctx, rel)
	if err != nil {
		releaseTree(!definitive(err))
		return nil, err
	}
	s.onRelease(func() { f.Close(); releaseTree(false) })
	origin := local.Source.Name() + " " + e.FullName()
	var file io.ReaderAt = f
	if seedFileHook != nil {
		file = seedFileHook(file)
	}
	if twin != nil {
		table, err := s.twinTable(l, *twin, rel)
		if err == nil {
			return prefetch.NewSeedMap(origin, file, table), nil
		}
		if s.ctx.Err() == nil {
			l.Log.Info("seeding at the same offsets: the kopia twin's chunk table cannot be read", "seed", e.FullName(), "path", rel, "err", err)
		}
	}
	return s.learnedMap(l, e, local.Snapshot, rel, origin, file, f.Size()), nil
}

// seedFileHook, set by tests, stands between the seeder and a seed's file
// (to inject read errors).
var seedFileHook func(io.ReaderAt) io.ReaderAt

// learnedMap seeds from file f (size bytes) (rel of local snapshot e, which kopia does
// not hold) through a LearnedMap, starting from what an earlier run
// learned and saving what this one learns when the file is let go.
func (s *lazySeeder) learnedMap(l *LocalSeeds, e *Entry, snap SourceSnapshot, rel, origin string, f io.ReaderAt, size int64) prefetch.Seeder {
	var path string
	var header seedMapHeader
	var known []prefetch.HashedChunk
	if id := s.src.repositoryID(); l.MapDir != "" && id != "" && snap.GUID != 0 {
		path = seedMapPath(l.MapDir, id, snap.GUID, rel)
		header = seedMapHeader{Repository: id, GUID: strconv.FormatUint(snap.GUID, 10), Snapshot: e.FullName(), Path: rel, Size: size}
		var err error
		if known, err = readSeedMap(path, header); err != nil {
			l.Log.Warn("seed map not used", "err", err)
		}
	}
	m := prefetch.NewLearnedMap(origin, f, size, known)
	if path != "" {
		s.onRelease(func() {
			if !m.Changed() {
				return
			}
			entries := m.Entries()
			if len(entries) == 0 {
				return
			}
			header.HashBytes = len(entries[0].Hash)
			if err := writeSeedMap(path, header, entries); err != nil {
				l.Log.Warn("seed map not saved", "seed", e.FullName(), "path", rel, "err", err)
			}
		})
	}
	return m
}

// twinTable reads the chunk table of rel in kopia snapshot es.
func (s *lazySeeder) twinTable(l *LocalSeeds, es EntrySource, rel string) ([]prefetch.ChunkRef, error) {
	tree, release, err := l.trees.OpenTree(s.ctx, es)
	if err != nil {
		return nil, err
	}
	defer release(false)
	kt, ok := tree.(*kopiaTree)
	if !ok {
		return nil, fmt.Errorf("%s is not a kopia tree", es.Source.Name())
	}
	oid, err := kt.fileObject(s.ctx, rel)
	if err != nil {
		return nil, err
	}
	return prefetch.ChunkTable(s.ctx, kt.src.repo.Kopia(), oid)
}
