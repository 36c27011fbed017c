package kopiarepo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmhistory/vmhistory/safefile"
)

// kopia's WebDAV storage (gowebdav underneath) gives no hook to its HTTP
// client, which takes http.DefaultTransport. Through a link with a long
// round trip three of the round trips of an open are not needed, and the
// only seam to remove them is that transport: vmhistory registers
// davTransport on it for the "http" scheme (Transport.RegisterProtocol: the
// transport stays the standard one, and a request davTransport does not
// act on goes on as before, http.ErrSkipAltProtocol), for the WebDAV
// repositories its own opens register:
//
//   - gowebdav sends a new client's first requests without credentials and
//     sends them again once an answer tells it how to authenticate (a 401
//     with a challenge, or any other answer: then none): one round trip.
//     For a repository with a user name on a loopback address, the
//     transport answers those itself with the challenge of a server that
//     wants Basic, so the first request that leaves carries the
//     credentials (not over a network: a server that wants Digest would
//     see the password in the clear);
//   - kopia reads the sharding parameters (.shards) to find its format
//     blob (kopia.repository), then the format blob, derives its key from
//     the password, then reads the blob configuration (kopia.blobcfg):
//     both blobs are fetched alongside the first, two round trips (and
//     the key derivation starts one earlier);
//   - kopia lists its index blobs by walking the directories one level at
//     a time (the repository's root, x/, then each shard of x/), a round
//     trip each: when the root is listed, the whole index tree is asked
//     for in one request (Depth: infinity) and the listings of x/ and its
//     shards are answered from it, two round trips fewer on an open
//     without a saved listing (see davTree);
//   - a read-only session (WithCachedIndexList) answers kopia's read of
//     the sharding parameters (.shards, written when the repository is
//     created) from the copy this host saved, and fetches the real one
//     alongside; Repo.CheckOpen reports a difference as a change, as it
//     does for the index listing. Every blob read waits for those
//     parameters (they make its path), so on a warm open this is the
//     round trip before the first byte.
//
// https is left alone: on that transport the scheme is HTTP/2's to register.
type davTransport struct {
	// base makes the requests davTransport makes itself: a clone of
	// http.DefaultTransport, without davTransport.
	base http.RoundTripper

	mu        sync.Mutex
	endpoints map[string]*davEndpoint // by davEndpoint.prefix
}

// davEndpoint is one WebDAV repository's URL (its path ending in "/") and
// what the transport does for it.
type davEndpoint struct {
	prefix     string
	user, pass string
	preemptive bool

	mu sync.Mutex
	// prefetched holds responses fetched ahead (kopia.repository,
	// kopia.blobcfg), by URL, for the one request that will ask for them.
	prefetched map[string]*prefetchedResponse
	// shards: a read-only open's saved sharding parameters (see
	// shardsCache), nil when none is to be used.
	shards *shardsCache
	// tree is the open's listing of the index tree, nil until its root
	// listing (at most one per open).
	tree *davTree
	// requests: the open's request log, nil when none.
	requests *RequestLog
}

type prefetchedResponse struct {
	done    chan struct{}
	expires time.Time
	status  int
	header  http.Header
	body    []byte
	err     error
}

var (
	davTransportOnce sync.Once
	theDAVTransport  *davTransport
)

// davRegister makes the transport act for the WebDAV repository at rawURL
// and returns its endpoint; nil when the URL does not parse.
func davRegister(rawURL, user, pass string) *davEndpoint {
	u, err := url.Parse(rawURL)
	if err != nil || u.Host == "" {
		return nil
	}
	if u.Scheme != "http" {
		return nil
	}
	davTransportOnce.Do(func() {
		dt, ok := http.DefaultTransport.(*http.Transport)
		if !ok {
			return // replaced by someone else: not ours to change
		}
		t := &davTransport{base: dt.Clone(), endpoints: map[string]*davEndpoint{}}
		defer func() {
			if recover() == nil {
				theDAVTransport = t
			}
		}()
		dt.RegisterProtocol("http", t) // panics if the scheme is taken
	})
	t := theDAVTransport
	if t == nil {
		return nil
	}
	prefix := davPrefix(u)
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.endpoints[prefix]; e != nil && e.user == user && e.pass == pass {
		return e
	}
	e := &davEndpoint{prefix: prefix, user: user, pass: pass, prefetched: map[string]*prefetchedResponse{},
		preemptive: user != "" && loopbackHost(u.Hostname())}
	t.endpoints[prefix] = e
	return e
}

// davPrefix is u as scheme://host/path/, the form request URLs are matched on.
func davPrefix(u *url.URL) string {
	p := u.EscapedPath()
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	return strings.ToLower(u.Scheme) + "://" + strings.ToLower(u.Host) + p
}

func loopbackHost(h string) bool {
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// endpointFor is the registered endpoint r goes to, and r's path below it
// ("kopia.repository.f"); nil for a request to anything else.
func (t *davTransport) endpointFor(r *http.Request) (*davEndpoint, string) {
	if r.URL == nil {
		return nil, ""
	}
	full := davPrefix(r.URL)
	t.mu.Lock()
	defer t.mu.Unlock()
	var best *davEndpoint
	for p, e := range t.endpoints {
		if strings.HasPrefix(full, p) && (best == nil || len(p) > len(best.prefix)) {
			best = e
		}
	}
	if best == nil {
		return nil, ""
	}
	return best, strings.TrimSuffix(strings.TrimPrefix(full, best.prefix), "/")
}

func (t *davTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	e, rel := t.endpointFor(r)
	if e == nil {
		return nil, http.ErrSkipAltProtocol
	}
	if e.preemptive && r.Header.Get("Authorization") == "" {
		// What a server that wants Basic answers, answered here: gowebdav
		// sends every new client's first requests without credentials and
		// repeats them once it has an answer, whatever the answer is.
		return challengeBasic(r), nil
	}
	if r.Method == "PROPFIND" {
		if resp := t.propfind(e, r, rel); resp != nil {
			return resp, nil
		}
		return nil, http.ErrSkipAltProtocol
	}
	if r.Method != http.MethodGet || r.Header.Get("Range") != "" {
		return nil, http.ErrSkipAltProtocol
	}
	switch rel {
	case "kopia.repository.f":
		if resp, _ := e.takePrefetched(r); resp != nil {
			return resp, nil
		}
		t.prefetch(e, r, "kopia.blobcfg.f")
	case "kopia.blobcfg.f":
		if resp, _ := e.takePrefetched(r); resp != nil {
			return resp, nil
		}
	default:
		if strings.HasPrefix(rel, davIndexTree+"/") {
			if resp, ready := e.takePrefetched(r); resp != nil {
				if ready {
					e.requests.fetchedAhead(blobIDOfPath(rel))
				}
				return resp, nil
			}
		}
	case ".shards":
		if resp := e.shardsFromCache(t, r); resp != nil {
			return resp, nil
		}
		// kopia asks for .shards first to find the format blob, and its
		// key derivation waits for that: both blobs kopia reads next, now.
		t.prefetch(e, r, "kopia.repository.f")
		t.prefetch(e, r, "kopia.blobcfg.f")
		resp, err := t.base.RoundTrip(r)
		if err == nil && resp.StatusCode == http.StatusOK {
			return e.keepShards(resp)
		}
		return resp, err
	}
	return nil, http.ErrSkipAltProtocol
}

// davPrefetchTTL bounds how long a response fetched ahead waits for the
// request it was fetched for: kopia asks within its key derivation's time
// (a fraction of a second), unless its cache has the blob; an answer older
// than this is not handed out.
const davPrefetchTTL = 5 * time.Second

// prefetch fetches the sibling blob name of r's URL in the background, with
// r's headers, for the request that will follow (kopia's blob names under
// 20 characters are not sharded: they sit beside .shards).
func (t *davTransport) prefetch(e *davEndpoint, r *http.Request, name string) {
	u := *r.URL
	u.Path = u.Path[:strings.LastIndex(u.Path, "/")+1] + name
	u.RawPath = ""
	t.prefetchURL(e, r.Context(), r.Header, u.String())
}

// prefetchURL fetches the blob at URL key in the background, with header,
// for the request that will follow.
func (t *davTransport) prefetchURL(e *davEndpoint, ctx context.Context, header http.Header, key string) {
	e.mu.Lock()
	if p := e.prefetched[key]; p != nil && time.Now().Before(p.expires) {
		e.mu.Unlock()
		return
	}
	p := &prefetchedResponse{done: make(chan struct{}), expires: time.Now().Add(davPrefetchTTL)}
	e.prefetched[key] = p
	e.mu.Unlock()
	req, err := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodGet, key, nil)
	if err != nil {
		p.err = err
		close(p.done)
		return
	}
	req.Header = header.Clone()
	go func() {
		defer close(p.done)
		ctx, cancel := context.WithTimeout(req.Context(), davPrefetchTTL)
		defer cancel()
		resp, err := t.base.RoundTrip(req.WithContext(ctx))
		if err != nil {
			p.err = err
			return
		}
		defer resp.Body.Close()
		p.body, p.err = io.ReadAll(io.LimitReader(resp.Body, 16<<20))
		p.status, p.header = resp.StatusCode, resp.Header
	}()
}

// takePrefetched hands r the response fetched ahead for its URL, waiting
// for it if it is still on its way (ready: it had come before r asked);
// nil when there is none or it failed (r then goes to the server itself).
func (e *davEndpoint) takePrefetched(r *http.Request) (resp *http.Response, ready bool) {
	key := r.URL.String()
	e.mu.Lock()
	p := e.prefetched[key]
	delete(e.prefetched, key)
	e.mu.Unlock()
	if p == nil || time.Now().After(p.expires) {
		return nil, false
	}
	select {
	case <-p.done:
		ready = true
	default:
		select {
		case <-p.done:
		case <-r.Context().Done():
			return nil, false
		}
	}
	// Only what the server would have answered this request too: an
	// authentication failure, say, is asked again with r's own headers.
	if p.err != nil || (p.status != http.StatusOK && p.status != http.StatusNotFound) {
		return nil, false
	}
	return cannedResponse(r, p.status, p.header, p.body), ready
}

// blobIDOfPath is the kopia blob ID a WebDAV path below the repository's
// root names: kopia's sharding splits the ID into directories and adds
// ".f" (x/n0_/1a2b.f is blob xn0_1a2b).
func blobIDOfPath(rel string) string {
	return strings.ReplaceAll(strings.TrimSuffix(rel, ".f"), "/", "")
}

// challengeBasic is a "401 Unauthorized" asking for Basic credentials.
func challengeBasic(r *http.Request) *http.Response {
	return cannedResponse(r, http.StatusUnauthorized, http.Header{"Www-Authenticate": {`Basic realm="vmhistory"`}}, nil)
}

func cannedResponse(r *http.Request, status int, header http.Header, body []byte) *http.Response {
	if header == nil {
		header = http.Header{}
	}
	return &http.Response{
		Status: fmt.Sprintf("%d %s", status, http.StatusText(status)), StatusCode: status,
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: header.Clone(), Body: io.NopCloser(bytes.NewReader(body)),
		ContentLength: int64(len(body)), Request: r,
	}
}

// shardsCache is a read-only open's use of the saved sharding parameters.
type shardsCache struct {
	file    string // the saved copy (davShardsFile in kopia's cache directory)
	storage string // storageKey of the repository
	log     *slog.Logger

	readOnly bool // answer from the saved copy (else only save it)

	loadOnce  sync.Once
	body      []byte // the saved copy, nil for none
	checkOnce sync.Once
	served    atomic.Bool   // an answer came from the saved copy
	checked   chan struct{} // closed when the server's is in (after served)
	changed   atomic.Bool   // and it differs
}

// davShardsFile is the saved .shards, beside the saved index listing.
const davShardsFile = "vmhistory-dav-shards.json"

type savedShards struct {
	Storage string    `json:"storage"`
	Saved   time.Time `json:"saved"`
	Body    []byte    `json:"body"`
}

func (c *shardsCache) read() []byte {
	data, err := safefile.ReadFile(c.file)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			c.log.Warn("kopia sharding parameters: saved copy not used", "file", c.file, "err", err)
		}
		return nil
	}
	var s savedShards
	if json.Unmarshal(data, &s) != nil || s.Storage != c.storage || len(s.Body) == 0 {
		return nil
	}
	return s.Body
}

func (c *shardsCache) save(body []byte) {
	data, err := json.Marshal(savedShards{Storage: c.storage, Saved: time.Now().UTC(), Body: body})
	if err == nil {
		err = safefile.WriteFileAtomic(c.file, data, 0o600)
	}
	if err != nil {
		c.log.Warn("kopia sharding parameters: not saved", "file", c.file, "err", err)
	}
}

// shardsFromCache answers r from the saved copy, and the first time checks
// it against the server in the background; nil when there is none. Every
// storage of the process on this repository (the open's, its probe's) is
// answered alike.
func (e *davEndpoint) shardsFromCache(t *davTransport, r *http.Request) *http.Response {
	e.mu.Lock()
	c := e.shards
	e.mu.Unlock()
	if c == nil || !c.readOnly {
		return nil
	}
	c.loadOnce.Do(func() { c.body = c.read() })
	if c.body == nil {
		return nil
	}
	c.checkOnce.Do(func() { c.check(t, r) })
	return cannedResponse(r, http.StatusOK, http.Header{"Content-Type": {"application/octet-stream"}}, c.body)
}

// check fetches the server's .shards (r, as kopia asked for it) and notes
// whether it is the saved copy.
func (c *shardsCache) check(t *davTransport, r *http.Request) {
	c.served.Store(true)
	body := c.body
	req := r.Clone(context.WithoutCancel(r.Context()))
	go func() {
		defer close(c.checked)
		ctx, cancel := context.WithTimeout(req.Context(), DefaultUnreachableTimeout)
		defer cancel()
		resp, err := t.base.RoundTrip(req.WithContext(ctx))
		var fresh []byte
		if err == nil {
			fresh, err = io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			if err == nil && resp.StatusCode != http.StatusOK {
				err = errors.New(resp.Status)
			}
		}
		if err != nil {
			// Parameters that were wrong could only make blobs not found,
			// never wrong bytes: what was read with them stands.
			c.log.Warn("kopia sharding parameters: saved copy not checked", "err", err)
			return
		}
		if !bytes.Equal(fresh, body) {
			c.changed.Store(true)
			c.save(fresh)
		}
	}()
}

// keepShards saves a .shards the server sent, for the next read-only open.
func (e *davEndpoint) keepShards(resp *http.Response) (*http.Response, error) {
	e.mu.Lock()
	c := e.shards
	e.mu.Unlock()
	if c == nil {
		return resp, nil
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	c.save(body)
	resp.Body = io.NopCloser(bytes.NewReader(body))
	resp.ContentLength = int64(len(body))
	return resp, nil
}

// changedSinceOpen says whether the sharding parameters the open was
// answered with differ from the server's (waiting for the check).
func (c *shardsCache) changedSinceOpen(ctx context.Context) (bool, error) {
	if c == nil || !c.served.Load() {
		return false, nil
	}
	select {
	case <-c.checked:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	return c.changed.Load(), nil
}

// open starts an open of the endpoint's repository: what was fetched ahead
// for another open is not this one's, and the saved sharding parameters are
// this open's (see shardsCache: answered from when readOnly, saved either
// way; none without a cache directory, dir ""), and so is its request log
// (nil for none), told of the reads answered from what was fetched ahead.
func (e *davEndpoint) open(dir, storage string, readOnly bool, requests *RequestLog) *shardsCache {
	var c *shardsCache
	if dir != "" {
		c = &shardsCache{file: filepath.Join(dir, davShardsFile), storage: storage, log: slog.Default(),
			readOnly: readOnly, checked: make(chan struct{})}
	}
	e.mu.Lock()
	e.prefetched = map[string]*prefetchedResponse{}
	e.shards = c
	e.tree = nil
	e.requests = requests
	e.mu.Unlock()
	return c
}

// errShardsChanged is CheckOpen's error when the saved sharding parameters
// an open was answered with are not the server's. kopia keeps a storage's
// parameters for its life: a Refresh would not take the new ones.
var errShardsChanged = errors.New("the repository's sharding parameters (.shards) are not the ones this host saved; the new ones are saved now: run the command again")
