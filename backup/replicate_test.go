package backup

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

func snapNames(t *testing.T, z *zfs.ZFS, dataset string) string {
	t.Helper()
	snaps, err := z.Snapshots(context.Background(), dataset)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range snaps {
		names = append(names, s.Name)
	}
	return strings.Join(names, ",")
}

func heldNames(t *testing.T, z *zfs.ZFS, dataset string) string {
	t.Helper()
	held, err := z.HeldSnapshots(context.Background(), dataset, ReplicaHoldTag)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(held, ",")
}

func night(t *testing.T, z *zfs.ZFS, dataset, mnt, name string) zfs.Snapshot {
	t.Helper()
	if err := os.WriteFile(filepath.Join(mnt, "disk.img"), []byte(strings.Repeat(name, 10_000)), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := z.CreateSnapshot(context.Background(), dataset, name, map[string]string{RunProperty: "test-run"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func testReplication(t *testing.T, replicaZFS func(*testenv.Pool) *zfs.ZFS) {
	ctx := context.Background()
	src := testenv.NewPool(t, 128)
	dst := testenv.NewPool(t, 128)
	ds, mnt := src.Dataset(t, "libvirt")
	replicaDS := dst.Name + "/libvirt"
	remote := replicaZFS(dst)
	r := &Replicator{Source: src.ZFS, Replica: remote, SourceDataset: ds, ReplicaDataset: replicaDS, Keep: 3}

	night(t, src.ZFS, ds, mnt, "n1")
	night(t, src.ZFS, ds, mnt, "n2")
	if _, err := r.Run(ctx); !errors.Is(err, ErrNeedFull) || !strings.Contains(err.Error(), "--allow-full") {
		t.Fatalf("first replication without --allow-full: %v", err)
	}
	r.AllowFull = true
	res, err := r.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Full || strings.Join(res.Sent, ",") != "n1,n2" || res.Bytes == 0 {
		t.Errorf("seeding: %+v", res)
	}
	if got := snapNames(t, dst.ZFS, replicaDS); got != "n1,n2" {
		t.Errorf("replica has %s", got)
	}
	// zfs-fuse reports readonly as "off temporary" on a received dataset
	// even when it is read-only; what counts is that writes fail.
	if err := os.WriteFile(filepath.Join(dst.Mountpoint, "libvirt", "intruder"), []byte("x"), 0o644); err == nil {
		t.Error("the replica is writable; it must be readonly=on")
	}
	if h := heldNames(t, src.ZFS, ds); h != ds+"@n2" {
		t.Errorf("source base hold on %q", h)
	}
	r.AllowFull = false

	// Nights 3..5: incremental, the hold follows the base, keep 3 on the replica.
	for _, n := range []string{"n3", "n4", "n5"} {
		s := night(t, src.ZFS, ds, mnt, n)
		res, err := r.Run(ctx)
		if err != nil {
			t.Fatalf("night %s: %v", n, err)
		}
		if res.Full || strings.Join(res.Sent, ",") != n {
			t.Errorf("night %s: %+v", n, res)
		}
		if h := heldNames(t, src.ZFS, ds); h != s.FullName() {
			t.Errorf("night %s: source holds %q", n, h)
		}
		if h := heldNames(t, dst.ZFS, replicaDS); h != replicaDS+"@"+n {
			t.Errorf("night %s: replica holds %q", n, h)
		}
	}
	if got := snapNames(t, dst.ZFS, replicaDS); got != "n3,n4,n5" {
		t.Errorf("after keep 3, replica has %s", got)
	}
	srcSnaps, _ := src.ZFS.Snapshots(ctx, ds)
	dstSnaps, _ := dst.ZFS.Snapshots(ctx, replicaDS)
	for i := range dstSnaps {
		if dstSnaps[i].GUID != srcSnaps[i+2].GUID {
			t.Errorf("replica %s guid differs from the source's", dstSnaps[i].Name)
		}
	}
	if res, err := r.Run(ctx); err != nil || !res.UpToDate {
		t.Errorf("nothing new: %+v, %v", res, err)
	}

	// The held base cannot be pruned on the source either.
	if err := src.ZFS.Destroy(ctx, ds+"@n5"); !errors.Is(err, zfs.ErrBusy) {
		t.Errorf("destroying the held base: %v", err)
	}

	// A snapshot made on the replica: diverged, named, nothing destroyed.
	if _, err := dst.ZFS.CreateSnapshot(ctx, replicaDS, "manual", nil); err != nil {
		t.Fatal(err)
	}
	night(t, src.ZFS, ds, mnt, "n6")
	if _, err := r.Run(ctx); !errors.Is(err, ErrReplicaDiverged) || !strings.Contains(err.Error(), "manual") {
		t.Fatalf("diverged replica: %v", err)
	}
	if got := snapNames(t, dst.ZFS, replicaDS); !strings.Contains(got, "manual") {
		t.Errorf("the replica's own snapshot was destroyed without --force-rollback: %s", got)
	}
	r.ForceRollback = true
	if _, err := r.Run(ctx); err != nil {
		t.Fatalf("with --force-rollback: %v", err)
	}
	if got := snapNames(t, dst.ZFS, replicaDS); got != "n4,n5,n6" {
		t.Errorf("after rollback and keep 3: %s", got)
	}
}

func TestReplicationToLocalPool(t *testing.T) {
	testReplication(t, func(p *testenv.Pool) *zfs.ZFS { return p.ZFS })
}

func TestReplicationOverSSH(t *testing.T) {
	sshd := testenv.StartSSHD(t)
	testReplication(t, func(p *testenv.Pool) *zfs.ZFS {
		return zfs.New(sshd.SharedRunner(t), zfs.Options{CommandTimeout: time.Minute})
	})
	if !strings.Contains(strings.Join(sshd.Commands(), "\n"), "zfs receive") {
		t.Error("no receive arrived over ssh")
	}
}

// The disaster case: the local pool was rebuilt, so no snapshot is common
// with a replica that holds the history. --allow-full --force-rollback must
// not replace it; the error points at a new replica dataset; only naming
// the replica dataset exactly replaces it.
func TestFullSendRefusedOverReplicaHistory(t *testing.T) {
	ctx := context.Background()
	old := testenv.NewPool(t, 128)
	dst := testenv.NewPool(t, 128)
	ds, mnt := old.Dataset(t, "libvirt")
	replicaDS := dst.Name + "/libvirt"
	r := &Replicator{Source: old.ZFS, Replica: dst.ZFS, SourceDataset: ds, ReplicaDataset: replicaDS, AllowFull: true}
	night(t, old.ZFS, ds, mnt, "n1")
	night(t, old.ZFS, ds, mnt, "n2")
	if _, err := r.Run(ctx); err != nil {
		t.Fatal(err)
	}
	history, err := dst.ZFS.Snapshots(ctx, replicaDS)
	if err != nil || len(history) != 2 {
		t.Fatalf("set-up: replica has %v, %v", history, err)
	}

	rebuilt := testenv.NewPool(t, 128)
	newDS, newMnt := rebuilt.Dataset(t, "libvirt")
	fresh := night(t, rebuilt.ZFS, newDS, newMnt, "m1")
	r = &Replicator{Source: rebuilt.ZFS, Replica: dst.ZFS, SourceDataset: newDS, ReplicaDataset: replicaDS}
	assertKept := func(when string) {
		t.Helper()
		got, err := dst.ZFS.Snapshots(ctx, replicaDS)
		if err != nil || len(got) != len(history) {
			t.Fatalf("%s: the replica has %v (%v), want its %d snapshots", when, got, err, len(history))
		}
		for i := range got {
			if got[i].GUID != history[i].GUID {
				t.Errorf("%s: replica snapshot %s changed", when, got[i].Name)
			}
		}
	}

	_, err = r.Run(ctx)
	if !errors.Is(err, ErrNeedFull) || !strings.Contains(err.Error(), "replica_dataset") || !strings.Contains(err.Error(), "--replace-replica "+replicaDS) {
		t.Errorf("without --allow-full: %v", err)
	}
	assertKept("without --allow-full")

	r.AllowFull, r.ForceRollback = true, true
	_, err = r.Run(ctx)
	if !errors.Is(err, ErrReplicaHasHistory) {
		t.Fatalf("--allow-full --force-rollback over the replica's history: %v", err)
	}
	msg := err.Error()
	for _, want := range []string{"n1", "n2", "new dataset", "replica_dataset", "--replace-replica " + replicaDS} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "add --force-rollback") || strings.Contains(msg, "rerun with --force-rollback") {
		t.Errorf("error %q recommends --force-rollback", msg)
	}
	assertKept("with --allow-full --force-rollback")

	for _, wrong := range []string{dst.Name, replicaDS + "/", "libvirt", replicaDS + "x"} {
		r.ReplaceReplica = wrong
		if _, err := r.Run(ctx); !errors.Is(err, ErrReplicaHasHistory) {
			t.Errorf("--replace-replica %q: %v", wrong, err)
		}
		assertKept("with --replace-replica " + wrong)
	}

	// Named, but without --allow-full: still no full send.
	r.AllowFull, r.ForceRollback, r.ReplaceReplica = false, false, replicaDS
	if _, err := r.Run(ctx); !errors.Is(err, ErrNeedFull) {
		t.Errorf("--replace-replica without --allow-full: %v", err)
	}
	assertKept("with --replace-replica but without --allow-full")

	r.AllowFull = true
	res, err := r.Run(ctx)
	if err != nil {
		t.Fatalf("--allow-full --replace-replica %s: %v", replicaDS, err)
	}
	if !res.Full || strings.Join(res.Replaced, ",") != "n1,n2" {
		t.Errorf("replacement: %+v", res)
	}
	got, err := dst.ZFS.Snapshots(ctx, replicaDS)
	if err != nil || len(got) != 1 || got[0].GUID != fresh.GUID {
		t.Errorf("after replacing, the replica has %v (%v), want only m1", got, err)
	}
	if h := heldNames(t, dst.ZFS, replicaDS); h != replicaDS+"@m1" {
		t.Errorf("replica base hold on %q", h)
	}
}

// spyRunner runs commands for real and remembers them.
type spyRunner struct {
	runner.Runner
	mu    sync.Mutex
	lines []string
}

func (s *spyRunner) Run(ctx context.Context, c runner.Cmd) ([]byte, error) {
	s.mu.Lock()
	s.lines = append(s.lines, c.String())
	s.mu.Unlock()
	return s.Runner.Run(ctx, c)
}

// zfs-fuse's receive knows only -vnF: the resume path must not run there,
// and no receive may be given -s.
func TestReplicationOnZFSFuseNeverResumes(t *testing.T) {
	ctx := context.Background()
	src := testenv.NewPool(t, 128)
	dst := testenv.NewPool(t, 128)
	ds, mnt := src.Dataset(t, "libvirt")
	spy := &spyRunner{Runner: &runner.Local{}}
	replica := zfs.New(spy, zfs.Options{CommandTimeout: time.Minute})
	r := &Replicator{Source: src.ZFS, Replica: replica, SourceDataset: ds, ReplicaDataset: dst.Name + "/libvirt", AllowFull: true}
	night(t, src.ZFS, ds, mnt, "n1")
	night(t, src.ZFS, ds, mnt, "n2")
	if _, err := r.Run(ctx); err != nil {
		t.Fatal(err)
	}
	night(t, src.ZFS, ds, mnt, "n3")
	res, err := r.Run(ctx)
	if err != nil || strings.Join(res.Sent, ",") != "n3" || res.Resumed || res.AbortedResume != "" {
		t.Fatalf("incremental on zfs-fuse: %+v, %v", res, err)
	}
	receives := 0
	for _, line := range spy.lines {
		if strings.Contains(line, " receive ") {
			receives++
		}
		if strings.Contains(line, " receive -s") || strings.Contains(line, " receive -A") || strings.Contains(line, "receive_resume_token") {
			t.Errorf("zfs-fuse was given %q", line)
		}
	}
	if receives != 3 {
		t.Errorf("%d receives ran, want 3 (full, -I, -I): %q", receives, spy.lines)
	}
}
