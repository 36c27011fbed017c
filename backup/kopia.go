package backup

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/format"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/zfs"
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

// Upload implements Uploader.
func (k *kopiaUploader) Upload(ctx context.Context, snap zfs.Snapshot, dir, sourcePath string) (UploadStats, error) {
	if err := k.reachable(ctx); err != nil {
		return UploadStats{}, err
	}
	res, err := k.repo.Upload(ctx, kopiarepo.UploadRequest{
		Dir:         dir,
		SourcePath:  sourcePath,
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
	})
	stats := UploadStats{Files: res.Progress.HashedFiles + res.Progress.CachedFiles, Hashed: res.Progress.HashedBytes, Uploaded: res.Progress.UploadedBytes}
	if err != nil {
		return stats, err
	}
	k.uploads++
	if res.Snapshot.ID == "" && !res.Identical {
		return stats, fmt.Errorf("kopia saved no snapshot of %s", snap.FullName())
	}
	if len(res.Expired) > 0 {
		k.log.Info("kopia retention expired older snapshots", "source", sourcePath, "count", len(res.Expired))
	}
	return stats, nil
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
