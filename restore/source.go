// Package restore is the read side of vmhistory: one timeline of every
// snapshot that exists anywhere (local ZFS, the replica, kopia), files read
// from the fastest source that holds them with failover mid-read, and the
// copy engine behind "vmhistory restore".
package restore

import (
	"context"
	"encoding/json"
	"fmt"
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
	// Size is the ZFS snapshot's referenced bytes (what zfs list shows as
	// REFER), for every source: a kopia upload carries it as a tag. 0 when
	// unknown (an upload made before vmhistory recorded it).
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

// MarshalJSON writes the mode for people and scripts rather than as Go's
// FileMode number: "type" (file, dir, symlink, ...), "mode" as ls shows it
// (-rw-r--r--) and "perm" in octal (0644, with setuid, setgid and sticky
// as the leading digit).
func (fi FileInfo) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Name    string    `json:"name"`
		Type    string    `json:"type"`
		Mode    string    `json:"mode"`
		Perm    string    `json:"perm"`
		Size    int64     `json:"size"`
		ModTime time.Time `json:"mtime"`
		Target  string    `json:"target,omitempty"`
	}{fi.Name, FileType(fi.Mode), fi.Mode.String(), fmt.Sprintf("%04o", unixPerm(fi.Mode)), fi.Size, fi.ModTime, fi.Target})
}

// FileType names a mode's file type: file, dir, symlink, device,
// chardevice, pipe, socket or other.
func FileType(m fs.FileMode) string {
	switch {
	case m.IsRegular():
		return "file"
	case m.IsDir():
		return "dir"
	case m&fs.ModeSymlink != 0:
		return "symlink"
	case m&fs.ModeCharDevice != 0:
		return "chardevice"
	case m&fs.ModeDevice != 0:
		return "device"
	case m&fs.ModeNamedPipe != 0:
		return "pipe"
	case m&fs.ModeSocket != 0:
		return "socket"
	}
	return "other"
}

// unixPerm is the permission bits with setuid, setgid and sticky in their
// unix places.
func unixPerm(m fs.FileMode) uint32 {
	p := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		p |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		p |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		p |= 0o1000
	}
	return p
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
