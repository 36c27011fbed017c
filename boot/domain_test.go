package boot

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"
)

// testMountpoint is the dataset's mountpoint when the pretend snapshot
// was taken.
const testMountpoint = "/tank/vms"

// newLayout makes a pretend snapshot directory, as the mount would serve
// it, and the boot directory beside it.
func newLayout(t *testing.T) (l layout, root, dir string) {
	t.Helper()
	root = t.TempDir()
	l = layout{mountpoint: testMountpoint, snapDir: filepath.Join(root, "mnt", "tank", "vms@s1")}
	if err := os.MkdirAll(l.snapDir, 0o755); err != nil {
		t.Fatal(err)
	}
	return l, root, filepath.Join(root, "boot")
}

// snapPath is where host path p (under testMountpoint) is in l's snapshot
// directory.
func snapPath(l layout, p string) string {
	rel, err := filepath.Rel(testMountpoint, p)
	if err != nil || strings.HasPrefix(rel, "..") {
		panic("snapPath: " + p + " is not under " + testMountpoint)
	}
	return filepath.Join(l.snapDir, rel)
}

func testMkdirs(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

func testSymlink(t *testing.T, target, link string) {
	t.Helper()
	testMkdirs(t, filepath.Dir(link))
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func parseDomain(t *testing.T, xml string) *libvirtxml.Domain {
	t.Helper()
	dom := &libvirtxml.Domain{}
	if err := dom.Unmarshal(xml); err != nil {
		t.Fatalf("%v\n%s", err, xml)
	}
	return dom
}

// roundTrip marshals dom and parses the XML back: what libvirt is given.
func roundTrip(t *testing.T, dom *libvirtxml.Domain) (*libvirtxml.Domain, string) {
	t.Helper()
	xml, err := dom.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return parseDomain(t, xml), xml
}

func diskXML(typ, device, source, driver, target string, readOnly bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "<disk type='%s' device='%s'>", typ, device)
	if driver != "" {
		fmt.Fprintf(&b, "<driver name='qemu' type='%s'/>", driver)
	}
	switch {
	case source == "":
	case typ == "block":
		fmt.Fprintf(&b, "<source dev='%s'/>", source)
	default:
		fmt.Fprintf(&b, "<source file='%s'/>", source)
	}
	fmt.Fprintf(&b, "<target dev='%s'/>", target)
	if readOnly {
		b.WriteString("<readonly/>")
	}
	b.WriteString("</disk>")
	return b.String()
}

func domainXML(devices ...string) string {
	return "<domain type='kvm'><name>vm1</name><uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid><devices>" +
		strings.Join(devices, "") + "</devices></domain>"
}

func TestInSnapshot(t *testing.T) {
	snap := "/mnt/vmhistory/tank/vms@s1"
	l := layout{mountpoint: testMountpoint, snapDir: snap}
	for _, c := range []struct {
		path, want string // want "" for outside
	}{
		{"/tank/vms/disk.img", snap + "/disk.img"},
		{"/tank/vms/a/b/disk.qcow2", snap + "/a/b/disk.qcow2"},
		{"/tank/vms//a/./disk.img", snap + "/a/disk.img"},
		{"/tank/vms/a/../disk.img", snap + "/disk.img"},
		{"/tank/vms/..disk", snap + "/..disk"},
		{"/tank/vms/...", snap + "/..."},
		{"/tank/vms", snap},
		{"/tank/vms/", snap},
		{"/tank/vmsX/disk.img", ""},
		{"/tank/vms.old/disk.img", ""},
		{"/tank/vm/disk.img", ""},
		{"/tank/vms/../vmsX/disk.img", ""},
		{"/tank/vms/a/../../vmsX/disk.img", ""},
		{"/tank/vms/a/../../../etc/shadow", ""},
		{"/tank/vms/..", ""},
		{"/tank", ""},
		{"/", ""},
		{"/etc/passwd", ""},
		{"tank/vms/disk.img", ""},
		{"disk.img", ""},
		{"../tank/vms/disk.img", ""},
		{"", ""},
	} {
		got, ok := l.inSnapshot(c.path)
		if ok != (c.want != "") || got != c.want {
			t.Errorf("inSnapshot(%q) = %q, %v; want %q", c.path, got, ok, c.want)
		}
	}
	// A mountpoint written with a trailing slash, and the root dataset.
	if got, ok := (layout{mountpoint: "/tank/vms/", snapDir: snap}).inSnapshot("/tank/vmsX/d"); ok {
		t.Errorf("mountpoint /tank/vms/: /tank/vmsX/d maps to %q", got)
	}
	if got, ok := (layout{mountpoint: "/", snapDir: snap}).inSnapshot("/srv/d.img"); !ok || got != snap+"/srv/d.img" {
		t.Errorf("mountpoint /: /srv/d.img maps to %q, %v", got, ok)
	}
}

// Every path made of these components maps into the snapshot directory
// exactly when it is under the mountpoint once cleaned.
func TestInSnapshotNeverEscapes(t *testing.T) {
	snap := "/mnt/vmhistory/tank/vms@s1"
	l := layout{mountpoint: testMountpoint, snapDir: snap}
	parts := []string{"tank", "vms", "vmsX", "..", ".", "", "a"}
	var walk func(p string, depth int)
	walk = func(p string, depth int) {
		got, ok := l.inSnapshot(p)
		clean := filepath.Clean(p)
		under := clean == testMountpoint || strings.HasPrefix(clean, testMountpoint+"/")
		if ok != under {
			t.Errorf("inSnapshot(%q) ok = %v, but %q under %s is %v", p, ok, clean, testMountpoint, under)
		}
		if ok && got != snap && !strings.HasPrefix(got, snap+"/") {
			t.Errorf("inSnapshot(%q) = %q, out of %s", p, got, snap)
		}
		if ok && got != filepath.Join(snap, strings.TrimPrefix(clean, testMountpoint)) {
			t.Errorf("inSnapshot(%q) = %q", p, got)
		}
		if depth == 0 {
			return
		}
		for _, c := range parts {
			walk(p+"/"+c, depth-1)
		}
	}
	walk("", 6)
}

// chainImages makes, in l's snapshot:
//
//	images/root.raw    raw, 1 MiB
//	images/base.qcow2  qcow2 over /tank/vms/images/root.raw (absolute)
//	vm1/root.qcow2     qcow2 over ../images/base.qcow2 (relative)
//	vm1/data.raw       raw, 64 KiB
//	vm2/disk.qcow2     qcow2 over ../images/root.raw (relative), raw
func chainImages(t *testing.T, l layout) {
	t.Helper()
	writeTestFile(t, snapPath(l, "/tank/vms/images/root.raw"), make([]byte, 1<<20))
	testQemuImg(t, "-f", "qcow2", "-u", "-b", "/tank/vms/images/root.raw", "-F", "raw", snapPath(l, "/tank/vms/images/base.qcow2"), "1M")
	testMkdirs(t, snapPath(l, "/tank/vms/vm1"), snapPath(l, "/tank/vms/vm2"))
	testQemuImg(t, "-f", "qcow2", "-u", "-b", "../images/base.qcow2", "-F", "qcow2", snapPath(l, "/tank/vms/vm1/root.qcow2"), "4M")
	writeTestFile(t, snapPath(l, "/tank/vms/vm1/data.raw"), make([]byte, 64<<10))
	testQemuImg(t, "-f", "qcow2", "-o", "compat=0.10", "-u", "-b", "../images/root.raw", "-F", "raw", snapPath(l, "/tank/vms/vm2/disk.qcow2"), "2M")
}

func TestChain(t *testing.T) {
	l, _, _ := newLayout(t)
	chainImages(t, l)
	root := Layer{snapPath(l, "/tank/vms/images/root.raw"), "raw"}
	base := Layer{snapPath(l, "/tank/vms/images/base.qcow2"), "qcow2"}
	for _, c := range []struct {
		original, format string
		want             []Layer
		size             int64
	}{
		{"/tank/vms/vm1/data.raw", "raw", []Layer{{snapPath(l, "/tank/vms/vm1/data.raw"), "raw"}}, 64 << 10},
		{"/tank/vms/vm1/data.raw", "", []Layer{{snapPath(l, "/tank/vms/vm1/data.raw"), "raw"}}, 64 << 10},
		{"/tank/vms/images/root.raw", "raw", []Layer{root}, 1 << 20},
		// Relative backing names are the original image's: ../images
		// from /tank/vms/vm2, then found in the snapshot.
		{"/tank/vms/vm2/disk.qcow2", "qcow2", []Layer{{snapPath(l, "/tank/vms/vm2/disk.qcow2"), "qcow2"}, root}, 2 << 20},
		{"/tank/vms/vm1/root.qcow2", "qcow2", []Layer{{snapPath(l, "/tank/vms/vm1/root.qcow2"), "qcow2"}, base, root}, 4 << 20},
		// The format probed when the definition says none.
		{"/tank/vms/vm1/root.qcow2", "", []Layer{{snapPath(l, "/tank/vms/vm1/root.qcow2"), "qcow2"}, base, root}, 4 << 20},
		{"/tank/vms/vm1/../images/base.qcow2", "qcow2", []Layer{base, root}, 1 << 20},
	} {
		got, size, err := l.chain("vda", c.original, c.format)
		if err != nil {
			t.Errorf("chain(%s, %q): %v", c.original, c.format, err)
			continue
		}
		if !slices.Equal(got, c.want) || size != c.size {
			t.Errorf("chain(%s, %q) = %v, %d; want %v, %d", c.original, c.format, got, size, c.want, c.size)
		}
	}
}

func TestChainRefuses(t *testing.T) {
	l, root, _ := newLayout(t)
	chainImages(t, l)
	img := func(name string, args ...string) string {
		p := "/tank/vms/bad/" + name
		testMkdirs(t, snapPath(l, "/tank/vms/bad"))
		testQemuImg(t, append(append([]string{"-f", "qcow2", "-u"}, args...), snapPath(l, p), "1M")...)
		return p
	}
	// Files that would be found, were the mapping sloppy.
	writeTestFile(t, filepath.Join(l.snapDir+"X", "base.raw"), make([]byte, 512))
	writeTestFile(t, filepath.Join(l.snapDir, "X", "base.raw"), make([]byte, 512))
	writeTestFile(t, filepath.Join(l.snapDir, "..", "vmsX", "base.raw"), make([]byte, 512))
	writeTestFile(t, filepath.Join(root, "etc", "base.raw"), make([]byte, 512))

	for _, c := range []struct {
		name, original, format, want string
	}{
		{"backing outside, absolute", img("abs.qcow2", "-b", "/var/lib/libvirt/images/base.raw", "-F", "raw"), "qcow2", "leaves the dataset"},
		{"backing outside, relative", img("rel.qcow2", "-b", "../../../etc/base.raw", "-F", "raw"), "qcow2", "leaves the dataset"},
		{"backing on a prefix sibling", img("sib.qcow2", "-b", "/tank/vmsX/base.raw", "-F", "raw"), "qcow2", "leaves the dataset"},
		{"backing to a prefix sibling through ..", img("sibrel.qcow2", "-b", "../../vmsX/base.raw", "-F", "raw"), "qcow2", "leaves the dataset"},
		{"backing missing from the snapshot", img("gone.qcow2", "-b", "/tank/vms/images/gone.raw", "-F", "raw"), "qcow2", "not in the snapshot"},
		{"backing not a file path", img("nbd.qcow2", "-b", "nbd:localhost:10809", "-F", "raw"), "qcow2", "not a file path"},
		{"backing its own image", img("loop.qcow2", "-b", "loop.qcow2", "-F", "qcow2"), "qcow2", "deeper than 16"},
		{"backing format wrong", img("wrongfmt.qcow2", "-b", "/tank/vms/images/root.raw", "-F", "qcow2"), "qcow2", "is raw, its definition says qcow2"},
		{"image outside", "/var/lib/libvirt/images/vm1.qcow2", "qcow2", "not on the snapshot's dataset"},
		{"image on a prefix sibling", "/tank/vmsX/base.raw", "raw", "not on the snapshot's dataset"},
		{"image through ..", "/tank/vms/../vmsX/base.raw", "raw", "not on the snapshot's dataset"},
		{"image relative", "tank/vms/vm1/data.raw", "raw", "not on the snapshot's dataset"},
		{"image missing", "/tank/vms/vm1/gone.raw", "raw", "not in the snapshot"},
		{"image a directory", "/tank/vms/vm1", "raw", "not a regular file"},
		{"qcow2 said raw", "/tank/vms/vm1/root.qcow2", "raw", "is qcow2, its definition says raw"},
		{"raw said qcow2", "/tank/vms/vm1/data.raw", "qcow2", "is raw, its definition says qcow2"},
		{"another format", "/tank/vms/vm1/data.raw", "vmdk", "format vmdk is not supported"},
	} {
		got, _, err := l.chain("vda", c.original, c.format)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: chain(%s) = %v, %v; want an error saying %q", c.name, c.original, got, err, c.want)
		}
	}
}

// Symbolic links in the snapshot are followed as on the original host:
// within the snapshot, never to this host's files.
func TestChainSymlinks(t *testing.T) {
	l, root, _ := newLayout(t)
	chainImages(t, l)
	live := filepath.Join(root, "live", "disk.raw") // a file of this host
	writeTestFile(t, live, make([]byte, 4096))
	testSymlink(t, "/tank/vms/images/base.qcow2", snapPath(l, "/tank/vms/links/abs.qcow2"))
	testSymlink(t, "../vm1/data.raw", snapPath(l, "/tank/vms/links/rel.raw"))
	testSymlink(t, "vm1", snapPath(l, "/tank/vms/current"))
	testSymlink(t, "/tank/vms/links/abs.qcow2", snapPath(l, "/tank/vms/links/twice.qcow2"))
	testSymlink(t, live, snapPath(l, "/tank/vms/links/live.raw"))
	testSymlink(t, "../../../../live/disk.raw", snapPath(l, "/tank/vms/links/up.raw"))
	testSymlink(t, filepath.Dir(live), snapPath(l, "/tank/vms/hostdir"))
	testSymlink(t, "loop2", snapPath(l, "/tank/vms/links/loop1"))
	testSymlink(t, "loop1", snapPath(l, "/tank/vms/links/loop2"))
	// The relative link resolved on this host reaches the live file.
	if _, err := os.Stat(snapPath(l, "/tank/vms/links/up.raw")); err != nil {
		t.Fatalf("the test's link does not reach the live file: %v", err)
	}

	base := Layer{snapPath(l, "/tank/vms/images/base.qcow2"), "qcow2"}
	rootRaw := Layer{snapPath(l, "/tank/vms/images/root.raw"), "raw"}
	data := Layer{snapPath(l, "/tank/vms/vm1/data.raw"), "raw"}
	for _, c := range []struct {
		original string
		want     []Layer
	}{
		{"/tank/vms/links/abs.qcow2", []Layer{base, rootRaw}},
		{"/tank/vms/links/twice.qcow2", []Layer{base, rootRaw}},
		{"/tank/vms/links/rel.raw", []Layer{data}},
		{"/tank/vms/current/data.raw", []Layer{data}},
		{"/tank/vms/current/root.qcow2", []Layer{{snapPath(l, "/tank/vms/vm1/root.qcow2"), "qcow2"}, base, rootRaw}},
	} {
		got, _, err := l.chain("vda", c.original, "")
		if err != nil {
			t.Errorf("chain(%s): %v", c.original, err)
			continue
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("chain(%s) = %v, want %v", c.original, got, c.want)
		}
	}
	for _, c := range []struct{ original, want string }{
		{"/tank/vms/links/live.raw", "leaves the dataset"},
		{"/tank/vms/links/up.raw", "leaves the dataset"},
		{"/tank/vms/hostdir/disk.raw", "leaves the dataset"},
		{"/tank/vms/links/loop1", "too many levels"},
	} {
		got, _, err := l.chain("vda", c.original, "raw")
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("chain(%s) = %v, %v; want an error saying %q", c.original, got, err, c.want)
		}
	}
}

func TestPlanDisks(t *testing.T) {
	l, _, dir := newLayout(t)
	chainImages(t, l)
	writeTestFile(t, snapPath(l, "/tank/vms/vm1/scratch.img"), make([]byte, 8192))
	writeTestFile(t, snapPath(l, "/tank/vms/iso/tools.iso"), make([]byte, 2048))
	dom := parseDomain(t, domainXML(
		// As libvirt writes a disk it probed: index, the chain it saw.
		`<disk type='file' device='disk'>
		  <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
		  <source file='/tank/vms/vm1/root.qcow2' index='3'/>
		  <backingStore type='file' index='4'>
		    <format type='qcow2'/>
		    <source file='/tank/vms/images/base.qcow2'/>
		    <backingStore/>
		  </backingStore>
		  <target dev='vda' bus='virtio'/>
		</disk>`,
		diskXML("file", "disk", "/tank/vms/vm1/data.raw", "raw", "vdb", false),
		diskXML("file", "disk", "/tank/vms/vm1/scratch.img", "", "vdc", false),
		diskXML("file", "cdrom", "/var/lib/libvirt/images/installer.iso", "raw", "sda", true),
		diskXML("file", "cdrom", "", "raw", "sdb", true),
		diskXML("file", "cdrom", "/tank/vms/iso/tools.iso", "raw", "sdc", true),
		diskXML("file", "disk", "/tank/vms/images/base.qcow2", "qcow2", "vdd", true),
		diskXML("block", "cdrom", "/dev/sr0", "raw", "sdd", true),
		diskXML("file", "cdrom", "/tank/vmsX/other.iso", "raw", "sde", true),
	))
	// Were /tank/vmsX taken for the dataset, sde would be found here.
	writeTestFile(t, filepath.Join(l.snapDir, "X", "other.iso"), make([]byte, 2048))
	writeTestFile(t, filepath.Join(l.snapDir+"X", "other.iso"), make([]byte, 2048))

	disks, err := planDisks(dom, l, dir)
	if err != nil {
		t.Fatal(err)
	}
	rootRaw := Layer{snapPath(l, "/tank/vms/images/root.raw"), "raw"}
	base := Layer{snapPath(l, "/tank/vms/images/base.qcow2"), "qcow2"}
	want := []Disk{
		{Target: "vda", Original: "/tank/vms/vm1/root.qcow2", Overlay: filepath.Join(dir, "vda.qcow2"), Size: 4 << 20,
			Chain: []Layer{{snapPath(l, "/tank/vms/vm1/root.qcow2"), "qcow2"}, base, rootRaw}},
		{Target: "vdb", Original: "/tank/vms/vm1/data.raw", Overlay: filepath.Join(dir, "vdb.qcow2"), Size: 64 << 10,
			Chain: []Layer{{snapPath(l, "/tank/vms/vm1/data.raw"), "raw"}}},
		{Target: "vdc", Original: "/tank/vms/vm1/scratch.img", Overlay: filepath.Join(dir, "vdc.qcow2"), Size: 8192,
			Chain: []Layer{{snapPath(l, "/tank/vms/vm1/scratch.img"), "raw"}}},
		{Target: "sdc", Original: "/tank/vms/iso/tools.iso", Size: 2048,
			Chain: []Layer{{snapPath(l, "/tank/vms/iso/tools.iso"), "raw"}}},
		{Target: "vdd", Original: "/tank/vms/images/base.qcow2", Size: 1 << 20, Chain: []Layer{base, rootRaw}},
	}
	if len(disks) != len(want) {
		t.Fatalf("planDisks = %+v\nwant %+v", disks, want)
	}
	for i := range want {
		if d, w := disks[i], want[i]; d.Target != w.Target || d.Original != w.Original || d.Overlay != w.Overlay ||
			d.Size != w.Size || !slices.Equal(d.Chain, w.Chain) {
			t.Errorf("disk %d = %+v\nwant %+v", i, d, w)
		}
	}

	got, xml := roundTrip(t, dom)
	byTarget := map[string]libvirtxml.DomainDisk{}
	for _, d := range got.Devices.Disks {
		byTarget[d.Target.Dev] = d
	}
	// checkChain checks a disk's backingStore against the chain, every
	// image out of DAC relabelling.
	checkChain := func(target string, bs *libvirtxml.DomainDiskBackingStore, chain []Layer) {
		t.Helper()
		for _, layer := range chain {
			if bs == nil {
				t.Errorf("%s: backingStore ends before %s", target, layer.Path)
				return
			}
			if bs.Format == nil || bs.Format.Type != layer.Format {
				t.Errorf("%s: backingStore %s has format %+v, want %s", target, layer.Path, bs.Format, layer.Format)
			}
			checkMountSource(t, target, bs.Source, layer.Path)
			bs = bs.BackingStore
		}
		if bs != nil && (bs.Source != nil || bs.BackingStore != nil) {
			t.Errorf("%s: backingStore goes on past the chain: %+v", target, bs)
		}
	}
	for _, w := range want[:3] {
		d := byTarget[w.Target]
		if d.Source == nil || d.Source.File == nil || d.Source.File.File != w.Overlay {
			t.Errorf("%s: source %+v, want the overlay %s", w.Target, d.Source, w.Overlay)
		} else if len(d.Source.File.SecLabel) != 0 || d.Source.Index != 0 {
			t.Errorf("%s: the overlay's source has %+v, index %d: it must be relabelled for QEMU to write it", w.Target, d.Source.File.SecLabel, d.Source.Index)
		}
		if d.Driver == nil || d.Driver.Type != "qcow2" || d.Driver.Name != "qemu" {
			t.Errorf("%s: driver %+v, want qemu qcow2", w.Target, d.Driver)
		}
		checkChain(w.Target, d.BackingStore, w.Chain)
	}
	if d := byTarget["vda"].Driver; d == nil || d.Cache != "none" || d.Discard != "unmap" {
		t.Errorf("vda: driver %+v, want cache and discard kept", d)
	}
	if d := byTarget["vdc"].Driver; d == nil || d.Type != "qcow2" {
		t.Errorf("vdc (no driver in the definition): driver %+v, want qcow2", d)
	}
	for _, w := range want[3:] {
		d := byTarget[w.Target]
		checkMountSource(t, w.Target, d.Source, w.Chain[0].Path)
		if d.Driver == nil || d.Driver.Type != w.Chain[0].Format {
			t.Errorf("%s: driver %+v, want the image's own format %s", w.Target, d.Driver, w.Chain[0].Format)
		}
		checkChain(w.Target, d.BackingStore, w.Chain[1:])
	}
	// Left as they were: an ISO off the dataset, an empty drive, a host
	// device, a path on a sibling of the dataset.
	for target, src := range map[string]string{"sda": "/var/lib/libvirt/images/installer.iso", "sdb": "", "sde": "/tank/vmsX/other.iso"} {
		d := byTarget[target]
		if d.Source == nil || d.Source.File == nil || d.Source.File.File != src || len(d.Source.File.SecLabel) != 0 || d.BackingStore != nil {
			t.Errorf("%s: %+v, want its source %q untouched", target, d.Source, src)
		}
	}
	if d := byTarget["sdd"]; d.Source == nil || d.Source.Block == nil || d.Source.Block.Dev != "/dev/sr0" {
		t.Errorf("sdd: %+v, want /dev/sr0 untouched", d.Source)
	}
	// In the XML: one DAC exemption per image served from the mount
	// (3+1+1 under the overlays, 1+2 served as they are), and no path of
	// the original host's dataset left.
	if n := strings.Count(xml, `<seclabel model="dac" relabel="no"`); n != 8 {
		t.Errorf("%d <seclabel model=dac relabel=no> in the XML, want 8:\n%s", n, xml)
	}
	if strings.Contains(xml, "'/tank/vms/") || strings.Contains(xml, `"/tank/vms/`) {
		t.Errorf("the XML still names the original dataset:\n%s", xml)
	}
	if !strings.Contains(xml, `"/tank/vmsX/other.iso"`) || !strings.Contains(xml, `"/var/lib/libvirt/images/installer.iso"`) {
		t.Errorf("the XML lost the disks off the dataset:\n%s", xml)
	}
}

func checkMountSource(t *testing.T, target string, s *libvirtxml.DomainDiskSource, path string) {
	t.Helper()
	if s == nil || s.File == nil || s.File.File != path {
		t.Errorf("%s: source %+v, want %s", target, s, path)
		return
	}
	if len(s.File.SecLabel) != 1 || s.File.SecLabel[0].Model != "dac" || s.File.SecLabel[0].Relabel != "no" {
		t.Errorf("%s: %s has seclabels %+v, want one <seclabel model='dac' relabel='no'/>", target, path, s.File.SecLabel)
	}
}

func TestPlanDisksRefuses(t *testing.T) {
	l, root, dir := newLayout(t)
	chainImages(t, l)
	testQemuImg(t, "-f", "qcow2", "-u", "-b", "/var/lib/libvirt/images/base.raw", "-F", "raw", snapPath(l, "/tank/vms/vm1/outside.qcow2"), "1M")
	// Were the mapping sloppy, these would be found.
	writeTestFile(t, filepath.Join(l.snapDir+"X", "disk.img"), make([]byte, 512))
	writeTestFile(t, filepath.Join(l.snapDir, "X", "disk.img"), make([]byte, 512))
	writeTestFile(t, filepath.Join(l.snapDir, "..", "vmsX", "disk.img"), make([]byte, 512))
	writeTestFile(t, filepath.Join(root, "etc", "disk.img"), make([]byte, 512))
	for _, c := range []struct {
		name, disk, want string
	}{
		{"writable off the dataset", diskXML("file", "disk", "/var/lib/libvirt/images/vm1.qcow2", "qcow2", "vda", false), "not on the snapshot's dataset"},
		{"writable on a prefix sibling", diskXML("file", "disk", "/tank/vmsX/disk.img", "raw", "vda", false), "not on the snapshot's dataset"},
		{"writable through ..", diskXML("file", "disk", "/tank/vms/../vmsX/disk.img", "raw", "vda", false), "not on the snapshot's dataset"},
		{"writable through ../..", diskXML("file", "disk", "/tank/vms/vm1/../../../etc/disk.img", "raw", "vda", false), "not on the snapshot's dataset"},
		{"block device", diskXML("block", "disk", "/dev/zvol/tank/vm1-disk", "raw", "vda", false), "not file-backed"},
		{"network disk", `<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='x'><host name='nas' port='10809'/></source><target dev='vda'/></disk>`, "not file-backed"},
		{"chain leaving the dataset", diskXML("file", "disk", "/tank/vms/vm1/outside.qcow2", "qcow2", "vda", false), "leaves the dataset"},
		{"read-only chain leaving the dataset", diskXML("file", "disk", "/tank/vms/vm1/outside.qcow2", "qcow2", "vdz", true), "leaves the dataset"},
	} {
		dom := parseDomain(t, domainXML(diskXML("file", "disk", "/tank/vms/vm1/data.raw", "raw", "vdy", false), c.disk))
		disks, err := planDisks(dom, l, dir)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: planDisks = %+v, %v; want an error saying %q", c.name, disks, err, c.want)
		}
	}
	block := parseDomain(t, domainXML(diskXML("block", "disk", "/dev/zvol/tank/vm1-disk", "raw", "vda", false)))
	if _, err := planDisks(block, l, dir); err == nil || !strings.Contains(err.Error(), "/dev/zvol/tank/vm1-disk") {
		t.Errorf("a block device: %v, want an error naming the device", err)
	}
}

func TestPlanDisksEmpty(t *testing.T) {
	l, _, dir := newLayout(t)
	if disks, err := planDisks(&libvirtxml.Domain{Name: "vm1"}, l, dir); disks != nil || err != nil {
		t.Errorf("no devices: %v, %v", disks, err)
	}
	// Drives with no source at all, as a program (not the XML parser)
	// would build them.
	dom := &libvirtxml.Domain{Devices: &libvirtxml.DomainDeviceList{Disks: []libvirtxml.DomainDisk{
		{Device: "cdrom", Target: &libvirtxml.DomainDiskTarget{Dev: "sda"}},
		{Device: "floppy", Target: &libvirtxml.DomainDiskTarget{Dev: "fda"}},
	}}}
	if disks, err := planDisks(dom, l, dir); len(disks) != 0 || err != nil {
		t.Errorf("empty drives: %v, %v", disks, err)
	}
	dom.Devices.Disks = append(dom.Devices.Disks, libvirtxml.DomainDisk{Device: "disk", Target: &libvirtxml.DomainDiskTarget{Dev: "vda"}})
	if _, err := planDisks(dom, l, dir); err == nil || !strings.Contains(err.Error(), "vda has no source") {
		t.Errorf("a disk with no source: %v", err)
	}
}

func TestSafeFileName(t *testing.T) {
	for in, want := range map[string]string{"vda": "vda", "a/b": "a_b", "": "_", ".": "_.", "..": "_..", "x\x00y": "x_y", "../..": ".._.."} {
		if got := safeFileName(in); got != want {
			t.Errorf("safeFileName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRedirectChardevs(t *testing.T) {
	dir := "/var/lib/vmhistory/boot/vm1-s1"
	dom := parseDomain(t, domainXML(
		`<serial type='file'><source path='/var/log/vm1/serial.log'/><target port='0'/></serial>`,
		`<serial type='pty'><target port='1'/></serial>`,
		`<serial type='file'><source path='/var/log/vm1/serial2.log' append='on'/><target port='2'/></serial>`,
		`<console type='file'><source path='/var/log/vm1/serial.log'/><target type='serial' port='0'/></console>`,
		`<channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/vm1.org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>`,
		`<channel type='unix'><source mode='connect' path='/run/other/agent.sock'/><target type='virtio' name='org.example.connect'/></channel>`,
		`<channel type='unix'><source mode='bind'/><target type='virtio' name='org.example.auto'/></channel>`,
		`<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>`,
		`<channel type='unix'><source path='/run/other/nomode.sock'/><target type='virtio' name='org.example.nomode'/></channel>`,
		`<parallel type='file'><source path='/var/log/vm1/lp.log'/><target port='0'/></parallel>`,
	))
	files := redirectChardevs(dom, dir)
	wantFiles := []string{dir + "/serial0.log", dir + "/serial2.log", dir + "/channel0.sock", dir + "/parallel0.log"}
	if !slices.Equal(files, wantFiles) {
		t.Errorf("files = %q, want %q", files, wantFiles)
	}
	got, xml := roundTrip(t, dom)
	d := got.Devices
	file := func(s *libvirtxml.DomainChardevSource) string {
		if s == nil || s.File == nil {
			return "<not a file>"
		}
		return s.File.Path
	}
	unix := func(s *libvirtxml.DomainChardevSource) string {
		if s == nil || s.UNIX == nil {
			return "<not unix>"
		}
		return s.UNIX.Path
	}
	for _, c := range []struct{ what, got, want string }{
		{"serial 0", file(d.Serials[0].Source), dir + "/serial0.log"},
		{"serial 2", file(d.Serials[2].Source), dir + "/serial2.log"},
		{"the console mirroring serial 0", file(d.Consoles[0].Source), dir + "/serial0.log"},
		{"the bound guest agent socket", unix(d.Channels[0].Source), dir + "/channel0.sock"},
		{"a socket connected to", unix(d.Channels[1].Source), "/run/other/agent.sock"},
		{"a bound socket without a path", unix(d.Channels[2].Source), ""},
		{"a socket without a mode (connect)", unix(d.Channels[4].Source), "/run/other/nomode.sock"},
		{"the parallel port", file(d.Parallels[0].Source), dir + "/parallel0.log"},
	} {
		if c.got != c.want {
			t.Errorf("%s: %q, want %q", c.what, c.got, c.want)
		}
	}
	if s := d.Serials[1].Source; s == nil || s.Pty == nil {
		t.Errorf("the pty serial port: %+v", s)
	}
	if s := d.Channels[3].Source; s == nil || s.SpiceVMC == nil {
		t.Errorf("the spicevmc channel: %+v", s)
	}
	if d.Serials[2].Source.File.Append != "on" {
		t.Errorf("serial 2 lost append='on'")
	}
	if strings.Contains(xml, "/var/log/vm1") || strings.Contains(xml, "channel/target/vm1") {
		t.Errorf("the XML still names the original's files:\n%s", xml)
	}
	if files := redirectChardevs(&libvirtxml.Domain{}, dir); files != nil {
		t.Errorf("no devices: %q", files)
	}
}

const nicsXML = `<interface type='bridge'>
  <mac address='52:54:00:aa:bb:01'/>
  <source bridge='br0'/>
  <target dev='vnet3'/>
  <model type='virtio'/>
  <link state='up'/>
  <boot order='2'/>
  <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
</interface>
<interface type='network'>
  <mac address='52:54:00:aa:bb:02'/>
  <source network='lan'/>
  <model type='e1000'/>
</interface>`

func TestFreshNICs(t *testing.T) {
	dom := parseDomain(t, domainXML(nicsXML))
	freshNICs(dom, "")
	got, xml := roundTrip(t, dom)
	if len(got.Devices.Interfaces) != 0 || strings.Contains(xml, "<interface") {
		t.Errorf("no network: NICs left:\n%s", xml)
	}

	dom = parseDomain(t, domainXML(nicsXML))
	freshNICs(dom, "default")
	got, xml = roundTrip(t, dom)
	nics := got.Devices.Interfaces
	if len(nics) != 2 {
		t.Fatalf("%d NICs, want 2:\n%s", len(nics), xml)
	}
	for i, nic := range nics {
		if nic.Source == nil || nic.Source.Network == nil || nic.Source.Network.Network != "default" {
			t.Errorf("NIC %d: source %+v, want network default", i, nic.Source)
		}
		if nic.MAC != nil || nic.Target != nil || nic.Link != nil {
			t.Errorf("NIC %d: MAC %+v, target %+v, link %+v: want libvirt's own", i, nic.MAC, nic.Target, nic.Link)
		}
	}
	if nics[0].Model == nil || nics[0].Model.Type != "virtio" || nics[1].Model == nil || nics[1].Model.Type != "e1000" {
		t.Errorf("models %+v, %+v; want virtio, e1000", nics[0].Model, nics[1].Model)
	}
	if nics[0].Boot == nil || nics[0].Boot.Order != 2 {
		t.Errorf("NIC 0 lost its boot order: %+v", nics[0].Boot)
	}
	if a := nics[0].Address; a == nil || a.PCI == nil || a.PCI.Bus == nil || *a.PCI.Bus != 1 {
		t.Errorf("NIC 0 lost its PCI address: %+v", a)
	}
	if strings.Contains(xml, "52:54:00:aa:bb") || strings.Contains(xml, "br0") || strings.Contains(xml, "vnet3") {
		t.Errorf("the original's MACs, bridge or tap are left:\n%s", xml)
	}
}

func TestSavedStateNICs(t *testing.T) {
	macs := []string{"52:54:00:aa:bb:01", "52:54:00:aa:bb:02"}
	dom := parseDomain(t, domainXML(nicsXML))
	savedStateNICs(dom, "")
	got, _ := roundTrip(t, dom)
	nics := got.Devices.Interfaces
	if len(nics) != 2 {
		t.Fatalf("%d NICs, want 2", len(nics))
	}
	for i, nic := range nics {
		if nic.MAC == nil || nic.MAC.Address != macs[i] {
			t.Errorf("no network, NIC %d: MAC %+v, want %s", i, nic.MAC, macs[i])
		}
		if nic.Link == nil || nic.Link.State != "down" {
			t.Errorf("no network, NIC %d: link %+v, want down", i, nic.Link)
		}
	}
	if s := nics[0].Source; s == nil || s.Bridge == nil || s.Bridge.Bridge != "br0" {
		t.Errorf("no network, NIC 0: source %+v, want br0 kept", s)
	}
	if s := nics[1].Source; s == nil || s.Network == nil || s.Network.Network != "lan" {
		t.Errorf("no network, NIC 1: source %+v, want lan kept", s)
	}

	dom = parseDomain(t, domainXML(nicsXML))
	savedStateNICs(dom, "default")
	got, _ = roundTrip(t, dom)
	for i, nic := range got.Devices.Interfaces {
		if nic.MAC == nil || nic.MAC.Address != macs[i] {
			t.Errorf("network default, NIC %d: MAC %+v, want %s", i, nic.MAC, macs[i])
		}
		if nic.Source == nil || nic.Source.Network == nil || nic.Source.Network.Network != "default" {
			t.Errorf("network default, NIC %d: source %+v, want network default", i, nic.Source)
		}
		if nic.Link != nil {
			t.Errorf("network default, NIC %d: link %+v, want up", i, nic.Link)
		}
		if nic.Model == nil {
			t.Errorf("network default, NIC %d lost its model", i)
		}
	}
	savedStateNICs(&libvirtxml.Domain{}, "default") // no devices: no panic
	freshNICs(&libvirtxml.Domain{}, "default")
}

func TestFreshIdentity(t *testing.T) {
	dir := "/var/lib/vmhistory/boot/vm1-s1"
	uuid := "0b7a6c2e-8a51-4c1f-9a3e-5d2f1e0c9b8a"
	dom := parseDomain(t, `<domain type='kvm' id='7'>
  <name>vm1</name>
  <uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid>
  <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/vm1_VARS.fd</nvram>
  </os>
  <devices>
    <graphics type='vnc' port='5905' autoport='no' listen='127.0.0.1'/>
    <graphics type='vnc' port='-1' autoport='yes'/>
    <graphics type='spice' port='5930' tlsPort='5931' autoport='no'/>
  </devices>
  <seclabel type='static' model='selinux' relabel='yes'><label>system_u:system_r:svirt_t:s0:c1,c2</label></seclabel>
  <seclabel type='dynamic' model='dac' relabel='yes'/>
</domain>`)
	files := freshIdentity(dom, "vm1-s1", uuid, dir)
	if want := []string{dir + "/nvram.fd"}; !slices.Equal(files, want) {
		t.Errorf("files = %q, want %q", files, want)
	}
	got, xml := roundTrip(t, dom)
	if got.Name != "vm1-s1" || got.UUID != uuid || got.ID != nil || got.GenID != nil {
		t.Errorf("name %q, uuid %q, id %v, genid %+v", got.Name, got.UUID, got.ID, got.GenID)
	}
	if nv := got.OS.NVRam; nv == nil || nv.NVRam != dir+"/nvram.fd" || nv.Template != "/usr/share/OVMF/OVMF_VARS.fd" || nv.Source != nil {
		t.Errorf("nvram %+v, want %s/nvram.fd from the template", nv, dir)
	}
	g := got.Devices.Graphics
	if v := g[0].VNC; v == nil || v.Port != -1 || v.AutoPort != "yes" || v.Listen != "127.0.0.1" {
		t.Errorf("VNC on a fixed port: %+v, want autoport, listen kept", v)
	}
	if v := g[1].VNC; v == nil || v.Port != -1 || v.AutoPort != "yes" {
		t.Errorf("VNC on autoport: %+v", v)
	}
	if s := g[2].Spice; s == nil || s.Port != -1 || s.TLSPort != -1 || s.AutoPort != "yes" {
		t.Errorf("SPICE on fixed ports: %+v", s)
	}
	for _, s := range got.SecLabel {
		if s.Type == "static" {
			t.Errorf("a static security label is left: %+v", s)
		}
	}
	if len(got.SecLabel) != 1 || got.SecLabel[0].Model != "dac" {
		t.Errorf("seclabels %+v, want the dynamic DAC one kept", got.SecLabel)
	}
	if strings.Contains(xml, "vm1_VARS") || strings.Contains(xml, "c7a5fdbd") || strings.Contains(xml, "5905") {
		t.Errorf("the original's identity is left:\n%s", xml)
	}

	// No NVRAM, no devices: nothing to make.
	bare := &libvirtxml.Domain{Name: "vm1", UUID: "c7a5fdbd-cdaf-9455-926a-d65c16db1809"}
	if files := freshIdentity(bare, "vm1-s2", uuid, dir); len(files) != 0 || bare.Name != "vm1-s2" || bare.UUID != uuid {
		t.Errorf("a bare domain: files %q, %+v", files, bare)
	}
}

func TestDefaultName(t *testing.T) {
	for _, c := range []struct{ vm, snapshot, want string }{
		{"vm1", "tank/vms@vmhistory-20240102-030405", "vm1-vmhistory-20240102-030405"},
		{"vm1", "tank/vms@auto 2024:01/02", "vm1-auto-2024-01-02"},
		{"vm1", "tank/vms@--x__y--", "vm1-x__y"},
		{"web.example", "pool/a/b@s.1+2", "web.example-s.1+2"},
		{"vm1", "tank/vms@a@b", "vm1-a-b"},
		{"vm1", "tank/vms@é", "vm1-boot"},
		{"vm1", "no-at-sign", "vm1-no-at-sign"},
	} {
		got := defaultName(c.vm, c.snapshot)
		if got != c.want {
			t.Errorf("defaultName(%q, %q) = %q, want %q", c.vm, c.snapshot, got, c.want)
		}
		if err := checkDomainName(got); err != nil {
			t.Errorf("defaultName(%q, %q) = %q: %v", c.vm, c.snapshot, got, err)
		}
	}
}

func TestCheckDomainName(t *testing.T) {
	for _, name := range []string{"vm1", "vm1-s1", "a", "vm.1", strings.Repeat("n", 200)} {
		if err := checkDomainName(name); err != nil {
			t.Errorf("checkDomainName(%q): %v", name, err)
		}
	}
	for _, name := range []string{"", "a/b", "/vm", "vm\x00", ".vm", ".", "..", strings.Repeat("n", 201)} {
		if err := checkDomainName(name); err == nil {
			t.Errorf("checkDomainName(%q) accepted it", name)
		}
	}
}

func TestUUID(t *testing.T) {
	form := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	seen := map[string]bool{}
	for range 1000 {
		s := newUUID()
		if !form.MatchString(s) {
			t.Fatalf("newUUID() = %q, not a version 4 UUID", s)
		}
		if seen[s] {
			t.Fatalf("newUUID() = %q twice", s)
		}
		seen[s] = true
		u, err := parseUUID(s)
		if err != nil {
			t.Fatalf("parseUUID(%q): %v", s, err)
		}
		if back := fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]); back != s {
			t.Fatalf("parseUUID(%q) = %x, back %q", s, u, back)
		}
	}
	want := [16]byte{0xc7, 0xa5, 0xfd, 0xbd, 0xcd, 0xaf, 0x94, 0x55, 0x92, 0x6a, 0xd6, 0x5c, 0x16, 0xdb, 0x18, 0x09}
	for _, s := range []string{"c7a5fdbd-cdaf-9455-926a-d65c16db1809", "C7A5FDBD-CDAF-9455-926A-D65C16DB1809", "c7a5fdbdcdaf9455926ad65c16db1809"} {
		if u, err := parseUUID(s); err != nil || u != want {
			t.Errorf("parseUUID(%q) = %x, %v; want %x", s, u, err, want)
		}
	}
	for _, s := range []string{"", "not-a-uuid", "c7a5fdbd-cdaf-9455-926a-d65c16db180", "c7a5fdbd-cdaf-9455-926a-d65c16db18090",
		"g7a5fdbd-cdaf-9455-926a-d65c16db1809", "+7a5fdbd-cdaf-9455-926a-d65c16db1809", " c7a5fdbd-cdaf-9455-926a-d65c16db180"} {
		if u, err := parseUUID(s); err == nil {
			t.Errorf("parseUUID(%q) = %x, want an error", s, u)
		}
	}
}
