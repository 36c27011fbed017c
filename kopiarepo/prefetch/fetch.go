package prefetch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/compression"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/object"
)

// fetchWithRetry takes what seeds supply of a unit's chunks, fetches the
// rest of its own (fetchOwnWithRetry), then takes the chunks it shares
// with the units it depends on. A far unit first fetches what no seed
// offers and waits to be near before it reads its seeds (see unit.near).
func (r *Reader) fetchWithRetry(ctx context.Context, u *unit) ([][]byte, error) {
	if r.seedable() {
		if u.near != nil {
			r.farPhase(ctx, u)
			select {
			case <-u.near:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		r.seedUnit(ctx, u)
	}
	data, err := r.fetchOwnWithRetry(ctx, u, nil)
	if err == nil && u.deps != nil {
		err = r.takeDeps(ctx, u, data)
	}
	return data, err
}

// fetchOwnWithRetry fetches the chunks a unit fetches itself (those of
// only, when not nil), retrying errors kopia's storage layer gave up on
// (see the package doc), and falls back to kopia's object reader when
// pack reads keep failing.
func (r *Reader) fetchOwnWithRetry(ctx context.Context, u *unit, only []bool) ([][]byte, error) {
	backoff := r.opts.RetryBackoff
	var err error
	for attempt := 0; ; attempt++ {
		var data [][]byte
		data, err = r.fetch(ctx, u, only)
		if err == nil {
			return data, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if !retriable(err) || attempt >= r.opts.Retries {
			break
		}
		r.count(func(s *Stats) { s.Retries++ })
		if err := sleep(ctx, backoff); err != nil {
			return nil, err
		}
		backoff *= 2
	}
	// kopia's object reader may succeed where the pack read failed: it
	// knows packs still being written and refreshes its indexes when a
	// pack was rewritten by maintenance.
	if r.mode == ModePackRanges {
		r.count(func(s *Stats) { s.Fallbacks++ })
		data, ferr := r.fetchObjects(ctx, u, only)
		if ferr == nil {
			return data, nil
		}
		err = fmt.Errorf("%w (and through kopia's object reader: %w)", err, ferr)
	}
	return nil, err
}

func (r *Reader) count(f func(*Stats)) {
	r.mu.Lock()
	f(&r.stats)
	r.mu.Unlock()
}

// retriable reports whether another attempt may succeed.
func retriable(err error) bool {
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return false
	case isNotFound(err),
		errors.Is(err, blob.ErrInvalidRange),
		errors.Is(err, blob.ErrInvalidCredentials),
		errors.Is(err, errUnsupportedContent):
		return false
	default:
		// Throttling, server and network errors; also a content that
		// failed verification, which a damaged transfer can cause.
		return true
	}
}

func isNotFound(err error) bool {
	return errors.Is(err, blob.ErrBlobNotFound) ||
		errors.Is(err, object.ErrObjectNotFound) ||
		errors.Is(err, content.ErrContentNotFound)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// fetch fetches the chunks of u that it neither holds nor takes from
// another unit (of those, the ones only marks, when not nil).
func (r *Reader) fetch(ctx context.Context, u *unit, only []bool) ([][]byte, error) {
	switch r.mode {
	case ModePackRanges:
		return r.fetchPackRange(ctx, u, only)
	case ModeKopiaPrefetch:
		if u.last > u.first {
			cids := make([]content.ID, 0, u.last-u.first+1)
			for i := u.first; i <= u.last; i++ {
				if u.held(i-u.first) || (only != nil && !only[i-u.first]) {
					continue
				}
				if cid, _, ok := r.chunks[i].oid.ContentID(); ok {
					cids = append(cids, cid)
				}
			}
			r.rep.PrefetchContents(ctx, cids, r.opts.PrefetchHint)
		}
		return r.fetchObjects(ctx, u, only)
	default:
		return r.fetchObjects(ctx, u, only)
	}
}

// rangeBuffer is a blob.OutputBuffer over a byte slice.
type rangeBuffer struct{ b []byte }

func (b *rangeBuffer) Write(p []byte) (int, error) { b.b = append(b.b, p...); return len(p), nil }
func (b *rangeBuffer) Reset()                      { b.b = b.b[:0] }
func (b *rangeBuffer) Length() int                 { return len(b.b) }

// ReadFrom reads r straight into the buffer's spare capacity (kopia's
// storages copy a blob with io.Copy, which uses it: the bytes read from a
// pack file or an HTTP body land in place instead of passing through a
// 64 KiB buffer, one copy of every byte less).
func (b *rangeBuffer) ReadFrom(r io.Reader) (int64, error) {
	var total int64
	var probe [1]byte
	for empty := 0; ; {
		if len(b.b) == cap(b.b) {
			// Full, as it is once the range is in: only grow (and move)
			// the buffer if the reader has more.
			n, err := r.Read(probe[:])
			if n == 0 && (err == nil || errors.Is(err, io.EOF)) {
				if err == nil {
					if empty++; empty > 100 {
						return total, io.ErrNoProgress
					}
					continue
				}
				return total, nil
			}
			if err != nil && !errors.Is(err, io.EOF) {
				return total, err
			}
			b.b = append(slices.Grow(b.b, max(64<<10, cap(b.b)/4)), probe[0])
			total++
			if err != nil {
				return total, nil
			}
		}
		n, err := r.Read(b.b[len(b.b):cap(b.b)])
		b.b = b.b[:len(b.b)+n]
		total += int64(n)
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// fetchPackRange reads the unit's chunks with ranged reads of their pack
// blobs (one per segment, see packRanges, concurrently) and decodes and
// verifies each. Chunks the unit already holds or takes from another
// (u.pre, u.deps) are skipped, and so are those only does not mark, when
// not nil; a content that appears twice is decoded once.
func (r *Reader) fetchPackRange(ctx context.Context, u *unit, only []bool) ([][]byte, error) {
	n := u.last - u.first + 1
	out := make([][]byte, n)
	locs := make([]loc, n)
	segOf := make([]int, n)
	need := make([]int, 0, n)
	for i := range n {
		if u.held(i) {
			out[i] = u.heldData(i)
			continue
		}
		if only != nil && !only[i] {
			continue
		}
		lc, ok := r.loc.get(ctx, u.first+i)
		if !ok {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			cid, _, _ := r.chunks[u.first+i].oid.ContentID()
			return nil, fmt.Errorf("%w: no index entry for content %v", errUnsupportedContent, cid)
		}
		locs[i] = lc
		need = append(need, i)
	}
	if len(need) == 0 {
		return out, nil
	}
	// Place the contents as the planner did, so that the reads match its
	// segments: the same order, the same limits.
	ranges := packRanges{maxSpan: max(r.opts.GroupBytes, 1), maxGap: r.opts.MaxGap}
	for _, i := range need {
		segOf[i] = ranges.add(locs[i])
	}
	packed := make([][]byte, len(ranges.segs))
	err := concurrently(ctx, len(ranges.segs), func(ctx context.Context, k int) error {
		sg := ranges.segs[k]
		i := need[slices.IndexFunc(need, func(i int) bool { return segOf[i] == k })]
		packID := r.loc.info(u.first+i, locs[i]).PackBlobID
		length := sg.end - sg.start
		r.count(func(s *Stats) { s.BytesRequested += length; s.Requests++ })
		b, err := r.getRange(ctx, packID, sg.start, length, r.stripeOf(u))
		packed[k] = b
		return err
	})
	if err != nil {
		return nil, err
	}
	decoded := map[[2]uint32][]byte{} // content data by pack and offset
	for _, i := range need {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		ch, lc := r.chunks[u.first+i], locs[i]
		key := [2]uint32{uint32(lc.pack), lc.off} //nolint:gosec
		data, ok := decoded[key]
		if !ok {
			sg := ranges.segs[segOf[i]]
			rel := int64(lc.off) - sg.start
			var err error
			if data, err = r.codec.decode(packed[segOf[i]][rel:rel+int64(lc.plen)], r.loc.info(u.first+i, lc)); err != nil {
				return nil, err
			}
			decoded[key] = data
		}
		if _, compressed, _ := ch.oid.ContentID(); compressed {
			var dec bytes.Buffer
			if err := compression.DecompressByHeader(&dec, bytes.NewReader(data)); err != nil {
				return nil, &CorruptError{Content: ch.oid.String(), Err: err}
			}
			data = dec.Bytes()
		}
		if int64(len(data)) != ch.length {
			return nil, &CorruptError{Content: ch.oid.String(), Err: fmt.Errorf("%d bytes, the chunk table says %d", len(data), ch.length)}
		}
		out[i] = data
	}
	return out, nil
}

// getRange reads length bytes at offset start of a pack blob: with one
// request, or, with a positive stripe (see Reader.stripeOf), with several
// concurrent ranged requests, one per stripe, that are put back together.
func (r *Reader) getRange(ctx context.Context, packID blob.ID, start, length, stripe int64) ([]byte, error) {
	out := make([]byte, length)
	if stripe <= 0 || length <= stripe {
		stripe = length
	}
	stripes := int(max((length+stripe-1)/stripe, 1))
	err := concurrently(ctx, stripes, func(ctx context.Context, k int) error {
		off := int64(k) * stripe
		n := min(stripe, length-off)
		buf := rangeBuffer{b: out[off : off : off+n]}
		err := r.blobs.GetBlob(ctx, packID, start+off, n, &buf)
		switch {
		case err != nil:
		case int64(len(buf.b)) != n:
			err = fmt.Errorf("got %d bytes", len(buf.b))
		case n > 0 && &buf.b[0] != &out[off]: // the storage reallocated
			copy(out[off:off+n], buf.b)
		}
		if err != nil {
			return fmt.Errorf("read %d bytes at %d of pack %v: %w", n, start+off, packID, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// concurrently runs do(ctx, 0..n-1) at once, the last on the calling
// goroutine, and returns the first error, which cancels the others' ctx.
func concurrently(ctx context.Context, n int, do func(ctx context.Context, k int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	run := func(k int) {
		if err := do(ctx, k); err != nil {
			once.Do(func() { first = err; cancel() })
		}
	}
	for k := range n {
		if k < n-1 {
			wg.Go(func() { run(k) })
		} else {
			run(k)
		}
	}
	wg.Wait()
	return first
}

// fetchObjects reads the unit's chunks (those of only, when not nil)
// through kopia's object reader, one after the other (kopia verifies each
// content as it reads it).
func (r *Reader) fetchObjects(ctx context.Context, u *unit, only []bool) ([][]byte, error) {
	out := make([][]byte, u.last-u.first+1)
	for i := range out {
		if u.held(i) {
			out[i] = u.heldData(i)
			continue
		}
		if only != nil && !only[i] {
			continue
		}
		data, err := readObject(ctx, r, r.chunks[u.first+i])
		if err != nil {
			return nil, err
		}
		out[i] = data
	}
	return out, nil
}

func readObject(ctx context.Context, r *Reader, ch chunk) ([]byte, error) {
	if r.mode != ModePackRanges {
		r.count(func(s *Stats) { s.BytesRequested += ch.length })
	}
	or, err := r.rep.OpenObject(ctx, ch.oid)
	if err != nil {
		return nil, fmt.Errorf("open chunk %v: %w", ch.oid, err)
	}
	defer or.Close() //nolint:errcheck
	if or.Length() != ch.length {
		return nil, &CorruptError{Content: ch.oid.String(), Err: fmt.Errorf("%d bytes, the chunk table says %d", or.Length(), ch.length)}
	}
	data := make([]byte, ch.length)
	if _, err := io.ReadFull(or, data); err != nil {
		return nil, fmt.Errorf("read chunk %v: %w", ch.oid, err)
	}
	return data, nil
}
