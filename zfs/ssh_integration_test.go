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

// sshZFS reaches a pool of this machine the way vmhistory reaches the
// replica: zfs over ssh to 127.0.0.1, host key checked.
func sshZFS(t *testing.T, sshd *testenv.SSHD, knownHosts string) *zfs.ZFS {
	t.Helper()
	cfg := sshd.SSHConfig()
	if knownHosts != "" {
		cfg.KnownHostsFile = knownHosts
	}
	r, err := runner.NewSSH(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return zfs.New(r, zfs.Options{CommandTimeout: time.Minute, StreamTimeout: 5 * time.Minute,
		CloneMountDir: filepath.Join(testenv.PoolDir, "clones")})
}

func TestReplicaOverSSH(t *testing.T) {
	ctx := context.Background()
	sshd := testenv.StartSSHD(t)
	src := testenv.NewPool(t, 128)
	dst := testenv.NewPool(t, 128)
	remote := sshZFS(t, sshd, "")
	ds, mnt := src.Dataset(t, "libvirt")
	replica := dst.Name + "/libvirt"

	if f, err := remote.Features(ctx); err != nil || f.Dialect != "legacy" {
		t.Fatalf("dialect over ssh: %+v, %v", f, err)
	}

	var sent []zfs.Snapshot
	for i := 0; i < 3; i++ {
		writeFile(t, filepath.Join(mnt, "disk.img"), strings.Repeat("night ", 20_000*(i+1)))
		s, err := src.ZFS.CreateSnapshot(ctx, ds, "night"+string(rune('1'+i)), nil)
		if err != nil {
			t.Fatal(err)
		}
		opts := zfs.SendOptions{Snapshot: s.FullName()}
		if i > 0 {
			opts.From = sent[i-1].FullName()
		}
		n, err := zfs.Transfer(ctx, src.ZFS, opts, remote, replica, zfs.ReceiveOptions{Resumable: true})
		if err != nil {
			t.Fatalf("transfer %s over ssh: %v", s.Name, err)
		}
		if n == 0 {
			t.Errorf("transfer %s: 0 bytes counted", s.Name)
		}
		if i == 0 {
			if err := remote.Set(ctx, replica, "readonly", "on"); err != nil {
				t.Fatal(err)
			}
		}
		sent = append(sent, s)
	}

	got, err := remote.Snapshots(ctx, replica)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(sent) {
		t.Fatalf("replica over ssh lists %v, want 3 snapshots", snapshotNames(got))
	}
	for i := range got {
		if got[i].Name != sent[i].Name || got[i].GUID != sent[i].GUID {
			t.Errorf("replica %s guid %d, source %s guid %d", got[i].Name, got[i].GUID, sent[i].Name, sent[i].GUID)
		}
	}
	// The listing over ssh is the listing on the host.
	local, err := dst.ZFS.Snapshots(ctx, replica)
	if err != nil {
		t.Fatal(err)
	}
	for i := range local {
		if local[i] != got[i] {
			t.Errorf("over ssh %+v, locally %+v", got[i], local[i])
		}
	}

	// Holds and a snapshot view on the replica side, over ssh.
	base := replica + "@" + sent[2].Name
	if err := remote.Hold(ctx, base, "replica-base"); err != nil {
		t.Fatal(err)
	}
	if err := remote.Destroy(ctx, base); !errors.Is(err, zfs.ErrBusy) {
		t.Errorf("destroy of the held base over ssh: %v, want ErrBusy", err)
	}
	view, err := remote.OpenSnapshot(ctx, replica+"@"+sent[0].Name)
	if err != nil {
		t.Fatal(err)
	}
	// The view's Root is a path on the replica host, which is this host.
	data, err := os.ReadFile(filepath.Join(view.Root, "disk.img"))
	if err != nil || !bytes.Equal(data, []byte(strings.Repeat("night ", 20_000))) {
		t.Errorf("reading the first night on the replica: %d bytes, %v", len(data), err)
	}
	if err := view.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if clones := listClones(t, dst); len(clones) != 0 {
		t.Errorf("clones left on the replica: %v", clones)
	}
	if err := remote.Release(ctx, base, "replica-base"); err != nil {
		t.Fatal(err)
	}

	// sshd saw the zfs commands arrive.
	commands := strings.Join(sshd.Commands(), "\n")
	for _, want := range []string{"zfs get -Hp -r -d 1", "zfs receive " + replica, "zfs hold replica-base " + base, "zfs clone"} {
		if !strings.Contains(commands, want) {
			t.Errorf("sshd did not log a command with %q; it logged:\n%s", want, commands)
		}
	}
	if !strings.Contains(sshd.Log(), "zfs receive") {
		t.Errorf("the sshd log does not show the receive")
	}
}

func TestReplicaWithWrongHostKeyFailsClearly(t *testing.T) {
	ctx := context.Background()
	sshd := testenv.StartSSHD(t)
	pool := testenv.NewPool(t, 64)
	ds, _ := pool.Dataset(t, "libvirt")
	wrong := sshd.WrongKnownHostsFile()
	remote := sshZFS(t, sshd, wrong)

	_, err := remote.Snapshots(ctx, ds)
	if !errors.Is(err, runner.ErrHostKey) {
		t.Fatalf("got %v, want a host key error", err)
	}
	for _, want := range []string{"host key", wrong, ds} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if cmds := sshd.Commands(); len(cmds) != 0 {
		t.Errorf("commands ran despite the wrong host key: %v", cmds)
	}
}
