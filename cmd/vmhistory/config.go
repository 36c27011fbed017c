package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/backup"
	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/zfs"
)

// exitConfigInvalid is the exit status when the configuration file is
// missing or invalid; the problems have been printed already.
const exitConfigInvalid = 1

// loadConfig loads the file named by --config with every check but those
// of the kopia password file and repository config: a command opens the
// repository only when it needs it and reports a kopia problem there (the
// upload step fails, the timeline warns), so that kopia never stops what
// does not need it. "config check" checks them. When the file is
// missing or invalid it prints each problem on its own line to stderr and
// returns an *exitError, so that a command can simply return the error:
//
//	cfg, err := loadConfig(cmd, opts)
//	if err != nil {
//		return err
//	}
func loadConfig(cmd *cobra.Command, opts *globalOptions) (*config.Config, error) {
	cfg, err := config.Options{SkipKopiaFileChecks: true}.Load(opts.configPath)
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
file (unless $KOPIA_PASSWORD, which wins over it, is set) and the ssh
identity must exist and be readable by their owner only, known_hosts must
exist, the metrics directory must exist, zfs must be found and each dataset
must exist on this host. Warnings, on stderr, do not make the file invalid:
a kopia repository config that does not exist yet (on a fresh install,
"vmhistory repo create" writes it after the check), or a zfs that cannot be
asked about the datasets. --skip-files leaves the checks of this machine
out, to check a file written for another host.

When the kopia repository is connected, check also opens it (30 s at
most) and warns on stderr about every policy that compresses with an
algorithm kopia deprecates, such as lz4 set with kopia's own CLI: with
kopia.compression left out, vmhistory's uploads would use it, and kopia
can fail to decompress lz4's output. It also warns, without failing, when
quiesce mode managedsave with qemu:///system would leave the VMs' RAM out
of the snapshots: libvirt writes managed-save images to
/var/lib/libvirt/qemu/save, which should be on a selected dataset. Warnings
leave the exit status 0.`,
		Example: `  vmhistory config check
  vmhistory config check --config ./config.yaml
  vmhistory config check --json | jq -r '.datasets[].replica_dataset'
  vmhistory config check --skip-files --config ./for-the-other-host.yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, notes, err := config.Options{SkipFileChecks: skipFiles}.LoadNotes(opts.configPath)
			if err != nil {
				return checkFailed(cmd, opts, err)
			}
			if !skipFiles {
				problems, err := zfs.CheckDatasets(cmd.Context(), cfg, notes, slog.Default())
				if err != nil {
					notes.Warnings.Problems = append(notes.Warnings.Problems, notes.Problem("datasets", "", "not checked on this host: %s", oneLineErr(err)))
				} else if len(problems) > 0 {
					return checkFailed(cmd, opts, &config.Errors{File: opts.configPath, Problems: problems})
				}
			}
			for _, line := range notes.Warnings.Lines() {
				fmt.Fprintf(cmd.ErrOrStderr(), "warning: %s\n", line)
			}
			if !skipFiles {
				warnRepositoryPolicies(cmd, cfg)
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

// checkFailed reports the problems "config check" found; with --json,
// scripts get them as data on stdout too.
func checkFailed(cmd *cobra.Command, opts *globalOptions, err error) error {
	var problems *config.Errors
	if opts.jsonOutput && errors.As(err, &problems) {
		if err := writeIndentedJSON(cmd.OutOrStdout(), struct {
			Valid bool `json:"valid"`
			*config.Errors
		}{false, problems}); err != nil {
			return err
		}
	}
	return reportConfigProblems(cmd, err)
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

// repositoryCheckTimeout bounds how long config check waits for the kopia
// repository (a remote store may be slow or away).
const repositoryCheckTimeout = 30 * time.Second

// warnRepositoryPolicies prints a warning for each policy of the connected
// kopia repository that compresses with a deprecated algorithm. A
// repository that is not set up, or cannot be opened, is not this check's
// problem: the file checks report what is missing, and the nightly upload
// what is unreachable.
func warnRepositoryPolicies(cmd *cobra.Command, cfg *config.Config) {
	k := cfg.Kopia
	if k == nil {
		return
	}
	if _, err := os.Stat(k.ConfigFile); err != nil {
		return
	}
	password, _, err := kopiarepo.ResolvePassword("", k.PasswordFile)
	if err != nil {
		return
	}
	stderr := cmd.ErrOrStderr()
	ctx, cancel := context.WithTimeout(cmd.Context(), repositoryCheckTimeout)
	defer cancel()
	r, err := kopiarepo.Open(ctx, k.ConfigFile, password)
	if err != nil {
		fmt.Fprintf(stderr, "warning: kopia repository of %s not checked: %v\n", k.ConfigFile, err)
		return
	}
	defer r.Close(ctx)
	warnings, err := r.DeprecatedCompressionWarnings(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "warning: kopia repository %s: policies not checked: %v\n", r, err)
		return
	}
	for _, w := range warnings {
		fmt.Fprintf(stderr, "warning: kopia repository %s: %s\n", r, w)
	}
}

// writeIndentedJSON prints v as indented JSON.
func writeIndentedJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
