package restore_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/restore"
)

// stubSource is a source that only has a name and a kind, for timelines
// built by hand.
type stubSource struct {
	name string
	kind restore.Kind
}

func (s stubSource) Name() string       { return s.name }
func (s stubSource) Kind() restore.Kind { return s.kind }
func (s stubSource) Snapshots(context.Context) ([]restore.SourceSnapshot, error) {
	return nil, nil
}
func (s stubSource) Open(context.Context, restore.SourceSnapshot) (restore.Tree, error) {
	return nil, nil
}

func specTimeline(t *testing.T) *restore.Timeline {
	t.Helper()
	local := stubSource{"local", restore.KindLocal}
	kopia := stubSource{"kopia", restore.KindKopia}
	at := func(s string) time.Time {
		tm, err := time.ParseInLocation("2006-01-02 15:04:05", s, time.Local)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	var lists [2][]restore.SourceSnapshot
	add := func(i int, ds, name string, guid uint64, tm string) {
		lists[i] = append(lists[i], restore.SourceSnapshot{
			SnapshotRef: restore.SnapshotRef{Dataset: ds, Name: name, GUID: guid, Time: at(tm)}, ID: ds + "@" + name})
	}
	add(0, "DATA/libvirt", "2023-03-04_05:00:01", 1, "2023-03-04 05:00:02")
	add(0, "DATA/libvirt", "2023-03-11_05:00:01", 2, "2023-03-11 05:00:02")
	add(0, "DATA/libvirt", "2023-04-01_05:00:01", 3, "2023-04-01 05:00:02")
	add(1, "DATA/libvirt", "2023-02-25_05:00:01", 4, "2023-02-25 05:00:02")
	add(1, "DATA/libvirt", "2023-03-04_05:00:01", 1, "2023-03-04 05:00:02")
	add(0, "DATA/other", "2023-03-11_05:00:01", 12, "2023-03-11 05:00:03")
	add(0, "DATA/other", "manual-before-upgrade", 13, "2024-01-05 10:00:00")
	tl, errs := restore.BuildTimeline(context.Background(), []restore.Source{
		listSource{local, lists[0]}, listSource{kopia, lists[1]}})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	return tl
}

// listSource is a stub source listing fixed snapshots.
type listSource struct {
	stubSource
	snaps []restore.SourceSnapshot
}

func (s listSource) Snapshots(context.Context) ([]restore.SourceSnapshot, error) { return s.snaps, nil }

func TestResolveSpecs(t *testing.T) {
	tl := specTimeline(t)
	if len(tl.Entries) != 6 {
		t.Fatalf("timeline has %d entries, want 6 (guid 1 merged)", len(tl.Entries))
	}
	for _, tc := range []struct {
		spec, dataset string
		want          string // full name, or "error: <substring>"
	}{
		{"DATA/libvirt@2023-03-04_05:00:01", "", "DATA/libvirt@2023-03-04_05:00:01"},
		{"2023-03-04_05:00:01", "", "DATA/libvirt@2023-03-04_05:00:01"},
		{"2023-03-11_05:00:01", "DATA/other", "DATA/other@2023-03-11_05:00:01"},
		{"latest", "DATA/libvirt", "DATA/libvirt@2023-04-01_05:00:01"},
		{"DATA/libvirt@latest", "", "DATA/libvirt@2023-04-01_05:00:01"},
		{"DATA/libvirt@latest~1", "", "DATA/libvirt@2023-03-11_05:00:01"},
		{"DATA/libvirt@latest~3", "", "DATA/libvirt@2023-02-25_05:00:01"},
		{"2023-04", "", "DATA/libvirt@2023-04-01_05:00:01"},
		{"2023-02-25", "", "DATA/libvirt@2023-02-25_05:00:01"},
		{"manual", "", "DATA/other@manual-before-upgrade"},
		{"2024-01-05", "", "DATA/other@manual-before-upgrade"}, // by creation time
		{"2024-01-05 10", "", "DATA/other@manual-before-upgrade"},
		{"latest", "", "error: ambiguous with 2 datasets"},
		{"DATA/libvirt@latest~4", "", "error: only 4 snapshots"},
		{"2023-03", "DATA/libvirt", "error: matches 2 snapshots (DATA/libvirt@2023-03-04_05:00:01, DATA/libvirt@2023-03-11_05:00:01)"},
		{"2023", "", "and 1 more"},
		{"2023-03-11_05:00:01", "", "error: write DATASET@NAME or pass --dataset"},
		{"2022-12", "", "error: no snapshot matches \"2022-12\": the timeline has 6 snapshots"},
		{"DATA/nope@latest", "", "error: no snapshot of dataset DATA/nope"},
		{"DATA/other@latest", "DATA/libvirt", "error: but --dataset says DATA/libvirt"},
		{"", "", "error: empty snapshot spec"},
	} {
		e, err := tl.Resolve(tc.spec, tc.dataset)
		if want, isErr := strings.CutPrefix(tc.want, "error: "); isErr || strings.HasPrefix(tc.want, "and ") {
			if err == nil {
				t.Errorf("Resolve(%q, %q) = %s, want an error with %q", tc.spec, tc.dataset, e.FullName(), want)
			} else if !strings.Contains(err.Error(), want) {
				t.Errorf("Resolve(%q, %q) error %q, want it to contain %q", tc.spec, tc.dataset, err, want)
			} else if strings.Contains(err.Error(), "\n") {
				t.Errorf("Resolve(%q) error is not one line: %q", tc.spec, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("Resolve(%q, %q): %v", tc.spec, tc.dataset, err)
		} else if e.FullName() != tc.want {
			t.Errorf("Resolve(%q, %q) = %s, want %s", tc.spec, tc.dataset, e.FullName(), tc.want)
		}
	}

	// The entry of guid 1 is held by both sources, local first.
	e, _ := tl.Resolve("DATA/libvirt@2023-03-04_05:00:01", "")
	if len(e.Sources) != 2 || e.Sources[0].Source.Name() != "local" || e.Sources[1].Source.Name() != "kopia" || !e.Has(restore.KindKopia) {
		t.Errorf("merged entry sources: %+v", e.Sources)
	}
}

func TestResolvePathSpecs(t *testing.T) {
	tl := specTimeline(t)
	for _, tc := range []struct {
		spec, dataset string
		snap, path    string // or path "error: ..."
	}{
		{"DATA/libvirt@2023-03-04_05:00:01:images/db.qcow2", "", "DATA/libvirt@2023-03-04_05:00:01", "images/db.qcow2"},
		{"2023-03-04_05:00:01:images/a:b", "", "DATA/libvirt@2023-03-04_05:00:01", "images/a:b"},
		{"latest:images/db.qcow2", "DATA/libvirt", "DATA/libvirt@2023-04-01_05:00:01", "images/db.qcow2"},
		{"DATA/libvirt@latest~1:x", "", "DATA/libvirt@2023-03-11_05:00:01", "x"},
		{"DATA/libvirt@latest", "", "DATA/libvirt@2023-04-01_05:00:01", "."},
		{"2023-04:vm/./disk", "", "DATA/libvirt@2023-04-01_05:00:01", "vm/disk"},
		{"latest:../etc/passwd", "DATA/libvirt", "", "error: leaves the snapshot"},
		{"latest:/etc/passwd", "DATA/libvirt", "", "error: is absolute"},
		{"latest:a/../../x", "DATA/libvirt", "", "error: leaves the snapshot"},
		{"latest:a\x00b", "DATA/libvirt", "", "error: NUL"},
		{"2023-05-06_05:00:01:images/db.qcow2", "", "", "error: no snapshot matches \"2023-05-06_05:00:01\""},
		{"2023-03:images/db.qcow2", "DATA/libvirt", "", "error: matches 2 snapshots"},
		{"latest~9:x", "DATA/libvirt", "", "error: only 4 snapshots"},
		{"nosuch:x", "", "", "error: no snapshot matches \"nosuch\""},
	} {
		e, rel, err := tl.ResolvePath(tc.spec, tc.dataset)
		if want, isErr := strings.CutPrefix(tc.path, "error: "); isErr {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("ResolvePath(%q) = %v, %q, %v; want error with %q", tc.spec, e, rel, err, want)
			}
			continue
		}
		if err != nil {
			t.Errorf("ResolvePath(%q): %v", tc.spec, err)
			continue
		}
		if e.FullName() != tc.snap || rel != tc.path {
			t.Errorf("ResolvePath(%q) = %s, %q; want %s, %q", tc.spec, e.FullName(), rel, tc.snap, tc.path)
		}
	}
}

func TestCleanPath(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "."},
		{".", "."},
		{"images/db.qcow2", "images/db.qcow2"},
		{"images//db.qcow2/", "images/db.qcow2"},
		{"a/../b", "b"},
		{"./a", "a"},
		{"../x", "error"},
		{"..", "error"},
		{"a/../../x", "error"},
		{"/etc/passwd", "error"},
		{"/", "error"},
		{"a\x00", "error"},
	} {
		got, err := restore.CleanPath(tc.in)
		if tc.want == "error" {
			if err == nil {
				t.Errorf("CleanPath(%q) = %q, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("CleanPath(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}
