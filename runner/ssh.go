package runner

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Errors an SSH runner's *Error matches (errors.Is) when ssh itself, not the
// remote command, failed.
var (
	// ErrHostKey: the server's host key is missing from, or differs from, the
	// configured known_hosts file. Never retried, never bypassed.
	ErrHostKey = errors.New("host key verification failed")
	// ErrAuth: the server refused the client's key.
	ErrAuth = errors.New("ssh authentication failed")
	// ErrConnect: no connection could be made, or it was lost mid-command.
	ErrConnect = errors.New("ssh connection failed")
)

// DefaultConnectTimeout applies when SSHConfig.ConnectTimeout is zero.
const DefaultConnectTimeout = 10 * time.Second

// SSHConfig says how to reach a host with the OpenSSH client.
type SSHConfig struct {
	User string // remote user; empty means ssh's default (the local user or ~/.ssh/config)
	Host string // host name or address
	Port int    // zero means 22
	// IdentityFile is the private key; when set it is the only key offered
	// (IdentitiesOnly). Empty means ssh's defaults and agent.
	IdentityFile string
	// KnownHostsFile holds the host key of Host; required. Host-key checking
	// is always strict, and the global known_hosts is not consulted, so this
	// file alone decides which server is trusted.
	KnownHostsFile string
	// ConnectTimeout bounds connecting and the key exchange; zero means
	// DefaultConnectTimeout.
	ConnectTimeout time.Duration
	// ControlPersist, when positive, shares one connection among the
	// commands (ssh ControlMaster=auto) and keeps it open that long after
	// the last one. A connection costs a key exchange and authentication
	// (0.3-0.6 s measured on loopback here, far more over a WAN), and a
	// night runs dozens of short zfs commands. Zero gives every command its
	// own connection.
	ControlPersist time.Duration
	// ControlDir holds the shared connections' sockets; it is created 0700.
	// Empty means /run/vmhistory/ssh for root, else a per-user directory
	// under the temporary directory.
	ControlDir string
	// ExtraOptions are passed as "-o OPTION" each (e.g. "Compression=yes",
	// "ProxyJump=bastion"). They come after the options this runner sets,
	// and ssh keeps the first value it sees, so they cannot weaken host-key
	// checking, batch mode or the timeouts.
	ExtraOptions []string
}

// SSH runs commands on another host through the OpenSSH client (`ssh`).
//
// Each command gets its own connection unless SSHConfig.ControlPersist asks
// for a shared one. Sharing is off by default for the narrowest failure
// domain: a master that dies takes its commands with it (they fail with
// ErrConnect, and the next command opens a new master).
//
// Stopping the remote command. Killing the local ssh client does not stop a
// command on the far side: without a tty sshd sends it no SIGHUP, and a
// command that neither reads stdin nor writes stdout (a hung zfs destroy,
// sleep) runs on for ever. So the remote command is wrapped as
//
//	exec sh -c 'echo vmhistory-ssh-pid=$$ >&2; exec timeout -k 5 SECS "$@"' vmhistory ARGS...
//
// The first line on stderr gives the remote pid (stripped before stderr is
// returned). sshd puts every session in its own session and process group,
// and every step above is an exec, so that pid is also the process group of
// the command and all its children. On timeout or cancellation Run first
// opens a second short ssh connection that sends TERM to the group, waits up
// to 5 s for it to go, then sends KILL, and only then kills the local
// client. The remote coreutils timeout (used only if the host has it) is a
// backstop for when that second connection cannot be made (the network is
// gone): it fires a little after the local timeout and also forwards the TERM
// to the whole group, escalating to KILL after 5 s.
type SSH struct {
	// DefaultTimeout applies to commands without their own; zero means DefaultTimeout.
	DefaultTimeout time.Duration
	// Logger receives one debug line per command; nil means slog.Default().
	Logger *slog.Logger

	cfg SSHConfig
}

// NewSSH checks cfg and returns a runner for its host.
func NewSSH(cfg SSHConfig) (*SSH, error) {
	if cfg.Port == 0 {
		cfg.Port = 22
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if cfg.ControlPersist > 0 {
		if cfg.ControlDir == "" {
			cfg.ControlDir = "/run/vmhistory/ssh"
			if os.Geteuid() != 0 {
				cfg.ControlDir = fmt.Sprintf("%s/vmhistory-ssh-%d", os.TempDir(), os.Geteuid())
			}
		}
		// ssh binds the socket at DIR/<40-hex %C>.<16 random chars>; a
		// sockaddr_un path holds at most 107 bytes.
		if len(cfg.ControlDir)+1+40+17 > 107 {
			return nil, fmt.Errorf("ssh runner: connection sharing directory %q is too long for a unix socket path (at most %d characters)", cfg.ControlDir, 107-58)
		}
		if err := privateDir(cfg.ControlDir); err != nil {
			return nil, fmt.Errorf("ssh runner: connection sharing directory: %w", err)
		}
	}
	return &SSH{cfg: cfg}, nil
}

// privateDir makes sure dir exists, belongs to us and is 0700: whoever can
// reach a control socket can run commands as us on the remote host.
func privateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok || int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s is not a directory owned by uid %d", dir, os.Geteuid())
	}
	if fi.Mode().Perm() != 0o700 {
		return os.Chmod(dir, 0o700)
	}
	return nil
}

// Close ends the shared connection, if one is open. Commands keep working
// afterwards (they open a new one); Close is for a clean exit.
func (s *SSH) Close() error {
	if s.cfg.ControlPersist <= 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// sshArgs ends with "-p PORT DEST --"; -O wants the destination last.
	base := s.sshArgs()
	dest := base[len(base)-2]
	args := append(base[:len(base)-2:len(base)-2], "-O", "exit", dest)
	out, err := exec.CommandContext(ctx, "ssh", args...).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "No such file") && !strings.Contains(string(out), "Control socket connect") {
		return fmt.Errorf("close shared ssh connection to %s: %v: %s", s.cfg.hostPort(), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (c SSHConfig) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("ssh runner: "+format, args...)
	}
	switch {
	case c.Host == "":
		return bad("no host given")
	case strings.HasPrefix(c.Host, "-") || strings.ContainsAny(c.Host, "@ \t\r\n'\"\\"):
		return bad("host %q is not a host name or address", c.Host)
	case strings.HasPrefix(c.User, "-") || strings.ContainsAny(c.User, "@: \t\r\n'\"\\"):
		return bad("user %q is not a user name", c.User)
	case c.Port < 1 || c.Port > 65535:
		return bad("port %d is out of range", c.Port)
	case c.KnownHostsFile == "":
		return bad("no known_hosts file given for %s: host-key checking is required (collect the key with ssh-keyscan -p %d %s, check its fingerprint, and save it)", c.hostPort(), c.Port, c.Host)
	}
	// ssh splits option values at white space and expands %-tokens, ${VAR}
	// and ~ in these paths; refuse characters that would change the path
	// rather than quote them for one ssh version.
	for _, p := range []struct{ what, path string }{{"known_hosts file", c.KnownHostsFile}, {"identity file", c.IdentityFile}} {
		if strings.ContainsAny(p.path, " \t\r\n'\"\\%$#") || strings.HasPrefix(p.path, "-") {
			return bad("%s path %q contains a character ssh would interpret (white space, quote, backslash, %%, $ or #, or a leading -)", p.what, p.path)
		}
	}
	for _, o := range c.ExtraOptions {
		if o == "" || strings.HasPrefix(o, "-") || strings.ContainsAny(o, "\r\n") {
			return bad("extra option %q is not a single ssh_config option such as Compression=yes", o)
		}
	}
	return nil
}

func (c SSHConfig) hostPort() string { return net.JoinHostPort(c.Host, strconv.Itoa(c.Port)) }

// Config returns the configuration in force (with defaults filled in).
func (s *SSH) Config() SSHConfig { return s.cfg }

// Where implements Runner: "ssh://user@host:port".
func (s *SSH) Where() string {
	user := ""
	if s.cfg.User != "" {
		user = s.cfg.User + "@"
	}
	return "ssh://" + user + s.cfg.hostPort()
}

// remoteGrace is how much later than the local timeout the remote
// `timeout` backstop fires, so the local side normally acts first and reports
// ErrTimeout.
const remoteGrace = 10 * time.Second

// pidMarker starts the line the remote wrapper writes to stderr.
const pidMarker = "vmhistory-ssh-pid="

// Run implements Runner.
func (s *SSH) Run(ctx context.Context, c Cmd) ([]byte, error) {
	if len(c.Args) == 0 {
		return nil, errors.New("runner: empty command")
	}
	log := loggerOr(s.Logger)
	timeout := effectiveTimeout(c.Timeout, s.DefaultTimeout)
	ctx, cancel := withTimeout(ctx, timeout)
	defer cancel()

	args := append(s.sshArgs(), remoteCommand(c.Args, timeout+remoteGrace))
	cmd := exec.CommandContext(ctx, "ssh", args...)
	// Its own process group, so the kill also reaches a ProxyCommand.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	sink := newPIDSink()
	cmd.Cancel = func() error {
		s.stopRemote(sink, log)
		err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		if errors.Is(err, syscall.ESRCH) {
			return os.ErrProcessDone // it ended when the remote command did
		}
		return err
	}
	cmd.WaitDelay = 5 * time.Second
	out, err := execute(ctx, cmd, c, timeout, log, s.Where(), sink)
	var rerr *Error
	if errors.As(err, &rerr) && ctx.Err() == nil {
		s.classify(rerr, sink.started())
	}
	return out, err
}

// sshArgs are the client options and destination, ending with "--"; the
// remote command follows.
func (s *SSH) sshArgs() []string {
	c := s.cfg
	a := []string{
		"-T",         // no tty: binary-clean streams
		"-e", "none", // no escape character either
		"-o", "BatchMode=yes", // never prompt
		"-o", "StrictHostKeyChecking=yes",
		"-o", "UserKnownHostsFile=" + c.KnownHostsFile,
		"-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "UpdateHostKeys=no", // never write to the known_hosts file
		"-o", "CheckHostIP=no",
		"-o", "ConnectTimeout=" + strconv.Itoa(ceilSeconds(c.ConnectTimeout)),
		"-o", "ServerAliveInterval=15",
		"-o", "ServerAliveCountMax=3",
		"-o", "ClearAllForwardings=yes",
		"-o", "ForwardAgent=no",
		"-o", "ForwardX11=no",
		"-o", "PermitLocalCommand=no",
		"-o", "RemoteCommand=none",
	}
	if c.ControlPersist > 0 {
		a = append(a,
			"-o", "ControlMaster=auto",
			"-o", "ControlPath="+c.ControlDir+"/%C",
			"-o", "ControlPersist="+strconv.Itoa(ceilSeconds(c.ControlPersist)))
	} else {
		a = append(a, "-o", "ControlMaster=no", "-o", "ControlPath=none")
	}
	if c.IdentityFile != "" {
		a = append(a, "-o", "IdentitiesOnly=yes", "-i", c.IdentityFile)
	}
	for _, o := range c.ExtraOptions {
		a = append(a, "-o", o)
	}
	dest := c.Host
	if c.User != "" {
		dest = c.User + "@" + c.Host
	}
	return append(a, "-p", strconv.Itoa(c.Port), dest, "--")
}

func ceilSeconds(d time.Duration) int {
	n := int((d + time.Second - 1) / time.Second)
	return max(n, 1)
}

// remoteCommand renders args as the command string sshd hands to the
// remote login shell (any POSIX shell), wrapped as described on SSH.
func remoteCommand(args []string, backstop time.Duration) string {
	script := fmt.Sprintf(`echo %s$$ >&2; if command -v timeout >/dev/null 2>&1; then exec timeout -k 5 %d "$@"; fi; exec "$@"`,
		pidMarker, ceilSeconds(backstop))
	var b strings.Builder
	b.WriteString("exec sh -c ")
	b.WriteString(shellQuote(script))
	b.WriteString(" vmhistory")
	for _, a := range args {
		b.WriteByte(' ')
		b.WriteString(shellQuote(a))
	}
	return b.String()
}

// shellQuote quotes s as one word for a POSIX shell.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+.,/:@%") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// stopRemote ends the remote command of a cancelled or timed-out Run: TERM
// to its process group, up to 5 s to go, then KILL. It waits briefly for the
// pid line if it has not arrived yet; if it never does, the command did not
// start (or the remote timeout backstop has to do the job). The signals go
// by pid, so a command that ended just now could in principle leave its pid
// to another process; the KILL is sent only while the pid still exists
// after the TERM, which keeps that window to a poll interval.
func (s *SSH) stopRemote(sink *pidSink, log *slog.Logger) {
	pid := sink.waitPID(time.Second)
	if pid <= 1 {
		log.Debug("ssh: remote pid unknown, cannot stop remote command", "where", s.Where())
		return
	}
	script := fmt.Sprintf(`p=%d; kill -TERM -$p 2>/dev/null; kill -TERM $p 2>/dev/null; i=0; `+
		`while kill -0 $p 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; `+
		`kill -KILL -$p 2>/dev/null; kill -KILL $p 2>/dev/null; exit 0`, pid)
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ConnectTimeout+10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ssh", append(s.sshArgs(), script)...)
	cmd.WaitDelay = time.Second
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		log.Warn("ssh: could not stop remote command; the remote timeout will", "where", s.Where(), "pid", pid,
			"err", err, "output", strings.TrimSpace(string(out)))
		return
	}
	log.Debug("command", "where", s.Where(), "cmd", "kill "+strconv.Itoa(pid), "duration", time.Since(start).Round(time.Millisecond))
}

// sshFailure is the Err of an *Error when ssh itself failed.
type sshFailure struct {
	kind   error // ErrHostKey, ErrAuth or ErrConnect
	detail string
	cause  error
}

func (f *sshFailure) Error() string   { return f.kind.Error() + ": " + f.detail }
func (f *sshFailure) Unwrap() []error { return []error{f.kind, f.cause} }

// classify recognises failures of ssh itself (exit status 255 with one of
// the client's messages) and puts a readable sshFailure into e.Err. started
// says whether the remote command had begun: before that, host key, auth and
// connect errors; after it only a lost connection.
func (s *SSH) classify(e *Error, started bool) {
	if e.ExitCode != 255 {
		return
	}
	has := func(subs ...string) bool {
		for _, sub := range subs {
			if strings.Contains(e.Stderr, sub) {
				return true
			}
		}
		return false
	}
	hp, kh := s.cfg.hostPort(), s.cfg.KnownHostsFile
	var kind error
	var detail string
	switch {
	case !started && has("REMOTE HOST IDENTIFICATION HAS CHANGED", "has changed and you have requested strict checking"):
		kind, detail = ErrHostKey, fmt.Sprintf("the key the server at %s presented is not the one in %s (if the server was reinstalled, check the new key's fingerprint and replace the line)", hp, kh)
	case !started && has("host key is known for", "Host key verification failed"):
		kind, detail = ErrHostKey, fmt.Sprintf("no key for %s is recorded in %s (collect it with ssh-keyscan -p %d %s, check its fingerprint, and add it)", hp, kh, s.cfg.Port, s.cfg.Host)
		if _, err := os.Stat(kh); errors.Is(err, os.ErrNotExist) {
			detail = fmt.Sprintf("the known_hosts file %s for %s does not exist", kh, hp)
		}
	case !started && has("Permission denied ("):
		key := s.cfg.IdentityFile
		if key == "" {
			key = "(ssh's default keys)"
		}
		kind, detail = ErrAuth, fmt.Sprintf("%s refused key %s for user %q", hp, key, s.cfg.User)
	case !started && has("Connection refused"):
		kind, detail = ErrConnect, fmt.Sprintf("connection to %s refused (is sshd running there?)", hp)
	case !started && has("Connection timed out", "Operation timed out"):
		kind, detail = ErrConnect, fmt.Sprintf("connection to %s timed out", hp)
	case !started && has("No route to host", "Network is unreachable"):
		kind, detail = ErrConnect, fmt.Sprintf("%s is unreachable", hp)
	case !started && has("Could not resolve hostname", "Name or service not known", "Temporary failure in name resolution"):
		kind, detail = ErrConnect, fmt.Sprintf("cannot resolve host name %s", s.cfg.Host)
	case !started && has("kex_exchange_identification", "Connection closed by", "Connection reset by"):
		kind, detail = ErrConnect, fmt.Sprintf("%s closed the connection before the command started", hp)
	case has("closed by remote host", "Connection reset by", "client_loop: send disconnect", "Read from remote host", "not responding"):
		kind, detail = ErrConnect, fmt.Sprintf("connection to %s lost while the command ran", hp)
	default:
		return
	}
	e.Err = &sshFailure{kind: kind, detail: detail, cause: e.Err}
}

// pidSink collects the ssh client's stderr, removing the remote wrapper's
// pid line and remembering the pid. Lines before it (ssh warnings, login
// shell noise) are kept.
type pidSink struct {
	mu      sync.Mutex
	out     bytes.Buffer
	line    []byte // incomplete line while the marker is still awaited
	done    bool   // marker found, or given up looking
	pid     int
	seen    bool
	seenCh  chan struct{}
	scanned int
}

// maxMarkerScan bounds how much stderr is searched for the marker.
const maxMarkerScan = 1 << 20

func newPIDSink() *pidSink { return &pidSink{seenCh: make(chan struct{})} }

func (p *pidSink) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done {
		return p.out.Write(b)
	}
	p.line = append(p.line, b...)
	for !p.done {
		i := bytes.IndexByte(p.line, '\n')
		if i < 0 {
			if p.scanned+len(p.line) > maxMarkerScan {
				p.giveUp()
			}
			break
		}
		l := p.line[:i]
		if rest, ok := bytes.CutPrefix(bytes.TrimSuffix(l, []byte("\r")), []byte(pidMarker)); ok {
			if pid, err := strconv.Atoi(string(rest)); err == nil {
				p.pid, p.seen = pid, true
				close(p.seenCh)
				p.out.Write(p.line[i+1:])
				p.line, p.done = nil, true
				break
			}
		}
		p.out.Write(p.line[:i+1])
		p.scanned += i + 1
		p.line = p.line[i+1:]
		if p.scanned > maxMarkerScan {
			p.giveUp()
		}
	}
	return len(b), nil
}

func (p *pidSink) giveUp() {
	p.out.Write(p.line)
	p.line, p.done = nil, true
}

// String returns stderr without the marker line.
func (p *pidSink) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String() + string(p.line)
}

func (p *pidSink) started() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seen
}

// waitPID returns the remote pid, waiting up to d for it; 0 if unknown.
func (p *pidSink) waitPID(d time.Duration) int {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.seenCh:
	case <-t.C:
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// StartSubsystem starts an ssh subsystem on the host (e.g. "sftp", which
// `ssh -s HOST sftp` starts) with this runner's options: the same host-key
// checking, key, timeouts and shared connection as Run. It returns the
// subsystem's standard input and output; wait waits for ssh to exit and
// returns why it did, with its standard error. Cancelling ctx kills the
// ssh client, which ends the subsystem on the far side (sshd closes the
// session's channel). Unlike Run there is no timeout: the subsystem lives
// as long as ctx.
func (s *SSH) StartSubsystem(ctx context.Context, name string) (stdin io.WriteCloser, stdout io.Reader, wait func() error, err error) {
	if name == "" || strings.HasPrefix(name, "-") || strings.ContainsAny(name, " \t\r\n'\"\\") {
		return nil, nil, nil, fmt.Errorf("ssh runner: invalid subsystem name %q", name)
	}
	args := append([]string{"-s"}, s.sshArgs()...)
	args = append(args, name)
	cmd := exec.CommandContext(ctx, "ssh", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		if errors.Is(err, syscall.ESRCH) {
			return os.ErrProcessDone
		}
		return err
	}
	cmd.WaitDelay = 5 * time.Second
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	if stdin, err = cmd.StdinPipe(); err != nil {
		return nil, nil, nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, nil, fmt.Errorf("start ssh subsystem %s on %s: %w", name, s.Where(), err)
	}
	log := loggerOr(s.Logger)
	log.Debug("ssh subsystem started", "where", s.Where(), "subsystem", name)
	wait = func() error {
		err := cmd.Wait()
		if err == nil {
			return nil
		}
		rerr := &Error{Where: s.Where(), Cmd: "ssh -s " + name, ExitCode: -1, Stderr: strings.TrimSpace(stderr.String()), Err: err}
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			rerr.ExitCode = exitErr.ExitCode()
		}
		if ctx.Err() != nil {
			rerr.Err = ctx.Err()
		} else {
			s.classify(rerr, false)
		}
		return rerr
	}
	return stdin, out, wait, nil
}

// lockedBuffer is a bytes.Buffer safe for a writer goroutine and a reader.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
