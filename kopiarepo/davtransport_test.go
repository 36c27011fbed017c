package kopiarepo_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kopia/kopia/repo"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/testenv"
)

// davRecorder is a reverse proxy on 127.0.0.1 in front of a real WebDAV
// server that records every request, and can hold back reads of one path.
type davRecorder struct {
	srv *httptest.Server

	mu   sync.Mutex
	reqs []davRequest
	hold map[string]chan struct{} // path -> closed when its GETs may go on
	// refuseInfinity: PROPFIND with Depth: infinity is answered 403, as
	// RFC 4918 lets a server do.
	refuseInfinity bool
}

type davRequest struct {
	method, path, depth string
	status              int
	start, end          time.Time
}

func newDAVRecorder(t *testing.T, upstream string) *davRecorder {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	d := &davRecorder{hold: map[string]chan struct{}{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	d.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		d.mu.Lock()
		gate := d.hold[r.URL.Path]
		refuse := d.refuseInfinity && r.Method == "PROPFIND" && strings.EqualFold(r.Header.Get("Depth"), "infinity")
		d.mu.Unlock()
		if gate != nil && r.Method == http.MethodGet {
			<-gate
		}
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		if refuse {
			http.Error(sw, "infinite depth refused", http.StatusForbidden)
		} else {
			rp.ServeHTTP(sw, r)
		}
		d.mu.Lock()
		d.reqs = append(d.reqs, davRequest{method: r.Method, path: r.URL.Path, depth: r.Header.Get("Depth"), status: sw.status, start: start, end: time.Now()})
		d.mu.Unlock()
	}))
	t.Cleanup(d.srv.Close)
	return d
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (s *statusWriter) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (d *davRecorder) take() []davRequest {
	d.mu.Lock()
	defer d.mu.Unlock()
	r := d.reqs
	d.reqs = nil
	return r
}

func (d *davRecorder) holdGets(path string) (release func()) {
	gate := make(chan struct{})
	d.mu.Lock()
	d.hold[path] = gate
	d.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(gate)
			d.mu.Lock()
			delete(d.hold, path)
			d.mu.Unlock()
		})
	}
}

// newRecordedDAVRepo creates a repository on a real WebDAV server reached
// through a davRecorder, and returns the recorder and the config file.
func newRecordedDAVRepo(t *testing.T) (*davRecorder, string) {
	t.Helper()
	w := testenv.StartWebDAV(t)
	rec := newDAVRecorder(t, w.URL)
	r, configFile := newRepo(t, kopiarepo.WebDAV{URL: rec.srv.URL + "/kopia/", Username: w.Username, Password: w.Password})
	r.Close(context.Background())
	return rec, configFile
}

func countOf(reqs []davRequest, method, suffix string) (n int, first davRequest) {
	for _, r := range reqs {
		if r.method == method && strings.HasSuffix(r.path, suffix) {
			if n == 0 {
				first = r
			}
			n++
		}
	}
	return n, first
}

// An open through the transport sends no request that the server answers
// "401" (the credentials go with the first one), fetches the format blob
// and the blob configuration alongside the sharding parameters instead of
// one after the other, and reads each of them once.
func TestWebDAVOpenSendsCredentialsFirstAndFormatBlobsAlongside(t *testing.T) {
	ctx := context.Background()
	rec, configFile := newRecordedDAVRepo(t)
	cacheDir := kopiaCacheDirOf(t, configFile)
	emptyDir(t, cacheDir)
	rec.take()

	r, err := kopiarepo.Open(ctx, configFile, testPassword)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	if _, err := r.Snapshots(ctx, "", "", ""); err != nil {
		t.Fatal(err)
	}
	reqs := rec.take()
	for _, q := range reqs {
		if q.status == http.StatusUnauthorized {
			t.Errorf("%s %s answered 401: the credentials did not go with the first request", q.method, q.path)
		}
	}
	nFormat, format := countOf(reqs, http.MethodGet, "/kopia.repository.f")
	nCfg, cfg := countOf(reqs, http.MethodGet, "/kopia.blobcfg.f")
	if nFormat != 1 || nCfg != 1 {
		t.Fatalf("format blob read %d times, blob configuration %d times; want 1 and 1 (%v)", nFormat, nCfg, reqs)
	}
	nShards, shards := countOf(reqs, http.MethodGet, "/.shards")
	if nShards != 1 {
		t.Fatalf(".shards read %d times, want 1", nShards)
	}
	if !format.start.Before(shards.end) || !cfg.start.Before(shards.end) {
		t.Errorf("the format blob was asked for at %v and the blob configuration at %v, after .shards came (%v): not alongside",
			format.start, cfg.start, shards.end)
	}
}

// A read-only session opens and reads data with the server's .shards held
// back (it answers from the copy saved by the open before), checks the
// copy alongside, and reports a saved copy that differs as a change that
// needs a new run, after which the next open is right again.
func TestWebDAVCachedOpenTakesSavedShards(t *testing.T) {
	ctx := context.Background()
	rec, configFile := newRecordedDAVRepo(t)
	first := upload(t, configFile, 1) // an open that saves .shards
	cacheDir := kopiaCacheDirOf(t, configFile)
	saved := filepath.Join(cacheDir, "vmhistory-dav-shards.json")
	if _, err := os.Stat(saved); err != nil {
		t.Fatalf("no saved .shards after an open: %v", err)
	}

	release := rec.holdGets("/kopia/.shards")
	defer release()
	opened := make(chan error, 1)
	go func() {
		r, err := kopiarepo.Open(ctx, configFile, testPassword, kopiarepo.WithCachedIndexList())
		if err == nil {
			defer r.Close(ctx)
			ids := map[string]bool{}
			snaps, err2 := r.Snapshots(ctx, "", "", "")
			for _, s := range snaps {
				ids[s.ID] = true
			}
			if err = err2; err == nil && !ids[first] {
				err = errors.New("the snapshot uploaded before is not listed")
			}
			if err == nil {
				err = readABlob(ctx, r)
			}
			release()
			if err == nil {
				var changed bool
				changed, err = r.CheckOpen(ctx)
				if changed && err == nil {
					err = errors.New("CheckOpen says changed, with the same .shards")
				}
			}
		}
		opened <- err
	}()
	select {
	case err := <-opened:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("a cached open waited for the server's .shards")
	}

	// A saved copy that is not the server's.
	var s map[string]any
	data, err := os.ReadFile(saved)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &s); err != nil {
		t.Fatal(err)
	}
	s["body"] = []byte(`{"default":[2,2],"maxNonShardedLength":20}`)
	data, _ = json.Marshal(s)
	if err := os.WriteFile(saved, data, 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := kopiarepo.Open(ctx, configFile, testPassword, kopiarepo.WithCachedIndexList())
	if err != nil {
		t.Fatal(err)
	}
	if err := readABlob(ctx, r); err != nil {
		t.Fatal(err)
	}
	changed, err := r.CheckOpen(ctx)
	r.Close(ctx)
	if !changed || err == nil || !strings.Contains(err.Error(), ".shards") {
		t.Fatalf("CheckOpen with a wrong saved .shards: %v, %v; want changed and an error naming .shards", changed, err)
	}
	r, err = kopiarepo.Open(ctx, configFile, testPassword, kopiarepo.WithCachedIndexList())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(ctx)
	if ids := snapshotIDs(t, r); !ids[first] {
		t.Errorf("after the saved .shards was put right: snapshots %v, want %s", ids, first)
	}
	if changed, err := r.CheckOpen(ctx); changed || err != nil {
		t.Errorf("CheckOpen after the saved .shards was put right: %v, %v", changed, err)
	}
}

// readABlob asks the storage for the metadata of the format blob, whose
// path (like every blob's) kopia's sharded storage computes from .shards.
func readABlob(ctx context.Context, r *kopiarepo.Repo) error {
	dr, ok := r.Kopia().(repo.DirectRepository)
	if !ok {
		return errors.New("not a direct repository")
	}
	_, err := dr.BlobReader().GetMetadata(ctx, "kopia.repository")
	return err
}

// kopiaCacheDirOf is the cache directory a test connection's config names.
func kopiaCacheDirOf(t *testing.T, configFile string) string {
	t.Helper()
	data, err := os.ReadFile(configFile)
	if err != nil {
		t.Fatal(err)
	}
	var lc struct {
		Caching struct {
			CacheDirectory string `json:"cacheDirectory"`
		} `json:"caching"`
	}
	if err := json.Unmarshal(data, &lc); err != nil {
		t.Fatal(err)
	}
	dir := lc.Caching.CacheDirectory
	if !filepath.IsAbs(dir) {
		dir = filepath.Join(filepath.Dir(configFile), dir)
	}
	return dir
}

func emptyDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
}
