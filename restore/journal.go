package restore

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/safefile"
)

// The files a restore keeps beside its destination until it is complete:
// the bytes restored so far, and the journal of which ranges of them are
// durable. Both stay after a crash or an interrupt so a rerun resumes.
const (
	PartialSuffix = ".vmhistory-partial"
	JournalSuffix = ".vmhistory-journal"
)

// SourceIdentity names what a restore copies. A rerun resumes a partial
// restore only when the journal recorded the same identity: sources that
// share a snapshot GUID hold the same bytes, so ranges fetched by an
// earlier run, from whichever source, are still right.
type SourceIdentity struct {
	// Snapshot is the snapshot's GUID when known, else the source's own
	// name for it (dataset@name, a kopia manifest ID).
	Snapshot string    `json:"snapshot"`
	Path     string    `json:"path"` // the file, relative to the snapshot root
	Size     int64     `json:"size"`
	ModTime  time.Time `json:"mtime"`
}

// mismatch says how other differs from id, or "" when they are the same.
func (id SourceIdentity) mismatch(other SourceIdentity) string {
	switch {
	case id.Snapshot != other.Snapshot:
		return fmt.Sprintf("it was of snapshot %q, this is %q", other.Snapshot, id.Snapshot)
	case id.Path != other.Path:
		return fmt.Sprintf("it was of %q, this is %q", other.Path, id.Path)
	case id.Size != other.Size:
		return fmt.Sprintf("the file was %d bytes then, %d now", other.Size, id.Size)
	case !id.ModTime.Equal(other.ModTime):
		return fmt.Sprintf("the file was modified %s then, %s now",
			other.ModTime.UTC().Format(time.RFC3339Nano), id.ModTime.UTC().Format(time.RFC3339Nano))
	}
	return ""
}

// journalMagic starts a journal's first line; the JSON header follows.
const journalMagic = "vmhistory-restore-journal v1 "

type journalHeader struct {
	Source    SourceIdentity `json:"source"`
	RangeSize int64          `json:"range_size"`
	Started   time.Time      `json:"started"`
}

// journal is the append-only record of the ranges of a partial restore
// that are durable. Its first line is the header; every further line is
// "<range index> <crc32 of the index, hex>\n". Lines are appended only
// after the partial file was fsync'd, in batches, and the journal is then
// fsync'd itself. A line that does not check out (torn by a crash, or
// garbage a crash left in the file's tail) is ignored: its range is
// fetched again, which is always safe.
//
// A restore that does not wait for the disk (CopyOptions.NoSync) appends
// "<range index>~<boot ID> <crc32 of both>\n" without any fsync: the
// range is in the page cache, which outlives the process (Ctrl-C, a kill,
// a lost connection) but not the machine. Such a line counts only while
// the kernel that wrote it still runs: after a reboot its range is
// fetched again.
//
// The journal is locked (flock) while open, so two restores to the same
// destination cannot interleave.
type journal struct {
	f      *os.File
	path   string
	header journalHeader
	end    int64 // where the next line goes
}

// openJournal opens or creates the journal at path for want. It returns
// the set of ranges an earlier run finished (nil when starting over) and,
// when an existing journal was discarded, why.
func openJournal(path string, want journalHeader) (j *journal, done map[int]bool, restart string, err error) {
	f, err := safefile.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		if errors.Is(err, safefile.ErrNotRegular) {
			return nil, nil, "", err
		}
		return nil, nil, "", fmt.Errorf("open restore journal: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, nil, "", fmt.Errorf("another restore is writing %s (its journal %s is locked)", strings.TrimSuffix(path, JournalSuffix), path)
		}
		return nil, nil, "", fmt.Errorf("lock restore journal %s: %w", path, err)
	}
	j = &journal{f: f, path: path}
	data, err := io.ReadAll(io.NewSectionReader(f, 0, math.MaxInt64))
	if err != nil {
		f.Close()
		return nil, nil, "", fmt.Errorf("read restore journal: %w", err)
	}
	if len(data) == 0 {
		return j, nil, "", j.reset(want)
	}
	header, done, end, problem := parseJournal(data)
	switch {
	case problem != "":
		restart = "its journal is unreadable (" + problem + ")"
	case header.RangeSize <= 0:
		restart = "its journal has no range size"
	default:
		if m := want.Source.mismatch(header.Source); m != "" {
			restart = m
		}
	}
	if restart != "" {
		return j, nil, restart, j.reset(want)
	}
	// Cut a torn last line off, so the next line starts on its own.
	if end < int64(len(data)) {
		if err := f.Truncate(end); err != nil {
			f.Close()
			return nil, nil, "", fmt.Errorf("repair restore journal: %w", err)
		}
	}
	j.header, j.end = header, end
	return j, done, "", nil
}

// parseJournal reads a journal's header and finished ranges. end is the
// offset just past the last complete line.
func parseJournal(data []byte) (header journalHeader, done map[int]bool, end int64, problem string) {
	nl := bytes.IndexByte(data, '\n')
	if nl < 0 || !bytes.HasPrefix(data, []byte(journalMagic)) {
		return header, nil, 0, "no header"
	}
	if err := json.Unmarshal(data[len(journalMagic):nl], &header); err != nil {
		return header, nil, 0, "bad header: " + err.Error()
	}
	done = map[int]bool{}
	end = int64(nl + 1)
	rest := data[nl+1:]
	for len(rest) > 0 {
		nl := bytes.IndexByte(rest, '\n')
		if nl < 0 {
			break // torn last line
		}
		if idx, ok := parseJournalLine(rest[:nl]); ok {
			done[idx] = true
		}
		end += int64(nl + 1)
		rest = rest[nl+1:]
	}
	return header, done, end, ""
}

// journalLine is the record of range idx: durable, or (with a boot ID)
// only in the page cache of that boot.
func journalLine(idx int, unsyncedBoot string) string {
	s := strconv.Itoa(idx)
	if unsyncedBoot != "" {
		s += "~" + unsyncedBoot
	}
	return fmt.Sprintf("%s %08x\n", s, crc32.ChecksumIEEE([]byte(s)))
}

func parseJournalLine(line []byte) (int, bool) {
	num, sum, ok := bytes.Cut(line, []byte{' '})
	if !ok {
		return 0, false
	}
	want, err := strconv.ParseUint(string(sum), 16, 32)
	if err != nil || uint32(want) != crc32.ChecksumIEEE(num) {
		return 0, false
	}
	if n, boot, unsynced := bytes.Cut(num, []byte{'~'}); unsynced {
		if cur := currentBootID(); cur == "" || string(boot) != cur {
			return 0, false
		}
		num = n
	}
	idx, err := strconv.Atoi(string(num))
	if err != nil || idx < 0 {
		return 0, false
	}
	return idx, true
}

// reset empties the journal and writes h as its header, durably, so that
// no record of an earlier restore can outlive it.
func (j *journal) reset(h journalHeader) error {
	line, err := json.Marshal(h)
	if err != nil {
		return err
	}
	buf := append([]byte(journalMagic), line...)
	buf = append(buf, '\n')
	if err := truncateToZero(j.f); err != nil {
		return fmt.Errorf("reset restore journal: %w", err)
	}
	if _, err := j.f.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("write restore journal: %w", err)
	}
	if err := j.f.Sync(); err != nil {
		return fmt.Errorf("sync restore journal: %w", err)
	}
	j.header, j.end = h, int64(len(buf))
	return nil
}

// record appends the ranges and fsyncs the journal. The caller has made
// their bytes durable first.
func (j *journal) record(idxs []int) error {
	return j.write(idxs, "")
}

// recordUnsynced appends the ranges as written into the page cache of the
// boot bootID, without waiting for the disk.
func (j *journal) recordUnsynced(idxs []int, bootID string) error {
	return j.write(idxs, bootID)
}

func (j *journal) write(idxs []int, unsyncedBoot string) error {
	if len(idxs) == 0 {
		return nil
	}
	var b bytes.Buffer
	for _, idx := range idxs {
		b.WriteString(journalLine(idx, unsyncedBoot))
	}
	if _, err := j.f.WriteAt(b.Bytes(), j.end); err != nil {
		return fmt.Errorf("write restore journal: %w", err)
	}
	j.end += int64(b.Len())
	if unsyncedBoot != "" {
		return nil
	}
	if err := j.f.Sync(); err != nil {
		return fmt.Errorf("sync restore journal: %w", err)
	}
	return nil
}

func (j *journal) Close() error { return j.f.Close() }

// remove deletes the journal of a finished restore.
func (j *journal) remove() error {
	err := os.Remove(j.path)
	j.f.Close()
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove restore journal: %w", err)
	}
	return nil
}

// currentBootID is the kernel's random ID of this boot, "" where it cannot
// be read (then a restore does not skip the disk: see CopyOptions.NoSync).
var currentBootID = sync.OnceValue(func() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
})
