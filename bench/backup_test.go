package bench

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// backupRow is one row of the backup table, by column name.
type backupRow map[string]any

func backupRows(t *testing.T, tab *Table) []backupRow {
	t.Helper()
	if !slices.Equal(tab.Columns, BackupColumns) {
		t.Fatalf("columns %q", tab.Columns)
	}
	for _, want := range []string{"compression", "splitter", "version", "time s", "MB/s", "repo MiB", "growth MiB", "changed MiB", "growth/changed", "contents", "index KiB"} {
		if !slices.Contains(tab.Columns, want) {
			t.Errorf("no column %q", want)
		}
	}
	var rows []backupRow
	for _, r := range tab.Rows {
		if len(r) != len(tab.Columns) {
			t.Fatalf("row of %d cells: %v", len(r), r)
		}
		m := backupRow{}
		for i, c := range r {
			m[tab.Columns[i]] = c.Value
		}
		rows = append(rows, m)
	}
	return rows
}

func (r backupRow) f(col string) float64 {
	switch v := r[col].(type) {
	case float64:
		return v
	case int64:
		return float64(v)
	}
	return -1
}

func TestBackupBenchSynthetic(t *testing.T) {
	const size = 24 << 20
	var lines []string
	tab, chart, err := Backup(context.Background(), BackupOptions{
		Size: size, Versions: 3, Churn: 0.02, Seed: 1,
		Compressions: []string{"none"}, Splitters: []string{"DYNAMIC-4M-BUZHASH", "FIXED-128K"},
		WorkDir: t.TempDir(), Progress: func(s string) { lines = append(lines, s) },
	})
	if err != nil {
		t.Fatal(err)
	}
	rows := backupRows(t, tab)
	if len(rows) != 6 {
		t.Fatalf("%d rows, want 2 configurations × 3 versions", len(rows))
	}
	ratio := map[string]float64{}
	contents := map[string]float64{}
	for i, r := range rows {
		sp, v := r["splitter"].(string), r.f("version")
		if r["compression"] != "none" || v != float64(i%3+1) {
			t.Errorf("row %d: %v", i, r)
		}
		if r.f("time s") <= 0 || r.f("MB/s") <= 0 || r.f("contents") <= 0 || r.f("index KiB") <= 0 {
			t.Errorf("row %d: time, rate, contents or index missing: %v", i, r)
		}
		if v == 1 {
			// Everything is new; uncompressed, the repository holds about
			// the data (less the zero runs and text that dedups, plus overhead).
			if r.f("changed MiB") != 24 || r.f("repo MiB") < 12 || r.f("repo MiB") > 26 {
				t.Errorf("version 1: %v", r)
			}
			continue
		}
		// Later versions: about 2% of the blocks (24 MiB hold only a few
		// 4 MiB chunks: with more, every one of them changes each night),
		// and less growth than the first version's.
		first := rows[i-int(v)+1]
		if c := r.f("changed MiB"); c < 0.02*24 || c > 0.02*24+0.25 {
			t.Errorf("version %v of %s: %v MiB changed, want about 2%% of 24 MiB", v, sp, c)
		}
		if r.f("growth MiB") <= 0 || r.f("growth MiB") >= first.f("growth MiB") {
			t.Errorf("version %v of %s grew %v MiB, version 1 %v MiB", v, sp, r.f("growth MiB"), first.f("growth MiB"))
		}
		if got := r.f("repo MiB") - rows[i-1].f("repo MiB"); got-r.f("growth MiB") > 0.05 || r.f("growth MiB")-got > 0.05 {
			t.Errorf("growth %v is not the difference of repository sizes %v", r.f("growth MiB"), got)
		}
		if g, ok := r["growth/changed"].(float64); !ok || g <= 0 {
			t.Errorf("version %v of %s: growth/changed %v", v, sp, r["growth/changed"])
		}
		ratio[sp] += r["growth/changed"].(float64) / 2
		contents[sp] = r.f("contents")
	}
	// Small chunks dedup scattered rewrites far better, and cost contents.
	if ratio["FIXED-128K"] >= ratio["DYNAMIC-4M-BUZHASH"] || ratio["FIXED-128K"] > 6 {
		t.Errorf("growth/changed FIXED-128K %.2f, DYNAMIC-4M-BUZHASH %.2f", ratio["FIXED-128K"], ratio["DYNAMIC-4M-BUZHASH"])
	}
	if contents["FIXED-128K"] <= 4*contents["DYNAMIC-4M-BUZHASH"] {
		t.Errorf("contents FIXED-128K %v, DYNAMIC-4M-BUZHASH %v", contents["FIXED-128K"], contents["DYNAMIC-4M-BUZHASH"])
	}
	notes := strings.Join(tab.Notes, "\n")
	if !strings.Contains(notes, "Lowest nightly growth: none × FIXED-128K") || !strings.Contains(notes, "none × DYNAMIC-4M-BUZHASH (kopia's default)") {
		t.Errorf("notes:\n%s", notes)
	}
	if len(lines) < 6 {
		t.Errorf("progress: %q", lines)
	}

	// The chart: one line per configuration, repository size per version.
	if len(chart.Series) != 2 || len(chart.Series[1].Y) != 3 || chart.Series[1].Y[0] != rows[3].f("repo MiB") {
		t.Errorf("chart series %+v", chart.Series)
	}
	png := filepath.Join(t.TempDir(), "backup.png")
	if err := chart.Write(png); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(png); err != nil || !bytes.HasPrefix(b, []byte("\x89PNG")) {
		t.Errorf("chart: %v", err)
	}
	var text bytes.Buffer
	if err := tab.WriteText(&text); err != nil || !strings.Contains(text.String(), "growth/changed") {
		t.Errorf("text: %v\n%s", err, text.String())
	}
	t.Logf("\n%s", text.String())
}

// writeRandom writes n seeded random bytes to path with the given mtime.
func writeRandom(t *testing.T, path string, n int, seed uint64, at time.Time) []byte {
	t.Helper()
	b := make([]byte, n)
	rng := rand.New(rand.NewPCG(seed, seed))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	writeAt(t, path, b, at)
	return b
}

func writeAt(t *testing.T, path string, b []byte, at time.Time) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, at, at); err != nil {
		t.Fatal(err)
	}
}

func TestBackupBenchData(t *testing.T) {
	dir := t.TempDir()
	day1 := time.Now().Add(-48 * time.Hour).Truncate(time.Second)
	day2 := day1.Add(24 * time.Hour)

	// Two versions of a directory: a.img with 3 blocks rewritten, b.img
	// unchanged, c.img new.
	v1, v2 := filepath.Join(dir, "v1"), filepath.Join(dir, "v2")
	a := writeRandom(t, filepath.Join(v1, "a.img"), 2<<20, 1, day1)
	b := writeRandom(t, filepath.Join(v1, "sub", "b.img"), 1<<20, 2, day1)
	a2 := bytes.Clone(a)
	for _, blk := range []int{0, 100, 511} {
		a2[blk*BlockSize+9] ^= 0xff
	}
	writeAt(t, filepath.Join(v2, "a.img"), a2, day2)
	writeAt(t, filepath.Join(v2, "sub", "b.img"), b, day1)
	writeRandom(t, filepath.Join(v2, "c.img"), 64<<10, 3, day2)

	tab, _, err := Backup(context.Background(), BackupOptions{
		Data: []string{v1, v2}, Compressions: []string{"none"}, Splitters: []string{"FIXED-128K"}, WorkDir: t.TempDir(),
	})
	if err != nil {
		t.Fatal(err)
	}
	rows := backupRows(t, tab)
	if len(rows) != 2 {
		t.Fatalf("%d rows", len(rows))
	}
	if c := rows[0].f("changed MiB"); c != 3 {
		t.Errorf("version 1: %v MiB changed, want all 3 MiB", c)
	}
	wantChanged := float64(3*BlockSize+64<<10) / (1 << 20)
	if c := rows[1].f("changed MiB"); c != wantChanged {
		t.Errorf("version 2: %v MiB changed, want %v", c, wantChanged)
	}
	// Three 128 KiB chunks of a.img and c.img are new: about 0.44 MiB,
	// plus metadata; nothing like the 3 MiB of version 1.
	if g := rows[1].f("growth MiB"); g < 0.4 || g > 1 {
		t.Errorf("version 2 grew %v MiB", g)
	}

	// Two versions of a file, in other directories, given by path: the
	// second has the same size and mtime, so it must be copied, not linked.
	f1, f2 := filepath.Join(dir, "x", "disk.img"), filepath.Join(dir, "y", "disk.img")
	writeAt(t, f1, a, day1)
	writeAt(t, f2, a2, day1)
	tab, _, err = Backup(context.Background(), BackupOptions{
		Data: []string{f1, f2}, Compressions: []string{"zstd"}, Splitters: []string{"FIXED-128K", "DYNAMIC-4M-BUZHASH"}, WorkDir: t.TempDir(),
	})
	if err != nil {
		t.Fatal(err)
	}
	rows = backupRows(t, tab)
	if len(rows) != 4 {
		t.Fatalf("%d rows", len(rows))
	}
	for _, r := range []backupRow{rows[1], rows[3]} {
		if r.f("changed MiB") != 3*BlockSize/float64(1<<20) || r.f("growth MiB") <= 0.2 {
			t.Errorf("file version 2 of %s: %v", r["splitter"], r)
		}
	}
	if rows[1].f("growth MiB") >= rows[3].f("growth MiB") {
		t.Errorf("FIXED-128K grew %v, DYNAMIC-4M-BUZHASH %v", rows[1].f("growth MiB"), rows[3].f("growth MiB"))
	}
	if st, err := os.Stat(f2); err != nil || !st.ModTime().Equal(day1) {
		t.Errorf("the user's file was touched: %v %v", st.ModTime(), err)
	}
}

func TestBackupBenchRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o644)
	full := filepath.Join(dir, "full")
	os.WriteFile(full, []byte("data"), 0o644)
	emptyDir := filepath.Join(dir, "emptydir")
	os.Mkdir(emptyDir, 0o755)
	ok := BackupOptions{Size: 1 << 20, Versions: 2, Churn: 0.04, Compressions: []string{"none"}, Splitters: []string{"FIXED-128K"}}
	with := func(f func(*BackupOptions)) BackupOptions { o := ok; f(&o); return o }
	for _, c := range []struct {
		opts BackupOptions
		want string
	}{
		{with(func(o *BackupOptions) { o.Size = 0; o.Data = []string{full, "/nonexistent/disk.img"} }), "--data /nonexistent/disk.img: no such file or directory"},
		{with(func(o *BackupOptions) { o.Size = 0; o.Data = []string{empty} }), "--data " + empty + " is empty"},
		{with(func(o *BackupOptions) { o.Size = 0; o.Data = []string{emptyDir} }), "holds no data"},
		{with(func(o *BackupOptions) { o.Size = 0; o.Data = []string{full, dir} }), "mixes files and directories"},
		{with(func(o *BackupOptions) { o.Data = []string{full} }), "not both"},
		{with(func(o *BackupOptions) { o.Size = 0 }), "nothing to measure"},
		{with(func(o *BackupOptions) { o.Size = 1000 }), "too small"},
		{with(func(o *BackupOptions) { o.Compressions = []string{"none", "zip"} }), `unknown compression "zip"`},
		{with(func(o *BackupOptions) { o.Splitters = []string{"FIXED-7K"} }), `unknown splitter "FIXED-7K"`},
		{with(func(o *BackupOptions) { o.Churn = 0 }), "--churn 0% is out of range"},
		{with(func(o *BackupOptions) { o.Churn = 0.75 }), "--churn 75% is out of range"},
		{with(func(o *BackupOptions) { o.Versions = 0 }), "--versions 0"},
	} {
		_, _, err := Backup(context.Background(), c.opts)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %v, want one line with %q", c.opts, err, c.want)
		}
	}
}
