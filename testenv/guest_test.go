package testenv

import (
	"path/filepath"
	"strconv"
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
	g := NewGuest(t, l, "vmht-guest-self", filepath.Join(mnt, "images", "g.img"))
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
