package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/blob/filesystem"
	"github.com/kopia/kopia/repo/compression"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/splitter"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/safefile"
)

// BackupOptions choose what "vmhistory bench backup" measures.
type BackupOptions struct {
	// Data are versions of one file or one directory, oldest first. When
	// empty, Size, Versions and Churn describe generated data instead.
	Data []string
	// Size of the generated file.
	Size int64
	// Versions to generate (the first one and Versions-1 nights).
	Versions int
	// Churn is the share of the file's 4 KiB blocks each generated night
	// changes (0.04 for 4%), at most 0.5.
	Churn float64
	// Seed of the generator: the same seed gives the same data.
	Seed uint64
	// Compressions and Splitters: one repository per combination.
	Compressions, Splitters []string
	// Presets of the drive model the ZFS mode's repositories are reached
	// through ("none", "drive", "seed"): each combination once per preset.
	// Only the ZFS mode takes them; none when empty.
	Presets []string
	// WorkDir holds the data and the throwaway repositories; a temporary
	// directory when empty. Removed afterwards either way.
	WorkDir string
	// Progress, when set, receives one line per step.
	Progress func(string)

	// zfsAfterRun, when set (by tests), sees BackupZFS's pool and
	// repositories after the last night, before the clean-up.
	zfsAfterRun func(context.Context, *zfsBench) error
}

// The configurations "vmhistory bench backup" measures by default: no
// compression (kopia's default) and zstd's better compression, each with
// kopia's default splitter, 1 MiB fixed chunks, and fixed chunks of ZFS's
// default recordsize.
var (
	DefaultBackupCompressions = []string{"none", "zstd-better-compression"}
	DefaultBackupSplitters    = []string{dynamicSplitter, "FIXED-1M", "FIXED-128K"}
)

// BackupColumns are the columns of the backup bench's table.
var BackupColumns = []string{"compression", "splitter", "version", "time s", "MB/s", "repo MiB", "growth MiB", "changed MiB", "growth/changed", "contents", "index KiB"}

// kopiaDefaultConfig is what "kopia repository create" gives: no
// compression, DYNAMIC-4M-BUZHASH.
const kopiaDefaultConfig = "none × " + dynamicSplitter

// Backup uploads each version of the data as the next snapshot of the same
// source into one throwaway filesystem repository per compression ×
// splitter, and measures after each upload the repository's size (the sum
// of its blobs' sizes), how much it grew against the bytes that really
// changed (4 KiB blocks differing from the version before), the number of
// contents its index holds and the size of its index blobs.
//
// It returns the table and a chart of the repository size per version.
func Backup(ctx context.Context, o BackupOptions) (*Table, *Chart, error) {
	if err := o.check(); err != nil {
		return nil, nil, err
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string) {}
	}
	work, err := os.MkdirTemp(o.WorkDir, "vmhistory-bench-backup-")
	if err != nil {
		return nil, nil, fmt.Errorf("bench backup: %w", err)
	}
	defer os.RemoveAll(work)
	if work, err = filepath.Abs(work); err != nil {
		return nil, nil, err
	}
	dataDir := filepath.Join(work, "data")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, nil, err
	}

	var configs []*backupConfig
	for _, c := range o.Compressions {
		for _, sp := range o.Splitters {
			configs = append(configs, &backupConfig{comp: c, sp: sp, base: filepath.Join(work, "repo-"+c+"-"+sp)})
		}
	}
	defer func() {
		for _, c := range configs {
			if c.r != nil {
				c.r.Close(ctx) //nolint:errcheck
			}
		}
	}()
	versions := o.Versions
	if len(o.Data) > 0 {
		versions = len(o.Data)
	}
	// Version v stands for night v: snapshots and file times a day apart,
	// so that kopia orders them and re-reads the file each night (it takes
	// a file whose size and mtime did not change as unchanged).
	night0 := time.Now().Add(-time.Duration(versions+1) * 24 * time.Hour).Truncate(time.Second)
	src := &backupSource{dataDir: dataDir}
	var synth *Synthetic

	for v := 1; v <= versions; v++ {
		at := night0.Add(time.Duration(v) * 24 * time.Hour)
		var dir string
		var size, changed int64
		if len(o.Data) == 0 {
			path := filepath.Join(dataDir, "disk.img")
			if v == 1 {
				progress(fmt.Sprintf("generating version 1: %s of VM-disk-like data", humanSize(o.Size)))
				if synth, err = NewSynthetic(path, o.Size, o.Seed); err != nil {
					return nil, nil, fmt.Errorf("bench backup: %w", err)
				}
				changed = o.Size
			} else {
				progress(fmt.Sprintf("generating version %d: rewriting %g%% of the blocks", v, 100*o.Churn))
				blocks, err := synth.Next(o.Churn)
				if err != nil {
					return nil, nil, fmt.Errorf("bench backup: %w", err)
				}
				changed = blocks * BlockSize
			}
			if err := os.Chtimes(path, at, at); err != nil {
				return nil, nil, err
			}
			dir, size = dataDir, o.Size
		} else {
			progress(fmt.Sprintf("version %d: %s", v, o.Data[v-1]))
			if dir, size, changed, err = src.next(o.Data, v-1, at); err != nil {
				return nil, nil, fmt.Errorf("bench backup: %w", err)
			}
		}
		for _, c := range configs {
			progress(fmt.Sprintf("version %d/%d: uploading into %s", v, versions, c.name()))
			if err := c.step(ctx, v, dir, at, size, changed); err != nil {
				return nil, nil, fmt.Errorf("bench backup: %s, version %d: %w", c.name(), v, err)
			}
			s := c.steps[len(c.steps)-1]
			progress(fmt.Sprintf("version %d/%d: %s took %.1f s, repository %s (+%s)", v, versions, c.name(), s.took.Seconds(), mib(s.repoSize), mib(s.growth)))
		}
	}

	t := &Table{Columns: BackupColumns}
	what := ""
	if len(o.Data) == 0 {
		t.Title = fmt.Sprintf("Backup of %d versions of a %s synthetic VM disk, %g%% of its 4 KiB blocks rewritten each night", versions, humanSize(o.Size), 100*o.Churn)
		what = fmt.Sprintf("%s synthetic disk, %g%% churn", humanSize(o.Size), 100*o.Churn)
	} else {
		t.Title = fmt.Sprintf("Backup of %d versions of %s", versions, o.Data[0])
		what = "versions of " + filepath.Base(o.Data[0])
	}
	chart := &Chart{
		Title:  "Repository size per night (" + what + ")",
		XLabel: "version (night)",
		YLabel: "repository size (MiB)",
		Kind:   ChartLines,
	}
	for _, c := range configs {
		ser := Series{Name: c.name()}
		for i, s := range c.steps {
			ratio := Str("-")
			if s.changed > 0 {
				ratio = Num(float64(s.growth)/float64(s.changed), "%.2f×")
			}
			t.Add(Str(c.comp), Str(c.sp), Int(int64(i+1)), Num(s.took.Seconds(), "%.1f"), Num(float64(s.bytes)/s.took.Seconds()/1e6, "%.0f"),
				Num(toMiB(s.repoSize), "%.1f"), Num(toMiB(s.growth), "%.1f"), Num(toMiB(s.changed), "%.1f"), ratio,
				Int(s.contents), Num(float64(s.indexSize)/1024, "%.1f"))
			ser.X = append(ser.X, float64(i+1))
			ser.Y = append(ser.Y, toMiB(s.repoSize))
		}
		chart.Series = append(chart.Series, ser)
	}
	t.Notes = backupNotes(configs, versions)
	return t, chart, nil
}

func (o *BackupOptions) check() error {
	switch {
	case len(o.Data) > 0 && o.Size > 0:
		return errors.New("bench backup: give --data or --synthetic, not both")
	case len(o.Data) == 0 && o.Size == 0:
		return errors.New("bench backup: nothing to measure; give --data PATH... (versions of a file or directory, oldest first) or --synthetic SIZE")
	case len(o.Data) == 0 && o.Size < 1<<20:
		return fmt.Errorf("bench backup: --synthetic %d bytes is too small; use at least 1MiB", o.Size)
	case len(o.Data) == 0 && (o.Versions < 1 || o.Versions > 100):
		return fmt.Errorf("bench backup: --versions %d is out of range 1..100", o.Versions)
	case len(o.Data) == 0 && !(o.Churn > 0 && o.Churn <= 0.5):
		return fmt.Errorf("bench backup: --churn %g%% is out of range; give more than 0%% and at most 50%%", 100*o.Churn)
	}
	var dirs int
	for _, p := range o.Data {
		fi, err := os.Stat(p)
		if err != nil {
			var pe *fs.PathError
			if errors.As(err, &pe) {
				err = pe.Err
			}
			return fmt.Errorf("bench backup: --data %s: %v", p, err)
		}
		switch {
		case fi.IsDir():
			dirs++
			n, err := treeSize(p)
			if err != nil {
				return fmt.Errorf("bench backup: --data %s: %v", p, err)
			}
			if n == 0 {
				return fmt.Errorf("bench backup: --data %s: the directory holds no data", p)
			}
		case !fi.Mode().IsRegular():
			return fmt.Errorf("bench backup: --data %s is neither a regular file nor a directory", p)
		case fi.Size() == 0:
			return fmt.Errorf("bench backup: --data %s is empty", p)
		}
	}
	if dirs != 0 && dirs != len(o.Data) {
		return errors.New("bench backup: --data mixes files and directories; give versions of one file or of one directory")
	}
	if len(o.Compressions) == 0 || len(o.Splitters) == 0 {
		return errors.New("bench backup: no compression or no splitter to measure")
	}
	for _, c := range o.Compressions {
		if _, ok := compression.ByName[compression.Name(c)]; (!ok || compression.IsDeprecated[compression.Name(c)]) && c != "none" {
			return fmt.Errorf("bench backup: unknown compression %q (choose none or one of: %s)", c, strings.Join(BackupCompressions(), ", "))
		}
	}
	for _, s := range o.Splitters {
		if splitter.GetFactory(s) == nil {
			return fmt.Errorf("bench backup: unknown splitter %q (kopia's are listed by vmhistory bench backup --help)", s)
		}
	}
	o.Compressions = uniq(o.Compressions)
	o.Splitters = uniq(o.Splitters)
	return nil
}

// BackupCompressions are the compressions the backup bench accepts besides
// none: kopia's, less those it keeps only to read old repositories.
func BackupCompressions() []string {
	var names []string
	for n := range compression.ByName {
		if !compression.IsDeprecated[n] {
			names = append(names, string(n))
		}
	}
	slices.Sort(names)
	return names
}

func uniq(s []string) []string {
	var out []string
	for _, v := range s {
		if !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	return out
}

// backupConfig is one compression × splitter and its repository.
type backupConfig struct {
	comp, sp   string
	base       string // repository directory
	configFile string
	r          *kopiarepo.Repo // one connection for all versions, as the nightly job's
	emptySize  int64           // of the new repository, before any upload
	steps      []backupStep
}

type backupStep struct {
	took                      time.Duration
	bytes                     int64 // the version's size
	repoSize, growth, changed int64
	contents, indexSize       int64
}

func (c *backupConfig) name() string { return c.comp + " × " + c.sp }

// step uploads one version and measures the repository afterwards.
func (c *backupConfig) step(ctx context.Context, v int, dir string, at time.Time, size, changed int64) error {
	if v == 1 {
		var err error
		if c.configFile, err = createBenchRepo(ctx, c.base, c.sp); err != nil {
			return err
		}
		if c.emptySize, _, err = blobSizes(ctx, benchBlobDir(c.base)); err != nil {
			return err
		}
		if c.r, err = kopiarepo.Open(ctx, c.configFile, benchPassword); err != nil {
			return err
		}
	}
	start := time.Now()
	_, err := c.r.Upload(ctx, kopiarepo.UploadRequest{
		Dir: dir, SourcePath: "/bench", StartTime: at,
		Compression: c.comp, Splitter: c.sp, SkipMaintenance: true,
	})
	took := time.Since(start)
	if err != nil {
		return err
	}
	s := backupStep{took: took, bytes: size, changed: changed}
	if s.repoSize, s.indexSize, err = blobSizes(ctx, benchBlobDir(c.base)); err != nil {
		return err
	}
	prev := c.emptySize
	if len(c.steps) > 0 {
		prev = c.steps[len(c.steps)-1].repoSize
	}
	s.growth = s.repoSize - prev
	if s.contents, err = countContents(ctx, c.r); err != nil {
		return err
	}
	c.steps = append(c.steps, s)
	return nil
}

// indexBlobPrefixes are the blobs that hold kopia's index: the epoch
// manager's uncompacted, single-epoch and range-checkpoint indexes ("xn",
// "xs", "xr"), and legacy "n" index blobs.
var indexBlobPrefixes = []blob.ID{"xn", "xs", "xr", "n"}

// blobSizes lists a filesystem repository's storage directly (no list
// cache) and returns the sum of all its blobs' sizes and of its index
// blobs' sizes.
func blobSizes(ctx context.Context, dir string) (total, index int64, err error) {
	st, err := filesystem.New(ctx, &filesystem.Options{Path: dir}, false)
	if err != nil {
		return 0, 0, err
	}
	defer st.Close(ctx) //nolint:errcheck
	blobs, err := blob.ListAllBlobs(ctx, st, "")
	if err != nil {
		return 0, 0, err
	}
	for _, b := range blobs {
		total += b.Length
		if slices.ContainsFunc(indexBlobPrefixes, func(p blob.ID) bool { return strings.HasPrefix(string(b.BlobID), string(p)) }) {
			index += b.Length
		}
	}
	return total, index, nil
}

// countContents counts the contents the repository's index holds: data
// chunks, and the directory, manifest and indirect object contents that
// describe them. The connection sees what its uploads flushed.
func countContents(ctx context.Context, r *kopiarepo.Repo) (int64, error) {
	dr, ok := r.Kopia().(repo.DirectRepository)
	if !ok {
		return 0, errors.New("not a direct repository")
	}
	var n int64
	err := dr.ContentReader().IterateContents(ctx, content.IterateOptions{}, func(content.Info) error {
		n++
		return nil
	})
	return n, err
}

// backupSource stages versions given with --data: a directory is uploaded
// where it is; a file is linked (or copied) into the same staging path
// each time, so that every version is the next snapshot of the same file.
type backupSource struct {
	dataDir string
	staged  string
	last    os.FileInfo
}

func (b *backupSource) next(data []string, i int, at time.Time) (dir string, size, changed int64, err error) {
	p := data[i]
	fi, err := os.Stat(p)
	if err != nil {
		return "", 0, 0, err
	}
	if fi.IsDir() {
		if size, err = treeSize(p); err != nil {
			return "", 0, 0, err
		}
		dir, changed = filepath.Clean(p), size
		if i > 0 {
			changed, err = ChangedBytes(data[i-1], p)
		}
		abs, aerr := filepath.Abs(dir)
		if err == nil {
			err = aerr
		}
		return abs, size, changed, err
	}
	if b.staged == "" {
		b.staged = filepath.Join(b.dataDir, filepath.Base(p))
	}
	size, changed = fi.Size(), fi.Size()
	if i > 0 {
		if changed, err = ChangedBytes(data[i-1], p); err != nil {
			return "", 0, 0, err
		}
	}
	os.Remove(b.staged)
	// A hard link costs nothing, but keeps the file's own mtime: when
	// that and the size match the previous version's, kopia would take
	// the file as unchanged, so copy it and give the copy its night's time.
	same := b.last != nil && b.last.Size() == fi.Size() && b.last.ModTime().Equal(fi.ModTime())
	if same || os.Link(p, b.staged) != nil {
		if err := copyFile(p, b.staged); err != nil {
			return "", 0, 0, err
		}
		if err := os.Chtimes(b.staged, at, at); err != nil {
			return "", 0, 0, err
		}
	}
	if b.last, err = os.Stat(b.staged); err != nil {
		return "", 0, 0, err
	}
	return b.dataDir, size, changed, nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := safefile.OpenFile(to, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// treeSize is the sum of the sizes of the regular files under dir.
func treeSize(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err == nil {
			n += fi.Size()
		}
		return err
	})
	return n, err
}

// backupNotes say which configuration keeps nightly growth lowest and what
// it costs against kopia's default.
func backupNotes(configs []*backupConfig, versions int) []string {
	notes := []string{
		"time: wall time of the upload (read, hash, compress, write, flush); MB/s: the version's bytes by that time.",
		"repo: sum of the sizes of all the repository's blobs after the upload; growth: what this version added; changed: the version's 4 KiB blocks that differ from the previous one (version 1: all of it).",
		"contents: contents in the repository's index (chunks and metadata); index: size of its index blobs.",
	}
	if versions < 2 {
		return append(notes, "One version only: no nightly growth to compare; give two versions or more.")
	}
	type summary struct {
		c               *backupConfig
		growth, changed float64 // mean per night
		took            time.Duration
		contents, index int64 // after the last version
		repoSize        int64
		ratio           float64
		ratioOK         bool
	}
	var sums []summary
	for _, c := range configs {
		s := summary{c: c}
		for _, st := range c.steps[1:] {
			s.growth += float64(st.growth)
			s.changed += float64(st.changed)
			s.took += st.took
		}
		nights := float64(len(c.steps) - 1)
		s.growth /= nights
		s.changed /= nights
		s.took = time.Duration(float64(s.took) / nights)
		last := c.steps[len(c.steps)-1]
		s.contents, s.index, s.repoSize = last.contents, last.indexSize, last.repoSize
		if s.changed > 0 {
			s.ratio, s.ratioOK = s.growth/s.changed, true
		}
		sums = append(sums, s)
	}
	var ratios []string
	for _, s := range sums {
		if s.ratioOK {
			ratios = append(ratios, fmt.Sprintf("%s %.2f×", s.c.name(), s.ratio))
		}
	}
	if len(ratios) > 0 {
		notes = append(notes, "Growth per night ÷ changed bytes: "+strings.Join(ratios, ", ")+".")
	}
	best := sums[0]
	for _, s := range sums[1:] {
		if s.growth < best.growth {
			best = s
		}
	}
	ref, refName := sums[0], sums[0].c.name()
	for _, s := range sums {
		if s.c.name() == kopiaDefaultConfig {
			ref, refName = s, s.c.name()+" (kopia's default)"
		}
	}
	line := fmt.Sprintf("Lowest nightly growth: %s, %s per night on average", best.c.name(), mib(int64(best.growth)))
	if best.ratioOK {
		line += fmt.Sprintf(" (%.2f× the changed bytes)", best.ratio)
	}
	if best.c == ref.c {
		return append(notes, line+".")
	}
	line += ", against " + mib(int64(ref.growth))
	if ref.ratioOK {
		line += fmt.Sprintf(" (%.2f×)", ref.ratio)
	}
	line += " for " + refName
	notes = append(notes, line+".")
	notes = append(notes, fmt.Sprintf("What it costs against %s: %s contents instead of %d (%.1f×), an index of %s instead of %s, %.1f s per night instead of %.1f s; repository after %d versions %s instead of %s.",
		refName, fmt.Sprint(best.contents), ref.contents, float64(best.contents)/float64(max(ref.contents, 1)),
		kib(best.index), kib(ref.index), best.took.Seconds(), ref.took.Seconds(), versions, mib(best.repoSize), mib(ref.repoSize)))
	return notes
}

func toMiB(n int64) float64 { return float64(n) / (1 << 20) }

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", toMiB(n)) }

func kib(n int64) string { return fmt.Sprintf("%.1f KiB", float64(n)/1024) }
