package kopiarepo

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sync/atomic"
	"time"

	"github.com/kopia/kopia/fs"
	"github.com/kopia/kopia/fs/localfs"
	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/compression"
	"github.com/kopia/kopia/repo/maintenance"
	"github.com/kopia/kopia/repo/splitter"
	"github.com/kopia/kopia/snapshot"
	"github.com/kopia/kopia/snapshot/policy"
	"github.com/kopia/kopia/snapshot/upload"
)

// DefaultProgressInterval is how often UploadRequest.Progress is called
// when the request does not say.
const DefaultProgressInterval = time.Second

// UploadRequest is one directory to upload as the next snapshot of a source.
type UploadRequest struct {
	// Dir is the directory whose files are read: a ZFS snapshot's view
	// (<mountpoint>/.zfs/snapshot/<name>, or a temporary clone).
	Dir string
	// SourcePath is recorded as the kopia source path: the dataset's
	// mountpoint, so that every night is the next snapshot of the same
	// source, and retention and the incremental hash cache work across
	// nights whatever directory the files were read from.
	SourcePath string
	// Host and User make the source user@host:SourcePath; empty means the
	// connection's (kopia.host and kopia.user when vmhistory connected).
	Host, User string
	// StartTime is the time the snapshot stands for (the ZFS snapshot's
	// creation time); kopia lists, sorts and expires snapshots by it. Zero
	// means the upload's start.
	StartTime time.Time
	// Tags are stored as kopia tags ("tag:<key>" labels), e.g. TagDataset,
	// TagSnapshot and TagGUID. Keys hold no colon.
	Tags map[string]string
	// Description is free text shown by kopia (at most 1024 bytes).
	Description string
	// Compression, when set, is written into the source's policy before
	// the upload: a kopia compression algorithm or "none". Empty leaves
	// the repository's policy as it is.
	Compression string
	// Splitter, when set, is written into the source's policy before the
	// upload (e.g. FIXED-128K). Empty leaves the policy as it is.
	Splitter string
	// Parallel is how many files are hashed and uploaded at once, and
	// how many parts of a large file; 0 means kopia's default (the
	// policy's max parallel file reads, else the number of CPUs), as the
	// kopia CLI's "snapshot create" without --parallel.
	Parallel int
	// Progress, when set, is called from one goroutine at most every
	// ProgressInterval during the upload, and once more at the end with
	// Done set.
	Progress         func(UploadProgress)
	ProgressInterval time.Duration
	// SkipMaintenance leaves out the automatic maintenance after the
	// upload, for a caller that uploads several snapshots and then calls
	// MaybeRunMaintenance once. Retention is always applied.
	SkipMaintenance bool
}

// UploadProgress are the counters of an upload so far.
type UploadProgress struct {
	// HashedBytes were read and hashed: files new or changed since the
	// previous snapshot of the source.
	HashedBytes int64 `json:"hashed_bytes"`
	// CachedBytes belong to files unchanged since the previous snapshot
	// (same size, mtime, mode and owner), which are not read at all.
	CachedBytes int64 `json:"cached_bytes"`
	// UploadedBytes were written to the repository's storage, after
	// deduplication, compression and encryption.
	UploadedBytes int64 `json:"uploaded_bytes"`
	HashedFiles   int64 `json:"hashed_files"`
	CachedFiles   int64 `json:"cached_files"`
	// EstimatedBytes and EstimatedFiles are the total to process, once
	// kopia's estimator has walked the directory (0 until then).
	EstimatedBytes int64 `json:"estimated_bytes"`
	EstimatedFiles int64 `json:"estimated_files"`
	// Errors counts files that could not be read.
	Errors  int64         `json:"errors"`
	Elapsed time.Duration `json:"elapsed"`
	Done    bool          `json:"done"`
}

// UploadResult is what an upload did.
type UploadResult struct {
	// Snapshot is the saved snapshot; its ID is empty when none was saved.
	Snapshot Snapshot `json:"snapshot"`
	// Identical is set when nothing changed since the previous snapshot
	// and the source's policy says to ignore identical snapshots: nothing
	// was saved then, as in kopia's CLI.
	Identical bool `json:"identical,omitempty"`
	// Progress holds the final counters.
	Progress UploadProgress `json:"progress"`
	// Duration of the upload itself, without retention and maintenance.
	Duration time.Duration `json:"duration"`
	// Expired are the IDs of older snapshots of the source that the
	// retention policy deleted afterwards.
	Expired []string `json:"expired,omitempty"`
	// Maintenance says whether maintenance ran after the upload.
	Maintenance MaintenanceResult `json:"maintenance"`
}

const maxDescriptionLength = 1024 // kopia CLI's limit

// Upload uploads req.Dir as the next snapshot of the source
// req.User@req.Host:req.SourcePath and then does what kopia's CLI does
// around the library in "kopia snapshot create" (cli/command_snapshot_create.go
// and cli/app.go):
//
//   - gives a repository without maintenance settings kopia's defaults,
//     owned by this connection (maybeAutoUpgradeRepository);
//   - uses the source's previous snapshots as the incremental base
//     (snapshot.FindPreviousManifests), so unchanged files are not read;
//   - uploads with the policy tree of the source, the uploader's default
//     parallelism and checkpoints, and sets StartTime, EndTime, tags and
//     description like --start-time, --tags and --description;
//   - skips saving an identical snapshot when the policy says so;
//   - saves the manifest and applies the source's retention policy;
//   - marks the source "manual" in its policy, as the CLI does for
//     --override-source: its path is the live dataset, which a "kopia
//     snapshot create --all" must never snapshot behind vmhistory's back;
//   - flushes, then runs automatic maintenance if due and owned by this
//     connection (maybeRunMaintenance, safety "full"), unless
//     req.SkipMaintenance.
//
// Before the upload, req.Compression and req.Splitter, when set, are
// written into the source's own policy (only when they differ, so an
// unchanged configuration adds no policy revisions).
//
// One deliberate difference from the CLI: a file that cannot be read (or
// whose data cannot be written) fails the upload at once and nothing is
// saved, where the CLI goes on and saves a snapshot that lacks the file. A
// kopia snapshot tagged with a ZFS guid must hold all of that snapshot's
// bytes; the ZFS snapshot is still there to upload again.
//
// The result's counters and Duration are filled in whatever happens. A
// non-empty Snapshot.ID means the snapshot was saved; with an error, that
// happens only for a *MaintenanceError, when only the maintenance after
// the upload failed. An unreachable storage gives an *UnreachableError
// (see Open).
func (r *Repo) Upload(ctx context.Context, req UploadRequest) (UploadResult, error) {
	return r.upload(ctx, req, uploadHooks{})
}

// uploadHooks are how UploadChanged takes part in Upload's session.
type uploadHooks struct {
	// source, when set, returns the directory the Uploader walks in
	// place of dir, once the session, the policy tree and the previous
	// manifests are known.
	source func(ctx context.Context, w repo.RepositoryWriter, si snapshot.SourceInfo, tree *policy.Tree, dir fs.Directory) (fs.Directory, error)
	// finish adjusts the manifest before it is compared and saved.
	finish func(man *snapshot.Manifest)
	// cached sees every file the Uploader takes from a previous
	// manifest unread (its path relative to the root).
	cached func(relPath string)
	// verify, when set, sees the finished manifest before it is saved and
	// returns the one to save instead: the same, or one it made.
	verify func(ctx context.Context, w repo.RepositoryWriter, si snapshot.SourceInfo, tree *policy.Tree, dir fs.Directory, man *snapshot.Manifest) (*snapshot.Manifest, error)
	// uploaderRepo, when set, returns the writer the Uploader gets in
	// place of the session's.
	uploaderRepo func(w repo.RepositoryWriter) repo.RepositoryWriter
}

func (r *Repo) upload(ctx context.Context, req UploadRequest, hooks uploadHooks) (UploadResult, error) {
	var res UploadResult
	si, entry, err := r.prepareUpload(req)
	if err != nil {
		return res, err
	}
	tags, err := kopiaTags(req.Tags)
	if err != nil {
		return res, err
	}

	prog := newProgress(req.Progress, req.ProgressInterval)
	prog.onCached = hooks.cached
	defer prog.stop()

	var saved *snapshot.Manifest
	start := time.Now()
	err = r.guard(ctx, func(ctx context.Context) error {
		return repo.WriteSession(ctx, r.rep, repo.WriteSessionOptions{
			Purpose:  "vmhistory:upload",
			OnUpload: prog.UploadedBytes,
		}, func(ctx context.Context, w repo.RepositoryWriter) error {
			if _, ok := w.(repo.DirectRepositoryWriter); ok {
				if err := ensureMaintenanceParams(ctx, w); err != nil {
					return err
				}
			}
			if err := applyUploadPolicy(ctx, w, si, req.Compression, req.Splitter); err != nil {
				return err
			}
			previous, err := previousManifests(ctx, w, si, req.StartTime)
			if err != nil {
				return err
			}
			tree, err := policy.TreeForSource(ctx, w, si)
			if err != nil {
				return fmt.Errorf("policy of %v: %w", si, err)
			}

			source := entry
			if hooks.source != nil {
				if source, err = hooks.source(ctx, w, si, tree, entry); err != nil {
					return err
				}
			}

			uw := w
			if hooks.uploaderRepo != nil {
				uw = hooks.uploaderRepo(w)
			}
			u := upload.NewUploader(uw)
			u.Progress = prog
			u.ParallelUploads = req.Parallel
			// Unlike the CLI, stop at the first file that cannot be read
			// (or written) and save nothing: a kopia snapshot carrying a
			// ZFS guid must hold all of that snapshot's bytes, and the
			// ZFS snapshot is kept until an upload succeeds.
			u.FailFast = true
			prog.begin()
			man, err := u.Upload(ctx, source, tree, si, previous...)
			res.Duration = time.Since(start)
			if err != nil {
				return fmt.Errorf("upload %s: %w", req.Dir, err)
			}
			if err := complete(man, req.Dir); err != nil {
				return err
			}
			if hooks.finish != nil {
				hooks.finish(man)
			}
			if hooks.verify != nil {
				if man, err = hooks.verify(ctx, w, si, tree, entry, man); err != nil {
					return err
				}
			}
			man.Description = req.Description
			man.Tags = tags
			if !req.StartTime.IsZero() {
				// As "kopia snapshot create --start-time": EndTime keeps the
				// upload's duration after the StartTime given.
				d := man.EndTime.Sub(man.StartTime)
				man.StartTime = fs.UTCTimestampFromTime(req.StartTime)
				man.EndTime = man.StartTime.Add(d)
			}
			if tree.EffectivePolicy().RetentionPolicy.IgnoreIdenticalSnapshots.OrDefault(false) &&
				len(previous) > 0 && previous[0].RootObjectID() == man.RootObjectID() {
				res.Identical = true
			} else {
				if _, err := snapshot.SaveSnapshot(ctx, w, man); err != nil {
					return fmt.Errorf("save snapshot manifest: %w", err)
				}
				saved = man
			}
			expired, err := applyRetention(ctx, w, si)
			res.Expired = expired
			return err
		})
	})
	prog.stop()
	res.Progress = prog.final
	if err != nil {
		// Nothing was flushed: the snapshot and the expiry are not saved.
		res.Expired = nil
		var ue *UnreachableError
		if errors.As(err, &ue) {
			return res, err
		}
		return res, fmt.Errorf("kopia repository %s: %w", r.storage, err)
	}
	if saved != nil {
		res.Snapshot = snapshotFromManifest(saved)
	}
	if req.SkipMaintenance {
		res.Maintenance.Skipped = "not asked"
		return res, nil
	}
	res.Maintenance, err = r.MaybeRunMaintenance(ctx)
	if err != nil {
		return res, &MaintenanceError{Err: err}
	}
	return res, nil
}

// complete refuses a manifest that lacks a file.
func complete(man *snapshot.Manifest, dir string) error {
	if ds := man.RootEntry.DirSummary; ds != nil && ds.FatalErrorCount > 0 {
		first := ""
		if len(ds.FailedEntries) > 0 {
			first = fmt.Sprintf(": %s: %s", ds.FailedEntries[0].EntryPath, ds.FailedEntries[0].Error)
		}
		return fmt.Errorf("upload %s: %d file(s) failed%s", dir, ds.FatalErrorCount, first)
	}
	if man.IncompleteReason != "" {
		return fmt.Errorf("upload %s: incomplete (%s)", dir, man.IncompleteReason)
	}
	return nil
}

func (r *Repo) prepareUpload(req UploadRequest) (snapshot.SourceInfo, fs.Directory, error) {
	var si snapshot.SourceInfo
	if !filepath.IsAbs(req.SourcePath) {
		return si, nil, fmt.Errorf("upload source path %q must be absolute", req.SourcePath)
	}
	if !filepath.IsAbs(req.Dir) {
		return si, nil, fmt.Errorf("upload directory %q must be absolute", req.Dir)
	}
	if len(req.Description) > maxDescriptionLength {
		return si, nil, fmt.Errorf("snapshot description is longer than %d bytes", maxDescriptionLength)
	}
	if req.Compression != "" && req.Compression != "none" {
		if _, ok := compression.ByName[compression.Name(req.Compression)]; !ok {
			return si, nil, fmt.Errorf("unknown kopia compression %q", req.Compression)
		}
	}
	if req.Splitter != "" && splitter.GetFactory(req.Splitter) == nil {
		return si, nil, fmt.Errorf("unknown kopia splitter %q", req.Splitter)
	}
	opts := r.rep.ClientOptions()
	si = snapshot.SourceInfo{Host: orDefault(req.Host, opts.Hostname), UserName: orDefault(req.User, opts.Username), Path: filepath.Clean(req.SourcePath)}
	fi, err := os.Stat(req.Dir)
	if err != nil {
		return si, nil, fmt.Errorf("upload directory: %w", err)
	}
	if !fi.IsDir() {
		return si, nil, fmt.Errorf("upload directory %s is not a directory", req.Dir)
	}
	dir, err := localfs.Directory(filepath.Clean(req.Dir))
	if err != nil {
		return si, nil, fmt.Errorf("upload directory: %w", err)
	}
	return si, dir, nil
}

// ensureMaintenanceParams is the CLI's maybeAutoUpgradeRepository: a
// repository that has no maintenance settings (created by a library user
// that did not set them) gets kopia's defaults, owned by this connection.
func ensureMaintenanceParams(ctx context.Context, w repo.RepositoryWriter) error {
	has, err := maintenance.HasParams(ctx, w)
	if err != nil {
		return fmt.Errorf("read maintenance settings: %w", err)
	}
	if has {
		return nil
	}
	return setDefaultMaintenanceParams(ctx, w)
}

// applyUploadPolicy writes compression and splitter into the source's own
// policy and marks it manual, writing a new policy revision only when
// something changes.
func applyUploadPolicy(ctx context.Context, w repo.RepositoryWriter, si snapshot.SourceInfo, comp, split string) error {
	p, err := definedPolicy(ctx, w, si)
	if err != nil {
		return err
	}
	orig := *p
	if comp != "" {
		p.CompressionPolicy.CompressorName = compression.Name(comp)
	}
	if split != "" {
		p.SplitterPolicy.Algorithm = split
	}
	if reflect.DeepEqual(p.SchedulingPolicy, policy.SchedulingPolicy{}) {
		p.SchedulingPolicy.Manual = true
	}
	if reflect.DeepEqual(orig, *p) {
		return nil
	}
	if err := policy.SetPolicy(ctx, w, si, p); err != nil {
		return fmt.Errorf("set policy of %v: %w", si, err)
	}
	return nil
}

// previousManifests are the incremental base: the newest complete snapshot
// of the source no later than the one being made, so that uploading a
// missed older night still compares with its predecessor (any complete
// snapshot of the source when there is none), and the checkpoints of an
// interrupted upload after the newest complete one, whose data is in the
// repository already.
func previousManifests(ctx context.Context, rep repo.Repository, si snapshot.SourceInfo, at time.Time) ([]*snapshot.Manifest, error) {
	latest, err := snapshot.FindPreviousManifests(ctx, rep, si, nil)
	if err != nil || at.IsZero() {
		return latest, wrapPrevious(si, err)
	}
	t := fs.UTCTimestampFromTime(at)
	prev, err := snapshot.FindPreviousManifests(ctx, rep, si, &t)
	if err != nil {
		return nil, wrapPrevious(si, err)
	}
	if len(prev) == 0 || prev[0].IncompleteReason != "" {
		return latest, nil
	}
	for _, m := range latest {
		if m.IncompleteReason != "" && !slices.ContainsFunc(prev, func(p *snapshot.Manifest) bool { return p.ID == m.ID }) {
			prev = append(prev, m)
		}
	}
	return prev, nil
}

func wrapPrevious(si snapshot.SourceInfo, err error) error {
	if err != nil {
		return fmt.Errorf("find previous snapshots of %v: %w", si, err)
	}
	return nil
}

// progress implements kopia's upload.Progress with atomic counters, and
// reports them to a callback from its own goroutine at a bounded rate.
// begin and stop are called from the uploading goroutine.
type progress struct {
	upload.NullUploadProgress

	cb       func(UploadProgress)
	interval time.Duration

	onCached func(relPath string)

	hashedBytes, cachedBytes, uploadedBytes atomic.Int64
	hashedFiles, cachedFiles, errs          atomic.Int64
	estBytes, estFiles                      atomic.Int64

	start   atomic.Int64 // unix nanoseconds
	started bool
	stopped bool
	final   UploadProgress
	quit    chan struct{}
	done    chan struct{}
}

var _ upload.Progress = (*progress)(nil)

func newProgress(cb func(UploadProgress), interval time.Duration) *progress {
	if interval <= 0 {
		interval = DefaultProgressInterval
	}
	p := &progress{cb: cb, interval: interval, quit: make(chan struct{}), done: make(chan struct{})}
	p.start.Store(time.Now().UnixNano())
	return p
}

// begin starts the reporting goroutine.
func (p *progress) begin() {
	p.start.Store(time.Now().UnixNano())
	if p.cb == nil || p.started || p.stopped {
		return
	}
	p.started = true
	go func() {
		defer close(p.done)
		t := time.NewTicker(p.interval)
		defer t.Stop()
		for {
			select {
			case <-p.quit:
				p.cb(p.final)
				return
			case <-t.C:
				p.cb(p.snapshot(false))
			}
		}
	}()
}

// stop ends the reporting goroutine after its final report. It may be
// called more than once, and without begin.
func (p *progress) stop() {
	if p.stopped {
		return
	}
	p.stopped = true
	p.final = p.snapshot(true)
	close(p.quit)
	if p.started {
		<-p.done
	}
}

func (p *progress) snapshot(done bool) UploadProgress {
	return UploadProgress{
		HashedBytes:    p.hashedBytes.Load(),
		CachedBytes:    p.cachedBytes.Load(),
		UploadedBytes:  p.uploadedBytes.Load(),
		HashedFiles:    p.hashedFiles.Load(),
		CachedFiles:    p.cachedFiles.Load(),
		EstimatedBytes: p.estBytes.Load(),
		EstimatedFiles: p.estFiles.Load(),
		Errors:         p.errs.Load(),
		Elapsed:        time.Since(time.Unix(0, p.start.Load())),
		Done:           done,
	}
}

// Enabled turns on kopia's size estimation when someone watches, as the
// CLI's progress does.
func (p *progress) Enabled() bool { return p.cb != nil }

func (p *progress) HashedBytes(n int64)   { p.hashedBytes.Add(n) }
func (p *progress) UploadedBytes(n int64) { p.uploadedBytes.Add(n) }

func (p *progress) CachedFile(relPath string, size int64) {
	p.cachedBytes.Add(size)
	p.cachedFiles.Add(1)
	if p.onCached != nil {
		p.onCached(relPath)
	}
}

func (p *progress) FinishedHashingFile(string, int64) { p.hashedFiles.Add(1) }

func (p *progress) Error(_ string, _ error, isIgnored bool) {
	if !isIgnored {
		p.errs.Add(1)
	}
}

func (p *progress) EstimatedDataSize(files, bytes int64) {
	p.estFiles.Store(files)
	p.estBytes.Store(bytes)
}
