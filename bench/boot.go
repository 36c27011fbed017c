package bench

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmhistory/vmhistory/backup"
	"github.com/vmhistory/vmhistory/boot"
	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/virt"
)

// Defaults of Boot.
const (
	DefaultBootSize   = 2 << 30
	DefaultBootRepeat = 3
	// DefaultBootTimeout is how long a guest may take to its first
	// heartbeat (TCG on a loaded 2-core machine: tens of seconds).
	DefaultBootTimeout = 5 * time.Minute
	// minBootSize leaves room for ext4's own blocks beside the guest's
	// record file and some filler.
	minBootSize = 64 << 20
	// bootSplitter is the repository's: ZFS's default recordsize, the
	// splitter vmhistory recommends for VM images.
	bootSplitter = "FIXED-128K"
	// bootTarget is the acceptance point: the first heartbeat
	// within 1/3 of the restore's time.
	bootTarget = 1.0 / 3
)

// The ways Boot measures, as its table names them.
const (
	bootWayRestore = "vmhistory restore"
	bootWaySaved   = "boot: saved state"
	bootWayFresh   = "boot: fresh boot"
)

// BootOptions choose what "vmhistory bench boot" measures.
type BootOptions struct {
	// Size of the guest's disk, an ext4 image (default DefaultBootSize).
	Size int64
	// Presets of the drive model between the mount and the repository
	// (default drive).
	Presets []string
	// Repeat measures each case this many times and reports the median
	// (default DefaultBootRepeat).
	Repeat int
	// WorkDir holds the throwaway pool, repository, restored copies and
	// mounts; a temporary directory when empty. QEMU (libvirt-qemu) must
	// be able to traverse it. Removed afterwards either way.
	WorkDir string
	// Timeout is how long a guest may take to its first heartbeat
	// (default DefaultBootTimeout).
	Timeout time.Duration
	// Progress, when set, receives one line per step.
	Progress func(string)
}

// Boot measures what "vmhistory boot" gives over "vmhistory restore" when
// a host died: a real guest (testenv's kernel and initramfs under TCG,
// qemu:///system) whose disk is an ext4 image of o.Size mostly filled
// with incompressible data it never reads is backed up once in save mode
// to a kopia filesystem repository (FIXED-128K) from a throwaway
// zfs-fuse pool in o.WorkDir, and the local snapshot destroyed: kopia
// alone holds it. Then, under each preset, caches cold every run (a fresh
// kopia connection and cache through the drive model, a fresh session and
// mount, page caches dropped):
//
//   - the disk is restored as vmhistory restore does (restore.Open,
//     Locate, OpenFile, restore.Copy, synced): from the session's open to
//     the synced copy, its SHA-256 checked against the snapshot's;
//   - vmhistory boot's saved-state path, the original domain undefined:
//     from the session's open (mounting the timeline in this process,
//     boot.Locate and boot.Boot included) to the first heartbeat line on
//     the booted domain's serial console, which must be the heartbeat
//     after the one the guest printed before its save (it resumed);
//   - a fresh boot, the original defined (shut off): the same, to
//     heartbeat 1 after the guest mounted its disk.
//
// Each boot's time is given as a fraction of the restore's under the same
// preset: the target is at most 1/3. Everything it made (domains through
// boot.Stop, mounts, the pool, the work directory) is removed afterwards,
// also on an error or when ctx is cancelled.
func Boot(ctx context.Context, o BootOptions) (_ *Table, err error) {
	const what = "bench boot"
	o.Size = cmp.Or(o.Size, DefaultBootSize)
	o.Repeat = cmp.Or(o.Repeat, DefaultBootRepeat)
	o.Timeout = cmp.Or(o.Timeout, DefaultBootTimeout)
	if len(o.Presets) == 0 {
		o.Presets = []string{"drive"}
	}
	if o.Size < minBootSize {
		return nil, fmt.Errorf("%s: --size %s is too small; use at least %s", what, humanSize(o.Size), humanSize(minBootSize))
	}
	if o.Repeat < 1 {
		return nil, fmt.Errorf("%s: --repeat %d: give at least 1", what, o.Repeat)
	}
	for _, p := range o.Presets {
		if _, err := drivemodel.Preset(p); err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
	}
	o.Presets = uniq(o.Presets)
	progress := o.Progress
	if progress == nil {
		progress = func(string) {}
	}
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%s: needs root (a zfs-fuse pool, domains on %s, FUSE mounts, dropping the page caches)", what, testenv.QEMUURI)
	}
	if err := requireZpool(ctx, what); err != nil {
		return nil, err
	}
	progress("building the guest's kernel and initramfs (cached after the first time)")
	gb, err := testenv.BuildGuestImage()
	if err != nil {
		return nil, fmt.Errorf("%s: build the guest: %w", what, err)
	}
	conn, err := virt.Dial(ctx, config.DefaultLibvirtSocket, testenv.QEMUURI)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer conn.Close()
	l := conn.Client()
	sweepStaleBenchDomains(l, progress)
	sweepStaleBenchPools(ctx, progress)

	work, err := os.MkdirTemp(o.WorkDir, "vmhistory-bench-boot-")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer os.RemoveAll(work)
	if work, err = filepath.Abs(work); err != nil { // QEMU opens its files by these paths
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	// QEMU runs as libvirt-qemu: it opens the guest's disk, console logs,
	// overlays and the mount's files under work.
	if err := os.Chmod(work, 0o755); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := othersCanTraverse(work); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := dropCaches(); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	progress(fmt.Sprintf("creating a zfs-fuse pool in %s", work))
	pool, err := newBenchPool(ctx, work, 2*o.Size+1<<30, what)
	if err != nil {
		return nil, err
	}
	defer pool.destroy()

	w := &bootWorld{l: l, pool: pool, work: work, size: o.Size, timeout: o.Timeout, progress: progress,
		log: slog.New(slog.DiscardHandler)}
	defer func() {
		if cerr := w.close(); cerr != nil && err == nil {
			err = fmt.Errorf("%s: clean up: %w", what, cerr)
		}
	}()
	if err := w.setUp(ctx, gb); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}

	type caseDef struct{ preset, way string }
	var cases []caseDef
	for _, p := range o.Presets {
		cases = append(cases, caseDef{p, bootWayRestore}, caseDef{p, bootWaySaved}, caseDef{p, bootWayFresh})
	}
	runs := make([][]bootRun, len(cases))
	for rep := range o.Repeat {
		for _, i := range repeatOrder(len(cases), rep) {
			c := cases[i]
			name := c.preset + ", " + c.way
			progress(fmt.Sprintf("run %d/%d: %s", rep+1, o.Repeat, name))
			var r bootRun
			var err error
			switch c.way {
			case bootWayRestore:
				r, err = w.restore(ctx, c.preset)
			case bootWaySaved:
				r, err = w.boot(ctx, c.preset, true)
			default:
				r, err = w.boot(ctx, c.preset, false)
			}
			if err != nil {
				return nil, fmt.Errorf("%s: %s: %w", what, name, err)
			}
			if r.started > 0 {
				progress(fmt.Sprintf("  %.1f s (started after %.1f s), %.1f MiB from the store; %s", r.took.Seconds(), r.started.Seconds(), toMiB(r.fetched), r.check))
			} else {
				progress(fmt.Sprintf("  %.1f s, %.1f MiB from the store; %s", r.took.Seconds(), toMiB(r.fetched), r.check))
			}
			runs[i] = append(runs[i], r)
		}
	}

	t := &Table{
		Title: fmt.Sprintf("vmhistory boot to the first heartbeat against vmhistory restore of the same %s disk, kopia alone holding the snapshot (%s repository), median of %d",
			humanSize(o.Size), bootSplitter, o.Repeat),
		Columns: []string{"preset", "way", "seconds", "started s", "store MiB", "of restore", "within 1/3", "checked"},
	}
	restored := map[string]time.Duration{}
	for i, c := range cases {
		r := medianBoot(runs[i])
		frac, within, started := Str("-"), Str("-"), Str("-")
		if c.way == bootWayRestore {
			restored[c.preset] = r.took
		} else if rt := restored[c.preset]; rt > 0 {
			started = Num(r.started.Seconds(), "%.2f")
			f := r.took.Seconds() / rt.Seconds()
			frac = Num(f, "%.2f")
			within = Str("no")
			if f <= bootTarget {
				within = Str("yes")
			}
		}
		t.Add(Str(c.preset), Str(c.way), Num(r.took.Seconds(), "%.2f"), started, Num(toMiB(r.fetched), "%.1f"), frac, within, Str(r.check))
	}
	t.Notes = append(t.Notes,
		fmt.Sprintf("The guest: 128 MiB of RAM, 1 vCPU, testenv's kernel and busybox initramfs; its disk an ext4 image of %s holding %.0f MiB of incompressible data it never reads (a restore copies it, a boot does not). One backup night in save mode (its RAM state saved into the snapshot) to a kopia filesystem repository, the local snapshot %s then destroyed: kopia alone holds it.",
			humanSize(o.Size), toMiB(w.filler), w.snap),
		"vmhistory restore: from the session's open (sources, timeline) to the disk image copied out and synced with its SHA-256, as the command does.",
		"boot: from the session's open, through mounting the timeline in this process (allow_other, as vmhistory mount --allow-other), boot.Locate and boot.Boot (qcow2 overlays over the snapshot's images in the mount), to the first \"vmht: heartbeat\" line on the booted domain's serial console. saved state: the original domain undefined (the host died), its saved RAM state resumes; fresh boot: the original defined (shut off), a new domain boots the snapshot's disk.",
		"started s: from the same start to boot.Boot's return: the saved state loaded and running (QEMU has read the whole RAM image through the mount), or the fresh domain defined and started; the rest, to the first heartbeat, is the guest's own (a fresh boot's kernel start).",
		"store MiB: every byte the drive model served, up to the synced copy or the first heartbeat: the repository's format blob, indexes and manifests, the saved RAM image and the disk blocks read.",
		"of restore: the boot's seconds over the restore's under the same preset; within 1/3: the target (the first heartbeat within 1/3 of the restore's time).",
		"Caches cold every run: a fresh kopia connection and cache through the preset, a fresh session and mount, page caches dropped.",
		fmt.Sprintf("Checked: every restore's SHA-256 against the snapshot's disk (%s…); every resumed guest's first heartbeat is the one after its last before the save (%d), with no boot; every fresh boot mounted the disk and printed heartbeat 1.", w.sha[:12], w.atSave),
		"The guests run under TCG (domain type qemu, no KVM): every guest instruction is emulated, so a fresh boot's time is mostly its kernel's start, not what vmhistory reads; under KVM it takes seconds. A saved state skips that start: its time is the mount, the RAM image and the blocks the guest reads.",
		"Presets model a distant store: none = the local disk as it is; drive = 150 ms per request, 20 MiB/s per stream, 400 MiB/s total, 1% 429/5xx; seed = 1.2 s, 6 MiB/s per stream, 400 MiB/s total.")
	return t, nil
}

// bootRun is one measurement.
type bootRun struct {
	took    time.Duration
	started time.Duration // boots: to boot.Boot's return
	fetched int64         // from the store
	check   string        // what was checked of its result
}

func medianBoot(runs []bootRun) bootRun {
	s := slices.Clone(runs)
	slices.SortFunc(s, func(a, b bootRun) int { return cmp.Compare(a.took, b.took) })
	return s[len(s)/2]
}

var bootSeq atomic.Int64

// bootWorld is the pool, the guest, its backup night and the repository
// of Boot.
type bootWorld struct {
	l        *libvirt.Libvirt
	pool     *benchPool
	work     string
	size     int64
	timeout  time.Duration
	progress func(string)
	log      *slog.Logger

	dataset, mnt string
	stateDir     string
	reg          boot.Registry
	vm           string
	disk, rel    string // the guest's disk on the live dataset, and relative to its mountpoint
	filler       int64
	origXML      string // the original's definition, its UUID included
	defined      bool   // the original is defined now
	console      *testenv.Console
	directConfig string // the repository, no model
	pwFile       string
	yaml         string // the configuration, %s for the kopia config file
	snap         string // dataset@name
	sha          string // its disk's SHA-256
	atSave       int    // the guest's last heartbeat before the save
}

// setUp makes the guest, backs it up once in save mode and destroys the
// local snapshot.
func (w *bootWorld) setUp(ctx context.Context, gb testenv.GuestBoot) error {
	w.dataset, w.mnt = w.pool.name+"/libvirt", filepath.Join(w.pool.mnt, "libvirt")
	if err := w.pool.z.CreateDataset(ctx, w.dataset, nil); err != nil {
		return err
	}
	w.stateDir = filepath.Join(w.work, "state")
	if err := os.Mkdir(w.stateDir, 0o755); err != nil {
		return err
	}
	w.reg = boot.NewRegistry(w.stateDir)
	w.vm = fmt.Sprintf("%s%d-boot%d", mountBenchPoolPrefix, os.Getpid(), bootSeq.Add(1))
	w.rel = filepath.Join("images", w.vm+".img")
	w.disk = filepath.Join(w.mnt, w.rel)
	w.filler = bootFiller(w.size)
	w.progress(fmt.Sprintf("making the guest's %s ext4 disk with %.0f MiB of incompressible data", humanSize(w.size), toMiB(w.filler)))
	if err := makeBootDisk(w.work, w.disk, w.size, w.filler); err != nil {
		return err
	}

	w.pwFile = filepath.Join(w.work, "password")
	if err := os.WriteFile(w.pwFile, []byte(benchPassword+"\n"), 0o600); err != nil {
		return err
	}
	repoDir := filepath.Join(w.work, "repo")
	w.directConfig = filepath.Join(repoDir, "direct.config")
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(repoDir, "blobs")}, w.directConfig, benchPassword,
		kopiarepo.CreateOptions{Splitter: bootSplitter, ConnectOptions: kopiarepo.ConnectOptions{
			Host: "bench", User: "root", CacheDirectory: filepath.Join(repoDir, "cache")}}); err != nil {
		return err
	}
	w.yaml = fmt.Sprintf(`datasets: [%s]
keep_local: 20
quiesce: {mode: save, save_timeout: 2m, resume_timeout: 2m}
libvirt: {uri: "%s"}
state_dir: %s
kopia: {config_file: %%s, password_file: %s, host: bench, user: root, splitter: %s}
`, w.dataset, testenv.QEMUURI, w.stateDir, w.pwFile, bootSplitter)

	guestDir := filepath.Join(w.work, "guest")
	if err := os.Mkdir(guestDir, 0o755); err != nil {
		return err
	}
	consolePath := filepath.Join(guestDir, "console.log")
	dom, err := w.l.DomainDefineXML(testenv.GuestXML(w.vm, gb, w.disk, consolePath))
	if err != nil {
		return fmt.Errorf("define the guest %s: %w", w.vm, err)
	}
	w.defined = true
	if w.origXML, err = w.l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive); err != nil {
		return err
	}
	w.console = testenv.FollowConsole(ctx, consolePath)
	w.progress(fmt.Sprintf("starting the guest %s (TCG)", w.vm))
	if err := w.l.DomainCreate(dom); err != nil {
		return fmt.Errorf("start the guest %s: %w", w.vm, err)
	}
	if _, err := w.console.Wait(ctx, 0, "its third synced record", w.timeout, func(s string) bool {
		return strings.Contains(s, "vmht: synced seq=3")
	}); err != nil {
		return err
	}

	w.progress("backing the guest up in save mode (one night)")
	cfg, err := w.config(w.directConfig)
	if err != nil {
		return err
	}
	mark := w.console.Len()
	p, problems := backup.Open(ctx, cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if len(problems) > 0 {
		return fmt.Errorf("open the backup: %w", errors.Join(problems...))
	}
	rep := p.Run(ctx, backup.Options{})
	p.Close()
	if err := rep.Err(); err != nil {
		return fmt.Errorf("the backup night: %w", err)
	}
	if len(rep.Snapshots) != 1 {
		return fmt.Errorf("the backup night made %d snapshots, want 1", len(rep.Snapshots))
	}
	w.snap = w.dataset + "@" + rep.Snapshots[0].Name
	if w.atSave, err = w.resumedAt(ctx, mark); err != nil {
		return err
	}
	// Off, but defined: the fresh boots run beside it, without its CPU.
	if err := w.l.DomainDestroy(dom); err != nil {
		return fmt.Errorf("stop the guest %s: %w", w.vm, err)
	}

	w.progress(fmt.Sprintf("reading %s's disk for its SHA-256", w.snap))
	view, err := w.pool.z.OpenSnapshot(ctx, w.snap)
	if err != nil {
		return err
	}
	w.sha, err = sha256File(filepath.Join(view.Root, w.rel))
	closeViewRetrying(view)
	if err != nil {
		return err
	}
	// Pruned locally: kopia alone holds the night now.
	return w.pool.z.Destroy(ctx, w.snap)
}

func (w *bootWorld) config(kopiaConfig string) (*config.Config, error) {
	return config.Parse([]byte(fmt.Sprintf(w.yaml, kopiaConfig)), filepath.Join(w.work, "vmhistory.yaml"))
}

// resumedAt checks that the guest's heartbeat went on across the save
// (after line from): the largest gap since is between consecutive
// heartbeats, with no boot. It returns the heartbeat before the gap.
func (w *bootWorld) resumedAt(ctx context.Context, from int) (int, error) {
	if _, err := w.console.Wait(ctx, w.console.Len(), "a heartbeat after the backup", time.Minute, isHeartbeat); err != nil {
		return 0, err
	}
	lines := w.console.Lines()
	var beats []testenv.Beat
	for i, l := range lines {
		n, ok := testenv.Heartbeat(l.Text)
		switch {
		case !ok:
		case i < from:
			beats = append(beats[:0], testenv.Beat{N: n, At: l.At})
		default:
			beats = append(beats, testenv.Beat{N: n, At: l.At})
		}
		if i >= from && strings.Contains(l.Text, "vmht: mounted") {
			return 0, fmt.Errorf("the guest booted again during the backup: %q", l.Text)
		}
	}
	if len(beats) < 2 {
		return 0, errors.New("no heartbeat of the guest before and after the backup")
	}
	_, after := testenv.LargestGap(beats)
	for i := 1; i < len(beats); i++ {
		if beats[i] == after {
			if before := beats[i-1]; after.N == before.N+1 {
				return before.N, nil
			}
			return 0, fmt.Errorf("heartbeat %d came after %d across the backup: the guest did not resume where it stopped", after.N, beats[i-1].N)
		}
	}
	return 0, errors.New("no gap in the guest's heartbeats across the backup")
}

// connect makes a fresh directory with a kopia config reading the
// repository through a drive model with preset's parameters and an empty
// cache, and the configuration that names it.
func (w *bootWorld) connect(preset string) (dir string, cfg *config.Config, model *drivemodel.Model, done func(), err error) {
	dir, err = os.MkdirTemp(w.work, "conn-")
	if err != nil {
		return "", nil, nil, nil, err
	}
	remove := func() { os.RemoveAll(dir) }
	if err := os.Chmod(dir, 0o755); err != nil { // the mount's directory is in it
		remove()
		return "", nil, nil, nil, err
	}
	name := fmt.Sprintf("bench-boot-%d", modelSeq.Add(1))
	modelCfg := filepath.Join(dir, "model.config")
	if err := drivemodel.WriteConfig(w.directConfig, modelCfg, drivemodel.ConfigOptions{Preset: preset, Model: name,
		CacheDirectory: filepath.Join(dir, "cache")}); err != nil {
		remove()
		return "", nil, nil, nil, err
	}
	if cfg, err = w.config(modelCfg); err != nil {
		remove()
		return "", nil, nil, nil, err
	}
	model = drivemodel.Shared(name)
	return dir, cfg, model, func() { model.SetParams(drivemodel.Params{}); remove() }, nil
}

// restore restores the guest's disk of the night as vmhistory restore
// does, through a fresh session.
func (w *bootWorld) restore(ctx context.Context, preset string) (bootRun, error) {
	var res bootRun
	dir, cfg, model, done, err := w.connect(preset)
	if err != nil {
		return res, err
	}
	defer done()
	dest := filepath.Join(dir, "restored")
	if err := os.Mkdir(dest, 0o700); err != nil {
		return res, err
	}
	if err := dropCaches(); err != nil {
		return res, err
	}
	r, err := restoreFile(ctx, cfg, restore.SessionOptions{Logger: w.log}, model, w.snap, w.rel, filepath.Join(dest, filepath.Base(w.rel)), false)
	if err != nil {
		return res, err
	}
	res.took, res.fetched = r.took, r.fetched
	switch {
	case r.copy.SHA256 != w.sha:
		return res, fmt.Errorf("the restored disk's SHA-256 is %s, the snapshot's %s", r.copy.SHA256, w.sha)
	case !r.copy.Synced:
		return res, errors.New("the restored disk was not synced")
	}
	res.check = "SHA-256 matches"
	return res, nil
}

// boot boots the night's guest through a fresh session and mount, as
// vmhistory mount --allow-other and vmhistory boot do: with saved, the
// original undefined (its saved state resumes), else the original defined
// (a fresh boot beside it). It is timed from the session's open to the
// first heartbeat on the booted domain's console.
func (w *bootWorld) boot(ctx context.Context, preset string, saved bool) (res bootRun, err error) {
	keep := func(e error) {
		if e != nil && err == nil {
			err = e
		}
	}
	dir, cfg, model, done, err := w.connect(preset)
	if err != nil {
		return res, err
	}
	defer done()
	if saved {
		if err := w.undefineOriginal(); err != nil {
			return res, err
		}
		defer func() { keep(w.defineOriginal()) }()
	} else if !w.defined {
		if err := w.defineOriginal(); err != nil {
			return res, err
		}
	}
	mntDir := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mntDir, 0o755); err != nil {
		return res, err
	}
	if err := dropCaches(); err != nil {
		return res, err
	}

	start := time.Now()
	sess, err := restore.Open(ctx, cfg, restore.SessionOptions{Start: start, NoSeed: true, Logger: w.log})
	if err != nil {
		return res, err
	}
	defer sess.Close()
	if errs := slices.Concat(sess.Unavailable(), sess.Unlisted()); len(errs) > 0 {
		return res, errors.Join(errs...)
	}
	m, err := fusefs.MountTimeline(ctx, mntDir, sess.Refresher(), fusefs.Options{AllowOther: true, Logger: w.log})
	if err != nil {
		return res, err
	}
	defer func() { keep(unmountRetrying(m)) }()
	// Whatever happens next, every domain booted goes before the mount.
	defer func() { keep(w.stopBoots()) }()
	running, err := boot.CheckMount(m.Dir, "")
	if err != nil {
		return res, err
	}
	loc, err := boot.Locate(ctx, sess.Timeline(), running.Dir, w.snap, "", &runner.Local{}, "")
	if err != nil {
		return res, err
	}
	b, err := boot.Boot(ctx, boot.Options{Conn: w.l, Runner: &runner.Local{}, Registry: w.reg,
		Mount: loc.Mount, SnapDir: loc.SnapDir, Snapshot: loc.Snapshot, GUID: loc.GUID, Mountpoint: loc.Mountpoint,
		VM: w.vm, Log: w.log, MountChecksItself: running.ChecksItself})
	if err != nil {
		return res, err
	}
	res.started = time.Since(start)
	switch {
	case saved && (b.Mode != boot.SavedState || b.Name != w.vm):
		return res, fmt.Errorf("with the original undefined, vmhistory boot chose %s as %s (%s)", b.Mode, b.Name, b.Why)
	case !saved && (b.Mode != boot.FreshBoot || b.Name == w.vm):
		return res, fmt.Errorf("with the original defined, vmhistory boot chose %s as %s (%s)", b.Mode, b.Name, b.Why)
	}
	serial := ""
	for _, f := range b.Files {
		if strings.HasSuffix(f, "serial0.log") {
			serial = f
		}
	}
	if serial == "" {
		return res, fmt.Errorf("%s has no serial console log among %v", b.Name, b.Files)
	}
	con := testenv.FollowConsole(ctx, serial)
	defer con.Close()
	first, err := con.Wait(ctx, 0, "a heartbeat", w.timeout, isHeartbeat)
	if err != nil {
		return res, err
	}
	res.took = first.At.Sub(start)
	res.fetched = model.Stats().BytesFetched
	n, _ := testenv.Heartbeat(first.Text)
	mounted := false
	for _, l := range con.Lines() {
		if l == first {
			break
		}
		mounted = mounted || strings.Contains(l.Text, "vmht: mounted /dev/vda")
	}
	switch {
	case saved && (n != w.atSave+1 || mounted):
		return res, fmt.Errorf("the resumed guest's first heartbeat is %d (mounted its disk: %v); it was saved after %d", n, mounted, w.atSave)
	case saved:
		res.check = fmt.Sprintf("resumed: heartbeat %d after %d", n, w.atSave)
	case n != 1 || !mounted:
		return res, fmt.Errorf("the fresh boot's first heartbeat is %d (mounted its disk: %v), want 1 after mounting it", n, mounted)
	default:
		res.check = "booted: mounted /dev/vda, heartbeat 1"
	}
	return res, nil
}

// stopBoots stops every domain of the registry (boot.Stop: the domain,
// its overlays and console logs).
func (w *bootWorld) stopBoots() error {
	recs, errs := w.reg.List()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, r := range recs {
		if _, err := boot.Stop(ctx, w.l, w.reg, r.Name); err != nil && !errors.Is(err, boot.ErrNoRecord) {
			errs = append(errs, fmt.Errorf("stop %s: %w", r.Name, err))
		}
	}
	return errors.Join(errs...)
}

// undefineOriginal undefines the (shut off) original: the host died.
func (w *bootWorld) undefineOriginal() error {
	dom, err := w.l.DomainLookupByName(w.vm)
	if libvirt.IsNotFound(err) {
		w.defined = false
		return nil
	}
	if err != nil {
		return err
	}
	if err := w.l.DomainUndefineFlags(dom, libvirt.DomainUndefineManagedSave|libvirt.DomainUndefineNvram); err != nil {
		return fmt.Errorf("undefine the original %s: %w", w.vm, err)
	}
	w.defined = false
	return nil
}

// defineOriginal defines the original again, with its UUID.
func (w *bootWorld) defineOriginal() error {
	if _, err := w.l.DomainDefineXML(w.origXML); err != nil {
		return fmt.Errorf("define the original %s again: %w", w.vm, err)
	}
	w.defined = true
	return nil
}

// close removes the booted domains and the original.
func (w *bootWorld) close() error {
	if w.console != nil {
		w.console.Close()
	}
	if w.vm == "" {
		return nil
	}
	errs := []error{w.stopBoots()}
	if dom, err := w.l.DomainLookupByName(w.vm); err == nil {
		if err := w.l.DomainDestroy(dom); err != nil && !virt.IsOperationInvalid(err) {
			errs = append(errs, fmt.Errorf("stop the guest %s: %w", w.vm, err))
		}
		if err := w.l.DomainUndefineFlags(dom, libvirt.DomainUndefineManagedSave|libvirt.DomainUndefineNvram); err != nil && !libvirt.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("undefine the guest %s: %w", w.vm, err))
		}
	} else if !libvirt.IsNotFound(err) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// unmountRetrying unmounts m, trying again for a while when the kernel
// still finds it busy just after QEMU exited.
func unmountRetrying(m *fusefs.Mount) error {
	var err error
	for range 20 {
		if err = m.Unmount(); err == nil {
			return nil
		}
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Errorf("unmount %s: %w", m.Dir, err)
}

// sweepStaleBenchDomains destroys and undefines the domains of bench runs
// (vmhbench-<pid>-...) whose process is gone: killed before its clean-up.
// A TCG guest left running takes a core.
func sweepStaleBenchDomains(l *libvirt.Libvirt, progress func(string)) {
	doms, _, err := l.ConnectListAllDomains(1, libvirt.ConnectListDomainsActive|libvirt.ConnectListDomainsInactive)
	if err != nil {
		return
	}
	for _, d := range doms {
		if pid, ok := benchOwner(d.Name); !ok || processExists(pid) {
			continue
		}
		progress(fmt.Sprintf("removing the domain %s of a bench run that is gone", d.Name))
		l.DomainDestroy(d)                                                                      //nolint:errcheck
		l.DomainUndefineFlags(d, libvirt.DomainUndefineManagedSave|libvirt.DomainUndefineNvram) //nolint:errcheck
	}
}

// sweepStaleBenchPools destroys the throwaway pools of bench runs
// (vmhbench-<pid>-<n>) whose process is gone: killed before its clean-up.
func sweepStaleBenchPools(ctx context.Context, progress func(string)) {
	out, err := exec.CommandContext(ctx, "zpool", "list", "-H", "-o", "name").Output()
	if err != nil {
		return
	}
	for _, name := range strings.Fields(string(out)) {
		if pid, ok := benchOwner(name); ok && !processExists(pid) {
			progress(fmt.Sprintf("destroying the pool %s of a bench run that is gone", name))
			(&benchPool{name: name}).destroy()
		}
	}
}

// benchOwner is the process a bench domain or pool (vmhbench-<pid>-...)
// belongs to.
func benchOwner(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, mountBenchPoolPrefix)
	if !ok {
		return 0, false
	}
	pidText, _, _ := strings.Cut(rest, "-")
	pid, err := strconv.Atoi(pidText)
	return pid, err == nil && pid > 0 && pid != os.Getpid()
}

func processExists(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return err == nil
}

// othersCanTraverse refuses a directory QEMU (libvirt-qemu) could not
// reach.
func othersCanTraverse(dir string) error {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("QEMU runs as libvirt-qemu and cannot reach %s: %s has mode %04o; give a --work-dir others can traverse (chmod o+x)", dir, d, fi.Mode().Perm())
		}
		if d == "/" || d == "." {
			return nil
		}
	}
}

// bootFiller is the incompressible data on a disk of size: most of it,
// ext4's own blocks (journal, inode tables) left room.
func bootFiller(size int64) int64 {
	return max(0, (size*7/8-32<<20)&^(1<<20-1))
}

// makeBootDisk makes an ext4 image of size at path holding the guest's
// empty record file and filler bytes of incompressible data in a file
// the guest never reads.
func makeBootDisk(work, path string, size, filler int64) error {
	src, err := os.MkdirTemp(work, "disk-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(src)
	if err := os.WriteFile(filepath.Join(src, strings.TrimPrefix(testenv.GuestRecordFile, "/")), nil, 0o644); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(src, "filler"))
	if err != nil {
		return err
	}
	_, err = io.CopyBuffer(f, io.LimitReader(rand.NewChaCha8([32]byte{'v', 'm', 'h', 'b', 'o', 'o', 't'}), filler), make([]byte, 1<<20))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if out, err := exec.Command("mke2fs", "-q", "-F", "-t", "ext4", "-d", src, path, fmt.Sprintf("%dk", size>>10)).CombinedOutput(); err != nil {
		return fmt.Errorf("mke2fs %s: %v: %s", path, err, strings.TrimSpace(string(out)))
	}
	return os.Chmod(path, 0o644) // QEMU reads it through the mount as others
}

func sha256File(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.CopyBuffer(h, f, make([]byte, 1<<20)); err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func isHeartbeat(s string) bool {
	_, ok := testenv.Heartbeat(s)
	return ok
}
