package testenv

import (
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// errPortTaken means a test server lost the race for its free port to
// another process; the caller picks another port.
var errPortTaken = errors.New("port taken")

// launchSpec says how to start one test server and how to tell it is up.
type launchSpec struct {
	what    string        // "sshd", "rclone serve webdav": for messages
	cmd     *exec.Cmd     // not started yet
	timeout time.Duration // how long it may take to answer
	answers func() bool
	// log returns the server's whole log; what it logged after this start
	// tells a taken port (portTakenText) from any other early exit.
	log           func() string
	portTakenText string
	// started receives the exit channel as soon as the process runs, before
	// stop may be called; stop kills it when it never answers.
	started func(exited chan struct{})
	stop    func()
}

// launch starts a test server in its own process group and waits until it
// answers.
func launch(s launchSpec) error {
	logStart := len(s.log())
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	go func() { s.cmd.Wait(); close(exited) }()
	s.started(exited)
	deadline := time.Now().Add(s.timeout)
	for {
		select {
		case <-exited:
			if log := s.log(); len(log) >= logStart && strings.Contains(log[logStart:], s.portTakenText) {
				return fmt.Errorf("%w: %s exited: %s", errPortTaken, s.what, s.cmd.ProcessState)
			}
			return fmt.Errorf("%s exited: %s", s.what, s.cmd.ProcessState)
		default:
		}
		if s.answers() {
			return nil
		}
		if time.Now().After(deadline) {
			s.stop()
			return fmt.Errorf("%s did not answer within %v", s.what, s.timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
