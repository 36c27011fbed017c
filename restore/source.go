// Package restore is the read side of vmhistory: one timeline of every
// snapshot that exists anywhere (local ZFS, the replica, kopia), files read
// from the fastest source that holds them with failover mid-read, and the
// copy engine behind "vmhistory restore".
package restore

import (
	"context"
	"io"
	"io/fs"
	"os"
	"time"
)

// Kind orders sources from fastest to slowest: reads try them in this order.
type Kind int

const (
	KindLocal   Kind = iota // ZFS snapshots on this host
	KindReplica             // ZFS snapshots on the replica (local pool or over ssh)
	KindKopia               // kopia snapshots
)

func (k Kind) String() string {
	switch k {
	case KindLocal:
		return "local"
	case KindReplica:
		return "replica"
	case KindKopia:
		return "kopia"
	}
	return "unknown"
}

// SnapshotRef identifies one snapshot across sources. Sources that share a
// GUID hold identical bytes (a ZFS guid survives send/receive; kopia
// snapshots carry it as a tag): that is what makes failover safe. Without a
// GUID (a kopia snapshot uploaded by something else), Dataset+Name match.
type SnapshotRef struct {
	Dataset string    `json:"dataset"`
	Name    string    `json:"name"` // the part after '@'
	GUID    uint64    `json:"guid,string,omitempty"`
	Time    time.Time `json:"time"` // ZFS creation time (kopia: StartTime)
}

// SourceSnapshot is a snapshot as one source holds it.
type SourceSnapshot struct {
	SnapshotRef
	// ID is the source's own name for it: dataset@name for ZFS, the
	// manifest ID for kopia.
	ID string `json:"id"`
	// Size is what the source reports: referenced bytes for ZFS, the
	// total file size for kopia.
	Size int64 `json:"size"`
}

// Source is one place snapshots live.
type Source interface {
	// Name is the source's label in the timeline and in xattrs, e.g.
	// "local", "replica", "kopia".
	Name() string
	Kind() Kind
	// Snapshots lists the snapshots the source holds, of the configured
	// datasets.
	Snapshots(ctx context.Context) ([]SourceSnapshot, error)
	// Open makes one snapshot's files readable. The Tree must be closed:
	// it may hold a clone or a kopia connection.
	Open(ctx context.Context, snap SourceSnapshot) (Tree, error)
}

// FileInfo describes one file or directory of a snapshot.
type FileInfo struct {
	Name    string      `json:"name"`
	Size    int64       `json:"size"`
	Mode    fs.FileMode `json:"mode"`
	ModTime time.Time   `json:"mtime"`
	// Target is a symlink's target, as stored.
	Target string `json:"target,omitempty"`
}

// Tree is one snapshot's files on one source. Paths are slash-separated,
// relative to the snapshot's root, already checked by CleanPath; a Tree
// never follows a symlink (Stat is an lstat).
type Tree interface {
	Stat(ctx context.Context, rel string) (FileInfo, error)
	ReadDir(ctx context.Context, rel string) ([]FileInfo, error)
	OpenFile(ctx context.Context, rel string) (File, error)
	io.Closer
}

// File is an open regular file of a snapshot. ReadAt may be called
// concurrently.
type File interface {
	io.ReaderAt
	io.Closer
	Size() int64
}

// LocalFile is implemented by a File that may be a plain file of this
// host (a ZFS snapshot's file under .zfs/snapshot or in a read-only
// clone), which the kernel can then read without this process, e.g. by
// FUSE passthrough. The file stays valid, and its snapshot held (and its
// clone mounted), until the File is closed.
type LocalFile interface {
	// OSFile returns the open file, or nil when the file is not on this
	// host (read over sftp).
	OSFile() *os.File
}
