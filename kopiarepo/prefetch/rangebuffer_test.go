package prefetch

import (
	"bytes"
	"io"
	"testing"
	"testing/iotest"
)

// TestRangeBufferReadFrom: the bytes land in the buffer's own array when
// they fit, and the buffer grows when the reader has more than it holds,
// whatever sizes the reader hands out.
func TestRangeBufferReadFrom(t *testing.T) {
	data := bytes.Repeat([]byte("vmhistory"), 50000)
	for _, c := range []struct {
		name string
		capa int
		r    func() io.Reader
	}{
		{"exact", len(data), func() io.Reader { return bytes.NewReader(data) }},
		{"exact, one byte at a time", len(data), func() io.Reader { return iotest.OneByteReader(bytes.NewReader(data)) }},
		{"exact, data with EOF", len(data), func() io.Reader { return iotest.DataErrReader(bytes.NewReader(data)) }},
		{"too small", len(data) / 3, func() io.Reader { return iotest.HalfReader(bytes.NewReader(data)) }},
		{"empty buffer", 0, func() io.Reader { return bytes.NewReader(data) }},
	} {
		backing := make([]byte, c.capa)
		b := rangeBuffer{b: backing[:0:c.capa]}
		n, err := b.ReadFrom(c.r())
		if err != nil || n != int64(len(data)) || !bytes.Equal(b.b, data) {
			t.Errorf("%s: read %d, %v; equal %v", c.name, n, err, bytes.Equal(b.b, data))
			continue
		}
		if inPlace := c.capa > 0 && &b.b[0] == &backing[0]; inPlace != (c.capa >= len(data)) {
			t.Errorf("%s: in place %v with a buffer of %d for %d bytes", c.name, inPlace, c.capa, len(data))
		}
	}
	if _, err := (&rangeBuffer{}).ReadFrom(iotest.ErrReader(io.ErrClosedPipe)); err != io.ErrClosedPipe {
		t.Errorf("a failing reader's error: %v", err)
	}
}
