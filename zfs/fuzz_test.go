package zfs

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"reflect"
	"runtime"
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

// FuzzParseStream: whatever bytes arrive — a damaged stream, a hostile
// one, a newer zfs — the reader neither panics nor allocates by a length
// field, the pull reader and the push parser fed in pieces agree, and
// what it returns is sorted, merged and describes a change FileChange
// can take.
func FuzzParseStream(f *testing.F) {
	// Small streams of every record type: the fuzzer mutates them
	// quickly, and their lengths are what it learns to break.
	small := func(w *testStream) {
		w.begin(1, 2, "tank/libvirt@b", lz4Features, []byte("nvlist\x00\x00"))
		w.objectRange(0, 32)
		w.object(5, dmuTypePlainFile, dmuTypeSA, 128<<10, saZnode(2, 0o100644, 300_000, 3, 1, testMtime), 0)
		w.object(6, dmuTypePlainFile, dmuTypeZnode, 512, make([]byte, znodePhysSize), 0)
		w.free(5, 384<<10, ToEnd)
		w.freeObjects(7, 25)
		w.spill(5, 16)
		w.write(5, 0, 128<<10, 24)
		w.write(5, 256<<10, 8, 0)
		w.embedded(5, 128<<10, 128<<10, 100, 33)
		w.record(drrWriteByRef, func(h []byte) { put64(h, 8, 6); put64(h, 24, 512) }, nil)
		w.end()
	}
	for _, build := range []func(w *testStream){small, func(w *testStream) {
		w.noRecordChecksums = true
		small(w)
	}, func(w *testStream) {
		w.beginType(hdrCompound, 0, 0, "tank/libvirt@c", 0, nil)
		w.packageEnd(true)
		small(w)
		w.begin(2, 3, "tank/libvirt@c", featureRaw, nil)
		w.object(5, dmuTypePlainFile, dmuTypeSA, 128<<10, nil, 64)
		w.end()
		w.packageEnd(false)
	}} {
		stream := encode(build)
		f.Add(stream, uint64(1))
		f.Add(stream[:len(stream)/2], uint64(2))
	}
	f.Fuzz(func(t *testing.T, stream []byte, seed uint64) {
		pulled, pullErr := ParseStream(bytes.NewReader(stream))

		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		sp := NewStreamParser()
		rng := rand.New(rand.NewPCG(seed, seed>>32))
		for rest := stream; len(rest) > 0; {
			n := min(len(rest), rng.IntN(2*recordSize+1))
			if m, err := sp.Write(rest[:n]); m != n || err != nil {
				t.Fatalf("Write(%d) = %d, %v", n, m, err)
			}
			rest = rest[n:]
		}
		pushed, pushErr := sp.Result()
		runtime.ReadMemStats(&after)
		if grown := after.TotalAlloc - before.TotalAlloc; grown > 1<<20+64*uint64(len(stream)) {
			t.Fatalf("parsing %d bytes allocated %d", len(stream), grown)
		}

		if (pullErr == nil) != (pushErr == nil) || pullErr != nil && pullErr.Error() != pushErr.Error() {
			t.Fatalf("pull reader: %v; push parser: %v", pullErr, pushErr)
		}
		if pullErr != nil {
			if !errors.Is(pullErr, ErrStreamInvalid) && !errors.Is(pullErr, ErrStreamTruncated) &&
				!errors.Is(pullErr, ErrStreamChecksum) && !errors.Is(pullErr, ErrStreamResumed) {
				t.Fatalf("error of no kind: %v", pullErr)
			}
			return
		}
		if pulled.Bytes != int64(len(stream)) || !reflect.DeepEqual(pulled, pushed) {
			t.Fatalf("results differ or miscount: %d of %d bytes", pulled.Bytes, len(stream))
		}
		sorted := func(rs []Range) bool {
			for i := 1; i < len(rs); i++ {
				if rs[i].Offset <= rs[i-1].End() {
					return false
				}
			}
			return true
		}
		for _, sub := range pulled.Substreams {
			for _, n := range sub.Objects() {
				facts := sub.Object(n)
				if !sorted(facts.Writes) || !sorted(facts.Embedded) || !sorted(facts.Frees) {
					t.Fatalf("object %d: ranges not sorted and merged: %+v", n, facts)
				}
				c := FileChange(1<<20, 1<<10, facts)
				for _, r := range append(append([]Range(nil), c.Reread...), c.Zeroed...) {
					if r.End() > c.NewSize || r.Length == 0 {
						t.Fatalf("object %d: range %v beyond the new size %d", n, r, c.NewSize)
					}
				}
			}
		}
	})
}
