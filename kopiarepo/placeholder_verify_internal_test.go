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
	"github.com/kopia/kopia/repo/object"
)

// TestVerifyObjectFromMemory: for an object the stream path wrote, the
// Uploader's VerifyObject gives kopia's answer without reading the index
// back, fails as kopia does when a content is missing, and sends every
// other object, or the same one asked a second time, to kopia.
func TestVerifyObjectFromMemory(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := filesystem.New(ctx, &filesystem.Options{Path: filepath.Join(dir, "repo")}, true)
	if err != nil {
		t.Fatal(err)
	}
	const password = "verify-test"
	if err := repo.Initialize(ctx, st, &repo.NewRepositoryOptions{}, password); err != nil {
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
	cu.remember(oid, entries)
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

	// An entry whose content the repository lacks fails the check.
	missing := slices.Clone(entries)
	missing[1].Object = object.DirectObjectID(mustContentID(t, "0123456789abcdef0123456789abcdef"))
	cu.remember(oid, missing)
	if _, err := uw.VerifyObject(ctx, oid); err == nil || !strings.Contains(err.Error(), "0123456789abcdef") {
		t.Errorf("an object with a missing content verified: %v", err)
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
