package boot

import (
	"bufio"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// QEMUConf is libvirt's QEMU driver configuration, where the user QEMU
// runs as is set.
const QEMUConf = "/etc/libvirt/qemu.conf"

// defaultQEMUUser is Debian's build default (libvirt-daemon-system).
const defaultQEMUUser = "libvirt-qemu"

var qemuUserRE = regexp.MustCompile(`^\s*user\s*=\s*"([^"]*)"`)

// QEMUUser is the user libvirt runs QEMU as: qemu.conf's, else Debian's
// default.
func QEMUUser() string { return Options{}.qemu() }

// QEMUUID is QEMUUser's uid, for the mount's --allow-qemu.
func QEMUUID() (uint32, error) {
	name := QEMUUser()
	u, err := user.Lookup(name)
	if err != nil {
		return 0, fmt.Errorf("QEMU's user %s (%s): %w", name, QEMUConf, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	return uint32(uid), err
}

// qemuUser is the user qemu.conf names, else Debian's default.
func qemuUser() string {
	f, err := os.Open(QEMUConf)
	if err != nil {
		return defaultQEMUUser
	}
	defer f.Close()
	u := defaultQEMUUser
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := qemuUserRE.FindStringSubmatch(sc.Text()); m != nil {
			u = m[1]
		}
	}
	return u
}

// checkQEMUCanRead refuses a boot whose backing files QEMU could not
// open: the mount shows every file as root's with the snapshot's mode,
// and the kernel enforces the modes (default_permissions), so a user
// other than root reads a file only through its "other" bits, and every
// directory above it must let it through. libvirt cannot chown its way in
// on a read-only mount; failing here says which file, not QEMU's
// "Permission denied" halfway through a start.
func checkQEMUCanRead(o Options, disks []Disk) error {
	name := o.qemu()
	if name == "root" || name == "0" {
		return nil
	}
	for _, d := range disks {
		for _, l := range d.Chain {
			var err error
			if o.MountChecksItself {
				err = openAs(l.Path, name)
			} else {
				err = otherCanRead(o.Mount, l.Path, name)
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// openAs opens path read-only with the file system identity of user, as
// QEMU will: on a thread of its own whose fsuid and fsgid are set (FUSE
// passes those to the mount).
func openAs(path, name string) error {
	u, err := user.Lookup(name)
	if err != nil {
		return fmt.Errorf("QEMU's user %s: %w", name, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	errc := make(chan error, 1)
	go func() {
		// The thread's identity changes: it must not run other
		// goroutines, and it dies with this one (no UnlockOSThread).
		runtime.LockOSThread()
		unix.Setfsgid(gid)
		unix.Setfsuid(uid)
		f, err := os.Open(path)
		if err == nil {
			f.Close()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		return fmt.Errorf("QEMU runs as %s and cannot open %s through the mount: %w", name, path, err)
	}
	return nil
}

func (o Options) qemu() string {
	name := o.QEMUUser
	if name == "" {
		name = qemuUser()
	}
	name = strings.TrimPrefix(name, "+")
	if u, err := user.Lookup(name); err == nil && u.Uid == "0" {
		return "root"
	}
	return name
}

func otherCanRead(top, path, qemu string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.Mode().Perm()&0o004 == 0 {
		return fmt.Errorf("QEMU runs as %s and cannot read %s through the mount: the snapshot has it as mode %04o (the mount shows it as root's): restart the mount with --allow-qemu, which lets QEMU's user read every file whatever its mode",
			qemu, path, fi.Mode().Perm())
	}
	for dir := filepath.Dir(path); strings.HasPrefix(dir, top) && dir != top; dir = filepath.Dir(dir) {
		di, err := os.Stat(dir)
		if err != nil {
			return err
		}
		if di.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("QEMU runs as %s and cannot reach %s through the mount: directory %s has mode %04o in the snapshot", qemu, path, dir, di.Mode().Perm())
		}
	}
	return nil
}

// checkReachable refuses a boot directory QEMU could not open its
// overlays in: every directory above it must let others through.
func checkReachable(dir, qemu string) error {
	if qemu == "root" || qemu == "0" {
		return nil
	}
	for d := filepath.Dir(dir); ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("QEMU runs as %s and cannot reach overlays in %s: %s has mode %04o; pass --dir with a directory others can traverse (chmod o+x), or allow it there", qemu, dir, d, fi.Mode().Perm())
		}
		if d == "/" || d == "." {
			return nil
		}
	}
}
