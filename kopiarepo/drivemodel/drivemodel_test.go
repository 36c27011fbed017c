package drivemodel_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/blob/filesystem"
	"github.com/kopia/kopia/repo/object"

	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
)

const testPassword = "drive-model-test-password"

// fsStorage is a kopia filesystem storage in a temp dir.
func fsStorage(t testing.TB) blob.Storage {
	t.Helper()
	st, err := filesystem.New(context.Background(), &filesystem.Options{Path: filepath.Join(t.TempDir(), "repo")}, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(context.Background()) })
	return st
}

// bytesOut is a blob.OutputBuffer.
type bytesOut struct{ bytes.Buffer }

func (b *bytesOut) Length() int { return b.Len() }

func putRandom(t testing.TB, st blob.Storage, id blob.ID, n int) []byte {
	t.Helper()
	data := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(n), byte(n >> 8), byte(n >> 16)})
	r.Read(data)
	if err := st.PutBlob(context.Background(), id, bytesOf(data), blob.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	return data
}

// bytesOf is a blob.Bytes over one slice.
type sliceBytes []byte

func bytesOf(b []byte) blob.Bytes { return sliceBytes(b) }

func (s sliceBytes) WriteTo(w io.Writer) (int64, error) { n, err := w.Write(s); return int64(n), err }
func (s sliceBytes) Length() int                        { return len(s) }
func (s sliceBytes) Reader() io.ReadSeekCloser          { return nopCloser{bytes.NewReader(s)} }

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }

func TestPresets(t *testing.T) {
	for _, name := range []string{"none", "drive", "seed"} {
		p, err := drivemodel.Preset(name)
		if err != nil {
			t.Fatal(err)
		}
		if p.String() != name {
			t.Errorf("preset %s prints as %q", name, p.String())
		}
	}
	if _, err := drivemodel.Preset("gdrive"); err == nil {
		t.Error("unknown preset accepted")
	}
	d := drivemodel.MustPreset("drive")
	if d.Latency != 150*time.Millisecond || d.StreamBytesPerSecond != 20<<20 || d.TotalBytesPerSecond != 400<<20 || d.ErrorRate != 0.01 {
		t.Errorf("drive preset: %+v", d)
	}
	s := drivemodel.MustPreset("seed")
	if s.Latency != 1200*time.Millisecond || s.StreamBytesPerSecond != 6<<20 || s.TotalBytesPerSecond != 400<<20 {
		t.Errorf("seed preset: %+v", s)
	}
}

// TestSeedCalibration reads one 4 MiB blob, one kopia chunk, through the
// seed preset: one round trip per chunk runs near the seed's 2.3 MB/s.
func TestSeedCalibration(t *testing.T) {
	if testing.Short() {
		t.Skip("takes 2 s")
	}
	st := fsStorage(t)
	putRandom(t, st, "p1", 4<<20)
	m := drivemodel.Wrap(st, drivemodel.MustPreset("seed"))
	var out bytesOut
	start := time.Now()
	if err := m.GetBlob(context.Background(), "p1", 0, -1, &out); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	mbps := float64(out.Len()) / took.Seconds() / 1e6
	t.Logf("one 4 MiB chunk per round trip under the seed preset: %v, %.2f MB/s", took.Round(time.Millisecond), mbps)
	if mbps > 2.5 || (mbps < 2.0 && !raceEnabled) {
		t.Errorf("seed preset reads one 4 MiB chunk at %.2f MB/s, want about 2.3", mbps)
	}
}

func TestLatencyAndStreamBandwidth(t *testing.T) {
	st := fsStorage(t)
	want := putRandom(t, st, "p1", 2<<20)
	m := drivemodel.Wrap(st, drivemodel.Params{Latency: 50 * time.Millisecond, StreamBytesPerSecond: 20 << 20})
	ctx := context.Background()

	var out bytesOut
	start := time.Now()
	if err := m.GetBlob(ctx, "p1", 0, -1, &out); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if !bytes.Equal(out.Bytes(), want) {
		t.Fatal("GetBlob returned other bytes")
	}
	// 50 ms + 2 MiB / 20 MiB/s = 150 ms
	if took < 150*time.Millisecond || (took > 400*time.Millisecond && !raceEnabled) {
		t.Errorf("2 MiB at 50 ms + 20 MiB/s took %v, want ~150 ms", took)
	}

	// A range: latency + its own length only.
	out.Reset()
	start = time.Now()
	if err := m.GetBlob(ctx, "p1", 1<<20, 4096, &out); err != nil {
		t.Fatal(err)
	}
	took = time.Since(start)
	if !bytes.Equal(out.Bytes(), want[1<<20:1<<20+4096]) {
		t.Fatal("ranged GetBlob returned other bytes")
	}
	if took < 50*time.Millisecond || (took > 200*time.Millisecond && !raceEnabled) {
		t.Errorf("4 KiB range took %v, want ~50 ms", took)
	}

	s := m.Model().Stats()
	if s.Gets != 2 || s.Requests != 2 || s.BytesFetched != 2<<20+4096 {
		t.Errorf("counters: %+v", s)
	}
	m.Model().Reset()
	if s := m.Model().Stats(); s != (drivemodel.Stats{}) {
		t.Errorf("counters after Reset: %+v", s)
	}
}

func TestTotalBandwidthShared(t *testing.T) {
	st := fsStorage(t)
	for _, id := range []blob.ID{"a", "b", "c", "d"} {
		putRandom(t, st, id, 2<<20)
	}
	// Alone a stream moves 2 MiB in 50 ms; four together share 20 MiB/s:
	// 8 MiB take 400 ms.
	m := drivemodel.Wrap(st, drivemodel.Params{StreamBytesPerSecond: 40 << 20, TotalBytesPerSecond: 20 << 20})
	var wg sync.WaitGroup
	start := time.Now()
	for _, id := range []blob.ID{"a", "b", "c", "d"} {
		wg.Go(func() {
			var out bytesOut
			if err := m.GetBlob(context.Background(), id, 0, -1, &out); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	if took < 380*time.Millisecond || (took > 700*time.Millisecond && !raceEnabled) {
		t.Errorf("4 × 2 MiB over a 20 MiB/s shared link took %v, want ~400 ms", took)
	}
	if s := m.Model().Stats(); s.MaxConcurrentGets != 4 || s.BytesFetched != 8<<20 {
		t.Errorf("counters: %+v", s)
	}
}

// TestInjectedErrorsAreRetried: the injected 429/503 answers are retried
// by kopia's retrying wrapper, as a real backend's are; a missing blob is
// not retried.
func TestInjectedErrorsAreRetried(t *testing.T) {
	st := fsStorage(t)
	want := putRandom(t, st, "p1", 64<<10)
	m := drivemodel.Wrap(st, drivemodel.Params{ErrorRate: 0.3, Seed: 7})
	ctx := context.Background()
	const n = 40
	for range n {
		var out bytesOut
		if err := m.GetBlob(ctx, "p1", 0, -1, &out); err != nil {
			t.Fatalf("GetBlob with 30%% injected errors: %v", err)
		}
		if !bytes.Equal(out.Bytes(), want) {
			t.Fatal("GetBlob returned other bytes after retries")
		}
	}
	s := m.Model().Stats()
	t.Logf("%d reads at 30%% errors: %+v", n, s)
	if s.InjectedErrors == 0 || s.Gets != n+s.InjectedErrors || s.Requests != s.Gets {
		t.Errorf("counters: %+v", s)
	}

	m.Model().SetParams(drivemodel.Params{})
	m.Model().Reset()
	var out bytesOut
	if err := m.GetBlob(ctx, "missing", 0, -1, &out); !errors.Is(err, blob.ErrBlobNotFound) {
		t.Fatalf("missing blob: %v, want ErrBlobNotFound", err)
	}
	if s := m.Model().Stats(); s.Gets != 1 {
		t.Errorf("a missing blob was retried: %+v", s)
	}

	// An error the raw model returns is one kopia's retrying considers
	// retriable (anything it does not know to be permanent).
	var ie *drivemodel.InjectedError
	err := error(&drivemodel.InjectedError{StatusCode: 429})
	if !errors.As(err, &ie) || ie.Error() != "drive model: injected HTTP 429 Too Many Requests" {
		t.Errorf("InjectedError: %v", err)
	}
}

func TestCancelDuringLatency(t *testing.T) {
	st := fsStorage(t)
	putRandom(t, st, "p1", 1024)
	m := drivemodel.Wrap(st, drivemodel.Params{Latency: 10 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	var out bytesOut
	err := m.GetBlob(ctx, "p1", 0, -1, &out)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("GetBlob cancelled: %v", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("cancelled GetBlob returned after %v", took)
	}
}

// TestRepositoryThroughModel: a repository connected through Wrap, and one
// whose config WriteConfig points at the model, both open with repo.Open
// and read through the model, whose counters see the reads.
func TestRepositoryThroughModel(t *testing.T) {
	ctx := context.Background()
	st := fsStorage(t)
	if err := repo.Initialize(ctx, st, &repo.NewRepositoryOptions{}, testPassword); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	plainConfig := filepath.Join(dir, "plain.config")
	if err := repo.Connect(ctx, plainConfig, st, testPassword, &repo.ConnectOptions{}); err != nil {
		t.Fatal(err)
	}

	// Write an object through the plain connection.
	data := make([]byte, 3<<20)
	rand.NewChaCha8([32]byte{1}).Read(data)
	oid, err := writeObject(ctx, plainConfig, data)
	if err != nil {
		t.Fatal(err)
	}

	read := func(configFile string) {
		t.Helper()
		rep, err := repo.Open(ctx, configFile, testPassword, nil)
		if err != nil {
			t.Fatalf("open %s: %v", configFile, err)
		}
		defer rep.Close(ctx)
		if ty := rep.(repo.DirectRepository).BlobReader().ConnectionInfo().Type; ty != drivemodel.TypeName {
			t.Errorf("%s opens storage type %q, want %q", configFile, ty, drivemodel.TypeName)
		}
		r, err := rep.OpenObject(ctx, oid)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatal("read other bytes through the model")
		}
	}

	// 1. WriteConfig with a shared, named model.
	model := drivemodel.Shared(t.Name())
	modelConfig := filepath.Join(dir, "model.config")
	if err := drivemodel.WriteConfig(plainConfig, modelConfig, drivemodel.ConfigOptions{
		Params:     &drivemodel.Params{Latency: 5 * time.Millisecond, ErrorRate: 0.05, Seed: 3},
		KeepParams: false,
		Model:      t.Name(), CacheDirectory: filepath.Join(dir, "cold-cache"),
	}); err != nil {
		t.Fatal(err)
	}
	read(modelConfig)
	s := model.Stats()
	t.Logf("open + read of 3 MiB through the model: %+v", s)
	if s.Gets == 0 || s.BytesFetched < int64(len(data)) {
		t.Errorf("the shared model did not see the reads: %+v", s)
	}
	if model.Params().Latency != 5*time.Millisecond {
		t.Errorf("model params %+v", model.Params())
	}

	// 2. Connect through Wrap: the config written records the model.
	wrapConfig := filepath.Join(dir, "wrap.config")
	if err := repo.Connect(ctx, wrapConfig, drivemodel.Wrap(st, drivemodel.MustPreset("none")), testPassword, &repo.ConnectOptions{}); err != nil {
		t.Fatal(err)
	}
	read(wrapConfig)

	// An unknown preset is refused when writing the config.
	if err := drivemodel.WriteConfig(plainConfig, filepath.Join(dir, "bad.config"), drivemodel.ConfigOptions{Preset: "nope"}); err == nil {
		t.Error("WriteConfig accepted an unknown preset")
	}
}

// TestOutagesFollowTheirSchedule: requests that begin in the first
// OutageFor of every OutageEvery are answered 503, the others served.
func TestOutagesFollowTheirSchedule(t *testing.T) {
	st := fsStorage(t)
	want := putRandom(t, st, "p1", 4<<10)
	// Wrap retries; the raw answers are seen through the counters.
	m := drivemodel.Wrap(st, drivemodel.Params{OutageEvery: 400 * time.Millisecond, OutageFor: 200 * time.Millisecond})
	ctx := context.Background()
	start := time.Now()
	var out bytesOut
	if err := m.GetBlob(ctx, "p1", 0, -1, &out); err != nil || !bytes.Equal(out.Bytes(), want) {
		t.Fatalf("GetBlob through an outage: %v", err)
	}
	// The first attempt fell into the outage: it was answered only once
	// the outage was over, after retries.
	if took, s := time.Since(start), m.Model().Stats(); took < 150*time.Millisecond || s.InjectedErrors == 0 {
		t.Errorf("read in %v with %d injected errors: want it to wait out the 200 ms outage", took, s.InjectedErrors)
	}
	if p := m.Model().Params(); !strings.Contains(p.String(), "away 200ms of every 400ms") {
		t.Errorf("String() = %q", p.String())
	}
}

// writeObject writes data as one object (FIXED-1M) through the connection
// configFile, in a write session of its own.
func writeObject(ctx context.Context, configFile string, data []byte) (object.ID, error) {
	rep, err := repo.Open(ctx, configFile, testPassword, nil)
	if err != nil {
		return object.EmptyID, err
	}
	defer rep.Close(ctx)
	var oid object.ID
	err = repo.WriteSession(ctx, rep, repo.WriteSessionOptions{Purpose: "test"}, func(ctx context.Context, w repo.RepositoryWriter) error {
		ow := w.NewObjectWriter(ctx, object.WriterOptions{Splitter: "FIXED-1M"})
		defer ow.Close()
		if _, err := ow.Write(data); err != nil {
			return err
		}
		oid, err = ow.Result()
		return err
	})
	return oid, err
}
