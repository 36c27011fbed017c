package prefetch

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/compression"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/object"
)

// chunk is one entry of a file's chunk table.
type chunk struct {
	start, length int64
	oid           object.ID // a direct object: one content
}

// indexContentReader is what object.LoadIndexObject needs; kopia's
// content manager (DirectRepository.ContentReader()) has it.
type indexContentReader interface {
	ContentInfo(ctx context.Context, contentID content.ID) (content.Info, error)
	GetContent(ctx context.Context, contentID content.ID) ([]byte, error)
	PrefetchContents(ctx context.Context, contentIDs []content.ID, prefetchHint string) []content.ID
}

// loadIndex returns the entries of index object indexOID (an object ID
// stripped of one "I"), through object.LoadIndexObject when the repository
// is direct, or else by decoding the index object read with OpenObject
// (the same JSON, {"stream":"kopia:indirect","entries":[...]}).
func loadIndex(ctx context.Context, rep repo.Repository, indexOID object.ID) ([]object.IndirectObjectEntry, error) {
	if dr, ok := rep.(repo.DirectRepository); ok {
		if cr, ok := dr.ContentReader().(indexContentReader); ok {
			return object.LoadIndexObject(ctx, cr, indexOID) //nolint:wrapcheck
		}
	}
	r, err := rep.OpenObject(ctx, indexOID)
	if err != nil {
		return nil, err //nolint:wrapcheck
	}
	defer r.Close() //nolint:errcheck
	var ind struct {
		Entries []object.IndirectObjectEntry `json:"entries"`
	}
	if err := json.NewDecoder(r).Decode(&ind); err != nil {
		return nil, fmt.Errorf("invalid index object %v: %w", indexOID, err)
	}
	return ind.Entries, nil
}

// loadChunks returns the chunk table of object oid. A direct object is a
// single chunk, read whole (its bytes are returned as direct: they cost
// the one round trip that finding its length costs anyway).
func loadChunks(ctx context.Context, rep repo.Repository, oid object.ID) (chunks []chunk, direct []byte, err error) {
	indexOID, indirect := oid.IndexObjectID()
	if !indirect {
		r, err := rep.OpenObject(ctx, oid)
		if err != nil {
			return nil, nil, err //nolint:wrapcheck
		}
		defer r.Close() //nolint:errcheck
		data, err := io.ReadAll(r)
		if err != nil {
			return nil, nil, fmt.Errorf("read object %v: %w", oid, err)
		}
		return []chunk{{start: 0, length: int64(len(data)), oid: oid}}, data, nil
	}
	var out []chunk
	if err := appendChunks(ctx, rep, indexOID, 0, &out); err != nil {
		return nil, nil, err
	}
	return out, nil, nil
}

// appendChunks appends the chunks of index object indexOID, placed at
// offset base of the file, expanding entries that are themselves
// indirect (kopia flattens those when it concatenates, so they are rare).
func appendChunks(ctx context.Context, rep repo.Repository, indexOID object.ID, base int64, out *[]chunk) error {
	entries, err := loadIndex(ctx, rep, indexOID)
	if err != nil {
		return fmt.Errorf("load chunk table of %v: %w", indexOID, err)
	}
	next := base
	for _, e := range entries {
		if base+e.Start != next || e.Length < 0 {
			return fmt.Errorf("chunk table of %v is not contiguous at offset %d", indexOID, base+e.Start)
		}
		if sub, ok := e.Object.IndexObjectID(); ok {
			n := len(*out)
			if err := appendChunks(ctx, rep, sub, next, out); err != nil {
				return err
			}
			var got int64
			for _, c := range (*out)[n:] {
				got += c.length
			}
			if got != e.Length {
				return fmt.Errorf("nested object %v has %d bytes, its entry says %d", e.Object, got, e.Length)
			}
		} else if e.Length > 0 {
			*out = append(*out, chunk{start: next, length: e.Length, oid: e.Object})
		}
		next += e.Length
	}
	return nil
}

// chunkIndex returns the index of the chunk holding offset off, which
// must be within the file.
func chunkIndex(chunks []chunk, off int64) int {
	return sort.Search(len(chunks), func(i int) bool { return chunks[i].start+chunks[i].length > off })
}

// loc is where a chunk's content lives, compactly (a 51 GiB file of
// 128 KiB chunks has 400 000 of them).
type loc struct {
	state           uint8 // 0 not looked up, 1 found, 2 not locatable
	enc             uint8
	pack            int32 // index into locator.packs
	off, plen, olen uint32
	comp            compression.HeaderID
}

const (
	locUnknown uint8 = iota
	locFound
	locMissing
)

// locator finds and remembers the pack blob, offset and length of chunks'
// contents (rep.ContentInfo: a lookup in kopia's in-memory index, except
// when kopia decides to refresh its indexes, which reads from storage).
// It has its own lock so that those lookups never run under the Reader's.
type locator struct {
	rep    repo.Repository
	chunks []chunk

	mu     sync.Mutex
	locs   []loc
	packs  []blob.ID
	packID map[blob.ID]int32
}

func newLocator(rep repo.Repository, chunks []chunk) *locator {
	return &locator{rep: rep, chunks: chunks, locs: make([]loc, len(chunks)), packID: map[blob.ID]int32{}}
}

// ensure looks up chunks [from, to] that are not looked up yet.
func (l *locator) ensure(ctx context.Context, from, to int) {
	to = min(to, len(l.chunks)-1)
	var missing []int
	l.mu.Lock()
	for i := from; i <= to; i++ {
		if l.locs[i].state == locUnknown {
			missing = append(missing, i)
		}
	}
	l.mu.Unlock()
	for _, i := range missing {
		l.get(ctx, i)
	}
}

// get returns chunk i's location, looking it up if needed. The lookup
// runs without the lock, so that one slow lookup (an index refresh) holds
// up only the goroutine that needs it.
func (l *locator) get(ctx context.Context, i int) (loc, bool) {
	l.mu.Lock()
	lc := l.locs[i]
	l.mu.Unlock()
	if lc.state != locUnknown {
		return lc, lc.state == locFound
	}
	var info content.Info
	found := false
	if cid, _, ok := l.chunks[i].oid.ContentID(); ok {
		var err error
		info, err = l.rep.ContentInfo(ctx, cid)
		if err != nil && ctx.Err() != nil {
			return loc{}, false // do not remember a lookup cut short
		}
		found = err == nil && !info.Deleted
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	lc = loc{state: locMissing}
	if found {
		p, ok := l.packID[info.PackBlobID]
		if !ok {
			p = int32(len(l.packs)) //nolint:gosec
			l.packs = append(l.packs, info.PackBlobID)
			l.packID[info.PackBlobID] = p
		}
		lc = loc{
			state: locFound, enc: info.EncryptionKeyID, pack: p,
			off: info.PackOffset, plen: info.PackedLength, olen: info.OriginalLength,
			comp: info.CompressionHeaderID,
		}
	}
	l.locs[i] = lc
	return lc, found
}

// info rebuilds the content.Info of chunk i from its location.
func (l *locator) info(i int, lc loc) content.Info {
	cid, _, _ := l.chunks[i].oid.ContentID()
	l.mu.Lock()
	pack := l.packs[lc.pack]
	l.mu.Unlock()
	return content.Info{
		PackBlobID: pack, PackOffset: lc.off, PackedLength: lc.plen, OriginalLength: lc.olen,
		CompressionHeaderID: lc.comp, ContentID: cid, EncryptionKeyID: lc.enc,
	}
}
