package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/testenv"
)

// repoTestConfig writes a configuration whose kopia section points into a
// temp dir, with a password file, and returns the config path and the dir.
func repoTestConfig(t *testing.T) (string, string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "kopia.password"), []byte("repo test password\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`datasets: [DATA/libvirt]
zfs:
  binary: /bin/sh
kopia:
  config_file: %[1]s/kopia.config
  password_file: %[1]s/kopia.password
  host: kvmtest
  user: root
`, dir)
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, dir
}

func unsetKopiaPassword(t *testing.T) {
	t.Setenv(kopiarepo.PasswordEnv, "")
	os.Unsetenv(kopiarepo.PasswordEnv)
}

func TestRepoCreateStatus(t *testing.T) {
	unsetKopiaPassword(t)
	cfg, dir := repoTestConfig(t)
	repoDir := filepath.Join(dir, "repo")
	cache := "--cache-directory=" + filepath.Join(dir, "cache")

	stdout, stderr, err := runConfigCmd(t, "repo", "create", "filesystem", "--path", repoDir, cache, "--config", cfg)
	if err != nil {
		t.Fatalf("repo create filesystem: %v\n%s", err, stderr)
	}
	for _, want := range []string{"Created and connected to the kopia repository in filesystem " + repoDir, "owned by this host (root@kvmtest)", "Sources:        none yet"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("repo create output lacks %q:\n%s", want, stdout)
		}
	}

	stdout, stderr, err = runConfigCmd(t, "repo", "status", "--json", "--config", cfg)
	if err != nil {
		t.Fatalf("repo status --json: %v\n%s", err, stderr)
	}
	var st kopiarepo.Status
	if err := json.Unmarshal([]byte(stdout), &st); err != nil {
		t.Fatalf("repo status --json is not JSON: %v\n%s", err, stdout)
	}
	if st.StorageType != "filesystem" || st.StorageConfig["path"] != repoDir || st.Identity != "root@kvmtest" ||
		!st.Maintenance.Owned || st.ConfigFile != filepath.Join(dir, "kopia.config") || st.UniqueID == "" || st.Hash == "" {
		t.Errorf("repo status --json: %+v", st)
	}

	// Creating again over the same config file is refused; connecting
	// with --overwrite replaces it.
	if _, stderr, err := runConfigCmd(t, "repo", "create", "filesystem", "--path", filepath.Join(dir, "repo2"), cache, "--config", cfg); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("second repo create: %v %s", err, stderr)
	}
	if _, stderr, err := runConfigCmd(t, "repo", "connect", "filesystem", "--path", repoDir, cache, "--overwrite", "--config", cfg); err != nil {
		t.Errorf("repo connect --overwrite: %v %s", err, stderr)
	}

	// The password from another file, and a wrong one.
	other := filepath.Join(dir, "other.password")
	if err := os.WriteFile(other, []byte("not it\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runConfigCmd(t, "repo", "status", "--password-file", other, "--config", cfg); err == nil || !strings.Contains(err.Error(), "wrong password") {
		t.Errorf("repo status with a wrong password: %v", err)
	}
	t.Setenv(kopiarepo.PasswordEnv, "repo test password")
	if stdout, _, err := runConfigCmd(t, "repo", "status", "--config", cfg); err != nil || !strings.Contains(stdout, "Repository:     filesystem "+repoDir) {
		t.Errorf("repo status with $KOPIA_PASSWORD: %v\n%s", err, stdout)
	}
}

func TestRepoCommandErrors(t *testing.T) {
	unsetKopiaPassword(t)
	cfg, dir := repoTestConfig(t)

	// No password file yet: create says how to make one.
	if err := os.Remove(filepath.Join(dir, "kopia.password")); err != nil {
		t.Fatal(err)
	}
	_, _, err := runConfigCmd(t, "repo", "create", "filesystem", "--path", filepath.Join(dir, "repo"), "--config", cfg)
	if err == nil || !strings.Contains(err.Error(), "create the password first") {
		t.Errorf("repo create without a password: %v", err)
	}

	// Missing required flags, and a key that is not a service account's.
	if _, _, err := runConfigCmd(t, "repo", "create", "filesystem", "--config", cfg); err == nil || !strings.Contains(err.Error(), "--path") {
		t.Errorf("repo create filesystem without --path: %v", err)
	}
	t.Setenv(kopiarepo.PasswordEnv, "pw")
	userKey := filepath.Join(dir, "user.json")
	if err := os.WriteFile(userKey, []byte(`{"type":"authorized_user"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runConfigCmd(t, "repo", "connect", "gdrive", "--folder-id", "x", "--credentials-file", userKey, "--config", cfg); err == nil || !strings.Contains(err.Error(), "not a service account key") {
		t.Errorf("repo connect gdrive with a user key: %v", err)
	}

	// Status before anything is connected names the missing kopia config
	// and what makes it.
	_, stderr, err := runConfigCmd(t, "repo", "status", "--config", cfg)
	if configExitCode(err) == 0 || !strings.Contains(err.Error(), "kopia repository config "+filepath.Join(dir, "kopia.config")+" does not exist; connect the repository first") {
		t.Errorf("repo status before connect: %v\n%s", err, stderr)
	}

	// A configuration without a kopia section.
	noKopia := writeTempConfig(t, "datasets: [DATA/libvirt]\nzfs:\n  binary: /bin/sh\n")
	if _, _, err := runConfigCmd(t, "repo", "create", "filesystem", "--path", filepath.Join(dir, "r"), "--config", noKopia); err == nil || !strings.Contains(err.Error(), "no kopia section") {
		t.Errorf("repo create without a kopia section: %v", err)
	}
}

func TestRepoHelp(t *testing.T) {
	for _, args := range [][]string{{"repo", "--help"}, {"repo", "create", "--help"}, {"repo", "connect", "gdrive", "--help"}, {"repo", "status", "--help"}} {
		stdout, _, err := runConfigCmd(t, args...)
		if err != nil || !strings.Contains(stdout, "Examples:") {
			t.Errorf("%v: %v\n%s", args, err, stdout)
		}
	}
	stdout, _, _ := runConfigCmd(t, "repo", "create", "--help")
	for _, b := range []string{"filesystem", "webdav", "sftp", "s3", "rclone", "gdrive"} {
		if !strings.Contains(stdout, "  "+b+" ") {
			t.Errorf("repo create --help does not list %s:\n%s", b, stdout)
		}
	}
}

// TestRepoStatusAndConfigCheckWarnDeprecatedCompression: a repository
// whose global policy was set to lz4 with kopia's own CLI gets a warning
// from "repo status" (text and --json) and from "config check", and both
// still exit 0.
func TestRepoStatusAndConfigCheckWarnDeprecatedCompression(t *testing.T) {
	unsetKopiaPassword(t)
	cfg, dir := repoTestConfig(t)
	repoDir := filepath.Join(dir, "repo")
	if _, stderr, err := runConfigCmd(t, "repo", "create", "filesystem", "--path", repoDir,
		"--cache-directory="+filepath.Join(dir, "cache"), "--config", cfg); err != nil {
		t.Fatalf("repo create filesystem: %v\n%s", err, stderr)
	}
	// Nothing deprecated yet: no warning.
	if _, stderr, err := runConfigCmd(t, "repo", "status", "--config", cfg); err != nil || strings.Contains(stderr, "warning") {
		t.Fatalf("repo status on a fresh repository: %v\n%s", err, stderr)
	}

	kopia := exec.Command(testenv.KopiaCLI(t), "--config-file="+filepath.Join(dir, "kopia.config"), "--log-dir="+filepath.Join(dir, "kopia-logs"),
		"policy", "set", "--global", "--compression=lz4")
	kopia.Env = append(os.Environ(), "KOPIA_PASSWORD=repo test password", "KOPIA_CHECK_FOR_UPDATES=false")
	if out, err := kopia.CombinedOutput(); err != nil {
		t.Fatalf("kopia policy set --global --compression=lz4: %v\n%s", err, out)
	}

	const want = "the global policy compresses with lz4, which kopia deprecates"
	stdout, stderr, err := runConfigCmd(t, "repo", "status", "--config", cfg)
	if err != nil {
		t.Fatalf("repo status: %v\n%s", err, stderr)
	}
	if !strings.Contains(stderr, "warning: "+want) || !strings.Contains(stderr, "kopia policy set --global --compression=") {
		t.Errorf("repo status: no warning about lz4 on stderr:\n%s", stderr)
	}
	if !strings.Contains(stdout, "compression lz4") {
		t.Errorf("repo status does not show the global policy's lz4:\n%s", stdout)
	}
	stdout, _, err = runConfigCmd(t, "repo", "status", "--json", "--config", cfg)
	var st kopiarepo.Status
	if err != nil || json.Unmarshal([]byte(stdout), &st) != nil || len(st.Warnings) != 1 || !strings.Contains(st.Warnings[0], want) {
		t.Errorf("repo status --json: %v, warnings %q", err, st.Warnings)
	}

	_, stderr, err = runConfigCmd(t, "config", "check", "--config", cfg)
	if code := configExitCode(err); code != 0 {
		t.Fatalf("config check: exit %d: %v\n%s", code, err, stderr)
	}
	if !strings.Contains(stderr, "warning: kopia repository filesystem "+repoDir+": "+want) {
		t.Errorf("config check: no warning about lz4 on stderr:\n%s", stderr)
	}
}

// "repo create filesystem" refuses a directory that holds anything, as its
// help says, and leaves it as it was.
func TestRepoCreateRefusesNonEmptyDirectory(t *testing.T) {
	unsetKopiaPassword(t)
	cfg, dir := repoTestConfig(t)
	target := filepath.Join(dir, "someones-files")
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "notes.txt"), []byte("mine"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err := runConfigCmd(t, "repo", "create", "filesystem", "--path", target, "--config", cfg)
	if err == nil || !strings.Contains(err.Error(), "the directory "+target+` is not empty (it holds "notes.txt")`) {
		t.Errorf("repo create filesystem in a non-empty directory: %v", err)
	}
	if entries, _ := os.ReadDir(target); len(entries) != 1 {
		t.Errorf("the directory now holds %d entries", len(entries))
	}
	if _, err := os.Stat(filepath.Join(dir, "kopia.config")); err == nil {
		t.Error("kopia.config was written")
	}
	// An empty one, and a new one, are fine.
	if err := os.Remove(filepath.Join(target, "notes.txt")); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := runConfigCmd(t, "repo", "create", "filesystem", "--path", target, "--cache-directory", filepath.Join(dir, "cache"), "--config", cfg); err != nil {
		t.Errorf("repo create filesystem in an empty directory: %v\n%s", err, stderr)
	}
}
