package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/mattn/go-isatty"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
	"github.com/vmhistory/vmhistory/restore"
)

type restoreFlags struct {
	force     bool
	verify    bool
	parallel  int
	rangeSize string
	dataset   string
	pageCache bool
	noSync    bool
	noSHA256  bool
	window    int
	noSeed    bool
}

func newRestoreCommand(opts *globalOptions) *cobra.Command {
	flags := &restoreFlags{}
	cmd := &cobra.Command{
		Use:   "restore SNAPSHOT:PATH DEST",
		Short: "Copy one file of a snapshot out, from the fastest source that has it",
		Long: `Copy one file of a snapshot out, from the fastest source that has it:
local ZFS, then the replica, then kopia. If a source fails mid-copy, the
copy goes on from the next one at the same offset.

` + restore.SpecHelp + `

DEST is the file to create, or an existing directory to restore into under
the file's own name. Its directory must exist. An existing file is never
replaced without --force.

The file is fetched --parallel ranges at a time (a kopia file is read in
order, its prefetch window keeping the fetches in flight) into
DEST.vmhistory-partial beside DEST, written with O_DIRECT where the filesystem
takes it (--page-cache: through the page cache); blocks of zeros are left as
holes, so a sparse VM image stays sparse. Each byte is verified once against
its kopia content ID and hashed into the result's SHA-256 as it arrives.
Finished ranges are recorded in DEST.vmhistory-journal: after an
interrupt (Ctrl-C, a crash, a lost connection) the same command fetches only
what is missing. When the file is complete it gets the snapshot's mode and
modification time, is fsync'd and renamed to DEST: when the command returns,
the file is on disk. --no-sync returns without waiting for the disk, as cp,
rsync and "kopia snapshot restore" do: faster where the file fits in the
kernel's dirty-page limits (a few GiB on most hosts), but a power loss in
the next half minute can lose part of it; an interrupted --no-sync restore
still resumes, unless the machine restarted. The summary gives its SHA-256
(--no-sha256 leaves it out: every byte is still checked against its kopia
content ID or read from ZFS, but the hash of the whole file is the one step
that cannot run in parallel, and bounds a restore from a fast store) and the
command's time, with what opening the sources, the timeline and the
file took before the copy began ("opened in ..."; --json: total_seconds and
open); --verify compares it with a second source of the snapshot, where one
exists.

A file only kopia holds is seeded from the same file in the two local
snapshots of its dataset nearest in time: a chunk found there is read from
the local disk instead of the store, after it was hashed and compared with
its kopia content ID (a mismatch or read error sends it to the store).
Snapshots kopia also holds are searched through their chunk tables; others
are probed at each chunk's own offset, and what that found is kept in
state_dir/seed-maps for the next restore. The summary says what came from
each seed and what was fetched ("seeded: ..."); --no-seed fetches every
chunk from the store.`,
		Example: `  vmhistory restore latest:images/db.qcow2 /var/lib/libvirt/images/db-restored.qcow2
  vmhistory restore 2023-03-04:images/db.qcow2 /srv/restore/      # into a directory
  vmhistory restore DATA/libvirt@latest~3:images/web.qcow2 /srv/restore/web.qcow2 --verify
  vmhistory restore latest:images/db.qcow2 /srv/restore/ --json | jq .sha256`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runRestore(cmd, opts, flags, args[0], args[1])
		},
	}
	f := cmd.Flags()
	f.BoolVarP(&flags.force, "force", "f", false, "replace DEST if it exists (a symbolic link there is replaced, never written through; a device or fifo is refused)")
	f.BoolVar(&flags.verify, "verify", false, "compare the result with a second source of the snapshot")
	f.IntVarP(&flags.parallel, "parallel", "p", restore.DefaultParallel, "ranges fetched at once (memory: parallel × range size)")
	f.StringVar(&flags.rangeSize, "range-size", "4MiB", "size of the ranges fetched, written and journaled")
	f.IntVar(&flags.window, "window", prefetch.DefaultWindow, "kopia files: chunk fetches kept in flight ahead of the copy (memory: up to window × 8 MiB)")
	f.BoolVar(&flags.noSeed, "no-seed", false, "kopia files: fetch every chunk from the store, none from this host's local snapshots of the same file")
	f.BoolVar(&flags.noSync, "no-sync", false, "return without waiting for the disk (no fsync; page cache), as cp and kopia's restore do: the kernel writes the file back afterwards")
	f.BoolVar(&flags.noSHA256, "no-sha256", false, "do not compute the SHA-256 of the result (every byte is still checked against its source); it is the one step that cannot run in parallel: ~0.75 CPU-seconds per GiB")
	f.BoolVar(&flags.pageCache, "page-cache", false, "write through the page cache instead of with O_DIRECT (the default where the filesystem takes it: a large restore then neither evicts the host's cache nor leaves gigabytes of dirty pages behind)")
	f.StringVarP(&flags.dataset, "dataset", "d", "", "the dataset SNAPSHOT belongs to (e.g. DATA/libvirt), needed by latest and dates when several datasets are configured")
	return cmd
}

// restoreSummary is the --json output.
type restoreSummary struct {
	Snapshot string                `json:"snapshot"`
	GUID     uint64                `json:"guid,string,omitempty"`
	Path     string                `json:"path"`
	Sources  []restore.SourceBytes `json:"sources"`
	// VerifiedWith names the second source --verify compared with.
	VerifiedWith string `json:"verified_with,omitempty"`
	restore.CopyResult
	// Open is how long getting to the file took: opening the sources,
	// the timeline, resolving and opening the file.
	Open restore.OpenTimes `json:"open"`
	// Total is the command's wall time up to the end of the copy (and
	// of --verify), the open included; CopyResult's seconds are the
	// copy's alone.
	Total        time.Duration `json:"-"`
	TotalSeconds float64       `json:"total_seconds"`
	// FirstByteSeconds is the time from the command's start to the first
	// bytes of the file in hand (0 when nothing was fetched: all resumed).
	FirstByteSeconds float64 `json:"first_byte_seconds"`
}

func runRestore(cmd *cobra.Command, opts *globalOptions, flags *restoreFlags, spec, dest string) error {
	if opts.started.IsZero() {
		opts.started = time.Now()
	}
	if flags.window < 1 || flags.window > 256 {
		return fmt.Errorf("--window %d is out of range 1..256", flags.window)
	}
	if flags.parallel < 1 {
		return fmt.Errorf("--parallel must be at least 1, not %d", flags.parallel)
	}
	rangeSize, err := humanize.ParseBytes(flags.rangeSize)
	if err != nil || rangeSize < restore.SparseBlock || rangeSize > 1<<30 {
		return fmt.Errorf("--range-size %q: want a size from 4KiB to 1GiB, like 4MiB", flags.rangeSize)
	}
	// A destination that cannot work is refused before any source is
	// contacted.
	if fi, err := os.Stat(dest); err != nil || !fi.IsDir() {
		if _, err := restore.DestPath(dest, "", flags.force); err != nil {
			return destError(err)
		}
	}
	cfg, err := loadConfig(cmd, opts)
	if err != nil {
		return err
	}
	// SIGINT, SIGTERM or SIGHUP stops the copy; the partial file and its
	// journal stay, and the same command resumes.
	ctx, stop := interruptContext(cmd.Context())
	defer stop()
	sess, err := openSession(ctx, cmd, opts, cfg, restore.SessionOptions{PrefetchWindow: flags.window, NoSeed: flags.noSeed})
	if err != nil {
		return err
	}
	defer sess.Close()
	if sess.NoneAnswered() {
		return errNoSourceAnswered
	}
	target, err := sess.Locate(ctx, spec, flags.dataset)
	if err != nil {
		return err
	}
	entry, rel, info := target.Entry, target.Rel, target.Info
	final, err := restore.DestPath(dest, path.Base(rel), flags.force)
	if err != nil {
		return destError(err)
	}
	file, err := sess.OpenFile(ctx, entry, rel)
	if err != nil {
		return err
	}
	defer file.Close()

	copts := restore.CopyOptions{
		Parallel:    flags.parallel,
		RangeSize:   int64(rangeSize),
		Force:       flags.force,
		PageCache:   flags.pageCache,
		NoSync:      flags.noSync,
		NoSHA256:    flags.noSHA256,
		Identity:    target.Identity(),
		Mode:        info.Mode,
		ModTime:     info.ModTime,
		SourceBytes: file.BytesBySource,
		Notice:      func(s string) { fmt.Fprintln(cmd.ErrOrStderr(), "vmhistory: "+s) },
		BeforePublish: func(ctx context.Context) error {
			return sess.StillNames(ctx, target)
		},
	}
	verifiedWith := ""
	if flags.verify {
		other, err := sess.OpenFileExcept(ctx, entry, rel, file.Serving())
		if err != nil {
			return fmt.Errorf("--verify: %w", err)
		}
		if other == nil {
			fmt.Fprintf(cmd.ErrOrStderr(), "vmhistory: --verify: only %s holds %s; nothing to compare with\n", file.Serving(), entry.FullName())
		} else {
			defer other.Close()
			copts.Verify = other
			verifiedWith = other.Serving()
		}
	}

	var bar *restoreBar
	switch {
	case !isTerminal(cmd.ErrOrStderr()):
		// A pipe or the journal: a line now and then, as kopia does, so
		// that a long restore does not look hung.
		copts.Progress = newRestoreLines(cmd.ErrOrStderr(), path.Base(rel), restoreLineInterval).update
		copts.ProgressInterval = restoreLineInterval
	case !opts.jsonOutput:
		bar = newRestoreBar(cmd.ErrOrStderr(), path.Base(rel), file.Size())
		copts.Progress = bar.update
	}
	res, err := restore.Copy(ctx, file, final, copts)
	if bar != nil {
		bar.finish()
	}
	if err != nil {
		if errors.Is(err, restore.ErrDestExists) || errors.Is(err, restore.ErrDestDir) {
			return destError(err)
		}
		return err
	}
	total := time.Since(opts.started)
	sum := restoreSummary{Snapshot: entry.FullName(), GUID: entry.GUID, Path: rel, Sources: file.Stats(), CopyResult: res,
		Open: sess.Times(), Total: total, TotalSeconds: total.Seconds()}
	if !res.FirstByte.IsZero() {
		sum.FirstByteSeconds = res.FirstByte.Sub(opts.started).Seconds()
	}
	if res.Verified {
		sum.VerifiedWith = verifiedWith
	}
	if opts.jsonOutput {
		return writeIndentedJSON(cmd.OutOrStdout(), sum)
	}
	writeRestoreSummary(cmd.OutOrStdout(), sum)
	return nil
}

// seedLine says what of a kopia source's bytes came from this host's
// snapshots instead of the store: "seeded: 1.9 GiB of kopia's 2.0 GiB from
// local DATA/libvirt@n5 (1.9 GiB); fetched 97 MiB from the store; 2 seed
// chunks did not match their content ID (fetched instead)"; "" when
// nothing was seeded or tried. Probes that found a changed chunk are not
// named: that is what a changed chunk does.
func seedLine(src restore.SourceBytes) string {
	seeded := src.SeededBytes()
	if seeded == 0 && src.SeedMismatches == 0 && src.SeedReadErrors == 0 {
		return ""
	}
	origins := slices.Sorted(maps.Keys(src.Seeded))
	var from []string
	for _, o := range origins {
		from = append(from, fmt.Sprintf("%s (%s)", o, humanize.IBytes(uint64(src.Seeded[o]))))
	}
	line := fmt.Sprintf("seeded: %s of %s's %s", humanize.IBytes(uint64(seeded)), src.Source, humanize.IBytes(uint64(src.Bytes)))
	if len(from) > 0 {
		line += " from " + strings.Join(from, ", ")
	}
	line += fmt.Sprintf("; fetched %s from the store", humanize.IBytes(uint64(src.Fetched)))
	if n := src.SeedMismatches; n > 0 {
		line += fmt.Sprintf("; %d seed chunks did not match their content ID (fetched instead)", n)
	}
	if n := src.SeedReadErrors; n > 0 {
		line += fmt.Sprintf("; %d seed chunks could not be read (fetched instead)", n)
	}
	return line
}

// destError adds the flag that helps to a destination error.
func destError(err error) error {
	if errors.Is(err, restore.ErrDestExists) {
		return fmt.Errorf("%w (--force replaces it)", err)
	}
	return err
}

func writeRestoreSummary(w io.Writer, s restoreSummary) {
	r := s.CopyResult
	var by []string
	for _, src := range s.Sources {
		if src.Bytes > 0 || src.Failed != "" {
			part := src.Source + " " + humanize.IBytes(uint64(src.Bytes))
			if src.Failed != "" {
				part += " (failed: " + src.Failed + ")"
			}
			by = append(by, part)
		}
	}
	fmt.Fprintf(w, "Restored %s:%s to %s\n", s.Snapshot, s.Path, r.Dest)
	fmt.Fprintf(w, "  %s in %s (copy %s, %s/s)", humanize.IBytes(uint64(r.Size)), seconds(s.Total), seconds(r.Duration), humanize.IBytes(uint64(r.Rate)))
	if r.Resumed > 0 {
		fmt.Fprintf(w, " (%s resumed from an earlier run, %s fetched now)", humanize.IBytes(uint64(r.Resumed)), humanize.IBytes(uint64(r.Fetched)))
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "  %s", openLine(s.Open))
	if s.FirstByteSeconds > 0 {
		fmt.Fprintf(w, "; first byte after %s", seconds(time.Duration(s.FirstByteSeconds*float64(time.Second))))
	}
	fmt.Fprintln(w)
	if l := s.Open.KopiaRequests; l != nil && (len(l.Requests()) > 0 || l.FromSavedListing()) {
		fmt.Fprintf(w, "  kopia before the file opened: %s\n", l.Summary())
	}
	if len(by) > 0 {
		fmt.Fprintf(w, "  read from: %s\n", strings.Join(by, ", "))
	}
	for _, src := range s.Sources {
		if line := seedLine(src); line != "" {
			fmt.Fprintf(w, "  %s\n", line)
		}
	}
	fmt.Fprintf(w, "  sparse: %s of zeros left as holes, %s on disk\n", humanize.IBytes(uint64(r.ZeroBytes)), humanize.IBytes(uint64(r.DiskBytes)))
	if !r.Synced {
		fmt.Fprintf(w, "  not synced (--no-sync): the kernel is still writing it back\n")
	}
	if r.SHA256 != "" {
		fmt.Fprintf(w, "  sha256: %s\n", r.SHA256)
	} else {
		fmt.Fprintf(w, "  sha256: not computed (--no-sha256)\n")
	}
	if r.Verified {
		fmt.Fprintf(w, "  verified: identical to the copy on %s\n", s.VerifiedWith)
	}
}

// openLine says how long the open took, step by step: "opened in 1.2s:
// kopia 1.1s, local 0.00s, timeline 0.05s, file 0.02s", the sources
// (opened concurrently) slowest first.
func openLine(t restore.OpenTimes) string {
	srcs := slices.Clone(t.Sources)
	slices.SortStableFunc(srcs, func(a, b restore.SourceTime) int { return cmp.Compare(b.Open, a.Open) })
	var parts []string
	for _, st := range srcs {
		part := st.Source + " " + seconds(st.Open)
		if st.Failed != "" {
			part += " (failed)"
		}
		parts = append(parts, part)
	}
	parts = append(parts, "timeline "+seconds(t.Timeline), "file "+seconds(t.File))
	return "opened in " + seconds(t.Total) + ": " + strings.Join(parts, ", ")
}

// seconds renders a duration in seconds with two significant decimals
// below 1s ("0.05s"), one below 10s ("1.2s"), none above ("93s").
func seconds(d time.Duration) string {
	switch s := d.Seconds(); {
	case s < 1:
		return fmt.Sprintf("%.2fs", s)
	case s < 10:
		return fmt.Sprintf("%.1fs", s)
	default:
		return fmt.Sprintf("%.0fs", s)
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && (isatty.IsTerminal(f.Fd()) || isatty.IsCygwinTerminal(f.Fd()))
}

// restoreBar draws the copy's progress on a terminal. The bar counts this
// run's bytes, so its rate and ETA are right for a resumed restore too;
// the description says how much an earlier run had done.
type restoreBar struct {
	w     io.Writer
	name  string
	size  int64
	bar   *progressbar.ProgressBar
	phase string
}

func newRestoreBar(w io.Writer, name string, size int64) *restoreBar {
	return &restoreBar{w: w, name: name, size: size}
}

func (b *restoreBar) update(p restore.Progress) {
	if b.bar == nil || p.Phase != b.phase {
		b.finish()
		desc := "restore " + b.name
		if p.Phase == restore.PhaseVerify {
			desc = "verify  " + b.name
		} else if p.Resumed > 0 {
			desc += fmt.Sprintf(" (resumed at %d%%)", p.Resumed*100/max(p.Total, 1))
		}
		b.bar = progressbar.NewOptions64(max(p.Total-p.Resumed, 1),
			progressbar.OptionSetWriter(b.w),
			progressbar.OptionSetDescription(desc),
			progressbar.OptionShowBytes(true),
			progressbar.OptionShowCount(),
			progressbar.OptionUseIECUnits(true),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionSetRenderBlankState(true),
		)
		b.phase = p.Phase
	}
	b.bar.Set64(p.Done - p.Resumed)
}

// finish leaves the bar as it is (an interrupted copy's bar is not
// filled) and moves to the next line.
func (b *restoreBar) finish() {
	if b.bar != nil {
		b.bar.Exit()
		fmt.Fprintln(b.w)
		b.bar = nil
	}
}

// restoreLineInterval spaces the progress lines of a restore whose stderr
// is not a terminal; a copy shorter than that prints none.
var restoreLineInterval = 5 * time.Second

// restoreLines prints a restore's progress as plain lines.
type restoreLines struct {
	w        io.Writer
	name     string
	interval time.Duration
	start    time.Time
}

func newRestoreLines(w io.Writer, name string, interval time.Duration) *restoreLines {
	return &restoreLines{w: w, name: name, interval: interval, start: time.Now()}
}

func (l *restoreLines) update(p restore.Progress) {
	if time.Since(l.start) < l.interval {
		return
	}
	line := fmt.Sprintf("vmhistory: %s %s: %s of %s (%d%%)", p.Phase, l.name,
		humanize.IBytes(uint64(p.Done)), humanize.IBytes(uint64(p.Total)), p.Done*100/max(p.Total, 1))
	if p.Rate > 0 {
		line += fmt.Sprintf(", %s/s", humanize.IBytes(uint64(p.Rate)))
	}
	if p.ETA > 0 {
		line += fmt.Sprintf(", %s left", p.ETA)
	}
	fmt.Fprintln(l.w, line)
}
