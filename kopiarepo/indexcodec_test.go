package kopiarepo

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	"github.com/kopia/kopia/repo/object"
)

func randomObjectID(t testing.TB, rng *rand.Rand) object.ID {
	t.Helper()
	for {
		raw := make([]byte, []int{16, 32}[rng.IntN(2)])
		for i := range raw {
			raw[i] = byte(rng.Uint32())
		}
		s := hex.EncodeToString(raw)
		switch rng.IntN(4) {
		case 1:
			s = "Z" + s
		case 2:
			s = string(rune('g'+rng.IntN(20))) + s
		case 3:
			s = "I" + s
		}
		if id, err := object.ParseID(s); err == nil {
			return id
		}
	}
}

func randomEntries(t testing.TB, rng *rand.Rand, n int) []object.IndirectObjectEntry {
	entries := make([]object.IndirectObjectEntry, n)
	var off int64
	for i := range entries {
		length := []int64{0, 1, 4096, 131072, 1 << 33, rng.Int64N(1 << 40)}[rng.IntN(6)]
		if rng.IntN(10) == 0 {
			off = 0
		}
		entries[i] = object.IndirectObjectEntry{Start: off, Length: length, Object: randomObjectID(t, rng)}
		off += length
	}
	return entries
}

func encodingJSON(t testing.TB, entries []object.IndirectObjectEntry) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := json.NewEncoder(&b).Encode(indirectIndex{StreamID: indirectStreamID, Entries: entries}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// The hand-written writer must give encoding/json's bytes exactly: the
// index object's content ID, and so the file's object ID, depends on
// every byte.
func TestIndexJSONMatchesEncodingJSON(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	cases := [][]object.IndirectObjectEntry{nil, {}}
	for _, n := range []int{1, 2, 3, 17, 1000, 16384} {
		cases = append(cases, randomEntries(t, rng, n))
	}
	for _, entries := range cases {
		want := encodingJSON(t, entries)
		got, err := encodeIndexJSON(entries)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%d entries: hand-written index JSON differs from encoding/json's:\n got %.300s\nwant %.300s", len(entries), got, want)
		}
		if _, ok := parseCanonicalIndex(want); !ok && entries != nil {
			t.Fatalf("%d entries: encoding/json's output is not taken as canonical: %.300s", len(entries), want)
		}
		ind, err := parseIndexJSON(want)
		if err != nil {
			t.Fatal(err)
		}
		var ref indirectIndex
		if err := json.Unmarshal(want, &ref); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(ind, ref) {
			t.Fatalf("%d entries: parsed index differs from encoding/json's", len(entries))
		}
	}
}

// Whatever is not the canonical form is read by encoding/json, so the
// reader takes exactly what kopia's LoadIndexObject takes.
func TestIndexJSONOtherFormsAsEncodingJSON(t *testing.T) {
	id := randomObjectID(t, rand.New(rand.NewPCG(3, 4))).String()
	forms := []string{
		`{"stream":"kopia:indirect","entries":[{"l":5,"o":"` + id + `"}]}`,
		`{"stream":"kopia:indirect","entries":[{"l":5,"o":"` + id + `"}]}  `,
		`{"stream":"kopia:indirect","entries":[{"l":5,"o":"` + id + `"}]}{"x":1}`,
		`{"stream":"kopia:indirect","entries":[{"o":"` + id + `","l":5}]}`,
		`{"stream":"kopia:indirect","entries":[{"s":0,"l":5,"o":"` + id + `"}]}`,
		`{"stream":"kopia:indirect","entries":[{"l":05,"o":"` + id + `"}]}`,
		`{"stream":"kopia:indirect","entries":[{"l":5.0,"o":"` + id + `"}]}`,
		`{"stream":"kopia:indirect","entries":[{"l":-3,"o":"` + id + `"}]}`,
		`{"stream":"kopia:indirect","entries":[{"l":99999999999999999999,"o":"` + id + `"}]}`,
		`{"stream":"kopia:indirect","entries":[{"l":5,"o":"\u00` + id[:2] + id[2:] + `"}]}`,
		`{"stream":"kopia:indirect","entries":[{"l":5,"o":"nothex"}]}`,
		`{"stream":"kopia:indirect","entries":null}`,
		`{"stream":"kopia:indirect","entries":[]}`,
		`{"stream":"other","entries":[]}`,
		` {"stream":"kopia:indirect","entries":[{"l":5,"o":"` + id + `"}]}`,
		`{"stream":"kopia:indirect","entries":[{"l":5,"o":"` + id + `"},]}`,
		`{"stream":"kopia:indirect","entries":[{"l":5,"o":"` + id + `"}`,
		`{"stream":"kopia:indirect","entries":[{"l":5,"o":"` + id,
		``,
	}
	for _, f := range forms {
		var ref indirectIndex
		refErr := json.NewDecoder(strings.NewReader(f)).Decode(&ref)
		got, err := parseIndexJSON([]byte(f))
		if (err != nil) != (refErr != nil) {
			t.Errorf("%s: error %v, encoding/json's %v", f, err, refErr)
			continue
		}
		if err == nil && !reflect.DeepEqual(got, ref) {
			t.Errorf("%s: parsed %+v, encoding/json %+v", f, got, ref)
		}
	}
}

func FuzzIndexJSON(f *testing.F) {
	rng := rand.New(rand.NewPCG(5, 6))
	f.Add(encodingJSON(f, randomEntries(f, rng, 3)))
	f.Add([]byte(`{"stream":"kopia:indirect","entries":[]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var ref indirectIndex
		refErr := json.NewDecoder(bytes.NewReader(data)).Decode(&ref)
		got, err := parseIndexJSON(data)
		if (err != nil) != (refErr != nil) {
			t.Fatalf("%q: error %v, encoding/json's %v", data, err, refErr)
		}
		if err == nil && !reflect.DeepEqual(got, ref) {
			t.Fatalf("%q: parsed %+v, encoding/json %+v", data, got, ref)
		}
	})
}

func BenchmarkIndexJSON(b *testing.B) {
	entries := randomEntries(b, rand.New(rand.NewPCG(7, 8)), 16384)
	data := encodingJSON(b, entries)
	b.Run("encode/encoding-json", func(b *testing.B) {
		for b.Loop() {
			encodingJSON(b, entries)
		}
	})
	b.Run("encode/hand-written", func(b *testing.B) {
		for b.Loop() {
			if _, err := encodeIndexJSON(entries); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("decode/encoding-json", func(b *testing.B) {
		for b.Loop() {
			var ind indirectIndex
			if err := json.NewDecoder(bytes.NewReader(data)).Decode(&ind); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("decode/hand-written", func(b *testing.B) {
		for b.Loop() {
			if _, err := parseIndexJSON(data); err != nil {
				b.Fatal(err)
			}
		}
	})
}
