package testenv

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/runner"
)

func TestSSHD(t *testing.T) {
	s := StartSSHD(t)
	r, err := runner.NewSSH(s.SSHConfig())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	out, err := r.Run(ctx, runner.Cmd{Args: []string{"echo", "hello", "from sshd"}})
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != "hello from sshd\n" {
		t.Errorf("output %q", out)
	}

	log := s.Log()
	for _, want := range []string{"Accepted publickey for root", "Starting session: forced-command (config)", "testenv-sshd: command: ", "'from sshd'"} {
		if !strings.Contains(log, want) {
			t.Errorf("sshd log lacks %q:\n%s", want, log)
		}
	}
	cmds := s.Commands()
	if len(cmds) != 1 || !strings.Contains(cmds[0], "echo hello 'from sshd'") {
		t.Errorf("Commands() = %q", cmds)
	}

	// The sftp subsystem works through the recording ForceCommand too.
	sftp := exec.Command("sftp", "-b", "-", "-i", s.IdentityFile, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
		"-o", "UserKnownHostsFile="+s.KnownHostsFile, "-o", "StrictHostKeyChecking=yes", "-P", strconv.Itoa(s.Port), "root@127.0.0.1")
	sftp.Stdin = strings.NewReader("ls -1 " + s.Dir + "\n")
	if out, err := sftp.CombinedOutput(); err != nil || !strings.Contains(string(out), "authorized_keys") {
		t.Errorf("sftp: %v\n%s", err, out)
	}

	wrong := s.WrongKnownHostsFile()
	good, _ := os.ReadFile(s.KnownHostsFile)
	bad, _ := os.ReadFile(wrong)
	if string(good) == string(bad) || !strings.HasPrefix(string(bad), strings.Fields(string(good))[0]+" ssh-ed25519 ") {
		t.Errorf("wrong known_hosts %q vs %q", bad, good)
	}

	s.Stop()
	if answers(s.Port) {
		t.Fatal("sshd still answers after Stop")
	}
	if _, err := r.Run(ctx, runner.Cmd{Args: []string{"true"}}); !errors.Is(err, runner.ErrConnect) {
		t.Errorf("after Stop: got %v, want ErrConnect", err)
	}
	s.Stop() // idempotent

	s.Restart()
	if _, err := r.Run(ctx, runner.Cmd{Args: []string{"true"}}); err != nil {
		t.Errorf("after Restart: %v", err)
	}
}
