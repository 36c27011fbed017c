package kopiarepo

import (
	"strings"
	"testing"
	"time"
)

// TestRequestLogRounds: requests that overlap count as one round trip,
// those that start after another ended as the next.
func TestRequestLogRounds(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(op, blob string, from, to float64) Request {
		return Request{Op: op, Blob: blob, Start: t0.Add(time.Duration(from * float64(time.Second))), End: t0.Add(time.Duration(to * float64(time.Second)))}
	}
	l := &RequestLog{start: t0.Add(-2 * time.Second)}
	l.reqs = []Request{
		at("ListBlobs", "xe", 0, 1.2), at("ListBlobs", "xw", 0, 1.21), at("ListBlobs", "xr", 0.01, 1.2),
		at("ListBlobs", "xn0_", 1.21, 2.4),
		at("GetBlob", "xn0_aaaaaaaa", 2.41, 3.6), at("GetBlob", "xn0_bbbbbbbb", 2.41, 3.65),
		at("GetBlob", "q12345678", 3.7, 4.9),
	}
	rounds := l.Sequential()
	if len(rounds) != 4 {
		t.Fatalf("%d rounds, want 4: %v", len(rounds), rounds)
	}
	for i, n := range []int{3, 1, 2, 1} {
		if len(rounds[i]) != n {
			t.Errorf("round %d holds %d requests, want %d: %v", i, len(rounds[i]), n, rounds[i])
		}
	}
	s := l.Summary()
	for _, want := range []string{"4 round trips", "list xe xw xr", "list xn0_", "get 2 blobs (xn0_aa… xn0_bb…)", "get q12345…", "(7 requests)", "after 2s before them"} {
		if !strings.Contains(s, want) {
			t.Errorf("summary %q lacks %q", s, want)
		}
	}
	if (&RequestLog{}).Summary() != "no storage requests" {
		t.Error("an empty log's summary")
	}
}
