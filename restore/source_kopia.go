package restore

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	kfs "github.com/kopia/kopia/fs"
	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/manifest"
	"github.com/kopia/kopia/repo/object"
	"github.com/kopia/kopia/snapshot"
	"github.com/kopia/kopia/snapshot/snapshotfs"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
)

// DefaultKopiaCacheBytes is the size of the chunk cache a KopiaSource's
// readers share when Prefetch.Cache is not set.
const DefaultKopiaCacheBytes = 256 << 20

// KopiaSource reads the kopia snapshots vmhistory uploaded: those tagged
// with the ZFS dataset (kopiarepo.TagDataset), snapshot name and guid.
// Snapshots without the dataset tag (made by kopia's CLI of the same
// path, say) are not part of the timeline. Files are read through the
// prefetching reader (kopiarepo/prefetch), all of a source's readers
// sharing one chunk cache.
type KopiaSource struct {
	// Name is the source's label; "kopia" by default.
	SourceName string
	// Datasets, when not empty, restricts the snapshots to these datasets.
	Datasets []string
	// Prefetch tunes the readers; Prefetch.Cache is shared by all of them
	// (a private LRU of DefaultKopiaCacheBytes when nil).
	Prefetch prefetch.Options
	// Requests, when set, records the storage requests of the open (see
	// kopiarepo.RequestLog); the session stops it once its first file is
	// open.
	Requests *kopiarepo.RequestLog
	// Seeds, when set, finds copies of a file's chunks on this host, taken
	// instead of fetching them (see SeedFinder).
	Seeds SeedFinder

	repo       *kopiarepo.Repo
	host, user string
	log        *slog.Logger
	cacheOnce  sync.Once
	listed     atomic.Bool
}

// NewKopiaSource returns the source of repo's snapshots of sources
// user@host (an empty host or user matches any).
func NewKopiaSource(repo *kopiarepo.Repo, host, user string) *KopiaSource {
	return &KopiaSource{SourceName: "kopia", repo: repo, host: host, user: user, log: slog.Default()}
}

// SetLogger sets the logger of debug messages.
func (s *KopiaSource) SetLogger(l *slog.Logger) {
	if l != nil {
		s.log = l
	}
}

// Repo returns the repository the source reads.
func (s *KopiaSource) Repo() *kopiarepo.Repo { return s.repo }

// Name implements Source.
func (s *KopiaSource) Name() string { return s.SourceName }

// Kind implements Source.
func (s *KopiaSource) Kind() Kind { return KindKopia }

// Snapshots implements Source. A ZFS snapshot uploaded twice appears once,
// as its newest upload.
//
// Every call after the first refreshes the repository's indexes first:
// kopia itself looks for snapshots uploaded by another process (the
// nightly backup, while a mount runs) only every 15 minutes.
func (s *KopiaSource) Snapshots(ctx context.Context) ([]SourceSnapshot, error) {
	if s.listed.Swap(true) {
		if err := s.repo.Refresh(ctx); err != nil {
			return nil, err
		}
	}
	snaps, err := s.repo.Snapshots(ctx, s.host, s.user, "")
	if err != nil {
		return nil, err
	}
	type key struct{ guid, dataset, name string }
	newest := map[key]kopiarepo.Snapshot{}
	var order []key
	for _, k := range snaps {
		ds := k.Tags[kopiarepo.TagDataset]
		name := k.Tags[kopiarepo.TagSnapshot]
		if ds == "" || name == "" {
			continue
		}
		if len(s.Datasets) > 0 && !slices.Contains(s.Datasets, ds) {
			continue
		}
		kk := key{k.Tags[kopiarepo.TagGUID], ds, name}
		old, seen := newest[kk]
		if !seen {
			order = append(order, kk)
		}
		if !seen || k.EndTime.After(old.EndTime) {
			newest[kk] = k
		}
	}
	out := make([]SourceSnapshot, 0, len(order))
	for _, kk := range order {
		k := newest[kk]
		guid, _ := strconv.ParseUint(kk.guid, 10, 64) // 0 when missing: matched by name
		// 0 for an upload that predates the tag: unknown, not kopia's
		// file total, which means something else.
		referenced, _ := strconv.ParseInt(k.Tags[kopiarepo.TagReferenced], 10, 64)
		out = append(out, SourceSnapshot{
			SnapshotRef: SnapshotRef{Dataset: kk.dataset, Name: kk.name, GUID: guid, Time: k.StartTime},
			ID:          k.ID,
			Size:        referenced,
		})
	}
	return out, nil
}

func (s *KopiaSource) prefetchOptions() prefetch.Options {
	s.cacheOnce.Do(func() {
		if s.Prefetch.Cache == nil {
			s.Prefetch.Cache = prefetch.NewLRU(DefaultKopiaCacheBytes)
		}
	})
	return s.Prefetch
}

// Open implements Source.
func (s *KopiaSource) Open(ctx context.Context, snap SourceSnapshot) (Tree, error) {
	rep := s.repo.Kopia()
	m, err := snapshot.LoadSnapshot(ctx, rep, manifest.ID(snap.ID))
	if err != nil {
		return nil, fmt.Errorf("%s: kopia snapshot %s: %w", s.SourceName, snap.ID, err)
	}
	root, err := snapshotfs.SnapshotRoot(rep, m)
	if err != nil {
		return nil, fmt.Errorf("%s: kopia snapshot %s: %w", s.SourceName, snap.ID, err)
	}
	life, cancel := context.WithCancel(context.WithoutCancel(ctx))
	return &kopiaTree{src: s, snap: snap, root: root, label: s.SourceName + ":" + snap.ID, life: life, cancel: cancel,
		opts: s.prefetchOptions()}, nil
}

// kopiaTree is one kopia snapshot.
type kopiaTree struct {
	src    *KopiaSource
	snap   SourceSnapshot
	root   kfs.Entry
	label  string
	opts   prefetch.Options
	life   context.Context //nolint:containedctx // the readers' lifetime
	cancel context.CancelFunc
}

func (t *kopiaTree) wrap(rel string, err error) error {
	if errors.Is(err, kfs.ErrEntryNotFound) {
		err = fs.ErrNotExist
	}
	return &fs.PathError{Op: t.label, Path: rel, Err: err}
}

// lookup walks to rel without following symbolic links.
func (t *kopiaTree) lookup(ctx context.Context, rel string) (kfs.Entry, string, error) {
	rel, err := CleanPath(rel)
	if err != nil {
		return nil, "", err
	}
	cur := t.root
	if rel == "." {
		return cur, rel, nil
	}
	parts := strings.Split(rel, "/")
	for i, part := range parts {
		dir, ok := cur.(kfs.Directory)
		if !ok || cur.Mode()&fs.ModeSymlink != 0 {
			what := errNotDir
			if cur.Mode()&fs.ModeSymlink != 0 {
				what = errSymlinkDir
			}
			return nil, rel, t.wrap(path.Join(parts[:i]...), what)
		}
		child, err := dir.Child(ctx, part)
		if err != nil {
			return nil, rel, t.wrap(rel, err)
		}
		if child == nil {
			return nil, rel, t.wrap(rel, fs.ErrNotExist)
		}
		cur = child
	}
	return cur, rel, nil
}

func (t *kopiaTree) info(ctx context.Context, name string, e kfs.Entry) FileInfo {
	fi := FileInfo{Name: name, Size: e.Size(), Mode: e.Mode(), ModTime: e.ModTime()}
	if l, ok := e.(kfs.Symlink); ok {
		if target, err := l.Readlink(ctx); err == nil {
			fi.Target = target
		}
	}
	return fi
}

func (t *kopiaTree) Stat(ctx context.Context, rel string) (FileInfo, error) {
	e, rel, err := t.lookup(ctx, rel)
	if err != nil {
		return FileInfo{}, err
	}
	name := path.Base(rel)
	return t.info(ctx, name, e), nil
}

func (t *kopiaTree) ReadDir(ctx context.Context, rel string) ([]FileInfo, error) {
	e, rel, err := t.lookup(ctx, rel)
	if err != nil {
		return nil, err
	}
	dir, ok := e.(kfs.Directory)
	if !ok || e.Mode()&fs.ModeSymlink != 0 {
		return nil, t.wrap(rel, errNotDir)
	}
	ents, err := kfs.GetAllEntries(ctx, dir)
	if err != nil {
		return nil, t.wrap(rel, err)
	}
	out := make([]FileInfo, 0, len(ents))
	for _, c := range ents {
		out = append(out, t.info(ctx, c.Name(), c))
	}
	return out, nil
}

func (t *kopiaTree) OpenFile(ctx context.Context, rel string) (File, error) {
	oid, size, rel, err := t.regularFile(ctx, rel)
	if err != nil {
		return nil, err
	}
	opts := t.opts
	var releaseSeeds func()
	if t.src.Seeds != nil {
		if seeder, release := t.src.Seeds.SeedsFor(ctx, t.src, t.snap, rel); seeder != nil {
			opts.Seeds, releaseSeeds = seeder, release
		}
	}
	r, err := prefetch.Open(t.life, t.src.repo.Kopia(), oid, opts)
	if err == nil && r.Length() != size {
		r.Close()
		err = fmt.Errorf("object holds %d bytes, the directory entry says %d", r.Length(), size)
	}
	if err != nil {
		if releaseSeeds != nil {
			releaseSeeds()
		}
		return nil, t.wrap(rel, err)
	}
	return &kopiaFile{Reader: r, releaseSeeds: releaseSeeds}, nil
}

// regularFile looks up rel, which must be a regular file, and returns its
// object, its size and rel cleaned.
func (t *kopiaTree) regularFile(ctx context.Context, rel string) (object.ID, int64, string, error) {
	e, rel, err := t.lookup(ctx, rel)
	if err != nil {
		return object.EmptyID, 0, rel, err
	}
	if !e.Mode().IsRegular() {
		return object.EmptyID, 0, rel, t.wrap(rel, fmt.Errorf("%w: it is a %s", ErrNotRegular, e.Mode().Type()))
	}
	h, ok := e.(object.HasObjectID)
	if !ok {
		return object.EmptyID, 0, rel, t.wrap(rel, errors.New("kopia entry has no object id"))
	}
	return h.ObjectID(), e.Size(), rel, nil
}

// fileObject is the object of regular file rel.
func (t *kopiaTree) fileObject(ctx context.Context, rel string) (object.ID, error) {
	oid, _, _, err := t.regularFile(ctx, rel)
	return oid, err
}

// Close stops every reader of the tree.
func (t *kopiaTree) Close() error {
	t.cancel()
	return nil
}

// kopiaFile is a file read through the prefetching reader.
type kopiaFile struct {
	*prefetch.Reader
	releaseSeeds func() // nil without seeds
	closeOnce    sync.Once
	closeErr     error
}

// Close stops the reader, then lets its seeds go.
func (f *kopiaFile) Close() error {
	f.closeOnce.Do(func() {
		f.closeErr = f.Reader.Close()
		if f.releaseSeeds != nil {
			f.releaseSeeds()
		}
	})
	return f.closeErr
}

func (f *kopiaFile) Size() int64 { return f.Length() }

// PrefetchStats returns the prefetching reader's counters.
func (f *kopiaFile) PrefetchStats() prefetch.Stats { return f.Stats() }

// repositoryID is the unique ID of the repository, in hex; "" when the
// connection does not tell it.
func (s *KopiaSource) repositoryID() string {
	if dr, ok := s.repo.Kopia().(repo.DirectRepository); ok {
		return hex.EncodeToString(dr.UniqueID())
	}
	return ""
}
