package kopiarepo_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/kopiarepo"
)

// BenchmarkUploadVsKopiaCLI measures, side by side in one run, the upload
// throughput of kopiarepo.Upload and of "kopia snapshot create" (the kopia
// CLI built from the module vmhistory links) on the same ~1 GiB of
// generated VM-like data: disk images and a saved VM state made of 64 KiB
// blocks that are zero, random or text-like.
//
//	go test -run '^$' -bench UploadVsKopiaCLI ./kopiarepo/
//
// Each round uploads the data once with each, into a fresh filesystem
// repository each (first upload, nothing to deduplicate against), the
// order alternating between rounds, after one uncounted warm-up round.
// Both run as processes of their own (vmhistory's side is this test
// binary running TestUploadHelperProcess), timed from start to exit:
// opening the repository, the upload, automatic maintenance and closing,
// as in a nightly run. It reports MB/s (10^6 bytes/s of source data) for
// both and their ratio over all counted rounds.
//
// Environment: VMHISTORY_BENCH_MB (data size, default 1024),
// VMHISTORY_BENCH_ROUNDS (default 3), VMHISTORY_BENCH_COMPRESSION (a kopia
// compression set in the global policy of both repositories; default none,
// kopia's default), VMHISTORY_KOPIA_CLI (a prebuilt kopia CLI).
func BenchmarkUploadVsKopiaCLI(b *testing.B) {
	sizeMB := envInt(b, "VMHISTORY_BENCH_MB", 1024)
	rounds := envInt(b, "VMHISTORY_BENCH_ROUNDS", 3)
	comp := os.Getenv("VMHISTORY_BENCH_COMPRESSION")
	bin, err := kopiaCLI()
	if err != nil {
		b.Fatal(err)
	}
	data := b.TempDir()
	total := writeBenchData(b, data, int64(sizeMB)<<20)
	// The generated data stays in the page cache (a few GiB of RAM are
	// assumed); what was written goes to disk now, not during a timing.
	syscall.Sync()
	readAll(b, data)
	b.Logf("data: %d bytes in %s; %d rounds; compression %q", total, data, rounds, orNone(comp))

	var oursTime, cliTime time.Duration
	b.ResetTimer()
	for range b.N {
		// Round -1 warms the machine up (page cache, disk, both
		// binaries) and is not counted: whichever upload ran first was
		// consistently slower, for either program.
		for round := -1; round < rounds; round++ {
			var oursRound, cliRound time.Duration
			runOurs := func() {
				configFile := benchRepo(b, bin, comp)
				// A process of its own, like the kopia CLI and like the
				// nightly vmhistory backup: both start cold.
				cmd := exec.Command(os.Args[0], "-test.run=^TestUploadHelperProcess$", "-test.v")
				cmd.Env = append(os.Environ(), "VMHISTORY_UPLOAD_CONFIG="+configFile, "VMHISTORY_UPLOAD_DIR="+data)
				var out bytes.Buffer
				cmd.Stdout, cmd.Stderr = &out, &out
				start := time.Now()
				if err := cmd.Run(); err != nil {
					b.Fatalf("upload helper: %v\n%s", err, out.String())
				}
				d := time.Since(start)
				if round >= 0 {
					oursTime += d
				}
				oursRound = d
				if !strings.Contains(out.String(), fmt.Sprintf("hashed %d bytes", total)) {
					b.Fatalf("upload helper did not hash all the data:\n%s", out.String())
				}
				os.RemoveAll(filepath.Dir(configFile))
				syscall.Sync()
			}
			runCLI := func() {
				configFile := benchRepo(b, bin, comp)
				cmd := exec.Command(bin, kopiaArgs(b, configFile, "snapshot", "create", data)...)
				cmd.Env = kopiaEnv()
				var out bytes.Buffer
				cmd.Stdout, cmd.Stderr = &out, &out
				start := time.Now()
				if err := cmd.Run(); err != nil {
					b.Fatalf("kopia snapshot create: %v\n%s", err, out.String())
				}
				d := time.Since(start)
				if round >= 0 {
					cliTime += d
				}
				cliRound = d
				os.RemoveAll(filepath.Dir(configFile))
				syscall.Sync()
			}
			if (round+2)%2 == 0 {
				runOurs()
				runCLI()
			} else {
				runCLI()
				runOurs()
			}
			label := fmt.Sprint("round ", round)
			if round < 0 {
				label = "warm-up (not counted)"
			}
			b.Logf("%s: vmhistory %v %.0f MB/s, kopia CLI %v %.0f MB/s", label,
				oursRound.Round(time.Millisecond), mbps(total, oursRound), cliRound.Round(time.Millisecond), mbps(total, cliRound))
		}
	}
	b.StopTimer()
	n := int64(rounds * b.N)
	ours, cli := mbps(total*n, oursTime), mbps(total*n, cliTime)
	b.ReportMetric(ours, "vmhistory-MB/s")
	b.ReportMetric(cli, "kopia-cli-MB/s")
	b.ReportMetric(ours/cli, "ratio")
	b.Logf("upload throughput over %d rounds: vmhistory %.0f MB/s, kopia CLI %.0f MB/s, ratio %.2f", n, ours, cli, ours/cli)
}

// TestUploadHelperProcess is BenchmarkUploadVsKopiaCLI's vmhistory side:
// with VMHISTORY_UPLOAD_CONFIG and VMHISTORY_UPLOAD_DIR set it opens the repository,
// uploads DIR and closes it, in a process of its own; otherwise it does
// nothing.
func TestUploadHelperProcess(t *testing.T) {
	configFile, dir := os.Getenv("VMHISTORY_UPLOAD_CONFIG"), os.Getenv("VMHISTORY_UPLOAD_DIR")
	if configFile == "" || dir == "" {
		return
	}
	ctx := context.Background()
	r, err := kopiarepo.Open(ctx, configFile, testPassword)
	if err != nil {
		t.Fatal(err)
	}
	res, err := r.Upload(ctx, kopiarepo.UploadRequest{Dir: dir, SourcePath: dir, StartTime: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Close(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("hashed %d bytes, uploaded %d bytes in %v, maintenance %q", res.Progress.HashedBytes, res.Progress.UploadedBytes, res.Duration, res.Maintenance.Mode)
}

// benchRepo creates a fresh repository in its own temp dir (config,
// cache and blobs) and returns its config file.
func benchRepo(b *testing.B, bin, comp string) string {
	b.Helper()
	dir, err := os.MkdirTemp("", "vmhistory-bench-repo-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	configFile := filepath.Join(dir, "kopia.config")
	opts := kopiarepo.CreateOptions{ConnectOptions: kopiarepo.ConnectOptions{Host: testHost, User: testUser, CacheDirectory: filepath.Join(dir, "cache")}}
	if err := kopiarepo.Create(context.Background(), kopiarepo.Filesystem{Path: filepath.Join(dir, "repo")}, configFile, testPassword, opts); err != nil {
		b.Fatal(err)
	}
	if comp != "" {
		cmd := exec.Command(bin, kopiaArgs(b, configFile, "policy", "set", "--global", "--compression="+comp)...)
		cmd.Env = kopiaEnv()
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("kopia policy set: %v\n%s", err, out)
		}
	}
	return configFile
}

// writeBenchData writes about size bytes of VM-like data: two disk images
// (5/8 and 1/4 of it), a saved VM state (1/8) and the VM definitions.
func writeBenchData(b *testing.B, dir string, size int64) int64 {
	b.Helper()
	for _, d := range []string{"images", "qemu/save"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			b.Fatal(err)
		}
	}
	files := []struct {
		name string
		size int64
	}{
		{"images/web.raw", size * 5 / 8},
		{"images/db.qcow2", size / 4},
		{"qemu/save/web.save", size / 8},
	}
	var total int64
	for i, f := range files {
		writeVMImage(b, filepath.Join(dir, f.name), f.size, uint64(100+i))
		total += f.size
	}
	for _, vm := range []string{"web", "db"} {
		xml := fmt.Sprintf("<domain type='kvm'><name>%s</name></domain>\n", vm)
		if err := os.WriteFile(filepath.Join(dir, "qemu", vm+".xml"), []byte(xml), 0o644); err != nil {
			b.Fatal(err)
		}
		total += int64(len(xml))
	}
	return total
}

// readAll reads every file under dir once, so that the first timing does
// not pay for bringing the data into the page cache.
func readAll(b *testing.B, dir string) {
	b.Helper()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(io.Discard, f)
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
}

func mbps(bytes int64, d time.Duration) float64 { return float64(bytes) / d.Seconds() / 1e6 }

func envInt(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
