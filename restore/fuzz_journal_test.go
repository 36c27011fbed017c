package restore

import (
	"bytes"
	"hash/crc32"
	"strconv"
	"testing"
)

// FuzzParseJournal: a journal left by a crash may hold anything; parsing
// never panics, stops at a whole line, and accepts a range only from a line
// that checks out, so a torn or corrupt line can only make a range be
// fetched again.
func FuzzParseJournal(f *testing.F) {
	f.Add([]byte(journalMagic + `{"source":{"kind":"kopia","snapshot":"k1","path":"images/web.qcow2","size":33554432},"range_size":8388608,"started":"2026-12-01T05:00:00Z"}` + "\n" + journalLine(0, "") + journalLine(3, "") + "7 0000"))
	f.Add([]byte(journalMagic + "{}\n" + journalLine(1, "") + "garbage\n\x00\xff\n"))
	f.Add([]byte("not a journal\n"))
	f.Add([]byte(journalMagic + "{\"range_size\": -1}\n-1 00000000\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, done, end, problem := parseJournal(data)
		if problem != "" {
			if done != nil || end != 0 {
				t.Fatalf("a refused journal (%s) still yields ranges %v or an end %d", problem, done, end)
			}
			return
		}
		if end < 1 || end > int64(len(data)) || data[end-1] != '\n' {
			t.Fatalf("end %d is not just past a complete line of %d bytes", end, len(data))
		}
		checked := map[int]bool{}
		for _, line := range bytes.Split(data[bytes.IndexByte(data, '\n')+1:end], []byte{'\n'}) {
			num, sum, _ := bytes.Cut(line, []byte{' '})
			crc, err := strconv.ParseUint(string(sum), 16, 32)
			idx, err2 := strconv.Atoi(string(num))
			if err == nil && err2 == nil && uint32(crc) == crc32.ChecksumIEEE(num) {
				checked[idx] = true
			}
		}
		for idx := range done {
			if idx < 0 || !checked[idx] {
				t.Fatalf("range %d accepted without a line whose checksum checks out", idx)
			}
		}
	})
}

// FuzzJournalLine: every index written reads back as itself.
func FuzzJournalLine(f *testing.F) {
	f.Add(0)
	f.Add(123456)
	f.Fuzz(func(t *testing.T, idx int) {
		if idx < 0 {
			idx = -idx
		}
		if idx < 0 {
			return
		}
		line := journalLine(idx, "")
		got, ok := parseJournalLine([]byte(line[:len(line)-1]))
		if !ok || got != idx {
			t.Fatalf("journalLine(%d) = %q reads back as %d, %v", idx, line, got, ok)
		}
	})
}
