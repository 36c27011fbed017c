package kopiarepo

import (
	"strings"
	"testing"
)

const testMultistatus = `<?xml version="1.0" encoding="UTF-8"?>
<D:multistatus xmlns:D="DAV:"><D:response><D:href>/kopia/x/</D:href><D:propstat><D:prop><D:resourcetype><D:collection/></D:resourcetype></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>
<D:response><D:href>/kopia/x/a%20b/</D:href><D:propstat><D:prop><D:resourcetype><D:collection/></D:resourcetype></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>
<D:response><D:href>/kopia/x/a%20b/xn0_1.f</D:href><D:propstat><D:prop><D:resourcetype></D:resourcetype><D:getcontentlength>1234</D:getcontentlength></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>
<D:response><D:href>http://127.0.0.1:1/kopia/x/top.f</D:href><D:propstat><D:prop><D:resourcetype/><D:getcontentlength>7</D:getcontentlength></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>
</D:multistatus>
`

func TestSplitMultistatusAndListings(t *testing.T) {
	head, tail, entries, err := splitMultistatus([]byte(testMultistatus))
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, e := range entries {
		paths = append(paths, e.path)
	}
	if got, want := strings.Join(paths, " "), "/kopia/x /kopia/x/a b /kopia/x/a b/xn0_1.f /kopia/x/top.f"; got != want {
		t.Fatalf("paths %q, want %q", got, want)
	}
	if !strings.HasSuffix(string(head), `<D:multistatus xmlns:D="DAV:">`) || !strings.HasPrefix(string(tail), "</D:multistatus>") {
		t.Fatalf("head %q, tail %q", head, tail)
	}
	if n, ok := entries[2].fileSize(); !ok || n != 1234 {
		t.Errorf("fileSize of a blob: %d, %v; want 1234, true", n, ok)
	}
	if _, ok := entries[1].fileSize(); ok {
		t.Error("a collection has a file size")
	}

	tr := &davTree{head: head, tail: tail, entries: entries}
	top := string(tr.listing("/kopia/x"))
	// The collection itself first, then its children only (not the blob
	// in the shard below).
	if !strings.HasPrefix(top, string(head)+"\n"+string(entries[0].raw)) ||
		!strings.Contains(top, string(entries[1].raw)) || !strings.Contains(top, string(entries[3].raw)) ||
		strings.Contains(top, "xn0_1.f") {
		t.Errorf("listing of x:\n%s", top)
	}
	// An answer that is the same XML kopia's client would have parsed.
	if _, _, again, err := splitMultistatus([]byte(top)); err != nil || len(again) != 3 {
		t.Errorf("listing of x does not parse back into 3 responses: %v, %d", err, len(again))
	}
	if shard := string(tr.listing("/kopia/x/a b")); !strings.Contains(shard, "xn0_1.f") || strings.Contains(shard, "top.f") {
		t.Errorf("listing of the shard:\n%s", shard)
	}
	if tr.listing("/kopia/x/missing") != nil {
		t.Error("a collection the tree does not hold was answered")
	}
}

func TestSplitMultistatusRefusesWhatItCannotSplit(t *testing.T) {
	for name, body := range map[string]string{
		"not XML":           "<D:multistatus xmlns:D=\"DAV:\"><D:response>",
		"not a multistatus": `<html><body>hello</body></html>`,
		"no DAV namespace":  `<multistatus><response><href>/x/</href></response></multistatus>`,
		"two hrefs":         `<D:multistatus xmlns:D="DAV:"><D:response><D:href>/a/</D:href><D:href>/b/</D:href><D:status>HTTP/1.1 200 OK</D:status></D:response></D:multistatus>`,
		"empty":             ``,
	} {
		if _, _, _, err := splitMultistatus([]byte(body)); err == nil {
			t.Errorf("%s: split without an error", name)
		}
	}
}
