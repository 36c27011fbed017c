package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/dustin/go-humanize"
	"github.com/kopia/kopia/repo/object"
	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/bench"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/restore"
)

// benchOutput is the output format every bench shares.
type benchOutput struct {
	csv bool
}

func (o *benchOutput) register(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&o.csv, "csv", false, "print the table as CSV")
}

func (o *benchOutput) write(cmd *cobra.Command, opts *globalOptions, t *bench.Table) error {
	switch {
	case opts.jsonOutput:
		return t.WriteJSON(cmd.OutOrStdout())
	case o.csv:
		return t.WriteCSV(cmd.OutOrStdout())
	}
	return t.WriteText(cmd.OutOrStdout())
}

// benchProgress prints one line per step on stderr.
func benchProgress(cmd *cobra.Command) func(string) {
	return func(s string) { fmt.Fprintf(cmd.ErrOrStderr(), "bench: %s\n", s) }
}

func newBenchCommand(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure on your own data what decides the set-up",
		Long: `Measure, on this machine and your own data, what decides a vmhistory set-up.
Each bench prints an aligned table, or --json or --csv for scripts, and
reports its progress on stderr.`,
	}
	cmd.AddCommand(newBenchRestoreCommand(opts))
	for _, sub := range benchSubcommands {
		cmd.AddCommand(sub(opts))
	}
	return cmd
}

// benchSubcommands are the benches other files of this package add (from
// their init), so that each bench's wiring stays in its own file.
var benchSubcommands []func(*globalOptions) *cobra.Command

func newBenchRestoreCommand(opts *globalOptions) *cobra.Command {
	var (
		out        benchOutput
		size       string
		data       string
		splitters  []string
		presets    []string
		windows    []int
		repeat     int
		workDir    string
		allKopia   bool
		writeReads bool
		groupSize  string
		maxGap     string
		viaMount   bool
		chartFile  string
		spec       string
		seeded     bool
		nights     int
		keepLocal  int
		churn      float64
		linkRate   string
	)
	cmd := &cobra.Command{
		Use:   "restore",
		Short: "Restore throughput: kopia's one-chunk-at-a-time read against vmhistory's prefetch",
		Long: `Restore the same file from a throwaway kopia repository two ways, each on a
fresh connection with an empty cache:

  kopia-style   what "kopia mount" + cp does: repo.OpenObject and io.CopyBuffer
                with a 1 MiB buffer, one chunk per round trip;
  prefetch wN   vmhistory's reader, N chunk fetches in flight, small chunks
                grouped by pack.

Reads go through a model of a distant store, so the figures show what a
restore from Google Drive costs without sending a byte off this machine:
  none    the local disk as it is;
  drive   150 ms per request, 20 MiB/s per stream, 400 MiB/s total, 1% 429/5xx;
  seed    1.2 s per request, 6 MiB/s per stream (the seed host's Google Drive,
          where copying a 51 GiB disk out with kopia mount took 377 minutes).

The file is generated (mostly incompressible, like a VM disk's data) unless
--data names one of yours. A repository is built per splitter.

Beside MB/s (the object's open and read), each reader gets:
  CPU s/GiB      user+sys CPU seconds of this process (getrusage) over the
                 read, per GiB; the drive model (and with --via-mount the
                 FUSE server) runs in this process, so its CPU is included;
  open s         the read's fresh connection to the repository through the
                 model plus the object's (or file's) open, until the first
                 read call;
  first byte s   from the same start to the first byte the reader gets.

--via-mount measures what "vmhistory mount" gives a cp instead (as root: it
makes a throwaway zfs-fuse pool in --work-dir and drops the page caches before
every read): the file is put in a ZFS snapshot and in a kopia repository, the
snapshot uploaded to kopia is destroyed, and each read goes through a fresh
mount in this process:

  kopia-style            the kopia-only file as kopia mount + cp reads it;
  mount cp               the same file through vmhistory mount (prefetch);
  direct                 the local snapshot's file read from its clone;
  mount passthrough      the same through the mount, FUSE passthrough;
  mount no passthrough   the same through the mount, read by this process.

Each reader also gets the rate of the file's first 64 MiB, timed from the
first read() after open() returned, and of the rest of the file (the steady
state): how fast a read through the mount ramps up.

The order of the reads is reversed on every other repeat. In this mode --size
defaults to 1GiB and --repeat to 3; --window, one value, sets the mount's
prefetch window (default 32, as vmhistory mount); --splitter, one value, the
repository's splitter (default DYNAMIC-4M-BUZHASH; for another the kopia-style
read is left out unless --kopia-style-all). The kopia-style read under seed
takes about 7.5 minutes per GiB.

--spec SPEC measures a file already in the configured kopia repository (a
restore spec) through the repository's own link instead of uploading one
(--preset defaults to none): the same file, repository and link the kopia
CLI reads, so the kopia-style read can be set beside "kopia snapshot restore".

--seeded measures what seeding saves a restore of an old disk (as root: a
throwaway zfs-fuse pool in --work-dir): a VM-like disk is changed night after
night by scattered 64 KiB writes (--churn, 3% a night), every night is
snapshotted and uploaded to a kopia repository (--splitter, default
FIXED-128K), all but the newest --keep-local nights are destroyed on the
pool, and the oldest night (kopia alone holds it) is restored as "vmhistory
restore" does, with and without --no-seed, under each --preset (default
drive), caches cold. The table gives each restore's time from the session's
open to the synced file, every byte fetched from the store, and those bytes
against the file's chunks that differ from the oldest local night. A third
row per preset, "local (the floor)", restores the newest night from the pool
itself the same way: the same output written and synced, nothing from the
store, so its speed-up is the most seeding could reach on this machine. In
this mode --size defaults to 1GiB and --repeat to 3. --link-rate caps the
presets' total bandwidth at your link's: the drive preset allows 400 MiB/s,
so on a machine whose disk is slower the disk, not the link, bounds every
restore (the floor then sits close to the unseeded one).

--chart FILE.svg|png draws MB/s per prefetch window, one line per preset (with
--via-mount: MB/s per reader, one bar per preset).`,
		Example: `  vmhistory bench restore                                   # 256 MiB, both splitters, all presets
  vmhistory bench restore --size 1GiB --window 16,32,64 --repeat 3
  vmhistory bench restore --data /var/lib/libvirt/images/small.qcow2 --preset drive --csv
  vmhistory bench restore --via-mount --preset drive,seed --chart /tmp/restore-mount.png
  vmhistory bench restore --spec latest~2:images/disk.img --window 32   # a file already in your repository
  vmhistory bench restore --seeded --preset drive,seed --size 2GiB       # what seeding from local snapshots saves`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if chartFile != "" {
				if err := bench.CheckChartPath(chartFile); err != nil {
					return err
				}
			}
			if seeded {
				for _, name := range []string{"via-mount", "spec", "group-bytes", "max-gap", "write", "chart", "kopia-style-all"} {
					if cmd.Flags().Changed(name) {
						return fmt.Errorf("--%s does not apply to --seeded", name)
					}
				}
				if !cmd.Flags().Changed("size") {
					size = "1GiB"
				}
				if !cmd.Flags().Changed("repeat") {
					repeat = 3
				}
				if !cmd.Flags().Changed("window") {
					windows = nil // the restore's default
				}
				if !cmd.Flags().Changed("preset") {
					presets = []string{"drive"}
				}
				if !cmd.Flags().Changed("splitter") {
					splitters = []string{"FIXED-128K"}
				}
			} else {
				for _, name := range []string{"nights", "keep-local", "churn", "link-rate"} {
					if cmd.Flags().Changed(name) {
						return fmt.Errorf("--%s applies to --seeded only", name)
					}
				}
			}
			if viaMount {
				for _, name := range []string{"group-bytes", "max-gap"} {
					if cmd.Flags().Changed(name) {
						return fmt.Errorf("--%s does not apply to --via-mount", name)
					}
				}
				if !cmd.Flags().Changed("size") {
					size = "1GiB"
				}
				if !cmd.Flags().Changed("repeat") {
					repeat = 3
				}
				if !cmd.Flags().Changed("window") {
					windows = nil // the mount's default
				}
			}
			n, err := humanize.ParseBytes(size)
			if err != nil {
				return fmt.Errorf("--size %q: %v (write e.g. 256MiB or 1GiB)", size, err)
			}
			var group, gap uint64
			if groupSize != "" {
				if group, err = humanize.ParseBytes(groupSize); err != nil {
					return fmt.Errorf("--group-bytes %q: %v", groupSize, err)
				}
			}
			if maxGap != "" {
				if gap, err = humanize.ParseBytes(maxGap); err != nil {
					return fmt.Errorf("--max-gap %q: %v", maxGap, err)
				}
			}
			if viaMount && writeReads {
				return errors.New("--write does not apply to --via-mount (its reads are cp's, which writes)")
			}
			o := bench.RestoreOptions{
				GroupBytes: int64(group), MaxGap: int64(gap),
				Size: int64(n), Data: data, Splitters: splitters, Presets: presets, Windows: windows,
				Repeat: repeat, WorkDir: workDir, KopiaStyleAll: allKopia, Progress: benchProgress(cmd),
				WriteReads: writeReads,
			}
			// SIGINT/SIGTERM/SIGHUP end the bench through its clean-up (the
			// throwaway pool, mounts and repositories).
			ctx, stop := interruptContext(cmd.Context())
			defer stop()
			if spec != "" {
				for _, name := range []string{"data", "size", "splitter"} {
					if cmd.Flags().Changed(name) {
						return fmt.Errorf("--%s does not apply to --spec (the file is already in the repository)", name)
					}
				}
				if viaMount {
					return errors.New("--via-mount does not apply to --spec")
				}
				if !cmd.Flags().Changed("preset") {
					o.Presets = []string{"none"} // the configured repository's own link
				}
				if o.Existing, err = benchExistingFile(ctx, cmd, opts, spec); err != nil {
					return err
				}
			}
			var t *bench.Table
			var chart *bench.Chart
			if seeded {
				if churn <= 0 || churn >= 100 {
					return fmt.Errorf("--churn %g: give a percentage of the disk between 0 and 100", churn)
				}
				var rate uint64
				if linkRate != "" {
					if rate, err = humanize.ParseBytes(linkRate); err != nil || rate == 0 {
						return fmt.Errorf("--link-rate %q: give bytes per second, e.g. 12MiB (100 Mbit/s)", linkRate)
					}
				}
				t, err = bench.RestoreSeeded(ctx, o, bench.SeededOptions{Nights: nights, KeepLocal: keepLocal, Churn: churn / 100, LinkRate: float64(rate)})
				if err != nil {
					return err
				}
				return out.write(cmd, opts, t)
			}
			if viaMount {
				if !cmd.Flags().Changed("splitter") {
					o.Splitters = nil // the bench's default
				}
				t, chart, err = bench.RestoreViaMount(ctx, o)
			} else {
				t, chart, err = bench.Restore(ctx, o)
			}
			if err != nil {
				return err
			}
			if chartFile != "" {
				if err := chart.Write(chartFile); err != nil {
					return err
				}
			}
			return out.write(cmd, opts, t)
		},
	}
	f := cmd.Flags()
	f.StringVar(&size, "size", "256MiB", "size of the generated file (1GiB with --via-mount)")
	f.StringVar(&data, "data", "", "measure this file instead of generated data")
	f.StringSliceVar(&splitters, "splitter", []string{"DYNAMIC-4M-BUZHASH", "FIXED-128K"}, "kopia splitters to build repositories with (one with --via-mount, default DYNAMIC-4M-BUZHASH)")
	f.StringSliceVar(&presets, "preset", []string{"none", "drive", "seed"}, "drive model presets: none, drive, seed")
	f.IntSliceVar(&windows, "window", []int{16, 32}, "prefetch windows (fetches in flight) to try")
	f.IntVar(&repeat, "repeat", 1, "measure each case this many times and report the median (3 with --via-mount)")
	f.BoolVar(&writeReads, "write", false, "write each read into a file in --work-dir (every byte, page cache, no sync), as kopia snapshot restore writes its output, to compare with the CLI's time")
	f.StringVar(&workDir, "work-dir", os.TempDir(), "where the throwaway repositories (and the --via-mount pool) go (needs about 2× the file size per splitter)")
	f.BoolVar(&allKopia, "kopia-style-all", false, "also time the kopia-style read of splitters other than DYNAMIC-4M-BUZHASH (FIXED-128K: one round trip per 128 KiB, hours under seed)")
	f.StringVar(&groupSize, "group-bytes", "", "prefetch: most bytes of one pack fetched in one request (default 4MiB)")
	f.StringVar(&maxGap, "max-gap", "", "prefetch: most unneeded pack bytes read over to keep a group together (default 256KiB)")
	f.BoolVar(&viaMount, "via-mount", false, "measure reads through vmhistory mount (kopia-only and local snapshot files, with and without passthrough); needs root")
	f.StringVar(&chartFile, "chart", "", "also draw the result into this .svg or .png file")
	f.StringVar(&spec, "spec", "", "measure this file of the configured kopia repository (a restore spec, e.g. latest~2:images/disk.img) instead of uploading one; --preset defaults to none (the repository's own link)")
	f.BoolVar(&seeded, "seeded", false, "measure a restore of an old night kopia alone holds with and without seeding from the local snapshots (needs root)")
	f.IntVar(&nights, "nights", bench.DefaultSeededNights, "--seeded: nights of the VM disk, each snapshotted and uploaded")
	f.IntVar(&keepLocal, "keep-local", bench.DefaultSeededKeepLocal, "--seeded: newest nights kept on the pool (the seeds)")
	f.Float64Var(&churn, "churn", 100*bench.DefaultSeededChurn, "--seeded: percent of the disk each night rewrites, in 64 KiB writes at random offsets")
	f.StringVar(&linkRate, "link-rate", "", "--seeded: cap the presets' total bandwidth to your link's, in bytes per second (e.g. 12MiB for 100 Mbit/s; the drive preset allows 400MiB)")
	out.register(cmd)
	return cmd
}

// benchExistingFile resolves spec to a file of the configured kopia
// repository, for bench restore --spec.
func benchExistingFile(ctx context.Context, cmd *cobra.Command, opts *globalOptions, spec string) (*bench.ExistingFile, error) {
	cfg, err := loadConfig(cmd, opts)
	if err != nil {
		return nil, err
	}
	if cfg.Kopia == nil {
		return nil, errors.New("--spec: the configuration has no kopia section")
	}
	pw, _, err := kopiarepo.ResolvePassword("", cfg.Kopia.PasswordFile)
	if err != nil {
		return nil, err
	}
	sess, err := openSession(ctx, cmd, opts, cfg, restore.SessionOptions{})
	if err != nil {
		return nil, err
	}
	defer sess.Close()
	entry, rel, err := sess.ResolveFile(spec, "")
	if err != nil {
		return nil, err
	}
	for _, es := range entry.Sources {
		k, ok := es.Source.(*restore.KopiaSource)
		if !ok {
			continue
		}
		fi, err := k.Repo().Stat(ctx, es.Snapshot.ID, rel)
		if err != nil {
			return nil, fmt.Errorf("--spec %s: %w", spec, err)
		}
		if fi.ObjectID == (object.ID{}) {
			return nil, fmt.Errorf("--spec %s: not a file", spec)
		}
		return &bench.ExistingFile{ConfigFile: k.Repo().ConfigFile(), Password: pw, Object: fi.ObjectID, Size: fi.Size, Label: spec}, nil
	}
	return nil, fmt.Errorf("--spec %s: %s is not in the kopia repository (only in %s)", spec, entry.FullName(), entrySourceNames(entry))
}

func entrySourceNames(e *restore.Entry) string {
	var names []string
	for _, es := range e.Sources {
		names = append(names, es.Source.Name())
	}
	return strings.Join(names, ", ")
}
