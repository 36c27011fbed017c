package bench

import (
	"context"
	"strings"
	"testing"
)

// The seeded restore bench on a small disk: both restores give night 1's
// bytes (RestoreSeeded checks each SHA-256), the seeded one takes most of
// the file from the local nights and fetches from the store at most 1.5×
// the chunks that changed, far less than the unseeded one; the floor, the
// newest night restored from the pool, fetches no chunk from the store.
func TestRestoreSeededSmall(t *testing.T) {
	const size = 32 << 20
	tab, err := RestoreSeeded(context.Background(), RestoreOptions{Size: size, Presets: []string{"none"}, Repeat: 1, WorkDir: t.TempDir()},
		SeededOptions{Churn: 0.02})
	if err != nil {
		t.Fatal(err)
	}
	var text strings.Builder
	tab.WriteText(&text)
	t.Logf("\n%s", text.String())
	if len(tab.Rows) != 3 {
		t.Fatalf("%d rows, want 3", len(tab.Rows))
	}
	plain, seeded, floor := tab.Rows[0], tab.Rows[1], tab.Rows[2]
	if !strings.HasPrefix(plain[1].Text, "unseeded") || seeded[1].Text != "seeded" || !strings.HasPrefix(floor[1].Text, "local") {
		t.Fatalf("rows %q, %q, %q: want unseeded, seeded, local", plain[1].Text, seeded[1].Text, floor[1].Text)
	}
	// The session's open reads manifests and indexes, not a chunk.
	if f := cell(t, tab, floor, "store MiB").(float64); f > 1 {
		t.Errorf("the restore from the pool fetched %.1f MiB from the store", f)
	}
	// The generated disk's zero and text blocks are stored once: the
	// unseeded restore fetches less than the file, but all its data.
	if p, s := cell(t, tab, plain, "store MiB").(float64), cell(t, tab, seeded, "store MiB").(float64); p < 2*s {
		t.Errorf("the unseeded restore fetched %.1f MiB, the seeded one %.1f MiB: want at least twice as much", p, s)
	}
	if r := cell(t, tab, seeded, "store / changed chunks").(float64); r > 1.5 {
		t.Errorf("the seeded restore fetched %.2f× the changed chunks, more than 1.5×", r)
	}
	if mib := cell(t, tab, seeded, "seeded MiB").(float64); mib < size/(1<<20)/2 {
		t.Errorf("seeded %.1f MiB of %d MiB", mib, size>>20)
	}
	if _, ok := cell(t, tab, seeded, "speed-up").(float64); !ok {
		t.Errorf("no speed-up in %v", seeded)
	}
}
