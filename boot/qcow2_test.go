package boot

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// qemuImg runs qemu-img create -q with args, failing t on error.
func testQemuImg(t *testing.T, args ...string) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	out, err := exec.Command("qemu-img", append([]string{"create", "-q"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img create %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func writeTestFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func readTestFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReadImageHeaderQcow2(t *testing.T) {
	dir := t.TempDir()
	writeTestFile(t, filepath.Join(dir, "base.raw"), make([]byte, 1<<20))
	testQemuImg(t, "-f", "qcow2", filepath.Join(dir, "base.qcow2"), "5M")
	abs := filepath.Join(dir, "base.qcow2")
	long := "/tank/vms/" + strings.Repeat("d", 300) + "/base.raw"

	cases := []struct {
		name    string
		args    []string // after -f qcow2, before the file name
		size    string
		version uint32
		want    imageHeader
	}{
		{"v3 no backing", nil, "3M", 3,
			imageHeader{Format: "qcow2", VirtualSize: 3 << 20}},
		{"v2 no backing", []string{"-o", "compat=0.10"}, "7G", 2,
			imageHeader{Format: "qcow2", VirtualSize: 7 << 30}},
		{"v3 relative raw backing", []string{"-b", "base.raw", "-F", "raw"}, "2M", 3,
			imageHeader{Format: "qcow2", VirtualSize: 2 << 20, BackingFile: "base.raw", BackingFormat: "raw"}},
		{"v3 absolute qcow2 backing", []string{"-b", abs, "-F", "qcow2"}, "", 3,
			imageHeader{Format: "qcow2", VirtualSize: 5 << 20, BackingFile: abs, BackingFormat: "qcow2"}},
		{"v2 relative qcow2 backing", []string{"-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2"}, "", 2,
			imageHeader{Format: "qcow2", VirtualSize: 5 << 20, BackingFile: "base.qcow2", BackingFormat: "qcow2"}},
		{"v2 absolute raw backing", []string{"-o", "compat=0.10", "-b", filepath.Join(dir, "base.raw"), "-F", "raw"}, "", 2,
			imageHeader{Format: "qcow2", VirtualSize: 1 << 20, BackingFile: filepath.Join(dir, "base.raw"), BackingFormat: "raw"}},
		{"backing not on this host", []string{"-u", "-b", "/tank/vms/images/gone.qcow2", "-F", "qcow2"}, "10M", 3,
			imageHeader{Format: "qcow2", VirtualSize: 10 << 20, BackingFile: "/tank/vms/images/gone.qcow2", BackingFormat: "qcow2"}},
		{"long backing name", []string{"-u", "-b", long, "-F", "raw"}, "1M", 3,
			imageHeader{Format: "qcow2", VirtualSize: 1 << 20, BackingFile: long, BackingFormat: "raw"}},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, "img"+string(rune('a'+i))+".qcow2")
			args := append([]string{"-f", "qcow2"}, c.args...)
			args = append(args, p)
			if c.size != "" {
				args = append(args, c.size)
			}
			testQemuImg(t, args...)
			if v := binary.BigEndian.Uint32(readTestFile(t, p)[4:]); v != c.version {
				t.Fatalf("qemu-img made version %d, the case wants %d", v, c.version)
			}
			got, err := readImageHeader(p)
			if err != nil {
				t.Fatal(err)
			}
			if got != c.want {
				t.Errorf("readImageHeader = %+v, want %+v", got, c.want)
			}
		})
	}
}

func TestReadImageHeaderRaw(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"zeros", make([]byte, 3<<20)}, // more than the header read
		{"odd size", bytes.Repeat([]byte("x"), 12345)},
		{"magic cut short", []byte("QFI")},
		{"other image", []byte("KDMV\x01\x00\x00\x00 a vmdk, say")},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "_"))
			writeTestFile(t, p, c.data)
			got, err := readImageHeader(p)
			if err != nil {
				t.Fatal(err)
			}
			if want := (imageHeader{Format: "raw", VirtualSize: int64(len(c.data))}); got != want {
				t.Errorf("readImageHeader = %+v, want %+v", got, want)
			}
		})
	}
	if _, err := readImageHeader(filepath.Join(dir, "missing")); !os.IsNotExist(err) {
		t.Errorf("a missing file: err = %v, want not-exist", err)
	}
}

// realHeader is the first cluster of a qcow2 image with a backing file
// and its format recorded.
func realHeader(t *testing.T, compat string) []byte {
	t.Helper()
	dir := t.TempDir()
	p := filepath.Join(dir, "top.qcow2")
	testQemuImg(t, "-f", "qcow2", "-o", "compat="+compat, "-u", "-b", "/tank/vms/base.qcow2", "-F", "qcow2", p, "1G")
	b := readTestFile(t, p)
	return b[:64<<10]
}

func TestParseQcow2BackingFormatNotRecorded(t *testing.T) {
	// qemu-img no longer writes an image without -F: take the extension
	// out by hand (an unknown type, skipped as QEMU skips it).
	for _, compat := range []string{"0.10", "1.1"} {
		buf := realHeader(t, compat)
		i := bytes.Index(buf, []byte{0xE2, 0x79, 0x2A, 0xCA})
		if i < 0 {
			t.Fatal("no backing format extension in the image qemu-img made")
		}
		binary.BigEndian.PutUint32(buf[i:], 0x12345678)
		h, err := parseQcow2(buf)
		if err != nil {
			t.Fatal(err)
		}
		if want := (imageHeader{Format: "qcow2", VirtualSize: 1 << 30, BackingFile: "/tank/vms/base.qcow2"}); h != want {
			t.Errorf("compat %s: parseQcow2 = %+v, want %+v", compat, h, want)
		}
	}
}

func TestParseQcow2Truncated(t *testing.T) {
	for _, compat := range []string{"0.10", "1.1"} {
		buf := realHeader(t, compat)
		full, err := parseQcow2(buf)
		if err != nil || full.BackingFile != "/tank/vms/base.qcow2" || full.BackingFormat != "qcow2" {
			t.Fatalf("compat %s, whole header: %+v, %v", compat, full, err)
		}
		nameEnd := int(binary.BigEndian.Uint64(buf[8:]) + uint64(binary.BigEndian.Uint32(buf[16:])))
		for n := 0; n <= 1024; n++ {
			h, err := parseQcow2(buf[:n])
			if n < nameEnd && err == nil {
				t.Errorf("compat %s, %d bytes (the backing name ends at %d): no error, %+v", compat, n, nameEnd, h)
			}
			if err == nil && (h.BackingFile != full.BackingFile || h.VirtualSize != full.VirtualSize) {
				t.Errorf("compat %s, %d bytes: %+v, want the whole header's %+v", compat, n, h, full)
			}
		}
		// And through readImageHeader: a file cut inside the header.
		p := filepath.Join(t.TempDir(), "cut.qcow2")
		for _, n := range []int{4, 8, 50, 71, 72, 100, 103} {
			writeTestFile(t, p, buf[:n])
			if h, err := readImageHeader(p); err == nil {
				t.Errorf("compat %s, a file of %d bytes: no error, %+v", compat, n, h)
			}
		}
	}
}

func TestParseQcow2Garbage(t *testing.T) {
	be := binary.BigEndian
	hdr := func(version uint32, backingOff uint64, backingLen uint32, n int) []byte {
		b := make([]byte, n)
		copy(b, qcow2Magic)
		be.PutUint32(b[4:], version)
		be.PutUint64(b[8:], backingOff)
		be.PutUint32(b[16:], backingLen)
		if n >= 104 {
			be.PutUint32(b[100:], 104)
		}
		return b
	}
	for _, c := range []struct {
		name string
		buf  []byte
	}{
		{"backing offset wraps around", hdr(3, ^uint64(0), 2, 4096)},
		{"backing offset past the end", hdr(3, 1<<40, 8, 4096)},
		{"backing name runs off the end", hdr(3, 4090, 8, 4096)},
		{"backing name too long", hdr(3, 512, 2000, 4096)},
		{"backing offset without a length", hdr(3, 512, 0, 4096)},
		{"v3 cut before header_length", hdr(3, 0, 0, 100)},
	} {
		if h, err := parseQcow2(c.buf); err == nil {
			t.Errorf("%s: no error, %+v", c.name, h)
		}
	}

	// Extensions that lie about their length or where they start.
	for _, hl := range []uint32{0, 7, 104, 4095, 4096, 1 << 31, ^uint32(0)} {
		b := hdr(3, 0, 0, 4096)
		be.PutUint32(b[100:], hl)
		if uint64(hl)+8 <= 4096 {
			be.PutUint32(b[hl:], qcow2ExtBackingFmt)
			be.PutUint32(b[hl+4:], ^uint32(0))
		}
		parseQcow2(b) // must not panic
	}

	// Random mutations of real headers never panic, and what parses keeps
	// the backing name within bounds.
	rng := rand.New(rand.NewPCG(1, 2))
	for _, compat := range []string{"0.10", "1.1"} {
		real := realHeader(t, compat)[:1024]
		for range 20000 {
			b := bytes.Clone(real[:rng.IntN(len(real)+1)])
			for range 1 + rng.IntN(4) {
				if len(b) == 0 {
					break
				}
				switch i := rng.IntN(len(b)); rng.IntN(3) {
				case 0:
					b[i] = byte(rng.Uint32())
				case 1: // a field-sized run of 0xff: huge offsets and lengths
					for j := i; j < len(b) && j < i+8; j++ {
						b[j] = 0xff
					}
				default:
					b[i] ^= 1 << rng.IntN(8)
				}
			}
			h, err := parseQcow2(b)
			if err == nil && (len(h.BackingFile) > 1023 || h.Format != "qcow2") {
				t.Fatalf("parseQcow2(%x) = %+v", b, h)
			}
		}
	}
}

func TestParseQcow2Refuses(t *testing.T) {
	dir := t.TempDir()
	be := binary.BigEndian

	// qcow (version 1) shares qcow2's magic but not its layout.
	p := filepath.Join(dir, "v1.qcow2")
	testQemuImg(t, "-f", "qcow2", "-o", "compat=0.10", p, "1M")
	b := readTestFile(t, p)
	be.PutUint32(b[4:], 1)
	writeTestFile(t, p, b)
	if h, err := readImageHeader(p); err == nil {
		t.Errorf("a version 1 image: no error, %+v", h)
	}

	// An external data file holds the guest's data out of the image: it
	// is not necessarily in the snapshot.
	p = filepath.Join(dir, "ext.qcow2")
	testQemuImg(t, "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw"), p, "1M")
	h, err := readImageHeader(p)
	if err == nil || !strings.Contains(err.Error(), "data file") {
		t.Errorf("an image with an external data file: %+v, %v; want an error about the data file", h, err)
	}
}
