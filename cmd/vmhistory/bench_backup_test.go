package main

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/testenv"
)

func TestBenchBackupCommand(t *testing.T) {
	work := t.TempDir()
	chart := filepath.Join(t.TempDir(), "backup.svg")
	stdout, stderr, err := runConfigCmd(t, "bench", "backup", "--synthetic", "6MiB", "--versions", "2", "--churn", "5%",
		"--compression", "none", "--splitter", "FIXED-128K,FIXED-1M", "--work-dir", work, "--chart", chart, "--csv")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	recs, err := csv.NewReader(strings.NewReader(stdout)).ReadAll()
	if err != nil || len(recs) != 5 {
		t.Fatalf("csv: %v\n%s", err, stdout)
	}
	col := map[string]int{}
	for i, c := range recs[0] {
		col[c] = i
	}
	for _, c := range []string{"compression", "splitter", "version", "time s", "MB/s", "repo MiB", "growth MiB", "changed MiB", "growth/changed", "contents", "index KiB"} {
		if _, ok := col[c]; !ok {
			t.Errorf("no column %q in %q", c, recs[0])
		}
	}
	for _, r := range recs[1:] {
		if r[col["version"]] != "2" {
			continue
		}
		// 5% of 1536 blocks: at least 77 blocks, about 0.3 MiB.
		changed, _ := strconv.ParseFloat(r[col["changed MiB"]], 64)
		growth, _ := strconv.ParseFloat(r[col["growth MiB"]], 64)
		if changed < 77*4096.0/(1<<20) || changed > 0.6 || growth <= 0 || growth > 6 {
			t.Errorf("version 2 of %s: changed %v MiB, growth %v MiB", r[col["splitter"]], changed, growth)
		}
	}
	if !strings.Contains(stderr, "bench: version 2/2: uploading into none × FIXED-1M") || !strings.Contains(stderr, "chart written to "+chart) {
		t.Errorf("progress:\n%s", stderr)
	}
	if b, err := os.ReadFile(chart); err != nil || !strings.Contains(string(b), "<svg") || !strings.Contains(string(b), "FIXED-128K") {
		t.Errorf("chart: %v", err)
	}
	if left, _ := os.ReadDir(work); len(left) != 0 {
		t.Errorf("work directory not cleaned up: %v", left)
	}
}

func TestBenchBackupCommandData(t *testing.T) {
	dir := t.TempDir()
	day := time.Now().Add(-72 * time.Hour).Truncate(time.Second)
	v1, v2 := filepath.Join(dir, "mon"), filepath.Join(dir, "tue")
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	for i, v := range []string{v1, v2} {
		os.MkdirAll(v, 0o755)
		if i == 1 {
			data[12345] ^= 1 // one block changed
		}
		p := filepath.Join(v, "disk.img")
		os.WriteFile(p, data, 0o644)
		at := day.Add(time.Duration(i) * 24 * time.Hour)
		os.Chtimes(p, at, at)
	}
	// --data mon tue: the second path is an argument after the flag's value.
	stdout, stderr, err := runConfigCmd(t, "bench", "backup", "--data", v1, v2, "--compression", "zstd", "--splitter", "FIXED-128K",
		"--work-dir", t.TempDir(), "--json")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	var res struct {
		Rows  []map[string]any `json:"rows"`
		Notes []string         `json:"notes"`
	}
	if err := json.Unmarshal([]byte(stdout), &res); err != nil || len(res.Rows) != 2 {
		t.Fatalf("json: %v\n%s", err, stdout)
	}
	if c := res.Rows[1]["changed_mib"]; c != 4096.0/(1<<20) {
		t.Errorf("version 2 changed %v MiB, want one 4 KiB block", c)
	}
	if res.Rows[0]["compression"] != "zstd" || res.Rows[1]["growth_per_changed"] == nil {
		t.Errorf("rows %v", res.Rows)
	}
}

func TestBenchBackupCommandErrors(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty.img")
	os.WriteFile(empty, nil, 0o644)
	syn := []string{"bench", "backup", "--synthetic", "2MiB", "--work-dir", dir}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"bench", "backup", "--data", filepath.Join(dir, "missing.img")}, "missing.img: no such file or directory"},
		{[]string{"bench", "backup", "--data", empty}, "empty.img is empty"},
		{append(syn, "--compression", "zip"), `unknown compression "zip"`},
		{append(syn, "--splitter", "FIXED-3K"), `unknown splitter "FIXED-3K"`},
		{append(syn, "--churn", "0%"), "--churn 0% is out of range"},
		{append(syn, "--churn", "60%"), "--churn 60% is out of range"},
		{append(syn, "--churn", "lots"), `--churn "lots": not a percentage`},
		{append(syn, "--versions", "0"), "--versions 0 is out of range"},
		{[]string{"bench", "backup", "--synthetic", "big"}, `--synthetic "big": not a size`},
		{append(syn, "--chart", "x.jpg"), `chart "x.jpg"`},
		{[]string{"bench", "backup"}, "nothing to measure"},
		{[]string{"bench", "backup", "disk.img"}, `unexpected argument "disk.img"`},
		{[]string{"bench", "backup", "--data", empty, "--versions", "4"}, "--versions, --churn and --seed describe --synthetic"},
	} {
		_, _, err := runConfigCmd(t, c.args...)
		if configExitCode(err) == 0 || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%q: %v, want one line with %q", c.args, err, c.want)
		}
	}
	if left, _ := os.ReadDir(dir); len(left) != 1 {
		t.Errorf("bad input left files behind: %v", left)
	}
}

func TestBenchBackupHelp(t *testing.T) {
	stdout, _, err := runConfigCmd(t, "bench", "backup", "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"growth/changed", "Why small chunks", "FIXED-128K", "zstd-better-compression", "--synthetic", "--chart", "Examples:",
		"--zfs", "stream path", "DRR_WRITE", "full/stream"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("help lacks %q:\n%s", want, stdout)
		}
	}
}

// bench backup --zfs on a small disk, two nights, two splitters: the
// FIXED-128K stream upload reads only what zfs send wrote, the DYNAMIC
// one falls back to a full read and the notes say so; nothing is left
// in the work directory nor among the pools.
func TestBenchBackupZFSCommand(t *testing.T) {
	testenv.RequireZFS(t)
	work := t.TempDir()
	stdout, stderr, err := runConfigCmd(t, "bench", "backup", "--zfs", "--synthetic", "8MiB", "--versions", "2", "--churn", "4%",
		"--compression", "none", "--splitter", "FIXED-128K,DYNAMIC-4M-BUZHASH", "--work-dir", work, "--json")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	var res struct {
		Title string           `json:"title"`
		Rows  []map[string]any `json:"rows"`
		Notes []string         `json:"notes"`
	}
	if err := json.Unmarshal([]byte(stdout), &res); err != nil || len(res.Rows) != 8 {
		t.Fatalf("json: %v\n%s", err, stdout)
	}
	t.Logf("%s\n%s", stdout, stderr)
	byKey := map[string]map[string]any{}
	for _, r := range res.Rows {
		byKey[fmt.Sprintf("%v %v %v", r["splitter"], r["mode"], r["night"])] = r
	}
	fixed, dyn, full := byKey["FIXED-128K stream 2"], byKey["DYNAMIC-4M-BUZHASH stream 2"], byKey["FIXED-128K full 2"]
	if fixed == nil || dyn == nil || full == nil {
		t.Fatalf("rows %v", res.Rows)
	}
	if fixed["way"] != "stream" || dyn["way"] != "full" {
		t.Errorf("night 2's ways: FIXED-128K %v, DYNAMIC %v; want stream and full", fixed["way"], dyn["way"])
	}
	if r, w := fixed["read_mib"].(float64), fixed["drr_write_mib"].(float64); r > 1.1*w || r >= full["read_mib"].(float64)/2 {
		t.Errorf("FIXED-128K stream read %v MiB, DRR_WRITE %v MiB, the full upload %v MiB", r, w, full["read_mib"])
	}
	if _, ok := fixed["full_per_stream"].(float64); !ok {
		t.Errorf("no full/stream ratio: %v", fixed)
	}
	notes := strings.Join(res.Notes, "\n")
	for _, want := range []string{"none × DYNAMIC-4M-BUZHASH: the stream path fell back to a full read of disk.img", "none × FIXED-128K, mean of nights 2-2: stream path"} {
		if !strings.Contains(notes, want) {
			t.Errorf("notes lack %q:\n%s", want, notes)
		}
	}
	if !strings.Contains(stderr, "bench: night 2/2: stream upload into none × FIXED-128K") {
		t.Errorf("progress:\n%s", stderr)
	}
	if left, _ := os.ReadDir(work); len(left) != 0 {
		t.Errorf("work directory not cleaned up: %v", left)
	}
	out, _ := exec.Command("zpool", "list", "-H", "-o", "name").CombinedOutput()
	if strings.Contains(string(out), fmt.Sprintf("vmhbench-%d-", os.Getpid())) {
		t.Errorf("pool left: %s", out)
	}
}

func TestBenchBackupZFSCommandErrors(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	os.WriteFile(img, []byte("data"), 0o644)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"bench", "backup", "--zfs", "--data", img}, "--zfs generates its disk on a throwaway pool: give --synthetic SIZE, not --data"},
		{[]string{"bench", "backup", "--zfs"}, "bench backup --zfs: nothing to measure; give --synthetic SIZE"},
		{[]string{"bench", "backup", "--zfs", "--synthetic", "8MiB", "--versions", "0", "--work-dir", dir}, "bench backup --zfs: --versions 0 is out of range"},
		{[]string{"bench", "backup", "--zfs", "--synthetic", "8MiB", "--splitter", "FIXED-3K", "--work-dir", dir}, `unknown splitter "FIXED-3K"`},
		{[]string{"bench", "backup", "--zfs", "--synthetic", "8MiB", "--preset", "gdrive", "--work-dir", dir}, `--preset "gdrive": unknown drive model preset "gdrive"; choose one of: `},
		{[]string{"bench", "backup", "--synthetic", "8MiB", "--preset", "drive", "--work-dir", dir}, "--preset applies to --zfs only"},
	} {
		_, _, err := runConfigCmd(t, c.args...)
		if configExitCode(err) == 0 || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%q: %v, want one line with %q", c.args, err, c.want)
		}
	}
	// No zpool on PATH: one line saying what to install.
	t.Setenv("PATH", t.TempDir())
	_, _, err := runConfigCmd(t, "bench", "backup", "--zfs", "--synthetic", "8MiB", "--work-dir", dir)
	if err == nil || !strings.Contains(err.Error(), "bench backup --zfs: zpool is not installed") || strings.Contains(err.Error(), "\n") {
		t.Errorf("without zpool: %v", err)
	}
	if left, _ := os.ReadDir(dir); len(left) != 1 {
		t.Errorf("bad input left files behind: %v", left)
	}
}
