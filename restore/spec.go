package restore

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// SpecHelp describes the snapshot specs Resolve accepts, for help texts.
const SpecHelp = `A SNAPSHOT is one of:
  2023-03-04_05:00:01               a snapshot name (the part after the @)
  DATA/libvirt@2023-03-04_05:00:01  a full name, dataset included
  latest                            the newest snapshot
  latest~3                          the fourth newest (three before latest)
  2023-03-04, 2023-03, 2023-03-04_05  a date or date prefix, or any unique
                                    prefix of a name; it must match one snapshot
With several datasets, write DATASET@SPEC (DATA/libvirt@latest) or pass
--dataset. A file is SNAPSHOT:PATH, PATH relative to the snapshot's root
(latest:images/db.qcow2).`

var (
	latestRE = regexp.MustCompile(`^latest(?:~([0-9]+))?$`)
	dateRE   = regexp.MustCompile(`^[0-9]{4}(?:-[0-9]{2}(?:-[0-9]{2}(?:[T _][0-9]{2}(?::[0-9]{2}(?::[0-9]{2})?)?)?)?)?$`)
)

// maxCandidates bounds the snapshots an ambiguity error names.
const maxCandidates = 4

// Resolve finds the one entry a snapshot spec names (see SpecHelp).
// dataset, when not empty, restricts the search to that dataset (the
// --dataset flag). The error is one line: what matched nothing, or which
// snapshots (a few of them) matched more than one.
func (t *Timeline) Resolve(spec, dataset string) (*Entry, error) {
	e, n, err := t.resolve(spec, dataset)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, t.noMatch(spec, dataset)
	}
	return e, nil
}

// resolve returns the entry and how many entries matched (0: none; an
// error when more than one, or the spec is malformed).
func (t *Timeline) resolve(spec, dataset string) (*Entry, int, error) {
	if spec == "" {
		return nil, 0, fmt.Errorf("empty snapshot spec; %s", shortSpecHint)
	}
	tl := t
	if ds, rest, ok := strings.Cut(spec, "@"); ok {
		if dataset != "" && ds != dataset {
			return nil, 0, fmt.Errorf("snapshot %q is of dataset %s, but --dataset says %s", spec, showName(ds), showName(dataset))
		}
		if ds == "" || rest == "" {
			return nil, 0, fmt.Errorf("snapshot %q: write DATASET@NAME, e.g. DATA/libvirt@latest", spec)
		}
		dataset, spec = ds, rest
		if !t.hasDataset(dataset) {
			return nil, 0, fmt.Errorf("no snapshot of dataset %s in the timeline (datasets: %s)", showName(dataset), strings.Join(t.Datasets(), ", "))
		}
	}
	tl = t.Filter(dataset)

	if m := latestRE.FindStringSubmatch(spec); m != nil {
		back := 0
		if m[1] != "" {
			n, err := strconv.Atoi(m[1])
			if err != nil {
				return nil, 0, fmt.Errorf("snapshot %q: %v", spec, err)
			}
			back = n
		}
		if ds := tl.Datasets(); len(ds) > 1 {
			return nil, 0, fmt.Errorf("%q is ambiguous with %d datasets (%s): write %s@%s or pass --dataset", spec, len(ds), strings.Join(ds, ", "), ds[0], spec)
		}
		if len(tl.Entries) == 0 {
			return nil, 0, nil
		}
		if back >= len(tl.Entries) {
			return nil, 0, fmt.Errorf("%s: there are only %d snapshots (latest~%d is the oldest, %s)",
				spec, len(tl.Entries), len(tl.Entries)-1, tl.Entries[0].FullName())
		}
		return tl.Entries[len(tl.Entries)-1-back], 1, nil
	}

	// An exact name wins over prefixes.
	var exact []*Entry
	for _, e := range tl.Entries {
		if e.Name == spec {
			exact = append(exact, e)
		}
	}
	matches := exact
	if len(matches) == 0 {
		isDate := dateRE.MatchString(spec)
		norm := normDate(spec)
		for _, e := range tl.Entries {
			if strings.HasPrefix(e.Name, spec) || (isDate && strings.HasPrefix(e.Time.In(time.Local).Format("2006-01-02T15:04:05"), norm)) {
				matches = append(matches, e)
			}
		}
	}
	switch len(matches) {
	case 0:
		return nil, 0, nil
	case 1:
		return matches[0], 1, nil
	}
	names := make([]string, 0, maxCandidates)
	for i, e := range matches {
		if i == maxCandidates {
			names = append(names, fmt.Sprintf("and %d more", len(matches)-maxCandidates))
			break
		}
		names = append(names, e.FullName())
	}
	hint := "give more of the name"
	if len(exact) > 1 {
		hint = "write DATASET@NAME or pass --dataset"
	}
	return nil, len(matches), fmt.Errorf("%q matches %d snapshots (%s): %s", spec, len(matches), strings.Join(names, ", "), hint)
}

const shortSpecHint = "name a snapshot like 2023-03-04_05:00:01, DATA/libvirt@2023-03-04_05:00:01, latest, latest~3 or a date 2023-03-04"

func (t *Timeline) noMatch(spec, dataset string) error {
	if ds, _, ok := strings.Cut(spec, "@"); ok {
		dataset = ds
	}
	where := ""
	if dataset != "" {
		where = " of " + showName(dataset)
	}
	tl := t.Filter(dataset)
	if len(tl.Entries) == 0 {
		return fmt.Errorf("no snapshot matches %q: the timeline has no snapshots%s", spec, where)
	}
	return fmt.Errorf("no snapshot matches %q: the timeline has %d snapshots%s, from %s to %s",
		spec, len(tl.Entries), where, tl.Entries[0].FullName(), tl.Entries[len(tl.Entries)-1].FullName())
}

func (t *Timeline) hasDataset(ds string) bool {
	for _, e := range t.Entries {
		if e.Dataset == ds {
			return true
		}
	}
	return false
}

// showName prints a name the user typed as it is when it is plain, and
// quoted when it holds spaces, quotes or control characters, so that an
// error stays one readable line.
func showName(s string) string {
	if q := strconv.Quote(s); q[1:len(q)-1] == s && !strings.ContainsAny(s, " \"") && s != "" {
		return s
	}
	return strconv.Quote(s)
}

// normDate writes a date spec's separator between day and hour as T.
func normDate(s string) string {
	if len(s) > 10 && (s[10] == ' ' || s[10] == '_') {
		return s[:10] + "T" + s[11:]
	}
	return s
}

// ResolvePath resolves "SNAPSHOT:PATH" (or a bare SNAPSHOT, meaning its
// root) to an entry and a cleaned path (see CleanPath). Snapshot names
// hold colons themselves (2023-03-04_05:00:01), so the snapshot part is
// the longest part before a colon that names a snapshot.
func (t *Timeline) ResolvePath(spec, dataset string) (*Entry, string, error) {
	cuts := []int{len(spec)}
	for i := len(spec) - 1; i >= 0; i-- {
		if spec[i] == ':' {
			cuts = append(cuts, i)
		}
	}
	for _, i := range cuts {
		e, n, err := t.resolve(spec[:i], dataset)
		if err != nil && n == 0 && isStructural(spec[:i]) {
			return nil, "", err
		}
		if err != nil && n > 1 {
			return nil, "", err
		}
		if n == 1 && err == nil {
			rel := ""
			if i < len(spec) {
				rel = spec[i+1:]
			}
			clean, err := CleanPath(rel)
			if err != nil {
				return nil, "", fmt.Errorf("%q: %w", spec, err)
			}
			return e, clean, nil
		}
	}
	// Nothing matched: name the part that looks like the snapshot.
	snap := spec
	for _, i := range cuts {
		if isStructural(spec[:i]) || dateRE.MatchString(spec[:i]) {
			snap = spec[:i]
			break
		}
	}
	if snap == spec {
		if i := strings.IndexByte(spec, ':'); i >= 0 && !dateRE.MatchString(spec[:i]) {
			snap = spec[:i]
		}
	}
	if snap == "" {
		return nil, "", fmt.Errorf("%q names no snapshot before the colon; %s", spec, shortSpecHint)
	}
	return nil, "", t.noMatch(snap, dataset)
}

// isStructural reports whether s is a spec whose error is about its form
// (latest~N, DATASET@...), so that error is the one to report.
func isStructural(s string) bool {
	return latestRE.MatchString(s) || strings.Contains(s, "@")
}
