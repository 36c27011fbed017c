package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
)

// runChild runs the vmhistory command line as a child process, with env
// added to this process's environment (KOPIA_PASSWORD removed unless env
// sets it), and returns its stdout, stderr and exit status.
func runChild(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, kopiarepo.PasswordEnv+"=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(append(cmd.Env, runMainEnv+"=1"), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return stdout.String(), stderr.String(), 0
	case errors.As(err, &exit):
		return stdout.String(), stderr.String(), exit.ExitCode()
	}
	t.Fatalf("vmhistory %v: %v", args, err)
	return "", "", 0
}

// kopiaFaultHost is a dataset with one file on a zfs-fuse pool, a replica
// dataset on the same pool, and a kopia filesystem repository created by
// "vmhistory repo create", with the configuration that names them all.
type kopiaFaultHost struct {
	pool                 *testenv.Pool
	dataset, replica     string
	mountpoint           string
	config, dir          string
	passwordFile, kopiaC string
}

func newKopiaFaultHost(t *testing.T) *kopiaFaultHost {
	t.Helper()
	unsetKopiaPassword(t)
	pool := testenv.NewPool(t, 256)
	ds, mnt := pool.Dataset(t, "libvirt")
	if err := os.MkdirAll(filepath.Join(mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "images", "vm.img"), bytes.Repeat([]byte("disk block "), 100000), 0o640); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	h := &kopiaFaultHost{pool: pool, dataset: ds, replica: pool.Name + "/replica", mountpoint: mnt, dir: dir,
		passwordFile: filepath.Join(dir, "kopia.password"), kopiaC: filepath.Join(dir, "kopia.config")}
	if err := os.WriteFile(h.passwordFile, []byte("fault test password\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`datasets: [%s]
quiesce: {mode: none}
replica: {target: %s}
kopia:
  config_file: %s
  password_file: %s
  host: kvmtest
state_dir: %s/state
`, ds, h.replica, h.kopiaC, h.passwordFile, dir)
	h.config = filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(h.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := runConfigCmd(t, "repo", "create", "filesystem", "--path", filepath.Join(dir, "repo"),
		"--cache-directory", filepath.Join(dir, "cache"), "--config", h.config); err != nil {
		t.Fatalf("repo create: %v\n%s", err, stderr)
	}
	return h
}

func (h *kopiaFaultHost) snapshots(t *testing.T, dataset string) int {
	t.Helper()
	snaps, err := h.pool.ZFS.Snapshots(context.Background(), dataset)
	if err != nil {
		t.Fatalf("snapshots of %s: %v", dataset, err)
	}
	return len(snaps)
}

// A password file others can read fails the upload step alone: the night's
// snapshot is taken and replicated, the failure is named, the exit status
// is not 0.
func TestBackupWithOpenPasswordFileSnapshotsAndReplicates(t *testing.T) {
	h := newKopiaFaultHost(t)
	if err := os.Chmod(h.passwordFile, 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := runChild(t, nil, "backup", "--allow-full", "--config", h.config)
	t.Logf("stdout:\n%s\nstderr:\n%s", stdout, stderr)
	if code == 0 {
		t.Fatal("backup with a password file of mode 0644 exited 0")
	}
	if n := h.snapshots(t, h.dataset); n != 1 {
		t.Errorf("%d local snapshots after the night, want 1", n)
	}
	if n := h.snapshots(t, h.replica); n != 1 {
		t.Errorf("%d snapshots on the replica after the night, want 1", n)
	}
	if named := "vmhistory: backup failed: upload " + h.dataset + " (the report above gives the error)"; !strings.Contains(stderr, named) {
		t.Errorf("stderr does not name the failed upload step as %q", named)
	}
	if cause := "kopia repository unavailable: repository password file " + h.passwordFile + " is readable or writable by group or other (mode 0644)"; !strings.Contains(stdout, cause) {
		t.Errorf("the report does not give the cause %q", cause)
	}
	if n := strings.Count(stdout+stderr, "is readable or writable by group or other"); n != 1 {
		t.Errorf("the password file's problem is printed %d times, want once", n)
	}
	for _, want := range []string{"snapshot", "replicate", "full send"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	if strings.Contains(stdout, "destroyed:") && !strings.Contains(stdout, "nothing to destroy") {
		t.Errorf("prune destroyed something while kopia could not be asked:\n%s", stdout)
	}

	// config check still refuses the file.
	_, stderr, code = runChild(t, nil, "config", "check", "--config", h.config)
	if code == 0 || !strings.Contains(stderr, "kopia.password_file") || !strings.Contains(stderr, "chmod 600") {
		t.Errorf("config check with a password file of mode 0644: status %d, stderr %q", code, stderr)
	}
}

// $KOPIA_PASSWORD stands in for a missing password file, as in kopia.
func TestBackupKopiaPasswordEnvStandsInForMissingFile(t *testing.T) {
	h := newKopiaFaultHost(t)
	if err := os.Remove(h.passwordFile); err != nil {
		t.Fatal(err)
	}
	// Without it the upload fails, and says what is missing.
	stdout, stderr, code := runChild(t, nil, "backup", "--allow-full", "--config", h.config)
	if code == 0 || !strings.Contains(stdout, "kopia repository unavailable: repository password file "+h.passwordFile+" does not exist, and $KOPIA_PASSWORD is not set") {
		t.Errorf("backup without password: status %d\n%s\n%s", code, stdout, stderr)
	}
	if n := h.snapshots(t, h.replica); n != 1 {
		t.Errorf("%d snapshots on the replica, want 1", n)
	}

	env := []string{kopiarepo.PasswordEnv + "=fault test password"}
	nextSecond() // snapshots are named to the second: the first backup may have taken less
	stdout, stderr, code = runChild(t, env, "backup", "--config", h.config)
	if code != 0 {
		t.Fatalf("backup with $KOPIA_PASSWORD: status %d\n%s\n%s", code, stdout, stderr)
	}
	if !strings.Contains(stdout, "upload") || strings.Contains(stdout, "everything already uploaded") {
		t.Errorf("the upload step did not upload:\n%s", stdout)
	}
	_, stderr, code = runChild(t, env, "config", "check", "--config", h.config)
	if code != 0 || !strings.Contains(stderr, "kopia.password_file: \""+h.passwordFile+"\" does not exist; $KOPIA_PASSWORD is set and is used instead") {
		t.Errorf("config check with $KOPIA_PASSWORD and no password file: status %d, stderr %q", code, stderr)
	}
}

// Without the kopia config (not created yet) or with an open password
// file, the timeline warns and lists the local snapshots, exit 0, and a
// local snapshot restores.
func TestTimelineAndRestoreWithoutKopia(t *testing.T) {
	h := newKopiaFaultHost(t)
	if _, err := h.pool.ZFS.CreateSnapshot(context.Background(), h.dataset, "2023-03-04_05:00:01", nil); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(h.kopiaC, h.kopiaC+".gone"); err != nil {
		t.Fatal(err)
	}
	check := func(what string) {
		t.Helper()
		stdout, stderr, code := runChild(t, nil, "timeline", "--config", h.config)
		if code != 0 || !strings.Contains(stdout, "2023-03-04_05:00:01") {
			t.Errorf("timeline %s: status %d\n%s\n%s", what, code, stdout, stderr)
		}
		if !strings.Contains(stderr, "vmhistory: warning: kopia:") {
			t.Errorf("timeline %s: no warning naming kopia: %q", what, stderr)
		}
		dest := filepath.Join(t.TempDir(), "vm.img")
		_, stderr, code = runChild(t, nil, "restore", "latest:images/vm.img", dest, "--config", h.config)
		if code != 0 {
			t.Errorf("restore %s: status %d\n%s", what, code, stderr)
		} else if b, err := os.ReadFile(dest); err != nil || len(b) != 1100000 {
			t.Errorf("restore %s: %d bytes, %v", what, len(b), err)
		}
	}
	check("without the kopia config")
	if err := os.Rename(h.kopiaC+".gone", h.kopiaC); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(h.passwordFile, 0o640); err != nil {
		t.Fatal(err)
	}
	check("with a password file of mode 0640")
}

// The timeline's REFERENCED is the ZFS snapshot's referenced bytes for
// every source: the kopia source reports what the upload recorded, not
// kopia's total of file sizes.
func TestTimelineSizeIsReferencedForEverySource(t *testing.T) {
	h := newKopiaFaultHost(t)
	// Sparse: the file size kopia totals is far from what ZFS references.
	if err := os.Truncate(filepath.Join(h.mountpoint, "images", "vm.img"), 64<<20); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code := runChild(t, nil, "backup", "--allow-full", "--config", h.config); code != 0 {
		t.Fatalf("backup: status %d\n%s", code, stderr)
	}
	ctx := context.Background()
	snaps, err := h.pool.ZFS.Snapshots(ctx, h.dataset)
	if err != nil || len(snaps) != 1 {
		t.Fatalf("snapshots: %v %v", snaps, err)
	}
	want := int64(snaps[0].Referenced)

	pw := "fault test password"
	r, err := kopiarepo.Open(ctx, h.kopiaC, pw)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	kopiaOnly, errs := restore.BuildTimeline(ctx, []restore.Source{restore.NewKopiaSource(r, "kvmtest", "root")})
	if len(errs) > 0 || len(kopiaOnly.Entries) != 1 {
		t.Fatalf("kopia timeline: %v %v", kopiaOnly.Entries, errs)
	}
	if got := kopiaOnly.Entries[0].Size(); got != want {
		t.Errorf("kopia-only size %d, want the ZFS snapshot's referenced %d (kopia's file total is %d)", got, want, 64<<20)
	}

	stdout, stderr, code := runChild(t, nil, "timeline", "--config", h.config)
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if code != 0 || len(lines) != 2 || !strings.HasSuffix(lines[0], "REFERENCED") || !strings.HasSuffix(lines[1], tlBytes(want)) {
		t.Errorf("timeline: status %d\n%s\n%s\nwant REFERENCED %s", code, stdout, stderr, tlBytes(want))
	}
}
