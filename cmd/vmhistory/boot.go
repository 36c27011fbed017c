package main

import (
	"fmt"
	"log/slog"
	"path/filepath"

	"text/tabwriter"
	"time"

	humanize "github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/boot"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/virt"
)

type bootFlags struct {
	name      string
	freshBoot bool
	network   string
	dir       string
	mount     string
	dataset   string
	list      bool
	stop      string
	live      string
}

func newBootCommand(opts *globalOptions) *cobra.Command {
	flags := &bootFlags{}
	cmd := &cobra.Command{
		Use:   "boot SNAPSHOT VM",
		Short: "Run a VM straight from any snapshot, its disks read through the mount",
		Long: `Define and start a libvirt domain from the definition of VM that SNAPSHOT holds
(<dataset>/.vmhistory/domains/VM.xml, written by every backup), its disks
replaced by qcow2 overlays whose read-only backing files are the snapshot's
disk images as "vmhistory mount" serves them: from the fastest source that
holds the snapshot (local ZFS, the replica, kopia with prefetch), failing over
mid-read. Nothing is copied first: the VM reads what it needs, and its writes
go to the overlays; the snapshot is never changed.

How it comes back:
  saved state   when the snapshot holds VM's RAM state (quiesce mode save) and
                no domain with VM's UUID is defined on this host (the host
                died): the same name, UUID and MACs, resuming where the backup
                stopped it; every NIC's link is set down unless --network.
  fresh boot    otherwise, or with --fresh-boot or --name: a new domain that
                never collides with the original: named --name (default
                VM-SNAPSHOT), a new UUID, new MACs, no network unless --network
                (its NICs then join that libvirt network), its own NVRAM and
                console logs.

A vmhistory mount must be running (--mount, default mount.path of the
configuration) with --allow-qemu, since QEMU runs as libvirt-qemu and libvirt
leaves a stopped VM's images 0600 and root's (with --allow-other alone the
images must be readable by others in the snapshot). The backing files are kept out of libvirt's relabelling. A qcow2
image's backing files must be in the same snapshot. The mount refuses to stop
while a booted domain reads from it. QEMU's opens never get FUSE passthrough:
a local read error under the VM fails over to the replica or kopia.

--live-restore DIR then copies every disk out of the mount into DIR while the VM
runs (libvirt block copy: a flat raw image, NAME-TARGET.raw, with the VM's own
writes), showing progress and the time left, and switches the VM onto the
copies: from then on it reads nothing of vmhistory, and the mount may stop. A
fresh boot's definition names the copies; a saved state runs as a transient
domain (virsh dumpxml NAME > NAME.xml; virsh define NAME.xml keeps it). An
interrupted live restore removes its partial copies and the VM runs on from the
mount.

The overlays, console logs and NVRAM go to DIR/NAME (--dir, default
<state_dir>/boot), and a record of each boot to <state_dir>/boot/NAME.json.

` + restore.SpecHelp,
		Example: `  vmhistory mount --allow-qemu &
  vmhistory boot 2023-03-04 web1                 # saved state if web1 is gone, else a fresh copy
  vmhistory boot latest~3 web1 --name web1-test --network default
  vmhistory boot --list
  vmhistory boot --stop web1-2023-03-04_05-00-01`,
		Args: func(cmd *cobra.Command, args []string) error {
			if flags.list || flags.stop != "" {
				if len(args) > 0 {
					return fmt.Errorf("--list and --stop take no SNAPSHOT or VM")
				}
				return nil
			}
			if len(args) != 2 {
				return fmt.Errorf("boot needs SNAPSHOT and VM (see vmhistory boot --help)")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return runBoot(cmd, opts, flags, args)
		},
	}
	f := cmd.Flags()
	f.StringVar(&flags.name, "name", "", "the new domain's name (a fresh boot); default VM-SNAPSHOT")
	f.BoolVar(&flags.freshBoot, "fresh-boot", false, "boot the disks as a new domain even where the snapshot's saved state could resume")
	f.StringVar(&flags.network, "network", "", "libvirt network the domain's NICs join (default: none; a saved state's NICs keep their links down)")
	f.StringVar(&flags.dir, "dir", "", "directory for the overlays and console logs (NAME/ below it); default <state_dir>/boot")
	f.StringVar(&flags.mount, "mount", "", "the running vmhistory mount (default mount.path of the configuration)")
	f.StringVarP(&flags.dataset, "dataset", "d", "", "the dataset SNAPSHOT belongs to, when several are configured")
	f.StringVar(&flags.live, "live-restore", "", "then copy the disks out of the mount into this directory while the VM runs (NAME-TARGET.raw), and switch the VM onto the copies: it then needs nothing of vmhistory")
	f.BoolVar(&flags.list, "list", false, "list the domains vmhistory booted, their state and overlays")
	f.StringVar(&flags.stop, "stop", "", "stop the domain NAME vmhistory booted and remove its overlays (never a domain it did not define)")
	return cmd
}

// bootSummary is --json's output of a boot.
type bootSummary struct {
	*boot.Record
	Why     string  `json:"why"`
	Seconds float64 `json:"seconds"`
}

func runBoot(cmd *cobra.Command, opts *globalOptions, flags *bootFlags, args []string) error {
	start := time.Now()
	cfg, err := loadConfig(cmd, opts)
	if err != nil {
		return err
	}
	ctx, stop := interruptContext(cmd.Context())
	defer stop()
	conn, err := virt.Dial(ctx, cfg.Libvirt.Socket, cfg.Libvirt.URI)
	if err != nil {
		return err
	}
	defer conn.Close()
	reg := boot.NewRegistry(cfg.StateDir)
	out := cmd.OutOrStdout()
	switch {
	case flags.list:
		listed, errs := boot.List(conn.Client(), reg)
		for _, e := range errs {
			fmt.Fprintf(cmd.ErrOrStderr(), "vmhistory: warning: %s\n", oneLineErr(e))
		}
		if opts.jsonOutput {
			return writeIndentedJSON(out, listed)
		}
		return printBootList(cmd, listed)
	case flags.stop != "":
		rec, err := boot.Stop(ctx, conn.Client(), reg, flags.stop)
		if err != nil {
			return err
		}
		if opts.jsonOutput {
			return writeIndentedJSON(out, rec)
		}
		fmt.Fprintf(out, "stopped %s and removed its overlays from %s\n", rec.Name, rec.Dir)
		return nil
	}
	if flags.live != "" && !filepath.IsAbs(flags.live) {
		return fmt.Errorf("--live-restore %q: give an absolute path (QEMU writes the copies there)", flags.live)
	}
	if flags.dir != "" && !filepath.IsAbs(flags.dir) {
		return fmt.Errorf("--dir %q: give an absolute path (QEMU opens the overlays by it)", flags.dir)
	}
	mountDir := cfg.Mount.Path
	if flags.mount != "" {
		mountDir = flags.mount
	}
	running, err := boot.CheckMount(mountDir, "")
	if err != nil {
		return err
	}
	sess, err := openSession(ctx, cmd, opts, cfg, restore.SessionOptions{NoSeed: true})
	if err != nil {
		return err
	}
	defer sess.Close()
	if sess.NoneAnswered() {
		return errNoSourceAnswered
	}
	loc, err := boot.Locate(ctx, sess.Timeline(), running.Dir, args[0], flags.dataset, &runner.Local{Logger: slog.Default()}, cfg.ZFS.Binary)
	if err != nil {
		return err
	}
	booted, err := boot.Boot(ctx, boot.Options{
		Conn: conn.Client(), Runner: &runner.Local{Logger: slog.Default()}, Registry: reg,
		Mount: loc.Mount, SnapDir: loc.SnapDir, Snapshot: loc.Snapshot, GUID: loc.GUID, Mountpoint: loc.Mountpoint,
		VM: args[1], Name: flags.name, FreshBoot: flags.freshBoot, Network: flags.network, Dir: flags.dir,
		MountChecksItself: running.ChecksItself,
	})
	if err != nil {
		return err
	}
	took := time.Since(start)
	if !opts.jsonOutput {
		printBooted(cmd, booted, took)
	}
	if flags.live != "" {
		lopts := boot.LiveOptions{Dir: flags.live, Interval: restoreLineInterval}
		if !opts.jsonOutput {
			lopts.Progress = newRestoreLines(cmd.ErrOrStderr(), booted.Name, 0).update
		}
		rec, err := boot.RestoreLive(ctx, conn.Client(), reg, booted.Name, lopts)
		if err != nil {
			return err
		}
		booted.Record = rec
		if !opts.jsonOutput {
			fmt.Fprintf(out, "live restore of %s done in %.1f s: it runs on its copies in %s; the mount may stop\n",
				rec.Name, time.Since(start.Add(took)).Seconds(), rec.LiveRestore.Dir)
		}
	}
	if opts.jsonOutput {
		return writeIndentedJSON(out, bootSummary{Record: booted.Record, Why: booted.Why, Seconds: took.Seconds()})
	}
	return nil
}

func printBooted(cmd *cobra.Command, b *boot.Booted, took time.Duration) {
	out := cmd.OutOrStdout()
	how := "resumed its saved state as"
	if b.Mode == boot.FreshBoot {
		how = "booted a fresh copy as"
	}
	fmt.Fprintf(out, "%s of %s: %s domain %s (UUID %s) in %.1f s\n", b.VM, b.Snapshot, how, b.Name, b.UUID, took.Seconds())
	fmt.Fprintf(out, "  why: %s\n", b.Why)
	for _, d := range b.Disks {
		if d.Overlay == "" {
			fmt.Fprintf(out, "  disk %s: %s (read-only, from the mount)\n", d.Target, d.Chain[0].Path)
			continue
		}
		fmt.Fprintf(out, "  disk %s: overlay %s over %s (%s)\n", d.Target, d.Overlay, d.Chain[0].Path, humanize.IBytes(uint64(d.Size)))
	}
	net := "no network"
	switch {
	case b.Network != "":
		net = "network " + b.Network
	case b.Mode == boot.SavedState:
		net = "NIC links down"
	}
	fmt.Fprintf(out, "  %s; stop it and remove its overlays with: vmhistory boot --stop %s\n", net, b.Name)
}

func printBootList(cmd *cobra.Command, listed []boot.Listed) error {
	out := cmd.OutOrStdout()
	if len(listed) == 0 {
		fmt.Fprintln(out, "vmhistory has booted no domain (vmhistory boot SNAPSHOT VM)")
		return nil
	}
	tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tMODE\tFROM\tOVERLAYS\tLIVE RESTORE")
	for _, l := range listed {
		live := "-"
		if lr := l.LiveRestore; lr != nil {
			live = "copying to " + lr.Dir
			if lr.Done {
				live = "done: " + lr.Dir
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s (%s)\t%s\t%s\n", l.Name, l.State, l.Mode, l.Snapshot, l.VM, l.Dir, live)
	}
	return tw.Flush()
}
