package runner_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/testenv"
)

func newSSH(t *testing.T, cfg runner.SSHConfig) *runner.SSH {
	t.Helper()
	r, err := runner.NewSSH(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// uniqueSleep returns a sleep command whose argument no other process on
// the machine has, so pgrep can find exactly the processes it started.
func uniqueSleep(t *testing.T) []string {
	t.Helper()
	n, err := rand.Int(rand.Reader, big.NewInt(1e9))
	if err != nil {
		t.Fatal(err)
	}
	return []string{"sleep", fmt.Sprintf("300.%09d", n.Int64())}
}

// processesMatching lists processes whose command line contains pattern.
func processesMatching(t *testing.T, pattern string) string {
	t.Helper()
	out, err := exec.Command("pgrep", "-a", "-f", pattern).Output()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 1 {
		return "" // none
	}
	if err != nil {
		t.Fatalf("pgrep: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// waitForProcess fails t unless a process whose command line is exactly
// cmdline (the remote command itself, not the ssh client carrying it)
// appears within 10 s.
func waitForProcess(t *testing.T, cmdline string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if processesMatching(t, "^"+cmdline+"$") != "" {
			return
		}
	}
	t.Fatalf("process %q did not start", cmdline)
}

// assertGone fails t if any process still carries marker; it allows a
// moment for processes that are already dying.
func assertGone(t *testing.T, marker string) {
	t.Helper()
	var left string
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if left = processesMatching(t, marker); left == "" {
			return
		}
	}
	t.Fatalf("processes left running:\n%s", left)
}

func TestSSHArgumentsArriveExactly(t *testing.T) {
	t.Parallel()
	sshd := testenv.StartSSHD(t)
	r := newSSH(t, sshd.SSHConfig())
	if got, want := r.Where(), fmt.Sprintf("ssh://root@127.0.0.1:%d", sshd.Port); got != want {
		t.Errorf("Where() = %q, want %q", got, want)
	}
	args := []string{"two words", "it's", `"double"`, "$HOME", "`id`", "a;b", "x|y&z", "", `back\slash`, "*", "new\nline", "-n", "ünï", "%s"}
	out, err := r.Run(context.Background(), runner.Cmd{Args: append([]string{"printf", `%s\n`}, args...)})
	if err != nil {
		t.Fatal(err)
	}
	if want := strings.Join(args, "\n") + "\n"; string(out) != want {
		t.Errorf("output\n%q\nwant\n%q", out, want)
	}
	cmds := sshd.Commands()
	if len(cmds) != 1 || !strings.Contains(cmds[0], `printf '%s\n' 'two words'`) || !strings.Contains(cmds[0], `'$HOME'`) {
		t.Errorf("sshd recorded %q", cmds)
	}
	if log := sshd.Log(); !strings.Contains(log, "testenv-sshd: command: ") || !strings.Contains(log, "'two words'") {
		t.Errorf("sshd log does not show the command:\n%s", log)
	}
}

func TestSSHStreamsBinary(t *testing.T) {
	t.Parallel()
	sshd := testenv.StartSSHD(t)
	r := newSSH(t, sshd.SSHConfig())
	data := make([]byte, 4<<20+17)
	rand.Read(data)
	var got bytes.Buffer
	out, err := r.Run(context.Background(), runner.Cmd{
		Args:   []string{"cat"},
		Stdin:  io.MultiReader(bytes.NewReader(data[:1000]), bytes.NewReader(data[1000:])),
		Stdout: &got,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 0 {
		t.Errorf("Run returned %d bytes of output although Stdout was set", len(out))
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("round trip changed the data: got %d bytes, sent %d", got.Len(), len(data))
	}
}

func TestSSHExitCodeAndStderr(t *testing.T) {
	t.Parallel()
	sshd := testenv.StartSSHD(t)
	r := newSSH(t, sshd.SSHConfig())
	_, err := r.Run(context.Background(), runner.Cmd{Args: []string{"sh", "-c", "echo partial; echo 'cannot open dataset' >&2; exit 3"}})
	var rerr *runner.Error
	if !errors.As(err, &rerr) {
		t.Fatalf("got %v, want *runner.Error", err)
	}
	if rerr.ExitCode != 3 || rerr.Stderr != "cannot open dataset" || rerr.Where != r.Where() {
		t.Errorf("error %#v", rerr)
	}
	if errors.Is(err, runner.ErrConnect) || errors.Is(err, runner.ErrTimeout) || errors.Is(err, runner.ErrHostKey) {
		t.Errorf("a failing remote command is classified as an ssh failure: %v", err)
	}
	if !strings.Contains(err.Error(), "cannot open dataset") || !strings.Contains(err.Error(), r.Where()) {
		t.Errorf("message %q lacks stderr or host", err)
	}

	// 255 from the command itself is not a connection failure.
	_, err = r.Run(context.Background(), runner.Cmd{Args: []string{"sh", "-c", "exit 255"}})
	if !errors.As(err, &rerr) || rerr.ExitCode != 255 || errors.Is(err, runner.ErrConnect) {
		t.Errorf("exit 255: %v", err)
	}
}

func TestSSHTimeoutKillsRemoteCommand(t *testing.T) {
	t.Parallel()
	sshd := testenv.StartSSHD(t)
	r := newSSH(t, sshd.SSHConfig())
	sleep := uniqueSleep(t)
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := r.Run(context.Background(), runner.Cmd{Args: sleep, Timeout: 2 * time.Second})
		done <- err
	}()
	waitForProcess(t, strings.Join(sleep, " "))
	err := <-done
	elapsed := time.Since(start)
	if !errors.Is(err, runner.ErrTimeout) {
		t.Fatalf("got %v, want ErrTimeout", err)
	}
	if elapsed > 6*time.Second {
		t.Errorf("took %v for a 2s timeout", elapsed)
	}
	var rerr *runner.Error
	if errors.As(err, &rerr); rerr.Timeout != 2*time.Second {
		t.Errorf("Timeout = %v", rerr.Timeout)
	}
	assertGone(t, sleep[1])
}

func TestSSHCancelKillsRemoteCommand(t *testing.T) {
	t.Parallel()
	sshd := testenv.StartSSHD(t)
	r := newSSH(t, sshd.SSHConfig())
	// The command's child must die too, not only the command.
	sleep := uniqueSleep(t)
	script := strings.Join(sleep, " ") + " & wait"
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := r.Run(ctx, runner.Cmd{Args: []string{"sh", "-c", script}})
		done <- err
	}()
	waitForProcess(t, strings.Join(sleep, " "))
	start := time.Now()
	cancel()
	err := <-done
	if !errors.Is(err, context.Canceled) || errors.Is(err, runner.ErrTimeout) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("cancel took %v", d)
	}
	assertGone(t, sleep[1])
}

func TestSSHHostKeyMismatch(t *testing.T) {
	t.Parallel()
	sshd := testenv.StartSSHD(t)
	hostPort := fmt.Sprintf("127.0.0.1:%d", sshd.Port)

	empty := filepath.Join(t.TempDir(), "known_hosts_empty")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, knownHosts, says string
	}{
		{"wrong key", sshd.WrongKnownHostsFile(), "is not the one in"},
		{"no key", empty, "no key for"},
		{"no file", filepath.Join(t.TempDir(), "missing"), "does not exist"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := sshd.SSHConfig()
			cfg.KnownHostsFile = tc.knownHosts
			_, err := newSSH(t, cfg).Run(context.Background(), runner.Cmd{Args: []string{"true"}})
			if !errors.Is(err, runner.ErrHostKey) {
				t.Fatalf("got %v, want ErrHostKey", err)
			}
			msg := err.Error()
			for _, want := range []string{tc.knownHosts, hostPort, tc.says, "host key verification failed"} {
				if !strings.Contains(msg, want) {
					t.Errorf("message lacks %q: %s", want, msg)
				}
			}
		})
	}
	if cmds := sshd.Commands(); len(cmds) != 0 {
		t.Errorf("a command ran despite the host key failure: %q", cmds)
	}
}

func TestSSHAuthAndConnectFailures(t *testing.T) {
	t.Parallel()
	sshd := testenv.StartSSHD(t)

	cfg := sshd.SSHConfig()
	cfg.IdentityFile = sshd.UnauthorizedKeyFile()
	_, err := newSSH(t, cfg).Run(context.Background(), runner.Cmd{Args: []string{"true"}})
	if !errors.Is(err, runner.ErrAuth) || !strings.Contains(err.Error(), cfg.IdentityFile) {
		t.Errorf("unauthorized key: got %v, want ErrAuth naming the key", err)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg = sshd.SSHConfig()
	cfg.Port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	_, err = newSSH(t, cfg).Run(context.Background(), runner.Cmd{Args: []string{"true"}})
	if !errors.Is(err, runner.ErrConnect) || !strings.Contains(err.Error(), "refused") {
		t.Errorf("closed port: got %v, want ErrConnect (refused)", err)
	}
}

func TestSSHServerGoesAwayMidStream(t *testing.T) {
	t.Parallel()
	sshd := testenv.StartSSHD(t)
	r := newSSH(t, sshd.SSHConfig())
	pr, pw := io.Pipe()
	defer pw.Close()
	echoed := &firstWrite{ch: make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		_, err := r.Run(context.Background(), runner.Cmd{Args: []string{"cat"}, Stdin: pr, Stdout: echoed})
		done <- err
	}()
	if _, err := pw.Write(make([]byte, 64<<10)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-echoed.ch: // the remote cat is running and data flows
	case err := <-done:
		t.Fatalf("Run ended early: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no data came back")
	}
	sshd.Stop()
	select {
	case err := <-done:
		if !errors.Is(err, runner.ErrConnect) {
			t.Fatalf("got %v, want ErrConnect", err)
		}
		t.Logf("server gone: %v", err)
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return after the server went away")
	}
}

func TestNewSSHRejectsUnsafeConfig(t *testing.T) {
	t.Parallel()
	good := runner.SSHConfig{User: "root", Host: "replica", KnownHostsFile: "/etc/vmhistory/known_hosts"}
	r, err := runner.NewSSH(good)
	if err != nil {
		t.Fatal(err)
	}
	if r.Where() != "ssh://root@replica:22" || r.Config().ConnectTimeout != runner.DefaultConnectTimeout {
		t.Errorf("defaults: %s %+v", r.Where(), r.Config())
	}
	for name, mutate := range map[string]func(*runner.SSHConfig){
		"no known_hosts":   func(c *runner.SSHConfig) { c.KnownHostsFile = "" },
		"no host":          func(c *runner.SSHConfig) { c.Host = "" },
		"option as host":   func(c *runner.SSHConfig) { c.Host = "-oProxyCommand=x" },
		"user with @":      func(c *runner.SSHConfig) { c.User = "a@b" },
		"port":             func(c *runner.SSHConfig) { c.Port = 70000 },
		"space in path":    func(c *runner.SSHConfig) { c.KnownHostsFile = "/a b/known_hosts" },
		"token in key":     func(c *runner.SSHConfig) { c.IdentityFile = "/keys/%h" },
		"flag as option":   func(c *runner.SSHConfig) { c.ExtraOptions = []string{"-v"} },
		"newline option":   func(c *runner.SSHConfig) { c.ExtraOptions = []string{"A=b\nC=d"} },
		"empty option":     func(c *runner.SSHConfig) { c.ExtraOptions = []string{""} },
		"host with quotes": func(c *runner.SSHConfig) { c.Host = "a'b" },
	} {
		c := good
		mutate(&c)
		if _, err := runner.NewSSH(c); err == nil {
			t.Errorf("%s: accepted %+v", name, c)
		}
	}
	ipv6, err := runner.NewSSH(runner.SSHConfig{Host: "::1", Port: 2222, KnownHostsFile: "/k"})
	if err != nil || ipv6.Where() != "ssh://[::1]:2222" {
		t.Errorf("ipv6: %v %v", ipv6, err)
	}
}

// firstWrite discards what it is given and closes ch on the first write.
type firstWrite struct {
	once sync.Once
	ch   chan struct{}
}

func (w *firstWrite) Write(p []byte) (int, error) {
	w.once.Do(func() { close(w.ch) })
	return len(p), nil
}

func TestSSHSharedConnection(t *testing.T) {
	sshd := testenv.StartSSHD(t)
	r := sshd.SharedRunner(t)
	var err error
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		out, err := r.Run(ctx, runner.Cmd{Args: []string{"echo", "shared", strconv.Itoa(i)}})
		if err != nil || strings.TrimSpace(string(out)) != "shared "+strconv.Itoa(i) {
			t.Fatalf("command %d over the shared connection: %q, %v", i, out, err)
		}
	}
	// One TCP connection (one sshd authentication) served all five.
	if n := strings.Count(sshd.Log(), "Accepted publickey"); n != 1 {
		t.Errorf("%d authentications for 5 commands, want 1 shared connection", n)
	}
	// A timeout still kills the remote command through the shared connection.
	sleep := uniqueSleep(t)
	_, err = r.Run(ctx, runner.Cmd{Args: sleep, Timeout: time.Second})
	if !errors.Is(err, runner.ErrTimeout) {
		t.Fatalf("timeout over the shared connection: %v", err)
	}
	assertGone(t, strings.Join(sleep, " "))
	if err := r.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	// After Close a command opens a new connection.
	if _, err := r.Run(ctx, runner.Cmd{Args: []string{"true"}}); err != nil {
		t.Errorf("after close: %v", err)
	}
}
