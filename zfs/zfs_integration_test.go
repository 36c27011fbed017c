package zfs_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func snapshotNames(snaps []zfs.Snapshot) []string {
	var names []string
	for _, s := range snaps {
		names = append(names, s.Name)
	}
	return names
}

func TestSnapshotsListedWithGUIDAndCreation(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 128)
	ds, mnt := pool.Dataset(t, "libvirt")
	z := pool.ZFS

	f, err := z.Features(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if f.Dialect != "legacy" || f.ResumableReceive || f.ListHolds {
		t.Errorf("zfs-fuse detected as %+v, want the legacy dialect without resumable receive or holds listing", f)
	}

	before := time.Now().Add(-2 * time.Second)
	for i, name := range []string{"2023-03-04_05:00:01", "2023-03-11_05:00:01", "2023-03-18_05:00:01"} {
		writeFile(t, filepath.Join(mnt, "disk.img"), strings.Repeat(string(rune('a'+i)), 4096*(i+1)))
		s, err := z.CreateSnapshot(ctx, ds, name, map[string]string{"vmhistory:night": name})
		if err != nil {
			t.Fatal(err)
		}
		if s.Name != name || s.GUID == 0 {
			t.Fatalf("CreateSnapshot returned %+v", s)
		}
	}
	after := time.Now().Add(2 * time.Second)

	snaps, err := z.Snapshots(ctx, ds)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"2023-03-04_05:00:01", "2023-03-11_05:00:01", "2023-03-18_05:00:01"}
	if got := snapshotNames(snaps); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("snapshots %v, want %v in creation order", got, want)
	}
	guids := map[uint64]bool{}
	for _, s := range snaps {
		if s.Dataset != ds || s.FullName() != ds+"@"+s.Name {
			t.Errorf("snapshot %+v has the wrong dataset", s)
		}
		if s.GUID == 0 || guids[s.GUID] {
			t.Errorf("snapshot %s: guid %d is zero or repeated", s.Name, s.GUID)
		}
		guids[s.GUID] = true
		if s.Creation.Before(before) || s.Creation.After(after) {
			t.Errorf("snapshot %s: creation %v not within [%v, %v]", s.Name, s.Creation, before, after)
		}
		if s.Referenced == 0 {
			t.Errorf("snapshot %s: referenced is 0", s.Name)
		}
	}
	if props, err := z.Get(ctx, snaps[0].FullName(), "vmhistory:night"); err != nil || props["vmhistory:night"] != want[0] {
		t.Errorf("user property set with the snapshot: %v, %v", props, err)
	}

	// A child dataset's snapshots are not the parent's.
	child, _ := pool.Dataset(t, "libvirt/child")
	if _, err := z.CreateSnapshot(ctx, child, "other", nil); err != nil {
		t.Fatal(err)
	}
	if snaps2, err := z.Snapshots(ctx, ds); err != nil || len(snaps2) != 3 {
		t.Errorf("after a child snapshot: %v, %v", snapshotNames(snaps2), err)
	}

	if _, err := z.Snapshots(ctx, pool.Name+"/missing"); !errors.Is(err, zfs.ErrNotExist) {
		t.Errorf("listing a missing dataset: %v, want ErrNotExist", err)
	}
	if _, err := z.CreateSnapshot(ctx, ds, "bad name", nil); err == nil || !strings.Contains(err.Error(), "bad name") {
		t.Errorf("bad snapshot name: %v", err)
	}
}

func TestIncrementalSendReceiveKeepsGUIDs(t *testing.T) {
	ctx := context.Background()
	src := testenv.NewPool(t, 128)
	dst := testenv.NewPool(t, 128)
	ds, mnt := src.Dataset(t, "libvirt")
	replica := dst.Name + "/libvirt"

	var sent []zfs.Snapshot
	for i := 0; i < 3; i++ {
		writeFile(t, filepath.Join(mnt, "disk.img"), strings.Repeat("x", 100_000*(i+1)))
		s, err := src.ZFS.CreateSnapshot(ctx, ds, "night"+string(rune('1'+i)), nil)
		if err != nil {
			t.Fatal(err)
		}
		sent = append(sent, s)
	}

	n, err := zfs.Transfer(ctx, src.ZFS, zfs.SendOptions{Snapshot: sent[0].FullName()}, dst.ZFS, replica, zfs.ReceiveOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n < 100_000 {
		t.Errorf("full stream of %d bytes, want at least the file's 100000", n)
	}
	// The replica is read-only, as vmhistory keeps it, so nothing local
	// changes it between receives.
	if err := dst.ZFS.Set(ctx, replica, "readonly", "on"); err != nil {
		t.Fatal(err)
	}
	for i := 1; i < 3; i++ {
		if _, err := zfs.Transfer(ctx, src.ZFS, zfs.SendOptions{Snapshot: sent[i].FullName(), From: sent[i-1].FullName()},
			dst.ZFS, replica, zfs.ReceiveOptions{Resumable: true}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := dst.ZFS.Snapshots(ctx, replica)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("replica has %v, want 3 snapshots", snapshotNames(got))
	}
	for i := range got {
		if got[i].Name != sent[i].Name || got[i].GUID != sent[i].GUID {
			t.Errorf("replica snapshot %s guid %d, source %s guid %d", got[i].Name, got[i].GUID, sent[i].Name, sent[i].GUID)
		}
	}

	// Sending a full stream again onto the existing replica is refused.
	_, err = zfs.Transfer(ctx, src.ZFS, zfs.SendOptions{Snapshot: sent[2].FullName()}, dst.ZFS, replica, zfs.ReceiveOptions{})
	if !errors.Is(err, zfs.ErrDestinationExists) && !errors.Is(err, zfs.ErrDiverged) {
		t.Errorf("full send onto an existing replica: %v, want ErrDestinationExists", err)
	}

	// A replica changed behind vmhistory's back has diverged: the
	// incremental receive without -F fails with a named error, nothing
	// is rolled back.
	if err := dst.ZFS.Set(ctx, replica, "readonly", "off"); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dst.Mountpoint, "libvirt", "intruder"), "local change")
	writeFile(t, filepath.Join(mnt, "disk.img"), "night4")
	s4, err := src.ZFS.CreateSnapshot(ctx, ds, "night4", nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = zfs.Transfer(ctx, src.ZFS, zfs.SendOptions{Snapshot: s4.FullName(), From: sent[2].FullName()}, dst.ZFS, replica, zfs.ReceiveOptions{})
	if !errors.Is(err, zfs.ErrDiverged) {
		t.Fatalf("incremental receive onto a modified replica: %v, want ErrDiverged", err)
	}
	if _, err := os.Stat(filepath.Join(dst.Mountpoint, "libvirt", "intruder")); err != nil {
		t.Errorf("the replica's local change was rolled back: %v", err)
	}
	// With Force the receive rolls back and succeeds.
	if _, err := zfs.Transfer(ctx, src.ZFS, zfs.SendOptions{Snapshot: s4.FullName(), From: sent[2].FullName()}, dst.ZFS, replica, zfs.ReceiveOptions{Force: true}); err != nil {
		t.Fatalf("forced receive: %v", err)
	}

	if _, err := dst.ZFS.ResumeToken(ctx, replica); !errors.Is(err, zfs.ErrNotSupported) {
		t.Errorf("resume token on zfs-fuse: %v, want ErrNotSupported", err)
	}
	var buf bytes.Buffer
	if err := src.ZFS.Send(ctx, zfs.SendOptions{Snapshot: ds + "@nosuch"}, &buf); !errors.Is(err, zfs.ErrNotExist) {
		t.Errorf("sending a missing snapshot: %v, want ErrNotExist", err)
	}
}

func TestHeldSnapshotCannotBeDestroyed(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 64)
	ds, _ := pool.Dataset(t, "libvirt")
	z := pool.ZFS
	s, err := z.CreateSnapshot(ctx, ds, "base", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := z.Hold(ctx, s.FullName(), "replica-base"); err != nil {
		t.Fatal(err)
	}
	if err := z.Hold(ctx, s.FullName(), "replica-base"); err != nil {
		t.Errorf("holding twice: %v", err)
	}
	if err := z.Hold(ctx, s.FullName(), "restore"); err != nil {
		t.Fatal(err)
	}
	tags, err := z.Holds(ctx, s.FullName())
	if err != nil || strings.Join(tags, ",") != "replica-base,restore" {
		t.Errorf("holds %v, %v; want replica-base,restore", tags, err)
	}
	if held, err := z.HeldSnapshots(ctx, ds, "restore"); err != nil || strings.Join(held, ",") != s.FullName() {
		t.Errorf("snapshots held by restore: %v, %v", held, err)
	}
	if got, _ := z.GetSnapshot(ctx, s.FullName()); got.UserRefs != 2 {
		t.Errorf("userrefs %d, want 2", got.UserRefs)
	}
	if err := z.Destroy(ctx, s.FullName()); !errors.Is(err, zfs.ErrBusy) {
		t.Fatalf("destroying a held snapshot: %v, want ErrBusy", err)
	}

	for _, tag := range []string{"replica-base", "restore"} {
		if err := z.Release(ctx, s.FullName(), tag); err != nil {
			t.Fatal(err)
		}
	}
	if err := z.Release(ctx, s.FullName(), "restore"); err != nil {
		t.Errorf("releasing a released tag: %v", err)
	}
	if tags, err := z.Holds(ctx, s.FullName()); err != nil || len(tags) != 0 {
		t.Errorf("holds after release: %v, %v", tags, err)
	}
	if err := z.Destroy(ctx, s.FullName()); err != nil {
		t.Fatalf("destroy after release: %v", err)
	}
	if ok, err := z.Exists(ctx, s.FullName()); err != nil || ok {
		t.Errorf("snapshot still exists after destroy: %v, %v", ok, err)
	}
	if err := z.Hold(ctx, ds+"@base", "Bad Tag"); err == nil {
		t.Error("a hold tag with spaces and capitals was accepted")
	}
}

func listClones(t *testing.T, pool *testenv.Pool) []string {
	t.Helper()
	out, err := (&runner.Local{}).Run(context.Background(), runner.Cmd{Args: []string{"zfs", "list", "-H", "-o", "name", "-r", pool.Name}})
	if err != nil {
		t.Fatal(err)
	}
	var clones []string
	for _, name := range strings.Fields(string(out)) {
		if strings.HasPrefix(name, pool.Name+"/"+zfs.ClonePrefix) {
			clones = append(clones, name)
		}
	}
	return clones
}

func TestOpenSnapshotReadsOldBytesAndLeavesNoClone(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 128)
	ds, mnt := pool.Dataset(t, "libvirt")
	z := pool.ZFS
	if err := os.MkdirAll(filepath.Join(mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte("old disk block "), 50_000)
	if err := os.WriteFile(filepath.Join(mnt, "images", "vm.qcow2"), old, 0o640); err != nil {
		t.Fatal(err)
	}
	s, err := z.CreateSnapshot(ctx, ds, "2023-03-04_05:00:01", nil)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(mnt, "images", "vm.qcow2"), "new contents")

	view, err := z.OpenSnapshot(ctx, s.FullName())
	if err != nil {
		t.Fatal(err)
	}
	if view.Clone == "" {
		t.Errorf("zfs-fuse has no .zfs/snapshot, but no clone was made (root %s)", view.Root)
	}
	got, err := os.ReadFile(filepath.Join(view.Root, "images", "vm.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, old) {
		t.Errorf("read %d bytes from the snapshot, want the old %d", len(got), len(old))
	}
	if err := os.WriteFile(filepath.Join(view.Root, "images", "vm.qcow2"), []byte("x"), 0o644); err == nil {
		t.Error("writing into the snapshot view succeeded; the clone must be read-only")
	}
	if clones := listClones(t, pool); len(clones) != 1 {
		t.Errorf("clones while open: %v", clones)
	}
	root := view.Root
	if err := view.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if clones := listClones(t, pool); len(clones) != 0 {
		t.Errorf("clones left behind: %v", clones)
	}
	if _, err := os.Stat(root); !os.IsNotExist(err) {
		t.Errorf("clone mount directory %s left behind: %v", root, err)
	}
	if err := view.Close(ctx); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := z.OpenSnapshot(ctx, ds+"@missing"); !errors.Is(err, zfs.ErrNotExist) {
		t.Errorf("opening a missing snapshot: %v, want ErrNotExist", err)
	}
}

func TestSweepClonesRemovesOnlyDeadOwners(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 64)
	ds, _ := pool.Dataset(t, "libvirt")
	z := pool.ZFS
	s, err := z.CreateSnapshot(ctx, ds, "s1", nil)
	if err != nil {
		t.Fatal(err)
	}
	live, err := z.OpenSnapshot(ctx, s.FullName())
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close(ctx)

	host, _ := os.Hostname()
	stale := pool.Name + "/" + zfs.ClonePrefix + "stale"
	staleDir := filepath.Join(testenv.PoolDir, "clones", "stale-test")
	if _, err := (&runner.Local{}).Run(ctx, runner.Cmd{Args: []string{"zfs", "clone", "-o", "readonly=on",
		"-o", "mountpoint=" + staleDir, "-o", zfs.CloneOwnerProperty + "=" + host + "/999999999/1", s.FullName(), stale}}); err != nil {
		t.Fatal(err)
	}
	// Not ours: no owner property, same prefix. Left alone.
	foreign := pool.Name + "/" + zfs.ClonePrefix + "foreign"
	if _, err := (&runner.Local{}).Run(ctx, runner.Cmd{Args: []string{"zfs", "clone", s.FullName(), foreign}}); err != nil {
		t.Fatal(err)
	}

	removed, err := z.SweepClones(ctx, pool.Name)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(removed, ",") != stale {
		t.Errorf("swept %v, want only %s", removed, stale)
	}
	clones := listClones(t, pool)
	if strings.Join(clones, ",") != strings.Join([]string{foreign, live.Clone}, ",") &&
		strings.Join(clones, ",") != strings.Join([]string{live.Clone, foreign}, ",") {
		t.Errorf("after the sweep: %v, want the live clone %s and the foreign one", clones, live.Clone)
	}
	if _, err := os.Stat(staleDir); !os.IsNotExist(err) {
		t.Errorf("stale clone mount directory left: %v", err)
	}
	if err := z.Destroy(ctx, foreign); err != nil {
		t.Fatal(err)
	}
}

func TestHangingZFSCommandIsKilledAtTimeout(t *testing.T) {
	// The real daemon cannot be made to hang without stalling every other
	// test; a stand-in zfs that never answers shows the runner's timeout.
	dir := t.TempDir()
	fake := filepath.Join(dir, "zfs")
	writeFile(t, fake, "#!/bin/sh\necho 'waiting forever' >&2\nsleep 600\n")
	if err := os.Chmod(fake, 0o755); err != nil {
		t.Fatal(err)
	}
	z := zfs.New(&runner.Local{}, zfs.Options{Binary: fake, CommandTimeout: 500 * time.Millisecond})
	start := time.Now()
	_, err := z.Snapshots(context.Background(), "tank/libvirt")
	if !errors.Is(err, runner.ErrTimeout) {
		t.Fatalf("got %v, want a timeout error", err)
	}
	if elapsed := time.Since(start); elapsed > 10*time.Second {
		t.Errorf("the hanging command was stopped after %v", elapsed)
	}
	for _, want := range []string{"tank/libvirt", "timeout of 500ms", "waiting forever"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestIntermediateSendAndRollback(t *testing.T) {
	ctx := context.Background()
	src := testenv.NewPool(t, 64)
	dst := testenv.NewPool(t, 64)
	ds, mnt := src.Dataset(t, "libvirt")
	replica := dst.Name + "/libvirt"
	var snaps []zfs.Snapshot
	for _, name := range []string{"a", "b", "c", "d"} {
		writeFile(t, filepath.Join(mnt, "f"), name)
		s, err := src.ZFS.CreateSnapshot(ctx, ds, name, nil)
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, s)
	}
	if _, err := zfs.Transfer(ctx, src.ZFS, zfs.SendOptions{Snapshot: snaps[0].FullName()}, dst.ZFS, replica, zfs.ReceiveOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := dst.ZFS.Set(ctx, replica, "readonly", "on"); err != nil {
		t.Fatal(err)
	}
	// -I a..d brings b and c along.
	if _, err := zfs.Transfer(ctx, src.ZFS, zfs.SendOptions{From: snaps[0].FullName(), Snapshot: snaps[3].FullName(), Intermediate: true},
		dst.ZFS, replica, zfs.ReceiveOptions{}); err != nil {
		t.Fatal(err)
	}
	got, err := dst.ZFS.Snapshots(ctx, replica)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(snapshotNames(got), ",") != "a,b,c,d" {
		t.Fatalf("replica has %v after -I, want a,b,c,d", snapshotNames(got))
	}
	if err := dst.ZFS.Rollback(ctx, replica+"@b"); err != nil {
		t.Fatal(err)
	}
	got, _ = dst.ZFS.Snapshots(ctx, replica)
	if strings.Join(snapshotNames(got), ",") != "a,b" {
		t.Errorf("after rollback to b: %v", snapshotNames(got))
	}
}
