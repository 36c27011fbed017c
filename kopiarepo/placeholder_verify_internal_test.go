package kopiarepo

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob/filesystem"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/format"
	"github.com/kopia/kopia/repo/object"
)

// TestVerifyObjectFromMemory: for an object the stream path wrote, the
// Uploader's VerifyObject gives kopia's answer without reading the index
// back, fails as kopia does when the index or a chunk written this upload
// is missing, and sends every other object, or the same one asked a
// second time, to kopia.
func TestVerifyObjectFromMemory(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := filesystem.New(ctx, &filesystem.Options{Path: filepath.Join(dir, "repo")}, true)
	if err != nil {
		t.Fatal(err)
	}
	const password = "verify-test"
	// FIXED-128K, as vmhistory's repositories: an index object of more
	// than 128 KiB is itself indirect.
	if err := repo.Initialize(ctx, st, &repo.NewRepositoryOptions{ObjectFormat: format.ObjectFormat{Splitter: "FIXED-128K"}}, password); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "repo.config")
	if err := repo.Connect(ctx, cfg, st, password, &repo.ConnectOptions{}); err != nil {
		t.Fatal(err)
	}
	rep, err := repo.Open(ctx, cfg, password, &repo.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close(ctx)
	_, w, err := rep.(repo.DirectRepository).NewDirectWriter(ctx, repo.WriteSessionOptions{Purpose: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close(ctx)

	var entries []object.IndirectObjectEntry
	var offset int64
	for _, chunk := range []string{"first chunk", "second chunk", "first chunk"} {
		ow := w.NewObjectWriter(ctx, object.WriterOptions{Description: "chunk"})
		ow.Write([]byte(chunk))
		oid, err := ow.Result()
		ow.Close()
		if err != nil {
			t.Fatal(err)
		}
		entries = append(entries, object.IndirectObjectEntry{Start: offset, Length: int64(len(chunk)), Object: oid})
		offset += int64(len(chunk))
	}
	oid, err := writeIndex(ctx, w, entries, object.WriterOptions{Description: "disk"})
	if err != nil {
		t.Fatal(err)
	}
	want, err := w.VerifyObject(ctx, oid)
	if err != nil {
		t.Fatal(err)
	}

	cu := &changedUpload{}
	uw := cu.uploaderRepo(w)
	if _, ok := uw.(repo.DirectRepositoryWriter); !ok {
		t.Error("the Uploader's writer is no longer a DirectRepositoryWriter")
	}
	cu.remember(oid, entries, []int{0, 1, 2})
	got, err := uw.VerifyObject(ctx, oid)
	if err != nil {
		t.Fatal(err)
	}
	sortIDs := func(ids []content.ID) []content.ID {
		ids = slices.Clone(ids)
		slices.SortFunc(ids, func(a, b content.ID) int { return strings.Compare(a.String(), b.String()) })
		return ids
	}
	if !slices.Equal(sortIDs(got), sortIDs(want)) || len(got) != 3 {
		t.Errorf("from memory %v, kopia %v (want the index and two chunks)", got, want)
	}
	if _, ok := cu.written[oid]; ok {
		t.Error("a verified object stays remembered")
	}
	// Asked again, kopia answers (the same).
	if again, err := uw.VerifyObject(ctx, oid); err != nil || !slices.Equal(sortIDs(again), sortIDs(want)) {
		t.Errorf("second verify %v, %v", again, err)
	}

	// A new chunk the repository lacks fails the check; one taken over
	// from the previous object is not looked up (kopia's Uploader takes
	// an unchanged file's object as it is, too).
	missing := slices.Clone(entries)
	missing[1].Object = object.DirectObjectID(mustContentID(t, "0123456789abcdef0123456789abcdef"))
	cu.remember(oid, missing, []int{1})
	if _, err := uw.VerifyObject(ctx, oid); err == nil || !strings.Contains(err.Error(), "0123456789abcdef") {
		t.Errorf("an object with a missing new content verified: %v", err)
	}
	cu.remember(oid, missing, []int{0, 2})
	if got, err := uw.VerifyObject(ctx, oid); err != nil || len(got) != 3 {
		t.Errorf("an object whose missing content was taken over: %v, %v (want the index and its two chunks)", got, err)
	}
	// So does a missing index content.
	noIndex, err := object.ParseID("Ix00112233445566778899aabbccddeeff")
	if err != nil {
		t.Fatal(err)
	}
	cu.remember(noIndex, entries, nil)
	if _, err := uw.VerifyObject(ctx, noIndex); err == nil || !strings.Contains(err.Error(), "00112233445566778899aabbccddeeff") {
		t.Errorf("an object with a missing index content verified: %v", err)
	}

	// An index bigger than one content is itself indirect; its own
	// contents are checked, the chunks taken over are not.
	big := make([]object.IndirectObjectEntry, 5000)
	for i := range big {
		big[i] = object.IndirectObjectEntry{Start: int64(i) * 11, Length: 11, Object: entries[i%2].Object}
	}
	big[7].Object = missing[1].Object
	bigOID, err := writeIndex(ctx, w, big, object.WriterOptions{Description: "big disk"})
	if err != nil {
		t.Fatal(err)
	}
	if inner, _ := bigOID.IndexObjectID(); !strings.HasPrefix(inner.String(), "I") {
		t.Fatalf("an index of %d entries is %v, one content", len(big), bigOID)
	}
	cu.remember(bigOID, big, []int{0, 1})
	if got, err := uw.VerifyObject(ctx, bigOID); err != nil || len(got) < 5 {
		t.Errorf("a big index: %v, %v (want its two or more contents and three chunks)", got, err)
	}
	cu.remember(bigOID, big, []int{0, 7})
	if _, err := uw.VerifyObject(ctx, bigOID); err == nil {
		t.Error("a big index with a missing new content verified")
	}

	// An object the stream path did not write goes to kopia, which fails
	// for one that does not exist.
	unknown := object.DirectObjectID(mustContentID(t, "fedcba9876543210fedcba9876543210"))
	if _, err := uw.VerifyObject(ctx, unknown); err == nil {
		t.Error("an unknown object verified")
	}
	if got, err := uw.VerifyObject(ctx, entries[0].Object); err != nil || len(got) != 1 {
		t.Errorf("a direct object kopia has: %v, %v", got, err)
	}
}

func mustContentID(t *testing.T, s string) content.ID {
	t.Helper()
	id, err := content.ParseID(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}
