package config

import (
	"fmt"
	"strings"
	"time"
)

// maxZFSNameLen is ZFS_MAX_DATASET_NAME_LEN (256) minus the terminating NUL;
// it bounds full names, snapshots included (DATA/libvirt@2023-03-04_05:00:01).
const maxZFSNameLen = 255

// zfsNameChar reports whether r may appear in a dataset component or a
// snapshot name. ZFS also accepts a space; vmhistory does not, because the
// names travel through ssh command lines and scripts.
func zfsNameChar(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' ||
		r == '_' || r == '.' || r == ':' || r == '-'
}

// reservedPoolPrefixes are refused by zpool as the start of a pool name,
// because they are vdev keywords on its command line.
var reservedPoolPrefixes = []string{"mirror", "raidz", "draid", "spare"}

// checkDatasetName checks the syntax of a ZFS filesystem name, POOL or
// POOL/a/b. The error describes the problem without repeating the name,
// because the caller reports the name as the value.
func checkDatasetName(name string) error {
	if name == "" {
		return fmt.Errorf("is empty; write a dataset like DATA/libvirt")
	}
	if i := strings.IndexAny(name, "@#"); i >= 0 {
		what := "a snapshot"
		if name[i] == '#' {
			what = "a bookmark"
		}
		return fmt.Errorf("contains %q, which names %s; give the dataset only, like %s", name[i], what, name[:i])
	}
	if strings.HasPrefix(name, "/") {
		return fmt.Errorf("starts with /: a dataset name is POOL/dataset, not a mountpoint")
	}
	if len(name) > maxZFSNameLen {
		return fmt.Errorf("is %d characters long; ZFS allows at most %d", len(name), maxZFSNameLen)
	}
	parts := strings.Split(name, "/")
	for i, p := range parts {
		if p == "" {
			return fmt.Errorf("has an empty component (a leading, trailing or double /)")
		}
		if p == "." || p == ".." {
			return fmt.Errorf("has a %q component", p)
		}
		for _, r := range p {
			if !zfsNameChar(r) {
				return fmt.Errorf("contains %q; ZFS names allow only letters, digits and _ . : -", r)
			}
		}
		if i == 0 {
			if c := p[0]; !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
				return fmt.Errorf("has pool name %q, which does not start with a letter", p)
			}
			if p == "log" {
				return fmt.Errorf("has pool name %q, which zpool reserves", p)
			}
			for _, r := range reservedPoolPrefixes {
				if strings.HasPrefix(p, r) {
					return fmt.Errorf("has pool name %q; zpool reserves names starting with %q", p, r)
				}
			}
		}
	}
	return nil
}

// isPoolRoot reports whether a valid dataset name is a pool's root dataset.
func isPoolRoot(name string) bool { return !strings.Contains(name, "/") }

// isInside reports whether dataset a is b or a descendant of b.
func isInside(a, b string) bool {
	return a == b || strings.HasPrefix(a, b+"/")
}

// formatCheckTimes are the times a snapshot layout must tell apart and
// reproduce. Every field differs between them, hours run past 12 (to catch a
// 12-hour clock without AM/PM), and one is a leap day.
var formatCheckTimes = []time.Time{
	time.Date(2023, 3, 4, 5, 0, 1, 0, time.UTC),
	time.Date(2031, 12, 25, 23, 59, 58, 0, time.UTC),
	time.Date(2024, 2, 29, 17, 34, 56, 0, time.UTC),
	time.Date(2009, 11, 10, 14, 7, 9, 0, time.UTC),
}

// formatCheckZones are the locations a layout is formatted in. Zone
// elements (MST, -0700, Z07:00) print "+" in zones east of UTC, a character
// snapshot names cannot hold; checking only UTC ("Z") would miss that.
var formatCheckZones = []*time.Location{
	time.UTC,
	time.FixedZone("", 5*3600+30*60),
	time.FixedZone("", -3*3600),
}

// checkSnapshotFormat checks that a Go time layout makes valid, unique,
// readable-back snapshot names. The error describes the problem without
// repeating the layout.
func checkSnapshotFormat(layout string) error {
	if layout == "" {
		return fmt.Errorf("is empty; the default is %q", DefaultSnapshotFormat)
	}
	for _, loc := range formatCheckZones {
		for _, ref := range formatCheckTimes {
			t := ref.In(loc)
			// Compare wall clocks: a layout without a zone reads a name back
			// in whatever location the caller chooses.
			want := time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), 0, time.UTC)
			s := t.Format(layout)
			if s == "" {
				return fmt.Errorf("formats to an empty name")
			}
			for _, r := range s {
				if !zfsNameChar(r) {
					when := t.Format(time.DateTime)
					if loc != time.UTC {
						when = t.Format(time.DateTime + " -07:00")
					}
					return fmt.Errorf("formats %s as %q, which contains %q; snapshot names allow only letters, digits and _ . : - (and no time zone)",
						when, s, r)
				}
			}
			back, err := time.ParseInLocation(layout, s, time.UTC)
			if err != nil {
				return fmt.Errorf("formats %s as %q, which it cannot parse back (%v)", t.Format(time.DateTime), s, err)
			}
			back = time.Date(back.Year(), back.Month(), back.Day(), back.Hour(), back.Minute(), back.Second(), 0, time.UTC)
			if !back.Equal(want) {
				return fmt.Errorf("formats %s as %q, which reads back as %s: %s",
					t.Format(time.DateTime), s, back.Format(time.DateTime), missingPart(want, back))
			}
		}
	}
	return nil
}

// missingPart explains which part of the time a layout loses.
func missingPart(want, got time.Time) string {
	const collide = "two snapshots would get the same name"
	switch {
	case want.Year() != got.Year():
		return "it lacks the year (2006); " + collide
	case want.Month() != got.Month():
		return "it lacks the month (01); " + collide
	case want.Day() != got.Day():
		return "it lacks the day (02); " + collide
	case want.Hour() != got.Hour():
		if want.Hour()%12 == got.Hour()%12 {
			return "it uses a 12-hour clock without PM; use 15 for the hour"
		}
		return "it lacks the hour (15); " + collide
	case want.Minute() != got.Minute():
		return "it lacks the minutes (04); " + collide
	default:
		return "it lacks the seconds (05); " + collide
	}
}
