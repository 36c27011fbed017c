package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/testenv"
)

// A dataset in the configuration that does not exist on this host is named
// by config check at its line, by the dry run in a sentence, and by the
// timeline in a warning.
func TestMissingDatasetNamedEverywhere(t *testing.T) {
	pool := testenv.NewPool(t, 128)
	ds, _ := pool.Dataset(t, "libvirt")
	if _, err := pool.ZFS.CreateSnapshot(context.Background(), ds, "2023-03-04_05:00:01", nil); err != nil {
		t.Fatal(err)
	}
	missing := pool.Name + "/misspelt"
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	yaml := fmt.Sprintf("datasets:\n  - %s\n  - name: %s\nquiesce: {mode: none}\nstate_dir: %s\n", ds, missing, dir)
	if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}

	_, stderr, err := runConfigCmd(t, "config", "check", "--config", path)
	want := path + `:3: datasets[1].name: "` + missing + `" does not exist on this host`
	if configExitCode(err) == 0 || !strings.HasPrefix(stderr, want) || strings.Count(stderr, "\n") != 1 {
		t.Errorf("config check: %v\n%s\nwant one line starting %q", err, stderr, want)
	}
	// --skip-files does not look at this host.
	if _, stderr, err := runConfigCmd(t, "config", "check", "--skip-files", "--config", path); err != nil {
		t.Errorf("config check --skip-files: %v\n%s", err, stderr)
	}

	// A zfs that cannot be asked: a warning, not a verdict.
	noZFS := writeTempConfig(t, yaml+"zfs: {binary: /bin/false}\n")
	if _, stderr, err := runConfigCmd(t, "config", "check", "--config", noZFS); err != nil ||
		!strings.Contains(stderr, "warning: "+noZFS+":1: datasets: not checked on this host: ") {
		t.Errorf("config check without a working zfs: %v\n%s", err, stderr)
	}

	stdout, stderr, err := runConfigCmd(t, "backup", "--dry-run", "--config", path)
	if err == nil {
		t.Error("backup --dry-run with a missing dataset succeeded")
	}
	line := "dataset " + missing + " does not exist on this host; fix its name under datasets: in the configuration, or create it"
	if !strings.Contains(stdout, "Cannot plan the snapshot step: "+line) || strings.Contains(stdout+stderr, "cannot open") {
		t.Errorf("backup --dry-run:\n%s\n%s\nwant the line %q", stdout, stderr, line)
	}

	stdout, stderr, err = runConfigCmd(t, "timeline", "--config", path)
	if err != nil || !strings.Contains(stdout, "2023-03-04_05:00:01") {
		t.Errorf("timeline: %v\n%s\n%s", err, stdout, stderr)
	}
	if !strings.Contains(stderr, "vmhistory: warning: local: dataset "+missing+" does not exist on this host") {
		t.Errorf("timeline warning %q", stderr)
	}
}
