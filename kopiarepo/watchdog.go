package kopiarepo

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/format"
)

// DefaultUnreachableTimeout is how long a repository's storage may fail
// every request before an operation on it is abandoned.
//
// kopia's library does not give up on an unreachable storage by itself:
// its index refresh (internal/epoch Manager.refreshLocked) retries forever
// unless its context is cancelled, so Open, an upload or a listing would
// hang for as long as a WebDAV server or Google Drive is away. Each blob
// request is also retried with backoff, nested twice for WebDAV (10 x 10
// attempts, about 2 minutes per request). A nightly job has to end and
// report instead; the next night catches up.
const DefaultUnreachableTimeout = 5 * time.Minute

// ErrUnreachable is matched (errors.Is) by the error of an operation
// abandoned because the repository's storage stopped answering.
var ErrUnreachable = errors.New("kopia repository unreachable")

// UnreachableError is the error of an operation abandoned because the
// repository's storage failed every probe for longer than the timeout.
type UnreachableError struct {
	// Storage describes the repository's storage.
	Storage string
	// For is how long it failed every probe.
	For time.Duration
	// Err is the last probe's error.
	Err error
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("kopia repository %s has been unreachable for %v: %v", e.Storage, e.For.Round(time.Second), e.Err)
}

// Unwrap makes the error match ErrUnreachable and the probe's error.
func (e *UnreachableError) Unwrap() []error { return []error{ErrUnreachable, e.Err} }

// OpenOption changes how Open opens a repository.
type OpenOption func(*openOptions)

type openOptions struct {
	unreachableTimeout time.Duration
	requests           *RequestLog
	cachedIndexList    bool
}

// WithUnreachableTimeout sets how long the storage may fail every request
// before an operation is abandoned with an *UnreachableError
// (DefaultUnreachableTimeout when not given; 0 or less never gives up,
// which is the kopia library's own behaviour).
func WithUnreachableTimeout(d time.Duration) OpenOption {
	return func(o *openOptions) { o.unreachableTimeout = d }
}

// guarded runs fn under r.guard and returns its value.
func guarded[T any](ctx context.Context, r *Repo, fn func(context.Context) (T, error)) (T, error) {
	var v T
	err := r.guard(ctx, func(ctx context.Context) error {
		var err error
		v, err = fn(ctx)
		return err
	})
	return v, err
}

// probeBlob reports whether a storage answers: a metadata request for the
// repository's format blob. "Not found" is an answer too.
func probeBlob(st blob.Reader) func(context.Context) error {
	return func(ctx context.Context) error {
		_, err := st.GetMetadata(ctx, format.KopiaRepositoryBlobID)
		if err == nil || errors.Is(err, blob.ErrBlobNotFound) {
			return nil
		}
		return err
	}
}

// guard runs fn with a context that is cancelled, with an *UnreachableError
// as its cause, once probe has failed continuously for timeout. Probes run
// only while fn runs, every quarter of the timeout (at most every 10 s),
// so a short operation never probes. With timeout <= 0 or no probe, fn
// runs unguarded.
func guard(ctx context.Context, storage string, timeout time.Duration, probe func(context.Context) error, fn func(context.Context) error) error {
	if timeout <= 0 || probe == nil {
		return fn(ctx)
	}
	gctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		watch(gctx, stop, storage, timeout, probe, cancel)
	}()
	err := fn(gctx)
	close(stop)
	wg.Wait()
	if err == nil {
		return nil
	}
	var ue *UnreachableError
	if cause := context.Cause(gctx); errors.As(cause, &ue) {
		return ue
	}
	return err
}

// probeDeadline bounds one probe. It is longer than kopia's own retries of
// one request (10 attempts with backoff, about 11 s), so that a probe
// reports the storage's error ("connection refused") rather than its own
// deadline.
const probeDeadline = 20 * time.Second

func watch(ctx context.Context, stop <-chan struct{}, storage string, timeout time.Duration, probe func(context.Context) error, cancel context.CancelCauseFunc) {
	interval := min(10*time.Second, max(timeout/4, 50*time.Millisecond))
	t := time.NewTicker(interval)
	defer t.Stop()
	var failingSince time.Time
	for {
		select {
		case <-stop:
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start := time.Now()
		err := probeWithin(probe, probeDeadline)
		if err == nil {
			failingSince = time.Time{}
			continue
		}
		if failingSince.IsZero() {
			failingSince = start
		}
		if d := time.Since(failingSince); d >= timeout {
			cancel(&UnreachableError{Storage: storage, For: d, Err: err})
			return
		}
	}
}

// probeWithin runs probe with a deadline and waits no longer than that: a
// storage client without a timeout of its own (kopia's WebDAV client has
// none) may not return at all, and then leaves its goroutine behind.
func probeWithin(probe func(context.Context) error, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- probe(ctx) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("no answer within %v", d)
	}
}
