package kopiarepo

import (
	"context"
	"fmt"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/object"
)

// kopia's Uploader checks the object of every placeholder entry
// (DirEntryOrNil) with VerifyObject: it reads the index object back and
// looks up each of its contents. For a file the stream path just wrote,
// the entries are still in memory; parsing their JSON again cost ~40 ms
// per 2 GiB of disk (a third of it at 8 GiB: the one part of a night
// that grows with the disk, not with the change). The writer given to
// the Uploader answers VerifyObject for those objects from memory, with
// the same check (every content, the index's own included, is in the
// repository) and the same answer; any other object goes to kopia.

// remember keeps the entries of an index object the stream path wrote,
// for the Uploader's VerifyObject that follows.
func (cu *changedUpload) remember(oid object.ID, entries []object.IndirectObjectEntry) {
	cu.mu.Lock()
	defer cu.mu.Unlock()
	if cu.written == nil {
		cu.written = map[object.ID][]object.IndirectObjectEntry{}
	}
	cu.written[oid] = entries
}

func (cu *changedUpload) take(oid object.ID) ([]object.IndirectObjectEntry, bool) {
	cu.mu.Lock()
	defer cu.mu.Unlock()
	e, ok := cu.written[oid]
	delete(cu.written, oid)
	return e, ok
}

// verifyObject is VerifyObject for r: from memory for an object the
// stream path wrote, from the repository for any other.
func (cu *changedUpload) verifyObject(ctx context.Context, r repo.RepositoryWriter, oid object.ID) ([]content.ID, error) {
	entries, ok := cu.take(oid)
	if !ok {
		return r.VerifyObject(ctx, oid) //nolint:wrapcheck // kopia's own answer
	}
	indexID, indirect := oid.IndexObjectID()
	indexContent, _, direct := indexID.ContentID()
	if !indirect || !direct {
		// An index too big for one content is itself indirect: kopia
		// walks that.
		return r.VerifyObject(ctx, oid) //nolint:wrapcheck
	}
	ids := make([]content.ID, 0, len(entries)+1)
	seen := make(map[content.ID]bool, len(entries)+1)
	add := func(cid content.ID) error {
		if seen[cid] {
			return nil
		}
		seen[cid] = true
		if _, err := r.ContentInfo(ctx, cid); err != nil {
			return fmt.Errorf("object %v: error getting content info for %v: %w", oid, cid, err)
		}
		ids = append(ids, cid)
		return nil
	}
	if err := add(indexContent); err != nil {
		return nil, err
	}
	for _, e := range entries {
		cid, _, ok := e.Object.ContentID()
		if !ok {
			// Not a chunk the stream path writes: kopia checks it whole.
			return r.VerifyObject(ctx, oid) //nolint:wrapcheck
		}
		if err := add(cid); err != nil {
			return nil, err
		}
	}
	return ids, nil
}

// uploaderRepo is the writer the Uploader gets: w, with VerifyObject
// answered by cu. A DirectRepositoryWriter stays one (the Uploader logs
// to the repository's log through it).
func (cu *changedUpload) uploaderRepo(w repo.RepositoryWriter) repo.RepositoryWriter {
	if dw, ok := w.(repo.DirectRepositoryWriter); ok {
		return &verifyingDirectWriter{DirectRepositoryWriter: dw, cu: cu}
	}
	return &verifyingWriter{RepositoryWriter: w, cu: cu}
}

type verifyingWriter struct {
	repo.RepositoryWriter
	cu *changedUpload
}

func (v *verifyingWriter) VerifyObject(ctx context.Context, oid object.ID) ([]content.ID, error) {
	return v.cu.verifyObject(ctx, v.RepositoryWriter, oid)
}

type verifyingDirectWriter struct {
	repo.DirectRepositoryWriter
	cu *changedUpload
}

func (v *verifyingDirectWriter) VerifyObject(ctx context.Context, oid object.ID) ([]content.ID, error) {
	return v.cu.verifyObject(ctx, v.DirectRepositoryWriter, oid)
}
