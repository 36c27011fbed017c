package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

// interruptSignals stop a long-running command at its next safe point:
// VMs quiesced are resumed, the report and metrics written, a mount
// unmounted, clones and holds released. SIGHUP is one of them: it is what
// an admin's dropped ssh session sends, and its default action would end
// the process on the spot, VMs still stopped.
var interruptSignals = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP}

// interruptContext is cancelled by the first of interruptSignals.
func interruptContext(parent context.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(parent, interruptSignals...)
}

// ignoreBrokenPipe keeps a write to a closed stdout or stderr (the ssh
// session that started the command is gone) from ending the process with
// SIGPIPE in the middle of a backup or a mount: the write fails instead,
// and the command carries on to its safe end. It is caught, not ignored:
// an ignored signal would stay ignored in the zfs and ssh processes the
// command starts.
func ignoreBrokenPipe() { signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE) }
