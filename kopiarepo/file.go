package kopiarepo

import (
	"context"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"time"

	"github.com/kopia/kopia/fs"
	"github.com/kopia/kopia/repo/object"
	"github.com/kopia/kopia/snapshot/snapshotfs"
)

// FileInfo describes a file in a snapshot.
type FileInfo struct {
	// Path is the file's path inside the snapshot, slash-separated.
	Path    string
	Size    int64
	Mode    os.FileMode
	ModTime time.Time
	// ObjectID is the kopia object holding the file's bytes; for a large
	// file an index object whose entries are its chunks.
	ObjectID object.ID
}

// File is a file of a snapshot opened for reading. Reads go through
// kopia's object reader, one chunk at a time; every chunk is verified
// against its content hash.
type File struct {
	io.ReadSeekCloser
	FileInfo
}

// Stat finds a regular file in a snapshot. relPath is relative to the
// snapshot's root ("vm/disk.qcow2"); it may not be absolute nor climb out
// with "..", and symbolic links are not followed.
func (r *Repo) Stat(ctx context.Context, snapshotID, relPath string) (FileInfo, error) {
	e, clean, err := r.lookup(ctx, snapshotID, relPath)
	if err != nil {
		return FileInfo{}, err
	}
	f, ok := e.(fs.File)
	if !ok || !e.Mode().IsRegular() {
		return FileInfo{}, fmt.Errorf("%s in kopia snapshot %s is not a regular file (%s)", clean, snapshotID, e.Mode().Type())
	}
	info := FileInfo{Path: clean, Size: f.Size(), Mode: f.Mode(), ModTime: f.ModTime()}
	if h, ok := e.(object.HasObjectID); ok {
		info.ObjectID = h.ObjectID()
	}
	return info, nil
}

// OpenFile opens a regular file of a snapshot for reading (see Stat for
// relPath). It is the plain kopia reader, the way "kopia restore" and
// "kopia mount" read.
func (r *Repo) OpenFile(ctx context.Context, snapshotID, relPath string) (*File, error) {
	e, clean, err := r.lookup(ctx, snapshotID, relPath)
	if err != nil {
		return nil, err
	}
	f, ok := e.(fs.File)
	if !ok || !e.Mode().IsRegular() {
		return nil, fmt.Errorf("%s in kopia snapshot %s is not a regular file (%s)", clean, snapshotID, e.Mode().Type())
	}
	rd, err := f.Open(ctx)
	if err != nil {
		return nil, fmt.Errorf("open %s in kopia snapshot %s: %w", clean, snapshotID, err)
	}
	info := FileInfo{Path: clean, Size: f.Size(), Mode: f.Mode(), ModTime: f.ModTime()}
	if h, ok := e.(object.HasObjectID); ok {
		info.ObjectID = h.ObjectID()
	}
	return &File{ReadSeekCloser: rd, FileInfo: info}, nil
}

func (r *Repo) lookup(ctx context.Context, snapshotID, relPath string) (e fs.Entry, clean string, err error) {
	err = r.guard(ctx, func(ctx context.Context) error {
		var err error
		e, clean, err = r.lookupUnguarded(ctx, snapshotID, relPath)
		return err
	})
	return e, clean, err
}

func (r *Repo) lookupUnguarded(ctx context.Context, snapshotID, relPath string) (fs.Entry, string, error) {
	clean, err := cleanRelPath(relPath)
	if err != nil {
		return nil, "", err
	}
	m, err := r.loadManifest(ctx, snapshotID)
	if err != nil {
		return nil, "", err
	}
	root, err := snapshotfs.SnapshotRoot(r.rep, m)
	if err != nil {
		return nil, "", fmt.Errorf("kopia snapshot %s: %w", snapshotID, err)
	}
	var parts []string
	if clean != "." {
		parts = strings.Split(clean, "/")
	}
	e, err := snapshotfs.GetNestedEntry(ctx, root, parts)
	if err != nil {
		return nil, "", fmt.Errorf("%s in kopia snapshot %s: %w", clean, snapshotID, err)
	}
	return e, clean, nil
}

// cleanRelPath cleans a path relative to a snapshot's root and refuses one
// that is absolute or leaves the root.
func cleanRelPath(p string) (string, error) {
	if p == "" {
		return "", fmt.Errorf("empty path")
	}
	if path.IsAbs(p) {
		return "", fmt.Errorf("path %q must be relative to the snapshot's root", p)
	}
	clean := path.Clean(p)
	if clean == ".." || strings.HasPrefix(clean, "../") {
		return "", fmt.Errorf("path %q leaves the snapshot", p)
	}
	return clean, nil
}
