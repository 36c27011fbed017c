package restore

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
	"github.com/vmhistory/vmhistory/safefile"
)

// A seed map file keeps what a LearnedMap found in one file of one local
// snapshot, so that the next restore seeded from it reads none of the
// ranges it already knows hold something else. A snapshot's bytes never
// change (its guid names them), so the map goes stale only by damage or
// by hand; a wrong entry costs a mismatch, never a wrong byte.
//
// Layout: the magic line, a JSON header line, then one record per range:
// offset (8 bytes), length (4 bytes), hash (hash_bytes), big-endian.
const seedMapMagic = "vmhistory seed map 1\n"

type seedMapHeader struct {
	// Repository is the kopia repository's unique ID: the hashes are its
	// hash function's, keyed with its secret.
	Repository string `json:"repository"`
	GUID       string `json:"guid"`
	Snapshot   string `json:"snapshot"`
	Path       string `json:"path"`
	Size       int64  `json:"size"`
	HashBytes  int    `json:"hash_bytes"`
	Ranges     int    `json:"ranges"`
}

// seedMapPath is where the map of file rel of the snapshot with guid goes
// for the repository repoID, under dir.
func seedMapPath(dir, repoID string, guid uint64, rel string) string {
	sum := sha256.Sum256([]byte(rel))
	return filepath.Join(dir, repoID, strconv.FormatUint(guid, 10), hex.EncodeToString(sum[:16])+".map")
}

// readSeedMap reads the map at path, which must be the one of want (its
// repository, guid, path and size); a missing file is no error and no
// entries.
func readSeedMap(path string, want seedMapHeader) ([]prefetch.HashedChunk, error) {
	data, err := safefile.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	rest, ok := bytes.CutPrefix(data, []byte(seedMapMagic))
	if !ok {
		return nil, fmt.Errorf("seed map %s: not a seed map", path)
	}
	line, records, ok := bytes.Cut(rest, []byte("\n"))
	if !ok {
		return nil, fmt.Errorf("seed map %s: no header", path)
	}
	var h seedMapHeader
	if err := json.Unmarshal(line, &h); err != nil {
		return nil, fmt.Errorf("seed map %s: header: %w", path, err)
	}
	if h.Repository != want.Repository || h.GUID != want.GUID || h.Path != want.Path || h.Size != want.Size {
		return nil, fmt.Errorf("seed map %s is of %s:%s (%d bytes, repository %s), not of %s:%s", path,
			h.Snapshot, h.Path, h.Size, h.Repository, want.Snapshot, want.Path)
	}
	rec := 12 + h.HashBytes
	if h.HashBytes <= 0 || h.HashBytes > 64 || len(records) != h.Ranges*rec {
		return nil, fmt.Errorf("seed map %s: %d bytes of records, want %d of %d", path, len(records), h.Ranges, rec)
	}
	out := make([]prefetch.HashedChunk, 0, h.Ranges)
	for r := range h.Ranges {
		b := records[r*rec : (r+1)*rec]
		out = append(out, prefetch.HashedChunk{
			Offset: int64(binary.BigEndian.Uint64(b)),
			Length: int64(binary.BigEndian.Uint32(b[8:])),
			Hash:   b[12:],
		})
	}
	return out, nil
}

// writeSeedMap replaces the map at path (atomically; a symbolic link
// there is refused) with entries, leaving out any whose hash is not
// h.HashBytes long.
func writeSeedMap(path string, h seedMapHeader, entries []prefetch.HashedChunk) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("seed map: %w", err)
	}
	keep := entries[:0:0]
	for _, e := range entries {
		if len(e.Hash) == h.HashBytes && e.Length <= 1<<32-1 {
			keep = append(keep, e)
		}
	}
	h.Ranges = len(keep)
	var buf bytes.Buffer
	w := bufio.NewWriter(&buf)
	io.WriteString(w, seedMapMagic)
	line, err := json.Marshal(h)
	if err != nil {
		return err
	}
	w.Write(line)
	w.WriteByte('\n')
	var rec [12]byte
	for _, e := range keep {
		binary.BigEndian.PutUint64(rec[:], uint64(e.Offset))
		binary.BigEndian.PutUint32(rec[8:], uint32(e.Length))
		w.Write(rec[:])
		w.Write(e.Hash)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if err := safefile.WriteFileAtomic(path, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("seed map: %w", err)
	}
	return nil
}
