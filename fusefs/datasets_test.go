package fusefs_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
)

// A timeline of several datasets shows one more level, the dataset's
// path (MOUNT/<pool>/<dataset>/<snapshot>/...), with a latest link per
// dataset. pool/libvirt has a child dataset pool/libvirt/extra and also a
// snapshot named "extra": the dataset directory wins, the snapshot is
// hidden, and latest skips it.
func TestSeveralDatasets(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 128)
	type ds struct {
		name, mnt string
		file      string
		data      map[string][]byte // by snapshot name
	}
	var all []*ds
	for _, rel := range []string{"libvirt", "other", "libvirt/extra"} {
		d := &ds{file: filepath.Base(rel) + ".img", data: map[string][]byte{}}
		d.name, d.mnt = pool.Dataset(t, rel)
		if err := os.MkdirAll(filepath.Join(d.mnt, "images"), 0o755); err != nil {
			t.Fatal(err)
		}
		all = append(all, d)
	}
	libvirt, other, extra := all[0], all[1], all[2]
	rng := rand.New(rand.NewPCG(5, 5))
	snapshot := func(d *ds, name string) {
		t.Helper()
		data := make([]byte, 100_000+rng.IntN(100_000))
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		if err := os.WriteFile(filepath.Join(d.mnt, "images", d.file), data, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := pool.ZFS.CreateSnapshot(ctx, d.name, name, nil); err != nil {
			t.Fatal(err)
		}
		d.data[name] = data
	}
	const night1, night2 = "2023-03-04_05:00:01", "2023-03-05_05:00:01"
	snapshot(libvirt, night1)
	snapshot(other, night1)
	snapshot(libvirt, "extra")          // hidden by the child dataset's directory
	time.Sleep(1100 * time.Millisecond) // distinct creation times (whole seconds)
	snapshot(libvirt, night2)
	snapshot(other, night2)
	snapshot(extra, night2)

	local := restore.NewZFSSource("local", restore.KindLocal, pool.ZFS,
		map[string]string{libvirt.name: libvirt.name, other.name: other.name, extra.name: extra.name})
	t.Cleanup(func() { local.Close() })
	_, dir := mountSources(t, []restore.Source{local}, time.Minute)

	sorted := func(s ...string) []string { slices.Sort(s); return s }
	for _, tc := range []struct {
		rel  string
		want []string
	}{
		{".", []string{pool.Name}},
		{pool.Name, sorted("libvirt", "other")},
		{filepath.Join(pool.Name, "libvirt"), sorted("extra", night1, night2, fusefs.LatestName)},
		{filepath.Join(pool.Name, "other"), sorted(night1, night2, fusefs.LatestName)},
		{filepath.Join(pool.Name, "libvirt", "extra"), sorted(night2, fusefs.LatestName)},
	} {
		if got := names(t, filepath.Join(dir, tc.rel)); !slices.Equal(got, tc.want) {
			t.Errorf("ls %s = %v, want %v", tc.rel, got, tc.want)
		}
	}
	for _, d := range all {
		dsDir := filepath.Join(dir, d.name)
		if st, err := os.Lstat(dsDir); err != nil || !st.IsDir() {
			t.Errorf("%s: %v, %v: want a directory", d.name, st, err)
		}
		if target, err := os.Readlink(filepath.Join(dsDir, fusefs.LatestName)); err != nil || target != night2 {
			t.Errorf("%s/latest -> %q, %v; want %s", d.name, target, err, night2)
		}
		for snap, want := range d.data {
			if snap == "extra" {
				continue
			}
			p := filepath.Join(dsDir, snap, "images", d.file)
			if got := copyOut(t, p); !bytes.Equal(got, want) {
				t.Errorf("%s: %d bytes differ from the snapshot's (%d)", p, len(got), len(want))
			}
			if got := getxattr(t, filepath.Join(dsDir, snap), fusefs.XattrSources); got != "local" {
				t.Errorf("%s of %s@%s = %q", fusefs.XattrSources, d.name, snap, got)
			}
		}
		p := filepath.Join(dsDir, fusefs.LatestName, "images", d.file)
		if got := copyOut(t, p); !bytes.Equal(got, d.data[night2]) {
			t.Errorf("%s differs from the newest snapshot's file", p)
		}
	}
	// A top level without a dataset of its own has no latest link.
	for _, rel := range []string{fusefs.LatestName, filepath.Join(pool.Name, fusefs.LatestName)} {
		if _, err := os.Lstat(filepath.Join(dir, rel)); !os.IsNotExist(err) {
			t.Errorf("%s: %v, want it not to exist", rel, err)
		}
	}
}
