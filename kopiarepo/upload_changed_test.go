package kopiarepo_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/manifest"
	"github.com/kopia/kopia/snapshot"
	"github.com/kopia/kopia/snapshot/policy"

	"github.com/vmhistory/vmhistory/kopiarepo"
)

// fullSource is where the tests upload the same nights with Upload, to
// compare object IDs with what kopia's own full upload writes.
const fullSource = "/var/lib/libvirt-full"

// diffBlock is the granularity of the tests' byte-level diffs, a
// ZFS-like record far smaller than a chunk.
const diffBlock = 4 << 10

// diffChange is the change between two versions of a file as the stream
// would give it, from their bytes: blocks that differ or were added are
// to be reread, or zeroed when they are zeros now.
func diffChange(t testing.TB, oldPath, newPath string) kopiarepo.FileChange {
	t.Helper()
	oldData, err := os.ReadFile(oldPath)
	if err != nil {
		t.Fatal(err)
	}
	newData, err := os.ReadFile(newPath)
	if err != nil {
		t.Fatal(err)
	}
	c := kopiarepo.FileChange{Object: inode(t, newPath), OldSize: int64(len(oldData)), NewSize: int64(len(newData))}
	add := func(rs *[]kopiarepo.ByteRange, off, n int64) {
		if k := len(*rs); k > 0 && (*rs)[k-1].End() == off {
			(*rs)[k-1].Length += n
			return
		}
		*rs = append(*rs, kopiarepo.ByteRange{Offset: off, Length: n})
	}
	for off := int64(0); off < int64(len(newData)); off += diffBlock {
		end := min(off+diffBlock, int64(len(newData)))
		nb := newData[off:end]
		if end <= int64(len(oldData)) && bytes.Equal(nb, oldData[off:end]) {
			continue
		}
		if isZero(nb) {
			add(&c.Zeroed, off, end-off)
		} else {
			add(&c.Reread, off, end-off)
		}
	}
	return c
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func inode(t testing.TB, p string) uint64 {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// expectedReads is what the stream path must read of a changed file: the
// new file's chunks whose bytes differ from the old file's chunk at the
// same offset (or whose length does), apart from those that are all
// zeros in a zeroed range.
func expectedReads(t testing.TB, oldPath, newPath string, chunk int64, c kopiarepo.FileChange) int64 {
	t.Helper()
	oldData, _ := os.ReadFile(oldPath)
	newData, _ := os.ReadFile(newPath)
	var n int64
	for off := int64(0); off < int64(len(newData)); off += chunk {
		end := min(off+chunk, int64(len(newData)))
		oldEnd := min(off+chunk, int64(len(oldData)))
		if off < int64(len(oldData)) && oldEnd == end && bytes.Equal(newData[off:end], oldData[off:end]) {
			continue
		}
		covered := false
		for _, z := range c.Zeroed {
			if z.Offset <= off && z.End() >= end {
				covered = true
			}
		}
		if !covered {
			n += end - off
		}
	}
	return n
}

// copyTree copies a directory tree, keeping modes, mtimes and holes.
func copyTree(t testing.TB, src, dst string) {
	t.Helper()
	err := filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		switch {
		case fi.IsDir():
			if err := os.MkdirAll(to, fi.Mode().Perm()); err != nil {
				return err
			}
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(target, to)
		default:
			copySparse(t, p, to, fi)
		}
		return os.Chtimes(to, fi.ModTime(), fi.ModTime())
	})
	if err != nil {
		t.Fatal(err)
	}
	// Directory mtimes again, after their files were written.
	filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.IsDir() {
			rel, _ := filepath.Rel(src, p)
			os.Chtimes(filepath.Join(dst, rel), fi.ModTime(), fi.ModTime())
		}
		return err
	})
}

func copySparse(t testing.TB, from, to string, fi os.FileInfo) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, fi.Mode().Perm())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for off := 0; off < len(data); off += diffBlock {
		b := data[off:min(off+diffBlock, len(data))]
		if !isZero(b) {
			if _, err := f.WriteAt(b, int64(off)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := f.Truncate(int64(len(data))); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(to, fi.Mode().Perm()); err != nil {
		t.Fatal(err)
	}
}

func touchLater(t testing.TB, p string) {
	t.Helper()
	later := time.Now().Add(2 * time.Second)
	if err := os.Chtimes(p, later, later); err != nil {
		t.Fatal(err)
	}
}

func writeZeros(t testing.TB, p string, off, n int64) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, n), off); err != nil {
		t.Fatal(err)
	}
	f.Close()
	touchLater(t, p)
}

func truncate(t testing.TB, p string, size int64) {
	t.Helper()
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	touchLater(t, p)
}

// extend appends n bytes of VM-like data to p.
func extend(t testing.TB, p string, n int64, seed uint64) {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	rewriteRange(t, p, fi.Size(), n, seed)
}

// changedNight is a test's two nights: night 0 uploaded in full to both
// sources, night 1 by UploadChanged to testSource and by Upload to
// fullSource.
type changedNight struct {
	r          *kopiarepo.Repo
	configFile string
	dir0, dir1 string
	splitter   string
	comp       string
	base       kopiarepo.UploadResult // night 0 on testSource
}

// newChangedNight makes the repository, calls setup, fills night 0 and
// uploads it, and copies it as the start of night 1.
func newChangedNight(t *testing.T, splitter, comp string, opts kopiarepo.CreateOptions, fill func(dir string), setup ...func(*changedNight)) *changedNight {
	t.Helper()
	ctx := context.Background()
	configFile := filepath.Join(t.TempDir(), "kopia.config")
	opts.ConnectOptions = testConnect(t)
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")}, configFile, testPassword, opts); err != nil {
		t.Fatalf("Create: %v", err)
	}
	r, err := kopiarepo.Open(ctx, configFile, testPassword)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { r.Close(context.Background()) })
	n := &changedNight{r: r, configFile: configFile, dir0: filepath.Join(t.TempDir(), "night0"), dir1: filepath.Join(t.TempDir(), "night1"), splitter: splitter, comp: comp}
	if err := os.Mkdir(n.dir0, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range setup {
		f(n)
	}
	fill(n.dir0)
	n.base = uploadNight(t, r, n.dir0, 0, n.req(testSource))
	uploadNight(t, r, n.dir0, 0, n.req(fullSource))
	copyTree(t, n.dir0, n.dir1)
	return n
}

func (n *changedNight) req(source string) func(*kopiarepo.UploadRequest) {
	return func(req *kopiarepo.UploadRequest) {
		req.SourcePath = source
		req.Splitter = n.splitter
		req.Compression = n.comp
		req.SkipMaintenance = true
	}
}

// upload uploads night 1 both ways and returns the stream path's result
// and the full upload's.
func (n *changedNight) upload(t *testing.T, changes kopiarepo.ChangeSet) (kopiarepo.ChangedUploadResult, kopiarepo.UploadResult) {
	t.Helper()
	req := kopiarepo.UploadRequest{
		Dir: n.dir1, Host: testHost, User: testUser,
		StartTime: night(1), Tags: nightTags(1), Description: "night 1",
	}
	n.req(testSource)(&req)
	if changes.Previous == "" {
		changes.Previous = n.base.Snapshot.ID
	}
	res, err := n.r.UploadChanged(context.Background(), req, changes)
	if err != nil {
		t.Fatalf("UploadChanged: %v", err)
	}
	full := uploadNight(t, n.r, n.dir1, 1, n.req(fullSource))
	return res, full
}

// plan is the change set of the given files between night 0 and night 1.
func (n *changedNight) plan(t testing.TB, files ...string) map[string]kopiarepo.FileChange {
	t.Helper()
	out := map[string]kopiarepo.FileChange{}
	for _, f := range files {
		oldPath, newPath := filepath.Join(n.dir0, f), filepath.Join(n.dir1, f)
		if _, err := os.Stat(newPath); err != nil {
			out[f] = kopiarepo.FileChange{}
			continue
		}
		if _, err := os.Stat(oldPath); err != nil {
			fi, _ := os.Stat(newPath)
			out[f] = kopiarepo.FileChange{Object: inode(t, newPath), NewSize: fi.Size(), Reread: []kopiarepo.ByteRange{{Length: fi.Size()}}}
			continue
		}
		out[f] = diffChange(t, oldPath, newPath)
	}
	return out
}

func reportsByPath(res kopiarepo.ChangedUploadResult) map[string]kopiarepo.FileReport {
	out := map[string]kopiarepo.FileReport{}
	for _, f := range res.Files {
		out[f.Path] = f
	}
	return out
}

// sameAsFullUpload checks that the stream path's snapshot is the one the
// full upload made: root, every file's object, the manifest's stats.
func sameAsFullUpload(t *testing.T, r *kopiarepo.Repo, res kopiarepo.ChangedUploadResult, full kopiarepo.UploadResult, dir string) {
	t.Helper()
	ctx := context.Background()
	for name := range treeDigest(t, dir) {
		got, err := r.Stat(ctx, res.Snapshot.ID, name)
		if err != nil {
			t.Fatal(err)
		}
		want, err := r.Stat(ctx, full.Snapshot.ID, name)
		if err != nil {
			t.Fatal(err)
		}
		if got.ObjectID != want.ObjectID {
			t.Errorf("%s: object %v, the full upload's %v", name, got.ObjectID, want.ObjectID)
		}
	}
	if res.Snapshot.RootObjectID != full.Snapshot.RootObjectID {
		t.Errorf("root object %s, the full upload's %s", res.Snapshot.RootObjectID, full.Snapshot.RootObjectID)
	}
	gotMan, err := snapshot.LoadSnapshot(ctx, r.Kopia(), manifest.ID(res.Snapshot.ID))
	if err != nil {
		t.Fatal(err)
	}
	wantMan, err := snapshot.LoadSnapshot(ctx, r.Kopia(), manifest.ID(full.Snapshot.ID))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(gotMan.Stats, wantMan.Stats) {
		t.Errorf("manifest stats %+v, the full upload's %+v", gotMan.Stats, wantMan.Stats)
	}
	if !reflect.DeepEqual(gotMan.RootEntry, wantMan.RootEntry) {
		t.Errorf("root entry %+v, the full upload's %+v", gotMan.RootEntry, wantMan.RootEntry)
	}
}

// restoreAndVerify restores the snapshot with the kopia CLI, compares it
// with dir byte for byte, and runs kopia's full verify on it.
func restoreAndVerify(t *testing.T, configFile string, res kopiarepo.ChangedUploadResult, dir string) {
	t.Helper()
	dest := filepath.Join(t.TempDir(), "restored")
	runKopia(t, configFile, "snapshot", "restore", res.Snapshot.RootObjectID, dest)
	want, got := treeDigest(t, dir), treeDigest(t, dest)
	if !reflect.DeepEqual(want, got) {
		for p := range want {
			if want[p] != got[p] {
				t.Errorf("kopia restore: %s differs", p)
			}
		}
		for p := range got {
			if _, ok := want[p]; !ok {
				t.Errorf("kopia restore: %s is extra", p)
			}
		}
	}
	runKopia(t, configFile, "snapshot", "verify", "--verify-files-percent=100", res.Snapshot.ID)
}

// TestUploadChangedMatchesFullUpload: under FIXED-128K and FIXED-1M, a
// night of unaligned writes, an extended, a truncated and a hole-punched
// file, a file touched only, an unchanged one, new, deleted and renamed
// files and a change in a subdirectory makes, by the stream path, the very
// objects, directories and stats kopia's full upload makes; kopia's CLI
// restores it byte for byte and verifies it; only the changed chunks are
// read.
func TestUploadChangedMatchesFullUpload(t *testing.T) {
	for _, tc := range []struct {
		splitter, comp string
		chunk          int64
	}{
		{"FIXED-128K", "zstd-fastest", 128 << 10},
		{"FIXED-1M", "none", 1 << 20},
	} {
		t.Run(tc.splitter, func(t *testing.T) {
			n := newChangedNight(t, tc.splitter, tc.comp, kopiarepo.CreateOptions{}, func(dir string) {
				os.MkdirAll(filepath.Join(dir, "vm/db"), 0o755)
				writeVMImage(t, filepath.Join(dir, "unaligned.raw"), 6<<20+12345, 1)
				writeVMImage(t, filepath.Join(dir, "grow.raw"), 2<<20+5000, 2)
				writeVMImage(t, filepath.Join(dir, "shrink.raw"), 5<<20+100, 3)
				writeVMImage(t, filepath.Join(dir, "hole.raw"), 6<<20, 4)
				writeVMImage(t, filepath.Join(dir, "same.raw"), 3<<20, 5)
				writeVMImage(t, filepath.Join(dir, "touched.raw"), 3<<20, 6)
				writeVMImage(t, filepath.Join(dir, "gone.raw"), 2<<20, 7)
				writeVMImage(t, filepath.Join(dir, "old-name.raw"), 2<<20, 8)
				writeVMImage(t, filepath.Join(dir, "vm/db/disk.qcow2"), 4<<20+1, 9)
				os.WriteFile(filepath.Join(dir, "vm/db.xml"), []byte("<domain/>\n"), 0o644)
			})
			d := n.dir1
			for i, off := range []int64{5, 128<<10 - 100, 1<<20 - 3000, 3<<20 + 77777} {
				rewriteRange(t, filepath.Join(d, "unaligned.raw"), off, 4096+int64(i)*5000, uint64(100+i))
			}
			rewriteRange(t, filepath.Join(d, "grow.raw"), 1000, 10, 11)
			extend(t, filepath.Join(d, "grow.raw"), 1<<20+777, 12)
			truncate(t, filepath.Join(d, "shrink.raw"), 1<<20+300)
			writeZeros(t, filepath.Join(d, "hole.raw"), 1<<20-4096, 2<<20+8192)
			touchLater(t, filepath.Join(d, "touched.raw"))
			os.Remove(filepath.Join(d, "gone.raw"))
			os.Rename(filepath.Join(d, "old-name.raw"), filepath.Join(d, "renamed.raw"))
			writeVMImage(t, filepath.Join(d, "new.raw"), 3<<20, 13)
			rewriteRange(t, filepath.Join(d, "vm/db/disk.qcow2"), 2<<20, 70000, 14)
			rewriteRange(t, filepath.Join(d, "vm/db.xml"), 2, 3, 15)

			streamed := []string{"unaligned.raw", "grow.raw", "shrink.raw", "hole.raw", "touched.raw", "vm/db/disk.qcow2"}
			plan := n.plan(t, append(streamed, "new.raw", "gone.raw", "renamed.raw", "vm/db.xml")...)
			// As a DRR_FREE gives a hole: the whole range, zeros before or not.
			hole := plan["hole.raw"]
			hole.Reread, hole.Zeroed = nil, []kopiarepo.ByteRange{{Offset: 1<<20 - 4096, Length: 2<<20 + 8192}}
			plan["hole.raw"] = hole
			res, full := n.upload(t, kopiarepo.ChangeSet{Files: plan})

			sameAsFullUpload(t, n.r, res, full, n.dir1)
			reps := reportsByPath(res)
			var readStream int64
			for _, f := range streamed {
				rep := reps[f]
				want := expectedReads(t, filepath.Join(n.dir0, f), filepath.Join(n.dir1, f), tc.chunk, plan[f])
				if rep.Way != kopiarepo.WayStream || rep.ReadBytes != want {
					t.Errorf("%s: %+v, want the stream path reading %d bytes", f, rep, want)
				}
				readStream += rep.ReadBytes
			}
			if rep := reps["hole.raw"]; rep.ZeroChunks == 0 {
				t.Errorf("hole.raw: no chunk written as zeros without a read: %+v", rep)
			}
			if rep := reps["touched.raw"]; rep.ReadBytes != 0 || rep.NewChunks != 0 {
				t.Errorf("touched.raw read: %+v", rep)
			}
			for f, reason := range map[string]string{
				"new.raw":     "no previous upload",
				"renamed.raw": "no previous upload",
				"vm/db.xml":   "small file",
			} {
				if rep := reps[f]; rep.Way != kopiarepo.WayFull || !strings.Contains(rep.Reason, reason) {
					t.Errorf("%s: %+v, want a full upload: %s", f, rep, reason)
				}
			}
			if rep := reps["gone.raw"]; rep.Way != kopiarepo.WayAbsent {
				t.Errorf("gone.raw: %+v", rep)
			}
			if _, ok := reps["same.raw"]; ok {
				t.Errorf("same.raw is reported: %+v", reps["same.raw"])
			}
			// kopia reads the three full files whole, the stream path the
			// chunks above; nothing else is read.
			var fullBytes int64
			for _, f := range []string{"new.raw", "renamed.raw", "vm/db.xml"} {
				fi, _ := os.Stat(filepath.Join(n.dir1, f))
				fullBytes += fi.Size()
			}
			if res.ReadBytes != readStream+fullBytes {
				t.Errorf("read %d bytes from the directory, want %d of changed chunks and %d of full files", res.ReadBytes, readStream, fullBytes)
			}
			restoreAndVerify(t, n.configFile, res, n.dir1)

			// And "kopia snapshot create" of the new directory, a source of
			// its own with the same policy, writes the same root.
			runKopia(t, n.configFile, "policy", "set", n.dir1, "--splitter="+tc.splitter, "--compression="+tc.comp)
			var man struct {
				RootEntry struct {
					Obj string `json:"obj"`
				} `json:"rootEntry"`
			}
			out := runKopia(t, n.configFile, "snapshot", "create", n.dir1, "--json")
			if err := json.Unmarshal([]byte(out), &man); err != nil {
				t.Fatalf("kopia snapshot create --json: %v\n%s", err, out)
			}
			if man.RootEntry.Obj != res.Snapshot.RootObjectID {
				t.Errorf("kopia snapshot create wrote root %s, the stream path %s", man.RootEntry.Obj, res.Snapshot.RootObjectID)
			}
		})
	}
}

// TestUploadChangedBigIndex: a file of more chunks than one index chunk
// holds (the repository's default splitter FIXED-128K cuts the index
// object too, so the file is "II…") comes out as kopia's full upload.
func TestUploadChangedBigIndex(t *testing.T) {
	const size = 320 << 20 // 2560 chunks, ~170 KB of index JSON
	n := newChangedNight(t, "FIXED-128K", "", kopiarepo.CreateOptions{Splitter: "FIXED-128K"}, func(dir string) {
		p := filepath.Join(dir, "big.raw")
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		f.Truncate(size)
		f.Close()
		rng := rand.New(rand.NewPCG(1, 2))
		for range 200 {
			rewriteRange(t, p, rng.Int64N(size-(64<<10)), 64<<10, rng.Uint64())
		}
	})
	p := filepath.Join(n.dir1, "big.raw")
	rewriteRange(t, p, 100<<20+3, 5000, 1)
	rewriteRange(t, p, 300<<20, 128<<10, 2)
	res, full := n.upload(t, kopiarepo.ChangeSet{Files: n.plan(t, "big.raw")})
	sameAsFullUpload(t, n.r, res, full, n.dir1)
	info, err := n.r.Stat(context.Background(), res.Snapshot.ID, "big.raw")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(info.ObjectID.String(), "II") {
		t.Errorf("big.raw is %v: the index object is not larger than a chunk", info.ObjectID)
	}
	if rep := reportsByPath(res)["big.raw"]; rep.Way != kopiarepo.WayStream || rep.ReadBytes != 2*128<<10 {
		t.Errorf("big.raw: %+v, want the stream path reading 2 chunks (the one 5000 bytes at 100 MiB+3 touch, the one at 300 MiB)", rep)
	}
	f, err := n.r.OpenFile(context.Background(), res.Snapshot.ID, "big.raw")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(p)
	if !bytes.Equal(got, want) {
		t.Error("big.raw read back differs")
	}
}

// setSubdirPolicy gives dir under both test sources its own splitter.
func setSubdirPolicy(t *testing.T, r *kopiarepo.Repo, dir, splitter string) {
	t.Helper()
	setPolicy(t, r, "/"+dir, &policy.Policy{SplitterPolicy: policy.SplitterPolicy{Algorithm: splitter}})
}

// setPolicy sets the policy of sub (a path under the sources' root, ""
// for the root) of both test sources.
func setPolicy(t *testing.T, r *kopiarepo.Repo, sub string, p *policy.Policy) {
	t.Helper()
	ctx := context.Background()
	err := repo.WriteSession(ctx, r.Kopia(), repo.WriteSessionOptions{Purpose: "test"}, func(ctx context.Context, w repo.RepositoryWriter) error {
		for _, src := range []string{testSource, fullSource} {
			si := snapshot.SourceInfo{Host: testHost, UserName: testUser, Path: src + sub}
			if err := policy.SetPolicy(ctx, w, si, p); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestUploadChangedParallelParts: above the policy's parallel upload size
// kopia uploads a file in parts, each cut from its own start, and
// concatenates them, an empty last part included; the stream path cuts
// the same way, with a part size that is no multiple of the chunk.
func TestUploadChangedParallelParts(t *testing.T) {
	const part = 1<<20 + 4096
	n := newChangedNight(t, "FIXED-128K", "", kopiarepo.CreateOptions{}, func(dir string) {
		writeVMImage(t, filepath.Join(dir, "parts.raw"), 5*part+333, 1)
		writeVMImage(t, filepath.Join(dir, "exact.raw"), 2*part+100, 2)
	}, func(n *changedNight) {
		size := policy.OptionalInt64(part)
		setPolicy(t, n.r, "", &policy.Policy{UploadPolicy: policy.UploadPolicy{ParallelUploadAboveSize: &size}})
	})
	rewriteRange(t, filepath.Join(n.dir1, "parts.raw"), part-10, 20, 3)
	rewriteRange(t, filepath.Join(n.dir1, "parts.raw"), 4*part+1, 1, 4)
	truncate(t, filepath.Join(n.dir1, "exact.raw"), 3*part)
	rewriteRange(t, filepath.Join(n.dir1, "exact.raw"), 2*part+200, 1000, 5)
	res, full := n.upload(t, kopiarepo.ChangeSet{Files: n.plan(t, "parts.raw", "exact.raw")})
	sameAsFullUpload(t, n.r, res, full, n.dir1)
	for _, rep := range res.Files {
		if rep.Way != kopiarepo.WayStream {
			t.Errorf("%+v, want the stream path", rep)
		}
		t.Logf("%+v", rep)
	}
	restoreAndVerify(t, n.configFile, res, n.dir1)
}

// TestUploadChangedFallbacks: every file whose precondition fails is
// uploaded in full by kopia's uploader, with a report line that says why,
// and the snapshot is still the one kopia's full upload makes.
func TestUploadChangedFallbacks(t *testing.T) {
	n := newChangedNight(t, "FIXED-128K", "", kopiarepo.CreateOptions{}, func(dir string) {
		for _, f := range []string{"hardlink.raw", "oldsize.raw", "newsize.raw", "inode.raw", "reused.raw", "dyn/disk.raw", "mix/disk.raw"} {
			os.MkdirAll(filepath.Dir(filepath.Join(dir, f)), 0o755)
			writeVMImage(t, filepath.Join(dir, f), 2<<20+999, uint64(len(f)))
		}
		writeVMImage(t, filepath.Join(dir, "small.raw"), 100<<10, 1)
		writeVMImage(t, filepath.Join(dir, "grown.raw"), 100<<10, 2)
	}, func(n *changedNight) {
		// Night 0 cuts mix/ in 1 MiB chunks, night 1 in 128 KiB ones.
		setSubdirPolicy(t, n.r, "mix", "FIXED-1M")
		setSubdirPolicy(t, n.r, "dyn", "DYNAMIC-1M-BUZHASH")
	})
	setSubdirPolicy(t, n.r, "mix", "FIXED-128K")

	d := n.dir1
	for _, f := range []string{"hardlink.raw", "oldsize.raw", "newsize.raw", "inode.raw", "reused.raw", "dyn/disk.raw", "mix/disk.raw", "small.raw"} {
		rewriteRange(t, filepath.Join(d, f), 1000, 5000, 7)
	}
	extend(t, filepath.Join(d, "grown.raw"), 1<<20, 8)
	if err := os.Link(filepath.Join(d, "hardlink.raw"), filepath.Join(d, "second-link.raw")); err != nil {
		t.Fatal(err)
	}
	plan := n.plan(t, "hardlink.raw", "oldsize.raw", "newsize.raw", "inode.raw", "reused.raw", "dyn/disk.raw", "mix/disk.raw", "small.raw", "grown.raw")
	c := plan["oldsize.raw"]
	c.OldSize--
	plan["oldsize.raw"] = c
	c = plan["newsize.raw"]
	c.NewSize++
	plan["newsize.raw"] = c
	c = plan["inode.raw"]
	c.Object++
	plan["inode.raw"] = c
	plan["reused.raw"] = kopiarepo.FileChange{Full: "object 9 was reused: the file was created in txg 99, after the base snapshot (txg 42)"}

	res, full := n.upload(t, kopiarepo.ChangeSet{Files: plan})
	sameAsFullUpload(t, n.r, res, full, n.dir1)
	reps := reportsByPath(res)
	for f, reason := range map[string]string{
		"hardlink.raw":    "hard link: 2 links",
		"second-link.raw": "not in the change set",
		"oldsize.raw":     "size mismatch: kopia snapshot",
		"newsize.raw":     "size mismatch: the file has",
		"inode.raw":       "inode mismatch: the file is inode",
		"reused.raw":      "object 9 was reused",
		"dyn/disk.raw":    "splitter DYNAMIC-1M-BUZHASH is not FIXED-*",
		"mix/disk.raw":    "is not the chunk list FIXED-128K gives",
		"small.raw":       "small file: one FIXED-128K chunk",
		"grown.raw":       "is not an indirect object",
	} {
		rep := reps[f]
		fi, _ := os.Stat(filepath.Join(d, f))
		if rep.Way != kopiarepo.WayFull || !strings.Contains(rep.Reason, reason) || rep.ReadBytes != fi.Size() {
			t.Errorf("%s: %+v, want a full upload of %d bytes: %s", f, rep, fi.Size(), reason)
		}
		t.Logf("%s: %s: %s", rep.Path, rep.Way, rep.Reason)
	}
	restoreAndVerify(t, n.configFile, res, n.dir1)
}

// TestUploadChangedWithoutBase: when the previous snapshot is missing, of
// another source, or the base snapshot's file is another inode, every file
// of the change set is uploaded in full and the report says why.
func TestUploadChangedWithoutBase(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(n *changedNight, cs *kopiarepo.ChangeSet)
		reason string
	}{
		{"missing", func(n *changedNight, cs *kopiarepo.ChangeSet) { cs.Previous = "0123456789abcdef0123456789abcdef" }, "no previous upload: kopia snapshot 0123456789abcdef0123456789abcdef does not exist"},
		{"other source", func(n *changedNight, cs *kopiarepo.ChangeSet) {
			ss, err := n.r.Snapshots(context.Background(), testHost, testUser, fullSource)
			if err != nil || len(ss) != 1 {
				t.Fatalf("snapshots of %s: %v %v", fullSource, ss, err)
			}
			cs.Previous = ss[0].ID
		}, "previous kopia snapshot"},
		{"base inode", func(n *changedNight, cs *kopiarepo.ChangeSet) { cs.BaseDir = n.dir0 }, "inode mismatch: inode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newChangedNight(t, "FIXED-128K", "", kopiarepo.CreateOptions{}, func(dir string) {
				writeVMImage(t, filepath.Join(dir, "disk.raw"), 2<<20, 1)
			})
			rewriteRange(t, filepath.Join(n.dir1, "disk.raw"), 300<<10, 10, 2)
			cs := kopiarepo.ChangeSet{Files: n.plan(t, "disk.raw")}
			tc.change(n, &cs)
			res, full := n.upload(t, cs)
			sameAsFullUpload(t, n.r, res, full, n.dir1)
			rep := reportsByPath(res)["disk.raw"]
			if rep.Way != kopiarepo.WayFull || !strings.Contains(rep.Reason, tc.reason) || rep.ReadBytes != 2<<20 {
				t.Errorf("disk.raw: %+v, want a full upload: %s", rep, tc.reason)
			}
			t.Logf("%s: %s: %s", rep.Path, rep.Way, rep.Reason)
		})
	}
}

// TestUploadChangedVerify: with ChangeSet.Verify the tree is read again
// in full. A right change set keeps the stream path's snapshot; one that
// leaves out a changed range (a wrong reading of the stream) is caught:
// the full re-read's snapshot is saved in its place, the file is named,
// and kopia's CLI restores the file as it is.
func TestUploadChangedVerify(t *testing.T) {
	for _, tc := range []struct {
		name  string
		wrong bool
	}{{"right", false}, {"wrong", true}} {
		t.Run(tc.name, func(t *testing.T) {
			n := newChangedNight(t, "FIXED-128K", "", kopiarepo.CreateOptions{}, func(dir string) {
				writeVMImage(t, filepath.Join(dir, "disk.raw"), 3<<20, 1)
				writeVMImage(t, filepath.Join(dir, "other.raw"), 1<<20, 2)
			})
			p := filepath.Join(n.dir1, "disk.raw")
			rewriteRange(t, p, 300<<10, 10, 2)
			rewriteRange(t, p, 2<<20+5, 5000, 3)
			cs := kopiarepo.ChangeSet{Previous: n.base.Snapshot.ID, Files: n.plan(t, "disk.raw"), Verify: true}
			if tc.wrong {
				c := cs.Files["disk.raw"]
				if len(c.Reread) != 2 {
					t.Fatalf("plan %+v: want two changed ranges", c)
				}
				c.Reread = c.Reread[:1]
				cs.Files["disk.raw"] = c
			}
			req := kopiarepo.UploadRequest{Dir: n.dir1, Host: testHost, User: testUser, StartTime: night(1), Tags: nightTags(1)}
			n.req(testSource)(&req)
			res, err := n.r.UploadChanged(context.Background(), req, cs)
			full := uploadNight(t, n.r, n.dir1, 1, n.req(fullSource))
			if res.Verify == nil || res.Verify.ReadBytes != 4<<20 {
				t.Fatalf("verify result %+v: want the whole 4 MiB re-read", res.Verify)
			}
			var mm *kopiarepo.VerifyMismatchError
			switch {
			case !tc.wrong && err != nil:
				t.Fatalf("UploadChanged: %v", err)
			case !tc.wrong && res.Verify.Replaced:
				t.Errorf("a right change set was replaced: %+v", res.Verify)
			case tc.wrong && !errors.As(err, &mm):
				t.Fatalf("UploadChanged with a wrong change set: %v, want a VerifyMismatchError", err)
			case tc.wrong && (!reflect.DeepEqual(mm.Paths, []string{"disk.raw"}) || mm.Snapshot != res.Snapshot.ID || !res.Verify.Replaced):
				t.Errorf("mismatch %+v, verify %+v: want disk.raw named and snapshot %s", mm, res.Verify, res.Snapshot.ID)
			}
			if tc.wrong {
				t.Logf("caught: %v", err)
			}
			if rep := reportsByPath(res)["disk.raw"]; rep.Way != kopiarepo.WayStream {
				t.Errorf("disk.raw went %s (%s): the stream path was not tried", rep.Way, rep.Reason)
			}
			if res.Snapshot.RootObjectID != full.Snapshot.RootObjectID {
				t.Errorf("saved root %s, a full upload's %s", res.Snapshot.RootObjectID, full.Snapshot.RootObjectID)
			}
			restoreAndVerify(t, n.configFile, res, n.dir1)
		})
	}
}

// TestUploadChangedSeesThroughAnUnchangedMtime: a file rewritten in
// place whose size and mtime are still its previous snapshot's (a write
// within the same second on zfs-fuse, or an mtime set back) is one kopia
// takes for unchanged; the stream says it changed, and the stream path
// stores the new bytes with the file's real mtime.
func TestUploadChangedSeesThroughAnUnchangedMtime(t *testing.T) {
	n := newChangedNight(t, "FIXED-128K", "", kopiarepo.CreateOptions{}, func(dir string) {
		writeVMImage(t, filepath.Join(dir, "disk.raw"), 2<<20, 1)
		writeVMImage(t, filepath.Join(dir, "reused.raw"), 1<<20, 2)
	})
	for _, f := range []string{"disk.raw", "reused.raw"} {
		p := filepath.Join(n.dir1, f)
		before, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		rewriteRange(t, p, 700<<10, 3000, 9)
		if err := os.Chtimes(p, before.ModTime(), before.ModTime()); err != nil {
			t.Fatal(err)
		}
	}
	plan := n.plan(t, "disk.raw", "reused.raw")
	plan["reused.raw"] = kopiarepo.FileChange{Object: plan["reused.raw"].Object, NewSize: 1 << 20, Full: "object 9 was reused"}
	res, full := n.upload(t, kopiarepo.ChangeSet{Files: plan})
	for _, f := range []string{"disk.raw", "reused.raw"} {
		want, _ := os.ReadFile(filepath.Join(n.dir1, f))
		got := readKopiaFile(t, n.r, res.Snapshot.ID, f)
		if !bytes.Equal(got, want) {
			t.Errorf("%s: the stream path kept the old bytes", f)
		}
		if !bytes.Equal(readKopiaFile(t, n.r, full.Snapshot.ID, f), want) {
			t.Logf("%s: kopia's full upload kept the old bytes (its size and mtime are the previous snapshot's)", f)
		}
		info, err := n.r.Stat(context.Background(), res.Snapshot.ID, f)
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := os.Stat(filepath.Join(n.dir1, f))
		if !info.ModTime.Equal(fi.ModTime()) {
			t.Errorf("%s: stored mtime %v, the file's %v", f, info.ModTime, fi.ModTime())
		}
	}
	reps := reportsByPath(res)
	if reps["disk.raw"].Way != kopiarepo.WayStream || reps["reused.raw"].Way != kopiarepo.WayFull {
		t.Errorf("ways: %+v", reps)
	}
	restoreAndVerify(t, n.configFile, res, n.dir1)
}

func readKopiaFile(t *testing.T, r *kopiarepo.Repo, snapshotID, path string) []byte {
	t.Helper()
	f, err := r.OpenFile(context.Background(), snapshotID, path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return data
}
