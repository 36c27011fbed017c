package boot_test

// Acceptance on a real QEMU guest: a snapshot held locally, on a replica
// over ssh and in kopia, booted through the vmhistory mount; its sources
// fail one after the other under the running guest (a read error injected
// into the local source, then the replica's sshd stopped) and the guest's
// reads carry on from the next source without an I/O error.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/backup"
	"github.com/vmhistory/vmhistory/boot"
	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

var errInjected = errors.New("injected read error")

// watched counts what one source served to the mount; while fail is set
// its reads fail at once (a disk error, a snapshot gone under the reader).
type watched struct {
	bytes atomic.Int64
	fail  atomic.Bool
}

// watchedSource wraps a session's source with a watched.
type watchedSource struct {
	restore.Source
	w *watched
}

func (s watchedSource) Open(ctx context.Context, snap restore.SourceSnapshot) (restore.Tree, error) {
	t, err := s.Source.Open(ctx, snap)
	if err != nil {
		return nil, err
	}
	return watchedTree{t, s.w}, nil
}

type watchedTree struct {
	restore.Tree
	w *watched
}

func (t watchedTree) OpenFile(ctx context.Context, rel string) (restore.File, error) {
	f, err := t.Tree.OpenFile(ctx, rel)
	if err != nil {
		return nil, err
	}
	return watchedFile{f, t.w}, nil
}

type watchedFile struct {
	restore.File
	w *watched
}

func (f watchedFile) ReadAt(p []byte, off int64) (int, error) {
	if f.w.fail.Load() {
		return 0, errInjected
	}
	n, err := f.File.ReadAt(p, off)
	f.w.bytes.Add(int64(n))
	return n, err
}

// OSFile passes on the local source's file, as the unwrapped source
// would offer it for FUSE passthrough (which the test turns off).
func (f watchedFile) OSFile() *os.File {
	if lf, ok := f.File.(restore.LocalFile); ok {
		return lf.OSFile()
	}
	return nil
}

// SetReadAhead and SetStreaming pass on to the wrapped reader (the kopia
// prefetcher), as the mount and the copy engine would set them.
func (f watchedFile) SetReadAhead(on bool) {
	if s, ok := f.File.(interface{ SetReadAhead(bool) }); ok {
		s.SetReadAhead(on)
	}
}

func (f watchedFile) SetStreaming(on bool) {
	if s, ok := f.File.(interface{ SetStreaming(bool) }); ok {
		s.SetStreaming(on)
	}
}

// agentExec runs path with args in the guest through its agent
// (guest-exec, then guest-exec-status until it exits) and returns its
// exit code and its output (stdout and stderr).
func agentExec(t *testing.T, l *libvirt.Libvirt, dom libvirt.Domain, timeout time.Duration, path string, args ...string) (int, string) {
	t.Helper()
	cmd, _ := json.Marshal(map[string]any{"execute": "guest-exec", "arguments": map[string]any{
		"path": path, "arg": args, "capture-output": true}})
	var started struct {
		Return struct {
			PID int `json:"pid"`
		} `json:"return"`
	}
	agentCall(t, l, dom, string(cmd), &started)
	deadline := time.Now().Add(timeout)
	for {
		cmd, _ := json.Marshal(map[string]any{"execute": "guest-exec-status", "arguments": map[string]any{"pid": started.Return.PID}})
		var st struct {
			Return struct {
				Exited   bool   `json:"exited"`
				ExitCode *int   `json:"exitcode"`
				Signal   *int   `json:"signal"`
				Out      []byte `json:"out-data"`
				Err      []byte `json:"err-data"`
			} `json:"return"`
		}
		agentCall(t, l, dom, string(cmd), &st)
		if r := st.Return; r.Exited {
			out := strings.TrimSpace(string(r.Out) + string(r.Err))
			switch {
			case r.ExitCode != nil:
				return *r.ExitCode, out
			case r.Signal != nil:
				t.Fatalf("guest: %s %v killed by signal %d: %s", path, args, *r.Signal, out)
			}
			return -1, out
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest: %s %v still runs after %v", path, args, timeout)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func agentCall(t *testing.T, l *libvirt.Libvirt, dom libvirt.Domain, cmd string, reply any) {
	t.Helper()
	res, err := l.QEMUDomainAgentCommand(dom, cmd, 30, 0)
	if err != nil {
		t.Fatalf("guest agent %s: %v", cmd, err)
	}
	if len(res) == 0 {
		t.Fatalf("guest agent %s: no reply", cmd)
	}
	if err := json.Unmarshal([]byte(res[0]), reply); err != nil {
		t.Fatalf("guest agent %s: reply %q: %v", cmd, res[0], err)
	}
}

// waitAgent waits until the guest's agent answers guest-ping.
func waitAgent(t *testing.T, l *libvirt.Libvirt, dom libvirt.Domain, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		_, err := l.QEMUDomainAgentCommand(dom, `{"execute":"guest-ping"}`, 5, 0)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest agent does not answer: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func xattrOf(t *testing.T, path, name string) string {
	t.Helper()
	buf := make([]byte, 256)
	n, err := unix.Getxattr(path, name, buf)
	if err != nil {
		t.Fatalf("getxattr %s %s: %v", path, name, err)
	}
	return string(buf[:n])
}

// TestBootFailsOverUnderGuest: a guest backed up once (save mode) to a
// replica over ssh and to kopia, the snapshot kept here too, is booted
// fresh through the mount. It reads its untouched filler file in three
// parts: the first from the local source; then, a read error injected
// into the local source, the second from the replica; then, the
// replica's sshd stopped, the third from kopia. Every dd in the guest
// exits 0, its console shows no I/O error, the domain keeps running.
func TestBootFailsOverUnderGuest(t *testing.T) {
	const (
		diskMiB   = 256
		fillerMiB = 128
		// The filler's parts: MiB [0,p1) from local, [p1,p2) from the
		// replica, [p2,fillerMiB) from kopia.
		p1 = 16
		p2 = 64
	)
	ctx := context.Background()
	l := testenv.DialQEMU(t)
	// A replica clone the mount could not destroy once sshd was down goes
	// with the replica pool; its empty mountpoint directory is removed
	// here, after the pool (cleanups run last first).
	var replicaPool string
	t.Cleanup(func() {
		dirs, _ := filepath.Glob(filepath.Join("/run/vmhistory/clones", replicaPool+"_"+zfs.ClonePrefix+"*"))
		for _, d := range dirs {
			os.Remove(d) // only if empty
		}
	})
	pool := testenv.NewPool(t, 1024)
	dst := testenv.NewPool(t, 1024)
	replicaPool = dst.Name
	replicaDS := dst.Name + "/libvirt"
	dataset, mnt := pool.Dataset(t, "libvirt")
	sshd := testenv.StartSSHD(t)

	dir := t.TempDir()
	stateDir := filepath.Join(testenv.PoolDir, fmt.Sprintf("boot-failover-state-%d", os.Getpid()))
	os.RemoveAll(stateDir)
	if err := os.MkdirAll(stateDir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(stateDir) })
	pwFile := filepath.Join(dir, "password")
	if err := os.WriteFile(pwFile, []byte(testPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	kopiaConfig := filepath.Join(dir, "kopia.config")
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(dir, "repo")}, kopiaConfig, testPassword,
		kopiarepo.CreateOptions{ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	yaml := fmt.Sprintf(`datasets: [%s]
keep_local: 20
keep_replica: 20
quiesce: {mode: save, save_timeout: 2m, resume_timeout: 2m}
libvirt: {uri: "%s"}
state_dir: %s
replica: {target: "ssh://root@127.0.0.1:%d/%s", identity_file: %s, known_hosts: %s}
kopia: {config_file: %s, password_file: %s, host: kvmhost, user: root, splitter: FIXED-128K}
`, dataset, testenv.QEMUURI, stateDir, sshd.Port, replicaDS, sshd.IdentityFile, sshd.KnownHostsFile, kopiaConfig, pwFile)
	cfg, err := config.Options{SkipFileChecks: true}.Parse([]byte(yaml), "failover.yaml")
	if err != nil {
		t.Fatal(err)
	}

	// The guest, backed up once: the snapshot on all three sources.
	name := testenv.GuestName("failover")
	disk := filepath.Join(mnt, "images", name+".img")
	newFilledDisk(t, disk, diskMiB, fillerMiB)
	guest := testenv.NewGuest(t, l, name, disk)
	guest.Console.WaitFor(t, "vmht: synced seq=2", time.Minute)
	p, problems := backup.Open(ctx, cfg, nil)
	if len(problems) > 0 {
		t.Fatalf("open the pipeline: %v", problems)
	}
	start := time.Now()
	rep := p.Run(ctx, backup.Options{AllowFull: true}) // the replica starts empty
	p.Close()
	if err := rep.Err(); err != nil || len(rep.Snapshots) != 1 {
		t.Fatalf("the backup: %v, snapshots %+v", err, rep.Snapshots)
	}
	snap := dataset + "@" + rep.Snapshots[0].Name
	t.Logf("backup of %s (local, replica over ssh, kopia): %v", snap, time.Since(start).Round(10*time.Millisecond))
	// The original stays defined (so the boot is a fresh one) but stops:
	// two TCG guests on two cores would slow everything down.
	guest.Destroy(t)

	// The mount, over the configured sources, each watched. NoSeed: kopia
	// reads its store only, never the local snapshot behind our back.
	sess, err := restore.Open(ctx, cfg, restore.SessionOptions{Logger: slog.Default(), NoSeed: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sess.Close() })
	if errs := append(sess.Unavailable(), sess.Unlisted()...); len(errs) > 0 {
		t.Fatalf("sources did not answer: %v", errs)
	}
	counts := map[string]*watched{}
	var sources []restore.Source
	for _, s := range sess.Sources() {
		counts[s.Name()] = &watched{}
		sources = append(sources, watchedSource{s, counts[s.Name()]})
	}
	local, replica, kopia := counts[restore.SourceLocal], counts[restore.SourceReplica], counts[restore.SourceKopia]
	if local == nil || replica == nil || kopia == nil {
		t.Fatalf("the session's sources are %v", sess.Sources())
	}
	build := func(ctx context.Context) (*restore.Timeline, []error) { return restore.BuildTimeline(ctx, sources) }
	tl, errs := build(ctx)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	mountDir := filepath.Join(testenv.PoolDir, fmt.Sprintf("boot-failover-mnt-%d", os.Getpid()))
	if err := os.MkdirAll(mountDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// As vmhistory mount --allow-qemu: passthrough stays on, but QEMU's
	// opens are served by the mount. Were the local snapshot's file
	// (watchedFile.OSFile) handed to the kernel, it would read it itself,
	// below this process: the injected fault would never strike and no
	// read would fail over (nothing served through the sources, the
	// source staying local).
	qemu, err := boot.QEMUUID()
	if err != nil {
		t.Fatal(err)
	}
	m, err := fusefs.MountTimeline(ctx, mountDir, build, fusefs.Options{AllowOther: true, ReadAllUIDs: []uint32{qemu}, Logger: slog.Default()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
		os.Remove(mountDir)
	})

	// The fresh boot beside the (defined) original.
	reg := boot.NewRegistry(stateDir)
	loc, err := boot.Locate(ctx, tl, m.Dir, snap, "", &runner.Local{}, "")
	if err != nil {
		t.Fatal(err)
	}
	o := boot.Options{Conn: l, Runner: &runner.Local{}, Registry: reg, Mount: loc.Mount, SnapDir: loc.SnapDir,
		Snapshot: loc.Snapshot, GUID: loc.GUID, Mountpoint: loc.Mountpoint, VM: name, MountChecksItself: true}
	start = time.Now()
	b, err := boot.Boot(ctx, o)
	if err != nil {
		t.Fatalf("boot %s of %s: %v", name, snap, err)
	}
	t.Cleanup(func() {
		if _, err := boot.Stop(ctx, l, reg, b.Name); err != nil && !strings.Contains(err.Error(), "no such booted domain") {
			t.Errorf("stop %s: %v", b.Name, err)
		}
	})
	if b.Mode != boot.FreshBoot {
		t.Fatalf("booted %+v, want a fresh boot", b.Record)
	}
	backing := b.Disks[0].Chain[0].Path
	if got := xattrOf(t, backing, fusefs.XattrSources); got != "local,replica,kopia" {
		t.Fatalf("%s of %s = %q, want local,replica,kopia", fusefs.XattrSources, backing, got)
	}
	con := consoleOf(t, b)
	con.WaitFor(t, "vmht: heartbeat 1", 5*time.Minute)
	dom := mustLookup(t, l, b.Name)
	waitAgent(t, l, dom, time.Minute)
	t.Logf("fresh boot %s: heartbeat and agent %v after boot began; %s open on the mount %v",
		b.Name, time.Since(start).Round(10*time.Millisecond), backing, m.OpenFiles())
	mark := con.Len()

	type served struct{ local, replica, kopia int64 }
	now := func() served { return served{local.bytes.Load(), replica.bytes.Load(), kopia.bytes.Load()} }
	const MiB = 1 << 20
	// ddPart reads MiB [from,to) of the filler in the guest, checks dd
	// exits 0 and that source wantSource now serves the backing file, and
	// returns what each source served meanwhile.
	ddPart := func(what string, from, to int, wantSource string) served {
		t.Helper()
		before := now()
		start := time.Now()
		code, out := agentExec(t, l, dom, 2*time.Minute, "/bin/busybox", "dd", "if=/mnt/filler", "of=/dev/null", "bs=1M",
			fmt.Sprintf("skip=%d", from), fmt.Sprintf("count=%d", to-from))
		took := time.Since(start)
		after := now()
		d := served{after.local - before.local, after.replica - before.replica, after.kopia - before.kopia}
		t.Logf("%s: dd of filler MiB %d-%d in the guest: exit %d in %v (%q); served local %.1f MiB, replica %.1f MiB, kopia %.1f MiB; %s = %s",
			what, from, to, code, took.Round(10*time.Millisecond), strings.ReplaceAll(out, "\n", "; "),
			float64(d.local)/MiB, float64(d.replica)/MiB, float64(d.kopia)/MiB, fusefs.XattrSource, xattrOf(t, backing, fusefs.XattrSource))
		if code != 0 {
			t.Errorf("%s: dd in the guest exited %d: %s", what, code, out)
		}
		if got := xattrOf(t, backing, fusefs.XattrSource); got != wantSource {
			t.Errorf("%s: %s of the backing file = %q, want %s", what, fusefs.XattrSource, got, wantSource)
		}
		return d
	}
	// Most of a part must come from its source: the guest and the host's
	// read-ahead may have taken a little of it before.
	most := func(from, to int) int64 { return int64(to-from-4) * MiB }

	// 1. All is well: the local source serves.
	if at := now(); at.local == 0 || at.replica != 0 || at.kopia != 0 {
		t.Errorf("the boot read local %d, replica %d, kopia %d bytes; want the local source alone", at.local, at.replica, at.kopia)
	}
	d := ddPart("healthy", 0, p1, restore.SourceLocal)
	if d.local < most(0, p1) || d.replica != 0 || d.kopia != 0 {
		t.Errorf("healthy: served %+v, want the local source alone", d)
	}

	// 2. The local source fails every read: the replica takes over.
	local.fail.Store(true)
	d = ddPart("local failing", p1, p2, restore.SourceReplica)
	if d.local != 0 || d.replica < most(p1, p2) || d.kopia != 0 {
		t.Errorf("local failing: served %+v, want the replica alone", d)
	}

	// 3. The replica's sshd goes (its connections with it): kopia.
	stopped := time.Now()
	sshd.Stop()
	t.Logf("sshd stopped in %v", time.Since(stopped).Round(time.Millisecond))
	d = ddPart("replica's sshd stopped", p2, fillerMiB, restore.SourceKopia)
	if d.local != 0 || d.replica > MiB || d.kopia < most(p2, fillerMiB) {
		t.Errorf("sshd stopped: served %+v, want kopia (the replica at most a read in flight)", d)
	}

	// The guest went on writing (to its overlay) throughout, and saw
	// no error.
	last := con.WaitFunc(t, con.Len(), "a record synced after the failovers", time.Minute, func(s string) bool {
		return strings.Contains(s, "vmht: synced seq=")
	})
	gap, _ := testenv.LargestGap(con.HeartbeatsSince(mark))
	t.Logf("guest: largest heartbeat gap across the failovers %v; %s; total served local %.1f MiB, replica %.1f MiB, kopia %.1f MiB",
		gap.Round(10*time.Millisecond), last.Text, float64(local.bytes.Load())/MiB, float64(replica.bytes.Load())/MiB, float64(kopia.bytes.Load())/MiB)
	for _, ln := range con.Lines() {
		if strings.Contains(ln.Text, "I/O error") || strings.Contains(ln.Text, "EXT4-fs error") || strings.Contains(ln.Text, "Buffer I/O") {
			t.Errorf("the guest saw an I/O error: %q", ln.Text)
		}
	}
	if state, _, err := l.DomainGetState(dom, 0); err != nil || libvirt.DomainState(state) != libvirt.DomainRunning {
		t.Errorf("the booted domain's state is %d (%v), want running", state, err)
	}
	if _, err := boot.Stop(ctx, l, reg, b.Name); err != nil {
		t.Fatal(err)
	}
}
