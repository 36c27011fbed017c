package zfs

import (
	"strings"
	"testing"
)

// FuzzParseSnapshots: zfs get output, from either dialect, a newer zfs or
// a broken pipe, never panics the parser, and every snapshot it returns is
// one of the dataset's, named as the output names it, with a guid.
func FuzzParseSnapshots(f *testing.F) {
	f.Add("DATA/libvirt", "DATA/libvirt\tguid\t123\t-\nDATA/libvirt@2023-03-04_05:00:01\tguid\t9876543210\nDATA/libvirt@2023-03-04_05:00:01\tcreation\t1677906001\nDATA/libvirt@2023-03-04_05:00:01\tused\t-\n")
	f.Add("DATA/libvirt", "DATA/libvirt@a\tguid\t1\nDATA/libvirt@b\tguid\t18446744073709551615\nDATA/libvirt@b\tcreation\t18446744073709551615\nDATA/libvirt/child@a\tguid\t3\n")
	f.Add("D", "D@x\tguid\tnotanumber\n")
	f.Add("D", "D@x\tcreation\t5\n")
	f.Add("D", "D@\tguid\t1\n\t\t\n")
	f.Fuzz(func(t *testing.T, dataset, out string) {
		snaps, err := parseSnapshots(dataset, out)
		if err != nil {
			return
		}
		for _, s := range snaps {
			if s.Dataset != dataset || s.GUID == 0 || !strings.Contains(out, dataset+"@"+s.Name+"\t") {
				t.Fatalf("parsed %+v from output that does not name it with a guid:\n%q", s, out)
			}
		}
		for i := 1; i < len(snaps); i++ {
			if snaps[i].FullName() == snaps[i-1].FullName() {
				t.Fatalf("%s listed twice", snaps[i].FullName())
			}
		}
	})
}

// FuzzParseHolds: vmhistory's own hold records are read back only from
// locally set properties of the dataset's snapshots.
func FuzzParseHolds(f *testing.F) {
	f.Add("DATA/libvirt", "vmhistory-restore-", "DATA/libvirt@s1\t"+HoldPropertyPrefix+"vmhistory-restore-kvm1-42-1000\ton\tlocal\nDATA/libvirt@s1\t"+HoldPropertyPrefix+"vmhistory-base\ton\tinherited from DATA\n")
	f.Add("D", "", "D@s\tcompression\toff\tdefault\nD/c@s\t"+HoldPropertyPrefix+"x\ton\tlocal\n")
	f.Fuzz(func(t *testing.T, dataset, prefix, out string) {
		for snap, tags := range parseHoldsWithPrefix(out, dataset, prefix) {
			if !strings.HasPrefix(snap, dataset+"@") {
				t.Fatalf("hold on %q, not a snapshot of %q", snap, dataset)
			}
			for _, tag := range tags {
				if !strings.HasPrefix(tag, prefix) || !strings.Contains(out, snap+"\t"+HoldPropertyPrefix+tag+"\t") {
					t.Fatalf("tag %q on %s not from a local record with prefix %q", tag, snap, prefix)
				}
			}
		}
		for _, tag := range parseHoldProperties(out) {
			if !strings.Contains(out, HoldPropertyPrefix+tag+"\t") {
				t.Fatalf("tag %q not in the output", tag)
			}
		}
	})
}
