package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/bench"
)

func init() {
	benchSubcommands = append(benchSubcommands, newBenchCompressionCommand)
}

func newBenchCompressionCommand(opts *globalOptions) *cobra.Command {
	var (
		out           benchOutput
		o             bench.CompressionOptions
		sortBy        string
		bySize        bool
		byAlloc       bool
		minThroughput float64
		chart         string
	)
	cmd := &cobra.Command{
		Use:   "compression --data-file FILE",
		Short: "Compressed size and speed of every kopia compression algorithm on your data",
		Long: `Compress the start of a file of yours with every algorithm of kopia's
compression registry, using kopia's own compressors, so the sizes are the
bytes a kopia repository would store. It follows the rules of
"kopia benchmark compression" (same input, repetitions, parallelism and
allocation accounting), and adds a ratio column, per-chunk compression,
a recommendation and a chart.

Algorithms: the 16 kopia offers for new repositories; --deprecated adds
lz4 and zstd-best-compression, which kopia only keeps to read old ones.
--algorithms picks by kopia's rule, by name prefix: "zstd" means every zstd
variant, "s2-default" only that one.

Input: only the first 128 MiB of --data-file are read. Each algorithm
processes the input --repeat times per goroutine; by default as often as
fits in 128 MiB (a 16 MiB file: 8 times, a 128 MiB one: once), as kopia
does. --parallel N runs N goroutines doing that work at once, showing how
an algorithm scales when a backup compresses several chunks together.

Columns:
  compressed          bytes stored for the input (kopia's 4-byte header
                      included); the exact number behind kopia's rounded one
  ratio               input bytes / compressed bytes (2.000: half the space)
  compress MiB/s      input bytes compressed per second, all goroutines
  decompress MiB/s    input bytes restored per second, all goroutines
  allocs, memory      Go heap allocations (count, bytes) during the timed
                      runs, measured over the whole process as kopia does

Per chunk: kopia's benchmark compresses the input as one buffer; a
repository cuts a file into chunks with its splitter and compresses each
chunk alone, and a chunk that does not shrink is stored raw. With
--per-chunk SPLITTER (e.g. DYNAMIC-4M-BUZHASH, kopia's default; FIXED-1M)
the sizes are those a repository with that splitter stores; ratios are
lower than whole-buffer ones, most for small chunks. Deduplication of
identical chunks is not counted.

Recommendation: the line under the table names the algorithm with the best
ratio among those that compress at least --min-throughput MiB/s (default
500, fast enough not to slow a nightly upload), and the kopia command that
selects it. Deprecated algorithms are never recommended.

Round trip: every algorithm's output is decompressed by kopia and compared
with the input. One that fails keeps its row ("round trip FAILED", the
reason under the table and in --json/--csv), is not recommended, and the
others are measured as usual. A failing deprecated algorithm (kopia's lz4
fails on some data here) is a warning on stderr and the exit status stays
0; a failing current algorithm means a repository could hold data it
cannot read: the command says so and exits 1.

--chart FILE.svg|png draws ratio against compression throughput, one
labelled point per algorithm.`,
		Example: `  vmhistory bench compression --data-file /var/lib/libvirt/images/web.qcow2
  vmhistory bench compression --data-file disk.img --per-chunk DYNAMIC-4M-BUZHASH --sort ratio
  vmhistory bench compression --data-file disk.img --algorithms zstd,s2 --parallel 2 --chart compression.png
  vmhistory bench compression --data-file disk.img --min-throughput 200 --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var err error
			if o.SortBy, err = compressionSort(cmd, sortBy, bySize, byAlloc); err != nil {
				return err
			}
			if minThroughput < 0 {
				return fmt.Errorf("--min-throughput %v: must not be negative", minThroughput)
			}
			o.MinThroughput = minThroughput * (1 << 20)
			if chart != "" {
				if err := bench.CheckChartPath(chart); err != nil {
					return err
				}
			}
			o.Progress = benchProgress(cmd)
			rep, err := bench.Compression(cmd.Context(), o)
			if err != nil {
				return err
			}
			if chart != "" {
				if err := rep.Chart.Write(chart); err != nil {
					return err
				}
				o.Progress("chart written to " + chart)
			}
			if err := out.write(cmd, opts, rep.Table); err != nil {
				return err
			}
			for _, w := range rep.Warnings() {
				fmt.Fprintln(cmd.ErrOrStderr(), w)
			}
			return rep.Err()
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.DataFile, "data-file", "", "compress this file (its first 128 MiB)")
	f.IntVar(&o.Repeat, "repeat", 0, "repetitions per goroutine (0: as many as fit in 128 MiB, kopia's rule)")
	f.IntVar(&o.Parallel, "parallel", 1, "goroutines compressing at once")
	f.BoolVar(&o.Deprecated, "deprecated", false, "also measure the deprecated algorithms (lz4, zstd-best-compression)")
	f.StringSliceVar(&o.Algorithms, "algorithms", nil, "only the algorithms whose names start with one of these (comma-separated)")
	f.StringVar(&o.Operations, "operations", bench.OperationsBoth, "what to time: both, compress or decompress")
	f.StringVar(&sortBy, "sort", bench.SortThroughput, "order of the rows: throughput (compression, fastest first), size, ratio or alloc")
	f.BoolVar(&bySize, "by-size", false, "sort by compressed size (kopia's flag, same as --sort size)")
	f.BoolVar(&byAlloc, "by-alloc", false, "sort by allocated bytes (kopia's flag, same as --sort alloc)")
	f.BoolVar(&o.VerifyStable, "verify-stable", false, "check that every repetition produces the same bytes")
	f.BoolVar(&o.PrintOptions, "print-options", false, "add the kopia option that selects each algorithm")
	f.StringVar(&o.PerChunk, "per-chunk", "", "compress chunk by chunk as cut by this kopia splitter, e.g. DYNAMIC-4M-BUZHASH")
	f.Float64Var(&minThroughput, "min-throughput", bench.DefaultMinCompressionThroughput/(1<<20), "MiB/s of compression the recommended algorithm must reach")
	f.StringVar(&chart, "chart", "", "also draw ratio against throughput into this .svg or .png file")
	out.register(cmd)
	if err := cmd.MarkFlagRequired("data-file"); err != nil {
		panic(err) // the flag is defined just above
	}
	return cmd
}

// compressionSort reconciles --sort with kopia's --by-size and --by-alloc.
func compressionSort(cmd *cobra.Command, sortBy string, bySize, byAlloc bool) (string, error) {
	switch {
	case bySize && byAlloc:
		return "", errors.New("--by-size and --by-alloc contradict each other: give one")
	case (bySize || byAlloc) && cmd.Flags().Changed("sort"):
		return "", errors.New("--sort and --by-size/--by-alloc contradict each other: give one")
	case bySize:
		return bench.SortSize, nil
	case byAlloc:
		return bench.SortAlloc, nil
	}
	return sortBy, nil
}
