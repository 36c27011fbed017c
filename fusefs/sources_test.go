package fusefs_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

// Issue 11, finding 11: user.vmhistory.sources follows the timeline of a
// running mount. A snapshot held locally and on the replica shows
// "local,replica"; once another process (the nightly backup) uploads it
// to kopia, "local,replica,kopia" within the refresh interval; once the
// replica prunes it, "local,kopia". On the snapshot's directory and on a
// file looked up before the changes alike.
func TestSourcesXattrFollowsTimeline(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 128)
	ds, mnt := pool.Dataset(t, "libvirt")
	if err := os.MkdirAll(filepath.Join(mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "images", "vm.img"), []byte("disk bytes\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	snap, err := pool.ZFS.CreateSnapshot(ctx, ds, "2023-03-04_05:00:01", nil)
	if err != nil {
		t.Fatal(err)
	}
	replicaDS := pool.Name + "/replica"
	if _, err := zfs.Transfer(ctx, pool.ZFS, zfs.SendOptions{Snapshot: snap.FullName()}, pool.ZFS, replicaDS, zfs.ReceiveOptions{}); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	cfg := filepath.Join(dir, "kopia.config")
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(dir, "repo")}, cfg, password, kopiarepo.CreateOptions{
		ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	mountRepo, err := kopiarepo.Open(ctx, cfg, password)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mountRepo.Close(context.Background()) })

	local := restore.NewZFSSource("local", restore.KindLocal, pool.ZFS, map[string]string{ds: ds})
	t.Cleanup(func() { local.Close() })
	replica := restore.NewZFSSource("replica", restore.KindReplica, pool.ZFS, map[string]string{ds: replicaDS})
	t.Cleanup(func() { replica.Close() })
	sources := []restore.Source{local, replica, restore.NewKopiaSource(mountRepo, "kvmhost", "root")}
	const refresh = time.Second
	_, mdir := mountSources(t, sources, refresh)

	snapDir := filepath.Join(mdir, snap.Name)
	file := filepath.Join(snapDir, "images", "vm.img")
	for _, p := range []string{snapDir, file} {
		if got := getxattr(t, p, fusefs.XattrSources); got != "local,replica" {
			t.Fatalf("%s before the upload: %s %q, want local,replica", p, fusefs.XattrSources, got)
		}
	}
	waitSources := func(when, want string) {
		t.Helper()
		deadline := time.Now().Add(refresh + 20*time.Second)
		for _, p := range []string{snapDir, file} {
			for {
				got := getxattr(t, p, fusefs.XattrSources)
				if got == want {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s %s: %s is %q, want %q", when, p, fusefs.XattrSources, got, want)
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
	}

	// The nightly backup, another process: its own connection uploads.
	backupRepo, err := kopiarepo.Open(ctx, cfg, password)
	if err != nil {
		t.Fatal(err)
	}
	view, err := pool.ZFS.OpenSnapshot(ctx, snap.FullName())
	if err != nil {
		t.Fatal(err)
	}
	_, err = backupRepo.Upload(ctx, kopiarepo.UploadRequest{
		Dir: view.Root, SourcePath: mnt, Host: "kvmhost", User: "root", StartTime: snap.Creation,
		Tags: map[string]string{kopiarepo.TagDataset: snap.Dataset, kopiarepo.TagSnapshot: snap.Name,
			kopiarepo.TagGUID: strconv.FormatUint(snap.GUID, 10)},
		SkipMaintenance: true,
	})
	if cerr := closeView(ctx, view); cerr != nil {
		t.Fatal(cerr)
	}
	backupRepo.Close(ctx)
	if err != nil {
		t.Fatal(err)
	}
	waitSources("after the upload", "local,replica,kopia")

	// The replica prunes it.
	if err := pool.ZFS.Destroy(ctx, replicaDS+"@"+snap.Name); err != nil {
		t.Fatal(err)
	}
	waitSources("after the replica pruned it", "local,kopia")
	if got := getxattr(t, file, fusefs.XattrSource); got != "local" {
		t.Errorf("%s %s = %q, want local", file, fusefs.XattrSource, got)
	}
}
