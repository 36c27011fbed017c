package boot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// qcow2Magic opens every qcow2 image ("QFI\xfb").
var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// imageHeader is what boot needs from a disk image's first bytes.
type imageHeader struct {
	Format        string // "qcow2" or "raw"
	VirtualSize   int64  // the disk's size as the guest sees it
	BackingFile   string // qcow2: the backing file's name as written, "" for none
	BackingFormat string // qcow2: the backing file's format when recorded
}

// qcow2 header fields (big-endian; QEMU's docs/interop/qcow2.txt).
const (
	qcow2BackingOffset = 8  // u64
	qcow2BackingSize   = 16 // u32
	qcow2Size          = 24 // u64
	qcow2V2HeaderLen   = 72
	qcow2IncompatAt    = 72     // u64, version 3
	qcow2HeaderLenAt   = 100    // u32, version 3
	qcow2ExternalData  = 1 << 2 // incompatible feature: external data file
	qcow2ExtEnd        = 0
	qcow2ExtBackingFmt = 0xE2792ACA
	maxHeaderRead      = 1 << 20
)

// readImageHeader reads path's header. A file that is not qcow2 is raw:
// its size is the file's.
func readImageHeader(path string) (imageHeader, error) {
	f, err := os.Open(path)
	if err != nil {
		return imageHeader{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return imageHeader{}, err
	}
	buf := make([]byte, min(st.Size(), maxHeaderRead))
	if _, err := io.ReadFull(f, buf); err != nil {
		return imageHeader{}, fmt.Errorf("read %s: %w", path, err)
	}
	if !bytes.HasPrefix(buf, qcow2Magic) {
		return imageHeader{Format: "raw", VirtualSize: st.Size()}, nil
	}
	h, err := parseQcow2(buf)
	if err != nil {
		return imageHeader{}, fmt.Errorf("%s: %w", path, err)
	}
	return h, nil
}

var errShortHeader = errors.New("qcow2 header cut short")

func parseQcow2(buf []byte) (imageHeader, error) {
	be := binary.BigEndian
	if len(buf) < qcow2V2HeaderLen {
		return imageHeader{}, errShortHeader
	}
	h := imageHeader{Format: "qcow2", VirtualSize: int64(be.Uint64(buf[qcow2Size:]))}
	version := be.Uint32(buf[4:])
	// qcow (version 1) has the same magic and another layout.
	if version < 2 {
		return imageHeader{}, fmt.Errorf("qcow version %d image, not qcow2", version)
	}
	off, size := be.Uint64(buf[qcow2BackingOffset:]), uint64(be.Uint32(buf[qcow2BackingSize:]))
	if off != 0 {
		// Not off+size > len: a huge offset wraps the sum around.
		if size == 0 || size > 1023 || off > uint64(len(buf)) || size > uint64(len(buf))-off {
			return imageHeader{}, fmt.Errorf("qcow2 backing file name out of the header (offset %d, length %d)", off, size)
		}
		h.BackingFile = string(buf[off : off+size])
	}
	extAt := uint64(qcow2V2HeaderLen)
	if version >= 3 {
		if len(buf) < qcow2HeaderLenAt+4 {
			return imageHeader{}, errShortHeader
		}
		extAt = uint64(be.Uint32(buf[qcow2HeaderLenAt:]))
		// The guest's data would be read from another file, named in
		// the image, which the snapshot need not hold.
		if be.Uint64(buf[qcow2IncompatAt:])&qcow2ExternalData != 0 {
			return imageHeader{}, errors.New("qcow2 image with an external data file: not supported")
		}
	}
	for extAt+8 <= uint64(len(buf)) {
		typ, n := be.Uint32(buf[extAt:]), uint64(be.Uint32(buf[extAt+4:]))
		data := extAt + 8
		if typ == qcow2ExtEnd || data+n > uint64(len(buf)) {
			break
		}
		if typ == qcow2ExtBackingFmt {
			h.BackingFormat = string(buf[data : data+n])
		}
		extAt = data + (n+7)&^7
	}
	return h, nil
}
