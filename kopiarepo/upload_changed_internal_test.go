package kopiarepo

import (
	"math/rand/v2"
	"reflect"
	"testing"
)

func TestChunkLayout(t *testing.T) {
	r := func(off, n int64) ByteRange { return ByteRange{Offset: off, Length: n} }
	for _, tc := range []struct {
		size, chunk, part int64
		want              []ByteRange
	}{
		{0, 4, -1, []ByteRange{r(0, 0)}},
		{4, 4, -1, []ByteRange{r(0, 4)}},
		{10, 4, -1, []ByteRange{r(0, 4), r(4, 4), r(8, 2)}},
		{10, 4, 10, []ByteRange{r(0, 4), r(4, 4), r(8, 2)}},
		// Parts of 6 cut from their own starts, the remainder last.
		{14, 4, 6, []ByteRange{r(0, 4), r(4, 2), r(6, 4), r(10, 2), r(12, 2)}},
		// An empty last part is one empty chunk.
		{12, 4, 6, []ByteRange{r(0, 4), r(4, 2), r(6, 4), r(10, 2), r(12, 0)}},
	} {
		if got := chunkLayout(tc.size, tc.chunk, tc.part); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("chunkLayout(%d, %d, %d) = %v, want %v", tc.size, tc.chunk, tc.part, got, tc.want)
		}
	}
}

func TestRanges(t *testing.T) {
	r := func(off, n int64) ByteRange { return ByteRange{Offset: off, Length: n} }
	merged := mergeRanges([]ByteRange{r(10, 5), r(0, 3), r(3, 2), r(12, 10), r(30, 0)})
	if want := []ByteRange{r(0, 5), r(10, 12)}; !reflect.DeepEqual(merged, want) {
		t.Errorf("mergeRanges = %v, want %v", merged, want)
	}
	if got, want := subtractRanges([]ByteRange{r(0, 20)}, []ByteRange{r(2, 3), r(10, 20)}), []ByteRange{r(0, 2), r(5, 5)}; !reflect.DeepEqual(got, want) {
		t.Errorf("subtractRanges = %v, want %v", got, want)
	}
	for _, tc := range []struct {
		r                ByteRange
		overlaps, covers bool
	}{
		{r(5, 5), false, false},
		{r(4, 2), true, false},
		{r(0, 5), true, true},
		{r(12, 3), true, true},
		{r(20, 5), true, false},
		{r(22, 0), false, false},
	} {
		if got := overlaps(merged, tc.r); got != tc.overlaps {
			t.Errorf("overlaps(%v) = %v", tc.r, got)
		}
		if got := covers(merged, tc.r); got != tc.covers {
			t.Errorf("covers(%v) = %v", tc.r, got)
		}
	}
	if _, _, err := normalizeRanges(FileChange{Reread: []ByteRange{r(5, 10)}}, 12); err == nil {
		t.Error("a range past the file's end is accepted")
	}
	reread, zeroed, _ := normalizeRanges(FileChange{Reread: []ByteRange{r(4, 4)}, Zeroed: []ByteRange{r(0, 12)}}, 12)
	if !reflect.DeepEqual(reread, []ByteRange{r(4, 4)}) || !reflect.DeepEqual(zeroed, []ByteRange{r(0, 4), r(8, 4)}) {
		t.Errorf("normalizeRanges: reread %v zeroed %v", reread, zeroed)
	}
}

// TestSubtractRangesAgainstBitmap: a minus b, for random merged ranges,
// is the byte-by-byte difference.
func TestSubtractRangesAgainstBitmap(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	const size = 512
	random := func() []ByteRange {
		var rs []ByteRange
		for range rng.IntN(12) {
			off := rng.Int64N(size)
			rs = append(rs, ByteRange{Offset: off, Length: rng.Int64N(size-off) / 4})
		}
		return mergeRanges(rs)
	}
	bitmap := func(rs []ByteRange) (m [size]bool) {
		for _, r := range rs {
			for i := r.Offset; i < r.End(); i++ {
				m[i] = true
			}
		}
		return m
	}
	for range 5000 {
		a, b := random(), random()
		got := subtractRanges(a, b)
		ma, mb, mg := bitmap(a), bitmap(b), bitmap(got)
		for i := range size {
			if mg[i] != (ma[i] && !mb[i]) {
				t.Fatalf("subtractRanges(%v, %v) = %v: byte %d wrong", a, b, got, i)
			}
		}
		if !reflect.DeepEqual(mergeRanges(got), got) && len(got) > 0 {
			t.Fatalf("subtractRanges(%v, %v) = %v: not merged", a, b, got)
		}
	}
}
