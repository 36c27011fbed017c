package kopiarepo

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"

	"github.com/kopia/kopia/repo/object"
)

// The index object of a file is JSON, one entry per chunk: 16 Ki entries
// for a 2 GiB disk under FIXED-128K. encoding/json spends ~60 ms of CPU
// reading one and ~40 ms writing one on this kind of machine, a tenth of
// a stream-path night; these two do the same in a few milliseconds. The
// writer gives exactly the bytes kopia's object writer gives (an
// Encoder's output, newline included), so the index object, its content
// ID and the file's object ID stay what kopia would write. The reader
// takes that canonical form and hands anything else to encoding/json.

// appendIndexJSON appends the index object of entries, byte for byte
// what json.NewEncoder(w).Encode(indirectIndex{...}) writes. ok is false
// for an entry the fast form does not cover (an object ID that would
// need escaping): the caller then uses encoding/json.
func appendIndexJSON(buf []byte, entries []object.IndirectObjectEntry) ([]byte, bool) {
	buf = append(buf, `{"stream":"`+indirectStreamID+`","entries":[`...)
	for i, e := range entries {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, '{')
		if e.Start != 0 {
			buf = append(buf, `"s":`...)
			buf = strconv.AppendInt(buf, e.Start, 10)
			buf = append(buf, ',')
		}
		if e.Length != 0 {
			buf = append(buf, `"l":`...)
			buf = strconv.AppendInt(buf, e.Length, 10)
			buf = append(buf, ',')
		}
		buf = append(buf, `"o":"`...)
		if cid, compressed, ok := e.Object.ContentID(); ok {
			// What ID.String gives, without its two allocations: a
			// content ID is a prefix letter and hex digits.
			if compressed {
				buf = append(buf, 'Z')
			}
			buf = cid.Append(buf)
		} else {
			id := e.Object.String()
			if !plainJSONString(id) {
				return buf, false
			}
			buf = append(buf, id...)
		}
		buf = append(buf, `"}`...)
	}
	if entries == nil {
		// encoding/json writes a nil slice as null.
		buf = append(buf[:len(buf)-1], "null"...)
		return append(buf, "}\n"...), true
	}
	return append(buf, "]}\n"...), true
}

// plainJSONString is whether encoding/json writes s between quotes as it
// is (no escapes, HTML escaping included).
func plainJSONString(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return false
		}
	}
	return true
}

// parseIndexJSON reads an index object. The canonical form (what kopia
// and appendIndexJSON write) is parsed directly; any other valid JSON
// (spacing, field order, escapes) goes through encoding/json, so both
// accept the same objects.
func parseIndexJSON(data []byte) (indirectIndex, error) {
	if ind, ok := parseCanonicalIndex(data); ok {
		return ind, nil
	}
	var ind indirectIndex
	if err := json.NewDecoder(bytes.NewReader(data)).Decode(&ind); err != nil {
		return indirectIndex{}, err
	}
	return ind, nil
}

func parseCanonicalIndex(data []byte) (indirectIndex, bool) {
	p := indexParser{data: data}
	head := `{"stream":"` + indirectStreamID + `","entries":[`
	if !p.literal(head) {
		return indirectIndex{}, false
	}
	ind := indirectIndex{StreamID: indirectStreamID, Entries: make([]object.IndirectObjectEntry, 0, len(data)/48)}
	if p.literal("]") {
		ind.Entries = []object.IndirectObjectEntry{}
	} else {
		for {
			e, ok := p.entry()
			if !ok {
				return indirectIndex{}, false
			}
			ind.Entries = append(ind.Entries, e)
			if p.literal(",") {
				continue
			}
			if p.literal("]") {
				break
			}
			return indirectIndex{}, false
		}
	}
	if !p.literal("}") {
		return indirectIndex{}, false
	}
	// A Decoder stops after the value: what follows is not read, but
	// only a newline is canonical.
	if rest := p.data[p.pos:]; len(rest) > 1 || (len(rest) == 1 && rest[0] != '\n') {
		return indirectIndex{}, false
	}
	return ind, true
}

type indexParser struct {
	data []byte
	pos  int
}

func (p *indexParser) literal(s string) bool {
	if len(p.data)-p.pos < len(s) || string(p.data[p.pos:p.pos+len(s)]) != s {
		return false
	}
	p.pos += len(s)
	return true
}

// entry reads {"s":N,"l":N,"o":"ID"}, s and l each optional (omitted
// when zero, as encoding/json's omitempty does).
func (p *indexParser) entry() (object.IndirectObjectEntry, bool) {
	var e object.IndirectObjectEntry
	if !p.literal("{") {
		return e, false
	}
	if p.literal(`"s":`) {
		n, ok := p.int()
		if !ok || n == 0 || !p.literal(",") {
			return e, false
		}
		e.Start = n
	}
	if p.literal(`"l":`) {
		n, ok := p.int()
		if !ok || n == 0 || !p.literal(",") {
			return e, false
		}
		e.Length = n
	}
	if !p.literal(`"o":"`) {
		return e, false
	}
	end := bytes.IndexByte(p.data[p.pos:], '"')
	if end < 0 {
		return e, false
	}
	raw := p.data[p.pos : p.pos+end]
	if bytes.IndexByte(raw, '\\') >= 0 {
		return e, false
	}
	id, err := object.ParseID(string(raw))
	if err != nil {
		return e, false
	}
	e.Object = id
	p.pos += end + 1
	return e, p.literal("}")
}

// int reads a JSON integer as encoding/json writes an int64: an optional
// minus and digits without leading zeros.
func (p *indexParser) int() (int64, bool) {
	start := p.pos
	if p.pos < len(p.data) && p.data[p.pos] == '-' {
		p.pos++
	}
	digits := p.pos
	for p.pos < len(p.data) && p.data[p.pos] >= '0' && p.data[p.pos] <= '9' {
		p.pos++
	}
	if p.pos == digits || (p.data[digits] == '0' && p.pos-digits > 1) {
		return 0, false
	}
	n, err := strconv.ParseInt(string(p.data[start:p.pos]), 10, 64)
	return n, err == nil
}

// encodeIndexJSON is appendIndexJSON with encoding/json as the fallback.
func encodeIndexJSON(entries []object.IndirectObjectEntry) ([]byte, error) {
	if buf, ok := appendIndexJSON(make([]byte, 0, 64+len(entries)*56), entries); ok {
		return buf, nil
	}
	var b bytes.Buffer
	if err := json.NewEncoder(&b).Encode(indirectIndex{StreamID: indirectStreamID, Entries: entries}); err != nil {
		return nil, fmt.Errorf("encode index object: %w", err)
	}
	return b.Bytes(), nil
}
