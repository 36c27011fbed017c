package main

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestTimelineCommand(t *testing.T) {
	sb := newRestoreSandbox(t) // one snapshot, here and on a local replica

	stdout, stderr, err := runConfigCmd(t, "timeline", "--config", sb.config)
	if err != nil {
		t.Fatalf("timeline: %v\n%s", err, stderr)
	}
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "SNAPSHOT") {
		t.Fatalf("timeline table:\n%s", stdout)
	}
	if f := strings.Fields(lines[1]); len(f) < 7 || f[0] != "2023-03-04_05:00:01" || f[3] != "✓" || f[4] != "✓" || f[5] != "-" {
		t.Errorf("timeline line %q: want the snapshot local ✓ replica ✓ kopia -", lines[1])
	}

	stdout, stderr, err = runConfigCmd(t, "timeline", "--json", "--config", sb.config)
	if err != nil {
		t.Fatalf("timeline --json: %v\n%s", err, stderr)
	}
	var entries []struct {
		Dataset, Name string
		GUID          string `json:"guid"`
		Sources       []struct{ Source, Kind string }
	}
	if err := json.Unmarshal([]byte(stdout), &entries); err != nil {
		t.Fatalf("%v\n%s", err, stdout)
	}
	if len(entries) != 1 || entries[0].Dataset+"@"+entries[0].Name != sb.snap || entries[0].GUID == "" ||
		len(entries[0].Sources) != 2 || entries[0].Sources[0].Source != "local" || entries[0].Sources[1].Kind != "replica" {
		t.Errorf("timeline --json: %s", stdout)
	}

	stdout, stderr, err = runConfigCmd(t, "timeline", "ls", "latest:images", "--config", sb.config)
	if err != nil || !strings.Contains(stdout, "vm.img") {
		t.Errorf("timeline ls: %v\n%s\n%s", err, stdout, stderr)
	}
	for _, bad := range []struct{ spec, want string }{
		{"2022:images", "no snapshot matches"},
		{"latest:../../etc", "leaves the snapshot"},
		{"latest:images/nope", "file does not exist"},
	} {
		_, _, err = runConfigCmd(t, "timeline", "ls", bad.spec, "--config", sb.config)
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("timeline ls %s: %v, want %q", bad.spec, err, bad.want)
		}
	}
}
