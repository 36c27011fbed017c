package prefetch_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kopia/kopia/repo/object"

	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/kopiarepo/prefetch"
)

// The restore benchmark: the same file, read as kopia reads it (fresh
// connection, cold cache, repo.OpenObject, io.CopyBuffer with 1 MiB) and
// with the prefetching Reader (fresh connection, cold cache), through the
// drive model's presets. Each op is one whole read of the file; the
// connection is opened (with the model off) outside the timed part.
//
//	go test -run '^$' -bench BenchmarkRestore -benchtime 1x ./kopiarepo/prefetch/
//
// VMHISTORY_BENCH_MIB sets the file size (default 128); under the seed
// preset a kopia-style read of it takes about a minute.
// VMHISTORY_BENCH_SLOW=1 adds the cases that take minutes (kopia-style
// FIXED-128K, one round trip per 128 KiB; ungrouped FIXED-128K under seed).

type benchFixture struct {
	tr   *testRepo
	size int64
	oids map[string]object.ID
}

var (
	benchOnce sync.Once
	theBench  *benchFixture
)

func getBenchFixture(b *testing.B) *benchFixture {
	benchOnce.Do(func() {
		mib := 128
		if v, err := strconv.Atoi(os.Getenv("VMHISTORY_BENCH_MIB")); err == nil && v > 0 {
			mib = v
		}
		dir, err := os.MkdirTemp("", "prefetch-bench-")
		if err != nil {
			b.Fatal(err)
		}
		if fixtureDir == "" {
			fixtureDir = dir // removed by TestMain
		} else {
			b.Cleanup(func() { os.RemoveAll(dir) })
		}
		tb := fixtureTB{TB: b, dir: dir}
		f := &benchFixture{tr: newTestRepo(tb), size: int64(mib) << 20, oids: map[string]object.ID{}}
		// Incompressible, never repeating: every byte costs its transfer.
		data := randomData(mib<<20, 42)
		for _, s := range []string{dynamic, fixed128K} {
			f.oids[s] = f.tr.write(tb, data, s, "")
		}
		theBench = f
	})
	if theBench == nil {
		b.Fatal("bench fixture failed")
	}
	return theBench
}

type benchCase struct {
	name     string
	splitter string
	kopia    bool // kopia-style read
	opts     prefetch.Options
	presets  []string
	slow     bool
}

type benchResult struct {
	preset, name string
	mbps         float64
	requests     float64
	fetched      float64 // bytes fetched / file size
	chunks       int
}

func BenchmarkRestore(b *testing.B) {
	f := getBenchFixture(b)
	all := []string{"none", "drive", "seed"}
	remote := []string{"drive", "seed"}
	cases := []benchCase{
		{name: "kopia-style/" + dynamic, splitter: dynamic, kopia: true, presets: all},
		{name: "kopia-style/" + fixed128K, splitter: fixed128K, kopia: true, presets: []string{"none"}},
		{name: "kopia-style/" + fixed128K, splitter: fixed128K, kopia: true, presets: remote, slow: true},
		{name: "prefetch-w16/" + dynamic, splitter: dynamic, presets: all},
		{name: "prefetch-w16/" + fixed128K, splitter: fixed128K, presets: all},
		{name: "prefetch-w32/" + dynamic, splitter: dynamic, opts: prefetch.Options{Window: 32}, presets: remote},
		{name: "prefetch-w32/" + fixed128K, splitter: fixed128K, opts: prefetch.Options{Window: 32}, presets: remote},
		{name: "prefetch-w16-stripe2M/" + dynamic, splitter: dynamic, opts: prefetch.Options{StripeBytes: 2 << 20}, presets: remote},
		{name: "prefetch-w16-stripe2M/" + fixed128K, splitter: fixed128K, opts: prefetch.Options{StripeBytes: 2 << 20}, presets: remote},
		{name: "prefetch-w16-nogroup/" + fixed128K, splitter: fixed128K, opts: prefetch.Options{GroupBytes: -1}, presets: []string{"drive"}},
		{name: "prefetch-w16-nogroup/" + fixed128K, splitter: fixed128K, opts: prefetch.Options{GroupBytes: -1}, presets: []string{"seed"}, slow: true},
		{name: "kopia-prefetch-blobs-w16/" + fixed128K, splitter: fixed128K, opts: prefetch.Options{Mode: prefetch.ModeKopiaPrefetch, PrefetchHint: "blobs"}, presets: remote},
		{name: "kopia-prefetch-default-w16/" + fixed128K, splitter: fixed128K, opts: prefetch.Options{Mode: prefetch.ModeKopiaPrefetch, PrefetchHint: "default"}, presets: []string{"drive"}},
	}
	slow := os.Getenv("VMHISTORY_BENCH_SLOW") == "1"
	var (
		mu      sync.Mutex
		results = map[string]benchResult{} // the last run of each case
		order   []string
	)
	for _, preset := range all {
		for _, c := range cases {
			if !contains(c.presets, preset) || (c.slow && !slow) {
				continue
			}
			b.Run(preset+"/"+c.name, func(b *testing.B) {
				res := runRestoreCase(b, f, drivemodel.MustPreset(preset), c)
				res.preset, res.name = preset, c.name
				mu.Lock()
				key := preset + "/" + c.name
				if _, ok := results[key]; !ok {
					order = append(order, key)
				}
				results[key] = res
				mu.Unlock()
			})
		}
	}
	if len(results) > 0 {
		list := make([]benchResult, 0, len(order))
		for _, k := range order {
			list = append(list, results[k])
		}
		fmt.Print(restoreTable(f.size, list))
	}
}

func runRestoreCase(b *testing.B, f *benchFixture, p drivemodel.Params, c benchCase) benchResult {
	ctx := context.Background()
	oid := f.oids[c.splitter]
	var (
		elapsed        time.Duration
		gets, fetched  int64
		chunks         int
		nops           int
		loggedPrefetch bool
	)
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		rep, model, closeRepo := f.tr.openFresh(b) // fresh connection, cold kopia cache
		model.SetParams(p)
		model.Reset()
		b.StartTimer()

		start := time.Now()
		var n int64
		var err error
		if c.kopia {
			n, err = prefetch.CopyKopiaStyle(ctx, rep, oid, io.Discard)
		} else {
			var r *prefetch.Reader
			if r, err = prefetch.Open(ctx, rep, oid, c.opts); err == nil {
				n, err = io.Copy(io.Discard, r)
				s := r.Stats()
				chunks = s.Chunks
				if !loggedPrefetch {
					b.Logf("reader: %+v", s)
					loggedPrefetch = true
				}
				r.Close()
			}
		}
		took := time.Since(start)

		b.StopTimer()
		if err != nil || n != f.size {
			b.Fatalf("read %d of %d bytes: %v", n, f.size, err)
		}
		ms := model.Stats()
		elapsed += took
		gets += ms.Gets
		fetched += ms.BytesFetched
		nops++
		model.SetParams(drivemodel.Params{})
		closeRepo()
		b.StartTimer()
	}
	res := benchResult{
		mbps:     float64(f.size) * float64(nops) / elapsed.Seconds() / 1e6,
		requests: float64(gets) / float64(nops),
		fetched:  float64(fetched) / float64(nops) / float64(f.size),
		chunks:   chunks,
	}
	b.ReportMetric(res.mbps, "MB/s")
	b.ReportMetric(res.requests, "blob-requests/op")
	b.ReportMetric(res.fetched, "fetched/size")
	return res
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// restoreTable prints the results with the speed-up over the kopia-style
// DYNAMIC-4M-BUZHASH read under the same preset, and FIXED-128K's
// throughput relative to DYNAMIC's for the same reader.
func restoreTable(size int64, results []benchResult) string {
	base := map[string]float64{}
	byName := map[string]float64{}
	for _, r := range results {
		byName[r.preset+"/"+r.name] = r.mbps
		if r.name == "kopia-style/"+dynamic {
			base[r.preset] = r.mbps
		}
	}
	order := map[string]int{"seed": 0, "drive": 1, "none": 2}
	sort.SliceStable(results, func(i, j int) bool { return order[results[i].preset] < order[results[j].preset] })
	var sb strings.Builder
	fmt.Fprintf(&sb, "restore of a %d MiB file (fresh connection, cold cache)\n", size>>20)
	fmt.Fprintf(&sb, "%-6s %-44s %9s %9s %11s %9s %s\n", "preset", "reader/splitter", "MB/s", "speed-up", "blob reqs", "fetched", "FIXED/DYN")
	for _, r := range results {
		speedup := "-"
		if b := base[r.preset]; b > 0 {
			speedup = fmt.Sprintf("%.1f×", r.mbps/b)
		}
		rel := ""
		if strings.HasSuffix(r.name, "/"+fixed128K) {
			if d := byName[r.preset+"/"+strings.TrimSuffix(r.name, fixed128K)+dynamic]; d > 0 {
				rel = fmt.Sprintf("%.0f%%", r.mbps/d*100)
			}
		}
		fmt.Fprintf(&sb, "%-6s %-44s %9.1f %9s %11.0f %8.2f× %s\n", r.preset, r.name, r.mbps, speedup, r.requests, r.fetched, rel)
	}
	return sb.String()
}
