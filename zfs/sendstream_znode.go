package zfs

import (
	"encoding/binary"
	"time"
)

// Znode is what a ZPL file's bonus buffer says of it in the new snapshot.
type Znode struct {
	// Mode holds the file type (S_IFREG 0100000, S_IFDIR 0040000, ...)
	// and the permission bits.
	Mode uint64
	Size uint64
	// Gen is the txg the file was created in: an object number reused by
	// a new file has a Gen newer than any snapshot that held the old one.
	Gen                         uint64
	Links                       uint64
	Parent                      uint64
	UID, GID                    uint64
	Flags                       uint64
	Atime, Mtime, Ctime, Crtime time.Time
	// SALayout is the system-attribute layout number of an OpenZFS
	// bonus; 0 for a znode_phys_t.
	SALayout uint16
}

const (
	modeTypeMask = 0o170000
	modeRegular  = 0o100000

	znodePhysSize = 264      // sizeof (znode_phys_t)
	saMagic       = 0x2F505A // SA_MAGIC
	// saStandardPrefix is the fixed-size head of the layout zfs_mknode
	// (and zfs_sa_upgrade, sa_add_projid) writes for a ZPL file: MODE,
	// SIZE, GEN, UID, GID, PARENT, FLAGS (8 bytes each), ATIME, MTIME,
	// CTIME, CRTIME (16 each), LINKS (8). Later attributes (PROJID,
	// RDEV, DACL_COUNT, the ACL, xattrs) follow it, and an attribute
	// that grows moves to the end, so the head stays where it is.
	saStandardPrefix = 128
)

// decodeZnode reads the fields vmhistory needs from a DRR_OBJECT bonus
// (bonus holds its first bytes, bonusLen is its full length); nil when
// the bonus is not a ZPL znode in a layout this reader knows, or its
// fields do not look like one.
func decodeZnode(bonusType, bonusLen uint32, bonus []byte) *Znode {
	le := binary.LittleEndian
	var z Znode
	switch bonusType {
	case dmuTypeZnode:
		// znode_phys_t, as zfs-fuse and ZPL versions before 5 store it.
		if bonusLen < znodePhysSize || len(bonus) < znodePhysSize {
			return nil
		}
		z = Znode{
			Atime:  timespec(bonus[0:]),
			Mtime:  timespec(bonus[16:]),
			Ctime:  timespec(bonus[32:]),
			Crtime: timespec(bonus[48:]),
			Gen:    le.Uint64(bonus[64:]),
			Mode:   le.Uint64(bonus[72:]),
			Size:   le.Uint64(bonus[80:]),
			Parent: le.Uint64(bonus[88:]),
			Links:  le.Uint64(bonus[96:]),
			Flags:  le.Uint64(bonus[120:]),
			UID:    le.Uint64(bonus[128:]),
			GID:    le.Uint64(bonus[136:]),
		}
		if !timesValid(bonus[0:64]) {
			return nil
		}
	case dmuTypeSA:
		// sa_hdr_phys_t: magic, then 10 bits of layout number and 6 of
		// header size in 8-byte units, then the variable lengths.
		if len(bonus) < 8 || le.Uint32(bonus) != saMagic {
			return nil
		}
		info := le.Uint16(bonus[4:])
		layout := info & 0x3ff
		hdr := int(info>>10) * 8
		// Layouts 0 and 1 are the legacy and empty ones; a file's are
		// registered from 2 on.
		if layout < 2 || hdr < 8 || hdr+saStandardPrefix > len(bonus) || hdr+saStandardPrefix > int(bonusLen) {
			return nil
		}
		a := bonus[hdr:]
		z = Znode{
			Mode:     le.Uint64(a[0:]),
			Size:     le.Uint64(a[8:]),
			Gen:      le.Uint64(a[16:]),
			UID:      le.Uint64(a[24:]),
			GID:      le.Uint64(a[32:]),
			Parent:   le.Uint64(a[40:]),
			Flags:    le.Uint64(a[48:]),
			Atime:    timespec(a[56:]),
			Mtime:    timespec(a[72:]),
			Ctime:    timespec(a[88:]),
			Crtime:   timespec(a[104:]),
			Links:    le.Uint64(a[120:]),
			SALayout: layout,
		}
		if !timesValid(a[56:120]) {
			return nil
		}
	default:
		return nil
	}
	// A layout other than the standard one puts other attributes where
	// the mode and times are expected: refuse what is no file mode.
	switch z.Mode & modeTypeMask {
	case 0o010000, 0o020000, 0o040000, 0o060000, 0o100000, 0o120000, 0o140000:
	default:
		return nil
	}
	if z.Mode>>16 != 0 || z.Size > 1<<63 {
		return nil
	}
	return &z
}

func timespec(b []byte) time.Time {
	le := binary.LittleEndian
	return time.Unix(int64(le.Uint64(b)), int64(le.Uint64(b[8:])))
}

// timesValid: four timespecs whose nanoseconds are below a second.
func timesValid(b []byte) bool {
	for i := 8; i < len(b); i += 16 {
		if binary.LittleEndian.Uint64(b[i:]) >= 1e9 {
			return false
		}
	}
	return true
}
