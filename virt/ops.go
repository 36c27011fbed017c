package virt

import libvirt "github.com/digitalocean/go-libvirt"

// ops are the go-libvirt calls that read or change one domain's run state.
// *libvirt.Libvirt implements it; tests wrap the real client to add delays
// or failures around the real calls (the test driver answers instantly and
// cannot be made to fail on demand).
type ops interface {
	DomainLookupByName(Name string) (libvirt.Domain, error)
	DomainGetState(Dom libvirt.Domain, Flags uint32) (int32, int32, error)
	DomainHasManagedSaveImage(Dom libvirt.Domain, Flags uint32) (int32, error)
	DomainManagedSave(Dom libvirt.Domain, Flags uint32) error
	DomainCreate(Dom libvirt.Domain) error
	DomainSave(Dom libvirt.Domain, To string) error
	DomainRestore(From string) error
	DomainSuspend(Dom libvirt.Domain) error
	DomainResume(Dom libvirt.Domain) error
	DomainFsfreeze(Dom libvirt.Domain, Mountpoints []string, Flags uint32) (int32, error)
	DomainFsthaw(Dom libvirt.Domain, Mountpoints []string, Flags uint32) (int32, error)
	DomainAbortJob(Dom libvirt.Domain) error
	DomainGetTime(Dom libvirt.Domain, Flags uint32) (int64, uint32, error)
}

var _ ops = (*libvirt.Libvirt)(nil)
