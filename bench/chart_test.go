package bench

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestChartWritesEachKind(t *testing.T) {
	dir := t.TempDir()
	charts := map[string]Chart{
		"lines.svg": {Title: "size per night", XLabel: "night", YLabel: "MiB", Kind: ChartLines, Series: []Series{
			{Name: "FIXED-128K", X: []float64{1, 2, 3}, Y: []float64{900, 940, 980}},
			{Name: "DYNAMIC-4M-BUZHASH", X: []float64{1, 2, 3}, Y: []float64{900, 1600, 2300}},
		}},
		"scatter.png": {Title: "ratio vs speed", XLabel: "MiB/s", YLabel: "ratio", Kind: ChartScatter, Series: []Series{
			{Name: "algorithms", X: []float64{500, 90}, Y: []float64{1.5, 2.1}, Labels: []string{"s2-default", "zstd"}},
		}},
		"bars.svg": {Title: "restore", YLabel: "MB/s", Kind: ChartBars, Categories: []string{"w16", "w32"}, Series: []Series{
			{Name: "drive", Y: []float64{120, 200}}, {Name: "seed", Y: []float64{27, 47}},
		}},
	}
	for name, c := range charts {
		path := filepath.Join(dir, name)
		if err := c.Write(path); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		switch filepath.Ext(name) {
		case ".svg":
			if !bytes.Contains(data, []byte("<svg")) || !bytes.Contains(data, []byte(c.Title)) {
				t.Errorf("%s: not an SVG with the title: %.200q", name, data)
			}
		case ".png":
			if !bytes.HasPrefix(data, []byte("\x89PNG")) {
				t.Errorf("%s: not a PNG", name)
			}
		}
	}
}

func TestChartRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	if err := CheckChartPath("x.pdf"); err == nil || !strings.Contains(err.Error(), ".svg or .png") {
		t.Errorf("x.pdf: %v", err)
	}
	c := Chart{Kind: ChartLines, Series: []Series{{Name: "a", X: []float64{1}, Y: []float64{1, 2}}}}
	if err := c.Write(filepath.Join(dir, "a.svg")); err == nil {
		t.Error("mismatched series drawn")
	}
	if err := (&Chart{}).Write(filepath.Join(dir, "b.svg")); err == nil {
		t.Error("empty chart drawn")
	}
}

// A chart named by the admin is never written through a symbolic link
// planted at its name.
func TestChartRefusesPlantedSymlink(t *testing.T) {
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(victim, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "chart.svg")
	if err := os.Symlink(victim, link); err != nil {
		t.Fatal(err)
	}
	c := Chart{Title: "t", Series: []Series{{Name: "a", X: []float64{1, 2}, Y: []float64{1, 2}}}}
	if err := c.Write(link); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("chart through a planted symlink: %v, want a refusal", err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep" {
		t.Errorf("the link's target changed: %.40q", b)
	}
}
