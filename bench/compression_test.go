package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/kopia/kopia/repo/compression"

	"github.com/vmhistory/vmhistory/testenv"
)

// writeCompressionSample writes MixedSample(size) to path.
func writeCompressionSample(t testing.TB, path string, size int) {
	t.Helper()
	if err := os.WriteFile(path, MixedSample(size), 0o644); err != nil {
		t.Fatal(err)
	}
}

// kopiaBytesString formats n as kopia's CLI prints sizes (base 10, one
// decimal, trailing zeros trimmed; see kopia's internal/units), since the
// CLI only prints sizes rounded.
func kopiaBytesString(n int64) string {
	f := float64(n)
	prefixes := []string{"", "K", "M", "G", "T", "P", "E"}
	for _, p := range prefixes {
		if f < 0.9*1000 {
			return niceNumber(f) + " " + p + "B"
		}
		f /= 1000
	}
	return niceNumber(f) + " EB"
}

func niceNumber(f float64) string {
	return strings.TrimRight(strings.TrimRight(fmt.Sprintf("%.1f", f), "0"), ".")
}

func TestKopiaBytesStringMatchesKopiaExamples(t *testing.T) {
	// Cases from kopia's internal/units tests.
	for n, want := range map[int64]string{0: "0 B", 899: "899 B", 900: "0.9 KB", 1200: "1.2 KB", 899999: "900 KB", 900000: "0.9 MB", 99000000: "99 MB"} {
		if got := kopiaBytesString(n); got != want {
			t.Errorf("kopiaBytesString(%d) = %q, want %q", n, got, want)
		}
	}
}

// kopiaRow is one line of the kopia CLI's "benchmark compression" tables.
var kopiaRow = regexp.MustCompile(`^\s*\d+\.\s+(\S+)\s+(\d+(?:\.\d+)? [KMGTPE]?B)\s+.*?( \(deprecated\))?$`)

// TestCompressionSizesEqualKopiaCLI runs the kopia CLI built from the module
// vmhistory links and checks that it measures the same algorithms and prints
// the same compressed size for each.
func TestCompressionSizesEqualKopiaCLI(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "sample.img")
	// Small enough that every size prints below 900 KB, to the 100 bytes,
	// which tells apart even the levels of one algorithm.
	writeCompressionSample(t, data, 1792<<10)

	kopia := testenv.KopiaCLI(t)
	cmd := exec.Command(kopia, "--config-file="+filepath.Join(dir, "kopia.config"), "--log-dir="+filepath.Join(dir, "logs"),
		"benchmark", "compression", "--data-file="+data, "--repeat=1", "--deprecated")
	cmd.Env = append(os.Environ(), "KOPIA_CHECK_FOR_UPDATES=false", "KOPIA_BYTES_STRING_BASE_2=false")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kopia benchmark compression: %v\n%s", err, stderr.String())
	}
	// kopia prints a compression table then a decompression table; both
	// carry the compressed size.
	kopiaSizes := map[string][]string{}
	kopiaDeprecated := map[string]bool{}
	for line := range strings.SplitSeq(stdout.String(), "\n") {
		if m := kopiaRow.FindStringSubmatch(line); m != nil {
			kopiaSizes[m[1]] = append(kopiaSizes[m[1]], m[2])
			kopiaDeprecated[m[1]] = m[3] != ""
		}
	}

	rep, err := Compression(context.Background(), CompressionOptions{DataFile: data, Repeat: 1, Deprecated: true})
	if err != nil {
		t.Fatal(err)
	}
	var table strings.Builder
	if err := rep.Table.WriteText(&table); err != nil {
		t.Fatal(err)
	}
	var ours, failed []string
	for _, r := range rep.Results {
		ours = append(ours, r.Algorithm)
		if r.Deprecated != kopiaDeprecated[r.Algorithm] {
			t.Errorf("%s: deprecated %v here, %v in kopia's output", r.Algorithm, r.Deprecated, kopiaDeprecated[r.Algorithm])
		}
		got := kopiaBytesString(r.CompressedBytes)
		for _, printed := range kopiaSizes[r.Algorithm] {
			if got != printed {
				t.Errorf("%s: %d bytes (%s), kopia printed %s", r.Algorithm, r.CompressedBytes, got, printed)
			}
		}
		if r.CompressedBytes >= 900_000 {
			t.Errorf("%s: %d bytes; kopia prints that rounded to 0.1 MB, too coarse to compare: make the sample smaller", r.Algorithm, r.CompressedBytes)
		}
		// An algorithm whose round trip fails (kopia's deprecated lz4 on
		// this sample) may be missing from kopia's decompression table;
		// its compressed size must still match, and the failure must show.
		wantSizes := 2
		if !r.RoundTripOK() {
			wantSizes = 1
			failed = append(failed, r.Algorithm)
			if !strings.Contains(table.String(), "round trip FAILED for "+r.Algorithm+": ") {
				t.Errorf("%s failed its round trip (%s) but the table does not say so:\n%s", r.Algorithm, r.RoundTripError, table.String())
			}
		}
		if n := len(kopiaSizes[r.Algorithm]); n < wantSizes || n > 2 {
			t.Errorf("%s: kopia printed %d sizes, want %d (compression and decompression tables)", r.Algorithm, n, wantSizes)
		}
		t.Logf("%-26s %9d bytes  ours %-9s kopia %v round trip ok %v", r.Algorithm, r.CompressedBytes, got, kopiaSizes[r.Algorithm], r.RoundTripOK())
	}
	t.Logf("round trip failed: %v", failed)
	// Whichever algorithms fail, exactly those are the report's failures,
	// and a failure of a current algorithm is the report's error.
	if got := len(rep.RoundTripFailures()); got != len(failed) {
		t.Errorf("RoundTripFailures lists %d algorithms, %d failed", got, len(failed))
	}
	for _, r := range rep.RoundTripFailures() {
		if !r.Deprecated && rep.Err() == nil {
			t.Errorf("%s is current and failed its round trip, but the report has no error", r.Algorithm)
		}
	}
	slices.Sort(ours)
	theirs := slices.Sorted(func(yield func(string) bool) {
		for name := range kopiaSizes {
			if !yield(name) {
				return
			}
		}
	})
	if !slices.Equal(ours, theirs) {
		t.Errorf("algorithms:\n ours  %v\n kopia %v\nkopia's output:\n%s", ours, theirs, stdout.String())
	}
	var registry []string
	for name := range compression.ByName {
		registry = append(registry, string(name))
	}
	slices.Sort(registry)
	if !slices.Equal(ours, registry) {
		t.Errorf("algorithms %v, kopia's registry %v", ours, registry)
	}
	var current []string
	for name := range kopiaDeprecated {
		if !kopiaDeprecated[name] {
			current = append(current, name)
		}
	}
	slices.Sort(current)
	if !slices.Equal(CompressionAlgorithms(false), current) {
		t.Errorf("without deprecated: %v, kopia's non-deprecated %v", CompressionAlgorithms(false), current)
	}
}

func TestCompressionPerChunkStoresIncompressibleChunksRaw(t *testing.T) {
	dir := t.TempDir()
	random := filepath.Join(dir, "random")
	b := make([]byte, 1<<20)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	if err := os.WriteFile(random, b, 0o644); err != nil {
		t.Fatal(err)
	}
	whole, err := Compression(context.Background(), CompressionOptions{DataFile: random, Repeat: 1, Algorithms: []string{"zstd-fastest", "s2-default"}})
	if err != nil {
		t.Fatal(err)
	}
	perChunk, err := Compression(context.Background(), CompressionOptions{DataFile: random, Repeat: 1, Algorithms: []string{"zstd-fastest", "s2-default"}, PerChunk: "FIXED-128K"})
	if err != nil {
		t.Fatal(err)
	}
	if perChunk.Chunks != 8 {
		t.Errorf("FIXED-128K cut 1 MiB into %d chunks, want 8", perChunk.Chunks)
	}
	for _, r := range whole.Results {
		if r.CompressedBytes <= int64(len(b)) {
			t.Errorf("whole buffer %s: %d bytes for %d random ones; kopia's framing should make it larger", r.Algorithm, r.CompressedBytes, len(b))
		}
	}
	for _, r := range perChunk.Results {
		if r.CompressedBytes != int64(len(b)) || r.RawChunks != 8 {
			t.Errorf("per chunk %s: %d bytes, %d raw chunks; want every chunk stored raw (%d bytes, 8)", r.Algorithm, r.CompressedBytes, r.RawChunks, len(b))
		}
	}
}

func TestCompressionPerChunkLosesContextOnSmallChunks(t *testing.T) {
	data := filepath.Join(t.TempDir(), "sample.img")
	writeCompressionSample(t, data, 4<<20)
	opts := CompressionOptions{DataFile: data, Repeat: 1, Algorithms: []string{"zstd-better-compression"}, Operations: OperationsCompress}
	whole, err := Compression(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	opts.PerChunk = "FIXED-128K"
	small, err := Compression(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	w, s := whole.Results[0], small.Results[0]
	if s.CompressedBytes <= w.CompressedBytes {
		t.Errorf("128 KiB chunks stored in %d bytes, the whole buffer in %d: chunks compressed alone should cost more", s.CompressedBytes, w.CompressedBytes)
	}
	if !strings.Contains(small.Table.Title, "FIXED-128K") || !slices.Contains(small.Table.Columns, "raw chunks") {
		t.Errorf("per-chunk table does not say so: %q %v", small.Table.Title, small.Table.Columns)
	}
}

func TestCompressionTableSortsAndRecommends(t *testing.T) {
	data := filepath.Join(t.TempDir(), "sample.img")
	writeCompressionSample(t, data, 512<<10)
	for _, by := range CompressionSorts {
		rep, err := Compression(context.Background(), CompressionOptions{DataFile: data, Repeat: 1, Algorithms: []string{"s2", "zstd", "gzip-best-speed"}, SortBy: by, MinThroughput: 1})
		if err != nil {
			t.Fatal(err)
		}
		// zstd selects zstd-best-compression too, deprecated or not, as in kopia.
		if len(rep.Results) != 9 {
			t.Fatalf("%d results, want 9 (4 s2, 4 zstd, gzip-best-speed)", len(rep.Results))
		}
		ordered := slices.IsSortedFunc(rep.Results, func(a, b CompressionResult) int {
			switch by {
			case SortSize:
				return int(a.CompressedBytes - b.CompressedBytes)
			case SortRatio:
				return cmpFloat(b.Ratio(rep.InputBytes), a.Ratio(rep.InputBytes))
			case SortAlloc:
				return int(int64(a.CompressAllocBytes+a.DecompressAllocBytes) - int64(b.CompressAllocBytes+b.DecompressAllocBytes))
			}
			return cmpFloat(b.CompressBytesPerSec, a.CompressBytesPerSec)
		})
		if !ordered {
			t.Errorf("--sort %s: not ordered: %+v", by, rep.Results)
		}
		// A floor of 1 byte/s: every algorithm qualifies, so the best
		// non-deprecated ratio wins.
		var best CompressionResult
		for _, r := range rep.Results {
			if !r.Deprecated && r.Ratio(rep.InputBytes) > best.Ratio(rep.InputBytes) {
				best = r
			}
		}
		if rep.Recommendation.Algorithm != best.Algorithm {
			t.Errorf("recommended %q, want %q", rep.Recommendation.Algorithm, best.Algorithm)
		}
		if last := rep.Table.Notes[len(rep.Table.Notes)-1]; !strings.Contains(last, "--compression="+best.Algorithm) {
			t.Errorf("last note %q does not recommend %s", last, best.Algorithm)
		}
	}
}

func TestKopiaRepeatRule(t *testing.T) {
	// kopia processes 128 MiB per algorithm: 1 MiB 128 times, 3 MiB 42
	// times, 128 MiB (the most it reads) once.
	for in, want := range map[int]int{1 << 20: 128, 3 << 20: 42, 100 << 20: 1, 128 << 20: 1, 1000: 134217} {
		if got := kopiaRepeat(in); got != want {
			t.Errorf("kopiaRepeat(%d) = %d, want %d", in, got, want)
		}
	}
}

func TestRecommendationHonoursTheFloor(t *testing.T) {
	const mib = 1 << 20
	results := []CompressionResult{
		{Algorithm: "slow-but-small", CompressedBytes: 100, CompressBytesPerSec: 50 * mib},
		{Algorithm: "fast", CompressedBytes: 400, CompressBytesPerSec: 900 * mib},
		{Algorithm: "fast-and-smaller", CompressedBytes: 300, CompressBytesPerSec: 600 * mib},
		{Algorithm: "old", CompressedBytes: 200, CompressBytesPerSec: 2000 * mib, Deprecated: true},
	}
	if r := recommend(results, 1000, 500*mib, true); r.Algorithm != "fast-and-smaller" || !strings.Contains(r.Text, "500 MiB/s") {
		t.Errorf("floor 500 MiB/s: %+v", r)
	}
	if r := recommend(results, 1000, 10*mib, true); r.Algorithm != "slow-but-small" {
		t.Errorf("floor 10 MiB/s: %+v", r)
	}
	if r := recommend(results, 1000, 1000*mib, true); r.Algorithm != "" || !strings.Contains(r.Text, "fastest is fast at 900 MiB/s") {
		t.Errorf("floor 1000 MiB/s, only a deprecated one above: %+v", r)
	}
	if r := recommend(results, 101, 10*mib, true); !strings.Contains(r.Text, "--compression=none") {
		t.Errorf("ratio 1.01 should suggest no compression: %+v", r)
	}
}

func TestCompressionOutputsAndChart(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "sample.img")
	writeCompressionSample(t, data, 1<<20)
	var progress []string
	rep, err := Compression(context.Background(), CompressionOptions{DataFile: data, Repeat: 3, Algorithms: []string{"s2-default", "zstd-fastest"}, Parallel: 2,
		VerifyStable: true, PrintOptions: true, Progress: func(s string) { progress = append(progress, s) }})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Repeat != 3 || !strings.Contains(progress[0], "3 times") {
		t.Errorf("repeat %d, progress %q; want 3", rep.Repeat, progress)
	}
	if len(progress) != 3 {
		t.Errorf("progress %q: want the repeat line and one per algorithm", progress)
	}
	var js bytes.Buffer
	if err := rep.Table.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var decoded struct {
		Rows  []map[string]any `json:"rows"`
		Notes []string         `json:"notes"`
	}
	if err := json.Unmarshal(js.Bytes(), &decoded); err != nil {
		t.Fatal(err)
	}
	for _, row := range decoded.Rows {
		if row["compressed"].(float64) <= 0 || row["compress_mib_per_s"].(float64) <= 0 || row["decompress_mib_per_s"].(float64) <= 0 ||
			row["kopia_option"] != "--compression="+row["algorithm"].(string) {
			t.Errorf("json row %v", row)
		}
	}
	if len(decoded.Notes) == 0 || !strings.HasPrefix(decoded.Notes[len(decoded.Notes)-1], "recommendation:") {
		t.Errorf("json notes %q lack the recommendation", decoded.Notes)
	}
	for _, name := range []string{"c.svg", "c.png"} {
		path := filepath.Join(dir, name)
		if err := rep.Chart.Write(path); err != nil {
			t.Fatal(err)
		}
		if st, err := os.Stat(path); err != nil || st.Size() < 1000 {
			t.Errorf("%s: %v %v", name, st, err)
		}
	}
}

func TestCompressionDecompressOnly(t *testing.T) {
	data := filepath.Join(t.TempDir(), "sample.img")
	writeCompressionSample(t, data, 256<<10)
	rep, err := Compression(context.Background(), CompressionOptions{DataFile: data, Repeat: 1, Algorithms: []string{"s2-default"}, Operations: OperationsDecompress})
	if err != nil {
		t.Fatal(err)
	}
	r := rep.Results[0]
	if r.CompressBytesPerSec != 0 || r.DecompressBytesPerSec <= 0 || r.CompressedBytes == 0 {
		t.Errorf("decompress only: %+v", r)
	}
	if rep.Table.Rows[0][3].Text != "-" || rep.Recommendation.Algorithm != "" {
		t.Errorf("compression columns should be empty and nothing recommended: %v %+v", rep.Table.Rows[0], rep.Recommendation)
	}
}

func TestMergeCloseLabels(t *testing.T) {
	// Two points nearly on top of each other, one far away: the pair is
	// labelled at its lower point, the higher point's name on top.
	got := mergeCloseLabels([]float64{100, 101, 900}, []float64{2.001, 2.0, 1.2}, []string{"s2-parallel-8", "s2-parallel-4", "zstd"})
	want := []string{"", "s2-parallel-8\ns2-parallel-4", "zstd"}
	if !slices.Equal(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
	// Far apart points keep their own labels.
	got = mergeCloseLabels([]float64{0, 500, 1000}, []float64{1, 2, 3}, []string{"a", "b", "c"})
	if !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Errorf("got %q", got)
	}
}

func TestCompressionRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "sample.img")
	writeCompressionSample(t, data, 64<<10)
	for _, c := range []struct {
		opts CompressionOptions
		want string
	}{
		{CompressionOptions{DataFile: "/nonexistent/disk.img"}, `data file "/nonexistent/disk.img" does not exist`},
		{CompressionOptions{DataFile: empty}, `data file "` + empty + `" is empty`},
		{CompressionOptions{DataFile: dir}, `is not a regular file`},
		{CompressionOptions{}, "no data file"},
		{CompressionOptions{DataFile: data, Algorithms: []string{"brotli"}}, `unknown compression algorithm "brotli" (kopia has: deflate-best-compression,`},
		{CompressionOptions{DataFile: data, PerChunk: "FIXED-7K"}, `unknown splitter "FIXED-7K" (kopia has: DYNAMIC,`},
		{CompressionOptions{DataFile: data, SortBy: "speed"}, `unknown sort "speed"`},
		{CompressionOptions{DataFile: data, Operations: "both-ways"}, `unknown operations "both-ways"`},
		{CompressionOptions{DataFile: data, Parallel: -2}, "parallel -2"},
		{CompressionOptions{DataFile: data, Repeat: -1}, "repeat -1"},
	} {
		_, err := Compression(context.Background(), c.opts)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %v, want one line with %q", c.opts, err, c.want)
		}
	}
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// kopiaRoundTrip compresses data with kopia's compressor and decompresses
// it with kopia's header-driven reader, as a repository write and read do.
func kopiaRoundTrip(name string, data []byte) error {
	var compressed, back bytes.Buffer
	if err := compression.ByName[compression.Name(name)].Compress(&compressed, bytes.NewReader(data)); err != nil {
		return fmt.Errorf("compress: %w", err)
	}
	if err := compression.DecompressByHeader(&back, bytes.NewReader(compressed.Bytes())); err != nil {
		return fmt.Errorf("decompress: %w", err)
	}
	if !bytes.Equal(back.Bytes(), data) {
		return errors.New("decompressed bytes differ from the input")
	}
	return nil
}

// TestCompressionRoundTripStatusEqualsKopia pins the samples on which
// kopia's deprecated lz4 (pierrec/lz4 v2.6.1's amd64 decoder) refuses its
// own output, and checks that each bench row's round-trip status is what a
// direct kopia Compress/DecompressByHeader of the same input gives, for
// every algorithm: right today, and still right once kopia's lz4 is fixed.
func TestCompressionRoundTripStatusEqualsKopia(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []int{64 << 10, 1 << 20, 1792 << 10} {
		t.Run(fmt.Sprintf("%dKiB", size>>10), func(t *testing.T) {
			path := filepath.Join(dir, fmt.Sprintf("sample-%d.img", size))
			writeCompressionSample(t, path, size)
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			rep, err := Compression(context.Background(), CompressionOptions{DataFile: path, Repeat: 1, Deprecated: true})
			if err != nil {
				t.Fatalf("one failing algorithm must not abort the bench: %v", err)
			}
			if len(rep.Results) != len(CompressionAlgorithms(true)) {
				t.Fatalf("%d rows, want one per algorithm (%d)", len(rep.Results), len(CompressionAlgorithms(true)))
			}
			for _, r := range rep.Results {
				direct := kopiaRoundTrip(r.Algorithm, data)
				if (direct == nil) != r.RoundTripOK() {
					t.Errorf("%s: bench round trip ok=%v (%s), kopia directly: %v", r.Algorithm, r.RoundTripOK(), r.RoundTripError, direct)
				}
				if direct != nil {
					t.Logf("%s fails its round trip on %d bytes: %v", r.Algorithm, size, direct)
					if r.Algorithm == rep.Recommendation.Algorithm {
						t.Errorf("%s is recommended although its round trip fails", r.Algorithm)
					}
					if r.DecompressBytesPerSec != 0 {
						t.Errorf("%s: decompression timed although it fails", r.Algorithm)
					}
				} else if r.DecompressBytesPerSec == 0 {
					t.Errorf("%s: decompression not timed", r.Algorithm)
				}
			}
		})
	}
}

// corruptingCompressor is a current algorithm made to fail its round trip,
// which none of kopia's can be made to do on purpose: it flips a byte of
// the real compressor's output after the header.
type corruptingCompressor struct{ compression.Compressor }

func (c corruptingCompressor) Compress(output io.Writer, input io.Reader) error {
	var buf bytes.Buffer
	if err := c.Compressor.Compress(&buf, input); err != nil {
		return err
	}
	b := buf.Bytes()
	b[len(b)/2] ^= 0xff
	_, err := output.Write(b)
	return err
}

func TestCompressionCurrentAlgorithmFailingRoundTripIsAnError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sample.img")
	writeCompressionSample(t, path, 256<<10)
	real := lookupCompressor
	t.Cleanup(func() { lookupCompressor = real })
	lookupCompressor = func(name string) compression.Compressor {
		if name == "zstd-fastest" {
			return corruptingCompressor{real(name)}
		}
		return real(name)
	}
	rep, err := Compression(context.Background(), CompressionOptions{DataFile: path, Repeat: 1, Algorithms: []string{"zstd-fastest", "s2-default"}})
	if err != nil {
		t.Fatalf("the bench must finish: %v", err)
	}
	if len(rep.Results) != 2 {
		t.Fatalf("%d rows, want zstd-fastest and s2-default (%v)", len(rep.Results), rep.Results)
	}
	for _, r := range rep.Results {
		if r.RoundTripOK() == (r.Algorithm == "zstd-fastest") {
			t.Errorf("%s: round trip ok %v (%s)", r.Algorithm, r.RoundTripOK(), r.RoundTripError)
		}
	}
	err = rep.Err()
	if err == nil || !strings.Contains(err.Error(), "zstd-fastest failed its round trip on "+path) || strings.Contains(err.Error(), "\n") {
		t.Errorf("Err() = %v, want one line naming zstd and the input", err)
	}
	if len(rep.Warnings()) != 0 {
		t.Errorf("warnings %v for a current algorithm", rep.Warnings())
	}
	if rep.Recommendation.Algorithm == "zstd-fastest" {
		t.Error("a broken algorithm was recommended")
	}
	var out bytes.Buffer
	if err := rep.Table.WriteJSON(&out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), `"round_trip": "failed: `) || !strings.Contains(out.String(), `"round_trip": "ok"`) {
		t.Errorf("JSON lacks the round trip status:\n%s", out.String())
	}
	if series := rep.Chart.Series; len(series) == 0 || series[len(series)-1].Name != "round trip failed" || !strings.Contains(strings.Join(series[len(series)-1].Labels, " "), "zstd-fastest") {
		t.Errorf("chart series %+v: want a \"round trip failed\" series with zstd-fastest", series)
	}
}
