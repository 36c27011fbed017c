package restore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sync"
	"syscall"

	"github.com/pkg/sftp"
)

// snapFS is how a directory tree of a snapshot is read: os calls on this
// host, sftp over ssh. Paths are absolute on the host that holds them.
// Lstat and ReadDir do not follow symbolic links; Open is only called on a
// path that Lstat found to be a regular file.
type snapFS interface {
	Lstat(p string) (fs.FileInfo, error)
	ReadDir(p string) ([]fs.FileInfo, error)
	Readlink(p string) (string, error)
	Open(p string) (fileReader, error)
}

type fileReader interface {
	io.ReaderAt
	io.Closer
}

// osFS reads this host's files.
type osFS struct{}

func (osFS) Lstat(p string) (fs.FileInfo, error) { return os.Lstat(p) }
func (osFS) Readlink(p string) (string, error)   { return os.Readlink(p) }
func (osFS) ReadDir(p string) ([]fs.FileInfo, error) {
	ents, err := os.ReadDir(p)
	if err != nil {
		return nil, err
	}
	out := make([]fs.FileInfo, 0, len(ents))
	for _, e := range ents {
		fi, err := e.Info() // an lstat
		if err != nil {
			return nil, err
		}
		out = append(out, fi)
	}
	return out, nil
}
func (osFS) Open(p string) (fileReader, error) {
	// O_NOFOLLOW: a link in the last place is refused, never followed.
	return os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
}

// sftpFS reads the replica's files over sftp.
type sftpFS struct{ c *sftp.Client }

func (s sftpFS) Lstat(p string) (fs.FileInfo, error)     { return s.c.Lstat(p) }
func (s sftpFS) Readlink(p string) (string, error)       { return s.c.ReadLink(p) }
func (s sftpFS) ReadDir(p string) ([]fs.FileInfo, error) { return s.c.ReadDir(p) }
func (s sftpFS) Open(p string) (fileReader, error)       { return s.c.Open(p) }

// dirTree is a Tree over a directory of a snapshot. A snapshot does not
// change, so a directory found free of symbolic links stays so, and is
// remembered.
type dirTree struct {
	fsys  snapFS
	root  string
	label string // for messages: source:snapshot

	mu      sync.Mutex
	checked map[string]bool // directories (relative) known to be real directories
	files   map[*dirFile]bool
	closed  bool
}

func newDirTree(fsys snapFS, root, label string) *dirTree {
	return &dirTree{fsys: fsys, root: root, label: label, checked: map[string]bool{".": true}, files: map[*dirFile]bool{}}
}

// checkDir makes sure every component of the directory rel is a directory,
// not a symbolic link, so that nothing below it can lead out of the
// snapshot.
func (t *dirTree) checkDir(rel string) error {
	t.mu.Lock()
	ok := t.checked[rel]
	t.mu.Unlock()
	if ok {
		return nil
	}
	if parent := path.Dir(rel); parent != rel {
		if err := t.checkDir(parent); err != nil {
			return err
		}
	}
	fi, err := t.fsys.Lstat(joinRel(t.root, rel))
	if err != nil {
		return t.wrap(rel, err)
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		return t.wrap(rel, errSymlinkDir)
	}
	if !fi.IsDir() {
		return t.wrap(rel, errNotDir)
	}
	t.mu.Lock()
	t.checked[rel] = true
	t.mu.Unlock()
	return nil
}

var (
	errSymlinkDir = errors.New("is a symbolic link; links are not followed")
	errNotDir     = errors.New("is not a directory")
)

// ErrNotRegular is matched by OpenFile's error for anything but a regular
// file: a directory, a symbolic link (never followed), a device.
var ErrNotRegular = errors.New("not a regular file")

func (t *dirTree) wrap(rel string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	if st, ok := err.(*sftp.StatusError); ok && st.FxCode() == sftp.ErrSSHFxNoSuchFile {
		err = fs.ErrNotExist
	}
	if errors.Is(err, os.ErrNotExist) {
		err = fs.ErrNotExist
	}
	return &fs.PathError{Op: t.label, Path: rel, Err: err}
}

func (t *dirTree) info(ctx context.Context, rel string, fi fs.FileInfo) FileInfo {
	name := fi.Name()
	if rel == "." {
		name = "."
	}
	info := FileInfo{Name: name, Size: fi.Size(), Mode: fi.Mode(), ModTime: fi.ModTime()}
	if fi.Mode()&fs.ModeSymlink != 0 {
		if target, err := t.fsys.Readlink(joinRel(t.root, rel)); err == nil {
			info.Target = target
		}
	}
	return info
}

func (t *dirTree) Stat(ctx context.Context, rel string) (FileInfo, error) {
	rel, err := CleanPath(rel)
	if err != nil {
		return FileInfo{}, err
	}
	if err := t.checkDir(path.Dir(rel)); err != nil {
		return FileInfo{}, err
	}
	fi, err := t.fsys.Lstat(joinRel(t.root, rel))
	if err != nil {
		return FileInfo{}, t.wrap(rel, err)
	}
	return t.info(ctx, rel, fi), nil
}

func (t *dirTree) ReadDir(ctx context.Context, rel string) ([]FileInfo, error) {
	rel, err := CleanPath(rel)
	if err != nil {
		return nil, err
	}
	if err := t.checkDir(rel); err != nil {
		return nil, err
	}
	fis, err := t.fsys.ReadDir(joinRel(t.root, rel))
	if err != nil {
		return nil, t.wrap(rel, err)
	}
	out := make([]FileInfo, 0, len(fis))
	for _, fi := range fis {
		out = append(out, t.info(ctx, path.Join(rel, fi.Name()), fi))
	}
	return out, nil
}

func (t *dirTree) OpenFile(ctx context.Context, rel string) (File, error) {
	rel, err := CleanPath(rel)
	if err != nil {
		return nil, err
	}
	if err := t.checkDir(path.Dir(rel)); err != nil {
		return nil, err
	}
	full := joinRel(t.root, rel)
	fi, err := t.fsys.Lstat(full)
	if err != nil {
		return nil, t.wrap(rel, err)
	}
	if !fi.Mode().IsRegular() {
		kind := "a " + fi.Mode().Type().String()
		switch {
		case fi.IsDir():
			kind = "a directory"
		case fi.Mode()&fs.ModeSymlink != 0:
			kind = "a symbolic link (not followed)"
		}
		return nil, t.wrap(rel, fmt.Errorf("%w: it is %s", ErrNotRegular, kind))
	}
	r, err := t.fsys.Open(full)
	if err != nil {
		return nil, t.wrap(rel, err)
	}
	f := &dirFile{r: r, size: fi.Size(), tree: t}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		r.Close()
		return nil, t.wrap(rel, fs.ErrClosed)
	}
	t.files[f] = true
	t.mu.Unlock()
	return f, nil
}

// closeFiles closes the files still open, before the tree's clone goes.
func (t *dirTree) closeFiles() {
	t.mu.Lock()
	t.closed = true
	files := t.files
	t.files = map[*dirFile]bool{}
	t.mu.Unlock()
	for f := range files {
		f.r.Close()
	}
}

// Close implements Tree for a dirTree used alone.
func (t *dirTree) Close() error {
	t.closeFiles()
	return nil
}

type dirFile struct {
	r    fileReader
	size int64
	tree *dirTree
	once sync.Once
}

func (f *dirFile) ReadAt(p []byte, off int64) (int, error) { return f.r.ReadAt(p, off) }
func (f *dirFile) Size() int64                             { return f.size }

var _ LocalFile = (*dirFile)(nil)

// OSFile implements LocalFile: the file itself when read with os calls.
func (f *dirFile) OSFile() *os.File {
	osf, _ := f.r.(*os.File)
	return osf
}
func (f *dirFile) Close() error {
	var err error
	f.once.Do(func() {
		f.tree.mu.Lock()
		delete(f.tree.files, f)
		f.tree.mu.Unlock()
		err = f.r.Close()
	})
	return err
}
