// Package safefile opens and writes the files vmhistory writes as root —
// restore partials and journals, the backup lock and state, the metrics
// textfile, the kopia repository config — so that a name planted where one
// of them goes can never redirect the write: the last path component is
// opened with O_NOFOLLOW (a symbolic link is refused, not followed), and
// anything that is not a regular file (a device, a fifo, a directory, a
// socket) is refused before a byte is written to it. Directories above the
// last component are followed: those are the admin's choice (state_dir, a
// restore's DEST may be symbolic links to directories).
package safefile

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// ErrNotRegular is matched (errors.Is) by every refusal of a path that is
// not a regular file; the error itself names the path and what it is.
var ErrNotRegular = errors.New("not a regular file")

// NotRegularError says which path was refused and what it is.
type NotRegularError struct {
	Path string
	What string // "a symbolic link", "a named pipe (fifo)", ...
	// Links is set instead of What for a regular file with more than one
	// hard link: writing it would change the other names too.
	Links uint64
}

func (e *NotRegularError) Error() string {
	if e.Links > 1 {
		return fmt.Sprintf("refusing %s: it has %d hard links (vmhistory writes only files of its own, with one name)", e.Path, e.Links)
	}
	return fmt.Sprintf("refusing %s: it is %s, not a regular file (vmhistory never writes through one); remove it if it is not needed", e.Path, e.What)
}

func (e *NotRegularError) Is(target error) bool { return target == ErrNotRegular }

// Describe names the type of a file mode for messages: "a symbolic
// link", "a named pipe (fifo)", "a regular file", ...
func Describe(mode fs.FileMode) string {
	if mode.IsRegular() {
		return "a regular file"
	}
	return describeUnix(uint32(unixType(mode)))
}

func unixType(mode fs.FileMode) uint32 {
	switch t := mode.Type(); {
	case t&fs.ModeSymlink != 0:
		return unix.S_IFLNK
	case t&fs.ModeDir != 0:
		return unix.S_IFDIR
	case t&fs.ModeNamedPipe != 0:
		return unix.S_IFIFO
	case t&fs.ModeSocket != 0:
		return unix.S_IFSOCK
	case t&fs.ModeCharDevice != 0:
		return unix.S_IFCHR
	case t&fs.ModeDevice != 0:
		return unix.S_IFBLK
	}
	return 0
}

// describeUnix names a file type for messages.
func describeUnix(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFLNK:
		return "a symbolic link"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFIFO:
		return "a named pipe (fifo)"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	}
	return "a special file"
}

// CheckRegular returns nil when nothing exists at path or a regular file
// with one link does, and a *NotRegularError otherwise. It does not
// follow a symbolic link at path. It is a check ahead of time, for a
// clear error before anything is touched; OpenFile checks again on the
// file it opened.
func CheckRegular(path string) error {
	var st unix.Stat_t
	err := unix.Lstat(path, &st)
	switch {
	case errors.Is(err, unix.ENOENT):
		return nil
	case err != nil:
		return &fs.PathError{Op: "lstat", Path: path, Err: err}
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return &NotRegularError{Path: path, What: describeUnix(st.Mode)}
	case st.Nlink > 1:
		return &NotRegularError{Path: path, Links: uint64(st.Nlink)}
	}
	return nil
}

// OpenFile is os.OpenFile for a file vmhistory writes: the last component
// of path is never followed if it is a symbolic link, and the file opened
// must be a regular file with a single link, else a *NotRegularError
// (errors.Is ErrNotRegular) naming path is returned and nothing was
// written. O_CLOEXEC is always set. O_TRUNC is applied only after the
// checks, so a refused file is never truncated; opening never blocks on a
// fifo (O_NONBLOCK, cleared on the returned file).
func OpenFile(path string, flag int, perm fs.FileMode) (*os.File, error) {
	if err := CheckRegular(path); err != nil {
		return nil, err
	}
	trunc := flag&os.O_TRUNC != 0
	flag &^= os.O_TRUNC
	fd, err := unix.Open(path, flag|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, uint32(perm.Perm()))
	if err != nil {
		switch {
		case errors.Is(err, unix.ELOOP):
			return nil, &NotRegularError{Path: path, What: "a symbolic link"}
		case errors.Is(err, unix.EISDIR):
			return nil, &NotRegularError{Path: path, What: "a directory"}
		case errors.Is(err, unix.ENXIO):
			// A fifo with no reader opened write-only, or a device
			// without its driver.
			return nil, &NotRegularError{Path: path, What: "a special file"}
		}
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, &fs.PathError{Op: "fstat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, &NotRegularError{Path: path, What: describeUnix(st.Mode)}
	}
	if st.Nlink > 1 {
		unix.Close(fd)
		return nil, &NotRegularError{Path: path, Links: uint64(st.Nlink)}
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, &fs.PathError{Op: "fcntl", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	if trunc {
		if err := f.Truncate(0); err != nil {
			f.Close()
			return nil, err
		}
	}
	return f, nil
}

// ReadFile reads a file vmhistory wrote itself (its state, its journal),
// refusing a symbolic link or special file at path as OpenFile does.
func ReadFile(path string) ([]byte, error) {
	f, err := OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}

// WriteFileAtomic replaces path with data: written to a new temporary
// file in the same directory (created O_EXCL|O_NOFOLLOW, so nothing
// planted there can be reused), given perm, fsync'd, renamed over path,
// and the directory fsync'd, so a crash leaves the old content or the
// new, never half of one. An existing path that is not a regular file (a
// symbolic link, a device, a directory) is refused; the rename never
// writes through a symbolic link in any case, it replaces the name.
func WriteFileAtomic(path string, data []byte, perm fs.FileMode) error {
	if err := CheckRegular(path); err != nil {
		return err
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, f, err := createTemp(dir, "."+base+".tmp-", perm)
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	// The umask may have narrowed perm at creation.
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	return SyncDir(dir)
}

// createTemp creates a new file named prefix+random in dir, exclusively.
func createTemp(dir, prefix string, perm fs.FileMode) (string, *os.File, error) {
	for range 100 {
		var rnd [8]byte
		if _, err := rand.Read(rnd[:]); err != nil {
			return "", nil, err
		}
		name := filepath.Join(dir, prefix+hex.EncodeToString(rnd[:]))
		fd, err := unix.Open(name, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, uint32(perm.Perm()))
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return "", nil, &fs.PathError{Op: "create", Path: name, Err: err}
		}
		return name, os.NewFile(uintptr(fd), name), nil
	}
	return "", nil, fmt.Errorf("create a temporary file in %s: too many names taken", dir)
}

// SyncDir makes a rename or removal in dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// SharedDir reports whether dir (followed, if a symbolic link) can be
// written by users other than its owner and root: group or other write
// permission. Such a directory lets them plant names where vmhistory is
// about to write; OpenFile refuses what they plant, but the admin should
// know.
func SharedDir(dir string) (bool, fs.FileMode, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return false, 0, err
	}
	return fi.Mode().Perm()&0o022 != 0, fi.Mode(), nil
}
