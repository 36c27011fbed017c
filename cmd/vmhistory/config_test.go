package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/testenv"
)

// runConfigCmd runs the vmhistory command line with args and returns its
// stdout, stderr and error.
func runConfigCmd(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	cmd := newRootCommand()
	var stdout, stderr bytes.Buffer
	cmd.SetOut(&stdout)
	cmd.SetErr(&stderr)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return stdout.String(), stderr.String(), err
}

func writeTempConfig(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// configExitCode returns the status main would exit with for err.
func configExitCode(err error) int {
	if err == nil {
		return 0
	}
	var exit *exitError
	if errors.As(err, &exit) {
		return exit.code
	}
	return 1
}

func TestConfigCheckGoodFile(t *testing.T) {
	path := writeTempConfig(t, "datasets: [DATA/libvirt]\nkeep_local: 7\nzfs:\n  binary: /bin/sh\n")
	stdout, stderr, err := runConfigCmd(t, "config", "check", "--config", path)
	if err != nil {
		t.Fatalf("config check: %v\nstderr: %s", err, stderr)
	}
	for _, want := range []string{"keep_local: 7\n", "keep_replica: 7\n", "mode: managedsave\n", "save_timeout: 5m\n", "- name: DATA/libvirt\n"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("output lacks %q:\n%s", want, stdout)
		}
	}
	// The printed configuration is itself a valid configuration.
	if _, err := (config.Options{SkipFileChecks: true}).Parse([]byte(stdout), "printed"); err != nil {
		t.Errorf("printed configuration does not parse: %v\n%s", err, stdout)
	}

	stdout, _, err = runConfigCmd(t, "config", "check", "--config", path, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var resolved struct {
		Datasets []struct {
			Name string `json:"name"`
			VMs  string `json:"vms"`
		} `json:"datasets"`
		KeepLocal int `json:"keep_local"`
		Quiesce   struct {
			SaveTimeout string `json:"save_timeout"`
		} `json:"quiesce"`
	}
	if err := json.Unmarshal([]byte(stdout), &resolved); err != nil {
		t.Fatalf("--json output is not JSON: %v\n%s", err, stdout)
	}
	if resolved.KeepLocal != 7 || resolved.Datasets[0].Name != "DATA/libvirt" || resolved.Datasets[0].VMs != "all" || resolved.Quiesce.SaveTimeout != "5m" {
		t.Errorf("--json output %s", stdout)
	}
}

func TestConfigCheckBadFile(t *testing.T) {
	path := writeTempConfig(t, "datasets: [DATA/libvirt]\nkeep_local: -3\nquiesce:\n  mode: hibernate\n")
	stdout, stderr, err := runConfigCmd(t, "config", "check", "--config", path)
	if configExitCode(err) == 0 {
		t.Fatalf("config check of a bad file succeeded:\n%s", stdout)
	}
	want := []string{
		path + `:2: keep_local: "-3" must be at least 1`,
		path + `:4: quiesce.mode: "hibernate" must be one of`,
	}
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	if len(lines) != len(want) {
		t.Fatalf("stderr has %d lines, want %d:\n%s", len(lines), len(want), stderr)
	}
	for i, w := range want {
		if !strings.HasPrefix(lines[i], w) {
			t.Errorf("stderr line %d = %q, want prefix %q", i+1, lines[i], w)
		}
	}
	if stdout != "" {
		t.Errorf("stdout = %q, want nothing", stdout)
	}

	stdout, _, err = runConfigCmd(t, "config", "check", "--config", path, "--json")
	if configExitCode(err) == 0 {
		t.Fatal("config check --json of a bad file succeeded")
	}
	var report struct {
		Valid    bool                `json:"valid"`
		Problems []config.FieldError `json:"problems"`
	}
	if err := json.Unmarshal([]byte(stdout), &report); err != nil {
		t.Fatalf("--json failure output is not JSON: %v\n%s", err, stdout)
	}
	if report.Valid || len(report.Problems) != 2 || report.Problems[0].Key != "keep_local" || report.Problems[0].Line != 2 || report.Problems[0].Value != "-3" {
		t.Errorf("--json failure report %+v", report)
	}
}

func TestConfigCheckMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nope.yaml")
	_, stderr, err := runConfigCmd(t, "config", "check", "-c", path)
	if configExitCode(err) == 0 {
		t.Fatal("config check of a missing file succeeded")
	}
	if strings.Count(stderr, "\n") != 1 || !strings.HasPrefix(stderr, path+": ") || !strings.Contains(stderr, "--config") {
		t.Errorf("stderr = %q, want one line naming the file and --config", stderr)
	}
}

func TestConfigCheckSkipFiles(t *testing.T) {
	path := writeTempConfig(t, "datasets: [DATA/libvirt]\nkopia:\n  password_file: /nonexistent/kopia.password\n")
	if _, stderr, err := runConfigCmd(t, "config", "check", "--config", path); configExitCode(err) == 0 || !strings.Contains(stderr, "kopia.password_file") {
		t.Errorf("missing password file accepted: %v %s", err, stderr)
	}
	if _, stderr, err := runConfigCmd(t, "config", "check", "--config", path, "--skip-files"); err != nil {
		t.Errorf("--skip-files: %v\n%s", err, stderr)
	}
}

func TestConfigExample(t *testing.T) {
	stdout, _, err := runConfigCmd(t, "config", "example")
	if err != nil {
		t.Fatal(err)
	}
	if stdout != config.Example() {
		t.Error("config example does not print config.Example()")
	}
	path := writeTempConfig(t, stdout)
	if _, stderr, err := runConfigCmd(t, "config", "check", "--skip-files", "--config", path); err != nil {
		t.Errorf("the example does not pass config check --skip-files: %v\n%s", err, stderr)
	}
}

// The README's first run: example, edit, password, check — before the
// kopia repository exists. check warns about the missing kopia config,
// says how to create it, and passes.
func TestConfigCheckFreshInstall(t *testing.T) {
	unsetKopiaPassword(t)
	dir := t.TempDir()
	pw := filepath.Join(dir, "kopia.password")
	if err := os.WriteFile(pw, []byte("pw\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	kopiaCfg := filepath.Join(dir, "kopia.config")
	path := writeTempConfig(t, "datasets: [DATA/libvirt]\nzfs: {binary: /bin/false}\nkopia:\n  config_file: "+kopiaCfg+"\n  password_file: "+pw+"\n")
	stdout, stderr, err := runConfigCmd(t, "config", "check", "--config", path)
	if err != nil {
		t.Fatalf("config check on a fresh install: %v\n%s", err, stderr)
	}
	want := "warning: " + path + `:4: kopia.config_file: "` + kopiaCfg + `" does not exist yet: create the repository (or connect to one) with vmhistory repo create`
	if !strings.Contains(stderr, want) || !strings.Contains(stdout, "is valid") {
		t.Errorf("stdout:\n%s\nstderr:\n%s\nwant the warning %q", stdout, stderr, want)
	}
}

// TestConfigCheckWarnsManagedSaveOffDataset: config check passes but warns
// when managed-save images would not be in the snapshots.
func TestConfigCheckWarnsManagedSaveOffDataset(t *testing.T) {
	pool := testenv.NewPool(t, 64)
	ds, _ := pool.Dataset(t, "libvirt")
	for _, mode := range []string{"managedsave", "save"} {
		path := writeTempConfig(t, "datasets: ["+ds+"]\nquiesce: {mode: "+mode+"}\n")
		_, stderr, err := runConfigCmd(t, "config", "check", "--config", path)
		if err != nil {
			t.Fatalf("%s: config check: %v\n%s", mode, err, stderr)
		}
		warned := strings.Contains(stderr, "warning: ") && strings.Contains(stderr, "/var/lib/libvirt/qemu/save")
		if warned != (mode == "managedsave") {
			t.Errorf("mode %s: stderr %q", mode, stderr)
		}
	}
}
