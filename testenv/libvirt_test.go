package testenv

import (
	"os"
	"path/filepath"
	"testing"

	libvirt "github.com/digitalocean/go-libvirt"
)

func TestLibvirtTestVMs(t *testing.T) {
	dir := t.TempDir()
	l := DialLibvirt(t, PrivateTestDriver(t))
	DefineTestVMs(t, l,
		TestVM{Name: "run", Disks: []TestDisk{{Path: filepath.Join(dir, "d", "run.img")}, {Type: "block", Path: "/dev/zvol/p/x"}}},
		TestVM{Name: "off", State: VMShutoff, Disks: []TestDisk{{Path: filepath.Join(dir, "off.img")}}},
		TestVM{Name: "paused <&'>", State: VMPaused},
	)
	want := map[string]libvirt.DomainState{
		"run": libvirt.DomainRunning,
		"off": libvirt.DomainShutoff, "paused <&'>": libvirt.DomainPaused,
	}
	for name, st := range want {
		d, err := l.DomainLookupByName(name)
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := l.DomainGetState(d, 0)
		if err != nil || libvirt.DomainState(got) != st {
			t.Errorf("%s: state %d, want %d (%v)", name, got, st, err)
		}
	}
	fi, err := os.Stat(filepath.Join(dir, "d", "run.img"))
	if err != nil || fi.Size() != 1<<20 {
		t.Errorf("disk file: %v", err)
	}

	if _, err := l.DomainLookupByName("test"); err == nil {
		t.Error("a private connection has the default domain")
	}

	// A node file: every connection sees its VMs, with the same UUIDs.
	uri := WriteTestNodeXML(t, filepath.Join(dir, "node"), TestVM{Name: "n", State: VMShutoff})
	var uuids []libvirt.UUID
	for i := 0; i < 2; i++ {
		l := DialLibvirt(t, uri)
		d, err := l.DomainLookupByName("n")
		if err != nil {
			t.Fatal(err)
		}
		if st, _, _ := l.DomainGetState(d, 0); libvirt.DomainState(st) != libvirt.DomainShutoff {
			t.Errorf("n: state %d", st)
		}
		if _, err := l.DomainLookupByName("test"); err == nil {
			t.Error("the node file's connection has the default domain")
		}
		uuids = append(uuids, d.UUID)
	}
	if uuids[0] != uuids[1] {
		t.Error("UUIDs differ between connections")
	}
}
