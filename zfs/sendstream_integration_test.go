package zfs_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/zfs"
)

// streamNight is a throwaway dataset whose files the nights change.
type streamNight struct {
	t    *testing.T
	ctx  context.Context
	pool *testenv.Pool
	ds   string
	mnt  string
	rng  *rand.Rand
}

func (n *streamNight) random(size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(n.rng.Uint32())
	}
	return b
}

func (n *streamNight) create(name string, data []byte) {
	n.t.Helper()
	if err := os.WriteFile(filepath.Join(n.mnt, name), data, 0o644); err != nil {
		n.t.Fatal(err)
	}
}

func (n *streamNight) writeAt(name string, off int64, data []byte) {
	n.t.Helper()
	f, err := os.OpenFile(filepath.Join(n.mnt, name), os.O_WRONLY, 0)
	if err != nil {
		n.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		n.t.Fatal(err)
	}
}

func (n *streamNight) truncate(name string, size int64) {
	n.t.Helper()
	if err := os.Truncate(filepath.Join(n.mnt, name), size); err != nil {
		n.t.Fatal(err)
	}
}

func (n *streamNight) remove(name string) {
	n.t.Helper()
	if err := os.Remove(filepath.Join(n.mnt, name)); err != nil {
		n.t.Fatal(err)
	}
}

func (n *streamNight) inode(name string) uint64 {
	n.t.Helper()
	fi, err := os.Stat(filepath.Join(n.mnt, name))
	if err != nil {
		n.t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

func (n *streamNight) zfsCmd(args ...string) {
	n.t.Helper()
	if _, err := (&runner.Local{}).Run(n.ctx, runner.Cmd{Args: append([]string{"zfs"}, args...)}); err != nil {
		n.t.Fatal(err)
	}
}

// snapshot takes the night's snapshot and returns it with its creation
// txg, which zfs-fuse has no property for: its pool history logs it.
func (n *streamNight) snapshot(name string) (zfs.Snapshot, uint64) {
	n.t.Helper()
	syscall.Sync()
	s, err := n.pool.ZFS.CreateSnapshot(n.ctx, n.ds, name, nil)
	if err != nil {
		n.t.Fatal(err)
	}
	out, err := (&runner.Local{}).Run(n.ctx, runner.Cmd{Args: []string{"zpool", "history", "-il", n.pool.Name}})
	if err != nil {
		n.t.Fatal(err)
	}
	internal := regexp.MustCompile(`\[internal snapshot txg:(\d+)\]`)
	var txg uint64
	for _, line := range strings.Split(string(out), "\n") {
		if m := internal.FindStringSubmatch(line); m != nil {
			txg, _ = strconv.ParseUint(m[1], 10, 64)
		} else if strings.Contains(line, "zfs snapshot") && strings.Contains(line, s.FullName()+" ") && txg != 0 {
			return s, txg
		}
	}
	n.t.Fatalf("no txg for %s in the pool history:\n%s", s.FullName(), out)
	return s, 0
}

// pieces hands a parser what it is given in random pieces, as a pipe
// would.
type pieces struct {
	w   io.Writer
	rng *rand.Rand
}

func (p pieces) Write(b []byte) (int, error) {
	for rest := b; len(rest) > 0; {
		n := min(len(rest), 1+p.rng.IntN(4000))
		if m, err := p.w.Write(rest[:n]); m != n || err != nil {
			return 0, fmt.Errorf("parser took %d of %d bytes: %v", m, n, err)
		}
		rest = rest[n:]
	}
	return len(b), nil
}

// send streams from..to once, into the pull reader and, in pieces, into
// the push parser, and checks that both read the same.
func (n *streamNight) send(o zfs.SendOptions, extraArgs ...string) *zfs.SendStream {
	n.t.Helper()
	var buf bytes.Buffer
	parser := zfs.NewStreamParser()
	tee := io.MultiWriter(&buf, pieces{parser, n.rng})
	if len(extraArgs) == 0 {
		if err := n.pool.ZFS.Send(n.ctx, o, tee); err != nil {
			n.t.Fatal(err)
		}
	} else {
		args := append(append([]string{"zfs", "send"}, extraArgs...), "-i", o.From, o.Snapshot)
		if _, err := (&runner.Local{}).Run(n.ctx, runner.Cmd{Args: args, Stdout: tee}); err != nil {
			n.t.Fatal(err)
		}
	}
	pushed, err := parser.Result()
	if err != nil {
		n.t.Fatalf("push parser: %v", err)
	}
	pulled, err := zfs.ParseStream(&buf)
	if err != nil {
		n.t.Fatalf("pull reader: %v", err)
	}
	if pulled.Bytes != pushed.Bytes || len(pulled.Substreams) != len(pushed.Substreams) {
		n.t.Fatalf("pull reader: %d bytes, %d substreams; push parser: %d, %d", pulled.Bytes, len(pulled.Substreams), pushed.Bytes, len(pushed.Substreams))
	}
	for i := range pulled.Substreams {
		a, b := pulled.Substreams[i], pushed.Substreams[i]
		if da, db := describeSubstream(a), describeSubstream(b); da != db {
			n.t.Fatalf("substream %d: the pull reader says\n%s\nthe push parser\n%s", i, da, db)
		}
	}
	return pulled
}

func describeSubstream(s *zfs.Substream) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%+v write bytes %d freed %v ranges %v\n", s.Begin, s.WriteBytes, s.FreedObjects, s.ObjectRanges)
	for _, obj := range s.Objects() {
		f := s.Object(obj)
		fmt.Fprintf(&b, "%d: W%v E%v F%v freed %v", obj, f.Writes, f.Embedded, f.Frees, f.Freed)
		if r := f.Record; r != nil {
			fmt.Fprintf(&b, " type %d bonus %d/%d blksz %d", r.Type, r.BonusType, r.BonusLen, r.BlockSize)
			if r.Znode != nil {
				fmt.Fprintf(&b, " %+v", *r.Znode)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

// snapshotFiles reads every regular file of a snapshot (through a
// read-only clone: zfs-fuse has no .zfs directory).
func (n *streamNight) snapshotFiles(s zfs.Snapshot) map[string]snapFile {
	n.t.Helper()
	view, err := n.pool.ZFS.OpenSnapshot(n.ctx, s.FullName())
	if err != nil {
		n.t.Fatal(err)
	}
	defer view.Close(n.ctx)
	entries, err := os.ReadDir(view.Root)
	if err != nil {
		n.t.Fatal(err)
	}
	files := map[string]snapFile{}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		path := filepath.Join(view.Root, e.Name())
		data, err := os.ReadFile(path)
		if err != nil {
			n.t.Fatal(err)
		}
		fi, err := os.Stat(path)
		if err != nil {
			n.t.Fatal(err)
		}
		files[e.Name()] = snapFile{data: data, inode: fi.Sys().(*syscall.Stat_t).Ino}
	}
	return files
}

type snapFile struct {
	data  []byte
	inode uint64
}

func inRanges(rs []zfs.Range, i uint64) bool {
	for _, r := range rs {
		if r.Offset <= i && i < r.End() {
			return true
		}
	}
	return false
}

func rangeBytes(rs []zfs.Range) uint64 {
	var n uint64
	for _, r := range rs {
		n += r.Length
	}
	return n
}

// checkChange compares a file's two versions with what the stream says:
// every changed byte lies in Reread or Zeroed, Zeroed bytes are zero, the
// new size is the file's.
func checkChange(t *testing.T, name string, old, cur []byte, c zfs.Change) {
	t.Helper()
	if c.Full != "" {
		t.Errorf("%s: uploaded in full: %s", name, c.Full)
		return
	}
	if c.NewSize != uint64(len(cur)) {
		t.Errorf("%s: new size %d, the file has %d", name, c.NewSize, len(cur))
		return
	}
	for i := range uint64(len(cur)) {
		changed := i >= uint64(len(old)) || old[i] != cur[i]
		if inRanges(c.Zeroed, i) && cur[i] != 0 {
			t.Errorf("%s: byte %d is in Zeroed %v but is %#x", name, i, c.Zeroed, cur[i])
			return
		}
		if changed && !inRanges(c.Reread, i) && !inRanges(c.Zeroed, i) {
			t.Errorf("%s: byte %d changed (%d bytes before, %d now) but is in neither Reread %v nor Zeroed %v",
				name, i, len(old), len(cur), c.Reread, c.Zeroed)
			return
		}
	}
}

// TestSendStreamDescribesZFSFuseNights reads real incremental streams of
// zfs-fuse after nights of every kind of change, and checks what the
// reader and FileChange say against the two snapshots' files.
func TestSendStreamDescribesZFSFuseNights(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 256)
	ds, mnt := pool.Dataset(t, "libvirt")
	// With compression, a record of zeros is stored as a hole: zfs-fuse
	// refuses fallocate's hole punch (keep size mode is unsupported),
	// so that is how a night punches holes here.
	if err := pool.ZFS.Set(ctx, ds, "compression", "on"); err != nil {
		t.Fatal(err)
	}
	n := &streamNight{t: t, ctx: ctx, pool: pool, ds: ds, mnt: mnt, rng: rand.New(rand.NewPCG(14, 1))}
	const K = 1024
	n.create("disk.img", n.random(3<<20))
	n.create("unaligned", n.random(1<<20))
	n.create("extend", n.random(300_000))
	n.create("extendwrite", n.random(200_000))
	n.create("truncate", n.random(1<<20))
	n.create("truncregrow", n.random(1<<20))
	n.create("punch", n.random(2<<20))
	n.create("sparse", nil)
	n.truncate("sparse", 5_000_000)
	n.writeAt("sparse", 40960, n.random(4096))
	n.create("unchanged", n.random(700_000))
	n.create("tiny", []byte("hi\n"))
	n.create("victim", n.random(100_000))
	n.create("deleted", n.random(200_000))
	s1, txg1 := n.snapshot("s1")
	victimInode, deletedInode := n.inode("victim"), n.inode("deleted")

	// Night 1.
	n.writeAt("unaligned", 500_001, []byte("XYZ"))
	n.writeAt("unaligned", 4095, n.random(5000))
	n.writeAt("unaligned", 1<<20-10, n.random(30)) // also grows it by 20
	n.truncate("extend", 600_000)
	n.writeAt("extendwrite", 700_000, n.random(1000))
	n.truncate("truncate", 300_000)
	n.truncate("truncregrow", 100_000)
	n.truncate("truncregrow", 1<<20)
	n.writeAt("punch", 384*K, make([]byte, 256*K))
	n.writeAt("tiny", 1, []byte("o"))
	// The same record twice: `send -D` sends the second by reference.
	same := n.random(128 * K)
	n.writeAt("disk.img", 0, same)
	n.writeAt("disk.img", 2<<20, same)
	// Delete + create in one night reusing the object number: zfs-fuse
	// hands out the lowest free number after a remount.
	n.remove("victim")
	syscall.Sync()
	n.zfsCmd("umount", ds)
	n.zfsCmd("mount", ds)
	n.create("reborn", n.random(50_000))
	if got := n.inode("reborn"); got != victimInode {
		t.Fatalf("the new file got inode %d, not the deleted one's %d: the reuse case is not made", got, victimInode)
	}
	n.remove("deleted")
	n.create("new", n.random(70_000))
	s2, txg2 := n.snapshot("s2")

	st := n.send(zfs.SendOptions{Snapshot: s2.FullName(), From: s1.FullName()})
	if len(st.Substreams) != 1 {
		t.Fatalf("%d substreams in send -i", len(st.Substreams))
	}
	sub := st.Substreams[0]
	if b := sub.Begin; b.FromGUID != s1.GUID || b.ToGUID != s2.GUID || b.ToName != s2.FullName() {
		t.Errorf("begin %+v, want %s (%d) from %d", b, s2.FullName(), s2.GUID, s1.GUID)
	}
	before, after := n.snapshotFiles(s1), n.snapshotFiles(s2)
	changes := map[string]zfs.Change{}
	for name, cur := range after {
		old, ok := before[name]
		if !ok {
			continue // a new file is uploaded in full anyway
		}
		f := sub.Object(cur.inode)
		if f.Record != nil && f.Record.Znode != nil && f.Record.Znode.Size != uint64(len(cur.data)) {
			t.Errorf("%s: znode size %d, the file has %d", name, f.Record.Znode.Size, len(cur.data))
		}
		c := zfs.FileChange(uint64(len(old.data)), txg1, f)
		changes[name] = c
		if name == "reborn" {
			continue
		}
		if old.inode != cur.inode {
			t.Fatalf("%s: inode %d became %d", name, old.inode, cur.inode)
		}
		checkChange(t, name, old.data, cur.data, c)
	}
	if c := zfs.FileChange(100_000, txg1, sub.Object(victimInode)); !strings.Contains(c.Full, "reused") {
		t.Errorf("the victim's object, reused by a new file: %+v, want reused", c)
	}
	if f := sub.Object(deletedInode); !f.Freed || f.Record != nil {
		t.Errorf("the deleted file's object %d: %+v, want freed", deletedInode, f)
	} else if c := zfs.FileChange(200_000, txg1, f); !strings.Contains(c.Full, "deleted") {
		t.Errorf("deleted: %+v", c)
	}
	if g := sub.Object(victimInode).Record.Znode.Gen; g <= txg1 || g > txg2 {
		t.Errorf("reborn's generation %d is not within (%d, %d]", g, txg1, txg2)
	}
	// Not just covered: as narrow as the records that changed.
	for name, want := range map[string]string{
		"unchanged":   "[] [] 700000",
		"extend":      "[] [[300000, 600000)] 600000",
		"truncate":    "[[262144, 300000)] [] 300000",
		"unaligned":   "[[0, 131072) [393216, 524288) [917504, 1048596)] [] 1048596",
		"extendwrite": "[[655360, 701000)] [[200000, 655360)] 701000",
		"punch":       "[] [[393216, 655360)] 2097152",
		"disk.img":    "[[0, 131072) [2097152, 2228224)] [] 3145728",
	} {
		c := changes[name]
		if got := fmt.Sprint(c.Reread, c.Zeroed, c.NewSize); got != want {
			t.Errorf("%s: %s, want %s", name, got, want)
		}
	}
	// zfs-fuse lists the untouched files of a touched block of dnodes:
	// the "unchanged" verdict above came from an OBJECT record.
	if f := sub.Object(after["unchanged"].inode); f.Record == nil {
		t.Errorf("the unchanged file has no OBJECT record: %+v; the case is not made", f)
	}
	if c := changes["truncregrow"]; len(c.Reread)+len(c.Zeroed) == 0 || c.NewSize != 1<<20 {
		t.Errorf("truncregrow, cut and regrown in one night: %+v", c)
	}
	if c := changes["sparse"]; len(c.Reread) != 0 {
		t.Errorf("sparse, unchanged: %+v, want nothing to read", c)
	}
	if sub.WriteBytes < rangeBytes(changes["unaligned"].Reread) {
		t.Errorf("the stream's WRITE bytes %d are fewer than one file's reread %v", sub.WriteBytes, changes["unaligned"].Reread)
	}

	// The same night sent with -D (dedup: the second copy of a record
	// goes by reference) says the same of every file.
	dedup := n.send(zfs.SendOptions{Snapshot: s2.FullName(), From: s1.FullName()}, "-D")
	if dedup.Substreams[0].Begin.Features&1 == 0 {
		t.Errorf("send -D stream features %#x, want DEDUP", dedup.Substreams[0].Begin.Features)
	}
	for name, cur := range after {
		if _, ok := before[name]; ok {
			c := zfs.FileChange(uint64(len(before[name].data)), txg1, dedup.Substreams[0].Object(cur.inode))
			if fmt.Sprintf("%+v", c) != fmt.Sprintf("%+v", changes[name]) {
				t.Errorf("%s: send -D says %+v, send %+v", name, c, changes[name])
			}
		}
	}

	// Night 2, then both nights as one -I package.
	n.writeAt("reborn", 10, []byte("later"))
	n.writeAt("disk.img", 1<<20+77, n.random(10_000))
	n.truncate("extend", 1000)
	n.create("tiny", []byte("rewritten\n"))
	s3, _ := n.snapshot("s3")
	pkg := n.send(zfs.SendOptions{Snapshot: s3.FullName(), From: s1.FullName(), Intermediate: true})
	chain, err := pkg.Between(s1.GUID, s3.GUID)
	if err != nil || len(chain) != 2 || chain[0].Begin.ToGUID != s2.GUID {
		t.Fatalf("-I s1 s3: %v, %v", chain, err)
	}
	if only2, err := pkg.Between(s2.GUID, s3.GUID); err != nil || len(only2) != 1 {
		t.Errorf("the second night alone: %v, %v", only2, err)
	}
	last := n.snapshotFiles(s3)
	for name, cur := range last {
		old, ok := before[name]
		if !ok || name == "reborn" {
			continue
		}
		c := zfs.FileChange(uint64(len(old.data)), txg1, chain[0].Object(cur.inode), chain[1].Object(cur.inode))
		checkChange(t, name, old.data, cur.data, c)
	}
	if c := zfs.FileChange(100_000, txg1, chain[0].Object(victimInode), chain[1].Object(victimInode)); !strings.Contains(c.Full, "reused") {
		t.Errorf("reborn across both nights: %+v, want reused", c)
	}
	if c := zfs.FileChange(uint64(len(before["unchanged"].data)), txg1, chain[0].Object(before["unchanged"].inode), chain[1].Object(before["unchanged"].inode)); !c.Unchanged() {
		t.Errorf("unchanged across both nights: %+v", c)
	}
}

// A truncated or corrupted real stream is refused, however it arrives.
func TestSendStreamRefusesDamagedZFSFuseStream(t *testing.T) {
	ctx := context.Background()
	pool := testenv.NewPool(t, 64)
	ds, mnt := pool.Dataset(t, "libvirt")
	n := &streamNight{t: t, ctx: ctx, pool: pool, ds: ds, mnt: mnt, rng: rand.New(rand.NewPCG(14, 2))}
	n.create("disk.img", n.random(500_000))
	s1, _ := n.snapshot("s1")
	n.writeAt("disk.img", 200_000, n.random(1000))
	s2, _ := n.snapshot("s2")
	var buf bytes.Buffer
	if err := pool.ZFS.Send(ctx, zfs.SendOptions{Snapshot: s2.FullName(), From: s1.FullName()}, &buf); err != nil {
		t.Fatal(err)
	}
	stream := buf.Bytes()
	if _, err := zfs.ParseStream(bytes.NewReader(stream[:len(stream)-100])); !errors.Is(err, zfs.ErrStreamTruncated) {
		t.Errorf("cut short: %v", err)
	}
	bad := bytes.Clone(stream)
	bad[len(bad)-400] ^= 1 // in the last record before END: the data or a header field
	if _, err := zfs.ParseStream(bytes.NewReader(bad)); !errors.Is(err, zfs.ErrStreamChecksum) {
		t.Errorf("one bit flipped: %v", err)
	}
}
