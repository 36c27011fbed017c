package restore

import (
	"io"
	"time"
)

// SetSeedFileHook puts h between the seeders and every seed file opened
// from now on, until the returned function is called.
func SetSeedFileHook(h func(io.ReaderAt) io.ReaderAt) (restore func()) {
	seedFileHook = h
	return func() { seedFileHook = nil }
}

// SetSeedWait sets how long a file's first reads wait for its seeds, until
// the returned function is called.
func SetSeedWait(d time.Duration) (restore func()) {
	old := seedWait
	seedWait = d
	return func() { seedWait = old }
}
