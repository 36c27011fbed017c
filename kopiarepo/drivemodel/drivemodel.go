// Package drivemodel is a model of a distant drive (Google Drive and the
// like) at kopia's blob layer: a blob.Storage decorator, in the manner of
// kopia's own repo/blob/throttling and repo/blob/beforeop wrappers, that
// adds to every request
//
//   - a latency (one round trip, paid before the answer starts),
//   - a bandwidth per stream (each GetBlob or PutBlob call is one stream,
//     paced in proportion to its length) and a total bandwidth shared by
//     all streams of the model,
//   - an injected rate of "429 Too Many Requests" / "503 Service
//     Unavailable" answers,
//
// and counts requests and bytes at the blob layer (Counters).
//
// The injected errors are retried the way a real remote backend's are:
// kopia's remote backends (gdrive, webdav, ...) wrap their raw storage in
// repo/blob/retrying, whose isRetriable treats every error as retriable
// except a few sentinels (blob.ErrBlobNotFound, ErrInvalidRange,
// ErrInvalidCredentials, ...); kopia's webdav backend names 429 and 5xx
// explicitly. So Storage is retrying.NewWrapper around the raw model, as
// gdrive is retrying.NewWrapper around the raw Drive API: a failed attempt
// costs a round trip plus kopia's backoff (100 ms, ×1.5 per attempt, 10
// attempts), and only an unlucky streak of 10 reaches the caller. Missing
// blobs are passed through untouched and never retried.
//
// repo.Open takes no storage wrapper, so the model is also a storage type
// registered with blob.AddSupportedStorage (TypeName): its options hold the
// model parameters and the inner storage's ConnectionInfo, a repository
// config file can point at it (WriteConfig), and repo.Open builds it. Import
// this package (and the inner storage's kopia package) for the type to be
// known.
//
// Another process (the kopia CLI) knows no such type: for it the same model
// is an HTTP reverse proxy in front of a WebDAV server (NewProxy,
// StartProxy; "vmhistory bench drive-proxy"), applying the Params per HTTP
// request with the same pacing and counters.
package drivemodel

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/blob/retrying"
)

// Params are the properties of the modelled drive. The zero value is a
// drive with no latency, unlimited bandwidth and no errors.
type Params struct {
	// Latency is added to every request before it is answered.
	Latency time.Duration `json:"latencyNanos,omitempty"`
	// StreamBytesPerSecond bounds each GetBlob/PutBlob call; 0 = unlimited.
	StreamBytesPerSecond float64 `json:"streamBytesPerSecond,omitempty"`
	// TotalBytesPerSecond bounds all streams together, in each direction
	// (one shared link down, one up); 0 = unlimited.
	TotalBytesPerSecond float64 `json:"totalBytesPerSecond,omitempty"`
	// ErrorRate is the fraction (0..1) of GetBlob, GetMetadata, PutBlob and
	// DeleteBlob attempts answered with an injected 429 or 503 after their
	// latency. ListBlobs is never failed: kopia does not retry it.
	ErrorRate float64 `json:"errorRate,omitempty"`
	// Seed makes the error injection reproducible; 0 picks a random seed.
	Seed uint64 `json:"seed,omitempty"`
	// OutageEvery and OutageFor model a store that goes away for a while
	// again and again: of every OutageEvery, counted from when the
	// parameters were set, the first OutageFor answers every GetBlob,
	// GetMetadata, PutBlob and DeleteBlob attempt with 503 (after its
	// latency). ListBlobs is never failed.
	OutageEvery time.Duration `json:"outageEveryNanos,omitempty"`
	OutageFor   time.Duration `json:"outageForNanos,omitempty"`
}

const mib = 1 << 20

// Presets by name.
var presets = map[string]Params{
	// No latency, no bandwidth limit, no errors: only the counters.
	"none": {},
	// A well-connected cloud drive.
	"drive": {Latency: 150 * time.Millisecond, StreamBytesPerSecond: 20 * mib, TotalBytesPerSecond: 400 * mib, ErrorRate: 0.01},
	// The seed's Google Drive as measured: a kopia-style sequential read,
	// one ~4 MiB chunk per round trip, takes 1.2 s + 4 MiB / 6 MiB/s ≈
	// 1.87 s per 4 MiB ≈ 2.25 MB/s, the 2.3 MB/s of the 377-minute copy.
	"seed": {Latency: 1200 * time.Millisecond, StreamBytesPerSecond: 6 * mib, TotalBytesPerSecond: 400 * mib},
}

// Preset returns the parameters of a named preset: "none", "drive" or "seed".
func Preset(name string) (Params, error) {
	p, ok := presets[name]
	if !ok {
		return Params{}, fmt.Errorf("unknown drive model preset %q; choose one of: %s", name, strings.Join(PresetNames(), ", "))
	}
	return p, nil
}

// MustPreset is Preset for names known to be valid.
func MustPreset(name string) Params {
	p, err := Preset(name)
	if err != nil {
		panic(err)
	}
	return p
}

// PresetNames lists the preset names.
func PresetNames() []string {
	names := make([]string, 0, len(presets))
	for n := range presets {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func (p Params) String() string {
	for _, n := range PresetNames() {
		if presets[n] == p {
			return n
		}
	}
	s := fmt.Sprintf("latency %v, %.1f MiB/s per stream, %.1f MiB/s total, %.2f%% errors",
		p.Latency, p.StreamBytesPerSecond/mib, p.TotalBytesPerSecond/mib, p.ErrorRate*100)
	if p.OutageEvery > 0 && p.OutageFor > 0 {
		s += fmt.Sprintf(", away %v of every %v", p.OutageFor, p.OutageEvery)
	}
	return s
}

// Stats is a snapshot of a model's counters.
type Stats struct {
	// Requests counts every request (attempt) that reached the drive,
	// including those answered with an injected error.
	Requests int64 `json:"requests"`
	// Gets counts GetBlob attempts, BytesFetched the bytes they returned.
	Gets         int64 `json:"gets"`
	BytesFetched int64 `json:"bytesFetched"`
	// Puts counts PutBlob attempts, BytesStored the bytes they stored.
	Puts        int64 `json:"puts"`
	BytesStored int64 `json:"bytesStored"`
	// InjectedErrors counts the requests answered with an injected error.
	InjectedErrors int64 `json:"injectedErrors"`
	// MaxConcurrentGets is the most GetBlob calls in progress at once.
	MaxConcurrentGets int64 `json:"maxConcurrentGets"`
}

// Counters count what reaches the drive. They are atomic: read them at any
// time, from any goroutine.
type Counters struct {
	requests, gets, bytesFetched, puts, bytesStored, injected, getsInFlight, maxGets atomic.Int64
}

// Stats returns the current values.
func (c *Counters) Stats() Stats {
	return Stats{
		Requests:          c.requests.Load(),
		Gets:              c.gets.Load(),
		BytesFetched:      c.bytesFetched.Load(),
		Puts:              c.puts.Load(),
		BytesStored:       c.bytesStored.Load(),
		InjectedErrors:    c.injected.Load(),
		MaxConcurrentGets: c.maxGets.Load(),
	}
}

// Reset sets all counters to zero (the peak of concurrent gets to the
// number in progress now).
func (c *Counters) Reset() {
	c.requests.Store(0)
	c.gets.Store(0)
	c.bytesFetched.Store(0)
	c.puts.Store(0)
	c.bytesStored.Store(0)
	c.injected.Store(0)
	c.maxGets.Store(c.getsInFlight.Load())
}

func (c *Counters) beginGet() {
	n := c.getsInFlight.Add(1)
	for {
		m := c.maxGets.Load()
		if n <= m || c.maxGets.CompareAndSwap(m, n) {
			return
		}
	}
}

// Model is the shared state of a modelled drive: its parameters (which may
// be changed while it is in use), its shared links and its counters. Every
// Storage built on the same Model shares its total bandwidth and counters.
type Model struct {
	Counters

	mu     sync.Mutex
	params Params
	since  time.Time // when params were set: the outage schedule's origin
	rng    *rand.Rand
	down   link
	up     link
}

// NewModel returns a model with the given parameters.
func NewModel(p Params) *Model {
	m := &Model{}
	m.SetParams(p)
	return m
}

// SetParams changes the model's parameters; requests in progress keep the
// parameters they started with.
func (m *Model) SetParams(p Params) {
	m.mu.Lock()
	defer m.mu.Unlock()
	seed := p.Seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	if m.rng == nil || p.Seed != m.params.Seed {
		m.rng = rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	}
	m.params = p
	m.since = time.Now()
}

// Params returns the model's current parameters.
func (m *Model) Params() Params {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.params
}

// injectError decides whether the next attempt fails, and how.
func (m *Model) injectError(p Params) error {
	if p.OutageEvery > 0 && p.OutageFor > 0 {
		m.mu.Lock()
		phase := time.Since(m.since) % p.OutageEvery
		m.mu.Unlock()
		if phase < p.OutageFor {
			m.injected.Add(1)
			return &InjectedError{StatusCode: http.StatusServiceUnavailable}
		}
	}
	if p.ErrorRate <= 0 {
		return nil
	}
	m.mu.Lock()
	x := m.rng.Float64()
	code := http.StatusTooManyRequests
	if m.rng.IntN(2) == 1 {
		code = http.StatusServiceUnavailable
	}
	m.mu.Unlock()
	if x >= p.ErrorRate {
		return nil
	}
	m.injected.Add(1)
	return &InjectedError{StatusCode: code}
}

//nolint:gochecknoglobals
var (
	registryMu sync.Mutex
	registry   = map[string]*Model{}
)

// Shared returns the process-wide model registered under name, creating it
// with the "none" preset if it does not exist yet. Storage built by
// repo.Open from a config whose options name a model uses this one, so a
// benchmark can read its counters and change its parameters between the
// repository's open and the measured read.
func Shared(name string) *Model {
	registryMu.Lock()
	defer registryMu.Unlock()
	m := registry[name]
	if m == nil {
		m = NewModel(Params{})
		registry[name] = m
	}
	return m
}

// InjectedError is the model's "throttled" or "server error" answer. kopia
// retries it like any error it does not know to be permanent.
type InjectedError struct {
	StatusCode int
}

func (e *InjectedError) Error() string {
	return fmt.Sprintf("drive model: injected HTTP %d %s", e.StatusCode, http.StatusText(e.StatusCode))
}

// link is a shared pipe of a given rate: reservations are served first
// come, first served, each taking n/rate of the pipe's time.
type link struct {
	mu   sync.Mutex
	next time.Time
}

// reserve books n bytes on the link and returns when they will have passed.
func (l *link) reserve(n int, rate float64) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if l.next.Before(now) {
		l.next = now
	}
	l.next = l.next.Add(bytesDuration(n, rate))
	return l.next
}

func bytesDuration(n int, rate float64) time.Duration {
	return time.Duration(float64(n) / rate * float64(time.Second))
}

// sliceBytes is the granularity at which a stream books the shared link,
// so that concurrent streams share it fairly.
const sliceBytes = 1 << 20

// stream is one transfer over a link, paced as the model paces a stream:
// the bytes it has passed take at least their length at
// StreamBytesPerSecond since the stream began, and each slice of them
// books the shared link at TotalBytesPerSecond. The blob model passes a
// blob's whole length at once (transfer); the HTTP proxy passes a body as
// it is read (pacedBody).
type stream struct {
	link  *link
	p     Params
	start time.Time
	sent  int
}

func newStream(l *link, p Params) *stream {
	return &stream{link: l, p: p, start: time.Now()}
}

// pass waits until n more bytes have passed over the stream.
func (s *stream) pass(ctx context.Context, n int) error {
	p := s.p
	if p.StreamBytesPerSecond <= 0 && p.TotalBytesPerSecond <= 0 {
		return nil
	}
	for done := 0; done < n; {
		k := min(sliceBytes, n-done)
		done += k
		s.sent += k
		var until time.Time
		if p.TotalBytesPerSecond > 0 {
			until = s.link.reserve(k, p.TotalBytesPerSecond)
		}
		if p.StreamBytesPerSecond > 0 {
			if t := s.start.Add(bytesDuration(s.sent, p.StreamBytesPerSecond)); t.After(until) {
				until = t
			}
		}
		if err := sleep(ctx, time.Until(until)); err != nil {
			return err
		}
	}
	return nil
}

// transfer waits as long as moving n bytes takes on one stream of p over l.
func transfer(ctx context.Context, l *link, n int, p Params) error {
	return newStream(l, p).pass(ctx, n)
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// raw is the model without kopia's retry loop: the drive's own behaviour.
type raw struct {
	blob.Storage
	m *Model
}

// begin starts one request on the drive: it counts the request, waits
// its latency and, for a fallible request, decides whether it fails. The
// parameters returned are the ones the request keeps to its end.
func (m *Model) begin(ctx context.Context, fallible bool) (Params, error) {
	p := m.Params()
	m.requests.Add(1)
	if err := sleep(ctx, p.Latency); err != nil {
		return p, err
	}
	if !fallible {
		return p, nil
	}
	return p, m.injectError(p)
}

func (s *raw) begin(ctx context.Context) (Params, error) { return s.m.begin(ctx, true) }

func (s *raw) GetBlob(ctx context.Context, id blob.ID, offset, length int64, output blob.OutputBuffer) error {
	s.m.gets.Add(1)
	s.m.beginGet()
	defer s.m.getsInFlight.Add(-1)
	p, err := s.begin(ctx)
	if err != nil {
		return err
	}
	var buf buffer
	if length > 0 {
		buf.b = make([]byte, 0, length)
	}
	if err := s.Storage.GetBlob(ctx, id, offset, length, &buf); err != nil {
		return err //nolint:wrapcheck
	}
	// The bytes arrive over the stream: the caller has them only after
	// the time their length takes.
	if err := transfer(ctx, &s.m.down, len(buf.b), p); err != nil {
		return err
	}
	s.m.bytesFetched.Add(int64(len(buf.b)))
	output.Reset()
	_, err = output.Write(buf.b)
	return err //nolint:wrapcheck
}

func (s *raw) GetMetadata(ctx context.Context, id blob.ID) (blob.Metadata, error) {
	if _, err := s.begin(ctx); err != nil {
		return blob.Metadata{}, err
	}
	return s.Storage.GetMetadata(ctx, id) //nolint:wrapcheck
}

func (s *raw) PutBlob(ctx context.Context, id blob.ID, data blob.Bytes, opts blob.PutOptions) error {
	s.m.puts.Add(1)
	p, err := s.begin(ctx)
	if err != nil {
		return err
	}
	if err := transfer(ctx, &s.m.up, data.Length(), p); err != nil {
		return err
	}
	if err := s.Storage.PutBlob(ctx, id, data, opts); err != nil {
		return err //nolint:wrapcheck
	}
	s.m.bytesStored.Add(int64(data.Length()))
	return nil
}

func (s *raw) DeleteBlob(ctx context.Context, id blob.ID) error {
	if _, err := s.begin(ctx); err != nil {
		return err
	}
	return s.Storage.DeleteBlob(ctx, id) //nolint:wrapcheck
}

func (s *raw) ListBlobs(ctx context.Context, prefix blob.ID, cb func(blob.Metadata) error) error {
	if _, err := s.m.begin(ctx, false); err != nil {
		return err
	}
	return s.Storage.ListBlobs(ctx, prefix, cb) //nolint:wrapcheck
}

// buffer is a blob.OutputBuffer over a byte slice.
type buffer struct{ b []byte }

func (b *buffer) Write(p []byte) (int, error) { b.b = append(b.b, p...); return len(p), nil }
func (b *buffer) Reset()                      { b.b = b.b[:0] }
func (b *buffer) Length() int                 { return len(b.b) }

// Storage is a blob.Storage seen through a drive model. Its methods are
// kopia's retrying wrapper around the raw model around the inner storage.
type Storage struct {
	blob.Storage // retrying.NewWrapper(&raw{inner, model})

	inner     blob.Storage
	model     *Model
	modelName string // "" for a private model
}

// Wrap puts st behind a private model with parameters p.
func Wrap(st blob.Storage, p Params) *Storage {
	return WrapModel(st, NewModel(p), "")
}

// WrapModel puts st behind model m. name is m's name in the registry
// (Shared), recorded in ConnectionInfo so that a repository config written
// from this storage opens through the same model; "" for a private model,
// whose parameters are recorded instead.
func WrapModel(st blob.Storage, m *Model, name string) *Storage {
	return &Storage{
		Storage:   retrying.NewWrapper(&raw{Storage: st, m: m}),
		inner:     st,
		model:     m,
		modelName: name,
	}
}

// Model returns the storage's model: its counters and parameters.
func (s *Storage) Model() *Model { return s.model }

// Inner returns the storage behind the model.
func (s *Storage) Inner() blob.Storage { return s.inner }

// ConnectionInfo describes the storage as the registered TypeName around
// the inner storage's ConnectionInfo.
func (s *Storage) ConnectionInfo() blob.ConnectionInfo {
	o := &Options{Model: s.modelName, Storage: s.inner.ConnectionInfo()}
	if s.modelName == "" {
		p := s.model.Params()
		o.Params = &p
	}
	return blob.ConnectionInfo{Type: TypeName, Config: o}
}

// DisplayName names the inner storage and the model.
func (s *Storage) DisplayName() string {
	return fmt.Sprintf("%s through a drive model (%v)", s.inner.DisplayName(), s.model.Params())
}

var _ blob.Storage = (*Storage)(nil)
