package bench

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/safefile"
)

// Defaults of RestoreSeeded.
const (
	DefaultSeededNights    = 5
	DefaultSeededKeepLocal = 2
	// DefaultSeededChurn is the share of the disk a night rewrites, in
	// 64 KiB writes at random offsets ("a few %").
	DefaultSeededChurn = 0.03
	seededWrite        = 64 << 10
)

// SeededOptions configure RestoreSeeded beside RestoreOptions.
type SeededOptions struct {
	// Nights of the VM disk, each snapshotted and uploaded to kopia;
	// KeepLocal of them (the newest) are kept on the pool, the others are
	// in kopia alone. The oldest night is the one restored.
	Nights, KeepLocal int
	// Churn is the share of the disk rewritten each night.
	Churn float64
	// LinkRate, when positive, caps the presets' total bandwidth (bytes
	// per second, all streams together): the drive preset allows
	// 400 MiB/s, more than most links to a cloud drive, and on a machine
	// whose store, pool and destination share one disk the disk is then
	// the limit of every restore, seeded or not.
	LinkRate float64
}

// RestoreSeeded measures what seeding (issue 15) saves a restore of a
// file kopia alone holds: a VM-like disk is written, then changed night
// after night by scattered writes; every night is snapshotted and uploaded
// to a kopia repository with the splitter o.Splitters[0] (default
// FIXED-128K); all but the newest KeepLocal snapshots are destroyed on the
// pool; the oldest night is restored as "vmhistory restore" restores it (a
// session of the local pool and the repository through the drive model,
// the file copied out with its SHA-256, synced), with and without seeding
// from the local snapshots, under each preset, caches cold (a fresh
// connection and kopia cache, page caches dropped). Each row gives the
// wall time from the session's open to the synced copy, the bytes fetched
// from the store (everything: format blob, indexes, manifests, the chunk
// tables seeding reads to find its seeds), and, for a fixed splitter,
// those bytes against the chunks of the restored file that hold any byte
// differing from the oldest local night at the same offset, computed from
// the two files.
func RestoreSeeded(ctx context.Context, o RestoreOptions, so SeededOptions) (*Table, error) {
	const what = "bench restore --seeded"
	if len(o.Splitters) == 0 {
		o.Splitters = []string{"FIXED-128K"}
	}
	if len(o.Presets) == 0 {
		o.Presets = []string{"drive"}
	}
	if err := o.check(); err != nil {
		return nil, err
	}
	if len(o.Splitters) > 1 {
		return nil, fmt.Errorf("%s: give one splitter for the repository, not %d", what, len(o.Splitters))
	}
	if len(o.Windows) > 1 {
		return nil, fmt.Errorf("%s: give one prefetch window, not %d", what, len(o.Windows))
	}
	so.Nights = cmp.Or(so.Nights, DefaultSeededNights)
	so.KeepLocal = cmp.Or(so.KeepLocal, DefaultSeededKeepLocal)
	if so.Churn == 0 {
		so.Churn = DefaultSeededChurn
	}
	if so.KeepLocal < 1 || so.Nights <= so.KeepLocal {
		return nil, fmt.Errorf("%s: %d nights with %d kept local: the oldest night must be in kopia alone (nights > local ≥ 1)", what, so.Nights, so.KeepLocal)
	}
	if so.Churn <= 0 || so.Churn >= 1 {
		return nil, fmt.Errorf("%s: churn %g: give a share of the disk between 0 and 1", what, so.Churn)
	}
	window := 0
	if len(o.Windows) == 1 {
		window = o.Windows[0]
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string) {}
	}
	if err := dropCaches(); err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp(o.WorkDir, "vmhistory-bench-seeded-")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer os.RemoveAll(work)
	size := o.Size
	if o.Data != "" {
		fi, err := os.Stat(o.Data)
		if err != nil {
			return nil, fmt.Errorf("%s: --data: %w", what, err)
		}
		size = fi.Size()
	}
	if size < 4*seededWrite {
		return nil, fmt.Errorf("%s: a %d-byte file is too small for nights of 64 KiB writes", what, size)
	}
	progress(fmt.Sprintf("creating a zfs-fuse pool in %s", work))
	churned := int64(float64(size) * so.Churn * float64(so.Nights))
	pool, err := newBenchPool(ctx, work, size+churned+size/4+256<<20, what)
	if err != nil {
		return nil, err
	}
	defer pool.destroy()

	w, err := newSeededWorld(ctx, pool, work, size, o, so, progress)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}

	type caseDef struct {
		preset string
		kind   seededKind
	}
	var cases []caseDef
	for _, p := range o.Presets {
		cases = append(cases, caseDef{p, restoreUnseeded}, caseDef{p, restoreSeeded}, caseDef{p, restoreLocal})
	}
	runs := make([][]seededRun, len(cases))
	for rep := range o.Repeat {
		for _, i := range repeatOrder(len(cases), rep) {
			c := cases[i]
			name := c.preset + ", " + c.kind.label()
			progress(fmt.Sprintf("run %d/%d: %s", rep+1, o.Repeat, name))
			if err := dropCaches(); err != nil {
				return nil, err
			}
			r, err := w.restore(ctx, c.preset, c.kind, window, so.LinkRate)
			if err != nil {
				return nil, fmt.Errorf("%s: %s: %w", what, name, err)
			}
			progress(fmt.Sprintf("  %.1f s, %.0f MiB from the store", r.took.Seconds(), float64(r.fetched)/(1<<20)))
			runs[i] = append(runs[i], r)
		}
	}

	sp := o.Splitters[0]
	t := &Table{
		Title: fmt.Sprintf("Restore of the oldest of %d nights of a %s VM-like disk (%s repository), kopia alone holding it, the newest %d nights local (median of %d)",
			so.Nights, humanSize(size), sp, so.KeepLocal, o.Repeat),
		Columns: []string{"preset", "restore", "seconds", "MB/s", "store MiB", "store / changed chunks", "seeded MiB", "speed-up"},
	}
	unseeded := map[string]time.Duration{}
	for i, c := range cases {
		r := medianSeeded(runs[i])
		vsChanged, speedup := Str("-"), Str("-")
		if w.changed > 0 && c.kind != restoreLocal {
			vsChanged = Num(float64(r.fetched)/float64(w.changed), "%.2f×")
		}
		if c.kind == restoreUnseeded {
			unseeded[c.preset] = r.took
		} else if u := unseeded[c.preset]; u > 0 {
			speedup = Num(u.Seconds()/r.took.Seconds(), "%.1f×")
		}
		t.Add(Str(c.preset), Str(c.kind.label()), Num(r.took.Seconds(), "%.2f"), Num(float64(size)/r.took.Seconds()/1e6, "%.1f"),
			Num(float64(r.fetched)/(1<<20), "%.1f"), vsChanged, Num(float64(r.seeded)/(1<<20), "%.1f"), speedup)
	}
	changed := "the splitter's chunks move with the content: not computed"
	if w.changed > 0 {
		changed = fmt.Sprintf("%.1f MiB (%.1f%% of the file)", float64(w.changed)/(1<<20), 100*float64(w.changed)/float64(size))
	}
	t.Notes = append(t.Notes,
		fmt.Sprintf("Each night rewrote %.1f%% of the disk in 64 KiB writes at random offsets; restored: night 1, kopia alone; seeds: nights %d-%d on the pool (every night uploaded, so the seeds are read through their kopia twins' chunk tables).",
			100*so.Churn, so.Nights-so.KeepLocal+1, so.Nights),
		"changed chunks: the restored file's chunks holding a byte that differs from the oldest local night at the same offset: "+changed+".",
		"seconds: from the session's open (sources, timeline) to the restored file synced with its SHA-256, as vmhistory restore; a fresh connection and kopia cache through the preset, page caches dropped, every run.",
		fmt.Sprintf("local: the newest night (%s), on the pool, restored by the same command from this host's own snapshot, with the session's kopia connection through the same preset: the restore no copy from the store can beat on this machine (its output is the same size, written and synced the same way), so its speed-up is the most that seeding could reach here.", w.newest),
		"store MiB: every byte the drive model served, the repository's format blob, indexes and manifests and the chunk tables seeding reads included; seeded MiB: chunks taken from the local snapshots (each verified against its content ID).",
		fmt.Sprintf("Every restored file was checked against night 1's SHA-256 (%s…).", w.sha[:12]),
		"Presets model a distant store: drive = 150 ms per request, 20 MiB/s per stream, 400 MiB/s total, 1% 429/5xx; seed = 1.2 s, 6 MiB/s per stream, 400 MiB/s total.")
	if so.LinkRate > 0 {
		t.Title += fmt.Sprintf(", link capped at %.1f MiB/s", so.LinkRate/(1<<20))
		t.Notes = append(t.Notes, fmt.Sprintf("--link-rate: every preset's total bandwidth capped at %.1f MiB/s (%.0f Mbit/s).", so.LinkRate/(1<<20), so.LinkRate*8/1e6))
	}
	return t, nil
}

// seededKind is one restore of RestoreSeeded.
type seededKind int

const (
	restoreUnseeded seededKind = iota // the old night, --no-seed
	restoreSeeded                     // the old night, seeded
	restoreLocal                      // the newest night, from the pool: the floor
)

func (k seededKind) label() string {
	switch k {
	case restoreSeeded:
		return "seeded"
	case restoreLocal:
		return "local (the floor)"
	}
	return "unseeded (--no-seed)"
}

// seededWorld is the pool, its dataset and the repository of RestoreSeeded.
type seededWorld struct {
	work, dataset, file string
	kopiaConfig         string
	password            string
	target              string // the restored snapshot, dataset@name
	sha                 string // its file's SHA-256
	newest, newestSHA   string // the newest night, on the pool, and its file's SHA-256
	changed             int64  // bytes of its chunks that differ from the oldest local night
	size                int64
}

func newSeededWorld(ctx context.Context, pool *benchPool, work string, size int64, o RestoreOptions, so SeededOptions, progress func(string)) (*seededWorld, error) {
	w := &seededWorld{work: work, dataset: pool.name + "/vms", file: "disk.img", size: size}
	if err := pool.z.CreateDataset(ctx, w.dataset, nil); err != nil {
		return nil, err
	}
	mnt := filepath.Join(pool.mnt, "vms")
	disk := filepath.Join(mnt, w.file)
	if o.Data == "" {
		progress(fmt.Sprintf("generating %s of VM-like data in the pool", humanSize(o.Size)))
		if err := generateVMData(disk, o.Size); err != nil {
			return nil, err
		}
	} else {
		progress(fmt.Sprintf("copying %s into the pool", o.Data))
		if err := copyFile(o.Data, disk); err != nil {
			return nil, fmt.Errorf("--data: %w", err)
		}
	}
	sp := o.Splitters[0]
	base := filepath.Join(work, "repo")
	w.kopiaConfig, w.password = filepath.Join(base, "kopia.config"), benchPassword
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(base, "blobs")}, w.kopiaConfig, w.password,
		kopiarepo.CreateOptions{Splitter: sp, ConnectOptions: kopiarepo.ConnectOptions{
			Host: "bench", User: "root", CacheDirectory: filepath.Join(base, "cache")}}); err != nil {
		return nil, err
	}
	r, err := kopiarepo.Open(ctx, w.kopiaConfig, w.password)
	if err != nil {
		return nil, err
	}
	defer r.Close(ctx)

	rng := rand.New(rand.NewPCG(15, uint64(w.size)))
	writes := max(1, int(float64(w.size)*so.Churn)/seededWrite)
	var snaps []string
	for night := range so.Nights {
		if night > 0 {
			progress(fmt.Sprintf("night %d: %d writes of 64 KiB at random offsets", night+1, writes))
			if err := churnFile(disk, w.size, writes, rng); err != nil {
				return nil, err
			}
		}
		// kopia takes a file whose size and mtime match the previous
		// snapshot's as unchanged: each night gets its own mtime.
		mtime := time.Date(2026, 1, 1+night, 4, 0, 0, 0, time.UTC)
		if err := os.Chtimes(disk, mtime, mtime); err != nil {
			return nil, err
		}
		s, err := pool.z.CreateSnapshot(ctx, w.dataset, fmt.Sprintf("night-%d", night+1), nil)
		if err != nil {
			return nil, err
		}
		snaps = append(snaps, s.FullName())
		progress(fmt.Sprintf("uploading %s", s.FullName()))
		view, err := pool.z.OpenSnapshot(ctx, s.FullName())
		if err != nil {
			return nil, err
		}
		_, err = r.Upload(ctx, kopiarepo.UploadRequest{
			Dir: view.Root, SourcePath: mnt, Host: "bench", User: "root", StartTime: s.Creation,
			Tags: map[string]string{
				kopiarepo.TagDataset:  s.Dataset,
				kopiarepo.TagSnapshot: s.Name,
				kopiarepo.TagGUID:     strconv.FormatUint(s.GUID, 10),
			},
			Splitter: sp, Compression: "none", SkipMaintenance: true,
		})
		closeViewRetrying(view)
		if err != nil {
			return nil, fmt.Errorf("upload %s: %w", s.FullName(), err)
		}
	}
	w.target, w.newest = snaps[0], snaps[len(snaps)-1]
	if w.newestSHA, err = sha256File(disk); err != nil {
		return nil, err
	}
	oldestLocal := snaps[so.Nights-so.KeepLocal]
	progress(fmt.Sprintf("comparing %s with %s", w.target, oldestLocal))
	if w.sha, w.changed, err = compareNights(ctx, pool, w.target, oldestLocal, w.file, fixedChunkSize(sp)); err != nil {
		return nil, err
	}
	for _, s := range snaps[:so.Nights-so.KeepLocal] {
		if err := pool.z.Destroy(ctx, s); err != nil {
			return nil, err
		}
	}
	return w, nil
}

// churnFile writes n blocks of 64 KiB of random bytes at random offsets
// of the file, in place.
func churnFile(path string, size int64, n int, rng *rand.Rand) error {
	f, err := safefile.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	block := make([]byte, seededWrite)
	for range n {
		for i := 0; i+8 <= len(block); i += 8 {
			v := rng.Uint64()
			for j := range 8 {
				block[i+j] = byte(v >> (8 * j))
			}
		}
		off := rng.Int64N(size - seededWrite + 1)
		if _, err := f.WriteAt(block, off); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// fixedChunkSize is the chunk size of a FIXED-* splitter, 0 for another.
func fixedChunkSize(splitter string) int64 {
	s, ok := strings.CutPrefix(splitter, "FIXED-")
	if !ok {
		return 0
	}
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0
	}
	return n * mult
}

// compareNights reads file of the two snapshots through their clones and
// returns the SHA-256 of target's and the bytes of target's chunk-sized
// blocks that differ from other's (0 without a chunk size).
func compareNights(ctx context.Context, pool *benchPool, target, other, file string, chunk int64) (string, int64, error) {
	tv, err := pool.z.OpenSnapshot(ctx, target)
	if err != nil {
		return "", 0, err
	}
	defer closeViewRetrying(tv)
	ov, err := pool.z.OpenSnapshot(ctx, other)
	if err != nil {
		return "", 0, err
	}
	defer closeViewRetrying(ov)
	a, err := os.Open(filepath.Join(tv.Root, file))
	if err != nil {
		return "", 0, err
	}
	defer a.Close()
	b, err := os.Open(filepath.Join(ov.Root, file))
	if err != nil {
		return "", 0, err
	}
	defer b.Close()
	block := cmp.Or(chunk, 1<<20)
	ba, bb := make([]byte, block), make([]byte, block)
	h := sha256.New()
	var changed int64
	for {
		n, err := io.ReadFull(a, ba)
		if n > 0 {
			h.Write(ba[:n])
			m, _ := io.ReadFull(b, bb[:n])
			if chunk > 0 && (m != n || !bytes.Equal(ba[:n], bb[:n])) {
				changed += int64(n)
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return "", 0, err
		}
	}
	return hex.EncodeToString(h.Sum(nil)), changed, nil
}

type seededRun struct {
	took    time.Duration
	fetched int64 // from the store
	seeded  int64
}

func medianSeeded(runs []seededRun) seededRun {
	s := slices.Clone(runs)
	slices.SortFunc(s, func(a, b seededRun) int { return cmp.Compare(a.took, b.took) })
	return s[len(s)/2]
}

// restore restores the target night's file (the newest night's for
// restoreLocal) as vmhistory restore does, through a fresh session whose kopia connection goes through a drive
// model with preset's parameters and an empty cache.
func (w *seededWorld) restore(ctx context.Context, preset string, kind seededKind, window int, linkRate float64) (seededRun, error) {
	var res seededRun
	conn, err := os.MkdirTemp(w.work, "conn-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(conn)
	name := fmt.Sprintf("bench-seeded-%d", modelSeq.Add(1))
	modelCfg := filepath.Join(conn, "model.config")
	params := drivemodel.MustPreset(preset)
	if linkRate > 0 {
		params.TotalBytesPerSecond = linkRate
	}
	if err := drivemodel.WriteConfig(w.kopiaConfig, modelCfg, drivemodel.ConfigOptions{Model: name, Params: &params,
		CacheDirectory: filepath.Join(conn, "cache")}); err != nil {
		return res, err
	}
	model := drivemodel.Shared(name)
	defer model.SetParams(drivemodel.Params{})
	pwFile := filepath.Join(conn, "password")
	if err := os.WriteFile(pwFile, []byte(w.password+"\n"), 0o600); err != nil {
		return res, err
	}
	yaml := fmt.Sprintf("datasets: [%s]\nstate_dir: %s\nkopia:\n  config_file: %s\n  password_file: %s\n  host: bench\n  user: root\n",
		w.dataset, filepath.Join(conn, "state"), modelCfg, pwFile)
	cfg, err := config.Parse([]byte(yaml), filepath.Join(conn, "config.yaml"))
	if err != nil {
		return res, err
	}
	dest := filepath.Join(conn, "restored")
	if err := os.Mkdir(dest, 0o700); err != nil {
		return res, err
	}

	seeded := kind == restoreSeeded
	snap, sha := w.target, w.sha
	if kind == restoreLocal {
		snap, sha = w.newest, w.newestSHA
	}
	r, err := restoreFile(ctx, cfg, restore.SessionOptions{NoSeed: !seeded, PrefetchWindow: window, Logger: slog.New(slog.DiscardHandler)},
		model, snap, w.file, filepath.Join(dest, w.file), kind == restoreLocal)
	if err != nil {
		return res, err
	}
	res.took = r.took
	if r.copy.SHA256 != sha {
		return res, fmt.Errorf("the restored file's SHA-256 is %s, %s's %s", r.copy.SHA256, snap, sha)
	}
	res.fetched = r.fetched
	for _, sb := range r.stats {
		res.seeded += sb.SeededBytes()
	}
	if seeded && res.seeded == 0 {
		return res, errors.New("nothing was seeded from the local snapshots")
	}
	return res, nil
}

// restoredFile is what restoreFile did.
type restoredFile struct {
	copy    restore.CopyResult
	took    time.Duration         // from the session's open to the copy's end
	fetched int64                 // from the store, once the file was closed
	stats   []restore.SourceBytes // the file's, at the copy's end
}

// restoreFile restores snap's (dataset@name) file rel to dest as vmhistory
// restore does: a session opened from cfg with so (its Start now), Locate,
// OpenFile and restore.Copy; kopia must hold the night, not the pool,
// unless local (the night on the pool, restored from there). fetched is
// model's count before the session closes.
func restoreFile(ctx context.Context, cfg *config.Config, so restore.SessionOptions, model *drivemodel.Model, snap, rel, dest string, local bool) (restoredFile, error) {
	var r restoredFile
	start := time.Now()
	so.Start = start
	sess, err := restore.Open(ctx, cfg, so)
	if err != nil {
		return r, err
	}
	defer sess.Close()
	if errs := slices.Concat(sess.Unavailable(), sess.Unlisted()); len(errs) > 0 {
		return r, errors.Join(errs...)
	}
	target, err := sess.Locate(ctx, snap+":"+rel, "")
	if err != nil {
		return r, err
	}
	if target.Entry.Has(restore.KindLocal) != local {
		if local {
			return r, fmt.Errorf("%s is not on the pool", snap)
		}
		return r, fmt.Errorf("%s is still on the pool", snap)
	}
	f, err := sess.OpenFile(ctx, target.Entry, target.Rel)
	if err != nil {
		return r, err
	}
	r.copy, err = restore.Copy(ctx, f, dest, restore.CopyOptions{Identity: target.Identity(), SourceBytes: f.BytesBySource})
	r.took = time.Since(start)
	r.stats = f.Stats()
	f.Close()
	if err != nil {
		return r, err
	}
	r.fetched = model.Stats().BytesFetched
	return r, nil
}
