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
// when it is listed. closeAll releases what was opened. Open makes a
// Session of them, with the timeline and the times each step took.
func OpenSources(ctx context.Context, cfg *config.Config, log *slog.Logger) (sources []Source, closeAll func() error, problems []error) {
	sources, _, closeAll, problems = openSources(ctx, cfg, log)
	return sources, closeAll, problems
}

// openSources is OpenSources, also giving how long each source took to
// set up, failed or not. The kopia repository, the only source whose
// opening reads a store (its format blob, indexes and manifests, a round
// trip each on a slow link), opens while the ZFS sources are set up.
func openSources(ctx context.Context, cfg *config.Config, log *slog.Logger) (sources []Source, times []SourceTime, closeAll func() error, problems []error) {
	if log == nil {
		log = slog.Default()
	}
	type kopiaResult struct {
		src   *KopiaSource
		close func() error
		err   error
		took  time.Duration
	}
	var kopiaDone chan kopiaResult
	if kc := cfg.Kopia; kc != nil {
		kopiaDone = make(chan kopiaResult, 1)
		go func() {
			start := time.Now()
			src, closeRepo, err := openKopiaSource(ctx, kc, "")
			kopiaDone <- kopiaResult{src, closeRepo, err, time.Since(start)}
		}()
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
	start := time.Now()
	lz, rz, closeReplica, err := zfs.Configured(cfg, log)
	closers = append(closers, closeReplica)
	zfsSetup := time.Since(start)
	if err != nil {
		problems = append(problems, &SourceError{Source: SourceReplica, Err: err})
		times = append(times, SourceTime{Source: SourceReplica, Open: zfsSetup, Failed: oneLine(err)})
	}

	start = time.Now()
	localDatasets := map[string]string{}
	for _, d := range cfg.Datasets {
		localDatasets[d.Name] = d.Name
	}
	local := NewZFSSource(SourceLocal, KindLocal, lz, localDatasets)
	local.SetLogger(log)
	sources = append(sources, local)
	closers = append(closers, local.Close)
	times = append(times, SourceTime{Source: SourceLocal, Open: zfsSetup + time.Since(start)})

	if rz != nil {
		start = time.Now()
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
		times = append(times, SourceTime{Source: SourceReplica, Open: zfsSetup + time.Since(start)})
	}

	if kopiaDone != nil {
		r := <-kopiaDone
		if r.err != nil {
			problems = append(problems, &SourceError{Source: SourceKopia, Err: r.err})
			times = append(times, SourceTime{Source: SourceKopia, Open: r.took, Failed: oneLine(r.err)})
		} else {
			r.src.Datasets = cfg.DatasetNames()
			r.src.SetLogger(log)
			sources = append(sources, r.src)
			closers = append(closers, r.close)
			times = append(times, SourceTime{Source: SourceKopia, Open: r.took})
		}
	}
	return sources, times, closeAll, problems
}

// openKopiaSource opens the repository of the kopia section; passwordFile,
// when set, overrides where the password comes from.
func openKopiaSource(ctx context.Context, kc *config.Kopia, passwordFile string) (*KopiaSource, func() error, error) {
	pw, _, err := kopiarepo.ResolvePassword(passwordFile, kc.PasswordFile)
	if err != nil {
		return nil, nil, err
	}
	reqs := &kopiarepo.RequestLog{}
	repo, err := kopiarepo.Open(ctx, kc.ConfigFile, pw, kopiarepo.WithUnreachableTimeout(kopiaUnreachableTimeout), kopiarepo.WithRequestLog(reqs), kopiarepo.WithCachedIndexList())
	if err != nil {
		return nil, nil, err
	}
	src := NewKopiaSource(repo, kc.Host, kc.User)
	src.Requests = reqs
	return src, func() error {
		if err := repo.Close(context.Background()); err != nil {
			return fmt.Errorf("close kopia repository: %w", err)
		}
		return nil
	}, nil
}
