package prefetch_test

import (
	"bytes"
	"testing"

	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
)

// TestStreamingReadAtStartsWholeWindow: with SetStreaming, the first
// ReadAt puts the whole window in flight wherever it starts (a restore
// that reads its file in order, or resumes it), where without it a read
// past the start (a random one) fetches just its own chunks.
func TestStreamingReadAtStartsWholeWindow(t *testing.T) {
	f := getFixture(t)
	rep, _ := f.tr.open(t)
	const window = 8
	for _, streaming := range []bool{false, true} {
		r := openReader(t, rep, f.oids[fixed128K], prefetch.Options{Window: window, GroupBytes: 1 << 20})
		r.SetStreaming(streaming)
		buf := make([]byte, 1<<20)
		const off = 3 << 20
		if _, err := r.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, f.data[off:off+len(buf)]) {
			t.Fatal("the MiB read differs")
		}
		fetches := r.Stats().Fetches
		t.Logf("streaming %v: %d fetches of 1 MiB after one read of 1 MiB", streaming, fetches)
		if streaming && fetches < window {
			t.Errorf("streaming: %d fetches after the first read, want the whole window of %d", fetches, window)
		}
		if !streaming && fetches >= window {
			t.Errorf("not streaming: %d fetches after one read at %d, want fewer than the window of %d", fetches, off, window)
		}
	}
}
