package main

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/kopia/kopia/repo/compression"

	"github.com/vmhistory/vmhistory/bench"
)

// writeBenchSample writes half random, half repetitive bytes.
func writeBenchSample(t *testing.T, size int) string {
	t.Helper()
	b := make([]byte, size)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range b[:size/2] {
		b[i] = byte(rng.Uint32())
	}
	for i := size / 2; i < size; i++ {
		b[i] = "guest log line\n"[i%15]
	}
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestBenchCompressionJSONAndChart(t *testing.T) {
	data := writeBenchSample(t, 256<<10)
	chart := filepath.Join(t.TempDir(), "compression.svg")
	stdout, stderr, err := runConfigCmd(t, "bench", "compression", "--data-file", data, "--repeat", "2",
		"--algorithms", "s2,zstd-fastest", "--by-size", "--min-throughput", "0.001", "--chart", chart, "--json")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	var out struct {
		Rows  []map[string]any `json:"rows"`
		Notes []string         `json:"notes"`
	}
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatalf("%v\n%s", err, stdout)
	}
	var names []string
	var sizes []float64
	for _, r := range out.Rows {
		names = append(names, r["algorithm"].(string))
		sizes = append(sizes, r["compressed"].(float64))
	}
	if want := []string{"s2-better", "s2-default", "s2-parallel-4", "s2-parallel-8", "zstd-fastest"}; !slices.Equal(slices.Sorted(slices.Values(names)), want) {
		t.Errorf("algorithms %v, want %v", names, want)
	}
	if !slices.IsSorted(sizes) {
		t.Errorf("--by-size: sizes %v not ascending", sizes)
	}
	if len(out.Notes) == 0 || !strings.Contains(out.Notes[len(out.Notes)-1], "recommendation: "+names[0]) {
		t.Errorf("notes %q: with a floor of 0.001 MiB/s the smallest, %s, should be recommended", out.Notes, names[0])
	}
	if !strings.Contains(stderr, "bench: zstd-fastest:") || !strings.Contains(stderr, "chart written to "+chart) {
		t.Errorf("progress on stderr:\n%s", stderr)
	}
	if st, err := os.Stat(chart); err != nil || st.Size() == 0 {
		t.Errorf("chart: %v", err)
	}
}

func TestBenchCompressionTextPerChunk(t *testing.T) {
	data := writeBenchSample(t, 512<<10)
	stdout, stderr, err := runConfigCmd(t, "bench", "compression", "--data-file", data, "--repeat", "1",
		"--algorithms", "zstd-fastest", "--per-chunk", "FIXED-128K", "--print-options")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	for _, want := range []string{"chunk by chunk with FIXED-128K (4 chunks)", "raw chunks", "--compression=zstd-fastest", "recommendation:"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("output lacks %q:\n%s", want, stdout)
		}
	}
	// The random half is two chunks that do not shrink.
	if !regexpRow(stdout, `zstd-fastest\s.*\s2\s+--compression=zstd-fastest`) {
		t.Errorf("want 2 raw chunks for zstd-fastest:\n%s", stdout)
	}
}

func regexpRow(text, pattern string) bool {
	for line := range strings.SplitSeq(text, "\n") {
		if ok, _ := regexp.MatchString(pattern, line); ok {
			return true
		}
	}
	return false
}

func TestBenchCompressionRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty.img")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	data := writeBenchSample(t, 4096)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--data-file", filepath.Join(dir, "missing.img")}, `data file "` + filepath.Join(dir, "missing.img") + `" does not exist`},
		{[]string{"--data-file", empty}, "is empty"},
		{[]string{}, `required flag(s) "data-file" not set`},
		{[]string{"--data-file", data, "--algorithms", "zstd,brotli"}, `unknown compression algorithm "brotli"`},
		{[]string{"--data-file", data, "--per-chunk", "FIXED-3M"}, `unknown splitter "FIXED-3M"`},
		{[]string{"--data-file", data, "--sort", "speed"}, `unknown sort "speed"`},
		{[]string{"--data-file", data, "--sort", "ratio", "--by-size"}, "contradict"},
		{[]string{"--data-file", data, "--chart", "out.jpg"}, `chart "out.jpg"`},
		{[]string{"--data-file", data, "--min-throughput", "-5"}, "--min-throughput -5"},
	} {
		_, _, err := runConfigCmd(t, append([]string{"bench", "compression"}, c.args...)...)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%v: %v, want one line with %q", c.args, err, c.want)
		}
		if code := configExitCode(err); code == 0 {
			t.Errorf("%v: exit status 0", c.args)
		}
	}
}

func TestBenchCompressionHelpTeaches(t *testing.T) {
	stdout, _, err := runConfigCmd(t, "bench", "compression", "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"first 128 MiB", "--per-chunk", "--min-throughput", "ratio", "Examples:", "--deprecated"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("help lacks %q", want)
		}
	}
}

// TestBenchCompressionDeprecatedRoundTripFailureWarns runs the command on
// the sample where kopia's lz4 refuses its own output: every algorithm
// gets its row, each failing one says so, a failing deprecated algorithm is
// one warning line and the exit status stays 0. Which algorithms fail is
// asked of kopia itself, so the test stays right once lz4 is fixed.
func TestBenchCompressionDeprecatedRoundTripFailureWarns(t *testing.T) {
	sample := bench.MixedSample(1792 << 10)
	path := filepath.Join(t.TempDir(), "sample.img")
	if err := os.WriteFile(path, sample, 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := runConfigCmd(t, "bench", "compression", "--deprecated", "--data-file", path, "--repeat", "1")
	if err != nil {
		t.Fatalf("exit %d: %v\n%s", configExitCode(err), err, stderr)
	}
	algorithms := bench.CompressionAlgorithms(true)
	if len(algorithms) != 18 {
		t.Errorf("kopia has %d algorithms with the deprecated ones, want 18", len(algorithms))
	}
	var failing []string
	for _, name := range algorithms {
		failed := kopiaRoundTripFails(t, name, sample)
		if failed {
			failing = append(failing, name)
		}
		status := "ok"
		if failed {
			status = "FAILED"
		}
		if !regexpRow(stdout, `^\s*`+regexp.QuoteMeta(name)+`( \(deprecated\))?\s.*\s`+status+`\s*$`) {
			t.Errorf("no row for %s with round trip %s:\n%s", name, status, stdout)
		}
	}
	t.Logf("failing their round trip on this sample: %v", failing)
	warnings := 0
	for line := range strings.SplitSeq(stderr, "\n") {
		if strings.HasPrefix(line, "warning: ") {
			warnings++
			if !strings.Contains(line, "failed its round trip on "+path) {
				t.Errorf("warning %q does not name the input", line)
			}
		}
	}
	if warnings != len(failing) {
		t.Errorf("%d warning lines for %d failing algorithms %v:\n%s", warnings, len(failing), failing, stderr)
	}
	for _, name := range failing {
		if !strings.Contains(stderr, "warning: "+name+" (deprecated) failed its round trip") {
			t.Errorf("no warning for %s:\n%s", name, stderr)
		}
		if !strings.Contains(stdout, "round trip FAILED for "+name+": ") {
			t.Errorf("no reason under the table for %s:\n%s", name, stdout)
		}
	}
}

func kopiaRoundTripFails(t *testing.T, name string, data []byte) bool {
	t.Helper()
	var compressed, back bytes.Buffer
	if err := compression.ByName[compression.Name(name)].Compress(&compressed, bytes.NewReader(data)); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if err := compression.DecompressByHeader(&back, bytes.NewReader(compressed.Bytes())); err != nil {
		return true
	}
	return !bytes.Equal(back.Bytes(), data)
}
