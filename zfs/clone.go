package zfs

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"

	"github.com/vmhistory/vmhistory/runner"
)

// ClonePrefix starts the name of every read-only clone vmhistory makes
// (<pool>/vmhistory-ro-<random>), and CloneOwnerProperty records who made it
// as host/pid/start-time, so a sweep removes only clones whose owner is gone.
const (
	ClonePrefix        = "vmhistory-ro-"
	CloneOwnerProperty = "vmhistory:clone-owner"
)

// SnapshotView is a snapshot's files, readable at Root on the runner's host
// (for a replica reached over ssh, Root is a path on the replica).
type SnapshotView struct {
	// Root is the directory that holds the snapshot's files.
	Root string
	// Clone is the read-only clone behind Root, or "" when Root is the
	// snapshot's .zfs/snapshot directory.
	Clone string

	z *ZFS
}

// Close releases the view: it destroys the clone, if one was made. A clone
// with files still open is busy; Close then fails with ErrBusy and the clone
// stays until a later Close or SweepClones.
func (v *SnapshotView) Close(ctx context.Context) error {
	if v == nil || v.Clone == "" {
		return nil
	}
	if err := v.z.Destroy(ctx, v.Clone); err != nil {
		return fmt.Errorf("remove read-only clone: %w", err)
	}
	v.z.removeMountDir(ctx, v.Root)
	v.Clone = ""
	return nil
}

// OpenSnapshot makes a snapshot's files readable. OpenZFS shows them under
// <mountpoint>/.zfs/snapshot/<name>; zfs-fuse has no such directory, so a
// read-only clone is mounted instead and removed by Close. Which one is used
// is decided by looking for the directory, not by the dialect's name.
func (z *ZFS) OpenSnapshot(ctx context.Context, fullName string) (*SnapshotView, error) {
	dataset, name, ok := strings.Cut(fullName, "@")
	if !ok {
		return nil, fmt.Errorf("%q is not a snapshot name (dataset@name)", fullName)
	}
	if err := ValidateSnapshotName(fullName); err != nil {
		return nil, err
	}
	if _, err := z.Get(ctx, fullName, "guid"); err != nil {
		return nil, fmt.Errorf("open snapshot: %w", err)
	}
	dsProps, err := z.Get(ctx, dataset, "mountpoint", "mounted")
	if err != nil {
		return nil, fmt.Errorf("open snapshot %s: %w", fullName, err)
	}
	if mp := dsProps["mountpoint"]; strings.HasPrefix(mp, "/") && dsProps["mounted"] == "yes" {
		dir := path.Join(mp, ".zfs", "snapshot", name)
		if z.isDir(ctx, dir) {
			return &SnapshotView{Root: dir, z: z}, nil
		}
	}
	return z.cloneSnapshot(ctx, fullName)
}

func (z *ZFS) cloneSnapshot(ctx context.Context, fullName string) (*SnapshotView, error) {
	suffix := make([]byte, 6)
	if _, err := rand.Read(suffix); err != nil {
		return nil, err
	}
	clone := Pool(fullName) + "/" + ClonePrefix + hex.EncodeToString(suffix)
	mountDir := path.Join(z.opts.CloneMountDir, strings.ReplaceAll(clone, "/", "_"))
	owner, err := currentOwner()
	if err != nil {
		return nil, err
	}
	_, err = z.zfs(ctx, "clone",
		"-o", "readonly=on",
		"-o", "mountpoint="+mountDir,
		"-o", CloneOwnerProperty+"="+owner,
		"-o", "vmhistory:clone-of="+fullName,
		fullName, clone)
	if err != nil {
		return nil, fmt.Errorf("open snapshot %s through a read-only clone on %s: %w", fullName, z.Where(), err)
	}
	z.log.Debug("mounted read-only clone", "snapshot", fullName, "clone", clone, "dir", mountDir)
	return &SnapshotView{Root: mountDir, Clone: clone, z: z}, nil
}

// isDir tests a directory on the runner's host.
func (z *ZFS) isDir(ctx context.Context, dir string) bool {
	if _, local := z.run.(*runner.Local); local {
		fi, err := os.Stat(dir)
		return err == nil && fi.IsDir()
	}
	_, err := z.run.Run(ctx, runner.Cmd{Args: []string{"test", "-d", dir}, Timeout: z.opts.CommandTimeout})
	return err == nil
}

func (z *ZFS) removeMountDir(ctx context.Context, dir string) {
	if _, local := z.run.(*runner.Local); local {
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			z.log.Debug("remove clone mount directory", "dir", dir, "err", err)
		}
		return
	}
	if _, err := z.run.Run(ctx, runner.Cmd{Args: []string{"rmdir", dir}, Timeout: z.opts.CommandTimeout}); err != nil {
		z.log.Debug("remove clone mount directory", "dir", dir, "err", err)
	}
}

// SweepClones destroys read-only clones left in pool by vmhistory processes
// on this host that no longer run (a crash, a kill -9). Clones of live
// processes and of other hosts are left alone. It returns what it removed.
func (z *ZFS) SweepClones(ctx context.Context, pool string) ([]string, error) {
	out, err := z.zfs(ctx, "get", "-Hp", "-r", "-d", "1", "-o", "name,value", CloneOwnerProperty+",mountpoint", pool)
	if err != nil {
		return nil, fmt.Errorf("look for stale clones in %s on %s: %w", pool, z.Where(), err)
	}
	owners := map[string]string{}
	mounts := map[string]string{}
	var names []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 2 || !strings.HasPrefix(f[0], pool+"/"+ClonePrefix) {
			continue
		}
		if _, seen := owners[f[0]]; !seen {
			names = append(names, f[0])
			owners[f[0]] = ""
		}
		if strings.HasPrefix(f[1], "/") {
			mounts[f[0]] = f[1]
		} else if f[1] != "-" {
			owners[f[0]] = f[1]
		}
	}
	var removed []string
	var errs []error
	for _, name := range names {
		if owners[name] == "" || ownerAlive(owners[name]) {
			continue
		}
		if err := z.Destroy(ctx, name); err != nil {
			errs = append(errs, err)
			continue
		}
		if mp := mounts[name]; mp != "" {
			z.removeMountDir(ctx, mp)
		}
		z.log.Info("removed stale read-only clone", "clone", name, "owner", owners[name], "where", z.Where())
		removed = append(removed, name)
	}
	return removed, errors.Join(errs...)
}

// currentOwner names this process as host/pid/start, the start time (in
// clock ticks since boot) telling a reused pid from the original one.
func currentOwner() (string, error) {
	host, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("clone owner: %w", err)
	}
	start, err := processStart(os.Getpid())
	if err != nil {
		return "", fmt.Errorf("clone owner: %w", err)
	}
	return fmt.Sprintf("%s/%d/%d", host, os.Getpid(), start), nil
}

// ownerAlive reports whether the owner recorded on a clone still runs. An
// owner on another host, or one that cannot be parsed, counts as alive:
// sweeping what we cannot judge could pull files from under a reader.
func ownerAlive(owner string) bool {
	f := strings.Split(owner, "/")
	if len(f) != 3 {
		return true
	}
	host, _ := os.Hostname()
	if f[0] != host {
		return true
	}
	pid, err1 := strconv.Atoi(f[1])
	start, err2 := strconv.ParseUint(f[2], 10, 64)
	if err1 != nil || err2 != nil {
		return true
	}
	return ProcessAlive(pid, start)
}

// ProcessAlive reports whether process pid of this host runs and started
// at start (clock ticks since boot, field 22 of /proc/PID/stat): a pid
// reused by another process does not count.
func ProcessAlive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	now, err := processStart(pid)
	return err == nil && now == start
}

// processStart reads field 22 (starttime) of /proc/PID/stat.
func processStart(pid int) (uint64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces; fields after it start
	// after the last ')'.
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	fields := strings.Fields(s[i+1:])
	if len(fields) < 20 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// Clone is a filesystem cloned from a snapshot, which keeps the snapshot
// from being destroyed.
type Clone struct {
	Name string
	// Owner is the vmhistory process that made it (host/pid/start), empty
	// for a clone vmhistory did not make.
	Owner string
	// OwnerAlive tells whether Owner still runs (see SweepClones); true
	// when it cannot be judged (another host).
	OwnerAlive bool
}

// Holder names the clone and who keeps it, for a report: "POOL/vmhistory-ro-x
// of process 123 on host (running)".
func (c Clone) Holder() string {
	if c.Owner == "" {
		return c.Name + " (a clone vmhistory did not make)"
	}
	state := "running"
	if !c.OwnerAlive {
		state = "no longer running"
	}
	if f := strings.Split(c.Owner, "/"); len(f) == 3 {
		return fmt.Sprintf("%s of process %s on %s (%s)", c.Name, f[1], f[0], state)
	}
	return fmt.Sprintf("%s of %s (%s)", c.Name, c.Owner, state)
}

// ClonesOf lists the filesystems of the snapshot's pool cloned from it.
func (z *ZFS) ClonesOf(ctx context.Context, snapshot string) ([]Clone, error) {
	pool := Pool(snapshot)
	out, err := z.zfs(ctx, "get", "-Hp", "-r", "-o", "name,property,value", "origin,"+CloneOwnerProperty, pool)
	if err != nil {
		return nil, fmt.Errorf("look for clones of %s on %s: %w", snapshot, z.Where(), err)
	}
	return parseClonesOf(out, snapshot), nil
}

func parseClonesOf(out, snapshot string) []Clone {
	owner := map[string]string{}
	var names []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 3 || strings.Contains(f[0], "@") {
			continue
		}
		switch f[1] {
		case "origin":
			if f[2] == snapshot {
				names = append(names, f[0])
			}
		case CloneOwnerProperty:
			if f[2] != "-" {
				owner[f[0]] = f[2]
			}
		}
	}
	var clones []Clone
	for _, name := range names {
		c := Clone{Name: name, Owner: owner[name], OwnerAlive: true}
		if c.Owner != "" {
			c.OwnerAlive = ownerAlive(c.Owner)
		}
		clones = append(clones, c)
	}
	return clones
}
