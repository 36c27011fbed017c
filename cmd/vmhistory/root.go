package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// globalOptions are the flags every subcommand shares.
type globalOptions struct {
	configPath string
	jsonOutput bool
	verbose    bool
	// started is when the command began (set before it runs), for the
	// times a command reports from its start.
	started time.Time
}

const defaultConfigPath = "/etc/vmhistory/config.yaml"

func newRootCommand() *cobra.Command {
	opts := &globalOptions{}
	root := &cobra.Command{
		Use:   "vmhistory",
		Short: "History of KVM virtual machines on ZFS: snapshot, replicate, upload, restore",
		Long: `vmhistory keeps the history of KVM virtual machines whose disks live on a
ZFS dataset, and makes any old disk quick to get back.

Nightly, "vmhistory backup" quiesces the VMs through libvirt, takes a ZFS
snapshot, resumes the VMs, prunes old local snapshots, replicates the snapshot
incrementally to a second machine with zfs send/receive and uploads it to a
kopia repository.

To get data back, "vmhistory timeline" lists every snapshot that exists
anywhere (local ZFS, the replica, kopia), "vmhistory mount" shows them all as
one read-only filesystem and "vmhistory restore" copies a file out, each read
served from the fastest place that has it.

Everything is configured in one YAML file (--config, default
` + defaultConfigPath + `); "vmhistory config check" validates it.`,
		Example: `  vmhistory config check
  vmhistory config check --config ./config.yaml --json
  vmhistory completion bash > /etc/bash_completion.d/vmhistory`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, args []string) {
			opts.started = time.Now()
			level := slog.LevelInfo
			if opts.verbose {
				level = slog.LevelDebug
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level, ReplaceAttr: plainErrors})))
		},
	}
	// --version, as most tools have it; the same output as "version".
	var showVersion bool
	root.Flags().BoolVar(&showVersion, "version", false, "print the version of vmhistory (as \"vmhistory version\")")
	root.Args = cobra.NoArgs
	root.RunE = func(cmd *cobra.Command, args []string) error {
		if showVersion {
			return printVersion(cmd.OutOrStdout(), opts.jsonOutput)
		}
		return cmd.Help()
	}
	flags := root.PersistentFlags()
	flags.StringVarP(&opts.configPath, "config", "c", defaultConfigPath, "path of the YAML configuration file")
	flags.BoolVar(&opts.jsonOutput, "json", false, "print results as JSON, for scripts")
	flags.BoolVarP(&opts.verbose, "verbose", "v", false, "log debug messages (every external command, with its duration) to stderr")

	root.AddCommand(newVersionCommand(opts))
	root.AddCommand(newConfigCommand(opts))
	root.AddCommand(newRepoCommand(opts))
	root.AddCommand(newBackupCommand(opts))
	root.AddCommand(newRestoreCommand(opts))
	root.AddCommand(newTimelineCommand(opts))
	root.AddCommand(newMountCommand(opts))
	root.AddCommand(newBootCommand(opts))
	root.AddCommand(newBenchCommand(opts))
	root.AddCommand(newDocsCommand())
	markUsageErrors(root)
	return root
}

// usageError is a command line that does not fit the command (a wrong
// flag, a wrong number of arguments); main points to the command's --help.
type usageError struct {
	cmd *cobra.Command
	err error
}

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

// Hint is the line main prints under the error.
func (e *usageError) Hint() string {
	return fmt.Sprintf("Run '%s --help' for usage.", e.cmd.CommandPath())
}

// markUsageErrors makes the flag and argument errors of cmd and every
// command below it usageErrors.
func markUsageErrors(cmd *cobra.Command) {
	cmd.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return &usageError{cmd: c, err: err} })
	if check := cmd.Args; check != nil {
		cmd.Args = func(c *cobra.Command, args []string) error {
			if err := check(c, args); err != nil {
				return &usageError{cmd: c, err: err}
			}
			return nil
		}
	}
	for _, sub := range cmd.Commands() {
		markUsageErrors(sub)
	}
}

// usageHint is the pointer to --help for an error that ExecuteC returned
// from c, "" when the error is not about the command line. An unknown
// command and a missing required flag come from cobra without a type to
// tell them by.
func usageHint(c *cobra.Command, err error) string {
	var ue *usageError
	switch {
	case errors.As(err, &ue):
		return ue.Hint()
	case c != nil && (strings.HasPrefix(err.Error(), "required flag") || strings.HasPrefix(err.Error(), "unknown command")):
		return (&usageError{cmd: c, err: err}).Hint()
	}
	return ""
}

// plainErrors logs an error as its message: the text handler formats an
// error with %+v, which for kopia's errors (github.com/pkg/errors) appends
// a stack trace to every wrapped layer.
func plainErrors(_ []string, a slog.Attr) slog.Attr {
	if err, ok := a.Value.Any().(error); ok && a.Value.Kind() == slog.KindAny {
		return slog.String(a.Key, err.Error())
	}
	return a
}
