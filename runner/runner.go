// Package runner runs every external command vmhistory needs (zfs, and zfs
// over ssh on the replica) in one way: logged, bounded by a timeout, with
// stderr carried into the error.
package runner

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// DefaultTimeout bounds a command whose Cmd sets no timeout of its own.
const DefaultTimeout = 10 * time.Minute

// Cmd is one external command.
type Cmd struct {
	// Args holds the program and its arguments; Args[0] is looked up in PATH.
	Args []string
	// Stdin, when set, is copied to the command's standard input.
	Stdin io.Reader
	// Stdout, when set, receives the command's standard output as it is
	// produced; Run then returns no output of its own. Streams such as
	// zfs send use it.
	Stdout io.Writer
	// Timeout bounds the whole command; zero means the runner's default.
	Timeout time.Duration
}

// String renders the command line for logs and errors.
func (c Cmd) String() string { return strings.Join(c.Args, " ") }

// Runner runs commands on one host.
type Runner interface {
	// Run runs cmd to completion and returns its standard output (unless
	// cmd.Stdout is set). A failure is an *Error.
	Run(ctx context.Context, cmd Cmd) ([]byte, error)
	// Where names the host, for messages: "local" or "ssh://user@host:port".
	Where() string
}

// ErrTimeout is matched (errors.Is) by an *Error of a command killed at its timeout.
var ErrTimeout = errors.New("timed out")

// Error describes a failed command.
type Error struct {
	Where    string        // the runner's Where()
	Cmd      string        // the command line
	ExitCode int           // -1 when the command did not exit by itself
	Stderr   string        // trimmed standard error
	Timeout  time.Duration // set when the command was killed at its timeout
	Err      error         // the underlying error
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s", e.Cmd)
	if e.Where != "" && e.Where != "local" {
		fmt.Fprintf(&b, " (on %s)", e.Where)
	}
	switch {
	case e.Timeout > 0:
		fmt.Fprintf(&b, ": killed after timeout of %s", e.Timeout)
	case e.Err != nil:
		fmt.Fprintf(&b, ": %v", e.Err)
	}
	if e.Stderr != "" {
		fmt.Fprintf(&b, ": %s", e.Stderr)
	}
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

func (e *Error) Is(target error) bool { return target == ErrTimeout && e.Timeout > 0 }

// Local runs commands on this host.
type Local struct {
	// DefaultTimeout applies to commands without their own; zero means DefaultTimeout.
	DefaultTimeout time.Duration
	// Logger receives one debug line per command; nil means slog.Default().
	Logger *slog.Logger
}

// Where implements Runner.
func (l *Local) Where() string { return "local" }

// Run implements Runner.
func (l *Local) Run(ctx context.Context, c Cmd) ([]byte, error) {
	if len(c.Args) == 0 {
		return nil, errors.New("runner: empty command")
	}
	timeout := effectiveTimeout(c.Timeout, l.DefaultTimeout)
	ctx, cancel := withTimeout(ctx, timeout)
	defer cancel()

	cmd := exec.CommandContext(ctx, c.Args[0], c.Args[1:]...)
	// A process group lets the kill reach children a wrapper script started.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	out, err := execute(ctx, cmd, c, timeout, loggerOr(l.Logger), l.Where(), new(bytes.Buffer))
	return out, err
}

// stderrSink collects a command's standard error; String is called only
// after the command has finished.
type stderrSink interface {
	io.Writer
	String() string
}

// execute runs an already built exec.Cmd with the streams of c and turns its
// failure into an *Error; the SSH runner shares it (with a stderr sink that
// strips its own marker line).
func execute(ctx context.Context, cmd *exec.Cmd, c Cmd, timeout time.Duration, log *slog.Logger, where string, stderr stderrSink) ([]byte, error) {
	var stdout bytes.Buffer
	if c.Stdout != nil {
		cmd.Stdout = c.Stdout
	} else {
		cmd.Stdout = &stdout
	}
	cmd.Stderr = stderr
	start := time.Now()
	err := runFeedingStdin(cmd, c.Stdin)
	elapsed := time.Since(start)
	log.Debug("command", "where", where, "cmd", c.String(), "duration", elapsed.Round(time.Millisecond), "err", err)
	if err == nil {
		return stdout.Bytes(), nil
	}
	rerr := &Error{Where: where, Cmd: c.String(), ExitCode: -1, Stderr: strings.TrimSpace(stderr.String()), Err: err}
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		rerr.ExitCode = exitErr.ExitCode()
	}
	switch {
	case ctx.Err() == nil:
	case context.Cause(ctx) == errOwnTimeout:
		rerr.Timeout = timeout
	default: // the caller cancelled, or its own deadline passed
		rerr.Err = ctx.Err()
	}
	return stdout.Bytes(), rerr
}

// runFeedingStdin runs cmd with stdin as its standard input. exec.Cmd
// copies a non-file Stdin in a goroutine that Wait always waits for, even
// after WaitDelay, so a reader that blocks (an upstream zfs send that
// stalled) would keep Run from returning after the command died or was
// killed. Here the copy runs in a goroutine of its own that Wait does not
// wait for once the command has exited; it ends when the reader returns.
// A read error from stdin fails a command that otherwise succeeded, since
// the command then saw a truncated input.
func runFeedingStdin(cmd *exec.Cmd, stdin io.Reader) error {
	if stdin == nil {
		return cmd.Run() // exec gives the command /dev/null
	}
	if f, ok := stdin.(*os.File); ok {
		cmd.Stdin = f // connected directly, no copying
		return cmd.Run()
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	cmd.Stdin = pr
	err = cmd.Start()
	pr.Close()
	if err != nil {
		pw.Close()
		return err
	}
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(pw, stdin)
		pw.Close()
		copied <- err
	}()
	err = cmd.Wait()
	if err != nil {
		return err
	}
	// The command succeeded: it either read to the end, and then the copy
	// has finished, or stopped reading early, which is its business.
	select {
	case cerr := <-copied:
		if cerr != nil && !errors.Is(cerr, syscall.EPIPE) {
			return fmt.Errorf("reading standard input: %w", cerr)
		}
	case <-time.After(time.Second):
	}
	return nil
}

// errOwnTimeout is the cancel cause of a command's own timeout, which tells
// it apart from a deadline of the caller's context.
var errOwnTimeout = errors.New("command timeout")

func withTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeoutCause(ctx, d, errOwnTimeout)
}

func effectiveTimeout(own, runnerDefault time.Duration) time.Duration {
	if own > 0 {
		return own
	}
	if runnerDefault > 0 {
		return runnerDefault
	}
	return DefaultTimeout
}

func loggerOr(l *slog.Logger) *slog.Logger {
	if l != nil {
		return l
	}
	return slog.Default()
}
