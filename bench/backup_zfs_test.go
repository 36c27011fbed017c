package bench

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/testenv"
)

// benchPoolsLeft lists this process's throwaway bench pools.
func benchPoolsLeft(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("zpool", "list", "-H", "-o", "name").CombinedOutput()
	if err != nil {
		t.Fatalf("zpool list: %v: %s", err, out)
	}
	var left []string
	for _, name := range strings.Fields(string(out)) {
		if strings.HasPrefix(name, fmt.Sprintf("%s%d-", mountBenchPoolPrefix, os.Getpid())) {
			left = append(left, name)
		}
	}
	return left
}

func fileDigest(t *testing.T, r io.Reader) string {
	t.Helper()
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%d:%x", n, h.Sum(nil))
}

// The ZFS mode on a small disk, three nights: the stream path reads the
// records zfs send wrote, far less than the full upload, grows the
// repository no more, and both repositories' last snapshots restore the
// ZFS snapshot's image. The pool and the work directory are gone
// afterwards. (The fall-back of a DYNAMIC splitter is the command's test.)
func TestBackupZFSSmall(t *testing.T) {
	testenv.RequireZFS(t)
	work := t.TempDir()
	var lines []string
	o := BackupOptions{
		Size: 64 << 20, Versions: 3, Churn: 0.04, Seed: 3,
		Compressions: []string{"zstd-fastest"}, Splitters: []string{"FIXED-128K"},
		WorkDir: work, Progress: func(s string) { lines = append(lines, s) },
	}
	tab, restored, err := runBackupZFS(t, o)
	if err != nil {
		t.Fatalf("%v\nprogress:\n%s", err, strings.Join(lines, "\n"))
	}
	if len(restored) != 2 {
		t.Errorf("last snapshots restored from %v, want both repositories", restored)
	}
	if len(tab.Rows) != 2*3 {
		t.Fatalf("%d rows, want 6", len(tab.Rows))
	}
	col := map[string]int{}
	for i, c := range tab.Columns {
		col[c] = i
	}
	val := func(row []Cell, c string) float64 {
		v, ok := row[col[c]].Value.(float64)
		if !ok {
			t.Fatalf("column %q: %v is not a number", c, row[col[c]].Value)
		}
		return v
	}
	// Rows: per splitter, the full mode's nights, then the stream mode's.
	for i, row := range tab.Rows {
		sp, mode, night := row[col["splitter"]].Text, row[col["mode"]].Text, row[col["night"]].Value.(int64)
		full := tab.Rows[i]
		if mode == modeStream {
			full = tab.Rows[i-3]
		}
		if night == 1 {
			if r := val(row, "read MiB"); r != 64 {
				t.Errorf("%s %s night 1 read %v MiB, want all 64", sp, mode, r)
			}
			continue
		}
		write, changed := val(row, "DRR_WRITE MiB"), val(row, "changed MiB")
		if write < changed || changed < 0.04*64 {
			t.Errorf("%s night %d: DRR_WRITE %v MiB, changed %v MiB", sp, night, write, changed)
		}
		switch {
		case mode == modeFull:
			if r := val(row, "read MiB"); r != 64 {
				t.Errorf("%s full night %d read %v MiB, want all 64", sp, night, r)
			}
		default:
			read := val(row, "read MiB")
			if way := row[col["way"]].Text; way != kopiarepo.WayStream {
				t.Errorf("FIXED-128K stream night %d: the image went %s", night, way)
			}
			if read > 1.1*write || read > val(full, "read MiB")/3 {
				t.Errorf("FIXED-128K stream night %d read %v MiB: want at most 1.1× the %v MiB DRR_WRITE, far less than the full %v MiB", night, read, write, val(full, "read MiB"))
			}
			if g, fg := val(row, "growth MiB"), val(full, "growth MiB"); g > fg*1.05+0.1 {
				t.Errorf("FIXED-128K stream night %d grew %v MiB, the full upload %v MiB", night, g, fg)
			}
			if _, ok := row[col["full/stream"]].Value.(float64); !ok {
				t.Errorf("FIXED-128K stream night %d: no speed ratio: %v", night, row[col["full/stream"]].Value)
			}
		}
	}
	notes := strings.Join(tab.Notes, "\n")
	for _, want := range []string{
		"zstd-fastest × FIXED-128K, mean of nights 2-3: stream path",
		"× the stream's DRR_WRITE bytes",
	} {
		if !strings.Contains(notes, want) {
			t.Errorf("notes lack %q:\n%s", want, notes)
		}
	}
	if left := benchPoolsLeft(t); len(left) > 0 {
		t.Errorf("pools left: %v", left)
	}
	if left, _ := os.ReadDir(work); len(left) != 0 {
		t.Errorf("work directory not cleaned up: %v", left)
	}
}

// Cancelled in the middle of night 2's upload, the bench returns the
// cancellation and still destroys its pool and removes its files.
func TestBackupZFSCancelled(t *testing.T) {
	testenv.RequireZFS(t)
	work := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, _, err := BackupZFS(ctx, BackupOptions{
		Size: 8 << 20, Versions: 3, Churn: 0.04, Seed: 1,
		Compressions: []string{"none"}, Splitters: []string{"FIXED-128K"}, WorkDir: work,
		Progress: func(s string) {
			if strings.HasPrefix(s, "night 2/3: stream upload into") {
				cancel()
			}
		},
	})
	if !errors.Is(err, context.Canceled) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("got %v, want one line wrapping context.Canceled", err)
	}
	t.Log(err)
	if left := benchPoolsLeft(t); len(left) > 0 {
		t.Errorf("pools left: %v", left)
	}
	if left, _ := os.ReadDir(work); len(left) != 0 {
		t.Errorf("work directory not cleaned up: %v", left)
	}
}

// Through the drive model: the same nights, once per preset, each
// configuration with its own repositories; the modelled link is slower,
// and what the repositories hold is the same.
func TestBackupZFSThroughDriveModel(t *testing.T) {
	testenv.RequireZFS(t)
	o := BackupOptions{
		Size: 16 << 20, Versions: 2, Churn: 0.04, Seed: 5,
		Compressions: []string{"zstd-fastest"}, Splitters: []string{"FIXED-128K"}, Presets: []string{"none", "drive"},
		WorkDir: t.TempDir(),
	}
	tab, restored, err := runBackupZFS(t, o)
	if err != nil {
		t.Fatal(err)
	}
	if len(tab.Rows) != 2*2*2 {
		t.Fatalf("%d rows, want 8 (2 presets × 2 modes × 2 nights)", len(tab.Rows))
	}
	col := map[string]int{}
	for i, c := range tab.Columns {
		col[c] = i
	}
	took := map[string]float64{}
	for _, row := range tab.Rows {
		preset := row[col["preset"]].Text
		if preset != "none" && preset != "drive" {
			t.Errorf("preset column %q", preset)
		}
		if row[col["night"]].Value.(int64) == 2 && row[col["mode"]].Text == modeStream {
			took[preset] = row[col["upload s"]].Value.(float64)
			if way := row[col["way"]].Text; way != kopiarepo.WayStream {
				t.Errorf("%s: night 2 went %s, want stream", preset, way)
			}
		}
	}
	// A night's upload makes dozens of requests, each 150 ms under drive.
	if took["drive"] <= took["none"] {
		t.Errorf("stream upload of night 2: %.2f s through the drive model, %.2f s without; want slower", took["drive"], took["none"])
	}
	if len(restored) != 4 {
		t.Errorf("restored from %v, want both modes under both presets", restored)
	}
	if !strings.Contains(strings.Join(tab.Notes, "\n"), "zstd-fastest × FIXED-128K via drive, mean of nights 2-2") {
		t.Errorf("notes do not name the drive configuration:\n%s", strings.Join(tab.Notes, "\n"))
	}
}

// runBackupZFS runs the bench, logs its table and checks its restores
// (checkLastRestores).
func runBackupZFS(t *testing.T, o BackupOptions) (*Table, map[string]bool, error) {
	var restored map[string]bool
	o.zfsAfterRun = func(ctx context.Context, b *zfsBench) (err error) {
		restored, err = checkLastRestores(t, ctx, b)
		return err
	}
	tab, _, err := BackupZFS(context.Background(), o)
	if err != nil {
		return nil, nil, err
	}
	var text strings.Builder
	tab.WriteText(&text)
	t.Logf("\n%s", text.String())
	return tab, restored, nil
}

// checkLastRestores checks that every repository's last snapshot restores
// the image equal to the newest ZFS snapshot's, and says which it read
// ("preset mode").
func checkLastRestores(t *testing.T, ctx context.Context, b *zfsBench) (map[string]bool, error) {
	f, err := os.Open(filepath.Join(b.view.Root, zfsBenchFile))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	want := fileDigest(t, f)
	restored := map[string]bool{}
	for _, c := range b.configs {
		for _, r := range []*zfsRepo{c.full, c.stream} {
			kf, err := r.r.OpenFile(ctx, r.lastID, zfsBenchFile)
			if err != nil {
				return nil, fmt.Errorf("%s %s: %w", c.name(), r.mode, err)
			}
			if got := fileDigest(t, kf); got != want {
				t.Errorf("%s, %s repository: the last snapshot's %s restores as %s, the ZFS snapshot's is %s", c.name(), r.mode, zfsBenchFile, got, want)
			}
			kf.Close()
			restored[c.preset+" "+r.mode] = true
		}
	}
	return restored, nil
}

func TestBackupZFSErrors(t *testing.T) {
	for _, c := range []struct {
		o    BackupOptions
		want string
	}{
		{BackupOptions{Data: []string{"/x"}}, "--data does not apply"},
		{BackupOptions{Size: 8 << 20, Versions: 0, Churn: 0.04}, "bench backup --zfs: --versions 0 is out of range"},
		{BackupOptions{Size: 8 << 20, Versions: 2, Churn: 0.04, Splitters: []string{"FIXED-3K"}}, `unknown splitter "FIXED-3K"`},
		{BackupOptions{Size: 8 << 20, Versions: 2, Churn: 0.04, Presets: []string{"gdrive"}}, `bench backup --zfs: --preset "gdrive"`},
	} {
		_, _, err := BackupZFS(context.Background(), c.o)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.o, err, c.want)
		}
	}
	// No zpool on PATH: one line that says what to install.
	t.Setenv("PATH", t.TempDir())
	_, _, err := BackupZFS(context.Background(), BackupOptions{Size: 8 << 20, Versions: 2, Churn: 0.04, WorkDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "zpool is not installed") || strings.Contains(err.Error(), "\n") {
		t.Errorf("without zpool: %v", err)
	}
}
