package zfs

import (
	"fmt"
	"slices"
)

// Change is how a file differs from its version in the base snapshot,
// as far as the send stream says.
type Change struct {
	OldSize, NewSize uint64
	// Reread are the ranges of the new file whose content may differ
	// from the base: read them from the new snapshot. Sorted, disjoint,
	// within NewSize.
	Reread []Range
	// Zeroed are ranges of the new file that are holes, read as zeros:
	// what a size growth added without a write, and what DRR_FREE
	// records list below the old size. They need no read. They may have
	// been zeros in the base too: zfs-fuse lists every hole of an object
	// whose dnode changed. Sorted, disjoint, within NewSize, apart from
	// Reread.
	Zeroed []Range
	// Full, when not empty, says why the stream cannot describe the
	// change: the file is to be uploaded in full. The ranges are then
	// empty.
	Full string
}

// Unchanged: the stream shows no change to the file.
func (c Change) Unchanged() bool {
	return c.Full == "" && len(c.Reread) == 0 && len(c.Zeroed) == 0 && c.NewSize == c.OldSize
}

// FileChange says what changed in a regular file between the base
// snapshot and the new one, from what the stream's substreams say of its
// object (its inode number), in stream order: one ObjectFacts for `zfs
// send -i`, one per substream of a `-I` chain (Substream.Object). oldSize
// is the file's size in the base; baseTXG the base snapshot's creation
// txg (Snapshot.CreateTXG: `zfs get createtxg`, which zfs-fuse answers
// too though it lists no such property), without which a reused object
// number cannot be told.
//
// It reads the stream as zfs-fuse and OpenZFS write it: every dnode of a
// touched block of dnodes comes with a DRR_OBJECT record and a FREE from
// its last block to the end, changed or not, and frees reach past the
// end of the file; a truncate may show only in the new size. So an
// OBJECT record alone or a FREE at or past the old size is no change,
// the size comes from the znode, and a growth without a WRITE is zeros.
func FileChange(oldSize, baseTXG uint64, steps ...ObjectFacts) Change {
	c := Change{OldSize: oldSize, NewSize: oldSize}
	for _, f := range steps {
		if full := fullReason(f, baseTXG); full != "" {
			return Change{OldSize: oldSize, Full: full}
		}
		if f.Record == nil {
			continue // the dnode did not change: neither did the file
		}
		newSize := f.Record.Znode.Size
		written := normalize(append(slices.Clone(f.Writes), f.Embedded...))
		reread := clip(written, newSize)
		zeroed := clip(subtract(union(f.Frees, spanList(c.NewSize, newSize)), written), newSize)
		// Later steps win: a range rewritten after it was freed is to be
		// read, a range freed after it was written is zeros.
		c.Reread = clip(union(subtract(c.Reread, zeroed), reread), newSize)
		c.Zeroed = clip(union(subtract(c.Zeroed, reread), zeroed), newSize)
		c.NewSize = newSize
	}
	return c
}

// fullReason says why one step's facts leave the change unknown.
func fullReason(f ObjectFacts, baseTXG uint64) string {
	if f.Record == nil {
		switch {
		case f.Freed:
			return fmt.Sprintf("object %d was freed: the file was deleted", f.Object)
		case len(f.Writes)+len(f.Embedded)+len(f.Frees) > 0:
			return fmt.Sprintf("object %d has WRITE or FREE records but no DRR_OBJECT record", f.Object)
		}
		return ""
	}
	r := f.Record
	switch {
	case r.Znode == nil:
		return fmt.Sprintf("object %d: bonus type %d (%d bytes) is not a znode this reader knows, or is encrypted", f.Object, r.BonusType, r.BonusLen)
	case r.Znode.Mode&modeTypeMask != modeRegular || r.Type != dmuTypePlainFile:
		return fmt.Sprintf("object %d is not a regular file (mode %#o, object type %d)", f.Object, r.Znode.Mode, r.Type)
	case baseTXG == 0:
		return fmt.Sprintf("object %d: the base snapshot's txg is unknown, so a reused object number cannot be ruled out", f.Object)
	case r.Znode.Gen > baseTXG:
		return fmt.Sprintf("object %d was reused: the file was created in txg %d, after the base snapshot (txg %d)", f.Object, r.Znode.Gen, baseTXG)
	}
	return ""
}

// spanList is [lo, hi) as a range list, empty when hi <= lo.
func spanList(lo, hi uint64) []Range {
	if hi <= lo {
		return nil
	}
	return []Range{spanRange(lo, hi)}
}

// union merges two sorted disjoint lists into a new one, never into
// the stream's facts.
func union(a, b []Range) []Range {
	return normalize(append(slices.Clone(a), b...))
}

// subtract returns a minus b; both sorted and disjoint.
func subtract(a, b []Range) []Range {
	var out []Range
	j := 0
	for _, r := range a {
		lo, hi := r.Offset, r.End()
		for j < len(b) && b[j].End() <= lo {
			j++
		}
		for k := j; k < len(b) && b[k].Offset < hi && lo < hi; k++ {
			if b[k].Offset > lo {
				out = append(out, spanRange(lo, b[k].Offset))
			}
			lo = max(lo, b[k].End())
		}
		if lo < hi {
			out = append(out, spanRange(lo, hi))
		}
	}
	return out
}

// clip cuts a sorted disjoint list at end.
func clip(a []Range, end uint64) []Range {
	var out []Range
	for _, r := range a {
		if r.Offset >= end {
			break
		}
		out = append(out, spanRange(r.Offset, min(r.End(), end)))
	}
	return out
}
