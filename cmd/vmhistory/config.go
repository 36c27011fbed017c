package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/backup"
	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/zfs"
)

// exitConfigInvalid is the exit status when the configuration file is
// missing or invalid; the problems have been printed already.
const exitConfigInvalid = 1

// loadConfig loads the file named by --config with every check. When it is
// missing or invalid it prints each problem on its own line to stderr and
// returns an *exitError, so that a command can simply return the error:
//
//	cfg, err := loadConfig(cmd, opts)
//	if err != nil {
//		return err
//	}
func loadConfig(cmd *cobra.Command, opts *globalOptions) (*config.Config, error) {
	cfg, err := config.Load(opts.configPath)
	if err != nil {
		return nil, reportConfigProblems(cmd, err)
	}
	return cfg, nil
}

// reportConfigProblems prints the problems of a *config.Errors one per line
// to stderr and returns the *exitError that ends the process quietly; any
// other error is returned as it is.
func reportConfigProblems(cmd *cobra.Command, err error) error {
	var problems *config.Errors
	if !errors.As(err, &problems) {
		return err
	}
	for _, line := range problems.Lines() {
		fmt.Fprintln(cmd.ErrOrStderr(), line)
	}
	return &exitError{code: exitConfigInvalid}
}

// newConfigCommand groups the commands that inspect the configuration file.
func newConfigCommand(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "Inspect and validate the configuration file",
		Long: `Inspect and validate the configuration file.

vmhistory reads one YAML file, /etc/vmhistory/config.yaml unless --config
names another. "vmhistory config example" prints a commented example to start
from, and "vmhistory config check" validates a file and prints it with every
default filled in.`,
		Example: `  # Start a configuration from the example, edit it, check it:
  vmhistory config example > /etc/vmhistory/config.yaml
  vmhistory config check`,
	}
	cmd.AddCommand(newConfigCheckCommand(opts), newConfigExampleCommand())
	return cmd
}

func newConfigCheckCommand(opts *globalOptions) *cobra.Command {
	var skipFiles bool
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Validate the configuration file and print it with defaults filled in",
		Long: `Validate the configuration file and print it with defaults filled in.

Every problem is reported, not just the first, one per line on stderr, as
FILE:LINE: KEY: "VALUE" MESSAGE, for example:

  /etc/vmhistory/config.yaml:12: keep_local: "-3" must be at least 1
  /etc/vmhistory/config.yaml:20: kopia.password_file: "/etc/vmhistory/kopia.password" is readable by group or other (mode 0644); run: chmod 600 /etc/vmhistory/kopia.password

and the command exits with status 1. A valid file is printed as YAML (or, with
--json, as JSON) with every default filled in and every derived value
resolved: each dataset's VMs and replica dataset, keep_replica, the kopia
host. What is printed is what the nightly backup will use.

Besides the file itself, check looks at this machine: the kopia password
file and the ssh identity must exist and be readable by their owner only,
known_hosts and the kopia repository config must exist, the metrics
directory must exist and zfs must be found. --skip-files leaves those
checks out, to check a file written for another host. It also warns,
without failing, when quiesce mode managedsave with qemu:///system would
leave the VMs' RAM out of the snapshots: libvirt writes managed-save images
to /var/lib/libvirt/qemu/save, which should be on a selected dataset.`,
		Example: `  vmhistory config check
  vmhistory config check --config ./config.yaml
  vmhistory config check --json | jq -r '.datasets[].replica_dataset'
  vmhistory config check --skip-files --config ./for-the-other-host.yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := config.Options{SkipFileChecks: skipFiles}.Load(opts.configPath)
			if err != nil {
				var problems *config.Errors
				if opts.jsonOutput && errors.As(err, &problems) {
					// Scripts get the problems as data on stdout too.
					if err := writeIndentedJSON(cmd.OutOrStdout(), struct {
						Valid bool `json:"valid"`
						*config.Errors
					}{false, problems}); err != nil {
						return err
					}
				}
				return reportConfigProblems(cmd, err)
			}
			if !skipFiles {
				local := zfs.New(&runner.Local{}, zfs.Options{Binary: cfg.ZFS.Binary, CommandTimeout: cfg.ZFS.CommandTimeout})
				for _, w := range backup.ConfigWarnings(cmd.Context(), cfg, local) {
					fmt.Fprintf(cmd.ErrOrStderr(), "warning: %s\n", w)
				}
			}
			if opts.jsonOutput {
				return writeIndentedJSON(cmd.OutOrStdout(), cfg)
			}
			out, err := cfg.YAML()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "# %s is valid; defaults are filled in below.\n", opts.configPath)
			_, err = w.Write(out)
			return err
		},
	}
	cmd.Flags().BoolVar(&skipFiles, "skip-files", false, "do not look at the files the configuration names (for a file written for another host)")
	return cmd
}

func newConfigExampleCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "example",
		Short: "Print a commented example configuration",
		Long: `Print a commented example configuration to start from.

It is the configuration of a typical host: the VM disks on DATA/libvirt, 20
nightly snapshots kept, VMs quiesced with libvirt's managed save, snapshots
replicated over ssh to BACKUP/libvirt on another host and uploaded to a kopia
repository with zstd compression. Every key is explained in a comment, and
keys shown with their default can be left out.`,
		Example: `  vmhistory config example > /etc/vmhistory/config.yaml
  vmhistory config example | less`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			_, err := io.WriteString(cmd.OutOrStdout(), config.Example())
			return err
		},
	}
}

// writeIndentedJSON prints v as indented JSON.
func writeIndentedJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
