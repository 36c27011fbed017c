package backup

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// The dry run's prune plan names what it would destroy, counting tonight's
// snapshot among those kept, and destroys nothing.
func TestDryRunPrunePlanNamesSnapshots(t *testing.T) {
	sb := newSandbox(t, "none", 2, "")
	p := sb.pipeline()
	for i, at := range nights {
		if rep := sb.night(p, at, Options{AllowFull: i == 0}); rep.Err() != nil {
			t.Fatalf("night %d: %v", i+1, rep.Err())
		}
	}
	before := snapNames(t, sb.src.ZFS, sb.dataset)
	if before != "2023-03-11_05:00:01,2023-03-18_05:00:01" {
		t.Fatalf("snapshots after three nights with keep_local 2: %s", before)
	}
	rep := sb.night(p, nights[2].Add(7*24*time.Hour), Options{DryRun: true})
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	plan := strings.Join(rep.Plan, "\n")
	if !strings.Contains(plan, "prune "+sb.dataset+": keep the last 2 of vmhistory's snapshots; destroy 2023-03-11_05:00:01\n") &&
		!strings.HasSuffix(plan, "prune "+sb.dataset+": keep the last 2 of vmhistory's snapshots; destroy 2023-03-11_05:00:01") {
		t.Errorf("plan does not name the snapshot prune would destroy:\n%s", plan)
	}
	if after := snapNames(t, sb.src.ZFS, sb.dataset); after != before {
		t.Errorf("the dry run changed the snapshots: %s, was %s", after, before)
	}
	// "backup prune --dry-run" alone takes no snapshot: nothing to destroy.
	rep = sb.night(p, nights[2].Add(7*24*time.Hour), Options{DryRun: true, Only: StepPrune})
	if plan := strings.Join(rep.Plan, "\n"); !strings.Contains(plan, "; destroy none") {
		t.Errorf("prune alone, dry run:\n%s", plan)
	}
}

// A dry run's JSON has lists, never null, so that jq '.steps[]' works.
func TestDryRunJSONListsAreEmptyNotNull(t *testing.T) {
	sb := newSandbox(t, "none", 20, "")
	rep := sb.night(sb.pipeline(), nights[0], Options{DryRun: true})
	var buf bytes.Buffer
	if err := rep.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"steps", "vms", "snapshots"} {
		if _, ok := got[key].([]any); !ok {
			t.Errorf("%q is %v, want a list:\n%s", key, got[key], buf.String())
		}
	}
}

// A failed step's error is printed once, in the table, however long.
func TestReportPrintsAnErrorOnce(t *testing.T) {
	long := "zfs receive on backup: " + strings.Repeat("cannot receive incremental stream: destination has been modified ", 6)
	rep := &Report{RunID: "r1", Started: time.Now()}
	rep.Add(StepResult{Step: StepSnapshot, Dataset: "DATA/libvirt", Status: StatusOK})
	rep.Add(StepResult{Step: StepReplicate, Dataset: "DATA/libvirt", Status: StatusFailed, Error: long})
	rep.finish()
	var buf bytes.Buffer
	if err := rep.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(buf.String(), long); n != 1 {
		t.Errorf("the error is printed %d times:\n%s", n, buf.String())
	}
	if !strings.Contains(buf.String(), "FAILED after 0s: replicate DATA/libvirt\n") {
		t.Errorf("the summary does not name the failed step:\n%s", buf.String())
	}
	if rep.Failure == "" || !strings.Contains(rep.Failure, long) {
		t.Errorf("Failure %q lacks the error", rep.Failure)
	}
}
