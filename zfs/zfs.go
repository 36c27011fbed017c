// Package zfs drives the zfs command line, on this host or on the replica
// through a runner.Runner, in both dialects vmhistory meets: OpenZFS and the
// older zfs-fuse (used by the tests). Where the dialects differ the code
// detects which one it talks to; it never assumes.
package zfs

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmhistory/vmhistory/runner"
)

// Sentinel errors, matched with errors.Is on what the operations return.
var (
	ErrNotExist     = errors.New("dataset does not exist")
	ErrBusy         = errors.New("dataset is busy")
	ErrNotSupported = errors.New("not supported by this zfs")
	// ErrDiverged means a receive was refused because the destination no
	// longer matches the stream's base: it was modified, or holds
	// snapshots the source does not. vmhistory never rolls back on its own.
	ErrDiverged = errors.New("destination has diverged from the source")
	// ErrDestinationExists means a full stream was sent to an existing dataset.
	ErrDestinationExists = errors.New("destination dataset already exists")
	// ErrPartialReceive means the destination holds the partial state of
	// an interrupted `zfs receive -s` (OpenZFS): no other stream lands
	// until it is resumed (`send -t` its receive_resume_token) or aborted
	// (`receive -A`).
	ErrPartialReceive = errors.New("destination holds an interrupted resumable receive")
	// ErrStaleResumeToken means a resume token can no longer be sent: a
	// snapshot it names is gone or was replaced, or the token is corrupt.
	// Only aborting the partial receive gets the destination going again.
	ErrStaleResumeToken = errors.New("the resume token is stale")
)

// Default timeouts. Metadata commands answer in seconds on a healthy pool;
// a send or receive of a large dataset can run for hours.
const (
	DefaultCommandTimeout = 2 * time.Minute
	DefaultStreamTimeout  = 24 * time.Hour
)

// Options tune a ZFS handle.
type Options struct {
	// Binary is the zfs program; "zfs" when empty.
	Binary string
	// CommandTimeout bounds metadata commands (list, snapshot, hold, ...).
	CommandTimeout time.Duration
	// StreamTimeout bounds send and receive.
	StreamTimeout time.Duration
	// CloneMountDir is where read-only clones are mounted on the runner's
	// host; "/run/vmhistory/clones" when empty.
	CloneMountDir string
	// Logger; slog.Default() when nil.
	Logger *slog.Logger
}

// ZFS runs zfs commands through one runner: this host or the replica.
type ZFS struct {
	run  runner.Runner
	opts Options
	log  *slog.Logger

	featuresOnce sync.Once
	features     Features
	featuresErr  error
}

// New returns a handle that runs zfs through r.
func New(r runner.Runner, opts Options) *ZFS {
	if opts.Binary == "" {
		opts.Binary = "zfs"
	}
	if opts.CommandTimeout <= 0 {
		opts.CommandTimeout = DefaultCommandTimeout
	}
	if opts.StreamTimeout <= 0 {
		opts.StreamTimeout = DefaultStreamTimeout
	}
	if opts.CloneMountDir == "" {
		opts.CloneMountDir = "/run/vmhistory/clones"
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &ZFS{run: r, opts: opts, log: log}
}

// Where names the host the commands run on.
func (z *ZFS) Where() string { return z.run.Where() }

// Runner is the runner the commands go through.
func (z *ZFS) Runner() runner.Runner { return z.run }

// zfs runs one metadata command and returns its stdout.
func (z *ZFS) zfs(ctx context.Context, args ...string) (string, error) {
	out, err := z.run.Run(ctx, runner.Cmd{
		Args:    append([]string{z.opts.Binary}, args...),
		Timeout: z.opts.CommandTimeout,
	})
	if err != nil {
		return "", classify(err)
	}
	return string(out), nil
}

// classify adds a sentinel to a failed zfs command from the words zfs uses
// in its stderr; both dialects print the same phrases here.
func classify(err error) error {
	var rerr *runner.Error
	if !errors.As(err, &rerr) {
		return err
	}
	// zfs wraps long messages over lines; match on single-spaced text.
	msg := strings.Join(strings.Fields(rerr.Stderr), " ")
	var sentinel error
	switch {
	case strings.Contains(msg, "dataset does not exist"), strings.Contains(msg, "could not find any snapshots to destroy"),
		strings.Contains(msg, "could not send") && strings.Contains(msg, "does not exist"):
		sentinel = ErrNotExist
	case strings.Contains(msg, "contains partially-complete state from"):
		// OpenZFS reports this with EZFS_BUSY; it is not a reader's busy.
		sentinel = ErrPartialReceive
	case strings.Contains(msg, "used in the initial send no longer exists"),
		strings.Contains(msg, "is no longer the same snapshot used in the initial send"),
		strings.Contains(msg, "incremental source") && strings.Contains(msg, "no longer exists"),
		strings.Contains(msg, "resume token is corrupt"):
		sentinel = ErrStaleResumeToken
	case strings.Contains(msg, "dataset is busy"), strings.Contains(msg, "pool or dataset is busy"),
		strings.Contains(msg, "has dependent clones"):
		sentinel = ErrBusy
	case strings.Contains(msg, "has been modified"),
		strings.Contains(msg, "does not match incremental source"),
		strings.Contains(msg, "destination already exists"),
		strings.Contains(msg, "must specify -F to overwrite"):
		if strings.Contains(msg, "must specify -F to overwrite") && !strings.Contains(msg, "modified") {
			sentinel = ErrDestinationExists
		} else {
			sentinel = ErrDiverged
		}
	default:
		return err
	}
	return &classifiedError{err: rerr, sentinel: sentinel}
}

type classifiedError struct {
	err      *runner.Error
	sentinel error
}

func (e *classifiedError) Error() string { return e.err.Error() }
func (e *classifiedError) Unwrap() []error {
	return []error{e.err, e.sentinel}
}

// Features says what the zfs on the other end of the runner can do.
type Features struct {
	// Dialect is "openzfs" or "legacy" (zfs-fuse and other pre-OpenZFS ports).
	Dialect string `json:"dialect"`
	// Version is what `zfs version` printed first, empty on legacy.
	Version string `json:"version,omitempty"`
	// ResumableReceive: receive -s and send -t with receive_resume_token.
	ResumableReceive bool `json:"resumable_receive"`
	// ListHolds: `zfs holds` works (zfs-fuse's needs a missing python helper).
	ListHolds bool `json:"list_holds"`
	// RawSend: send -w for encrypted datasets.
	RawSend bool `json:"raw_send"`
}

var versionLine = regexp.MustCompile(`^zfs-(\d+\.\d+[\w.\-]*)`)

// Features detects the dialect once per handle: OpenZFS answers `zfs
// version`, zfs-fuse rejects it as an unrecognized command.
func (z *ZFS) Features(ctx context.Context) (Features, error) {
	z.featuresOnce.Do(func() {
		z.features, z.featuresErr = z.detectFeatures(ctx)
	})
	return z.features, z.featuresErr
}

func (z *ZFS) detectFeatures(ctx context.Context) (Features, error) {
	out, err := z.zfs(ctx, "version")
	if err == nil {
		first := strings.TrimSpace(strings.SplitN(out, "\n", 2)[0])
		f := Features{Dialect: "openzfs", Version: first, ResumableReceive: true, ListHolds: true, RawSend: true}
		if m := versionLine.FindStringSubmatch(first); m != nil {
			f.Version = m[1]
		}
		return f, nil
	}
	var rerr *runner.Error
	if errors.As(err, &rerr) && rerr.Timeout == 0 && strings.Contains(rerr.Stderr, "unrecognized command") {
		return Features{Dialect: "legacy"}, nil
	}
	return Features{}, fmt.Errorf("detect zfs dialect on %s: %w", z.Where(), err)
}

// Snapshot is one ZFS snapshot.
type Snapshot struct {
	Dataset    string    `json:"dataset"`
	Name       string    `json:"name"` // the part after '@'
	GUID       uint64    `json:"guid"`
	CreateTXG  uint64    `json:"createtxg"`
	Creation   time.Time `json:"creation"`
	Used       uint64    `json:"used"`
	Referenced uint64    `json:"referenced"`
	// UserRefs counts every hold on the snapshot, ours and anybody else's;
	// a snapshot with holds cannot be destroyed.
	UserRefs uint64 `json:"userrefs"`
}

// FullName is dataset@name.
func (s Snapshot) FullName() string { return s.Dataset + "@" + s.Name }

var snapshotProps = []string{"guid", "createtxg", "creation", "used", "referenced", "userrefs"}

// Snapshots lists the snapshots of dataset (not of its children), oldest
// first by creation transaction group, so snapshots taken within the same
// second keep their order.
//
// `zfs get -Hp -r -d 1` is used because zfs-fuse rejects `zfs list -p` and
// `zfs get -t`; OpenZFS accepts the same form.
func (z *ZFS) Snapshots(ctx context.Context, dataset string) ([]Snapshot, error) {
	out, err := z.zfs(ctx, "get", "-Hp", "-r", "-d", "1", "-o", "name,property,value", strings.Join(snapshotProps, ","), dataset)
	if err != nil {
		return nil, fmt.Errorf("list snapshots of %s on %s: %w", dataset, z.Where(), err)
	}
	snaps, err := parseSnapshots(dataset, out)
	if err != nil {
		return nil, fmt.Errorf("list snapshots of %s on %s: %w", dataset, z.Where(), err)
	}
	return snaps, nil
}

func parseSnapshots(dataset, out string) ([]Snapshot, error) {
	byName := map[string]*Snapshot{}
	var order []string
	prefix := dataset + "@"
	for _, line := range strings.Split(out, "\n") {
		if line == "" {
			continue
		}
		f := strings.Split(line, "\t")
		if len(f) < 3 {
			return nil, fmt.Errorf("unexpected zfs get output line %q", line)
		}
		name, prop, value := f[0], f[1], f[2]
		if !strings.HasPrefix(name, prefix) {
			continue // the dataset itself, or a child's snapshots
		}
		s := byName[name]
		if s == nil {
			s = &Snapshot{Dataset: dataset, Name: strings.TrimPrefix(name, prefix)}
			byName[name] = s
			order = append(order, name)
		}
		if value == "-" {
			continue
		}
		n, err := strconv.ParseUint(value, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("snapshot %s: property %s: %q is not a number", name, prop, value)
		}
		switch prop {
		case "guid":
			s.GUID = n
		case "createtxg":
			s.CreateTXG = n
		case "creation":
			s.Creation = time.Unix(int64(n), 0).UTC()
		case "used":
			s.Used = n
		case "referenced":
			s.Referenced = n
		case "userrefs":
			s.UserRefs = n
		}
	}
	snaps := make([]Snapshot, 0, len(order))
	for _, name := range order {
		if byName[name].GUID == 0 {
			return nil, fmt.Errorf("snapshot %s: no guid in zfs output", name)
		}
		snaps = append(snaps, *byName[name])
	}
	sortSnapshots(snaps)
	return snaps, nil
}

func sortSnapshots(snaps []Snapshot) {
	slices.SortStableFunc(snaps, func(a, b Snapshot) int {
		if c := cmp.Compare(a.CreateTXG, b.CreateTXG); c != 0 {
			return c
		}
		return a.Creation.Compare(b.Creation)
	})
}

// GetSnapshot returns one snapshot by its full name dataset@name.
func (z *ZFS) GetSnapshot(ctx context.Context, fullName string) (Snapshot, error) {
	dataset, name, ok := strings.Cut(fullName, "@")
	if !ok {
		return Snapshot{}, fmt.Errorf("%q is not a snapshot name (dataset@name)", fullName)
	}
	out, err := z.zfs(ctx, "get", "-Hp", "-o", "name,property,value", strings.Join(snapshotProps, ","), fullName)
	if err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s on %s: %w", fullName, z.Where(), err)
	}
	snaps, err := parseSnapshots(dataset, out)
	if err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s on %s: %w", fullName, z.Where(), err)
	}
	for _, s := range snaps {
		if s.Name == name {
			return s, nil
		}
	}
	return Snapshot{}, fmt.Errorf("snapshot %s on %s: %w", fullName, z.Where(), ErrNotExist)
}

// CreateSnapshot takes snapshot dataset@name, with user properties set
// atomically with it, and returns it as listed afterwards.
func (z *ZFS) CreateSnapshot(ctx context.Context, dataset, name string, props map[string]string) (Snapshot, error) {
	full := dataset + "@" + name
	if err := ValidateSnapshotName(full); err != nil {
		return Snapshot{}, err
	}
	args := []string{"snapshot"}
	args = append(args, propertyArgs(props)...)
	args = append(args, full)
	if _, err := z.zfs(ctx, args...); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot %s on %s: %w", full, z.Where(), err)
	}
	return z.GetSnapshot(ctx, full)
}

// CreateSnapshots takes name on every dataset. On OpenZFS, when all the
// datasets are in one pool, it does so in one command, which ZFS commits in
// one transaction group: atomic. Elsewhere (zfs-fuse takes one name per
// command, and no zfs spans pools atomically) it takes them one after the
// other. The bool reports which happened.
func (z *ZFS) CreateSnapshots(ctx context.Context, datasets []string, name string, props map[string]string) ([]Snapshot, bool, error) {
	var full []string
	for _, ds := range datasets {
		n := ds + "@" + name
		if err := ValidateSnapshotName(n); err != nil {
			return nil, false, err
		}
		full = append(full, n)
	}
	if len(datasets) == 0 {
		return nil, false, errors.New("no dataset to snapshot")
	}
	atomic := false
	if len(datasets) > 1 {
		f, err := z.Features(ctx)
		if err != nil {
			return nil, false, err
		}
		samePool := true
		for _, ds := range datasets {
			samePool = samePool && Pool(ds) == Pool(datasets[0])
		}
		atomic = f.Dialect == "openzfs" && samePool
	}
	if atomic {
		args := append([]string{"snapshot"}, propertyArgs(props)...)
		if _, err := z.zfs(ctx, append(args, full...)...); err != nil {
			return nil, false, fmt.Errorf("snapshot %s on %s: %w", strings.Join(full, " "), z.Where(), err)
		}
	}
	var snaps []Snapshot
	for i, ds := range datasets {
		var s Snapshot
		var err error
		if atomic {
			s, err = z.GetSnapshot(ctx, full[i])
		} else {
			s, err = z.CreateSnapshot(ctx, ds, name, props)
		}
		if err != nil {
			return snaps, atomic, err
		}
		snaps = append(snaps, s)
	}
	return snaps, atomic, nil
}

// Destroy destroys one snapshot or one dataset without children. It never
// forces: on zfs-fuse a forced destroy of a busy clone wedges it until the
// daemon restarts, and a busy dataset is somebody's open file.
func (z *ZFS) Destroy(ctx context.Context, name string) error {
	if name == "" || !strings.Contains(name, "/") && !strings.Contains(name, "@") {
		return fmt.Errorf("destroy %q: refusing to destroy a pool or an empty name", name)
	}
	var err error
	if strings.Contains(name, "@") {
		_, err = z.zfs(ctx, "destroy", name)
	} else {
		err = z.destroyFilesystem(ctx, name)
	}
	if err != nil {
		return fmt.Errorf("destroy %s on %s: %w", name, z.Where(), err)
	}
	return nil
}

// busyWait bounds how long the destroy of a filesystem is retried while zfs
// calls it busy. zfs-fuse reports a freshly unmounted filesystem busy for a
// few seconds (seen on 0.7.0: the same destroy succeeds 1-3 s later); one
// with files really open stays busy and the error is returned. Snapshots
// are not retried: a held snapshot stays busy.
var busyWait = 15 * time.Second

func (z *ZFS) destroyFilesystem(ctx context.Context, name string) error {
	deadline := time.Now().Add(busyWait)
	delay := 100 * time.Millisecond
	for {
		_, err := z.zfs(ctx, "destroy", name)
		if err == nil || !errors.Is(err, ErrBusy) || time.Now().After(deadline) {
			return err
		}
		z.log.Debug("filesystem busy, retrying destroy", "dataset", name, "in", delay)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Second)
	}
}

// Rollback rolls a dataset back to snapshot, destroying every later
// snapshot of it (-r). vmhistory does this to a replica only when the admin
// asks for it (--force-rollback).
func (z *ZFS) Rollback(ctx context.Context, snapshot string) error {
	if err := ValidateSnapshotName(snapshot); err != nil {
		return err
	}
	if _, err := z.zfs(ctx, "rollback", "-r", snapshot); err != nil {
		return fmt.Errorf("roll back to %s on %s: %w", snapshot, z.Where(), err)
	}
	return nil
}

// Exists reports whether a dataset or snapshot exists.
func (z *ZFS) Exists(ctx context.Context, name string) (bool, error) {
	_, err := z.zfs(ctx, "get", "-H", "-o", "value", "guid", name)
	if errors.Is(err, ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("check %s on %s: %w", name, z.Where(), err)
	}
	return true, nil
}

// CreateDataset creates a filesystem (and its parents) with properties.
func (z *ZFS) CreateDataset(ctx context.Context, dataset string, props map[string]string) error {
	args := append([]string{"create", "-p"}, propertyArgs(props)...)
	args = append(args, dataset)
	if _, err := z.zfs(ctx, args...); err != nil {
		return fmt.Errorf("create %s on %s: %w", dataset, z.Where(), err)
	}
	return nil
}

// Get returns the values of properties of one dataset or snapshot; a
// property that is not set (user properties) has the value "-".
func (z *ZFS) Get(ctx context.Context, name string, props ...string) (map[string]string, error) {
	out, err := z.zfs(ctx, "get", "-Hp", "-o", "property,value", strings.Join(props, ","), name)
	if err != nil {
		return nil, fmt.Errorf("get %s of %s on %s: %w", strings.Join(props, ","), name, z.Where(), err)
	}
	values := map[string]string{}
	for _, line := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		if p, v, ok := strings.Cut(line, "\t"); ok {
			values[p] = v
		}
	}
	return values, nil
}

// LocalSnapshotProperty returns the value of user property prop on each
// snapshot of dataset where it is set locally, by snapshot name (the part
// after '@'), in one command. A value inherited from the dataset or
// received with a stream is not returned: only a `zfs set` (or `zfs
// snapshot -o`) on the snapshot itself counts.
func (z *ZFS) LocalSnapshotProperty(ctx context.Context, dataset, prop string) (map[string]string, error) {
	out, err := z.zfs(ctx, "get", "-Hp", "-r", "-d", "1", "-o", "name,value,source", prop, dataset)
	if err != nil {
		return nil, fmt.Errorf("get %s of the snapshots of %s on %s: %w", prop, dataset, z.Where(), err)
	}
	return parseLocalSnapshotProperty(out, dataset), nil
}

func parseLocalSnapshotProperty(out, dataset string) map[string]string {
	values := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 3 || f[1] == "-" || f[2] != "local" {
			continue
		}
		name, ok := strings.CutPrefix(f[0], dataset+"@")
		if !ok {
			continue // the dataset itself, or a child
		}
		values[name] = f[1]
	}
	return values
}

// Set sets one property.
func (z *ZFS) Set(ctx context.Context, name, prop, value string) error {
	if _, err := z.zfs(ctx, "set", prop+"="+value, name); err != nil {
		return fmt.Errorf("set %s=%s on %s (%s): %w", prop, value, name, z.Where(), err)
	}
	return nil
}

// Inherit clears a locally set property (for a user property on a
// snapshot: removes it).
func (z *ZFS) Inherit(ctx context.Context, name, prop string) error {
	if _, err := z.zfs(ctx, "inherit", prop, name); err != nil {
		return fmt.Errorf("clear %s on %s (%s): %w", prop, name, z.Where(), err)
	}
	return nil
}

func propertyArgs(props map[string]string) []string {
	var args []string
	for _, k := range slices.Sorted(maps.Keys(props)) {
		args = append(args, "-o", k+"="+props[k])
	}
	return args
}

var (
	componentRE = regexp.MustCompile(`^[A-Za-z0-9_.:\-]+$`)
	poolRE      = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.:\-]*$`)
)

// ValidateDatasetName checks pool/fs/... syntax before any command runs, so
// a typo is reported as such rather than as whatever zfs makes of it.
func ValidateDatasetName(name string) error {
	parts := strings.Split(name, "/")
	if !poolRE.MatchString(parts[0]) {
		return fmt.Errorf("invalid dataset name %q: the pool name must start with a letter and contain only letters, digits, '_', '-', '.', ':'", name)
	}
	for _, p := range parts[1:] {
		if !componentRE.MatchString(p) {
			return fmt.Errorf("invalid dataset name %q: component %q must be non-empty and contain only letters, digits, '_', '-', '.', ':'", name, p)
		}
	}
	return nil
}

// ValidateSnapshotName checks dataset@name syntax.
func ValidateSnapshotName(full string) error {
	dataset, name, ok := strings.Cut(full, "@")
	if !ok {
		return fmt.Errorf("invalid snapshot name %q: missing '@'", full)
	}
	if err := ValidateDatasetName(dataset); err != nil {
		return err
	}
	if !componentRE.MatchString(name) {
		return fmt.Errorf("invalid snapshot name %q: %q must be non-empty and contain only letters, digits, '_', '-', '.', ':'", full, name)
	}
	return nil
}

// Pool is the pool part of a dataset or snapshot name.
func Pool(name string) string {
	name, _, _ = strings.Cut(name, "@")
	pool, _, _ := strings.Cut(name, "/")
	return pool
}
