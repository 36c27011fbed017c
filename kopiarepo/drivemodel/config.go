package drivemodel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/content"

	"github.com/vmhistory/vmhistory/safefile"
)

// TypeName is the kopia storage type of a storage seen through a drive
// model. The kopia CLI does not know it: a config that uses it opens only
// in a process that imports this package.
const TypeName = "vmhistory-drivemodel"

// Options are the storage options of TypeName, as stored in a repository
// config file. The field names must not collide with kopia's
// throttling.Limits, which repo.Open reads from every storage's options.
type Options struct {
	// Preset names the parameters ("drive", "seed", "none"); Params, when
	// set, are used instead.
	Preset string  `json:"preset,omitempty"`
	Params *Params `json:"params,omitempty"`
	// Model is the name of a shared model (see Shared) whose counters and
	// shared bandwidth the storage uses; its parameters are set from
	// Preset/Params when the storage is built, unless KeepParams is set.
	// Empty means a private model.
	Model      string `json:"model,omitempty"`
	KeepParams bool   `json:"keepParams,omitempty"`
	// Storage is the inner storage's connection info.
	Storage blob.ConnectionInfo `json:"storage"`
}

func (o *Options) params() (Params, error) {
	if o.Params != nil {
		return *o.Params, nil
	}
	if o.Preset == "" {
		return Params{}, nil
	}
	return Preset(o.Preset)
}

// New builds the storage described by o (what repo.Open does through the
// registered type).
func New(ctx context.Context, o *Options, isCreate bool) (*Storage, error) {
	if o.Storage.Type == "" {
		return nil, errors.New("drive model: no inner storage in the options")
	}
	p, err := o.params()
	if err != nil {
		return nil, err
	}
	inner, err := blob.NewStorage(ctx, o.Storage, isCreate)
	if err != nil {
		return nil, fmt.Errorf("drive model: inner storage: %w", err)
	}
	if o.Model == "" {
		return Wrap(inner, p), nil
	}
	m := Shared(o.Model)
	if !o.KeepParams {
		m.SetParams(p)
	}
	return WrapModel(inner, m, o.Model), nil
}

func init() { //nolint:gochecknoinits
	blob.AddSupportedStorage(TypeName, Options{}, func(ctx context.Context, o *Options, isCreate bool) (blob.Storage, error) {
		return New(ctx, o, isCreate)
	})
}

// cliCacheSizeBytes is the kopia CLI's default content and metadata cache size.
const cliCacheSizeBytes = 5000 << 20

// ConfigOptions say how WriteConfig sets the model up.
type ConfigOptions struct {
	// Preset or Params: as in Options.
	Preset string
	Params *Params
	// Model names a shared model (see Shared); empty for a private one.
	Model string
	// KeepParams: as in Options.
	KeepParams bool
	// CacheDirectory, when set, replaces the kopia cache directory of the
	// source config (an empty directory means a cold cache, the way a
	// fresh connection starts); cache sizes the source leaves at zero get
	// the kopia CLI's defaults.
	CacheDirectory string
}

// WriteConfig writes dst, a copy of the repository config file src whose
// storage is src's storage seen through a drive model. repo.Open(dst)
// then builds the model in front of the real storage, with the same
// password as src.
func WriteConfig(src, dst string, o ConfigOptions) error {
	lc, err := repo.LoadConfigFromFile(src)
	if err != nil {
		return fmt.Errorf("drive model: read %s: %w", src, err)
	}
	if lc.Storage == nil {
		return fmt.Errorf("drive model: %s does not connect directly to a storage", src)
	}
	inner := *lc.Storage
	if inner.Type == TypeName { // already through a model: replace it
		if mo, ok := inner.Config.(*Options); ok {
			inner = mo.Storage
		}
	}
	opts := &Options{Preset: o.Preset, Params: o.Params, Model: o.Model, KeepParams: o.KeepParams, Storage: inner}
	if _, err := opts.params(); err != nil {
		return err
	}
	lc.Storage = &blob.ConnectionInfo{Type: TypeName, Config: opts}
	if o.CacheDirectory != "" {
		abs, err := filepath.Abs(o.CacheDirectory)
		if err != nil {
			return err
		}
		if lc.Caching == nil {
			lc.Caching = &content.CachingOptions{}
		}
		lc.Caching.CacheDirectory = abs
		// A cache directory with zero sizes is a state kopia does not
		// handle (it crashes reading the first metadata content); use the
		// kopia CLI's defaults.
		if lc.Caching.ContentCacheSizeBytes == 0 {
			lc.Caching.ContentCacheSizeBytes = cliCacheSizeBytes
		}
		if lc.Caching.MetadataCacheSizeBytes == 0 {
			lc.Caching.MetadataCacheSizeBytes = cliCacheSizeBytes
		}
	}
	b, err := json.MarshalIndent(lc, "", "  ")
	if err != nil {
		return fmt.Errorf("drive model: encode config: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	return safefile.WriteFileAtomic(dst, b, 0o600)
}
