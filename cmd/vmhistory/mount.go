package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/boot"
	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
	"github.com/vmhistory/vmhistory/restore"
)

type mountFlags struct {
	allowOther    bool
	allowQEMU     bool
	refresh       time.Duration
	force         bool
	nonEmpty      bool
	noPassthrough bool
	window        int
	noSeed        bool
	idleRelease   time.Duration
}

func newMountCommand(opts *globalOptions) *cobra.Command {
	flags := &mountFlags{}
	cmd := &cobra.Command{
		Use:   "mount [MOUNTPOINT]",
		Short: "Show every snapshot that exists anywhere as one read-only filesystem",
		Long: `Mount the timeline (see "vmhistory timeline") read-only at MOUNTPOINT
(default: mount.path of the configuration, /mnt/vmhistory): one directory per
snapshot, oldest first, each the snapshot's files, and a "latest" link to the
newest. With several datasets there is one more level, the dataset's path
(MOUNTPOINT/DATA/libvirt/2023-03-04_05:00:01/...).

Every file is read from the fastest source that holds it (local ZFS, the
replica, kopia with parallel prefetch), continuing from the next source if one
fails mid-read. The extended attributes user.vmhistory.sources and
user.vmhistory.source name the sources holding a file and the one serving it
(getfattr -d FILE). New snapshots appear without remounting, within --refresh,
and user.vmhistory.sources follows the sources too: a snapshot uploaded to kopia
or pruned on the replica by the nightly backup shows so within --refresh.

A file of a local snapshot (this host's ZFS, or a replica pool on this host) is
handed to the kernel with FUSE passthrough where the kernel takes it (Linux 6.9
or later, as root): reads then go straight to the snapshot's file, at the
speed of reading it directly, and the snapshot stays held (and its read-only
clone mounted) while the file is open. --no-passthrough serves every read
through this process instead, with failover to the next source mid-read.

MOUNTPOINT must be an existing, empty directory that is not a mount point
already: a second mount on a live one (vmhistory's or another filesystem's) is
refused, naming what is there; a directory holding files is refused unless
--nonempty (its files are hidden, not changed, while mounted); a stale mount
left by a killed process is cleared with --force.

A snapshot the mount opened (its zfs hold and, on zfs-fuse, a read-only
clone) is let go once no open file or lookup has used it for --idle-release
(1m), so that a mount left running does not keep prune from destroying old
snapshots; the next lookup opens it again.

The command stays in the foreground, logging to stderr, until SIGINT,
SIGTERM or SIGHUP (a dropped ssh session), then unmounts and removes the
temporary clones it made. Only root can use the mount unless --allow-other
(the snapshot's modes apply, every file shown as root's) or --allow-qemu (the
same, and QEMU's user reads every file whatever its mode: what "vmhistory
boot" needs, since libvirt leaves a stopped VM's images 0600 and root's).`,
		Example: `  vmhistory mount
  vmhistory mount /mnt/vmhistory --allow-other
  cp /mnt/vmhistory/2023-03-04_05:00:01/images/vm.qcow2 /var/lib/libvirt/images/
  vmhistory mount --force   # clear a stale mount left by a killed process first`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runMount(cmd, opts, flags, args)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&flags.allowOther, "allow-other", false, "let users other than root use the mount (file modes are enforced)")
	f.BoolVar(&flags.allowQEMU, "allow-qemu", false, "--allow-other, and let QEMU's user (qemu.conf's, libvirt-qemu) read every file whatever its mode, for vmhistory boot (its opens are served with failover, never passthrough)")
	f.DurationVar(&flags.refresh, "refresh", fusefs.DefaultRefresh, "rebuild the timeline when it is older than this on a lookup of the top level")
	f.BoolVar(&flags.force, "force", false, "clear a stale mount at MOUNTPOINT before mounting")
	f.BoolVar(&flags.nonEmpty, "nonempty", false, "mount over a MOUNTPOINT that holds files (hidden while mounted)")
	f.IntVar(&flags.window, "window", prefetch.DefaultWindow, "kopia files: chunk fetches kept in flight ahead of a sequential reader (memory: up to window × 8 MiB per reader)")
	f.BoolVar(&flags.noSeed, "no-seed", false, "kopia files: fetch every chunk from the store, none from this host's local snapshots of the same file")
	f.DurationVar(&flags.idleRelease, "idle-release", fusefs.DefaultIdleRelease, "let a snapshot go (its hold, its clone) once nothing has used it for this long, so prune can destroy it; -1s keeps every snapshot until unmount")
	f.BoolVar(&flags.noPassthrough, "no-passthrough", false, "read local snapshot files through this process, not with FUSE passthrough (keeps failover mid-read for them)")
	return cmd
}

func runMount(cmd *cobra.Command, opts *globalOptions, flags *mountFlags, args []string) error {
	if flags.window < 1 || flags.window > 256 {
		return fmt.Errorf("--window %d is out of range 1..256", flags.window)
	}
	// Until the timeline is mounted a signal cancels ctx; from then on it
	// asks the mount to stop, which it refuses while a VM booted from it
	// runs.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, interruptSignals...)
	defer signal.Stop(sigs)
	ctx, cancel := context.WithCancel(cmd.Context())
	defer cancel()
	mounted := make(chan struct{})
	go func() {
		select {
		case <-sigs:
			cancel()
		case <-mounted:
		}
	}()
	ignoreBrokenPipe()
	cfg, err := loadConfig(cmd, opts)
	if err != nil {
		return err
	}
	dir := cfg.Mount.Path
	if len(args) == 1 {
		dir = args[0]
	}
	if err := fusefs.CheckMountpoint(dir, flags.nonEmpty); err != nil {
		var stale *fusefs.StaleMountError
		if !errors.As(err, &stale) || !flags.force {
			return err
		}
		slog.Info("clearing a stale mount", "dir", dir)
		if err := fusefs.ClearStaleMount(dir); err != nil {
			return err
		}
	}
	sess, err := openSession(ctx, cmd, opts, cfg, restore.SessionOptions{PrefetchWindow: flags.window, NoSeed: flags.noSeed, SeedIdleRelease: max(flags.idleRelease, 0)})
	if err != nil {
		return err
	}
	defer sess.Close()
	// A mount lives long: one round trip to start from the repository as
	// it is rather than as this host last saw it.
	if _, err := sess.CheckOpen(ctx); err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "vmhistory: warning: %s\n", oneLineErr(err))
	}
	// The mount starts from the session's timeline and rebuilds it when
	// it is older than --refresh.
	build := sess.Refresher()
	mopts := fusefs.Options{
		Refresh: flags.refresh, AllowOther: flags.allowOther || flags.allowQEMU, Logger: slog.Default(), NoPassthrough: flags.noPassthrough,
		NonEmpty: flags.nonEmpty, IdleRelease: flags.idleRelease,
	}
	if flags.allowQEMU {
		uid, err := boot.QEMUUID()
		if err != nil {
			return fmt.Errorf("--allow-qemu: %w", err)
		}
		mopts.ReadAllUIDs = []uint32{uid}
	}
	m, err := fusefs.MountTimeline(ctx, dir, build, mopts)
	if err != nil {
		return err
	}
	slog.Info("timeline mounted; SIGINT, SIGTERM or SIGHUP unmounts", "dir", dir)
	done := make(chan error, 1)
	go func() { done <- m.Wait() }()
	close(mounted)
	reg := boot.NewRegistry(cfg.StateDir)
	// The command's own context ending (a program embedding it) asks
	// for the stop as a signal does, once.
	parentDone := cmd.Context().Done()
	for {
		select {
		case err := <-done: // unmounted from outside
			slog.Info("unmounted", "dir", dir)
			return err
		case <-sigs:
		case <-parentDone:
			parentDone = nil
		}
		if deps := reg.Dependents(dir, m.OpenFiles()); len(deps) > 0 {
			slog.Error("not unmounting: booted VMs read their disks from this mount; stop them first (vmhistory boot --stop NAME), or let --live-restore finish",
				"dir", dir, "vms", strings.Join(deps, ","))
			continue
		}
		break
	}
	cancel()
	slog.Info("unmounting", "dir", dir)
	if err := m.Unmount(); err != nil {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	<-done
	return nil
}
