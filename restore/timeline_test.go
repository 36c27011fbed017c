package restore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

const tlPassword = "timeline test password"

// tlWorld is a dataset with three nights of snapshots, replicated to a
// second pool (reached here and over ssh), uploaded to kopia on a
// filesystem and a WebDAV repository, with the oldest local snapshot
// pruned.
type tlWorld struct {
	dataset, replicaDataset string
	src, dst                *testenv.Pool
	sshd                    *testenv.SSHD
	snaps                   []zfs.Snapshot // the three nights, oldest first
	disk                    [][]byte       // images/disk.img of each night

	local, replica, replicaSSH *restore.ZFSSource
	kopia, kopiaDAV            *restore.KopiaSource
}

func (w *tlWorld) sources() []restore.Source {
	return []restore.Source{w.kopia, w.replicaSSH, w.local, w.replica, w.kopiaDAV}
}

const tlDiskSize = 2<<20 + 12345

func newTLWorld(t *testing.T) *tlWorld {
	t.Helper()
	ctx := context.Background()
	w := &tlWorld{}
	w.sshd = testenv.StartSSHD(t)
	w.src = testenv.NewPool(t, 128)
	w.dst = testenv.NewPool(t, 128)
	var mnt string
	w.dataset, mnt = w.src.Dataset(t, "libvirt")
	w.replicaDataset = w.dst.Name + "/libvirt"

	if err := os.MkdirAll(filepath.Join(mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, l := range []struct{ target, name string }{
		{"/etc/passwd", "images/escape"}, {"/etc", "etclink"}, {"images/note.txt", "inner"},
	} {
		if err := os.Symlink(l.target, filepath.Join(mnt, l.name)); err != nil {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(4, 2))
	disk := make([]byte, tlDiskSize)
	for i := range disk {
		disk[i] = byte(rng.Uint32())
	}
	for night := range 3 {
		for range 8 { // each night rewrites a few scattered ranges
			off := rng.IntN(len(disk) - 65536)
			for i := off; i < off+65536; i++ {
				disk[i] = byte(rng.Uint32())
			}
		}
		w.disk = append(w.disk, bytes.Clone(disk))
		if err := os.WriteFile(filepath.Join(mnt, "images", "disk.img"), disk, 0o640); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(mnt, "images", "note.txt"), []byte("night "+strconv.Itoa(night+1)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		// Nights are days apart; here they are not, and kopia's upload
		// skips a file of unchanged size and mtime (zfs-fuse keeps whole
		// seconds), so give each night its own mtime.
		mtime := time.Date(2023, 3, 4+night, 4, 0, 0, 0, time.Local)
		for _, f := range []string{"disk.img", "note.txt"} {
			if err := os.Chtimes(filepath.Join(mnt, "images", f), mtime, mtime); err != nil {
				t.Fatal(err)
			}
		}
		s, err := w.src.ZFS.CreateSnapshot(ctx, w.dataset, "2023-03-0"+strconv.Itoa(4+night)+"_05:00:01", nil)
		if err != nil {
			t.Fatal(err)
		}
		send := zfs.SendOptions{Snapshot: s.FullName()}
		if night > 0 {
			send.From = w.snaps[night-1].FullName()
		}
		if _, err := zfs.Transfer(ctx, w.src.ZFS, send, w.dst.ZFS, w.replicaDataset, zfs.ReceiveOptions{}); err != nil {
			t.Fatalf("replicate night %d: %v", night+1, err)
		}
		if night == 0 {
			if err := w.dst.ZFS.Set(ctx, w.replicaDataset, "readonly", "on"); err != nil {
				t.Fatal(err)
			}
		}
		w.snaps = append(w.snaps, s)
	}

	fsRepo := tlKopiaRepo(t, kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")})
	dav := testenv.StartWebDAV(t)
	davRepo := tlKopiaRepo(t, kopiarepo.WebDAV{URL: dav.URL + "repo/", Username: dav.Username, Password: dav.Password})
	for _, s := range w.snaps {
		view, err := w.src.ZFS.OpenSnapshot(ctx, s.FullName())
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range []*kopiarepo.Repo{fsRepo, davRepo} {
			res, err := r.Upload(ctx, kopiarepo.UploadRequest{
				Dir: view.Root, SourcePath: mnt, Host: "kvmhost", User: "root", StartTime: s.Creation,
				Tags: map[string]string{
					kopiarepo.TagDataset:  s.Dataset,
					kopiarepo.TagSnapshot: s.Name,
					kopiarepo.TagGUID:     strconv.FormatUint(s.GUID, 10),
				},
				Splitter: "FIXED-128K", SkipMaintenance: true,
			})
			if err != nil || res.Snapshot.ID == "" {
				t.Fatalf("upload %s to %s: %v (%+v)", s.FullName(), r, err, res)
			}
		}
		if err := closeView(ctx, view); err != nil {
			t.Fatal(err)
		}
	}
	// Prune the oldest night here: it lives on only on the replica and in kopia.
	if err := w.src.ZFS.Destroy(ctx, w.snaps[0].FullName()); err != nil {
		t.Fatal(err)
	}

	opts := zfs.Options{CommandTimeout: time.Minute, CloneMountDir: filepath.Join(testenv.PoolDir, "clones")}
	w.local = restore.NewZFSSource("local", restore.KindLocal, w.src.ZFS, map[string]string{w.dataset: w.dataset})
	w.replica = restore.NewZFSSource("replica", restore.KindReplica, w.dst.ZFS, map[string]string{w.dataset: w.replicaDataset})
	w.replicaSSH = restore.NewZFSSource("replica-ssh", restore.KindReplica, zfs.New(w.sshd.SharedRunner(t), opts),
		map[string]string{w.dataset: w.replicaDataset})
	w.kopia = restore.NewKopiaSource(fsRepo, "kvmhost", "root")
	w.kopiaDAV = restore.NewKopiaSource(davRepo, "kvmhost", "root")
	w.kopiaDAV.SourceName = "kopia-webdav"
	for _, s := range []*restore.ZFSSource{w.local, w.replica, w.replicaSSH} {
		t.Cleanup(func() { s.Close() })
	}
	return w
}

// closeView closes a snapshot view, waiting out a clone zfs-fuse still
// calls busy for a moment.
func closeView(ctx context.Context, v *zfs.SnapshotView) error {
	var err error
	for range 20 {
		if err = v.Close(ctx); err == nil || !errors.Is(err, zfs.ErrBusy) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
	return err
}

func tlKopiaRepo(t *testing.T, spec kopiarepo.StorageSpec) *kopiarepo.Repo {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "kopia.config")
	if err := kopiarepo.Create(ctx, spec, cfg, tlPassword, kopiarepo.CreateOptions{
		ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	r, err := kopiarepo.Open(ctx, cfg, tlPassword)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(context.Background()) })
	return r
}

func sourceNames(e *restore.Entry) string {
	var names []string
	for _, s := range e.Sources {
		names = append(names, s.Source.Name())
	}
	return strings.Join(names, ",")
}

// readAll reads a whole File with ReadAt in pieces.
func readAll(t *testing.T, f restore.File) []byte {
	t.Helper()
	got, err := io.ReadAll(io.NewSectionReader(f, 0, f.Size()))
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// assertNoClonesOrHolds checks that every clone was removed and every
// restore hold released on pool.
func assertNoClonesOrHolds(t *testing.T, p *testenv.Pool, dataset string) {
	t.Helper()
	ctx := context.Background()
	out, err := p.ZFS.Runner().Run(ctx, runnerCmd("zfs", "list", "-H", "-o", "name", "-r", p.Name))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), zfs.ClonePrefix) {
		t.Errorf("clones left on %s:\n%s", p.Name, out)
	}
	held, err := p.ZFS.HoldsWithPrefix(ctx, dataset, restore.RestoreHoldPrefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(held) > 0 {
		t.Errorf("restore holds left: %v", held)
	}
}

func TestTimelineAcrossSources(t *testing.T) {
	ctx := context.Background()
	w := newTLWorld(t)
	broken := restore.NewZFSSource("broken", restore.KindReplica, w.dst.ZFS, map[string]string{w.dataset: w.dst.Name + "/nope"})
	tl, errs := restore.BuildTimeline(ctx, append(w.sources(), broken))
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "broken") {
		t.Errorf("errors %v, want one from the broken source", errs)
	}
	if len(tl.Entries) != 3 {
		t.Fatalf("timeline has %d entries, want 3", len(tl.Entries))
	}
	wantSources := []string{
		// By kind, then in the order the sources were given; the oldest
		// was pruned here.
		"replica-ssh,replica,kopia,kopia-webdav",
		"local,replica-ssh,replica,kopia,kopia-webdav",
		"local,replica-ssh,replica,kopia,kopia-webdav",
	}
	for i, e := range tl.Entries {
		s := w.snaps[i]
		if e.Dataset != w.dataset || e.Name != s.Name || e.GUID != s.GUID || !e.Time.Equal(s.Creation) {
			t.Errorf("entry %d = %+v, want %s guid %d at %v", i, e.SnapshotRef, s.FullName(), s.GUID, s.Creation)
		}
		if got := sourceNames(e); got != wantSources[i] {
			t.Errorf("entry %d (%s) is held by %s, want %s", i, e.Name, got, wantSources[i])
		}
		if e.Has(restore.KindLocal) != (i > 0) || !e.Has(restore.KindReplica) || !e.Has(restore.KindKopia) {
			t.Errorf("entry %d: Has local=%v replica=%v kopia=%v", i, e.Has(restore.KindLocal), e.Has(restore.KindReplica), e.Has(restore.KindKopia))
		}
		for _, es := range e.Sources {
			if es.Snapshot.Dataset != w.dataset {
				t.Errorf("%s lists dataset %s, want the source dataset %s", es.Source.Name(), es.Snapshot.Dataset, w.dataset)
			}
		}
	}
	latest, err := tl.Resolve("latest", "")
	if err != nil || latest != tl.Entries[2] {
		t.Errorf("latest = %v, %v", latest, err)
	}

	// The oldest night, read from every source that has it, and a newer
	// one from here: byte-identical to what was written.
	for _, c := range []struct {
		entry int
	}{{0}, {1}} {
		e := tl.Entries[c.entry]
		for _, es := range e.Sources {
			tree, err := es.Source.Open(ctx, es.Snapshot)
			if err != nil {
				t.Fatalf("open %s on %s: %v", e.Name, es.Source.Name(), err)
			}
			f, err := tree.OpenFile(ctx, "images/disk.img")
			if err != nil {
				t.Fatalf("%s: %v", es.Source.Name(), err)
			}
			if f.Size() != tlDiskSize {
				t.Errorf("%s: size %d", es.Source.Name(), f.Size())
			}
			if got := readAll(t, f); !bytes.Equal(got, w.disk[c.entry]) {
				t.Errorf("%s: images/disk.img of %s differs from what was written", es.Source.Name(), e.Name)
			}
			f.Close()
			checkTreeSafety(t, es.Source.Name(), tree, c.entry)
			if err := tree.Close(); err != nil {
				t.Errorf("close %s: %v", es.Source.Name(), err)
			}
		}
	}
	assertNoClonesOrHolds(t, w.dst, w.replicaDataset)
	assertNoClonesOrHolds(t, w.src, w.dataset)
}

// checkTreeSafety checks listing, lstat and that links are never followed.
func checkTreeSafety(t *testing.T, name string, tree restore.Tree, night int) {
	t.Helper()
	ctx := context.Background()
	ents, err := tree.ReadDir(ctx, ".")
	if err != nil {
		t.Fatalf("%s: ReadDir: %v", name, err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name)
	}
	if got := strings.Join(sortedCopy(names), ","); got != "etclink,images,inner" {
		t.Errorf("%s: root lists %s", name, got)
	}
	st, err := tree.Stat(ctx, "images/escape")
	if err != nil || st.Mode&fs.ModeSymlink == 0 || st.Target != "/etc/passwd" {
		t.Errorf("%s: Stat(images/escape) = %+v, %v; want the link itself", name, st, err)
	}
	if _, err := tree.OpenFile(ctx, "images/escape"); !errors.Is(err, restore.ErrNotRegular) {
		t.Errorf("%s: OpenFile of a link to /etc/passwd: %v, want ErrNotRegular", name, err)
	}
	if _, err := tree.OpenFile(ctx, "etclink/passwd"); err == nil {
		t.Errorf("%s: OpenFile(etclink/passwd) crossed a link out of the snapshot", name)
	}
	if _, err := tree.ReadDir(ctx, "etclink"); err == nil {
		t.Errorf("%s: ReadDir(etclink) listed through a link", name)
	}
	if _, err := tree.OpenFile(ctx, "inner"); !errors.Is(err, restore.ErrNotRegular) {
		t.Errorf("%s: OpenFile(inner) followed a link: %v", name, err)
	}
	if _, err := tree.OpenFile(ctx, "../x"); err == nil {
		t.Errorf("%s: ../x opened", name)
	}
	if _, err := tree.Stat(ctx, "images/missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s: Stat(missing) = %v, want ErrNotExist", name, err)
	}
	f, err := tree.OpenFile(ctx, "images/note.txt")
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	defer f.Close()
	if got := string(readAll(t, f)); got != "night "+strconv.Itoa(night+1)+"\n" {
		t.Errorf("%s: note.txt = %q", name, got)
	}
}

func sortedCopy(s []string) []string {
	c := append([]string(nil), s...)
	for i := range c {
		for j := i + 1; j < len(c); j++ {
			if c[j] < c[i] {
				c[i], c[j] = c[j], c[i]
			}
		}
	}
	return c
}
