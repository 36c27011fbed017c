// Command vmhistory keeps the history of KVM virtual machines whose disks live
// on ZFS: nightly snapshots, replication and kopia uploads, and one timeline of
// every snapshot to restore from.
package main

import (
	"errors"
	"fmt"
	"os"
)

func main() {
	stopProfile := startProfile()
	cmd := newRootCommand()
	c, err := cmd.ExecuteC()
	stopProfile()
	if err != nil {
		var exit *exitError
		if errors.As(err, &exit) {
			os.Exit(exit.code)
		}
		fmt.Fprintf(os.Stderr, "vmhistory: %v\n", err)
		if hint := usageHint(c, err); hint != "" {
			fmt.Fprintln(os.Stderr, hint)
		}
		os.Exit(1)
	}
}

// exitError ends the process with a specific status after the command has
// already told the user what went wrong.
type exitError struct {
	code int
}

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }
