package boot

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vmhistory/vmhistory/safefile"
)

// RecordsDir is the directory, under the state directory, that holds one
// record per booted domain (NAME.json) and, by default, its overlays
// (NAME/).
const RecordsDir = "boot"

// Record is what vmhistory boot made for one domain: the proof --stop
// needs before it touches a domain or a file, and what --list shows.
type Record struct {
	Name string `json:"name"`
	UUID string `json:"uuid"`
	Mode Mode   `json:"mode"`
	// VM and Snapshot (DATASET@NAME) are where it came from.
	VM       string `json:"vm"`
	Snapshot string `json:"snapshot"`
	GUID     uint64 `json:"guid,omitempty"`
	// Persistent: the domain was defined (a fresh boot); a saved state is
	// restored as a transient domain.
	Persistent bool `json:"persistent"`
	// Mount is the vmhistory mount its backing files are read through.
	Mount string `json:"mount"`
	// Dir holds the overlays and the files below; vmhistory made it.
	Dir   string `json:"dir"`
	Disks []Disk `json:"disks"`
	// Files are the other files made for it in Dir (console logs, NVRAM).
	Files   []string  `json:"files,omitempty"`
	Network string    `json:"network,omitempty"`
	Created time.Time `json:"created"`
	// LiveRestore, when set, is the copy of its disks out of the mount.
	LiveRestore *LiveRestore `json:"live_restore,omitempty"`
}

// LiveRestore records a --live-restore.
type LiveRestore struct {
	Dir string `json:"dir"`
	// Disks maps a disk's target to its copy.
	Disks map[string]string `json:"disks"`
	// Done: every disk was pivoted to its copy; the domain no longer
	// reads the mount.
	Done     bool      `json:"done"`
	Finished time.Time `json:"finished,omitempty"`
}

// DependsOnMount reports whether the domain may still read its disks
// through the mount.
func (r *Record) DependsOnMount() bool {
	return r.LiveRestore == nil || !r.LiveRestore.Done
}

// BackingFiles are the files in the mount the domain reads.
func (r *Record) BackingFiles() []string {
	var paths []string
	for _, d := range r.Disks {
		for _, l := range d.Chain {
			paths = append(paths, l.Path)
		}
	}
	return paths
}

// Registry is the records under a state directory.
type Registry struct{ dir string }

// NewRegistry is the registry of stateDir.
func NewRegistry(stateDir string) Registry { return Registry{dir: filepath.Join(stateDir, RecordsDir)} }

// Dir is where records (and default overlay directories) live.
func (g Registry) Dir() string { return g.dir }

func (g Registry) path(name string) string { return filepath.Join(g.dir, safeFileName(name)+".json") }

// ensure makes the registry's directory: root's, but traversable, since
// QEMU (libvirt-qemu) opens the overlays below it.
func (g Registry) ensure() error {
	if err := os.MkdirAll(filepath.Dir(g.dir), 0o755); err != nil {
		return err
	}
	if err := os.Mkdir(g.dir, 0o711); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	fi, err := os.Lstat(g.dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory (%s)", g.dir, safefile.Describe(fi.Mode()))
	}
	return nil
}

// Save writes r, replacing its earlier record atomically.
func (g Registry) Save(r *Record) error {
	if err := g.ensure(); err != nil {
		return fmt.Errorf("boot records: %w", err)
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := safefile.WriteFileAtomic(g.path(r.Name), append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("boot record of %s: %w", r.Name, err)
	}
	return nil
}

// ErrNoRecord: vmhistory booted no domain of that name.
var ErrNoRecord = errors.New("no such booted domain")

// Load reads name's record.
func (g Registry) Load(name string) (*Record, error) {
	data, err := safefile.ReadFile(g.path(name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w (vmhistory boot --list shows those it booted)", name, ErrNoRecord)
	}
	if err != nil {
		return nil, err
	}
	r := &Record{}
	if err := json.Unmarshal(data, r); err != nil {
		return nil, fmt.Errorf("boot record %s: %w", g.path(name), err)
	}
	if r.Name != name {
		return nil, fmt.Errorf("boot record %s names %q, not %q", g.path(name), r.Name, name)
	}
	return r, nil
}

// List reads every record, by name. A record that cannot be read is
// reported, the others still listed.
func (g Registry) List() ([]*Record, []error) {
	ents, err := os.ReadDir(g.dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, []error{err}
	}
	var recs []*Record
	var errs []error
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || strings.HasPrefix(name, ".") || !e.Type().IsRegular() {
			continue
		}
		r, err := g.Load(name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		recs = append(recs, r)
	}
	slices.SortFunc(recs, func(a, b *Record) int { return strings.Compare(a.Name, b.Name) })
	return recs, errs
}

// Remove deletes name's record.
func (g Registry) Remove(name string) error {
	if err := os.Remove(g.path(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return safefile.SyncDir(g.dir)
}

// Dependents are the booted domains that read files of the mount at dir
// that are open there now (open, the mount's open files): the mount must
// not go while they run. A domain that stopped has closed its files; one
// whose live restore finished reads none.
func (g Registry) Dependents(dir string, open []string) []string {
	recs, _ := g.List()
	var names []string
	for _, r := range recs {
		if filepath.Clean(r.Mount) != filepath.Clean(dir) || !r.DependsOnMount() {
			continue
		}
		for _, p := range r.BackingFiles() {
			if slices.Contains(open, p) {
				names = append(names, r.Name)
				break
			}
		}
	}
	return names
}
