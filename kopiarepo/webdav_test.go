package kopiarepo_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/testenv"
)

func webdavSpec(w *testenv.WebDAV) kopiarepo.WebDAV {
	return kopiarepo.WebDAV{URL: w.URL + "kopia/", Username: w.Username, Password: w.Password}
}

func TestWebDAVRepositoryThreeNights(t *testing.T) {
	w := testenv.StartWebDAV(t)
	r, _ := newRepo(t, webdavSpec(w))
	threeNights(t, r)

	st, err := r.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.StorageType != "webdav" || st.StorageConfig["url"] != w.URL+"kopia/" || st.StorageConfig["username"] != w.Username {
		t.Errorf("status storage %q %v", st.StorageType, st.StorageConfig)
	}
	if _, ok := st.StorageConfig["password"]; ok {
		t.Errorf("status shows the WebDAV password: %v", st.StorageConfig)
	}
}

// The unreachable timeout of the test's connections, and how long an
// operation on a repository whose server is gone may take to fail: the
// timeout, plus one probe (kopia retries a request for ~11 s), plus the
// time kopia takes to notice the cancelled context (one backoff sleep).
const (
	unreachableTimeout = 5 * time.Second
	unreachableBound   = 45 * time.Second
)

// TestWebDAVUnreachable stops the WebDAV server under an open repository
// and under a fresh Open: both fail within a bound with an error naming
// the repository and the cause, and work again once the server is back.
func TestWebDAVUnreachable(t *testing.T) {
	ctx := context.Background()
	w := testenv.StartWebDAV(t)
	_, configFile := newRepo(t, webdavSpec(w))
	r, err := kopiarepo.Open(ctx, configFile, testPassword, kopiarepo.WithUnreachableTimeout(unreachableTimeout))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	dir := t.TempDir()
	writeTree(t, dir)
	uploadNight(t, r, dir, 0, nil)
	rewriteRange(t, filepath.Join(dir, "images/db.qcow2"), 0, 64<<10, 5)

	w.Stop()
	checkFails := func(what string, err error, took time.Duration) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s with the WebDAV server stopped succeeded", what)
		}
		t.Logf("%s with the server stopped failed after %v: %v", what, took.Round(time.Millisecond), err)
		if took > unreachableBound {
			t.Errorf("%s took %v to fail, more than %v", what, took, unreachableBound)
		}
		msg := err.Error()
		if !strings.Contains(msg, w.URL) || !strings.Contains(msg, "connection refused") || !errors.Is(err, kopiarepo.ErrUnreachable) {
			t.Errorf("%s error does not name the repository (%s) and the cause (connection refused), or is not ErrUnreachable: %v", what, w.URL, err)
		}
	}

	start := time.Now()
	res, err := r.Upload(ctx, kopiarepo.UploadRequest{Dir: dir, SourcePath: testSource, StartTime: night(1), Tags: nightTags(1)})
	checkFails("Upload", err, time.Since(start))
	if res.Snapshot.ID != "" {
		t.Errorf("failed upload reports snapshot %s as saved", res.Snapshot.ID)
	}

	start = time.Now()
	r2, err := kopiarepo.Open(ctx, configFile, testPassword, kopiarepo.WithUnreachableTimeout(unreachableTimeout))
	if err == nil {
		// The connection caches the format blob for 15 minutes, so Open
		// may succeed without the server; the first listing then fails.
		_, err = r2.Snapshots(ctx, "", "", "")
		r2.Close(ctx)
	}
	checkFails("Open and list", err, time.Since(start))

	// Back: the same open connection works again, and so does a new one.
	w.Start()
	res = uploadNight(t, r, dir, 1, nil)
	checkSnapshotFiles(t, r, res.Snapshot.ID, dir)
	r3, err := kopiarepo.Open(ctx, configFile, testPassword)
	if err != nil {
		t.Fatalf("Open after the server came back: %v", err)
	}
	defer r3.Close(ctx)
	snaps, err := r3.Snapshots(ctx, testHost, testUser, testSource)
	if err != nil || len(snaps) != 2 {
		t.Fatalf("after the server came back: %d snapshots, %v; want 2 (the failed upload saved nothing)", len(snaps), err)
	}
	if snaps[1].Tags[kopiarepo.TagGUID] != nightTags(1)[kopiarepo.TagGUID] {
		t.Errorf("second snapshot tags %v", snaps[1].Tags)
	}
}
