package boot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// Mode is how a snapshot's VM comes back.
type Mode string

const (
	// SavedState resumes the RAM state the snapshot holds (quiesce mode
	// save), as the same domain: same name, UUID and MACs.
	SavedState Mode = "saved-state"
	// FreshBoot boots the snapshot's disks as a new domain.
	FreshBoot Mode = "fresh-boot"
)

// Layer is one image of a disk's chain in the snapshot, as the mount
// serves it.
type Layer struct {
	Path   string `json:"path"`
	Format string `json:"format"`
}

// Disk is one disk of a booted domain.
type Disk struct {
	Target string `json:"target"`
	// Original is the disk's path on the host the snapshot was taken on.
	Original string `json:"original"`
	// Chain is the snapshot's image first, then its backing images.
	Chain []Layer `json:"chain"`
	// Overlay takes the guest's writes; "" for a read-only disk served
	// straight from the mount.
	Overlay string `json:"overlay,omitempty"`
	// Size is the disk's virtual size.
	Size int64 `json:"size"`
}

// layout says where a snapshot's files are: the dataset's mountpoint when
// the snapshot was taken, and the snapshot's directory in the mount.
type layout struct {
	mountpoint string
	snapDir    string
}

// inSnapshot maps a path of the live host into the snapshot's directory
// in the mount; ok is false for a path outside the dataset.
func (l layout) inSnapshot(path string) (string, bool) {
	rel, err := filepath.Rel(l.mountpoint, filepath.Clean(path))
	if err != nil || !filepath.IsAbs(path) || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", false
	}
	return filepath.Join(l.snapDir, rel), true
}

// resolve follows the symbolic links the snapshot holds on the way to
// original (a host path on the dataset) as the host the snapshot was
// taken on would have: a link's target is a host path, mapped into the
// snapshot again. Opened through the mount as they are, the links would
// be followed on this host instead, an absolute one to today's file or
// anywhere else. The result has no link left in the snapshot, or is off
// the dataset; a missing component is left for the caller's Stat.
func (l layout) resolve(original string) (string, error) {
	p := filepath.Clean(original)
	for hops := 0; hops <= 40; hops++ {
		if _, ok := l.inSnapshot(p); !ok {
			return p, nil
		}
		rel, _ := filepath.Rel(l.mountpoint, p)
		if rel == "." {
			return p, nil
		}
		done, parts, linked := l.mountpoint, strings.Split(rel, string(filepath.Separator)), false
		for i, part := range parts {
			next := filepath.Join(done, part)
			snap, _ := l.inSnapshot(next)
			st, err := os.Lstat(snap)
			if err != nil {
				return p, nil
			}
			if st.Mode()&os.ModeSymlink == 0 {
				done = next
				continue
			}
			to, err := os.Readlink(snap)
			if err != nil {
				return "", err
			}
			if !filepath.IsAbs(to) {
				to = filepath.Join(done, to)
			}
			p, linked = filepath.Join(append([]string{to}, parts[i+1:]...)...), true
			break
		}
		if !linked {
			return p, nil
		}
	}
	return "", errors.New("too many levels of symbolic links in the snapshot")
}

// chain follows the backing files of the image at original (a host
// path) inside the snapshot. Every layer must be in the same snapshot: a
// backing file outside the dataset is not part of it, and reading the live
// host's file instead would boot a disk that never existed.
func (l layout) chain(target, original, format string) ([]Layer, int64, error) {
	var layers []Layer
	var size int64
	for depth := 0; ; depth++ {
		if depth == 16 {
			return nil, 0, fmt.Errorf("disk %s: backing chain deeper than 16 images", target)
		}
		if _, ok := l.inSnapshot(original); !ok {
			if depth == 0 {
				return nil, 0, fmt.Errorf("disk %s (%s) is not on the snapshot's dataset (mounted at %s when the snapshot was taken): the snapshot does not hold it", target, original, l.mountpoint)
			}
			return nil, 0, fmt.Errorf("disk %s: backing file %s leaves the dataset (mounted at %s): the snapshot does not hold it, refusing a chain that mixes it with today's files", target, original, l.mountpoint)
		}
		resolved, err := l.resolve(original)
		if err != nil {
			return nil, 0, fmt.Errorf("disk %s: %s: %w", target, original, err)
		}
		path, ok := l.inSnapshot(resolved)
		if !ok {
			return nil, 0, fmt.Errorf("disk %s: %s is a symbolic link in the snapshot to %s, which leaves the dataset (mounted at %s): the snapshot does not hold it", target, original, resolved, l.mountpoint)
		}
		st, err := os.Stat(path)
		if err != nil {
			return nil, 0, fmt.Errorf("disk %s: %s is not in the snapshot: %w", target, original, err)
		}
		if !st.Mode().IsRegular() {
			return nil, 0, fmt.Errorf("disk %s: %s is not a regular file in the snapshot", target, original)
		}
		h, err := readImageHeader(path)
		if err != nil {
			return nil, 0, fmt.Errorf("disk %s: %w", target, err)
		}
		if format == "" {
			format = h.Format
		}
		if format != h.Format && !(format != "qcow2" && h.Format == "raw") {
			return nil, 0, fmt.Errorf("disk %s: %s is %s, its definition says %s", target, original, h.Format, format)
		}
		if format != "raw" && format != "qcow2" {
			return nil, 0, fmt.Errorf("disk %s: format %s is not supported (raw or qcow2)", target, format)
		}
		layers = append(layers, Layer{Path: path, Format: format})
		if depth == 0 {
			size = h.VirtualSize
		}
		if format != "qcow2" || h.BackingFile == "" {
			return layers, size, nil
		}
		next := h.BackingFile
		if strings.Contains(next, ":") && !strings.HasPrefix(next, "/") {
			return nil, 0, fmt.Errorf("disk %s: backing file %q is not a file path", target, next)
		}
		if !filepath.IsAbs(next) {
			next = filepath.Join(filepath.Dir(original), next)
		}
		original, format = next, h.BackingFormat
	}
}

// backingStore renders a chain (from its second image, the first is the
// overlay's backing) as libvirt's <backingStore>, each image kept out of
// DAC relabelling: the mount is read-only, and its files must not be
// chowned.
func backingStore(chain []Layer) *libvirtxml.DomainDiskBackingStore {
	var top *libvirtxml.DomainDiskBackingStore
	for i := len(chain) - 1; i >= 0; i-- {
		top = &libvirtxml.DomainDiskBackingStore{
			Format:       &libvirtxml.DomainDiskFormat{Type: chain[i].Format},
			Source:       mountSource(chain[i].Path),
			BackingStore: top,
		}
	}
	return top
}

func mountSource(path string) *libvirtxml.DomainDiskSource {
	return &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{
		File:     path,
		SecLabel: []libvirtxml.DomainDeviceSecLabel{{Model: "dac", Relabel: "no"}},
	}}
}

// planDisks maps every disk of dom onto the snapshot: a writable disk gets
// an overlay in dir over its chain in the mount, a read-only one on the
// dataset is served from the mount as it is, a read-only one elsewhere (an
// installer ISO) is left alone. A writable disk that is not a file, or not
// on the dataset, is refused.
func planDisks(dom *libvirtxml.Domain, l layout, dir string) ([]Disk, error) {
	if dom.Devices == nil {
		return nil, nil
	}
	var disks []Disk
	for i := range dom.Devices.Disks {
		d := &dom.Devices.Disks[i]
		target := fmt.Sprintf("disk%d", i)
		if d.Target != nil && d.Target.Dev != "" {
			target = d.Target.Dev
		}
		removable := d.Device == "cdrom" || d.Device == "floppy"
		readOnly := d.ReadOnly != nil || removable
		if d.Source == nil {
			if removable {
				continue // an empty drive
			}
			return nil, fmt.Errorf("disk %s has no source", target)
		}
		if d.Source.File == nil {
			if readOnly {
				continue
			}
			return nil, fmt.Errorf("disk %s is not file-backed (%s): vmhistory boot needs the disks as files in the snapshot", target, sourceKind(d.Source))
		}
		original := d.Source.File.File
		format := ""
		if d.Driver != nil {
			format = d.Driver.Type
		}
		if readOnly {
			if _, ok := l.inSnapshot(original); !ok {
				continue
			}
		}
		chain, size, err := l.chain(target, original, format)
		if err != nil {
			return nil, err
		}
		disk := Disk{Target: target, Original: original, Chain: chain, Size: size}
		d.Source.Index = 0
		d.Mirror = nil
		if readOnly {
			d.Source = mountSource(chain[0].Path)
			d.BackingStore = backingStore(chain[1:])
		} else {
			disk.Overlay = filepath.Join(dir, safeFileName(target)+".qcow2")
			d.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: disk.Overlay}}
			d.BackingStore = backingStore(chain)
			if d.Driver == nil {
				d.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu"}
			}
			d.Driver.Type = "qcow2"
		}
		disks = append(disks, disk)
	}
	return disks, nil
}

func sourceKind(s *libvirtxml.DomainDiskSource) string {
	switch {
	case s.Block != nil:
		return "a block device " + s.Block.Dev
	case s.Network != nil:
		return "a network disk"
	case s.Volume != nil:
		return "a storage pool volume " + s.Volume.Pool + "/" + s.Volume.Volume
	case s.Dir != nil:
		return "a directory"
	}
	return "not a file"
}

// safeFileName makes s usable as one path component.
func safeFileName(s string) string {
	s = strings.Map(func(r rune) rune {
		if r == '/' || r == 0 {
			return '_'
		}
		return r
	}, s)
	if s == "" || s == "." || s == ".." {
		return "_" + s
	}
	return s
}

// redirectChardevs moves every serial port, console, channel and parallel
// port that writes a file, or listens on a socket of its own path, into
// dir: the booted domain must not append to the original's console log or
// take over its sockets. It returns the files made so.
func redirectChardevs(dom *libvirtxml.Domain, dir string) []string {
	if dom.Devices == nil {
		return nil
	}
	var files []string
	seen := map[string]string{}
	move := func(kind string, i int, src *libvirtxml.DomainChardevSource) {
		if src == nil {
			return
		}
		if f := src.File; f != nil && f.Path != "" {
			if p, ok := seen[f.Path]; ok {
				f.Path = p // a console that mirrors a serial port
				return
			}
			p := filepath.Join(dir, fmt.Sprintf("%s%d.log", kind, i))
			seen[f.Path], f.Path = p, p
			files = append(files, p)
		}
		// Only mode='bind' listens: libvirt reads a unix source without
		// a mode as connect, a client of someone else's socket.
		if u := src.UNIX; u != nil && u.Path != "" && u.Mode == "bind" {
			if p, ok := seen[u.Path]; ok {
				u.Path = p
				return
			}
			p := filepath.Join(dir, fmt.Sprintf("%s%d.sock", kind, i))
			seen[u.Path], u.Path = p, p
			files = append(files, p)
		}
	}
	for i := range dom.Devices.Serials {
		move("serial", i, dom.Devices.Serials[i].Source)
	}
	for i := range dom.Devices.Consoles {
		move("console", i, dom.Devices.Consoles[i].Source)
	}
	for i := range dom.Devices.Channels {
		move("channel", i, dom.Devices.Channels[i].Source)
	}
	for i := range dom.Devices.Parallels {
		move("parallel", i, dom.Devices.Parallels[i].Source)
	}
	return files
}

// savedStateNICs keeps the saved state's NICs (libvirt refuses to restore
// one without them, or with other MACs) but, unless network names where
// they go, with their links down: the original may be alive elsewhere
// with the same MACs and addresses.
func savedStateNICs(dom *libvirtxml.Domain, network string) {
	if dom.Devices == nil {
		return
	}
	for i := range dom.Devices.Interfaces {
		nic := &dom.Devices.Interfaces[i]
		if network == "" {
			nic.Link = &libvirtxml.DomainInterfaceLink{State: "down"}
			continue
		}
		nic.Source = &libvirtxml.DomainInterfaceSource{Network: &libvirtxml.DomainInterfaceSourceNetwork{Network: network}}
		nic.Link = nil
	}
}

// freshNICs gives a fresh boot no network, or with network one new NIC
// per original NIC on that libvirt network, each with a MAC of its own.
func freshNICs(dom *libvirtxml.Domain, network string) {
	if dom.Devices == nil {
		return
	}
	if network == "" {
		dom.Devices.Interfaces = nil
		return
	}
	for i := range dom.Devices.Interfaces {
		old := dom.Devices.Interfaces[i]
		dom.Devices.Interfaces[i] = libvirtxml.DomainInterface{
			Source:  &libvirtxml.DomainInterfaceSource{Network: &libvirtxml.DomainInterfaceSourceNetwork{Network: network}},
			Model:   old.Model,
			Driver:  old.Driver,
			Address: old.Address,
			Boot:    old.Boot,
		}
	}
}

// freshIdentity makes dom a new domain that never collides with the
// original: name, UUID, NVRAM path of its own, graphics on a free port,
// no static security labels.
func freshIdentity(dom *libvirtxml.Domain, name, uuid, dir string) []string {
	dom.Name, dom.UUID, dom.ID = name, uuid, nil
	dom.GenID = nil
	// A static label is the original's own: sharing it, either domain's
	// QEMU could open the other's files.
	dom.SecLabel = slices.DeleteFunc(dom.SecLabel, func(s libvirtxml.DomainSecLabel) bool { return s.Type == "static" })
	var files []string
	if dom.OS != nil && dom.OS.NVRam != nil {
		p := filepath.Join(dir, "nvram.fd")
		dom.OS.NVRam.NVRam, dom.OS.NVRam.Source = p, nil
		files = append(files, p)
	}
	if dom.Devices != nil {
		for i := range dom.Devices.Graphics {
			g := &dom.Devices.Graphics[i]
			if g.VNC != nil && g.VNC.Port > 0 {
				g.VNC.Port, g.VNC.AutoPort = -1, "yes"
			}
			if g.Spice != nil && (g.Spice.Port > 0 || g.Spice.TLSPort > 0) {
				g.Spice.Port, g.Spice.TLSPort, g.Spice.AutoPort = -1, -1, "yes"
			}
		}
	}
	return files
}
