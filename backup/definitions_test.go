package backup

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/virt"
)

// TestDefinitionsInEverySnapshot: each night's snapshot holds the
// persistent definition of every VM on the dataset, whatever its state and
// the mode (none too), and not those of VMs elsewhere or no longer there.
func TestDefinitionsInEverySnapshot(t *testing.T) {
	for _, mode := range []string{"suspend", "none"} {
		t.Run(mode, func(t *testing.T) {
			sb := newSandbox(t, mode, 20, "")
			dir := filepath.Join(sb.mountpoint, virt.SaveDirName, virt.DefinitionsDir)
			if err := os.MkdirAll(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			// A VM that was on the dataset once, and a temporary file of
			// an interrupted write.
			for _, f := range []string{"gone.xml", ".web.xml.tmp-0123"} {
				if err := os.WriteFile(filepath.Join(dir, f), []byte("<domain/>"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			rep := sb.night(sb.pipeline(), nights[0], Options{SkipReplicate: true})
			if err := rep.Err(); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			view, err := sb.src.ZFS.OpenSnapshot(ctx, sb.dataset+"@"+sb.cfg.SnapshotName(nights[0]))
			if err != nil {
				t.Fatal(err)
			}
			defer view.Close(ctx)
			snapDir := filepath.Join(view.Root, virt.SaveDirName, virt.DefinitionsDir)
			entries, err := os.ReadDir(snapDir)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, e := range entries {
				got = append(got, e.Name())
			}
			if want := "db.xml mail.xml old.xml web.xml"; strings.Join(got, " ") != want {
				t.Errorf("the snapshot's definitions are %v, want %s", got, want)
			}
			xml, err := os.ReadFile(filepath.Join(snapDir, "web.xml"))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(xml), "<name>web</name>") || !strings.Contains(string(xml), "images/web.qcow2") {
				t.Errorf("web.xml is not web's definition:\n%s", xml)
			}
			if fi, err := os.Stat(filepath.Join(snapDir, "web.xml")); err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("web.xml: %v, mode %v, want 0600", err, fi.Mode())
			}
		})
	}
}

// TestDefinitionNotWrittenThroughSymlink: a symbolic link where a
// definition goes is refused (the run fails, naming it), and what it
// points to is untouched.
func TestDefinitionNotWrittenThroughSymlink(t *testing.T) {
	sb := newSandbox(t, "suspend", 20, "")
	dir := filepath.Join(sb.mountpoint, virt.SaveDirName, virt.DefinitionsDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(victim, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(dir, "web.xml")); err != nil {
		t.Fatal(err)
	}
	rep := sb.night(sb.pipeline(), nights[0], Options{SkipReplicate: true})
	if err := rep.Err(); err == nil || !strings.Contains(err.Error(), "web.xml: it is a symbolic link, not a regular file") {
		t.Errorf("run with a symlink for web.xml: %v", err)
	}
	if len(rep.Snapshots) != 1 {
		t.Errorf("no snapshot taken because of a definition: %+v", rep.Snapshots)
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious" {
		t.Errorf("the link's target was changed: %q", b)
	}
	if _, err := os.Stat(filepath.Join(dir, "db.xml")); err != nil {
		t.Errorf("the other definitions were not written: %v", err)
	}
	sb.assertRunning("after the run")
}
