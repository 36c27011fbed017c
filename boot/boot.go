// Package boot runs a VM straight from a snapshot: a libvirt domain
// whose disks are qcow2 overlays over the snapshot's images, read through
// the vmhistory mount from the fastest source that holds them.
package boot

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/virt"
)

// Options say what to boot and where.
type Options struct {
	Conn     *libvirt.Libvirt
	Runner   runner.Runner // runs qemu-img
	Registry Registry
	// Mount is the vmhistory mount's directory; SnapDir the snapshot's
	// directory in it.
	Mount   string
	SnapDir string
	// Snapshot (DATASET@NAME) and GUID name it in the record.
	Snapshot string
	GUID     uint64
	// Mountpoint is the dataset's mountpoint when the snapshot was taken:
	// the definition's disk paths are under it.
	Mountpoint string
	VM         string
	// Name is the new domain's name for a fresh boot ("" for VM-SNAPSHOT);
	// a name other than VM means a fresh boot.
	Name      string
	FreshBoot bool
	// Network is the libvirt network the domain's NICs join; "" keeps
	// it off the network.
	Network string
	// Dir is where the domain's directory (overlays, console logs) is
	// made; "" is the registry's directory.
	Dir string
	// QEMUUser is the user QEMU runs as ("" reads qemu.conf).
	QEMUUser string
	// MountChecksItself: see RunningMount.
	MountChecksItself bool
	Log               *slog.Logger
}

// Booted is a domain Boot started.
type Booted struct {
	*Record
	// Why says why this mode was chosen.
	Why string
}

// definition files in a snapshot (see backup's definitions step).
func definitionPath(snapDir, vm string) string {
	return virt.DefinitionFile(snapDir, vm)
}

func savePath(snapDir, vm string) string { return virt.SaveFile(snapDir, vm) }

// Boot defines and starts the domain (see the package comment). Whatever
// it made is removed again when it fails.
func Boot(ctx context.Context, o Options) (*Booted, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	defXML, err := os.ReadFile(definitionPath(o.SnapDir, o.VM))
	if errors.Is(err, os.ErrNotExist) {
		return nil, noDefinitionError(o)
	}
	if err != nil {
		return nil, fmt.Errorf("definition of %s in %s: %w", o.VM, o.Snapshot, err)
	}
	def := &libvirtxml.Domain{}
	if err := def.Unmarshal(string(defXML)); err != nil {
		return nil, fmt.Errorf("definition of %s in %s: %w", o.VM, o.Snapshot, err)
	}
	mode, name, why, err := chooseMode(o, def)
	if err != nil {
		return nil, err
	}
	if _, err := o.Registry.Load(name); err == nil {
		return nil, fmt.Errorf("vmhistory booted a domain named %s already; stop it first: vmhistory boot --stop %s", name, name)
	}
	dom := def
	if mode == SavedState {
		saved, err := o.Conn.DomainSaveImageGetXMLDesc(savePath(o.SnapDir, o.VM), 0)
		if err != nil {
			return nil, fmt.Errorf("saved state of %s in %s: %w", o.VM, o.Snapshot, err)
		}
		dom = &libvirtxml.Domain{}
		if err := dom.Unmarshal(saved); err != nil {
			return nil, fmt.Errorf("saved state of %s in %s: %w", o.VM, o.Snapshot, err)
		}
	}
	parent := o.Dir
	if parent == "" {
		if err := o.Registry.ensure(); err != nil {
			return nil, fmt.Errorf("boot records: %w", err)
		}
		parent = o.Registry.Dir()
	}
	dir := filepath.Join(parent, safeFileName(name))
	rec := &Record{Name: name, UUID: dom.UUID, Mode: mode, VM: o.VM, Snapshot: o.Snapshot, GUID: o.GUID,
		Persistent: mode == FreshBoot, Mount: o.Mount, Dir: dir, Network: o.Network, Created: time.Now().UTC()}
	if mode == FreshBoot {
		rec.UUID = newUUID()
	}
	rec.Disks, err = planDisks(dom, layout{mountpoint: o.Mountpoint, snapDir: o.SnapDir}, dir)
	if err != nil {
		return nil, err
	}
	if len(rec.Disks) == 0 {
		return nil, fmt.Errorf("%s in %s has no disk on the snapshot's dataset", o.VM, o.Snapshot)
	}
	if err := checkQEMUCanRead(o, rec.Disks); err != nil {
		return nil, err
	}
	if err := checkReachable(dir, o.qemu()); err != nil {
		return nil, err
	}
	rec.Files = redirectChardevs(dom, dir)
	if mode == SavedState {
		savedStateNICs(dom, o.Network)
	} else {
		freshNICs(dom, o.Network)
		rec.Files = append(rec.Files, freshIdentity(dom, name, rec.UUID, dir)...)
	}
	xml, err := dom.Marshal()
	if err != nil {
		return nil, fmt.Errorf("domain XML: %w", err)
	}
	if err := os.Mkdir(dir, 0o711); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("%s exists already: a directory of another boot? choose another --name or --dir", dir)
		}
		return nil, fmt.Errorf("boot directory: %w", err)
	}
	// The record first: whatever happens next, --stop finds what to
	// remove.
	if err := o.Registry.Save(rec); err != nil {
		os.Remove(dir)
		return nil, err
	}
	if err := start(ctx, o, rec, xml); err != nil {
		if cerr := cleanup(o.Conn, o.Registry, rec); cerr != nil {
			o.Log.Warn("cleaning up after a failed boot", "name", name, "err", cerr)
		}
		return nil, err
	}
	return &Booted{Record: rec, Why: why}, nil
}

func noDefinitionError(o Options) error {
	ents, _ := os.ReadDir(filepath.Dir(definitionPath(o.SnapDir, o.VM)))
	var vms []string
	for _, e := range ents {
		if n, ok := strings.CutSuffix(e.Name(), ".xml"); ok && !strings.HasPrefix(n, ".") {
			vms = append(vms, n)
		}
	}
	if len(vms) == 0 {
		return fmt.Errorf("snapshot %s holds no VM definition (it was taken without vmhistory's definitions step, or before any VM was selected)", o.Snapshot)
	}
	return fmt.Errorf("snapshot %s holds no definition of VM %s (it holds: %s)", o.Snapshot, o.VM, strings.Join(vms, ", "))
}

// chooseMode applies libvirt's rule (it restores a saved state only as
// the same domain, and not while that domain is defined): the saved state
// when the snapshot holds one and no domain with its UUID is defined here
// (the dead-host case), else a fresh boot as a new domain.
func chooseMode(o Options, def *libvirtxml.Domain) (Mode, string, string, error) {
	_, statErr := os.Stat(savePath(o.SnapDir, o.VM))
	hasSave := statErr == nil
	defined := false
	if uuid, err := parseUUID(def.UUID); err == nil {
		_, err := o.Conn.DomainLookupByUUID(uuid)
		defined = err == nil
		if err != nil && !libvirt.IsNotFound(err) {
			return "", "", "", fmt.Errorf("look up domain %s: %w", def.UUID, err)
		}
	}
	var why string
	switch {
	case o.FreshBoot:
		why = "--fresh-boot"
	case o.Name != "" && o.Name != o.VM:
		why = "--name " + o.Name + " (a saved state comes back only under its own name)"
	case !hasSave:
		why = "the snapshot holds no saved state of " + o.VM
	case defined:
		why = fmt.Sprintf("%s is defined on this host (UUID %s): a saved state cannot come back beside it", o.VM, def.UUID)
	default:
		if taken(o.Conn, o.VM) {
			return "", "", "", fmt.Errorf("a domain named %s with another UUID is defined here: its saved state cannot come back under that name; pass --fresh-boot", o.VM)
		}
		return SavedState, o.VM, "the snapshot holds " + o.VM + "'s saved state and no domain with its UUID is defined here", nil
	}
	name := o.Name
	if name == "" {
		name = defaultName(o.VM, o.Snapshot)
	}
	if err := checkDomainName(name); err != nil {
		return "", "", "", err
	}
	if taken(o.Conn, name) {
		return "", "", "", fmt.Errorf("a domain named %s exists on this host; choose another with --name", name)
	}
	return FreshBoot, name, why, nil
}

func taken(l *libvirt.Libvirt, name string) bool {
	_, err := l.DomainLookupByName(name)
	return err == nil
}

var unsafeNameChars = regexp.MustCompile(`[^A-Za-z0-9._+-]+`)

// defaultName is VM-SNAPSHOT, the snapshot's name made safe for a domain
// name and a file name.
func defaultName(vm, snapshot string) string {
	snap := snapshot
	if _, after, ok := strings.Cut(snapshot, "@"); ok {
		snap = after
	}
	snap = strings.Trim(unsafeNameChars.ReplaceAllString(snap, "-"), "-")
	if snap == "" {
		snap = "boot"
	}
	return vm + "-" + snap
}

func checkDomainName(name string) error {
	if name == "" || strings.ContainsAny(name, "/\x00") || strings.HasPrefix(name, ".") || len(name) > 200 {
		return fmt.Errorf("domain name %q is not usable (no \"/\", not starting with \".\", at most 200 bytes)", name)
	}
	return nil
}

// start creates the overlays and starts the domain.
func start(ctx context.Context, o Options, rec *Record, xml string) error {
	for _, d := range rec.Disks {
		if d.Overlay == "" {
			continue
		}
		top := d.Chain[0]
		if _, err := o.Runner.Run(ctx, runner.Cmd{Args: []string{"qemu-img", "create", "-q", "-f", "qcow2",
			"-u", "-b", top.Path, "-F", top.Format, d.Overlay, strconv.FormatInt(d.Size, 10)}, Timeout: time.Minute}); err != nil {
			return fmt.Errorf("overlay of disk %s: %w", d.Target, err)
		}
	}
	if rec.Mode == SavedState {
		// libvirt streams the RAM image to QEMU in small reads, one
		// after the other; read ahead of it through the mount so that
		// its reads come from the page cache the mount keeps.
		warmCtx, stopWarm := context.WithCancel(ctx)
		defer stopWarm()
		go readAhead(warmCtx, savePath(o.SnapDir, o.VM))
		if err := o.Conn.DomainRestoreFlags(savePath(o.SnapDir, o.VM), libvirt.OptString{xml}, uint32(libvirt.DomainSaveRunning)); err != nil {
			return fmt.Errorf("restore the saved state of %s: %w", o.VM, err)
		}
		return nil
	}
	dom, err := o.Conn.DomainDefineXML(xml)
	if err != nil {
		return fmt.Errorf("define %s: %w", rec.Name, err)
	}
	if err := o.Conn.DomainCreate(dom); err != nil {
		return fmt.Errorf("start %s: %w", rec.Name, err)
	}
	return nil
}

// readAhead reads path to its end (or until ctx ends), for its pages.
func readAhead(ctx context.Context, path string) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for ctx.Err() == nil {
		if _, err := f.Read(buf); err != nil {
			return
		}
	}
}

// lookup finds rec's domain: by UUID, and only if it still has rec's
// name — anything else is not a domain vmhistory made.
func lookup(l *libvirt.Libvirt, rec *Record) (libvirt.Domain, bool, error) {
	uuid, err := parseUUID(rec.UUID)
	if err != nil {
		return libvirt.Domain{}, false, fmt.Errorf("boot record of %s: %w", rec.Name, err)
	}
	dom, err := l.DomainLookupByUUID(uuid)
	if libvirt.IsNotFound(err) {
		return libvirt.Domain{}, false, nil
	}
	if err != nil {
		return libvirt.Domain{}, false, fmt.Errorf("look up %s: %w", rec.Name, err)
	}
	if dom.Name != rec.Name {
		return libvirt.Domain{}, false, fmt.Errorf("the domain with %s's UUID %s is named %s now: not touching it", rec.Name, rec.UUID, dom.Name)
	}
	return dom, true, nil
}

// Stop stops and removes a domain vmhistory booted, and the files it made
// for it: the overlays, console logs and NVRAM in its directory. A live
// restore's copies are the admin's disks now and are kept.
func Stop(ctx context.Context, l *libvirt.Libvirt, g Registry, name string) (*Record, error) {
	rec, err := g.Load(name)
	if err != nil {
		return nil, err
	}
	return rec, cleanup(l, g, rec)
}

func cleanup(l *libvirt.Libvirt, g Registry, rec *Record) error {
	dom, found, err := lookup(l, rec)
	if err != nil {
		return err
	}
	if found {
		if err := l.DomainDestroy(dom); err != nil && !virt.IsOperationInvalid(err) {
			return fmt.Errorf("stop %s: %w", rec.Name, err)
		}
		if err := l.DomainUndefineFlags(dom, libvirt.DomainUndefineNvram|libvirt.DomainUndefineManagedSave); err != nil &&
			!libvirt.IsNotFound(err) && !virt.IsOperationInvalid(err) {
			return fmt.Errorf("undefine %s: %w", rec.Name, err)
		}
	}
	var errs []error
	for _, p := range rec.madeFiles() {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(rec.Dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("%s: %w (it holds files vmhistory did not make; left alone)", rec.Dir, err))
	}
	if len(errs) == 0 {
		errs = append(errs, g.Remove(rec.Name))
	}
	return errors.Join(errs...)
}

// madeFiles are the files vmhistory made in rec.Dir, and only those.
func (r *Record) madeFiles() []string {
	var paths []string
	for _, d := range r.Disks {
		if d.Overlay != "" {
			paths = append(paths, d.Overlay)
		}
	}
	paths = append(paths, r.Files...)
	return slices.DeleteFunc(paths, func(p string) bool { return filepath.Dir(p) != r.Dir })
}

// Listed is a record with its domain's state now.
type Listed struct {
	*Record
	// State is the domain's state ("running", "shut off", ...), "gone"
	// when no domain with its UUID and name is defined.
	State string `json:"state"`
}

// List returns every domain vmhistory booted, with its state.
func List(l *libvirt.Libvirt, g Registry) ([]Listed, []error) {
	recs, errs := g.List()
	out := make([]Listed, 0, len(recs))
	for _, r := range recs {
		st := "gone"
		dom, found, err := lookup(l, r)
		switch {
		case err != nil:
			st = "unknown: " + err.Error()
		case found:
			s, _, err := l.DomainGetState(dom, 0)
			if err != nil {
				st = "unknown: " + err.Error()
			} else {
				st = virt.State(s).String()
			}
		}
		out = append(out, Listed{Record: r, State: st})
	}
	return out, errs
}

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func parseUUID(s string) (libvirt.UUID, error) {
	var u libvirt.UUID
	hex := strings.ReplaceAll(s, "-", "")
	if len(hex) != 32 {
		return u, fmt.Errorf("bad UUID %q", s)
	}
	for i := range 16 {
		v, err := strconv.ParseUint(hex[2*i:2*i+2], 16, 8)
		if err != nil {
			return u, fmt.Errorf("bad UUID %q", s)
		}
		u[i] = byte(v)
	}
	return u, nil
}
