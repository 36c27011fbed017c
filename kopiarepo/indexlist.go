package kopiarepo

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/blob/azure"
	"github.com/kopia/kopia/repo/blob/b2"
	"github.com/kopia/kopia/repo/blob/filesystem"
	"github.com/kopia/kopia/repo/blob/gcs"
	"github.com/kopia/kopia/repo/blob/gdrive"
	"github.com/kopia/kopia/repo/blob/rclone"
	"github.com/kopia/kopia/repo/blob/s3"
	"github.com/kopia/kopia/repo/blob/sftp"
	"github.com/kopia/kopia/repo/blob/sharded"
	"github.com/kopia/kopia/repo/blob/webdav"

	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/safefile"
)

// Opening a repository, kopia's epoch manager lists its index blobs in two
// rounds of round trips, the second waiting for the first (the epoch
// markers, the deletion watermark and the compactions; then the index blobs
// of the epochs the markers name), before it reads anything else. Through a
// link with a long round trip that is most of the time to the first byte of
// a restore. So the storage under every repository Open makes carries an
// index listing (indexListing):
//
//   - at once, while kopia reads its format blob and derives its keys, one
//     listing of every index blob (prefix "x") is started, and every index
//     listing kopia asks for while it opens is answered from that one: the
//     two rounds become one, and nothing is less fresh than kopia's own
//     rounds (all of it is as of one moment, where kopia's second round is
//     a round trip younger than its first);
//   - for a read-only session (WithCachedIndexList), when the listing this
//     host last saw is on disk, kopia's open is answered from it and takes
//     no round trip at all; the fresh listing still runs, and
//     Repo.CheckOpen says whether it differs. A session that gets
//     "changed" refreshes (Refresh) before it trusts what it resolved; data
//     read in the meantime is still verified content by content, so what a
//     stale open can cost is a snapshot it did not see yet, never a wrong
//     byte. Writers never take this path: a writer with a stale view of the
//     epochs could write an index where compaction no longer looks.
//
// The listing is saved beside kopia's caches (indexListFile) after every
// fresh listing and when the session's own index writes change it, so the
// next run on this host (the restore after the nightly backup) opens from
// it.

// indexPrefix is the prefix of every blob kopia's epoch manager lists.
const indexPrefix blob.ID = "x"

// indexListFile is the name of the saved listing in kopia's cache
// directory (its top level, which kopia's cache sweeps do not touch).
const indexListFile = "vmhistory-index-list.json"

// indexListMaxAge bounds how old a saved listing may be to answer an open:
// older, the open waits for the fresh listing. A day covers a nightly
// backup and the next day's restores; the check after the open is what
// keeps a younger one honest.
const indexListMaxAge = 36 * time.Hour

// WithCachedIndexList lets a read-only session open from the index listing
// this host saved last time (see the comment at indexPrefix), checked after
// the open by Repo.CheckOpen. Never for a session that writes.
func WithCachedIndexList() OpenOption {
	return func(o *openOptions) { o.cachedIndexList = true }
}

type indexListingKey struct{}

// savedIndexList is indexListFile's content.
type savedIndexList struct {
	// Storage identifies the storage the listing is of (a hash of its
	// connection info), so a cache directory reused for another
	// repository is not taken at its word.
	Storage string          `json:"storage"`
	Listed  time.Time       `json:"listed"`
	Blobs   []blob.Metadata `json:"blobs"`
}

// indexListing is one Open's listing of the index blobs; see above.
type indexListing struct {
	file     string // the saved listing; "" for none
	useSaved bool   // WithCachedIndexList
	log      *slog.Logger
	requests *RequestLog // nil when not recording

	opening atomic.Bool // answer index listings from here (until Open returns)

	startOnce sync.Once
	done      chan struct{} // closed when the fresh listing ended
	cancel    context.CancelFunc

	mu       sync.Mutex
	storage  string
	saved    map[blob.ID]blob.Metadata // read from file; nil when none (or too old, or another storage's)
	answered bool                      // an open listing was answered from saved
	fresh    map[blob.ID]blob.Metadata // after done, nil if the listing failed
	freshErr error
	written  map[blob.ID]blob.Metadata // this session's own index writes
	deleted  map[blob.ID]bool          // and deletions
	dirty    bool                      // own writes since the last save

	// shards: the WebDAV sharding parameters saved beside the listing
	// (see davTransport), nil for other storage.
	shards *shardsCache
}

func newIndexListing(file string, useSaved bool) *indexListing {
	return &indexListing{file: file, useSaved: useSaved, done: make(chan struct{}),
		written: map[blob.ID]blob.Metadata{}, deleted: map[blob.ID]bool{}, log: slog.Default()}
}

// storageKey names a storage by its connection info; a drive model is a
// model of the link to the storage it wraps, not another storage.
func storageKey(ci blob.ConnectionInfo) string {
	for ci.Type == drivemodel.TypeName {
		o, ok := ci.Config.(*drivemodel.Options)
		if !ok {
			break
		}
		ci = o.Storage
	}
	b, err := json.Marshal(ci)
	if err != nil {
		return ""
	}
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:8])
}

// attach is called by the storage factory with the storage repo.Open is
// about to use: it reads the saved listing and starts the fresh one.
func (l *indexListing) attach(st blob.Storage) {
	l.startOnce.Do(func() {
		l.storage = storageKey(st.ConnectionInfo())
		l.readSaved()
		l.opening.Store(true)
		ctx, cancel := context.WithTimeout(context.Background(), DefaultUnreachableTimeout)
		l.cancel = cancel
		go func() {
			defer close(l.done)
			start := time.Now()
			all, err := blob.ListAllBlobs(ctx, st, indexPrefix)
			l.mu.Lock()
			if !l.answered {
				// waited for: one of the open's round trips
				l.requests.add(Request{Op: "ListBlobs", Blob: string(indexPrefix), Start: start, End: time.Now()})
			}
			if err != nil {
				l.freshErr = err
			} else {
				l.fresh = map[blob.ID]blob.Metadata{}
				for _, m := range all {
					l.fresh[m.BlobID] = m
				}
			}
			l.mu.Unlock()
			if err == nil {
				l.save()
			}
		}()
	})
}

func (l *indexListing) readSaved() {
	if l.file == "" {
		return
	}
	data, err := safefile.ReadFile(l.file)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			l.log.Warn("kopia index listing: not used", "file", l.file, "err", err)
		}
		return
	}
	var s savedIndexList
	if err := json.Unmarshal(data, &s); err != nil {
		l.log.Warn("kopia index listing: not used", "file", l.file, "err", err)
		return
	}
	if s.Storage != l.storage || time.Since(s.Listed) > indexListMaxAge || time.Until(s.Listed) > time.Minute {
		return
	}
	l.saved = map[blob.ID]blob.Metadata{}
	for _, m := range s.Blobs {
		l.saved[m.BlobID] = m
	}
}

// current is the listing as this session knows it now: the fresh one (or,
// when unknown, nil) with the session's own writes and deletions applied.
func (l *indexListing) currentLocked() map[blob.ID]blob.Metadata {
	if l.fresh == nil {
		return nil
	}
	cur := make(map[blob.ID]blob.Metadata, len(l.fresh)+len(l.written))
	for id, m := range l.fresh {
		if !l.deleted[id] {
			cur[id] = m
		}
	}
	for id, m := range l.written {
		if !l.deleted[id] {
			cur[id] = m
		}
	}
	return cur
}

// save writes the current listing to the file, when there is one to write.
func (l *indexListing) save() {
	if l.file == "" {
		return
	}
	l.mu.Lock()
	cur := l.currentLocked()
	l.dirty = false
	l.mu.Unlock()
	if cur == nil {
		return
	}
	s := savedIndexList{Storage: l.storage, Listed: time.Now().UTC(), Blobs: sortedBlobs(cur)}
	data, err := json.Marshal(s)
	if err == nil {
		err = safefile.WriteFileAtomic(l.file, data, 0o600)
	}
	if err != nil {
		l.log.Warn("kopia index listing: not saved", "file", l.file, "err", err)
	}
}

func sortedBlobs(m map[blob.ID]blob.Metadata) []blob.Metadata {
	out := make([]blob.Metadata, 0, len(m))
	for _, b := range m {
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].BlobID < out[j].BlobID })
	return out
}

// answer returns the listing an index listing during the open is answered
// from: the saved one when allowed, else the fresh one, waited for.
func (l *indexListing) answer(ctx context.Context, prefix blob.ID) (map[blob.ID]blob.Metadata, error) {
	select {
	case <-l.done: // fresh already: take it
	default:
		l.mu.Lock()
		if l.useSaved && l.saved != nil {
			l.answered = true
			s := l.saved
			l.mu.Unlock()
			l.requests.answeredLocally(string(prefix), true)
			return s, nil
		}
		l.mu.Unlock()
		select {
		case <-l.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fresh == nil {
		return nil, l.freshErr
	}
	l.requests.answeredLocally(string(prefix), false)
	return l.currentLocked(), nil
}

// opened ends the open: later index listings go to the storage.
func (l *indexListing) opened() { l.opening.Store(false) }

// changedSinceOpen waits for the fresh listing and says whether the open
// was answered from a saved listing that differs from it (by blob and
// length: timestamps of blobs this session wrote are its own clock's).
func (l *indexListing) changedSinceOpen(ctx context.Context) (bool, error) {
	if changed, err := l.shards.changedSinceOpen(ctx); err != nil {
		return false, err
	} else if changed {
		return true, errShardsChanged
	}
	select {
	case <-l.done:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.answered {
		return false, nil
	}
	if l.fresh == nil {
		return true, fmt.Errorf("list the index blobs: %w", l.freshErr)
	}
	if len(l.fresh) != len(l.saved) {
		return true, nil
	}
	for id, m := range l.fresh {
		if s, ok := l.saved[id]; !ok || s.Length != m.Length {
			return true, nil
		}
	}
	return false, nil
}

func (l *indexListing) wrote(id blob.ID, length int64) {
	if !strings.HasPrefix(string(id), string(indexPrefix)) {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.written[id] = blob.Metadata{BlobID: id, Length: length, Timestamp: time.Now().UTC()}
	delete(l.deleted, id)
	l.dirty = true
}

func (l *indexListing) removed(id blob.ID) {
	if !strings.HasPrefix(string(id), string(indexPrefix)) {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.deleted[id] = true
	l.dirty = true
}

// close saves the session's own index writes and stops the fresh listing
// if it still runs.
func (l *indexListing) close() {
	l.mu.Lock()
	dirty := l.dirty
	l.mu.Unlock()
	if dirty {
		select {
		case <-l.done:
			l.save()
		default:
		}
	}
	if l.cancel != nil {
		l.cancel()
	}
}

// indexListStorage is the storage under repo.Open with its indexListing.
type indexListStorage struct {
	blob.Storage
	l *indexListing
}

func (s *indexListStorage) ListBlobs(ctx context.Context, prefix blob.ID, cb func(blob.Metadata) error) error {
	if prefix == "" || !strings.HasPrefix(string(prefix), string(indexPrefix)) || !s.l.opening.Load() {
		return s.Storage.ListBlobs(ctx, prefix, cb) //nolint:wrapcheck
	}
	all, err := s.l.answer(ctx, prefix)
	if err != nil || all == nil {
		return s.Storage.ListBlobs(ctx, prefix, cb) //nolint:wrapcheck
	}
	for _, m := range sortedBlobs(all) {
		if strings.HasPrefix(string(m.BlobID), string(prefix)) {
			if err := cb(m); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *indexListStorage) PutBlob(ctx context.Context, id blob.ID, data blob.Bytes, opts blob.PutOptions) error {
	err := s.Storage.PutBlob(ctx, id, data, opts)
	if err == nil {
		s.l.wrote(id, int64(data.Length()))
	}
	return err //nolint:wrapcheck
}

func (s *indexListStorage) DeleteBlob(ctx context.Context, id blob.ID) error {
	err := s.Storage.DeleteBlob(ctx, id)
	if err == nil || errors.Is(err, blob.ErrBlobNotFound) {
		s.l.removed(id)
	}
	return err //nolint:wrapcheck
}

func (s *indexListStorage) Close(ctx context.Context) error {
	s.l.close()
	return s.Storage.Close(ctx) //nolint:wrapcheck
}

// kopiaCacheDir is a config's kopia cache directory, a relative one taken
// from the config file's directory as kopia does; "" for none.
func kopiaCacheDir(configFile string, lc *repo.LocalConfig) string {
	if lc.Caching == nil || lc.Caching.CacheDirectory == "" {
		return ""
	}
	if dir := lc.Caching.CacheDirectory; filepath.IsAbs(dir) {
		return dir
	}
	return filepath.Join(filepath.Dir(configFile), lc.Caching.CacheDirectory)
}

// indexListingFileFor is the saved listing's path for a repository
// config: in its kopia cache directory, resolved as kopia resolves it.
func indexListingFileFor(configFile string, lc *repo.LocalConfig) string {
	dir := kopiaCacheDir(configFile, lc)
	if dir == "" {
		return ""
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return ""
	}
	return filepath.Join(dir, indexListFile)
}

// forgetKopiaListCache deletes kopia's own cached index listings (its
// list cache, MaxListCacheDuration): after an open answered from a stale
// saved listing, kopia has cached parts of it for that long, and a Refresh
// would read them back.
func forgetKopiaListCache(ctx context.Context, configFile string, lc *repo.LocalConfig) error {
	dir := kopiaCacheDir(configFile, lc)
	if dir == "" {
		return nil
	}
	dir = filepath.Join(dir, "blob-list")
	if _, err := os.Stat(dir); err != nil {
		return nil //nolint:nilerr // no list cache, nothing to forget
	}
	// The same layout kopia's cache storage gives the directory.
	st, err := filesystem.New(ctx, &filesystem.Options{Path: dir, Options: sharded.Options{DirectoryShards: []int{2}}}, false)
	if err != nil {
		return fmt.Errorf("kopia list cache %s: %w", dir, err)
	}
	defer st.Close(ctx) //nolint:errcheck
	for _, p := range []blob.ID{"n", "m", "l", "xn", "xe", "xs", "xr"} {
		if err := st.DeleteBlob(ctx, p); err != nil && !errors.Is(err, blob.ErrBlobNotFound) {
			return fmt.Errorf("kopia list cache %s: %w", dir, err)
		}
	}
	return nil
}

// withIndexListing hands the storage factories the listing of one open.
func withIndexListing(ctx context.Context, l *indexListing) context.Context {
	return context.WithValue(ctx, indexListingKey{}, l)
}

// openListingKey carries the open's listing into the storages built under
// its outermost one (a drive model's inner storage), which are not wrapped
// but may keep state beside it (newWebDAV).
type openListingKey struct{}

func openListing(ctx context.Context) *indexListing {
	l, _ := ctx.Value(openListingKey{}).(*indexListing)
	return l
}

// dir is the directory the listing is saved in, "" for none.
func (l *indexListing) dir() string {
	if l.file == "" {
		return ""
	}
	return filepath.Dir(l.file)
}

// newWebDAV is kopia's WebDAV storage with its HTTP requests taken through
// davTransport when an Open of this package builds it.
func newWebDAV(ctx context.Context, o *webdav.Options, isCreate bool) (blob.Storage, error) {
	if l := openListing(ctx); l != nil {
		if e := davRegister(o.URL, o.Username, o.Password); e != nil {
			key := storageKey(blob.ConnectionInfo{Type: "webdav", Config: o})
			l.shards = e.open(l.dir(), key, l.useSaved, l.requests)
		}
	}
	return webdav.New(ctx, o, isCreate) //nolint:wrapcheck
}

// wrapStorageFactory re-registers a kopia storage type so that the
// storage of an Open carrying an indexListing is wrapped; without one
// (every other caller, kopia's CLI code paths included) it is kopia's.
func wrapStorageFactory[T any](name string, newStorage func(context.Context, *T, bool) (blob.Storage, error)) {
	var zero T
	blob.AddSupportedStorage(name, zero, func(ctx context.Context, o *T, isCreate bool) (blob.Storage, error) {
		l, _ := ctx.Value(indexListingKey{}).(*indexListing)
		if l == nil {
			return newStorage(ctx, o, isCreate)
		}
		// A storage built inside this one (the drive model's inner) is
		// not wrapped again.
		inner := context.WithValue(context.WithValue(ctx, indexListingKey{}, (*indexListing)(nil)), openListingKey{}, l)
		st, err := newStorage(inner, o, isCreate)
		if err != nil {
			return nil, err
		}
		l.attach(st)
		return &indexListStorage{Storage: st, l: l}, nil
	})
}

func init() { //nolint:gochecknoinits // kopia's own registry is the hook
	wrapStorageFactory("filesystem", filesystem.New)
	wrapStorageFactory("webdav", newWebDAV)
	wrapStorageFactory("sftp", sftp.New)
	wrapStorageFactory("s3", s3.New)
	wrapStorageFactory("rclone", rclone.New)
	wrapStorageFactory("gdrive", gdrive.New)
	wrapStorageFactory("gcs", gcs.New)
	wrapStorageFactory("azureBlob", azure.New)
	wrapStorageFactory("b2", b2.New)
	// The drive model outermost, so that what it models is what kopia asks.
	wrapStorageFactory(drivemodel.TypeName, func(ctx context.Context, o *drivemodel.Options, c bool) (blob.Storage, error) {
		st, err := drivemodel.New(ctx, o, c)
		if err != nil {
			return nil, err
		}
		return st, nil
	})
}
