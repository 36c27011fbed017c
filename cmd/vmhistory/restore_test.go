package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

// restoreSandbox is a zfs-fuse dataset with one snapshot holding
// images/vm.img, replicated to a second dataset, and a configuration
// naming both.
type restoreSandbox struct {
	config string
	image  []byte
	snap   string
}

func newRestoreSandbox(t *testing.T) *restoreSandbox {
	t.Helper()
	ctx := context.Background()
	pool := testenv.NewPool(t, 256)
	ds, mnt := pool.Dataset(t, "libvirt")
	if err := os.MkdirAll(filepath.Join(mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	image := make([]byte, 12<<20+777)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 3<<20; i++ { // data, then zeros
		image[i] = byte(rng.Uint32())
	}
	for i := 9 << 20; i < len(image); i++ {
		image[i] = byte(rng.Uint32())
	}
	if err := os.WriteFile(filepath.Join(mnt, "images", "vm.img"), image, 0o640); err != nil {
		t.Fatal(err)
	}
	snap, err := pool.ZFS.CreateSnapshot(ctx, ds, "2023-03-04_05:00:01", nil)
	if err != nil {
		t.Fatal(err)
	}
	// The VM writes on after the snapshot.
	if err := os.WriteFile(filepath.Join(mnt, "images", "vm.img"), []byte("changed"), 0o640); err != nil {
		t.Fatal(err)
	}
	replica := pool.Name + "/replica"
	if _, err := zfs.Transfer(ctx, pool.ZFS, zfs.SendOptions{Snapshot: snap.FullName()}, pool.ZFS, replica, zfs.ReceiveOptions{}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := fmt.Sprintf("datasets: [%s]\nreplica: {target: %s}\nstate_dir: %s\n", ds, replica, dir)
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return &restoreSandbox{config: path, image: image, snap: snap.FullName()}
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestRestoreCommand(t *testing.T) {
	sb := newRestoreSandbox(t)
	out := t.TempDir()

	// Into a directory, verified against the replica, as JSON.
	stdout, stderr, err := runConfigCmd(t, "restore", "latest:images/vm.img", out, "--verify", "--json", "--config", sb.config)
	if err != nil {
		t.Fatalf("restore: %v\n%s", err, stderr)
	}
	var sum restoreSummary
	if err := json.Unmarshal([]byte(stdout), &sum); err != nil {
		t.Fatalf("restore --json: %v\n%s", err, stdout)
	}
	dest := filepath.Join(out, "vm.img")
	got, err := os.ReadFile(dest)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, sb.image) || sum.SHA256 != sha(sb.image) {
		t.Fatalf("restored %d bytes (sha256 %s), want the snapshot's %d (%s)", len(got), sum.SHA256, len(sb.image), sha(sb.image))
	}
	if !sum.Verified || sum.VerifiedWith != "replica" || sum.Snapshot != sb.snap || sum.Path != "images/vm.img" || sum.Dest != dest {
		t.Errorf("summary %+v", sum)
	}
	if len(sum.Sources) == 0 || sum.Sources[0].Source != "local" || sum.Sources[0].Bytes != int64(len(sb.image)) {
		t.Errorf("bytes by source: %+v", sum.Sources)
	}
	if fi, _ := os.Stat(dest); fi.Mode().Perm() != 0o640 {
		t.Errorf("restored mode %v, want 0640", fi.Mode())
	}
	t.Logf("stdout:\n%s\nstderr:\n%s", stdout, stderr)

	// The text summary, to a file name.
	stdout, stderr, err = runConfigCmd(t, "restore", "2023-03-04:images/vm.img", filepath.Join(out, "again.img"), "--config", sb.config)
	if err != nil {
		t.Fatalf("restore: %v\n%s", err, stderr)
	}
	for _, want := range []string{"Restored " + sb.snap + ":images/vm.img to ", "sha256: " + sha(sb.image), "read from: local 12 MiB", "sparse: 6.0 MiB of zeros"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("summary lacks %q:\n%s", want, stdout)
		}
	}
	if stderr != "" {
		t.Errorf("stderr of a restore that is not on a terminal: %q", stderr)
	}
	stdout, stderr, err = runConfigCmd(t, "restore", "--no-sha256", "2023-03-04:images/vm.img", filepath.Join(out, "nohash.img"), "--config", sb.config)
	if err != nil {
		t.Fatalf("restore --no-sha256: %v\n%s", err, stderr)
	}
	if got, _ := os.ReadFile(filepath.Join(out, "nohash.img")); !bytes.Equal(got, sb.image) || !strings.Contains(stdout, "sha256: not computed (--no-sha256)") {
		t.Errorf("restore --no-sha256: %d bytes (want %d), summary:\n%s", len(got), len(sb.image), stdout)
	}

	// User errors: one line, non-zero, nothing under the final name.
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"existing", []string{"latest:images/vm.img", dest}, "already exists (--force replaces it)"},
		{"existing in dir", []string{"latest:images/vm.img", out}, "already exists"},
		{"dest dir missing", []string{"latest:images/vm.img", filepath.Join(out, "no", "vm.img")}, "does not exist"},
		{"bad spec", []string{"1999-01-01:images/vm.img", filepath.Join(out, "x.img")}, "1999-01-01"},
		{"missing path", []string{"latest:images/none.img", filepath.Join(out, "y.img")}, "images/none.img"},
		{"escaping path", []string{"latest:../../etc/passwd", filepath.Join(out, "z.img")}, "leaves the snapshot"},
		{"directory", []string{"latest:images", filepath.Join(out, "d.img")}, "is a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, err := runConfigCmd(t, append(append([]string{"restore"}, tc.args...), "--config", sb.config)...)
			if err == nil {
				t.Fatalf("restore %v succeeded", tc.args)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.want) || strings.Contains(msg, "\n") {
				t.Errorf("error %q, want one line with %q", msg, tc.want)
			}
			t.Logf("%s (stderr %q)", msg, stderr)
			last := tc.args[len(tc.args)-1]
			if last != dest && last != out {
				if _, err := os.Stat(last); err == nil {
					t.Errorf("%s was created", last)
				}
			}
			matches, _ := filepath.Glob(filepath.Join(out, "*.vmhistory-*"))
			if len(matches) > 0 {
				t.Errorf("left behind: %v", matches)
			}
		})
	}
	if b, _ := os.ReadFile(dest); !bytes.Equal(b, sb.image) {
		t.Error("a refused restore changed the existing file")
	}
	if _, stderr, err := runConfigCmd(t, "restore", "latest:images/vm.img", dest, "--force", "--parallel", "3", "--range-size", "64KiB", "--config", sb.config); err != nil {
		t.Errorf("restore --force: %v\n%s", err, stderr)
	}
}

// A restore whose stderr is not a terminal prints a progress line every
// restoreLineInterval, ending with the whole file; one shorter than that
// prints none (TestRestoreCommand).
func TestRestoreProgressLinesOffTerminal(t *testing.T) {
	sb := newRestoreSandbox(t)
	defer func(d time.Duration) { restoreLineInterval = d }(restoreLineInterval)
	restoreLineInterval = time.Millisecond
	_, stderr, err := runConfigCmd(t, "restore", "latest:images/vm.img", filepath.Join(t.TempDir(), "vm.img"),
		"--parallel", "1", "--range-size", "64KiB", "--verify", "--config", sb.config)
	if err != nil {
		t.Fatalf("restore: %v\n%s", err, stderr)
	}
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	var restoring, verifying int
	for _, l := range lines {
		switch {
		case strings.HasPrefix(l, "vmhistory: restore vm.img: "):
			restoring++
		case strings.HasPrefix(l, "vmhistory: verify vm.img: "):
			verifying++
		default:
			t.Errorf("unexpected stderr line %q", l)
		}
	}
	if restoring == 0 || verifying == 0 {
		t.Errorf("progress lines: %d restoring, %d verifying:\n%s", restoring, verifying, stderr)
	}
	if !strings.Contains(stderr, "vmhistory: restore vm.img: 12 MiB of 12 MiB (100%)") {
		t.Errorf("no line for the finished file:\n%s", stderr)
	}
}

// Issue 11, finding 1, as the new user did it: DEST/vm.img.vmhistory-journal
// and DEST/vm.img.vmhistory-partial planted as symbolic links to other
// files, then "vmhistory restore latest:images/vm.img DEST/" as root. The
// restore must refuse, naming the link, and leave both targets exactly as
// they were (bytes, mode, mtime); DEST itself a symbolic link to a
// directory is fine.
func TestRestoreRefusesPlantedSymlinks(t *testing.T) {
	sb := newRestoreSandbox(t)
	realDest := t.TempDir()
	dest := filepath.Join(t.TempDir(), "DEST")
	if err := os.Symlink(realDest, dest); err != nil {
		t.Fatal(err)
	}
	elsewhere := t.TempDir()
	mtime := time.Date(2021, 6, 7, 8, 9, 10, 0, time.UTC)
	type victim struct {
		path string
		data []byte
	}
	var victims []victim
	for _, suffix := range []string{".vmhistory-journal", ".vmhistory-partial"} {
		v := victim{path: filepath.Join(elsewhere, "target"+suffix), data: []byte("someone else's file" + suffix + "\n")}
		if err := os.WriteFile(v.path, v.data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(v.path, 0o640); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(v.path, mtime, mtime); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(v.path, filepath.Join(realDest, "vm.img"+suffix)); err != nil {
			t.Fatal(err)
		}
		victims = append(victims, v)
	}
	_, stderr, err := runConfigCmd(t, "restore", "latest:images/vm.img", dest+"/", "--config", sb.config)
	if err == nil {
		t.Fatalf("restore through planted symlinks succeeded\n%s", stderr)
	}
	if msg := err.Error(); !strings.Contains(msg, "vm.img.vmhistory-") || !strings.Contains(msg, "symbolic link") || strings.Contains(msg, "\n") {
		t.Errorf("error %q, want one line naming the planted link", msg)
	}
	t.Logf("refused: %v", err)
	for _, v := range victims {
		got, err := os.ReadFile(v.path)
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := os.Stat(v.path)
		if !bytes.Equal(got, v.data) || fi.Mode() != 0o640 || !fi.ModTime().Equal(mtime) {
			t.Errorf("%s changed: %d bytes, mode %v, mtime %v", v.path, len(got), fi.Mode(), fi.ModTime())
		}
	}
	if _, err := os.Lstat(filepath.Join(realDest, "vm.img")); err == nil {
		t.Errorf("DEST/vm.img exists after the refusal")
	}
	// Links removed, the same command restores through the symlinked DEST.
	for _, suffix := range []string{".vmhistory-journal", ".vmhistory-partial"} {
		os.Remove(filepath.Join(realDest, "vm.img"+suffix))
	}
	if _, stderr, err := runConfigCmd(t, "restore", "latest:images/vm.img", dest+"/", "--config", sb.config); err != nil {
		t.Fatalf("restore: %v\n%s", err, stderr)
	}
	fi, err := os.Lstat(filepath.Join(realDest, "vm.img"))
	if err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("restored file: %v %v", fi, err)
	}
	if got, _ := os.ReadFile(filepath.Join(realDest, "vm.img")); !bytes.Equal(got, sb.image) {
		t.Error("restored file differs from the snapshot")
	}
}

// The restore's --json says how long the open took, each source and step
// in seconds, beside the fields it always had; total_seconds, the whole
// command, is at least the open and the copy; the text summary's time is
// the whole command's and it has a line for the open.
func TestRestoreReportsOpenTime(t *testing.T) {
	sb := newRestoreSandbox(t)
	out := t.TempDir()
	stdout, stderr, err := runConfigCmd(t, "restore", "latest:images/vm.img", out, "--verify", "--json", "--config", sb.config)
	if err != nil {
		t.Fatalf("restore: %v\n%s", err, stderr)
	}
	var sum map[string]any
	if err := json.Unmarshal([]byte(stdout), &sum); err != nil {
		t.Fatalf("%v\n%s", err, stdout)
	}
	// The fields scripts read, as before.
	for _, k := range []string{"snapshot", "guid", "path", "sources", "dest", "size", "fetched_bytes", "resumed_bytes", "written_bytes",
		"zero_bytes", "disk_bytes", "seconds", "bytes_per_second", "sha256", "verified", "verified_with", "range_size", "parallel", "peak_buffers"} {
		if _, ok := sum[k]; !ok {
			t.Errorf("--json lacks %q", k)
		}
	}
	open, ok := sum["open"].(map[string]any)
	if !ok {
		t.Fatalf("--json has no open object:\n%s", stdout)
	}
	num := func(m map[string]any, k string) float64 {
		t.Helper()
		v, ok := m[k].(float64)
		if !ok || v <= 0 {
			t.Errorf("%s = %v, want seconds as a positive number", k, m[k])
		}
		return v
	}
	openSec, timeline, file := num(open, "seconds"), num(open, "timeline_seconds"), num(open, "file_seconds")
	srcs, _ := open["sources"].([]any)
	var names []string
	slowest := 0.0
	for _, s := range srcs {
		m := s.(map[string]any)
		names = append(names, m["source"].(string))
		if _, ok := m["open_seconds"].(float64); !ok {
			t.Errorf("source %v without open_seconds", m)
		}
		slowest = max(slowest, m["open_seconds"].(float64))
		num(m, "list_seconds")
	}
	if strings.Join(names, ",") != "local,replica" {
		t.Errorf("open sources %v, want local,replica", names)
	}
	if openSec < slowest+timeline+file {
		t.Errorf("open %.4fs < slowest source %.4fs + timeline %.4fs + file %.4fs", openSec, slowest, timeline, file)
	}
	total, copySec := num(sum, "total_seconds"), num(sum, "seconds")
	if total < openSec+copySec {
		t.Errorf("total_seconds %.4f < open %.4f + copy %.4f", total, openSec, copySec)
	}
	if fb := num(sum, "first_byte_seconds"); fb < openSec || fb > total {
		t.Errorf("first_byte_seconds %.4f, want between the open %.4f and the total %.4f", fb, openSec, total)
	}
	t.Logf("open %v, total %.3fs, copy %.3fs", open, total, copySec)

	stdout, stderr, err = runConfigCmd(t, "restore", "latest:images/vm.img", filepath.Join(out, "again.img"), "--config", sb.config)
	if err != nil {
		t.Fatalf("restore: %v\n%s", err, stderr)
	}
	var totalText, copyText float64
	var line string
	for _, l := range strings.Split(stdout, "\n") {
		if strings.HasPrefix(l, "  12 MiB in ") {
			line = l
		}
	}
	if _, err := fmt.Sscanf(line, "  12 MiB in %fs (copy %fs,", &totalText, &copyText); err != nil || totalText < copyText {
		t.Errorf("size line %q (%v): want the whole time, then the copy's", line, err)
	}
	if !strings.Contains(stdout, "\n  opened in ") || !strings.Contains(stdout, ": local ") || !strings.Contains(stdout, ", timeline ") || !strings.Contains(stdout, ", file ") {
		t.Errorf("no open line in the summary:\n%s", stdout)
	}
	t.Logf("summary:\n%s", stdout)
}

// The summary's seed line names each seed with its bytes, the store's
// bytes, and every chunk that a seed failed to supply; --json carries the
// same counters.
func TestSeedLine(t *testing.T) {
	if line := seedLine(restore.SourceBytes{Source: "kopia", Bytes: 1 << 30, Fetched: 1 << 30}); line != "" {
		t.Errorf("nothing seeded: %q, want no line", line)
	}
	src := restore.SourceBytes{Source: "kopia", Kind: "kopia", Bytes: 2 << 30, Fetched: 97 << 20,
		Seeded:         map[string]int64{"local tank/vm@b": 1 << 30, "local tank/vm@a": 900 << 20},
		SeedMismatches: 2, SeedReadErrors: 3, SeedProbeMisses: 40}
	want := "seeded: 1.9 GiB of kopia's 2.0 GiB from local tank/vm@a (900 MiB), local tank/vm@b (1.0 GiB); fetched 97 MiB from the store; " +
		"2 seed chunks did not match their content ID (fetched instead); 3 seed chunks could not be read (fetched instead)"
	if got := seedLine(src); got != want {
		t.Errorf("seed line\n got %q\nwant %q", got, want)
	}
	js, err := json.Marshal(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"seeded_bytes":{"local tank/vm@a":943718400,"local tank/vm@b":1073741824}`, `"seed_mismatches":2`, `"seed_read_errors":3`, `"seed_probe_misses":40`, `"fetched_bytes":101711872`} {
		if !strings.Contains(string(js), key) {
			t.Errorf("--json %s lacks %s", js, key)
		}
	}
}
