package backup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/format"

	"github.com/vmhistory/vmhistory/changeset"
	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
)

// kopiaUploader is the upload step on a kopiarepo.Repo.
type kopiaUploader struct {
	repo *kopiarepo.Repo
	cfg  *config.Kopia
	log  *slog.Logger
	// uploads counts this run's uploads: maintenance runs once at the end
	// rather than after each.
	uploads int
}

// progressLogInterval spaces the upload's progress lines in the journal.
const progressLogInterval = 30 * time.Second

func openKopiaUploader(ctx context.Context, cfg *config.Config, log *slog.Logger) (*kopiaUploader, error) {
	pw, _, err := kopiarepo.ResolvePassword("", cfg.Kopia.PasswordFile)
	if err != nil {
		return nil, err
	}
	r, err := kopiarepo.Open(ctx, cfg.Kopia.ConfigFile, pw)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	return &kopiaUploader{repo: r, cfg: cfg.Kopia, log: log}, nil
}

func (k *kopiaUploader) Close(ctx context.Context) error { return k.repo.Close(ctx) }

// Uploaded implements Uploader: the guids tagged on the dataset's kopia
// snapshots.
func (k *kopiaUploader) Uploaded(ctx context.Context, dataset string) (map[uint64]bool, error) {
	snaps, err := k.repo.SnapshotsTagged(ctx, map[string]string{kopiarepo.TagDataset: dataset})
	if err != nil {
		return nil, err
	}
	have := map[uint64]bool{}
	for _, s := range snaps {
		if g, err := strconv.ParseUint(s.Tags[kopiarepo.TagGUID], 10, 64); err == nil {
			have[g] = true
		}
	}
	return have, nil
}

// reachTimeout bounds the check that the repository's storage answers
// before an upload: kopia retries a failing storage call for about 11 s,
// and an upload makes hundreds of them.
const reachTimeout = 30 * time.Second

// reachable reads the repository's format blob from its storage (not from
// a cache), so an unreachable store fails the step in seconds.
func (k *kopiaUploader) reachable(ctx context.Context) error {
	dr, ok := k.repo.Kopia().(repo.DirectRepository)
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, reachTimeout)
	defer cancel()
	if _, err := dr.BlobReader().GetMetadata(ctx, format.KopiaRepositoryBlobID); err != nil {
		return fmt.Errorf("kopia repository %s does not answer: %w", k.repo, err)
	}
	return nil
}

// Upload implements Uploader: by the stream path when the job carries a
// stream and kopia holds its base, else as "kopia snapshot create" would.
func (k *kopiaUploader) Upload(ctx context.Context, job UploadJob) (UploadStats, error) {
	if err := k.reachable(ctx); err != nil {
		return UploadStats{}, err
	}
	snap := job.Snap
	req := kopiarepo.UploadRequest{
		Dir:         job.Dir,
		SourcePath:  job.SourcePath,
		Host:        k.cfg.Host,
		User:        k.cfg.User,
		StartTime:   snap.Creation,
		Description: "vmhistory " + snap.FullName(),
		Tags: map[string]string{
			kopiarepo.TagDataset:    snap.Dataset,
			kopiarepo.TagSnapshot:   snap.Name,
			kopiarepo.TagGUID:       strconv.FormatUint(snap.GUID, 10),
			kopiarepo.TagReferenced: strconv.FormatUint(snap.Referenced, 10),
		},
		Compression:      k.cfg.Compression,
		Splitter:         k.cfg.Splitter,
		SkipMaintenance:  true,
		ProgressInterval: progressLogInterval,
		Progress: func(p kopiarepo.UploadProgress) {
			if p.Done {
				return
			}
			k.log.Info("uploading", "snapshot", snap.FullName(), "hashed", humanBytes(p.HashedBytes),
				"of", humanBytes(p.EstimatedBytes), "uploaded", humanBytes(p.UploadedBytes), "elapsed", p.Elapsed.Round(time.Second))
		},
	}
	stats := UploadStats{Way: WayFull, Why: job.NoStream}
	var res kopiarepo.UploadResult
	var err error
	cs, why := k.changeSet(ctx, job, &stats)
	if cs == nil {
		if stats.Why == "" {
			stats.Why = why
		}
		res, err = k.repo.Upload(ctx, req)
		stats.Hashed = res.Progress.HashedBytes
		stats.FilesByWay = map[string]int{WayFull: int(res.Progress.HashedFiles), kopiarepo.WayUnchanged: int(res.Progress.CachedFiles)}
	} else {
		var cres kopiarepo.ChangedUploadResult
		cres, err = k.repo.UploadChanged(ctx, req, *cs)
		res = cres.UploadResult
		stats.Way, stats.Why = WayStream, ""
		stats.Hashed = cres.ReadBytes
		stats.FilesByWay = map[string]int{}
		stats.FilesByWay[kopiarepo.WayUnchanged] = int(res.Progress.CachedFiles)
		for _, f := range cres.Files {
			if f.Way == kopiarepo.WayStream || f.Way == kopiarepo.WayFull {
				stats.FilesByWay[f.Way]++
			}
			if f.Way == kopiarepo.WayStream || f.Way == kopiarepo.WayFull {
				stats.ReadFiles = append(stats.ReadFiles, UploadFile{Snapshot: snap.Name, Path: f.Path, Way: f.Way, Reason: f.Reason, From: f.From, ReadBytes: f.ReadBytes})
			}
			if f.Way == kopiarepo.WayFull && f.Reason != "" {
				stats.FullReasons = append(stats.FullReasons, f.Path+": "+f.Reason)
			}
		}
		if v := cres.Verify; v != nil {
			stats.Verified, stats.VerifyBytes = true, v.ReadBytes
		}
		for _, r := range stats.FullReasons {
			k.log.Info("uploaded in full", "snapshot", snap.FullName(), "file", r)
		}
	}
	stats.Files = res.Progress.HashedFiles + res.Progress.CachedFiles
	stats.Uploaded = res.Progress.UploadedBytes
	var mismatch *kopiarepo.VerifyMismatchError
	if errors.As(err, &mismatch) {
		// The full upload was saved: the night is in kopia, and the
		// step fails so that the admin hears of the wrong reading.
		k.uploads++
		return stats, err
	}
	if err != nil {
		return stats, err
	}
	k.uploads++
	if res.Snapshot.ID == "" && !res.Identical {
		return stats, fmt.Errorf("kopia saved no snapshot of %s", snap.FullName())
	}
	if len(res.Expired) > 0 {
		k.log.Info("kopia retention expired older snapshots", "source", job.SourcePath, "count", len(res.Expired))
	}
	return stats, nil
}

// changeSet is the job's change set for UploadChanged, or nil and why the
// upload is a full one.
func (k *kopiaUploader) changeSet(ctx context.Context, job UploadJob, stats *UploadStats) (*kopiarepo.ChangeSet, string) {
	c := job.Change
	if c == nil {
		return nil, ""
	}
	prev, err := k.repo.SnapshotsTagged(ctx, map[string]string{
		kopiarepo.TagDataset: job.Snap.Dataset,
		kopiarepo.TagGUID:    strconv.FormatUint(c.Base.GUID, 10),
	})
	if err != nil {
		return nil, fmt.Sprintf("cannot find the kopia snapshot of the stream's base %s: %v", c.Base.FullName(), err)
	}
	previous := ""
	for _, s := range prev {
		if s.Path == filepath.Clean(job.SourcePath) && (k.cfg.Host == "" || s.Host == k.cfg.Host) && (k.cfg.User == "" || s.User == k.cfg.User) && s.Errors == 0 {
			previous = s.ID
		}
	}
	if previous == "" {
		return nil, fmt.Sprintf("kopia holds %s only under another source than %s@%s:%s", c.Base.FullName(), k.cfg.User, k.cfg.Host, job.SourcePath)
	}
	cs, sum, err := changeset.Build(changeset.Input{
		Stream: c.Stream, Base: c.Base, New: job.Snap,
		BaseDir: c.BaseDir, NewDir: job.Dir, Previous: previous,
	})
	stats.StreamWriteBytes = int64(sum.WriteBytes)
	stats.Replicated = c.Replicated
	if err != nil {
		k.log.Warn("the incremental stream does not describe the snapshot; kopia reads the changed files in full", "snapshot", job.Snap.FullName(), "err", err)
		return nil, err.Error()
	}
	cs.Verify = job.Verify
	return &cs, ""
}

// Finish implements Uploader: maintenance once, after the run's uploads.
func (k *kopiaUploader) Finish(ctx context.Context) error {
	if k.uploads == 0 {
		return nil
	}
	res, err := k.repo.MaybeRunMaintenance(ctx)
	if err != nil {
		return err
	}
	k.log.Info("kopia maintenance", "result", fmt.Sprintf("%+v", res))
	return nil
}
