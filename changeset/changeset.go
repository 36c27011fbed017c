// Package changeset turns a ZFS incremental send stream into the change
// set of a kopia upload (kopiarepo.ChangeSet): per regular file of the new
// snapshot, the byte ranges that changed since the stream's base, found by
// the file's inode number (its ZFS object number) in the stream's records.
//
// The stream's payload is never needed: the changed bytes are read from
// the new snapshot by the upload. A file renamed since the base is found
// by its inode at its base path, and its previous upload is taken from
// there. What the stream cannot describe (a hard link, a reused object
// number, a file replaced by a new one) is marked for
// a full upload of that file, with the reason, and the upload's report
// carries it to the admin.
package changeset

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"syscall"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/zfs"
)

// Input is one night's change: the stream from the base snapshot to the
// new one and the two snapshots' file trees.
type Input struct {
	// Stream is the parsed `zfs send -i base new` (or a -I chain that
	// holds base → new).
	Stream *zfs.SendStream
	// Base and New are the two snapshots; Base.CreateTXG tells a reused
	// object number (a file created after the base) from a changed one.
	Base, New zfs.Snapshot
	// BaseDir and NewDir are the roots of the two snapshots' trees (a
	// .zfs/snapshot directory or a read-only clone's mountpoint). Inode
	// numbers there are ZFS object numbers: a clone keeps its origin's.
	BaseDir, NewDir string
	// Previous is the ID of the kopia snapshot of Base.
	Previous string
}

// Summary counts what the stream said, for the night's report.
type Summary struct {
	// WriteBytes are the stream's DRR_WRITE bytes base → new, what zfs
	// receive rewrites: the yardstick for what the upload reads.
	WriteBytes uint64 `json:"write_bytes"`
	// Files is how many regular files of the new snapshot the stream
	// touches; Full how many of them it cannot describe; Renamed how
	// many of them were at another path in the base.
	Files   int `json:"files"`
	Full    int `json:"full"`
	Renamed int `json:"renamed"`
}

// Build makes the change set. An error means the stream is not the one
// from Base to New, or a tree cannot be walked: the caller uploads in
// full. A file the stream cannot describe is in the set with Full set.
func Build(in Input) (kopiarepo.ChangeSet, Summary, error) {
	var sum Summary
	if in.Base.CreateTXG == 0 {
		return kopiarepo.ChangeSet{}, sum, fmt.Errorf("base snapshot %s: no createtxg", in.Base.FullName())
	}
	subs, err := in.Stream.Between(in.Base.GUID, in.New.GUID)
	if err != nil {
		return kopiarepo.ChangeSet{}, sum, fmt.Errorf("stream %s -> %s: %w", in.Base.FullName(), in.New.FullName(), err)
	}
	for _, s := range subs {
		sum.WriteBytes += s.WriteBytes
	}
	files, err := regularFiles(in.NewDir)
	if err != nil {
		return kopiarepo.ChangeSet{}, sum, err
	}
	cs := kopiarepo.ChangeSet{Previous: in.Previous, BaseDir: in.BaseDir, Files: map[string]kopiarepo.FileChange{}}
	base := &baseFiles{dir: in.BaseDir}
	for _, f := range files {
		steps := make([]zfs.ObjectFacts, len(subs))
		touched := false
		for i, s := range subs {
			steps[i] = s.Object(f.ino)
			touched = touched || mentioned(steps[i])
		}
		if !touched {
			// The object's dnode and blocks are as in the base: so is the
			// content. kopia's own metadata check finds it unchanged, or,
			// where the base held another file at this path, reads it.
			continue
		}
		sum.Files++
		fc := fileChange(in, base, f, steps)
		if fc.Full != "" {
			sum.Full++
		}
		if fc.BasePath != "" {
			sum.Renamed++
		}
		cs.Files[f.rel] = fc
	}
	return cs, sum, nil
}

func mentioned(f zfs.ObjectFacts) bool {
	return f.Record != nil || f.Freed || len(f.Writes)+len(f.Embedded)+len(f.Frees) > 0
}

func fileChange(in Input, base *baseFiles, f regularFile, steps []zfs.ObjectFacts) kopiarepo.FileChange {
	full := func(format string, args ...any) kopiarepo.FileChange {
		return kopiarepo.FileChange{Object: f.ino, NewSize: f.size, Full: fmt.Sprintf(format, args...)}
	}
	if f.links > 1 {
		return full("hard link: %d links to the file", f.links)
	}
	basePath := ""
	var st syscall.Stat_t
	err := syscall.Lstat(filepath.Join(in.BaseDir, filepath.FromSlash(f.rel)), &st)
	switch {
	case err != nil && !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ENOTDIR):
		return full("cannot stat it in %s: %v", in.Base.FullName(), err)
	case err == nil && st.Mode&syscall.S_IFMT != syscall.S_IFREG:
		return full("not a regular file in %s", in.Base.FullName())
	case err != nil || st.Ino != f.ino:
		// Not the same file at this path in the base: renamed from
		// another path (its inode is there, and the stream's record of
		// it says the object was not created anew), or a new file.
		was, ok, werr := base.byInode(f.ino)
		switch {
		case werr != nil:
			return full("cannot list %s: %v", in.Base.FullName(), werr)
		case !ok && err != nil:
			return full("new file: not in %s", in.Base.FullName())
		case !ok:
			return full("replaced: inode %d is new since %s, where the file here was inode %d", f.ino, in.Base.FullName(), st.Ino)
		case was.links > 1:
			return full("renamed from %s, a hard link there (%d links)", was.rel, was.links)
		}
		basePath = was.rel
		st.Size = was.size
	}
	c := zfs.FileChange(uint64(st.Size), in.Base.CreateTXG, steps...)
	if c.Full != "" {
		return full("%s", c.Full)
	}
	if int64(c.NewSize) != f.size {
		return full("size mismatch: the stream says %d bytes, the file has %d", c.NewSize, f.size)
	}
	return kopiarepo.FileChange{
		Object:   f.ino,
		BasePath: basePath,
		OldSize:  int64(c.OldSize),
		NewSize:  int64(c.NewSize),
		Reread:   byteRanges(c.Reread),
		Zeroed:   byteRanges(c.Zeroed),
	}
}

// baseFiles are the base snapshot's regular files by inode, listed when a
// file is first not found at its own path there.
type baseFiles struct {
	dir    string
	listed bool
	err    error
	inodes map[uint64]regularFile
}

func (b *baseFiles) byInode(ino uint64) (regularFile, bool, error) {
	if !b.listed {
		b.listed = true
		files, err := regularFiles(b.dir)
		b.err = err
		b.inodes = make(map[uint64]regularFile, len(files))
		for _, f := range files {
			b.inodes[f.ino] = f
		}
	}
	if b.err != nil {
		return regularFile{}, false, b.err
	}
	f, ok := b.inodes[ino]
	return f, ok, nil
}

func byteRanges(rs []zfs.Range) []kopiarepo.ByteRange {
	out := make([]kopiarepo.ByteRange, len(rs))
	for i, r := range rs {
		out[i] = kopiarepo.ByteRange{Offset: int64(r.Offset), Length: int64(r.Length)}
	}
	return out
}

type regularFile struct {
	rel   string
	ino   uint64
	links uint64
	size  int64
}

// regularFiles lists the regular files under root, by slash-separated
// path, without following symbolic links or leaving root's filesystem.
func regularFiles(root string) ([]regularFile, error) {
	var rootDev uint64
	var out []regularFile
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("walk %s: %w", root, err)
		}
		if !d.Type().IsRegular() && !d.IsDir() {
			return nil
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return fmt.Errorf("walk %s: %w", root, &os.PathError{Op: "lstat", Path: p, Err: err})
		}
		if p == root {
			rootDev = st.Dev
			return nil
		}
		if st.Dev != rootDev {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		out = append(out, regularFile{rel: path.Clean(filepath.ToSlash(rel)), ino: st.Ino, links: uint64(st.Nlink), size: st.Size})
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].rel < out[j].rel })
	return out, err
}
