package restore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

// seedWorld is a VM disk backed up for several nights with scattered
// churn between them, every night uploaded to a kopia filesystem
// repository, the oldest nights' local snapshots destroyed (kopia alone
// holds them). The configuration reaches the repository through a drive
// model (no latency) whose counters are every byte fetched from the store.
type seedWorld struct {
	dataset string
	disks   [][]byte // images/disk.img, night by night
	guids   []uint64 // the nights' snapshots'
	pool    *testenv.Pool
	yaml    string
	model   *drivemodel.Model
	dir     string
}

var seedModelSeq int

func newSeedWorld(t *testing.T, splitter string, nights, keepLocal int) *seedWorld {
	return newSeedWorldUploading(t, splitter, nights, keepLocal, nights)
}

// newSeedWorldReplicated is newSeedWorld with every night also received
// on a second pool of this host (the configured replica), and no night
// left on the first: the seeds are the replica's.
func newSeedWorldReplicated(t *testing.T, splitter string, nights, keepReplica int) *seedWorld {
	return newSeedWorldOpts(t, splitter, nights, 0, nights, keepReplica)
}

// newSeedWorldUploading is newSeedWorld with only the first uploaded
// nights in kopia (the others local alone, not uploaded yet).
func newSeedWorldUploading(t *testing.T, splitter string, nights, keepLocal, uploaded int) *seedWorld {
	return newSeedWorldOpts(t, splitter, nights, keepLocal, uploaded, 0)
}

func newSeedWorldOpts(t *testing.T, splitter string, nights, keepLocal, uploaded, keepReplica int) *seedWorld {
	t.Helper()
	t.Setenv(kopiarepo.PasswordEnv, "")
	os.Unsetenv(kopiarepo.PasswordEnv)
	ctx := context.Background()
	pool := testenv.NewPool(t, 256)
	w := &seedWorld{dir: t.TempDir(), pool: pool}
	var mnt string
	w.dataset, mnt = pool.Dataset(t, "libvirt")
	if err := os.MkdirAll(filepath.Join(mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	kopiaCfg := filepath.Join(w.dir, "kopia.config")
	pwFile := filepath.Join(w.dir, "kopia.password")
	if err := os.WriteFile(pwFile, []byte(tlPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(w.dir, "repo")}, kopiaCfg, tlPassword, kopiarepo.CreateOptions{
		ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(w.dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	repo, err := kopiarepo.Open(ctx, kopiaCfg, tlPassword)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close(ctx)

	rng := rand.New(rand.NewPCG(21, uint64(nights)))
	cc := rand.NewChaCha8([32]byte{21})
	disk := make([]byte, 24<<20)
	cc.Read(disk)
	var snaps []string
	for night := range nights {
		if night > 0 { // a night of a VM: a few 64 KiB writes here and there
			for range 3 {
				off := rng.IntN(len(disk) - 64<<10)
				cc.Read(disk[off : off+64<<10])
			}
		}
		w.disks = append(w.disks, bytes.Clone(disk))
		name := filepath.Join(mnt, "images", "disk.img")
		if err := os.WriteFile(name, disk, 0o640); err != nil {
			t.Fatal(err)
		}
		// kopia takes a file whose size and mtime did not change from the
		// previous snapshot as it was: each night's writes get their own.
		mtime := time.Date(2023, 3, 4+night, 4, 0, 0, 0, time.Local)
		if err := os.Chtimes(name, mtime, mtime); err != nil {
			t.Fatal(err)
		}
		s, err := pool.ZFS.CreateSnapshot(ctx, w.dataset, fmt.Sprintf("2023-03-%02d_05:00:01", 4+night), nil)
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, s.FullName())
		w.guids = append(w.guids, s.GUID)
		if night >= uploaded {
			continue
		}
		view, err := pool.ZFS.OpenSnapshot(ctx, s.FullName())
		if err != nil {
			t.Fatal(err)
		}
		res, err := repo.Upload(ctx, kopiarepo.UploadRequest{
			Dir: view.Root, SourcePath: mnt, Host: "kvmhost", User: "root", StartTime: s.Creation,
			Tags: map[string]string{
				kopiarepo.TagDataset:  s.Dataset,
				kopiarepo.TagSnapshot: s.Name,
				kopiarepo.TagGUID:     strconv.FormatUint(s.GUID, 10),
			},
			Splitter: splitter, SkipMaintenance: true,
		})
		if cerr := closeView(ctx, view); cerr != nil {
			t.Fatal(cerr)
		}
		if err != nil || res.Snapshot.ID == "" {
			t.Fatalf("upload %s: %v (%+v)", s.FullName(), err, res)
		}
	}
	replicaYAML := ""
	if keepReplica > 0 {
		dst := testenv.NewPool(t, 256)
		replica := dst.Name + "/libvirt"
		for night, s := range snaps {
			send := zfs.SendOptions{Snapshot: s}
			if night > 0 {
				send.From = snaps[night-1]
			}
			if _, err := zfs.Transfer(ctx, pool.ZFS, send, dst.ZFS, replica, zfs.ReceiveOptions{}); err != nil {
				t.Fatalf("replicate night %d: %v", night+1, err)
			}
		}
		for _, s := range snaps[:nights-keepReplica] {
			if err := dst.ZFS.Destroy(ctx, replica+s[strings.IndexByte(s, '@'):]); err != nil {
				t.Fatal(err)
			}
		}
		replicaYAML = "replica:\n  target: " + replica + "\n"
	}
	for _, s := range snaps[:nights-keepLocal] {
		if err := pool.ZFS.Destroy(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	seedModelSeq++
	modelName := fmt.Sprintf("restore-seed-%d-%d", os.Getpid(), seedModelSeq)
	modelCfg := filepath.Join(w.dir, "model.config")
	if err := drivemodel.WriteConfig(kopiaCfg, modelCfg, drivemodel.ConfigOptions{Params: &drivemodel.Params{}, Model: modelName,
		CacheDirectory: filepath.Join(w.dir, "model-cache")}); err != nil {
		t.Fatal(err)
	}
	w.model = drivemodel.Shared(modelName)
	w.yaml = fmt.Sprintf("datasets: [%s]\nstate_dir: %s/state\nkopia:\n  config_file: %s\n  password_file: %s\n  host: kvmhost\n  user: root\n",
		w.dataset, w.dir, modelCfg, pwFile) + replicaYAML
	return w
}

// restoreOldest restores the oldest night's disk through a fresh session
// and returns the kopia source's counters and the bytes fetched from the
// store from the file's open to the end of the copy.
func (w *seedWorld) restoreOldest(t *testing.T, so restore.SessionOptions) (restore.SourceBytes, int64) {
	t.Helper()
	ctx := context.Background()
	cfg := (&sessionWorld{dir: w.dir}).config(t, w.yaml)
	s, err := restore.Open(ctx, cfg, so)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	entry, rel, err := s.ResolveFile(fmt.Sprintf("latest~%d:images/disk.img", len(w.disks)-1), "")
	if err != nil {
		t.Fatal(err)
	}
	if entry.Has(restore.KindLocal) || entry.Has(restore.KindReplica) {
		t.Fatalf("%s is still on ZFS", entry.FullName())
	}
	w.model.Reset()
	f, err := s.OpenFile(ctx, entry, rel)
	if err != nil {
		t.Fatal(err)
	}
	dest := filepath.Join(t.TempDir(), "disk.img")
	_, err = restore.Copy(ctx, f, dest, restore.CopyOptions{RangeSize: 1 << 20, NoSync: true,
		Identity: restore.SourceIdentity{Snapshot: entry.FullName(), Path: rel}})
	stats := f.Stats()
	f.Close()
	fetched := w.model.Stats().BytesFetched
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dest)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, w.disks[0]) {
		t.Fatalf("restored %s (seeding %v) differs from the disk of that night", entry.FullName(), !so.NoSeed)
	}
	for _, sb := range stats {
		if sb.Source == restore.SourceKopia {
			return sb, fetched
		}
	}
	t.Fatalf("no kopia source in %+v", stats)
	return restore.SourceBytes{}, 0
}

// With FIXED-128K, a restore of a night kopia alone holds, seeded from the
// local snapshots, fetches from the store little more than the chunks
// that differ from the oldest local night (the chunk tables and
// directories it reads to find its seeds included), and is identical.
func TestSeededRestoreFetchesWhatChanged(t *testing.T) {
	const chunk = 128 << 10
	w := newSeedWorld(t, "FIXED-128K", 5, 2)
	oldest, oldestLocal := w.disks[0], w.disks[3]
	var differ int64
	for off := 0; off < len(oldest); off += chunk {
		end := min(off+chunk, len(oldest))
		if !bytes.Equal(oldest[off:end], oldestLocal[off:end]) {
			differ += int64(end - off)
		}
	}

	seeded, seededFetched := w.restoreOldest(t, restore.SessionOptions{})
	plain, plainFetched := w.restoreOldest(t, restore.SessionOptions{NoSeed: true})
	t.Logf("%d bytes differ from the oldest local night; seeded: %d fetched (%v, %d mismatches); unseeded: %d fetched",
		differ, seededFetched, seeded.Seeded, seeded.SeedMismatches, plainFetched)
	if differ == 0 {
		t.Fatal("the nights do not differ")
	}
	if limit := differ * 3 / 2; seededFetched > limit {
		t.Errorf("the seeded restore fetched %d bytes from the store, more than 1.5× the %d bytes of chunks that changed", seededFetched, differ)
	}
	if seeded.SeededBytes() < int64(len(oldest))-differ {
		t.Errorf("seeded %d bytes (%v), want at least the %d unchanged", seeded.SeededBytes(), seeded.Seeded, int64(len(oldest))-differ)
	}
	if want := "local " + w.dataset + "@2023-03-07_05:00:01"; seeded.Seeded[want] == 0 {
		t.Errorf("nothing seeded from the oldest local night %s: %v", want, seeded.Seeded)
	}
	if seeded.SeedMismatches != 0 || seeded.SeedReadErrors != 0 {
		t.Errorf("%d seed mismatches, %d read errors: the twin's chunk table proposes only what it holds", seeded.SeedMismatches, seeded.SeedReadErrors)
	}
	if plain.SeededBytes() != 0 || plainFetched < int64(len(oldest)) {
		t.Errorf("--no-seed: seeded %v, fetched %d bytes of a %d-byte file", plain.Seeded, plainFetched, len(oldest))
	}
	w.checkNothingHeld(t)
}

// checkNothingHeld fails when a seed's clone or restore hold is left on the
// pool after the sessions closed.
func (w *seedWorld) checkNothingHeld(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	held, err := w.pool.ZFS.HoldsWithPrefix(ctx, w.dataset, restore.RestoreHoldPrefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(held) > 0 {
		t.Errorf("restore holds left after the sessions closed: %v", held)
	}
	out, err := exec.Command("zfs", "list", "-H", "-o", "name", "-r", w.pool.Name).CombinedOutput()
	if err != nil {
		t.Fatalf("zfs list: %v: %s", err, out)
	}
	if strings.Contains(string(out), "vmhistory-ro-") {
		t.Errorf("read-only clones left after the sessions closed:\n%s", out)
	}
}

// With DYNAMIC-4M-BUZHASH little is shared chunk for chunk after a few
// nights of scattered writes: seeding still gives the same bytes and
// costs no more from the store than a restore without it.
func TestSeededRestoreDynamicNoRegression(t *testing.T) {
	w := newSeedWorld(t, "DYNAMIC-4M-BUZHASH", 5, 2)
	seeded, seededFetched := w.restoreOldest(t, restore.SessionOptions{})
	_, plainFetched := w.restoreOldest(t, restore.SessionOptions{NoSeed: true})
	t.Logf("seeded: %d fetched (%v); unseeded: %d fetched", seededFetched, seeded.Seeded, plainFetched)
	if seededFetched > plainFetched*11/10 {
		t.Errorf("seeded restore fetched %d bytes, unseeded %d: more than 1.1×", seededFetched, plainFetched)
	}
}

// seedMaps are the seed map files under the world's state directory, by
// the guid directory they sit in.
func (w *seedWorld) seedMaps(t *testing.T) map[string]string {
	t.Helper()
	found := map[string]string{}
	root := filepath.Join(w.dir, "state", restore.SeedMapDir)
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && filepath.Ext(p) == ".map" {
			found[filepath.Base(filepath.Dir(p))] = p
		}
		return err
	})
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return found
}

// reverseSeedMapHashes rewrites a seed map so that each range claims the
// hash of another (the last range's for the first, and so on): every
// entry is wrong.
func reverseSeedMapHashes(t *testing.T, path string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	nl := bytes.IndexByte(data, '\n')
	hl := bytes.IndexByte(data[nl+1:], '\n') + nl + 1
	var h struct {
		HashBytes int `json:"hash_bytes"`
		Ranges    int `json:"ranges"`
	}
	if err := json.Unmarshal(data[nl+1:hl], &h); err != nil {
		t.Fatal(err)
	}
	recs, rec := data[hl+1:], 12+h.HashBytes
	if h.Ranges < 2 || len(recs) != h.Ranges*rec {
		t.Fatalf("seed map %s: %d ranges in %d bytes", path, h.Ranges, len(recs))
	}
	hashes := make([][]byte, h.Ranges)
	for i := range hashes {
		hashes[i] = bytes.Clone(recs[i*rec+12 : (i+1)*rec])
	}
	for i := range hashes {
		copy(recs[i*rec+12:(i+1)*rec], hashes[len(hashes)-1-i])
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// Seeded from local snapshots kopia does not hold yet (no chunk table to
// read), a restore probes each chunk at its own offset and keeps what it
// learned in a seed map per snapshot and file: the next restore reads no
// changed chunk from the seeds. A seed map edited to be wrong costs
// mismatches, which say so, and the chunks come from the store: the bytes
// are still the file's.
func TestSeedMapsOfLocalOnlySnapshots(t *testing.T) {
	w := newSeedWorldUploading(t, "FIXED-128K", 5, 2, 3) // nights 4 and 5 local only
	first, firstFetched := w.restoreOldest(t, restore.SessionOptions{})
	t.Logf("first: fetched %d, %+v", firstFetched, first)
	if first.SeededBytes() < int64(len(w.disks[0]))/2 || first.SeedProbeMisses == 0 || first.SeedMismatches != 0 {
		t.Errorf("first restore: seeded %d of %d bytes, %d probe misses, %d mismatches; want most seeded, probes missing the changed chunks, no mismatch",
			first.SeededBytes(), len(w.disks[0]), first.SeedProbeMisses, first.SeedMismatches)
	}
	maps := w.seedMaps(t)
	night4 := strconv.FormatUint(w.guids[3], 10)
	if maps[night4] == "" {
		t.Fatalf("no seed map of night 4 (guid %s) written: %v", night4, maps)
	}

	second, secondFetched := w.restoreOldest(t, restore.SessionOptions{})
	t.Logf("second: fetched %d, %+v", secondFetched, second)
	if second.SeedProbeMisses != 0 || second.SeedMismatches != 0 || second.SeededBytes() != first.SeededBytes() {
		t.Errorf("restore with the seed maps: %d probe misses, %d mismatches, seeded %d (first %d); want no miss and as much seeded",
			second.SeedProbeMisses, second.SeedMismatches, second.SeededBytes(), first.SeededBytes())
	}
	if secondFetched > firstFetched {
		t.Errorf("restore with the seed maps fetched %d bytes, the first %d", secondFetched, firstFetched)
	}

	reverseSeedMapHashes(t, maps[night4])
	wrong, wrongFetched := w.restoreOldest(t, restore.SessionOptions{})
	t.Logf("wrong map: fetched %d, %+v", wrongFetched, wrong)
	if wrong.SeedMismatches == 0 {
		t.Errorf("a seed map edited to be wrong gave no mismatch: %+v", wrong)
	}
	if wrongFetched <= secondFetched {
		t.Errorf("with a wrong seed map %d bytes were fetched, with the right one %d: the chunks it lied about must come from the store", wrongFetched, secondFetched)
	}
}

// failingSeed fails every read after its first 4 MiB, as a disk going
// bad in the middle of a restore.
type failingSeed struct {
	io.ReaderAt
	read atomic.Int64
}

func (f *failingSeed) ReadAt(p []byte, off int64) (int, error) {
	if f.read.Add(int64(len(p))) > 4<<20 {
		return 0, errors.New("injected seed read error")
	}
	return f.ReaderAt.ReadAt(p, off)
}

// Read errors of the seeds in the middle of a restore send their chunks
// to the store: the result is the file, and the counters say so.
func TestSeedReadErrorsMidRestore(t *testing.T) {
	w := newSeedWorld(t, "FIXED-128K", 5, 2)
	var seeds []*failingSeed
	var mu sync.Mutex
	defer restore.SetSeedFileHook(func(r io.ReaderAt) io.ReaderAt {
		f := &failingSeed{ReaderAt: r}
		mu.Lock()
		seeds = append(seeds, f)
		mu.Unlock()
		return f
	})()
	got, fetched := w.restoreOldest(t, restore.SessionOptions{})
	t.Logf("fetched %d, %+v", fetched, got)
	if len(seeds) == 0 {
		t.Fatal("no seed file opened")
	}
	if got.SeedReadErrors == 0 || got.SeededBytes() == 0 {
		t.Errorf("seeded %d bytes with %d read errors; want some seeded before the errors, and the errors counted", got.SeededBytes(), got.SeedReadErrors)
	}
	if fetched < int64(len(w.disks[0]))/2 {
		t.Errorf("fetched %d bytes of a %d-byte file whose seeds failed after 4 MiB each", fetched, len(w.disks[0]))
	}
}

// cp of the oldest night's disk through the mount is seeded as the
// restore is: it fetches from the store at most 1.2× what the seeded
// restore fetched, and reads the night's bytes.
func TestSeededCopyThroughTheMount(t *testing.T) {
	w := newSeedWorld(t, "FIXED-128K", 5, 2)
	_, restored := w.restoreOldest(t, restore.SessionOptions{})

	ctx := context.Background()
	cfg := (&sessionWorld{dir: w.dir}).config(t, w.yaml)
	s, err := restore.Open(ctx, cfg, restore.SessionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	dir := t.TempDir()
	m, err := fusefs.MountTimeline(ctx, dir, s.Refresher(), fusefs.Options{Refresh: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Unmount()
	path := filepath.Join(dir, "2023-03-04_05:00:01", "images", "disk.img")
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
	w.model.Reset()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	copied := w.model.Stats().BytesFetched
	if !bytes.Equal(got, w.disks[0]) {
		t.Fatal("the oldest night's disk read through the mount differs from it")
	}
	t.Logf("fetched from the store: restore %d bytes, cp through the mount %d", restored, copied)
	if copied > restored*6/5 {
		t.Errorf("cp through the mount fetched %d bytes, the seeded restore %d: more than 1.2×", copied, restored)
	}
}

// A replica on a pool of this host seeds as the local snapshots do.
func TestSeededFromAReplicaOnThisHost(t *testing.T) {
	w := newSeedWorldReplicated(t, "FIXED-128K", 5, 2)
	got, fetched := w.restoreOldest(t, restore.SessionOptions{})
	t.Logf("fetched %d, %+v", fetched, got)
	if want := "replica " + w.dataset + "@2023-03-07_05:00:01"; got.Seeded[want] < int64(len(w.disks[0]))/2 {
		t.Errorf("seeded %v, want most of the file from %s", got.Seeded, want)
	}
	if fetched > int64(len(w.disks[0]))/4 {
		t.Errorf("fetched %d bytes of a %d-byte file seeded from the replica", fetched, len(w.disks[0]))
	}
}

// Seeds that take long to find do not hold the file back: past the wait,
// reads go to the store, and the seeds serve the rest once found.
func TestSlowSeedsDoNotHoldTheReadBack(t *testing.T) {
	w := newSeedWorld(t, "FIXED-128K", 5, 2)
	defer restore.SetSeedWait(100 * time.Millisecond)()
	defer restore.SetSeedFileHook(func(r io.ReaderAt) io.ReaderAt {
		time.Sleep(time.Second) // the build, slowed down
		return r
	})()
	start := time.Now()
	got, fetched := w.restoreOldest(t, restore.SessionOptions{})
	t.Logf("%v: fetched %d, %+v", time.Since(start), fetched, got)
	if fetched < int64(len(w.disks[0]))/2 {
		t.Errorf("fetched %d bytes of %d: the reads waited for the slow seeds", fetched, len(w.disks[0]))
	}
}
