package kopiarepo

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/maintenance"
	"github.com/kopia/kopia/snapshot"
	"github.com/kopia/kopia/snapshot/policy"
	"github.com/kopia/kopia/snapshot/snapshotmaintenance"
)

// MaintenanceResult says whether automatic maintenance ran.
type MaintenanceResult struct {
	// Owner is the maintenance owner, user@host.
	Owner string `json:"owner"`
	// Mode is "quick" or "full" when maintenance ran, "" when it did not.
	Mode string `json:"mode,omitempty"`
	// Skipped says why it did not run: not due yet, owned by another
	// client, read-only connection.
	Skipped string `json:"skipped,omitempty"`
	// Duration of the maintenance run.
	Duration time.Duration `json:"duration,omitempty"`
}

// MaintenanceError is returned when a snapshot was saved but the automatic
// maintenance that follows it failed: the upload itself succeeded.
type MaintenanceError struct{ Err error }

func (e *MaintenanceError) Error() string { return "kopia maintenance failed: " + e.Err.Error() }
func (e *MaintenanceError) Unwrap() error { return e.Err }

// MaybeRunMaintenance runs kopia's automatic maintenance if it is due and
// owned by this connection, exactly as kopia's CLI does after every
// command that writes (cli/app.go maybeRunMaintenance): in its own write
// session, snapshotmaintenance.Run in auto mode with full safety, which
// runs snapshot garbage collection before full maintenance. Maintenance
// owned by another client is skipped without error, as in the CLI. The
// library never runs maintenance by itself: a program that only uploads
// through it would let the repository grow without bound.
func (r *Repo) MaybeRunMaintenance(ctx context.Context) (MaintenanceResult, error) {
	return guarded(ctx, r, r.maybeRunMaintenance)
}

func (r *Repo) maybeRunMaintenance(ctx context.Context) (MaintenanceResult, error) {
	var res MaintenanceResult
	if r.rep.ClientOptions().ReadOnly {
		res.Skipped = "read-only connection"
		return res, nil
	}
	dr, ok := r.rep.(repo.DirectRepository)
	if !ok {
		res.Skipped = "not a direct repository connection (kopia server): the server runs maintenance"
		return res, nil
	}
	p, err := maintenance.GetParams(ctx, dr)
	if err != nil {
		return res, fmt.Errorf("read maintenance settings of %s: %w", r.storage, err)
	}
	res.Owner = p.Owner
	if p.Owner != dr.ClientOptions().UsernameAtHost() {
		res.Skipped = fmt.Sprintf("owned by %q, not this client %q", p.Owner, dr.ClientOptions().UsernameAtHost())
		if p.Owner == "" {
			res.Skipped = "no maintenance owner set"
		}
		return res, nil
	}
	before, err := maintenance.GetSchedule(ctx, dr)
	if err != nil {
		return res, fmt.Errorf("read maintenance schedule of %s: %w", r.storage, err)
	}
	start := time.Now()
	err = repo.DirectWriteSession(ctx, dr, repo.WriteSessionOptions{Purpose: "vmhistory:maybeRunMaintenance"},
		func(ctx context.Context, w repo.DirectRepositoryWriter) error {
			return snapshotmaintenance.Run(ctx, w, maintenance.ModeAuto, false, maintenance.SafetyFull)
		})
	var notOwned maintenance.NotOwnedError
	if errors.As(err, &notOwned) {
		res.Skipped = fmt.Sprintf("owned by %q", notOwned.Owner)
		return res, nil
	}
	if err != nil {
		return res, fmt.Errorf("maintenance of %s: %w", r.storage, err)
	}
	// RunExclusive does not say what it did; the schedule it advanced does.
	after, err := maintenance.GetSchedule(ctx, dr)
	switch {
	case err != nil:
		return res, fmt.Errorf("read maintenance schedule of %s: %w", r.storage, err)
	case !after.NextFullMaintenanceTime.Equal(before.NextFullMaintenanceTime):
		res.Mode = string(maintenance.ModeFull)
	case !after.NextQuickMaintenanceTime.Equal(before.NextQuickMaintenanceTime):
		res.Mode = string(maintenance.ModeQuick)
	default:
		next := before.NextQuickMaintenanceTime
		if p.FullCycle.Enabled && (!p.QuickCycle.Enabled || before.NextFullMaintenanceTime.Before(next)) {
			next = before.NextFullMaintenanceTime
		}
		res.Skipped = "not due until " + next.Local().Format(time.DateTime)
		return res, nil
	}
	res.Duration = time.Since(start)
	return res, nil
}

// ApplyRetention deletes the snapshots of a source that its retention
// policy no longer keeps, as kopia's CLI does after saving each snapshot
// (policy.ApplyRetentionPolicy). It returns the IDs of the deleted
// snapshots. Their data is freed later by maintenance (snapshot GC).
func (r *Repo) ApplyRetention(ctx context.Context, host, user, path string) ([]string, error) {
	var deleted []string
	si := snapshot.SourceInfo{Host: host, UserName: user, Path: path}
	err := r.guard(ctx, func(ctx context.Context) error {
		return repo.WriteSession(ctx, r.rep, repo.WriteSessionOptions{Purpose: "vmhistory:retention"},
			func(ctx context.Context, w repo.RepositoryWriter) error {
				var err error
				deleted, err = applyRetention(ctx, w, si)
				return err
			})
	})
	return deleted, err
}

func applyRetention(ctx context.Context, w repo.RepositoryWriter, si snapshot.SourceInfo) ([]string, error) {
	ids, err := policy.ApplyRetentionPolicy(ctx, w, si, true)
	deleted := make([]string, len(ids))
	for i, id := range ids {
		deleted[i] = string(id)
	}
	if err != nil {
		return deleted, fmt.Errorf("apply retention policy of %v: %w", si, err)
	}
	return deleted, nil
}

// SetRetention sets how many snapshots the retention policy of a source
// keeps, in its own policy: latest, and per hour, day, week, month and
// year; a nil value inherits from the parent policy (kopia's global
// default keeps 10 latest, 48 hourly, 7 daily, 4 weekly, 24 monthly, 3
// annual). vmhistory's own retention is local (keep_local); this is for
// tests and for admins who want kopia to keep less than its default.
func (r *Repo) SetRetention(ctx context.Context, host, user, path string, keep Retention) error {
	si := snapshot.SourceInfo{Host: host, UserName: user, Path: path}
	return r.guard(ctx, func(ctx context.Context) error {
		return repo.WriteSession(ctx, r.rep, repo.WriteSessionOptions{Purpose: "vmhistory:set retention"},
			func(ctx context.Context, w repo.RepositoryWriter) error {
				p, err := definedPolicy(ctx, w, si)
				if err != nil {
					return err
				}
				rp := &p.RetentionPolicy
				rp.KeepLatest = optInt(keep.Latest)
				rp.KeepHourly = optInt(keep.Hourly)
				rp.KeepDaily = optInt(keep.Daily)
				rp.KeepWeekly = optInt(keep.Weekly)
				rp.KeepMonthly = optInt(keep.Monthly)
				rp.KeepAnnual = optInt(keep.Annual)
				if err := policy.SetPolicy(ctx, w, si, p); err != nil {
					return fmt.Errorf("set retention policy of %v: %w", si, err)
				}
				return nil
			})
	})
}

// Retention is a kopia retention policy's counts; nil inherits.
type Retention struct {
	Latest, Hourly, Daily, Weekly, Monthly, Annual *int
}

func optInt(v *int) *policy.OptionalInt {
	if v == nil {
		return nil
	}
	o := policy.OptionalInt(*v)
	return &o
}

// definedPolicy returns the policy defined on exactly si, or an empty one.
func definedPolicy(ctx context.Context, rep repo.Repository, si snapshot.SourceInfo) (*policy.Policy, error) {
	p, err := policy.GetDefinedPolicy(ctx, rep, si)
	switch {
	case errors.Is(err, policy.ErrPolicyNotFound):
		return &policy.Policy{}, nil
	case err != nil:
		return nil, fmt.Errorf("read policy of %v: %w", si, err)
	}
	return p, nil
}
