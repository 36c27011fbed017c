package backup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/vmhistory/vmhistory/safefile"
	"github.com/vmhistory/vmhistory/virt"
)

// writeDefinitions writes the persistent definition of each of st's
// selected VMs into the dataset (virt.DefinitionFile), so that the
// snapshot taken next holds them, and removes the definitions of VMs no
// longer selected. It returns the VMs written.
func (p *Pipeline) writeDefinitions(ctx context.Context, st *datasetState) ([]string, error) {
	defs := map[string]string{}
	var errs []error
	var selected []string
	for _, d := range st.selected {
		selected = append(selected, d.Name)
		xml, err := p.Virt.Definition(ctx, d)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		defs[d.Name] = xml
	}
	written, err := writeDefinitionFiles(st.mountpoint, defs, selected)
	return written, errors.Join(append(errs, err)...)
}

// writeDefinitionFiles puts defs (VM name → XML) into
// <mountpoint>/.vmhistory/domains, each file replaced atomically (a
// snapshot never holds half a definition), and removes the .xml files
// there of VMs not in selected: the directory is vmhistory's own. A
// selected VM whose definition could not be read keeps its last one.
func writeDefinitionFiles(mountpoint string, defs map[string]string, selected []string) ([]string, error) {
	keep := map[string]bool{}
	for _, name := range selected {
		keep[name] = true
	}
	top := filepath.Join(mountpoint, virt.SaveDirName)
	dir := filepath.Join(top, virt.DefinitionsDir)
	for _, d := range []string{top, dir} {
		if err := ownDir(d); err != nil {
			return nil, fmt.Errorf("definitions: %w", err)
		}
	}
	var errs []error
	if err := replaceFile(virt.MountpointFile(mountpoint), []byte(filepath.Clean(mountpoint)+"\n"), 0o600); err != nil {
		errs = append(errs, fmt.Errorf("definitions: record the mountpoint: %w", err))
	}
	var names []string
	for name := range defs {
		names = append(names, name)
	}
	sort.Strings(names)
	var written []string
	for _, name := range names {
		if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") || strings.HasPrefix(name, ".") {
			errs = append(errs, fmt.Errorf("definitions: domain name %q cannot name a file", name))
			continue
		}
		if err := replaceFile(filepath.Join(dir, name+".xml"), []byte(defs[name]), 0o600); err != nil {
			errs = append(errs, fmt.Errorf("definition of %s: %w", name, err))
			continue
		}
		written = append(written, name)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return written, errors.Join(append(errs, fmt.Errorf("definitions: %w", err))...)
	}
	for _, e := range entries {
		name, isDef := strings.CutSuffix(e.Name(), ".xml")
		temp := strings.HasPrefix(e.Name(), ".") && strings.Contains(e.Name(), ".tmp-")
		if !e.Type().IsRegular() || (!temp && (!isDef || keep[name])) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("definitions: remove the definition of a VM no longer selected: %w", err))
		}
	}
	return written, errors.Join(errs...)
}

// ownDir creates dir with mode 0700 if missing and refuses anything but a
// real directory (not a symbolic link to one).
func ownDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory (%v)", dir, fi.Mode().Type())
	}
	return nil
}

// replaceFile writes data to path atomically, never through a planted
// link (see safefile.WriteFileAtomic): readers, and snapshots, see the old
// definition or the new one.
func replaceFile(path string, data []byte, perm os.FileMode) error {
	return safefile.WriteFileAtomic(path, data, perm)
}

// definitionsTimeout bounds reading and writing one dataset's definitions.
const definitionsTimeout = 2 * time.Minute
