package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmhistory/vmhistory/changeset"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/zfs"
)

// The ZFS mode's defaults: ZFS's recordsize, the stream path's splitter,
// and the compression the seed's repository uses.
var (
	DefaultZFSBackupCompressions = []string{"zstd-better-compression"}
	DefaultZFSBackupSplitters    = []string{"FIXED-128K"}
)

// ZFSBackupColumns are the columns of the ZFS mode's table.
var ZFSBackupColumns = []string{"compression", "splitter", "preset", "night", "mode", "upload s", "CPU s", "send s", "read MiB", "DRR_WRITE MiB", "read/DRR_WRITE",
	"changed MiB", "repo MiB", "growth MiB", "growth/changed", "full/stream", "way"}

// The two modes of the ZFS bench.
const (
	modeFull   = "full"
	modeStream = "stream"
)

// zfsBenchFile is the image's name in the dataset.
const zfsBenchFile = "disk.img"

// BackupZFS compares, night by night on the same data, the two ways a ZFS
// snapshot can reach kopia: the full upload (Repo.Upload: kopia reads
// every byte of the snapshot) and the stream path (Repo.UploadChanged:
// `zfs send -i` from the night before tells which 128 KiB records
// changed, and only those are read).
//
// It creates a throwaway zfs-fuse pool on a sparse file under WorkDir, a
// dataset with compression=on, and writes a synthetic VM disk of Size
// there (NewSynthetic); each later night rewrites Churn of its 4 KiB
// blocks in place (Synthetic.Next) and snapshots the dataset. Every
// snapshot is uploaded, per compression × splitter, into two fresh
// filesystem repositories: one by the full upload, one by the stream
// path (night 1, the first snapshot, in full in both). The pool, the
// repositories and the work directory are removed afterwards, also when
// the bench fails or ctx is cancelled.
//
// A splitter the stream path cannot use (DYNAMIC-*) makes UploadChanged
// read the file in full: the table's way column and the notes say so.
func BackupZFS(ctx context.Context, o BackupOptions) (*Table, *Chart, error) {
	const what = "bench backup --zfs"
	if len(o.Data) > 0 {
		return nil, nil, errors.New(what + ": --data does not apply; the ZFS mode generates its disk (--synthetic SIZE)")
	}
	if o.Size == 0 {
		return nil, nil, errors.New(what + ": nothing to measure; give --synthetic SIZE, the disk to generate on the throwaway pool")
	}
	if len(o.Compressions) == 0 {
		o.Compressions = DefaultZFSBackupCompressions
	}
	if len(o.Splitters) == 0 {
		o.Splitters = DefaultZFSBackupSplitters
	}
	if len(o.Presets) == 0 {
		o.Presets = []string{"none"}
	}
	for _, p := range o.Presets {
		if _, err := drivemodel.Preset(p); err != nil {
			return nil, nil, fmt.Errorf("%s: --preset %q: %v", what, p, err)
		}
	}
	if err := o.check(); err != nil {
		return nil, nil, errors.New(strings.Replace(err.Error(), "bench backup:", what+":", 1))
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string) {}
	}
	if err := requireZpool(ctx, what); err != nil {
		return nil, nil, err
	}
	work, err := os.MkdirTemp(o.WorkDir, "vmhistory-bench-zfs-")
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", what, err)
	}
	defer os.RemoveAll(work)
	if work, err = filepath.Abs(work); err != nil {
		return nil, nil, err
	}

	// The image, the records each night leaves to the snapshots before
	// (a 4 KiB write replaces a whole 128 KiB record: up to 32× the
	// churn, at most the whole image), and room for metadata; sparse, so
	// only what is written takes space.
	perNight := int64(float64(o.Size) * min(1, 32*o.Churn))
	poolSize := o.Size + perNight*int64(o.Versions-1) + o.Size/4 + 256<<20
	progress(fmt.Sprintf("creating a zfs-fuse pool in %s", work))
	pool, err := newBenchPool(ctx, work, poolSize, what)
	if err != nil {
		return nil, nil, err
	}
	defer pool.destroy()
	b := &zfsBench{o: o, pool: pool, work: work, dataset: pool.name + "/bench", progress: progress}
	defer b.close()
	if err := b.run(ctx); err != nil {
		if ctx.Err() != nil {
			// The cause is the interrupt, whatever kopia or zfs made of it.
			return nil, nil, fmt.Errorf("%s: interrupted (%w) at %s; the pool and the repositories are removed", what, ctx.Err(), b.at)
		}
		return nil, nil, fmt.Errorf("%s: %w", what, err)
	}
	if o.zfsAfterRun != nil {
		if err := o.zfsAfterRun(ctx, b); err != nil {
			return nil, nil, err
		}
	}
	t, chart := b.table()
	return t, chart, nil
}

// zfsBench is one run of BackupZFS.
type zfsBench struct {
	o        BackupOptions
	pool     *benchPool
	work     string
	dataset  string
	mnt      string
	progress func(string)
	configs  []*zfsConfig
	nights   []zfsNight
	snaps    []zfs.Snapshot
	view     *zfs.SnapshotView // the newest snapshot's files
	at       string            // the step under way, for an interrupt's error
}

// zfsNight is what one night's data and stream were, whatever the
// configuration.
type zfsNight struct {
	changed int64         // 4 KiB blocks that differ from the night before, in bytes
	send    time.Duration // zfs send -i, parse, changeset.Build
	sum     changeset.Summary
}

// zfsConfig is one compression × splitter × drive-model preset: a
// repository per mode.
type zfsConfig struct {
	comp, sp, preset string
	full, stream     *zfsRepo
}

func (c *zfsConfig) name() string {
	if c.preset == "none" {
		return c.comp + " × " + c.sp
	}
	return c.comp + " × " + c.sp + " via " + c.preset
}

// zfsRepo is one mode's repository and its steps, one per night.
type zfsRepo struct {
	mode, sp   string
	preset     string // of the drive model the repository is reached through
	base       string
	r          *kopiarepo.Repo
	emptySize  int64
	lastID     string // the kopia snapshot of the night before
	steps      []zfsStep
	configFile string
}

type zfsStep struct {
	took, cpu        time.Duration // wall time; user+sys CPU of this process
	read             int64
	repoSize, growth int64
	way, reason      string // the stream mode's way for the image
	rootID           string
}

func (b *zfsBench) close() {
	if b.view != nil {
		closeViewRetrying(b.view)
		b.view = nil
	}
	for _, c := range b.configs {
		for _, r := range []*zfsRepo{c.full, c.stream} {
			if r.r != nil {
				r.r.Close(context.Background()) //nolint:errcheck
			}
		}
	}
}

func (b *zfsBench) run(ctx context.Context) error {
	o := b.o
	z := b.pool.z
	// Every upload reads cold, as a nightly upload of disks far larger
	// than memory does: ZFS caches only metadata, and the kernel's page
	// cache (the pool's file, the view) is dropped before each upload.
	// Warm, whichever upload ran second would read the first one's
	// cached blocks.
	if err := z.CreateDataset(ctx, b.dataset, map[string]string{"compression": "on", "primarycache": "metadata"}); err != nil {
		return err
	}
	b.mnt = filepath.Join(b.pool.mnt, "bench")
	var repos []*zfsRepo
	for _, preset := range o.Presets {
		for _, comp := range o.Compressions {
			for _, sp := range o.Splitters {
				c := &zfsConfig{comp: comp, sp: sp, preset: preset}
				base := filepath.Join(b.work, "repo-"+comp+"-"+sp+"-"+preset+"-")
				c.full = &zfsRepo{mode: modeFull, sp: sp, preset: preset, base: base + modeFull}
				c.stream = &zfsRepo{mode: modeStream, sp: sp, preset: preset, base: base + modeStream}
				b.configs = append(b.configs, c)
				repos = append(repos, c.full, c.stream)
			}
		}
	}
	// Creating a repository and connecting to it is mostly key
	// derivation: all at once, on every core.
	b.step(fmt.Sprintf("creating %d kopia repositories", len(repos)))
	errs := make([]error, len(repos))
	var wg sync.WaitGroup
	for i, r := range repos {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = r.create(ctx)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}

	img := filepath.Join(b.mnt, zfsBenchFile)
	var synth *Synthetic
	for v := 1; v <= o.Versions; v++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		night := zfsNight{}
		if v == 1 {
			b.step(fmt.Sprintf("night 1: writing %s of VM-disk-like data into %s (compression=on)", humanSize(o.Size), b.dataset))
			var err error
			if synth, err = NewSynthetic(img, o.Size, o.Seed); err != nil {
				return fmt.Errorf("write the image: %w", err)
			}
			night.changed = o.Size
		} else {
			// Not in the second of the night before: zfs-fuse keeps whole
			// seconds, and a rewrite that leaves size and mtime as they
			// were is taken as unchanged by kopia's full upload.
			if err := b.nextSecond(ctx); err != nil {
				return err
			}
			b.step(fmt.Sprintf("night %d: rewriting %g%% of the image's 4 KiB blocks in place", v, 100*o.Churn))
			blocks, err := synth.Next(o.Churn)
			if err != nil {
				return fmt.Errorf("night %d: churn: %w", v, err)
			}
			night.changed = blocks * BlockSize
		}
		s, view, err := b.snapshot(ctx, v)
		if err != nil {
			return err
		}
		prevView := b.view
		b.view = view

		var cs kopiarepo.ChangeSet
		if v > 1 {
			b.step(fmt.Sprintf("night %d: zfs send -i %s %s into the stream parser", v, b.snaps[v-2].Name, s.Name))
			start := time.Now()
			parser := zfs.NewStreamParser()
			if err := z.Send(ctx, zfs.SendOptions{Snapshot: s.FullName(), From: b.snaps[v-2].FullName()}, parser); err != nil {
				return fmt.Errorf("night %d: %w", v, err)
			}
			stream, err := parser.Result()
			if err != nil {
				return fmt.Errorf("night %d: parse the stream of zfs send -i %s %s: %w", v, b.snaps[v-2].FullName(), s.FullName(), err)
			}
			cs, night.sum, err = changeset.Build(changeset.Input{
				Stream: stream, Base: b.snaps[v-2], New: s, BaseDir: prevView.Root, NewDir: view.Root,
			})
			if err != nil {
				return fmt.Errorf("night %d: change set: %w", v, err)
			}
			night.send = time.Since(start)
		}
		b.nights = append(b.nights, night)

		for _, c := range b.configs {
			for _, r := range []*zfsRepo{c.stream, c.full} {
				b.step(fmt.Sprintf("night %d/%d: %s upload into %s", v, o.Versions, r.mode, c.name()))
				if err := dropCaches(); err != nil {
					return err
				}
				if err := b.upload(ctx, c, r, s, view, cs, v); err != nil {
					return fmt.Errorf("night %d, %s upload into %s: %w", v, r.mode, c.name(), err)
				}
				st := r.steps[len(r.steps)-1]
				b.progress(fmt.Sprintf("night %d/%d: %s upload into %s took %.1f s, read %s, repository +%s", v, o.Versions, r.mode, c.name(),
					st.took.Seconds(), mib(st.read), mib(st.growth)))
			}
		}
		if prevView != nil {
			closeViewRetrying(prevView)
		}
	}
	return nil
}

// step reports the start of a step, and remembers it for an interrupt's
// error.
func (b *zfsBench) step(s string) {
	b.at = s
	b.progress(s)
}

// snapshot takes night v's snapshot, at least a second after the one
// before (creation times are whole seconds, and kopia orders the nights
// by them), and opens its files.
func (b *zfsBench) snapshot(ctx context.Context, v int) (zfs.Snapshot, *zfs.SnapshotView, error) {
	syscall.Sync()
	if err := b.nextSecond(ctx); err != nil {
		return zfs.Snapshot{}, nil, err
	}
	s, err := b.pool.z.CreateSnapshot(ctx, b.dataset, fmt.Sprintf("night-%02d", v), nil)
	if err != nil {
		return zfs.Snapshot{}, nil, fmt.Errorf("night %d: %w", v, err)
	}
	b.snaps = append(b.snaps, s)
	view, err := b.pool.z.OpenSnapshot(ctx, s.FullName())
	if err != nil {
		return zfs.Snapshot{}, nil, fmt.Errorf("night %d: %w", v, err)
	}
	return s, view, nil
}

// nextSecond waits until the whole second after the last snapshot's
// creation (its time, and the night's writes before it, are in whole
// seconds).
func (b *zfsBench) nextSecond(ctx context.Context) error {
	n := len(b.snaps)
	if n == 0 {
		return nil
	}
	wait := time.Until(b.snaps[n-1].Creation.Truncate(time.Second).Add(time.Second))
	if wait <= 0 {
		return nil
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(wait + 10*time.Millisecond):
		return nil
	}
}

// create creates the repository and connects to it.
func (r *zfsRepo) create(ctx context.Context) error {
	var err error
	if r.configFile, err = createBenchRepo(ctx, r.base, r.sp); err != nil {
		return fmt.Errorf("create the repository %s: %w", r.base, err)
	}
	if r.emptySize, _, err = blobSizes(ctx, benchBlobDir(r.base)); err != nil {
		return err
	}
	if r.preset != "none" {
		// Each repository its own model: its link is not shared with the
		// other mode's uploads (they never run at once anyway).
		params := drivemodel.MustPreset(r.preset)
		modelled := filepath.Join(r.base, "model.config")
		if err := drivemodel.WriteConfig(r.configFile, modelled, drivemodel.ConfigOptions{
			Model: fmt.Sprintf("bench-zfs-%d", modelSeq.Add(1)), Params: &params}); err != nil {
			return fmt.Errorf("the %s drive model for %s: %w", r.preset, r.base, err)
		}
		r.configFile = modelled
	}
	if r.r, err = kopiarepo.Open(ctx, r.configFile, benchPassword); err != nil {
		return fmt.Errorf("open the repository %s: %w", r.base, err)
	}
	return nil
}

// upload puts night v's snapshot into r's repository: in full, or by
// the stream path from the change set (night 1 in full in both).
func (b *zfsBench) upload(ctx context.Context, c *zfsConfig, r *zfsRepo, s zfs.Snapshot, view *zfs.SnapshotView, cs kopiarepo.ChangeSet, v int) error {
	req := kopiarepo.UploadRequest{
		Dir: view.Root, SourcePath: b.mnt, Host: "bench", User: "root", StartTime: s.Creation,
		Description: "vmhistory bench " + s.FullName(),
		Tags: map[string]string{
			kopiarepo.TagDataset:  s.Dataset,
			kopiarepo.TagSnapshot: s.Name,
			kopiarepo.TagGUID:     strconv.FormatUint(s.GUID, 10),
		},
		Compression: c.comp, Splitter: c.sp, SkipMaintenance: true,
	}
	var st zfsStep
	var snap kopiarepo.Snapshot
	start, cpu := time.Now(), processCPU()
	if r.mode == modeStream && v > 1 {
		cs.Previous = r.lastID
		res, err := r.r.UploadChanged(ctx, req, cs)
		st.took, st.cpu = time.Since(start), processCPU()-cpu
		if err != nil {
			return err
		}
		snap, st.read = res.Snapshot, res.ReadBytes
		st.way = kopiarepo.WayUnchanged
		for _, f := range res.Files {
			if f.Path == zfsBenchFile {
				st.way, st.reason = f.Way, f.Reason
			}
		}
	} else {
		res, err := r.r.Upload(ctx, req)
		st.took, st.cpu = time.Since(start), processCPU()-cpu
		if err != nil {
			return err
		}
		snap, st.read = res.Snapshot, res.Progress.HashedBytes
		st.way = kopiarepo.WayFull
	}
	if snap.ID == "" {
		return errors.New("no kopia snapshot was saved")
	}
	r.lastID, st.rootID = snap.ID, snap.RootObjectID
	var err error
	if st.repoSize, _, err = blobSizes(ctx, benchBlobDir(r.base)); err != nil {
		return err
	}
	prev := r.emptySize
	if len(r.steps) > 0 {
		prev = r.steps[len(r.steps)-1].repoSize
	}
	st.growth = st.repoSize - prev
	r.steps = append(r.steps, st)
	return nil
}

// table makes the table and a chart of the upload time per night.
func (b *zfsBench) table() (*Table, *Chart) {
	o := b.o
	t := &Table{
		Title: fmt.Sprintf("Backup of %d nights of a %s synthetic VM disk on a zfs-fuse dataset (compression=on), %g%% of its 4 KiB blocks rewritten in place each night: the full upload against the stream path (zfs send -i)",
			o.Versions, humanSize(o.Size), 100*o.Churn),
		Columns: ZFSBackupColumns,
	}
	chart := &Chart{
		Title:  fmt.Sprintf("Upload time per night (%s synthetic disk on ZFS, %g%% churn)", humanSize(o.Size), 100*o.Churn),
		XLabel: "night",
		YLabel: "upload time (s)",
		Kind:   ChartLines,
	}
	dash := Str("-")
	ratio := func(a, b float64, ok bool) Cell {
		if !ok || b <= 0 {
			return dash
		}
		return Num(a/b, "%.2f×")
	}
	for _, c := range b.configs {
		for _, r := range []*zfsRepo{c.full, c.stream} {
			ser := Series{Name: c.name() + " " + r.mode}
			for i, st := range r.steps {
				n := b.nights[i]
				stream := r.mode == modeStream && i > 0
				send, write, readPerWrite, speed := dash, dash, dash, dash
				if i > 0 {
					write = Num(toMiB(int64(n.sum.WriteBytes)), "%.1f")
					readPerWrite = ratio(float64(st.read), float64(n.sum.WriteBytes), true)
				}
				if stream {
					send = Num(n.send.Seconds(), "%.2f")
					speed = ratio(c.full.steps[i].took.Seconds(), st.took.Seconds(), true)
				}
				way := Str(st.way)
				t.Add(Str(c.comp), Str(c.sp), Str(c.preset), Int(int64(i+1)), Str(r.mode), Num(st.took.Seconds(), "%.2f"), Num(st.cpu.Seconds(), "%.2f"), send,
					Num(toMiB(st.read), "%.1f"), write, readPerWrite, Num(toMiB(n.changed), "%.1f"),
					Num(toMiB(st.repoSize), "%.1f"), Num(toMiB(st.growth), "%.1f"), ratio(float64(st.growth), float64(n.changed), n.changed > 0),
					speed, way)
				ser.X = append(ser.X, float64(i+1))
				ser.Y = append(ser.Y, st.took.Seconds())
			}
			chart.Series = append(chart.Series, ser)
		}
	}
	t.Notes = b.notes()
	return t, chart
}

// zfsMeans are one mode's means over the nights after the first.
type zfsMeans struct {
	took, send     time.Duration
	read, growth   float64
	write, changed float64
	wayCounts      map[string]int
	reasons        []string
}

func (b *zfsBench) means(r *zfsRepo) zfsMeans {
	m := zfsMeans{wayCounts: map[string]int{}}
	nights := len(r.steps) - 1
	for i, st := range r.steps[1:] {
		n := b.nights[i+1]
		m.took += st.took
		m.send += n.send
		m.read += float64(st.read)
		m.growth += float64(st.growth)
		m.write += float64(n.sum.WriteBytes)
		m.changed += float64(n.changed)
		m.wayCounts[st.way]++
		if st.reason != "" && !containsString(m.reasons, st.reason) {
			m.reasons = append(m.reasons, st.reason)
		}
	}
	if nights > 0 {
		f := float64(nights)
		m.took = time.Duration(float64(m.took) / f)
		m.send = time.Duration(float64(m.send) / f)
		m.read /= f
		m.growth /= f
		m.write /= f
		m.changed /= f
	}
	return m
}

func containsString(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func (b *zfsBench) notes() []string {
	notes := []string{
		"Each night's snapshot is uploaded twice per compression × splitter × preset, into its own repository: full (kopia's Upload reads every byte of the snapshot) and stream (UploadChanged reads only the 128 KiB records zfs send -i from the night before wrote); night 1 is a full upload in both.",
		"upload s: wall time of the upload (read, hash, compress, write, flush); CPU s: user+sys CPU seconds of this process over it (more than upload s: several cores at work); send s: zfs send -i into the stream parser and the change set, before the stream upload. read: bytes read from the snapshot (full: kopia's hashed bytes; stream: the changed chunks plus what kopia read itself). DRR_WRITE: the stream's write records, what zfs receive would rewrite.",
		"changed: the night's 4 KiB blocks that differ from the night before (night 1: all of it); repo: sum of the repository's blob sizes, index included; growth: what the night added; full/stream: the full upload's time over the stream upload's.",
	}
	if len(b.nights) < 2 {
		return append(notes, "One night only: both modes uploaded it in full; give --versions 2 or more to compare them.")
	}
	for _, c := range b.configs {
		full, stream := b.means(c.full), b.means(c.stream)
		if stream.wayCounts[kopiarepo.WayStream] == 0 {
			why := strings.Join(stream.reasons, "; ")
			if why == "" {
				why = "no file went the stream path"
			}
			notes = append(notes, fmt.Sprintf("%s: the stream path fell back to a full read of %s every night (%s); the stream path needs a FIXED-* splitter.", c.name(), zfsBenchFile, why))
		} else if n := len(b.nights) - 1 - stream.wayCounts[kopiarepo.WayStream]; n > 0 {
			notes = append(notes, fmt.Sprintf("%s: %s went another way than the stream path on %d night(s): %s.", c.name(), zfsBenchFile, n, strings.Join(stream.reasons, "; ")))
		}
		line := fmt.Sprintf("%s, mean of nights 2-%d: stream path %.1f× faster than the full upload (%.2f s against %.2f s; %.1f× counting zfs send, parse and change set, %.2f s more)",
			c.name(), len(b.nights), full.took.Seconds()/stream.took.Seconds(), stream.took.Seconds(), full.took.Seconds(),
			full.took.Seconds()/(stream.took+stream.send).Seconds(), stream.send.Seconds())
		line += fmt.Sprintf(", read %.2f× the stream's DRR_WRITE bytes (%s; the full upload read %s, %.1f× more)",
			stream.read/max(stream.write, 1), mib(int64(stream.read)), mib(int64(full.read)), full.read/max(stream.read, 1))
		line += fmt.Sprintf(", growth %.2f× changed (%s per night; the full upload's %.2f×, %s).",
			stream.growth/max(stream.changed, 1), mib(int64(stream.growth)), full.growth/max(full.changed, 1), mib(int64(full.growth)))
		notes = append(notes, line)
		if stream.wayCounts[kopiarepo.WayStream] > 0 {
			notes = append(notes, fmt.Sprintf("%s: both ways compress and write the same new chunks (%s read by the stream path); the full upload also reads and hashes the %s that did not change. So the speed ratio stays below the read ratio (%.1f×) by what compressing and writing the new chunks costs (compare the CPU s of the two).",
				c.name(), mib(int64(stream.read)), mib(int64(full.read-stream.read)), full.read/max(stream.read, 1)))
		}
	}
	return notes
}
