package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
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
		Progress: func(s string) { lines = append(lines, s) },
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
	} {
		_, _, err := RestoreViaMount(context.Background(), c.opts)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %v, want one line with %q", c.opts, err, c.want)
		}
	}
}
