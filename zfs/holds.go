package zfs

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/vmhistory/vmhistory/runner"
)

// HoldPropertyPrefix starts the user property that records each hold this
// tool places: vmhistory:hold:<tag>=<RFC 3339 time>. zfs-fuse cannot list
// holds (`zfs holds` needs a python helper it does not ship), so the
// property is how vmhistory finds its own holds again on every dialect. One
// property per tag means two processes holding different tags never
// overwrite each other's record.
const HoldPropertyPrefix = "vmhistory:hold:"

var holdTagRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._\-]*$`)

func checkHoldTag(tag string) error {
	if !holdTagRE.MatchString(tag) || len(tag) > 200 {
		return fmt.Errorf("invalid hold tag %q: use lower-case letters, digits, '.', '_', '-'", tag)
	}
	return nil
}

// Hold places hold tag on a snapshot so it cannot be destroyed, and records
// it in the snapshot's vmhistory:hold:<tag> property. Holding twice is not
// an error.
func (z *ZFS) Hold(ctx context.Context, snapshot, tag string) error {
	if err := checkHoldTag(tag); err != nil {
		return err
	}
	if _, err := z.zfs(ctx, "hold", tag, snapshot); err != nil && !stderrContains(err, "tag already exists") {
		return fmt.Errorf("hold %s on %s (%s): %w", tag, snapshot, z.Where(), err)
	}
	if err := z.Set(ctx, snapshot, HoldPropertyPrefix+tag, time.Now().UTC().Format(time.RFC3339)); err != nil {
		return fmt.Errorf("record hold %s: %w", tag, err)
	}
	return nil
}

// Release removes hold tag from a snapshot and its record. Releasing a tag
// that is not there is not an error, so a half-done earlier release can be
// finished.
func (z *ZFS) Release(ctx context.Context, snapshot, tag string) error {
	if err := checkHoldTag(tag); err != nil {
		return err
	}
	if _, err := z.zfs(ctx, "release", tag, snapshot); err != nil && !stderrContains(err, "no such tag") {
		return fmt.Errorf("release %s on %s (%s): %w", tag, snapshot, z.Where(), err)
	}
	if err := z.Inherit(ctx, snapshot, HoldPropertyPrefix+tag); err != nil {
		return fmt.Errorf("clear hold record %s: %w", tag, err)
	}
	return nil
}

// Holds lists the hold tags vmhistory recorded on a snapshot, sorted. Holds
// placed by other tools are counted in Snapshot.UserRefs but not named here.
func (z *ZFS) Holds(ctx context.Context, snapshot string) ([]string, error) {
	out, err := z.zfs(ctx, "get", "-Hp", "-o", "property,value,source", "all", snapshot)
	if err != nil {
		return nil, fmt.Errorf("list holds of %s on %s: %w", snapshot, z.Where(), err)
	}
	return parseHoldProperties(out), nil
}

func parseHoldProperties(out string) []string {
	var tags []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 3 || !strings.HasPrefix(f[0], HoldPropertyPrefix) || f[1] == "-" || f[2] != "local" {
			continue
		}
		tags = append(tags, strings.TrimPrefix(f[0], HoldPropertyPrefix))
	}
	slices.Sort(tags)
	return tags
}

func stderrContains(err error, s string) bool {
	var rerr *runner.Error
	return errors.As(err, &rerr) && strings.Contains(rerr.Stderr, s)
}

// HeldSnapshots lists the snapshots of dataset that carry vmhistory's hold
// tag, in one command (over ssh, one round trip instead of one per
// snapshot).
func (z *ZFS) HeldSnapshots(ctx context.Context, dataset, tag string) ([]string, error) {
	if err := checkHoldTag(tag); err != nil {
		return nil, err
	}
	out, err := z.zfs(ctx, "get", "-Hp", "-r", "-d", "1", "-o", "name,value,source", HoldPropertyPrefix+tag, dataset)
	if err != nil {
		return nil, fmt.Errorf("list %s holds in %s on %s: %w", tag, dataset, z.Where(), err)
	}
	var held []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 3 || !strings.HasPrefix(f[0], dataset+"@") || f[1] == "-" || f[2] != "local" {
			continue
		}
		held = append(held, f[0])
	}
	return held, nil
}
