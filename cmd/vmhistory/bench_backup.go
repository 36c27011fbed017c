package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"
	"github.com/kopia/kopia/repo/splitter"
	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/bench"
)

func init() {
	benchSubcommands = append(benchSubcommands, newBenchBackupCommand)
}

func newBenchBackupCommand(opts *globalOptions) *cobra.Command {
	var (
		out          benchOutput
		data         []string
		synthetic    string
		versions     int
		churn        string
		compressions []string
		splitters    []string
		workDir      string
		seed         uint64
		chart        string
		onZFS        bool
		presets      []string
	)
	cmd := &cobra.Command{
		Use:   "backup (--data PATH... | --synthetic SIZE [--zfs])",
		Short: "Nightly backup growth per compression and splitter: how much each night adds to the repository",
		Long: `Upload versions of the same disk, oldest first, as the nightly snapshots of
one source into a throwaway kopia repository per compression × splitter, and
measure after each upload what the repository holds.

The versions are either yours, --data PATH... (versions of one file or of one
directory, e.g. a disk image copied out of three ZFS snapshots), or generated,
--synthetic SIZE: a VM-disk-like file (extents of random, text-like and zero
data) whose later versions rewrite scattered 4 KiB-256 KiB ranges, 4 KiB
aligned, until --churn of its 4 KiB blocks differ from the night before.

Columns:
  version         1 is the first, full upload; each next one is a night.
  time s, MB/s    wall time of the upload (read, hash, compress, write,
                  flush) and the version's bytes by that time.
  repo MiB        size of the repository: the sum of all its blobs' sizes.
  growth MiB      what this version added to the repository.
  changed MiB     bytes that really changed: the version's 4 KiB blocks that
                  differ from the previous version (version 1: all of it).
  growth/changed  growth as a multiple of the changed bytes: 1× would store
                  exactly what changed.
  contents        contents in the repository's index (chunks and metadata).
  index KiB       size of the repository's index blobs.
JSON and CSV carry the same numbers, unformatted.

Why small chunks: kopia stores a file as chunks and stores a chunk only once.
A guest's writes are small and scattered; every chunk they touch is stored
again whole. With DYNAMIC-4M-BUZHASH (kopia's default, chunks of about
4 MiB) a night's few thousand 4-256 KiB writes touch most chunks of a disk:
measured with kopia 0.22.3, growth per night is about 17× the changed bytes.
With FIXED-128K, ZFS's default recordsize, it is about 2.8×. The cost: many
more chunks, so more contents to index (memory and index size in every
client), more blobs per restore, and more per-chunk work per upload. The
notes under the table say which configuration keeps nightly growth lowest
and what it costs against kopia's default.

A version whose file has the same size and mtime as the previous one's is
taken as unchanged by kopia, as by the nightly upload; the bench gives
versions of a single file their own night's time.

--zfs compares, in the same run and on the same nights, the two ways a ZFS
snapshot reaches kopia (as root, with zfs-fuse or OpenZFS running). It makes
a throwaway pool vmhbench-<pid>-<n> on a sparse file in --work-dir and a
dataset with compression=on and primarycache=metadata, writes the
--synthetic disk there, and each later night rewrites --churn of its 4 KiB
blocks in place and snapshots the dataset. Every upload reads cold, as the
nightly upload of disks larger than memory does: ZFS caches no file data
and the page caches are dropped before each upload. Every snapshot goes, per compression × splitter × --preset, into
two fresh repositories:
  full     kopia's upload: every byte of the snapshot is read and hashed;
  stream   the stream path: "zfs send -i" from the night before is parsed,
           and only the records it wrote are read (the rest of the file's
           chunk list is the previous snapshot's); night 1 goes in full.
Its columns:
  upload s        wall time of the upload; send s: zfs send -i, parse and
                  change set, before the stream upload.
  read MiB        bytes read from the snapshot (full: kopia's hashed bytes;
                  stream: the changed chunks plus what kopia read itself).
  DRR_WRITE MiB   the stream's write records, what zfs receive rewrites;
                  read/DRR_WRITE: the read as a multiple of them.
  changed MiB     the night's 4 KiB blocks that differ from the night before.
  repo, growth    as above, per mode's repository; growth/changed likewise.
  full/stream     the full upload's time over the stream upload's.
  preset          the drive model between the upload and the repository:
                  none (a local disk), drive (150 ms per request, 20 MiB/s
                  per stream, 1% 429/5xx) or seed (1.2 s, 6 MiB/s: the seed
                  host's Google Drive). Through a model both ways also wait
                  for the new chunks' upload, which they share.
  way             how the stream upload took the disk: stream, or full when
                  it fell back (a DYNAMIC-* splitter has no fixed chunk
                  boundaries, so the stream path reads such a file whole).
The notes give the means over the nights after the first. Defaults in this
mode: --compression zstd-better-compression, --splitter FIXED-128K. The pool,
its clones and the repositories are removed afterwards, also on an error or
an interrupt (SIGINT, SIGTERM, SIGHUP).

Compressions: none, ` + strings.Join(bench.BackupCompressions(), ", ") + `.
Splitters: ` + strings.Join(splitter.SupportedAlgorithms(), ", ") + `.

The work directory needs room for one version of the data plus about one
repository per configuration (all removed afterwards); with --zfs, the
pool's sparse file (the disk and each night's changed blocks) and two
repositories per configuration.`,
		Example: `  vmhistory bench backup --synthetic 1GiB --versions 3 --churn 4% --chart /tmp/backup.png
  vmhistory bench backup --data /var/tmp/disk-mon.img,/var/tmp/disk-tue.img,/var/tmp/disk-wed.img
  vmhistory bench backup --data /tank/vm/.zfs/snapshot/mon --data /tank/vm/.zfs/snapshot/tue \
      --compression zstd --splitter FIXED-128K,FIXED-256K --csv
  vmhistory bench backup --zfs --synthetic 2GiB --versions 4 --churn 4% --work-dir /var/tmp
  vmhistory bench backup --zfs --synthetic 2GiB --compression none,zstd-better-compression --preset none,drive`,
		RunE: func(cmd *cobra.Command, args []string) error {
			o := bench.BackupOptions{
				Compressions: compressions, Splitters: splitters, WorkDir: workDir, Seed: seed,
				Progress: benchProgress(cmd),
			}
			// --data a b c: the paths after the flag's first are arguments.
			if len(args) > 0 && !cmd.Flags().Changed("data") {
				return fmt.Errorf("unexpected argument %q: give versions with --data PATH...", args[0])
			}
			o.Data = append(data, args...)
			if synthetic != "" {
				n, err := humanize.ParseBytes(synthetic)
				if err != nil {
					return fmt.Errorf("--synthetic %q: not a size (write e.g. 256MiB or 1GiB)", synthetic)
				}
				if n == 0 {
					return errors.New("--synthetic 0: give a size of at least 1MiB")
				}
				o.Size = int64(n)
			}
			if len(o.Data) > 0 && (cmd.Flags().Changed("versions") || cmd.Flags().Changed("churn") || cmd.Flags().Changed("seed")) {
				return errors.New("--versions, --churn and --seed describe --synthetic data; with --data the versions are the paths given")
			}
			o.Versions = versions
			c, err := parseChurn(churn)
			if err != nil {
				return err
			}
			o.Churn = c
			if chart != "" {
				if err := bench.CheckChartPath(chart); err != nil {
					return err
				}
			}
			var t *bench.Table
			var ch *bench.Chart
			if cmd.Flags().Changed("preset") && !onZFS {
				return errors.New("--preset applies to --zfs only (the repositories of the other mode are local)")
			}
			if onZFS {
				if len(o.Data) > 0 {
					return errors.New("--zfs generates its disk on a throwaway pool: give --synthetic SIZE, not --data")
				}
				if !cmd.Flags().Changed("compression") {
					o.Compressions = bench.DefaultZFSBackupCompressions
				}
				if !cmd.Flags().Changed("splitter") {
					o.Splitters = bench.DefaultZFSBackupSplitters
				}
				o.Presets = presets
				// SIGINT/SIGTERM/SIGHUP end the bench through its clean-up
				// (the throwaway pool, its clones and the repositories).
				ctx, stop := interruptContext(cmd.Context())
				defer stop()
				t, ch, err = bench.BackupZFS(ctx, o)
			} else {
				t, ch, err = bench.Backup(cmd.Context(), o)
			}
			if err != nil {
				return err
			}
			if chart != "" {
				if err := ch.Write(chart); err != nil {
					return err
				}
				benchProgress(cmd)("chart written to " + chart)
			}
			return out.write(cmd, opts, t)
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&data, "data", nil, "versions of one file or directory, oldest first (repeat the flag, or a comma list)")
	f.StringVar(&synthetic, "synthetic", "", "generate a VM-disk-like file of this size instead (e.g. 1GiB)")
	f.IntVar(&versions, "versions", 3, "versions to generate with --synthetic (the first and the nights after it)")
	f.StringVar(&churn, "churn", "4%", "share of the 4 KiB blocks each generated night rewrites (more than 0%, at most 50%)")
	f.StringSliceVar(&compressions, "compression", bench.DefaultBackupCompressions, "kopia compressions to measure (none or a kopia algorithm)")
	f.StringSliceVar(&splitters, "splitter", bench.DefaultBackupSplitters, "kopia splitters to measure")
	f.StringVar(&workDir, "work-dir", os.TempDir(), "where the data and the throwaway repositories go")
	f.Uint64Var(&seed, "seed", 1, "seed of the generated data: the same seed gives the same bytes")
	f.StringVar(&chart, "chart", "", "also draw the repository size per night per configuration into this .svg or .png (--zfs: the upload time per night and mode)")
	f.StringSliceVar(&presets, "preset", []string{"none"}, "with --zfs: drive-model presets the repositories are reached through (none, drive, seed), each configuration once per preset")
	f.BoolVar(&onZFS, "zfs", false, "on a throwaway zfs-fuse dataset, compare the full upload with the stream path (zfs send -i) night by night; needs root and zfs-fuse (default --compression zstd-better-compression, --splitter FIXED-128K)")
	out.register(cmd)
	return cmd
}

// parseChurn reads "4%", "0.5%" or "4" (percent) as a fraction.
func parseChurn(s string) (float64, error) {
	v, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(s), "%")), 64)
	if err != nil {
		return 0, fmt.Errorf("--churn %q: not a percentage (write e.g. 4%%)", s)
	}
	if !(v > 0 && v <= 50) {
		return 0, fmt.Errorf("--churn %s is out of range; give more than 0%% and at most 50%%", s)
	}
	return v / 100, nil
}
