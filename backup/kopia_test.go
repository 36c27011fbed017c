package backup

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/testenv"
)

const testKopiaPassword = "correct horse battery staple"

// withKopia creates a repository on spec, points the sandbox's
// configuration at it and opens the uploader the way Open does.
func (sb *sandbox) withKopia(spec kopiarepo.StorageSpec) *kopiaUploader {
	t := sb.t
	ctx := context.Background()
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "password")
	if err := os.WriteFile(pwFile, []byte(testKopiaPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	configFile := filepath.Join(dir, "kopia.config")
	if err := kopiarepo.Create(ctx, spec, configFile, testKopiaPassword,
		kopiarepo.CreateOptions{ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	sb.cfg.Kopia = &config.Kopia{ConfigFile: configFile, PasswordFile: pwFile, Host: "kvmhost", User: "root",
		Compression: "zstd-fastest", Splitter: "FIXED-128K"}
	up, err := openKopiaUploader(ctx, sb.cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close(context.Background()) })
	return up
}

func TestThreeNightsUploadedToKopia(t *testing.T) {
	ctx := context.Background()
	sb := newSandbox(t, "managedsave", 20, "")
	up := sb.withKopia(kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")})
	p := sb.pipeline()
	p.Uploader = up
	for i, at := range nights {
		rep := sb.night(p, at, Options{AllowFull: i == 0})
		if err := rep.Err(); err != nil {
			t.Fatalf("night %d: %v", i+1, err)
		}
		if rep.BytesFor(StepUpload) == 0 {
			t.Errorf("night %d uploaded 0 bytes", i+1)
		}
		sb.assertRunning("after an uploading night")
	}
	local, _ := sb.src.ZFS.Snapshots(ctx, sb.dataset)
	snaps, err := up.repo.Snapshots(ctx, "kvmhost", "root", sb.mountpoint)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 3 || len(local) != 3 {
		t.Fatalf("kopia has %d snapshots of %s, ZFS %d; want 3 of one source", len(snaps), sb.mountpoint, len(local))
	}
	// The three nights ran within seconds here; match by guid, not order.
	byGUID := map[string]kopiarepo.Snapshot{}
	for _, s := range snaps {
		byGUID[s.Tags[kopiarepo.TagGUID]] = s
	}
	for i, z := range local {
		s, ok := byGUID[strconv.FormatUint(z.GUID, 10)]
		if !ok {
			t.Errorf("no kopia snapshot carries the guid of %s", z.FullName())
			continue
		}
		if !s.StartTime.Equal(z.Creation) {
			t.Errorf("kopia snapshot %d starts %v, the ZFS snapshot was created %v", i, s.StartTime, z.Creation)
		}
		if s.Tags[kopiarepo.TagDataset] != sb.dataset || s.Tags[kopiarepo.TagSnapshot] != z.Name || s.Tags[kopiarepo.TagGUID] != strconv.FormatUint(z.GUID, 10) {
			t.Errorf("kopia snapshot %d tags %v, ZFS %s guid %d", i, s.Tags, z.FullName(), z.GUID)
		}
	}
	// A file restored from kopia equals the file in the ZFS snapshot.
	view, err := sb.src.ZFS.OpenSnapshot(ctx, local[1].FullName())
	if err != nil {
		t.Fatal(err)
	}
	defer view.Close(ctx)
	want, err := os.ReadFile(filepath.Join(view.Root, "images", "db.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := up.repo.OpenFile(ctx, byGUID[strconv.FormatUint(local[1].GUID, 10)].ID, "images/db.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("kopia's images/db.qcow2 of night 2 (%d bytes) differs from the ZFS snapshot's (%d bytes)", len(got), len(want))
	}
}

func TestKopiaUnreachableThenCaughtUp(t *testing.T) {
	ctx := context.Background()
	sb := newSandbox(t, "suspend", 1, "")
	dav := testenv.StartWebDAV(t)
	up := sb.withKopia(kopiarepo.WebDAV{URL: dav.URL + "repo/", Username: dav.Username, Password: dav.Password})
	p := sb.pipeline()
	p.Uploader = up
	// No replica here: its hold would keep snapshots for its own reasons.
	if rep := sb.night(p, nights[0], Options{SkipReplicate: true}); rep.Err() != nil {
		t.Fatal(rep.Err())
	}
	dav.Stop()
	rep := sb.night(p, nights[1], Options{SkipReplicate: true})
	err := rep.Err()
	if err == nil || !strings.Contains(err.Error(), "upload") {
		t.Fatalf("night with the repository down: %v", err)
	}
	sb.assertRunning("with the repository down")
	// A second night down: night 2 is now beyond keep_local 1, but it is
	// not in kopia, so it stays.
	rep = sb.night(p, nights[2], Options{SkipReplicate: true})
	if rep.Err() == nil {
		t.Fatal("second night with the repository down succeeded")
	}
	if local, _ := sb.src.ZFS.Snapshots(ctx, sb.dataset); len(local) != 2 {
		t.Errorf("%d local snapshots; the one not uploaded must be kept", len(local))
	}
	if w := strings.Join(rep.Warnings, "\n"); !strings.Contains(w, sb.cfg.SnapshotName(nights[1])) {
		t.Errorf("no warning names the snapshot kept for kopia: %q", w)
	}

	dav.Start()
	fourth := nights[2].Add(7 * 24 * time.Hour)
	rep = sb.night(p, fourth, Options{SkipReplicate: true})
	if err := rep.Err(); err != nil {
		t.Fatalf("night after the repository came back: %v", err)
	}
	var detail string
	for _, s := range rep.Steps {
		if s.Step == StepUpload && s.Dataset != "" {
			detail = s.Detail
		}
	}
	missed, tonight := sb.cfg.SnapshotName(nights[1]), sb.cfg.SnapshotName(fourth)
	if i, j := strings.Index(detail, missed), strings.Index(detail, tonight); i < 0 || j < 0 || i > j {
		t.Errorf("upload after the outage %q: want %s (missed) before %s (tonight)", detail, missed, tonight)
	}
	snaps, err := up.repo.Snapshots(ctx, "kvmhost", "root", sb.mountpoint)
	if err != nil || len(snaps) != 4 {
		t.Errorf("kopia has %d snapshots after catching up (%v), want 4", len(snaps), err)
	}
	// Everything uploaded: keep_local 1 applies again.
	if local, _ := sb.src.ZFS.Snapshots(ctx, sb.dataset); len(local) != 1 || local[0].Name != tonight {
		t.Errorf("after catching up, local snapshots %v; want only %s", local, tonight)
	}
}

func TestPruneKeepsWhatKopiaLacks(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 64)
	ds, _ := pool.Dataset(t, "libvirt")
	var guids []uint64
	for _, n := range []string{"2023-03-04_05:00:01", "2023-03-11_05:00:01", "2023-03-18_05:00:01", "2023-03-25_05:00:01", "manual"} {
		s, err := pool.ZFS.CreateSnapshot(ctx, ds, n, map[string]string{RunProperty: "test-run"})
		if err != nil {
			t.Fatal(err)
		}
		guids = append(guids, s.GUID)
	}
	if err := pool.ZFS.Hold(ctx, ds+"@2023-03-04_05:00:01", "vmhistory-mount"); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	pr := &Pruner{ZFS: pool.ZFS, Dataset: ds, Keep: 1,
		Named:    func(n string) bool { _, ok := cfg.ParseSnapshotName(n); return ok },
		Uploaded: func(g uint64) bool { return g != guids[1] }}
	res, err := pr.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(res.Destroyed, ",") != "2023-03-18_05:00:01" || strings.Join(res.KeptHeld, ",") != "2023-03-04_05:00:01" ||
		strings.Join(res.KeptNotUploaded, ",") != "2023-03-11_05:00:01" {
		t.Errorf("prune %+v", res)
	}
	if ok, _ := pool.ZFS.Exists(ctx, ds+"@manual"); !ok {
		t.Error("an admin's own snapshot was pruned")
	}
	if err := pool.ZFS.Release(ctx, ds+"@2023-03-04_05:00:01", "vmhistory-mount"); err != nil {
		t.Fatal(err)
	}
}

// retentionUploader is the real uploader, but its Finish makes kopia's
// answer forget one snapshot, as kopia's retention does when a caught-up
// night is older than what it keeps (found by TestSoak).
type retentionUploader struct {
	Uploader
	expire  uint64 // guid retention expires at the next Finish
	expired map[uint64]bool
}

func (u *retentionUploader) Finish(ctx context.Context) error {
	err := u.Uploader.Finish(ctx)
	if u.expire != 0 {
		u.expired[u.expire] = true
	}
	return err
}

func (u *retentionUploader) Uploaded(ctx context.Context, dataset string) (map[uint64]bool, error) {
	have, err := u.Uploader.Uploaded(ctx, dataset)
	for guid := range u.expired {
		delete(have, guid)
	}
	return have, err
}

// TestPruneKeepsWhatRetentionJustExpired: a snapshot kopia's retention
// drops in the same night's upload step is no longer in kopia, so prune
// must keep it locally (before, prune went by the list read before
// retention and destroyed the last copy).
func TestPruneKeepsWhatRetentionJustExpired(t *testing.T) {
	ctx := context.Background()
	sb := newSandbox(t, "suspend", 1, "")
	up := &retentionUploader{Uploader: sb.withKopia(kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")}), expired: map[uint64]bool{}}
	p := sb.pipeline()
	p.Uploader = up
	if rep := sb.night(p, nights[0], Options{SkipReplicate: true}); rep.Err() != nil {
		t.Fatal(rep.Err())
	}
	first, err := sb.src.ZFS.Snapshots(ctx, sb.dataset)
	if err != nil || len(first) != 1 {
		t.Fatalf("after night 1: %v %v", first, err)
	}
	up.expire = first[0].GUID
	if rep := sb.night(p, nights[1], Options{SkipReplicate: true}); rep.Err() != nil {
		t.Fatal(rep.Err())
	}
	after, err := sb.src.ZFS.Snapshots(ctx, sb.dataset)
	if err != nil {
		t.Fatal(err)
	}
	kept := false
	for _, s := range after {
		kept = kept || s.GUID == first[0].GUID
	}
	if !kept {
		t.Errorf("%s was destroyed although kopia's retention had just expired it: no copy is left", first[0].FullName())
	}
}

// TestNightsUploadedFromTheStream: the nights after the first are
// uploaded from the ZFS stream from the night before (the replication's
// when it holds that, else the upload's own `zfs send -i`): a large image changed
// in place is read only where the stream says, the report and metrics say
// which way the files went, night 3 (kopia.verify_every 3) is read again
// in full and passes, and kopia's CLI restores night 3 equal to the ZFS
// snapshot.
func TestNightsUploadedFromTheStream(t *testing.T) {
	ctx := context.Background()
	sb := newSandbox(t, "suspend", 20, "")
	up := sb.withKopia(kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")})
	sb.cfg.Kopia.VerifyEvery = 3
	p := sb.pipeline()
	p.Uploader = up
	big := filepath.Join(sb.mountpoint, "images", "big.raw")
	data := bytes.Repeat([]byte("vmhistory big image 0123456789\n"), 8<<20/31)
	if err := os.WriteFile(big, data, 0o644); err != nil {
		t.Fatal(err)
	}
	textfile := filepath.Join(t.TempDir(), "vmhistory.prom")
	for i, at := range nights {
		if i > 0 {
			fh, err := os.OpenFile(big, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := fh.WriteAt([]byte(fmt.Sprintf("night %d was here", i)), int64(i)*3<<20+777); err != nil {
				t.Fatal(err)
			}
			fh.Close()
		}
		rep := sb.night(p, at, Options{AllowFull: i == 0, SkipReplicate: i == 1})
		if err := rep.Err(); err != nil {
			t.Fatalf("night %d: %v", i+1, err)
		}
		// Night 2 skips the replica: the upload runs its own zfs send -i.
		// Night 3 replicates both nights (-I), and the upload reads the
		// night 2 → 3 part of that stream.
		wantStream := "the replication's ZFS stream"
		if i == 1 {
			wantStream = "the ZFS stream"
		}
		var step StepResult
		for _, s := range rep.Steps {
			if s.Step == StepUpload && s.Dataset == sb.dataset {
				step = s
			}
		}
		t.Logf("night %d: read %d bytes: %s", i+1, step.Read, step.Detail)
		switch {
		case i == 0 && !strings.Contains(step.Detail, "no earlier snapshot of the dataset is in kopia"):
			t.Errorf("night 1: %q, want a full upload and why", step.Detail)
		case i > 0 && (!strings.Contains(step.Detail, "from "+wantStream+",") || step.FilesByWay["stream"] < 1):
			t.Errorf("night %d: %q %v, want big.raw from the ZFS stream", i+1, step.Detail, step.FilesByWay)
		case i > 0 && step.Read > 1<<20:
			t.Errorf("night %d read %d bytes from the snapshot: more than the changed chunks and the small images", i+1, step.Read)
		case i == 2 && !strings.Contains(step.Detail, "verified by a full re-read"):
			t.Errorf("night 3: %q, want it verified (kopia.verify_every 3)", step.Detail)
		case i == 1 && strings.Contains(step.Detail, "verified"):
			t.Errorf("night 2: %q, verified though kopia.verify_every is 3", step.Detail)
		}
		if i == 2 {
			if err := rep.WriteTextfile(textfile, time.Time{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	prom, err := os.ReadFile(textfile)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`vmhistory_backup_upload_files{dataset="` + sb.dataset + `",way="stream"}`, `vmhistory_backup_upload_read_bytes{dataset="` + sb.dataset + `"}`} {
		if !strings.Contains(string(prom), want) {
			t.Errorf("metrics lack %s:\n%s", want, prom)
		}
	}

	local, _ := sb.src.ZFS.Snapshots(ctx, sb.dataset)
	last := local[len(local)-1]
	kopiaSnaps, err := up.repo.SnapshotsTagged(ctx, map[string]string{kopiarepo.TagGUID: strconv.FormatUint(last.GUID, 10)})
	if err != nil || len(kopiaSnaps) != 1 {
		t.Fatalf("kopia snapshots of %s: %v %v", last.FullName(), kopiaSnaps, err)
	}
	view, err := sb.src.ZFS.OpenSnapshot(ctx, last.FullName())
	if err != nil {
		t.Fatal(err)
	}
	defer view.Close(ctx)
	dest := filepath.Join(t.TempDir(), "restored")
	cmd := exec.Command(testenv.KopiaCLI(t), "--config-file="+sb.cfg.Kopia.ConfigFile, "--no-progress", "--log-dir="+t.TempDir(),
		"snapshot", "restore", kopiaSnaps[0].RootObjectID, dest)
	cmd.Env = append(os.Environ(), "KOPIA_PASSWORD="+testKopiaPassword, "KOPIA_CHECK_FOR_UPDATES=false")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kopia snapshot restore: %v\n%s", err, out)
	}
	for _, name := range []string{"images/big.raw", "images/db.qcow2", "images/web.qcow2"} {
		want, err := os.ReadFile(filepath.Join(view.Root, name))
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(dest, name))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s restored by kopia's CLI differs from the ZFS snapshot's", name)
		}
	}
}

// busyViewUploader is the real uploader, but it leaves a file of the
// snapshot's view open after the upload, as a stray reader would: the
// view's clone is busy when the upload step removes it.
type busyViewUploader struct {
	Uploader
	hold bool
	open []*os.File
}

func (u *busyViewUploader) Upload(ctx context.Context, job UploadJob) (UploadStats, error) {
	stats, err := u.Uploader.Upload(ctx, job)
	if !u.hold {
		return stats, err
	}
	if ents, _ := os.ReadDir(filepath.Join(job.Dir, "images")); len(ents) > 0 {
		if f, oerr := os.Open(filepath.Join(job.Dir, "images", ents[0].Name())); oerr == nil {
			u.open = append(u.open, f)
		}
	}
	return stats, err
}

// TestUploadKeptWhenItsViewCannotBeRemoved: a snapshot uploaded whose
// read-only view cannot be removed afterwards is uploaded all the same:
// the step is ok, the report warns, and the next night's run does not
// upload it again.
func TestUploadKeptWhenItsViewCannotBeRemoved(t *testing.T) {
	ctx := context.Background()
	sb := newSandbox(t, "suspend", 1, "")
	up := &busyViewUploader{Uploader: sb.withKopia(kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")}), hold: true}
	// Before the sandbox's pool is destroyed (cleanups run last first).
	t.Cleanup(func() {
		for _, f := range up.open {
			f.Close()
		}
	})
	p := sb.pipeline()
	p.Uploader = up
	rep := sb.night(p, nights[0], Options{SkipReplicate: true, AllowFull: true})
	up.hold = false
	if len(up.open) == 0 {
		t.Fatal("the test opened no file of the view: nothing was busy")
	}
	if err := rep.Err(); err != nil {
		t.Fatalf("night 1 with a busy view: %v", err)
	}
	warned := false
	for _, w := range rep.Warnings {
		warned = warned || strings.Contains(w, "is uploaded, but its read-only view was not removed")
	}
	if !warned {
		t.Errorf("no warning about the view left behind: %q", rep.Warnings)
	}
	have, err := up.Uploaded(ctx, sb.dataset)
	if err != nil || len(have) != 1 {
		t.Fatalf("kopia holds %v (%v), want night 1", have, err)
	}
	rep = sb.night(p, nights[1], Options{SkipReplicate: true})
	if err := rep.Err(); err != nil {
		t.Fatalf("night 2: %v", err)
	}
	for _, s := range rep.Steps {
		if s.Step == StepUpload && strings.Count(s.Detail, "read,") != 1 {
			t.Errorf("night 2 uploaded %q, want tonight's snapshot only", s.Detail)
		}
	}
}
