// Package testenv starts the real services vmhistory's tests run against:
// zfs-fuse pools on sparse files and an OpenSSH server on 127.0.0.1. A
// missing service fails the test with the command that sets it up; it is
// never skipped, because a skipped test would hide exactly what it is for.
package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/zfs"
)

// PoolDir holds the sparse files behind test pools and their mountpoints.
const PoolDir = "/var/tmp/vmhistory-test"

// poolPrefix starts every test pool's name: vmht-<pid>-<n>. The pid tells a
// later run which pools belong to a test binary that is gone.
const poolPrefix = "vmht-"

const setupHint = "run `make test` (or scripts/setup-test-env.sh as root) to install and start the test services"

// Pool is a throwaway zfs-fuse pool on a sparse file.
type Pool struct {
	Name       string
	File       string
	Mountpoint string
	// ZFS runs zfs locally with a short timeout.
	ZFS *zfs.ZFS
}

var (
	poolCounter atomic.Int64
	sweepOnce   sync.Once
)

// NewPool creates a pool of sizeMiB (sparse; 64 is zfs-fuse's minimum) and
// destroys it when the test ends, passed or failed.
func NewPool(t testing.TB, sizeMiB int) *Pool {
	t.Helper()
	if sizeMiB < 64 {
		sizeMiB = 64
	}
	RequireZFS(t)
	sweepOnce.Do(func() { sweepStalePools(t) })

	name := fmt.Sprintf("%s%d-%d", poolPrefix, os.Getpid(), poolCounter.Add(1))
	p := &Pool{
		Name:       name,
		File:       filepath.Join(PoolDir, name+".img"),
		Mountpoint: filepath.Join(PoolDir, "mnt", name),
	}
	if err := os.MkdirAll(filepath.Dir(p.Mountpoint), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(p.File)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(sizeMiB) << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if out, err := command(2*time.Minute, "zpool", "create", "-m", p.Mountpoint, name, p.File); err != nil {
		os.Remove(p.File)
		t.Fatalf("create test pool %s: %v: %s\n%s", name, err, out, setupHint)
	}
	t.Cleanup(func() { destroyPool(t, p.Name, p.File, p.Mountpoint) })
	p.ZFS = zfs.New(&runner.Local{}, zfs.Options{CommandTimeout: time.Minute, StreamTimeout: 5 * time.Minute,
		CloneMountDir: filepath.Join(PoolDir, "clones")})
	return p
}

// Dataset creates pool/<rel> and returns its name and mountpoint.
func (p *Pool) Dataset(t testing.TB, rel string) (name, mountpoint string) {
	t.Helper()
	name = p.Name + "/" + rel
	if err := p.ZFS.CreateDataset(context.Background(), name, nil); err != nil {
		t.Fatal(err)
	}
	return name, filepath.Join(p.Mountpoint, rel)
}

// RequireZFS fails the test unless the zfs-fuse daemon answers.
func RequireZFS(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("zpool"); err != nil {
		t.Fatalf("zpool is not installed: %s", setupHint)
	}
	if out, err := command(30*time.Second, "zpool", "list", "-H", "-o", "name"); err != nil {
		t.Fatalf("the zfs daemon does not answer (zpool list: %v: %s): %s", err, out, setupHint)
	}
}

func destroyPool(t testing.TB, name, file, mountpoint string) {
	// A pool can stay busy after a test closed its files: on a loaded
	// machine (load 10 on 2 cores) zfs-fuse was seen refusing, -f too, for
	// 8 s and more with no process using the pool. Retry for up to 30 s.
	var lastErr error
	var lastOut string
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		out, err := command(time.Minute, "zpool", "destroy", name)
		if err == nil || strings.Contains(out, "no such pool") {
			lastErr = nil
			break
		}
		lastErr, lastOut = err, out
		time.Sleep(500 * time.Millisecond)
	}
	if lastErr != nil {
		// A forced pool destroy is the last resort; zfs destroy -f (which
		// wedges zfs-fuse) is never used.
		if out, err := command(time.Minute, "zpool", "destroy", "-f", name); err != nil {
			t.Errorf("destroy test pool %s: %v: %s (before: %s)", name, err, out, lastOut)
		}
	}
	os.Remove(file)
	os.Remove(mountpoint)
}

// sweepStalePools destroys test pools whose test binary no longer runs, left
// by a run that was killed before its cleanup.
func sweepStalePools(t testing.TB) {
	out, err := command(30*time.Second, "zpool", "list", "-H", "-o", "name")
	if err != nil {
		return
	}
	for _, name := range strings.Fields(out) {
		pid, ok := poolOwner(name)
		if !ok || processExists(pid) {
			continue
		}
		t.Logf("destroying stale test pool %s", name)
		destroyPool(t, name, filepath.Join(PoolDir, name+".img"), filepath.Join(PoolDir, "mnt", name))
	}
	// Sparse files of pools that were never created or already gone.
	files, _ := filepath.Glob(filepath.Join(PoolDir, poolPrefix+"*.img"))
	for _, f := range files {
		if pid, ok := poolOwner(strings.TrimSuffix(filepath.Base(f), ".img")); ok && !processExists(pid) {
			os.Remove(f)
		}
	}
}

func poolOwner(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, poolPrefix)
	if !ok {
		return 0, false
	}
	pidStr, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	pid, err := strconv.Atoi(pidStr)
	return pid, err == nil
}

func processExists(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return err == nil
}

// command runs a set-up command directly: testenv prepares the ground the
// code under test (which uses runner) stands on.
func command(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}
