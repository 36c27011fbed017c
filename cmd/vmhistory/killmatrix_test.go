package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmhistory/vmhistory/backup"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

// zfsGate is a zfs wrapper script for the config's zfs.binary: it runs
// the real zfs, except that the first call whose arguments match a shell
// case pattern first says so (creates hit) and waits for release. A
// call held while its vmhistory was killed (kill -9) then exits 1
// without running, as if the kill had come just before it. It stops a
// backup at a fixed point inside a zfs step without a hook in the code.
type zfsGate struct {
	Binary       string
	hit, release string
}

func newZFSGate(t *testing.T, pattern string) *zfsGate {
	t.Helper()
	real, err := exec.LookPath("zfs")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	g := &zfsGate{Binary: filepath.Join(dir, "zfs"), hit: filepath.Join(dir, "hit"), release: filepath.Join(dir, "release")}
	script := fmt.Sprintf(`#!/bin/sh
case " $* " in
%s)
	if mkdir %s 2>/dev/null; then
		echo "$*" >%s/args
		parent=$PPID
		while [ ! -e %s ]; do sleep 0.05; done
		kill -0 "$parent" 2>/dev/null || exit 1
	fi;;
esac
exec %s "$@"
`, pattern, g.hit, g.hit, g.release, real)
	if err := os.WriteFile(g.Binary, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Release)
	return g
}

// Held returns a channel closed once a matching call waits.
func (g *zfsGate) Held() <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		for i := 0; i < 3000; i++ {
			if _, err := os.Stat(filepath.Join(g.hit, "args")); err == nil {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	return ch
}

func (g *zfsGate) Release() { os.WriteFile(g.release, nil, 0o644) }

// killSandbox is a night's whole set-up: a dataset with two running
// test-driver VMs and one the admin shut off, a replica dataset on the
// same pool, a kopia repository on WebDAV behind a packGate, keep_local
// 1, and two configurations: plain, and gated (its libvirt calls through
// a LibvirtGate and its zfs through a zfsGate, when the point needs one).
type killSandbox struct {
	pool             *testenv.Pool
	dataset, replica string
	mnt              string
	l                *libvirt.Libvirt
	running          []string
	shutOff          string
	stateDir         string
	pack             *packGate
	plain, gated     string
}

func newKillSandbox(t *testing.T, libvirtProc uint32, zfsPattern string) (*killSandbox, *testenv.LibvirtGate, *zfsGate) {
	t.Helper()
	ctx := context.Background()
	sb := &killSandbox{pool: testenv.NewPool(t, 256)}
	sb.dataset, sb.mnt = sb.pool.Dataset(t, "libvirt")
	sb.replica = sb.pool.Name + "/replica"
	var vms []string
	sb.l, vms = sharedTestVMs(t, sb.mnt, 3)
	sb.running, sb.shutOff = vms[:2], vms[2]
	d, err := sb.l.DomainLookupByName(sb.shutOff)
	if err == nil {
		err = sb.l.DomainDestroy(d)
	}
	if err != nil {
		t.Fatalf("shut %s off: %v", sb.shutOff, err)
	}

	dav := testenv.StartWebDAV(t)
	var davURL string
	sb.pack, davURL = newPackGate(t, dav.URL)
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "password")
	const password = "correct horse battery staple"
	if err := os.WriteFile(pwFile, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	kopiaConfig := filepath.Join(dir, "kopia.config")
	spec := kopiarepo.WebDAV{URL: davURL + "kopia/", Username: dav.Username, Password: dav.Password}
	if err := kopiarepo.Create(ctx, spec, kopiaConfig, password, kopiarepo.CreateOptions{
		ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	sb.stateDir = filepath.Join(dir, "state")
	config := func(socket, zfsBinary string) string {
		return writeTempConfig(t, fmt.Sprintf(`datasets: [%s]
keep_local: 1
quiesce: {mode: managedsave, save_timeout: 5m, resume_timeout: 1m}
libvirt: {uri: "%s", socket: %s}
replica: {target: %s}
zfs: {binary: %s}
state_dir: %s
kopia: {config_file: %s, password_file: %s, host: kvmhost, user: root}
`, sb.dataset, testenv.TestDriverURI, socket, sb.replica, zfsBinary, sb.stateDir, kopiaConfig, pwFile))
	}
	sb.plain = config(testenv.LibvirtSocket, "zfs")
	socket, zfsBinary := testenv.LibvirtSocket, "zfs"
	var lg *testenv.LibvirtGate
	var zg *zfsGate
	if libvirtProc != 0 {
		lg = testenv.StartLibvirtGate(t, libvirtProc)
		socket = lg.Socket
	}
	if zfsPattern != "" {
		if strings.Contains(zfsPattern, "%s") {
			zfsPattern = fmt.Sprintf(zfsPattern, sb.dataset)
		}
		zg = newZFSGate(t, zfsPattern)
		zfsBinary = zg.Binary
	}
	sb.gated = config(socket, zfsBinary)
	return sb, lg, zg
}

// night writes the VMs' disks as a day of theirs does and starts a
// backup with config.
func (sb *killSandbox) night(t *testing.T, n int, config string, flags ...string) *mountChild {
	t.Helper()
	nextSecond()
	for _, vm := range append(append([]string{}, sb.running...), sb.shutOff) {
		data := []byte(strings.Repeat(fmt.Sprintf("%s night %d ", vm, n), 20000))
		if err := os.WriteFile(filepath.Join(sb.mnt, "images", vm+".qcow2"), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return startVMHistory(t, append([]string{"backup", "--config", config, "--json"}, flags...)...)
}

// states is the running VMs' states, for telling a change.
func (sb *killSandbox) states(t *testing.T) string {
	t.Helper()
	var st []string
	for _, vm := range sb.running {
		st = append(st, fmt.Sprint(vmState(t, sb.l, vm)))
	}
	return strings.Join(st, ",")
}

// checkVMs checks that the VMs that ran before run, and that the one the
// admin shut off is still off, and that no VM is recorded as stopped.
func (sb *killSandbox) checkVMs(t *testing.T, when string) {
	t.Helper()
	for _, vm := range sb.running {
		if st := vmState(t, sb.l, vm); st != libvirt.DomainRunning {
			t.Errorf("%s: VM %s is %v, want running", when, vm, st)
		}
	}
	if st := vmState(t, sb.l, sb.shutOff); st != libvirt.DomainShutoff {
		t.Errorf("%s: VM %s, shut off by the admin, is %v", when, sb.shutOff, st)
	}
	if _, err := os.Stat(filepath.Join(sb.stateDir, "stopped-vms.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s: stopped-VM record left: %v", when, err)
	}
}

// checkNoLeftovers checks that no read-only clone is left on the pool
// (the replica included) and no vmhistory hold but the replication base,
// on one snapshot of each side at most.
func (sb *killSandbox) checkNoLeftovers(t *testing.T, when string) {
	t.Helper()
	if cl := clones(t, sb.dataset+"@x"); len(cl) > 0 {
		t.Errorf("%s: clones left: %v", when, cl)
	}
	out, err := exec.Command("zfs", "get", "-H", "-r", "-o", "name,property,source", "all", sb.pool.Name).CombinedOutput()
	if err != nil {
		t.Fatalf("zfs get: %v: %s", err, out)
	}
	base := map[string][]string{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 3 || !strings.HasPrefix(f[1], zfs.HoldPropertyPrefix) || f[2] != "local" {
			continue
		}
		if tag := strings.TrimPrefix(f[1], zfs.HoldPropertyPrefix); tag != backup.ReplicaHoldTag {
			t.Errorf("%s: hold %s left on %s", when, tag, f[0])
			continue
		}
		ds, _, _ := strings.Cut(f[0], "@")
		base[ds] = append(base[ds], f[0])
	}
	for ds, held := range base {
		if len(held) > 1 {
			t.Errorf("%s: replication base hold on %d snapshots of %s: %v", when, len(held), ds, held)
		}
	}
}

// TestKillMatrix is issue 11's kill matrix: a backup stopped at a fixed
// point inside each of its steps, a restore halfway and a mount while it
// serves, each by SIGKILL and by SIGHUP; then the next run is checked.
func TestKillMatrix(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGHUP} {
		for _, p := range backupKillPoints {
			t.Run("backup-"+p.step+"-"+sigName(sig), func(t *testing.T) { killBackupAt(t, p, sig) })
		}
		t.Run("restore-"+sigName(sig), func(t *testing.T) { killRestore(t, sig) })
		t.Run("mount-"+sigName(sig), func(t *testing.T) { killMount(t, sig) })
	}
}

func sigName(sig syscall.Signal) string {
	if sig == syscall.SIGKILL {
		return "SIGKILL"
	}
	return "SIGHUP"
}

// A backupKillPoint is a fixed point inside one step of the second night:
// a libvirt call held by a LibvirtGate, a zfs call held by a zfsGate, or
// the first pack upload held by the packGate.
type backupKillPoint struct {
	step        string
	libvirtProc uint32
	zfsPattern  string // a shell case pattern; %s, if there, is the dataset
	upload      bool
}

var backupKillPoints = []backupKillPoint{
	{step: backup.StepQuiesce, libvirtProc: testenv.LibvirtProcDomainManagedSave},
	{step: backup.StepSnapshot, zfsPattern: "' snapshot '*"},
	{step: backup.StepResume, libvirtProc: testenv.LibvirtProcDomainCreate},
	{step: backup.StepReplicate, zfsPattern: "' send '*"},
	{step: backup.StepUpload, upload: true},
	// The local dataset's snapshot: the replica's are pruned in the
	// replicate step.
	{step: backup.StepPrune, zfsPattern: "' destroy %s@'*"},
}

func killBackupAt(t *testing.T, p backupKillPoint, sig syscall.Signal) {
	start := time.Now()
	sb, lg, zg := newKillSandbox(t, p.libvirtProc, p.zfsPattern)
	first := sb.night(t, 1, sb.plain, "--allow-full")
	if err := first.wait(t, 3*time.Minute); err != nil {
		t.Fatalf("night 1: %v; output:\n%s", err, first.output)
	}

	var held <-chan struct{}
	switch {
	case lg != nil:
		held = lg.Called(p.libvirtProc)
	case zg != nil:
		held = zg.Held()
	case p.upload:
		sb.pack.arm()
		held = sb.pack.held
	}
	child := sb.night(t, 2, sb.gated)
	select {
	case <-held:
	case <-child.done:
		t.Fatalf("night 2 ended (%v) before reaching its %s step; output:\n%s", child.err, p.step, child.output)
	case <-time.After(2 * time.Minute):
		t.Fatalf("night 2 did not reach its %s step within 2 minutes; output:\n%s", p.step, child.output)
	}
	if zg != nil {
		args, _ := os.ReadFile(filepath.Join(zg.hit, "args"))
		t.Logf("held: zfs %s", strings.TrimSpace(string(args)))
	}
	if err := child.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	if sig == syscall.SIGHUP && p.step == backup.StepQuiesce {
		// The managedsave is aborted by the child before it is let through.
		select {
		case <-lg.Called(testenv.LibvirtProcDomainAbortJob):
		case <-child.done:
		case <-time.After(2 * time.Minute):
			t.Fatalf("night 2 did not act on SIGHUP within 2 minutes; output:\n%s", child.output)
		}
	}
	if sig == syscall.SIGKILL {
		child.wait(t, 30*time.Second)
	} else {
		time.Sleep(200 * time.Millisecond) // let the child see the signal first
	}
	// What was in flight goes on: libvirtd carries out a held call, a held
	// zfs call of a killed run does not start, a held upload fails.
	switch {
	case lg != nil:
		before := sb.states(t)
		lg.Release()
		if sig == syscall.SIGKILL {
			// Wait for libvirtd to carry out the dead run's held call, so
			// that it does not land in the middle of the next night.
			for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				if after := sb.states(t); after != before {
					t.Logf("the held call was carried out: VMs %s, then %s", before, after)
					break
				}
			}
		}
	case zg != nil:
		zg.Release()
	case p.upload:
		sb.pack.release(sig == syscall.SIGHUP)
	}
	err := child.wait(t, 3*time.Minute)
	if p.upload {
		sb.pack.heal()
	}
	if sig == syscall.SIGHUP {
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 {
			t.Errorf("night 2 after SIGHUP in %s: %v, want exit status 1; output:\n%s", p.step, err, child.output)
		}
		sb.checkVMs(t, "after SIGHUP")
		if cl := clones(t, sb.dataset+"@x"); len(cl) > 0 {
			t.Errorf("after SIGHUP: clones left: %v", cl)
		}
	}

	// The next night runs as a whole, at once: the lock is free.
	next := sb.night(t, 3, sb.plain)
	if err := next.wait(t, 3*time.Minute); err != nil {
		t.Fatalf("night 3: %v; output:\n%s", err, next.output)
	}
	rep := backupReport(t, next.output.String())
	if !rep.Success {
		t.Errorf("night 3 failed: %s; output:\n%s", rep.Failure, next.output)
	}
	if lockStep, ok := stepOf(rep, backup.StepLock); ok && lockStep.Status == backup.StatusFailed {
		t.Errorf("night 3 lock: %+v", lockStep)
	}
	if sig == syscall.SIGKILL && !strings.Contains(next.output.String(), "took over the lock") {
		t.Errorf("night 3 does not say it took over the killed run's lock; output:\n%s", next.output)
	}
	sb.checkVMs(t, "after night 3")
	sb.checkNoLeftovers(t, "after night 3")
	t.Logf("%s in %s: %.1f s; night 2:\n%s\nnight 3:\n%s", sigName(sig), p.step, time.Since(start).Seconds(), child.output, next.output)
}

// killRestore stops a restore from kopia once part of the file is
// durable (its journal lists restored ranges), and runs it again: the
// rerun resumes, fetching less than the whole, and leaves the file
// byte-identical with no partial file or journal beside it.
func killRestore(t *testing.T, sig syscall.Signal) {
	start := time.Now()
	sb := newBackupSandbox(t)
	if err := os.MkdirAll(filepath.Join(sb.mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 16<<20)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	if err := os.WriteFile(filepath.Join(sb.mnt, "images", "vm.img"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	for night := 1; night <= 2; night++ { // keep_local 1: night 1 is then in kopia only
		if night == 2 {
			sb.write(t, night)
		}
		if _, stderr, err := runConfigCmd(t, "backup", "--config", sb.config); err != nil {
			t.Fatalf("night %d: %v\n%s", night, err, stderr)
		}
		nextSecond()
	}
	dest := t.TempDir()
	final := filepath.Join(dest, "vm.img")
	journal := final + restore.JournalSuffix
	const spec = "latest~1:images/vm.img"
	sb.gate.slow(http.MethodGet, time.Second) // several seconds for the file: the kill lands halfway
	child := startVMHistory(t, "restore", spec, dest, "--config", sb.config, "--range-size", "1MiB", "--parallel", "1", "--window", "1")
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(20 * time.Millisecond) {
		if data, err := os.ReadFile(journal); err == nil && strings.Count(string(data), "\n") >= 3 {
			break // the header and two ranges
		}
		select {
		case <-child.done:
			t.Fatalf("restore ended (%v) before a range was durable; output:\n%s", child.err, child.output)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no range durable within 2 minutes; output:\n%s", child.output)
		}
	}
	if err := child.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	err := child.wait(t, 3*time.Minute)
	if sig == syscall.SIGHUP {
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 {
			t.Errorf("restore after SIGHUP: %v, want exit status 1; output:\n%s", err, child.output)
		}
	}
	for _, f := range []string{final + restore.PartialSuffix, journal} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("the interrupted restore left no %s to resume from: %v", filepath.Base(f), err)
		}
	}
	if _, err := os.Lstat(final); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the interrupted restore left something under the final name: %v", err)
	}

	sb.gate.slow(http.MethodGet, 0)
	stdout, stderr, err := runConfigCmd(t, "restore", spec, dest, "--config", sb.config, "--json")
	if err != nil {
		t.Fatalf("restore again: %v\n%s", err, stderr)
	}
	var sum restoreSummary
	if err := json.Unmarshal([]byte(stdout), &sum); err != nil {
		t.Fatalf("restore --json: %v\n%s", err, stdout)
	}
	if sum.Resumed == 0 || sum.Fetched >= int64(len(want)) {
		t.Errorf("the rerun resumed %d bytes and fetched %d of %d: want it to resume", sum.Resumed, sum.Fetched, len(want))
	}
	got, err := os.ReadFile(final)
	if err != nil {
		t.Fatal(err)
	}
	if sha(got) != sha(want) {
		t.Errorf("restored vm.img (%d bytes) differs from night 1's (%d bytes)", len(got), len(want))
	}
	for _, f := range []string{final + restore.PartialSuffix, journal} {
		if _, err := os.Lstat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after the rerun: %v", filepath.Base(f), err)
		}
	}
	t.Logf("%s during restore: %.1f s; rerun resumed %d and fetched %d of %d bytes; interrupted:\n%s",
		sigName(sig), time.Since(start).Seconds(), sum.Resumed, sum.Fetched, len(want), child.output)
}

// killMount ends a mount while it serves a file; the next mount there
// works (after kill -9 with --force, which clears the stale mount), and
// once it is stopped no mount, clone or hold is left.
func killMount(t *testing.T, sig syscall.Signal) {
	start := time.Now()
	sb := newRestoreSandbox(t)
	dir := mountDir(t)
	file := filepath.Join(dir, "latest", "images", "vm.img")
	first := startVMHistory(t, "mount", dir, "--config", sb.config)
	first.waitReadable(t, file)
	if err := first.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	err := first.wait(t, time.Minute)
	args := []string{"mount", dir, "--config", sb.config}
	if sig == syscall.SIGHUP {
		if err != nil {
			t.Errorf("mount after SIGHUP: %v, want exit status 0; output:\n%s", err, first.output)
		}
		if isMounted(t, dir) {
			t.Errorf("%s still mounted after SIGHUP", dir)
		}
	} else {
		args = append(args, "--force")
	}
	next := startVMHistory(t, args...)
	if got := next.waitReadable(t, file); sha(got) != sha(sb.image) {
		t.Errorf("vm.img through the next mount differs from the snapshot")
	}
	if err := next.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := next.wait(t, time.Minute); err != nil {
		t.Errorf("next mount after SIGTERM: %v; output:\n%s", err, next.output)
	}
	if isMounted(t, dir) {
		t.Errorf("%s still mounted after the next mount ended", dir)
	}
	if cl := clones(t, sb.snap); len(cl) > 0 {
		t.Errorf("clones left: %v", cl)
	}
	if h := restoreHolds(t, sb.snap); len(h) > 0 {
		t.Errorf("restore holds left: %v", h)
	}
	t.Logf("%s during mount: %.1f s; next:\n%s", sigName(sig), time.Since(start).Seconds(), next.output)
}
