package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/boot"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/virt"
)

// bootSandbox is a dataset with one snapshot holding definitions (vm1: a
// file disk; blk: a block device), a libvirt test driver where "taken" is
// defined, and a configuration whose mount.path is mnt.
type bootSandbox struct {
	config   string
	mnt      string
	stateDir string
	snapName string
	disk     string // vm1's disk, relative to the snapshot
}

func newBootSandbox(t *testing.T) *bootSandbox {
	t.Helper()
	ctx := context.Background()
	pool := testenv.NewPool(t, 256)
	ds, dsMnt := pool.Dataset(t, "libvirt")
	if err := os.MkdirAll(filepath.Join(dsMnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	// 0600 and root's: as libvirt leaves a stopped VM's image.
	if err := os.WriteFile(filepath.Join(dsMnt, "images", "vm1.img"), make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	defs := filepath.Dir(virt.DefinitionFile(dsMnt, "x"))
	if err := os.MkdirAll(defs, 0o700); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dsMnt, "images", "vm1.img")
	files := map[string]string{
		"vm1.xml": fmt.Sprintf(`<domain type='test'><name>vm1</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><memory>65536</memory>
<os><type>hvm</type></os><devices><disk type='file' device='disk'><source file='%s'/><target dev='vda' bus='virtio'/></disk></devices></domain>`, disk),
		"blk.xml": `<domain type='test'><name>blk</name><memory>65536</memory><os><type>hvm</type></os>
<devices><disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vda' bus='virtio'/></disk></devices></domain>`,
	}
	for name, xml := range files {
		if err := os.WriteFile(filepath.Join(defs, name), []byte(xml), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(virt.MountpointFile(dsMnt), []byte(dsMnt+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	snap, err := pool.ZFS.CreateSnapshot(ctx, ds, "2023-03-04_05:00:01", nil)
	if err != nil {
		t.Fatal(err)
	}
	uri := testenv.PrivateTestDriver(t, testenv.TestVM{Name: "taken"})
	dir := t.TempDir()
	// The mount where QEMU's user can reach it.
	mnt := filepath.Join(testenv.PoolDir, fmt.Sprintf("boot-cmd-mnt-%d", os.Getpid()))
	os.Remove(mnt)
	t.Cleanup(func() { os.Remove(mnt) })
	sb := &bootSandbox{mnt: mnt, stateDir: filepath.Join(dir, "state"), snapName: snap.Name, disk: "images/vm1.img"}
	if err := os.Mkdir(sb.mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf("datasets: [%s]\nstate_dir: %s\nlibvirt: {uri: %q}\nmount: {path: %s}\n", ds, sb.stateDir, uri, sb.mnt)
	sb.config = filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(sb.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return sb
}

func (sb *bootSandbox) boot(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out, errOut, err := runConfigCmd(t, append([]string{"boot", "--config", sb.config}, args...)...)
	return out + errOut, err
}

func wantRefusal(t *testing.T, out string, err error, want string) {
	t.Helper()
	if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "\n") {
		t.Errorf("want one line containing %q, got err %v, output %q", want, err, out)
	}
}

// TestBootCommandRefuses: each mistake gets one clear line, before
// anything is defined or written.
func TestBootCommandRefuses(t *testing.T) {
	sb := newBootSandbox(t)

	out, err := sb.boot(t, "latest", "vm1")
	wantRefusal(t, out, err, "no vmhistory mount at "+sb.mnt)

	root := startVMHistory(t, "mount", "--config", sb.config)
	root.waitReadable(t, filepath.Join(sb.mnt, sb.snapName, sb.disk))
	out, err = sb.boot(t, "latest", "vm1")
	wantRefusal(t, out, err, "is root-only and QEMU runs as")
	root.cmd.Process.Signal(syscall.SIGTERM)
	if err := root.wait(t, 30*time.Second); err != nil {
		t.Fatalf("mount: %v\n%s", err, root.output)
	}

	m := startVMHistory(t, "mount", "--config", sb.config, "--allow-other")
	m.waitReadable(t, filepath.Join(sb.mnt, sb.snapName, sb.disk))
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"latest", "nosuchvm"}, "holds no definition of VM nosuchvm (it holds: blk, vm1)"},
		{[]string{"latest", "blk"}, "not file-backed"},
		{[]string{"latest", "vm1", "--name", "taken"}, "a domain named taken exists on this host"},
		{[]string{"1999-01-01", "vm1"}, "1999-01-01"},
		{[]string{"latest", "vm1", "--dir", "relative/dir"}, "--dir \"relative/dir\": give an absolute path"},
		{[]string{"latest", "vm1", "--live-restore", "rel"}, "--live-restore \"rel\": give an absolute path"},
		{[]string{"--stop", "nosuch"}, "no such booted domain"},
		{[]string{"--list", "latest"}, "--list and --stop take no SNAPSHOT or VM"},
		{[]string{"latest"}, "boot needs SNAPSHOT and VM"},
	} {
		out, err := sb.boot(t, c.args...)
		wantRefusal(t, out, err, c.want)
	}
	if entries, _ := os.ReadDir(filepath.Join(sb.stateDir, boot.RecordsDir)); len(entries) > 0 {
		t.Errorf("refused boots left records: %v", entries)
	}
	out, err = sb.boot(t, "--list")
	if err != nil || !strings.Contains(out, "vmhistory has booted no domain") {
		t.Errorf("boot --list: %v %q", err, out)
	}

	// QEMU cannot read the 0600 image through modes alone.
	out, err = sb.boot(t, "latest", "vm1")
	wantRefusal(t, out, err, "restart the mount with --allow-qemu")
	m.cmd.Process.Signal(syscall.SIGTERM)
	if err := m.wait(t, 30*time.Second); err != nil {
		t.Fatalf("mount: %v\n%s", err, m.output)
	}

	// --allow-qemu: QEMU's user reads it, others still by the modes.
	m = startVMHistory(t, "mount", "--config", sb.config, "--allow-qemu")
	backing := filepath.Join(sb.mnt, sb.snapName, sb.disk)
	m.waitReadable(t, backing)
	out, err = sb.boot(t, "latest", "vm1")
	wantRefusal(t, out, err, "cannot reach overlays in "+filepath.Join(sb.stateDir, boot.RecordsDir))
	overlays := filepath.Join(testenv.PoolDir, fmt.Sprintf("boot-cmd-%d", os.Getpid()))
	if err := os.MkdirAll(overlays, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(overlays) })
	out, err = sb.boot(t, "latest", "vm1", "--dir", overlays)
	name := "vm1-" + strings.ReplaceAll(sb.snapName, ":", "-")
	if err != nil || !strings.Contains(out, "booted a fresh copy as domain "+name) {
		t.Fatalf("boot on the test driver: %v\n%s", err, out)
	}
	// libvirt's test driver keeps its domains per connection: the next
	// command's connection sees none, so the domain shows as gone.
	out, err = sb.boot(t, "--list")
	if err != nil || !strings.Contains(out, name) || !strings.Contains(out, "gone") || !strings.Contains(out, filepath.Join(overlays, name)) {
		t.Errorf("boot --list after a boot: %v\n%s", err, out)
	}
	out, err = sb.boot(t, "latest", "vm1", "--dir", overlays)
	wantRefusal(t, out, err, "vmhistory booted a domain named "+name+" already")
	out, err = sb.boot(t, "--stop", name)
	if err != nil || !strings.Contains(out, "stopped "+name) {
		t.Errorf("boot --stop: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(overlays, name)); !os.IsNotExist(err) {
		t.Errorf("--stop left the overlays' directory: %v", err)
	}

	// The mount does not stop while a booted domain reads from it: a
	// record names a file this process holds open, as QEMU would.
	rec := &boot.Record{Name: "reader", UUID: "6695eb01-f6a4-8304-79aa-97f2502e1940", Mode: boot.FreshBoot, Mount: sb.mnt,
		Dir: filepath.Join(sb.stateDir, boot.RecordsDir, "reader"), Disks: []boot.Disk{{Target: "vda", Chain: []boot.Layer{{Path: backing, Format: "raw"}}}}}
	reg := boot.NewRegistry(sb.stateDir)
	if err := reg.Save(rec); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(backing)
	if err != nil {
		t.Fatal(err)
	}
	m.cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(m.output.String(), "not unmounting") {
		if time.Now().After(deadline) {
			t.Fatalf("the mount did not refuse to stop under a booted domain:\n%s", m.output)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := os.ReadFile(backing); err != nil {
		t.Errorf("the mount stopped serving after refusing: %v", err)
	}
	f.Close()
	// Closed (the domain stopped): the next signal unmounts.
	time.Sleep(200 * time.Millisecond)
	m.cmd.Process.Signal(syscall.SIGTERM)
	if err := m.wait(t, 30*time.Second); err != nil {
		t.Fatalf("mount: %v\n%s", err, m.output)
	}
	if !strings.Contains(m.output.String(), "vms=reader") {
		t.Errorf("the refusal does not name the domain:\n%s", m.output)
	}
}
