package backup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

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
	// ErrReplicaHasHistory: a full send was allowed, but the replica
	// dataset exists (a rebuilt source shares none of its snapshots) and
	// was not named to be replaced.
	ErrReplicaHasHistory = errors.New("the replica dataset exists and shares no snapshot with the source")
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
	// ReplaceReplica, when it names ReplicaDataset exactly, permits a full
	// send over the existing replica dataset when nothing is in common:
	// its snapshots and the dataset are destroyed first. Nothing else does.
	ReplaceReplica string
	// Keep is how many of vmhistory's snapshots the replica keeps; 0 keeps all.
	Keep int
	// Named tells names in vmhistory's snapshot_format from others;
	// retention on the replica touches only those, and of them only the
	// ones with proof that vmhistory made them (see RunProperty).
	Named func(name string) bool
	Log   *slog.Logger
	// Observe, when set, is asked for a writer that sees every byte of
	// each incremental stream sent (`zfs send -I from to`, never a
	// resumed one): the kopia upload reads the night's change from it.
	Observe func(from, to zfs.Snapshot) io.Writer
}

func (r *Replicator) transfer(ctx context.Context, send zfs.SendOptions, from, to zfs.Snapshot) (int64, error) {
	var observe io.Writer
	if r.Observe != nil {
		observe = r.Observe(from, to)
	}
	return zfs.TransferObserved(ctx, r.Source, send, r.Replica, r.ReplicaDataset, zfs.ReceiveOptions{Resumable: true}, observe)
}

// ReplicateResult says what a replication did.
type ReplicateResult struct {
	Base   string   `json:"base,omitempty"` // the common snapshot the increment started from
	Latest string   `json:"latest"`         // the replica's newest snapshot afterwards
	Sent   []string `json:"sent,omitempty"` // snapshots that arrived
	Full   bool     `json:"full,omitempty"`
	Bytes  int64    `json:"bytes"`
	Pruned []string `json:"pruned,omitempty"`
	// Replaced lists the snapshots of a replica dataset destroyed on
	// request (ReplaceReplica) before a full send.
	Replaced []string `json:"replaced,omitempty"`
	// NotOurs are the replica's snapshots named like vmhistory's without
	// proof that it made them: kept.
	NotOurs  []string `json:"not_ours,omitempty"`
	UpToDate bool     `json:"up_to_date,omitempty"`
	// Resumed: an interrupted receive was resumed first. AbortedResume
	// says why one that could not be resumed was aborted instead.
	Resumed       bool   `json:"resumed,omitempty"`
	AbortedResume string `json:"aborted_resume,omitempty"`
}

// Run replicates every source snapshot newer than the common base, holds
// the new base on both sides, releases the old one and applies the
// replica's retention.
func (r *Replicator) Run(ctx context.Context) (ReplicateResult, error) {
	var res ReplicateResult
	log := r.log()
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
		// First finish (or clear) an interrupted receive: until then
		// OpenZFS refuses every other stream into the dataset.
		if err := r.resumeInterrupted(ctx, &res); err != nil {
			return res, err
		}
		if dst, err = r.Replica.Snapshots(ctx, r.ReplicaDataset); err != nil {
			return res, err
		}
	}

	base, baseIdx := newestCommon(src, dst)
	if base == nil {
		return r.full(ctx, src, dst, exists, res)
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
		n, err := r.transfer(ctx, send, *base, latest)
		res.Bytes = n
		if errors.Is(err, zfs.ErrDiverged) {
			if !r.ForceRollback {
				return res, fmt.Errorf("%w: %s on %s was modified after %s (%v); rerun with --force-rollback to discard the change",
					ErrReplicaDiverged, r.ReplicaDataset, r.Replica.Where(), base.Name, err)
			}
			if err := r.Replica.Rollback(ctx, r.ReplicaDataset+"@"+base.Name); err != nil {
				return res, err
			}
			n, err = r.transfer(ctx, send, *base, latest)
			res.Bytes += n
		}
		if errors.Is(err, zfs.ErrPartialReceive) {
			return res, fmt.Errorf("%s on %s holds an interrupted receive that appeared during this run; the next run resumes it: %w",
				r.ReplicaDataset, r.Replica.Where(), err)
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

// resumeInterrupted continues an interrupted resumable receive into the
// replica dataset (OpenZFS): `zfs send -t TOKEN | zfs receive -s`, so the
// bytes already received are not sent again. When the token can no longer
// be sent (a snapshot it names was pruned or replaced on the source, the
// token is corrupt, or the source cannot resume sends), the partial
// receive is aborted with `zfs receive -A` on the replica dataset alone,
// and the normal incremental sends it again. zfs-fuse has no resumable
// receives: nothing to do.
func (r *Replicator) resumeInterrupted(ctx context.Context, res *ReplicateResult) error {
	f, err := r.Replica.Features(ctx)
	if err != nil {
		return err
	}
	if !f.ResumableReceive {
		return nil
	}
	token, err := r.Replica.ResumeToken(ctx, r.ReplicaDataset)
	if err != nil || token == "" {
		return err
	}
	n, err := zfs.Transfer(ctx, r.Source, zfs.SendOptions{ResumeToken: token}, r.Replica, r.ReplicaDataset, zfs.ReceiveOptions{Resumable: true})
	res.Bytes += n
	if err == nil {
		res.Resumed = true
		r.log().Info("resumed an interrupted receive", "replica", r.ReplicaDataset, "where", r.Replica.Where(), "bytes", n)
		return nil
	}
	if !errors.Is(err, zfs.ErrStaleResumeToken) && !errors.Is(err, zfs.ErrNotSupported) {
		return fmt.Errorf("resume the interrupted receive into %s on %s (tried again next run): %w", r.ReplicaDataset, r.Replica.Where(), err)
	}
	if aerr := r.Replica.AbortReceive(ctx, r.ReplicaDataset); aerr != nil {
		return fmt.Errorf("the interrupted receive into %s cannot be resumed (%v), and aborting it failed: %w", r.ReplicaDataset, err, aerr)
	}
	res.AbortedResume = err.Error()
	r.log().Warn("aborted an interrupted receive that cannot be resumed; sending again", "replica", r.ReplicaDataset, "where", r.Replica.Where(), "why", err)
	return nil
}

// full seeds the replica with the oldest source snapshot and then every
// later one. An existing replica dataset — above all one with snapshots,
// the history a rebuilt source no longer shares — is replaced only when
// the admin names it in ReplaceReplica; the advice otherwise is a new
// replica dataset, which keeps the old history.
func (r *Replicator) full(ctx context.Context, src, dst []zfs.Snapshot, exists bool, res ReplicateResult) (ReplicateResult, error) {
	first, latest := src[0], src[len(src)-1]
	if !exists && !r.AllowFull {
		return res, fmt.Errorf("%w: the replica %s on %s does not exist yet; rerun with --allow-full to send %s in full (%s referenced)",
			ErrNeedFull, r.ReplicaDataset, r.Replica.Where(), first.FullName(), humanBytes(int64(first.Referenced)))
	}
	if exists && (!r.AllowFull || r.ReplaceReplica != r.ReplicaDataset) {
		what := "exists (with no snapshot)"
		switch {
		case len(dst) == 1:
			what = fmt.Sprintf("holds the snapshot %s but none in common with %s", dst[0].Name, r.SourceDataset)
		case len(dst) > 1:
			what = fmt.Sprintf("holds %d snapshots (%s to %s) but none in common with %s", len(dst), dst[0].Name, dst[len(dst)-1].Name, r.SourceDataset)
		}
		sentinel := ErrNeedFull
		if r.AllowFull {
			sentinel = ErrReplicaHasHistory
		}
		return res, fmt.Errorf("%w: the replica %s on %s %s; a full send would replace it. "+
			"To keep it, give the replica a new dataset (replica_dataset in the dataset's entry, or replica.target, e.g. %s) and rerun with --allow-full; "+
			"to destroy it and start over, rerun with --allow-full --replace-replica %s",
			sentinel, r.ReplicaDataset, r.Replica.Where(), what, suggestNewDataset(r.ReplicaDataset), r.ReplicaDataset)
	}
	if exists {
		replaced, err := r.destroyReplica(ctx, dst)
		res.Replaced = replaced
		if err != nil {
			return res, err
		}
	}
	res.Full = true
	n, err := zfs.Transfer(ctx, r.Source, zfs.SendOptions{Snapshot: first.FullName()}, r.Replica, r.ReplicaDataset, zfs.ReceiveOptions{})
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

// destroyReplica removes the replica dataset the admin named to be
// replaced: its snapshots (after releasing vmhistory's base hold; any
// other hold or a reader makes it fail, busy), then the dataset, so the
// full stream is received into a new one. It never forces.
func (r *Replicator) destroyReplica(ctx context.Context, dst []zfs.Snapshot) ([]string, error) {
	held, err := r.Replica.HeldSnapshots(ctx, r.ReplicaDataset, ReplicaHoldTag)
	if err != nil {
		return nil, err
	}
	for _, h := range held {
		if err := r.Replica.Release(ctx, h, ReplicaHoldTag); err != nil {
			return nil, err
		}
	}
	var destroyed []string
	for _, d := range dst {
		if err := r.Replica.Destroy(ctx, d.FullName()); err != nil {
			return destroyed, fmt.Errorf("replace the replica %s: %w", r.ReplicaDataset, err)
		}
		destroyed = append(destroyed, d.Name)
	}
	if err := r.Replica.Destroy(ctx, r.ReplicaDataset); err != nil {
		return destroyed, fmt.Errorf("replace the replica %s: %w", r.ReplicaDataset, err)
	}
	r.log().Warn("destroyed the replica's history on request (--replace-replica) for a full send",
		"replica", r.ReplicaDataset, "where", r.Replica.Where(), "snapshots", destroyed)
	return destroyed, nil
}

// suggestNewDataset proposes a name beside an existing replica dataset,
// dated so that the two histories are told apart.
func suggestNewDataset(name string) string {
	return name + "-" + time.Now().UTC().Format("20060102")
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

func (r *Replicator) log() *slog.Logger {
	if r.Log == nil {
		return slog.Default()
	}
	return r.Log
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
