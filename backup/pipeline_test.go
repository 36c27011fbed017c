package backup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/virt"
	"github.com/vmhistory/vmhistory/zfs"
)

// sandbox is one host's worth of real services: a dataset with VM disks on
// a zfs-fuse pool, a replica pool, and libvirt's test driver with VMs whose
// disks live on the dataset.
type sandbox struct {
	t          *testing.T
	src, dst   *testenv.Pool
	dataset    string
	mountpoint string
	cfg        *config.Config
	conn       *virt.Conn
	vms        []string
	nights     int
}

func newSandbox(t *testing.T, mode string, keepLocal int, extraYAML string) *sandbox {
	t.Helper()
	ctx := context.Background()
	sb := &sandbox{t: t, src: testenv.NewPool(t, 128), dst: testenv.NewPool(t, 128)}
	sb.dataset, sb.mountpoint = sb.src.Dataset(t, "libvirt")
	var vms []testenv.TestVM
	for _, name := range []string{"web", "db", "mail"} {
		vms = append(vms, testenv.TestVM{Name: name, Disks: []testenv.TestDisk{{Path: filepath.Join(sb.mountpoint, "images", name+".qcow2")}}})
		sb.vms = append(sb.vms, name)
	}
	// Stopped by the admin: must stay stopped.
	vms = append(vms, testenv.TestVM{Name: "old", State: testenv.VMShutoff, Disks: []testenv.TestDisk{{Path: filepath.Join(sb.mountpoint, "images", "old.qcow2")}}})
	// Not on the dataset: never touched.
	vms = append(vms, testenv.TestVM{Name: "elsewhere", Disks: []testenv.TestDisk{{Path: filepath.Join(t.TempDir(), "elsewhere.qcow2")}}})
	testenv.RequireLibvirt(t)
	uri := testenv.WriteTestNodeXML(t, t.TempDir(), vms...)

	yaml := fmt.Sprintf(`datasets: [%s]
keep_local: %d
quiesce: {mode: %s, save_timeout: 30s, resume_timeout: 30s}
libvirt: {uri: "%s", socket: /var/run/libvirt/libvirt-sock}
replica: {target: %s}
state_dir: %s
%s`, sb.dataset, keepLocal, mode, uri, sb.dst.Name+"/libvirt", t.TempDir(), extraYAML)
	cfg, err := config.Options{SkipFileChecks: true}.Parse([]byte(yaml), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	sb.cfg = cfg
	sb.conn, err = virt.Dial(ctx, cfg.Libvirt.Socket, cfg.Libvirt.URI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.conn.Close() })
	return sb
}

func (sb *sandbox) pipeline() *Pipeline {
	return &Pipeline{Config: sb.cfg, Local: sb.src.ZFS, Replica: sb.dst.ZFS, Virt: sb.conn}
}

// night changes the disks and runs the pipeline at the given time.
func (sb *sandbox) night(p *Pipeline, at time.Time, opts Options) *Report {
	sb.t.Helper()
	sb.nights++
	for _, vm := range sb.vms {
		f := filepath.Join(sb.mountpoint, "images", vm+".qcow2")
		// The size changes every night: zfs-fuse keeps mtimes to the
		// second, and kopia (rightly) takes a file with the same size and
		// mtime as its previous snapshot's for unchanged.
		if err := os.WriteFile(f, []byte(strings.Repeat(vm+at.String(), 5000+sb.nights)), 0o644); err != nil {
			sb.t.Fatal(err)
		}
	}
	opts.Now = func() time.Time { return at }
	return p.Run(context.Background(), opts)
}

func (sb *sandbox) state(name string) virt.State {
	sb.t.Helper()
	d, err := sb.conn.Domain(context.Background(), name)
	if err != nil {
		sb.t.Fatal(err)
	}
	return d.State
}

func (sb *sandbox) assertRunning(when string) {
	sb.t.Helper()
	for _, vm := range append([]string{"elsewhere"}, sb.vms...) {
		if st := sb.state(vm); !st.Running() {
			sb.t.Errorf("%s: VM %s is %s, want running", when, vm, st)
		}
	}
	if st := sb.state("old"); st.Running() {
		sb.t.Errorf("%s: the VM the admin stopped was started", when)
	}
}

var nights = []time.Time{
	time.Date(2023, 3, 4, 5, 0, 1, 0, time.UTC),
	time.Date(2023, 3, 11, 5, 0, 1, 0, time.UTC),
	time.Date(2023, 3, 18, 5, 0, 1, 0, time.UTC),
}

func TestThreeNightsManagedSaveWithLocalReplica(t *testing.T) {
	sb := newSandbox(t, "managedsave", 20, "")
	p := sb.pipeline()
	for i, at := range nights {
		rep := sb.night(p, at, Options{AllowFull: i == 0})
		if err := rep.Err(); err != nil {
			var b strings.Builder
			rep.WriteText(&b)
			t.Fatalf("night %d: %v\n%s", i+1, err, b.String())
		}
		sb.assertRunning(fmt.Sprintf("after night %d", i+1))
		if len(rep.VMs) != 3 {
			t.Errorf("night %d: %d VMs in the report, want web, db, mail", i+1, len(rep.VMs))
		}
		for _, vm := range rep.VMs {
			if !vm.Resumed || vm.Downtime <= 0 {
				t.Errorf("night %d: VM %+v", i+1, vm)
			}
		}
	}
	ctx := context.Background()
	local, _ := sb.src.ZFS.Snapshots(ctx, sb.dataset)
	remote, _ := sb.dst.ZFS.Snapshots(ctx, sb.cfg.Datasets[0].ReplicaDataset)
	if len(local) != 3 || len(remote) != 3 {
		t.Fatalf("local %d, replica %d snapshots; want 3 each", len(local), len(remote))
	}
	for i := range local {
		if local[i].Name != sb.cfg.SnapshotName(nights[i]) || remote[i].GUID != local[i].GUID {
			t.Errorf("night %d: local %s/%d, replica %s/%d", i+1, local[i].Name, local[i].GUID, remote[i].Name, remote[i].GUID)
		}
	}
	if record, _ := LoadStoppedVMs(sb.cfg.StateDir); !record.Empty() {
		t.Errorf("stopped-VM record not cleared: %v", record.Names())
	}
}

func TestSaveModeSnapshotHoldsStateFiles(t *testing.T) {
	sb := newSandbox(t, "save", 20, "")
	p := sb.pipeline()
	rep := sb.night(p, nights[0], Options{SkipReplicate: true})
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	sb.assertRunning("after a save-mode night")
	ctx := context.Background()
	view, err := sb.src.ZFS.OpenSnapshot(ctx, sb.dataset+"@"+sb.cfg.SnapshotName(nights[0]))
	if err != nil {
		t.Fatal(err)
	}
	defer view.Close(ctx)
	for _, vm := range sb.vms {
		rel, _ := filepath.Rel(sb.mountpoint, virt.SaveFile(sb.mountpoint, vm))
		if fi, err := os.Stat(filepath.Join(view.Root, rel)); err != nil || fi.Size() == 0 {
			t.Errorf("snapshot lacks the state file of %s: %v", vm, err)
		}
		if _, err := os.Stat(virt.SaveFile(sb.mountpoint, vm)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("state file of %s left in the live dataset: %v", vm, err)
		}
	}
}

func TestPruneKeepsHeldBase(t *testing.T) {
	sb := newSandbox(t, "suspend", 2, "")
	p := sb.pipeline()
	ctx := context.Background()
	// Night 1 replicates; nights 2 and 3 do not (replica down): the base
	// stays night 1, which keep_local=2 would otherwise prune.
	if rep := sb.night(p, nights[0], Options{AllowFull: true}); rep.Err() != nil {
		t.Fatal(rep.Err())
	}
	for _, at := range nights[1:] {
		if rep := sb.night(p, at, Options{SkipReplicate: true}); rep.Err() != nil {
			t.Fatal(rep.Err())
		}
	}
	local, _ := sb.src.ZFS.Snapshots(ctx, sb.dataset)
	if len(local) != 3 || local[0].Name != sb.cfg.SnapshotName(nights[0]) {
		t.Fatalf("local snapshots %v: the held replication base was pruned", local)
	}
	// Replication catches up; the base moves to night 3; now night 1 goes.
	rep := sb.night(p, nights[2].Add(7*24*time.Hour), Options{})
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	local, _ = sb.src.ZFS.Snapshots(ctx, sb.dataset)
	var names []string
	for _, s := range local {
		names = append(names, s.Name)
	}
	want := sb.cfg.SnapshotName(nights[2]) + "," + sb.cfg.SnapshotName(nights[2].Add(7*24*time.Hour))
	if strings.Join(names, ",") != want {
		t.Errorf("after catching up: %v, want %s", names, want)
	}
	sb.assertRunning("after suspend nights")
}

func TestSnapshotFailureResumesVMs(t *testing.T) {
	sb := newSandbox(t, "managedsave", 20, "")
	p := sb.pipeline()
	// The snapshot's name already exists: zfs snapshot fails.
	if _, err := sb.src.ZFS.CreateSnapshot(context.Background(), sb.dataset, sb.cfg.SnapshotName(nights[0]), nil); err != nil {
		t.Fatal(err)
	}
	rep := sb.night(p, nights[0], Options{SkipReplicate: true})
	err := rep.Err()
	if err == nil || !strings.Contains(err.Error(), "snapshot") {
		t.Fatalf("a failed snapshot was not reported: %v", err)
	}
	sb.assertRunning("after a failed snapshot")
	if record, _ := LoadStoppedVMs(sb.cfg.StateDir); !record.Empty() {
		t.Errorf("stopped-VM record not cleared: %v", record.Names())
	}
}

func TestRecoveryStartsExactlyTheRecordedVMs(t *testing.T) {
	sb := newSandbox(t, "managedsave", 20, "")
	ctx := context.Background()
	// A run killed after stopping web and db: they are shut off with a
	// managed-save image, and the record names them. "old" was stopped by
	// the admin and is not in the record.
	record, err := LoadStoppedVMs(sb.cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	record.Begin("killed-run")
	q := &virt.Quiescer{Conn: sb.conn, Mode: virt.ModeManagedSave, Mountpoint: sb.mountpoint,
		OnStopping: func(vm string) error {
			return record.Add(StoppedVM{Name: vm, Mode: "managedsave", Dataset: sb.dataset, Mountpoint: sb.mountpoint})
		}}
	var two []virt.Domain
	for _, name := range []string{"web", "db"} {
		d, err := sb.conn.Domain(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		two = append(two, d)
	}
	if _, err := q.Quiesce(ctx, two); err != nil {
		t.Fatal(err)
	}
	if sb.state("web").Running() || sb.state("db").Running() {
		t.Fatal("set-up: web and db should be stopped")
	}

	rep := sb.pipeline().Run(ctx, Options{RecoverOnly: true})
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	sb.assertRunning("after --recover")
	var recovered []string
	for _, vm := range rep.VMs {
		recovered = append(recovered, vm.Name)
	}
	if strings.Join(recovered, ",") != "web,db" && strings.Join(recovered, ",") != "db,web" {
		t.Errorf("recovered %v, want exactly web and db", recovered)
	}
	if record, _ := LoadStoppedVMs(sb.cfg.StateDir); !record.Empty() {
		t.Errorf("record not cleared after recovery: %v", record.Names())
	}
	if snaps, _ := sb.src.ZFS.Snapshots(ctx, sb.dataset); len(snaps) != 0 {
		t.Errorf("--recover took a snapshot")
	}
}

func TestSecondRunExitsWhileLocked(t *testing.T) {
	sb := newSandbox(t, "none", 20, "")
	lock, err := AcquireLock(sb.cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Release()
	rep := sb.pipeline().Run(context.Background(), Options{})
	if err := rep.Err(); !strings.Contains(fmt.Sprint(err), "another vmhistory backup is running") {
		t.Fatalf("run under a held lock: %v", err)
	}
	if snaps, _ := sb.src.ZFS.Snapshots(context.Background(), sb.dataset); len(snaps) != 0 {
		t.Error("a locked-out run took a snapshot")
	}
}

func TestDryRunChangesNothing(t *testing.T) {
	sb := newSandbox(t, "managedsave", 20, "")
	rep := sb.night(sb.pipeline(), nights[0], Options{DryRun: true})
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	plan := strings.Join(rep.Plan, "\n")
	for _, want := range []string{"managedsave", "web", "snapshot " + sb.dataset + "@", "replicate", "prune"} {
		if !strings.Contains(plan, want) {
			t.Errorf("plan lacks %q:\n%s", want, plan)
		}
	}
	if snaps, _ := sb.src.ZFS.Snapshots(context.Background(), sb.dataset); len(snaps) != 0 {
		t.Error("a dry run took a snapshot")
	}
	sb.assertRunning("after a dry run")
	var _ = zfs.ErrBusy
}

func TestSIGTERMDuringQuiesceResumesVMs(t *testing.T) {
	sb := newSandbox(t, "managedsave", 20, "")
	p := sb.pipeline()
	ctx, cancel := context.WithCancelCause(context.Background())
	stopped := 0
	p.testHookStopping = func(vm string) {
		stopped++
		if stopped == 2 {
			// What signal.NotifyContext does on SIGTERM.
			cancel(errors.New("terminated"))
		}
	}
	rep := p.Run(ctx, Options{Now: func() time.Time { return nights[0] }})
	err := rep.Err()
	if err == nil || !strings.Contains(err.Error(), "interrupted") {
		var b strings.Builder
		rep.WriteText(&b)
		t.Fatalf("a run interrupted during quiesce: %v\n%s", err, b.String())
	}
	sb.assertRunning("after SIGTERM during quiesce")
	if snaps, _ := sb.src.ZFS.Snapshots(context.Background(), sb.dataset); len(snaps) != 0 {
		t.Errorf("an interrupted run took a snapshot: %d", len(snaps))
	}
	if record, _ := LoadStoppedVMs(sb.cfg.StateDir); !record.Empty() {
		t.Errorf("stopped-VM record not cleared: %v", record.Names())
	}
}

func TestReplicaUnreachableThenCaughtUp(t *testing.T) {
	sb := newSandbox(t, "managedsave", 20, "")
	sshd := testenv.StartSSHD(t)
	r := sshd.SharedRunner(t)
	p := sb.pipeline()
	p.Replica = zfs.New(r, zfs.Options{CommandTimeout: 30 * time.Second})

	if rep := sb.night(p, nights[0], Options{AllowFull: true}); rep.Err() != nil {
		t.Fatal(rep.Err())
	}
	sshd.Stop()
	rep := sb.night(p, nights[1], Options{})
	err := rep.Err()
	if err == nil || !strings.Contains(err.Error(), "replicate") || !strings.Contains(err.Error(), "ssh") {
		t.Fatalf("night with the replica's sshd stopped: %v", err)
	}
	if len(rep.Snapshots) != 1 {
		t.Errorf("the snapshot was not taken while the replica was down")
	}
	sb.assertRunning("with the replica down")

	sshd.Restart()
	rep = sb.night(p, nights[2], Options{})
	if err := rep.Err(); err != nil {
		t.Fatalf("night after the replica came back: %v", err)
	}
	var detail string
	for _, s := range rep.Steps {
		if s.Step == StepReplicate {
			detail = s.Detail
		}
	}
	for _, n := range nights {
		if !strings.Contains(detail, sb.cfg.SnapshotName(n)) {
			t.Errorf("catch-up replication %q does not mention %s", detail, sb.cfg.SnapshotName(n))
		}
	}
	remote, _ := p.Replica.Snapshots(context.Background(), sb.cfg.Datasets[0].ReplicaDataset)
	local, _ := sb.src.ZFS.Snapshots(context.Background(), sb.dataset)
	if len(remote) != 3 || len(local) != 3 {
		t.Fatalf("replica over ssh has %d snapshots after catching up, local %d; want 3 each", len(remote), len(local))
	}
	for i := range local {
		if remote[i].Name != local[i].Name || remote[i].GUID != local[i].GUID {
			t.Errorf("replica over ssh %s guid %d, local %s guid %d", remote[i].Name, remote[i].GUID, local[i].Name, local[i].GUID)
		}
	}
}

// The admin's `zfs snapshot DATASET@<a name in snapshot_format>` carries no
// vmhistory:run: it survives every night on both sides, reported as not
// ours; one the admin adopts with `zfs set vmhistory:run=adopted` is pruned
// like vmhistory's own, locally and on the replica.
func TestPruneKeepsSnapshotsWithoutProof(t *testing.T) {
	sb := newSandbox(t, "none", 1, "keep_replica: 1\n")
	p := sb.pipeline()
	ctx := context.Background()
	replicaDS := sb.cfg.Datasets[0].ReplicaDataset
	adminSnap := func(at time.Time) string {
		name := sb.cfg.SnapshotName(at)
		if out, err := exec.Command("zfs", "snapshot", sb.dataset+"@"+name).CombinedOutput(); err != nil {
			t.Fatalf("zfs snapshot: %v: %s", err, out)
		}
		return name
	}
	if rep := sb.night(p, nights[0], Options{AllowFull: true}); rep.Err() != nil {
		t.Fatal(rep.Err())
	}
	handMade := adminSnap(nights[0].Add(time.Hour))
	adopted := adminSnap(nights[0].Add(2 * time.Hour))
	if out, err := exec.Command("zfs", "set", "vmhistory:run=adopted", sb.dataset+"@"+adopted).CombinedOutput(); err != nil {
		t.Fatalf("zfs set: %v: %s", err, out)
	}
	var last string
	for i, at := range []time.Time{nights[1], nights[2], nights[2].Add(7 * 24 * time.Hour)} {
		rep := sb.night(p, at, Options{})
		if err := rep.Err(); err != nil {
			var b strings.Builder
			rep.WriteText(&b)
			t.Fatalf("night %d: %v\n%s", i+2, err, b.String())
		}
		last = sb.cfg.SnapshotName(at)
		for _, step := range rep.Steps {
			if step.Step == StepPrune && !strings.Contains(step.Detail, "not ours, kept: "+handMade) {
				t.Errorf("night %d: prune %q does not report %s as not ours", i+2, step.Detail, handMade)
			}
			if step.Step == StepReplicate && !strings.Contains(step.Detail, "not ours, kept on the replica: "+handMade) {
				t.Errorf("night %d: replicate %q does not report %s as not ours", i+2, step.Detail, handMade)
			}
		}
		want := handMade + "," + last
		if got := snapNames(t, sb.src.ZFS, sb.dataset); got != want {
			t.Errorf("night %d: local snapshots %s, want %s", i+2, got, want)
		}
		if got := snapNames(t, sb.dst.ZFS, replicaDS); got != want {
			t.Errorf("night %d: replica snapshots %s, want %s", i+2, got, want)
		}
	}
	// vmhistory's own snapshots got their proof on the replica too.
	marked, err := sb.dst.ZFS.LocalSnapshotProperty(ctx, replicaDS, RunProperty)
	if err != nil {
		t.Fatal(err)
	}
	if marked[last] == "" || marked[handMade] != "" {
		t.Errorf("replica's %s: %v; want set on %s only", RunProperty, marked, last)
	}
}

func TestReplaceReplicaMustNameAConfiguredDataset(t *testing.T) {
	sb := newSandbox(t, "none", 20, "")
	rep := sb.night(sb.pipeline(), nights[0], Options{AllowFull: true, ReplaceReplica: sb.dst.Name})
	err := rep.Err()
	if err == nil || !strings.Contains(err.Error(), "--replace-replica "+sb.dst.Name+" names no replica dataset") ||
		!strings.Contains(err.Error(), sb.cfg.Datasets[0].ReplicaDataset) {
		t.Fatalf("--replace-replica naming the replica's pool: %v", err)
	}
	if ok, _ := sb.dst.ZFS.Exists(context.Background(), sb.cfg.Datasets[0].ReplicaDataset); ok {
		t.Error("replicated although --replace-replica named no configured replica dataset")
	}
	if len(rep.Snapshots) != 1 {
		t.Error("the snapshot was not taken")
	}
}
