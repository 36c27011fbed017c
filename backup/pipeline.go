// Package backup is the nightly job: quiesce the VMs, snapshot their
// datasets, resume the VMs, replicate, upload to kopia and prune, as
// explicit steps with a plan, a lock, crash recovery and a report.
package backup

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/restore"
	"github.com/vmhistory/vmhistory/virt"
	"github.com/vmhistory/vmhistory/zfs"
)

// Uploader is the kopia side of the upload step.
type Uploader interface {
	// Uploaded returns the guids of dataset's snapshots already in the repository.
	Uploaded(ctx context.Context, dataset string) (map[uint64]bool, error)
	// Upload stores the files under job.Dir as the kopia snapshot of
	// job.SourcePath (the dataset's mountpoint) taken at the snapshot's
	// creation, tagged with the snapshot's identity.
	Upload(ctx context.Context, job UploadJob) (UploadStats, error)
	// Finish applies the repository's retention and runs maintenance when due.
	Finish(ctx context.Context) error
}

// UploadJob is one snapshot to upload.
type UploadJob struct {
	Snap       zfs.Snapshot
	Dir        string
	SourcePath string
	// Change, when set, is the ZFS incremental stream to the snapshot
	// from one kopia already holds: the upload reads only what changed.
	// NoStream says why there is none, for the report.
	Change   *StreamChange
	NoStream string
	// Verify re-reads the whole snapshot after a stream upload and
	// compares.
	Verify bool
}

// StreamChange is the incremental stream Base → the job's snapshot.
type StreamChange struct {
	Base    zfs.Snapshot
	BaseDir string
	Stream  *zfs.SendStream
	// Replicated: the stream is the one sent to the replica tonight,
	// read as it passed; else the upload ran its own `zfs send -i`.
	Replicated bool
}

// UploadStats are one upload's figures.
type UploadStats struct {
	Files    int64
	Hashed   int64 // bytes read from the snapshot (and hashed)
	Uploaded int64 // bytes written to the repository after dedup and compression
	// Way is "stream" when the ZFS stream chose what was read, "full"
	// when kopia read every file whose size or time changed; Why says
	// why not the stream.
	Way, Why string
	// StreamWriteBytes are the stream's DRR_WRITE bytes; Replicated says
	// the stream was tonight's replication stream.
	StreamWriteBytes int64
	Replicated       bool
	// FilesByWay counts the files of the change by the way they went;
	// FullReasons names those read in full though the stream touched
	// them ("path: reason").
	FilesByWay  map[string]int
	FullReasons []string
	ReadFiles   []UploadFile
	// Verified: the whole snapshot was read again and compared;
	// VerifyBytes were read for it.
	Verified    bool
	VerifyBytes int64
	// Warnings are faults after the upload that did not undo it.
	Warnings []string
}

// Summary is the step's detail for one snapshot.
func (s UploadStats) Summary(name string) string {
	out := fmt.Sprintf("%s (%s read, %s new", name, humanBytes(s.Hashed), humanBytes(s.Uploaded))
	switch {
	case s.Way == WayStream:
		src := "the ZFS stream"
		if s.Replicated {
			src = "the replication's ZFS stream"
		}
		out += fmt.Sprintf("; from %s, %s written there", src, humanBytes(s.StreamWriteBytes))
		var ways []string
		for _, w := range []string{kopiarepo.WayStream, kopiarepo.WayUnchanged, kopiarepo.WayFull, kopiarepo.WayAbsent} {
			if n := s.FilesByWay[w]; n > 0 {
				ways = append(ways, fmt.Sprintf("%d %s", n, w))
			}
		}
		if len(ways) > 0 {
			out += ", files " + strings.Join(ways, ", ")
		}
	case s.Why != "":
		out += "; kopia read the changed files in full: " + s.Why
	}
	if s.Verified {
		out += fmt.Sprintf("; verified by a full re-read of %s", humanBytes(s.VerifyBytes))
	}
	return out + ")"
}

// The ways an upload went.
const (
	WayStream = kopiarepo.WayStream
	WayFull   = kopiarepo.WayFull
)

// Options choose what a run does.
type Options struct {
	DryRun        bool
	SkipReplicate bool
	SkipUpload    bool
	SkipPrune     bool
	// VerifyUpload re-reads every stream upload whole and compares, as
	// kopia.verify_every does one night in N.
	VerifyUpload bool
	// Only runs one step alone: "replicate", "upload" or "prune"; empty
	// runs the whole night.
	Only string
	// RecoverOnly repairs an interrupted run (starts the VMs it recorded)
	// and does nothing else.
	RecoverOnly   bool
	AllowFull     bool
	ForceRollback bool
	// ReplaceReplica names the one replica dataset (exactly as configured)
	// that a full send may replace, destroying its history, when it shares
	// no snapshot with its source.
	ReplaceReplica string
	// Now is the snapshot's time; time.Now when nil.
	Now func() time.Time
}

// Pipeline holds what a run talks to. Replica, Virt and Uploader may be nil
// when the configuration has no replica, the quiesce mode is none, or no
// kopia repository is configured.
type Pipeline struct {
	Config   *config.Config
	Local    *zfs.ZFS
	Replica  *zfs.ZFS
	Virt     *virt.Conn
	Uploader Uploader
	Log      *slog.Logger

	closers []func() error
	// testHookStopping runs just before each VM is quiesced (tests inject
	// a SIGTERM there).
	testHookStopping func(vm string)
}

// datasetState is what the run learned about one dataset.
type datasetState struct {
	cfg        config.Dataset
	mountpoint string
	// selected are the dataset's VMs, whatever their state; domains are
	// those of them to quiesce (none in mode none).
	selected  []virt.Domain
	selectErr error // mode none: the selection failed, no definitions
	domains   []virt.Domain
	snapshot  *zfs.Snapshot
	// replStream reads tonight's replication stream, for the upload.
	replStream *zfs.StreamParser
}

// Run runs one night and returns its report; report.Err() tells whether it
// failed. VMs stopped by the run are running again when Run returns,
// whatever failed — unless libvirt itself cannot start them, which the
// report names and the next run retries.
func (p *Pipeline) Run(ctx context.Context, opts Options) *Report {
	log := p.Log
	if log == nil {
		log = slog.Default()
	}
	host, _ := os.Hostname()
	rep := &Report{RunID: newRunID(), Host: host, Started: time.Now().UTC(), DryRun: opts.DryRun}
	defer rep.finish()

	lock, err := AcquireLock(p.Config.StateDir)
	if err != nil {
		rep.Add(StepResult{Step: StepLock, Status: StatusFailed, Error: err.Error()})
		return rep
	}
	defer lock.Release()
	if prev := lock.TakenOver(); prev != "" {
		log.Warn("took over the lock of an earlier run that did not finish", "holder", prev)
	}

	record, err := LoadStoppedVMs(p.Config.StateDir)
	if err != nil {
		rep.Add(StepResult{Step: StepRecover, Status: StatusFailed, Error: err.Error()})
		return rep
	}
	// VMs first: they are down, and the sweep may wait on the replica.
	if !record.Empty() || opts.RecoverOnly {
		if opts.DryRun {
			rep.Plan = append(rep.Plan, fmt.Sprintf("recover: start again the VMs an interrupted run stopped: %s", orNone(record.Names())))
		} else if !p.recover(ctx, record, rep) {
			p.sweepStale(ctx, rep)
			return rep // never quiesce more while VMs are still down
		}
	}
	if opts.DryRun {
		rep.Plan = append(rep.Plan, "recover: remove the read-only clones and restore holds of vmhistory processes of this host that no longer run")
	} else {
		p.sweepStale(ctx, rep)
	}
	if opts.RecoverOnly {
		return rep
	}

	states, err := p.datasets(ctx)
	if err != nil {
		rep.Add(StepResult{Step: StepSnapshot, Status: StatusFailed, Error: err.Error()})
		return rep
	}
	whole := opts.Only == ""
	if whole {
		p.snapshotNight(ctx, states, record, opts, rep)
	}
	if p.Replica != nil && !opts.SkipReplicate && (whole || opts.Only == StepReplicate) {
		p.replicate(ctx, states, opts, rep)
	} else if whole || opts.Only == StepReplicate {
		rep.Add(StepResult{Step: StepReplicate, Status: StatusSkipped, Detail: skipReason(p.Replica == nil, "no replica configured")})
	}
	uploaded := map[string]map[uint64]bool{}
	if p.Uploader != nil && !opts.SkipUpload && (whole || opts.Only == StepUpload) {
		uploaded = p.upload(ctx, states, opts, rep)
	} else {
		if whole || opts.Only == StepUpload {
			rep.Add(StepResult{Step: StepUpload, Status: StatusSkipped, Detail: skipReason(p.Uploader == nil, "no kopia repository configured")})
		}
		if p.Uploader != nil {
			uploaded = p.listUploaded(ctx, states, rep)
		}
	}
	if !opts.SkipPrune && (whole || opts.Only == StepPrune) {
		p.prune(ctx, states, uploaded, opts, rep)
	}
	return rep
}

func skipReason(notConfigured bool, why string) string {
	if notConfigured {
		return why
	}
	return "skipped on request"
}

func orNone(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

// sweepStale removes what vmhistory processes of this host that no longer
// run (a backup killed during its upload, a mount or restore killed with
// -9) left on the local pools and the replica's: read-only clones and
// restore holds. Either keeps its snapshot from being pruned, and nothing
// else would ever remove it. Live processes' clones and holds, and those
// of other hosts, are left alone. A failed sweep is a warning: the run
// goes on, and prune then names what keeps the snapshot.
func (p *Pipeline) sweepStale(ctx context.Context, rep *Report) {
	start := time.Now()
	type side struct {
		z        *zfs.ZFS
		datasets []string
	}
	sides := []side{{p.Local, p.Config.DatasetNames()}}
	if p.Replica != nil {
		var on []string
		for _, ds := range p.Config.Datasets {
			on = append(on, ds.ReplicaDataset)
		}
		sides = append(sides, side{p.Replica, on})
	}
	var swept []string
	var errs []error
	for _, sd := range sides {
		var pools []string
		for _, d := range sd.datasets {
			if pool := zfs.Pool(d); !slices.Contains(pools, pool) {
				pools = append(pools, pool)
			}
		}
		reached := true
		for _, pool := range pools {
			removed, err := sd.z.SweepClones(ctx, pool)
			if err != nil {
				errs = append(errs, err)
				reached = false
			}
			for _, c := range removed {
				swept = append(swept, fmt.Sprintf("clone %s on %s", c, sd.z.Where()))
			}
		}
		for _, d := range sd.datasets {
			if !reached { // the replica down, say: do not wait on it again
				break
			}
			released, err := sd.z.SweepHolds(ctx, d, restore.RestoreHoldTag)
			if err != nil && !errors.Is(err, zfs.ErrNotExist) { // a replica dataset not received yet
				errs = append(errs, err)
			}
			for _, h := range released {
				swept = append(swept, fmt.Sprintf("hold %s on %s", h, sd.z.Where()))
			}
		}
	}
	if len(swept) == 0 && len(errs) == 0 {
		return
	}
	step := StepResult{Step: StepRecover, Status: StatusOK, Duration: time.Since(start),
		Detail: "removed what dead vmhistory processes left: " + orNone(swept)}
	if err := errors.Join(errs...); err != nil {
		step.Status, step.Error = StatusWarning, "looking for what dead vmhistory processes left: "+err.Error()
	}
	rep.Add(step)
}

// recover starts the VMs an interrupted run recorded. It reports whether
// every one of them runs again.
func (p *Pipeline) recover(ctx context.Context, record *StoppedVMs, rep *Report) bool {
	start := time.Now()
	if record.Empty() {
		rep.Add(StepResult{Step: StepRecover, Status: StatusOK, Detail: "nothing to recover"})
		return true
	}
	if p.Virt == nil {
		rep.Add(StepResult{Step: StepRecover, Status: StatusFailed, Error: fmt.Sprintf("%s lists VMs (%s) but there is no libvirt connection", record.Path(), strings.Join(record.Names(), ", "))})
		return false
	}
	// Group by how they were stopped: each group needs its mode and mountpoint.
	type key struct{ mode, mountpoint string }
	groups := map[key][]string{}
	for _, vm := range record.VMs {
		k := key{vm.Mode, vm.Mountpoint}
		groups[k] = append(groups[k], vm.Name)
	}
	ok := true
	var done, dropped []string
	for k, names := range groups {
		q := &virt.Quiescer{Conn: p.Virt, Mode: virt.Mode(k.mode), Mountpoint: k.mountpoint,
			ResumeTimeout: p.Config.Quiesce.ResumeTimeout}
		res := q.Recover(context.WithoutCancel(ctx), names)
		for _, vm := range res.VMs {
			r := VMResult{Name: vm.Name, Mode: k.mode, Resumed: vm.Err == nil}
			switch {
			case errors.Is(vm.Err, virt.ErrDomainGone), errors.Is(vm.Err, virt.ErrNoSavedState):
				// Nothing of ours to bring back: keeping it in the record
				// would stop every later night until it was edited.
				r.Resumed = false
				if err := record.Remove(vm.Name); err != nil {
					r.Error = err.Error()
					ok = false
				}
				rep.Warn("VM %s, stopped by an interrupted run, is not started again and is dropped from %s: %v", vm.Name, record.Path(), vm.Err)
				dropped = append(dropped, vm.Name)
			case vm.Err != nil:
				r.Error = vm.Err.Error()
				ok = false
			default:
				record.Remove(vm.Name)
				done = append(done, vm.Name+" ("+vm.Action+")")
			}
			rep.VMs = append(rep.VMs, r)
		}
	}
	step := StepResult{Step: StepRecover, Status: StatusOK, Duration: time.Since(start), Detail: "started again: " + orNone(done)}
	if len(dropped) > 0 {
		step.Status = StatusWarning
		step.Detail += "; not started, dropped from the record (see the warnings): " + strings.Join(dropped, ", ")
	}
	if !ok {
		step.Status = StatusFailed
		step.Error = fmt.Sprintf("some VMs stopped by an interrupted run could not be started (see the VM table); %s keeps them for the next run", record.Path())
	}
	rep.Add(step)
	return ok
}

// datasets resolves each configured dataset's mountpoint.
func (p *Pipeline) datasets(ctx context.Context) ([]*datasetState, error) {
	var states []*datasetState
	for _, ds := range p.Config.Datasets {
		props, err := p.Local.Get(ctx, ds.Name, "mountpoint")
		if errors.Is(err, zfs.ErrNotExist) {
			return nil, fmt.Errorf("dataset %s does not exist on this host; fix its name under datasets: in the configuration, or create it", ds.Name)
		}
		if err != nil {
			return nil, fmt.Errorf("dataset %s: %w", ds.Name, err)
		}
		states = append(states, &datasetState{cfg: ds, mountpoint: props["mountpoint"]})
	}
	return states, nil
}

// snapshotNight is quiesce → snapshot → resume. The VMs run again before it
// returns, whatever failed in between.
func (p *Pipeline) snapshotNight(ctx context.Context, states []*datasetState, record *StoppedVMs, opts Options, rep *Report) {
	now := time.Now()
	if opts.Now != nil {
		now = opts.Now()
	}
	name := p.Config.SnapshotName(now)
	mode := virt.Mode(p.Config.Quiesce.Mode)

	// Which VMs, per dataset. A VM with disks on two datasets is quiesced
	// once, with the first; its definition goes into both. In mode none
	// the selection only says whose definitions to keep.
	seen := map[string]bool{}
	if p.Virt != nil {
		for _, st := range states {
			var names []string
			if !st.cfg.VMs.All {
				names = st.cfg.VMs.Names
			}
			sel, err := p.Virt.DomainsUnder(ctx, virt.Dataset{Name: st.cfg.Name, Mountpoint: st.mountpoint}, names)
			if err != nil {
				if mode == virt.ModeNone {
					st.selectErr = err
					continue
				}
				rep.Add(StepResult{Step: StepQuiesce, Dataset: st.cfg.Name, Status: StatusFailed, Error: err.Error()})
				rep.Add(StepResult{Step: StepSnapshot, Dataset: st.cfg.Name, Status: StatusSkipped, Detail: "no snapshot: the VMs to quiesce are unknown"})
				return
			}
			for _, u := range sel.Unsupported {
				rep.Warn("VM %s: %s", u.Domain.Name, u.Reason)
			}
			for _, w := range sel.Warnings {
				rep.Warn("%s", w)
			}
			st.selected = sel.Domains
			for _, d := range sel.Domains {
				if !seen[d.Name] && mode != virt.ModeNone {
					seen[d.Name] = true
					st.domains = append(st.domains, d)
				}
			}
		}
	}

	var mountpoints []string
	for _, st := range states {
		mountpoints = append(mountpoints, st.mountpoint)
	}
	if w := ManagedSaveWarning(string(mode), p.Config.Libvirt.URI, mountpoints); w != "" {
		rep.Warn("%s", w)
	}

	if opts.DryRun {
		for _, st := range states {
			rep.Plan = append(rep.Plan, fmt.Sprintf("write the definitions of %s's VMs into %s: %s", st.cfg.Name,
				filepath.Join(st.mountpoint, virt.SaveDirName, virt.DefinitionsDir), orNone(domainNames(st.selected))))
			rep.Plan = append(rep.Plan, fmt.Sprintf("quiesce (%s) the running VMs of %s: %s", mode, st.cfg.Name, orNone(domainNames(st.domains))))
		}
		rep.Plan = append(rep.Plan, fmt.Sprintf("snapshot %s@%s", strings.Join(p.Config.DatasetNames(), "@"+name+", "), name),
			"resume the VMs quiesced above")
		return
	}

	p.definitions(ctx, states, rep)

	if err := record.Begin(rep.RunID); err != nil {
		rep.Add(StepResult{Step: StepQuiesce, Status: StatusFailed, Error: err.Error()})
		return
	}

	// Quiesce every dataset's VMs at once.
	start := time.Now()
	quiesced := make([]*virt.Quiesced, len(states))
	qerrs := make([]error, len(states))
	var wg sync.WaitGroup
	for i, st := range states {
		if len(st.domains) == 0 {
			continue
		}
		q := &virt.Quiescer{Conn: p.Virt, Mode: mode, Mountpoint: st.mountpoint,
			SaveTimeout: p.Config.Quiesce.SaveTimeout, ResumeTimeout: p.Config.Quiesce.ResumeTimeout,
			AgentWait: p.Config.Quiesce.AgentWait,
			Parallel:  p.Config.Quiesce.Parallel,
			OnStopping: func(vm string) error {
				if p.testHookStopping != nil {
					p.testHookStopping(vm)
				}
				return record.Add(StoppedVM{Name: vm, Mode: string(mode), Dataset: st.cfg.Name, Mountpoint: st.mountpoint})
			}}
		wg.Add(1)
		go func() {
			defer wg.Done()
			quiesced[i], qerrs[i] = q.Quiesce(ctx, st.domains)
		}()
	}
	wg.Wait()
	quiesceErr := errors.Join(qerrs...)
	qstep := StepResult{Step: StepQuiesce, Status: StatusOK, Duration: time.Since(start)}
	var names []string
	for _, q := range quiesced {
		if q != nil {
			names = append(names, q.Names()...)
		}
	}
	qstep.Detail = fmt.Sprintf("%s: %s", mode, orNone(names))
	if mode == virt.ModeNone || p.Virt == nil {
		qstep.Detail = "mode none: VMs left running"
	}
	if quiesceErr != nil {
		qstep.Status, qstep.Error = StatusFailed, quiesceErr.Error()
	}
	rep.Add(qstep)

	// Snapshot only what was quiesced cleanly: a VM that failed to save
	// may be half-written in the snapshot.
	if quiesceErr == nil && ctx.Err() == nil {
		start = time.Now()
		snaps, atomic, err := p.Local.CreateSnapshots(ctx, p.Config.DatasetNames(), name,
			map[string]string{RunProperty: rep.RunID})
		step := StepResult{Step: StepSnapshot, Status: StatusOK, Duration: time.Since(start)}
		for i, s := range snaps {
			states[i].snapshot = &snaps[i]
			rep.Snapshots = append(rep.Snapshots, SnapshotResult{Dataset: s.Dataset, Name: s.Name, GUID: s.GUID, Creation: s.Creation, Atomic: atomic})
		}
		step.Detail = "@" + name
		if len(states) > 1 {
			if atomic {
				step.Detail += " (atomic across datasets)"
			} else {
				step.Detail += " (one dataset after the other: this zfs cannot snapshot several datasets atomically)"
			}
		}
		if err != nil {
			step.Status, step.Error = StatusFailed, err.Error()
		}
		rep.Add(step)
	} else {
		why := "quiesce failed"
		if ctx.Err() != nil {
			why = "interrupted: " + context.Cause(ctx).Error()
		}
		rep.Add(StepResult{Step: StepSnapshot, Status: StatusFailed, Error: "not taken: " + why})
	}

	// Resume, on a context a SIGTERM cannot cancel.
	start = time.Now()
	rctx := context.WithoutCancel(ctx)
	var resumeErrs []error
	for _, q := range quiesced {
		if q == nil {
			continue
		}
		res := q.Resume(rctx)
		for _, vm := range res.VMs {
			r := VMResult{Name: vm.Name, Mode: string(mode), Downtime: vm.Downtime, Resumed: vm.Err == nil, Action: vm.Action}
			if vm.Err != nil {
				r.Error = vm.Err.Error()
				resumeErrs = append(resumeErrs, vm.Err)
			} else if err := record.Remove(vm.Name); err != nil {
				resumeErrs = append(resumeErrs, err)
			}
			rep.VMs = append(rep.VMs, r)
		}
	}
	// A VM can be recorded and then not touched (the run was interrupted
	// between the record and the call): if it runs, it needs no recovery.
	for _, name := range record.Names() {
		if d, err := p.Virt.Domain(rctx, name); err == nil && d.State.Running() {
			if err := record.Remove(name); err != nil {
				resumeErrs = append(resumeErrs, err)
			}
		}
	}
	if len(quiesced) > 0 && slices.ContainsFunc(quiesced, func(q *virt.Quiesced) bool { return q != nil }) {
		step := StepResult{Step: StepResume, Status: StatusOK, Duration: time.Since(start)}
		if err := errors.Join(resumeErrs...); err != nil {
			step.Status, step.Error = StatusFailed, err.Error()+"; the next run (or vmhistory backup --recover) retries"
		}
		rep.Add(step)
	}
}

// definitions writes each dataset's VM definitions into it, while the VMs
// still run: the snapshot holds them. A failure fails the run but not the
// snapshot, which still holds the disks.
func (p *Pipeline) definitions(ctx context.Context, states []*datasetState, rep *Report) {
	for _, st := range states {
		step := StepResult{Step: StepDefinitions, Dataset: st.cfg.Name, Status: StatusOK}
		switch {
		case p.Virt == nil:
			step.Status, step.Detail = StatusSkipped, "no libvirt connection"
		case st.selectErr != nil:
			step.Status, step.Error = StatusFailed, "the dataset's VMs are unknown: "+st.selectErr.Error()
		default:
			start := time.Now()
			dctx, cancel := context.WithTimeout(ctx, definitionsTimeout)
			written, err := p.writeDefinitions(dctx, st)
			cancel()
			step.Duration = time.Since(start)
			step.Detail = fmt.Sprintf("%s: %s", filepath.Join(st.mountpoint, virt.SaveDirName, virt.DefinitionsDir), orNone(written))
			if err != nil {
				step.Status, step.Error = StatusFailed, err.Error()
			}
		}
		rep.Add(step)
	}
}

func domainNames(ds []virt.Domain) []string {
	var names []string
	for _, d := range ds {
		names = append(names, d.Name)
	}
	return names
}

func (p *Pipeline) ours(name string) bool {
	_, ok := p.Config.ParseSnapshotName(name)
	return ok
}

func (p *Pipeline) replicate(ctx context.Context, states []*datasetState, opts Options, rep *Report) {
	if opts.ReplaceReplica != "" {
		var targets []string
		for _, st := range states {
			targets = append(targets, st.cfg.ReplicaDataset)
		}
		if !slices.Contains(targets, opts.ReplaceReplica) {
			rep.Add(StepResult{Step: StepReplicate, Status: StatusFailed,
				Error: fmt.Sprintf("--replace-replica %s names no replica dataset of this configuration (they are: %s); nothing was replicated", opts.ReplaceReplica, strings.Join(targets, ", "))})
			return
		}
	}
	for _, st := range states {
		r := &Replicator{Source: p.Local, Replica: p.Replica, SourceDataset: st.cfg.Name, ReplicaDataset: st.cfg.ReplicaDataset,
			AllowFull: opts.AllowFull, ForceRollback: opts.ForceRollback, ReplaceReplica: opts.ReplaceReplica,
			Keep: p.Config.KeepReplica, Named: p.ours, Log: p.Log}
		if p.Uploader != nil && !opts.SkipUpload && opts.Only == "" {
			r.Observe = func(from, to zfs.Snapshot) io.Writer {
				st.replStream = zfs.NewStreamParser()
				return st.replStream
			}
		}
		if opts.DryRun {
			rep.Plan = append(rep.Plan, fmt.Sprintf("replicate %s to %s on %s: incremental from the newest common snapshot (full only with --allow-full), keep %d there",
				st.cfg.Name, st.cfg.ReplicaDataset, p.Replica.Where(), p.Config.KeepReplica))
			continue
		}
		start := time.Now()
		res, err := r.Run(ctx)
		step := StepResult{Step: StepReplicate, Dataset: st.cfg.Name, Status: StatusOK, Duration: time.Since(start), Bytes: res.Bytes}
		switch {
		case res.UpToDate:
			step.Detail = "already up to date at " + res.Latest
		case res.Full:
			step.Detail = fmt.Sprintf("full send: %s", strings.Join(res.Sent, ", "))
			if len(res.Replaced) > 0 {
				step.Detail += fmt.Sprintf(" (replacing %s, whose snapshots were destroyed on request: %s)", st.cfg.ReplicaDataset, strings.Join(res.Replaced, ", "))
			}
		case len(res.Sent) > 0:
			step.Detail = fmt.Sprintf("%s -> %s", res.Base, strings.Join(res.Sent, ", "))
		}
		switch {
		case res.Resumed:
			step.Detail = "resumed an interrupted receive; " + step.Detail
		case res.AbortedResume != "":
			step.Detail = "aborted an interrupted receive that could not be resumed (" + res.AbortedResume + "); " + step.Detail
		}
		if len(res.Pruned) > 0 {
			step.Detail += fmt.Sprintf("; pruned on the replica: %s", strings.Join(res.Pruned, ", "))
		}
		if len(res.NotOurs) > 0 {
			step.Detail += fmt.Sprintf("; not ours, kept on the replica: %s", strings.Join(res.NotOurs, ", "))
		}
		if err != nil {
			step.Status, step.Error = StatusFailed, err.Error()
		}
		rep.Add(step)
	}
}

// listUploaded asks kopia which snapshots it has, for pruning when the
// upload step does not run. A dataset whose list fails is absent: pruning
// then keeps everything of it.
func (p *Pipeline) listUploaded(ctx context.Context, states []*datasetState, rep *Report) map[string]map[uint64]bool {
	out := map[string]map[uint64]bool{}
	for _, st := range states {
		got, err := p.Uploader.Uploaded(ctx, st.cfg.Name)
		if err != nil {
			rep.Warn("cannot list the kopia snapshots of %s (%v): nothing of it is pruned", st.cfg.Name, err)
			continue
		}
		out[st.cfg.Name] = got
	}
	return out
}

// upload stores every local snapshot kopia lacks, oldest first: a night
// missed because the repository was unreachable is caught up before the
// new one.
func (p *Pipeline) upload(ctx context.Context, states []*datasetState, opts Options, rep *Report) map[string]map[uint64]bool {
	out := map[string]map[uint64]bool{}
	for _, st := range states {
		start := time.Now()
		step := StepResult{Step: StepUpload, Dataset: st.cfg.Name, Status: StatusOK}
		err := func() error {
			have, err := p.Uploader.Uploaded(ctx, st.cfg.Name)
			if err != nil {
				return err
			}
			out[st.cfg.Name] = have
			snaps, err := p.Local.Snapshots(ctx, st.cfg.Name)
			if err != nil {
				return err
			}
			var pending []zfs.Snapshot
			for _, s := range snaps {
				if p.ours(s.Name) && !have[s.GUID] {
					pending = append(pending, s)
				}
			}
			if opts.DryRun {
				var names []string
				for _, s := range pending {
					names = append(names, s.Name)
				}
				how := "kopia reads every changed file (kopia.incremental: full)"
				if k := p.Config.Kopia; k == nil || k.Incremental != config.IncrementalFull {
					how = "each from the ZFS stream from the newest snapshot kopia holds before it, where there is one"
					var newest zfs.Snapshot
					for _, s := range snaps {
						if have[s.GUID] {
							newest = s
						}
					}
					if newest.Name != "" {
						how += " (now " + newest.Name + ")"
					}
				}
				rep.Plan = append(rep.Plan, fmt.Sprintf("upload to kopia, oldest first: %s (and tonight's snapshot); %s", orNone(names), how))
				return nil
			}
			var done []string
			for _, s := range pending {
				stats, err := p.uploadOne(ctx, s, st, snaps, have, opts)
				for _, w := range stats.Warnings {
					rep.Warn("%s", w)
				}
				step.Bytes += stats.Uploaded
				step.Read += stats.Hashed
				step.UploadFiles = append(step.UploadFiles, stats.ReadFiles...)
				for way, n := range stats.FilesByWay {
					if step.FilesByWay == nil {
						step.FilesByWay = map[string]int{}
					}
					step.FilesByWay[way] += n
				}
				if err != nil {
					step.Detail = orNone(done)
					return fmt.Errorf("upload %s: %w", s.FullName(), err)
				}
				have[s.GUID] = true
				done = append(done, stats.Summary(s.Name))
			}
			step.Detail = orNone(done)
			if len(done) == 0 {
				step.Detail = "everything already uploaded"
			}
			return nil
		}()
		step.Duration = time.Since(start)
		if err != nil {
			step.Status, step.Error = StatusFailed, err.Error()
		}
		if !opts.DryRun {
			rep.Add(step)
		}
	}
	if !opts.DryRun {
		start := time.Now()
		if err := p.Uploader.Finish(ctx); err != nil {
			rep.Add(StepResult{Step: StepUpload, Dataset: "", Status: StatusFailed, Duration: time.Since(start), Error: "retention and maintenance: " + err.Error()})
		}
		// kopia's retention, just run, may have expired snapshots listed
		// above (a caught-up night older than what it keeps): prune must
		// go by what kopia holds now, or a snapshot would be destroyed
		// here that kopia no longer has either.
		for ds := range out {
			got, err := p.Uploader.Uploaded(ctx, ds)
			if err != nil {
				rep.Warn("cannot list the kopia snapshots of %s after retention (%v): nothing of it is pruned", ds, err)
				delete(out, ds)
				continue
			}
			out[ds] = got
		}
	}
	return out
}

func (p *Pipeline) uploadOne(ctx context.Context, s zfs.Snapshot, st *datasetState, snaps []zfs.Snapshot, have map[uint64]bool, opts Options) (stats UploadStats, err error) {
	mountpoint := st.mountpoint
	view, err := p.Local.OpenSnapshot(ctx, s.FullName())
	if err != nil {
		return UploadStats{}, err
	}
	defer func() {
		cerr := view.Close(context.WithoutCancel(ctx))
		switch {
		case cerr == nil:
		case err == nil:
			// The snapshot is in kopia: a clone left behind costs space
			// and blocks the snapshot's prune until the next run's sweep
			// removes it, it does not undo the upload.
			stats.Warnings = append(stats.Warnings, fmt.Sprintf("%s is uploaded, but its read-only view was not removed (%v); the next backup run removes it", s.FullName(), cerr))
		default:
			err = errors.Join(err, cerr)
		}
	}()
	job := UploadJob{Snap: s, Dir: view.Root, SourcePath: mountpoint}
	if k := p.Config.Kopia; k != nil && k.Incremental == config.IncrementalFull {
		job.NoStream = "kopia.incremental is full"
	} else {
		base, ok := streamBase(s, snaps, have)
		if !ok {
			job.NoStream = "no earlier snapshot of the dataset is in kopia"
		} else {
			change, release, err := p.streamChange(ctx, base, s, st.replStream)
			if err != nil {
				// The stream is an optimisation: without it, kopia reads
				// the changed files itself.
				p.logger().Warn("no incremental stream for the upload; kopia reads the changed files in full", "snapshot", s.FullName(), "base", base.FullName(), "err", err)
				job.NoStream = err.Error()
			} else {
				defer release()
				job.Change = change
				job.Verify = opts.VerifyUpload || verifyNight(p.Config.Kopia, len(have))
			}
		}
	}
	return p.Uploader.Upload(ctx, job)
}

// streamBase is the newest snapshot older than s that kopia holds: the
// base of the stream the upload reads.
func streamBase(s zfs.Snapshot, snaps []zfs.Snapshot, have map[uint64]bool) (zfs.Snapshot, bool) {
	var base zfs.Snapshot
	found := false
	for _, c := range snaps {
		if c.CreateTXG < s.CreateTXG && have[c.GUID] && (!found || c.CreateTXG > base.CreateTXG) {
			base, found = c, true
		}
	}
	return base, found
}

// verifyNight: one night in kopia.verify_every, counted by the dataset's
// kopia snapshots (the one about to be made included).
func verifyNight(k *config.Kopia, held int) bool {
	if k == nil || k.VerifyEvery <= 0 {
		return false
	}
	return (held+1)%k.VerifyEvery == 0
}

// streamChange runs `zfs send -i base s` into the stream reader (zfs reads
// only the changed blocks; the payload is dropped as it is read) and opens
// the base snapshot's files, which release closes.
func (p *Pipeline) streamChange(ctx context.Context, base, s zfs.Snapshot, replicated *zfs.StreamParser) (*StreamChange, func(), error) {
	stream := replicatedStream(replicated, base, s)
	fromReplica := stream != nil
	if stream == nil {
		parser := zfs.NewStreamParser()
		if err := p.Local.Send(ctx, zfs.SendOptions{Snapshot: s.FullName(), From: base.FullName()}, parser); err != nil {
			return nil, nil, fmt.Errorf("read the incremental stream: %w", err)
		}
		var err error
		if stream, err = parser.Result(); err != nil {
			return nil, nil, fmt.Errorf("read the incremental stream %s -> %s: %w", base.FullName(), s.FullName(), err)
		}
	}
	bv, err := p.Local.OpenSnapshot(ctx, base.FullName())
	if err != nil {
		return nil, nil, fmt.Errorf("open the stream's base: %w", err)
	}
	release := func() {
		if err := bv.Close(context.WithoutCancel(ctx)); err != nil {
			p.logger().Warn("release the stream's base", "snapshot", base.FullName(), "err", err)
		}
	}
	return &StreamChange{Base: base, BaseDir: bv.Root, Stream: stream, Replicated: fromReplica}, release, nil
}

// replicatedStream is tonight's replication stream when it holds the
// chain base → s (the replica's base may be another snapshot than
// kopia's); nil sends the upload to read its own stream.
func replicatedStream(parser *zfs.StreamParser, base, s zfs.Snapshot) *zfs.SendStream {
	if parser == nil {
		return nil
	}
	stream, err := parser.Result()
	if err != nil {
		return nil
	}
	if _, err := stream.Between(base.GUID, s.GUID); err != nil {
		return nil
	}
	return stream
}

func (p *Pipeline) logger() *slog.Logger {
	if p.Log != nil {
		return p.Log
	}
	return slog.Default()
}

func (p *Pipeline) prune(ctx context.Context, states []*datasetState, uploaded map[string]map[uint64]bool, opts Options, rep *Report) {
	for _, st := range states {
		pr := &Pruner{ZFS: p.Local, Dataset: st.cfg.Name, Keep: p.Config.KeepLocal, Named: p.ours}
		if p.Uploader != nil {
			have := uploaded[st.cfg.Name] // nil when unknown: keep everything
			pr.Uploaded = func(guid uint64) bool { return have[guid] }
		}
		if opts.DryRun {
			if opts.Only == "" {
				pr.Pending = 1 // tonight's snapshot
			}
			pr.DryRun = true
			res, err := pr.Run(ctx)
			if err != nil {
				rep.Add(StepResult{Step: StepPrune, Dataset: st.cfg.Name, Status: StatusFailed, Error: err.Error()})
				continue
			}
			plan := fmt.Sprintf("prune %s: keep the last %d of vmhistory's snapshots; destroy %s", st.cfg.Name, p.Config.KeepLocal, orNone(res.Destroyed))
			if len(res.KeptHeld) > 0 {
				plan += "; keep (held: the replication base, or in use): " + strings.Join(res.KeptHeld, ", ")
			}
			if len(res.KeptNotUploaded) > 0 {
				plan += "; keep (not in kopia yet): " + strings.Join(res.KeptNotUploaded, ", ")
			}
			rep.Plan = append(rep.Plan, plan)
			continue
		}
		start := time.Now()
		res, err := pr.Run(ctx)
		step := StepResult{Step: StepPrune, Dataset: st.cfg.Name, Status: StatusOK, Duration: time.Since(start)}
		step.Detail = "destroyed: " + orNone(res.Destroyed)
		if len(res.Destroyed) == 0 {
			step.Detail = "nothing to destroy"
		}
		if len(res.KeptNotUploaded) > 0 {
			why := "not uploaded to kopia yet"
			if uploaded[st.cfg.Name] == nil {
				why = "kopia could not be asked which snapshots it has"
			}
			rep.Warn("%s: kept %s beyond keep_local %d: %s", st.cfg.Name, strings.Join(res.KeptNotUploaded, ", "), p.Config.KeepLocal, why)
		}
		if len(res.KeptHeld) > 0 {
			step.Detail += "; kept (held): " + strings.Join(res.KeptHeld, ", ")
		}
		if len(res.KeptBusy) > 0 {
			step.Detail += "; kept (in use, retried next night): " + strings.Join(res.KeptBusy, ", ")
			// In use is fine for a night, not for ever: say by whom, as a
			// warning while the holder lives, as a failure when it is a
			// dead process's clone that the recover step could not remove.
			var alive, dead []string
			for _, name := range res.KeptBusy {
				clones := res.Holders[name]
				if len(clones) == 0 {
					alive = append(alive, name+" is busy (no clone of it found: a hold placed since, or a zfs still at it)")
				}
				for _, c := range clones {
					line := fmt.Sprintf("%s is kept by clone %s", name, c.Holder())
					if c.Owner != "" && !c.OwnerAlive {
						dead = append(dead, line)
					} else {
						alive = append(alive, line)
					}
				}
			}
			if len(alive) > 0 {
				step.Status = StatusWarning
				step.Detail += " (" + strings.Join(alive, "; ") + ")"
			}
			if len(dead) > 0 {
				err = errors.Join(err, fmt.Errorf("%s: the recover step could not remove it (see its warning); destroy it with zfs destroy once nothing reads from it", strings.Join(dead, "; ")))
			}
		}
		if len(res.NotOurs) > 0 {
			step.Detail += "; not ours, kept: " + strings.Join(res.NotOurs, ", ")
		}
		if err != nil {
			step.Status, step.Error = StatusFailed, err.Error()
		}
		rep.Add(step)
	}
}

func newRunID() string {
	b := make([]byte, 4)
	rand.Read(b)
	return time.Now().UTC().Format("20060102T150405Z") + "-" + hex.EncodeToString(b)
}
