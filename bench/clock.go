package bench

import (
	"context"
	"io"
	"runtime"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/object"
	"golang.org/x/sys/unix"
)

// readClock times one read of a file as its reader sees it: the CPU this
// process spends, when the first read call is made (the object or file is
// open then), when its first byte comes back, and when the first head
// bytes have come back. One goroutine reads, so it needs no lock.
type readClock struct {
	connect   time.Duration // the fresh connection's, paid before start
	headBytes int64         // 0: no head mark

	start                     time.Time // the object's (or file's) open begins
	cpu0                      time.Duration
	firstRead, firstByte, end time.Time
	headAt                    time.Time
	n                         int64
}

// startClock starts timing a read whose connection took connect. It
// collects the garbage of earlier reads first, so that their collection
// is not charged to this one.
func startClock(connect time.Duration, headBytes int64) *readClock {
	runtime.GC()
	c := &readClock{connect: connect, headBytes: headBytes}
	c.cpu0 = processCPU()
	c.start = time.Now()
	return c
}

// reading marks a read call.
func (c *readClock) reading() {
	if c.firstRead.IsZero() {
		c.firstRead = time.Now()
	}
}

// got counts n bytes handed to the reader.
func (c *readClock) got(n int) {
	if n <= 0 {
		return
	}
	now := time.Now()
	if c.firstByte.IsZero() {
		c.firstByte = now
		c.reading() // a reader that never called (WriteTo's writer): now
	}
	c.n += int64(n)
	if c.headBytes > 0 && c.headAt.IsZero() && c.n >= c.headBytes {
		c.headAt = now
	}
}

// stop ends the read and returns its figures (bytes, requests and
// fetched are the caller's).
func (c *readClock) stop() readResult {
	cpu := processCPU() - c.cpu0
	c.end = time.Now()
	r := readResult{took: c.end.Sub(c.start), cpu: max(cpu, 0)}
	if !c.firstRead.IsZero() {
		r.open = c.connect + c.firstRead.Sub(c.start)
	}
	if !c.firstByte.IsZero() {
		r.firstByte = c.connect + c.firstByte.Sub(c.start)
	}
	// The head's rate is timed from the first read call, the rest's from
	// the head's last byte; a file no longer than the head has no rest.
	if !c.headAt.IsZero() && c.n > c.headBytes {
		r.head = c.headAt.Sub(c.firstRead)
		r.rest = c.end.Sub(c.headAt)
		r.headBytes = c.headBytes
	}
	return r
}

// processCPU is the user and system CPU time this process has used
// (getrusage(RUSAGE_SELF): every thread, the drive model and an in-process
// FUSE server included), or 0 if it cannot be read.
func processCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// clockWriter counts the bytes a WriteTo hands to its writer.
type clockWriter struct {
	w io.Writer
	c *readClock
}

func (w clockWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	w.c.got(n)
	return n, err
}

// clockedRepo is a repository whose OpenObject readers report their read
// calls and bytes to a clock, so that prefetch.CopyKopiaStyle, the
// reference read, is timed without copying its code.
type clockedRepo struct {
	repo.Repository
	c *readClock
}

func (r clockedRepo) OpenObject(ctx context.Context, id object.ID) (object.Reader, error) {
	rd, err := r.Repository.OpenObject(ctx, id)
	if err != nil {
		return nil, err //nolint:wrapcheck // the repository's own error
	}
	return clockedReader{Reader: rd, c: r.c}, nil
}

type clockedReader struct {
	object.Reader
	c *readClock
}

func (r clockedReader) Read(p []byte) (int, error) {
	r.c.reading()
	n, err := r.Reader.Read(p)
	r.c.got(n)
	return n, err
}
