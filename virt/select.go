package virt

import (
	"context"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
)

// Dataset is where VM disks live: a ZFS dataset and its mountpoint.
type Dataset struct {
	// Name is the dataset, like DATA/libvirt. Its zvols appear as
	// /dev/zvol/DATA/libvirt/...; empty means zvols are not recognised.
	Name string
	// Mountpoint is where the dataset is mounted, an absolute path.
	Mountpoint string
}

// Selection is the result of DomainsUnder.
type Selection struct {
	// Domains are the domains to quiesce, sorted by name: the named ones,
	// or (for all) every domain with a file-backed disk or a shared
	// directory under the mountpoint.
	Domains []Domain
	// Unsupported are domains with disks on the dataset that vmhistory
	// cannot back up (zvols), or whose disks could not be located; a domain
	// can be both in Domains (for its file disks) and here.
	Unsupported []Unsupported
	// Warnings are things the admin should look at that stop nothing, like
	// a domain selected by name without any disk on the dataset.
	Warnings []string
}

// Names are the names of the selected domains.
func (s *Selection) Names() []string {
	names := make([]string, len(s.Domains))
	for i, d := range s.Domains {
		names[i] = d.Name
	}
	return names
}

// Unsupported is a domain whose disks on the dataset are not backed up.
type Unsupported struct {
	Domain Domain
	// Reason says which disks and why, for the report.
	Reason string
}

// DomainsUnder selects the domains to quiesce for a snapshot of ds. With
// names == nil it selects every domain that has a file-backed disk (or a
// shared directory) under ds.Mountpoint; paths are compared by whole path
// components, so /data/lib does not contain /data/libvirt/x.qcow2, and
// symbolic links are followed on both sides. Otherwise it selects exactly
// the named domains, and a name that libvirt does not know is an error
// naming it. Domains with a disk on one of the dataset's zvols are reported
// in Unsupported, never silently dropped.
//
// Only a disk's top image counts: a backing file is read-only and needs no
// quiescing.
func (c *Conn) DomainsUnder(ctx context.Context, ds Dataset, names []string) (*Selection, error) {
	if !filepath.IsAbs(ds.Mountpoint) {
		return nil, fmt.Errorf("virt: mountpoint %q of dataset %s is not an absolute path", ds.Mountpoint, ds.Name)
	}
	all, err := c.Domains(ctx)
	if err != nil {
		return nil, err
	}
	m := newMatcher(ds)
	sel := &Selection{}

	var chosen []Domain
	if names == nil {
		chosen = all
	} else {
		byName := make(map[string]Domain, len(all))
		known := make([]string, len(all))
		for i, d := range all {
			byName[d.Name] = d
			known[i] = d.Name
		}
		var missing []string
		seen := map[string]bool{}
		for _, n := range names {
			if seen[n] {
				continue
			}
			seen[n] = true
			d, ok := byName[n]
			if !ok {
				missing = append(missing, n)
				continue
			}
			chosen = append(chosen, d)
		}
		if len(missing) > 0 {
			return nil, &NotFoundError{Names: missing, Known: known}
		}
	}

	for _, d := range chosen {
		var onDataset, zvols, unknown []string
		for _, disk := range d.Disks {
			switch {
			case disk.Type == "volume" && disk.Source == "":
				unknown = append(unknown, fmt.Sprintf("%s (volume %s/%s: %v)", diskLabel(disk), disk.Pool, disk.Volume, disk.Err))
			case !disk.Local():
			case m.zvol(disk.Source):
				zvols = append(zvols, fmt.Sprintf("%s (%s)", diskLabel(disk), disk.Source))
			case m.under(disk.Source):
				onDataset = append(onDataset, disk.Source)
			}
		}
		selected := names != nil || len(onDataset) > 0
		if selected {
			sel.Domains = append(sel.Domains, d)
		}
		var reasons []string
		if len(zvols) > 0 {
			r := fmt.Sprintf("disks on zvols of %s are not supported yet and are not backed up: %s", ds.Name, strings.Join(zvols, ", "))
			if selected && len(onDataset) > 0 {
				r += "; its file disks are"
			}
			reasons = append(reasons, r)
		}
		if len(unknown) > 0 {
			reasons = append(reasons, fmt.Sprintf("cannot tell whether these volume disks live on %s, their paths could not be resolved: %s",
				ds.Mountpoint, strings.Join(unknown, ", ")))
		}
		if len(reasons) > 0 {
			sel.Unsupported = append(sel.Unsupported, Unsupported{Domain: d, Reason: strings.Join(reasons, "; ")})
		}
		if names != nil && len(onDataset) == 0 && len(zvols) == 0 {
			sel.Warnings = append(sel.Warnings, fmt.Sprintf("domain %s is selected by name but has no disk under %s", d.Name, ds.Mountpoint))
		}
	}
	return sel, nil
}

func diskLabel(d Disk) string {
	if d.Target != "" {
		return d.Target
	}
	return d.Device
}

// matcher decides whether a path is under a mountpoint or on a zvol of a
// dataset.
type matcher struct {
	mounts     []string        // the mountpoint, and its symlink-resolved form
	zvolPrefix string          // /dev/zvol/<dataset>/, or "" without a dataset name
	zvolDevs   map[string]bool // resolved devices (/dev/zd16) of the dataset's zvols
}

func newMatcher(ds Dataset) *matcher {
	m := &matcher{mounts: variants(ds.Mountpoint), zvolDevs: map[string]bool{}}
	if name := strings.Trim(ds.Name, "/"); name != "" {
		m.zvolPrefix = "/dev/zvol/" + name + "/"
		// The udev links of the dataset's zvols, so that a disk given as
		// /dev/zd16 or /dev/disk/by-id/... is recognised too.
		root := filepath.Clean(m.zvolPrefix)
		filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if e.Type()&fs.ModeSymlink != 0 {
				if r, err := filepath.EvalSymlinks(p); err == nil {
					m.zvolDevs[r] = true
				}
			}
			return nil
		})
	}
	return m
}

// variants are a path, cleaned, and the same path with symbolic links
// resolved when that differs. A path that does not exist (a disk image not
// created yet) is resolved through its directory.
func variants(p string) []string {
	p = filepath.Clean(p)
	r, err := filepath.EvalSymlinks(p)
	if err != nil {
		dir, err2 := filepath.EvalSymlinks(filepath.Dir(p))
		if err2 != nil {
			return []string{p}
		}
		r = filepath.Join(dir, filepath.Base(p))
	}
	if r != p {
		return []string{p, r}
	}
	return []string{p}
}

func (m *matcher) zvol(p string) bool {
	if m.zvolPrefix == "" {
		return false
	}
	for _, v := range variants(p) {
		if strings.HasPrefix(v, m.zvolPrefix) || m.zvolDevs[v] {
			return true
		}
	}
	return false
}

func (m *matcher) under(p string) bool {
	for _, v := range variants(p) {
		for _, mp := range m.mounts {
			if pathUnder(v, mp) {
				return true
			}
		}
	}
	return false
}

// pathUnder reports whether p is dir or inside it, comparing whole path
// components. Both are clean absolute paths.
func pathUnder(p, dir string) bool {
	if dir == "/" {
		return strings.HasPrefix(p, "/")
	}
	return p == dir || strings.HasPrefix(p, dir+"/")
}
