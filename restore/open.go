package restore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/zfs"
)

// kopiaUnreachableTimeout is how long opening the kopia repository may
// fail before the timeline goes on without it: a listing should not wait
// minutes for a store that is down.
const kopiaUnreachableTimeout = 45 * time.Second

// Source names as OpenSources gives them.
const (
	SourceLocal   = "local"
	SourceReplica = "replica"
	SourceKopia   = "kopia"
)

// OpenSources builds the sources the configuration names: the local ZFS
// datasets, the replica (a pool of this host, or over ssh with a shared
// connection) and the kopia repository (password from $KOPIA_PASSWORD or
// kopia.password_file). A source that cannot be set up is reported in the
// errors and left out; a replica that is merely offline is only noticed
// when it is listed. closeAll releases what was opened.
func OpenSources(ctx context.Context, cfg *config.Config, log *slog.Logger) (sources []Source, closeAll func() error, problems []error) {
	if log == nil {
		log = slog.Default()
	}
	var closers []func() error
	closeAll = func() error {
		var errs []error
		for i := len(closers) - 1; i >= 0; i-- {
			errs = append(errs, closers[i]())
		}
		closers = nil
		return errors.Join(errs...)
	}
	lz, rz, closeReplica, err := zfs.Configured(cfg, log)
	closers = append(closers, closeReplica)
	if err != nil {
		problems = append(problems, &SourceError{Source: SourceReplica, Err: err})
	}

	localDatasets := map[string]string{}
	for _, d := range cfg.Datasets {
		localDatasets[d.Name] = d.Name
	}
	local := NewZFSSource(SourceLocal, KindLocal, lz, localDatasets)
	local.SetLogger(log)
	sources = append(sources, local)
	closers = append(closers, local.Close)

	if rz != nil {
		replicaDatasets := map[string]string{}
		for _, d := range cfg.Datasets {
			if d.ReplicaDataset != "" {
				replicaDatasets[d.Name] = d.ReplicaDataset
			}
		}
		replica := NewZFSSource(SourceReplica, KindReplica, rz, replicaDatasets)
		replica.SetLogger(log)
		sources = append(sources, replica)
		closers = append(closers, replica.Close)
	}

	if kc := cfg.Kopia; kc != nil {
		src, closeRepo, err := openKopiaSource(ctx, kc, "")
		if err != nil {
			problems = append(problems, &SourceError{Source: SourceKopia, Err: err})
		} else {
			src.Datasets = cfg.DatasetNames()
			src.SetLogger(log)
			sources = append(sources, src)
			closers = append(closers, closeRepo)
		}
	}
	return sources, closeAll, problems
}

// openKopiaSource opens the repository of the kopia section; passwordFile,
// when set, overrides where the password comes from.
func openKopiaSource(ctx context.Context, kc *config.Kopia, passwordFile string) (*KopiaSource, func() error, error) {
	pw, _, err := kopiarepo.ResolvePassword(passwordFile, kc.PasswordFile)
	if err != nil {
		return nil, nil, err
	}
	repo, err := kopiarepo.Open(ctx, kc.ConfigFile, pw, kopiarepo.WithUnreachableTimeout(kopiaUnreachableTimeout))
	if err != nil {
		return nil, nil, err
	}
	src := NewKopiaSource(repo, kc.Host, kc.User)
	return src, func() error {
		if err := repo.Close(context.Background()); err != nil {
			return fmt.Errorf("close kopia repository: %w", err)
		}
		return nil
	}, nil
}
