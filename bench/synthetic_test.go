package bench

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// differingBlocks compares two byte slices 4 KiB block by 4 KiB block,
// independently of the generator's own bookkeeping.
func differingBlocks(a, b []byte) int64 {
	var n int64
	for off := 0; off < len(b); off += BlockSize {
		e := min(off+BlockSize, len(b))
		if e > len(a) || !bytes.Equal(a[off:e], b[off:e]) {
			n++
		}
	}
	return n
}

func TestSyntheticVersions(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	const size = 8<<20 + 1000 // a partial last block too
	s, err := NewSynthetic(path, size, 7)
	if err != nil {
		t.Fatal(err)
	}
	v1, _ := os.ReadFile(path)
	if int64(len(v1)) != size {
		t.Fatalf("version 1 has %d bytes, want %d", len(v1), size)
	}
	// VM-disk-like: zero blocks, and both random and text-like blocks.
	var zero, other int
	for off := 0; off+BlockSize <= len(v1); off += BlockSize {
		if bytes.Count(v1[off:off+BlockSize], []byte{0}) == BlockSize {
			zero++
		} else {
			other++
		}
	}
	if zero == 0 || other < zero {
		t.Errorf("%d zero blocks and %d others", zero, other)
	}
	if !bytes.Contains(v1, []byte("systemd[1]:")) {
		t.Error("no text-like data")
	}

	prev := v1
	for v := 2; v <= 3; v++ {
		blocks, err := s.Next(0.04)
		if err != nil {
			t.Fatal(err)
		}
		cur, _ := os.ReadFile(path)
		if len(cur) != len(prev) {
			t.Fatalf("version %d has %d bytes, want %d", v, len(cur), len(prev))
		}
		want := differingBlocks(prev, cur)
		if blocks != want {
			t.Errorf("version %d: generator counted %d changed blocks, the files differ in %d", v, blocks, want)
		}
		// At least 4%, and no more than one rewrite (64 blocks) beyond.
		min4 := int64(82) // ceil(4% of 2048 whole blocks)
		if blocks < min4 || blocks > min4+64 {
			t.Errorf("version %d: %d blocks changed of %d, want about 4%%", v, blocks, size/BlockSize)
		}
		// The tail that is not a whole block is never rewritten.
		if !bytes.Equal(cur[size/BlockSize*BlockSize:], prev[size/BlockSize*BlockSize:]) {
			t.Errorf("version %d: the partial last block changed", v)
		}
		prev = cur
	}

	// Deterministic: the same seed gives the same bytes, another seed others.
	again := filepath.Join(dir, "again.img")
	if _, err := NewSynthetic(again, size, 7); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(again); !bytes.Equal(b, v1) {
		t.Error("the same seed gave other data")
	}
	other8 := filepath.Join(dir, "other.img")
	if _, err := NewSynthetic(other8, size, 8); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(other8); bytes.Equal(b, v1) {
		t.Error("another seed gave the same data")
	}

	if _, err := s.Next(0); err == nil {
		t.Error("churn 0 accepted")
	}
	if _, err := s.Next(0.6); err == nil {
		t.Error("churn 60% accepted")
	}
	if _, err := NewSynthetic(filepath.Join(dir, "small"), 4096, 1); err == nil {
		t.Error("4 KiB of synthetic data accepted")
	}
}

func TestChangedBytes(t *testing.T) {
	dir := t.TempDir()
	old, new := filepath.Join(dir, "old"), filepath.Join(dir, "new")
	for _, d := range []string{old, new, filepath.Join(new, "sub")} {
		os.MkdirAll(d, 0o755)
	}
	a := bytes.Repeat([]byte("a"), 10*BlockSize)
	os.WriteFile(filepath.Join(old, "a"), a, 0o644)
	os.WriteFile(filepath.Join(old, "gone"), a, 0o644)
	a2 := bytes.Clone(a)
	a2[0], a2[5*BlockSize+7] = 'x', 'y' // two blocks
	a2 = append(a2, 'z')                // and a grown, partial block of 1 byte
	os.WriteFile(filepath.Join(new, "a"), a2, 0o644)
	os.WriteFile(filepath.Join(new, "sub", "fresh"), make([]byte, 3*BlockSize), 0o644)

	n, err := ChangedBytes(old, new)
	if want := int64(2*BlockSize + 1 + 3*BlockSize); err != nil || n != want {
		t.Errorf("directories: %d, %v; want %d", n, err, want)
	}
	n, err = ChangedBytes(filepath.Join(old, "a"), filepath.Join(new, "a"))
	if want := int64(2*BlockSize + 1); err != nil || n != want {
		t.Errorf("files: %d, %v; want %d", n, err, want)
	}
	n, err = ChangedBytes(filepath.Join(old, "a"), filepath.Join(old, "a"))
	if err != nil || n != 0 {
		t.Errorf("a file against itself: %d, %v", n, err)
	}
}
