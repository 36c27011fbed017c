package virt

import (
	"context"
	"fmt"
	"path/filepath"

	libvirt "github.com/digitalocean/go-libvirt"
)

// DefinitionsDir is the directory, under SaveDirName at the top of a
// dataset, that holds the domains' definitions: a snapshot then holds
// everything needed to bring its VMs back, here or on another host.
const DefinitionsDir = "domains"

// DefinitionFile is where a domain's definition is kept on the dataset
// mounted at mountpoint: <mountpoint>/.vmhistory/domains/<vm>.xml.
func DefinitionFile(mountpoint, vm string) string {
	return filepath.Join(mountpoint, SaveDirName, DefinitionsDir, vm+".xml")
}

// MountpointFile is where the dataset's mountpoint is recorded beside the
// definitions, <mountpoint>/.vmhistory/mountpoint: the definitions' disk
// paths are under it, so a snapshot's own files say where each disk is in
// it, wherever the dataset is mounted later (or not at all).
func MountpointFile(mountpoint string) string {
	return filepath.Join(mountpoint, SaveDirName, "mountpoint")
}

// Definition returns the persistent definition of d, as `virsh dumpxml
// --inactive` prints it: what the domain is defined as, not what it runs
// as now, and without secrets (no VIR_DOMAIN_XML_SECURE: VNC and SPICE
// passwords stay out of the snapshot).
func (c *Conn) Definition(ctx context.Context, d Domain) (string, error) {
	var desc string
	lv := c.client()
	err := await(ctx, 0, func() error {
		ref := d.ref
		if ref.Name == "" {
			var err error
			if ref, err = lv.DomainLookupByName(d.Name); err != nil {
				return err
			}
		}
		var err error
		desc, err = lv.DomainGetXMLDesc(ref, libvirt.DomainXMLInactive)
		return err
	})
	if err != nil {
		if libvirt.IsNotFound(err) {
			return "", &NotFoundError{Names: []string{d.Name}}
		}
		return "", fmt.Errorf("libvirt: definition of domain %s: %w", d.Name, err)
	}
	return desc, nil
}
