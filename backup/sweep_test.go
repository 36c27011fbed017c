package backup

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/zfs"
)

// deadProcess runs a process and kills it, and returns its pid and start
// time (field 22 of /proc/PID/stat): what a vmhistory process killed with
// -9 leaves in its clones' owner property and its hold tags.
func deadProcess(t *testing.T) (pid int, start uint64) {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(data)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	start, err = strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	return cmd.Process.Pid, start
}

// leaveDeadClone makes the read-only clone of snapshot that a process
// killed while reading it leaves: owned by a process that no longer runs.
func leaveDeadClone(t *testing.T, z *zfs.ZFS, snapshot string, pid int, start uint64) string {
	t.Helper()
	host, _ := os.Hostname()
	clone := zfs.Pool(snapshot) + "/" + zfs.ClonePrefix + fmt.Sprintf("dead%d", pid)
	out, err := exec.Command("zfs", "clone", "-o", "readonly=on",
		"-o", "mountpoint="+filepath.Join(t.TempDir(), "clone"),
		"-o", fmt.Sprintf("%s=%s/%d/%d", zfs.CloneOwnerProperty, host, pid, start),
		snapshot, clone).CombinedOutput()
	if err != nil {
		t.Fatalf("zfs clone: %v: %s", err, out)
	}
	return clone
}

func exists(t *testing.T, z *zfs.ZFS, name string) bool {
	t.Helper()
	_, err := z.Get(context.Background(), name, "guid")
	return err == nil
}

// The recover step removes the clones and restore holds of dead
// processes, locally and on the replica, and nothing of live processes:
// prune then destroys the snapshots they pinned.
func TestRecoverSweepsDeadProcessesClonesAndHolds(t *testing.T) {
	sb := newSandbox(t, "none", 1, "keep_replica: 1\n")
	p := sb.pipeline()
	ctx := context.Background()
	if rep := sb.night(p, nights[0], Options{AllowFull: true}); rep.Err() != nil {
		t.Fatal(rep.Err())
	}
	first := sb.cfg.SnapshotName(nights[0])
	local := sb.dataset + "@" + first
	replica := sb.cfg.Datasets[0].ReplicaDataset + "@" + first

	pid, start := deadProcess(t)
	host, _ := os.Hostname()
	deadTag := fmt.Sprintf("%s-%s-%d-%d", restore.RestoreHoldTag, strings.ToLower(host), pid, start)
	var leaked []string
	for _, side := range []struct {
		z    *zfs.ZFS
		snap string
	}{{sb.src.ZFS, local}, {sb.dst.ZFS, replica}} {
		leaked = append(leaked, leaveDeadClone(t, side.z, side.snap, pid, start))
		if err := side.z.Hold(ctx, side.snap, deadTag); err != nil {
			t.Fatal(err)
		}
	}
	// A live reader of the first snapshot on the replica: its hold stays.
	liveTag, err := zfs.ProcessTag(restore.RestoreHoldTag)
	if err != nil {
		t.Fatal(err)
	}
	if err := sb.dst.ZFS.Hold(ctx, replica, liveTag); err != nil {
		t.Fatal(err)
	}

	rep := sb.night(p, nights[1], Options{})
	var b strings.Builder
	rep.WriteText(&b)
	if err := rep.Err(); err != nil {
		t.Fatalf("night 2: %v\n%s", err, b.String())
	}
	var recoverDetail string
	for _, s := range rep.Steps {
		if s.Step == StepRecover {
			recoverDetail = s.Detail
		}
	}
	for _, want := range append(leaked, deadTag) {
		if !strings.Contains(recoverDetail, want) {
			t.Errorf("recover step %q does not name %s", recoverDetail, want)
		}
	}
	for i, z := range []*zfs.ZFS{sb.src.ZFS, sb.dst.ZFS} {
		if exists(t, z, leaked[i]) {
			t.Errorf("the dead process's clone %s is still there", leaked[i])
		}
	}
	if exists(t, sb.src.ZFS, local) {
		t.Errorf("%s not pruned once its dead clone and hold were removed\n%s", local, b.String())
	}
	tags, err := sb.dst.ZFS.Holds(ctx, replica)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(tags, ",") != liveTag {
		t.Errorf("holds on the replica's %s: %v, want only the live process's %s", replica, tags, liveTag)
	}
	if err := sb.dst.ZFS.Release(ctx, replica, liveTag); err != nil {
		t.Fatal(err)
	}
}

// A snapshot kept because a live process reads it through a clone is a
// warning naming that process, not "ok" for ever.
func TestPruneNamesTheCloneThatKeepsASnapshot(t *testing.T) {
	sb := newSandbox(t, "none", 1, "")
	p := sb.pipeline()
	ctx := context.Background()
	if rep := sb.night(p, nights[0], Options{SkipReplicate: true}); rep.Err() != nil {
		t.Fatal(rep.Err())
	}
	first := sb.dataset + "@" + sb.cfg.SnapshotName(nights[0])
	view, err := sb.src.ZFS.OpenSnapshot(ctx, first) // this process reads it
	if err != nil {
		t.Fatal(err)
	}
	defer view.Close(ctx)
	if view.Clone == "" {
		t.Fatal("zfs-fuse opened the snapshot without a clone")
	}
	rep := sb.night(p, nights[1], Options{SkipReplicate: true})
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	var prune StepResult
	for _, s := range rep.Steps {
		if s.Step == StepPrune {
			prune = s
		}
	}
	want := fmt.Sprintf("kept by clone %s of process %d", view.Clone, os.Getpid())
	if prune.Status != StatusWarning || !strings.Contains(prune.Detail, want) || !strings.Contains(prune.Detail, "(running)") {
		t.Errorf("prune step %+v, want a warning naming %q (running)", prune, want)
	}
	if !exists(t, sb.src.ZFS, first) {
		t.Errorf("%s destroyed under its reader", first)
	}
}
