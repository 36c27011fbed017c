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
	// Progress, when set, receives one line per step.
	Progress func(string)
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
	if src == "" {
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
	fi, err := os.Stat(src)
	if err != nil {
		return nil, nil, fmt.Errorf("bench restore: %w", err)
	}
	size := fi.Size()

	t := &Table{
		Title:   fmt.Sprintf("Restore of one %s file, fresh connection and empty cache for every read (median of %d)", humanSize(size), o.Repeat),
		Columns: []string{"splitter", "preset", "reader", "MB/s", "speed-up", "vs DYNAMIC", "blob requests", "fetched MiB"},
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
		progress(fmt.Sprintf("uploading into a %s repository", sp))
		configFile, oid, err := uploadForBench(ctx, work, sp, dataDir, filepath.Base(src))
		if err != nil {
			return nil, nil, err
		}
		for _, preset := range o.Presets {
			line := Series{Name: preset}
			if len(o.Splitters) > 1 {
				line.Name = preset + ", " + sp
			}
			var cases []readCase
			if o.KopiaStyleAll || sp == dynamicSplitter {
				cases = append(cases, readCase{name: "kopia-style"})
			}
			for _, w := range o.Windows {
				cases = append(cases, readCase{name: fmt.Sprintf("prefetch w%d", w), window: w})
			}
			for _, c := range cases {
				progress(fmt.Sprintf("%s, %s: %s", sp, preset, c.name))
				var runs []readResult
				for i := 0; i < o.Repeat; i++ {
					c.group, c.gap = o.GroupBytes, o.MaxGap
					r, err := measureRead(ctx, work, configFile, oid, preset, c)
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
				t.Add(Str(sp), Str(preset), Str(c.name), Num(mbps, "%.1f"), speedup, vsDynamic,
					Int(r.requests), Num(float64(r.fetched)/(1<<20), "%.0f"))
				line.X = append(line.X, float64(max(c.window, 1)))
				line.Y = append(line.Y, mbps)
			}
			sortPoints(&line)
			chart.Series = append(chart.Series, line)
		}
	}
	t.Notes = append(t.Notes,
		"kopia-style: one chunk at a time, as kopia mount + cp reads. prefetch wN: vmhistory's reader with N fetches in flight.",
		"speed-up: against the kopia-style read of "+dynamicSplitter+" under the same preset; vs DYNAMIC: against the same reader on "+dynamicSplitter+".",
		"Presets model a distant store: drive = 150 ms per request, 20 MiB/s per stream, 400 MiB/s total, 1% 429/5xx; seed = 1.2 s, 6 MiB/s per stream (the seed host's Google Drive).")
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
	if o.Data == "" && o.Size < 1<<20 {
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
		if !slices.Contains(splitter.SupportedAlgorithms(), s) {
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
}

type readResult struct {
	took              time.Duration
	bytes             int64
	requests, fetched int64
}

func median(runs []readResult) readResult {
	slices.SortFunc(runs, func(a, b readResult) int { return int(a.took - b.took) })
	return runs[len(runs)/2]
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

// measureRead opens a fresh connection through the drive model with an
// empty cache and reads the whole object once; only the read is timed.
func measureRead(ctx context.Context, work, configFile string, oid object.ID, preset string, c readCase) (readResult, error) {
	var res readResult
	conn, err := os.MkdirTemp(work, "conn-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(conn)
	name := fmt.Sprintf("bench-%d", modelSeq.Add(1))
	cfg := filepath.Join(conn, "model.config")
	if err := drivemodel.WriteConfig(configFile, cfg, drivemodel.ConfigOptions{Model: name, Params: &drivemodel.Params{},
		CacheDirectory: filepath.Join(conn, "cache")}); err != nil {
		return res, err
	}
	r, err := kopiarepo.Open(ctx, cfg, benchPassword)
	if err != nil {
		return res, err
	}
	defer r.Close(ctx)
	model := drivemodel.Shared(name)
	model.SetParams(drivemodel.MustPreset(preset))
	model.Reset()

	start := time.Now()
	if c.window == 0 {
		res.bytes, err = prefetch.CopyKopiaStyle(ctx, r.Kopia(), oid, io.Discard)
	} else {
		var rd *prefetch.Reader
		if rd, err = prefetch.Open(ctx, r.Kopia(), oid, prefetch.Options{Window: c.window, GroupBytes: c.group, MaxGap: c.gap}); err == nil {
			res.bytes, err = rd.WriteTo(io.Discard)
			rd.Close()
		}
	}
	res.took = time.Since(start)
	st := model.Stats()
	res.requests, res.fetched = st.Gets, st.BytesFetched
	model.SetParams(drivemodel.Params{})
	return res, err
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
