package kopiarepo

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/kopia/kopia/repo/logging"
)

// Request is one request the kopia library made to the repository's
// storage while it was being recorded (see WithRequestLog).
type Request struct {
	// Op is the storage call: GetBlob, GetMetadata, ListBlobs, ...
	Op string
	// Blob is the blob ID, or the prefix listed.
	Blob       string
	Start, End time.Time
}

// RequestLog records the storage requests of an opening repository: on a
// distant store each is a round trip, and the ones made one after the
// other are what a restore waits for before its first byte. The format
// blob and its companion (kopia.repository, kopia.blobcfg) are read before
// kopia's storage tracing starts, so they are not in it; Before gives the
// time spent before the first recorded request.
type RequestLog struct {
	recording atomic.Bool
	mu        sync.Mutex
	start     time.Time
	reqs      []Request
	// Index listings kopia asked for that the open's index listing
	// answered without a request (see indexlist.go), by prefix: their
	// trace entries are not requests.
	answered  map[string]int
	fromSaved bool // the open was answered from this host's saved listing
	// Blobs kopia read that had been fetched ahead, alongside an earlier
	// request (see davTree): kopia's trace entry for one is not a round
	// trip; ahead counts those taken.
	aheadOf map[string]int
	ahead   int
}

// fetchedAhead notes that kopia's next read of blob is answered from what
// was fetched ahead, without waiting for a request.
func (l *RequestLog) fetchedAhead(blob string) {
	if l == nil || !l.recording.Load() {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.aheadOf == nil {
		l.aheadOf = map[string]int{}
	}
	l.aheadOf[blob]++
}

// answeredLocally notes that kopia's listing of prefix was answered
// without a storage request (fromSaved: from the saved listing).
func (l *RequestLog) answeredLocally(prefix string, fromSaved bool) {
	if l == nil || !l.recording.Load() {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.answered == nil {
		l.answered = map[string]int{}
	}
	l.answered[prefix]++
	l.fromSaved = l.fromSaved || fromSaved
}

// FromSavedListing says whether the open's index listings were answered
// from this host's saved listing (see WithCachedIndexList).
func (l *RequestLog) FromSavedListing() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fromSaved
}

// add records a request made below kopia's tracing (the open's one index
// listing).
func (l *RequestLog) add(r Request) {
	if l == nil || !l.recording.Load() {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.reqs = append(l.reqs, r)
}

// WithRequestLog records the storage requests of Open, and of what follows
// on the Repo until l.Stop, into l. It turns on kopia's storage tracing
// (repo.Options.TraceStorage), which costs nothing once stopped.
func WithRequestLog(l *RequestLog) OpenOption {
	return func(o *openOptions) { o.requests = l }
}

// Stop ends the recording; the requests so far stay.
func (l *RequestLog) Stop() { l.recording.Store(false) }

// Requests returns the requests recorded, in the order they started.
func (l *RequestLog) Requests() []Request {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := append([]Request(nil), l.reqs...)
	sort.SliceStable(out, func(i, j int) bool { return out[i].Start.Before(out[j].Start) })
	return out
}

// Before is the time from the start of Open to the first recorded request:
// reading the format blob, when kopia's cache did not have it.
func (l *RequestLog) Before() time.Duration {
	reqs := l.Requests()
	if len(reqs) == 0 || l.start.IsZero() {
		return 0
	}
	return reqs[0].Start.Sub(l.start)
}

// Sequential returns the requests made one after the other: the largest
// set of them of which each started after the one before had ended, which
// on a distant store is the round trips the open waited for, at least.
// Each round holds the requests that overlapped the one chosen.
func (l *RequestLog) Sequential() [][]Request {
	reqs := l.Requests()
	byEnd := append([]Request(nil), reqs...)
	sort.SliceStable(byEnd, func(i, j int) bool { return byEnd[i].End.Before(byEnd[j].End) })
	var chain []Request
	for _, r := range byEnd {
		if len(chain) == 0 || !r.Start.Before(chain[len(chain)-1].End) {
			chain = append(chain, r)
		}
	}
	rounds := make([][]Request, len(chain))
	for _, r := range reqs {
		for i, c := range chain {
			if r.Start.Before(c.End) && !r.End.Before(c.Start) {
				rounds[i] = append(rounds[i], r)
				break
			}
		}
	}
	return rounds
}

// Summary says what the open waited for, like "4 round trips: list xr xe
// xw xs; list xn1_ xn0_; get 4 blobs (xn0_12… …); get 4 blobs (qa4e7d… …)
// (14 requests), after 2.57s before them (the format blob: ...)".
func (l *RequestLog) Summary() string {
	reqs := l.Requests()
	l.mu.Lock()
	saved, ahead := l.fromSaved, l.ahead
	l.mu.Unlock()
	note := ""
	if saved {
		note = "; the index listing from this host's saved copy, checked alongside"
	}
	if ahead > 0 {
		note += "; " + plural(ahead, "index blob") + " fetched ahead, alongside the listing"
	}
	if len(reqs) == 0 {
		return "no storage requests" + note
	}
	var parts []string
	for _, round := range l.Sequential() {
		parts = append(parts, describeRound(round))
	}
	s := fmt.Sprintf("%s: %s (%s)", plural(len(parts), "round trip"), strings.Join(parts, "; "), plural(len(reqs), "request"))
	if b := l.Before(); b >= 50*time.Millisecond {
		s += fmt.Sprintf(", after %s before them (the format blob: read, or from the cache, and its key derived)", b.Round(10*time.Millisecond))
	}
	return s + note
}

func describeRound(round []Request) string {
	var lists, gets []string
	for _, r := range round {
		switch r.Op {
		case "ListBlobs":
			lists = append(lists, r.Blob)
		default:
			id := r.Blob
			if len(id) > 6 {
				id = id[:6] + "…"
			}
			gets = append(gets, id)
		}
	}
	var out []string
	if len(lists) > 0 {
		out = append(out, "list "+strings.Join(lists, " "))
	}
	if len(gets) == 1 {
		out = append(out, "get "+gets[0])
	} else if len(gets) > 1 {
		out = append(out, fmt.Sprintf("get %d blobs (%s)", len(gets), strings.Join(uniq(gets), " ")))
	}
	return strings.Join(out, ", ")
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

func uniq(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, v := range s {
		if !seen[v] {
			seen[v] = true
			out = append(out, v)
		}
	}
	return out
}

// loggerFactory is a kopia logger factory whose loggers record the storage
// tracing's debug entries ("[STORAGE] GetBlob" with blobID and duration)
// while l records, and drop everything else, as kopia's default does.
func (l *RequestLog) loggerFactory() logging.LoggerFactory {
	logger := zap.New(&requestCore{log: l}).Sugar()
	return func(string) logging.Logger { return logger }
}

// requestCore is a zapcore.Core that turns storage trace entries into
// Requests.
type requestCore struct {
	log    *RequestLog
	fields []zapcore.Field
}

func (c *requestCore) Enabled(zapcore.Level) bool { return c.log.recording.Load() }

func (c *requestCore) With(fields []zapcore.Field) zapcore.Core {
	return &requestCore{log: c.log, fields: append(append([]zapcore.Field(nil), c.fields...), fields...)}
}

func (c *requestCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) && strings.HasPrefix(e.Message, storageTracePrefix) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *requestCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range append(append([]zapcore.Field(nil), c.fields...), fields...) {
		f.AddTo(enc)
	}
	r := Request{Op: strings.TrimPrefix(e.Message, storageTracePrefix), End: e.Time}
	switch r.Op {
	case "GetBlob", "GetMetadata", "ListBlobs", "PutBlob", "DeleteBlob":
	default:
		return nil // "concurrency level reached" and the like: no request
	}
	for _, k := range []string{"blobID", "prefix"} {
		if v, ok := enc.Fields[k]; ok {
			r.Blob = fmt.Sprint(v)
		}
	}
	if r.Op == "GetBlob" {
		c.log.mu.Lock()
		n := c.log.aheadOf[r.Blob]
		if n > 0 {
			c.log.aheadOf[r.Blob] = n - 1
			c.log.ahead++
		}
		c.log.mu.Unlock()
		if n > 0 {
			return nil
		}
	}
	if r.Op == "ListBlobs" {
		c.log.mu.Lock()
		n := c.log.answered[r.Blob]
		if n > 0 {
			c.log.answered[r.Blob] = n - 1
		}
		c.log.mu.Unlock()
		if n > 0 {
			return nil
		}
	}
	if d, ok := enc.Fields["duration"].(time.Duration); ok {
		r.Start = r.End.Add(-d)
	} else {
		r.Start = r.End
	}
	c.log.mu.Lock()
	c.log.reqs = append(c.log.reqs, r)
	if len(c.log.reqs) >= maxRecordedRequests {
		c.log.recording.Store(false)
	}
	c.log.mu.Unlock()
	return nil
}

func (c *requestCore) Sync() error { return nil }

// maxRecordedRequests bounds a RequestLog nobody stops (a mount that
// opens no file): it stops itself.
const maxRecordedRequests = 1000

// storageTracePrefix is what repo.Options.TraceStorage puts before the
// storage call's name in its log messages (kopia v0.22.3 repo/open.go).
const storageTracePrefix = "[STORAGE] "
