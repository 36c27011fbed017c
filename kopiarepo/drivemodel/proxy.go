package drivemodel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The HTTP proxy is the same model one layer down, for programs that are
// not this process (the kopia CLI above all): an HTTP reverse proxy in
// front of a WebDAV server, applying a Model per HTTP request. A kopia
// WebDAV repository whose URL is the proxy's is a repository on the
// modelled drive for any client, so the kopia CLI and vmhistory can be
// measured side by side on the same store.
//
// Per request, as the blob model does per blob call:
//
//   - the latency is waited before the request is passed on (the answer
//     starts one round trip after the question);
//   - an injected 429 or 503 (ErrorRate, OutageEvery/OutageFor) answers a
//     fallible request after its latency, without passing it on: GET, PUT,
//     DELETE, MOVE, COPY and PROPFIND with "Depth: 0" (kopia's GetBlob,
//     PutBlob, DeleteBlob, the rename after a PutBlob and GetMetadata,
//     all of which kopia retries). Listings (PROPFIND "Depth: 1"), MKCOL,
//     OPTIONS and HEAD are never failed: kopia does not retry ListBlobs;
//   - the response body, and the request body (a PUT's blob), stream
//     through paced as the blob model paces a blob, as they are read: one
//     stream per body at StreamBytesPerSecond, all streams sharing one
//     link down and one up at TotalBytesPerSecond. Range requests (kopia
//     reads part of a pack with a ranged GET) stream the same way: what
//     is paced is the bytes the server sends.
//
// Counters: Requests counts every request that reached the proxy
// (including gowebdav's unauthenticated first try and the injected
// failures), Gets and Puts the GET and PUT requests, BytesFetched the
// bytes of successful GET bodies as the client received them,
// BytesStored the bytes of PUT bodies passed on to the server.

// NewProxy returns an HTTP handler that passes every request on to
// upstream (a WebDAV server: scheme, host and an optional path prefix)
// through model m. The request's Host header is kept, so that a WebDAV
// server checking a MOVE's Destination against it sees the URL the client
// used; Destination headers naming the proxy get upstream's path prefix.
func NewProxy(upstream *url.URL, m *Model, opts ...ProxyOption) http.Handler {
	u := *upstream
	transport := http.DefaultTransport.(*http.Transport).Clone() //nolint:forcetypeassert
	transport.Proxy = nil                                        // straight to upstream, whatever $HTTP_PROXY says
	transport.DisableCompression = true                          // the bytes as the server sends them
	transport.MaxIdleConns = 256
	transport.MaxIdleConnsPerHost = 256 // kopia has many requests in flight; keep their connections
	p := &proxy{m: m}
	for _, o := range opts {
		o(p)
	}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(&u)
			pr.Out.Host = pr.In.Host
			if d := pr.Out.Header.Get("Destination"); d != "" {
				pr.Out.Header.Set("Destination", rewriteDestination(d, pr.In.Host, u.Path))
			}
		},
		Transport:      transport,
		FlushInterval:  -1, // every paced piece reaches the client when it has "arrived"
		BufferPool:     bufferPool{},
		ModifyResponse: p.modifyResponse,
		ErrorHandler:   proxyError,
		ErrorLog:       log.New(io.Discard, "", 0),
	}
	return p
}

type proxy struct {
	m  *Model
	rp *httputil.ReverseProxy

	logMu sync.Mutex
	log   io.Writer // one line per request, or nil
}

// A ProxyOption changes how NewProxy (or StartProxy) serves.
type ProxyOption func(*proxy)

// WithRequestLog writes one line per request to w when it ends: its start
// (RFC 3339, ms), method, path, Range header ("-" without), status, the
// response body bytes the client received and the request's duration,
// latency included, e.g.
//
//	2026-12-02T04:30:01.123Z GET /kopia/p4f/3a1c.f bytes=0-4194303 206 4194304 0.361s
//
// A request the model failed shows the injected status; one the client
// gave up on, status 0 or the bytes it got so far.
func WithRequestLog(w io.Writer) ProxyOption { return func(p *proxy) { p.log = w } }

// countingWriter counts the body bytes written to a ResponseWriter and
// remembers the status.
type countingWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (c *countingWriter) WriteHeader(code int) {
	if c.status == 0 {
		c.status = code
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *countingWriter) Write(b []byte) (int, error) {
	if c.status == 0 {
		c.status = http.StatusOK
	}
	n, err := c.ResponseWriter.Write(b)
	c.bytes += int64(n)
	return n, err //nolint:wrapcheck
}

// Unwrap lets http.ResponseController (ReverseProxy's flushes) reach the
// server's writer.
func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

func (p *proxy) logRequest(r *http.Request, start time.Time, cw *countingWriter) {
	rng := r.Header.Get("Range")
	if rng == "" {
		rng = "-"
	}
	line := fmt.Sprintf("%s %s %s %s %d %d %.3fs\n", start.UTC().Format("2006-01-02T15:04:05.000Z"),
		r.Method, r.URL.EscapedPath(), strings.ReplaceAll(rng, " ", ""), cw.status, cw.bytes, time.Since(start).Seconds())
	p.logMu.Lock()
	defer p.logMu.Unlock()
	io.WriteString(p.log, line) //nolint:errcheck // a log, best effort
}

// paramsKey carries a request's Params from ServeHTTP to its response.
type paramsKey struct{}

// fallible says whether the model may fail r (see NewProxy).
func fallible(r *http.Request) bool {
	switch r.Method {
	case http.MethodGet, http.MethodPut, http.MethodDelete, "MOVE", "COPY":
		return true
	case "PROPFIND":
		return strings.TrimSpace(r.Header.Get("Depth")) == "0"
	}
	return false
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	m := p.m
	if p.log != nil {
		cw := &countingWriter{ResponseWriter: w}
		defer p.logRequest(r, time.Now(), cw)
		w = cw
	}
	switch r.Method {
	case http.MethodGet:
		m.gets.Add(1)
		m.beginGet()
		defer m.getsInFlight.Add(-1)
	case http.MethodPut:
		m.puts.Add(1)
	}
	params, err := m.begin(r.Context(), fallible(r))
	if err != nil {
		var ie *InjectedError
		if errors.As(err, &ie) {
			http.Error(w, ie.Error(), ie.StatusCode)
		}
		return // otherwise the client has gone during the latency
	}
	ctx := context.WithValue(r.Context(), paramsKey{}, params)
	r = r.WithContext(ctx)
	if r.Body != nil && r.Body != http.NoBody {
		var count *atomic.Int64
		if r.Method == http.MethodPut {
			count = &m.bytesStored
		}
		r.Body = &pacedBody{ReadCloser: r.Body, ctx: ctx, s: newStream(&m.up, params), count: count}
	}
	p.rp.ServeHTTP(w, r)
}

func (p *proxy) modifyResponse(resp *http.Response) error {
	ctx := resp.Request.Context()
	params, _ := ctx.Value(paramsKey{}).(Params)
	var count *atomic.Int64
	if resp.Request.Method == http.MethodGet && resp.StatusCode/100 == 2 {
		count = &p.m.bytesFetched
	}
	resp.Body = &pacedBody{ReadCloser: resp.Body, ctx: ctx, s: newStream(&p.m.down, params), count: count}
	return nil
}

// proxyError answers a request the upstream server did not: 502 with the
// cause, unless the client has gone.
func proxyError(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return
	}
	http.Error(w, "drive model proxy: "+err.Error(), http.StatusBadGateway)
}

// rewriteDestination maps a WebDAV Destination header naming the proxy
// (host) onto upstream's path prefix.
func rewriteDestination(dest, host, prefix string) string {
	if prefix == "" || prefix == "/" {
		return dest
	}
	u, err := url.Parse(dest)
	if err != nil || (u.Host != "" && u.Host != host) {
		return dest
	}
	trailing := strings.HasSuffix(u.Path, "/")
	u.Path = path.Join(prefix, u.Path)
	if trailing && !strings.HasSuffix(u.Path, "/") {
		u.Path += "/"
	}
	u.RawPath = ""
	return u.String()
}

// pacedBody is a body that reaches its reader paced by a stream: each
// piece read is handed on once the stream has passed it.
type pacedBody struct {
	io.ReadCloser
	ctx   context.Context //nolint:containedctx // the request's, for the body it paces
	s     *stream
	count *atomic.Int64 // bytes handed on, or nil
}

func (b *pacedBody) Read(buf []byte) (int, error) {
	n, err := b.ReadCloser.Read(buf)
	if n > 0 {
		if perr := b.s.pass(b.ctx, n); perr != nil {
			return 0, perr
		}
		if b.count != nil {
			b.count.Add(int64(n))
		}
	}
	return n, err //nolint:wrapcheck // io.EOF must stay io.EOF
}

// proxyBufferBytes is the size of the pieces a body is copied in: larger
// than ReverseProxy's 32 KiB, so that pacing 400 MiB/s costs fewer
// wake-ups, and still far below sliceBytes.
const proxyBufferBytes = 256 << 10

//nolint:gochecknoglobals
var proxyBuffers = sync.Pool{New: func() any { b := make([]byte, proxyBufferBytes); return &b }}

type bufferPool struct{}

func (bufferPool) Get() []byte  { return *proxyBuffers.Get().(*[]byte) } //nolint:forcetypeassert
func (bufferPool) Put(b []byte) { proxyBuffers.Put(&b) }

// ProxyServer is a NewProxy serving on a loopback address.
type ProxyServer struct {
	// Addr is the address it listens on (127.0.0.1:port), URL its root,
	// http://Addr/: a client uses URL where it would use upstream's.
	Addr string
	URL  string

	model *Model
	srv   *http.Server
	done  chan error
}

// StartProxy listens on listen, a loopback address (127.0.0.1:0 picks a
// free port; "localhost" means 127.0.0.1), and serves NewProxy(upstream,
// m, opts...) there until Close. Any other address is refused: the proxy passes
// on every request, credentials included, to a server that may itself
// listen on loopback only.
func StartProxy(listen string, upstream *url.URL, m *Model, opts ...ProxyOption) (*ProxyServer, error) {
	if upstream == nil || (upstream.Scheme != "http" && upstream.Scheme != "https") || upstream.Host == "" {
		return nil, fmt.Errorf("drive model proxy: upstream %q is not an http:// or https:// URL of a server", upstream)
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, fmt.Errorf("drive model proxy: listen address %q: %w (write e.g. 127.0.0.1:0)", listen, err)
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return nil, fmt.Errorf("drive model proxy: listen address %q is not a loopback address (127.0.0.1 or ::1); the proxy passes every request and its credentials on unchecked, so it listens on this host only", listen)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(host, port))
	if err != nil {
		return nil, fmt.Errorf("drive model proxy: %w", err)
	}
	s := &ProxyServer{
		Addr:  ln.Addr().String(),
		model: m,
		srv: &http.Server{
			Handler:           NewProxy(upstream, m, opts...),
			ReadHeaderTimeout: time.Minute,
			ErrorLog:          log.New(io.Discard, "", 0),
		},
		done: make(chan error, 1),
	}
	s.URL = "http://" + s.Addr + "/"
	go func() { s.done <- s.srv.Serve(ln) }()
	return s, nil
}

// Model returns the model the proxy applies.
func (s *ProxyServer) Model() *Model { return s.model }

// Close stops listening and waits for the requests in progress to end
// until ctx is done, then drops them.
func (s *ProxyServer) Close(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if err != nil {
		s.srv.Close() //nolint:errcheck // dropping what is left
	}
	if serr := <-s.done; !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("drive model proxy: stop: %w", err)
	}
	return nil
}
