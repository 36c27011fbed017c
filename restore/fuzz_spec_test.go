package restore_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/restore"
)

// FuzzResolvePath: whatever a user types as SNAPSHOT:PATH, resolving never
// panics, and what it resolves to is an entry of the timeline and a path
// that stays inside the snapshot; a refusal is one line.
func FuzzResolvePath(f *testing.F) {
	for _, s := range []string{
		"latest", "latest~2:images/web.qcow2", "2023-03-04_05:00:01:images/db.qcow2", "2023-03-04:images",
		"DATA/libvirt@2023-03-11_05:00:01:a/../b", "DATA/other@manual-before-upgrade", "2023-03-04_05:00:01:/etc/passwd",
		"latest:../../etc", "::", "latest~99999999999999999999", "2023-13-45", "@", "latest:\x00", "manual-before-upgrade:x",
	} {
		f.Add(s, "")
		f.Add(s, "DATA/libvirt")
	}
	f.Fuzz(func(t *testing.T, spec, dataset string) {
		tl := specTimeline(t)
		e, rel, err := tl.ResolvePath(spec, dataset)
		if err != nil {
			if e != nil || strings.Contains(err.Error(), "\n") {
				t.Fatalf("ResolvePath(%q, %q): entry %v with error %q", spec, dataset, e, err)
			}
			return
		}
		if !slices.Contains(tl.Entries, e) {
			t.Fatalf("ResolvePath(%q, %q) resolved to an entry not in the timeline: %+v", spec, dataset, e)
		}
		if clean, err := restore.CleanPath(rel); err != nil || clean != rel || strings.HasPrefix(rel, "/") || rel == ".." || strings.HasPrefix(rel, "../") {
			t.Fatalf("ResolvePath(%q, %q) path %q leaves the snapshot or is not clean (%v)", spec, dataset, rel, err)
		}
	})
}
