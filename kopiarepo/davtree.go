package kopiarepo

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"io"
	"net/http"
	"net/url"
	"path"
	"strings"
	"time"
)

// davIndexTree is the directory of kopia's index blobs (the epoch
// manager's "x" blobs, sharded below it as x/<shard>/).
const davIndexTree = "x"

// davTreeMaxBytes bounds the listing of the index tree kept in memory; a
// larger answer is not used (kopia's own listings go on as before).
const davTreeMaxBytes = 16 << 20

// davTree is one Depth: infinity listing of the index tree, asked for
// when kopia lists the repository's root, the first step of its walk to
// the index blobs. kopia's following Depth: 1 listings of x/ and of each
// shard below it are answered from it, each collection once, within
// davPrefetchTTL, and only for a request with the same body (the
// properties asked for) as the one the tree was fetched with: each answer
// is the server's own <response> elements for that collection and its
// children, in the server's order, the collection first as gowebdav
// expects. A server that refuses infinite depth (many do: RFC 4918 lets
// it) or answers anything but 207 leaves every listing to the server.
type davTree struct {
	done    chan struct{}
	expires time.Time
	body    []byte // the PROPFIND body kopia's root listing was sent with

	// Set before done is closed; ok only for a usable 207.
	ok         bool
	header     http.Header
	head, tail []byte // the multistatus before its first response, and from its end tag
	entries    []davEntry
	answered   map[string]bool // collections answered from the tree
}

// davEntry is one <response> of a multistatus: its href's path, without
// a trailing slash, and its raw XML.
type davEntry struct {
	path string
	raw  []byte
}

// propfind answers a listing of the index tree from the open's tree, and
// starts the tree when kopia lists the root; nil: the request goes to the
// server.
func (t *davTransport) propfind(e *davEndpoint, r *http.Request, rel string) *http.Response {
	if r.Header.Get("Depth") != "1" || r.GetBody == nil {
		return nil
	}
	if rel == "" {
		if e.user == "" || r.Header.Get("Authorization") != "" {
			// (Without credentials gowebdav asks again with them.)
			t.startTree(e, r)
		}
		return nil
	}
	if rel != davIndexTree && !strings.HasPrefix(rel, davIndexTree+"/") {
		return nil
	}
	e.mu.Lock()
	tr := e.tree
	e.mu.Unlock()
	if tr == nil || time.Now().After(tr.expires) {
		return nil
	}
	body, err := requestBody(r)
	if err != nil || !bytes.Equal(body, tr.body) {
		return nil
	}
	select {
	case <-tr.done:
	case <-r.Context().Done():
		return nil
	}
	if !tr.ok {
		return nil
	}
	collection := strings.TrimSuffix(r.URL.Path, "/")
	e.mu.Lock()
	defer e.mu.Unlock()
	if tr.answered[collection] {
		return nil // a second listing of it goes to the server: it may have changed
	}
	answer := tr.listing(collection)
	if answer == nil {
		return nil
	}
	tr.answered[collection] = true
	return cannedResponse(r, http.StatusMultiStatus, tr.header, answer)
}

// startTree fetches the index tree in the background with the headers and
// body of r, kopia's listing of the root, once per open.
func (t *davTransport) startTree(e *davEndpoint, r *http.Request) {
	body, err := requestBody(r)
	if err != nil {
		return
	}
	u := *r.URL
	u.Path = strings.TrimSuffix(u.Path, "/") + "/" + davIndexTree + "/"
	u.RawPath = ""
	tr := &davTree{done: make(chan struct{}), expires: time.Now().Add(davPrefetchTTL), body: body, answered: map[string]bool{}}
	e.mu.Lock()
	if e.tree != nil {
		e.mu.Unlock()
		return
	}
	e.tree = tr
	e.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), davPrefetchTTL)
	req, err := http.NewRequestWithContext(ctx, "PROPFIND", u.String(), bytes.NewReader(body))
	if err != nil {
		cancel()
		close(tr.done)
		return
	}
	req.Header = r.Header.Clone()
	req.Header.Set("Depth", "infinity")
	go func() {
		defer close(tr.done)
		defer cancel()
		resp, err := t.base.RoundTrip(req)
		if err != nil {
			return
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusMultiStatus {
			return
		}
		raw, err := io.ReadAll(io.LimitReader(resp.Body, davTreeMaxBytes+1))
		if err != nil || len(raw) > davTreeMaxBytes {
			return
		}
		head, tail, entries, err := splitMultistatus(raw)
		if err != nil {
			return
		}
		header := resp.Header.Clone()
		header.Del("Content-Length")
		tr.header, tr.head, tr.tail, tr.entries = header, head, tail, entries
		tr.ok = true
		t.prefetchIndexBlobs(e, r, entries)
	}()
}

// davIndexPrefetchBytes bounds the index blobs fetched ahead of kopia's
// reads: kopia reads them as soon as its key derivation from the password
// is done (0.2–0.3 s), and fetching them as soon as the tree lists them
// takes that off the open. A tree that lists more is left to kopia (a
// large repository's indexes may be in kopia's cache).
const (
	davIndexPrefetchBytes = 32 << 20
	davIndexPrefetchBlobs = 64
)

// prefetchIndexBlobs fetches the index blobs the tree lists, with the
// credentials of r (kopia's listing of the root), when they are few.
func (t *davTransport) prefetchIndexBlobs(e *davEndpoint, r *http.Request, entries []davEntry) {
	var blobs []string
	var total int64
	for _, en := range entries {
		size, isFile := en.fileSize()
		if !isFile {
			continue
		}
		total += size
		blobs = append(blobs, en.path)
	}
	if len(blobs) == 0 || len(blobs) > davIndexPrefetchBlobs || total > davIndexPrefetchBytes {
		return
	}
	header := http.Header{}
	for _, k := range []string{"Authorization", "Accept-Encoding", "User-Agent"} {
		if v, ok := r.Header[k]; ok {
			header[k] = v
		}
	}
	for _, p := range blobs {
		u := url.URL{Scheme: r.URL.Scheme, Host: r.URL.Host, Path: p}
		t.prefetchURL(e, r.Context(), header, u.String())
	}
}

// fileSize is the entry's getcontentlength, and false for a collection or
// an entry without a length.
func (en davEntry) fileSize() (int64, bool) {
	var resp struct {
		Propstat []struct {
			Prop struct {
				ResourceType struct {
					Collection *struct{} `xml:"collection"`
				} `xml:"resourcetype"`
				Length *int64 `xml:"getcontentlength"`
			} `xml:"prop"`
			Status string `xml:"status"`
		} `xml:"propstat"`
	}
	if xml.Unmarshal(en.raw, &resp) != nil {
		return 0, false
	}
	for _, ps := range resp.Propstat {
		if !strings.Contains(ps.Status, " 200 ") {
			continue
		}
		if ps.Prop.ResourceType.Collection != nil || ps.Prop.Length == nil {
			return 0, false
		}
		return *ps.Prop.Length, true
	}
	return 0, false
}

// requestBody is a copy of r's body, which stays r's to send.
func requestBody(r *http.Request) ([]byte, error) {
	rc, err := r.GetBody()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(io.LimitReader(rc, 1<<20))
}

// listing is the Depth: 1 answer for collection (a URL path without a
// trailing slash): its own response first, then its children's; nil when
// the tree does not hold the collection.
func (tr *davTree) listing(collection string) []byte {
	var self []byte
	var children [][]byte
	for _, en := range tr.entries {
		switch {
		case en.path == collection:
			self = en.raw
		case path.Dir(en.path) == collection:
			children = append(children, en.raw)
		}
	}
	if self == nil {
		return nil
	}
	var b bytes.Buffer
	b.Write(tr.head)
	b.WriteByte('\n')
	b.Write(self)
	for _, c := range children {
		b.WriteByte('\n')
		b.Write(c)
	}
	b.WriteByte('\n')
	b.Write(tr.tail)
	return b.Bytes()
}

var errNotMultistatus = errors.New("not a DAV multistatus")

// splitMultistatus splits a 207 body into its head (up to and including
// the multistatus start tag), each top-level <response> element with its
// href's path, and its tail (from the multistatus end tag).
func splitMultistatus(body []byte) (head, tail []byte, entries []davEntry, err error) {
	d := xml.NewDecoder(bytes.NewReader(body))
	depth := 0
	var (
		start  int64 // of the current response
		href   strings.Builder
		inHref bool
		hrefs  int // in the current response
	)
	for {
		off := d.InputOffset()
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, nil, nil, err
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			depth++
			dav := tok.Name.Space == "DAV:"
			switch {
			case depth == 1:
				if !dav || tok.Name.Local != "multistatus" {
					return nil, nil, nil, errNotMultistatus
				}
				head = body[:d.InputOffset()]
			case depth == 2:
				if !dav || tok.Name.Local != "response" {
					return nil, nil, nil, errNotMultistatus
				}
				start, hrefs = off, 0
				href.Reset()
			case depth == 3 && dav && tok.Name.Local == "href":
				inHref = true
				hrefs++
			}
		case xml.CharData:
			if inHref {
				href.Write(tok)
			}
		case xml.EndElement:
			switch depth {
			case 1:
				tail = body[off:]
			case 2:
				if hrefs != 1 {
					// RFC 4918 lets a response name several resources
					// that share a status: not something to split.
					return nil, nil, nil, errNotMultistatus
				}
				u, err := url.Parse(strings.TrimSpace(href.String()))
				if err != nil {
					return nil, nil, nil, err
				}
				entries = append(entries, davEntry{path: strings.TrimSuffix(u.Path, "/"), raw: body[start:d.InputOffset()]})
			case 3:
				inHref = false
			}
			depth--
		}
	}
	if head == nil || tail == nil {
		return nil, nil, nil, errNotMultistatus
	}
	return head, tail, entries, nil
}
