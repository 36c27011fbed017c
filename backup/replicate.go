package backup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/vmhistory/vmhistory/zfs"
)

// ReplicaHoldTag marks the newest snapshot common to a dataset and its
// replica, on both sides: the base of the next incremental send, which no
// pruning may destroy.
const ReplicaHoldTag = "vmhistory-replica"

// Named replication failures, matched with errors.Is.
var (
	// ErrNeedFull: the replica has no snapshot in common with the source
	// (or does not exist yet); only a full send can continue, and a full
	// send of a large dataset is never started without --allow-full.
	ErrNeedFull = errors.New("no common snapshot with the replica: a full send is needed")
	// ErrReplicaDiverged: the replica holds snapshots or changes the
	// source does not; vmhistory reports it and rolls back only with
	// --force-rollback.
	ErrReplicaDiverged = errors.New("the replica has diverged from the source")
)

// Replicator brings one dataset's replica up to date.
type Replicator struct {
	Source         *zfs.ZFS
	Replica        *zfs.ZFS
	SourceDataset  string
	ReplicaDataset string
	// AllowFull permits a full send when there is no common snapshot.
	AllowFull bool
	// ForceRollback permits rolling the replica back to the common
	// snapshot, destroying what it has beyond it.
	ForceRollback bool
	// Keep is how many of vmhistory's snapshots the replica keeps; 0 keeps all.
	Keep int
	// Named tells names in vmhistory's snapshot_format from others;
	// retention on the replica touches only those, and of them only the
	// ones with proof that vmhistory made them (see RunProperty).
	Named func(name string) bool
	Log   *slog.Logger
}

// ReplicateResult says what a replication did.
type ReplicateResult struct {
	Base   string   `json:"base,omitempty"` // the common snapshot the increment started from
	Latest string   `json:"latest"`         // the replica's newest snapshot afterwards
	Sent   []string `json:"sent,omitempty"` // snapshots that arrived
	Full   bool     `json:"full,omitempty"`
	Bytes  int64    `json:"bytes"`
	Pruned []string `json:"pruned,omitempty"`
	// NotOurs are the replica's snapshots named like vmhistory's without
	// proof that it made them: kept.
	NotOurs  []string `json:"not_ours,omitempty"`
	UpToDate bool     `json:"up_to_date,omitempty"`
}

// Run replicates every source snapshot newer than the common base, holds
// the new base on both sides, releases the old one and applies the
// replica's retention.
func (r *Replicator) Run(ctx context.Context) (ReplicateResult, error) {
	var res ReplicateResult
	log := r.Log
	if log == nil {
		log = slog.Default()
	}
	src, err := r.Source.Snapshots(ctx, r.SourceDataset)
	if err != nil {
		return res, err
	}
	if len(src) == 0 {
		return res, fmt.Errorf("%s has no snapshot to replicate", r.SourceDataset)
	}
	latest := src[len(src)-1]
	res.Latest = latest.Name

	exists, err := r.Replica.Exists(ctx, r.ReplicaDataset)
	if err != nil {
		return res, fmt.Errorf("replica %s: %w", r.ReplicaDataset, err)
	}
	var dst []zfs.Snapshot
	if exists {
		if dst, err = r.Replica.Snapshots(ctx, r.ReplicaDataset); err != nil {
			return res, err
		}
	}

	base, baseIdx := newestCommon(src, dst)
	if base == nil {
		return r.full(ctx, src, exists, res)
	}
	res.Base = base.Name

	// Snapshots on the replica after the base that the source does not
	// have: somebody snapshotted the replica, or the source was rolled
	// back. Either way the next receive would fail or lose them.
	var extra []string
	for _, d := range dst[baseIdx+1:] {
		extra = append(extra, d.Name)
	}
	if len(extra) > 0 {
		if !r.ForceRollback {
			return res, fmt.Errorf("%w: %s on %s has snapshots after the common base %s that the source lacks: %s; rerun with --force-rollback to destroy them",
				ErrReplicaDiverged, r.ReplicaDataset, r.Replica.Where(), base.Name, strings.Join(extra, ", "))
		}
		if err := r.Replica.Rollback(ctx, r.ReplicaDataset+"@"+base.Name); err != nil {
			return res, err
		}
		log.Warn("rolled the replica back to the common base", "replica", r.ReplicaDataset, "base", base.Name, "destroyed", extra)
	}

	if base.GUID == latest.GUID {
		res.UpToDate = true
	} else {
		send := zfs.SendOptions{From: base.FullName(), Snapshot: latest.FullName(), Intermediate: true}
		n, err := zfs.Transfer(ctx, r.Source, send, r.Replica, r.ReplicaDataset, zfs.ReceiveOptions{Resumable: true})
		res.Bytes = n
		if errors.Is(err, zfs.ErrDiverged) {
			if !r.ForceRollback {
				return res, fmt.Errorf("%w: %s on %s was modified after %s (%v); rerun with --force-rollback to discard the change",
					ErrReplicaDiverged, r.ReplicaDataset, r.Replica.Where(), base.Name, err)
			}
			if err := r.Replica.Rollback(ctx, r.ReplicaDataset+"@"+base.Name); err != nil {
				return res, err
			}
			n, err = zfs.Transfer(ctx, r.Source, send, r.Replica, r.ReplicaDataset, zfs.ReceiveOptions{Resumable: true})
			res.Bytes += n
		}
		if err != nil {
			return res, err
		}
		res.Sent = namesAfter(src, base.GUID)
	}
	if err := r.moveBaseHold(ctx, latest.Name); err != nil {
		return res, err
	}
	res.Pruned, res.NotOurs, err = r.claimAndPrune(ctx)
	return res, err
}

// full seeds (or re-seeds) the replica with the oldest source snapshot and
// then every later one.
func (r *Replicator) full(ctx context.Context, src []zfs.Snapshot, exists bool, res ReplicateResult) (ReplicateResult, error) {
	first, latest := src[0], src[len(src)-1]
	if !r.AllowFull {
		reason := fmt.Sprintf("the replica %s on %s does not exist yet", r.ReplicaDataset, r.Replica.Where())
		if exists {
			reason = fmt.Sprintf("the replica %s on %s has no snapshot in common with %s", r.ReplicaDataset, r.Replica.Where(), r.SourceDataset)
		}
		return res, fmt.Errorf("%w: %s; rerun with --allow-full to send %s in full (%s referenced)",
			ErrNeedFull, reason, first.FullName(), humanBytes(int64(first.Referenced)))
	}
	if exists {
		// A full stream into an existing dataset would need receive -F,
		// which replaces the replica's contents: only on request.
		if !r.ForceRollback {
			return res, fmt.Errorf("%w: %s exists on %s without a common snapshot; destroy it or add --force-rollback to overwrite it",
				ErrReplicaDiverged, r.ReplicaDataset, r.Replica.Where())
		}
	}
	res.Full = true
	n, err := zfs.Transfer(ctx, r.Source, zfs.SendOptions{Snapshot: first.FullName()}, r.Replica, r.ReplicaDataset, zfs.ReceiveOptions{Force: exists})
	res.Bytes = n
	if err != nil {
		return res, err
	}
	// The replica is read-only so nothing on it changes between receives.
	if err := r.Replica.Set(ctx, r.ReplicaDataset, "readonly", "on"); err != nil {
		return res, err
	}
	res.Sent = []string{first.Name}
	if latest.GUID != first.GUID {
		n, err := zfs.Transfer(ctx, r.Source, zfs.SendOptions{From: first.FullName(), Snapshot: latest.FullName(), Intermediate: true},
			r.Replica, r.ReplicaDataset, zfs.ReceiveOptions{Resumable: true})
		res.Bytes += n
		if err != nil {
			return res, err
		}
		res.Sent = append(res.Sent, namesAfter(src, first.GUID)...)
	}
	if err := r.moveBaseHold(ctx, latest.Name); err != nil {
		return res, err
	}
	res.Pruned, res.NotOurs, err = r.claimAndPrune(ctx)
	return res, err
}

// moveBaseHold holds the new base on both sides before releasing the old
// one, so at no moment is there no protected base.
func (r *Replicator) moveBaseHold(ctx context.Context, name string) error {
	sides := []struct {
		z       *zfs.ZFS
		dataset string
	}{{r.Source, r.SourceDataset}, {r.Replica, r.ReplicaDataset}}
	for _, s := range sides {
		if err := s.z.Hold(ctx, s.dataset+"@"+name, ReplicaHoldTag); err != nil {
			return err
		}
	}
	for _, s := range sides {
		held, err := s.z.HeldSnapshots(ctx, s.dataset, ReplicaHoldTag)
		if err != nil {
			return err
		}
		for _, h := range held {
			if h == s.dataset+"@"+name {
				continue
			}
			if err := s.z.Release(ctx, h, ReplicaHoldTag); err != nil {
				return err
			}
		}
	}
	return nil
}

// claimAndPrune gives the replica's copies of vmhistory's snapshots their
// own proof of ownership, then applies keep_replica there.
//
// RunProperty does not travel with `zfs send -I` (only -p would send it,
// and -p also sends mountpoint), so after each receive it is set on every
// replica snapshot whose guid is that of an owned local snapshot. Retention
// on the replica then destroys only snapshots that carry it there, or
// whose guid matches an owned local snapshot (should setting it have
// failed), and never a held one.
func (r *Replicator) claimAndPrune(ctx context.Context) (pruned, notOurs []string, err error) {
	local, err := r.Source.Snapshots(ctx, r.SourceDataset)
	if err != nil {
		return nil, nil, err
	}
	localOwned, err := ownedSnapshots(ctx, r.Source, r.SourceDataset)
	if err != nil {
		return nil, nil, err
	}
	ownedGUID := map[uint64]string{}
	for _, s := range local {
		if v := localOwned[s.Name]; v != "" {
			ownedGUID[s.GUID] = v
		}
	}
	snaps, err := r.Replica.Snapshots(ctx, r.ReplicaDataset)
	if err != nil {
		return nil, nil, err
	}
	replicaOwned, err := ownedSnapshots(ctx, r.Replica, r.ReplicaDataset)
	if err != nil {
		return nil, nil, err
	}
	var errs []error
	var ours []zfs.Snapshot
	for _, s := range snaps {
		v, byGUID := ownedGUID[s.GUID]
		if replicaOwned[s.Name] == "" && byGUID {
			if err := r.Replica.Set(ctx, s.FullName(), RunProperty, v); err != nil {
				errs = append(errs, fmt.Errorf("mark %s as vmhistory's: %w", s.FullName(), err))
			}
		}
		switch {
		case r.Named != nil && !r.Named(s.Name):
		case replicaOwned[s.Name] == "" && !byGUID:
			notOurs = append(notOurs, s.Name)
		default:
			ours = append(ours, s)
		}
	}
	if r.Keep <= 0 {
		return nil, notOurs, errors.Join(errs...)
	}
	for _, s := range ours[:max(0, len(ours)-r.Keep)] {
		if s.UserRefs > 0 {
			continue
		}
		if err := r.Replica.Destroy(ctx, s.FullName()); err != nil {
			if errors.Is(err, zfs.ErrBusy) {
				continue // in use by a reader on the replica; next night
			}
			errs = append(errs, err)
			continue
		}
		pruned = append(pruned, s.Name)
	}
	return pruned, notOurs, errors.Join(errs...)
}

// newestCommon finds the newest source snapshot whose guid the replica has,
// and its index in dst.
func newestCommon(src, dst []zfs.Snapshot) (*zfs.Snapshot, int) {
	at := map[uint64]int{}
	for i, d := range dst {
		at[d.GUID] = i
	}
	for i := len(src) - 1; i >= 0; i-- {
		if j, ok := at[src[i].GUID]; ok {
			return &src[i], j
		}
	}
	return nil, -1
}

func namesAfter(snaps []zfs.Snapshot, guid uint64) []string {
	var names []string
	seen := false
	for _, s := range snaps {
		if seen {
			names = append(names, s.Name)
		}
		if s.GUID == guid {
			seen = true
		}
	}
	return names
}
