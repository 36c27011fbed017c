package restore

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"time"
)

// EntrySource is one source's copy of a timeline entry.
type EntrySource struct {
	// Source holds the snapshot; Open it with Snapshot.
	Source Source
	// Snapshot is the snapshot as Source lists it.
	Snapshot SourceSnapshot
}

// MarshalJSON renders the source by name and kind.
func (es EntrySource) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Source string `json:"source"`
		Kind   string `json:"kind"`
		ID     string `json:"id"`
		Size   int64  `json:"size"`
	}{es.Source.Name(), es.Source.Kind().String(), es.Snapshot.ID, es.Snapshot.Size})
}

// Entry is one snapshot of the timeline with every source that holds it,
// fastest first (ordered by Kind, then by the order the sources were
// given to BuildTimeline).
type Entry struct {
	// SnapshotRef is the snapshot's identity: Dataset and Name (the source
	// dataset's name, also for the replica), GUID (0 when only a kopia
	// snapshot without guid tag holds it) and Time (ZFS creation time).
	SnapshotRef
	Sources []EntrySource `json:"sources"`
}

// FullName is dataset@name.
func (e *Entry) FullName() string { return e.Dataset + "@" + e.Name }

// Has reports whether a source of kind k holds the snapshot.
func (e *Entry) Has(k Kind) bool {
	for _, s := range e.Sources {
		if s.Source.Kind() == k {
			return true
		}
	}
	return false
}

// Size is the ZFS snapshot's referenced bytes, from the first source that
// knows it (every source means the same by it), 0 when none does.
func (e *Entry) Size() int64 {
	for _, es := range e.Sources {
		if es.Snapshot.Size > 0 {
			return es.Snapshot.Size
		}
	}
	return 0
}

// Timeline is every snapshot that exists anywhere, oldest first.
type Timeline struct {
	Entries []*Entry `json:"entries"`
	// Sources are the sources that were listed, failed or not.
	Sources []Source `json:"-"`
}

// Datasets lists the datasets of the entries, sorted.
func (t *Timeline) Datasets() []string {
	seen := map[string]bool{}
	var out []string
	for _, e := range t.Entries {
		if !seen[e.Dataset] {
			seen[e.Dataset] = true
			out = append(out, e.Dataset)
		}
	}
	slices.Sort(out)
	return out
}

// Filter returns the timeline of one dataset (all when dataset is "").
func (t *Timeline) Filter(dataset string) *Timeline {
	if dataset == "" {
		return t
	}
	out := &Timeline{Sources: t.Sources}
	for _, e := range t.Entries {
		if e.Dataset == dataset {
			out.Entries = append(out.Entries, e)
		}
	}
	return out
}

// SourceError is a source that could not be listed.
type SourceError struct {
	Source string
	Err    error
}

func (e *SourceError) Error() string { return fmt.Sprintf("%s: %v", e.Source, e.Err) }
func (e *SourceError) Unwrap() error { return e.Err }

// BuildTimeline lists every source concurrently and merges their snapshots
// into one timeline. Snapshots are matched by ZFS guid; one without a guid
// (a kopia snapshot nobody tagged) joins the entry of the same dataset and
// name, or gets its own. A source that fails is reported in the errors (a
// *SourceError each) and left out; whatever it did list before failing is
// still used, and the other sources still show.
func BuildTimeline(ctx context.Context, sources []Source) (*Timeline, []error) {
	tl, problems, _ := buildTimeline(ctx, sources)
	return tl, problems
}

// buildTimeline is BuildTimeline, also giving how long each source took
// to list (took[i] is sources[i]'s).
func buildTimeline(ctx context.Context, sources []Source) (tl *Timeline, problems []error, took []time.Duration) {
	lists := make([][]SourceSnapshot, len(sources))
	errs := make([]error, len(sources))
	took = make([]time.Duration, len(sources))
	var wg sync.WaitGroup
	for i, s := range sources {
		wg.Go(func() {
			start := time.Now()
			lists[i], errs[i] = s.Snapshots(ctx)
			took[i] = time.Since(start)
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			problems = append(problems, &SourceError{Source: sources[i].Name(), Err: err})
		}
	}
	return mergeTimeline(sources, lists), problems, took
}

// mergeTimeline merges the snapshot lists of sources (lists[i] is what
// sources[i] holds).
func mergeTimeline(sources []Source, lists [][]SourceSnapshot) *Timeline {
	t := &Timeline{Sources: sources}
	byGUID := map[uint64]*Entry{}
	byName := map[string][]*Entry{}    // dataset@name
	order := map[*Entry]map[int]bool{} // source indexes per entry
	idx := map[*Entry][]int{}          // parallel to e.Sources

	add := func(e *Entry, src Source, i int, ss SourceSnapshot) {
		if order[e] == nil {
			order[e] = map[int]bool{}
		}
		if order[e][i] {
			return // the source listed the snapshot twice; the first wins
		}
		order[e][i] = true
		idx[e] = append(idx[e], i)
		e.Sources = append(e.Sources, EntrySource{Source: src, Snapshot: ss})
		if e.GUID == 0 && ss.GUID != 0 {
			e.GUID = ss.GUID
		}
	}
	newEntry := func(ss SourceSnapshot) *Entry {
		e := &Entry{SnapshotRef: ss.SnapshotRef}
		t.Entries = append(t.Entries, e)
		key := ss.Dataset + "@" + ss.Name
		byName[key] = append(byName[key], e)
		if ss.GUID != 0 {
			byGUID[ss.GUID] = e
		}
		return e
	}
	// Snapshots with a guid first, so that one without joins a guid's entry.
	for pass := 0; pass < 2; pass++ {
		for i, src := range sources {
			for _, ss := range lists[i] {
				switch {
				case pass == 0 && ss.GUID != 0:
					e := byGUID[ss.GUID]
					if e == nil {
						e = newEntry(ss)
					}
					add(e, src, i, ss)
				case pass == 1 && ss.GUID == 0:
					var e *Entry
					if cands := byName[ss.Dataset+"@"+ss.Name]; len(cands) > 0 {
						e = cands[0]
					} else {
						e = newEntry(ss)
					}
					add(e, src, i, ss)
				}
			}
		}
	}
	for _, e := range t.Entries {
		// By kind, then in the order the sources were given.
		perm := make([]int, len(e.Sources))
		for j := range perm {
			perm[j] = j
		}
		slices.SortStableFunc(perm, func(a, b int) int {
			if c := cmp.Compare(e.Sources[a].Source.Kind(), e.Sources[b].Source.Kind()); c != 0 {
				return c
			}
			return cmp.Compare(idx[e][a], idx[e][b])
		})
		sorted := make([]EntrySource, len(perm))
		for j, p := range perm {
			sorted[j] = e.Sources[p]
		}
		e.Sources = sorted
		// The time of the fastest source that is ZFS (creation time);
		// kopia's StartTime is the same for vmhistory's uploads.
		e.Time = e.Sources[0].Snapshot.Time
	}
	slices.SortStableFunc(t.Entries, func(a, b *Entry) int {
		if c := a.Time.Compare(b.Time); c != 0 {
			return c
		}
		if c := cmp.Compare(a.Dataset, b.Dataset); c != 0 {
			return c
		}
		return cmp.Compare(a.Name, b.Name)
	})
	return t
}
