package bench

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/kopia/kopia/repo/object"
	"github.com/kopia/kopia/repo/splitter"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
	"github.com/vmhistory/vmhistory/safefile"
)

// RestoreOptions choose what "vmhistory bench restore" measures.
type RestoreOptions struct {
	// Size of the generated file (when no Data is given).
	Size int64
	// Data, when set, is a file of the user's to measure instead of
	// generated data.
	Data string
	// Splitters to build a repository with (one each).
	Splitters []string
	// Presets of the drive model: none, drive, seed.
	Presets []string
	// Windows of the prefetching reader to try.
	Windows []int
	// Repeat measures each case this many times and reports the median.
	Repeat int
	// KopiaStyleAll measures the kopia-style read for every splitter; by
	// default only for DYNAMIC-4M-BUZHASH (kopia's default), because with
	// FIXED-128K it pays one round trip per 128 KiB: hours under seed.
	KopiaStyleAll bool
	// GroupBytes and MaxGap tune how the prefetching reader groups small
	// chunks of one pack (zero: its defaults).
	GroupBytes, MaxGap int64
	// WorkDir holds the throwaway repositories; a temporary directory
	// when empty. Removed afterwards either way.
	WorkDir string
	// WriteReads writes each read into a file in WorkDir (removed after
	// it), every byte, zeros too, through the page cache and without a
	// sync, as "kopia snapshot restore" writes its output: the time then
	// compares with the CLI's. By default the bytes are only read.
	WriteReads bool
	// Progress, when set, receives one line per step.
	Progress func(string)

	// Existing, when set, measures a file already in a kopia repository
	// instead of uploading one: the very file, repository and link the
	// kopia CLI reads, for a side-by-side with it. Size, Data and
	// Splitters are then not used.
	Existing *ExistingFile

	// headBytes, when set, replaces DefaultHeadBytes (for tests, which
	// read small files).
	headBytes int64
}

// ExistingFile is a file of a kopia snapshot to measure (see
// RestoreOptions.Existing).
type ExistingFile struct {
	// ConfigFile and Password open the repository. Every read connects
	// afresh from a copy of the config with an empty cache of its own.
	ConfigFile, Password string
	// Object holds the file's bytes; Size is its length.
	Object object.ID
	Size   int64
	// Label names it in the table's splitter column (e.g. the spec).
	Label string
}

const benchPassword = "vmhistory-bench"

// dynamicSplitter is kopia's default, the one "kopia mount" users have.
const dynamicSplitter = "DYNAMIC-4M-BUZHASH"

var modelSeq atomic.Int64

// Restore reads the same file (a) as kopia mount + cp does — a fresh
// connection with an empty cache, repo.OpenObject and io.CopyBuffer with a
// 1 MiB buffer — and (b) with vmhistory's prefetching reader, also fresh
// and cold, for each window, under each drive-model preset, on one
// throwaway repository per splitter. The chart is MB/s per window, one
// line per preset (and splitter), the kopia-style read drawn at window 1
// (one chunk in flight).
func Restore(ctx context.Context, o RestoreOptions) (*Table, *Chart, error) {
	if err := o.check(); err != nil {
		return nil, nil, err
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string) {}
	}
	work, err := os.MkdirTemp(o.WorkDir, "vmhistory-bench-restore-")
	if err != nil {
		return nil, nil, fmt.Errorf("bench restore: %w", err)
	}
	defer os.RemoveAll(work)

	dataDir := filepath.Join(work, "data")
	src := o.Data
	if o.Existing != nil {
		src = "existing"
	} else if src == "" {
		if err := os.MkdirAll(dataDir, 0o700); err != nil {
			return nil, nil, err
		}
		src = filepath.Join(dataDir, "disk.img")
		progress(fmt.Sprintf("generating %s of VM-like data", humanSize(o.Size)))
		if err := generateVMData(src, o.Size); err != nil {
			return nil, nil, err
		}
	} else {
		dataDir = filepath.Dir(src)
	}
	var size int64
	if o.Existing != nil {
		size = o.Existing.Size
	} else {
		fi, err := os.Stat(src)
		if err != nil {
			return nil, nil, fmt.Errorf("bench restore: %w", err)
		}
		size = fi.Size()
	}
	password := benchPassword
	if o.Existing != nil {
		password = o.Existing.Password
	}

	t := &Table{
		Title: fmt.Sprintf("Restore of one %s file, fresh connection and empty cache for every read (median of %d)", humanSize(size), o.Repeat),
		Columns: slices.Concat([]string{"splitter", "preset", "reader", "MB/s"}, timingColumns,
			[]string{"speed-up", "vs DYNAMIC", "blob requests", "fetched MiB"}),
	}
	chart := &Chart{
		Title:  fmt.Sprintf("Restore of a %s file, fresh connection and empty cache (median of %d)", humanSize(size), o.Repeat),
		XLabel: "fetches in flight (prefetch window; kopia-style = 1)",
		YLabel: "MB/s (log scale)",
		Kind:   ChartLines,
		LogY:   true,
	}
	// Baselines: the kopia-style rate per preset (of kopia's default
	// splitter when measured) and the prefetch rate of DYNAMIC per case.
	kopiaStyle := map[string]float64{}
	dynamicRate := map[string]float64{}
	for _, sp := range o.Splitters {
		var (
			configFile string
			oid        object.ID
		)
		if o.Existing != nil {
			configFile, oid = o.Existing.ConfigFile, o.Existing.Object
		} else {
			progress(fmt.Sprintf("uploading into a %s repository", sp))
			if configFile, oid, err = uploadForBench(ctx, work, sp, dataDir, filepath.Base(src)); err != nil {
				return nil, nil, err
			}
		}
		for _, preset := range o.Presets {
			line := Series{Name: preset}
			if len(o.Splitters) > 1 {
				line.Name = preset + ", " + sp
			}
			var cases []readCase
			if o.KopiaStyleAll || sp == dynamicSplitter || o.Existing != nil {
				cases = append(cases, readCase{name: "kopia-style"})
			}
			for _, w := range o.Windows {
				cases = append(cases, readCase{name: fmt.Sprintf("prefetch w%d", w), window: w})
			}
			for _, c := range cases {
				progress(fmt.Sprintf("%s, %s: %s", sp, preset, c.name))
				var runs []readResult
				for i := 0; i < o.Repeat; i++ {
					c.group, c.gap, c.write = o.GroupBytes, o.MaxGap, o.WriteReads
					r, err := measureRead(ctx, work, configFile, password, oid, preset, c)
					if err != nil {
						return nil, nil, fmt.Errorf("%s, %s, %s: %w", sp, preset, c.name, err)
					}
					if r.bytes != size {
						return nil, nil, fmt.Errorf("%s, %s, %s: read %d bytes of %d", sp, preset, c.name, r.bytes, size)
					}
					runs = append(runs, r)
				}
				r := median(runs)
				mbps := float64(size) / r.took.Seconds() / 1e6
				key := preset + "/" + c.name
				if c.window == 0 && (sp == dynamicSplitter || kopiaStyle[preset] == 0) {
					kopiaStyle[preset] = mbps
				}
				if sp == dynamicSplitter {
					dynamicRate[key] = mbps
				}
				speedup, vsDynamic := Str("-"), Str("-")
				if b := kopiaStyle[preset]; b > 0 {
					speedup = Num(mbps/b, "%.1f×")
				}
				if d := dynamicRate[key]; d > 0 && sp != dynamicSplitter {
					vsDynamic = Num(100*mbps/d, "%.0f%%")
				}
				t.Add(slices.Concat([]Cell{Str(sp), Str(preset), Str(c.name), Num(mbps, "%.1f")}, r.timingCells(),
					[]Cell{speedup, vsDynamic, Int(r.requests), Num(float64(r.fetched)/(1<<20), "%.0f")})...)
				line.X = append(line.X, float64(max(c.window, 1)))
				line.Y = append(line.Y, mbps)
			}
			sortPoints(&line)
			chart.Series = append(chart.Series, line)
		}
	}
	t.Notes = append(t.Notes,
		"kopia-style: one chunk at a time, as kopia mount + cp reads. prefetch wN: vmhistory's reader with N fetches in flight.",
		"MB/s: the file's size over the object's open (its chunk table) and its read to the end; the connection is not in it.")
	t.Notes = append(t.Notes, timingNotes("the read's fresh connection to the repository through the preset (format blob, indexes) plus the object's open")...)
	t.Notes = append(t.Notes,
		"speed-up: against the kopia-style read of "+dynamicSplitter+" under the same preset; vs DYNAMIC: against the same reader on "+dynamicSplitter+".",
		"Presets model a distant store: drive = 150 ms per request, 20 MiB/s per stream, 400 MiB/s total, 1% 429/5xx; seed = 1.2 s, 6 MiB/s per stream (the seed host's Google Drive).")
	if o.WriteReads {
		t.Notes = append(t.Notes, "--write: each read went into a file of the work directory, every byte, through the page cache and unsynced, as kopia snapshot restore writes (its time is in MB/s).")
	} else {
		t.Notes = append(t.Notes, "The bytes are read, not written (--write writes them as kopia snapshot restore does).")
	}
	return t, chart, nil
}

// sortPoints orders a line's points by X (windows may be given in any
// order).
func sortPoints(s *Series) {
	idx := make([]int, len(s.X))
	for i := range idx {
		idx[i] = i
	}
	slices.SortStableFunc(idx, func(a, b int) int { return cmp.Compare(s.X[a], s.X[b]) })
	x, y := make([]float64, len(idx)), make([]float64, len(idx))
	for i, j := range idx {
		x[i], y[i] = s.X[j], s.Y[j]
	}
	s.X, s.Y = x, y
}

func (o *RestoreOptions) check() error {
	if o.Existing != nil {
		if o.Existing.Size <= 0 {
			return fmt.Errorf("bench restore: %s is empty; nothing to measure", o.Existing.Label)
		}
		o.Data, o.Splitters = "", []string{o.Existing.Label}
	}
	if o.Existing == nil && o.Data == "" && o.Size < 1<<20 {
		return fmt.Errorf("bench restore: --size %d is too small; use at least 1MiB", o.Size)
	}
	if o.Data != "" {
		fi, err := os.Stat(o.Data)
		if err != nil {
			return fmt.Errorf("bench restore: --data: %w", err)
		}
		if !fi.Mode().IsRegular() || fi.Size() == 0 {
			return fmt.Errorf("bench restore: --data %s is not a non-empty regular file", o.Data)
		}
	}
	for _, s := range o.Splitters {
		if o.Existing == nil && !slices.Contains(splitter.SupportedAlgorithms(), s) {
			return fmt.Errorf("bench restore: unknown splitter %q (kopia's are listed by vmhistory bench restore --help)", s)
		}
	}
	for _, p := range o.Presets {
		if _, err := drivemodel.Preset(p); err != nil {
			return fmt.Errorf("bench restore: %w", err)
		}
	}
	for _, w := range o.Windows {
		if w < 1 || w > 256 {
			return fmt.Errorf("bench restore: window %d is out of range 1..256", w)
		}
	}
	if len(o.Splitters) == 0 || len(o.Presets) == 0 {
		return errors.New("bench restore: no splitter or no preset to measure")
	}
	if o.Repeat < 1 {
		o.Repeat = 1
	}
	return nil
}

type readCase struct {
	name       string
	window     int // 0: kopia-style
	group, gap int64
	write      bool  // into a file (RestoreOptions.WriteReads)
	head       int64 // bytes whose rate is timed apart (see readClock)
}

// readResult is one read of the whole file.
type readResult struct {
	// took is the object's open and its read to the end (MB/s); cpu the
	// user+sys CPU time of this process over took.
	took, cpu time.Duration
	// open is the fresh connection plus the object's open, until the
	// first read call; firstByte the same start to the first byte handed
	// to the reader. So firstByte ≥ open.
	open, firstByte time.Duration
	// head is the time from the first read call to the first headBytes
	// handed over, rest the time from there to the end (zero when no
	// head was timed).
	head, rest        time.Duration
	headBytes         int64
	bytes             int64
	requests, fetched int64
}

// median is the median run by took, with the other durations replaced by
// their own medians: a run slow to start is not necessarily the one slow
// to finish. Each is an order statistic, so firstByte ≥ open still holds.
func median(runs []readResult) readResult {
	mid := func(f func(*readResult) *time.Duration) time.Duration {
		v := make([]time.Duration, len(runs))
		for i := range runs {
			v[i] = *f(&runs[i])
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	m := runs[0]
	m.cpu = mid(func(r *readResult) *time.Duration { return &r.cpu })
	m.open = mid(func(r *readResult) *time.Duration { return &r.open })
	m.firstByte = mid(func(r *readResult) *time.Duration { return &r.firstByte })
	m.head = mid(func(r *readResult) *time.Duration { return &r.head })
	m.rest = mid(func(r *readResult) *time.Duration { return &r.rest })
	slices.SortFunc(runs, func(a, b readResult) int { return cmp.Compare(a.took, b.took) })
	byTook := runs[len(runs)/2]
	m.took, m.bytes, m.requests, m.fetched = byTook.took, byTook.bytes, byTook.requests, byTook.fetched
	return m
}

// cpuPerGiB is CPU seconds per GiB of the file read.
func (r readResult) cpuPerGiB() float64 {
	if r.bytes <= 0 {
		return 0
	}
	return r.cpu.Seconds() / (float64(r.bytes) / (1 << 30))
}

// timingCells are the columns timingColumns names.
func (r readResult) timingCells() []Cell {
	return []Cell{Num(r.cpuPerGiB(), "%.2f"), Num(r.firstByte.Seconds(), "%.3f"), Num(r.open.Seconds(), "%.3f")}
}

// timingColumns stand beside MB/s in the restore tables.
var timingColumns = []string{"CPU s/GiB", "first byte s", "open s"}

// timingNotes say what timingColumns mean; opened is what the open
// time counts before the reader's first read call.
func timingNotes(opened string) []string {
	return []string{
		"CPU s/GiB: user+sys CPU seconds of this process (getrusage RUSAGE_SELF) over the read MB/s times, per GiB of the file; the drive model and, through the mount, the FUSE server run in this process, so their CPU is included.",
		"open s: " + opened + ", until the reader's first read call. first byte s: from the same start to the first byte handed to the reader, so first byte ≥ open.",
	}
}

// uploadForBench makes a filesystem repository with splitter sp and
// uploads dir into it; it returns the repository's config and the file's
// object.
func uploadForBench(ctx context.Context, work, sp, dir, file string) (string, object.ID, error) {
	configFile, err := createBenchRepo(ctx, filepath.Join(work, "repo-"+sp), sp)
	if err != nil {
		return "", object.ID{}, err
	}
	r, err := kopiarepo.Open(ctx, configFile, benchPassword)
	if err != nil {
		return "", object.ID{}, err
	}
	defer r.Close(ctx)
	res, err := r.Upload(ctx, kopiarepo.UploadRequest{Dir: dir, SourcePath: "/bench", Splitter: sp, Compression: "none", SkipMaintenance: true})
	if err != nil {
		return "", object.ID{}, err
	}
	fi, err := r.Stat(ctx, res.Snapshot.ID, file)
	if err != nil {
		return "", object.ID{}, err
	}
	return configFile, fi.ObjectID, nil
}

// createBenchRepo makes a throwaway filesystem repository under base
// (blobs in base/blobs, its cache in base/cache) whose default splitter is
// sp, and returns its config file.
func createBenchRepo(ctx context.Context, base, sp string) (string, error) {
	configFile := filepath.Join(base, "kopia.config")
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: benchBlobDir(base)}, configFile, benchPassword,
		kopiarepo.CreateOptions{Splitter: sp, ConnectOptions: kopiarepo.ConnectOptions{CacheDirectory: filepath.Join(base, "cache")}}); err != nil {
		return "", err
	}
	return configFile, nil
}

// benchBlobDir is where createBenchRepo keeps the repository's blobs.
func benchBlobDir(base string) string { return filepath.Join(base, "blobs") }

// measureRead opens a fresh connection through the drive model (its
// preset already applied: the connect pays the round trips it would) with
// an empty cache and reads the whole object once. took and the counters
// cover the object's open and read; open and firstByte also the connect.
func measureRead(ctx context.Context, work, configFile, password string, oid object.ID, preset string, c readCase) (readResult, error) {
	r, model, connect, done, err := connectFresh(ctx, work, configFile, password, preset)
	if err != nil {
		return readResult{}, err
	}
	defer done()
	model.Reset()

	var out io.Writer = io.Discard
	var written *os.File
	if c.write {
		f, err := safefile.OpenFile(filepath.Join(work, fmt.Sprintf("read-%d.img", modelSeq.Add(1))), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return readResult{}, err
		}
		defer func() {
			f.Close()
			os.Remove(f.Name())
		}()
		out, written = f, f
	}
	var n int64
	clock := startClock(connect, c.head)
	if c.window == 0 {
		n, err = prefetch.CopyKopiaStyle(ctx, clockedRepo{Repository: r.Kopia(), c: clock}, oid, out)
	} else {
		var rd *prefetch.Reader
		if rd, err = prefetch.Open(ctx, r.Kopia(), oid, prefetch.Options{Window: c.window, GroupBytes: c.group, MaxGap: c.gap}); err == nil {
			clock.reading()
			n, err = rd.WriteTo(clockWriter{w: out, c: clock})
			rd.Close()
		}
	}
	res := clock.stop()
	res.bytes = n
	if written != nil && err == nil {
		fi, serr := written.Stat()
		switch {
		case serr != nil:
			return res, fmt.Errorf("the read's file: %w", serr)
		case fi.Size() != n:
			return res, fmt.Errorf("the read's file %s holds %d bytes of %d", written.Name(), fi.Size(), n)
		}
	}
	st := model.Stats()
	res.requests, res.fetched = st.Gets, st.BytesFetched
	return res, err
}

// connectFresh opens a fresh connection to the repository of configFile
// through a new shared drive model with preset's parameters and an empty
// cache, and says how long the connect took. done closes it and sets the
// model's parameters back to none.
func connectFresh(ctx context.Context, work, configFile, password, preset string) (*kopiarepo.Repo, *drivemodel.Model, time.Duration, func(), error) {
	conn, err := os.MkdirTemp(work, "conn-")
	if err != nil {
		return nil, nil, 0, nil, err
	}
	name := fmt.Sprintf("bench-%d", modelSeq.Add(1))
	cfg := filepath.Join(conn, "model.config")
	params := drivemodel.MustPreset(preset)
	if err := drivemodel.WriteConfig(configFile, cfg, drivemodel.ConfigOptions{Model: name, Params: &params,
		CacheDirectory: filepath.Join(conn, "cache")}); err != nil {
		os.RemoveAll(conn)
		return nil, nil, 0, nil, err
	}
	start := time.Now()
	r, err := kopiarepo.Open(ctx, cfg, password)
	connect := time.Since(start)
	if err != nil {
		os.RemoveAll(conn)
		return nil, nil, 0, nil, err
	}
	model := drivemodel.Shared(name)
	return r, model, connect, func() {
		model.SetParams(drivemodel.Params{})
		r.Close(context.Background())
		os.RemoveAll(conn)
	}, nil
}

// generateVMData writes size bytes that read like a VM disk to a
// restore: mostly incompressible blocks (every byte costs its transfer),
// some text-like and a few zero runs.
func generateVMData(path string, size int64) error {
	f, err := safefile.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(42, uint64(size)))
	block := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(block)) {
		n := min(int64(len(block)), size-off)
		b := block[:n]
		switch k := rng.IntN(10); {
		case k < 7:
			for i := 0; i+8 <= len(b); i += 8 {
				v := rng.Uint64()
				for j := 0; j < 8; j++ {
					b[i+j] = byte(v >> (8 * j))
				}
			}
		case k < 9:
			for i := range b {
				b[i] = "vmhistory restore bench: log line of a guest filesystem\n"[(int(off)+i)%56]
			}
		default:
			clear(b)
		}
		if _, err := f.Write(b); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

func humanSize(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%d bytes", n)
}
