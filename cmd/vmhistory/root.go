package main

import (
	"log/slog"
	"os"

	"github.com/spf13/cobra"
)

// globalOptions are the flags every subcommand shares.
type globalOptions struct {
	configPath string
	jsonOutput bool
	verbose    bool
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
			level := slog.LevelInfo
			if opts.verbose {
				level = slog.LevelDebug
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
		},
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
	root.AddCommand(newBenchCommand(opts))
	root.AddCommand(newDocsCommand())
	return root
}
