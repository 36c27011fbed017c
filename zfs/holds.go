package zfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
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

// HoldsWithPrefix lists the hold tags starting with prefix that vmhistory
// recorded on the snapshots of dataset, by snapshot, in one command.
func (z *ZFS) HoldsWithPrefix(ctx context.Context, dataset, prefix string) (map[string][]string, error) {
	out, err := z.zfs(ctx, "get", "-Hp", "-r", "-d", "1", "-o", "name,property,value,source", "all", dataset)
	if err != nil {
		return nil, fmt.Errorf("list %s* holds in %s on %s: %w", prefix, dataset, z.Where(), err)
	}
	return parseHoldsWithPrefix(out, dataset, prefix), nil
}

func parseHoldsWithPrefix(out, dataset, prefix string) map[string][]string {
	held := map[string][]string{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 4 || !strings.HasPrefix(f[0], dataset+"@") || f[2] == "-" || f[3] != "local" {
			continue
		}
		tag, ok := strings.CutPrefix(f[1], HoldPropertyPrefix)
		if !ok || !strings.HasPrefix(tag, prefix) {
			continue
		}
		held[f[0]] = append(held[f[0]], tag)
	}
	for _, tags := range held {
		slices.Sort(tags)
	}
	return held
}

// ProcessTag names this process in a hold tag: base-<host>-<pid>-<start>,
// the host lower-cased with characters a tag cannot hold made '_', the
// start time (clock ticks since boot) telling a reused pid from the
// original one. ProcessTagAlive reads it back.
func ProcessTag(base string) (string, error) {
	host, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("process tag: %w", err)
	}
	start, err := processStart(os.Getpid())
	if err != nil {
		return "", fmt.Errorf("process tag: %w", err)
	}
	tag := fmt.Sprintf("%s-%s-%d-%d", base, tagHost(host), os.Getpid(), start)
	if err := checkHoldTag(tag); err != nil {
		return "", err
	}
	return tag, nil
}

func tagHost(host string) string {
	b := []byte(strings.ToLower(host))
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			b[i] = '_'
		}
	}
	if len(b) > 63 {
		b = b[:63]
	}
	return string(b)
}

// ProcessTagAlive reports whether the process a ProcessTag(base) names
// still runs. A tag of another host, or one that cannot be parsed, counts
// as alive: releasing what we cannot judge could let a snapshot be
// destroyed under a reader.
func ProcessTagAlive(base, tag string) bool {
	rest, ok := strings.CutPrefix(tag, base+"-")
	if !ok {
		return true
	}
	i := strings.LastIndexByte(rest, '-')
	if i < 0 {
		return true
	}
	start, err := strconv.ParseUint(rest[i+1:], 10, 64)
	if err != nil {
		return true
	}
	rest = rest[:i]
	i = strings.LastIndexByte(rest, '-')
	if i < 0 {
		return true
	}
	pid, err := strconv.Atoi(rest[i+1:])
	if err != nil {
		return true
	}
	host, err := os.Hostname()
	if err != nil || rest[:i] != tagHost(host) {
		return true
	}
	return ProcessAlive(pid, start)
}

// SweepHolds releases, from the snapshots of dataset, the holds tagged
// ProcessTag(base) by processes of this host that no longer run (a kill
// -9, a crash), so that pruning can destroy what they pinned. Holds of live
// processes and of other hosts are left alone. It returns the released
// holds as snapshot:tag.
func (z *ZFS) SweepHolds(ctx context.Context, dataset, base string) ([]string, error) {
	held, err := z.HoldsWithPrefix(ctx, dataset, base+"-")
	if err != nil {
		return nil, err
	}
	snaps := make([]string, 0, len(held))
	for snap := range held {
		snaps = append(snaps, snap)
	}
	slices.Sort(snaps)
	var released []string
	var errs []error
	for _, snap := range snaps {
		for _, tag := range held[snap] {
			if ProcessTagAlive(base, tag) {
				continue
			}
			if err := z.Release(ctx, snap, tag); err != nil {
				errs = append(errs, fmt.Errorf("release stale hold: %w", err))
				continue
			}
			z.log.Info("released stale hold", "snapshot", snap, "tag", tag, "where", z.Where())
			released = append(released, snap+":"+tag)
		}
	}
	return released, errors.Join(errs...)
}
