package restore_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/restore"
)

// resumeHelperEnv carries a resumeJob to the child process of
// TestKopiaResumeAfterKill; without it TestKopiaResumeHelperProcess does
// nothing.
const resumeHelperEnv = "VMHISTORY_RESUME_HELPER"

// resumeJob is one restore of the kopia resume test.
type resumeJob struct {
	Config   string `json:"config"`   // a drive-model config of the repository
	Model    string `json:"model"`    // the shared model it names
	Password string `json:"password"` // the repository's
	Dest     string `json:"dest"`
	// Window is the prefetch window (0: the default).
	Window int `json:"window,omitempty"`
}

const (
	resumeFile = "disk.img"
	resumeSize = 64<<20 + 4321
)

// resumeImage writes a VM-like image of resumeSize bytes under dir: random
// data with a zero region (free space) and a few isolated blocks in it.
func resumeImage(t *testing.T, dir string) string {
	t.Helper()
	rng := rand.New(rand.NewPCG(24, 60))
	b := make([]byte, resumeSize)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	clear(b[14<<20 : 18<<20])
	for i := 0; i < 8; i++ {
		off := 14<<20 + i*(512<<10)
		for j := off; j < off+4096; j++ {
			b[j] = byte(rng.Uint32() | 1)
		}
	}
	name := filepath.Join(dir, resumeFile)
	if err := os.WriteFile(name, b, 0o640); err != nil {
		t.Fatal(err)
	}
	mtime := time.Date(2023, 3, 4, 4, 0, 0, 0, time.UTC)
	if err := os.Chtimes(name, mtime, mtime); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	t.Logf("image: %d bytes, sha256 %s", len(b), hex.EncodeToString(sum[:]))
	return hex.EncodeToString(sum[:])
}

// runResumeJob restores resumeFile of the repository's only snapshot
// through the job's drive-model config, calling progress as it goes.
func runResumeJob(ctx context.Context, job resumeJob, progress func(restore.Progress)) (restore.CopyResult, error) {
	repo, err := kopiarepo.Open(ctx, job.Config, job.Password)
	if err != nil {
		return restore.CopyResult{}, err
	}
	defer repo.Close(context.Background())
	src := restore.NewKopiaSource(repo, "kvmhost", "root")
	src.Prefetch.Window = job.Window
	snaps, err := src.Snapshots(ctx)
	if err != nil {
		return restore.CopyResult{}, err
	}
	if len(snaps) != 1 {
		return restore.CopyResult{}, fmt.Errorf("%d kopia snapshots, want 1", len(snaps))
	}
	tree, err := src.Open(ctx, snaps[0])
	if err != nil {
		return restore.CopyResult{}, err
	}
	defer tree.Close()
	fi, err := tree.Stat(ctx, resumeFile)
	if err != nil {
		return restore.CopyResult{}, err
	}
	f, err := tree.OpenFile(ctx, resumeFile)
	if err != nil {
		return restore.CopyResult{}, err
	}
	defer f.Close()
	return restore.Copy(ctx, f, job.Dest, restore.CopyOptions{
		Identity:         restore.SourceIdentity{Snapshot: strconv.FormatUint(snaps[0].GUID, 10), Path: resumeFile, ModTime: fi.ModTime},
		Parallel:         4,
		RangeSize:        1 << 20,
		Mode:             fi.Mode,
		ModTime:          fi.ModTime,
		Progress:         progress,
		ProgressInterval: 20 * time.Millisecond,
		CommitInterval:   100 * time.Millisecond,
	})
}

// TestKopiaResumeHelperProcess is the child of TestKopiaResumeAfterKill: it
// restores the file through a slow drive model, printing progress lines
// "progress DONE TOTAL FETCHED", until the parent kills it.
func TestKopiaResumeHelperProcess(t *testing.T) {
	spec := os.Getenv(resumeHelperEnv)
	if spec == "" {
		return // not the child: nothing to do
	}
	var job resumeJob
	if err := json.Unmarshal([]byte(spec), &job); err != nil {
		t.Fatal(err)
	}
	model := drivemodel.Shared(job.Model)
	_, err := runResumeJob(context.Background(), job, func(p restore.Progress) {
		fmt.Printf("progress %d %d %d\n", p.Done, p.Total, model.Stats().BytesFetched)
	})
	fmt.Printf("finished %v\n", err)
}

// TestKopiaResumeAfterKill: a restore from a kopia filesystem repository,
// read through the drive model, is killed with SIGKILL halfway; the rerun
// completes with identical bytes and fetches less than 60% of the file at
// the blob layer.
//
// "Halfway" is 60% reported by the child: its journal trails what it has
// fetched by up to a commit interval (more under -race on a loaded
// machine), so about half is durable when the kill lands.
//
// The file is 64 MiB in kopia's default DYNAMIC-4M-BUZHASH chunks: a rerun
// fetches whole chunks around the ranges it misses, and Copy turns the
// reader's read-ahead off on a resume so it does not run on into ranges
// the journal already has.
// uploadResumeImage makes a kopia filesystem repository in dir holding one
// snapshot of resumeImage cut by splitter, and returns its config file and
// the image's sha256.
func uploadResumeImage(t *testing.T, dir, splitter string) (cfg, sha string) {
	t.Helper()
	ctx := context.Background()
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o755); err != nil {
		t.Fatal(err)
	}
	sha = resumeImage(t, data)
	cfg = filepath.Join(dir, "kopia.config")
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(dir, "repo")}, cfg, tlPassword, kopiarepo.CreateOptions{
		ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	repo, err := kopiarepo.Open(ctx, cfg, tlPassword)
	if err != nil {
		t.Fatal(err)
	}
	res, err := repo.Upload(ctx, kopiarepo.UploadRequest{
		Dir: data, SourcePath: "/DATA/libvirt", Host: "kvmhost", User: "root",
		StartTime: time.Date(2023, 3, 4, 5, 0, 1, 0, time.UTC),
		Tags: map[string]string{
			kopiarepo.TagDataset:  "DATA/libvirt",
			kopiarepo.TagSnapshot: "2023-03-04_05:00:01",
			kopiarepo.TagGUID:     "1234567890123",
		},
		Splitter:        splitter,
		SkipMaintenance: true,
	})
	repo.Close(ctx)
	if err != nil || res.Snapshot.ID == "" {
		t.Fatalf("upload: %v (%+v)", err, res)
	}
	return cfg, sha
}

func TestKopiaResumeAfterKill(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	cfg, want := uploadResumeImage(t, dir, "DYNAMIC-4M-BUZHASH")

	out := filepath.Join(dir, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	dest := filepath.Join(out, resumeFile)

	// The child reads through a slow drive (a few seconds for the file),
	// with a cold cache of its own.
	slow := drivemodel.Params{Latency: 20 * time.Millisecond, StreamBytesPerSecond: 2 << 20, TotalBytesPerSecond: 16 << 20}
	childCfg := filepath.Join(dir, "child.config")
	if err := drivemodel.WriteConfig(cfg, childCfg, drivemodel.ConfigOptions{Params: &slow, Model: "resume-child",
		CacheDirectory: filepath.Join(dir, "child-cache")}); err != nil {
		t.Fatal(err)
	}
	job, err := json.Marshal(resumeJob{Config: childCfg, Model: "resume-child", Password: tlPassword, Dest: dest, Window: 2})
	if err != nil {
		t.Fatal(err)
	}
	killAt := killChildHalfway(t, string(job))

	for _, suffix := range []string{restore.PartialSuffix, restore.JournalSuffix} {
		if _, err := os.Stat(dest + suffix); err != nil {
			t.Fatalf("the killed restore left no %s: %v", suffix, err)
		}
	}
	if _, err := os.Stat(dest); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the killed restore left something under the final name: %v", err)
	}

	// The rerun: this process, a fresh cold cache, the model's counters
	// from zero (the repository's open included).
	rerunCfg := filepath.Join(dir, "rerun.config")
	if err := drivemodel.WriteConfig(cfg, rerunCfg, drivemodel.ConfigOptions{Preset: "none", Model: "resume-rerun",
		CacheDirectory: filepath.Join(dir, "rerun-cache")}); err != nil {
		t.Fatal(err)
	}
	model := drivemodel.Shared("resume-rerun")
	model.Reset()
	cres, err := runResumeJob(ctx, resumeJob{Config: rerunCfg, Model: "resume-rerun", Password: tlPassword, Dest: dest}, nil)
	if err != nil {
		t.Fatalf("rerun: %v", err)
	}
	fetched := model.Stats().BytesFetched
	frac := float64(fetched) / float64(resumeSize)
	t.Logf("killed at %s; rerun: resumed %d, copied %d, blob bytes fetched %d of %d (%.1f%%), %d gets",
		killAt, cres.Resumed, cres.Fetched, fetched, int64(resumeSize), 100*frac, model.Stats().Gets)
	if got := fileSHA(t, dest); got != want || cres.SHA256 != want {
		t.Fatalf("resumed restore: file sha256 %s, result %s, want %s", got, cres.SHA256, want)
	}
	if cres.Resumed == 0 || cres.Restarted != "" {
		t.Errorf("the rerun did not resume: resumed %d, restarted %q", cres.Resumed, cres.Restarted)
	}
	if frac >= 0.6 {
		t.Errorf("the rerun fetched %d bytes at the blob layer, %.1f%% of the file: want < 60%%", fetched, 100*frac)
	}
	assertNoLeftovers(t, dest)
}

// killChildHalfway runs TestKopiaResumeHelperProcess in a child process
// with job and kills it with SIGKILL once it reports half the file done.
// It returns the child's last progress line.
func killChildHalfway(t *testing.T, job string) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestKopiaResumeHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), resumeHelperEnv+"="+job)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(2*time.Minute, func() { cmd.Process.Kill() })
	defer timer.Stop()
	var last string
	killed := false
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		if len(f) >= 1 && f[0] == "finished" {
			t.Fatalf("the child finished before it was killed: %s (last progress %q)", line, last)
		}
		if len(f) != 4 || f[0] != "progress" {
			continue
		}
		last = line
		done, _ := strconv.ParseInt(f[1], 10, 64)
		total, _ := strconv.ParseInt(f[2], 10, 64)
		if !killed && total > 0 && done*10 >= total*6 {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			killed = true
		}
	}
	err = cmd.Wait()
	if !killed {
		t.Fatalf("the child exited (%v) before it reported 60%% of the file (last %q)", err, last)
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("the child ended with %v, not SIGKILL", err)
	}
	return last
}
