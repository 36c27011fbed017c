package restore_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
)

// seedWorld is a VM disk backed up for several nights with scattered
// churn between them, every night uploaded to a kopia filesystem
// repository, the oldest nights' local snapshots destroyed (kopia alone
// holds them). The configuration reaches the repository through a drive
// model (no latency) whose counters are every byte fetched from the store.
type seedWorld struct {
	dataset string
	disks   [][]byte // images/disk.img, night by night
	yaml    string
	model   *drivemodel.Model
	dir     string
}

var seedModelSeq int

func newSeedWorld(t *testing.T, splitter string, nights, keepLocal int) *seedWorld {
	t.Helper()
	t.Setenv(kopiarepo.PasswordEnv, "")
	os.Unsetenv(kopiarepo.PasswordEnv)
	ctx := context.Background()
	pool := testenv.NewPool(t, 256)
	w := &seedWorld{dir: t.TempDir()}
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
		w.dataset, w.dir, modelCfg, pwFile)
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
	if entry.Has(restore.KindLocal) {
		t.Fatalf("%s is still local", entry.FullName())
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
