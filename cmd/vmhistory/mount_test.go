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
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/zfs"
)

func TestMountCommand(t *testing.T) {
	sb := newRestoreSandbox(t)
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := newRootCommand()
	var stderr bytes.Buffer
	cmd.SetErr(&stderr)
	cmd.SetArgs([]string{"mount", dir, "--config", sb.config, "--refresh", "1s"})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()

	file := filepath.Join(dir, "latest", "images", "vm.img")
	deadline := time.Now().Add(30 * time.Second)
	var got []byte
	for {
		var err error
		if got, err = os.ReadFile(file); err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("mount ended: %v\n%s", err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never readable: %v", file, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if sha(got) != sha(sb.image) {
		t.Errorf("vm.img through the mount differs from the snapshot")
	}
	cancel() // as SIGINT/SIGTERM
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("mount: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("mount did not return after cancel")
	}
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(info), " "+dir+" ") {
		t.Errorf("%s still mounted", dir)
	}
}

// runMainEnv makes the test binary run main instead of the tests (see
// TestMain): the mount tests start the real command as a child process,
// to signal and kill it.
const runMainEnv = "VMHISTORY_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// mountChild is `vmhistory mount` running as a child process.
type mountChild struct {
	cmd    *exec.Cmd
	output *syncBuffer
	done   chan struct{} // closed when it exited; err is set then
	err    error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// startVMHistory runs the vmhistory command with args as a child process;
// the test's cleanup kills it if it still runs.
func startVMHistory(t *testing.T, args ...string) *mountChild {
	t.Helper()
	c := &mountChild{cmd: exec.Command(os.Args[0], args...), output: &syncBuffer{}, done: make(chan struct{})}
	c.cmd.Env = append(os.Environ(), runMainEnv+"=1")
	c.cmd.Stdout, c.cmd.Stderr = c.output, c.output
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.err = c.cmd.Wait(); close(c.done) }()
	t.Cleanup(func() {
		select {
		case <-c.done:
		default:
			c.cmd.Process.Kill()
			<-c.done
		}
	})
	return c
}

// wait waits for the child to exit and returns how it ended.
func (c *mountChild) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case <-c.done:
		return c.err
	case <-time.After(timeout):
		t.Fatalf("vmhistory %v did not exit within %v; output:\n%s", c.cmd.Args[1:], timeout, c.output)
		return nil
	}
}

// waitReadable waits until the child mounted and file reads, and returns
// its bytes.
func (c *mountChild) waitReadable(t *testing.T, file string) []byte {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		got, err := os.ReadFile(file)
		if err == nil {
			return got
		}
		select {
		case <-c.done:
			t.Fatalf("vmhistory %v ended (%v) before %s was readable; output:\n%s", c.cmd.Args[1:], c.err, file, c.output)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never readable: %v; output:\n%s", file, err, c.output)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// mountDir is a mountpoint for a child's mount; a mount still there at
// the end of the test (a failure) is detached before the directory is
// removed.
func mountDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	t.Cleanup(func() {
		for i := 0; isMounted(t, dir) && i < 5; i++ { // mounts may be stacked
			t.Errorf("%s still mounted at the end of the test: detaching it", dir)
			syscall.Unmount(dir, syscall.MNT_DETACH)
		}
	})
	return dir
}

func isMounted(t *testing.T, dir string) bool {
	t.Helper()
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(info), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// clones lists the read-only clones on the pool of the snapshot
// pool/...@name.
func clones(t *testing.T, snapshot string) []string {
	t.Helper()
	pool, _, _ := strings.Cut(snapshot, "/")
	out, err := exec.Command("zfs", "list", "-H", "-o", "name", "-r", pool).CombinedOutput()
	if err != nil {
		t.Fatalf("zfs list: %v: %s", err, out)
	}
	var cl []string
	for _, name := range strings.Fields(string(out)) {
		if strings.Contains(name, zfs.ClonePrefix) {
			cl = append(cl, name)
		}
	}
	return cl
}

// restoreHolds lists the restore holds on the snapshot.
func restoreHolds(t *testing.T, snapshot string) []string {
	t.Helper()
	tags, err := zfs.New(&runner.Local{}, zfs.Options{CommandTimeout: time.Minute}).Holds(context.Background(), snapshot)
	if err != nil {
		t.Fatal(err)
	}
	var held []string
	for _, tag := range tags {
		if strings.HasPrefix(tag, restore.RestoreHoldPrefix) {
			held = append(held, tag)
		}
	}
	return held
}

// `vmhistory mount` as its own process: writes fail with EROFS, and
// SIGTERM unmounts and leaves no clone and no hold behind.
func TestMountProcessSIGTERM(t *testing.T) {
	sb := newRestoreSandbox(t)
	dir := mountDir(t)
	child := startVMHistory(t, "mount", dir, "--config", sb.config, "--refresh", "1s")
	snapDir := filepath.Join(dir, "latest")
	file := filepath.Join(snapDir, "images", "vm.img")
	if got := child.waitReadable(t, file); sha(got) != sha(sb.image) {
		t.Errorf("vm.img through the mount differs from the snapshot")
	}
	if !isMounted(t, dir) {
		t.Fatalf("%s readable but not in mountinfo", dir)
	}
	// The snapshot is read through a clone (zfs-fuse has no .zfs), held.
	if cl := clones(t, sb.snap); len(cl) == 0 {
		t.Errorf("no read-only clone while the mount reads %s", sb.snap)
	}
	if h := restoreHolds(t, sb.snap); len(h) == 0 {
		t.Errorf("no restore hold on %s while the mount reads it", sb.snap)
	}

	for name, op := range map[string]func() error{
		"write":      func() error { _, err := os.OpenFile(file, os.O_WRONLY, 0); return err },
		"append":     func() error { _, err := os.OpenFile(file, os.O_RDWR|os.O_APPEND, 0); return err },
		"create":     func() error { return os.WriteFile(filepath.Join(snapDir, "images", "new.img"), []byte("x"), 0o644) },
		"create-top": func() error { return os.WriteFile(filepath.Join(dir, "new"), nil, 0o644) },
		"rename":     func() error { return os.Rename(file, file+".old") },
		"unlink":     func() error { return os.Remove(file) },
		"rmdir":      func() error { return syscall.Rmdir(filepath.Join(snapDir, "images")) },
		"mkdir":      func() error { return os.Mkdir(filepath.Join(snapDir, "images", "d"), 0o755) },
		"chmod":      func() error { return os.Chmod(file, 0o600) },
		"chown":      func() error { return os.Chown(file, 1, 1) },
		"truncate":   func() error { return os.Truncate(file, 0) },
		"utimes":     func() error { return os.Chtimes(file, time.Now(), time.Now()) },
		"link":       func() error { return os.Link(file, file+".link") },
		"symlink":    func() error { return os.Symlink("vm.img", filepath.Join(snapDir, "images", "l")) },
		"mknod":      func() error { return syscall.Mknod(filepath.Join(snapDir, "images", "fifo"), syscall.S_IFIFO|0o644, 0) },
		"setxattr":   func() error { return unix.Setxattr(file, "user.x", []byte("y"), 0) },
		"rmxattr":    func() error { return unix.Removexattr(file, fusefs.XattrSource) },
	} {
		if err := op(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s on the mount: %v, want EROFS", name, err)
		}
	}

	if err := child.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := child.wait(t, time.Minute); err != nil {
		t.Errorf("vmhistory mount after SIGTERM: %v; output:\n%s", err, child.output)
	}
	if isMounted(t, dir) {
		t.Errorf("%s still mounted after SIGTERM", dir)
	}
	if cl := clones(t, sb.snap); len(cl) > 0 {
		t.Errorf("clones left after SIGTERM: %v", cl)
	}
	if h := restoreHolds(t, sb.snap); len(h) > 0 {
		t.Errorf("restore holds left after SIGTERM: %v", h)
	}
	t.Logf("output:\n%s", child.output)
}

// SIGHUP (the admin's ssh session dropped) unmounts as SIGTERM does,
// leaving no clone and no hold, and exits 0; it used to end the process
// on the spot, leaving a stale mount, a clone and a hold.
func TestMountProcessSIGHUP(t *testing.T) {
	sb := newRestoreSandbox(t)
	dir := mountDir(t)
	child := startVMHistory(t, "mount", dir, "--config", sb.config)
	child.waitReadable(t, filepath.Join(dir, "latest", "images", "vm.img"))
	if err := child.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := child.wait(t, time.Minute); err != nil {
		t.Errorf("vmhistory mount after SIGHUP: %v; output:\n%s", err, child.output)
	}
	if isMounted(t, dir) {
		t.Errorf("%s still mounted after SIGHUP", dir)
	}
	if cl := clones(t, sb.snap); len(cl) > 0 {
		t.Errorf("clones left after SIGHUP: %v", cl)
	}
	if h := restoreHolds(t, sb.snap); len(h) > 0 {
		t.Errorf("restore holds left after SIGHUP: %v", h)
	}
}

// A mount whose process was killed (kill -9) leaves a stale mount: the
// next `vmhistory mount` there refuses with one line telling how to clear
// it; with --force it clears it and mounts, and sweeps the dead process's
// clone and hold.
func TestMountStaleAfterKill(t *testing.T) {
	sb := newRestoreSandbox(t)
	dir := mountDir(t)
	file := filepath.Join(dir, "latest", "images", "vm.img")
	killed := startVMHistory(t, "mount", dir, "--config", sb.config)
	killed.waitReadable(t, file)
	if err := killed.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed.wait(t, 30*time.Second)
	// stat may still be answered from the kernel's attribute cache;
	// statfs reaches the dead server.
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("statfs %s after kill -9: %v, want ENOTCONN (a stale mount)", dir, err)
	}
	if cl := clones(t, sb.snap); len(cl) == 0 {
		t.Errorf("the killed mount left no clone: nothing for the next one to sweep")
	}

	refused := startVMHistory(t, "mount", dir, "--config", sb.config)
	err := refused.wait(t, time.Minute)
	out := strings.TrimSpace(refused.output.String())
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Errorf("mount on a stale mount: %v, want exit status 1", err)
	}
	if strings.Contains(out, "\n") || !strings.HasPrefix(out, "vmhistory: ") {
		t.Errorf("want one line \"vmhistory: ...\", got:\n%s", out)
	}
	for _, want := range []string{dir, "stale mount", "fusermount3 -uz " + dir, "--force"} {
		if !strings.Contains(out, want) {
			t.Errorf("message %q lacks %q", out, want)
		}
	}

	forced := startVMHistory(t, "mount", dir, "--config", sb.config, "--force")
	if got := forced.waitReadable(t, file); sha(got) != sha(sb.image) {
		t.Errorf("vm.img through the forced mount differs from the snapshot")
	}
	if err := forced.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := forced.wait(t, time.Minute); err != nil {
		t.Errorf("forced mount after SIGTERM: %v; output:\n%s", err, forced.output)
	}
	if isMounted(t, dir) {
		t.Errorf("%s still mounted after SIGTERM", dir)
	}
	if cl := clones(t, sb.snap); len(cl) > 0 {
		t.Errorf("clones left (the killed mount's should have been swept): %v", cl)
	}
	if h := restoreHolds(t, sb.snap); len(h) > 0 {
		t.Errorf("restore holds left (the killed mount's should have been released): %v", h)
	}
	t.Logf("refused: %s\nforced:\n%s", out, forced.output)
}

func TestMountRefusesBadWindow(t *testing.T) {
	cmd := newRootCommand()
	cmd.SetErr(&bytes.Buffer{})
	cmd.SetArgs([]string{"mount", t.TempDir(), "--window", "0"})
	if err := cmd.Execute(); err == nil || err.Error() != "--window 0 is out of range 1..256" {
		t.Errorf("mount --window 0: %v", err)
	}
}

// Issue 11, finding 10: a second `vmhistory mount` on a live one exits at
// once with one line naming the directory and the process serving it,
// instead of stacking on it; a non-empty directory is refused unless
// --nonempty; a missing one gets a line saying how to create it.
func TestMountCommandRefusesUnsafeMountpoints(t *testing.T) {
	sb := newRestoreSandbox(t)
	dir := mountDir(t)
	first := startVMHistory(t, "mount", dir, "--config", sb.config, "--refresh", "1s")
	first.waitReadable(t, filepath.Join(dir, "latest", "images", "vm.img"))

	second := startVMHistory(t, "mount", dir, "--config", sb.config)
	if err := second.wait(t, 60*time.Second); err == nil {
		t.Fatalf("a second mount on %s succeeded; output:\n%s", dir, second.output)
	}
	out := strings.TrimSpace(second.output.String())
	want := fmt.Sprintf("%s is already mounted by vmhistory (process %d)", dir, first.cmd.Process.Pid)
	if !strings.Contains(out, want) || strings.Count(out, "\n") > 0 {
		t.Errorf("second mount said:\n%s\nwant one line with %q", out, want)
	}
	n := 0
	info, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(info), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d mounts on %s, want 1", n, dir)
	}
	first.cmd.Process.Signal(syscall.SIGTERM)
	if err := first.wait(t, 60*time.Second); err != nil {
		t.Errorf("first mount: %v\n%s", err, first.output)
	}

	full := t.TempDir()
	if err := os.WriteFile(filepath.Join(full, "notes.txt"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "vmhistory")
	for _, tc := range []struct {
		dir, want string
	}{
		{full, full + " is not empty (it holds notes.txt): the mount would hide its files; use an empty directory, or pass --nonempty"},
		{missing, "mountpoint " + missing + " does not exist; create it first: mkdir -p " + missing},
	} {
		_, _, err := runConfigCmd(t, "mount", tc.dir, "--config", sb.config)
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("mount %s: %v, want one line with %q", tc.dir, err, tc.want)
		}
	}
	if !strings.Contains(newMountHelp(t), "--nonempty") {
		t.Error("mount --help does not document --nonempty")
	}
}

func newMountHelp(t *testing.T) string {
	t.Helper()
	out, _, err := runConfigCmd(t, "mount", "--help")
	if err != nil {
		t.Fatal(err)
	}
	return out
}
