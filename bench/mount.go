package bench

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kopia/kopia/repo/object"
	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/safefile"
	"github.com/vmhistory/vmhistory/zfs"
)

// Reader names of the --via-mount bench.
const (
	readerKopiaStyle    = "kopia-style"
	readerMountKopia    = "mount cp"
	readerDirect        = "direct"
	readerPassthrough   = "mount passthrough"
	readerNoPassthrough = "mount no passthrough"
)

// mountBenchPoolPrefix starts the name of the bench's throwaway pool:
// vmhbench-<pid>-<n>.
const mountBenchPoolPrefix = "vmhbench-"

var mountPoolSeq atomic.Int64

// DefaultHeadBytes is the start of the file whose rate the --via-mount
// bench times apart from the rest: a read's ramp-up.
const DefaultHeadBytes = 64 << 20

// headColumn names the column of the head's rate.
func headColumn(head int64) string { return "first " + humanSize(head) + " MB/s" }

// RestoreViaMount measures what "vmhistory mount" delivers to a cp: a
// generated file (or o.Data) in a snapshot of a throwaway zfs-fuse pool
// and in a kopia repository of it, the kopia upload's snapshot then
// destroyed so that one entry of the timeline is kopia-only. It reads
//
//   - the kopia-only file through a fresh in-process mount (fresh
//     connection through the drive model, empty caches), against the
//     kopia-mount-style read of the same object, under each preset;
//   - the local snapshot's file through a fresh mount with and without
//     FUSE passthrough, against reading it directly from the snapshot.
//
// Page caches are dropped before every measurement (which needs root),
// the order of the cases is reversed on every other repeat, and the
// median of o.Repeat is reported. Splitters holds at most one splitter,
// the repository's (default kopia's, DYNAMIC-4M-BUZHASH); the kopia-style
// read is measured for that one only, or with KopiaStyleAll. Windows,
// when it holds one value, is the mount's prefetch window (else the
// mount's default, as vmhistory mount has it).
//
// For every reader the table also has the rate of the file's first
// 64 MiB, timed from the first read call after the open returned, and
// of the rest of the file: how fast the read ramps up.
func RestoreViaMount(ctx context.Context, o RestoreOptions) (*Table, *Chart, error) {
	if len(o.Splitters) == 0 {
		o.Splitters = []string{dynamicSplitter}
	}
	if err := o.check(); err != nil {
		return nil, nil, err
	}
	if len(o.Windows) > 1 {
		return nil, nil, fmt.Errorf("bench restore --via-mount: give one prefetch window for the mount, not %d", len(o.Windows))
	}
	if len(o.Splitters) > 1 {
		return nil, nil, fmt.Errorf("bench restore --via-mount: give one splitter for the repository, not %d", len(o.Splitters))
	}
	sp := o.Splitters[0]
	head := cmp.Or(o.headBytes, DefaultHeadBytes)
	window := 0
	if len(o.Windows) == 1 {
		window = o.Windows[0]
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string) {}
	}
	if err := dropCaches(); err != nil {
		return nil, nil, err
	}
	work, err := os.MkdirTemp(o.WorkDir, "vmhistory-bench-mount-")
	if err != nil {
		return nil, nil, fmt.Errorf("bench restore --via-mount: %w", err)
	}
	defer os.RemoveAll(work)

	size := o.Size
	if o.Data != "" {
		fi, err := os.Stat(o.Data)
		if err != nil {
			return nil, nil, fmt.Errorf("bench restore: --data: %w", err)
		}
		size = fi.Size()
	}
	progress(fmt.Sprintf("creating a zfs-fuse pool in %s", work))
	// The file once, some room for metadata and kopia's upload reading
	// through a clone; sparse, so only what is written takes space.
	pool, err := newBenchPool(ctx, work, max(size+size/4+256<<20, 256<<20), "bench restore --via-mount")
	if err != nil {
		return nil, nil, err
	}
	defer pool.destroy()

	w, err := pool.prepare(ctx, o, sp, progress)
	if err != nil {
		return nil, nil, err
	}
	defer w.close()

	// One measurement per case and repeat; the case order is reversed on
	// every other repeat so that no case always runs first (or last).
	type caseDef struct {
		preset, reader string
		run            func() (mountResult, error)
	}
	var cases []caseDef
	for _, p := range o.Presets {
		if sp == dynamicSplitter || o.KopiaStyleAll {
			cases = append(cases, caseDef{p, readerKopiaStyle, func() (mountResult, error) { return w.kopiaStyle(ctx, p, head) }})
		}
		cases = append(cases, caseDef{p, readerMountKopia, func() (mountResult, error) { return w.mountKopia(ctx, p, window, head) }})
	}
	cases = append(cases,
		caseDef{"", readerDirect, func() (mountResult, error) { return w.direct(ctx, head) }},
		caseDef{"", readerPassthrough, func() (mountResult, error) { return w.mountLocal(ctx, true, head) }},
		caseDef{"", readerNoPassthrough, func() (mountResult, error) { return w.mountLocal(ctx, false, head) }})
	runs := make([][]mountResult, len(cases))
	for rep := range o.Repeat {
		for _, i := range repeatOrder(len(cases), rep) {
			c := cases[i]
			name := c.reader
			if c.preset != "" {
				name = c.preset + ", " + name
			}
			progress(fmt.Sprintf("run %d/%d: %s", rep+1, o.Repeat, name))
			if err := dropCaches(); err != nil {
				return nil, nil, err
			}
			r, err := c.run()
			if err != nil {
				return nil, nil, fmt.Errorf("bench restore --via-mount: %s: %w", name, err)
			}
			if r.bytes != size {
				return nil, nil, fmt.Errorf("bench restore --via-mount: %s: read %d bytes of %d", name, r.bytes, size)
			}
			progress(fmt.Sprintf("  %.1f MB/s", float64(size)/r.took.Seconds()/1e6))
			runs[i] = append(runs[i], r)
		}
	}

	t := &Table{
		Title: fmt.Sprintf("Restore of one %s file through vmhistory mount (%s repository), page caches dropped and a fresh mount for every read (median of %d)",
			humanSize(size), sp, o.Repeat),
		Columns: slices.Concat([]string{"file", "preset", "reader", "MB/s", headColumn(head), "rest MB/s"}, timingColumns,
			[]string{"vs baseline", "blob requests", "fetched MiB", "READs served"}),
	}
	chart := &Chart{
		Title:  fmt.Sprintf("Restore of a %s file through vmhistory mount (median of %d)", humanSize(size), o.Repeat),
		XLabel: "reader (local snapshot's file | kopia-only file)",
		YLabel: "MB/s",
		Kind:   ChartBars,
		// The slow kopia readers last: the legend sits top right.
		Categories: []string{readerDirect, "mount\npassthrough", "mount no\npassthrough", readerKopiaStyle, readerMountKopia},
	}
	seriesY := map[string][]float64{}
	var seriesOrder []string
	baseline := map[string]float64{}
	for i, c := range cases {
		r := medianMount(runs[i])
		mbps := float64(size) / r.took.Seconds() / 1e6
		file, preset, key := "kopia-only", c.preset, c.preset
		if c.preset == "" {
			file, preset, key = "local snapshot", "-", "local"
		}
		vs := Str("-")
		switch c.reader {
		case readerKopiaStyle, readerDirect:
			baseline[key] = mbps
		case readerMountKopia:
			if b := baseline[key]; b > 0 {
				vs = Num(mbps/b, "%.1f×")
			}
		default:
			if b := baseline[key]; b > 0 {
				vs = Num(100*mbps/b, "%.0f%%")
			}
		}
		reader := c.reader
		if c.reader == readerPassthrough && r.passthroughOpens == 0 {
			reader += " (refused)"
		}
		headRate, restRate := Str("-"), Str("-")
		if r.headBytes > 0 && r.head > 0 && r.rest > 0 {
			headRate = Num(float64(r.headBytes)/r.head.Seconds()/1e6, "%.1f")
			restRate = Num(float64(r.bytes-r.headBytes)/r.rest.Seconds()/1e6, "%.1f")
		}
		t.Add(slices.Concat([]Cell{Str(file), Str(preset), Str(reader), Num(mbps, "%.1f"), headRate, restRate}, r.timingCells(),
			[]Cell{vs, Int(r.requests), Num(float64(r.fetched)/(1<<20), "%.0f"), Int(r.reads)})...)
		if seriesY[key] == nil {
			seriesY[key] = make([]float64, len(chart.Categories))
			seriesOrder = append(seriesOrder, key)
		}
		seriesY[key][categoryIndex(c.reader)] = mbps
	}
	for _, key := range seriesOrder {
		name := key
		if key == "local" {
			name = "local snapshot"
		}
		chart.Series = append(chart.Series, Series{Name: name, Y: seriesY[key]})
	}
	t.Notes = append(t.Notes,
		"kopia-style: one chunk at a time on a fresh connection with an empty cache, as kopia mount + cp reads; vs baseline of mount cp: its speed-up over it.",
		fmt.Sprintf("mount cp: 1 MiB reads of the file through a fresh vmhistory mount in this process (prefetching reader, window %d; fresh connection, empty caches).", cmp.Or(window, prefetch.DefaultWindow)),
		"direct: the snapshot's file read from its read-only clone; vs baseline of the mounts: their share of it. READs served: FUSE reads the process answered (none with passthrough).",
		"MB/s: the file's size over its open() and its read to the end (kopia-style: the object's open and read); not the connection, nor the mount's set-up and the snapshot's lookup (in no column).",
		fmt.Sprintf("%s: the rate of the file's first %s, timed from the first read() after open() returned; rest MB/s: the rest of the file, from there to the end (the steady state). - for a file no larger than %s.",
			headColumn(head), humanSize(head), humanSize(head)))
	t.Notes = append(t.Notes, timingNotes("the read's fresh connection to the repository through the preset (kopia-only file) plus the file's open() (kopia-style: the object's open; direct: the clone's file)")...)
	t.Notes = append(t.Notes,
		"Presets model a distant store: drive = 150 ms per request, 20 MiB/s per stream, 400 MiB/s total, 1% 429/5xx; seed = 1.2 s, 6 MiB/s per stream (the seed host's Google Drive).",
		"Page caches dropped before each read; zfs-fuse's own ARC (max-arc-size in /etc/zfs/zfsrc) is not, so a file smaller than it reads warm from the pool.")
	return t, chart, nil
}

// repeatOrder is the order of n cases in repeat rep: reversed on every
// other repeat, so that no case always runs first (or last).
func repeatOrder(n, rep int) []int {
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	if rep%2 == 1 {
		slices.Reverse(order)
	}
	return order
}

// categoryIndex is the reader's bar group in the chart.
func categoryIndex(reader string) int {
	return slices.Index([]string{readerDirect, readerPassthrough, readerNoPassthrough, readerKopiaStyle, readerMountKopia}, reader)
}

type mountResult struct {
	readResult
	reads            int64 // READ requests the mount served
	passthroughOpens int64
}

// medianMount is median over the runs' readResults, with the counters of
// the median run by took.
func medianMount(runs []mountResult) mountResult {
	rr := make([]readResult, len(runs))
	for i, r := range runs {
		rr[i] = r.readResult
	}
	slices.SortFunc(runs, func(a, b mountResult) int { return cmp.Compare(a.took, b.took) })
	m := runs[len(runs)/2]
	m.readResult = median(rr)
	return m
}

// dropCaches writes back dirty pages and drops the page cache, dentries
// and inodes, so that a read starts cold.
func dropCaches() error {
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200); err != nil {
		return fmt.Errorf("drop page caches (needs root): %w", err)
	}
	return nil
}

// benchPool is the bench's throwaway zfs-fuse pool on a sparse file.
type benchPool struct {
	name, file, mnt string
	z               *zfs.ZFS
}

// requireZpool fails with one line unless zpool is installed and the
// zfs daemon answers.
func requireZpool(ctx context.Context, what string) error {
	if _, err := exec.LookPath("zpool"); err != nil {
		return fmt.Errorf("%s: zpool is not installed: it needs zfs-fuse (apt-get install zfs-fuse, then start zfs-fuse as root) or OpenZFS", what)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(cctx, "zpool", "list", "-H", "-o", "name").CombinedOutput(); err != nil {
		msg := strings.Join(strings.Fields(string(out)), " ")
		return fmt.Errorf("%s: the zfs daemon does not answer (zpool list: %v: %s); start zfs-fuse as root (scripts/setup-test-env.sh does)", what, err, msg)
	}
	return nil
}

// newBenchPool creates a throwaway pool vmhbench-<pid>-<n> on a sparse
// file of poolSize bytes in work, mounted under work. what names the
// bench in errors.
func newBenchPool(ctx context.Context, work string, poolSize int64, what string) (*benchPool, error) {
	if err := requireZpool(ctx, what); err != nil {
		return nil, err
	}
	name := fmt.Sprintf("%s%d-%d", mountBenchPoolPrefix, os.Getpid(), mountPoolSeq.Add(1))
	p := &benchPool{name: name, file: filepath.Join(work, "pool.img"), mnt: filepath.Join(work, "pool")}
	f, err := safefile.OpenFile(p.file, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	err = f.Truncate(poolSize)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if out, err := exec.CommandContext(ctx, "zpool", "create", "-m", p.mnt, name, p.file).CombinedOutput(); err != nil {
		// An interrupt may have ended zpool after the pool came to be.
		exec.Command("zpool", "destroy", name).Run() //nolint:errcheck
		os.Remove(p.file)
		return nil, fmt.Errorf("%s: create the zfs-fuse pool %s: %v: %s (is zfs-fuse running? scripts/setup-test-env.sh starts it)",
			what, name, err, strings.Join(strings.Fields(string(out)), " "))
	}
	p.z = zfs.New(&runner.Local{}, zfs.Options{CommandTimeout: 2 * time.Minute, StreamTimeout: 30 * time.Minute,
		CloneMountDir: filepath.Join(work, "clones")})
	return p, nil
}

// destroy destroys the pool, trying again while it is busy for a moment
// after its last file closed, and forcing the pool's destroy (never a
// dataset's: that wedges zfs-fuse) as the last resort.
func (p *benchPool) destroy() {
	var out []byte
	var err error
	// zfs-fuse finishes unmounts in the background: on a loaded 2-core
	// machine a pool stays busy for more than 10 s after its last clone
	// went.
	for deadline, wait := time.Now().Add(45*time.Second), 250*time.Millisecond; ; wait = min(2*wait, 2*time.Second) {
		out, err = exec.Command("zpool", "destroy", p.name).CombinedOutput()
		if err == nil || strings.Contains(string(out), "no such pool") {
			return
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(wait)
	}
	if out, err = exec.Command("zpool", "destroy", "-f", p.name).CombinedOutput(); err == nil {
		return
	}
	slog.Warn("bench: cannot destroy the throwaway pool; destroy it by hand", "pool", p.name, "err", err,
		"output", strings.TrimSpace(string(out)))
}

// mountWorld is what the measurements read: the local snapshot, the
// kopia-only snapshot in a repository, and the object of the file.
type mountWorld struct {
	work, dataset, file string
	splitter            string // the repository's
	pool                *benchPool
	local               zfs.Snapshot // on the pool
	kopiaName           string       // the kopia-only snapshot's name
	configFile          string       // the repository, straight to disk
	kopiaSnapshot       string
	oid                 object.ID         // the file in the repository
	view                *zfs.SnapshotView // the local snapshot's files, for direct reads
	log                 *slog.Logger
}

func (p *benchPool) prepare(ctx context.Context, o RestoreOptions, sp string, progress func(string)) (*mountWorld, error) {
	w := &mountWorld{work: filepath.Dir(p.file), pool: p, dataset: p.name + "/bench", file: "disk.img", splitter: sp,
		log: slog.New(slog.DiscardHandler)}
	if err := p.z.CreateDataset(ctx, w.dataset, nil); err != nil {
		return nil, err
	}
	dst := filepath.Join(p.mnt, "bench", w.file)
	if o.Data == "" {
		progress(fmt.Sprintf("generating %s of VM-like data in the pool", humanSize(o.Size)))
		if err := generateVMData(dst, o.Size); err != nil {
			return nil, fmt.Errorf("bench restore --via-mount: %w", err)
		}
	} else {
		progress(fmt.Sprintf("copying %s into the pool", o.Data))
		if err := copyFile(o.Data, dst); err != nil {
			return nil, fmt.Errorf("bench restore --via-mount: --data: %w", err)
		}
	}

	// The kopia-only snapshot: uploaded, then destroyed on the pool.
	kopiaSnap, err := p.z.CreateSnapshot(ctx, w.dataset, "kopia-only", nil)
	if err != nil {
		return nil, err
	}
	w.kopiaName = kopiaSnap.Name
	progress(fmt.Sprintf("uploading %s into a %s repository", kopiaSnap.FullName(), w.splitter))
	if err := w.upload(ctx, kopiaSnap); err != nil {
		return nil, err
	}
	if err := p.z.Destroy(ctx, kopiaSnap.FullName()); err != nil {
		return nil, err
	}
	time.Sleep(1100 * time.Millisecond) // a later creation time (whole seconds)
	if w.local, err = p.z.CreateSnapshot(ctx, w.dataset, "local", nil); err != nil {
		return nil, err
	}
	if w.view, err = p.z.OpenSnapshot(ctx, w.local.FullName()); err != nil {
		return nil, err
	}
	return w, nil
}

func (w *mountWorld) close() {
	if w.view != nil {
		closeViewRetrying(w.view)
	}
}

// closeViewRetrying removes a clone, trying again while zfs-fuse still
// reports it busy after its last file closed.
func closeViewRetrying(v *zfs.SnapshotView) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for range 20 {
		if err := v.Close(ctx); err == nil || !errors.Is(err, zfs.ErrBusy) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (w *mountWorld) upload(ctx context.Context, s zfs.Snapshot) error {
	view, err := w.pool.z.OpenSnapshot(ctx, s.FullName())
	if err != nil {
		return err
	}
	defer closeViewRetrying(view)
	base := filepath.Join(w.work, "repo")
	w.configFile = filepath.Join(base, "kopia.config")
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(base, "blobs")}, w.configFile, benchPassword,
		kopiarepo.CreateOptions{Splitter: w.splitter, ConnectOptions: kopiarepo.ConnectOptions{
			Host: "bench", User: "root", CacheDirectory: filepath.Join(base, "cache")}}); err != nil {
		return err
	}
	r, err := kopiarepo.Open(ctx, w.configFile, benchPassword)
	if err != nil {
		return err
	}
	defer r.Close(ctx)
	res, err := r.Upload(ctx, kopiarepo.UploadRequest{
		Dir: view.Root, SourcePath: filepath.Join(w.pool.mnt, "bench"), Host: "bench", User: "root", StartTime: s.Creation,
		Tags: map[string]string{
			kopiarepo.TagDataset:  s.Dataset,
			kopiarepo.TagSnapshot: s.Name,
			kopiarepo.TagGUID:     strconv.FormatUint(s.GUID, 10),
		},
		Splitter: w.splitter, Compression: "none", SkipMaintenance: true,
	})
	if err != nil {
		return err
	}
	w.kopiaSnapshot = res.Snapshot.ID
	fi, err := r.Stat(ctx, res.Snapshot.ID, w.file)
	if err != nil {
		return err
	}
	w.oid = fi.ObjectID
	return nil
}

// connect opens a fresh connection to the repository through a drive
// model with preset's parameters and an empty cache.
func (w *mountWorld) connect(ctx context.Context, preset string) (*kopiarepo.Repo, *drivemodel.Model, time.Duration, func(), error) {
	return connectFresh(ctx, w.work, w.configFile, benchPassword, preset)
}

// kopiaStyle is the kopia-mount-style read of the kopia-only file.
func (w *mountWorld) kopiaStyle(ctx context.Context, preset string, head int64) (mountResult, error) {
	rr, err := measureRead(ctx, w.work, w.configFile, benchPassword, w.oid, preset, readCase{name: readerKopiaStyle, head: head})
	return mountResult{readResult: rr}, err
}

// mountKopia reads the kopia-only file through a fresh mount whose kopia
// source is a fresh connection through the drive model.
func (w *mountWorld) mountKopia(ctx context.Context, preset string, window int, head int64) (mountResult, error) {
	var res mountResult
	r, model, connect, done, err := w.connect(ctx, preset)
	if err != nil {
		return res, err
	}
	defer done()
	src := restore.NewKopiaSource(r, "bench", "root")
	src.Datasets = []string{w.dataset}
	src.Prefetch.Window = window // 0: the reader's default
	src.SetLogger(w.log)
	res, err = w.readThroughMount(ctx, []restore.Source{src}, w.kopiaName, false, connect, head, model.Reset)
	st := model.Stats()
	res.requests, res.fetched = st.Gets, st.BytesFetched
	return res, err
}

// mountLocal reads the local snapshot's file through a fresh mount.
func (w *mountWorld) mountLocal(ctx context.Context, passthrough bool, head int64) (mountResult, error) {
	src := restore.NewZFSSource("local", restore.KindLocal, w.pool.z, map[string]string{w.dataset: w.dataset})
	src.SetLogger(w.log)
	defer src.Close()
	return w.readThroughMount(ctx, []restore.Source{src}, w.local.Name, !passthrough, 0, head, nil)
}

// readThroughMount mounts the sources' timeline on a new directory, looks
// the file up (opening the snapshot: a clone, a kopia root — not timed,
// as a cp finds it already listed), drops the caches, and times opening
// and reading it in 1 MiB reads. connect is the time the sources' fresh
// connection took, counted in the open and the first byte; the rate of
// the first head bytes is timed apart.
func (w *mountWorld) readThroughMount(ctx context.Context, sources []restore.Source, snap string, noPassthrough bool,
	connect time.Duration, head int64, beforeRead func()) (mountResult, error) {
	var res mountResult
	dir, err := os.MkdirTemp(w.work, "mnt-")
	if err != nil {
		return res, err
	}
	defer os.Remove(dir)
	build := func(ctx context.Context) (*restore.Timeline, []error) { return restore.BuildTimeline(ctx, sources) }
	m, err := fusefs.MountTimeline(ctx, dir, build, fusefs.Options{Refresh: time.Hour, Logger: w.log, NoPassthrough: noPassthrough})
	if err != nil {
		return res, err
	}
	defer m.Unmount()
	path := filepath.Join(dir, snap, w.file)
	if _, err := os.Stat(path); err != nil {
		return res, err
	}
	if err := dropCaches(); err != nil {
		return res, err
	}
	if beforeRead != nil {
		beforeRead()
	}
	clock := startClock(connect, head)
	n, err := readFile(path, clock)
	res.readResult = clock.stop()
	res.bytes = n
	st := m.Stats()
	res.reads, res.passthroughOpens = st.Reads, st.PassthroughOpens
	return res, err
}

// direct reads the local snapshot's file from its clone.
func (w *mountWorld) direct(ctx context.Context, head int64) (mountResult, error) {
	var res mountResult
	clock := startClock(0, head)
	n, err := readFile(filepath.Join(w.view.Root, w.file), clock)
	res.readResult = clock.stop()
	res.bytes = n
	return res, err
}

// readFile opens path and reads it to the end in 1 MiB reads, as cp does
// (io.Copy to io.Discard would read 8 KiB at a time), telling clock.
func readFile(path string, clock *readClock) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	var total int64
	for {
		clock.reading()
		n, err := f.Read(buf)
		clock.got(n)
		total += int64(n)
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}
