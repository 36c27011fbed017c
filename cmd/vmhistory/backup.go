package main

import (
	"fmt"
	"log/slog"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/backup"
)

type backupFlags struct {
	dryRun         bool
	skipReplicate  bool
	skipUpload     bool
	skipPrune      bool
	allowFull      bool
	forceRollback  bool
	replaceReplica string
	recoverOnly    bool
	verifyUpload   bool
}

func newBackupCommand(opts *globalOptions) *cobra.Command {
	flags := &backupFlags{}
	cmd := &cobra.Command{
		Use:   "backup",
		Short: "Run the nightly backup: quiesce, snapshot, resume, replicate, upload, prune",
		Long: `Run the nightly backup of the configured datasets, as steps:

  1. lock: a second concurrent run exits at once; a dead run's lock is taken over.
  2. recover: the VMs an interrupted run stopped (and only those) are started again;
     read-only clones and restore holds of dead vmhistory processes are removed.
  3. quiesce: the running VMs whose disks live on the datasets, in parallel (quiesce.mode).
  4. snapshot: DATASET@NAME, NAME from snapshot_format, e.g. DATA/libvirt@2023-03-04_05:00:01.
  5. resume: every VM quiesced in step 3 runs again, whatever failed.
  6. replicate: zfs send -I from the newest snapshot common with the replica, received without -F.
  7. upload: every snapshot kopia lacks, oldest first; then retention and maintenance.
     A snapshot whose predecessor kopia holds is read as the ZFS incremental
     stream from it says (zfs send -i): only the changed records of files split
     by a FIXED-* splitter are read; other files go as "kopia snapshot create"
     would (kopia.incremental: full turns this off). One night in
     kopia.verify_every (7), or with "backup upload --verify", the snapshot is
     read again in full and compared; a difference fails the step, and the
     full upload is what kopia keeps.
  8. prune: keep the last keep_local snapshots, never the replication base, one not in kopia yet, or one in use.

A step that cannot run fails alone: with the kopia repository unavailable
(its config not created yet, its password file missing or readable by
group or other) the snapshot is still taken and replicated, and only the
upload step fails, named. The kopia password is $KOPIA_PASSWORD when set
(it wins over kopia.password_file, as in kopia's CLI), else the content of
kopia.password_file.

The report lists each step's time and bytes and each VM's downtime; with
metrics.textfile set it is also written for node_exporter. The exit status
is non-zero when any step failed, and the failure is named.

A first replication needs a full send: that happens only with --allow-full.
A replica dataset that exists but shares no snapshot with its source (the
source was rebuilt) keeps its history: point the replica at a new dataset
(replica_dataset or replica.target), or name it with --replace-replica to
destroy it. A replica changed behind vmhistory's back is reported, and
rolled back to the common snapshot only with --force-rollback.`,
		Example: `  vmhistory backup --dry-run          # what tonight would do, changing nothing
  vmhistory backup                    # the nightly job (see contrib/systemd)
  vmhistory backup --allow-full       # first night: seed the replica with a full send
  vmhistory backup --recover          # only start VMs an interrupted run left stopped
  vmhistory backup upload             # catch up the kopia uploads alone
  vmhistory backup --json | jq .steps`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runBackup(cmd, opts, flags, backup.Options{
				DryRun: flags.dryRun, SkipReplicate: flags.skipReplicate, SkipUpload: flags.skipUpload, SkipPrune: flags.skipPrune,
				AllowFull: flags.allowFull, ForceRollback: flags.forceRollback, ReplaceReplica: flags.replaceReplica, RecoverOnly: flags.recoverOnly,
			})
		},
	}
	f := cmd.Flags()
	f.BoolVarP(&flags.dryRun, "dry-run", "n", false, "print the plan and change nothing")
	f.BoolVar(&flags.skipReplicate, "skip-replicate", false, "do not replicate tonight")
	f.BoolVar(&flags.skipUpload, "skip-upload", false, "do not upload to kopia tonight")
	f.BoolVar(&flags.skipPrune, "skip-prune", false, "do not prune local snapshots tonight")
	f.BoolVar(&flags.recoverOnly, "recover", false, "only start the VMs an interrupted run left stopped")
	addReplicaFlags(cmd, flags)

	for _, step := range []struct{ name, short string }{
		{backup.StepReplicate, "Only replicate to the replica (catch up missed nights)"},
		{backup.StepUpload, "Only upload to kopia the snapshots it lacks, oldest first"},
		{backup.StepPrune, "Only prune old local snapshots (keep_local)"},
	} {
		sub := &cobra.Command{
			Use:   step.name,
			Short: step.short,
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				return runBackup(cmd, opts, flags, backup.Options{Only: step.name, DryRun: flags.dryRun, VerifyUpload: flags.verifyUpload,
					AllowFull: flags.allowFull, ForceRollback: flags.forceRollback, ReplaceReplica: flags.replaceReplica})
			},
		}
		sub.Flags().BoolVarP(&flags.dryRun, "dry-run", "n", false, "print the plan and change nothing")
		if step.name == backup.StepReplicate {
			addReplicaFlags(sub, flags)
		}
		if step.name == backup.StepUpload {
			sub.Flags().BoolVar(&flags.verifyUpload, "verify", false, "after each upload read from the ZFS stream, read the whole snapshot again and compare (as kopia.verify_every does one night in N)")
			sub.Example = "  vmhistory backup upload --verify   # catch up, and check the stream reading against a full re-read"
		}
		cmd.AddCommand(sub)
	}
	return cmd
}

func addReplicaFlags(cmd *cobra.Command, flags *backupFlags) {
	cmd.Flags().BoolVar(&flags.allowFull, "allow-full", false, "allow a full send when the replica has no snapshot in common (first replication)")
	cmd.Flags().BoolVar(&flags.forceRollback, "force-rollback", false, "roll a diverged replica back to the common snapshot, destroying what it has beyond it")
	cmd.Flags().StringVar(&flags.replaceReplica, "replace-replica", "", "with --allow-full: destroy this replica dataset (`POOL/DATASET`, exactly as configured) and its history when it shares no snapshot with its source, and send in full")
}

func runBackup(cmd *cobra.Command, opts *globalOptions, flags *backupFlags, bopts backup.Options) error {
	cfg, err := loadConfig(cmd, opts)
	if err != nil {
		return err
	}
	// SIGTERM, SIGINT or SIGHUP stops the run at the next safe point; VMs
	// already quiesced are resumed on a context the signal does not cancel.
	ctx, stop := interruptContext(cmd.Context())
	ignoreBrokenPipe()
	defer stop()

	p, problems := backup.Open(ctx, cfg, slog.Default())
	defer p.Close()
	for _, problem := range problems {
		slog.Warn("cannot reach everything the run needs", "problem", problem)
	}
	rep := p.Run(ctx, bopts)

	if cfg.Metrics.Textfile != "" && !bopts.DryRun {
		last := backup.RecordOutcome(cfg.StateDir, rep)
		if err := rep.WriteTextfile(cfg.Metrics.Textfile, last); err != nil {
			slog.Error("write metrics", "err", err)
		}
	} else if !bopts.DryRun {
		backup.RecordOutcome(cfg.StateDir, rep)
	}
	if opts.jsonOutput {
		if err := rep.WriteJSON(cmd.OutOrStdout()); err != nil {
			return err
		}
	} else if err := rep.WriteText(cmd.OutOrStdout()); err != nil {
		return err
	}
	if rep.Failed() {
		if opts.jsonOutput {
			fmt.Fprintf(cmd.ErrOrStderr(), "vmhistory: backup failed: %s\n", rep.Failure)
		} else {
			// The report above holds the errors: name the steps only.
			fmt.Fprintf(cmd.ErrOrStderr(), "vmhistory: backup failed: %s (the report above gives the error)\n", strings.Join(rep.FailedNames(), ", "))
		}
		return &exitError{code: 1}
	}
	return nil
}
