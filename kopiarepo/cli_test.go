package kopiarepo_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmhistory/vmhistory/kopiarepo"
)

// TestKopiaCLIReadsOurRepository: the kopia CLI built from the module
// vmhistory links accepts the repository config Create writes, lists the
// uploaded snapshot with its tags and times, agrees on the maintenance
// owner, and restores a file byte for byte.
func TestKopiaCLIReadsOurRepository(t *testing.T) {
	ctx := context.Background()
	r, configFile := newRepo(t, kopiarepo.Filesystem{Path: filepath.Join(t.TempDir(), "repo")})
	dir := t.TempDir()
	writeTree(t, dir)
	res := uploadNight(t, r, dir, 0, nil)
	r.Close(ctx)

	var status struct {
		ClientOptions struct {
			Hostname string `json:"hostname"`
			Username string `json:"username"`
		} `json:"clientOptions"`
		Storage struct {
			Type string `json:"type"`
		} `json:"storage"`
	}
	out := runKopia(t, configFile, "repository", "status", "--json")
	if err := json.Unmarshal([]byte(out), &status); err != nil {
		t.Fatalf("kopia repository status --json: %v\n%s", err, out)
	}
	if status.ClientOptions.Hostname != testHost || status.ClientOptions.Username != testUser || status.Storage.Type != "filesystem" {
		t.Errorf("kopia repository status: %+v", status)
	}

	var listed []struct {
		ID        string            `json:"id"`
		StartTime string            `json:"startTime"`
		Tags      map[string]string `json:"tags"`
	}
	guid := nightTags(0)[kopiarepo.TagGUID]
	out = runKopia(t, configFile, "snapshot", "list", testUser+"@"+testHost+":"+testSource, "--json", "--tags", "guid:"+guid)
	if err := json.Unmarshal([]byte(out), &listed); err != nil {
		t.Fatalf("kopia snapshot list --json: %v\n%s", err, out)
	}
	if len(listed) != 1 || listed[0].ID != res.Snapshot.ID || listed[0].Tags["tag:dataset"] != "DATA/libvirt" {
		t.Fatalf("kopia snapshot list --tags guid:%s: %+v, want snapshot %s tagged", guid, listed, res.Snapshot.ID)
	}
	if listed[0].StartTime != night(0).UTC().Format("2006-01-02T15:04:05Z") {
		t.Errorf("kopia sees StartTime %s, want %v", listed[0].StartTime, night(0).UTC())
	}

	var mi struct {
		Owner string `json:"owner"`
	}
	out = runKopia(t, configFile, "maintenance", "info", "--json")
	if err := json.Unmarshal([]byte(out), &mi); err != nil {
		t.Fatalf("kopia maintenance info --json: %v\n%s", err, out)
	}
	if mi.Owner != testUser+"@"+testHost {
		t.Errorf("kopia maintenance owner %q", mi.Owner)
	}

	dest := filepath.Join(t.TempDir(), "web.raw")
	runKopia(t, configFile, "restore", res.Snapshot.RootObjectID+"/images/web.raw", dest)
	got, err := os.ReadFile(dest)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(filepath.Join(dir, "images/web.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("kopia restore of images/web.raw differs from the original")
	}
}

// TestOpenRepositoryMadeByKopiaCLI: a repository created and snapshotted
// with the kopia CLI opens with Open, lists and reads its snapshot, and
// takes vmhistory's uploads with the CLI's maintenance owner honoured.
func TestOpenRepositoryMadeByKopiaCLI(t *testing.T) {
	ctx := context.Background()
	configFile := filepath.Join(t.TempDir(), "cli.config")
	repoDir := filepath.Join(t.TempDir(), "repo")
	runKopia(t, configFile, "repository", "create", "filesystem", "--path="+repoDir,
		"--cache-directory="+filepath.Join(t.TempDir(), "cache"),
		"--override-hostname="+testHost, "--override-username="+testUser, "--no-check-for-updates")
	dir := t.TempDir()
	writeTree(t, dir)
	runKopia(t, configFile, "snapshot", "create", dir, "--tags", "guid:777", "--description", "by the kopia CLI")

	r, err := kopiarepo.Open(ctx, configFile, testPassword)
	if err != nil {
		t.Fatalf("Open a repository made by the kopia CLI: %v", err)
	}
	defer r.Close(ctx)
	snap, ok, err := r.SnapshotByGUID(ctx, "777")
	if err != nil || !ok {
		t.Fatalf("SnapshotByGUID(777) = %v %v", ok, err)
	}
	if snap.Path != dir || snap.Host != testHost || snap.Description != "by the kopia CLI" {
		t.Errorf("CLI snapshot: %+v", snap)
	}
	checkSnapshotFiles(t, r, snap.ID, dir)

	res := uploadNight(t, r, dir, 0, nil)
	if res.Maintenance.Owner != testUser+"@"+testHost {
		t.Errorf("maintenance owner of the CLI's repository: %+v", res.Maintenance)
	}
	st, err := r.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.StorageType != "filesystem" || len(st.Sources) != 2 || !st.Maintenance.Owned {
		t.Errorf("status of the CLI's repository: %+v", st)
	}
}
