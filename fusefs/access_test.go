package fusefs_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
)

// asUser runs fn on a thread of its own with uid and gid as its file
// system identity, which FUSE passes to the mount.
func asUser(uid, gid int, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // the thread dies with this goroutine
		unix.Setfsgid(gid)
		unix.Setfsuid(uid)
		errc <- fn()
	}()
	return <-errc
}

func openable(path string) error {
	f, err := os.Open(path)
	if err == nil {
		f.Close()
	}
	return err
}

// TestReadAllUIDs: with ReadAllUIDs the mount lets those users read a
// 0600 file and enter a 0700 directory, and still applies the
// snapshot's modes to everyone else (the kernel's rule, checked by the
// mount); without it (AllowOther alone) the kernel applies them to all.
func TestReadAllUIDs(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 128)
	ds, mnt := pool.Dataset(t, "libvirt")
	files := map[string]os.FileMode{"secret.img": 0o600, "public.img": 0o644, "private/inner.img": 0o644}
	if err := os.Mkdir(filepath.Join(mnt, "private"), 0o700); err != nil {
		t.Fatal(err)
	}
	for name, mode := range files {
		if err := os.WriteFile(filepath.Join(mnt, name), []byte(name), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(filepath.Join(mnt, name), mode)
	}
	snap, err := pool.ZFS.CreateSnapshot(ctx, ds, "2023-03-04_05:00:01", nil)
	if err != nil {
		t.Fatal(err)
	}
	local := restore.NewZFSSource("local", restore.KindLocal, pool.ZFS, map[string]string{ds: ds})
	t.Cleanup(func() { local.Close() })
	build := func(ctx context.Context) (*restore.Timeline, []error) {
		return restore.BuildTimeline(ctx, []restore.Source{local})
	}
	const reader, other = 64001, 64002
	for _, tc := range []struct {
		name  string
		opts  fusefs.Options
		allow map[int][]string // uid → files it opens; the others are refused
	}{
		{"read-all", fusefs.Options{AllowOther: true, ReadAllUIDs: []uint32{reader}},
			map[int][]string{reader: {"secret.img", "public.img", "private/inner.img"}, other: {"public.img"}}},
		{"modes", fusefs.Options{AllowOther: true},
			map[int][]string{reader: {"public.img"}, other: {"public.img"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Under PoolDir: the other users must reach the mount.
			dir := filepath.Join(testenv.PoolDir, fmt.Sprintf("access-%d-%s", os.Getpid(), tc.name))
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.Remove(dir) })
			m, err := fusefs.MountTimeline(ctx, dir, build, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { m.Unmount() })
			snapDir := filepath.Join(dir, snap.Name)
			// The reader first: its lookups must not open the way for
			// the other (the kernel walks cached entries unasked).
			for _, uid := range []int{reader, other} {
				allowed := tc.allow[uid]
				for name := range files {
					want := false
					for _, a := range allowed {
						want = want || a == name
					}
					err := asUser(uid, uid, func() error { return openable(filepath.Join(snapDir, name)) })
					switch {
					case want && err != nil:
						t.Errorf("uid %d cannot open %s: %v", uid, name, err)
					case !want && !errors.Is(err, syscall.EACCES):
						t.Errorf("uid %d opening %s (mode %04o): %v, want permission denied", uid, name, files[name], err)
					}
				}
				if err := openable(filepath.Join(snapDir, "secret.img")); err != nil {
					t.Errorf("root cannot open secret.img: %v", err)
				}
			}
			if tc.opts.ReadAllUIDs != nil {
				err := asUser(other, other, func() error {
					return unix.Faccessat(unix.AT_FDCWD, filepath.Join(snapDir, "secret.img"), unix.R_OK, unix.AT_EACCESS)
				})
				if !errors.Is(err, syscall.EACCES) {
					t.Errorf("access(R_OK) of secret.img by uid %d: %v, want permission denied", other, err)
				}
				err = asUser(reader, reader, func() error {
					return unix.Faccessat(unix.AT_FDCWD, filepath.Join(snapDir, "secret.img"), unix.R_OK, unix.AT_EACCESS)
				})
				if err != nil {
					t.Errorf("access(R_OK) of secret.img by the reader: %v", err)
				}
			}
		})
	}
}
