package drivemodel_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob/webdav"
	"github.com/kopia/kopia/repo/content"

	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/testenv"
)

// proxied is a real WebDAV server (rclone serve webdav) behind the drive
// model's HTTP proxy.
type proxied struct {
	dav   *testenv.WebDAV
	model *drivemodel.Model
	srv   *drivemodel.ProxyServer
}

// startProxied starts rclone and a proxy in front of it, on upstream's
// path prefix ("" for its root).
func startProxied(t *testing.T, p drivemodel.Params, prefix string, opts ...drivemodel.ProxyOption) *proxied {
	t.Helper()
	w := testenv.StartWebDAV(t)
	if prefix != "" {
		if err := os.MkdirAll(filepath.Join(w.Dir, prefix), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	up, err := url.Parse(w.URL + prefix)
	if err != nil {
		t.Fatal(err)
	}
	m := drivemodel.NewModel(p)
	srv, err := drivemodel.StartProxy("127.0.0.1:0", up, m, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Close(ctx); err != nil {
			t.Errorf("close the proxy: %v", err)
		}
	})
	if !strings.HasPrefix(srv.URL, "http://127.0.0.1:") || srv.URL != "http://"+srv.Addr+"/" {
		t.Fatalf("proxy URL %q, address %q", srv.URL, srv.Addr)
	}
	return &proxied{dav: w, model: m, srv: srv}
}

// do sends one request through the proxy with the server's credentials.
func (p *proxied) do(t *testing.T, method, path string, body []byte, header ...string) (*http.Response, []byte) {
	t.Helper()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, p.srv.URL+path, r)
	if err != nil {
		t.Fatal(err)
	}
	req.SetBasicAuth(p.dav.Username, p.dav.Password)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read the body: %v", method, path, err)
	}
	return resp, got
}

func randomBytes(n int, seed byte) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{seed}).Read(b)
	return b
}

// TestProxyPacesRequestsAndBodies: latency per request, the per-stream
// bandwidth on response bodies (whole and ranged) and on PUT bodies, the
// total bandwidth shared by concurrent streams, and the counters. Times
// are checked as lower bounds only: a loaded machine is slower, never
// faster, than the model.
func TestProxyPacesRequestsAndBodies(t *testing.T) {
	const (
		latency = 40 * time.Millisecond
		rate    = 8 << 20 // per stream
	)
	p := startProxied(t, drivemodel.Params{Latency: latency, StreamBytesPerSecond: rate}, "")
	data := randomBytes(2<<20, 1)

	// A PUT's body is paced on its way up: 2 MiB at 8 MiB/s ≥ 250 ms.
	start := time.Now()
	resp, _ := p.do(t, http.MethodPut, "blob.bin", data)
	took := time.Since(start)
	if resp.StatusCode/100 != 2 {
		t.Fatalf("PUT through the proxy: %s", resp.Status)
	}
	if min := latency + 250*time.Millisecond; took < min {
		t.Errorf("PUT of 2 MiB at %v + 8 MiB/s took %v, less than %v", latency, took, min)
	}
	if onDisk, err := os.ReadFile(filepath.Join(p.dav.Dir, "blob.bin")); err != nil || !bytes.Equal(onDisk, data) {
		t.Fatalf("the PUT did not store the bytes sent (%v)", err)
	}

	// N sequential requests take at least N round trips.
	p.model.Reset()
	const n = 8
	start = time.Now()
	for range n {
		if resp, _ := p.do(t, "PROPFIND", "", nil, "Depth", "1"); resp.StatusCode != http.StatusMultiStatus {
			t.Fatalf("PROPFIND through the proxy: %s", resp.Status)
		}
	}
	if took, min := time.Since(start), n*latency; took < min {
		t.Errorf("%d sequential requests at %v took %v, less than %v", n, latency, took, min)
	}
	if s := p.model.Stats(); s.Requests != n || s.Gets != 0 || s.Puts != 0 {
		t.Errorf("counters after %d PROPFINDs: %+v", n, s)
	}

	// A whole GET: latency + 2 MiB / 8 MiB/s.
	p.model.Reset()
	start = time.Now()
	resp, got := p.do(t, http.MethodGet, "blob.bin", nil)
	took = time.Since(start)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(got, data) {
		t.Fatalf("GET through the proxy: %s, %d bytes, same: %v", resp.Status, len(got), bytes.Equal(got, data))
	}
	if min := latency + 250*time.Millisecond; took < min {
		t.Errorf("GET of 2 MiB at %v + 8 MiB/s took %v, less than %v", latency, took, min)
	}

	// A ranged GET, as kopia reads part of a pack: its own length only,
	// paced the same way.
	off, length := 300_000, 1<<20
	start = time.Now()
	resp, got = p.do(t, http.MethodGet, "blob.bin", nil, "Range", fmt.Sprintf("bytes=%d-%d", off, off+length-1))
	took = time.Since(start)
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(got, data[off:off+length]) {
		t.Fatalf("ranged GET through the proxy: %s, %d bytes", resp.Status, len(got))
	}
	if min := latency + 125*time.Millisecond; took < min {
		t.Errorf("ranged GET of 1 MiB at %v + 8 MiB/s took %v, less than %v", latency, took, min)
	}
	if s := p.model.Stats(); s.Requests != 2 || s.Gets != 2 || s.BytesFetched != int64(len(data)+length) || s.InjectedErrors != 0 {
		t.Errorf("counters after two GETs: %+v", s)
	}

	// Four concurrent streams share the total bandwidth: alone each would
	// take 2 MiB / 64 MiB/s, together 8 MiB / 16 MiB/s ≥ 500 ms.
	p.model.SetParams(drivemodel.Params{StreamBytesPerSecond: 64 << 20, TotalBytesPerSecond: 16 << 20})
	p.model.Reset()
	var wg sync.WaitGroup
	start = time.Now()
	for range 4 {
		wg.Go(func() {
			req, _ := http.NewRequest(http.MethodGet, p.srv.URL+"blob.bin", nil)
			req.SetBasicAuth(p.dav.Username, p.dav.Password)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			if got, err := io.ReadAll(resp.Body); err != nil || !bytes.Equal(got, data) {
				t.Errorf("concurrent GET: %v, %d bytes", err, len(got))
			}
		})
	}
	wg.Wait()
	if took, min := time.Since(start), 500*time.Millisecond; took < min {
		t.Errorf("4 × 2 MiB over a shared 16 MiB/s took %v, less than %v", took, min)
	}
	if s := p.model.Stats(); s.Gets != 4 || s.BytesFetched != 4*int64(len(data)) || s.MaxConcurrentGets < 2 {
		t.Errorf("counters after 4 concurrent GETs: %+v", s)
	}
}

// syncBuffer is a bytes.Buffer safe for the proxy's handlers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestProxyInjectsErrors: fallible requests get the injected 429/503,
// listings never do; the request log shows each answer.
func TestProxyInjectsErrors(t *testing.T) {
	var log syncBuffer
	p := startProxied(t, drivemodel.Params{}, "", drivemodel.WithRequestLog(&log))
	if resp, _ := p.do(t, http.MethodPut, "x", []byte("hello")); resp.StatusCode/100 != 2 {
		t.Fatalf("PUT: %s", resp.Status)
	}
	p.model.SetParams(drivemodel.Params{ErrorRate: 1, Seed: 1})
	p.model.Reset()
	for _, method := range []string{http.MethodGet, http.MethodPut, http.MethodDelete} {
		var body []byte
		if method == http.MethodPut {
			body = []byte("other")
		}
		resp, msg := p.do(t, method, "x", body)
		if resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("%s at error rate 1: %s, want 429 or 503", method, resp.Status)
		}
		if !strings.Contains(string(msg), "drive model: injected HTTP") {
			t.Errorf("%s: injected answer %q", method, msg)
		}
	}
	if resp, _ := p.do(t, "PROPFIND", "x", nil, "Depth", "0"); resp.StatusCode/100 != 4 && resp.StatusCode/100 != 5 {
		t.Errorf("PROPFIND Depth 0 (kopia's GetMetadata) at error rate 1: %s", resp.Status)
	}
	if resp, _ := p.do(t, "PROPFIND", "", nil, "Depth", "1"); resp.StatusCode != http.StatusMultiStatus {
		t.Errorf("PROPFIND Depth 1 (a listing) at error rate 1: %s, want 207: kopia does not retry listings", resp.Status)
	}
	if s := p.model.Stats(); s.InjectedErrors != 4 || s.Requests != 5 {
		t.Errorf("counters: %+v, want 4 injected of 5", s)
	}
	if onDisk, _ := os.ReadFile(filepath.Join(p.dav.Dir, "x")); string(onDisk) != "hello" {
		t.Errorf("a failed PUT or DELETE reached the server: the file holds %q", onDisk)
	}
	p.model.SetParams(drivemodel.Params{})
	p.do(t, http.MethodGet, "x", nil, "Range", "bytes=1-3")
	// The proxy logs a request once its handler returns, which may be just
	// after the client has read the whole answer.
	var lines []string
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		lines = strings.Split(strings.TrimSpace(log.String()), "\n")
		if len(lines) >= 7 || time.Now().After(deadline) {
			break
		}
	}
	if len(lines) != 7 || !strings.Contains(lines[0], " PUT /x - 201 ") || !strings.Contains(lines[1], " GET /x - ") ||
		strings.Contains(lines[1], " 200 ") || !strings.Contains(lines[5], " PROPFIND / - 207 ") || !strings.Contains(lines[6], " GET /x bytes=1-3 206 3 ") {
		t.Errorf("request log:\n%s", log.String())
	}
}

// TestProxyKopiaRepository: a kopia WebDAV repository reached through the
// proxy (on a path prefix of the server, so that kopia's MOVE after each
// PUT needs its Destination rewritten) is created, written and read back
// on a fresh connection with a cold cache, with injected errors that
// kopia retries; the model's latency bounds the cold open from below.
func TestProxyKopiaRepository(t *testing.T) {
	ctx := context.Background()
	const latency = 20 * time.Millisecond
	p := startProxied(t, drivemodel.Params{Latency: latency, StreamBytesPerSecond: 32 << 20, ErrorRate: 0.05, Seed: 11}, "prefix/")
	// kopia's WebDAV storage writes into the folder; it does not make it.
	if err := os.Mkdir(filepath.Join(p.dav.Dir, "prefix", "kopia"), 0o700); err != nil {
		t.Fatal(err)
	}
	opts := &webdav.Options{URL: p.srv.URL + "kopia/", Username: p.dav.Username, Password: p.dav.Password}
	st, err := webdav.New(ctx, opts, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := repo.Initialize(ctx, st, &repo.NewRepositoryOptions{}, testPassword); err != nil {
		t.Fatalf("create a kopia repository through the proxy: %v", err)
	}
	dir := t.TempDir()
	connect := func(name string) string {
		t.Helper()
		cfg := filepath.Join(dir, name+".config")
		if err := repo.Connect(ctx, cfg, st, testPassword, &repo.ConnectOptions{CachingOptions: content.CachingOptions{
			CacheDirectory: filepath.Join(dir, name+"-cache"), ContentCacheSizeBytes: 100 << 20, MetadataCacheSizeBytes: 100 << 20,
		}}); err != nil {
			t.Fatalf("connect through the proxy: %v", err)
		}
		return cfg
	}
	writer := connect("writer")

	data := randomBytes(6<<20, 2)
	oid, err := writeObject(ctx, writer, data)
	if err != nil {
		t.Fatalf("write through the proxy: %v", err)
	}
	written := p.model.Stats()
	t.Logf("create + write 6 MiB through the proxy: %+v", written)
	if written.Puts == 0 || written.BytesStored < int64(len(data)) {
		t.Errorf("the proxy did not see the writes: %+v", written)
	}
	// The blobs are on the server, under the prefix: kopia's renames
	// reached the right place.
	var packs int64 // pack blobs p<hash> are files under shard folders p<xx>/...
	root := filepath.Join(p.dav.Dir, "prefix", "kopia")
	filepath.Walk(root, func(path string, fi os.FileInfo, err error) error {
		if rel, _ := filepath.Rel(root, path); err == nil && !fi.IsDir() && strings.HasPrefix(rel, "p") && strings.HasSuffix(rel, ".f") {
			packs += fi.Size()
		}
		return nil
	})
	if packs < int64(len(data)) {
		t.Errorf("the server holds %d bytes of pack blobs under the prefix, want ≥ %d", packs, len(data))
	}

	// Read back on a fresh connection, cache empty.
	reader := connect("reader")
	p.model.Reset()
	start := time.Now()
	rep, err := repo.Open(ctx, reader, testPassword, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close(ctx)
	r, err := rep.OpenObject(ctx, oid)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(r)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("read back through the proxy: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back other bytes than written")
	}
	s := p.model.Stats()
	t.Logf("open + read 6 MiB through the proxy in %v: %+v", took.Round(time.Millisecond), s)
	if s.Gets == 0 || s.BytesFetched < int64(len(data)) {
		t.Errorf("the proxy did not see the reads: %+v", s)
	}
	// kopia's object reader fetches one chunk at a time: at least one
	// round trip per 1 MiB chunk, plus the format blob before any.
	if min := 7 * latency; took < min {
		t.Errorf("open + read of 6 chunks at %v per request took %v, less than %v", latency, took, min)
	}
}

func TestStartProxyRefusesNonLoopback(t *testing.T) {
	up, _ := url.Parse("http://127.0.0.1:1/")
	m := drivemodel.NewModel(drivemodel.Params{})
	for _, addr := range []string{"0.0.0.0:0", ":0", "192.0.2.1:0", "example.com:0", "127.0.0.1"} {
		if srv, err := drivemodel.StartProxy(addr, up, m); err == nil {
			srv.Close(context.Background())
			t.Errorf("StartProxy(%q) listened", addr)
		} else if strings.Contains(err.Error(), "\n") {
			t.Errorf("StartProxy(%q): %q is more than one line", addr, err)
		}
	}
	for _, bad := range []string{"127.0.0.1:8080", "ftp://127.0.0.1/", "http:///x"} {
		u, _ := url.Parse(bad)
		if srv, err := drivemodel.StartProxy("127.0.0.1:0", u, m); err == nil {
			srv.Close(context.Background())
			t.Errorf("upstream %q accepted", bad)
		}
	}
	srv, err := drivemodel.StartProxy("localhost:0", up, m)
	if err != nil {
		t.Fatal(err)
	}
	srv.Close(context.Background())
	if !strings.HasPrefix(srv.Addr, "127.0.0.1:") {
		t.Errorf("localhost:0 listened on %s", srv.Addr)
	}
}
