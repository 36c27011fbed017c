package main

import (
	"fmt"
	"os"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/bench"
)

func init() {
	benchSubcommands = append(benchSubcommands, newBenchBootCommand)
}

func newBenchBootCommand(opts *globalOptions) *cobra.Command {
	var (
		out     benchOutput
		size    string
		presets []string
		repeat  int
		workDir string
	)
	cmd := &cobra.Command{
		Use:   "boot",
		Short: "Time to a booted VM's first heartbeat against vmhistory restore of its disk, kopia alone holding it",
		Long: `Measure what "vmhistory boot" gives over "vmhistory restore" when a host died
and kopia alone holds the snapshot: how soon the VM runs again, against how
long copying its disk out takes.

As root, it makes a throwaway zfs-fuse pool and kopia filesystem repository
(FIXED-128K) in --work-dir and a real guest on qemu:///system (the test
guest's kernel and busybox initramfs, 128 MiB, 1 vCPU; its init prints
"vmht: heartbeat N" on its serial console twice a second) whose disk is an
ext4 image of --size mostly filled with incompressible data the guest never
reads. The guest is backed up for one night in save mode (its RAM state saved
into the snapshot) and the local snapshot destroyed. Then, under each --preset
(a model of a distant store between vmhistory and the repository), caches cold
every run (a fresh kopia connection and cache, a fresh session and mount, page
caches dropped):

  vmhistory restore   the disk restored as the command does: seconds from the
                      session's open to the copy synced, its SHA-256 checked;
  boot: saved state   the original domain undefined (the host died): the
                      timeline mounted in this process (--allow-other), then
                      vmhistory boot resumes the saved RAM state over qcow2
                      overlays on the mount: seconds from the session's open
                      to the first heartbeat on its console, which must be
                      the one after the guest's last before the save;
  boot: fresh boot    the original defined (shut off): a new domain boots
                      the snapshot's disk; seconds to its heartbeat 1.

Each boot's seconds are also given as a fraction of the restore's under the
same preset ("of restore"), against the target: within 1/3. "store MiB" is
every byte the drive model served up to the synced copy or the first
heartbeat.

The guests run under TCG (no KVM): every guest instruction is emulated, so a
fresh boot's time is dominated by its kernel's start, not by what vmhistory
reads (under KVM that start takes seconds). A saved state skips it: its time
is the mount, the RAM image and the blocks the guest reads.

Presets: none (the local disk as it is); drive (150 ms per request, 20 MiB/s
per stream, 400 MiB/s total, 1% 429/5xx); seed (1.2 s, 6 MiB/s per stream).
The work directory needs about 3× --size (pool, repository, one restored copy)
and must be traversable by QEMU's user (libvirt-qemu). The domains (through
vmhistory boot --stop's clean-up), mounts, pool and work directory are removed
afterwards, also on an error or an interrupt (SIGINT, SIGTERM, SIGHUP).`,
		Example: `  vmhistory bench boot                                  # 2 GiB disk, drive preset, median of 3
  vmhistory bench boot --size 1GiB --repeat 1 --preset none,drive
  vmhistory bench boot --preset seed --work-dir /var/tmp --csv`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := humanize.ParseBytes(size)
			if err != nil {
				return fmt.Errorf("--size %q: %v (write e.g. 512MiB or 2GiB)", size, err)
			}
			if repeat < 1 {
				return fmt.Errorf("--repeat %d: give at least 1", repeat)
			}
			// SIGINT/SIGTERM/SIGHUP end the bench through its clean-up (the
			// domains, mounts, pool and repository).
			ctx, stop := interruptContext(cmd.Context())
			defer stop()
			t, err := bench.Boot(ctx, bench.BootOptions{Size: int64(n), Presets: presets, Repeat: repeat, WorkDir: workDir,
				Progress: benchProgress(cmd)})
			if err != nil {
				return err
			}
			return out.write(cmd, opts, t)
		},
	}
	f := cmd.Flags()
	f.StringVar(&size, "size", "2GiB", "size of the guest's disk (an ext4 image, mostly incompressible data the guest never reads)")
	f.StringSliceVar(&presets, "preset", []string{"drive"}, "drive model presets between vmhistory and the repository: none, drive, seed")
	f.IntVar(&repeat, "repeat", bench.DefaultBootRepeat, "measure each case this many times and report the median")
	f.StringVar(&workDir, "work-dir", os.TempDir(), "where the throwaway pool, repository, restored copies and mounts go (about 3× --size; QEMU must be able to traverse it)")
	out.register(cmd)
	return cmd
}
