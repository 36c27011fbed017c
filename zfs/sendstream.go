package zfs

// A reader of zfs send streams that keeps what an incremental stream says
// changed — which objects, which byte ranges written or freed, each
// object's new znode — and nothing of the data. vmhistory reads the
// changed ranges from the new snapshot instead, so the nightly upload
// costs what changed rather than what the dataset holds.
//
// The record layout is dmu_replay_record_t: a 312-byte header (uint32
// drr_type, uint32 drr_payloadlen, then a union), then a payload whose
// length each record type defines. zfs-fuse and OpenZFS agree on the
// header; OpenZFS added record types (SPILL, WRITE_EMBEDDED,
// OBJECT_RANGE, REDACT), compressed and large WRITEs, and a per-record
// checksum in the header's last 32 bytes. All numbers are little-endian:
// a stream from a big-endian host is refused, not guessed at.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"slices"
	"time"
)

// Errors a stream is refused with, matched with errors.Is. Each comes
// wrapped with the stream offset and record it was found at.
var (
	// ErrStreamInvalid: not a send stream, or one this reader cannot
	// describe (an unknown record type or feature, a field out of range).
	ErrStreamInvalid = errors.New("invalid zfs send stream")
	// ErrStreamTruncated: the stream ended before its END record.
	ErrStreamTruncated = errors.New("zfs send stream is truncated")
	// ErrStreamChecksum: the stream's fletcher-4 checksum does not match.
	ErrStreamChecksum = errors.New("zfs send stream checksum mismatch")
	// ErrStreamResumed: a resumed send (`zfs send -t`) carries only what
	// follows the resume point, so it cannot say what changed since the
	// base; run a fresh `zfs send -i` instead.
	ErrStreamResumed = errors.New("zfs send stream is a resumed send")
)

// ToEnd is the Length of a range that reaches the end of the object
// (DRR_FREE's length 2^64-1).
const ToEnd = math.MaxUint64

// Range is a byte range of an object.
type Range struct {
	Offset uint64
	// Length is ToEnd for a range to the end of the object.
	Length uint64
}

// End is the first byte after the range, math.MaxUint64 for ToEnd.
func (r Range) End() uint64 {
	end, carry := bits.Add64(r.Offset, r.Length, 0)
	if carry != 0 {
		return math.MaxUint64
	}
	return end
}

func (r Range) String() string {
	if r.End() == math.MaxUint64 {
		return fmt.Sprintf("[%d, end)", r.Offset)
	}
	return fmt.Sprintf("[%d, %d)", r.Offset, r.End())
}

// ObjectSpan is a run of object numbers.
type ObjectSpan struct {
	First, Count uint64
}

func (s ObjectSpan) end() uint64 {
	end, carry := bits.Add64(s.First, s.Count, 0)
	if carry != 0 {
		return math.MaxUint64
	}
	return end
}

// SendStream is what one stream held: one Substream for `zfs send -i`,
// one per snapshot for `-I` (a package of BEGIN/END pairs).
type SendStream struct {
	Substreams []*Substream
	// Bytes is the length of the whole stream.
	Bytes int64
}

// Between returns the consecutive substreams that lead from the snapshot
// with guid from to the one with guid to, so a caller whose base is one
// of the intermediate snapshots of a `-I` stream can use the rest.
func (s *SendStream) Between(from, to uint64) ([]*Substream, error) {
	for i, sub := range s.Substreams {
		if sub.Begin.FromGUID != from {
			continue
		}
		for j := i; j < len(s.Substreams); j++ {
			if j > i && s.Substreams[j].Begin.FromGUID != s.Substreams[j-1].Begin.ToGUID {
				break
			}
			if s.Substreams[j].Begin.ToGUID == to {
				return s.Substreams[i : j+1], nil
			}
		}
	}
	return nil, fmt.Errorf("the stream holds no chain of substreams from guid %d to guid %d", from, to)
}

// StreamBegin is a substream's DRR_BEGIN record.
type StreamBegin struct {
	// FromGUID is the base snapshot's guid; 0 for a full stream.
	FromGUID uint64
	ToGUID   uint64
	// ToName is the snapshot sent, pool/dataset@snapshot.
	ToName   string
	Creation time.Time
	// Flags are drr_flags (DRR_FLAG_CLONE 1, CI_DATA 2, FREERECORDS 4,
	// SPILL_BLOCK 8).
	Flags uint32
	// Features are the DMU_BACKUP_FEATURE_* bits of drr_versioninfo.
	Features uint64
	// ObjsetType is the dataset type: 2 a filesystem, 3 a volume.
	ObjsetType uint32
}

// Substream is what one BEGIN..END pair says, per object.
type Substream struct {
	Begin StreamBegin
	// WriteBytes are the logical bytes of the DRR_WRITE and
	// DRR_WRITE_BYREF records: what `zfs receive` rewrites.
	WriteBytes uint64
	// FreedObjects are the DRR_FREEOBJECTS runs: object numbers that hold
	// no object in the new snapshot (deleted files, and never used
	// numbers in a touched block of dnodes). Sorted, merged.
	FreedObjects []ObjectSpan
	// ObjectRanges are the DRR_OBJECT_RANGE runs (raw streams).
	ObjectRanges []ObjectSpan

	objects map[uint64]*ObjectFacts
}

// Objects returns, sorted, the numbers of the objects that have records
// of their own (OBJECT, WRITE, FREE, ...) in the substream.
func (s *Substream) Objects() []uint64 {
	nums := make([]uint64, 0, len(s.objects))
	for n := range s.objects {
		nums = append(nums, n)
	}
	slices.Sort(nums)
	return nums
}

// Object returns what the substream says of object n (for a file: its
// inode number); the zero facts but for Object and Freed when it says
// nothing. The slices are shared: do not modify them.
func (s *Substream) Object(n uint64) ObjectFacts {
	f := ObjectFacts{Object: n}
	if o := s.objects[n]; o != nil {
		f = *o
	}
	f.Freed = s.objectFreed(n)
	return f
}

func (s *Substream) objectFreed(n uint64) bool {
	i, _ := slices.BinarySearchFunc(s.FreedObjects, n, func(sp ObjectSpan, n uint64) int {
		switch {
		case sp.end() <= n:
			return -1
		case sp.First > n:
			return 1
		}
		return 0
	})
	return i < len(s.FreedObjects) && s.FreedObjects[i].First <= n && n < s.FreedObjects[i].end()
}

// ObjectFacts is what one substream says of one object.
type ObjectFacts struct {
	Object uint64
	// Writes are the DRR_WRITE ranges (their logical length, also for
	// compressed writes) and DRR_WRITE_BYREF ranges. Sorted, merged.
	Writes []Range
	// Embedded are the DRR_WRITE_EMBEDDED ranges: small blocks whose
	// data sits in the block pointer. Sorted, merged.
	Embedded []Range
	// Frees are the DRR_FREE ranges: holes in the new snapshot, whether
	// or not they were holes in the base. Sorted, merged.
	Frees []Range
	// Record is the DRR_OBJECT record; nil when the substream has none,
	// which means the object's dnode did not change.
	Record *ObjectRecord
	// Freed: a DRR_FREEOBJECTS record covers the object.
	Freed bool
}

// ObjectRecord is a DRR_OBJECT record: the object's dnode in the new
// snapshot.
type ObjectRecord struct {
	// Type is the dmu_object_type_t: 19 a file's data, 20 a directory.
	Type uint32
	// BonusType is 17 for a znode_phys_t bonus (zfs-fuse, old ZPL), 44
	// for system attributes (OpenZFS).
	BonusType uint32
	BlockSize uint32
	BonusLen  uint32
	// Znode is the decoded bonus; nil when the bonus is not a ZPL znode
	// this reader knows, or is encrypted (a raw stream).
	Znode *Znode
}

// DMU object and bonus types this reader interprets; the numbers are
// the same in zfs-fuse and OpenZFS.
const (
	dmuTypeZnode        = 17
	dmuTypePlainFile    = 19
	dmuTypeSA           = 44
	dmuBackupMagic      = 0x2F5bacbac
	recordSize          = 312
	recordChecksumStart = 280 // drr_u.drr_checksum.drr_checksum
)

// Record types (drr_type).
const (
	drrBegin = iota
	drrObject
	drrFreeObjects
	drrWrite
	drrFree
	drrEnd
	drrWriteByRef
	drrSpill
	drrWriteEmbedded
	drrObjectRange
	drrRedact
)

var recordNames = [...]string{"BEGIN", "OBJECT", "FREEOBJECTS", "WRITE", "FREE", "END", "WRITE_BYREF", "SPILL", "WRITE_EMBEDDED", "OBJECT_RANGE", "REDACT"}

func recordName(t uint32) string {
	if t < uint32(len(recordNames)) {
		return "DRR_" + recordNames[t]
	}
	return fmt.Sprintf("record type %d", t)
}

// Stream feature flags (DMU_BACKUP_FEATURE_*) this reader knows. DEDUP
// and DEDUPPROPS are zfs-fuse's `send -D`; the rest OpenZFS's.
const (
	featureDedup            = 1 << 0
	featureDedupProps       = 1 << 1
	featureSASpill          = 1 << 2
	featureEmbedData        = 1 << 16
	featureLZ4              = 1 << 17
	featureLargeBlocks      = 1 << 19
	featureResuming         = 1 << 20
	featureRedacted         = 1 << 21
	featureCompressed       = 1 << 22
	featureLargeDnode       = 1 << 23
	featureRaw              = 1 << 24
	featureZstd             = 1 << 25
	featureHolds            = 1 << 26
	featureSwitchLargeBlock = 1 << 27
	featureLongName         = 1 << 28
	featureLargeMicrozap    = 1 << 29

	knownFeatures = featureDedup | featureDedupProps | featureSASpill | featureEmbedData | featureLZ4 |
		featureLargeBlocks | featureResuming | featureRedacted | featureCompressed | featureLargeDnode |
		featureRaw | featureZstd | featureHolds | featureSwitchLargeBlock | featureLongName | featureLargeMicrozap
)

// Limits a well-formed stream stays within (OpenZFS's receive enforces
// the same): a hostile length field is refused before it is skipped.
const (
	maxBlockSize    = 16 << 20  // SPA_MAXBLOCKSIZE
	maxBeginPayload = 256 << 20 // receive's hard limit on the BEGIN nvlist
	maxBonusPayload = 64 << 10  // a 16 KiB dnode's bonus, with room
	maxEmbedded     = 112       // BPE_PAYLOAD_SIZE
	bonusKeep       = 1024      // enough of a bonus for any znode layout
	hdrSubstream    = 1
	hdrCompound     = 2
)

// StreamParser reads a send stream pushed into it with Write, so that
// the replication pipeline can tee `zfs send | zfs receive` through it:
// it keeps at most one header and a bonus prefix, never the stream. It
// never fails or blocks the writer; a parse error is recorded (Err) and
// the rest of the stream discarded. Not safe for concurrent use.
type StreamParser struct {
	hdr     [recordSize]byte
	hdrFill int
	offset  int64 // bytes consumed
	recAt   int64 // offset of the current record's header
	recType uint32

	payload   uint64 // payload bytes of the current record still to come
	bonus     []byte // kept prefix of a DRR_OBJECT bonus
	bonusKeep int
	record    *ObjectRecord // the DRR_OBJECT whose bonus is being read
	raw       bool

	sum fletcher4

	compoundHeader bool // between a compound BEGIN and its END
	inPackage      bool // a compound stream's substreams follow
	started        bool
	done           bool
	cur            *Substream
	stream         SendStream
	err            error
}

// NewStreamParser returns a parser waiting for a stream's first byte.
func NewStreamParser() *StreamParser { return &StreamParser{} }

// Write consumes the next bytes of the stream. It always reports all of
// p written: a reader must never break the replication it watches.
func (sp *StreamParser) Write(p []byte) (int, error) {
	if sp.err == nil {
		sp.err = sp.feed(p)
	}
	return len(p), nil
}

// Err is the first problem found in the stream so far, nil while it
// reads well.
func (sp *StreamParser) Err() error { return sp.err }

// Result returns what the stream said, once its last END has been
// written; before that, or after a parse error, an error.
func (sp *StreamParser) Result() (*SendStream, error) {
	if sp.err != nil {
		return nil, sp.err
	}
	if !sp.done {
		where := "before its first record"
		switch {
		case sp.payload > 0:
			where = fmt.Sprintf("in the payload of %s at offset %d", recordName(sp.recType), sp.recAt)
		case sp.hdrFill > 0:
			where = fmt.Sprintf("in a record header at offset %d", sp.offset-int64(sp.hdrFill))
		case sp.cur != nil:
			where = fmt.Sprintf("before the END of the substream of %s", sp.cur.Begin.ToName)
		case sp.started:
			where = "before the END of the package"
		}
		return nil, fmt.Errorf("%w: it ended after %d bytes, %s", ErrStreamTruncated, sp.offset, where)
	}
	st := sp.stream
	st.Bytes = sp.offset
	return &st, nil
}

// ParseStream reads a whole send stream from r (`zfs send -i` run for
// the reader alone) and returns what it said. It stops at the first
// problem.
func ParseStream(r io.Reader) (*SendStream, error) {
	sp := NewStreamParser()
	buf := make([]byte, 1<<20)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if sp.err = sp.feed(buf[:n]); sp.err != nil {
				return nil, sp.err
			}
		}
		if err == io.EOF {
			return sp.Result()
		}
		if err != nil {
			return nil, fmt.Errorf("read the send stream at offset %d: %w", sp.offset, err)
		}
	}
}

func (sp *StreamParser) feed(p []byte) error {
	for len(p) > 0 {
		if sp.payload > 0 {
			n := uint64(len(p))
			if n > sp.payload {
				n = sp.payload
			}
			chunk := p[:n]
			sp.sum.update(chunk)
			if len(sp.bonus) < sp.bonusKeep {
				sp.bonus = append(sp.bonus, chunk[:min(len(chunk), sp.bonusKeep-len(sp.bonus))]...)
			}
			sp.payload -= n
			sp.offset += int64(n)
			p = p[n:]
			if sp.payload == 0 {
				sp.sum.endSegment()
				sp.endPayload()
			}
			continue
		}
		if sp.done {
			return fmt.Errorf("%w: data at offset %d follows the stream's last END record", ErrStreamInvalid, sp.offset)
		}
		var h []byte
		if sp.hdrFill == 0 && len(p) >= recordSize {
			h, p = p[:recordSize], p[recordSize:]
			sp.offset += recordSize
		} else {
			n := copy(sp.hdr[sp.hdrFill:], p)
			sp.hdrFill += n
			sp.offset += int64(n)
			p = p[n:]
			if sp.hdrFill < recordSize {
				return nil
			}
			h, sp.hdrFill = sp.hdr[:], 0
		}
		sp.recAt = sp.offset - recordSize
		if err := sp.header(h); err != nil {
			return err
		}
		if sp.payload == 0 {
			sp.endPayload()
		}
	}
	return nil
}

func (sp *StreamParser) errorf(kind error, format string, args ...any) error {
	return fmt.Errorf("%w: %s at offset %d: %s", kind, recordName(sp.recType), sp.recAt, fmt.Sprintf(format, args...))
}

func le32(b []byte, off int) uint32 { return binary.LittleEndian.Uint32(b[off:]) }
func le64(b []byte, off int) uint64 { return binary.LittleEndian.Uint64(b[off:]) }

func (sp *StreamParser) header(h []byte) error {
	sp.recType = le32(h, 0)
	if sp.recType == drrBegin {
		sp.started = true
		return sp.begin(h)
	}
	if !sp.started {
		return sp.errorf(ErrStreamInvalid, "not a zfs send stream: it does not start with a DRR_BEGIN record")
	}
	if sp.cur == nil && sp.recType != drrEnd {
		return sp.errorf(ErrStreamInvalid, "outside a substream (no BEGIN before it)")
	}
	// Every other record's header ends in the checksum of the stream up
	// to it (OpenZFS 0.7 and later; zero from zfs-fuse and for the
	// records libzfs writes around a package).
	before := sp.sum.value()
	sp.sum.update(h[:recordChecksumStart])
	if stored := h[recordChecksumStart:]; !isZero(stored) && !bytes.Equal(stored, sp.sum.bytes()) {
		return sp.errorf(ErrStreamChecksum, "the record's checksum does not match the stream before it")
	}
	sp.sum.update(h[recordChecksumStart:])
	if sp.recType == drrEnd {
		return sp.end(h, before)
	}
	sub := sp.cur
	switch sp.recType {
	case drrObject:
		return sp.objectRecord(h)
	case drrFreeObjects:
		addSpan(&sub.FreedObjects, ObjectSpan{First: le64(h, 8), Count: le64(h, 16)})
	case drrWrite:
		obj, off, lsize := le64(h, 8), le64(h, 24), le64(h, 32)
		psize := lsize
		if h[50] != 0 { // drr_compressiontype: the payload is compressed (send -c)
			psize = le64(h, 96)
		}
		if lsize == 0 || lsize > maxBlockSize || psize > maxBlockSize {
			return sp.errorf(ErrStreamInvalid, "object %d offset %d: logical size %d, payload %d out of range", obj, off, lsize, psize)
		}
		if _, carry := bits.Add64(off, lsize, 0); carry != 0 {
			return sp.errorf(ErrStreamInvalid, "object %d: offset %d + length %d overflows", obj, off, lsize)
		}
		addRange(&sp.facts(obj).Writes, Range{off, lsize})
		sub.WriteBytes += lsize
		sp.payload = psize
	case drrFree:
		obj := le64(h, 8)
		addRange(&sp.facts(obj).Frees, Range{le64(h, 16), le64(h, 24)})
	case drrWriteByRef:
		obj, off, length := le64(h, 8), le64(h, 16), le64(h, 24)
		if length == 0 || length > maxBlockSize {
			return sp.errorf(ErrStreamInvalid, "object %d offset %d: length %d out of range", obj, off, length)
		}
		if _, carry := bits.Add64(off, length, 0); carry != 0 {
			return sp.errorf(ErrStreamInvalid, "object %d: offset %d + length %d overflows", obj, off, length)
		}
		addRange(&sp.facts(obj).Writes, Range{off, length})
		sub.WriteBytes += length
	case drrSpill:
		// System attributes that overflow the bonus; the znode fields
		// this reader needs sit in the bonus itself.
		length, psize := le64(h, 16), le64(h, 40)
		if psize == 0 {
			psize = length
		}
		if length > maxBlockSize || psize > maxBlockSize {
			return sp.errorf(ErrStreamInvalid, "object %d: length %d, payload %d out of range", le64(h, 8), length, psize)
		}
		sp.payload = psize
	case drrWriteEmbedded:
		obj, off, length, psize := le64(h, 8), le64(h, 16), le64(h, 24), le32(h, 52)
		if length == 0 || length > maxBlockSize || psize > maxEmbedded {
			return sp.errorf(ErrStreamInvalid, "object %d offset %d: length %d, payload %d out of range", obj, off, length, psize)
		}
		if _, carry := bits.Add64(off, length, 0); carry != 0 {
			return sp.errorf(ErrStreamInvalid, "object %d: offset %d + length %d overflows", obj, off, length)
		}
		addRange(&sp.facts(obj).Embedded, Range{off, length})
		sp.payload = roundUp8(uint64(psize))
	case drrObjectRange:
		addSpan(&sub.ObjectRanges, ObjectSpan{First: le64(h, 8), Count: le64(h, 16)})
	case drrRedact:
		return sp.errorf(ErrStreamInvalid, "a redacted stream leaves out data that changed")
	default:
		return sp.errorf(ErrStreamInvalid, "unknown record type")
	}
	return nil
}

func (sp *StreamParser) begin(h []byte) error {
	if sp.cur != nil {
		return sp.errorf(ErrStreamInvalid, "inside the substream of %s, before its END", sp.cur.Begin.ToName)
	}
	if sp.compoundHeader {
		return sp.errorf(ErrStreamInvalid, "inside a package header, before its END")
	}
	switch magic := le64(h, 8); magic {
	case dmuBackupMagic:
	case bits.ReverseBytes64(dmuBackupMagic):
		return sp.errorf(ErrStreamInvalid, "the stream was written on a big-endian host")
	default:
		return sp.errorf(ErrStreamInvalid, "bad magic %#x: not a zfs send stream", magic)
	}
	version := le64(h, 16)
	features := version >> 2
	if features&^knownFeatures != 0 {
		return sp.errorf(ErrStreamInvalid, "feature flags %#x unknown to this reader", features&^knownFeatures)
	}
	payloadLen := le32(h, 4)
	if payloadLen > maxBeginPayload {
		return sp.errorf(ErrStreamInvalid, "payload of %d bytes", payloadLen)
	}
	begin := StreamBegin{
		FromGUID:   le64(h, 48),
		ToGUID:     le64(h, 40),
		ToName:     cString(h[56:recordSize]),
		Creation:   time.Unix(int64(le64(h, 24)), 0),
		Flags:      le32(h, 36),
		Features:   features,
		ObjsetType: le32(h, 32),
	}
	// The checksum starts afresh with every BEGIN; a package's header
	// and each substream are checksummed on their own.
	sp.sum = fletcher4{}
	sp.sum.update(h)
	sp.payload = uint64(payloadLen)
	switch version & 3 {
	case hdrCompound:
		if sp.recAt != 0 {
			return sp.errorf(ErrStreamInvalid, "a package header after the start of the stream")
		}
		sp.compoundHeader = true
	case hdrSubstream:
		if features&featureResuming != 0 {
			return fmt.Errorf("%w: the substream of %s resumes an interrupted send", ErrStreamResumed, begin.ToName)
		}
		if features&featureRedacted != 0 {
			return sp.errorf(ErrStreamInvalid, "a redacted stream leaves out data that changed")
		}
		sp.raw = features&featureRaw != 0
		sp.cur = &Substream{Begin: begin, objects: map[uint64]*ObjectFacts{}}
	default:
		return sp.errorf(ErrStreamInvalid, "header type %d", version&3)
	}
	return nil
}

func (sp *StreamParser) end(h []byte, before fletcherSum) error {
	stored := fletcherSum{le64(h, 8), le64(h, 16), le64(h, 24), le64(h, 32)}
	switch {
	case sp.compoundHeader:
		if stored != before {
			return sp.errorf(ErrStreamChecksum, "the package header's checksum %v, computed %v", stored, before)
		}
		sp.compoundHeader, sp.inPackage = false, true
	case sp.cur != nil:
		if stored != before {
			return sp.errorf(ErrStreamChecksum, "substream of %s: stored %v, computed %v", sp.cur.Begin.ToName, stored, before)
		}
		if guid := le64(h, 40); guid != sp.cur.Begin.ToGUID {
			return sp.errorf(ErrStreamInvalid, "names guid %d, its BEGIN %d", guid, sp.cur.Begin.ToGUID)
		}
		sp.cur.finish()
		sp.stream.Substreams = append(sp.stream.Substreams, sp.cur)
		sp.cur = nil
		sp.done = !sp.inPackage
	case sp.inPackage:
		// libzfs ends a package with an empty END, even after a
		// substream that failed: that one then lacks its own END.
		sp.done = true
	default:
		return sp.errorf(ErrStreamInvalid, "no BEGIN before it")
	}
	return nil
}

func (sp *StreamParser) objectRecord(h []byte) error {
	obj := le64(h, 8)
	rec := &ObjectRecord{Type: le32(h, 16), BonusType: le32(h, 20), BlockSize: le32(h, 24), BonusLen: le32(h, 28)}
	rawBonus := le32(h, 36)
	payload := roundUp8(uint64(rec.BonusLen))
	if rawBonus != 0 {
		payload = uint64(rawBonus)
	}
	if rec.BonusLen > maxBonusPayload || payload > maxBonusPayload {
		return sp.errorf(ErrStreamInvalid, "object %d: bonus of %d bytes (payload %d)", obj, rec.BonusLen, payload)
	}
	sp.facts(obj).Record = rec
	sp.record = rec
	if sp.bonus == nil {
		sp.bonus = make([]byte, 0, bonusKeep)
	}
	sp.bonus = sp.bonus[:0]
	// A raw stream's bonus is encrypted: nothing in it to read.
	sp.bonusKeep = 0
	if !sp.raw {
		sp.bonusKeep = int(min(payload, bonusKeep))
	}
	sp.payload = payload
	return nil
}

// endPayload finishes the current record once its payload is consumed.
func (sp *StreamParser) endPayload() {
	if sp.record != nil {
		sp.record.Znode = decodeZnode(sp.record.BonusType, sp.record.BonusLen, sp.bonus)
		sp.record = nil
		sp.bonusKeep = 0
	}
}

// facts returns the current substream's entry for object n.
func (sp *StreamParser) facts(n uint64) *ObjectFacts {
	f := sp.cur.objects[n]
	if f == nil {
		f = &ObjectFacts{Object: n}
		sp.cur.objects[n] = f
	}
	return f
}

// finish sorts and merges what the substream collected.
func (s *Substream) finish() {
	for _, f := range s.objects {
		f.Writes = normalize(f.Writes)
		f.Embedded = normalize(f.Embedded)
		f.Frees = normalize(f.Frees)
	}
	s.FreedObjects = normalizeSpans(s.FreedObjects)
	s.ObjectRanges = normalizeSpans(s.ObjectRanges)
	for n, f := range s.objects {
		f.Freed = s.objectFreed(n)
	}
}

func roundUp8(n uint64) uint64 { return (n + 7) &^ 7 }

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// addRange appends r, merged with the last range when the stream lists
// an object's blocks in order, as both dialects do: a night's writes to
// one file then take a few ranges, not one per block.
func addRange(rs *[]Range, r Range) {
	if r.Length == 0 {
		return
	}
	if n := len(*rs); n > 0 {
		last := &(*rs)[n-1]
		if r.Offset >= last.Offset && r.Offset <= last.End() {
			if end := r.End(); end > last.End() {
				*last = spanRange(last.Offset, end)
			}
			return
		}
	}
	*rs = append(*rs, r)
}

func addSpan(ss *[]ObjectSpan, s ObjectSpan) {
	if s.Count == 0 {
		return
	}
	if n := len(*ss); n > 0 {
		last := &(*ss)[n-1]
		if s.First >= last.First && s.First <= last.end() {
			if end := s.end(); end > last.end() {
				last.Count = end - last.First
			}
			return
		}
	}
	*ss = append(*ss, s)
}

// spanRange is the range [lo, hi), ToEnd when hi is the largest offset.
func spanRange(lo, hi uint64) Range {
	if hi == math.MaxUint64 {
		return Range{lo, ToEnd}
	}
	return Range{lo, hi - lo}
}

// normalize sorts rs and merges overlapping and touching ranges, in place.
func normalize(rs []Range) []Range {
	if len(rs) < 2 {
		return rs
	}
	slices.SortFunc(rs, func(a, b Range) int {
		switch {
		case a.Offset < b.Offset:
			return -1
		case a.Offset > b.Offset:
			return 1
		}
		return 0
	})
	out := rs[:1]
	for _, r := range rs[1:] {
		last := &out[len(out)-1]
		if r.Offset <= last.End() {
			if r.End() > last.End() {
				*last = spanRange(last.Offset, r.End())
			}
			continue
		}
		out = append(out, r)
	}
	return out
}

func normalizeSpans(ss []ObjectSpan) []ObjectSpan {
	if len(ss) < 2 {
		return ss
	}
	slices.SortFunc(ss, func(a, b ObjectSpan) int {
		switch {
		case a.First < b.First:
			return -1
		case a.First > b.First:
			return 1
		}
		return 0
	})
	out := ss[:1]
	for _, s := range ss[1:] {
		last := &out[len(out)-1]
		if s.First <= last.end() {
			if s.end() > last.end() {
				last.Count = s.end() - last.First
			}
			continue
		}
		out = append(out, s)
	}
	return out
}

// fletcherSum is a zio_cksum_t.
type fletcherSum [4]uint64

func (s fletcherSum) String() string { return fmt.Sprintf("%x/%x/%x/%x", s[0], s[1], s[2], s[3]) }

// fletcher4 is the stream checksum both dialects compute: fletcher-4
// over little-endian 32-bit words, in segments (a header's first 280
// bytes, its last 32, each payload) whose trailing bytes short of a word
// are not counted. Bytes of one segment may arrive over several Writes.
type fletcher4 struct {
	a, b, c, d uint64
	part       [4]byte
	nPart      int
}

func (f *fletcher4) update(p []byte) {
	if f.nPart > 0 {
		n := copy(f.part[f.nPart:], p)
		f.nPart += n
		p = p[n:]
		if f.nPart < 4 {
			return
		}
		f.words(f.part[:])
		f.nPart = 0
	}
	whole := len(p) &^ 3
	f.words(p[:whole])
	f.nPart = copy(f.part[:], p[whole:])
}

func (f *fletcher4) words(p []byte) {
	a, b, c, d := f.a, f.b, f.c, f.d
	for len(p) >= 16 {
		w0, w1 := uint64(binary.LittleEndian.Uint32(p)), uint64(binary.LittleEndian.Uint32(p[4:]))
		w2, w3 := uint64(binary.LittleEndian.Uint32(p[8:])), uint64(binary.LittleEndian.Uint32(p[12:]))
		a += w0
		b += a
		c += b
		d += c
		a += w1
		b += a
		c += b
		d += c
		a += w2
		b += a
		c += b
		d += c
		a += w3
		b += a
		c += b
		d += c
		p = p[16:]
	}
	for len(p) >= 4 {
		a += uint64(binary.LittleEndian.Uint32(p))
		b += a
		c += b
		d += c
		p = p[4:]
	}
	f.a, f.b, f.c, f.d = a, b, c, d
}

// endSegment drops the bytes of a segment short of a word.
func (f *fletcher4) endSegment() { f.nPart = 0 }

func (f *fletcher4) value() fletcherSum { return fletcherSum{f.a, f.b, f.c, f.d} }

func (f *fletcher4) bytes() []byte {
	var b [32]byte
	for i, w := range f.value() {
		binary.LittleEndian.PutUint64(b[i*8:], w)
	}
	return b[:]
}
