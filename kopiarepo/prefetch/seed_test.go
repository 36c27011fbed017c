package prefetch_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/object"

	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
)

const seedChunk = 128 << 10

// churned returns old with n 64 KiB writes of new random bytes at random
// offsets (a night of a VM disk), and which seedChunk-sized chunks of it
// differ from old.
func churned(old []byte, n int, seed uint64) (data []byte, differs []bool) {
	data = bytes.Clone(old)
	rng := rand.New(rand.NewPCG(seed, 7))
	for k := range n {
		off := rng.IntN(len(data) - 64<<10)
		copy(data[off:], randomData(64<<10, byte(100+k)))
	}
	differs = make([]bool, (len(data)+seedChunk-1)/seedChunk)
	for c := range differs {
		a, b := c*seedChunk, min((c+1)*seedChunk, len(data))
		differs[c] = !bytes.Equal(old[a:b], data[a:b])
	}
	return data, differs
}

// countChanged is how many chunks churned changed.
func countChanged(differs []bool) int64 {
	var n int64
	for _, d := range differs {
		if d {
			n++
		}
	}
	return n
}

// funcSeeder proposes what its function returns.
type funcSeeder func(cid content.ID, offset, length int64) []prefetch.Seed

func (f funcSeeder) SeedsFor(cid content.ID, offset, length int64) []prefetch.Seed {
	return f(cid, offset, length)
}

// failingAt fails reads that touch [from, to).
type failingAt struct {
	io.ReaderAt
	from, to int64
}

func (f failingAt) ReadAt(p []byte, off int64) (int, error) {
	if off < f.to && off+int64(len(p)) > f.from {
		return 0, errors.New("injected read error")
	}
	return f.ReaderAt.ReadAt(p, off)
}

// A read seeded from the older version of the file at the same offsets
// asks the store only for the chunks that changed, and is byte-identical.
func TestSeededReadFetchesOnlyWhatChanged(t *testing.T) {
	old := randomData(16<<20, 31)
	data, differs := churned(old, 12, 1)
	changed := countChanged(differs)
	tr := newTestRepo(t)
	oid := tr.write(t, data, fixed128K, "")
	rep, model := tr.open(t)
	oldFile := bytes.NewReader(old)
	r := openReader(t, rep, oid, prefetch.Options{Window: 8, Seeds: funcSeeder(func(_ content.ID, off, _ int64) []prefetch.Seed {
		return []prefetch.Seed{{Origin: "night 1", File: oldFile, Offset: off}}
	})})
	model.Reset()
	var out bytes.Buffer
	if _, err := r.WriteTo(&out); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), data) {
		t.Fatal("seeded read differs from the file")
	}
	rs, ms := r.Stats(), model.Stats()
	t.Logf("%d chunks, %d changed: seeded %d (%d bytes), %d requests, %d bytes fetched", rs.Chunks, changed, rs.Seeds.SeededChunks, rs.Seeds.SeededBytes, rs.Requests, ms.BytesFetched)
	if want := int64(rs.Chunks) - changed; rs.Seeds.SeededChunks != want || rs.Seeds.SeedBytesByOrigin["night 1"] != want*seedChunk {
		t.Errorf("seeded %d chunks (%v by origin), want the %d unchanged", rs.Seeds.SeededChunks, rs.Seeds.SeedBytesByOrigin, want)
	}
	if rs.Seeds.SeedMismatches != changed {
		t.Errorf("%d mismatches, want one per changed chunk (%d)", rs.Seeds.SeedMismatches, changed)
	}
	if limit := changed*seedChunk + rs.Requests*prefetch.DefaultMaxGap; ms.BytesFetched > limit || ms.BytesFetched < changed*seedChunk {
		t.Errorf("fetched %d bytes from the store; the changed chunks are %d bytes (limit %d)", ms.BytesFetched, changed*seedChunk, limit)
	}
}

// Seeds that lie or fail cost only their own chunks, which come from the
// store; a wrong first candidate gives way to the next.
func TestSeedMismatchesAndReadErrorsFallBackToTheStore(t *testing.T) {
	data := randomData(8<<20, 32)
	tr := newTestRepo(t)
	oid := tr.write(t, data, fixed128K, "")
	rep, model := tr.open(t)

	bad := bytes.Clone(data)
	for _, c := range []int{3, 17, 40} { // wrong bytes in three chunks
		bad[c*seedChunk+1000] ^= 0xff
	}
	seed := failingAt{ReaderAt: bytes.NewReader(bad), from: 50 * seedChunk, to: 52 * seedChunk} // two unreadable
	good := bytes.NewReader(data)
	r := openReader(t, rep, oid, prefetch.Options{Window: 4, Seeds: funcSeeder(func(_ content.ID, off, _ int64) []prefetch.Seed {
		seeds := []prefetch.Seed{{Origin: "bad", File: seed, Offset: off}}
		if off == 60*seedChunk {
			// a wrong offset first, then the right one
			seeds = []prefetch.Seed{{Origin: "shifted", File: good, Offset: off + 1}, {Origin: "good", File: good, Offset: off}}
		}
		return seeds
	})})
	model.Reset()
	var out bytes.Buffer
	if _, err := r.WriteTo(&out); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), data) {
		t.Fatal("read with bad seeds differs from the file")
	}
	rs, ms := r.Stats(), model.Stats()
	s := rs.Seeds
	if s.SeedMismatches != 4 || s.SeedReadErrors != 2 {
		t.Errorf("%d mismatches and %d read errors, want 4 and 2", s.SeedMismatches, s.SeedReadErrors)
	}
	if want := int64(rs.Chunks - 5); s.SeededChunks != want || s.SeedBytesByOrigin["good"] != seedChunk {
		t.Errorf("seeded %d chunks (%v by origin), want %d with one from \"good\"", s.SeededChunks, s.SeedBytesByOrigin, want)
	}
	if ms.BytesFetched < 5*seedChunk || ms.BytesFetched > 5*seedChunk+rs.Requests*prefetch.DefaultMaxGap {
		t.Errorf("fetched %d bytes for the 5 chunks no seed supplied (%d requests)", ms.BytesFetched, rs.Requests)
	}
}

// A seed whose kopia chunk table is known (its twin) supplies the
// contents it holds wherever they sit in the file being read (here moved
// by a block inserted at the front), and proposes nothing for the others:
// no byte is read or hashed in vain.
func TestSeedMapFindsMovedChunksWithoutMismatches(t *testing.T) {
	old := randomData(8<<20, 33)
	data := append(randomData(seedChunk, 34), old...) // every chunk one place on
	data, _ = churned(data, 4, 2)
	var moved int64 // chunks that are the old file's, one place on
	for c := 1; c*seedChunk < len(data); c++ {
		if bytes.Equal(data[c*seedChunk:(c+1)*seedChunk], old[(c-1)*seedChunk:c*seedChunk]) {
			moved++
		}
	}
	rep, model, oid, table := withTwin(t, old, data)
	if len(table) != len(old)/seedChunk || table[1].Offset != seedChunk || table[1].Length != seedChunk {
		t.Fatalf("chunk table of %d bytes of FIXED-128K: %d chunks, second %+v", len(old), len(table), table[1])
	}
	seeds := prefetch.NewSeedMap("twin", bytes.NewReader(old), table)
	r := openReader(t, rep, oid, prefetch.Options{Window: 4, Seeds: seeds})
	model.Reset()
	var out bytes.Buffer
	if _, err := r.WriteTo(&out); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), data) {
		t.Fatal("read seeded from the twin differs from the file")
	}
	s := r.Stats().Seeds
	t.Logf("%d chunks, %d of them the old file's: seeded %d, %d mismatches", r.Stats().Chunks, moved, s.SeededChunks, s.SeedMismatches)
	if s.SeedMismatches != 0 || s.SeedReadErrors != 0 {
		t.Errorf("%d mismatches, %d read errors: the map proposed contents the twin does not hold", s.SeedMismatches, s.SeedReadErrors)
	}
	if s.SeededChunks != moved || moved < int64(r.Stats().Chunks)-5 {
		t.Errorf("seeded %d chunks, want the %d that are the old file's", s.SeededChunks, moved)
	}
}

// withTwin writes old and data to a new FIXED-128K repository and returns
// it opened through a drive model, data's object and old's chunk table
// (old is data's twin: a seed whose table is known).
func withTwin(t *testing.T, old, data []byte) (repo.Repository, *drivemodel.Model, object.ID, []prefetch.ChunkRef) {
	t.Helper()
	tr := newTestRepo(t)
	oldOID := tr.write(t, old, fixed128K, "")
	oid := tr.write(t, data, fixed128K, "")
	rep, model := tr.open(t)
	table, err := prefetch.ChunkTable(context.Background(), rep, oldOID)
	if err != nil {
		t.Fatal(err)
	}
	return rep, model, oid, table
}

// countingReaderAt counts the bytes read from a seed file.
type countingReaderAt struct {
	io.ReaderAt
	mu    sync.Mutex
	bytes int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	c.bytes += int64(len(p))
	c.mu.Unlock()
	return c.ReaderAt.ReadAt(p, off)
}

// A LearnedMap probes a file kopia does not hold at each chunk's own
// offset and remembers what it found: read again with what it learned, a
// changed chunk is not read from the seed at all. A learned map edited to
// claim that the changed chunks are unchanged costs one mismatch each,
// the bytes stay the file's, and the map is corrected.
func TestLearnedMapRemembersAndSurvivesAWrongMap(t *testing.T) {
	old := randomData(8<<20, 35)
	data, differs := churned(old, 6, 3)
	changed := countChanged(differs)
	tr := newTestRepo(t)
	oid := tr.write(t, data, fixed128K, "")
	rep, _ := tr.open(t)
	table, err := prefetch.ChunkTable(context.Background(), rep, oid)
	if err != nil {
		t.Fatal(err)
	}
	read := func(m *prefetch.LearnedMap) prefetch.SeedStats {
		t.Helper()
		r := openReader(t, rep, oid, prefetch.Options{Window: 4, Seeds: m})
		var out bytes.Buffer
		if _, err := r.WriteTo(&out); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), data) {
			t.Fatal("read seeded from a learned map differs from the file")
		}
		return r.Stats().Seeds
	}
	unchanged := int64(len(differs)) - changed

	file := &countingReaderAt{ReaderAt: bytes.NewReader(old)}
	first := prefetch.NewLearnedMap("old", file, int64(len(old)), nil)
	if s := read(first); s.SeededChunks != unchanged || s.ProbeMisses != changed || s.SeedMismatches != 0 {
		t.Errorf("first read: %+v, want %d seeded and %d probe misses", s, unchanged, changed)
	}
	if !first.Changed() || len(first.Entries()) != len(differs) {
		t.Fatalf("learned %d ranges (changed %v), want all %d", len(first.Entries()), first.Changed(), len(differs))
	}

	file.bytes = 0
	second := prefetch.NewLearnedMap("old", file, int64(len(old)), first.Entries())
	if s := read(second); s.SeededChunks != unchanged || s.ProbeMisses != 0 || s.SeedMismatches != 0 {
		t.Errorf("read with the learned map: %+v, want %d seeded, no misses", s, unchanged)
	}
	if file.bytes != unchanged*seedChunk || second.Changed() {
		t.Errorf("read with the learned map: %d bytes read from the seed (changed %v), want the %d unchanged chunks' only", file.bytes, second.Changed(), unchanged)
	}

	wrong := first.Entries()
	for i := range wrong { // every range "holds" the chunk the file has there
		for _, c := range table {
			if c.Offset == wrong[i].Offset {
				wrong[i].Hash = c.Content.Hash()
			}
		}
	}
	edited := prefetch.NewLearnedMap("old", file, int64(len(old)), wrong)
	if s := read(edited); s.SeededChunks != unchanged || s.SeedMismatches != changed {
		t.Errorf("read with a wrong map: %+v, want %d seeded and %d mismatches", s, unchanged, changed)
	}
	if s := read(prefetch.NewLearnedMap("old", file, int64(len(old)), edited.Entries())); s.SeedMismatches != 0 || s.ProbeMisses != 0 {
		t.Errorf("the corrected map still misses: %+v", s)
	}
}

// gatedReaderAt holds back every read that touches [from, to) until open
// is closed.
type gatedReaderAt struct {
	io.ReaderAt
	from, to int64
	open     chan struct{}
}

func (g gatedReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off < g.to && off+int64(len(p)) > g.from {
		<-g.open
	}
	return g.ReaderAt.ReadAt(p, off)
}

// A seeded sequential read keeps its store fetches going far ahead of
// its window: while the first unit waits for its seed, the units past the
// window fetch the chunks no seed offers (and no more), holding only those
// bytes; a far unit's seed that turns out wrong once it is near costs only
// that chunk, fetched then. The result is the file, within the memory bound.
func TestFarUnitsFetchWhatNoSeedOffersAhead(t *testing.T) {
	const (
		window = 2
		group  = 1 << 20 // 8 chunks a unit
		units  = 24
	)
	old := randomData(units*group, 36)
	data := bytes.Clone(old)
	for u := range units { // one changed chunk in every unit
		c := u*8 + u%8
		copy(data[c*seedChunk:], randomData(seedChunk, byte(40+u)))
	}
	rep, model, oid, table := withTwin(t, old, data)
	wrongChunk := 5*8 + 2 // unchanged, but the seed's bytes there are damaged
	seedBytes := bytes.Clone(old)
	seedBytes[wrongChunk*seedChunk+77] ^= 0x55
	gate := gatedReaderAt{ReaderAt: bytes.NewReader(seedBytes), from: 0, to: group, open: make(chan struct{})}
	r := openReader(t, rep, oid, prefetch.Options{Window: window, GroupBytes: group, Seeds: prefetch.NewSeedMap("twin", gate, table)})
	model.Reset()

	type result struct {
		out []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		var out bytes.Buffer
		_, err := r.WriteTo(&out)
		done <- result{out.Bytes(), err}
	}()
	// Unit 0 waits for its seed; unit 1 (near) and the far units 2..7
	// (FarFactor × window of them) fetch their changed chunk meanwhile.
	wantGets := int64(1 + prefetch.FarFactor*window)
	deadline := time.Now().Add(30 * time.Second)
	for model.Stats().Gets < wantGets && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // and no more than that
	held := model.Stats()
	if held.Gets != wantGets {
		t.Errorf("while the first unit waited for its seed, %d fetches from the store, want %d (the near unit's and the far units')", held.Gets, wantGets)
	}
	if held.BytesFetched > wantGets*(seedChunk+4096) {
		t.Errorf("far units fetched %d bytes, more than their changed chunks", held.BytesFetched)
	}
	close(gate.open)
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	if !bytes.Equal(res.out, data) {
		t.Fatal("seeded read with far units differs from the file")
	}
	rs, ms := r.Stats(), model.Stats()
	t.Logf("%d chunks: seeded %d, %d mismatches, %d gets, %d bytes fetched, held at most %d of %d bytes",
		rs.Chunks, rs.Seeds.SeededChunks, rs.Seeds.SeedMismatches, ms.Gets, ms.BytesFetched, rs.MaxBufferedBytes, rs.MemoryBound)
	if rs.Seeds.SeedMismatches != 1 || rs.Seeds.SeededChunks != int64(rs.Chunks-units-1) {
		t.Errorf("%d mismatches, %d chunks seeded; want 1 and %d", rs.Seeds.SeedMismatches, rs.Seeds.SeededChunks, rs.Chunks-units-1)
	}
	if ms.Gets != units+1 {
		t.Errorf("%d fetches from the store, want one per changed chunk and one for the damaged seed (%d)", ms.Gets, units+1)
	}
	if rs.MaxBufferedBytes > rs.MemoryBound || rs.MemoryBound != window*group*3/2 {
		t.Errorf("held %d bytes, bound %d (want %d)", rs.MaxBufferedBytes, rs.MemoryBound, window*group*3/2)
	}
	r.Close()
	if b := r.Stats().BufferedBytes; b != 0 {
		t.Errorf("%d bytes still counted as held after Close", b)
	}
}
