package runner_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/vmhistory/vmhistory/runner"
)

func TestLocalOutputAndStreams(t *testing.T) {
	t.Parallel()
	r := &runner.Local{}
	if r.Where() != "local" {
		t.Errorf("Where() = %q", r.Where())
	}
	out, err := r.Run(context.Background(), runner.Cmd{Args: []string{"printf", "%s|", "a b", "$HOME"}})
	if err != nil || string(out) != "a b|$HOME|" {
		t.Errorf("got %q, %v", out, err)
	}

	data := bytes.Repeat([]byte("0123456789\x00\xff"), 100000)
	var got bytes.Buffer
	out, err = r.Run(context.Background(), runner.Cmd{Args: []string{"cat"}, Stdin: bytes.NewReader(data), Stdout: &got})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 0 || !bytes.Equal(got.Bytes(), data) {
		t.Errorf("streaming: returned %d bytes, wrote %d of %d", len(out), got.Len(), len(data))
	}
}

func TestLocalErrorCarriesStderr(t *testing.T) {
	t.Parallel()
	r := &runner.Local{}
	_, err := r.Run(context.Background(), runner.Cmd{Args: []string{"sh", "-c", "echo 'dataset does not exist' >&2; exit 2"}})
	var rerr *runner.Error
	if !errors.As(err, &rerr) {
		t.Fatalf("got %v, want *runner.Error", err)
	}
	if rerr.ExitCode != 2 || rerr.Stderr != "dataset does not exist" || errors.Is(err, runner.ErrTimeout) {
		t.Errorf("error %#v", rerr)
	}
	if !strings.Contains(err.Error(), "dataset does not exist") || !strings.Contains(err.Error(), "sh -c") {
		t.Errorf("message %q", err)
	}

	_, err = r.Run(context.Background(), runner.Cmd{Args: []string{"/nonexistent/zfs"}})
	if !errors.As(err, &rerr) || rerr.ExitCode != -1 {
		t.Errorf("missing program: %v", err)
	}
}

func TestLocalTimeoutKillsCommandAndChildren(t *testing.T) {
	t.Parallel()
	sleep := uniqueSleep(t)
	// The child keeps stdout open: without the group kill Run would hang
	// until WaitDelay and leave the child running.
	r := &runner.Local{DefaultTimeout: time.Second}
	start := time.Now()
	_, err := r.Run(context.Background(), runner.Cmd{Args: []string{"sh", "-c", strings.Join(sleep, " ") + " & wait"}})
	if !errors.Is(err, runner.ErrTimeout) {
		t.Fatalf("got %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("took %v for a 1s timeout", d)
	}
	var rerr *runner.Error
	if errors.As(err, &rerr); rerr.Timeout != time.Second || !strings.Contains(err.Error(), "killed after timeout of 1s") {
		t.Errorf("error %v (Timeout %v)", err, rerr.Timeout)
	}
	assertGone(t, sleep[1])
}

func TestLocalCancel(t *testing.T) {
	t.Parallel()
	sleep := uniqueSleep(t)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	// The caller's deadline is a cancellation, not the command's timeout.
	_, err := (&runner.Local{}).Run(ctx, runner.Cmd{Args: sleep})
	if err == nil || errors.Is(err, runner.ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want the context's error", err)
	}
	assertGone(t, sleep[1])
}

// A reader that stalls must not keep Run from returning once the command
// has ended (an upstream zfs send that hangs while the receiver died).
func TestLocalStalledStdin(t *testing.T) {
	t.Parallel()
	pr, pw := io.Pipe()
	defer pw.Close()
	start := time.Now()
	_, err := (&runner.Local{}).Run(context.Background(), runner.Cmd{Args: []string{"cat"}, Stdin: pr, Timeout: time.Second})
	if !errors.Is(err, runner.ErrTimeout) {
		t.Fatalf("got %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("took %v", d)
	}

	_, err = (&runner.Local{}).Run(context.Background(), runner.Cmd{Args: []string{"sh", "-c", "exit 4"}, Stdin: pr})
	var rerr *runner.Error
	if !errors.As(err, &rerr) || rerr.ExitCode != 4 {
		t.Errorf("got %v, want exit 4", err)
	}
}

// A failing reader fails the command even if the command itself succeeded
// on the truncated input.
func TestLocalStdinReadError(t *testing.T) {
	t.Parallel()
	upstream := errors.New("zfs send died")
	stdin := io.MultiReader(strings.NewReader("partial"), iotest.ErrReader(upstream))
	out, err := (&runner.Local{}).Run(context.Background(), runner.Cmd{Args: []string{"cat"}, Stdin: stdin})
	if !errors.Is(err, upstream) || string(out) != "partial" {
		t.Errorf("got %q, %v; want the reader's error", out, err)
	}
}

func TestLocalStdinDefaultsToDevNull(t *testing.T) {
	t.Parallel()
	out, err := (&runner.Local{}).Run(context.Background(), runner.Cmd{Args: []string{"sh", "-c", "cat; readlink /proc/self/fd/0"}})
	if err != nil || strings.TrimSpace(string(out)) != "/dev/null" {
		t.Errorf("got %q, %v; want stdin /dev/null", out, err)
	}
}
