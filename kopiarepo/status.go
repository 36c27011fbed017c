package kopiarepo

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/maintenance"
	"github.com/kopia/kopia/snapshot"
	"github.com/kopia/kopia/snapshot/policy"
)

// Status describes a repository connection, for "vmhistory repo status".
type Status struct {
	ConfigFile string `json:"config_file"`
	// StorageType is kopia's storage type ("filesystem", "gdrive"...),
	// Storage a one-line description of where the blobs are, and
	// StorageConfig the storage settings with secrets removed.
	StorageType   string         `json:"storage_type"`
	Storage       string         `json:"storage"`
	StorageConfig map[string]any `json:"storage_config,omitempty"`
	// Identity is the connection's user@host.
	Identity    string `json:"identity"`
	ReadOnly    bool   `json:"read_only,omitempty"`
	Description string `json:"description,omitempty"`
	// UniqueID identifies the repository itself, whatever the connection.
	UniqueID      string `json:"unique_id,omitempty"`
	FormatVersion int    `json:"format_version,omitempty"`
	Hash          string `json:"hash,omitempty"`
	Encryption    string `json:"encryption,omitempty"`
	// Splitter is the repository default, used where no policy names one.
	Splitter       string            `json:"splitter,omitempty"`
	CacheDirectory string            `json:"cache_directory,omitempty"`
	Maintenance    MaintenanceStatus `json:"maintenance"`
	// GlobalPolicy is the compression and splitter of the global policy.
	GlobalPolicy PolicySummary `json:"global_policy"`
	// Sources are the snapshot sources in the repository, every client's.
	Sources []SourceStatus `json:"sources"`
	// Warnings are problems of the repository's settings worth acting on,
	// such as a policy that compresses with a deprecated algorithm.
	Warnings []string `json:"warnings"`
}

// MaintenanceStatus tells who runs maintenance and when it runs next.
type MaintenanceStatus struct {
	// Owner is the user@host that runs automatic maintenance; only that
	// client's writing commands (kopia's CLI or vmhistory's uploads) run it.
	Owner string `json:"owner"`
	// Owned is whether Owner is this connection.
	Owned     bool      `json:"owned"`
	NextQuick time.Time `json:"next_quick,omitzero"`
	NextFull  time.Time `json:"next_full,omitzero"`
	// LastRun is the end of the most recent maintenance task.
	LastRun time.Time `json:"last_run,omitzero"`
}

// PolicySummary is the part of a kopia policy vmhistory sets.
type PolicySummary struct {
	Compression string `json:"compression,omitempty"`
	Splitter    string `json:"splitter,omitempty"`
}

// SourceStatus is one snapshot source (user@host:path) in the repository.
type SourceStatus struct {
	Host      string `json:"host"`
	User      string `json:"user"`
	Path      string `json:"path"`
	Snapshots int    `json:"snapshots"`
	// Latest is the StartTime of the newest complete snapshot.
	Latest time.Time `json:"latest,omitzero"`
	// Policy is the effective compression and splitter for the source.
	Policy PolicySummary `json:"policy"`
}

// String is the source as kopia writes it: user@host:path.
func (s SourceStatus) String() string { return s.User + "@" + s.Host + ":" + s.Path }

// Status describes the repository and this connection.
func (r *Repo) Status(ctx context.Context) (*Status, error) {
	return guarded(ctx, r, r.status)
}

func (r *Repo) status(ctx context.Context) (*Status, error) {
	opts := r.rep.ClientOptions()
	st := &Status{
		ConfigFile:  r.configFile,
		Storage:     r.storage,
		Identity:    opts.UsernameAtHost(),
		ReadOnly:    opts.ReadOnly,
		Description: opts.Description,
		Sources:     []SourceStatus{},
		Warnings:    []string{},
	}
	if lc, err := repo.LoadConfigFromFile(r.configFile); err == nil {
		if lc.Storage != nil {
			st.StorageType = lc.Storage.Type
			st.StorageConfig = scrubbedConfig(lc.Storage.Config)
		}
		if lc.Caching != nil {
			st.CacheDirectory = lc.Caching.CacheDirectory
		}
	}
	if dr, ok := r.rep.(repo.DirectRepository); ok {
		st.UniqueID = hex.EncodeToString(dr.UniqueID())
		cf := dr.FormatManager().ScrubbedContentFormat()
		st.FormatVersion = int(cf.Version)
		st.Hash, st.Encryption = cf.Hash, cf.Encryption
		st.Splitter = dr.ObjectFormat().Splitter
		if sched, err := maintenance.GetSchedule(ctx, dr); err == nil {
			st.Maintenance.NextQuick = sched.NextQuickMaintenanceTime
			st.Maintenance.NextFull = sched.NextFullMaintenanceTime
			for _, runs := range sched.Runs {
				for _, run := range runs {
					if run.End.After(st.Maintenance.LastRun) {
						st.Maintenance.LastRun = run.End
					}
				}
			}
		} else {
			return nil, fmt.Errorf("read maintenance schedule of %s: %w", r.storage, err)
		}
	}
	p, err := maintenance.GetParams(ctx, r.rep)
	if err != nil {
		return nil, fmt.Errorf("read maintenance settings of %s: %w", r.storage, err)
	}
	st.Maintenance.Owner = p.Owner
	st.Maintenance.Owned = p.Owner == st.Identity

	if gp, _, _, err := policy.GetEffectivePolicy(ctx, r.rep, policy.GlobalPolicySourceInfo); err == nil {
		st.GlobalPolicy = summarizePolicy(gp)
	}
	sources, err := snapshot.ListSources(ctx, r.rep)
	if err != nil {
		return nil, fmt.Errorf("list sources of %s: %w", r.storage, err)
	}
	for _, si := range sources {
		snaps, err := r.listSource(ctx, si)
		if err != nil {
			return nil, err
		}
		ss := SourceStatus{Host: si.Host, User: si.UserName, Path: si.Path, Snapshots: len(snaps)}
		if len(snaps) > 0 {
			ss.Latest = snaps[len(snaps)-1].StartTime
		}
		if ep, _, _, err := policy.GetEffectivePolicy(ctx, r.rep, si); err == nil {
			ss.Policy = summarizePolicy(ep)
		}
		st.Sources = append(st.Sources, ss)
	}
	sort.Slice(st.Sources, func(i, j int) bool { return st.Sources[i].String() < st.Sources[j].String() })
	if st.Warnings, err = r.deprecatedCompressionWarnings(ctx); err != nil {
		return nil, err
	}
	if st.Warnings == nil {
		st.Warnings = []string{}
	}
	return st, nil
}

func summarizePolicy(p *policy.Policy) PolicySummary {
	s := PolicySummary{Compression: string(p.CompressionPolicy.CompressorName), Splitter: p.SplitterPolicy.Algorithm}
	if s.Compression == "" {
		s.Compression = "none"
	}
	return s
}

// describeStorage renders where a storage keeps its blobs, in one line.
func describeStorage(ci blob.ConnectionInfo) string {
	m := scrubbedConfig(ci.Config)
	str := func(k string) string {
		if v, ok := m[k].(string); ok {
			return v
		}
		return ""
	}
	switch ci.Type {
	case "filesystem":
		return "filesystem " + str("path")
	case "webdav":
		return "webdav " + str("url")
	case "sftp":
		return fmt.Sprintf("sftp %s@%s:%s", str("username"), str("host"), str("path"))
	case "s3":
		return fmt.Sprintf("s3 %s/%s/%s", str("endpoint"), str("bucket"), str("prefix"))
	case "rclone":
		return "rclone " + str("remotePath")
	case "gdrive":
		return "gdrive folder " + str("folderID")
	case "gcs", "b2":
		return ci.Type + " bucket " + str("bucket")
	case "azureBlob":
		return "azure container " + str("container")
	}
	return ci.Type
}

// scrubbedConfig returns a storage config as a JSON-like map without the
// fields kopia marks kopia:"sensitive" (passwords, keys, credentials).
func scrubbedConfig(cfg any) map[string]any {
	data, err := json.Marshal(cfg)
	if err != nil {
		return nil
	}
	var m map[string]any
	if json.Unmarshal(data, &m) != nil {
		return nil
	}
	for _, k := range sensitiveJSONFields(reflect.TypeOf(cfg)) {
		delete(m, k)
	}
	return m
}

func sensitiveJSONFields(t reflect.Type) []string {
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct {
		return nil
	}
	var names []string
	for i := range t.NumField() {
		f := t.Field(i)
		if f.Anonymous {
			names = append(names, sensitiveJSONFields(f.Type)...)
			continue
		}
		if f.Tag.Get("kopia") == "sensitive" {
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name == "" {
				name = f.Name
			}
			names = append(names, name)
		}
	}
	return names
}
