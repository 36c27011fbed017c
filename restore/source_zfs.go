package restore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/pkg/sftp"

	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/zfs"
)

// RestoreHoldTag starts the zfs hold a ZFS source places on a snapshot
// while one of its Trees is open, so that pruning (local) or the replica's
// own retention cannot destroy it under a reader. Each process holds with
// its own tag, ProcessHoldTag (RestoreHoldTag-<host>-<pid>-<start>), so
// one process's release never unprotects another's reader, and a hold of
// a process that died (kill -9, a crash) is released by the next ZFS
// source that starts on its host. Within one process the hold is counted
// across sources: it is released when the last Tree of the snapshot
// closes.
const RestoreHoldTag = "vmhistory-restore"

// RestoreHoldPrefix starts every per-process restore hold tag.
const RestoreHoldPrefix = RestoreHoldTag + "-"

var processHoldTag = sync.OnceValues(func() (string, error) { return zfs.ProcessTag(RestoreHoldTag) })

// ProcessHoldTag is the hold tag of this process's restores.
func ProcessHoldTag() (string, error) { return processHoldTag() }

// processHolds counts this process's open Trees per snapshot (keyed by
// where the zfs is and the snapshot's name), across every ZFSSource.
// unreleased are the holds whose release failed (the replica was
// unreachable): still in place, retried later (see ZFSSource.retryCleanups).
var processHolds = struct {
	sync.Mutex
	n          map[string]int
	unreleased map[string]bool
}{n: map[string]int{}, unreleased: map[string]bool{}}

// ZFSSource reads the snapshots of some datasets on one zfs: this host's
// (KindLocal) or the replica's (KindReplica), on a pool of this host or
// over ssh.
//
// A snapshot's files are read where zfs shows them (.zfs/snapshot on
// OpenZFS) or from a temporary read-only clone (zfs-fuse), made by
// zfs.OpenSnapshot and destroyed when the Tree closes; either way the
// snapshot carries this process's restore hold (ProcessHoldTag) meanwhile. A clone depends on
// its snapshot only, so an incremental receive into the replica's dataset
// still works while a restore reads from it.
//
// With a local runner the files are read with os calls; over ssh they are
// read with sftp, through an `ssh -s sftp` started with the runner's own
// options (host key, key, shared connection), so no port or daemon beyond
// sshd is needed on the replica.
type ZFSSource struct {
	name     string
	kind     Kind
	z        *zfs.ZFS
	datasets map[string]string // source dataset -> dataset on z
	log      *slog.Logger

	sweepOnce sync.Once

	// cleanups are clone removals and hold releases that failed (the
	// replica unreachable when a snapshot was closed), retried on the
	// next Snapshots call and at Close, so that a long-running mount
	// does not keep them until a later process sweeps them.
	cleanupMu sync.Mutex
	cleanups  []func(context.Context) error

	mu   sync.Mutex
	conn *sftpConn // over ssh: the shared sftp session
	// closed is set by Close.
	closed bool
}

// NewZFSSource returns a source named name (its label in the timeline) of
// kind k over z. datasets maps each source dataset (as the timeline names
// it, e.g. DATA/libvirt) to the dataset on z that holds its snapshots
// (DATA/libvirt itself for the local source, BACKUP/libvirt on a
// replica). Stale read-only clones and restore holds of this host's dead
// processes are swept from the datasets' pools on first use.
func NewZFSSource(name string, k Kind, z *zfs.ZFS, datasets map[string]string) *ZFSSource {
	return &ZFSSource{name: name, kind: k, z: z, datasets: datasets, log: slog.Default()}
}

// SetLogger sets the logger of debug and warning messages.
func (s *ZFSSource) SetLogger(l *slog.Logger) {
	if l != nil {
		s.log = l
	}
}

// Name implements Source.
func (s *ZFSSource) Name() string { return s.name }

// Kind implements Source.
func (s *ZFSSource) Kind() Kind { return s.kind }

// ZFS returns the zfs handle the source reads through.
func (s *ZFSSource) ZFS() *zfs.ZFS { return s.z }

func (s *ZFSSource) sourceDatasets() []string {
	ds := make([]string, 0, len(s.datasets))
	for d := range s.datasets {
		ds = append(ds, d)
	}
	slices.Sort(ds)
	return ds
}

// sweep removes read-only clones and restore holds left by dead vmhistory
// processes of this host, once per source.
func (s *ZFSSource) sweep(ctx context.Context) {
	s.sweepOnce.Do(func() {
		s.sweepHolds(ctx)
		pools := map[string]bool{}
		for _, d := range s.datasets {
			pools[zfs.Pool(d)] = true
		}
		for pool := range pools {
			removed, err := s.z.SweepClones(ctx, pool)
			if err != nil {
				s.log.Debug("sweep stale read-only clones", "source", s.name, "pool", pool, "err", err)
			}
			if len(removed) > 0 {
				s.log.Info("removed stale read-only clones", "source", s.name, "clones", removed)
			}
		}
	})
}

// sweepHolds releases the restore holds of this host's processes that no
// longer run from the snapshots of the source's datasets.
func (s *ZFSSource) sweepHolds(ctx context.Context) {
	datasets := map[string]bool{}
	for _, d := range s.datasets {
		datasets[d] = true
	}
	for d := range datasets {
		released, err := s.z.SweepHolds(ctx, d, RestoreHoldTag)
		if err != nil {
			s.log.Debug("release stale restore holds", "source", s.name, "dataset", d, "err", err)
		}
		if len(released) > 0 {
			s.log.Info("released stale restore holds", "source", s.name, "holds", released)
		}
	}
}

// Snapshots implements Source: the snapshots of every dataset, named by
// the source dataset. A dataset that cannot be listed fails the call, but
// the snapshots of the others are returned with the error.
func (s *ZFSSource) Snapshots(ctx context.Context) ([]SourceSnapshot, error) {
	s.sweep(ctx)
	s.retryCleanups(ctx)
	var out []SourceSnapshot
	var errs []error
	for _, src := range s.sourceDatasets() {
		on := s.datasets[src]
		snaps, err := s.z.Snapshots(ctx, on)
		if errors.Is(err, zfs.ErrNotExist) {
			// Most likely a misspelt dataset in the configuration: say so,
			// for it also explains a kopia history that seems missing.
			where := s.z.Where()
			if where == "local" {
				where = "this host"
			}
			errs = append(errs, fmt.Errorf("dataset %s does not exist on %s", on, where))
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, z := range snaps {
			out = append(out, SourceSnapshot{
				SnapshotRef: SnapshotRef{Dataset: src, Name: z.Name, GUID: z.GUID, Time: z.Creation},
				ID:          z.FullName(),
				Size:        int64(z.Referenced),
			})
		}
	}
	return out, errors.Join(errs...)
}

// Open implements Source: it holds the snapshot, makes its files readable
// (a clone where needed) and returns a Tree over them. Closing the Tree
// destroys the clone and releases the hold.
func (s *ZFSSource) Open(ctx context.Context, snap SourceSnapshot) (Tree, error) {
	s.sweep(ctx)
	full := snap.ID
	if full == "" {
		on, ok := s.datasets[snap.Dataset]
		if !ok {
			return nil, fmt.Errorf("%s: dataset %s is not configured", s.name, snap.Dataset)
		}
		full = on + "@" + snap.Name
	}
	if snap.GUID != 0 {
		z, err := s.z.GetSnapshot(ctx, full)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.name, err)
		}
		if z.GUID != snap.GUID {
			return nil, fmt.Errorf("%s: %s has guid %d, not %d: it is another snapshot of the same name", s.name, full, z.GUID, snap.GUID)
		}
	}
	if err := s.hold(ctx, full); err != nil {
		return nil, err
	}
	view, err := s.z.OpenSnapshot(ctx, full)
	if err != nil {
		s.release(full)
		return nil, fmt.Errorf("%s: %w", s.name, err)
	}
	t := &zfsTree{src: s, snapshot: full, view: view}
	fsys, err := s.filesystem(ctx, view.Root)
	if err != nil {
		t.Close()
		return nil, err
	}
	t.dirTree = newDirTree(fsys, view.Root, s.name+":"+full)
	return t, nil
}

// filesystem returns how the files at root are read: os calls here, sftp
// over ssh.
func (s *ZFSSource) filesystem(ctx context.Context, root string) (snapFS, error) {
	switch r := s.z.Runner().(type) {
	case *runner.Local:
		return osFS{}, nil
	case *runner.SSH:
		c, err := s.sftpClient(ctx, r)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.name, err)
		}
		return sftpFS{c: c}, nil
	default:
		return nil, fmt.Errorf("%s: cannot read files through a %T runner", s.name, r)
	}
}

// hold places this process's restore hold on the snapshot for its first
// open Tree in the process.
func (s *ZFSSource) hold(ctx context.Context, full string) error {
	tag, err := ProcessHoldTag()
	if err != nil {
		return fmt.Errorf("%s: %w", s.name, err)
	}
	key := s.z.Where() + "\x00" + full
	processHolds.Lock()
	defer processHolds.Unlock()
	if processHolds.n[key] > 0 {
		processHolds.n[key]++
		return nil
	}
	if processHolds.unreleased[key] {
		// The hold whose release failed is still there.
		delete(processHolds.unreleased, key)
		processHolds.n[key] = 1
		return nil
	}
	if err := s.z.Hold(ctx, full, tag); err != nil {
		return fmt.Errorf("%s: %w", s.name, err)
	}
	processHolds.n[key] = 1
	return nil
}

// release drops one Tree's hold, releasing the zfs hold after the
// process's last.
func (s *ZFSSource) release(full string) error {
	tag, err := ProcessHoldTag()
	if err != nil {
		return fmt.Errorf("%s: %w", s.name, err)
	}
	key := s.z.Where() + "\x00" + full
	processHolds.Lock()
	defer processHolds.Unlock()
	processHolds.n[key]--
	if processHolds.n[key] > 0 {
		return nil
	}
	delete(processHolds.n, key)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := s.z.Release(ctx, full, tag); err != nil {
		processHolds.unreleased[key] = true
		s.addCleanup(func(ctx context.Context) error {
			processHolds.Lock()
			defer processHolds.Unlock()
			if !processHolds.unreleased[key] {
				return nil // held again since: the next release is the one
			}
			if err := s.z.Release(ctx, full, tag); err != nil {
				return err
			}
			delete(processHolds.unreleased, key)
			return nil
		})
		return fmt.Errorf("%s: %w (retried later)", s.name, err)
	}
	return nil
}

func (s *ZFSSource) addCleanup(f func(context.Context) error) {
	s.cleanupMu.Lock()
	s.cleanups = append(s.cleanups, f)
	s.cleanupMu.Unlock()
}

// retryCleanups retries the clean-ups that failed; those that fail again
// stay for the next time.
func (s *ZFSSource) retryCleanups(ctx context.Context) {
	s.cleanupMu.Lock()
	todo := s.cleanups
	s.cleanups = nil
	s.cleanupMu.Unlock()
	for _, f := range todo {
		if err := f(ctx); err != nil {
			s.log.Debug("clean-up failed again", "source", s.name, "err", err)
			s.addCleanup(f)
			continue
		}
		s.log.Info("cleaned up after an earlier failure", "source", s.name)
	}
}

// Close ends the sftp session, if any. Trees still open keep their clones
// until they are closed.
func (s *ZFSSource) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	s.retryCleanups(ctx)
	cancel()
	s.mu.Lock()
	conn := s.conn
	s.conn, s.closed = nil, true
	s.mu.Unlock()
	if conn != nil {
		conn.close()
	}
	return nil
}

// sftpClient returns the source's sftp session, starting one if there is
// none or the last one died (the replica went away and came back).
func (s *ZFSSource) sftpClient(ctx context.Context, r *runner.SSH) (*sftp.Client, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("source closed")
	}
	if s.conn != nil && s.conn.alive() {
		return s.conn.client, nil
	}
	if s.conn != nil {
		s.conn.close()
		s.conn = nil
	}
	c, err := dialSFTP(ctx, r, s.log)
	if err != nil {
		return nil, err
	}
	s.conn = c
	return c.client, nil
}

// zfsTree is an open snapshot of a ZFS source.
type zfsTree struct {
	*dirTree
	src      *ZFSSource
	snapshot string
	view     *zfs.SnapshotView

	closeOnce sync.Once
	closeErr  error
}

// busyRetries is how often Close tries again to destroy a clone that is
// still busy: zfs-fuse may report busy for a moment after the last file
// in it was closed.
const busyRetries = 10

func (t *zfsTree) Close() error {
	t.closeOnce.Do(func() {
		var errs []error
		if t.dirTree != nil {
			t.dirTree.closeFiles()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		for i := 0; ; i++ {
			err := t.view.Close(ctx)
			if err == nil {
				break
			}
			if !errors.Is(err, zfs.ErrBusy) || i == busyRetries {
				errs = append(errs, fmt.Errorf("%s: %s: %w (retried later)", t.src.name, t.snapshot, err))
				t.src.addCleanup(t.view.Close)
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err := t.src.release(t.snapshot); err != nil {
			errs = append(errs, err)
		}
		t.closeErr = errors.Join(errs...)
		if t.closeErr != nil {
			t.src.log.Warn("closing snapshot", "err", t.closeErr)
		}
	})
	return t.closeErr
}

// OnThisHost reports whether the source's pool is on this host (not
// reached over ssh): its files are as cheap to read as the local ones.
func (s *ZFSSource) OnThisHost() bool { return s.z.Where() == "local" }
