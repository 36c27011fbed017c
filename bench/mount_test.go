package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// The --via-mount bench on a small file: every reader measured, the
// passthrough mount served no READ itself (the kernel read the clone's
// file), the mount without passthrough served them, and the throwaway
// pool is gone afterwards.
func TestRestoreViaMountSmall(t *testing.T) {
	var lines []string
	tab, chart, err := RestoreViaMount(context.Background(), RestoreOptions{
		Size: 24 << 20, Presets: []string{"none"}, Repeat: 1, WorkDir: t.TempDir(),
		Progress: func(s string) { lines = append(lines, s) }, headBytes: 8 << 20,
	})
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	tab.WriteText(&text)
	t.Logf("\n%s", text.String())
	if len(tab.Rows) != 5 {
		t.Fatalf("%d rows, want 5", len(tab.Rows))
	}
	rows := map[string][]Cell{}
	for _, r := range tab.Rows {
		rows[r[2].Text] = r
		if mbps, ok := cell(t, tab, r, "MB/s").(float64); !ok || mbps <= 0 {
			t.Errorf("row %s: MB/s %v", r[2].Text, cell(t, tab, r, "MB/s"))
		}
		checkTimings(t, tab, r)
		checkHead(t, tab, r)
	}
	if r := rows[readerPassthrough]; r == nil || cell(t, tab, r, "READs served").(int64) != 0 {
		t.Errorf("passthrough row %v: want the reader named plainly and no READ served by the process", r)
	}
	if r := rows[readerNoPassthrough]; r == nil || cell(t, tab, r, "READs served").(int64) == 0 {
		t.Errorf("no-passthrough row %v: want READs served", r)
	}
	if r := rows[readerMountKopia]; r == nil || cell(t, tab, r, "blob requests").(int64) == 0 || cell(t, tab, r, "READs served").(int64) == 0 {
		t.Errorf("mount cp row %v: want blob requests and READs counted", r)
	}
	if _, ok := cell(t, tab, rows[readerMountKopia], "vs baseline").(float64); !ok {
		t.Errorf("mount cp row has no speed-up over kopia-style: %v", rows[readerMountKopia])
	}
	// The kopia-only file's open counts its connection, which the local
	// snapshot's has not.
	if k, d := cell(t, tab, rows[readerMountKopia], "open s").(float64), cell(t, tab, rows[readerDirect], "open s").(float64); k <= d {
		t.Errorf("mount cp opened in %.4f s, direct in %.4f s: the connection is not counted", k, d)
	}
	if len(chart.Series) != 2 || len(chart.Series[0].Y) != 5 || chart.Series[1].Y[categoryIndex(readerPassthrough)] <= 0 ||
		chart.Series[0].Y[categoryIndex(readerMountKopia)] <= 0 {
		t.Errorf("chart series %+v", chart.Series)
	}
	if err := chart.Write(filepath.Join(t.TempDir(), "mount.svg")); err != nil {
		t.Error(err)
	}
	if !strings.Contains(strings.Join(lines, "\n"), "run 1/1: none, mount cp") {
		t.Errorf("progress lines: %q", lines)
	}
	out, err := exec.Command("zpool", "list", "-H", "-o", "name").CombinedOutput()
	if err != nil {
		t.Fatalf("zpool list: %v: %s", err, out)
	}
	if strings.Contains(string(out), mountBenchPoolPrefix+strconv.Itoa(os.Getpid())+"-") {
		t.Errorf("bench pool left behind:\n%s", out)
	}
}

func TestRestoreViaMountRefusesBadInput(t *testing.T) {
	for _, c := range []struct {
		opts RestoreOptions
		want string
	}{
		{RestoreOptions{Size: 1 << 20, Presets: []string{"moon"}}, `"moon"`},
		{RestoreOptions{Size: 10, Presets: []string{"none"}}, "too small"},
		{RestoreOptions{Data: "/nonexistent/disk.img", Presets: []string{"none"}}, "/nonexistent/disk.img"},
		{RestoreOptions{Size: 1 << 20, Presets: []string{"none"}, Splitters: []string{"FIXED-128K", "FIXED-256K"}}, "give one splitter"},
	} {
		_, _, err := RestoreViaMount(context.Background(), c.opts)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %v, want one line with %q", c.opts, err, c.want)
		}
	}
}

// checkHead checks a --via-mount row's rates of the file's head and rest.
func checkHead(t *testing.T, tab *Table, row []Cell) {
	t.Helper()
	head, ok1 := cell(t, tab, row, "first 8 MiB MB/s").(float64)
	rest, ok2 := cell(t, tab, row, "rest MB/s").(float64)
	if !ok1 || !ok2 || head <= 0 || rest <= 0 {
		t.Errorf("row %v: first 8 MiB %v MB/s, rest %v MB/s: want positive rates", row, head, rest)
	}
}

// With a splitter other than kopia's default, the repository has it and
// the kopia-style read is left out (FIXED-128K pays a round trip per
// 128 KiB), unless asked for; a file no larger than the head has no rates
// of head and rest.
func TestRestoreViaMountSplitter(t *testing.T) {
	tab, _, err := RestoreViaMount(context.Background(), RestoreOptions{
		Size: 8 << 20, Splitters: []string{"FIXED-128K"}, Presets: []string{"none"}, Repeat: 1, WorkDir: t.TempDir(),
		headBytes: 8 << 20,
	})
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	tab.WriteText(&text)
	t.Logf("\n%s", text.String())
	if !strings.Contains(tab.Title, "FIXED-128K repository") {
		t.Errorf("title %q does not name the splitter", tab.Title)
	}
	var readers []string
	for _, r := range tab.Rows {
		readers = append(readers, r[2].Text)
		if v := cell(t, tab, r, "first 8 MiB MB/s"); v != "-" {
			t.Errorf("row %v: a rate of the head of a file no larger than it: %v", r, v)
		}
		checkTimings(t, tab, r)
	}
	if len(readers) != 4 || slices.Contains(readers, readerKopiaStyle) {
		t.Errorf("readers %q: want the four without kopia-style", readers)
	}
	if rows := tab.Rows; len(rows) > 0 && cell(t, tab, rows[0], "blob requests").(int64) == 0 {
		t.Errorf("mount cp row %v: no blob requests", rows[0])
	}
}
