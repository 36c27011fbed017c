package zfs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"
)

// testStream writes send streams laid out as OpenZFS's dmu_replay_record_t
// (include/sys/zfs_ioctl.h; the field offsets below were checked with
// offsetof against that header) and checksummed as dmu_send.c's
// dump_record does: fletcher-4 over each header's first 280 bytes, the
// running value stored in the last 32 (all records but BEGIN), then over
// those 32 and the payload. No OpenZFS runs here; zfs-fuse's streams are
// read for real in sendstream_integration_test.go.
type testStream struct {
	out bytes.Buffer
	sum [4]uint64
	// noRecordChecksums leaves the per-record checksum zero, as zfs-fuse
	// and OpenZFS before 0.7 do.
	noRecordChecksums bool
	toGUID            uint64
}

// fletcher is the plain definition of fletcher-4, kept apart from the
// reader's so that one does not check itself.
func (w *testStream) fletcher(p []byte) {
	for i := 0; i+4 <= len(p); i += 4 {
		w.sum[0] += uint64(binary.LittleEndian.Uint32(p[i:]))
		w.sum[1] += w.sum[0]
		w.sum[2] += w.sum[1]
		w.sum[3] += w.sum[2]
	}
}

func (w *testStream) record(typ uint32, set func(h []byte), payload []byte) {
	h := make([]byte, recordSize)
	binary.LittleEndian.PutUint32(h, typ)
	if typ == drrBegin {
		binary.LittleEndian.PutUint32(h[4:], uint32(len(payload)))
	}
	set(h)
	w.fletcher(h[:recordChecksumStart])
	if typ != drrBegin && !w.noRecordChecksums {
		for i, v := range w.sum {
			binary.LittleEndian.PutUint64(h[recordChecksumStart+8*i:], v)
		}
	}
	w.fletcher(h[recordChecksumStart:])
	w.out.Write(h)
	w.fletcher(payload)
	w.out.Write(payload)
}

func put64(h []byte, off int, v uint64) { binary.LittleEndian.PutUint64(h[off:], v) }
func put32(h []byte, off int, v uint32) { binary.LittleEndian.PutUint32(h[off:], v) }

func (w *testStream) begin(from, to uint64, name string, features uint64, payload []byte) {
	w.beginType(hdrSubstream, from, to, name, features, payload)
	w.toGUID = to
}

func (w *testStream) beginType(hdrType, from, to uint64, name string, features uint64, payload []byte) {
	w.sum = [4]uint64{}
	w.record(drrBegin, func(h []byte) {
		put64(h, 8, dmuBackupMagic)
		put64(h, 16, features<<2|hdrType)
		put64(h, 24, 1_700_000_000)
		put32(h, 32, 2) // DMU_OST_ZFS
		put64(h, 40, to)
		put64(h, 48, from)
		copy(h[56:], name)
	}, payload)
}

// end closes a substream: drr_end holds the checksum of all before it.
func (w *testStream) end() {
	before := w.sum
	w.record(drrEnd, func(h []byte) {
		for i, v := range before {
			put64(h, 8+8*i, v)
		}
		put64(h, 40, w.toGUID)
	}, nil)
}

// packageEnd is the END libzfs writes after a package header (checksum
// of the header) or as the package's last record (zero); neither carries
// a per-record checksum.
func (w *testStream) packageEnd(withChecksum bool) {
	h := make([]byte, recordSize)
	put32(h, 0, drrEnd)
	if withChecksum {
		for i, v := range w.sum {
			put64(h, 8+8*i, v)
		}
	}
	w.out.Write(h)
}

func (w *testStream) object(obj uint64, typ, bonusType, blksz uint32, bonus []byte, rawBonusLen uint32) {
	payload := append([]byte(nil), bonus...)
	for len(payload)%8 != 0 {
		payload = append(payload, 0)
	}
	if rawBonusLen != 0 {
		payload = make([]byte, rawBonusLen)
		copy(payload, bonus)
	}
	w.record(drrObject, func(h []byte) {
		put64(h, 8, obj)
		put32(h, 16, typ)
		put32(h, 20, bonusType)
		put32(h, 24, blksz)
		put32(h, 28, uint32(len(bonus)))
		h[34] = 1 // drr_dn_slots
		put32(h, 36, rawBonusLen)
		put64(h, 40, w.toGUID)
	}, payload)
}

// write is a DRR_WRITE of lsize logical bytes; psize > 0 makes it a
// compressed write (send -c) whose payload is psize bytes.
func (w *testStream) write(obj, off, lsize, psize uint64) {
	n := lsize
	if psize > 0 {
		n = psize
	}
	payload := make([]byte, n)
	for i := range payload {
		payload[i] = byte(off>>12) + byte(i)
	}
	w.record(drrWrite, func(h []byte) {
		put64(h, 8, obj)
		put32(h, 16, dmuTypePlainFile)
		put64(h, 24, off)
		put64(h, 32, lsize)
		put64(h, 40, w.toGUID)
		h[48] = 7 // fletcher4 block checksum
		if psize > 0 {
			h[50] = 15 // ZIO_COMPRESS_LZ4
			put64(h, 96, psize)
		}
	}, payload)
}

func (w *testStream) embedded(obj, off, length uint64, lsize, psize uint32) {
	w.record(drrWriteEmbedded, func(h []byte) {
		put64(h, 8, obj)
		put64(h, 16, off)
		put64(h, 24, length)
		put64(h, 32, w.toGUID)
		h[40] = 15 // lz4
		put32(h, 48, lsize)
		put32(h, 52, psize)
	}, bytes.Repeat([]byte{0xe7}, int(roundUp8(uint64(psize)))))
}

func (w *testStream) free(obj, off, length uint64) {
	w.record(drrFree, func(h []byte) {
		put64(h, 8, obj)
		put64(h, 16, off)
		put64(h, 24, length)
		put64(h, 32, w.toGUID)
	}, nil)
}

func (w *testStream) freeObjects(first, n uint64) {
	w.record(drrFreeObjects, func(h []byte) {
		put64(h, 8, first)
		put64(h, 16, n)
		put64(h, 24, w.toGUID)
	}, nil)
}

func (w *testStream) objectRange(first, n uint64) {
	w.record(drrObjectRange, func(h []byte) {
		put64(h, 8, first)
		put64(h, 16, n)
		put64(h, 24, w.toGUID)
	}, nil)
}

func (w *testStream) spill(obj, length uint64) {
	w.record(drrSpill, func(h []byte) {
		put64(h, 8, obj)
		put64(h, 16, length)
		put64(h, 24, w.toGUID)
	}, make([]byte, length))
}

// saZnode builds an OpenZFS system-attribute bonus in the layout
// zfs_mknode writes for a regular file: sa_hdr_phys_t (8 bytes: magic,
// layout number and header size, one variable length — the ACL's), MODE,
// SIZE, GEN, UID, GID, PARENT, FLAGS, ATIME, MTIME, CTIME, CRTIME, LINKS,
// DACL_COUNT, DACL_ACES.
func saZnode(layout uint16, mode, size, gen, links uint64, mtime time.Time) []byte {
	acl := bytes.Repeat([]byte{0xac}, 24)
	b := make([]byte, 8+128+8+len(acl))
	put32(b, 0, saMagic)
	binary.LittleEndian.PutUint16(b[4:], 1<<10|layout) // header of 1 * 8 bytes
	binary.LittleEndian.PutUint16(b[6:], uint16(len(acl)))
	a := b[8:]
	put64(a, 0, mode)
	put64(a, 8, size)
	put64(a, 16, gen)
	put64(a, 24, 107) // uid
	put64(a, 32, 108) // gid
	put64(a, 40, 34)  // parent
	put64(a, 48, 0x40800000000)
	for _, off := range []int{56, 72, 88, 104} {
		put64(a, off, uint64(mtime.Unix()))
		put64(a, off+8, uint64(mtime.Nanosecond()))
	}
	put64(a, 120, links)
	put64(a, 128, 1) // DACL_COUNT
	copy(a[136:], acl)
	return b
}

const (
	lz4Features  = featureSASpill | featureEmbedData | featureLZ4 | featureLargeBlocks | featureCompressed | featureLargeDnode
	testFromGUID = 0x1111
	testToGUID   = 0x2222
)

var testMtime = time.Unix(1_700_000_123, 456_000_000)

// openZFSNight is an incremental stream as OpenZFS 2.x sends `zfs send
// -c -L -e` after a night: file 128 (1 MiB records) got a compressed
// large write, an embedded block and a punched hole; file 129 only its
// dnode block's OBJECT record; 130..131 were deleted.
func openZFSNight(w *testStream) {
	w.begin(testFromGUID, testToGUID, "tank/libvirt@2023-03-05", lz4Features, []byte("\x00\x01\x02\x03nvlist-of-the-begin-record\x00\x00\x00\x00"))
	w.objectRange(128, 32)
	w.object(128, dmuTypePlainFile, dmuTypeSA, 1<<20, saZnode(2, 0o100600, 5<<20+1000, 9, 1, testMtime), 0)
	w.free(128, 6<<20, ToEnd)
	w.object(129, dmuTypePlainFile, dmuTypeSA, 128<<10, saZnode(2, 0o100644, 300_000, 11, 1, testMtime), 0)
	w.free(129, 384<<10, ToEnd)
	w.spill(129, 512)
	w.freeObjects(130, 2)
	w.write(128, 1<<20, 1<<20, 70_000)
	w.write(128, 2<<20, 1<<20, 0)
	w.embedded(128, 4<<20, 1<<20, 96, 41)
	w.free(128, 3<<20, 1<<20)
	w.end()
}

// parseBoth reads a stream through ParseStream and through Write in
// random pieces, and checks the two agree.
func parseBoth(t *testing.T, stream []byte, seed uint64) (*SendStream, error) {
	t.Helper()
	pulled, pullErr := ParseStream(bytes.NewReader(stream))
	sp := NewStreamParser()
	rng := rand.New(rand.NewPCG(seed, 42))
	for rest := stream; len(rest) > 0; {
		n := min(len(rest), 1+rng.IntN(700))
		if rng.IntN(8) == 0 {
			n = min(len(rest), rng.IntN(3*recordSize))
		}
		if m, err := sp.Write(rest[:n]); m != n || err != nil {
			t.Fatalf("Write(%d bytes) = %d, %v: the writer side must never fail", n, m, err)
		}
		rest = rest[n:]
	}
	pushed, pushErr := sp.Result()
	if (pullErr == nil) != (pushErr == nil) || pullErr != nil && pullErr.Error() != pushErr.Error() {
		t.Fatalf("ParseStream: %v; pushed in pieces: %v", pullErr, pushErr)
	}
	if !reflect.DeepEqual(pulled, pushed) {
		t.Fatalf("ParseStream and the pieces pushed differ:\n%+v\n%+v", pulled, pushed)
	}
	return pulled, pullErr
}

func TestOpenZFSStreamRecords(t *testing.T) {
	var w testStream
	openZFSNight(&w)
	st, err := parseBoth(t, w.out.Bytes(), 1)
	if err != nil {
		t.Fatal(err)
	}
	if st.Bytes != int64(w.out.Len()) || len(st.Substreams) != 1 {
		t.Fatalf("%d bytes, %d substreams; want %d, 1", st.Bytes, len(st.Substreams), w.out.Len())
	}
	sub := st.Substreams[0]
	want := StreamBegin{FromGUID: testFromGUID, ToGUID: testToGUID, ToName: "tank/libvirt@2023-03-05",
		Creation: time.Unix(1_700_000_000, 0), Features: lz4Features, ObjsetType: 2}
	if sub.Begin != want {
		t.Errorf("begin %+v, want %+v", sub.Begin, want)
	}
	if sub.WriteBytes != 2<<20 {
		t.Errorf("WriteBytes %d, want the 2 MiB logical of the two writes", sub.WriteBytes)
	}
	if got := fmt.Sprint(sub.Objects()); got != "[128 129]" {
		t.Errorf("objects %s", got)
	}
	f := sub.Object(128)
	if got := fmt.Sprint(f.Writes, f.Embedded, f.Frees); got != "[[1048576, 3145728)] [[4194304, 5242880)] [[3145728, 4194304) [6291456, end)]" {
		t.Errorf("object 128: writes, embedded, frees %s", got)
	}
	z := f.Record.Znode
	if f.Record.Type != dmuTypePlainFile || f.Record.BonusType != dmuTypeSA || f.Record.BlockSize != 1<<20 || z == nil {
		t.Fatalf("object 128 record %+v", f.Record)
	}
	wantZ := Znode{Mode: 0o100600, Size: 5<<20 + 1000, Gen: 9, Links: 1, Parent: 34, UID: 107, GID: 108, Flags: 0x40800000000,
		Atime: testMtime, Mtime: testMtime, Ctime: testMtime, Crtime: testMtime, SALayout: 2}
	if *z != wantZ {
		t.Errorf("znode %+v, want %+v", *z, wantZ)
	}
	if f.Freed || !sub.Object(130).Freed || !sub.Object(131).Freed || sub.Object(132).Freed {
		t.Errorf("freed: 128 %v, 130 %v, 131 %v, 132 %v", f.Freed, sub.Object(130).Freed, sub.Object(131).Freed, sub.Object(132).Freed)
	}
	if fmt.Sprint(sub.FreedObjects, sub.ObjectRanges) != "[{130 2}] [{128 32}]" {
		t.Errorf("freed objects %v, object ranges %v", sub.FreedObjects, sub.ObjectRanges)
	}

	c := FileChange(5<<20+1000, 20, f)
	if c.Full != "" || fmt.Sprint(c.Reread, c.Zeroed) != "[[1048576, 3145728) [4194304, 5242880)] [[3145728, 4194304)]" {
		t.Errorf("change of object 128: %+v", c)
	}
	if c := FileChange(300_000, 20, sub.Object(129)); !c.Unchanged() {
		t.Errorf("object 129, only in its dnode block: %+v, want no change", c)
	}
}

func TestStreamChecksums(t *testing.T) {
	var w testStream
	openZFSNight(&w)
	good := w.out.Bytes()

	// A flipped payload byte: the next record's own checksum catches it.
	bad := bytes.Clone(good)
	bad[recordSize+10] ^= 1 // in the BEGIN's nvlist
	if _, err := parseBoth(t, bad, 2); !errors.Is(err, ErrStreamChecksum) || !strings.Contains(err.Error(), "DRR_OBJECT_RANGE") {
		t.Errorf("flipped BEGIN payload: %v, want a checksum mismatch at the next record", err)
	}
	// A broken per-record checksum.
	bad = bytes.Clone(good)
	bad[len(good)-recordSize-1] ^= 0x80 // the last FREE's own checksum
	if _, err := parseBoth(t, bad, 3); !errors.Is(err, ErrStreamChecksum) {
		t.Errorf("broken record checksum: %v", err)
	}

	// Without per-record checksums (zfs-fuse, OpenZFS < 0.7) only the END
	// one is there: a flipped payload byte fails there.
	w = testStream{noRecordChecksums: true}
	openZFSNight(&w)
	if _, err := parseBoth(t, w.out.Bytes(), 4); err != nil {
		t.Fatalf("stream without per-record checksums: %v", err)
	}
	bad = bytes.Clone(w.out.Bytes())
	bad[len(bad)-6*recordSize-100] ^= 1 // in the second write's payload
	if _, err := parseBoth(t, bad, 5); !errors.Is(err, ErrStreamChecksum) || !strings.Contains(err.Error(), "DRR_END") {
		t.Errorf("flipped data byte without record checksums: %v, want a mismatch at END", err)
	}
}

// openZFSPackage is what `zfs send -I @a @c` writes: a package header
// (compound BEGIN and its END), one substream per snapshot, an empty END.
func openZFSPackage(w *testStream) {
	w.beginType(hdrCompound, 0, 0, "tank/libvirt@c", featureSASpill, nil)
	w.packageEnd(true)
	w.begin(0xa, 0xb, "tank/libvirt@b", lz4Features, nil)
	w.object(200, dmuTypePlainFile, dmuTypeSA, 128<<10, saZnode(3, 0o100644, 1<<20, 5, 1, testMtime), 0)
	w.write(200, 256<<10, 128<<10, 0)
	w.free(200, 1<<20, ToEnd)
	w.object(201, dmuTypePlainFile, dmuTypeSA, 128<<10, saZnode(3, 0o100644, 500_000, 5, 1, testMtime), 0)
	w.free(201, 512<<10, ToEnd)
	w.end()
	w.begin(0xb, 0xc, "tank/libvirt@c", lz4Features, nil)
	w.object(200, dmuTypePlainFile, dmuTypeSA, 128<<10, saZnode(3, 0o100644, 2<<20, 5, 1, testMtime), 0)
	w.free(200, 256<<10, 128<<10)
	w.write(200, 1536<<10, 128<<10, 0)
	w.free(200, 2<<20, ToEnd)
	w.object(201, dmuTypePlainFile, dmuTypeSA, 128<<10, saZnode(3, 0o100644, 100, 30, 1, testMtime), 0)
	w.write(201, 0, 512, 0)
	w.end()
	w.packageEnd(false)
}

func TestStreamPackageOfSubstreams(t *testing.T) {
	var w testStream
	openZFSPackage(&w)
	st, err := parseBoth(t, w.out.Bytes(), 6)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Substreams) != 2 || st.Substreams[0].Begin.ToName != "tank/libvirt@b" || st.Substreams[1].Begin.FromGUID != 0xb {
		t.Fatalf("substreams %+v", st.Substreams)
	}
	chain, err := st.Between(0xa, 0xc)
	if err != nil || len(chain) != 2 {
		t.Fatalf("Between(a, c): %v, %v", chain, err)
	}
	if last, err := st.Between(0xb, 0xc); err != nil || len(last) != 1 || last[0] != st.Substreams[1] {
		t.Errorf("Between(b, c): %v, %v", last, err)
	}
	if _, err := st.Between(0xc, 0xa); err == nil {
		t.Error("Between(c, a) found a chain")
	}

	// File 200 across both nights: a write at 256K later freed, growth
	// to 2 MiB with one write at 1.5M.
	c := FileChange(1<<20, 10, chain[0].Object(200), chain[1].Object(200))
	if c.Full != "" || c.NewSize != 2<<20 || fmt.Sprint(c.Reread, c.Zeroed) != "[[1572864, 1703936)] [[262144, 393216) [1048576, 1572864) [1703936, 2097152)]" {
		t.Errorf("file 200 over a..c: %+v", c)
	}
	// File 201 was reused by a new file in the second night.
	if c := FileChange(500_000, 10, chain[0].Object(201), chain[1].Object(201)); !strings.Contains(c.Full, "reused") {
		t.Errorf("file 201 over a..c: %+v, want reused", c)
	}
	if c := FileChange(500_000, 10, chain[0].Object(201)); !c.Unchanged() {
		t.Errorf("file 201 over a..b: %+v, want unchanged", c)
	}
}

// encode returns a stream built by fn.
func encode(fn func(w *testStream)) []byte {
	var w testStream
	fn(&w)
	return w.out.Bytes()
}

func TestStreamRefusals(t *testing.T) {
	for _, tc := range []struct {
		name   string
		stream []byte
		want   error
		says   string
	}{
		{"resumed", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", lz4Features|featureResuming, []byte("resume_object\x00\x00\x00"))
			w.end()
		}), ErrStreamResumed, "tank/a@b resumes"},
		{"unknown record type", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", 0, nil)
			w.record(11, func(h []byte) {}, nil)
			w.end()
		}), ErrStreamInvalid, "record type 11"},
		{"unknown feature", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", 1<<30, nil)
			w.end()
		}), ErrStreamInvalid, "feature flags 0x40000000"},
		{"redacted", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", 0, nil)
			w.record(drrRedact, func(h []byte) {}, nil)
			w.end()
		}), ErrStreamInvalid, "redacted"},
		{"not a stream", bytes.Repeat([]byte("not a stream "), 100), ErrStreamInvalid, "does not start with a DRR_BEGIN"},
		{"bad magic", func() []byte {
			b := encode(func(w *testStream) { w.begin(1, 2, "tank/a@b", 0, nil); w.end() })
			put64(b, 8, 0x2F5bacbad)
			return b
		}(), ErrStreamInvalid, "bad magic 0x2f5bacbad"},
		{"big-endian host", func() []byte {
			b := encode(func(w *testStream) { w.begin(1, 2, "tank/a@b", 0, nil); w.end() })
			binary.BigEndian.PutUint64(b[8:], dmuBackupMagic)
			return b
		}(), ErrStreamInvalid, "big-endian"},
		{"data after the end", append(encode(func(w *testStream) { w.begin(1, 2, "tank/a@b", 0, nil); w.end() }), 0, 0, 0, 0), ErrStreamInvalid, "data at offset 624 follows"},
		{"two substreams outside a package", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", 0, nil)
			w.end()
			w.begin(2, 3, "tank/a@c", 0, nil)
			w.end()
		}), ErrStreamInvalid, "follows the stream's last END"},
		{"END of another snapshot", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", 0, nil)
			w.toGUID = 3
			w.end()
		}), ErrStreamInvalid, "names guid 3"},
		{"hostile write length", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", 0, nil)
			w.record(drrWrite, func(h []byte) { put64(h, 8, 5); put64(h, 32, 1<<40) }, nil)
		}), ErrStreamInvalid, "logical size 1099511627776"},
		{"hostile compressed size", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", 0, nil)
			w.record(drrWrite, func(h []byte) { put64(h, 8, 5); put64(h, 32, 4096); h[50] = 15; put64(h, 96, math.MaxUint64) }, nil)
		}), ErrStreamInvalid, "out of range"},
		{"write past 2^64", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", 0, nil)
			w.record(drrWrite, func(h []byte) { put64(h, 8, 5); put64(h, 24, math.MaxUint64-100); put64(h, 32, 4096) }, nil)
		}), ErrStreamInvalid, "overflows"},
		{"hostile begin payload", func() []byte {
			b := encode(func(w *testStream) { w.begin(1, 2, "tank/a@b", 0, nil) })
			put32(b, 4, math.MaxUint32)
			return b
		}(), ErrStreamInvalid, "payload of 4294967295"},
		{"hostile bonus", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", 0, nil)
			w.record(drrObject, func(h []byte) { put64(h, 8, 5); put32(h, 28, 1<<31) }, nil)
		}), ErrStreamInvalid, "bonus of 2147483648"},
		{"hostile embedded", encode(func(w *testStream) {
			w.begin(1, 2, "tank/a@b", featureEmbedData, nil)
			w.record(drrWriteEmbedded, func(h []byte) { put64(h, 8, 5); put64(h, 24, 4096); put32(h, 52, 1<<30) }, nil)
		}), ErrStreamInvalid, "payload 1073741824"},
		{"record before BEGIN", encode(func(w *testStream) { w.free(5, 0, 10) }), ErrStreamInvalid, "does not start with a DRR_BEGIN"},
		{"record between substreams", encode(func(w *testStream) {
			w.beginType(hdrCompound, 0, 0, "tank/a@c", 0, nil)
			w.packageEnd(true)
			w.free(5, 0, 10)
		}), ErrStreamInvalid, "outside a substream"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseBoth(t, tc.stream, 7)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.says) {
				t.Errorf("got %v, want %v saying %q", err, tc.want, tc.says)
			}
		})
	}
}

// Every cut of a stream short of its end is truncated, never a result.
func TestStreamTruncatedAnywhere(t *testing.T) {
	var w testStream
	openZFSPackage(&w)
	stream := w.out.Bytes()
	for n := 0; n < len(stream); n += 1 + n%97 {
		sp := NewStreamParser()
		sp.Write(stream[:n])
		if _, err := sp.Result(); !errors.Is(err, ErrStreamTruncated) {
			t.Fatalf("cut at %d of %d: %v, want ErrStreamTruncated", n, len(stream), err)
		}
	}
	if _, err := ParseStream(bytes.NewReader(stream[:len(stream)-1])); !errors.Is(err, ErrStreamTruncated) || !strings.Contains(err.Error(), "header") {
		t.Errorf("one byte short: %v", err)
	}
}

// After a parse error the writer still takes every byte, and the error
// stays the first one.
func TestStreamParserKeepsTheFirstError(t *testing.T) {
	sp := NewStreamParser()
	garbage := bytes.Repeat([]byte{0xff}, 5000)
	for range 3 {
		if n, err := sp.Write(garbage); n != len(garbage) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	if err := sp.Err(); !errors.Is(err, ErrStreamInvalid) || !strings.Contains(err.Error(), "at offset 0") {
		t.Fatalf("Err() = %v", err)
	}
	if _, err := sp.Result(); err != sp.Err() {
		t.Errorf("Result error %v, Err %v", err, sp.Err())
	}
}

// A raw (encrypted) stream's bonus is ciphertext: the file's change is
// unknown, not read from noise.
func TestRawStreamBonusIsNotDecoded(t *testing.T) {
	st, err := parseBoth(t, encode(func(w *testStream) {
		w.begin(1, 2, "tank/secret@b", featureRaw|lz4Features, []byte("crypt_keydata\x00\x00\x00"))
		w.objectRange(0, 32)
		w.object(5, dmuTypePlainFile, dmuTypeSA, 128<<10, saZnode(2, 0o100644, 4096, 3, 1, testMtime), 320)
		w.write(5, 0, 128<<10, 4096)
		w.end()
	}), 8)
	if err != nil {
		t.Fatal(err)
	}
	f := st.Substreams[0].Object(5)
	if f.Record == nil || f.Record.Znode != nil {
		t.Fatalf("raw object record %+v, want no znode", f.Record)
	}
	if c := FileChange(4096, 10, f); !strings.Contains(c.Full, "encrypted") {
		t.Errorf("change %+v", c)
	}
}

func TestZnodeDecodingRefusesOtherLayouts(t *testing.T) {
	good := saZnode(2, 0o100644, 10, 3, 1, testMtime)
	if z := decodeZnode(dmuTypeSA, uint32(len(good)), good); z == nil || z.Size != 10 {
		t.Fatalf("standard layout: %+v", z)
	}
	for name, bonus := range map[string][]byte{
		"legacy layout 0":   saZnode(0, 0o100644, 10, 3, 1, testMtime),
		"not a mode":        saZnode(2, 0o777777, 10, 3, 1, testMtime),
		"short":             good[:100],
		"bad magic":         append([]byte{1}, good[1:]...),
		"times out of form": func() []byte { b := bytes.Clone(good); put64(b, 8+64, 2e9); return b }(),
	} {
		if z := decodeZnode(dmuTypeSA, uint32(len(bonus)), bonus); z != nil {
			t.Errorf("%s: decoded %+v", name, z)
		}
	}
	if z := decodeZnode(dmuTypeZnode, 100, make([]byte, 100)); z != nil {
		t.Errorf("short znode_phys_t decoded: %+v", z)
	}
}

// fileFacts is one substream's facts for a regular file.
func fileFacts(size, gen uint64, writes, frees []Range) ObjectFacts {
	return ObjectFacts{Object: 7, Writes: writes, Frees: frees, Record: &ObjectRecord{Type: dmuTypePlainFile, BonusType: dmuTypeZnode,
		Znode: &Znode{Mode: 0o100644, Size: size, Gen: gen, Links: 1}}}
}

func TestFileChange(t *testing.T) {
	const K = 1024
	for _, tc := range []struct {
		name    string
		oldSize uint64
		steps   []ObjectFacts
		want    string // Reread Zeroed NewSize, or the Full reason's words
	}{
		{"dnode block neighbour: OBJECT and its FREE to the end", 300_000, []ObjectFacts{fileFacts(300_000, 5, nil, []Range{{384 * K, ToEnd}})}, "[] [] 300000"},
		{"no record at all", 300_000, []ObjectFacts{{Object: 7}}, "[] [] 300000"},
		{"frees past the end", 300_000, []ObjectFacts{fileFacts(300_000, 5, nil, []Range{{300_000, 100}, {1 << 20, 15 << 20}})}, "[] [] 300000"},
		{"unaligned write", 1 << 20, []ObjectFacts{fileFacts(1<<20, 5, []Range{{384 * K, 128 * K}}, []Range{{1 << 20, ToEnd}})}, "[[393216, 524288)] [] 1048576"},
		{"truncate seen only in the size", 1 << 20, []ObjectFacts{fileFacts(512*K, 5, nil, []Range{{512 * K, ToEnd}})}, "[] [] 524288"},
		{"truncate into a block rewrites it", 1 << 20, []ObjectFacts{fileFacts(300_000, 5, []Range{{256 * K, 128 * K}}, nil)}, "[[262144, 300000)] [] 300000"},
		{"growth without a write is zeros", 3, []ObjectFacts{fileFacts(8_000_000, 5, []Range{{0, 128 * K}}, []Range{{128 * K, ToEnd}})}, "[[0, 131072)] [[131072, 8000000)] 8000000"},
		{"growth by truncate only", 300_000, []ObjectFacts{fileFacts(600_000, 5, nil, []Range{{384 * K, ToEnd}})}, "[] [[300000, 600000)] 600000"},
		{"hole punched", 2_000_000, []ObjectFacts{fileFacts(2_000_000, 5, nil, []Range{{384 * K, 256 * K}, {2 << 20, ToEnd}})}, "[] [[393216, 655360)] 2000000"},
		{"write past the new size", 100 * K, []ObjectFacts{fileFacts(100*K, 5, []Range{{0, 128 * K}}, nil)}, "[[0, 102400)] [] 102400"},
		{"reused object", 1000, []ObjectFacts{fileFacts(50_000, 32, []Range{{0, 50176}}, nil)}, "reused"},
		{"deleted", 1000, []ObjectFacts{{Object: 7, Freed: true}}, "deleted"},
		{"writes without OBJECT", 1000, []ObjectFacts{{Object: 7, Writes: []Range{{0, 512}}}}, "no DRR_OBJECT"},
		{"directory", 3, []ObjectFacts{{Object: 7, Record: &ObjectRecord{Type: 20, Znode: &Znode{Mode: 0o40755, Size: 3}}}}, "not a regular file"},
		{"truncated then regrown over two nights", 1 << 20, []ObjectFacts{
			fileFacts(256*K, 5, nil, []Range{{256 * K, ToEnd}}),
			fileFacts(1<<20, 5, []Range{{512 * K, 128 * K}}, []Range{{640 * K, ToEnd}})}, "[[524288, 655360)] [[262144, 524288) [655360, 1048576)] 1048576"},
		{"written, then freed the next night", 1 << 20, []ObjectFacts{
			fileFacts(1<<20, 5, []Range{{0, 256 * K}}, nil),
			fileFacts(1<<20, 5, nil, []Range{{128 * K, 128 * K}})}, "[[0, 131072)] [[131072, 262144)] 1048576"},
		{"freed, then written the next night", 1 << 20, []ObjectFacts{
			fileFacts(1<<20, 5, nil, []Range{{0, 256 * K}}),
			fileFacts(1<<20, 5, []Range{{128 * K, 128 * K}}, nil)}, "[[131072, 262144)] [[0, 131072)] 1048576"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := FileChange(tc.oldSize, 20, tc.steps...)
			got := fmt.Sprint(c.Reread, c.Zeroed, c.NewSize)
			if c.Full != "" {
				got = c.Full
			}
			if !strings.Contains(got, tc.want) || c.Full != "" && (c.Reread != nil || c.Zeroed != nil) {
				t.Errorf("got %q (%+v), want %q", got, c, tc.want)
			}
			if strings.HasPrefix(tc.want, "[] [] ") && !c.Unchanged() && c.NewSize == tc.oldSize {
				t.Errorf("%+v is not Unchanged", c)
			}
		})
	}
	if c := FileChange(10, 0, fileFacts(10, 5, nil, nil)); !strings.Contains(c.Full, "txg is unknown") {
		t.Errorf("without the base txg: %+v", c)
	}
}

// FileChange against a byte model: random nights of block writes, frees
// and size changes, each written as the stream would list it; every byte
// that differs at the end lies in Reread or Zeroed, and Zeroed bytes are
// zero.
func TestFileChangeCoversEveryChangedByte(t *testing.T) {
	const block = 64
	rng := rand.New(rand.NewPCG(9, 9))
	for iter := range 2000 {
		base := make([]byte, rng.IntN(20*block))
		for i := range base {
			base[i] = byte(1 + rng.IntN(255))
		}
		cur := bytes.Clone(base)
		var steps []ObjectFacts
		for range 1 + rng.IntN(3) {
			var writes, frees []Range
			for range rng.IntN(4) {
				switch off := uint64(rng.IntN(24)) * block; rng.IntN(4) {
				case 0: // truncate, as ZFS does: the cut block is rewritten, the blocks after it freed
					size := uint64(rng.IntN(len(cur) + 1))
					cur = cur[:size]
					if size%block != 0 {
						writes = append(writes, Range{size / block * block, block})
					}
					frees = append(frees, Range{(size + block - 1) / block * block, ToEnd})
				case 1: // grow without writing
					cur = append(cur, make([]byte, rng.IntN(3*block))...)
				case 2: // free (a hole) below the end
					for i := off; i < off+block && i < uint64(len(cur)); i++ {
						cur[i] = 0
					}
					frees = append(frees, Range{off, block})
				default: // rewrite a block, maybe growing the file
					end := off + uint64(1+rng.IntN(block))
					for uint64(len(cur)) < end {
						cur = append(cur, 0)
					}
					for i := off; i < end; i++ {
						cur[i] = byte(rng.IntN(256))
					}
					writes = append(writes, Range{off, block})
				}
			}
			// A FREE from the last block to the end, as every OBJECT has.
			frees = append(frees, Range{(uint64(len(cur)) + block - 1) / block * block, ToEnd})
			// A later write of a freed block wins, as in the file.
			steps = append(steps, fileFacts(uint64(len(cur)), 5, normalize(writes), subtract(normalize(frees), normalize(writes))))
		}
		c := FileChange(uint64(len(base)), 20, steps...)
		if c.Full != "" || c.NewSize != uint64(len(cur)) {
			t.Fatalf("iteration %d: %+v, want new size %d", iter, c, len(cur))
		}
		in := func(rs []Range, i uint64) bool {
			for _, r := range rs {
				if r.Offset <= i && i < r.End() {
					return true
				}
			}
			return false
		}
		for i := range uint64(len(cur)) {
			if in(c.Zeroed, i) && (cur[i] != 0 || in(c.Reread, i)) {
				t.Fatalf("iteration %d: byte %d in Zeroed %v is %d (Reread %v)", iter, i, c.Zeroed, cur[i], c.Reread)
			}
			if (i >= uint64(len(base)) || base[i] != cur[i]) && !in(c.Reread, i) && !in(c.Zeroed, i) {
				t.Fatalf("iteration %d: byte %d changed but is in neither %v nor %v (steps %+v)", iter, i, c.Reread, c.Zeroed, steps)
			}
		}
	}
}

func BenchmarkStreamParser(b *testing.B) {
	var w testStream
	w.begin(1, 2, "tank/a@b", 0, nil)
	w.object(5, dmuTypePlainFile, dmuTypeZnode, 128<<10, make([]byte, 264), 0)
	for i := range uint64(64) {
		w.write(5, i<<17, 128<<10, 0)
	}
	w.end()
	stream := w.out.Bytes()
	b.SetBytes(int64(len(stream)))
	for b.Loop() {
		sp := NewStreamParser()
		sp.Write(stream)
		if _, err := sp.Result(); err != nil {
			b.Fatal(err)
		}
	}
}
