package testenv

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/runner"
)

// SSHDPath is the OpenSSH server binary; sshd re-executes itself and so
// needs an absolute path.
const SSHDPath = "/usr/sbin/sshd"

const sftpServerPath = "/usr/lib/openssh/sftp-server"

// SSHD is a real OpenSSH server on 127.0.0.1 for one test, with throwaway
// keys, accepting root with IdentityFile, strict host-key checking on the
// client side through KnownHostsFile.
//
// sshd logs no command line at any LogLevel (OpenSSH 9.2 logs "Starting
// session: command for root ..." at VERBOSE and nothing more even at
// DEBUG3), so the server runs every session through a ForceCommand script
// that appends the client's command to LogFile ("testenv-sshd: command:
// ...") and to a NUL-separated file read by Commands, then runs it with the
// user's shell exactly as sshd would have.
type SSHD struct {
	Dir            string // temp dir holding keys, config and logs
	Port           int
	KnownHostsFile string // "[127.0.0.1]:Port <host key>"
	IdentityFile   string // client private key, authorized for root
	HostKeyFile    string
	ConfigFile     string
	LogFile        string // sshd's log (-E), plus the recorded commands

	t            testing.TB
	commandsFile string

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	nextKey int
}

// StartSSHD starts sshd for t and stops it (with everything it started) at
// cleanup. A missing sshd fails the test: the suite needs it.
func StartSSHD(t testing.TB) *SSHD {
	t.Helper()
	for _, bin := range []string{SSHDPath, "ssh-keygen", "ssh"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("testenv: %s not found (%v): the tests need OpenSSH (packages openssh-server, openssh-client); run `make test` or scripts/setup-test-env.sh", bin, err)
		}
	}
	// sshd's privilege separation directory; it insists on root-owned and
	// not group/world-writable.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		t.Fatalf("testenv: sshd privilege separation dir: %v", err)
	}
	dir := t.TempDir()
	s := &SSHD{
		Dir:            dir,
		KnownHostsFile: filepath.Join(dir, "known_hosts"),
		IdentityFile:   filepath.Join(dir, "id_ed25519"),
		HostKeyFile:    filepath.Join(dir, "ssh_host_ed25519_key"),
		ConfigFile:     filepath.Join(dir, "sshd_config"),
		LogFile:        filepath.Join(dir, "sshd.log"),
		commandsFile:   filepath.Join(dir, "commands"),
		t:              t,
	}
	keygen(t, s.HostKeyFile, "vmhistory-test-host")
	keygen(t, s.IdentityFile, "vmhistory-test-client")
	pub, err := os.ReadFile(s.IdentityFile + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "authorized_keys"), pub, 0o600)
	record := fmt.Sprintf(`#!/bin/sh
# ForceCommand of the test sshd: record the client's command, then run it
# with the user's shell as sshd would have.
if [ -z "${SSH_ORIGINAL_COMMAND+set}" ]; then
	printf 'testenv-sshd: interactive session\n' >>'%[1]s'
	exec "$SHELL" -l
fi
printf 'testenv-sshd: command: %%s\n' "$SSH_ORIGINAL_COMMAND" >>'%[1]s'
printf '%%s\0' "$SSH_ORIGINAL_COMMAND" >>'%[2]s'
exec "$SHELL" -c "$SSH_ORIGINAL_COMMAND"
`, s.LogFile, s.commandsFile)
	writeFile(t, filepath.Join(dir, "record-command"), []byte(record), 0o755)

	t.Cleanup(s.Stop)
	var lastErr error
	for range 5 { // a free port may be taken before sshd binds it
		s.Port = freePort(t)
		s.writeConfig(t)
		if lastErr = s.start(); lastErr == nil {
			break
		}
		if !errors.Is(lastErr, errPortTaken) {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("testenv: start sshd: %v\nlog:\n%s", lastErr, s.Log())
	}
	hostPub, err := os.ReadFile(s.HostKeyFile + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, s.KnownHostsFile, knownHostsLine(s.Port, hostPub), 0o644)
	return s
}

func knownHostsLine(port int, pub []byte) []byte {
	f := strings.Fields(string(pub)) // type key comment
	return fmt.Appendf(nil, "[127.0.0.1]:%d %s %s\n", port, f[0], f[1])
}

func keygen(t testing.TB, path, comment string) {
	t.Helper()
	out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path).CombinedOutput()
	if err != nil {
		t.Fatalf("testenv: ssh-keygen %s: %v: %s", path, err, out)
	}
}

func writeFile(t testing.TB, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatalf("testenv: %v", err)
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (s *SSHD) writeConfig(t testing.TB) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, `# test sshd written by testenv.StartSSHD
Port %d
ListenAddress 127.0.0.1
HostKey %s
PidFile %s
AuthorizedKeysFile %s
ForceCommand %s
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
LoginGraceTime 30
MaxStartups 100
MaxSessions 100
LogLevel VERBOSE
# Sessions get an empty home: bash, which sshd runs the command with, would
# source the machine's ~/.bashrc, and a session killed by Stop inside it
# (pyenv's rehash lock, seen on this machine kind) stalls every later one.
SetEnv HOME=%s
`, s.Port, s.HostKeyFile, filepath.Join(s.Dir, "sshd.pid"), filepath.Join(s.Dir, "authorized_keys"),
		filepath.Join(s.Dir, "record-command"), s.homeDir(t))
	if _, err := os.Stat(sftpServerPath); err == nil {
		fmt.Fprintf(&b, "Subsystem sftp %s\n", sftpServerPath)
	}
	// OpenSSH 9.8+ penalises clients whose connections fail; negative tests
	// do that on purpose. Older versions reject the option.
	if exec.Command(SSHDPath, "-t", "-f", "/dev/null", "-o", "PerSourcePenalties=no").Run() == nil {
		b.WriteString("PerSourcePenalties no\n")
	}
	writeFile(t, s.ConfigFile, []byte(b.String()), 0o600)
	if out, err := exec.Command(SSHDPath, "-t", "-f", s.ConfigFile).CombinedOutput(); err != nil {
		t.Fatalf("testenv: sshd -t -f %s: %v: %s", s.ConfigFile, err, out)
	}
}

// homeDir makes the sessions' empty home directory.
func (s *SSHD) homeDir(t testing.TB) string {
	t.Helper()
	home := filepath.Join(s.Dir, "home")
	if err := os.MkdirAll(home, 0o700); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return home
}

// start launches sshd on s.Port and waits until it answers.
func (s *SSHD) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return errors.New("sshd already running")
	}
	cmd := exec.Command(SSHDPath, "-D", "-e", "-f", s.ConfigFile, "-E", s.LogFile)
	s.cmd = cmd
	err := launch(launchSpec{
		what: fmt.Sprintf("sshd on 127.0.0.1:%d", s.Port), cmd: cmd, timeout: 10 * time.Second,
		answers:       func() bool { return answers(s.Port) },
		log:           s.Log,
		portTakenText: "Address already in use",
		started:       func(exited chan struct{}) { s.exited = exited },
		stop:          s.stopLocked,
	})
	if err != nil {
		s.cmd = nil
	}
	return err
}

// answers reports whether an SSH server greets on port.
func answers(port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 200*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "SSH-")
}

// Restart starts sshd again after Stop, on the same port with the same keys.
func (s *SSHD) Restart() {
	s.t.Helper()
	if err := s.start(); err != nil {
		s.t.Fatalf("testenv: restart sshd: %v\nlog:\n%s", err, s.Log())
	}
}

// Stop kills sshd and every process under it — open connections and the
// commands they run — as a crash or power loss of the host would, and waits
// for sshd to be gone. Clients see their connection drop. Safe to call more
// than once and from any goroutine.
func (s *SSHD) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked()
}

func (s *SSHD) stopLocked() {
	if s.cmd == nil {
		return
	}
	// Freeze the tree top-down so nothing forks or re-parents while it is
	// collected (children of a dead parent move to init and out of reach),
	// then kill it all.
	pids := []int{s.cmd.Process.Pid}
	syscall.Kill(pids[0], syscall.SIGSTOP)
	for seen := map[int]bool{pids[0]: true}; ; {
		added := false
		for _, p := range childrenOf(seen) {
			if !seen[p] {
				seen[p] = true
				syscall.Kill(p, syscall.SIGSTOP)
				pids = append(pids, p)
				added = true
			}
		}
		if !added {
			break
		}
	}
	for _, p := range pids {
		syscall.Kill(p, syscall.SIGKILL)
	}
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
	}
	s.cmd = nil
}

// childrenOf lists the processes whose parent is in parents.
func childrenOf(parents map[int]bool) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var kids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may contain spaces and parens.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 2 {
			continue
		}
		if ppid, err := strconv.Atoi(f[1]); err == nil && parents[ppid] {
			kids = append(kids, pid)
		}
	}
	return kids
}

// SSHConfig returns a runner configuration that reaches this server as root.
func (s *SSHD) SSHConfig() runner.SSHConfig {
	return runner.SSHConfig{
		User:           "root",
		Host:           "127.0.0.1",
		Port:           s.Port,
		IdentityFile:   s.IdentityFile,
		KnownHostsFile: s.KnownHostsFile,
		ConnectTimeout: 5 * time.Second,
	}
}

// Log returns sshd's log so far, including the recorded commands.
func (s *SSHD) Log() string {
	b, _ := os.ReadFile(s.LogFile)
	return string(b)
}

// Commands returns every command string clients asked this server to run,
// in order, exactly as the login shell received it.
func (s *SSHD) Commands() []string {
	b, err := os.ReadFile(s.commandsFile)
	if err != nil || len(b) == 0 {
		return nil
	}
	return strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
}

// WrongKnownHostsFile writes a new known_hosts file naming this server's
// address with a freshly generated key that is not the server's, and returns
// its path: a client using it must fail host-key verification.
func (s *SSHD) WrongKnownHostsFile() string {
	s.t.Helper()
	s.mu.Lock()
	s.nextKey++
	n := s.nextKey
	s.mu.Unlock()
	key := filepath.Join(s.Dir, fmt.Sprintf("impostor_%d", n))
	keygen(s.t, key, "vmhistory-test-impostor")
	pub, err := os.ReadFile(key + ".pub")
	if err != nil {
		s.t.Fatal(err)
	}
	path := filepath.Join(s.Dir, fmt.Sprintf("known_hosts_wrong_%d", n))
	writeFile(s.t, path, knownHostsLine(s.Port, pub), 0o644)
	return path
}

// UnauthorizedKeyFile generates a client key that the server does not
// accept and returns the path of its private half.
func (s *SSHD) UnauthorizedKeyFile() string {
	s.t.Helper()
	s.mu.Lock()
	s.nextKey++
	n := s.nextKey
	s.mu.Unlock()
	key := filepath.Join(s.Dir, fmt.Sprintf("stranger_%d", n))
	keygen(s.t, key, "vmhistory-test-stranger")
	return key
}

// ShortTempDir is a temporary directory with a path short enough for unix
// sockets (ssh's shared connections), removed when the test ends.
func ShortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "vmh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// SharedRunner is an ssh runner to this server that shares one connection
// among its commands, as vmhistory's replica runner does; the connection
// is closed when the test ends.
func (s *SSHD) SharedRunner(t testing.TB) *runner.SSH {
	t.Helper()
	cfg := s.SSHConfig()
	cfg.ControlPersist = time.Minute
	cfg.ControlDir = ShortTempDir(t)
	r, err := runner.NewSSH(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}
