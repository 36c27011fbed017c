package backup

import (
	"strings"
	"testing"
)

// TestManagedSaveWarning: managedsave on qemu:///system warns unless the
// managed-save directory is on one of the datasets.
func TestManagedSaveWarning(t *testing.T) {
	for _, c := range []struct {
		mode, uri   string
		mountpoints []string
		warn        bool
	}{
		{"managedsave", "qemu:///system", []string{"/var/tmp/x"}, true},
		{"managedsave", "qemu:///system", []string{"/var/lib/lib"}, true},
		{"managedsave", "qemu+unix:///system", nil, true},
		{"managedsave", "qemu:///system", []string{"/srv", "/var/lib/libvirt"}, false},
		{"managedsave", "qemu:///system", []string{"/var/lib/libvirt/qemu/save"}, false},
		{"managedsave", "qemu:///system", []string{"/"}, false},
		{"save", "qemu:///system", []string{"/var/tmp/x"}, false},
		{"managedsave", "test:///default", []string{"/var/tmp/x"}, false},
		{"managedsave", "qemu:///session", []string{"/var/tmp/x"}, false},
	} {
		w := ManagedSaveWarning(c.mode, c.uri, c.mountpoints)
		if (w != "") != c.warn || (c.warn && !strings.Contains(w, ManagedSaveDir)) {
			t.Errorf("ManagedSaveWarning(%s, %s, %v) = %q, want a warning: %v", c.mode, c.uri, c.mountpoints, w, c.warn)
		}
	}
}
