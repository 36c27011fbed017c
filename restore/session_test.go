package restore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

// sessionWorld is a dataset with two nights: the first uploaded to a kopia
// filesystem repository and pruned here (kopia alone holds it), the
// second here and in kopia; and the YAML configuration naming both.
type sessionWorld struct {
	pool    *testenv.Pool
	dataset string
	mnt     string
	snaps   []zfs.Snapshot
	disk    [][]byte // images/disk.img of each night
	yaml    string   // the configuration
	pwFile  string   // the kopia repository's password file
	dir     string
}

func newSessionWorld(t *testing.T) *sessionWorld {
	t.Helper()
	t.Setenv(kopiarepo.PasswordEnv, "")
	os.Unsetenv(kopiarepo.PasswordEnv)
	ctx := context.Background()
	w := &sessionWorld{pool: testenv.NewPool(t, 128), dir: t.TempDir()}
	w.dataset, w.mnt = w.pool.Dataset(t, "libvirt")
	if err := os.MkdirAll(filepath.Join(w.mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}

	kopiaCfg := filepath.Join(w.dir, "kopia.config")
	pwFile := filepath.Join(w.dir, "kopia.password")
	w.pwFile = pwFile
	if err := os.WriteFile(pwFile, []byte(tlPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := kopiarepo.Create(ctx, kopiarepo.Filesystem{Path: filepath.Join(w.dir, "repo")}, kopiaCfg, tlPassword, kopiarepo.CreateOptions{
		ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(w.dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	repo, err := kopiarepo.Open(ctx, kopiaCfg, tlPassword)
	if err != nil {
		t.Fatal(err)
	}
	defer repo.Close(ctx)

	rng := rand.New(rand.NewPCG(13, 4))
	disk := make([]byte, 3<<20+999)
	for night := range 2 {
		for i := range disk {
			disk[i] = byte(rng.Uint32())
		}
		w.disk = append(w.disk, bytes.Clone(disk))
		name := filepath.Join(w.mnt, "images", "disk.img")
		if err := os.WriteFile(name, disk, 0o640); err != nil {
			t.Fatal(err)
		}
		mtime := time.Date(2023, 3, 4+night, 4, 0, 0, 0, time.Local)
		if err := os.Chtimes(name, mtime, mtime); err != nil {
			t.Fatal(err)
		}
		s, err := w.pool.ZFS.CreateSnapshot(ctx, w.dataset, "2023-03-0"+strconv.Itoa(4+night)+"_05:00:01", nil)
		if err != nil {
			t.Fatal(err)
		}
		w.snaps = append(w.snaps, s)
		view, err := w.pool.ZFS.OpenSnapshot(ctx, s.FullName())
		if err != nil {
			t.Fatal(err)
		}
		res, err := repo.Upload(ctx, kopiarepo.UploadRequest{
			Dir: view.Root, SourcePath: w.mnt, Host: "kvmhost", User: "root", StartTime: s.Creation,
			Tags: map[string]string{
				kopiarepo.TagDataset:  s.Dataset,
				kopiarepo.TagSnapshot: s.Name,
				kopiarepo.TagGUID:     strconv.FormatUint(s.GUID, 10),
			},
			Splitter: "FIXED-128K", SkipMaintenance: true,
		})
		if cerr := closeView(ctx, view); cerr != nil {
			t.Fatal(cerr)
		}
		if err != nil || res.Snapshot.ID == "" {
			t.Fatalf("upload %s: %v (%+v)", s.FullName(), err, res)
		}
	}
	if err := w.pool.ZFS.Destroy(ctx, w.snaps[0].FullName()); err != nil {
		t.Fatal(err)
	}
	w.yaml = fmt.Sprintf("datasets: [%s]\nstate_dir: %s/state\nkopia:\n  config_file: %s\n  password_file: %s\n  host: kvmhost\n  user: root\n",
		w.dataset, w.dir, kopiaCfg, pwFile)
	return w
}

func (w *sessionWorld) config(t *testing.T, yaml string) *config.Config {
	t.Helper()
	cfg, err := config.Parse([]byte(yaml), filepath.Join(w.dir, "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func sourceTime(t *testing.T, times restore.OpenTimes, name string) restore.SourceTime {
	t.Helper()
	for _, st := range times.Sources {
		if st.Source == name {
			return st
		}
	}
	t.Fatalf("no time for source %s in %+v", name, times)
	return restore.SourceTime{}
}

// A session over a local pool and a kopia filesystem repository: the
// timeline joins both, a spec resolves, files open from the fastest source
// holding them (kopia for the pruned night) and read back what was
// written, the times add up, and closing twice is fine and leaves no clone
// or hold behind.
func TestSessionLocalAndKopia(t *testing.T) {
	ctx := context.Background()
	w := newSessionWorld(t)
	start := time.Now()
	s, err := restore.Open(ctx, w.config(t, w.yaml), restore.SessionOptions{Start: start, PrefetchWindow: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if len(s.Unavailable()) > 0 || len(s.Unlisted()) > 0 || s.NoneAnswered() {
		t.Fatalf("problems: unavailable %v, unlisted %v", s.Unavailable(), s.Unlisted())
	}
	if names := len(s.Sources()); names != 2 {
		t.Fatalf("%d sources, want local and kopia", names)
	}
	for _, src := range s.Sources() {
		if k, ok := src.(*restore.KopiaSource); ok && k.Prefetch.Window != 4 {
			t.Errorf("kopia prefetch window %d, want 4", k.Prefetch.Window)
		}
	}
	tl := s.Timeline()
	if len(tl.Entries) != 2 || sourceNames(tl.Entries[0]) != "kopia" || sourceNames(tl.Entries[1]) != "local,kopia" {
		t.Fatalf("timeline: %d entries (%v)", len(tl.Entries), tl.Entries)
	}
	opened := s.Times()
	if opened.Total <= 0 || opened.Timeline <= 0 || opened.File != 0 {
		t.Errorf("times after Open: %+v", opened)
	}

	for i, spec := range []string{"latest~1:images/disk.img", "latest:images/../images/disk.img"} {
		entry, rel, err := s.ResolveFile(spec, "")
		if err != nil {
			t.Fatalf("resolve %s: %v", spec, err)
		}
		if entry.Name != w.snaps[i].Name || rel != "images/disk.img" {
			t.Errorf("%s resolved to %s:%s", spec, entry.FullName(), rel)
		}
		st, err := s.Stat(ctx, entry, rel)
		if err != nil || st.Size != int64(len(w.disk[i])) || st.Mode.Perm() != 0o640 {
			t.Errorf("stat %s: %+v, %v", spec, st, err)
		}
		f, err := s.OpenFile(ctx, entry, rel)
		if err != nil {
			t.Fatalf("open %s: %v", spec, err)
		}
		if want := []string{"kopia", "local"}[i]; f.Serving() != want {
			t.Errorf("%s served by %s, want %s", spec, f.Serving(), want)
		}
		if got := readAll(t, f); !bytes.Equal(got, w.disk[i]) {
			t.Errorf("%s: read %d bytes differing from the %d written", spec, len(got), len(w.disk[i]))
		}
		f.Close()

		// The second source of the newest night is kopia; the oldest has none.
		other, err := s.OpenFileExcept(ctx, entry, rel, f.Serving())
		switch {
		case err != nil:
			t.Errorf("open %s elsewhere: %v", spec, err)
		case i == 0 && other != nil:
			t.Errorf("%s: a second source of a kopia-only snapshot: %s", spec, other.Serving())
		case i == 1 && (other == nil || other.Serving() != "kopia"):
			t.Errorf("%s: second source %v, want kopia", spec, other)
		}
		if other != nil {
			if got := readAll(t, other); !bytes.Equal(got, w.disk[i]) {
				t.Errorf("%s from kopia differs", spec)
			}
			other.Close()
		}
	}
	list, err := func() ([]restore.FileInfo, error) {
		e, rel, err := s.Resolve("latest", "")
		if err != nil || rel != "." {
			return nil, fmt.Errorf("resolve latest: %q, %v", rel, err)
		}
		return s.ReadDir(ctx, e, "images")
	}()
	if err != nil || len(list) != 1 || list[0].Name != "disk.img" {
		t.Errorf("ReadDir(latest:images) = %v, %v", list, err)
	}

	// The times: every source opened and listed, the file steps counted,
	// and the total from Start at least the slowest source, the timeline
	// and the file steps, and no more than the time that has passed.
	times := s.Times()
	elapsed := time.Since(start)
	k, l := sourceTime(t, times, "kopia"), sourceTime(t, times, "local")
	if k.Open <= 0 || k.List <= 0 || l.List <= 0 || k.Failed != "" || l.Failed != "" {
		t.Errorf("source times: kopia %+v, local %+v", k, l)
	}
	if times.File <= 0 || times.Timeline != opened.Timeline || times.Total <= opened.Total {
		t.Errorf("times after the opens: %+v (after Open: %+v)", times, opened)
	}
	if low := max(k.Open, l.Open) + times.Timeline + times.File; times.Total < low || times.Total > elapsed {
		t.Errorf("total %v, want between %v (slowest open + timeline + file) and %v (elapsed)", times.Total, low, elapsed)
	}
	if max(k.List, l.List) > times.Timeline {
		t.Errorf("a source listed longer (%v, %v) than the timeline took (%v)", k.List, l.List, times.Timeline)
	}
	t.Logf("times: %+v", times)

	if err := s.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	assertNoClonesOrHolds(t, w.pool, w.dataset)
}

// The session's specs fail as the timeline's do, and a file spec naming a
// snapshot's root says so.
func TestSessionResolveErrors(t *testing.T) {
	ctx := context.Background()
	w := newSessionWorld(t)
	s, err := restore.Open(ctx, w.config(t, w.yaml), restore.SessionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, c := range []struct{ spec, want string }{
		{"latest", "latest names the root of " + w.snaps[1].FullName() + "; name a file in it, like " + w.snaps[1].Name + ":images/disk.qcow2"},
		{"latest:", "names the root of"},
		{"1999-01-01:images/disk.img", "no snapshot matches"},
		{"latest:../../etc/passwd", "leaves the snapshot"},
	} {
		if _, _, err := s.ResolveFile(c.spec, ""); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ResolveFile(%q) = %v, want %q", c.spec, err, c.want)
		}
	}
	e, rel, err := s.ResolveFile("latest:images/missing", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Stat(ctx, e, rel); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Stat(missing) = %v, want ErrNotExist", err)
	}
	if _, err := s.OpenFile(ctx, e, rel); err == nil {
		t.Error("OpenFile(missing) succeeded")
	}
	if s.Times().File <= 0 {
		t.Errorf("times: %+v", s.Times())
	}
}

// A kopia repository that cannot be opened is named, timed and left out;
// the local snapshots still make the timeline. The mount's refresher gives
// the session's timeline first, then builds anew.
func TestSessionWithoutKopiaAndRefresher(t *testing.T) {
	ctx := context.Background()
	w := newSessionWorld(t)
	cfg := w.config(t, w.yaml)
	// Gone since the configuration was checked.
	if err := os.Rename(w.pwFile, w.pwFile+".gone"); err != nil {
		t.Fatal(err)
	}
	s, err := restore.Open(ctx, cfg, restore.SessionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if u := s.Unavailable(); len(u) != 1 || !strings.HasPrefix(u[0].Error(), "kopia: ") || !errors.Is(u[0], fs.ErrNotExist) {
		t.Errorf("unavailable: %v, want kopia's missing password file", u)
	}
	if k := sourceTime(t, s.Times(), "kopia"); !strings.Contains(k.Failed, w.pwFile+" does not exist") {
		t.Errorf("kopia's time: %+v, want it failed", k)
	}
	if s.NoneAnswered() || len(s.Sources()) != 1 || len(s.Timeline().Entries) != 1 {
		t.Fatalf("timeline of %d sources: %v", len(s.Sources()), s.Timeline().Entries)
	}

	build := s.Refresher()
	first, errs := build(ctx)
	if first != s.Timeline() || errs != nil {
		t.Errorf("first build: %p %v, want the session's timeline %p", first, errs, s.Timeline())
	}
	if _, err := w.pool.ZFS.CreateSnapshot(ctx, w.dataset, "2023-03-06_05:00:01", nil); err != nil {
		t.Fatal(err)
	}
	again, errs := build(ctx)
	if again == first || len(errs) > 0 || len(again.Entries) != 2 || s.Timeline() != again {
		t.Errorf("rebuild: %d entries, %v", len(again.Entries), errs)
	}
	if e, _, err := s.Resolve("latest", ""); err != nil || e.Name != "2023-03-06_05:00:01" {
		t.Errorf("latest after the rebuild: %v, %v", e, err)
	}
}

// A session whose every source fails to list says that none answered.
func TestSessionNoneAnswered(t *testing.T) {
	pool := testenv.NewPool(t, 128)
	dir := t.TempDir()
	cfg, err := config.Parse([]byte(fmt.Sprintf("datasets: [%s/nope]\nstate_dir: %s/state\n", pool.Name, dir)), filepath.Join(dir, "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := restore.Open(context.Background(), cfg, restore.SessionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !s.NoneAnswered() || len(s.Unlisted()) != 1 {
		t.Errorf("NoneAnswered %v, unlisted %v", s.NoneAnswered(), s.Unlisted())
	}
	if l := sourceTime(t, s.Times(), "local"); l.Failed == "" {
		t.Errorf("local's time %+v, want it failed", l)
	}
}

// TestSessionCopyStreamsKopia restores the kopia-only night and the local
// one: the kopia file is read in order by one reader with its prefetch
// window in flight, the local one by parallel readers; both identical.
func TestSessionCopyStreamsKopia(t *testing.T) {
	ctx := context.Background()
	w := newSessionWorld(t)
	s, err := restore.Open(ctx, w.config(t, w.yaml), restore.SessionOptions{Start: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// The kopia repository's open was recorded, request by request.
	reqs := s.Times().KopiaRequests
	if reqs == nil || len(reqs.Requests()) == 0 || len(reqs.Sequential()) == 0 {
		t.Fatalf("no storage requests recorded for the kopia open: %+v", reqs)
	}
	var recorded int
	for i, spec := range []string{"latest~1:images/disk.img", "latest:images/disk.img"} {
		entry, rel, err := s.ResolveFile(spec, "")
		if err != nil {
			t.Fatal(err)
		}
		f, err := s.OpenFile(ctx, entry, rel)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			// The first file open ends the recording: the copy's
			// fetches are not part of the open.
			recorded = len(reqs.Requests())
			t.Logf("kopia open: %s", reqs.Summary())
		}
		dest := filepath.Join(t.TempDir(), "disk.img")
		res, err := restore.Copy(ctx, f, dest, restore.CopyOptions{RangeSize: 1 << 20,
			Identity: restore.SourceIdentity{Snapshot: entry.FullName(), Path: rel}})
		f.Close()
		if err != nil {
			t.Fatalf("%s: %v", spec, err)
		}
		got, err := os.ReadFile(dest)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, w.disk[i]) {
			t.Errorf("%s: restored %d bytes differing from the %d written", spec, len(got), len(w.disk[i]))
		}
		if want := i == 0; res.Sequential != want {
			t.Errorf("%s (from %s): sequential read %v, want %v", spec, f.Serving(), res.Sequential, want)
		}
		if n := len(reqs.Requests()); n != recorded {
			t.Errorf("after the first file opened, %d more requests were recorded", n-recorded)
		}
	}
}
