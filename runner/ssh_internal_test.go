package runner

import (
	"errors"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestPIDSinkStripsMarker(t *testing.T) {
	stderr := "banner from the login shell\n" + pidMarker + "4242\nzfs: cannot open 'x'\npartial"
	for _, chunk := range []int{1, 3, 7, len(stderr)} {
		p := newPIDSink()
		for i := 0; i < len(stderr); i += chunk {
			p.Write([]byte(stderr[i:min(i+chunk, len(stderr))]))
		}
		if got, want := p.String(), "banner from the login shell\nzfs: cannot open 'x'\npartial"; got != want {
			t.Errorf("chunk %d: stderr %q, want %q", chunk, got, want)
		}
		if !p.started() || p.waitPID(0) != 4242 {
			t.Errorf("chunk %d: pid %d started %v", chunk, p.waitPID(0), p.started())
		}
	}

	p := newPIDSink()
	p.Write([]byte("ssh: connect to host 127.0.0.1 port 1: Connection refused\r\n"))
	if p.started() || p.waitPID(10*time.Millisecond) != 0 || !strings.Contains(p.String(), "Connection refused") {
		t.Errorf("without marker: %q started %v", p.String(), p.started())
	}
	// A marker-like line from the command itself, after the real one, stays.
	p = newPIDSink()
	p.Write([]byte(pidMarker + "7\n" + pidMarker + "8\n"))
	if p.waitPID(0) != 7 || p.String() != pidMarker+"8\n" {
		t.Errorf("second marker: pid %d stderr %q", p.waitPID(0), p.String())
	}
}

func TestShellQuote(t *testing.T) {
	for _, s := range []string{"", "plain", "a b", "it's", `"`, "$HOME", "`x`", "a\nb", `\`, "*", "-x", "~", "a=b", "%s", "ü"} {
		out, err := exec.Command("sh", "-c", "printf %s "+shellQuote(s)).Output()
		if err != nil || string(out) != s {
			t.Errorf("shellQuote(%q) = %s: sh printed %q (%v)", s, shellQuote(s), out, err)
		}
	}
}

// The remote wrapper run by a local shell, as sshd would run it: it reports
// the pid of the process that then becomes the command, and its timeout
// backstop ends the command by itself.
func TestRemoteCommandBackstop(t *testing.T) {
	start := time.Now()
	cmd := exec.Command("bash", "-c", remoteCommand([]string{"sleep", "30"}, time.Second))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Start()
	if err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 124 {
		t.Errorf("got %v, want exit 124 from timeout", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("backstop took %v", d)
	}
	if want := pidMarker + strconv.Itoa(cmd.Process.Pid) + "\n"; stderr.String() != want {
		t.Errorf("stderr %q, want %q (the shell must exec all the way down)", stderr.String(), want)
	}
}
