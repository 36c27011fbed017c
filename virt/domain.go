package virt

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"slices"
	"strings"

	libvirt "github.com/digitalocean/go-libvirt"
)

// State is a domain's run state, as virsh shows it.
type State int32

// The domain states (libvirt's virDomainState).
const (
	StateNoState     State = State(libvirt.DomainNostate)
	StateRunning     State = State(libvirt.DomainRunning)
	StateBlocked     State = State(libvirt.DomainBlocked)
	StatePaused      State = State(libvirt.DomainPaused)
	StateShutdown    State = State(libvirt.DomainShutdown)
	StateShutoff     State = State(libvirt.DomainShutoff)
	StateCrashed     State = State(libvirt.DomainCrashed)
	StatePMSuspended State = State(libvirt.DomainPmsuspended)
)

// String is the state as virsh list prints it ("running", "shut off"...).
func (s State) String() string {
	switch s {
	case StateNoState:
		return "no state"
	case StateRunning:
		return "running"
	case StateBlocked:
		return "blocked"
	case StatePaused:
		return "paused"
	case StateShutdown:
		return "in shutdown"
	case StateShutoff:
		return "shut off"
	case StateCrashed:
		return "crashed"
	case StatePMSuspended:
		return "pmsuspended"
	}
	return fmt.Sprintf("state %d", int32(s))
}

// Running reports whether the guest's CPUs run: running, or blocked on a
// resource (which is a running guest waiting for I/O).
func (s State) Running() bool { return s == StateRunning || s == StateBlocked }

// Domain is a libvirt domain as listed.
type Domain struct {
	Name string
	UUID string
	// State is the state when the domain was listed.
	State State
	// ManagedSave is whether the domain has a managed-save image (virsh
	// start restores it).
	ManagedSave bool
	// Disks are the disks and shared filesystems of the domain's XML (the
	// live XML of a running domain), in XML order.
	Disks []Disk

	ref libvirt.Domain
}

// Disk is one <disk> (or <filesystem>) of a domain's XML.
type Disk struct {
	// Type is the disk's type attribute: file, block, volume, network,
	// dir, nvme...; "mount" for a shared <filesystem>.
	Type string
	// Device is disk, cdrom, floppy or lun; "filesystem" for a shared
	// <filesystem>.
	Device string
	// Source is the local path behind the disk: the file, the block device,
	// the directory, or for a volume the path its storage pool gives. For a
	// network disk it is protocol://host/name, not a local path. Empty when
	// the disk has no source (an empty CD-ROM drive) or a volume's path
	// could not be resolved (see Err).
	Source string
	// Pool and Volume name a volume disk's storage volume.
	Pool, Volume string
	// Target is the device name in the guest (vda, sdb) or a filesystem's
	// mount tag.
	Target string
	// Err is why a volume's path could not be resolved.
	Err error
}

// Local reports whether Source is a path on this host.
func (d Disk) Local() bool {
	return d.Source != "" && d.Type != "network" && strings.HasPrefix(d.Source, "/")
}

// Domains lists every domain libvirt knows, active and inactive, sorted by
// name.
func (c *Conn) Domains(ctx context.Context) ([]Domain, error) {
	var refs []libvirt.Domain
	err := await(ctx, 0, func() error {
		var err error
		refs, _, err = c.client().ConnectListAllDomains(1, libvirt.ConnectListDomainsActive|libvirt.ConnectListDomainsInactive)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("libvirt: list domains: %w", err)
	}
	doms := make([]Domain, 0, len(refs))
	for _, ref := range refs {
		d, err := c.describe(ctx, ref)
		if err != nil {
			if libvirt.IsNotFound(err) {
				continue // undefined while we were listing
			}
			return nil, err
		}
		doms = append(doms, d)
	}
	slices.SortFunc(doms, func(a, b Domain) int { return strings.Compare(a.Name, b.Name) })
	return doms, nil
}

// Domain looks up one domain by name. A domain that does not exist is an
// error for which IsNotFound is true.
func (c *Conn) Domain(ctx context.Context, name string) (Domain, error) {
	var ref libvirt.Domain
	err := await(ctx, 0, func() error {
		var err error
		ref, err = c.client().DomainLookupByName(name)
		return err
	})
	if err != nil {
		if libvirt.IsNotFound(err) {
			return Domain{}, &NotFoundError{Names: []string{name}}
		}
		return Domain{}, fmt.Errorf("libvirt: look up domain %s: %w", name, err)
	}
	return c.describe(ctx, ref)
}

// NotFoundError names domains that libvirt does not know.
type NotFoundError struct {
	Names []string
	// Known are the domains libvirt has, when the error comes from a
	// selection (to spot a typo).
	Known []string
}

func (e *NotFoundError) Error() string {
	what := "domain"
	if len(e.Names) > 1 {
		what = "domains"
	}
	msg := fmt.Sprintf("libvirt: no %s named %s", what, quoteList(e.Names))
	if e.Known != nil {
		known := e.Known
		more := ""
		if len(known) > 20 {
			known, more = known[:20], fmt.Sprintf(" and %d more", len(e.Known)-20)
		}
		if len(known) == 0 {
			msg += " (libvirt has no domains on this connection)"
		} else {
			msg += fmt.Sprintf(" (libvirt has %s%s)", strings.Join(known, ", "), more)
		}
	}
	return msg
}

// IsOperationInvalid reports whether libvirt refused a call for the
// domain's state: destroying one that is not running, undefining a
// transient one.
func IsOperationInvalid(err error) bool {
	var lerr libvirt.Error
	return errors.As(err, &lerr) && lerr.Code == uint32(libvirt.ErrOperationInvalid)
}

// IsNotFound reports whether err says that a domain does not exist.
func IsNotFound(err error) bool {
	var nf *NotFoundError
	return errors.As(err, &nf) || libvirt.IsNotFound(err)
}

func quoteList(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = fmt.Sprintf("%q", n)
	}
	return strings.Join(q, ", ")
}

// describe reads a domain's state, managed-save flag and disks.
func (c *Conn) describe(ctx context.Context, ref libvirt.Domain) (Domain, error) {
	d := Domain{Name: ref.Name, UUID: formatUUID(ref.UUID), ref: ref}
	var (
		state   int32
		hasSave int32
		desc    string
	)
	lv := c.client()
	err := await(ctx, 0, func() error {
		var err error
		if state, _, err = lv.DomainGetState(ref, 0); err != nil {
			return err
		}
		if hasSave, err = lv.DomainHasManagedSaveImage(ref, 0); err != nil {
			return err
		}
		desc, err = lv.DomainGetXMLDesc(ref, 0)
		return err
	})
	if err != nil {
		if libvirt.IsNotFound(err) {
			return Domain{}, err
		}
		return Domain{}, fmt.Errorf("libvirt: describe domain %s: %w", ref.Name, err)
	}
	d.State = State(state)
	d.ManagedSave = hasSave != 0
	disks, err := parseDisks(desc)
	if err != nil {
		return Domain{}, fmt.Errorf("libvirt: domain %s: %w", ref.Name, err)
	}
	for i := range disks {
		if disks[i].Type == "volume" {
			disks[i].Source, disks[i].Err = c.volumePath(ctx, disks[i].Pool, disks[i].Volume)
		}
	}
	d.Disks = disks
	return d, nil
}

// volumePath asks the storage pool for the path of a volume disk.
func (c *Conn) volumePath(ctx context.Context, pool, vol string) (string, error) {
	var path string
	lv := c.client()
	err := await(ctx, 0, func() error {
		p, err := lv.StoragePoolLookupByName(pool)
		if err != nil {
			return fmt.Errorf("storage pool %q: %w", pool, err)
		}
		v, err := lv.StorageVolLookupByName(p, vol)
		if err != nil {
			return fmt.Errorf("volume %q in storage pool %q: %w", vol, pool, err)
		}
		path, err = lv.StorageVolGetPath(v)
		return err
	})
	return path, err
}

func formatUUID(u libvirt.UUID) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// domainXML is the part of a domain's XML this package reads.
type domainXML struct {
	Devices struct {
		Disks []struct {
			Type   string `xml:"type,attr"`
			Device string `xml:"device,attr"`
			Source *struct {
				File     string `xml:"file,attr"`
				Dev      string `xml:"dev,attr"`
				Dir      string `xml:"dir,attr"`
				Pool     string `xml:"pool,attr"`
				Volume   string `xml:"volume,attr"`
				Protocol string `xml:"protocol,attr"`
				Name     string `xml:"name,attr"`
				Hosts    []struct {
					Name      string `xml:"name,attr"`
					Port      string `xml:"port,attr"`
					Transport string `xml:"transport,attr"`
					Socket    string `xml:"socket,attr"`
				} `xml:"host"`
			} `xml:"source"`
			Target struct {
				Dev string `xml:"dev,attr"`
			} `xml:"target"`
		} `xml:"disk"`
		Filesystems []struct {
			Type   string `xml:"type,attr"`
			Source struct {
				Dir  string `xml:"dir,attr"`
				File string `xml:"file,attr"`
				Dev  string `xml:"dev,attr"`
			} `xml:"source"`
			Target struct {
				Dir string `xml:"dir,attr"`
			} `xml:"target"`
		} `xml:"filesystem"`
	} `xml:"devices"`
}

// parseDisks reads the disks and shared filesystems of a domain's XML.
// Volume disks get Pool and Volume; their Source is resolved by the caller.
func parseDisks(desc string) ([]Disk, error) {
	var x domainXML
	if err := xml.Unmarshal([]byte(desc), &x); err != nil {
		return nil, fmt.Errorf("parse domain XML: %w", err)
	}
	var disks []Disk
	for _, dx := range x.Devices.Disks {
		d := Disk{Type: dx.Type, Device: dx.Device, Target: dx.Target.Dev}
		if d.Type == "" {
			d.Type = "file" // libvirt's default
		}
		if d.Device == "" {
			d.Device = "disk"
		}
		if s := dx.Source; s != nil {
			switch d.Type {
			case "file":
				d.Source = s.File
			case "block":
				d.Source = s.Dev
			case "dir":
				d.Source = s.Dir
			case "volume":
				d.Pool, d.Volume = s.Pool, s.Volume
			case "network":
				host := ""
				if len(s.Hosts) > 0 {
					h := s.Hosts[0]
					host = h.Name
					if h.Port != "" {
						host += ":" + h.Port
					}
					if h.Socket != "" {
						host = h.Socket
					}
				}
				d.Source = s.Protocol + "://" + host + "/" + strings.TrimPrefix(s.Name, "/")
			default:
				d.Source = firstNonEmpty(s.File, s.Dev, s.Dir)
			}
		}
		disks = append(disks, d)
	}
	for _, fx := range x.Devices.Filesystems {
		t := fx.Type
		if t == "" {
			t = "mount"
		}
		disks = append(disks, Disk{
			Type:   t,
			Device: "filesystem",
			Source: firstNonEmpty(fx.Source.Dir, fx.Source.File, fx.Source.Dev),
			Target: fx.Target.Dir,
		})
	}
	return disks, nil
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}
