package testenv

import (
	"bytes"
	"crypto/sha256"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// LibvirtSocket is libvirtd's read-write socket, where the test setup
// starts it.
const LibvirtSocket = "/var/run/libvirt/libvirt-sock"

// TestDriverURI is libvirt's test driver with its default state (one
// running domain called "test"). Beware: that state is shared by every
// connection open to test:///default at the same moment, including those of
// other test binaries running in parallel, and only reset when the last one
// closes. Tests that change VMs use PrivateTestDriver instead.
const TestDriverURI = "test:///default"

// RequireLibvirt fails the test unless libvirtd answers on LibvirtSocket
// and opens the test driver. It never skips.
func RequireLibvirt(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(LibvirtSocket); err != nil {
		t.Fatalf("libvirtd's socket %s: %v: is libvirtd running? %s", LibvirtSocket, err, setupHint)
	}
	l, err := dialLibvirt(TestDriverURI)
	if err != nil {
		t.Fatalf("libvirtd does not answer on %s: %v: %s", LibvirtSocket, err, setupHint)
	}
	disconnect(l)
}

// DialLibvirt opens uri (a test:/// URI) through LibvirtSocket and closes it
// when the test ends.
func DialLibvirt(t testing.TB, uri string) *libvirt.Libvirt {
	t.Helper()
	RequireLibvirt(t)
	l, err := dialLibvirt(uri)
	if err != nil {
		t.Fatalf("open %s through %s: %v: %s", uri, LibvirtSocket, err, setupHint)
	}
	t.Cleanup(func() { disconnect(l) })
	return l
}

func dialLibvirt(uri string) (*libvirt.Libvirt, error) {
	l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(LibvirtSocket), dialers.WithLocalTimeout(10*time.Second)))
	done := make(chan error, 1)
	go func() { done <- l.ConnectToURI(libvirt.ConnectURI(uri)) }()
	select {
	case err := <-done:
		return l, err
	case <-time.After(30 * time.Second):
		go func() {
			if <-done == nil {
				l.Disconnect()
			}
		}()
		return nil, fmt.Errorf("no answer within 30s")
	}
}

func disconnect(l *libvirt.Libvirt) {
	done := make(chan struct{})
	go func() { l.Disconnect(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
	}
}

// Test VM states, as virsh prints them.
const (
	VMRunning = "running"
	VMShutoff = "shut off"
	VMPaused  = "paused"
)

// TestVM is a test-driver domain for DefineTestVMs and WriteTestNodeXML.
type TestVM struct {
	Name string
	// State is VMRunning (the default when empty), VMShutoff or VMPaused.
	State string
	Disks []TestDisk
}

// TestDisk is one disk of a TestVM.
type TestDisk struct {
	// Type is "file" (the default when empty), "block", "network" or
	// "volume".
	Type string
	// Path is the file (created as a small sparse file when missing, with
	// its directory) or the block device (not created). For "volume" it is
	// "pool/volume"; for "network" the NBD export name.
	Path string
	// Target is the guest device; vda, vdb... in order when empty.
	Target string
}

// DefineTestVMs defines vms on l, an open test-driver connection, brings
// them to their State and creates their file disks.
func DefineTestVMs(t testing.TB, l *libvirt.Libvirt, vms ...TestVM) {
	t.Helper()
	for _, vm := range vms {
		createDiskFiles(t, vm)
		dom, err := l.DomainDefineXML(TestDomainXML(vm, false))
		if err != nil {
			t.Fatalf("define test VM %s: %v", vm.Name, err)
		}
		switch vm.State {
		case "", VMRunning:
			err = l.DomainCreate(dom)
		case VMPaused:
			if err = l.DomainCreate(dom); err == nil {
				err = l.DomainSuspend(dom)
			}
		case VMShutoff:
		default:
			t.Fatalf("test VM %s: unknown state %q", vm.Name, vm.State)
		}
		if err != nil {
			t.Fatalf("bring test VM %s to %s: %v", vm.Name, vm.State, err)
		}
	}
}

// PrivateTestDriver returns the URI of a test-driver node file holding
// vms (and no other domain), in a directory removed when the test ends.
// Unlike test:///default, each connection to a node file has its own state,
// starting from the file: a test that defines or changes VMs on it is
// isolated from every other connection, but it must assert VM states on the
// connection the code under test used.
func PrivateTestDriver(t testing.TB, vms ...TestVM) string {
	t.Helper()
	return WriteTestNodeXML(t, t.TempDir(), vms...)
}

// WriteTestNodeXML writes a test-driver node file with vms (and no other
// domain) to dir/node.xml, creates their file disks, and returns the URI
// that opens it (test:///<dir>/node.xml). Every connection to that URI
// starts with these VMs in their State, with the same UUIDs, and then has
// its own state.
func WriteTestNodeXML(t testing.TB, dir string, vms ...TestVM) string {
	t.Helper()
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	b.WriteString("<node>\n")
	for _, vm := range vms {
		createDiskFiles(t, vm)
		b.WriteString(TestDomainXML(vm, true))
	}
	b.WriteString("</node>\n")
	file := filepath.Join(abs, "node.xml")
	if err := os.MkdirAll(abs, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return "test://" + file
}

// TestDomainXML is the test-driver domain XML of vm. withRunState adds the
// test driver's <test:runstate> (honoured in node files only).
func TestDomainXML(vm TestVM, withRunState bool) string {
	var b strings.Builder
	b.WriteString("<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\n")
	// A UUID derived from the name, so that every connection to a node
	// file sees the same domains, as every connection to a real host does.
	sum := sha256.Sum256([]byte("vmhistory-test-vm:" + vm.Name))
	fmt.Fprintf(&b, "  <uuid>%x-%x-%x-%x-%x</uuid>\n", sum[0:4], sum[4:6], sum[6:8], sum[8:10], sum[10:16])
	fmt.Fprintf(&b, "  <name>%s</name>\n  <memory unit='MiB'>64</memory>\n  <os><type>hvm</type></os>\n  <devices>\n", esc(vm.Name))
	for i, d := range vm.Disks {
		target := d.Target
		if target == "" {
			target = "vd" + string(rune('a'+i))
		}
		switch d.Type {
		case "", "file":
			fmt.Fprintf(&b, "    <disk type='file' device='disk'><source file='%s'/><target dev='%s' bus='virtio'/></disk>\n", esc(d.Path), esc(target))
		case "block":
			fmt.Fprintf(&b, "    <disk type='block' device='disk'><source dev='%s'/><target dev='%s' bus='virtio'/></disk>\n", esc(d.Path), esc(target))
		case "volume":
			pool, vol, _ := strings.Cut(d.Path, "/")
			fmt.Fprintf(&b, "    <disk type='volume' device='disk'><source pool='%s' volume='%s'/><target dev='%s' bus='virtio'/></disk>\n", esc(pool), esc(vol), esc(target))
		case "network":
			fmt.Fprintf(&b, "    <disk type='network' device='disk'><source protocol='nbd' name='%s'><host name='127.0.0.1' port='10809'/></source><target dev='%s' bus='virtio'/></disk>\n", esc(d.Path), esc(target))
		default:
			panic("testenv: unknown test disk type " + d.Type)
		}
	}
	b.WriteString("  </devices>\n")
	if withRunState {
		state := 1 // running
		switch vm.State {
		case VMShutoff:
			state = 5
		case VMPaused:
			state = 3
		}
		fmt.Fprintf(&b, "  <test:runstate>%d</test:runstate>\n", state)
	}
	b.WriteString("</domain>\n")
	return b.String()
}

func esc(s string) string {
	var b bytes.Buffer
	xml.EscapeText(&b, []byte(s)) // quotes too: safe in attributes
	return b.String()
}

// createDiskFiles creates the missing file disks of vm as 1 MiB sparse
// files.
func createDiskFiles(t testing.TB, vm TestVM) {
	t.Helper()
	for _, d := range vm.Disks {
		if (d.Type != "" && d.Type != "file") || d.Path == "" {
			continue
		}
		if _, err := os.Stat(d.Path); err == nil {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(d.Path), 0o755); err != nil {
			t.Fatalf("test VM %s: %v", vm.Name, err)
		}
		f, err := os.OpenFile(d.Path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o644)
		if err != nil {
			t.Fatalf("test VM %s: %v", vm.Name, err)
		}
		err = f.Truncate(1 << 20)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatalf("test VM %s: %v", vm.Name, err)
		}
	}
}
