package kopiarepo_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/maintenance"
	"github.com/kopia/kopia/repo/object"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/safefile"
)

// night is the StartTime of the n-th nightly snapshot, like
// DATA/libvirt@2023-03-04_05:00:01 and the nights after.
func night(n int) time.Time {
	return time.Date(2023, 3, 4+n, 5, 0, 1, 0, time.Local)
}

func nightTags(n int) map[string]string {
	return map[string]string{
		kopiarepo.TagDataset:  "DATA/libvirt",
		kopiarepo.TagSnapshot: night(n).Format("2006-01-02_15:04:05"),
		kopiarepo.TagGUID:     fmt.Sprint(1234567890123456789 + n),
	}
}

func uploadNight(t *testing.T, r *kopiarepo.Repo, dir string, n int, mod func(*kopiarepo.UploadRequest)) kopiarepo.UploadResult {
	t.Helper()
	req := kopiarepo.UploadRequest{
		Dir:         dir,
		SourcePath:  testSource,
		Host:        testHost,
		User:        testUser,
		StartTime:   night(n),
		Tags:        nightTags(n),
		Description: "DATA/libvirt@" + nightTags(n)[kopiarepo.TagSnapshot],
	}
	if mod != nil {
		mod(&req)
	}
	res, err := r.Upload(context.Background(), req)
	if err != nil {
		t.Fatalf("Upload night %d: %v", n, err)
	}
	return res
}

// threeNights uploads a tree three times with changes in between and
// checks listing, tags, times, incrementality and the bytes read back.
func threeNights(t *testing.T, r *kopiarepo.Repo) {
	ctx := context.Background()
	dir := t.TempDir()
	writeTree(t, dir)
	// Regular files and the symlink: kopia hashes a symlink's target.
	files := int64(len(treeDigest(t, dir))) + 1

	var mu sync.Mutex
	var reports []kopiarepo.UploadProgress
	res1 := uploadNight(t, r, dir, 0, func(req *kopiarepo.UploadRequest) {
		req.ProgressInterval = time.Millisecond
		req.Progress = func(p kopiarepo.UploadProgress) {
			mu.Lock()
			reports = append(reports, p)
			mu.Unlock()
		}
	})
	if res1.Progress.HashedBytes < 6<<20 || res1.Progress.HashedFiles != files || res1.Progress.UploadedBytes == 0 {
		t.Errorf("first upload progress %+v: want all %d files (>= 6 MiB) hashed and something uploaded", res1.Progress, files)
	}
	mu.Lock()
	if len(reports) == 0 || !reports[len(reports)-1].Done || reports[len(reports)-1] != res1.Progress {
		t.Errorf("progress reports end with %+v, want the final counters %+v with Done", reports[len(reports)-1:], res1.Progress)
	}
	mu.Unlock()
	checkSnapshotFiles(t, r, res1.Snapshot.ID, dir)

	// Night 2: nothing changed. Nothing is read, next to nothing written.
	res2 := uploadNight(t, r, dir, 1, nil)
	if p := res2.Progress; p.HashedBytes != 0 || p.HashedFiles != 0 || p.CachedFiles != files || p.UploadedBytes > 64<<10 {
		t.Errorf("unchanged second upload: %+v; want 0 hashed, %d cached files, < 64 KiB uploaded", p, files)
	}
	if res2.Snapshot.RootObjectID != res1.Snapshot.RootObjectID {
		t.Errorf("unchanged tree got root %s, first was %s", res2.Snapshot.RootObjectID, res1.Snapshot.RootObjectID)
	}

	// Night 3: a VM wrote 256 KiB, a file appeared, one went away.
	rewriteRange(t, filepath.Join(dir, "images/web.raw"), 1<<20, 256<<10, 99)
	if err := os.WriteFile(filepath.Join(dir, "qemu/new.xml"), []byte("<domain/>\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "qemu/db.xml")); err != nil {
		t.Fatal(err)
	}
	res3 := uploadNight(t, r, dir, 2, nil)
	if p := res3.Progress; p.HashedFiles != 2 || p.HashedBytes != 4<<20+int64(len("<domain/>\n")) {
		t.Errorf("third upload %+v: want only web.raw and new.xml hashed", p)
	}
	// The dynamic splitter re-cuts only around the change.
	if p := res3.Progress; p.UploadedBytes > 3<<20 {
		t.Errorf("third upload wrote %d bytes for a 256 KiB change", p.UploadedBytes)
	}
	checkSnapshotFiles(t, r, res3.Snapshot.ID, dir)
	if _, err := r.OpenFile(ctx, res3.Snapshot.ID, "qemu/db.xml"); err == nil {
		t.Error("qemu/db.xml removed before night 3 is in its snapshot")
	}
	if _, err := r.OpenFile(ctx, res1.Snapshot.ID, "qemu/db.xml"); err != nil {
		t.Errorf("qemu/db.xml of night 1: %v", err)
	}

	snaps, err := r.Snapshots(ctx, testHost, testUser, testSource)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 3 {
		t.Fatalf("Snapshots: %d, want 3: %+v", len(snaps), snaps)
	}
	for i, s := range snaps {
		if !s.StartTime.Equal(night(i)) {
			t.Errorf("snapshot %d StartTime %v, want %v", i, s.StartTime, night(i))
		}
		if s.EndTime.Before(s.StartTime) {
			t.Errorf("snapshot %d EndTime %v before StartTime", i, s.EndTime)
		}
		for k, v := range nightTags(i) {
			if s.Tags[k] != v {
				t.Errorf("snapshot %d tag %s = %q, want %q (tags %v)", i, k, s.Tags[k], v, s.Tags)
			}
		}
		if s.Host != testHost || s.User != testUser || s.Path != testSource {
			t.Errorf("snapshot %d source %s@%s:%s", i, s.User, s.Host, s.Path)
		}
		if s.Files != files-1 || s.TotalSize < 6<<20 || s.RootObjectID == "" { // Files counts regular files
			t.Errorf("snapshot %d: files %d size %d root %q", i, s.Files, s.TotalSize, s.RootObjectID)
		}
	}
	if snaps[0].ID != res1.Snapshot.ID || snaps[2].ID != res3.Snapshot.ID {
		t.Errorf("listing order %s %s %s, uploads %s %s %s", snaps[0].ID, snaps[1].ID, snaps[2].ID, res1.Snapshot.ID, res2.Snapshot.ID, res3.Snapshot.ID)
	}

	got, ok, err := r.SnapshotByGUID(ctx, nightTags(1)[kopiarepo.TagGUID])
	if err != nil || !ok || got.ID != res2.Snapshot.ID {
		t.Errorf("SnapshotByGUID(night 1) = %s %v %v, want %s", got.ID, ok, err, res2.Snapshot.ID)
	}
	if _, ok, err := r.SnapshotByGUID(ctx, "42"); ok || err != nil {
		t.Errorf("SnapshotByGUID(unknown) = %v %v", ok, err)
	}
	if all, err := r.Snapshots(ctx, "", "", ""); err != nil || len(all) != 3 {
		t.Errorf("Snapshots of everything: %d %v", len(all), err)
	}
	if other, err := r.Snapshots(ctx, "otherhost", "", ""); err != nil || len(other) != 0 {
		t.Errorf("Snapshots of another host: %d %v", len(other), err)
	}
}

// contentReader is what object.LoadIndexObject reads with: kopia's
// content.Reader lacks PrefetchContents, which the repository has.
type contentReader struct{ dr repo.DirectRepository }

func (c contentReader) ContentInfo(ctx context.Context, id content.ID) (content.Info, error) {
	return c.dr.ContentInfo(ctx, id)
}

func (c contentReader) GetContent(ctx context.Context, id content.ID) ([]byte, error) {
	return c.dr.ContentReader().GetContent(ctx, id)
}

func (c contentReader) PrefetchContents(ctx context.Context, ids []content.ID, hint string) []content.ID {
	return c.dr.PrefetchContents(ctx, ids, hint)
}

func TestFilesystemRepositoryThreeNights(t *testing.T) {
	r, _ := newRepo(t, kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")})
	threeNights(t, r)
}

func TestOpenFilePaths(t *testing.T) {
	ctx := context.Background()
	r, _ := newRepo(t, kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")})
	dir := t.TempDir()
	writeTree(t, dir)
	res := uploadNight(t, r, dir, 0, nil)
	id := res.Snapshot.ID

	f, err := r.OpenFile(ctx, id, "./images/../images/db.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	// Seek and read in the middle, as a restore resuming would.
	want, err := os.ReadFile(filepath.Join(dir, "images/db.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Seek(1<<20+7, 0); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1000)
	if _, err := f.Read(buf); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if string(buf) != string(want[1<<20+7:1<<20+7+1000]) {
		t.Error("bytes after Seek differ")
	}
	if f.Path != "images/db.qcow2" || f.Mode.Perm() != 0o600 || f.Size != int64(len(want)) {
		t.Errorf("file info %+v", f.FileInfo)
	}

	for _, p := range []string{"/images/db.qcow2", "../x", "images/../../x", "", "images", "qemu/web-disk", "nope"} {
		if f, err := r.OpenFile(ctx, id, p); err == nil {
			f.Close()
			t.Errorf("OpenFile(%q) succeeded", p)
		}
	}
	if _, err := r.OpenFile(ctx, "k0123456789abcdef", "images/db.qcow2"); err == nil {
		t.Error("OpenFile of an unknown snapshot succeeded")
	}
}

// TestPolicyFromRequest checks that compression and splitter of the
// request are in the source's policy and in the stored contents.
func TestPolicyFromRequest(t *testing.T) {
	ctx := context.Background()
	r, _ := newRepo(t, kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")})
	dir := t.TempDir()
	writeTree(t, dir)
	res := uploadNight(t, r, dir, 0, func(req *kopiarepo.UploadRequest) {
		req.Compression = "zstd"
		req.Splitter = "FIXED-128K"
	})

	st, err := r.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Sources) != 1 || st.Sources[0].Policy != (kopiarepo.PolicySummary{Compression: "zstd", Splitter: "FIXED-128K"}) {
		t.Errorf("source policies %+v, want zstd and FIXED-128K", st.Sources)
	}
	if st.GlobalPolicy.Compression != "none" {
		t.Errorf("global policy changed: %+v", st.GlobalPolicy)
	}

	// The 4 MiB image is cut in 128 KiB chunks, and compressible chunks
	// are stored compressed.
	info, err := r.Stat(ctx, res.Snapshot.ID, "images/web.raw")
	if err != nil {
		t.Fatal(err)
	}
	dr := r.Kopia().(repo.DirectRepository)
	indexID, ok := info.ObjectID.IndexObjectID()
	if !ok {
		t.Fatalf("web.raw object %v is not an index object", info.ObjectID)
	}
	entries, err := object.LoadIndexObject(ctx, contentReader{dr}, indexID)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 32 {
		t.Errorf("web.raw has %d chunks, want 32 of 128 KiB", len(entries))
	}
	compressed := 0
	for _, e := range entries {
		if e.Length != 128<<10 {
			t.Errorf("chunk at %d is %d bytes, want 128 KiB", e.Start, e.Length)
		}
		cid, _, ok := e.Object.ContentID()
		if !ok {
			t.Fatalf("chunk %v is not a content", e.Object)
		}
		ci, err := dr.ContentInfo(ctx, cid)
		if err != nil {
			t.Fatal(err)
		}
		if ci.CompressionHeaderID != 0 {
			compressed++
		}
	}
	if compressed == 0 {
		t.Error("no chunk of web.raw is stored compressed")
	}

	// An unchanged request writes no new policy revision.
	before, _ := r.Kopia().FindManifests(ctx, map[string]string{"type": "policy"})
	uploadNight(t, r, dir, 1, func(req *kopiarepo.UploadRequest) {
		req.Compression = "zstd"
		req.Splitter = "FIXED-128K"
	})
	after, _ := r.Kopia().FindManifests(ctx, map[string]string{"type": "policy"})
	if len(after) != len(before) {
		t.Errorf("policy manifests %d -> %d after an upload with the same policy", len(before), len(after))
	}

	// Bad names are refused before anything is uploaded.
	for _, mod := range []func(*kopiarepo.UploadRequest){
		func(req *kopiarepo.UploadRequest) { req.Compression = "zip" },
		func(req *kopiarepo.UploadRequest) { req.Splitter = "FIXED-3K" },
		func(req *kopiarepo.UploadRequest) { req.Tags = map[string]string{"a:b": "c"} },
		func(req *kopiarepo.UploadRequest) { req.SourcePath = "relative" },
		func(req *kopiarepo.UploadRequest) { req.Dir = filepath.Join(dir, "missing") },
	} {
		req := kopiarepo.UploadRequest{Dir: dir, SourcePath: testSource}
		mod(&req)
		if _, err := r.Upload(ctx, req); err == nil {
			t.Errorf("Upload(%+v) succeeded", req)
		}
	}
}

// TestRetentionAndMaintenance checks what kopia's CLI does after a
// snapshot and the library does not: retention and maintenance.
func TestRetentionAndMaintenance(t *testing.T) {
	ctx := context.Background()
	r, _ := newRepo(t, kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")})
	two, zero := 2, 0
	if err := r.SetRetention(ctx, testHost, testUser, testSource, kopiarepo.Retention{
		Latest: &two, Hourly: &zero, Daily: &zero, Weekly: &zero, Monthly: &zero, Annual: &zero,
	}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writeTree(t, dir)

	res1 := uploadNight(t, r, dir, 0, nil)
	// A new repository is due for full maintenance at once, owned by the
	// connection that created it.
	if m := res1.Maintenance; m.Mode != "full" || m.Owner != testUser+"@"+testHost {
		t.Errorf("maintenance after the first upload: %+v, want full by %s@%s", m, testUser, testHost)
	}
	res2 := uploadNight(t, r, dir, 1, nil)
	if m := res2.Maintenance; m.Mode != "" || !strings.HasPrefix(m.Skipped, "not due") {
		t.Errorf("maintenance right after a full run: %+v, want not due", m)
	}
	if len(res2.Expired) != 0 {
		t.Errorf("second upload expired %v", res2.Expired)
	}
	res3 := uploadNight(t, r, dir, 2, nil)
	if len(res3.Expired) != 1 || res3.Expired[0] != res1.Snapshot.ID {
		t.Errorf("third upload expired %v, want the first snapshot %s", res3.Expired, res1.Snapshot.ID)
	}
	snaps, err := r.Snapshots(ctx, testHost, testUser, testSource)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 2 || snaps[0].ID != res2.Snapshot.ID || snaps[1].ID != res3.Snapshot.ID {
		t.Errorf("after retention: %+v, want nights 2 and 3", snaps)
	}

	dr := r.Kopia().(repo.DirectRepository)
	sched, err := maintenance.GetSchedule(ctx, dr)
	if err != nil {
		t.Fatal(err)
	}
	if len(sched.Runs[maintenance.TaskSnapshotGarbageCollection]) == 0 {
		t.Errorf("snapshot GC never ran: runs %v", sched.Runs)
	}
	st, err := r.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Maintenance.Owned || st.Maintenance.LastRun.IsZero() || st.Maintenance.NextFull.Before(time.Now()) {
		t.Errorf("maintenance status %+v", st.Maintenance)
	}
}

// TestMaintenanceOwnedElsewhere: a client that does not own maintenance
// uploads without running it, and Connect with TakeMaintenance takes it.
func TestMaintenanceOwnedElsewhere(t *testing.T) {
	ctx := context.Background()
	spec := kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")}
	_, _ = newRepo(t, spec)

	other := filepath.Join(t.TempDir(), "other.config")
	opts := testConnect(t)
	opts.Host = "otherhost"
	if err := kopiarepo.Connect(ctx, spec, other, testPassword, opts); err != nil {
		t.Fatal(err)
	}
	r2, err := kopiarepo.Open(ctx, other, testPassword)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writeTree(t, dir)
	res, err := r2.Upload(ctx, kopiarepo.UploadRequest{Dir: dir, SourcePath: testSource})
	if err != nil {
		t.Fatal(err)
	}
	if res.Maintenance.Mode != "" || !strings.Contains(res.Maintenance.Skipped, "owned by") || res.Snapshot.Host != "otherhost" {
		t.Errorf("upload by a non-owner: %+v", res)
	}
	r2.Close(ctx)

	opts.Overwrite, opts.TakeMaintenance = true, true
	if err := kopiarepo.Connect(ctx, spec, other, testPassword, opts); err != nil {
		t.Fatal(err)
	}
	r2, err = kopiarepo.Open(ctx, other, testPassword)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close(ctx)
	st, err := r2.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Maintenance.Owner != "root@otherhost" || !st.Maintenance.Owned {
		t.Errorf("after TakeMaintenance: %+v", st.Maintenance)
	}
}

func TestCreateConnectOpenErrors(t *testing.T) {
	ctx := context.Background()
	spec := kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")}
	_, configFile := newRepo(t, spec)

	// Creating again in the same place, or over an existing config, is refused.
	if err := kopiarepo.Create(ctx, spec, filepath.Join(t.TempDir(), "c"), testPassword, kopiarepo.CreateOptions{ConnectOptions: testConnect(t)}); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Errorf("Create in a used location: %v", err)
	}
	if err := kopiarepo.Connect(ctx, spec, configFile, testPassword, testConnect(t)); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("Connect over an existing config: %v", err)
	}
	if err := kopiarepo.Connect(ctx, spec, filepath.Join(t.TempDir(), "c"), "wrong", testConnect(t)); err == nil || !strings.Contains(err.Error(), "wrong password") {
		t.Errorf("Connect with a wrong password: %v", err)
	}
	empty := kopiarepo.Filesystem{Path: t.TempDir()}
	if err := kopiarepo.Connect(ctx, empty, filepath.Join(t.TempDir(), "c"), testPassword, testConnect(t)); err == nil || !strings.Contains(err.Error(), "holds no kopia repository") {
		t.Errorf("Connect to an empty location: %v", err)
	}
	if _, err := kopiarepo.Open(ctx, configFile, "wrong"); err == nil || !strings.Contains(err.Error(), "wrong password") {
		t.Errorf("Open with a wrong password: %v", err)
	}
	if _, err := kopiarepo.Open(ctx, filepath.Join(t.TempDir(), "missing.config"), testPassword); err == nil || !errors.Is(err, os.ErrNotExist) && !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("Open of a missing config: %v", err)
	}
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: "relative"}, filepath.Join(t.TempDir(), "c"), testPassword, kopiarepo.CreateOptions{}); err == nil {
		t.Error("Create with a relative path succeeded")
	}
}

func TestResolvePassword(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	if err := os.WriteFile(good, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	open := filepath.Join(dir, "open")
	if err := os.WriteFile(open, []byte("s3cret\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	emptyFile := filepath.Join(dir, "empty")
	if err := os.WriteFile(emptyFile, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv(kopiarepo.PasswordEnv, "from-env")
	if pw, src, err := kopiarepo.ResolvePassword(good, open); err != nil || pw != "s3cret" || src != good {
		t.Errorf("flag file: %q %q %v", pw, src, err)
	}
	if pw, src, err := kopiarepo.ResolvePassword("", good); err != nil || pw != "from-env" || src != "$KOPIA_PASSWORD" {
		t.Errorf("env: %q %q %v", pw, src, err)
	}
	os.Unsetenv(kopiarepo.PasswordEnv)
	if pw, _, err := kopiarepo.ResolvePassword("", good); err != nil || pw != "s3cret" {
		t.Errorf("config file: %q %v", pw, err)
	}
	for _, f := range []string{open, emptyFile, filepath.Join(dir, "missing")} {
		if _, _, err := kopiarepo.ResolvePassword(f, ""); err == nil {
			t.Errorf("password file %s accepted", f)
		}
	}
	if _, _, err := kopiarepo.ResolvePassword("", ""); err == nil {
		t.Error("no password source accepted")
	}
}

// TestRcloneRepository: kopia's rclone backend, on rclone's local
// backend (a remote path that is a plain directory).
func TestRcloneRepository(t *testing.T) {
	ctx := context.Background()
	r, configFile := newRepo(t, kopiarepo.Rclone{RemotePath: filepath.Join(t.TempDir(), "rclone-repo")})
	dir := t.TempDir()
	writeTree(t, dir)
	res := uploadNight(t, r, dir, 0, nil)
	checkSnapshotFiles(t, r, res.Snapshot.ID, dir)
	st, err := r.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.StorageType != "rclone" || !strings.HasPrefix(st.Storage, "rclone /") {
		t.Errorf("rclone status: %q %q", st.StorageType, st.Storage)
	}
	// A second connection, as the next night's process would open.
	r2, err := kopiarepo.Open(ctx, configFile, testPassword)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close(ctx)
	if snaps, err := r2.Snapshots(ctx, testHost, testUser, testSource); err != nil || len(snaps) != 1 {
		t.Errorf("rclone repository reopened: %d snapshots, %v", len(snaps), err)
	}
}

// TestUploadMissedNightLater: a night missed and uploaded after a newer
// one takes its place in the timeline by StartTime, incrementally.
func TestUploadMissedNightLater(t *testing.T) {
	ctx := context.Background()
	r, _ := newRepo(t, kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")})
	dir := t.TempDir()
	writeTree(t, dir)
	uploadNight(t, r, dir, 0, nil)
	uploadNight(t, r, dir, 2, nil)
	res := uploadNight(t, r, dir, 1, nil)
	if res.Progress.HashedBytes != 0 {
		t.Errorf("missed night hashed %d bytes of an unchanged tree", res.Progress.HashedBytes)
	}
	snaps, err := r.Snapshots(ctx, testHost, testUser, testSource)
	if err != nil || len(snaps) != 3 {
		t.Fatalf("%d snapshots, %v", len(snaps), err)
	}
	for i, s := range snaps {
		if s.Tags[kopiarepo.TagGUID] != nightTags(i)[kopiarepo.TagGUID] {
			t.Errorf("snapshot %d is night %s", i, s.Tags[kopiarepo.TagSnapshot])
		}
	}
}

// A symbolic link (or anything but a regular file) planted where the
// repository config goes is refused by Connect and Create, even with
// Overwrite: the file it points to and the link stay as they were.
func TestConnectRefusesPlantedConfigSymlink(t *testing.T) {
	ctx := context.Background()
	spec := kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")}
	newRepo(t, spec)
	dir := t.TempDir()
	victim := filepath.Join(t.TempDir(), "shadow")
	if err := os.WriteFile(victim, []byte("root:x:0:0\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	for _, to := range []string{victim, filepath.Join(dir, "dangling")} {
		link := filepath.Join(dir, "kopia.config")
		os.Remove(link)
		if err := os.Symlink(to, link); err != nil {
			t.Fatal(err)
		}
		opts := testConnect(t)
		opts.Overwrite = true
		err := kopiarepo.Connect(ctx, spec, link, testPassword, opts)
		if !errors.Is(err, safefile.ErrNotRegular) || !strings.Contains(err.Error(), link) {
			t.Errorf("Connect with the config a symlink to %s: %v, want a refusal naming it", to, err)
		}
		err = kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: t.TempDir()}, link, testPassword, kopiarepo.CreateOptions{ConnectOptions: opts})
		if !errors.Is(err, safefile.ErrNotRegular) {
			t.Errorf("Create with the config a symlink to %s: %v, want a refusal", to, err)
		}
		if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Errorf("the planted link was replaced (%v)", err)
		}
	}
	if b, _ := os.ReadFile(victim); string(b) != "root:x:0:0\n" {
		t.Errorf("the link's target changed: %q", b)
	}
	if _, err := os.Stat(filepath.Join(dir, "dangling")); err == nil {
		t.Error("a file was created where the dangling link pointed")
	}
}
