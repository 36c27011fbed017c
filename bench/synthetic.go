package bench

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/vmhistory/vmhistory/safefile"
)

// BlockSize is the unit changed bytes are counted in: a guest
// filesystem's block, and the smallest write a VM disk sees.
const BlockSize = 4 << 10

// Rewrites of a synthetic version span 4 KiB to 256 KiB, 4 KiB aligned.
const (
	minRewriteBlocks = 1
	maxRewriteBlocks = 64
)

// Synthetic is a generated file that reads like a VM disk: extents of
// incompressible random data (what most of a guest's disk holds:
// binaries, compressed files, encrypted data), compressible text-like
// data (logs, configuration, source) and runs of zeros (free space). It is
// deterministic: the same size and seed give the same bytes, and the same
// rewrites for each next version.
//
// Next turns the file into the next version in place, as a guest's
// writes between two nightly snapshots of the same disk would: scattered
// rewrites of 4 KiB–256 KiB ranges, 4 KiB aligned, until the wanted share
// of the file's 4 KiB blocks differs from the previous version.
type Synthetic struct {
	path string
	size int64
	rng  *rand.Rand
}

// NewSynthetic writes the first version of a size-byte file to path.
func NewSynthetic(path string, size int64, seed uint64) (*Synthetic, error) {
	if size < 1<<20 {
		return nil, fmt.Errorf("synthetic data of %d bytes is too small; use at least 1MiB", size)
	}
	s := &Synthetic{path: path, size: size, rng: rand.New(rand.NewPCG(seed, 0x766d686973746f72))}
	f, err := safefile.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 256*BlockSize)
	for off := int64(0); off < size; {
		// Extents of 4 KiB to 1 MiB, as a guest filesystem lays files out.
		n := min(int64(BlockSize*(1+s.rng.IntN(256))), size-off)
		b := buf[:n]
		switch k := s.rng.IntN(100); {
		case k < 55:
			s.fillRandom(b)
		case k < 85:
			s.fillText(b)
		default:
			clear(b)
		}
		if _, err := f.Write(b); err != nil {
			f.Close()
			return nil, err
		}
		off += n
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	return s, nil
}

// Size is the file's size in bytes; it stays the same for every version.
func (s *Synthetic) Size() int64 { return s.size }

// Next rewrites scattered ranges of the file until at least churn (a
// fraction, 0 < churn <= 0.5) of its whole 4 KiB blocks differ from the
// version before, and returns how many do. A block rewritten twice counts
// once, and one rewritten with what it held (zeros over zeros) not at all.
func (s *Synthetic) Next(churn float64) (changedBlocks int64, err error) {
	if !(churn > 0 && churn <= 0.5) {
		return 0, fmt.Errorf("churn %g is out of range (0, 0.5]", churn)
	}
	blocks := s.size / BlockSize // whole blocks; a partial tail is never rewritten
	target := int64(math.Ceil(churn * float64(blocks)))
	f, err := safefile.OpenFile(s.path, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()

	// The first content of every block touched, to compare with its last.
	orig := map[int64][]byte{}
	differs := map[int64]bool{}
	var changed int64
	buf := make([]byte, maxRewriteBlocks*BlockSize)
	for tries := int64(0); changed < target; tries++ {
		if tries > 100*target+1000 {
			return changed, fmt.Errorf("synthetic data: could not change %d of %d blocks (got %d)", target, blocks, changed)
		}
		n := int64(minRewriteBlocks + s.rng.IntN(maxRewriteBlocks-minRewriteBlocks+1))
		n = min(n, blocks)
		first := s.rng.Int64N(blocks - n + 1)
		b := buf[:n*BlockSize]
		if _, err := f.ReadAt(b, first*BlockSize); err != nil {
			return changed, err
		}
		for i := int64(0); i < n; i++ {
			if _, ok := orig[first+i]; !ok {
				orig[first+i] = bytes.Clone(b[i*BlockSize : (i+1)*BlockSize])
			}
		}
		// What a guest writes: mostly new incompressible data, some text,
		// some zeroed (trimmed) space.
		switch k := s.rng.IntN(100); {
		case k < 60:
			s.fillRandom(b)
		case k < 90:
			s.fillText(b)
		default:
			clear(b)
		}
		if _, err := f.WriteAt(b, first*BlockSize); err != nil {
			return changed, err
		}
		for i := int64(0); i < n; i++ {
			blk := first + i
			d := !bytes.Equal(orig[blk], b[i*BlockSize:(i+1)*BlockSize])
			switch {
			case d && !differs[blk]:
				changed++
			case !d && differs[blk]:
				changed--
			}
			differs[blk] = d
		}
	}
	return changed, f.Close()
}

func (s *Synthetic) fillRandom(b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], s.rng.Uint64())
	}
}

// words are what the text-like extents are made of: compressible (zstd
// makes about a third of them) but not repeating, so they do not
// deduplicate against each other.
var words = []string{
	"the", "kernel:", "systemd[1]:", "Started", "Session", "of", "user", "root.", "nginx", "GET", "/index.html", "HTTP/1.1",
	"200", "404", "error", "warning:", "connection", "from", "10.0.0.", "port", "closed", "by", "remote", "host", "\n",
	"\n", "=", "true", "false", "{", "}", "func", "return", "if", "err", "!=", "nil", "import", "package", "value",
	"2024-06-", "T03:", "Z", "INFO", "DEBUG", "postgres", "checkpoint", "starting:", "time", "complete:", "wrote",
	"buffers", "(0.1%);", "WAL", "file(s)", "added,", "removed,", "recycled;", "write=", "s,", "sync=", "total=",
}

func (s *Synthetic) fillText(b []byte) {
	i := 0
	for i < len(b) {
		w := words[s.rng.IntN(len(words))]
		i += copy(b[i:], w)
		if i < len(b) {
			if s.rng.IntN(4) == 0 {
				b[i] = byte('0' + s.rng.IntN(10))
			} else {
				b[i] = ' '
			}
			i++
		}
	}
}

// ChangedBytes counts the 4 KiB blocks that differ between two versions
// of a file or a directory tree, in bytes: a block of new that old does
// not have (new file, grown file) counts as changed; blocks of files or
// tails that new no longer has do not (nothing needs backing up for
// them). For directories the files are matched by relative path.
func ChangedBytes(old, new string) (int64, error) {
	ni, err := os.Stat(new)
	if err != nil {
		return 0, err
	}
	if !ni.IsDir() {
		return changedFileBytes(old, new)
	}
	var total int64
	err = filepath.WalkDir(new, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		rel, err := filepath.Rel(new, p)
		if err != nil {
			return err
		}
		n, err := changedFileBytes(filepath.Join(old, rel), p)
		total += n
		return err
	})
	return total, err
}

// changedFileBytes compares two files block by block; a missing old file
// counts as empty.
func changedFileBytes(old, new string) (int64, error) {
	nf, err := os.Open(new)
	if err != nil {
		return 0, err
	}
	defer nf.Close()
	var or io.Reader = bytes.NewReader(nil)
	if of, err := os.Open(old); err == nil {
		defer of.Close()
		if fi, err := of.Stat(); err == nil && fi.Mode().IsRegular() {
			or = of
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return 0, err
	}
	const chunk = 256 * BlockSize
	nb, ob := make([]byte, chunk), make([]byte, chunk)
	var changed int64
	for {
		n, nerr := io.ReadFull(nf, nb)
		if n == 0 {
			if nerr == io.EOF || nerr == io.ErrUnexpectedEOF {
				return changed, nil
			}
			return changed, nerr
		}
		m, oerr := io.ReadFull(or, ob[:n])
		if oerr != nil && oerr != io.EOF && oerr != io.ErrUnexpectedEOF {
			return changed, oerr
		}
		for i := 0; i < n; i += BlockSize {
			e := min(i+BlockSize, n)
			if e > m || !bytes.Equal(nb[i:e], ob[i:e]) {
				changed += int64(e - i)
			}
		}
		if nerr == io.EOF || nerr == io.ErrUnexpectedEOF {
			return changed, nil
		}
		if nerr != nil {
			return changed, nerr
		}
	}
}

// MixedSample returns size bytes that compress unevenly, as a VM disk
// does: 32 KiB blocks of random bytes (already compressed data), prose-like
// text, log records and zeros, in a deterministic order. The tests compare
// compressors on it; kopia's deprecated lz4 fails its round trip on some
// sizes of it (64 KiB, 1792 KiB).
func MixedSample(size int) []byte {
	rng := rand.New(rand.NewPCG(7, uint64(size)))
	words := make([]string, 300)
	for i := range words {
		w := make([]byte, 2+rng.IntN(8))
		for j := range w {
			w[j] = byte('a' + rng.IntN(26))
		}
		words[i] = string(w)
	}
	var buf bytes.Buffer
	block := 32 << 10
	for buf.Len() < size {
		start := buf.Len()
		switch k := rng.IntN(20); {
		case k < 3:
			for buf.Len()-start < block {
				buf.WriteByte(byte(rng.Uint32()))
			}
		case k < 12:
			for buf.Len()-start < block {
				buf.WriteString(words[rng.IntN(len(words))])
				buf.WriteByte(" \n"[rng.IntN(12)/11])
			}
		case k < 17:
			for buf.Len()-start < block {
				fmt.Fprintf(&buf, "%d host=vm%02d unit=%s status=%d\n", 1_700_000_000+rng.IntN(1<<20), rng.IntN(40), words[rng.IntN(20)], 200+rng.IntN(4)*100)
			}
		default:
			buf.Write(make([]byte, block))
		}
	}
	return buf.Bytes()[:size]
}
