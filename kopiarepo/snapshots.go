package kopiarepo

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/kopia/kopia/repo/manifest"
	"github.com/kopia/kopia/snapshot"
)

// The tags vmhistory puts on every kopia snapshot of a ZFS snapshot. kopia
// stores a tag k as the manifest label "tag:k", which is what "kopia
// snapshot create --tags k:v" does and what "kopia snapshot list --tags k:v"
// filters on; the API of this package takes and returns the bare keys.
const (
	TagDataset  = "dataset"  // the ZFS dataset, DATA/libvirt
	TagSnapshot = "snapshot" // the ZFS snapshot name after the @
	TagGUID     = "guid"     // the ZFS snapshot's guid, the same on the replica
	// TagReferenced is the ZFS snapshot's referenced bytes, so that the
	// timeline shows one size for a snapshot wherever it lives.
	TagReferenced = "referenced"
)

// kopiaTagPrefix starts the label of every user tag, as in kopia's CLI.
const kopiaTagPrefix = "tag:"

// Snapshot is one complete kopia snapshot.
type Snapshot struct {
	// ID is the kopia manifest ID ("kopia snapshot list --manifest-id").
	ID string `json:"id"`
	// Host, User and Path are the source, user@host:path.
	Host string `json:"host"`
	User string `json:"user"`
	Path string `json:"path"`
	// StartTime is the time the snapshot stands for; for vmhistory's
	// uploads, the ZFS snapshot's creation time. EndTime is StartTime plus
	// the upload's duration, as kopia's --start-time does.
	StartTime   time.Time `json:"start_time"`
	EndTime     time.Time `json:"end_time"`
	Description string    `json:"description,omitempty"`
	// Tags are the snapshot's kopia tags without kopia's "tag:" prefix.
	Tags map[string]string `json:"tags,omitempty"`
	// TotalSize is the sum of the sizes of the files in the snapshot.
	TotalSize int64 `json:"total_size"`
	Files     int64 `json:"files"`
	Dirs      int64 `json:"dirs"`
	// Errors counts files that could not be read when it was made.
	Errors int `json:"errors,omitempty"`
	// RootObjectID is the root directory's object, what "kopia snapshot
	// list" prints and "kopia restore" accepts.
	RootObjectID string `json:"root_object_id"`
}

func snapshotFromManifest(m *snapshot.Manifest) Snapshot {
	s := Snapshot{
		ID:           string(m.ID),
		Host:         m.Source.Host,
		User:         m.Source.UserName,
		Path:         m.Source.Path,
		StartTime:    m.StartTime.ToTime(),
		EndTime:      m.EndTime.ToTime(),
		Description:  m.Description,
		TotalSize:    m.Stats.TotalFileSize,
		Files:        int64(m.Stats.TotalFileCount),
		Dirs:         int64(m.Stats.TotalDirectoryCount),
		RootObjectID: m.RootObjectID().String(),
	}
	for k, v := range m.Tags {
		if key, ok := strings.CutPrefix(k, kopiaTagPrefix); ok {
			if s.Tags == nil {
				s.Tags = map[string]string{}
			}
			s.Tags[key] = v
		}
	}
	if m.RootEntry != nil && m.RootEntry.DirSummary != nil {
		ds := m.RootEntry.DirSummary
		s.TotalSize, s.Files, s.Dirs, s.Errors = ds.TotalFileSize, ds.TotalFileCount, ds.TotalDirCount, ds.FatalErrorCount
	}
	return s
}

// kopiaTags turns vmhistory's tags into kopia's labels.
func kopiaTags(tags map[string]string) (map[string]string, error) {
	if len(tags) == 0 {
		return nil, nil
	}
	out := make(map[string]string, len(tags))
	for k, v := range tags {
		if k == "" || strings.ContainsAny(k, ":") {
			return nil, fmt.Errorf("invalid tag key %q: must be non-empty and hold no colon", k)
		}
		out[kopiaTagPrefix+k] = v
	}
	return out, nil
}

// Snapshots lists the complete snapshots of the sources that match host,
// user and path, oldest first; an empty argument matches any value, so
// Snapshots(ctx, "", "", "") lists the whole repository. Checkpoints of an
// interrupted upload (kopia's incomplete snapshots) are left out.
func (r *Repo) Snapshots(ctx context.Context, host, user, path string) ([]Snapshot, error) {
	return guarded(ctx, r, func(ctx context.Context) ([]Snapshot, error) { return r.snapshots(ctx, host, user, path) })
}

func (r *Repo) snapshots(ctx context.Context, host, user, path string) ([]Snapshot, error) {
	if host != "" && user != "" && path != "" {
		return r.listSource(ctx, snapshot.SourceInfo{Host: host, UserName: user, Path: path})
	}
	sources, err := snapshot.ListSources(ctx, r.rep)
	if err != nil {
		return nil, fmt.Errorf("list sources in %s: %w", r.storage, err)
	}
	var all []Snapshot
	for _, si := range sources {
		if (host != "" && si.Host != host) || (user != "" && si.UserName != user) || (path != "" && si.Path != path) {
			continue
		}
		snaps, err := r.listSource(ctx, si)
		if err != nil {
			return nil, err
		}
		all = append(all, snaps...)
	}
	sortSnapshots(all)
	return all, nil
}

func (r *Repo) listSource(ctx context.Context, si snapshot.SourceInfo) ([]Snapshot, error) {
	mans, err := snapshot.ListSnapshots(ctx, r.rep, si)
	if err != nil {
		return nil, fmt.Errorf("list snapshots of %v in %s: %w", si, r.storage, err)
	}
	return completeSnapshots(mans), nil
}

func completeSnapshots(mans []*snapshot.Manifest) []Snapshot {
	out := make([]Snapshot, 0, len(mans))
	for _, m := range mans {
		if m.IncompleteReason == "" {
			out = append(out, snapshotFromManifest(m))
		}
	}
	sortSnapshots(out)
	return out
}

func sortSnapshots(s []Snapshot) {
	sort.SliceStable(s, func(i, j int) bool {
		if !s[i].StartTime.Equal(s[j].StartTime) {
			return s[i].StartTime.Before(s[j].StartTime)
		}
		return s[i].ID < s[j].ID
	})
}

// SnapshotsTagged lists the complete snapshots, of any source, that carry
// all the given tags (bare keys, like TagGUID), oldest first.
func (r *Repo) SnapshotsTagged(ctx context.Context, tags map[string]string) ([]Snapshot, error) {
	return guarded(ctx, r, func(ctx context.Context) ([]Snapshot, error) { return r.snapshotsTagged(ctx, tags) })
}

func (r *Repo) snapshotsTagged(ctx context.Context, tags map[string]string) ([]Snapshot, error) {
	labels, err := kopiaTags(tags)
	if err != nil {
		return nil, err
	}
	ids, err := snapshot.ListSnapshotManifests(ctx, r.rep, nil, labels)
	if err != nil {
		return nil, fmt.Errorf("find snapshots tagged %v in %s: %w", tags, r.storage, err)
	}
	mans, err := snapshot.LoadSnapshots(ctx, r.rep, ids)
	if err != nil {
		return nil, fmt.Errorf("load snapshots tagged %v in %s: %w", tags, r.storage, err)
	}
	return completeSnapshots(mans), nil
}

// SnapshotByGUID returns the kopia snapshot of the ZFS snapshot with this
// guid, and false when there is none. Should the same ZFS snapshot have
// been uploaded twice, the newest upload is returned.
func (r *Repo) SnapshotByGUID(ctx context.Context, guid string) (Snapshot, bool, error) {
	snaps, err := r.SnapshotsTagged(ctx, map[string]string{TagGUID: guid})
	if err != nil || len(snaps) == 0 {
		return Snapshot{}, false, err
	}
	latest := snaps[0]
	for _, s := range snaps[1:] {
		if s.EndTime.After(latest.EndTime) {
			latest = s
		}
	}
	return latest, true, nil
}

// Snapshot loads one snapshot by its ID.
func (r *Repo) Snapshot(ctx context.Context, id string) (Snapshot, error) {
	m, err := guarded(ctx, r, func(ctx context.Context) (*snapshot.Manifest, error) { return r.loadManifest(ctx, id) })
	if err != nil {
		return Snapshot{}, err
	}
	return snapshotFromManifest(m), nil
}

func (r *Repo) loadManifest(ctx context.Context, id string) (*snapshot.Manifest, error) {
	m, err := snapshot.LoadSnapshot(ctx, r.rep, manifest.ID(id))
	if err != nil {
		return nil, fmt.Errorf("kopia snapshot %s in %s: %w", id, r.storage, err)
	}
	return m, nil
}
