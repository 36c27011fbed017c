package bench

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"os"
	"path/filepath"
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
		if mbps, ok := row[3].Value.(float64); !ok || mbps <= 0 {
			t.Errorf("row %v: MB/s %v", row, row[3].Value)
		}
		if req, ok := row[6].Value.(int64); !ok || req <= 0 {
			t.Errorf("row %v: no blob requests counted", row)
		}
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
	if err := tab.WriteCSV(&cs); err != nil {
		t.Fatal(err)
	}
	recs, err := csv.NewReader(&cs).ReadAll()
	if err != nil || len(recs) != 4 || recs[0][3] != "MB/s" {
		t.Errorf("csv: %v %v", recs, err)
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
