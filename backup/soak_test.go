package backup

// The soak (issue 11): thirty nights of the real pipeline, each with faults
// chosen by a seeded RNG — the replica's sshd down, the kopia store
// answering 429/503 or slow through the drive model, zfs snapshot failing,
// the run killed (its context cancelled) at a chosen step — and the
// admin's own snapshots now and then. After every night the promises are
// checked: VMs as they were, the incremental base on both sides, nothing
// destroyed that vmhistory did not make or that kopia lacks, and what kopia
// holds byte-identical to what was in the ZFS snapshot.
//
// Replay a failure with VMHISTORY_SOAK_SEED=<seed> (printed in every
// failure); VMHISTORY_SOAK_NIGHTS changes the number of nights.

import (
	"context"
	"crypto/sha256"
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
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/virt"
	"github.com/vmhistory/vmhistory/zfs"
)

const soakNights = 30

func TestSoak(t *testing.T) {
	seeds := []uint64{1, 20261201, rand.Uint64()}
	if s := os.Getenv("VMHISTORY_SOAK_SEED"); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("VMHISTORY_SOAK_SEED=%q: %v", s, err)
		}
		seeds = []uint64{seed}
	}
	n := soakNights
	if s := os.Getenv("VMHISTORY_SOAK_NIGHTS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n < 1 {
			t.Fatalf("VMHISTORY_SOAK_NIGHTS=%q: want a positive number", s)
		}
	}
	t.Logf("soak seeds %v, %d nights each (replay one with VMHISTORY_SOAK_SEED=<seed>)", seeds, n)
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			newSoak(t, seed).run(n)
		})
	}
}

// soakVMs are the test-driver VMs on the dataset; "old" is shut off by the
// admin and must stay so.
var soakVMs = []string{"web", "db"}

// soakKillPoints are where a night may be killed: just before the first VM
// is quiesced, or as the run starts the named zfs subcommand (snapshot;
// send: replicate; clone: upload; destroy: prune, here or on the replica).
var soakKillPoints = []string{"quiesce", "snapshot", "send", "clone", "destroy"}

type soak struct {
	t          *testing.T
	seed       uint64
	rng        *rand.Rand
	src, dst   *testenv.Pool
	dataset    string
	mountpoint string
	replicaDS  string
	cfg        *config.Config
	conn       *virt.Conn
	sshd       *testenv.SSHD
	replica    *zfs.ZFS
	faults     string // the flag files the zfs wrapper reads
	model      *drivemodel.Model

	live     map[string][32]byte            // the files of the dataset as last written
	expect   map[uint64]map[string][32]byte // per snapshot guid: its files
	admin    map[uint64]string              // the admin's snapshots
	seq      map[uint64]int                 // order in which snapshots were first seen
	ours     map[uint64]bool                // snapshots seen with vmhistory:run set
	names    map[uint64]string
	local    map[uint64]bool // on the dataset after the last night
	onRep    map[uint64]bool // ever seen on the replica
	inKopia  map[uint64]bool // ever seen in kopia
	verified map[uint64]bool // kopia snapshots whose bytes were compared
	base     int             // seq of the newest common snapshot after the last night; 0 before any
	faultLog map[string]int
	errs     []string // every errorf, repeated where the soak stops
}

func newSoak(t *testing.T, seed uint64) *soak {
	t.Helper()
	ctx := context.Background()
	s := &soak{t: t, seed: seed, rng: rand.New(rand.NewPCG(seed, seed^0x5eed)),
		src: testenv.NewPool(t, 128), dst: testenv.NewPool(t, 128),
		faults: t.TempDir(),
		live:   map[string][32]byte{}, expect: map[uint64]map[string][32]byte{}, admin: map[uint64]string{},
		seq: map[uint64]int{}, ours: map[uint64]bool{}, names: map[uint64]string{}, local: map[uint64]bool{},
		onRep: map[uint64]bool{}, inKopia: map[uint64]bool{}, verified: map[uint64]bool{}, faultLog: map[string]int{}}
	s.dataset, s.mountpoint = s.src.Dataset(t, "libvirt")

	realZFS, err := exec.LookPath("zfs")
	if err != nil {
		t.Fatal(err)
	}
	// "snapshot failure" and the kill points without a production hook:
	// the configured zfs binary is this wrapper.
	wrapper := filepath.Join(s.faults, "zfs")
	script := fmt.Sprintf(`#!/bin/sh
d=%q
if [ -e "$d/fail-$1" ]; then echo "soak: injected failure of zfs $1" >&2; exit 1; fi
if [ -e "$d/kill-$1" ]; then rm -f "$d/kill-$1"; : > "$d/reached"; sleep 0.2; fi
exec %q "$@"
`, s.faults, realZFS)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}

	var vms []testenv.TestVM
	for _, name := range soakVMs {
		vms = append(vms, testenv.TestVM{Name: name, Disks: []testenv.TestDisk{{Path: filepath.Join(s.mountpoint, "images", name+".qcow2")}}})
	}
	vms = append(vms, testenv.TestVM{Name: "old", State: testenv.VMShutoff, Disks: []testenv.TestDisk{{Path: filepath.Join(s.mountpoint, "images", "old.qcow2")}}})
	testenv.RequireLibvirt(t)
	uri := testenv.WriteTestNodeXML(t, t.TempDir(), vms...)

	// kopia: a filesystem repository seen through a shared drive model
	// whose parameters each night sets.
	kdir := t.TempDir()
	pwFile := filepath.Join(kdir, "password")
	if err := os.WriteFile(pwFile, []byte(testKopiaPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	direct := filepath.Join(kdir, "direct.config")
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(kdir, "repo")}, direct, testKopiaPassword,
		kopiarepo.CreateOptions{ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(kdir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	modelName := fmt.Sprintf("soak-%d-%s", seed, t.Name())
	modelled := filepath.Join(kdir, "kopia.config")
	if err := drivemodel.WriteConfig(direct, modelled, drivemodel.ConfigOptions{Model: modelName, KeepParams: true}); err != nil {
		t.Fatal(err)
	}
	s.model = drivemodel.Shared(modelName)
	s.model.SetParams(drivemodel.Params{})

	s.replicaDS = s.dst.Name + "/libvirt"
	yaml := fmt.Sprintf(`datasets: [%s]
keep_local: 3
keep_replica: 3
quiesce: {mode: managedsave, save_timeout: 30s, resume_timeout: 30s}
libvirt: {uri: "%s", socket: /var/run/libvirt/libvirt-sock}
replica: {target: %s}
zfs: {binary: %s}
state_dir: %s
kopia: {config_file: %s, password_file: %s, host: kvmhost, user: root, compression: zstd-fastest, splitter: FIXED-128K}
`, s.dataset, uri, s.replicaDS, wrapper, t.TempDir(), modelled, pwFile)
	s.cfg, err = config.Options{SkipFileChecks: true}.Parse([]byte(yaml), "soak.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// One libvirt connection for every night: the test driver keeps a
	// domain's state per connection.
	s.conn, err = virt.Dial(ctx, s.cfg.Libvirt.Socket, s.cfg.Libvirt.URI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.conn.Close() })
	s.sshd = testenv.StartSSHD(t)
	s.replica = zfs.New(s.sshd.SharedRunner(t), zfs.Options{Binary: wrapper, CommandTimeout: 30 * time.Second, StreamTimeout: time.Minute})
	t.Logf("soak seed %d", seed)
	return s
}

// fatalf and errorf name the seed, so that any failure can be replayed.
func (s *soak) fatalf(night int, format string, args ...any) {
	s.t.Helper()
	s.t.Fatalf("seed %d night %d: %s", s.seed, night, fmt.Sprintf(format, args...))
}

func (s *soak) errorf(night int, format string, args ...any) {
	s.t.Helper()
	msg := fmt.Sprintf("seed %d night %d: %s", s.seed, night, fmt.Sprintf(format, args...))
	s.errs = append(s.errs, msg)
	s.t.Error(msg)
}

// nightFaults are one night's faults.
type nightFaults struct {
	replicaDown  bool
	kopia        string // "", "errors", "outage", "latency"
	snapshotFail bool
	kill         string // "" or one of soakKillPoints
	adminSnap    bool
}

func (f nightFaults) String() string {
	var parts []string
	if f.replicaDown {
		parts = append(parts, "replica down")
	}
	if f.kopia != "" {
		parts = append(parts, "kopia "+f.kopia)
	}
	if f.snapshotFail {
		parts = append(parts, "snapshot fails")
	}
	if f.kill != "" {
		parts = append(parts, "killed at "+f.kill)
	}
	if f.adminSnap {
		parts = append(parts, "admin snapshot")
	}
	if len(parts) == 0 {
		return "no faults"
	}
	return strings.Join(parts, ", ")
}

func (s *soak) pick(night int) nightFaults {
	var f nightFaults
	if night == 1 {
		return f // a clean first night: the full send
	}
	f.replicaDown = s.rng.Float64() < 0.2
	if s.rng.Float64() < 0.35 {
		f.kopia = []string{"errors", "outage", "latency"}[s.rng.IntN(3)]
	}
	f.snapshotFail = s.rng.Float64() < 0.1
	if s.rng.Float64() < 0.2 {
		f.kill = soakKillPoints[s.rng.IntN(len(soakKillPoints))]
	}
	f.adminSnap = s.rng.Float64() < 0.15
	return f
}

func (s *soak) run(nights int) {
	start := time.Date(2024, 1, 1, 3, 0, 1, 0, time.UTC)
	began := time.Now()
	for night := 1; night <= nights; night++ {
		at := start.Add(time.Duration(night) * 24 * time.Hour)
		f := s.pick(night)
		rep := s.night(night, at, f)
		s.check(night, f, rep)
		s.t.Logf("night %d (%s): %v", night, f, rep.Err())
		if s.t.Failed() {
			var b strings.Builder
			rep.WriteText(&b)
			s.t.Logf("seed %d night %d: its report:\n%s", s.seed, night, b.String())
			// Last, so that the end of a long log says what went wrong.
			s.t.Fatalf("seed %d: stopped after night %d (%s): %s", s.seed, night, f, strings.Join(s.errs, "; "))
		}
	}
	var covered []string
	for k, v := range s.faultLog {
		covered = append(covered, fmt.Sprintf("%s ×%d", k, v))
	}
	slices.Sort(covered)
	s.t.Logf("seed %d: %d nights in %v; faults: %s", s.seed, nights, time.Since(began).Round(time.Second), strings.Join(covered, ", "))
}

// write changes the VM disks so that every snapshot differs.
func (s *soak) write(night int) {
	for _, vm := range append(slices.Clone(soakVMs), "old") {
		rel := filepath.Join("images", vm+".qcow2")
		b := make([]byte, 16<<10+s.rng.IntN(48<<10))
		var key [32]byte
		for i := range key {
			key[i] = byte(s.rng.Uint32())
		}
		rand.NewChaCha8(key).Read(b)
		if err := os.WriteFile(filepath.Join(s.mountpoint, rel), b, 0o644); err != nil {
			s.fatalf(night, "write %s: %v", rel, err)
		}
		s.live[rel] = sha256.Sum256(b)
	}
}

func (s *soak) night(night int, at time.Time, f nightFaults) *Report {
	s.t.Helper()
	ctx := context.Background()
	s.write(night)
	if f.adminSnap {
		// The admin's own snapshot, named like vmhistory's.
		name := s.cfg.SnapshotName(at.Add(-time.Hour))
		if out, err := exec.Command("zfs", "snapshot", s.dataset+"@"+name).CombinedOutput(); err != nil {
			s.fatalf(night, "admin's zfs snapshot: %v: %s", err, out)
		}
		g, err := s.src.ZFS.Get(ctx, s.dataset+"@"+name, "guid")
		if err != nil {
			s.fatalf(night, "%v", err)
		}
		guid, _ := strconv.ParseUint(g["guid"], 10, 64)
		s.admin[guid] = name
		s.expect[guid] = clone(s.live)
		s.faultLog["admin snapshot"]++
	}

	if f.replicaDown {
		s.sshd.Stop()
		s.faultLog["replica unreachable"]++
	}
	switch f.kopia {
	case "errors":
		s.model.SetParams(drivemodel.Params{ErrorRate: 0.2 + 0.3*s.rng.Float64(), Seed: s.rng.Uint64() | 1})
	case "outage":
		s.model.SetParams(drivemodel.Params{OutageEvery: time.Second, OutageFor: 300 * time.Millisecond})
	case "latency":
		s.model.SetParams(drivemodel.Params{Latency: time.Duration(1+s.rng.IntN(20)) * time.Millisecond})
	}
	if f.kopia != "" {
		s.faultLog["kopia "+f.kopia]++
	}
	if f.snapshotFail {
		s.flag(night, "fail-snapshot")
		s.faultLog["snapshot failure"]++
	}

	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	p, _ := Open(ctx, s.cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer p.Close()
	p.Virt = s.conn
	p.Replica = s.replica
	done := make(chan struct{})
	killed := make(chan struct{})
	switch f.kill {
	case "":
		close(killed)
	case "quiesce":
		p.testHookStopping = func(string) { cancel(errors.New("soak: killed")) }
		close(killed)
	default:
		s.flag(night, "kill-"+f.kill)
		go func() {
			defer close(killed)
			for {
				select {
				case <-done:
					return
				case <-time.After(5 * time.Millisecond):
				}
				if _, err := os.Stat(filepath.Join(s.faults, "reached")); err == nil {
					cancel(errors.New("soak: killed"))
					return
				}
			}
		}()
	}
	if f.kill != "" {
		s.faultLog["kill at "+f.kill]++
	}
	rep := p.Run(runCtx, Options{AllowFull: s.base == 0, Now: func() time.Time { return at }})
	close(done)
	<-killed

	// Faults end with the night.
	for _, name := range []string{"fail-snapshot", "reached", "kill-" + f.kill} {
		os.Remove(filepath.Join(s.faults, name))
	}
	if f.replicaDown {
		s.sshd.Restart()
	}
	s.model.SetParams(drivemodel.Params{})

	for _, sn := range rep.Snapshots {
		s.expect[sn.GUID] = clone(s.live)
	}
	s.verifyKopia(night, p, rep)
	return rep
}

func (s *soak) flag(night int, name string) {
	if err := os.WriteFile(filepath.Join(s.faults, name), nil, 0o644); err != nil {
		s.fatalf(night, "%v", err)
	}
}

func clone(m map[string][32]byte) map[string][32]byte {
	c := make(map[string][32]byte, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

func stepStatus(rep *Report, step, dataset string) string {
	for _, r := range rep.Steps {
		if r.Step == step && r.Dataset == dataset {
			return r.Status
		}
	}
	return ""
}

// verifyKopia reads back every kopia snapshot not yet compared and checks
// its files' bytes against what the ZFS snapshot of that guid held.
func (s *soak) verifyKopia(night int, p *Pipeline, rep *Report) {
	s.t.Helper()
	ctx := context.Background()
	up, ok := p.Uploader.(*kopiaUploader)
	if !ok {
		var err error
		if up, err = openKopiaUploader(ctx, s.cfg, nil); err != nil {
			s.fatalf(night, "open kopia to check it: %v", err)
		}
		defer up.Close(ctx)
	}
	snaps, err := up.repo.SnapshotsTagged(ctx, map[string]string{kopiarepo.TagDataset: s.dataset})
	if err != nil {
		s.fatalf(night, "list kopia snapshots: %v", err)
	}
	for _, ks := range snaps {
		guid, err := strconv.ParseUint(ks.Tags[kopiarepo.TagGUID], 10, 64)
		if err != nil {
			s.errorf(night, "kopia snapshot %s has guid tag %q", ks.ID, ks.Tags[kopiarepo.TagGUID])
			continue
		}
		s.inKopia[guid] = true
		if s.verified[guid] {
			continue
		}
		want, ok := s.expect[guid]
		if !ok {
			s.errorf(night, "kopia snapshot %s carries guid %d, which no snapshot of this soak had", ks.ID, guid)
			continue
		}
		for rel, sum := range want {
			f, err := up.repo.OpenFile(ctx, ks.ID, rel)
			if err != nil {
				s.errorf(night, "kopia snapshot of %s: %s: %v", ks.Tags[kopiarepo.TagSnapshot], rel, err)
				continue
			}
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				s.errorf(night, "read %s from kopia: %v", rel, err)
			} else if [32]byte(h.Sum(nil)) != sum {
				s.errorf(night, "kopia's %s of %s differs from the ZFS snapshot's", rel, ks.Tags[kopiarepo.TagSnapshot])
			}
		}
		s.verified[guid] = true
	}
	if stepStatus(rep, StepUpload, s.dataset) == StatusOK {
		for _, sn := range rep.Snapshots {
			if !s.inKopia[sn.GUID] {
				s.errorf(night, "upload ok, but kopia has no snapshot of tonight's %s", sn.Name)
			}
		}
	}
}

func (s *soak) check(night int, f nightFaults, rep *Report) {
	s.t.Helper()
	ctx := context.Background()

	// VMs as they were.
	for _, vm := range soakVMs {
		d, err := s.conn.Domain(ctx, vm)
		if err != nil {
			s.fatalf(night, "%v", err)
		}
		if !d.State.Running() {
			s.errorf(night, "(%s) VM %s is %s, want running", f, vm, d.State)
		}
	}
	if d, err := s.conn.Domain(ctx, "old"); err != nil || d.State.Running() {
		s.errorf(night, "(%s) the VM the admin shut off: %v %v", f, d.State, err)
	}

	local, err := s.src.ZFS.Snapshots(ctx, s.dataset)
	if err != nil {
		s.fatalf(night, "%v", err)
	}
	runProp, err := s.src.ZFS.LocalSnapshotProperty(ctx, s.dataset, RunProperty)
	if err != nil {
		s.fatalf(night, "%v", err)
	}
	remote, err := s.replica.Snapshots(ctx, s.replicaDS)
	if err != nil && !strings.Contains(err.Error(), "does not exist") {
		s.fatalf(night, "replica snapshots: %v", err)
	}
	now := map[uint64]bool{}
	for _, sn := range local {
		now[sn.GUID] = true
		if _, ok := s.seq[sn.GUID]; !ok {
			s.seq[sn.GUID] = len(s.seq) + 1
			s.names[sn.GUID] = sn.Name
		}
		if runProp[sn.Name] != "" {
			s.ours[sn.GUID] = true
		}
	}
	// Nothing destroyed locally that vmhistory did not make or kopia lacks.
	for g := range s.local {
		if now[g] {
			continue
		}
		if _, isAdmin := s.admin[g]; isAdmin || !s.ours[g] {
			s.errorf(night, "(%s) %s was destroyed, but vmhistory did not make it", f, s.names[g])
		}
		if !s.inKopia[g] {
			s.errorf(night, "(%s) %s was destroyed, but kopia never had it", f, s.names[g])
		}
	}
	s.local = now
	for g, name := range s.admin {
		if !now[g] {
			s.errorf(night, "(%s) the admin's snapshot %s is gone", f, name)
		}
	}

	// On the replica: nothing seen there destroyed unless vmhistory made it.
	remoteNow := map[uint64]bool{}
	for _, sn := range remote {
		remoteNow[sn.GUID] = true
		s.onRep[sn.GUID] = true
	}
	for g := range s.onRep {
		if remoteNow[g] {
			continue
		}
		if _, isAdmin := s.admin[g]; isAdmin || !s.ours[g] {
			s.errorf(night, "(%s) %s was destroyed on the replica, but vmhistory did not make it", f, s.names[g])
		}
		delete(s.onRep, g)
	}

	// The incremental base on both sides, never moving back.
	newest := 0
	for _, sn := range remote {
		if now[sn.GUID] {
			newest = max(newest, s.seq[sn.GUID])
		}
	}
	if s.base > 0 && newest < s.base {
		s.errorf(night, "(%s) the incremental base is lost: newest common snapshot seq %d, was %d (local %v, replica %v)",
			f, newest, s.base, local, remote)
	}
	if stepStatus(rep, StepReplicate, s.dataset) == StatusOK {
		for _, sn := range rep.Snapshots {
			if !remoteNow[sn.GUID] {
				s.errorf(night, "(%s) replicate ok, but the replica lacks tonight's %s", f, sn.Name)
			}
		}
	}
	s.base = max(s.base, newest)

	// A night with no fault is a clean night.
	if f.kill == "" && !f.replicaDown && !f.snapshotFail && f.kopia != "outage" && f.kopia != "errors" {
		if err := rep.Err(); err != nil {
			s.errorf(night, "(%s) a night without faults failed: %v", f, err)
		}
	}
	if record, _ := LoadStoppedVMs(s.cfg.StateDir); !record.Empty() {
		s.errorf(night, "(%s) stopped-VM record left: %v", f, record.Names())
	}
}
