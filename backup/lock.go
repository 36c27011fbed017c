package backup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmhistory/vmhistory/safefile"
)

// ErrLocked is returned when another vmhistory backup holds the lock.
var ErrLocked = errors.New("another vmhistory backup is running")

// Lock is an exclusive lock on the state directory, held for a whole run.
// It is a flock(2), so the kernel releases it when its process dies: a lock
// left by a killed run is simply free, and the next run takes it over.
type Lock struct {
	f        *os.File
	path     string
	previous string
}

// AcquireLock takes dir/backup.lock without waiting. When another process
// holds it the error names that process.
func AcquireLock(dir string) (*Lock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	path := filepath.Join(dir, "backup.lock")
	f, err := safefile.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder := readHolder(f)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w (%s holds %s); this run exits without touching anything", ErrLocked, holder, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	previous := readHolder(f)
	if err := f.Truncate(0); err == nil {
		fmt.Fprintf(f, "pid %d started %s\n", os.Getpid(), time.Now().UTC().Format(time.RFC3339))
		f.Sync()
	}
	l := &Lock{f: f, path: path}
	if previous != "unknown process" && !strings.Contains(previous, "pid "+strconv.Itoa(os.Getpid())+" ") {
		// Not an error: the earlier holder is gone (its flock went with it).
		l.previous = previous
	}
	return l, nil
}

// TakenOver names the earlier holder whose lock this run took over, if the
// file still named one (a run that ended without cleaning up).
func (l *Lock) TakenOver() string { return l.previous }

// Release gives the lock up.
func (l *Lock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	l.f.Truncate(0)
	err := l.f.Close()
	l.f = nil
	return err
}

func readHolder(f *os.File) string {
	buf := make([]byte, 200)
	n, _ := f.ReadAt(buf, 0)
	s := strings.TrimSpace(string(buf[:n]))
	if s == "" {
		return "unknown process"
	}
	return s
}
