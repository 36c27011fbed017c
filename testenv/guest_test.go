package testenv

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestGuest boots a real guest on a zfs-fuse dataset and checks its
// workload: heartbeats on the console, fsynced valid records on its disk,
// and a guest agent that freezes and thaws its filesystem.
func TestGuest(t *testing.T) {
	l := DialQEMU(t)
	pool := NewPool(t, 128)
	_, mnt := pool.Dataset(t, "libvirt")
	g := NewGuest(t, l, GuestName("self"), filepath.Join(mnt, "images", "g.img"))
	g.Console.WaitHeartbeat(t, 4, time.Minute)
	g.Console.WaitFor(t, "vmht: synced seq=3", time.Minute)
	if _, err := l.DomainFsfreeze(g.Dom, nil, 0); err != nil {
		t.Fatalf("fsfreeze through the guest agent: %v\n%s", err, g.Console.Text())
	}
	frozenAt := len(g.Console.Synced())
	hb := g.Console.LastHeartbeat()
	g.Console.WaitHeartbeat(t, hb.N+3, time.Minute)
	if n := len(g.Console.Synced()); n > frozenAt+1 {
		t.Errorf("records kept being synced while frozen: %d then %d", frozenAt, n)
	}
	if _, err := l.DomainFsthaw(g.Dom, nil, 0); err != nil {
		t.Fatalf("thaw: %v", err)
	}
	last := g.Console.Synced()
	g.Console.WaitFor(t, "vmht: synced seq="+strconv.Itoa(last[len(last)-1].N+2), time.Minute)
	g.Destroy(t)
	ReplayJournal(t, g.Disk) // the guest is gone: its disk may need its journal
	n := CheckRecords(t, ReadRecords(t, g.Disk))
	if n < last[len(last)-1].N {
		t.Errorf("disk holds %d records, the guest had synced %d", n, last[len(last)-1].N)
	}
}

// TestParseRecords: whole records with their checksum pass; a torn or
// altered one does not.
func TestParseRecords(t *testing.T) {
	line := func(seq int, up string) string {
		_, u, _ := parseRecord(strconv.Itoa(seq), up)
		return "seq=" + strconv.Itoa(seq) + " up=" + up + " sum=" + strconv.FormatInt(recordSum(int64(seq), u), 10) + "\n"
	}
	good := line(1, "3.07") + line(2, "4.10")
	if r := ParseRecords(good); len(r.Valid) != 2 || len(r.Bad) != 0 {
		t.Errorf("good records: %+v", r)
	}
	// What the guest's shell printed for seq=7 at 12.09 s of uptime.
	if r := ParseRecords("seq=7 up=12.09 sum=" + strconv.FormatInt((7*1000003+1209*7919+12345)%4294967291, 10) + "\n"); len(r.Valid) != 1 {
		t.Errorf("shell record: %+v", r)
	}
	for _, bad := range []string{good + "seq=3 up=5.1", good + "seq=3 up=5.12 sum=1\n", strings.Replace(good, "up=4.10", "up=4.11", 1), good[:len(good)-1]} {
		if r := ParseRecords(bad); len(r.Bad) != 1 {
			t.Errorf("%q: %+v", bad, r)
		}
	}
}
