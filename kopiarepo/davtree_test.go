package kopiarepo_test

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/kopiarepo"
)

// indexTreeRequests sorts an open's requests under the index tree (x/).
func indexTreeRequests(reqs []davRequest) (infinity, depth1 []davRequest, gets map[string]int) {
	gets = map[string]int{}
	for _, q := range reqs {
		if !strings.HasPrefix(q.path, "/kopia/x") {
			continue
		}
		switch {
		case q.method == "PROPFIND" && strings.EqualFold(q.depth, "infinity"):
			infinity = append(infinity, q)
		case q.method == "PROPFIND":
			depth1 = append(depth1, q)
		case q.method == http.MethodGet:
			gets[q.path]++
		}
	}
	return infinity, depth1, gets
}

// A cold open (no saved index list) asks for the whole index tree in one
// request instead of walking x/ and its shards a listing at a time, reads
// each index blob once, and sees every snapshot; a server that refuses
// infinite depth gets the walk, with the same result.
func TestWebDAVColdOpenListsIndexTreeInOneRequest(t *testing.T) {
	ctx := context.Background()
	rec, configFile := newRecordedDAVRepo(t)
	want := []string{upload(t, configFile, 1), upload(t, configFile, 2)}
	cacheDir := kopiaCacheDirOf(t, configFile)

	var log kopiarepo.RequestLog
	open := func() []davRequest {
		t.Helper()
		emptyDir(t, cacheDir)
		rec.take()
		log = kopiarepo.RequestLog{}
		r, err := kopiarepo.Open(ctx, configFile, testPassword, kopiarepo.WithRequestLog(&log))
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close(ctx)
		ids := snapshotIDs(t, r)
		for _, id := range want {
			if !ids[id] {
				t.Errorf("snapshot %s not listed (listed: %v)", id, ids)
			}
		}
		return rec.take()
	}

	infinity, depth1, gets := indexTreeRequests(open())
	if len(infinity) != 1 || infinity[0].path != "/kopia/x/" || infinity[0].status != http.StatusMultiStatus {
		t.Errorf("Depth: infinity listings of the index tree: %+v; want one of /kopia/x/ answered 207", infinity)
	}
	if len(depth1) != 0 {
		t.Errorf("the index tree was also walked a level at a time: %+v", depth1)
	}
	if len(gets) == 0 {
		t.Error("no index blob was read")
	}
	for p, n := range gets {
		if n != 1 {
			t.Errorf("index blob %s read %d times, want once", p, n)
		}
	}
	// The index blobs come while kopia derives its key from the password:
	// its reads of them are not round trips of the open.
	if sum := log.Summary(); !strings.Contains(sum, "fetched ahead, alongside the listing") {
		t.Errorf("summary %q does not count the index blobs fetched ahead", sum)
	}
	for _, q := range log.Requests() {
		if q.Op == "GetBlob" && strings.HasPrefix(q.Blob, "x") {
			t.Errorf("index blob %s, fetched ahead, is in the open's requests", q.Blob)
		}
	}

	rec.mu.Lock()
	rec.refuseInfinity = true
	rec.mu.Unlock()
	infinity, depth1, gets = indexTreeRequests(open())
	if len(infinity) != 1 || infinity[0].status != http.StatusForbidden {
		t.Errorf("with infinite depth refused: Depth: infinity listings %+v; want one, answered 403", infinity)
	}
	if len(depth1) == 0 {
		t.Error("with infinite depth refused the index tree was not listed by the server")
	}
	if len(gets) == 0 {
		t.Error("with infinite depth refused no index blob was read")
	}
}
