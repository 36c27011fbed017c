package bench

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"io/fs"
	"maps"
	"math"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/kopia/kopia/repo/compression"
	"github.com/kopia/kopia/repo/splitter"
)

// CompressionInputLimit is how much of the data file kopia's "benchmark
// compression" reads, and how many bytes its repeat rule aims to process
// per algorithm.
const CompressionInputLimit = 128 << 20

// DefaultMinCompressionThroughput is the floor, in bytes per second, under
// which an algorithm is not recommended: below it compression, not the
// disk or the network, starts to limit a nightly upload.
const DefaultMinCompressionThroughput = 500 << 20

// The operations kopia's --operations accepts.
const (
	OperationsBoth       = "both"
	OperationsCompress   = "compress"
	OperationsDecompress = "decompress"
)

// The orders the result can be sorted in. SortThroughput is kopia's default,
// SortSize its --by-size and SortAlloc its --by-alloc.
const (
	SortThroughput = "throughput"
	SortSize       = "size"
	SortRatio      = "ratio"
	SortAlloc      = "alloc"
)

// CompressionSorts lists the values CompressionOptions.SortBy accepts.
var CompressionSorts = []string{SortThroughput, SortSize, SortRatio, SortAlloc}

// CompressionOptions choose what "vmhistory bench compression" measures.
// Their defaults are those of kopia's "benchmark compression".
type CompressionOptions struct {
	// DataFile is the input; only its first CompressionInputLimit bytes
	// are used.
	DataFile string
	// Repeat is how often each goroutine processes the input. Zero applies
	// kopia's rule: CompressionInputLimit / input size, at least once.
	Repeat int
	// Parallel goroutines each do the whole work at once (kopia's
	// --parallel); throughput counts the bytes of all of them. Zero means 1.
	Parallel int
	// Deprecated adds the algorithms kopia keeps only to read old
	// repositories (lz4, zstd-best-compression).
	Deprecated bool
	// Algorithms, when set, picks by kopia's rule: each entry selects every
	// algorithm whose name starts with it, deprecated or not.
	Algorithms []string
	// Operations is OperationsBoth (default), OperationsCompress or
	// OperationsDecompress.
	Operations string
	// SortBy is one of CompressionSorts; SortThroughput when empty.
	SortBy string
	// PerChunk, when it names a kopia splitter, cuts the input into the
	// chunks a repository with that splitter stores and compresses each
	// on its own, keeping chunks that do not shrink uncompressed as a
	// repository does.
	PerChunk string
	// MinThroughput (bytes/s) is the compression throughput the
	// recommendation must reach; DefaultMinCompressionThroughput when 0.
	MinThroughput float64
	// VerifyStable checks that every repetition produces the same bytes.
	VerifyStable bool
	// PrintOptions adds the kopia flag that selects each algorithm.
	PrintOptions bool
	// Progress, when set, receives one line per step.
	Progress func(string)
}

// CompressionResult is what one algorithm did to the input.
type CompressionResult struct {
	Algorithm  string
	Deprecated bool
	// CompressedBytes is what a repository would store for the input:
	// kopia's output including its 4-byte header, or with PerChunk the sum
	// over chunks, a chunk that does not shrink counted at its raw size.
	CompressedBytes int64
	// RawChunks counts, with PerChunk, the chunks stored uncompressed.
	RawChunks int
	// CompressBytesPerSec and DecompressBytesPerSec are input bytes per
	// second over all goroutines; zero when not measured.
	CompressBytesPerSec, DecompressBytesPerSec float64
	// Allocations (count and bytes) of the Go heap during the timed runs,
	// the whole process as kopia measures them.
	CompressAllocs, CompressAllocBytes     uint64
	DecompressAllocs, DecompressAllocBytes uint64
	// Unstable is set when VerifyStable found two repetitions that
	// produced different bytes.
	Unstable bool
	// RoundTripError, when set, is why kopia's decompressor did not give
	// the input back from this algorithm's output: a repository
	// compressed with it could hold data it cannot read. The algorithm is
	// still measured as far as it works and is never recommended.
	RoundTripError string
}

// RoundTripOK reports whether the algorithm's output decompressed to the
// input.
func (r CompressionResult) RoundTripOK() bool { return r.RoundTripError == "" }

// Recommendation is the algorithm with the best ratio among those fast
// enough; Algorithm is empty when none is.
type Recommendation struct {
	Algorithm      string
	Ratio          float64
	BytesPerSec    float64
	MinBytesPerSec float64
	// Text is the sentence printed under the table.
	Text string
}

// CompressionReport is the outcome of Compression.
type CompressionReport struct {
	DataFile       string
	InputBytes     int64
	Repeat         int
	Chunks         int
	Results        []CompressionResult
	Recommendation Recommendation
	Table          *Table
	Chart          *Chart
}

// Ratio is input bytes per stored byte: 2 means the repository holds half.
func (r CompressionResult) Ratio(inputBytes int64) float64 {
	if r.CompressedBytes == 0 {
		return 0
	}
	return float64(inputBytes) / float64(r.CompressedBytes)
}

// CompressionAlgorithms lists kopia's compression registry by name, without
// the deprecated algorithms unless withDeprecated.
func CompressionAlgorithms(withDeprecated bool) []string {
	var names []string
	for name := range compression.ByName {
		if withDeprecated || !compression.IsDeprecated[name] {
			names = append(names, string(name))
		}
	}
	slices.Sort(names)
	return names
}

// Compression measures every selected kopia compressor on the data file
// the way kopia's "benchmark compression" does (same input limit, repeat
// rule, parallelism and allocation accounting), so that the compressed
// sizes are the ones kopia prints and a repository stores.
func Compression(ctx context.Context, o CompressionOptions) (*CompressionReport, error) {
	progress := o.Progress
	if progress == nil {
		progress = func(string) {}
	}
	algorithms, err := selectCompressors(o.Algorithms, o.Deprecated)
	if err != nil {
		return nil, err
	}
	if o.Operations == "" {
		o.Operations = OperationsBoth
	}
	if !slices.Contains([]string{OperationsBoth, OperationsCompress, OperationsDecompress}, o.Operations) {
		return nil, fmt.Errorf("unknown operations %q (want both, compress or decompress)", o.Operations)
	}
	if o.SortBy == "" {
		o.SortBy = SortThroughput
	}
	if !slices.Contains(CompressionSorts, o.SortBy) {
		return nil, fmt.Errorf("unknown sort %q (want %s)", o.SortBy, strings.Join(CompressionSorts, ", "))
	}
	if o.PerChunk != "" && splitter.GetFactory(o.PerChunk) == nil {
		return nil, fmt.Errorf("unknown splitter %q (kopia has: %s)", o.PerChunk, strings.Join(splitter.SupportedAlgorithms(), ", "))
	}
	if o.Parallel == 0 {
		o.Parallel = 1
	}
	if o.Parallel < 0 {
		return nil, fmt.Errorf("parallel %d: want 1 or more goroutines", o.Parallel)
	}
	if o.Repeat < 0 {
		return nil, fmt.Errorf("repeat %d: want 0 (kopia's rule) or more", o.Repeat)
	}
	if o.MinThroughput == 0 {
		o.MinThroughput = DefaultMinCompressionThroughput
	}
	if o.MinThroughput < 0 {
		return nil, fmt.Errorf("minimum throughput %v: must not be negative", o.MinThroughput)
	}

	data, truncated, err := readCompressionInput(o.DataFile)
	if err != nil {
		return nil, err
	}
	if truncated {
		progress(fmt.Sprintf("%s is bigger than %s: using its first %s, as kopia does", o.DataFile, humanSize(CompressionInputLimit), humanSize(CompressionInputLimit)))
	}
	repeat := o.Repeat
	if repeat == 0 {
		repeat = kopiaRepeat(len(data))
	}
	progress(fmt.Sprintf("repeating each benchmark %d times per goroutine (%s per algorithm); override with --repeat",
		repeat, humanize.IBytes(uint64(repeat)*uint64(len(data)))))

	chunks := [][]byte{data}
	if o.PerChunk != "" {
		chunks = splitIntoChunks(data, splitter.GetFactory(o.PerChunk))
		progress(fmt.Sprintf("%s cuts the input into %d chunks", o.PerChunk, len(chunks)))
	}

	rep := &CompressionReport{DataFile: o.DataFile, InputBytes: int64(len(data)), Repeat: repeat}
	if o.PerChunk != "" {
		rep.Chunks = len(chunks)
	}
	for _, name := range algorithms {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		r, err := benchCompressor(ctx, name, chunks, repeat, o)
		if err != nil {
			return nil, err
		}
		progress(describeResult(r, rep.InputBytes))
		rep.Results = append(rep.Results, r)
	}
	sortCompressionResults(rep.Results, o.SortBy, rep.InputBytes)
	rep.Recommendation = recommend(rep.Results, rep.InputBytes, o.MinThroughput, o.Operations != OperationsDecompress)
	rep.Table = compressionTable(rep, o, truncated)
	rep.Chart = compressionChart(rep, o)
	return rep, nil
}

// RoundTripFailures are the results whose output kopia's decompressor did
// not turn back into the input.
func (rep *CompressionReport) RoundTripFailures() []CompressionResult {
	var failed []CompressionResult
	for _, r := range rep.Results {
		if !r.RoundTripOK() {
			failed = append(failed, r)
		}
	}
	return failed
}

// Warnings has one line per deprecated algorithm that failed its round
// trip: kopia keeps those only to read old repositories, so the bench
// still succeeds.
func (rep *CompressionReport) Warnings() []string {
	var lines []string
	for _, r := range rep.RoundTripFailures() {
		if r.Deprecated {
			lines = append(lines, fmt.Sprintf("warning: %s (deprecated) failed its round trip on %s: %s; kopia keeps it only to read old repositories: do not compress with it",
				r.Algorithm, rep.DataFile, r.RoundTripError))
		}
	}
	return lines
}

// Err is non-nil when an algorithm a repository can still be set to use
// failed its round trip: such a repository could hold data it cannot
// read back.
func (rep *CompressionReport) Err() error {
	var lines []string
	for _, r := range rep.RoundTripFailures() {
		if !r.Deprecated {
			lines = append(lines, fmt.Sprintf("%s failed its round trip on %s (%s): a repository compressed with it could hold unreadable data",
				r.Algorithm, rep.DataFile, r.RoundTripError))
		}
	}
	if len(lines) == 0 {
		return nil
	}
	return errors.New(strings.Join(lines, "\n"))
}

// kopiaRepeat is kopia's default repetition count: enough to process
// CompressionInputLimit bytes, at least once.
func kopiaRepeat(inputBytes int) int {
	return max(1, CompressionInputLimit/inputBytes)
}

// selectCompressors applies kopia's --algorithms rule (name prefixes) and
// refuses an entry that selects nothing, which kopia silently ignores.
func selectCompressors(wanted []string, withDeprecated bool) ([]string, error) {
	if len(wanted) == 0 {
		return CompressionAlgorithms(withDeprecated), nil
	}
	all := CompressionAlgorithms(true)
	selected := map[string]bool{}
	for _, prefix := range wanted {
		prefix = strings.TrimSpace(prefix)
		matched := false
		for _, name := range all {
			if prefix != "" && strings.HasPrefix(name, prefix) {
				selected[name] = true
				matched = true
			}
		}
		if !matched {
			return nil, fmt.Errorf("unknown compression algorithm %q (kopia has: %s)", prefix, strings.Join(all, ", "))
		}
	}
	return slices.Sorted(maps.Keys(selected)), nil
}

func readCompressionInput(path string) (data []byte, truncated bool, err error) {
	if path == "" {
		return nil, false, errors.New("no data file given: name the file to compress")
	}
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, fmt.Errorf("data file %q does not exist", path)
	}
	if err != nil {
		return nil, false, fmt.Errorf("data file %q: %w", path, unwrapPathError(err))
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, false, fmt.Errorf("data file %q: %w", path, unwrapPathError(err))
	}
	if !st.Mode().IsRegular() {
		return nil, false, fmt.Errorf("data file %q is not a regular file", path)
	}
	if st.Size() == 0 {
		return nil, false, fmt.Errorf("data file %q is empty", path)
	}
	n := min(st.Size(), CompressionInputLimit)
	data = make([]byte, n)
	if _, err := io.ReadFull(f, data); err != nil {
		return nil, false, fmt.Errorf("read data file %q: %w", path, unwrapPathError(err))
	}
	return data, st.Size() > CompressionInputLimit, nil
}

// unwrapPathError drops the *fs.PathError wrapper whose path the caller's
// message already names.
func unwrapPathError(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// splitIntoChunks cuts data where kopia's object writer would: it feeds the
// splitter and ends a chunk at every split point, the rest being the last
// chunk.
func splitIntoChunks(data []byte, newSplitter splitter.Factory) [][]byte {
	s := newSplitter()
	defer s.Close()
	var chunks [][]byte
	for len(data) > 0 {
		n := s.NextSplitPoint(data)
		if n < 0 {
			chunks = append(chunks, data)
			break
		}
		chunks = append(chunks, data[:n])
		data = data[n:]
	}
	return chunks
}

// compressedChunks holds each chunk as a repository stores it; nil means
// the chunk did not shrink and is stored raw.
type compressedChunks [][]byte

// lookupCompressor finds a kopia compressor by name. Tests replace it to
// make a current algorithm fail its round trip, which kopia's own cannot be
// made to do.
var lookupCompressor = func(name string) compression.Compressor {
	return compression.ByName[compression.Name(name)]
}

func benchCompressor(ctx context.Context, name string, chunks [][]byte, repeat int, o CompressionOptions) (CompressionResult, error) {
	comp := lookupCompressor(name)
	r := CompressionResult{Algorithm: name, Deprecated: compression.IsDeprecated[compression.Name(name)]}

	// Compressed once outside the timings: the decompression input, and a
	// check that kopia's header-driven reader gets the input back.
	perChunk := o.PerChunk != ""
	stored, err := compressChunks(comp, chunks, perChunk)
	if err != nil {
		return r, fmt.Errorf("compress with %s: %w", name, err)
	}
	if err := verifyRoundTrip(stored, chunks); err != nil {
		// One broken algorithm must not hide the others: it keeps its row,
		// with the failure in it, and its decompression is not timed.
		r.RoundTripError = err.Error()
	}
	r.CompressedBytes, r.RawChunks = storedSize(stored, chunks)

	inputBytes := int64(0)
	largestChunk := 0
	for _, c := range chunks {
		inputBytes += int64(len(c))
		largestChunk = max(largestChunk, len(c))
	}
	// kopia reserves 128 MiB per goroutine; the largest chunk plus room for
	// the few bytes per block compressors add to incompressible data is
	// enough for the buffers never to grow during a timed run, and keeps
	// small runs small.
	bufferSize := largestChunk + largestChunk/16 + 4096
	totalBytes := float64(o.Parallel) * float64(inputBytes) * float64(repeat)

	if o.Operations != OperationsDecompress {
		sizes := make([]int64, o.Parallel)
		unstable := make([]bool, o.Parallel)
		m, err := measure(o.Parallel, bufferSize, totalBytes, func(worker int, out *bytes.Buffer) error {
			input := bytes.NewReader(nil)
			var firstHash uint64
			for i := range repeat {
				if err := ctx.Err(); err != nil {
					return err
				}
				h := fnv.New64a()
				var size int64
				for _, chunk := range chunks {
					out.Reset()
					input.Reset(chunk)
					if err := comp.Compress(out, input); err != nil {
						return fmt.Errorf("compress with %s: %w", name, err)
					}
					size += int64(storedChunkSize(out.Len(), len(chunk), perChunk))
					if o.VerifyStable {
						h.Write(out.Bytes())
					}
				}
				sizes[worker] = size
				if o.VerifyStable {
					if i == 0 {
						firstHash = h.Sum64()
					} else if h.Sum64() != firstHash {
						unstable[worker] = true
					}
				}
			}
			return nil
		})
		if err != nil {
			return r, err
		}
		// kopia prints the size of the main goroutine's last repetition.
		r.CompressedBytes = sizes[0]
		r.Unstable = slices.Contains(unstable, true)
		r.CompressBytesPerSec, r.CompressAllocs, r.CompressAllocBytes = m.bytesPerSec, m.allocs, m.allocBytes
	}

	if o.Operations != OperationsCompress && r.RoundTripOK() {
		m, err := measure(o.Parallel, bufferSize, totalBytes, func(_ int, out *bytes.Buffer) error {
			input := bytes.NewReader(nil)
			for range repeat {
				if err := ctx.Err(); err != nil {
					return err
				}
				for _, c := range stored {
					if c == nil {
						continue // stored raw: nothing to decompress
					}
					out.Reset()
					input.Reset(c)
					if err := comp.Decompress(out, input, true); err != nil {
						return fmt.Errorf("decompress with %s: %w", name, err)
					}
				}
			}
			return nil
		})
		if err != nil {
			if ctx.Err() != nil {
				return r, err
			}
			r.RoundTripError = err.Error()
			return r, nil
		}
		r.DecompressBytesPerSec, r.DecompressAllocs, r.DecompressAllocBytes = m.bytesPerSec, m.allocs, m.allocBytes
	}
	return r, nil
}

// storedChunkSize is what a chunk costs in a repository, which stores a
// chunk that does not shrink raw. The whole-buffer mode reports kopia's
// compressed size as is, as kopia's benchmark does.
func storedChunkSize(compressed, raw int, perChunk bool) int {
	if perChunk && compressed >= raw {
		return raw
	}
	return compressed
}

func compressChunks(comp compression.Compressor, chunks [][]byte, perChunk bool) (compressedChunks, error) {
	stored := make(compressedChunks, len(chunks))
	for i, chunk := range chunks {
		var out bytes.Buffer
		if err := comp.Compress(&out, bytes.NewReader(chunk)); err != nil {
			return nil, err
		}
		if perChunk && out.Len() >= len(chunk) {
			continue
		}
		stored[i] = out.Bytes()
	}
	return stored, nil
}

func storedSize(stored compressedChunks, chunks [][]byte) (size int64, raw int) {
	for i, c := range stored {
		if c == nil {
			size += int64(len(chunks[i]))
			raw++
			continue
		}
		size += int64(len(c))
	}
	return size, raw
}

func verifyRoundTrip(stored compressedChunks, chunks [][]byte) error {
	var out bytes.Buffer
	for i, c := range stored {
		if c == nil {
			continue
		}
		out.Reset()
		if err := compression.DecompressByHeader(&out, bytes.NewReader(c)); err != nil {
			return fmt.Errorf("decompress chunk %d: %w", i, err)
		}
		if !bytes.Equal(out.Bytes(), chunks[i]) {
			return fmt.Errorf("chunk %d does not decompress to its input", i)
		}
	}
	return nil
}

type measurement struct {
	bytesPerSec        float64
	allocs, allocBytes uint64
}

// measure runs work on parallel goroutines (one of them this one), the way
// kopia's benchmark does: a GC first, output buffers made before the clock
// starts, heap statistics read around the run.
func measure(parallel, bufferSize int, totalBytes float64, work func(worker int, out *bytes.Buffer) error) (measurement, error) {
	runtime.GC()
	buffers := make([]*bytes.Buffer, parallel)
	for i := range buffers {
		buffers[i] = bytes.NewBuffer(make([]byte, 0, bufferSize))
	}
	errs := make([]error, parallel)
	var startMS, endMS runtime.MemStats
	start := time.Now()
	runtime.ReadMemStats(&startMS)
	var wg sync.WaitGroup
	for w := 1; w < parallel; w++ {
		wg.Go(func() { errs[w] = work(w, buffers[w]) })
	}
	errs[0] = work(0, buffers[0])
	wg.Wait()
	runtime.ReadMemStats(&endMS)
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return measurement{}, err
	}
	return measurement{
		bytesPerSec: totalBytes / max(elapsed.Seconds(), 1e-9),
		allocs:      endMS.Mallocs - startMS.Mallocs,
		allocBytes:  endMS.TotalAlloc - startMS.TotalAlloc,
	}, nil
}

func sortCompressionResults(results []CompressionResult, by string, inputBytes int64) {
	slices.SortStableFunc(results, func(a, b CompressionResult) int {
		var c int
		switch by {
		case SortSize:
			c = cmp.Compare(a.CompressedBytes, b.CompressedBytes)
		case SortRatio:
			c = cmp.Compare(b.Ratio(inputBytes), a.Ratio(inputBytes))
		case SortAlloc:
			c = cmp.Compare(a.CompressAllocBytes+a.DecompressAllocBytes, b.CompressAllocBytes+b.DecompressAllocBytes)
		default:
			c = cmp.Compare(b.CompressBytesPerSec, a.CompressBytesPerSec)
			if c == 0 {
				c = cmp.Compare(b.DecompressBytesPerSec, a.DecompressBytesPerSec)
			}
		}
		return cmp.Or(c, cmp.Compare(a.Algorithm, b.Algorithm))
	})
}

// negligibleSaving is the ratio under which compressing costs CPU for
// nothing: the data is already compressed or encrypted.
const negligibleSaving = 1.02

func recommend(results []CompressionResult, inputBytes int64, floor float64, compressionMeasured bool) Recommendation {
	rec := Recommendation{MinBytesPerSec: floor}
	if !compressionMeasured {
		rec.Text = "recommendation: none, compression throughput was not measured (--operations decompress)"
		return rec
	}
	var best, fastest *CompressionResult
	for i := range results {
		r := &results[i]
		if r.Deprecated || !r.RoundTripOK() {
			continue // new repositories cannot choose it, or must not
		}
		if fastest == nil || r.CompressBytesPerSec > fastest.CompressBytesPerSec {
			fastest = r
		}
		if r.CompressBytesPerSec < floor {
			continue
		}
		if best == nil || r.Ratio(inputBytes) > best.Ratio(inputBytes) ||
			(r.Ratio(inputBytes) == best.Ratio(inputBytes) && r.CompressBytesPerSec > best.CompressBytesPerSec) {
			best = r
		}
	}
	switch {
	case fastest == nil:
		rec.Text = "recommendation: none, only deprecated algorithms were measured"
	case best == nil:
		rec.Text = fmt.Sprintf("recommendation: none reaches %s compression here; the fastest is %s at %s",
			mibPerSec(floor), fastest.Algorithm, mibPerSec(fastest.CompressBytesPerSec))
	default:
		rec.Algorithm, rec.Ratio, rec.BytesPerSec = best.Algorithm, best.Ratio(inputBytes), best.CompressBytesPerSec
		rec.Text = fmt.Sprintf("recommendation: %s, the best ratio (%.3f) at or above %s compression (%s): kopia policy set --global --compression=%s",
			best.Algorithm, rec.Ratio, mibPerSec(floor), mibPerSec(best.CompressBytesPerSec), best.Algorithm)
		if rec.Ratio < negligibleSaving {
			rec.Text += fmt.Sprintf("; it saves under %.0f%% on this data, so --compression=none costs little", (negligibleSaving-1)*100)
		}
	}
	return rec
}

func mibPerSec(bytesPerSec float64) string {
	return fmt.Sprintf("%.0f MiB/s", bytesPerSec/(1<<20))
}

func describeResult(r CompressionResult, inputBytes int64) string {
	s := fmt.Sprintf("%s: %s bytes, ratio %.3f", r.Algorithm, humanize.Comma(r.CompressedBytes), r.Ratio(inputBytes))
	if r.CompressBytesPerSec > 0 {
		s += ", compress " + mibPerSec(r.CompressBytesPerSec)
	}
	if r.DecompressBytesPerSec > 0 {
		s += ", decompress " + mibPerSec(r.DecompressBytesPerSec)
	}
	if !r.RoundTripOK() {
		s += ", round trip FAILED: " + r.RoundTripError
	}
	return s
}

func throughputCell(bytesPerSec float64) Cell {
	if bytesPerSec == 0 {
		return Cell{Text: "-", Value: nil}
	}
	v := bytesPerSec / (1 << 20)
	if v >= 100 {
		return Num(v, "%.0f")
	}
	return Num(v, "%.1f")
}

func allocCells(measured bool, allocs, allocBytes uint64) []Cell {
	if !measured {
		return []Cell{{Text: "-"}, {Text: "-"}}
	}
	return []Cell{Int(int64(allocs)), {Text: humanize.IBytes(allocBytes), Value: int64(allocBytes)}}
}

func compressionTable(rep *CompressionReport, o CompressionOptions, truncated bool) *Table {
	input := humanSize(rep.InputBytes)
	if truncated {
		input = "first " + input
	}
	mode := "whole input at once, as kopia's benchmark"
	if o.PerChunk != "" {
		mode = fmt.Sprintf("chunk by chunk with %s (%d chunks), as a repository stores it", o.PerChunk, rep.Chunks)
	}
	t := &Table{
		Title: fmt.Sprintf("Compression of %s (%s, %s bytes): %s; %d× per goroutine, %d goroutine(s)",
			o.DataFile, input, humanize.Comma(rep.InputBytes), mode, rep.Repeat, o.Parallel),
		Columns: []string{"algorithm", "compressed", "ratio", "compress MiB/s", "decompress MiB/s",
			"compress allocs", "compress memory", "decompress allocs", "decompress memory", "round trip"},
	}
	if o.PerChunk != "" {
		t.Columns = append(t.Columns, "raw chunks")
	}
	if o.PrintOptions {
		t.Columns = append(t.Columns, "kopia option")
	}
	var unstable []string
	for _, r := range rep.Results {
		name := Str(r.Algorithm)
		if r.Deprecated {
			name.Text += " (deprecated)"
		}
		if r.Unstable {
			unstable = append(unstable, r.Algorithm)
		}
		row := []Cell{
			name,
			{Text: humanize.Comma(r.CompressedBytes), Value: r.CompressedBytes},
			Num(r.Ratio(rep.InputBytes), "%.3f"),
			throughputCell(r.CompressBytesPerSec),
			throughputCell(r.DecompressBytesPerSec),
		}
		row = append(row, allocCells(o.Operations != OperationsDecompress, r.CompressAllocs, r.CompressAllocBytes)...)
		row = append(row, allocCells(o.Operations != OperationsCompress && r.RoundTripOK(), r.DecompressAllocs, r.DecompressAllocBytes)...)
		row = append(row, roundTripCell(r))
		if o.PerChunk != "" {
			row = append(row, Int(int64(r.RawChunks)))
		}
		if o.PrintOptions {
			row = append(row, Str("--compression="+r.Algorithm))
		}
		t.Add(row...)
	}
	if o.PerChunk != "" {
		t.Notes = append(t.Notes, "per chunk: a chunk that does not shrink is stored raw (raw chunks), as a repository does; identical chunks are each counted (no deduplication)")
	}
	for _, r := range rep.RoundTripFailures() {
		t.Notes = append(t.Notes, fmt.Sprintf("round trip FAILED for %s: %s", r.Algorithm, r.RoundTripError))
	}
	if len(unstable) > 0 {
		t.Notes = append(t.Notes, "not stable (repetitions produced different bytes): "+strings.Join(unstable, ", "))
	}
	t.Notes = append(t.Notes, rep.Recommendation.Text)
	return t
}

// roundTripCell reads "ok" or "FAILED" in the text table; JSON and CSV
// carry the reason.
func roundTripCell(r CompressionResult) Cell {
	if r.RoundTripOK() {
		return Str("ok")
	}
	return Cell{Text: "FAILED", Value: "failed: " + r.RoundTripError}
}

func compressionChart(rep *CompressionReport, o CompressionOptions) *Chart {
	throughput := func(r CompressionResult) float64 { return r.CompressBytesPerSec }
	xLabel := "compression throughput (MiB/s)"
	if o.Operations == OperationsDecompress {
		throughput = func(r CompressionResult) float64 { return r.DecompressBytesPerSec }
		xLabel = "decompression throughput (MiB/s)"
	}
	xs := make([]float64, len(rep.Results))
	ys := make([]float64, len(rep.Results))
	labels := make([]string, len(rep.Results))
	for i, r := range rep.Results {
		xs[i], ys[i], labels[i] = throughput(r)/(1<<20), r.Ratio(rep.InputBytes), r.Algorithm
		if r.Algorithm == rep.Recommendation.Algorithm {
			labels[i] += " (recommended)"
		}
	}
	labels = mergeCloseLabels(xs, ys, labels)
	fast := Series{Name: fmt.Sprintf("at or above %s", mibPerSec(rep.Recommendation.MinBytesPerSec))}
	slow := Series{Name: fmt.Sprintf("below %s", mibPerSec(rep.Recommendation.MinBytesPerSec))}
	broken := Series{Name: "round trip failed"}
	for i, r := range rep.Results {
		s := &slow
		switch {
		case !r.RoundTripOK():
			s = &broken
		case o.Operations == OperationsDecompress || r.CompressBytesPerSec >= rep.Recommendation.MinBytesPerSec:
			s = &fast
		}
		s.X = append(s.X, xs[i])
		s.Y = append(s.Y, ys[i])
		s.Labels = append(s.Labels, labels[i])
	}
	c := &Chart{
		Title:  fmt.Sprintf("Compression ratio vs throughput: %s (%s)", o.DataFile, humanSize(rep.InputBytes)),
		XLabel: xLabel,
		YLabel: "ratio (input / stored bytes)",
		Kind:   ChartScatter,
	}
	if o.PerChunk != "" {
		c.Title += ", per chunk " + o.PerChunk
	}
	for _, s := range []Series{fast, slow, broken} {
		if len(s.X) > 0 {
			c.Series = append(c.Series, s)
		}
	}
	return c
}

// mergeCloseLabels keeps the labels of neighbouring points (the s2
// variants, the best-compression levels of deflate, gzip and pgzip) from
// printing over each other: points whose labels would collide are labelled
// once, at the lowest of them, one name per line from top to bottom.
// Label boxes are estimated from the chart's size (8×5 in) and font.
func mergeCloseLabels(xs, ys []float64, labels []string) []string {
	const (
		plotWidthPt, plotHeightPt = 500.0, 300.0
		charWidthPt, lineHeightPt = 5.5, 12.0
		offsetXPt, offsetYPt      = 4.0, 2.0
	)
	spanX := max(slices.Max(xs)-slices.Min(xs), 1e-9)
	spanY := max(slices.Max(ys)-slices.Min(ys), 1e-9)
	toPt := func(i int) (x, y float64) {
		return (xs[i] - slices.Min(xs)) / spanX * plotWidthPt, (ys[i] - slices.Min(ys)) / spanY * plotHeightPt
	}
	groups := make([][]int, len(xs))
	for i := range groups {
		groups[i] = []int{i}
	}
	// A label's lines stack upwards from its anchor, so a group is anchored
	// at its lowest point and each name sits near its own point.
	anchor := func(g []int) int {
		return slices.MinFunc(g, func(a, b int) int { return cmp.Compare(ys[a], ys[b]) })
	}
	type box struct{ x0, y0, x1, y1 float64 }
	boxOf := func(g []int) box {
		x, y := toPt(anchor(g))
		width := 0
		for _, i := range g {
			width = max(width, len(labels[i]))
		}
		return box{x + offsetXPt, y + offsetYPt, x + offsetXPt + charWidthPt*float64(width), y + offsetYPt + lineHeightPt*float64(len(g))}
	}
	collide := func(a, b []int) bool {
		ba, bb := boxOf(a), boxOf(b)
		if ba.x0 >= bb.x1 || bb.x0 >= ba.x1 || ba.y0 >= bb.y1 || bb.y0 >= ba.y1 {
			return false
		}
		// Only neighbours share a label: a name far from its point would
		// mislead more than an overlap.
		both := append(slices.Clone(a), b...)
		ax, ay := toPt(anchor(both))
		for _, i := range both {
			x, y := toPt(i)
			if math.Abs(x-ax) > 0.15*plotWidthPt || y-ay > lineHeightPt*float64(len(both)) {
				return false
			}
		}
		return true
	}
	for merged := true; merged; {
		merged = false
		for a := 0; a < len(groups) && !merged; a++ {
			for b := a + 1; b < len(groups); b++ {
				if collide(groups[a], groups[b]) {
					groups[a] = append(groups[a], groups[b]...)
					groups = slices.Delete(groups, b, b+1)
					merged = true
					break
				}
			}
		}
	}
	out := make([]string, len(labels))
	for _, g := range groups {
		slices.SortFunc(g, func(a, b int) int { return cmp.Or(cmp.Compare(ys[b], ys[a]), cmp.Compare(labels[a], labels[b])) })
		names := make([]string, len(g))
		for k, i := range g {
			names[k] = labels[i]
		}
		out[anchor(g)] = strings.Join(names, "\n")
	}
	return out
}
