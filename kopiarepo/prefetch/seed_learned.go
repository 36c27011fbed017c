package prefetch

import (
	"bytes"
	"cmp"
	"io"
	"slices"
	"sync"

	"github.com/kopia/kopia/repo/content"
)

// HashedChunk is what a file of this host holds at [Offset,
// Offset+Length): bytes whose hash under the repository's hash function
// is Hash (the hash part of the content ID they would have).
type HashedChunk struct {
	Offset, Length int64
	Hash           []byte
}

// LearnedMap seeds from a file of this host that kopia does not hold (no
// chunk table to read), learning as it goes what the file holds: each
// chunk is first probed at its own offset (see SameOffset), and every
// candidate read is hashed anyway, so the map records that hash for that
// range. A content the map knows is then proposed wherever it sits, and a
// range known to hold something else is not read again. Entries gives the
// map to keep across runs and NewLearnedMap takes it back: a map that is
// wrong (stale, damaged, edited) costs a mismatch per wrong entry, which
// corrects it, never a wrong byte, since every candidate is verified.
type LearnedMap struct {
	origin string
	file   io.ReaderAt
	size   int64

	mu      sync.Mutex
	byHash  map[string]chunkAt
	byRange map[chunkAt][]byte
	changed bool
}

// NewLearnedMap returns a map of file (size bytes) knowing known.
func NewLearnedMap(origin string, file io.ReaderAt, size int64, known []HashedChunk) *LearnedMap {
	m := &LearnedMap{origin: origin, file: file, size: size,
		byHash: make(map[string]chunkAt, len(known)), byRange: make(map[chunkAt][]byte, len(known))}
	for _, c := range known {
		if c.Offset < 0 || c.Length <= 0 || c.Offset+c.Length > size {
			continue
		}
		m.record(chunkAt{c.Offset, c.Length}, bytes.Clone(c.Hash))
	}
	m.changed = false
	return m
}

// SeedsFor implements Seeder: where the map last saw cid's hash, then the
// chunk's own offset unless the map knows it holds something else there.
func (m *LearnedMap) SeedsFor(cid content.ID, offset, length int64) []Seed {
	want := cid.Hash()
	own := chunkAt{offset, length}
	m.mu.Lock()
	at, known := m.byHash[string(want)]
	held, seen := m.byRange[own]
	m.mu.Unlock()
	var out []Seed
	if known && at.length == length {
		out = append(out, m.seed(at, false))
	}
	if (!known || at != own) && (!seen || bytes.Equal(held, want)) && offset+length <= m.size {
		out = append(out, m.seed(own, !seen))
	}
	return out
}

func (m *LearnedMap) seed(at chunkAt, probe bool) Seed {
	return Seed{Origin: m.origin, File: m.file, Offset: at.off, Probe: probe,
		Hashed: func(h []byte) { m.learn(at, h) }}
}

func (m *LearnedMap) learn(at chunkAt, h []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.byRange[at]; ok && bytes.Equal(old, h) {
		return
	}
	m.record(at, bytes.Clone(h))
}

// record sets what range at holds; the caller holds mu (or owns m).
func (m *LearnedMap) record(at chunkAt, h []byte) {
	if old, ok := m.byRange[at]; ok && m.byHash[string(old)] == at {
		delete(m.byHash, string(old))
	}
	m.byRange[at] = h
	m.byHash[string(h)] = at
	m.changed = true
}

// Changed reports whether the map learned anything since it was made.
func (m *LearnedMap) Changed() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

// Entries are what the map knows, in file order.
func (m *LearnedMap) Entries() []HashedChunk {
	m.mu.Lock()
	out := make([]HashedChunk, 0, len(m.byRange))
	for at, h := range m.byRange {
		out = append(out, HashedChunk{Offset: at.off, Length: at.length, Hash: h})
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b HashedChunk) int {
		return cmp.Or(cmp.Compare(a.Offset, b.Offset), cmp.Compare(a.Length, b.Length))
	})
	return out
}
