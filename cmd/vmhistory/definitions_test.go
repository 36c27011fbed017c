package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/testenv"
	"github.com/vmhistory/vmhistory/virt"
)

// TestDefinitionsShownByTimelineAndRestore: after a night, the snapshot's
// VM definitions are files of the snapshot like any other: "timeline ls"
// lists them and "restore" brings one back, the XML libvirt defines the VM
// from (no secrets: inactive, not SECURE).
func TestDefinitionsShownByTimelineAndRestore(t *testing.T) {
	pool := testenv.NewPool(t, 128)
	ds, mnt := pool.Dataset(t, "libvirt")
	if err := os.MkdirAll(filepath.Join(mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, vms := sharedTestVMs(t, mnt, 2)
	dir := t.TempDir()
	cfg := writeTempConfig(t, fmt.Sprintf("datasets: [%s]\nquiesce: {mode: suspend}\nlibvirt: {uri: %q}\nstate_dir: %s\n",
		ds, testenv.TestDriverURI, filepath.Join(dir, "state")))
	if _, stderr, err := runConfigCmd(t, "backup", "--config", cfg); err != nil {
		t.Fatalf("backup: %v\n%s", err, stderr)
	}
	rel := filepath.Join(virt.SaveDirName, virt.DefinitionsDir)
	stdout, stderr, err := runConfigCmd(t, "timeline", "ls", "latest:"+rel, "--config", cfg)
	if err != nil {
		t.Fatalf("timeline ls: %v\n%s", err, stderr)
	}
	for _, vm := range vms {
		if !strings.Contains(stdout, vm+".xml") {
			t.Errorf("timeline ls latest:%s does not list %s.xml:\n%s", rel, vm, stdout)
		}
	}
	dest := filepath.Join(dir, "out")
	if err := os.Mkdir(dest, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := runConfigCmd(t, "restore", "latest:"+rel+"/"+vms[0]+".xml", dest+"/", "--config", cfg); err != nil {
		t.Fatalf("restore of a definition: %v\n%s", err, stderr)
	}
	xml, err := os.ReadFile(filepath.Join(dest, vms[0]+".xml"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(xml), "<name>"+vms[0]+"</name>") || !strings.Contains(string(xml), vms[0]+".qcow2") {
		t.Errorf("restored definition of %s:\n%s", vms[0], xml)
	}
}
