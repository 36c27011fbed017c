package boot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhistory/vmhistory/fusefs"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/virt"
)

// Located is a snapshot found in a running mount.
type Located struct {
	Mount      string
	SnapDir    string
	Snapshot   string
	GUID       uint64
	Mountpoint string
}

// RunningMount is a vmhistory mount CheckMount found.
type RunningMount struct {
	Dir string
	// ChecksItself: the mount decides access itself (vmhistory mount
	// --allow-qemu), so that only opening a file as QEMU's user tells
	// whether QEMU may; else the kernel applies the files' modes.
	ChecksItself bool
}

// CheckMount refuses a directory where no vmhistory mount runs, and a
// root-only mount when QEMU runs as another user (qemu "" reads
// qemu.conf).
func CheckMount(dir, qemu string) (RunningMount, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return RunningMount{}, err
	}
	m, err := fusefs.Running(abs)
	if err != nil {
		return RunningMount{}, err
	}
	if m == nil {
		return RunningMount{}, fmt.Errorf("no vmhistory mount at %s: start one first (vmhistory mount %s --allow-qemu), or name yours with --mount", abs, abs)
	}
	qemu = (Options{QEMUUser: qemu}).qemu()
	if !m.AllowOther && qemu != "root" {
		return RunningMount{}, fmt.Errorf("the vmhistory mount at %s (process %d) is root-only and QEMU runs as %s: restart it with --allow-qemu", abs, m.PID, qemu)
	}
	return RunningMount{Dir: abs, ChecksItself: m.AllowOther && !m.DefaultPermissions}, nil
}

// Locate finds the snapshot spec names (restore.SpecHelp) in the mount at
// mount (checked by CheckMount), proving by its extended attribute that
// the directory there is that snapshot, and the dataset's mountpoint when
// it was taken: as recorded in the snapshot, else the dataset's
// mountpoint on this host now (zfs get, through r).
func Locate(ctx context.Context, tl *restore.Timeline, mount, spec, dataset string, r runner.Runner, zfsBinary string) (*Located, error) {
	e, err := tl.Resolve(spec, dataset)
	if err != nil {
		return nil, err
	}
	rel, ok := fusefs.SnapshotDir(tl, e)
	if !ok {
		return nil, fmt.Errorf("snapshot %s is hidden in the mount (a newer snapshot or a dataset directory has its name)", e.FullName())
	}
	loc := &Located{Mount: mount, SnapDir: filepath.Join(mount, rel), Snapshot: e.FullName(), GUID: e.GUID}
	want := fusefs.SnapshotKey(e)
	var got string
	// The mount's timeline may lag the one just built by its refresh
	// interval: a brand-new snapshot shows there a little later.
	deadline := time.Now().Add(5 * time.Second)
	for {
		buf := make([]byte, 512)
		n, err := unix.Getxattr(loc.SnapDir, fusefs.XattrSnapshot, buf)
		if err == nil {
			got = string(buf[:n])
			break
		}
		if !errors.Is(err, unix.ENOENT) || time.Now().After(deadline) {
			return nil, fmt.Errorf("snapshot %s is not in the mount at %s (%s: %v); it shows there within the mount's --refresh", e.FullName(), mount, loc.SnapDir, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if got != want {
		return nil, fmt.Errorf("%s in the mount is snapshot %s, not %s: the mount's timeline differs from this one; try again after its --refresh", loc.SnapDir, got, want)
	}
	data, err := os.ReadFile(virt.MountpointFile(loc.SnapDir))
	switch {
	case err == nil:
		loc.Mountpoint = strings.TrimSpace(string(data))
	case errors.Is(err, os.ErrNotExist):
		if zfsBinary == "" {
			zfsBinary = "zfs"
		}
		out, zerr := r.Run(ctx, runner.Cmd{Args: []string{zfsBinary, "get", "-H", "-o", "value", "mountpoint", e.Dataset}, Timeout: time.Minute})
		if zerr != nil {
			return nil, fmt.Errorf("snapshot %s does not record its dataset's mountpoint (taken by an older vmhistory), and this host cannot tell it: %w", e.FullName(), zerr)
		}
		loc.Mountpoint = strings.TrimSpace(string(out))
	default:
		return nil, fmt.Errorf("snapshot %s: %w", e.FullName(), err)
	}
	if !filepath.IsAbs(loc.Mountpoint) {
		return nil, fmt.Errorf("snapshot %s: dataset mountpoint %q is not a path", e.FullName(), loc.Mountpoint)
	}
	return loc, nil
}
