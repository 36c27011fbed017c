package restore_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
)

// TestKopiaRestoreAcrossStoreOutages restores a file from a kopia store
// that answers 503 to every request for 3 s out of every 6 s (the drive
// model's outages) and is slow enough that the restore spans several of
// them: it finishes byte-identical.
func TestKopiaRestoreAcrossStoreOutages(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	cfg, want := uploadResumeImage(t, dir, "FIXED-1M")

	flapping := drivemodel.Params{Latency: 20 * time.Millisecond, StreamBytesPerSecond: 2 << 20, TotalBytesPerSecond: 6 << 20,
		OutageEvery: 6 * time.Second, OutageFor: 3 * time.Second}
	flapCfg := filepath.Join(dir, "flapping.config")
	if err := drivemodel.WriteConfig(cfg, flapCfg, drivemodel.ConfigOptions{Params: &flapping, Model: "restore-outages",
		CacheDirectory: filepath.Join(dir, "flap-cache")}); err != nil {
		t.Fatal(err)
	}
	model := drivemodel.Shared("restore-outages")
	dest := filepath.Join(dir, "out.img")
	start := time.Now()
	res, err := runResumeJob(ctx, resumeJob{Config: flapCfg, Model: "restore-outages", Password: tlPassword, Dest: dest}, nil)
	took := time.Since(start)
	st := model.Stats()
	t.Logf("restored in %v through %v: %d requests, %d answered 503", took.Round(time.Millisecond), model.Params(), st.Requests, st.InjectedErrors)
	if err != nil {
		t.Fatalf("restore across outages: %v", err)
	}
	if got := fileSHA(t, dest); got != want || res.SHA256 != want {
		t.Fatalf("restored sha256 %s (result %s), want %s", got, res.SHA256, want)
	}
	if took < 9*time.Second || st.InjectedErrors == 0 {
		t.Errorf("the restore took %v with %d 503 answers: want it to span at least two outages", took, st.InjectedErrors)
	}
}
