package boot

import (
	"bufio"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strings"
)

// QEMUConf is libvirt's QEMU driver configuration, where the user QEMU
// runs as is set.
const QEMUConf = "/etc/libvirt/qemu.conf"

// defaultQEMUUser is Debian's build default (libvirt-daemon-system).
const defaultQEMUUser = "libvirt-qemu"

var qemuUserRE = regexp.MustCompile(`^\s*user\s*=\s*"([^"]*)"`)

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
			if err := otherCanRead(o.Mount, l.Path, name); err != nil {
				return err
			}
		}
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
		return fmt.Errorf("QEMU runs as %s and cannot read %s through the mount: the snapshot has it as mode %04o (the mount shows it as root's); make the live image readable by others (chmod o+r) so that later snapshots can be booted, or restore it with vmhistory restore",
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
