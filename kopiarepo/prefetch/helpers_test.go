package prefetch_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/blob/filesystem"
	"github.com/kopia/kopia/repo/compression"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/object"

	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
)

const (
	testPassword = "prefetch-test-password"
	dynamic      = "DYNAMIC-4M-BUZHASH"
	fixed128K    = "FIXED-128K"
)

// testRepo is a real kopia repository on a filesystem storage in a temp
// dir, with a config file connecting to it directly.
type testRepo struct {
	dir, config string
	storage     blob.Storage
}

func newTestRepo(t testing.TB) *testRepo {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	st, err := filesystem.New(ctx, &filesystem.Options{Path: filepath.Join(dir, "repo")}, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(context.Background()) })
	return initRepo(t, dir, st)
}

func initRepo(t testing.TB, dir string, st blob.Storage) *testRepo {
	t.Helper()
	ctx := context.Background()
	if err := repo.Initialize(ctx, st, &repo.NewRepositoryOptions{}, testPassword); err != nil {
		t.Fatal(err)
	}
	tr := &testRepo{dir: dir, config: filepath.Join(dir, "kopia.config"), storage: st}
	if err := repo.Connect(ctx, tr.config, st, testPassword, &repo.ConnectOptions{CachingOptions: content.CachingOptions{
		CacheDirectory:         filepath.Join(dir, "cache"),
		ContentCacheSizeBytes:  5000 << 20,
		MetadataCacheSizeBytes: 5000 << 20,
	}}); err != nil {
		t.Fatal(err)
	}
	return tr
}

// write stores data as one object with the given splitter, compressing
// its compressible chunks, and returns its object ID.
func (tr *testRepo) write(t testing.TB, data []byte, splitter string, comp compression.Name) object.ID {
	t.Helper()
	ctx := context.Background()
	rep, err := repo.Open(ctx, tr.config, testPassword, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close(ctx)
	var oid object.ID
	err = repo.WriteSession(ctx, rep, repo.WriteSessionOptions{Purpose: "prefetch test"}, func(ctx context.Context, w repo.RepositoryWriter) error {
		ow := w.NewObjectWriter(ctx, object.WriterOptions{Splitter: splitter, Compressor: comp, MetadataCompressor: comp})
		defer ow.Close()
		if _, err := ow.Write(data); err != nil {
			return err
		}
		var err error
		oid, err = ow.Result()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return oid
}

var modelSeq atomic.Int64

// open opens the repository as a fresh connection with a cold kopia cache,
// its storage seen through a new shared drive model (with no latency
// while opening). Set the model's parameters after opening.
func (tr *testRepo) open(t testing.TB) (repo.Repository, *drivemodel.Model) {
	t.Helper()
	ctx := context.Background()
	name := fmt.Sprintf("prefetch-test-%d", modelSeq.Add(1))
	dir := t.TempDir()
	config := filepath.Join(dir, "model.config")
	if err := drivemodel.WriteConfig(tr.config, config, drivemodel.ConfigOptions{
		Model: name, Params: &drivemodel.Params{}, CacheDirectory: filepath.Join(dir, "cache"),
	}); err != nil {
		t.Fatal(err)
	}
	rep, err := repo.Open(ctx, config, testPassword, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close(context.Background()) })
	m := drivemodel.Shared(name)
	return rep, m
}

// openFresh is open for benchmarks: the caller closes the connection
// with the returned function, which also removes its cache.
func (tr *testRepo) openFresh(t testing.TB) (repo.Repository, *drivemodel.Model, func()) {
	t.Helper()
	ctx := context.Background()
	name := fmt.Sprintf("prefetch-bench-%d", modelSeq.Add(1))
	dir, err := os.MkdirTemp(tr.dir, "conn-")
	if err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "model.config")
	if err := drivemodel.WriteConfig(tr.config, config, drivemodel.ConfigOptions{
		Model: name, Params: &drivemodel.Params{}, CacheDirectory: filepath.Join(dir, "cache"),
	}); err != nil {
		t.Fatal(err)
	}
	rep, err := repo.Open(ctx, config, testPassword, nil)
	if err != nil {
		t.Fatal(err)
	}
	return rep, drivemodel.Shared(name), func() {
		rep.Close(context.Background())
		os.RemoveAll(dir)
	}
}

// vmData returns n bytes like a VM disk: 64 KiB blocks that are all zero,
// random, or text-like (compressible), deterministic for a seed.
func vmData(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, seed+1))
	cc := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	data := make([]byte, n)
	const block = 64 << 10
	words := []string{"kernel ", "libvirt ", "qemu ", "zfs ", "snapshot ", "0000 ", "\n", "the ", "disk "}
	for off := 0; off < n; off += block {
		b := data[off:min(off+block, n)]
		switch x := rng.IntN(10); {
		case x < 3: // zero
		case x < 8:
			cc.Read(b)
		default:
			for i := 0; i < len(b); {
				i += copy(b[i:], words[rng.IntN(len(words))])
			}
		}
	}
	return data
}

// randomData returns n incompressible bytes.
func randomData(n int, seed byte) []byte {
	data := make([]byte, n)
	rand.NewChaCha8([32]byte{seed, 0x5a}).Read(data)
	return data
}

// waitGoroutines waits until the number of goroutines is at most want.
func waitGoroutines(t testing.TB, want int, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= want {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%s: %d goroutines, want at most %d:\n%s", what, n, want, buf)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
