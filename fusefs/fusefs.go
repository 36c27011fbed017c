// Package fusefs shows restore's timeline as a read-only FUSE filesystem
// (github.com/hanwen/go-fuse/v2): one directory per snapshot, each the
// snapshot's tree, every file read from the fastest source that holds it
// with failover mid-read, or, for a local snapshot's file, by the kernel
// itself with FUSE passthrough (passthrough.go). It knows nothing of zfs
// or kopia: it asks a restore.Timeline for entries and restore for trees
// and readers (and restore.LocalFile for a plain file of this host).
//
// Layout. With one dataset in the timeline:
//
//	MOUNT/2023-03-04_05:00:01/images/disk.qcow2
//	MOUNT/latest -> 2023-03-06_05:00:01
//
// With several datasets, one more level per dataset: the dataset's path,
// one directory per component (DATA/libvirt → MOUNT/DATA/libvirt/), holding
// its snapshots and its own latest link. ZFS snapshot names hold no '/',
// so a snapshot is always a leaf of the dataset level; should a child
// dataset's component and a snapshot of its parent share a name, the
// dataset directory wins (and a warning is logged).
//
// Every snapshot directory, file and directory of a snapshot carries the
// extended attributes user.vmhistory.sources (the sources holding the
// snapshot, fastest first, comma separated) and user.vmhistory.source (the
// source serving an open file, else the first).
package fusefs

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/restore"
)

// Extended attribute names.
const (
	XattrSources = "user.vmhistory.sources"
	XattrSource  = "user.vmhistory.source"
	// XattrSnapshot names the snapshot a file or directory is of,
	// "DATASET@NAME#GUID": how a program that found a path in the mount
	// (vmhistory boot) proves it is the snapshot it resolved.
	XattrSnapshot = "user.vmhistory.snapshot"
)

// LatestName is the symlink to the newest snapshot.
const LatestName = "latest"

// DefaultRefresh is how old the timeline may get before a lookup or
// listing of the top level rebuilds it.
const DefaultRefresh = 30 * time.Second

// DefaultIdleRelease is how long a snapshot that no open file or recent
// lookup uses stays open (its zfs hold, and on zfs-fuse its read-only
// clone) before the mount lets it go; the next lookup opens it again.
const DefaultIdleRelease = time.Minute

// maxIO is the largest read the kernel sends (FUSE's max_pages limit of
// 256 pages on this kernel): MaxWrite, max_read and read-ahead.
const maxIO = 1 << 20

// snapshotTTL is how long the kernel may cache the attributes and entries
// inside a snapshot: a snapshot never changes.
const snapshotTTL = time.Hour

// BuildFunc builds a fresh timeline; the errors name sources that did not
// answer (restore.BuildTimeline's signature, with the sources bound).
type BuildFunc func(ctx context.Context) (*restore.Timeline, []error)

// Options configure a mount.
type Options struct {
	// Refresh is how old the timeline may get before a lookup or listing
	// of the top level rebuilds it; 0 means DefaultRefresh.
	Refresh time.Duration
	// AllowOther lets other users than root use the mount (the kernel
	// then checks the snapshot's modes: default_permissions).
	AllowOther bool
	// ReadAllUIDs (with AllowOther) may read every file and enter every
	// directory whatever its mode: QEMU's user, for vmhistory boot. The
	// mount then checks everyone else's access itself (see access.go).
	// Their opens never get FUSE passthrough: a VM's disk must fail over
	// from a local read error like any other read.
	ReadAllUIDs []uint32
	// Logger receives warnings (a source failing, a refresh failing);
	// nil means slog.Default().
	Logger *slog.Logger
	// Debug logs every FUSE request.
	Debug bool
	// NoPassthrough serves every file through this process, also those
	// of local snapshots, which are otherwise handed to the kernel with
	// FUSE passthrough where it takes them (see passthrough.go).
	NoPassthrough bool
	// NonEmpty mounts over a directory that holds files (hiding them
	// while mounted); without it such a directory is refused.
	NonEmpty bool
	// IdleRelease is how long a snapshot nothing uses stays open; 0 means
	// DefaultIdleRelease, a negative value keeps every snapshot open until
	// the unmount (and so out of prune's reach).
	IdleRelease time.Duration
}

// Mount is a mounted timeline.
type Mount struct {
	Dir    string
	server *fuse.Server
	fsys   *filesystem
	conn   uint32 // the FUSE connection's number (the mount's minor device)
	once   sync.Once
	err    error

	unmountOnce sync.Once
	unmountErr  error
}

// filesystem is the state every node shares.
type filesystem struct {
	build   BuildFunc
	refresh time.Duration
	log     *slog.Logger
	trees   *restore.TreeCache
	perms   permChecker
	passthroughState

	mu      sync.Mutex
	tl      *restore.Timeline
	builtAt time.Time

	warned sync.Map // keys of the warnings logged once

	openMu sync.Mutex
	open   map[*treeNode]int // open handles per file
}

// warnOnce logs a warning the first time its key is seen: a lasting
// condition of the timeline, met on every listing, is worth one line.
func (f *filesystem) warnOnce(key, msg string, args ...any) {
	if _, seen := f.warned.LoadOrStore(key, true); !seen {
		f.log.Warn(msg, args...)
	}
}

// MountTimeline builds the timeline and mounts it read-only on dir, which must
// exist. The filesystem serves requests until Unmount (or an external
// umount, which Wait notices).
func MountTimeline(ctx context.Context, dir string, build BuildFunc, opts Options) (*Mount, error) {
	if opts.Refresh <= 0 {
		opts.Refresh = DefaultRefresh
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := CheckMountpoint(dir, opts.NonEmpty); err != nil {
		return nil, err
	}
	fsys := &filesystem{build: build, refresh: opts.Refresh, log: opts.Logger, trees: restore.NewIdleTreeCache(idleRelease(opts.IdleRelease))}
	fsys.passthrough = !opts.NoPassthrough
	tl, errs := build(ctx)
	for _, e := range errs {
		opts.Logger.Warn("snapshot source did not answer", "err", e)
	}
	if tl == nil {
		tl = &restore.Timeline{}
	}
	fsys.tl, fsys.builtAt = tl, time.Now()

	if len(opts.ReadAllUIDs) > 0 && !opts.AllowOther {
		fsys.trees.Close()
		return nil, errors.New("mount: users that read every file need AllowOther")
	}
	mountOpts := []string{"ro"}
	switch {
	case len(opts.ReadAllUIDs) > 0:
		fsys.perms = permChecker{on: true, readAll: map[uint32]bool{}}
		for _, uid := range opts.ReadAllUIDs {
			fsys.perms.readAll[uid] = true
		}
	case opts.AllowOther:
		mountOpts = append(mountOpts, "default_permissions")
	}
	negative := time.Duration(0)
	fopts := &fs.Options{
		MountOptions: fuse.MountOptions{
			AllowOther:   opts.AllowOther,
			Options:      mountOpts,
			MaxWrite:     maxIO,
			MaxReadAhead: maxIO,
			FsName:       fsName(),
			Name:         "vmhistory",
			Debug:        opts.Debug,
			// Replies are byte slices; splicing them gains nothing and
			// a 1 MiB read does not fit a default pipe.
			DisableSplice: true,
			// Async reads (SyncRead false): the kernel may have several
			// reads of one file in flight, which FailoverFile serves
			// concurrently.
		},
		NegativeTimeout: &negative,
		// Entries and attributes are given per node (see setTTL).
		UID: 0, GID: 0,
	}
	root := &dsNode{fsys: fsys}
	// fs.Mount, with the raw filesystem wrapped to see which opens got
	// passthrough.
	server, err := fuse.NewServer(&rawFS{RawFileSystem: fs.NewNodeFS(root, fopts), fsys: fsys}, dir, &fopts.MountOptions)
	if err != nil {
		fsys.trees.Close()
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	go server.Serve()
	if err := server.WaitMount(); err != nil {
		fsys.trees.Close()
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	m := &Mount{Dir: dir, server: server, fsys: fsys}
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err == nil {
		m.conn = unix.Minor(st.Dev)
		raiseReadAhead(st.Dev, opts.Logger)
	}
	return m, nil
}

// raiseReadAhead lifts the mount's read-ahead to maxIO: FUSE's init
// reply can only lower the kernel's default (128 KiB), the bdi's
// read_ahead_kb can raise it. Best effort.
func idleRelease(d time.Duration) time.Duration {
	switch {
	case d == 0:
		return DefaultIdleRelease
	case d < 0:
		return 0
	}
	return d
}

func raiseReadAhead(dev uint64, log *slog.Logger) {
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(dev), unix.Minor(dev))
	if err := os.WriteFile(p, []byte(fmt.Sprint(maxIO>>10)), 0o644); err != nil {
		log.Debug("cannot raise read-ahead", "path", p, "err", err)
	}
}

// CheckMountpoint refuses a directory a mount cannot go on, each with a
// one-line error saying what to do: a missing dir or one that is not a
// directory; a stale FUSE mount (a mount whose server died: "transport
// endpoint is not connected", a *StaleMountError); a live mount, of
// vmhistory (naming its process) or of anything else (a *MountedError),
// which a second mount would stack on and hide; and, unless nonEmpty, a
// directory holding files, which the mount would hide.
func CheckMountpoint(dir string, nonEmpty bool) error {
	st, err := os.Stat(dir)
	if err == nil {
		// stat may be answered from the kernel's attribute cache after
		// the server died; statfs always asks the filesystem.
		var sfs unix.Statfs_t
		if serr := unix.Statfs(dir, &sfs); errors.Is(serr, syscall.ENOTCONN) {
			err = serr
		}
	}
	switch {
	case errors.Is(err, syscall.ENOTCONN):
		return &StaleMountError{Dir: dir}
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("mountpoint %s does not exist; create it first: mkdir -p %s", dir, dir)
	case errors.Is(err, syscall.ENOTDIR):
		return fmt.Errorf("mountpoint %s is not a directory (a component of the path is a file)", dir)
	case err != nil:
		return fmt.Errorf("mountpoint %s: %w", dir, err)
	case !st.IsDir():
		return fmt.Errorf("mountpoint %s is not a directory", dir)
	}
	if m, err := mountAt(dir); err != nil {
		return err
	} else if m != nil {
		return m
	}
	if nonEmpty {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("mountpoint %s: %w", dir, err)
	}
	names, _ := d.Readdirnames(3)
	d.Close()
	if len(names) > 0 {
		slices.Sort(names)
		list := strings.Join(names, ", ")
		if len(names) == 3 {
			list += ", ..."
		}
		return fmt.Errorf("mountpoint %s is not empty (it holds %s): the mount would hide its files; use an empty directory, or pass --nonempty", dir, list)
	}
	return nil
}

// MountedError is a directory that is a live mount already.
type MountedError struct {
	Dir    string
	FSType string // e.g. "fuse.vmhistory", "tmpfs"
	Source string // the mount's source, e.g. "vmhistory[4711]"
	PID    int    // the vmhistory process serving it, when it is one
	// AllowOther: the mount lets users other than its owner in;
	// DefaultPermissions: the kernel checks the files' modes (else the
	// mount does: it lets some users read everything, see ReadAllUIDs).
	AllowOther, DefaultPermissions bool
}

// Running returns the vmhistory mount at dir, nil when dir is no mount
// point or another filesystem's.
func Running(dir string) (*MountedError, error) {
	m, err := mountAt(dir)
	if err != nil || m == nil || m.PID == 0 {
		return nil, err
	}
	return m, nil
}

func (e *MountedError) Error() string {
	if e.PID > 0 {
		return fmt.Sprintf("%s is already mounted by vmhistory (process %d); stop that process to unmount it, or choose another directory", e.Dir, e.PID)
	}
	return fmt.Sprintf("%s is already a mount point (%s from %s); unmount it first, or choose another directory", e.Dir, e.FSType, e.Source)
}

// fsName is the mount's source, as mount(8) and findmnt show it: it names
// the process serving the mount, so that a second mount on the same
// directory can say which process is there.
func fsName() string { return fmt.Sprintf("vmhistory[%d]", os.Getpid()) }

// mountAt returns the mount whose mount point is dir (its symbolic links
// resolved), from /proc/self/mountinfo; nil when dir is no mount point.
func mountAt(dir string) (*MountedError, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if r, err := filepath.EvalSymlinks(abs); err == nil {
		abs = r
	}
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read the mount table: %w", err)
	}
	var found *MountedError
	for _, line := range strings.Split(string(data), "\n") {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 2 || unescapeMountinfo(f[4]) != abs {
			continue
		}
		m := &MountedError{Dir: dir, FSType: unescapeMountinfo(g[0]), Source: unescapeMountinfo(g[1])}
		if len(g) > 2 {
			opts := strings.Split(g[2], ",")
			m.AllowOther = slices.Contains(opts, "allow_other")
			m.DefaultPermissions = slices.Contains(opts, "default_permissions")
		}
		if pid, ok := strings.CutPrefix(m.Source, "vmhistory["); ok && m.FSType == "fuse.vmhistory" {
			m.PID, _ = strconv.Atoi(strings.TrimSuffix(pid, "]"))
		}
		found = m // the last one is on top
	}
	return found, nil
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of
// /proc/self/mountinfo's fields.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// StaleMountError is a mountpoint left behind by a mount whose process
// died.
type StaleMountError struct{ Dir string }

func (e *StaleMountError) Error() string {
	return fmt.Sprintf("%s is a stale mount (transport endpoint is not connected): clear it with "+
		"\"fusermount3 -uz %s\" or \"umount -l %s\", or pass --force", e.Dir, e.Dir, e.Dir)
}

// ClearStaleMount detaches whatever is mounted at dir (lazily), for
// --force.
func ClearStaleMount(dir string) error {
	dir = filepath.Clean(dir)
	if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	return nil
}

// Wait returns once the filesystem is unmounted (by Unmount or by an
// external umount); the trees are closed then too.
func (m *Mount) Wait() error {
	m.server.Wait()
	return m.closeTrees()
}

// Unmount unmounts the filesystem and closes every tree it opened
// (removing the clones the sources made). Later calls return the first
// call's result.
func (m *Mount) Unmount() error {
	m.unmountOnce.Do(func() { m.unmountErr = m.unmount() })
	return m.unmountErr
}

func (m *Mount) unmount() error {
	var err error
	for i := range 20 {
		if err = m.serverUnmount(); err == nil {
			break
		}
		// Busy: a process still uses the mount; try a little longer,
		// then detach it lazily.
		if i == 19 {
			m.fsys.log.Warn("mount busy; detaching lazily", "dir", m.Dir, "err", err)
			if derr := syscall.Unmount(m.Dir, syscall.MNT_DETACH); derr != nil {
				return errors.Join(err, derr)
			}
			m.waitOrAbort()
			return m.closeTrees()
		}
		time.Sleep(100 * time.Millisecond)
	}
	m.server.Wait()
	return errors.Join(err, m.closeTrees())
}

// serverUnmount is the server's Unmount, which unmounts and then waits for
// the FUSE connection to end. The connection outlives the unmount while
// another mount namespace still holds a copy of the mount: libvirt starts
// each QEMU in a mount namespace of its own, copied from the host's, so
// that a VM started while the mount was up keeps it alive in there after
// it is gone here, and the wait would never end. After abortAfter the
// connection is aborted: the mount is gone here, and only those copies,
// which nothing reads any more (boot refuses the unmount while a VM does),
// go with it.
func (m *Mount) serverUnmount() error {
	errc := make(chan error, 1)
	go func() { errc <- m.server.Unmount() }()
	select {
	case err := <-errc:
		return err
	case <-time.After(abortAfter):
	}
	m.fsys.log.Warn("unmounted, but the FUSE connection lives on (a copy of the mount in another mount namespace, such as a QEMU's); aborting it", "dir", m.Dir)
	if err := abortConnection(m.conn); err != nil {
		m.fsys.log.Warn("cannot abort the FUSE connection", "dir", m.Dir, "err", err)
	}
	return <-errc
}

// abortAfter is how long a lazily detached mount may wait for its last
// open files to close before its connection is aborted.
const abortAfter = 10 * time.Second

// waitOrAbort waits for the server of a detached mount to end. A file
// left open, by another process or by this one, keeps it serving; after
// abortAfter the FUSE connection is aborted (the files' reads then fail
// with ENOTCONN), so that unmounting always ends and the process can exit:
// a process exiting with a file open on its own mount would otherwise
// wait for itself forever.
func (m *Mount) waitOrAbort() {
	done := make(chan struct{})
	go func() { m.server.Wait(); close(done) }()
	select {
	case <-done:
		return
	case <-time.After(abortAfter):
	}
	m.fsys.log.Warn("files still open on the detached mount; aborting its FUSE connection", "dir", m.Dir)
	if err := abortConnection(m.conn); err != nil {
		m.fsys.log.Warn("cannot abort the FUSE connection", "dir", m.Dir, "err", err)
		return
	}
	select {
	case <-done:
	case <-time.After(abortAfter):
		m.fsys.log.Warn("the aborted FUSE server did not stop", "dir", m.Dir)
	}
}

// abortConnection aborts FUSE connection conn through the fusectl
// filesystem, mounting it where the system has not.
func abortConnection(conn uint32) error {
	const ctl = "/sys/fs/fuse/connections"
	if conn == 0 {
		return errors.New("connection number unknown")
	}
	abort := fmt.Sprintf("%s/%d/abort", ctl, conn)
	if _, err := os.Stat(abort); errors.Is(err, os.ErrNotExist) {
		if err := syscall.Mount("fusectl", ctl, "fusectl", 0, ""); err != nil && !errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("mount fusectl on %s: %w", ctl, err)
		}
	}
	return os.WriteFile(abort, []byte("1"), 0o200)
}

// OpenFiles are the paths (under Dir) of the files open on the mount now,
// each once.
func (m *Mount) OpenFiles() []string {
	m.fsys.openMu.Lock()
	defer m.fsys.openMu.Unlock()
	var paths []string
	dir, err := filepath.Abs(m.Dir)
	if err != nil {
		dir = m.Dir
	}
	for n := range m.fsys.open {
		if p := n.Path(nil); p != "" {
			paths = append(paths, filepath.Join(dir, p))
		}
	}
	slices.Sort(paths)
	return paths
}

// SnapshotDir is the directory, relative to the mount's top, that shows
// e's files in a mount of tl: "NAME" with one dataset, "DATASET/NAME"
// with several. ok is false when the mount hides e (a dataset directory
// or the latest link has its name, or a newer snapshot of the same name).
func SnapshotDir(tl *restore.Timeline, e *restore.Entry) (dir string, ok bool) {
	prefix := ""
	if len(tl.Datasets()) > 1 {
		prefix = e.Dataset
	}
	lv := levelOf(tl, prefix, func(string, string, ...any) {})
	if lv.snaps[e.Name] != e {
		return "", false
	}
	return filepath.Join(prefix, e.Name), true
}

func (m *Mount) closeTrees() error {
	m.once.Do(func() { m.err = m.fsys.trees.Close() })
	return m.err
}

// timeline returns the current timeline, rebuilding it first when it is
// older than the refresh interval. A rebuild where a source failed and
// fewer snapshots showed keeps the previous timeline, so that a source
// offline for a moment does not empty the mount.
func (f *filesystem) timeline(ctx context.Context) *restore.Timeline {
	f.mu.Lock()
	defer f.mu.Unlock()
	if time.Since(f.builtAt) < f.refresh {
		return f.tl
	}
	tl, errs := f.build(ctx)
	f.builtAt = time.Now()
	for _, e := range errs {
		f.log.Warn("snapshot source did not answer", "err", e)
	}
	if tl == nil || (len(errs) > 0 && len(tl.Entries) < len(f.tl.Entries)) {
		return f.tl
	}
	f.tl = tl
	return tl
}

// ino is a stable inode number for a path of the filesystem: the same
// file of the same snapshot keeps its number across timeline refreshes.
func ino(parts ...string) uint64 {
	h := fnv.New64a()
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	n := h.Sum64()
	if n <= 1 {
		n += 2 // 1 is the root
	}
	return n
}

// SnapshotKey is the value of XattrSnapshot for e.
func SnapshotKey(e *restore.Entry) string { return entryKey(e) }

func entryKey(e *restore.Entry) string {
	return fmt.Sprintf("%s@%s#%d", e.Dataset, e.Name, e.GUID)
}

// level is what one directory of the dataset levels holds.
type level struct {
	subdirs  []string                  // dataset components
	snaps    map[string]*restore.Entry // by snapshot name
	order    []string                  // snapshot names, oldest first
	latest   string
	datasets int
}

// levelOf lists the dataset level at prefix ("" is the top).
func levelOf(tl *restore.Timeline, prefix string, warn func(key, msg string, args ...any)) level {
	ds := tl.Datasets()
	lv := level{snaps: map[string]*restore.Entry{}, datasets: len(ds)}
	sub := map[string]bool{}
	if len(ds) > 1 {
		for _, d := range ds {
			rest := d
			if prefix != "" {
				if !strings.HasPrefix(d, prefix+"/") {
					continue
				}
				rest = d[len(prefix)+1:]
			}
			comp, _, _ := strings.Cut(rest, "/")
			if !sub[comp] {
				sub[comp] = true
				lv.subdirs = append(lv.subdirs, comp)
			}
		}
	}
	var dataset string
	switch {
	case len(ds) == 1 && prefix == "":
		dataset = ds[0]
	case len(ds) > 1 && slices.Contains(ds, prefix):
		dataset = prefix
	default:
		return lv
	}
	for _, e := range tl.Entries {
		if e.Dataset != dataset {
			continue
		}
		if sub[e.Name] || e.Name == LatestName {
			warn("hidden:"+e.FullName(), "snapshot hidden by a dataset directory of the same name", "snapshot", e.FullName())
			continue
		}
		if _, dup := lv.snaps[e.Name]; !dup {
			lv.order = append(lv.order, e.Name)
		}
		lv.snaps[e.Name] = e // the newest of equal names wins
		lv.latest = e.Name
	}
	return lv
}

func setEntryTTL(out *fuse.EntryOut, d time.Duration) {
	out.SetEntryTimeout(d)
	out.SetAttrTimeout(d)
}

// dsNode is the top directory or a dataset level below it.
type dsNode struct {
	fs.Inode
	fsys   *filesystem
	prefix string
}

var (
	_ fs.NodeLookuper  = (*dsNode)(nil)
	_ fs.NodeReaddirer = (*dsNode)(nil)
	_ fs.NodeGetattrer = (*dsNode)(nil)
)

func (n *dsNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o555
	out.Nlink = 2
	out.SetTimeout(n.fsys.refresh)
	return 0
}

func (n *dsNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	lv := levelOf(n.fsys.timeline(ctx), n.prefix, n.fsys.warnOnce)
	var list []fuse.DirEntry
	for _, s := range lv.subdirs {
		list = append(list, fuse.DirEntry{Name: s, Mode: syscall.S_IFDIR, Ino: ino("ds", n.join(s))})
	}
	for _, name := range lv.order {
		list = append(list, fuse.DirEntry{Name: name, Mode: syscall.S_IFDIR, Ino: ino(entryKey(lv.snaps[name]), "")})
	}
	if lv.latest != "" {
		list = append(list, fuse.DirEntry{Name: LatestName, Mode: syscall.S_IFLNK, Ino: ino("latest", n.prefix)})
	}
	return fs.NewListDirStream(list), 0
}

func (n *dsNode) join(name string) string {
	if n.prefix == "" {
		return name
	}
	return n.prefix + "/" + name
}

func (n *dsNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	lv := levelOf(n.fsys.timeline(ctx), n.prefix, n.fsys.warnOnce)
	ttl := n.fsys.refresh
	if slices.Contains(lv.subdirs, name) {
		child := &dsNode{fsys: n.fsys, prefix: n.join(name)}
		setEntryTTL(out, ttl)
		out.Mode = syscall.S_IFDIR | 0o555
		return n.NewInode(ctx, child, fs.StableAttr{Mode: syscall.S_IFDIR, Ino: ino("ds", child.prefix)}), 0
	}
	if name == LatestName && lv.latest != "" {
		// The link's target changes with the timeline: a short TTL and
		// a new inode number per target.
		link := &latestNode{target: lv.latest}
		setEntryTTL(out, ttl)
		out.Mode = syscall.S_IFLNK | 0o777
		out.Size = uint64(len(lv.latest))
		return n.NewInode(ctx, link, fs.StableAttr{Mode: syscall.S_IFLNK, Ino: ino("latest", n.prefix, lv.latest)}), 0
	}
	e := lv.snaps[name]
	if e == nil {
		return nil, syscall.ENOENT
	}
	info, err := restore.Stat(ctx, e, "", n.fsys.trees)
	if err != nil {
		n.fsys.log.Warn("cannot read snapshot", "snapshot", e.FullName(), "err", err)
		return nil, syscall.EIO
	}
	child := &treeNode{fsys: n.fsys, entry: e, rel: "", info: info}
	child.fill(&out.Attr)
	setEntryTTL(out, ttl)
	return n.NewInode(ctx, child, fs.StableAttr{Mode: syscall.S_IFDIR, Ino: ino(entryKey(e), "")}), 0
}

// latestNode is the latest symlink.
type latestNode struct {
	fs.Inode
	target string
}

var _ fs.NodeReadlinker = (*latestNode)(nil)

func (n *latestNode) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	return []byte(n.target), 0
}

func (n *latestNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFLNK | 0o777
	out.Size = uint64(len(n.target))
	return 0
}

// treeNode is a file, directory or symlink of one snapshot (rel "" is
// the snapshot's directory itself).
type treeNode struct {
	fs.Inode
	fsys  *filesystem
	entry *restore.Entry
	rel   string
	info  restore.FileInfo

	mu       sync.Mutex
	children map[string]restore.FileInfo // a directory's listing, read once
	order    []string
	handles  []*handle // open files, for user.vmhistory.source
}

var (
	_ fs.NodeLookuper      = (*treeNode)(nil)
	_ fs.NodeReaddirer     = (*treeNode)(nil)
	_ fs.NodeGetattrer     = (*treeNode)(nil)
	_ fs.NodeOpener        = (*treeNode)(nil)
	_ fs.NodeReadlinker    = (*treeNode)(nil)
	_ fs.NodeGetxattrer    = (*treeNode)(nil)
	_ fs.NodeListxattrer   = (*treeNode)(nil)
	_ fs.NodeSetattrer     = (*treeNode)(nil)
	_ fs.NodeCreater       = (*treeNode)(nil)
	_ fs.NodeMkdirer       = (*treeNode)(nil)
	_ fs.NodeUnlinker      = (*treeNode)(nil)
	_ fs.NodeRmdirer       = (*treeNode)(nil)
	_ fs.NodeRenamer       = (*treeNode)(nil)
	_ fs.NodeSymlinker     = (*treeNode)(nil)
	_ fs.NodeLinker        = (*treeNode)(nil)
	_ fs.NodeMknoder       = (*treeNode)(nil)
	_ fs.NodeSetxattrer    = (*treeNode)(nil)
	_ fs.NodeRemovexattrer = (*treeNode)(nil)
)

func (n *treeNode) join(name string) string {
	if n.rel == "" {
		return name
	}
	return n.rel + "/" + name
}

// fill sets attributes from the snapshot's metadata. Ownership is not
// recorded by every source: files show as root's.
func (n *treeNode) fill(a *fuse.Attr) {
	a.Mode = unixMode(n.info.Mode)
	a.Size = uint64(n.info.Size)
	if n.info.Mode&os.ModeSymlink != 0 {
		a.Size = uint64(len(n.info.Target))
	}
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = maxIO
	a.Nlink = 1
	if n.info.Mode.IsDir() {
		a.Nlink = 2
	}
	t := n.info.ModTime
	a.SetTimes(&t, &t, &t)
	a.Ino = ino(entryKey(n.entry), n.rel)
}

func unixMode(m os.FileMode) uint32 {
	mode := uint32(m.Perm())
	switch {
	case m.IsDir():
		mode |= syscall.S_IFDIR
	case m&os.ModeSymlink != 0:
		mode |= syscall.S_IFLNK
	case m&os.ModeNamedPipe != 0:
		mode |= syscall.S_IFIFO
	case m&os.ModeSocket != 0:
		mode |= syscall.S_IFSOCK
	case m&os.ModeCharDevice != 0:
		mode |= syscall.S_IFCHR
	case m&os.ModeDevice != 0:
		mode |= syscall.S_IFBLK
	default:
		mode |= syscall.S_IFREG
	}
	if m&os.ModeSetuid != 0 {
		mode |= syscall.S_ISUID
	}
	if m&os.ModeSetgid != 0 {
		mode |= syscall.S_ISGID
	}
	if m&os.ModeSticky != 0 {
		mode |= syscall.S_ISVTX
	}
	return mode
}

func (n *treeNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fill(&out.Attr)
	out.SetTimeout(snapshotTTL)
	return 0
}

// list reads the directory's listing once (a snapshot never changes):
// directory metadata only, never file data.
func (n *treeNode) list(ctx context.Context) (map[string]restore.FileInfo, []string, syscall.Errno) {
	if !n.info.Mode.IsDir() {
		return nil, nil, syscall.ENOTDIR
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.children != nil {
		return n.children, n.order, 0
	}
	infos, err := restore.ReadDir(ctx, n.entry, n.rel, n.fsys.trees)
	if err != nil {
		n.fsys.log.Warn("cannot list directory", "snapshot", n.entry.FullName(), "path", n.rel, "err", err)
		return nil, nil, toErrno(err)
	}
	children := make(map[string]restore.FileInfo, len(infos))
	order := make([]string, 0, len(infos))
	for _, fi := range infos {
		children[fi.Name] = fi
		order = append(order, fi.Name)
	}
	slices.Sort(order)
	n.children, n.order = children, order
	return children, order, 0
}

func toErrno(err error) syscall.Errno {
	switch {
	case errors.Is(err, os.ErrNotExist):
		return syscall.ENOENT
	case errors.Is(err, restore.ErrNotRegular):
		return syscall.EINVAL
	case errors.Is(err, context.Canceled):
		return syscall.EINTR
	}
	return syscall.EIO
}

func (n *treeNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	if n.info.Mode.IsDir() && !n.fsys.perms.permitted(ctx, n.info.Mode, accessRead) {
		return nil, syscall.EACCES
	}
	children, order, errno := n.list(ctx)
	if errno != 0 {
		return nil, errno
	}
	list := make([]fuse.DirEntry, 0, len(order))
	for _, name := range order {
		list = append(list, fuse.DirEntry{Name: name, Mode: unixMode(children[name].Mode) &^ 0o7777,
			Ino: ino(entryKey(n.entry), n.join(name))})
	}
	return fs.NewListDirStream(list), 0
}

func (n *treeNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if n.info.Mode.IsDir() && !n.fsys.perms.permitted(ctx, n.info.Mode, accessExec) {
		return nil, syscall.EACCES
	}
	children, _, errno := n.list(ctx)
	if errno != 0 {
		return nil, errno
	}
	fi, ok := children[name]
	if !ok {
		return nil, syscall.ENOENT
	}
	child := &treeNode{fsys: n.fsys, entry: n.entry, rel: n.join(name), info: fi}
	child.fill(&out.Attr)
	setEntryTTL(out, snapshotTTL)
	if n.fsys.perms.on && n.info.Mode.Perm()&0o001 == 0 {
		// The kernel walks a cached entry without asking: one another
		// user looked up (QEMU, root) would open this directory to all.
		// Uncached, each walk comes here and is checked above.
		out.SetEntryTimeout(0)
	}
	return n.NewInode(ctx, child, fs.StableAttr{Mode: out.Attr.Mode & syscall.S_IFMT, Ino: out.Attr.Ino}), 0
}

func (n *treeNode) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	if n.info.Mode&os.ModeSymlink == 0 {
		return nil, syscall.EINVAL
	}
	return []byte(n.info.Target), 0
}

// Open opens the file for reading on the fastest source, with failover.
func (n *treeNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EROFS
	}
	if !n.fsys.perms.permitted(ctx, n.info.Mode, accessRead) {
		return nil, 0, syscall.EACCES
	}
	if !n.info.Mode.IsRegular() {
		return nil, 0, syscall.EINVAL
	}
	// The file outlives this request: its context must not end with it.
	f, err := restore.OpenFile(context.WithoutCancel(ctx), n.entry, n.rel, n.fsys.trees)
	if err != nil {
		n.fsys.log.Warn("cannot open file", "snapshot", n.entry.FullName(), "path", n.rel, "err", err)
		return nil, 0, toErrno(err)
	}
	h := &handle{node: n, file: f, viaServer: n.fsys.perms.readsAll(ctx)}
	n.mu.Lock()
	n.handles = append(n.handles, h)
	n.mu.Unlock()
	n.fsys.openMu.Lock()
	if n.fsys.open == nil {
		n.fsys.open = map[*treeNode]int{}
	}
	n.fsys.open[n]++
	n.fsys.openMu.Unlock()
	if fc, ok := ctx.(*fuse.Context); ok {
		n.fsys.opening.Store(fc.Cancel, h) // for rawFS.Open, which sees the reply
	}
	// A snapshot never changes: the page cache stays valid across opens.
	return h, fuse.FOPEN_KEEP_CACHE, 0
}

// sources names the sources holding the node's snapshot now: from the
// current timeline (rebuilt when older than the refresh interval), not
// from the one the node was looked up in, so that the attribute follows
// a replica pruning the snapshot or an upload to kopia. Empty when no
// source holds it any more.
func (n *treeNode) sources(ctx context.Context) string {
	e := n.fsys.current(ctx, n.entry)
	if e == nil {
		return ""
	}
	names := make([]string, 0, len(e.Sources))
	for _, es := range e.Sources {
		names = append(names, es.Source.Name())
	}
	return strings.Join(names, ",")
}

// current returns e's snapshot as the current timeline has it (the same
// dataset, name and guid), or nil when it is gone from every source.
func (f *filesystem) current(ctx context.Context, e *restore.Entry) *restore.Entry {
	tl := f.timeline(ctx)
	for _, c := range tl.Entries {
		if c == e || (c.Dataset == e.Dataset && c.Name == e.Name && c.GUID == e.GUID) {
			return c
		}
	}
	return nil
}

// serving is the source an open handle reads from, else the first that
// holds the snapshot now.
func (n *treeNode) serving(ctx context.Context) string {
	n.mu.Lock()
	hs := slices.Clone(n.handles)
	n.mu.Unlock()
	for _, h := range hs {
		if s := h.file.Serving(); s != "" {
			return s
		}
	}
	if e := n.fsys.current(ctx, n.entry); e != nil && len(e.Sources) > 0 {
		return e.Sources[0].Source.Name()
	}
	return ""
}

func (n *treeNode) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	var val string
	switch attr {
	case XattrSources:
		val = n.sources(ctx)
	case XattrSource:
		val = n.serving(ctx)
	case XattrSnapshot:
		val = entryKey(n.entry)
	default:
		return 0, syscall.ENODATA
	}
	if len(dest) < len(val) {
		return uint32(len(val)), syscall.ERANGE
	}
	return uint32(copy(dest, val)), 0
}

func (n *treeNode) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	val := XattrSources + "\x00" + XattrSource + "\x00" + XattrSnapshot + "\x00"
	if len(dest) < len(val) {
		return uint32(len(val)), syscall.ERANGE
	}
	return uint32(copy(dest, val)), 0
}

// Everything that would change the snapshot fails: it is read-only (the
// mount is "ro" too, so the kernel mostly answers before asking).

func (n *treeNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
}

func (n *treeNode) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EROFS
}

func (n *treeNode) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EROFS
}

func (n *treeNode) Unlink(ctx context.Context, name string) syscall.Errno { return syscall.EROFS }
func (n *treeNode) Rmdir(ctx context.Context, name string) syscall.Errno  { return syscall.EROFS }

func (n *treeNode) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	return syscall.EROFS
}

func (n *treeNode) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EROFS
}

func (n *treeNode) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EROFS
}

func (n *treeNode) Mknod(ctx context.Context, name string, mode uint32, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EROFS
}

func (n *treeNode) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	return syscall.EROFS
}

func (n *treeNode) Removexattr(ctx context.Context, attr string) syscall.Errno { return syscall.EROFS }

// handle is an open file: positional reads on a FailoverFile, which is
// safe for concurrent ReadAt (the kopia source's reader prefetches on
// sequential reads), or, for a local snapshot's file, FUSE passthrough
// (passthrough.go), the FailoverFile then only keeping the snapshot open.
type handle struct {
	node *treeNode
	file *restore.FailoverFile
	// offered: PassthroughFd handed out a backing file; passthrough:
	// the kernel reads this open directly.
	offered, passthrough atomic.Bool
	// viaServer: this open is served by this process whatever its
	// source, for failover (an open by one of ReadAllUIDs: a VM's
	// disk, which must not see a local read error).
	viaServer bool
}

var (
	_ fs.FileReader   = (*handle)(nil)
	_ fs.FileReleaser = (*handle)(nil)
	_ fs.FileWriter   = (*handle)(nil)
)

func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n, err := h.file.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		h.node.fsys.log.Warn("read failed on every source", "file", h.file.Name(), "offset", off, "err", err)
		return nil, syscall.EIO
	}
	h.node.fsys.counters.reads.Add(1)
	h.node.fsys.counters.readBytes.Add(int64(n))
	return fuse.ReadResultData(dest[:n]), 0
}

func (h *handle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	return 0, syscall.EROFS
}

func (h *handle) Release(ctx context.Context) syscall.Errno {
	n := h.node
	n.mu.Lock()
	n.handles = slices.DeleteFunc(n.handles, func(o *handle) bool { return o == h })
	n.mu.Unlock()
	n.fsys.openMu.Lock()
	if n.fsys.open[n]--; n.fsys.open[n] <= 0 {
		delete(n.fsys.open, n)
	}
	n.fsys.openMu.Unlock()
	if err := h.file.Close(); err != nil {
		n.fsys.log.Debug("close", "file", h.file.Name(), "err", err)
	}
	return 0
}
