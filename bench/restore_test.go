package bench

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestRestoreBenchSmall(t *testing.T) {
	tab, chart, err := Restore(context.Background(), RestoreOptions{
		Size: 6 << 20, Splitters: []string{"DYNAMIC-4M-BUZHASH", "FIXED-128K"}, Presets: []string{"none"},
		Windows: []int{4}, WorkDir: t.TempDir(),
	})
	if err != nil {
		t.Fatal(err)
	}
	// kopia-style for DYNAMIC only, prefetch for both.
	if len(tab.Rows) != 3 {
		t.Fatalf("%d rows, want 3:\n%+v", len(tab.Rows), tab.Rows)
	}
	for _, row := range tab.Rows {
		if mbps, ok := cell(t, tab, row, "MB/s").(float64); !ok || mbps <= 0 {
			t.Errorf("row %v: MB/s %v", row, cell(t, tab, row, "MB/s"))
		}
		if req, ok := cell(t, tab, row, "blob requests").(int64); !ok || req <= 0 {
			t.Errorf("row %v: no blob requests counted", row)
		}
		checkTimings(t, tab, row)
	}
	// One line per splitter (one preset): kopia-style at window 1 on
	// DYNAMIC only.
	if len(chart.Series) != 2 || len(chart.Series[0].X) != 2 || chart.Series[0].X[0] != 1 || len(chart.Series[1].X) != 1 {
		t.Errorf("chart series: %+v", chart.Series)
	}
	png := filepath.Join(t.TempDir(), "restore.png")
	if err := chart.Write(png); err != nil {
		t.Errorf("chart: %v", err)
	}
	var text, js, cs bytes.Buffer
	if err := tab.WriteText(&text); err != nil || !strings.Contains(text.String(), "prefetch w4") {
		t.Errorf("text: %v\n%s", err, text.String())
	}
	var decoded struct {
		Rows []map[string]any `json:"rows"`
	}
	if err := tab.WriteJSON(&js); err != nil || json.Unmarshal(js.Bytes(), &decoded) != nil || len(decoded.Rows) != 3 || decoded.Rows[0]["mb_per_s"] == nil {
		t.Errorf("json: %v\n%s", err, js.String())
	}
	for _, key := range []string{"cpu_s_per_gib", "first_byte_s", "open_s"} {
		if v, ok := decoded.Rows[0][key].(float64); !ok || v <= 0 {
			t.Errorf("json row %v: %s = %v, want a positive number", decoded.Rows[0], key, decoded.Rows[0][key])
		}
	}
	for _, note := range []string{"CPU s/GiB: user+sys", "drive model", "first byte s:", "open s:"} {
		if !strings.Contains(text.String(), note) {
			t.Errorf("text has no note %q:\n%s", note, text.String())
		}
	}
	if err := tab.WriteCSV(&cs); err != nil {
		t.Fatal(err)
	}
	recs, err := csv.NewReader(&cs).ReadAll()
	if err != nil || len(recs) != 4 || recs[0][3] != "MB/s" || !slices.Contains(recs[0], "CPU s/GiB") ||
		!slices.Contains(recs[0], "first byte s") || !slices.Contains(recs[0], "open s") {
		t.Errorf("csv: %v %v", recs, err)
	}
}

// cell is row's value in column col of tab.
func cell(t *testing.T, tab *Table, row []Cell, col string) any {
	t.Helper()
	i := slices.Index(tab.Columns, col)
	if i < 0 {
		t.Fatalf("no column %q in %q", col, tab.Columns)
	}
	return row[i].Value
}

// checkTimings checks a restore row's CPU, first byte and open time: all
// positive, the first byte no earlier than the open.
func checkTimings(t *testing.T, tab *Table, row []Cell) {
	t.Helper()
	cpu, ok1 := cell(t, tab, row, "CPU s/GiB").(float64)
	first, ok2 := cell(t, tab, row, "first byte s").(float64)
	open, ok3 := cell(t, tab, row, "open s").(float64)
	if !ok1 || !ok2 || !ok3 || cpu <= 0 || first <= 0 || open <= 0 {
		t.Errorf("row %v: CPU s/GiB %v, first byte %v, open %v: want positive numbers", row, cpu, first, open)
	}
	if first < open {
		t.Errorf("row %v: first byte %.4f s before the open ended (%.4f s)", row, first, open)
	}
}

func TestRestoreBenchRefusesBadInput(t *testing.T) {
	empty := filepath.Join(t.TempDir(), "empty")
	os.WriteFile(empty, nil, 0o644)
	for _, c := range []struct {
		opts RestoreOptions
		want string
	}{
		{RestoreOptions{Size: 1 << 20, Splitters: []string{"FIXED-7K"}, Presets: []string{"none"}}, `unknown splitter "FIXED-7K"`},
		{RestoreOptions{Size: 1 << 20, Splitters: []string{"FIXED-128K"}, Presets: []string{"moon"}}, `"moon"`},
		{RestoreOptions{Size: 10, Splitters: []string{"FIXED-128K"}, Presets: []string{"none"}}, "too small"},
		{RestoreOptions{Data: "/nonexistent/disk.img", Splitters: []string{"FIXED-128K"}, Presets: []string{"none"}}, "/nonexistent/disk.img"},
		{RestoreOptions{Data: empty, Splitters: []string{"FIXED-128K"}, Presets: []string{"none"}}, "not a non-empty regular file"},
		{RestoreOptions{Size: 1 << 20, Splitters: []string{"FIXED-128K"}, Presets: []string{"none"}, Windows: []int{0}}, "window 0"},
	} {
		_, _, err := Restore(context.Background(), c.opts)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %v, want one line with %q", c.opts, err, c.want)
		}
	}
}

// TestRestoreBenchExistingFile: --spec's mode reads a file already in a
// repository (with its own password) instead of uploading one: the
// kopia-style read and the prefetching reader, both fetching its bytes.
func TestRestoreBenchExistingFile(t *testing.T) {
	ctx := context.Background()
	work := t.TempDir()
	dataDir := filepath.Join(work, "data")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	const size = 3 << 20
	if err := generateVMData(filepath.Join(dataDir, "disk.img"), size); err != nil {
		t.Fatal(err)
	}
	configFile, oid, err := uploadForBench(ctx, work, "FIXED-128K", dataDir, "disk.img")
	if err != nil {
		t.Fatal(err)
	}
	tab, _, err := Restore(ctx, RestoreOptions{
		Existing: &ExistingFile{ConfigFile: configFile, Password: benchPassword, Object: oid, Size: size, Label: "latest:disk.img"},
		Presets:  []string{"none"}, Windows: []int{4}, Repeat: 1, WorkDir: t.TempDir(),
		Splitters: []string{"DYNAMIC-4M-BUZHASH"}, // ignored with Existing
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(tab.Rows) != 2 {
		t.Fatalf("%d rows, want kopia-style and prefetch w4:\n%+v", len(tab.Rows), tab.Rows)
	}
	for i, reader := range []string{"kopia-style", "prefetch w4"} {
		row := tab.Rows[i]
		if got := cell(t, tab, row, "reader"); got != reader {
			t.Errorf("row %d reader %v, want %s", i, got, reader)
		}
		if got := cell(t, tab, row, "splitter"); got != "latest:disk.img" {
			t.Errorf("row %d splitter column %v, want the spec", i, got)
		}
		if mib, ok := cell(t, tab, row, "fetched MiB").(float64); !ok || mib <= 0 {
			t.Errorf("row %d fetched %v MiB: the file was not read from the repository", i, cell(t, tab, row, "fetched MiB"))
		}
	}
	// --write: the same reads, each written into a file, as the CLI's restore.
	written, _, err := Restore(ctx, RestoreOptions{
		Existing: &ExistingFile{ConfigFile: configFile, Password: benchPassword, Object: oid, Size: size, Label: "latest:disk.img"},
		Presets:  []string{"none"}, Windows: []int{4}, Repeat: 1, WorkDir: t.TempDir(), WriteReads: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(written.Notes, "\n"), "--write: each read went into a file") {
		t.Errorf("the notes of a --write run do not say the reads were written:\n%s", strings.Join(written.Notes, "\n"))
	}
	if _, _, err := Restore(ctx, RestoreOptions{Existing: &ExistingFile{ConfigFile: configFile, Password: "wrong", Object: oid, Size: size, Label: "x"},
		Presets: []string{"none"}, Windows: []int{4}, Repeat: 1, WorkDir: t.TempDir()}); err == nil || !strings.Contains(err.Error(), "password") {
		t.Errorf("a wrong password: %v", err)
	}
}
