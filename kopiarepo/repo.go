// Package kopiarepo is vmhistory's use of the kopia library: create or
// connect a repository, open it, upload a directory as the next snapshot of
// a stable source, apply retention and run maintenance the way kopia's CLI
// does, list snapshots and read files back.
//
// Everything here stays compatible with kopia's own CLI (v0.22.3, the
// module vmhistory links): a repository config written by Create or Connect
// is one "kopia --config-file=X" accepts, a repository made by the kopia CLI
// opens with Open, and snapshots uploaded here are listed, restored,
// expired and garbage-collected by the CLI like its own.
//
// The CLI does a few things around the library calls that the library does
// not do by itself; this package does them too, each noted where it
// happens: the CLI's cache defaults on connect, the default global policy
// and maintenance owner on create, the retention policy after each
// snapshot, and automatic maintenance after each writing command. And one
// thing neither does: every operation gives up with an *UnreachableError
// when the storage stops answering, where the library would retry forever
// (see DefaultUnreachableTimeout).
//
// Reading goes through kopia's plain object reader (OpenFile); faster
// readers build on Repo.Kopia() and Stat's object IDs.
package kopiarepo

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/encryption"
	"github.com/kopia/kopia/repo/format"
	"github.com/kopia/kopia/repo/hashing"
	"github.com/kopia/kopia/repo/logging"
	"github.com/kopia/kopia/repo/maintenance"
	"github.com/kopia/kopia/repo/splitter"
	"github.com/kopia/kopia/snapshot/policy"

	"github.com/vmhistory/vmhistory/safefile"
)

// PasswordEnv is the environment variable kopia's CLI reads the repository
// password from; vmhistory accepts it too.
const PasswordEnv = "KOPIA_PASSWORD"

// The kopia CLI's cache settings for a new connection ("repository
// connect|create" flag defaults). The library's own default, when none are
// given, is no cache at all, which makes every run fetch all indexes and
// manifests from the storage again.
const (
	cliContentCacheSizeBytes  = 5000 << 20
	cliMetadataCacheSizeBytes = 5000 << 20
	cliMaxListCacheDuration   = 30 * time.Second
)

// ConnectOptions are the settings of a repository connection, written into
// the repository config file.
type ConnectOptions struct {
	// Host and User are who this connection is: the default kopia source
	// user@host, and the identity that owns maintenance. vmhistory passes
	// kopia.host and kopia.user from its configuration. Empty means
	// kopia's defaults (short host name, current user).
	Host, User string
	// CacheDirectory holds kopia's local cache of indexes, manifests and
	// contents. Empty means kopia's default, ~/.cache/kopia/<hash>.
	CacheDirectory string
	// Description is shown by kopia's UI; empty means "Repository in <storage>".
	Description string
	// ReadOnly refuses every write through this connection.
	ReadOnly bool
	// Overwrite replaces an existing config file. Without it Create and
	// Connect refuse, so that connecting never silently cuts the nightly
	// job off the repository it was using.
	Overwrite bool
	// TakeMaintenance makes this connection's user@host the maintenance
	// owner even when another client owns it (Connect only). Maintenance
	// that nobody owns is always taken.
	TakeMaintenance bool
}

func (o ConnectOptions) kopia() *repo.ConnectOptions {
	return &repo.ConnectOptions{
		ClientOptions: repo.ClientOptions{
			Hostname:    o.Host,
			Username:    o.User,
			ReadOnly:    o.ReadOnly,
			Description: o.Description,
		},
		CachingOptions: content.CachingOptions{
			CacheDirectory:         o.CacheDirectory,
			ContentCacheSizeBytes:  cliContentCacheSizeBytes,
			MetadataCacheSizeBytes: cliMetadataCacheSizeBytes,
			MaxListCacheDuration:   content.DurationSeconds(cliMaxListCacheDuration.Seconds()),
		},
	}
}

// CreateOptions are the settings of a new repository. The zero value
// creates what "kopia repository create" creates with its defaults.
type CreateOptions struct {
	ConnectOptions
	// Splitter is the repository's default splitter for files whose policy
	// names none; empty means kopia's default (DYNAMIC-4M-BUZHASH).
	// vmhistory normally sets the splitter in the policy of its sources
	// instead (UploadRequest.Splitter), which overrides this.
	Splitter string
	// Hash and Encryption are the content hash and encryption algorithms;
	// empty means kopia's defaults.
	Hash, Encryption string
}

// Create initializes a new repository in an empty storage location,
// connects to it by writing configFile, and sets it up as "kopia
// repository create" does: the default global policy, and maintenance owned
// by this connection's user@host.
func Create(ctx context.Context, spec StorageSpec, configFile, password string, opts CreateOptions) error {
	configFile, err := prepareConfigFile(configFile, password, opts.Overwrite)
	if err != nil {
		return err
	}
	if opts.Splitter != "" && splitter.GetFactory(opts.Splitter) == nil {
		return fmt.Errorf("unknown kopia splitter %q; choose one of: %s", opts.Splitter, strings.Join(splitter.SupportedAlgorithms(), ", "))
	}
	if e, ok := spec.(interface{ ensureEmptyLocation() error }); ok {
		if err := e.ensureEmptyLocation(); err != nil {
			return fmt.Errorf("cannot create a repository: %w", err)
		}
	}
	st, err := spec.newStorage(ctx, true)
	if err != nil {
		return fmt.Errorf("cannot reach %s storage: %w", spec.Type(), err)
	}
	defer st.Close(ctx) //nolint:errcheck
	return guard(ctx, st.DisplayName(), DefaultUnreachableTimeout, probeBlob(st), func(ctx context.Context) error {
		// As the CLI: refuse a location that holds anything at all, not only
		// one that holds a repository, so a typo cannot mix a repository into
		// someone's files.
		if err := ensureEmpty(ctx, st); err != nil {
			return fmt.Errorf("cannot create a repository in %s: %w", st.DisplayName(), err)
		}
		newOpts := &repo.NewRepositoryOptions{
			BlockFormat: format.ContentFormat{
				Hash:       orDefault(opts.Hash, hashing.DefaultAlgorithm),
				Encryption: orDefault(opts.Encryption, encryption.DefaultAlgorithm),
			},
			ObjectFormat:                      format.ObjectFormat{Splitter: orDefault(opts.Splitter, splitter.DefaultAlgorithm)},
			FormatBlockKeyDerivationAlgorithm: format.DefaultKeyDerivationAlgorithm,
		}
		if err := repo.Initialize(ctx, st, newOpts, password); err != nil {
			return fmt.Errorf("initialize repository in %s: %w", st.DisplayName(), err)
		}
		if err := repo.Connect(ctx, configFile, st, password, opts.kopia()); err != nil {
			return fmt.Errorf("connect to the new repository in %s: %w", st.DisplayName(), err)
		}
		r, err := Open(ctx, configFile, password)
		if err != nil {
			return err
		}
		defer r.Close(ctx) //nolint:errcheck
		// The CLI's populateRepository: store the default global policy, so
		// that "kopia policy get --global" shows it and edits start from it,
		// and make this client the maintenance owner.
		return repo.WriteSession(ctx, r.rep, repo.WriteSessionOptions{Purpose: "vmhistory:populate repository"},
			func(ctx context.Context, w repo.RepositoryWriter) error {
				if err := policy.SetPolicy(ctx, w, policy.GlobalPolicySourceInfo, policy.DefaultPolicy); err != nil {
					return fmt.Errorf("set global policy: %w", err)
				}
				return setDefaultMaintenanceParams(ctx, w)
			})
	})
}

// Connect connects to an existing repository by writing configFile, after
// checking that it opens with password. Like the CLI's "snapshot create",
// it gives a repository without maintenance settings the default ones, owned
// by this connection; with TakeMaintenance it also takes ownership from
// another client.
func Connect(ctx context.Context, spec StorageSpec, configFile, password string, opts ConnectOptions) error {
	configFile, err := prepareConfigFile(configFile, password, opts.Overwrite)
	if err != nil {
		return err
	}
	st, err := spec.newStorage(ctx, false)
	if err != nil {
		return fmt.Errorf("cannot reach %s storage: %w", spec.Type(), err)
	}
	defer st.Close(ctx) //nolint:errcheck
	return guard(ctx, st.DisplayName(), DefaultUnreachableTimeout, probeBlob(st), func(ctx context.Context) error {
		if err := repo.Connect(ctx, configFile, st, password, opts.kopia()); err != nil {
			switch {
			case errors.Is(err, repo.ErrRepositoryNotInitialized):
				return fmt.Errorf("%s holds no kopia repository; create one with \"vmhistory repo create %s\"", st.DisplayName(), spec.Type())
			case errors.Is(err, repo.ErrInvalidPassword):
				return fmt.Errorf("wrong password for the kopia repository in %s", st.DisplayName())
			}
			return fmt.Errorf("connect to the repository in %s: %w", st.DisplayName(), err)
		}
		if opts.ReadOnly {
			return nil
		}
		r, err := Open(ctx, configFile, password)
		if err != nil {
			return err
		}
		defer r.Close(ctx) //nolint:errcheck
		return repo.WriteSession(ctx, r.rep, repo.WriteSessionOptions{Purpose: "vmhistory:connect"},
			func(ctx context.Context, w repo.RepositoryWriter) error {
				has, err := maintenance.HasParams(ctx, w)
				if err != nil {
					return fmt.Errorf("read maintenance settings: %w", err)
				}
				if !has {
					return setDefaultMaintenanceParams(ctx, w)
				}
				if !opts.TakeMaintenance {
					return nil
				}
				p, err := maintenance.GetParams(ctx, w)
				if err != nil {
					return fmt.Errorf("read maintenance settings: %w", err)
				}
				p.Owner = w.ClientOptions().UsernameAtHost()
				return maintenance.SetParams(ctx, w, p)
			})
	})
}

// setDefaultMaintenanceParams is the CLI's setDefaultMaintenanceParameters:
// kopia's default maintenance cycles (quick hourly, full daily), owned by
// this connection's user@host.
func setDefaultMaintenanceParams(ctx context.Context, w repo.RepositoryWriter) error {
	p := maintenance.DefaultParams()
	p.Owner = w.ClientOptions().UsernameAtHost()
	if err := maintenance.SetParams(ctx, w, &p); err != nil {
		return fmt.Errorf("set maintenance owner: %w", err)
	}
	return nil
}

// prepareConfigFile checks what Create and Connect need before touching
// any storage, and returns the config file as an absolute path.
func prepareConfigFile(configFile, password string, overwrite bool) (string, error) {
	if configFile == "" {
		return "", errors.New("no kopia repository config file given")
	}
	if password == "" {
		return "", errors.New("the repository password is empty")
	}
	abs, err := filepath.Abs(configFile)
	if err != nil {
		return "", err
	}
	// kopia's library writes the file itself (a temporary file renamed
	// over the name, which replaces a symbolic link rather than writing
	// through it, but copies the mode of the link's target); vmhistory
	// refuses anything but a regular file there before kopia runs, even
	// with overwrite. Its cache directory is kopia's own business.
	if err := safefile.CheckRegular(abs); err != nil {
		return "", fmt.Errorf("kopia repository config: %w", err)
	}
	if _, err := os.Lstat(abs); err == nil && !overwrite {
		return "", fmt.Errorf("%s already exists: it connects to a repository already (see \"vmhistory repo status\"); remove it first, or overwrite it (vmhistory repo connect --overwrite)", abs)
	}
	return abs, nil
}

func ensureEmpty(ctx context.Context, st blob.Storage) error {
	errHasData := errors.New("has data")
	err := st.ListBlobs(ctx, "", func(blob.Metadata) error { return errHasData })
	if errors.Is(err, errHasData) {
		return errors.New("the location is not empty (it holds a repository or other files); use an empty one, or connect to the repository that is there")
	}
	if err != nil {
		return fmt.Errorf("cannot list the location: %w", err)
	}
	return nil
}

func orDefault(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

// Repo is an open repository connection. Its methods may be called from
// several goroutines; Close it when done.
type Repo struct {
	rep        repo.Repository
	configFile string
	storage    string // human description of the storage, for messages

	unreachableTimeout time.Duration
	probe              func(context.Context) error

	local   *repo.LocalConfig
	listing *indexListing // the open's index listing (see indexlist.go)
}

// Open opens the repository a config file connects to.
//
// Three things differ from the library's defaults, all so that a nightly
// job ends with an error instead of hanging or exiting: Open and every
// operation on the Repo give up with an *UnreachableError once the storage
// has failed every request for DefaultUnreachableTimeout (see
// WithUnreachableTimeout; the library alone retries some requests
// forever); an upgrade of the repository format in progress by another
// client is reported at once instead of waited for indefinitely; and a
// fatal repository error is logged and returned instead of ending the
// process (the library's default OnFatalError calls os.Exit).
func Open(ctx context.Context, configFile, password string, options ...OpenOption) (*Repo, error) {
	oo := openOptions{unreachableTimeout: DefaultUnreachableTimeout}
	for _, o := range options {
		o(&oo)
	}
	abs, err := filepath.Abs(configFile)
	if err != nil {
		return nil, err
	}
	lc, err := repo.LoadConfigFromFile(abs)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("kopia repository config %s does not exist; connect the repository first (vmhistory repo connect, or repo create for a new one)", abs)
		}
		return nil, fmt.Errorf("kopia repository config %s: %w", abs, err)
	}
	where := abs
	var probe func(context.Context) error
	if lc.Storage != nil {
		where = describeStorage(*lc.Storage)
		// A second handle on the storage to probe it while the library
		// opens the repository; not for rclone, where it would start a
		// second rclone process.
		if lc.Storage.Type != "rclone" && oo.unreachableTimeout > 0 {
			if st, err := blob.NewStorage(ctx, *lc.Storage, false); err == nil {
				defer st.Close(ctx) //nolint:errcheck
				probe = probeBlob(st)
			}
		}
	}
	if password == "" {
		return nil, fmt.Errorf("open kopia repository %s: the password is empty", where)
	}
	var rep repo.Repository
	listing := newIndexListing(indexListingFileFor(abs, lc), oo.cachedIndexList)
	listing.requests = oo.requests
	openCtx := withIndexListing(ctx, listing)
	if l := oo.requests; l != nil {
		l.start = time.Now()
		l.recording.Store(true)
		openCtx = logging.WithLogger(openCtx, l.loggerFactory())
	}
	err = guard(openCtx, where, oo.unreachableTimeout, probe, func(ctx context.Context) error {
		var err error
		rep, err = repo.Open(ctx, abs, password, &repo.Options{
			TraceStorage:        oo.requests != nil,
			DoNotWaitForUpgrade: true,
			OnFatalError: func(err error) {
				slog.Error("kopia repository fatal error", "repository", where, "err", err)
			},
		})
		return err
	})
	listing.opened()
	if err != nil {
		listing.close()
		var ue *UnreachableError
		switch {
		case errors.As(err, &ue):
			return nil, err
		case errors.Is(err, repo.ErrInvalidPassword):
			return nil, fmt.Errorf("open kopia repository %s: wrong password", where)
		}
		return nil, fmt.Errorf("open kopia repository %s: %w", where, err)
	}
	r := &Repo{rep: rep, configFile: abs, storage: where, unreachableTimeout: oo.unreachableTimeout, local: lc, listing: listing}
	if dr, ok := rep.(repo.DirectRepository); ok {
		r.probe = probeBlob(dr.BlobReader())
	}
	return r, nil
}

// guard runs fn, abandoning it when the storage stays unreachable (see Open).
func (r *Repo) guard(ctx context.Context, fn func(context.Context) error) error {
	return guard(ctx, r.storage, r.unreachableTimeout, r.probe, fn)
}

// CheckOpen waits for the index listing Open started (one round trip from
// Open's start) and, when the open was answered from this host's saved
// listing (WithCachedIndexList) and the repository's index has changed
// since, makes the change visible (Refresh, kopia's own list cache
// forgotten first) and returns true: what the session resolved before may
// be out of date (a snapshot it did not see, one retention removed).
// Without WithCachedIndexList the open was as fresh as kopia's own and
// CheckOpen returns false (once the listing ends, which it also saves).
func (r *Repo) CheckOpen(ctx context.Context) (bool, error) {
	changed, err := r.listing.changedSinceOpen(ctx)
	if !changed || errors.Is(err, errShardsChanged) {
		return changed, err
	}
	if err != nil {
		slog.Warn("kopia index check after a cached open failed; refreshing", "repository", r.storage, "err", err)
	}
	if err := forgetKopiaListCache(ctx, r.configFile, r.local); err != nil {
		return true, err
	}
	return true, r.Refresh(ctx)
}

// Close closes the connection, flushing nothing: every write session of
// this package has flushed already.
func (r *Repo) Close(ctx context.Context) error {
	return r.rep.Close(ctx)
}

// Refresh makes what other clients wrote since Open (or the last
// Refresh) visible: new snapshots, and snapshots their retention removed.
// Kopia does it by itself only every 15 minutes.
func (r *Repo) Refresh(ctx context.Context) error {
	return r.guard(ctx, func(ctx context.Context) error {
		if err := r.rep.Refresh(ctx); err != nil {
			return fmt.Errorf("refresh kopia repository %s: %w", r.storage, err)
		}
		return nil
	})
}

// Kopia returns the underlying kopia repository, for code in vmhistory
// that needs the library directly (benchmarks, the prefetching reader).
func (r *Repo) Kopia() repo.Repository { return r.rep }

// ConfigFile returns the absolute path of the repository config file.
func (r *Repo) ConfigFile() string { return r.configFile }

// String describes the repository's storage, e.g. "webdav http://host/dav".
func (r *Repo) String() string { return r.storage }

// Identity returns the connection's user@host: the default source owner
// and the maintenance identity.
func (r *Repo) Identity() string { return r.rep.ClientOptions().UsernameAtHost() }
