package prefetch

import (
	"bytes"
	"context"
	"errors"
	"io"
	"maps"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/object"
)

// Seeder names the places on this host that may hold a chunk's bytes, so
// that the Reader need not fetch them from the store: an older local
// snapshot of the same VM disk holds most of its chunks at the same
// offsets. It only proposes: the Reader reads each candidate, hashes it
// with the repository's hash function and compares it with the chunk's
// content ID, and fetches from the store a chunk that no candidate
// matches. A Seeder is called from the Reader's fetch goroutines
// concurrently.
type Seeder interface {
	// SeedsFor returns the candidates, best first, for the chunk at
	// [offset, offset+length) of the file, whose content is cid; none
	// when the host holds nothing for it.
	SeedsFor(cid content.ID, offset, length int64) []Seed
}

// Seed is one candidate for a chunk: its length in bytes at Offset of File.
type Seed struct {
	// Origin names the seed in Stats.SeedBytesByOrigin (a snapshot and
	// path, say).
	Origin string
	File   io.ReaderAt
	Offset int64
	// Probe marks a guess (the chunk's own offset of a file whose content
	// there is not known): a miss is counted in SeedStats.ProbeMisses, not
	// as a mismatch.
	Probe bool
	// Hashed, when set, is told the hash of the candidate's bytes, whether
	// or not they matched, so that a Seeder can learn what its file holds.
	Hashed func(hash []byte)
}

// SeedStats are the counters of seeding (Options.Seeds), in Stats.
type SeedStats struct {
	// SeededChunks and SeededBytes are the chunks (and their bytes) taken
	// from seeds instead of the store; SeedBytesByOrigin splits the bytes
	// by Seed.Origin.
	SeededChunks, SeededBytes int64
	SeedBytesByOrigin         map[string]int64
	// SeedMismatches counts candidates whose bytes did not hash to the
	// chunk's content ID (a seed that changed, a stale map, a damaged
	// block), SeedReadErrors candidates that could not be read; each sent
	// the Reader to the next candidate, or to the store.
	SeedMismatches, SeedReadErrors int64
	// ProbeMisses counts probes (Seed.Probe) whose bytes were not the
	// chunk's: at its own offset the seed holds something else, as a chunk
	// that changed does.
	ProbeMisses int64
}

// seedable reports whether the Reader can verify seeds: it needs the
// repository's hash function (ModePackRanges on a direct repository).
func (r *Reader) seedable() bool { return r.opts.Seeds != nil && r.codec != nil }

// seedUnit takes from the Seeder every chunk of u it does not already
// hold that a candidate supplies verified, before u is fetched: the fetch
// then asks the store only for the rest. Called once per unit, from its
// own goroutine. First candidates that lie end to end in one file (a
// twin's chunks in order, every chunk's own offset) are read in one call,
// up to maxSeedRead: on a FUSE filesystem such as zfs-fuse each call is a
// round trip, and a large one is split into requests that go out together.
func (r *Reader) seedUnit(ctx context.Context, u *unit) {
	n := u.last - u.first + 1
	type want struct {
		i      int // in the unit
		cid    content.ID
		length int64
		cands  []Seed
	}
	var wants []want
	for i := range n {
		if u.held(i) {
			continue
		}
		ch := r.chunks[u.first+i]
		cid, _, ok := ch.oid.ContentID()
		if !ok {
			continue
		}
		var cands []Seed
		if u.cands != nil {
			cands = u.cands[i]
		} else {
			cands = r.seedsFor(cid, ch)
		}
		if len(cands) > 0 {
			wants = append(wants, want{i, cid, ch.length, cands})
		}
	}
	if len(wants) == 0 {
		return
	}
	var st SeedStats
	seeded := make([][]byte, n)
	took := 0
	// check verifies b as chunk w's bytes from candidate c.
	check := func(w want, c Seed, b []byte) bool {
		if !r.seedHolds(c, w.cid, b) {
			if c.Probe {
				st.ProbeMisses++
			} else {
				st.SeedMismatches++
			}
			return false
		}
		length := int64(len(b))
		seeded[w.i] = b
		took++
		st.SeededChunks++
		st.SeededBytes += length
		if st.SeedBytesByOrigin == nil {
			st.SeedBytesByOrigin = map[string]int64{}
		}
		st.SeedBytesByOrigin[c.Origin] += length
		return true
	}
	// readOne reads chunk w from candidate c alone.
	readOne := func(w want, c Seed) []byte {
		b := readSeed(c.File, c.Offset, w.length)
		if b == nil {
			st.SeedReadErrors++
		}
		return b
	}
	var rest []want // chunks whose first candidate failed: the others, one by one
	for k := 0; k < len(wants) && ctx.Err() == nil; {
		// The run of first candidates end to end in one file from k.
		first := wants[k].cands[0]
		end, total := k+1, wants[k].length
		for end < len(wants) {
			c, prev := wants[end].cands[0], wants[end-1]
			if !sameFile(c.File, first.File) || c.Offset != prev.cands[0].Offset+prev.length || total+wants[end].length > maxSeedRead {
				break
			}
			end, total = end+1, total+wants[end].length
		}
		run := wants[k:end]
		k = end
		if len(run) == 1 {
			if b := readOne(run[0], first); b == nil || !check(run[0], first, b) {
				rest = append(rest, run[0])
			}
			continue
		}
		buf := readSeed(first.File, first.Offset, total)
		if buf == nil {
			// One bad block must not cost the run: each chunk alone.
			for _, w := range run {
				if b := readOne(w, w.cands[0]); b == nil || !check(w, w.cands[0], b) {
					rest = append(rest, w)
				}
			}
			continue
		}
		var off int64
		for _, w := range run {
			if !check(w, w.cands[0], buf[off:off+w.length:off+w.length]) {
				rest = append(rest, w)
			}
			off += w.length
		}
	}
	for _, w := range rest {
		for _, c := range w.cands[1:] {
			if ctx.Err() != nil {
				break
			}
			if b := readOne(w, c); b != nil && check(w, c, b) {
				break
			}
		}
	}
	if took > 0 {
		u.seeded = seeded
	}
	if st.SeededChunks == 0 && st.SeedMismatches == 0 && st.SeedReadErrors == 0 && st.ProbeMisses == 0 {
		return
	}
	r.count(func(s *Stats) { s.Seeds.add(st) })
}

// readSeed reads length bytes at off of a seed's file; nil when they
// cannot all be read.
func readSeed(f io.ReaderAt, off, length int64) []byte {
	b := make([]byte, length)
	if m, err := f.ReadAt(b, off); m < len(b) || (err != nil && !errors.Is(err, io.EOF)) {
		return nil
	}
	return b
}

// seedHolds reports whether b, read from candidate c, is content cid,
// telling c what it hashed to.
func (r *Reader) seedHolds(c Seed, cid content.ID, b []byte) bool {
	h := r.codec.hash(b)
	if c.Hashed != nil {
		c.Hashed(h)
	}
	return bytes.Equal(h, cid.Hash())
}

// seedsFor returns the Seeder's candidates for chunk ch, whose content is
// cid, that have a file.
func (r *Reader) seedsFor(cid content.ID, ch chunk) []Seed {
	var cands []Seed
	for _, c := range r.opts.Seeds.SeedsFor(cid, ch.start, ch.length) {
		if c.File != nil {
			cands = append(cands, c)
		}
	}
	return cands
}

// farPhase is what a far unit does before it is near (see unit.near): it
// finds each chunk's seeds, tries its probes (hashing the bytes at the
// chunk's own offset, which are then let go: a probe that misses is a
// chunk that changed, to fetch), and fetches from the store the chunks no
// seed offers, if they fit the far budget; what it could not fetch is
// fetched once the unit is near. Its seeds are read once it is near.
func (r *Reader) farPhase(ctx context.Context, u *unit) {
	n := u.last - u.first + 1
	cands := make([][]Seed, n)
	only := make([]bool, n)
	var need int64
	var st SeedStats
	for i := range n {
		if u.held(i) || ctx.Err() != nil {
			continue
		}
		ch := r.chunks[u.first+i]
		cid, _, ok := ch.oid.ContentID()
		if !ok {
			continue // read through kopia's object reader once near
		}
		var kept []Seed
		for _, c := range r.seedsFor(cid, ch) {
			if c.Probe && len(kept) == 0 {
				b := readSeed(c.File, c.Offset, ch.length)
				if b == nil {
					st.SeedReadErrors++
					continue
				}
				if !r.seedHolds(c, cid, b) {
					st.ProbeMisses++
					continue
				}
			}
			kept = append(kept, c)
		}
		cands[i] = kept
		if len(kept) == 0 {
			only[i] = true
			need += ch.length
		}
	}
	u.cands = cands
	if st.SeedReadErrors > 0 || st.ProbeMisses > 0 {
		r.count(func(s *Stats) { s.Seeds.add(st) })
	}
	if !r.reserveFar(ctx, u, need) {
		return
	}
	data, err := r.fetchOwnWithRetry(ctx, u, only)
	if err != nil {
		// Fetched again once near, where a failure fails the unit.
		r.mu.Lock()
		r.giveBackFarLocked(u)
		if !u.isNear && !u.released {
			r.accountLocked(u, 0)
		}
		r.mu.Unlock()
		return
	}
	stored := make([][]byte, n)
	for i, ok := range only {
		if ok {
			stored[i] = data[i]
		}
	}
	u.stored = stored
}

// maxSeedRead is the most bytes one seed read takes in.
const maxSeedRead = 4 << 20

// sameFile reports whether a and b are the same seed file; readers whose
// dynamic type cannot be compared are taken as different.
func sameFile(a, b io.ReaderAt) (same bool) {
	defer func() {
		if recover() != nil {
			same = false
		}
	}()
	return a == b
}

func (s *SeedStats) add(o SeedStats) {
	s.SeededChunks += o.SeededChunks
	s.SeededBytes += o.SeededBytes
	s.SeedMismatches += o.SeedMismatches
	s.SeedReadErrors += o.SeedReadErrors
	s.ProbeMisses += o.ProbeMisses
	for k, v := range o.SeedBytesByOrigin {
		if s.SeedBytesByOrigin == nil {
			s.SeedBytesByOrigin = map[string]int64{}
		}
		s.SeedBytesByOrigin[k] += v
	}
}

// clone is s with a map of its own, for a copy handed out.
func (s SeedStats) clone() SeedStats {
	s.SeedBytesByOrigin = maps.Clone(s.SeedBytesByOrigin)
	return s
}

// ChunkRef is one chunk of a file as kopia stores it: its bytes
// [Offset, Offset+Length) are the content Content.
type ChunkRef struct {
	Offset, Length int64
	Content        content.ID
}

// ChunkTable returns the chunks of object oid of rep, in file order,
// reading only its index objects (for a direct object, the object itself:
// it is its only chunk). Chunks whose object is not a content (never in
// an index object kopia writes) are left out.
func ChunkTable(ctx context.Context, rep repo.Repository, oid object.ID) ([]ChunkRef, error) {
	chunks, _, err := loadChunks(ctx, rep, oid)
	if err != nil {
		return nil, err
	}
	out := make([]ChunkRef, 0, len(chunks))
	for _, c := range chunks {
		if cid, _, ok := c.oid.ContentID(); ok {
			out = append(out, ChunkRef{Offset: c.start, Length: c.length, Content: cid})
		}
	}
	return out, nil
}

// SeedMap proposes a file of this host whose kopia chunk table is known
// (the same bytes as a kopia snapshot's file: its twin): a content the
// table holds is proposed at its offset there, wherever the chunk sits in
// the file being read, and a content it does not hold is not proposed at
// all, so no byte is read or hashed in vain.
type SeedMap struct {
	origin string
	file   io.ReaderAt
	at     map[content.ID]chunkAt
}

type chunkAt struct{ off, length int64 }

// NewSeedMap maps the chunks of table, which describes file.
func NewSeedMap(origin string, file io.ReaderAt, table []ChunkRef) *SeedMap {
	m := &SeedMap{origin: origin, file: file, at: make(map[content.ID]chunkAt, len(table))}
	for _, c := range table {
		if _, dup := m.at[c.Content]; !dup {
			m.at[c.Content] = chunkAt{c.Offset, c.Length}
		}
	}
	return m
}

// Len is the number of distinct contents the map knows.
func (m *SeedMap) Len() int { return len(m.at) }

// SeedsFor implements Seeder.
func (m *SeedMap) SeedsFor(cid content.ID, _, length int64) []Seed {
	if c, ok := m.at[cid]; ok && c.length == length {
		return []Seed{{Origin: m.origin, File: m.file, Offset: c.off}}
	}
	return nil
}

// SameOffset proposes the bytes at the chunk's own offset of a file of
// this host (an older or newer version of the same VM disk, whose data
// does not move): whatever the splitter, no table is needed, but a chunk
// that changed costs a read and a hash before it is fetched.
type SameOffset struct {
	Origin string
	File   io.ReaderAt
	Size   int64
}

// SeedsFor implements Seeder.
func (s SameOffset) SeedsFor(_ content.ID, offset, length int64) []Seed {
	if offset+length > s.Size {
		return nil
	}
	return []Seed{{Origin: s.Origin, File: s.File, Offset: offset, Probe: true}}
}

// Seeders proposes the candidates of each of its Seeders, in order.
type Seeders []Seeder

// SeedsFor implements Seeder.
func (ss Seeders) SeedsFor(cid content.ID, offset, length int64) []Seed {
	var out []Seed
	for _, s := range ss {
		out = append(out, s.SeedsFor(cid, offset, length)...)
	}
	return out
}
