package bench

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmhistory/vmhistory/testenv"
)

// The boot bench on a small disk, one run under drive: the three rows,
// each timed and checked (the restore's SHA-256, a resumed heartbeat, a
// fresh boot's heartbeat 1), each boot set against the restore; and
// nothing left behind: no domain, no pool, no work directory.
func TestBootBenchSmall(t *testing.T) {
	l := testenv.DialQEMU(t)
	testenv.RequireZFS(t)
	// QEMU (libvirt-qemu) must reach the work directory: t.TempDir is
	// private.
	if err := os.MkdirAll(testenv.PoolDir, 0o755); err != nil {
		t.Fatal(err)
	}
	work, err := os.MkdirTemp(testenv.PoolDir, "bench-boot-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	if err := os.Chmod(work, 0o755); err != nil {
		t.Fatal(err)
	}
	var lines []string
	tab, err := Boot(context.Background(), BootOptions{Size: 256 << 20, Presets: []string{"drive"}, Repeat: 1, WorkDir: work,
		Progress: func(s string) { lines = append(lines, s); t.Log(s) }})
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	tab.WriteText(&text)
	t.Logf("\n%s", text.String())
	if len(tab.Rows) != 3 {
		t.Fatalf("%d rows, want 3", len(tab.Rows))
	}
	ways := []string{bootWayRestore, bootWaySaved, bootWayFresh}
	checks := []string{"SHA-256 matches", "resumed: heartbeat ", "booted: mounted /dev/vda, heartbeat 1"}
	for i, r := range tab.Rows {
		if r[0].Text != "drive" || r[1].Text != ways[i] {
			t.Errorf("row %d is %s, %s: want drive, %s", i, r[0].Text, r[1].Text, ways[i])
		}
		if s, ok := cell(t, tab, r, "seconds").(float64); !ok || s <= 0 {
			t.Errorf("row %s: seconds %v", r[1].Text, cell(t, tab, r, "seconds"))
		}
		if mib, ok := cell(t, tab, r, "store MiB").(float64); !ok || mib <= 0 {
			t.Errorf("row %s: nothing from the store (%v)", r[1].Text, cell(t, tab, r, "store MiB"))
		}
		if c := cell(t, tab, r, "checked").(string); !strings.HasPrefix(c, checks[i]) {
			t.Errorf("row %s: checked %q, want %q", r[1].Text, c, checks[i])
		}
		if st, ok := cell(t, tab, r, "started s").(float64); i > 0 && (!ok || st <= 0 || st > cell(t, tab, r, "seconds").(float64)) {
			t.Errorf("row %s: started s %v, seconds %v", r[1].Text, cell(t, tab, r, "started s"), cell(t, tab, r, "seconds"))
		}
		frac, ok := cell(t, tab, r, "of restore").(float64)
		within := cell(t, tab, r, "within 1/3").(string)
		switch {
		case i == 0 && (ok || within != "-"):
			t.Errorf("the restore row is set against itself: %v, %q", frac, within)
		case i > 0 && (!ok || frac <= 0 || within != map[bool]string{true: "yes", false: "no"}[frac <= bootTarget]):
			t.Errorf("row %s: of restore %v, within 1/3 %q", r[1].Text, cell(t, tab, r, "of restore"), within)
		}
	}
	// A restore copies the whole disk; the saved state reads its RAM
	// image and what the guest touches, not the filler.
	restored, saved := cell(t, tab, tab.Rows[0], "store MiB").(float64), cell(t, tab, tab.Rows[1], "store MiB").(float64)
	if restored < 200 || saved >= restored {
		t.Errorf("the restore fetched %.1f MiB, the saved state's boot %.1f MiB", restored, saved)
	}

	doms, _, err := l.ConnectListAllDomains(1, libvirt.ConnectListDomainsActive|libvirt.ConnectListDomainsInactive)
	if err != nil {
		t.Fatal(err)
	}
	prefix := fmt.Sprintf("%s%d-", mountBenchPoolPrefix, os.Getpid())
	for _, d := range doms {
		if strings.HasPrefix(d.Name, prefix) {
			t.Errorf("domain %s is left behind", d.Name)
		}
	}
	if ents, _ := os.ReadDir(work); len(ents) > 0 {
		t.Errorf("the work directory holds %d entries afterwards: %v", len(ents), ents)
	}
	if left := benchPoolsLeft(t); len(left) > 0 {
		t.Errorf("bench pools left behind: %v", left)
	}
}
