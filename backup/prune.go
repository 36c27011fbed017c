package backup

import (
	"context"
	"errors"
	"fmt"

	"github.com/vmhistory/vmhistory/zfs"
)

// RunProperty is vmhistory's proof that it made a snapshot: the snapshot
// step sets it (to the run's id) atomically with the snapshot, and the
// replication sets it on the replica's copy after each receive, since user
// properties do not travel with `zfs send -I`. Retention destroys only
// snapshots that carry it, set locally on the snapshot. An admin adopts an
// older snapshot (one of an earlier script, named in snapshot_format) with
// `zfs set vmhistory:run=adopted DATASET@NAME`.
const RunProperty = "vmhistory:run"

// ownedSnapshots returns the value of RunProperty by snapshot name for the
// snapshots of dataset that carry it: those vmhistory made or the admin
// adopted.
func ownedSnapshots(ctx context.Context, z *zfs.ZFS, dataset string) (map[string]string, error) {
	owned, err := z.LocalSnapshotProperty(ctx, dataset, RunProperty)
	if err != nil {
		return nil, fmt.Errorf("which snapshots of %s are vmhistory's: %w", dataset, err)
	}
	return owned, nil
}

// PruneResult says what local pruning did and why it kept what it kept.
type PruneResult struct {
	Destroyed []string `json:"destroyed,omitempty"`
	// Kept beyond keep_local, with the reason: held (the replication base,
	// or a mount or restore using it), not uploaded yet, busy.
	KeptHeld        []string `json:"kept_held,omitempty"`
	KeptNotUploaded []string `json:"kept_not_uploaded,omitempty"`
	KeptBusy        []string `json:"kept_busy,omitempty"`
	// Holders are the clones that keep each busy snapshot, by its name
	// (none found: something else keeps it busy).
	Holders map[string][]zfs.Clone `json:"holders,omitempty"`
	// NotOurs are snapshots named like vmhistory's but without its
	// RunProperty (made by hand or by another tool): never destroyed,
	// not counted against Keep.
	NotOurs []string `json:"not_ours,omitempty"`
}

// Pruner applies keep_local to one dataset.
type Pruner struct {
	ZFS     *zfs.ZFS
	Dataset string
	Keep    int
	// Named tells names in vmhistory's snapshot_format from others; a
	// snapshot must be named so and carry RunProperty to be pruned.
	Named func(name string) bool
	// Uploaded, when set, says whether a snapshot (by guid) is in the
	// kopia repository; a snapshot not uploaded yet is kept. Nil when no
	// kopia repository is configured.
	Uploaded func(guid uint64) bool
	// DryRun destroys nothing: Destroyed lists what would be destroyed.
	DryRun bool
	// Pending is how many snapshots are about to be taken (tonight's, in a
	// dry run): they count among the Keep newest.
	Pending int
}

// Run destroys the oldest of vmhistory's snapshots beyond Keep, skipping
// the held, the not yet uploaded and the busy ones; they are tried again
// next night.
func (p *Pruner) Run(ctx context.Context) (PruneResult, error) {
	var res PruneResult
	if p.Keep < 1 {
		return res, fmt.Errorf("prune %s: keep must be at least 1, not %d", p.Dataset, p.Keep)
	}
	snaps, err := p.ZFS.Snapshots(ctx, p.Dataset)
	if err != nil {
		return res, err
	}
	owned, err := ownedSnapshots(ctx, p.ZFS, p.Dataset)
	if err != nil {
		return res, err
	}
	var ours []zfs.Snapshot
	for _, s := range snaps {
		switch {
		case p.Named != nil && !p.Named(s.Name):
			// Another naming scheme: plainly not ours, not worth a line.
		case owned[s.Name] == "":
			res.NotOurs = append(res.NotOurs, s.Name)
		default:
			ours = append(ours, s)
		}
	}
	var errs []error
	for _, s := range ours[:max(0, min(len(ours), len(ours)+p.Pending-p.Keep))] {
		switch {
		case s.UserRefs > 0:
			res.KeptHeld = append(res.KeptHeld, s.Name)
			continue
		case p.Uploaded != nil && !p.Uploaded(s.GUID):
			res.KeptNotUploaded = append(res.KeptNotUploaded, s.Name)
			continue
		}
		if p.DryRun {
			res.Destroyed = append(res.Destroyed, s.Name)
			continue
		}
		if err := p.ZFS.Destroy(ctx, s.FullName()); err != nil {
			if errors.Is(err, zfs.ErrBusy) {
				// A clone (mount, restore) depends on it, or a hold
				// appeared since the listing.
				res.KeptBusy = append(res.KeptBusy, s.Name)
				clones, cerr := p.ZFS.ClonesOf(ctx, s.FullName())
				if cerr != nil {
					errs = append(errs, cerr)
				}
				if len(clones) > 0 {
					if res.Holders == nil {
						res.Holders = map[string][]zfs.Clone{}
					}
					res.Holders[s.Name] = clones
				}
				continue
			}
			errs = append(errs, err)
			continue
		}
		res.Destroyed = append(res.Destroyed, s.Name)
	}
	return res, errors.Join(errs...)
}
