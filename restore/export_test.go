package restore

import "io"

// SetSeedFileHook puts h between the seeders and every seed file opened
// from now on, until the returned function is called.
func SetSeedFileHook(h func(io.ReaderAt) io.ReaderAt) (restore func()) {
	seedFileHook = h
	return func() { seedFileHook = nil }
}
