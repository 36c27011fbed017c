package restore

import (
	"sync"
	"time"
)

// Phases of a copy, as Progress reports them.
const (
	PhaseRestore = "restore" // fetching ranges from the source
	PhaseVerify  = "verify"  // comparing the result with a second source
)

// Progress is a copy's state, handed to CopyOptions.Progress a few times a
// second and once when a phase ends.
type Progress struct {
	Phase string `json:"phase"`
	// Done counts the file's bytes finished, including those an earlier,
	// interrupted run restored (Resumed); Total is the file's size.
	Done    int64 `json:"done"`
	Total   int64 `json:"total"`
	Resumed int64 `json:"resumed"`
	// Rate is bytes per second over the last few seconds, of this run's
	// work only; ETA the time left at that rate, or -1 while unknown.
	Rate    float64       `json:"rate"`
	ETA     time.Duration `json:"eta"`
	Elapsed time.Duration `json:"elapsed"`
}

// rateWindow is how far back Rate looks.
const rateWindow = 5 * time.Second

// meter turns a growing byte count into a rate over a sliding window.
type meter struct {
	mu      sync.Mutex
	start   time.Time
	samples []sample
}

type sample struct {
	at    time.Time
	bytes int64
}

func newMeter(now time.Time) *meter {
	return &meter{start: now, samples: []sample{{now, 0}}}
}

// observe records that bytes have been done by now and returns the rate
// over the window (over the whole run while it is younger than a second).
func (m *meter) observe(now time.Time, bytes int64) float64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.samples = append(m.samples, sample{now, bytes})
	// Drop samples older than the window, keeping one at or before its
	// start as the base.
	cut := 0
	for cut+1 < len(m.samples) && now.Sub(m.samples[cut+1].at) >= rateWindow {
		cut++
	}
	m.samples = m.samples[cut:]
	base := m.samples[0]
	if now.Sub(m.start) < time.Second {
		base = sample{m.start, 0}
	}
	dt := now.Sub(base.at).Seconds()
	if dt <= 0 {
		return 0
	}
	return float64(bytes-base.bytes) / dt
}

// eta is the time the remaining bytes take at rate, or -1 when unknown.
func eta(remaining int64, rate float64) time.Duration {
	if remaining <= 0 {
		return 0
	}
	if rate <= 0 {
		return -1
	}
	return time.Duration(float64(remaining) / rate * float64(time.Second)).Round(time.Second)
}

// reporter calls fn every interval with what state returns, from one
// goroutine, until stop, which makes one last call.
type reporter struct {
	stopCh chan struct{}
	wg     sync.WaitGroup
	final  func()
}

func startReporter(fn func(Progress), interval time.Duration, state func() Progress) *reporter {
	r := &reporter{stopCh: make(chan struct{})}
	if fn == nil {
		r.final = func() {}
		return r
	}
	r.final = func() { fn(state()) }
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-r.stopCh:
				return
			case <-t.C:
				fn(state())
			}
		}
	}()
	return r
}

// stop ends the reports; with last, one final report is made after the
// ticker stopped, so the callback is never called concurrently.
func (r *reporter) stop(last bool) {
	close(r.stopCh)
	r.wg.Wait()
	if last {
		r.final()
	}
}
