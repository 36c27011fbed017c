package restore

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestJournalToleratesTornAndBadLines(t *testing.T) {
	name := filepath.Join(t.TempDir(), "x"+JournalSuffix)
	h := journalHeader{Source: SourceIdentity{Snapshot: "42", Path: "a/b", Size: 100, ModTime: time.Unix(5, 6).UTC()}, RangeSize: 4096}
	j, done, restart, err := openJournal(name, h)
	if err != nil || len(done) != 0 || restart != "" {
		t.Fatalf("new journal: %v %v %q", err, done, restart)
	}
	if err := j.record([]int{0, 3, 7}); err != nil {
		t.Fatal(err)
	}
	j.Close()

	// A line with a wrong checksum, and a torn last line.
	f, err := os.OpenFile(name, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("5 00000000\n\x00\x00\n12")
	f.Close()

	j, done, restart, err = openJournal(name, h)
	if err != nil || restart != "" {
		t.Fatalf("reopen: %v %q", err, restart)
	}
	if len(done) != 3 || !done[0] || !done[3] || !done[7] {
		t.Errorf("ranges read back: %v, want 0 3 7", done)
	}
	// The next record starts on a line of its own, not glued to "12".
	if err := j.record([]int{1}); err != nil {
		t.Fatal(err)
	}
	j.Close()
	data, _ := os.ReadFile(name)
	if strings.Contains(string(data), "121 ") {
		t.Errorf("a record was appended to the torn line:\n%s", data)
	}
	j, done, _, err = openJournal(name, h)
	if err != nil || len(done) != 4 || !done[1] {
		t.Errorf("after repair: %v %v", err, done)
	}

	// A second opener is refused while the first holds it.
	if _, _, _, err := openJournal(name, h); err == nil || !strings.Contains(err.Error(), "another restore") {
		t.Errorf("second open of a locked journal: %v", err)
	}
	j.Close()

	// Another identity discards it.
	other := h
	other.Source.ModTime = time.Unix(9, 0).UTC()
	j, done, restart, err = openJournal(name, other)
	if err != nil || len(done) != 0 || !strings.Contains(restart, "modified") {
		t.Errorf("journal of another mtime: %v %v %q", err, done, restart)
	}
	j.Close()

	// Garbage instead of a header.
	os.WriteFile(name, []byte("garbage\n1 2\n"), 0o600)
	j, done, restart, err = openJournal(name, h)
	if err != nil || len(done) != 0 || !strings.Contains(restart, "unreadable") {
		t.Errorf("garbage journal: %v %v %q", err, done, restart)
	}
	j.Close()
}

func TestMeterRateAndETA(t *testing.T) {
	t0 := time.Unix(1000, 0)
	m := newMeter(t0)
	if r := m.observe(t0.Add(500*time.Millisecond), 50); r != 100 {
		t.Errorf("rate over the first half second %v, want 100", r)
	}
	for s := 1; s <= 10; s++ {
		m.observe(t0.Add(time.Duration(s)*time.Second), int64(s)*100)
	}
	// Faster for the last seconds: the window follows.
	r := m.observe(t0.Add(11*time.Second), 1000+1000)
	if r < 250 || r > 300 {
		t.Errorf("windowed rate %v, want about (2000-600)/5 = 280", r)
	}
	if e := eta(1000, 100); e != 10*time.Second {
		t.Errorf("eta %v", e)
	}
	if eta(1, 0) != -1 || eta(0, 0) != 0 {
		t.Errorf("eta edge cases")
	}
}

// Ranges journaled without a sync count while this kernel runs; written by
// another boot they are fetched again.
func TestJournalUnsyncedLinesCountOnlyInTheirBoot(t *testing.T) {
	boot := currentBootID()
	if boot == "" {
		t.Fatal("/proc/sys/kernel/random/boot_id unreadable: the kernel always provides it")
	}
	name := filepath.Join(t.TempDir(), "x"+JournalSuffix)
	h := journalHeader{Source: SourceIdentity{Snapshot: "42", Path: "a/b", Size: 100}, RangeSize: 4096}
	j, _, _, err := openJournal(name, h)
	if err != nil {
		t.Fatal(err)
	}
	if err := j.record([]int{0}); err != nil {
		t.Fatal(err)
	}
	if err := j.recordUnsynced([]int{1, 2}, boot); err != nil {
		t.Fatal(err)
	}
	if err := j.recordUnsynced([]int{3}, "00000000-dead-beef-0000-000000000000"); err != nil {
		t.Fatal(err)
	}
	j.Close()
	j, done, restart, err := openJournal(name, h)
	if err != nil || restart != "" {
		t.Fatalf("reopen: %v %q", err, restart)
	}
	j.Close()
	if len(done) != 3 || !done[0] || !done[1] || !done[2] || done[3] {
		t.Errorf("ranges read back: %v, want 0 (durable), 1 and 2 (this boot), not 3 (another boot)", done)
	}
}
