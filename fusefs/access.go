package fusefs

import (
	"context"
	"os"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// The mount shows every file as root's with the snapshot's mode. With
// AllowOther and no ReadAllUIDs the kernel enforces those modes
// (default_permissions). ReadAllUIDs needs a rule the kernel does not
// have: those users (QEMU's, for vmhistory boot: libvirt makes a VM's
// images 0600 and root's while it is stopped, so a snapshot of a saved VM
// holds them so) read every file and enter every directory, read-only as
// the mount is, and everyone else gets the kernel's rule, checked here.

// permChecker decides access when the kernel does not.
type permChecker struct {
	on      bool
	readAll map[uint32]bool
}

const (
	accessRead  = 4
	accessWrite = 2
	accessExec  = 1
)

// permitted reports whether the caller of ctx may access a node of mode
// for want (accessRead, accessExec, or both).
func (p *permChecker) permitted(ctx context.Context, mode os.FileMode, want uint32) bool {
	if !p.on {
		return true
	}
	c, ok := ctx.(*fuse.Context)
	if !ok {
		return true
	}
	if c.Caller.Uid == 0 || p.readAll[c.Caller.Uid] {
		return true
	}
	perm := uint32(mode.Perm())
	bits := perm & 7
	if c.Caller.Gid == 0 {
		bits |= perm >> 3 & 7
	}
	return bits&want == want
}

// readsAll reports whether the caller of ctx is one of ReadAllUIDs.
func (p *permChecker) readsAll(ctx context.Context) bool {
	c, ok := ctx.(*fuse.Context)
	return ok && p.readAll[c.Caller.Uid]
}

// Access answers access(2) and chdir's checks by the same rule.
func (n *treeNode) Access(ctx context.Context, mask uint32) syscall.Errno {
	if mask&accessWrite != 0 {
		return syscall.EROFS
	}
	if !n.fsys.perms.permitted(ctx, n.info.Mode, mask&(accessRead|accessExec)) {
		return syscall.EACCES
	}
	return 0
}
