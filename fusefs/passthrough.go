package fusefs

import (
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vmhistory/vmhistory/restore"
)

// FUSE passthrough (kernel 6.9+, CONFIG_FUSE_PASSTHROUGH, CAP_SYS_ADMIN):
// a file whose serving source is a plain file of this host (a local ZFS
// snapshot under .zfs/snapshot or in a read-only clone) is offered to the
// kernel as the backing file of the open (go-fuse's FilePassthroughFder);
// the kernel then reads it directly and this process sees no READ for
// that open. The handle's FailoverFile keeps the snapshot's tree — and so
// its hold and its clone — open until the handle is released.
//
// The kernel may refuse: registering the backing file fails without
// CAP_SYS_ADMIN, without passthrough support, or when the backing file's
// filesystem is stacked too deep (ELOOP; zfs-fuse is itself FUSE but
// does not use passthrough, so its files sit at depth 0 and a mount of
// depth 1 may use them). go-fuse then stops offering backing files for
// the rest of the mount, and every open is served by positional reads
// with failover, as with Options.NoPassthrough.
//
// Which opens got passthrough is only visible in go-fuse's reply to the
// kernel, so the raw filesystem is wrapped (rawFS) to read the reply's
// FOPEN_PASSTHROUGH flag; the node's Open leaves its handle under the
// request's cancel channel, unique to one request while it runs, for the
// wrapper to find.

// Stats count what a mount served.
type Stats struct {
	// Opens is the files opened; PassthroughOpens those of them the
	// kernel reads directly (FUSE passthrough).
	Opens, PassthroughOpens int64
	// PassthroughRefused is the opens that offered a backing file the
	// kernel did not take.
	PassthroughRefused int64
	// Reads and ReadBytes are the READ requests this process served
	// (none for a passthrough open).
	Reads, ReadBytes int64
}

type counters struct {
	opens, passthroughOpens, passthroughRefused atomic.Int64
	reads, readBytes                            atomic.Int64
}

func (c *counters) stats() Stats {
	return Stats{
		Opens: c.opens.Load(), PassthroughOpens: c.passthroughOpens.Load(),
		PassthroughRefused: c.passthroughRefused.Load(),
		Reads:              c.reads.Load(), ReadBytes: c.readBytes.Load(),
	}
}

// Stats returns what the mount served so far.
func (m *Mount) Stats() Stats { return m.fsys.counters.stats() }

// rawFS is go-fuse's node filesystem with the Open replies observed.
type rawFS struct {
	fuse.RawFileSystem
	fsys *filesystem
}

func (r *rawFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	st := r.RawFileSystem.Open(cancel, in, out)
	v, ok := r.fsys.opening.LoadAndDelete(cancel)
	if !ok || st != fuse.OK {
		return st
	}
	h := v.(*handle)
	r.fsys.counters.opens.Add(1)
	if out.OpenFlags&fuse.FOPEN_PASSTHROUGH != 0 {
		h.passthrough.Store(true)
		r.fsys.counters.passthroughOpens.Add(1)
		r.fsys.log.Debug("file opened with FUSE passthrough", "file", h.file.Name())
	} else if h.offered.Load() {
		r.fsys.counters.passthroughRefused.Add(1)
		r.fsys.refusedOnce.Do(func() {
			r.fsys.log.Warn("the kernel refused FUSE passthrough; local snapshot files are read through this process",
				"file", h.file.Name())
		})
	}
	return st
}

var _ fs.FilePassthroughFder = (*handle)(nil)

// PassthroughFd implements fs.FilePassthroughFder: the serving source's
// plain file, when there is one. go-fuse calls it while answering the
// open, only for the first open of a node that has no backing file yet.
func (h *handle) PassthroughFd() (int, bool) {
	f := h.localFile()
	if f == nil || h.viaServer || !h.node.passthroughAllowed(h) {
		return 0, false
	}
	h.offered.Store(true)
	return int(f.Fd()), true
}

// localFile is the plain file the handle's serving source reads, or nil
// (passthrough off, a kopia or remote source).
func (h *handle) localFile() *os.File {
	if !h.node.fsys.passthrough {
		return nil
	}
	lf, ok := h.file.ServingFile().(restore.LocalFile)
	if !ok {
		return nil
	}
	return lf.OSFile()
}

// passthroughAllowed reports whether h may open in passthrough mode. The
// kernel fails (EIO) a passthrough open of an inode that has an open in
// caching mode, so a node with another handle that is not passthrough
// (a kopia-served open, or one still being answered) gets none.
func (n *treeNode) passthroughAllowed(h *handle) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return !slices.ContainsFunc(n.handles, func(o *handle) bool { return o != h && !o.passthrough.Load() })
}

// passthroughState is the part of filesystem about passthrough.
type passthroughState struct {
	passthrough bool     // offer backing files (Options.NoPassthrough unset)
	opening     sync.Map // request cancel channel -> *handle being opened
	refusedOnce sync.Once
	counters    counters
}
