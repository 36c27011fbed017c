package backup

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/zfs"
)

// ManagedSaveDir is where libvirt's QEMU driver (qemu:///system) writes
// managed-save images.
const ManagedSaveDir = "/var/lib/libvirt/qemu/save"

// ManagedSaveWarning says, for quiesce mode managedsave on libvirt's QEMU
// system driver, when ManagedSaveDir is not on one of the datasets
// (mountpoints): the snapshots then hold the VMs' disks as of a clean stop
// but not their RAM, which stays outside, overwritten every night. It is
// empty when there is nothing to say.
func ManagedSaveWarning(mode, uri string, mountpoints []string) string {
	if mode != "managedsave" {
		return ""
	}
	u, err := url.Parse(uri)
	if err != nil || !strings.HasPrefix(u.Scheme, "qemu") || u.Path != "/system" {
		return ""
	}
	dir := ManagedSaveDir
	if resolved, err := filepath.EvalSymlinks(dir); err == nil {
		dir = resolved
	}
	for _, mp := range mountpoints {
		if resolved, err := filepath.EvalSymlinks(mp); err == nil {
			mp = resolved
		}
		if rel, err := filepath.Rel(mp, dir); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
			return ""
		}
	}
	return fmt.Sprintf("quiesce mode managedsave: libvirt writes the managed-save images to %s (%s), which is not on a selected dataset (%s): the snapshots hold no RAM state of the VMs; put %s on a selected dataset, or use mode save",
		ManagedSaveDir, dir, strings.Join(mountpoints, ", "), ManagedSaveDir)
}

// ConfigWarnings are what `config check` says about a valid configuration
// on this host without failing it: ManagedSaveWarning, with the datasets'
// mountpoints asked of local.
func ConfigWarnings(ctx context.Context, cfg *config.Config, local *zfs.ZFS) []string {
	if ManagedSaveWarning(string(cfg.Quiesce.Mode), cfg.Libvirt.URI, nil) == "" {
		return nil
	}
	var mountpoints []string
	for _, ds := range cfg.Datasets {
		props, err := local.Get(ctx, ds.Name, "mountpoint")
		if err != nil {
			return []string{fmt.Sprintf("quiesce mode managedsave: cannot tell whether %s (where libvirt writes the managed-save images) is on a selected dataset: %v", ManagedSaveDir, err)}
		}
		mountpoints = append(mountpoints, props["mountpoint"])
	}
	if w := ManagedSaveWarning(string(cfg.Quiesce.Mode), cfg.Libvirt.URI, mountpoints); w != "" {
		return []string{w}
	}
	return nil
}
