package zfs

import (
	"context"
	"log/slog"
	"time"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/runner"
)

// replicaControlPersist keeps the replica's ssh connection shared: a night,
// a timeline or a restore runs dozens of short zfs commands there, and each
// new connection costs a key exchange (0.3-0.6 s on loopback here).
const replicaControlPersist = 2 * time.Minute

// Configured builds the zfs handles a configuration names: this host's,
// and the replica's (nil when there is none, or when its ssh settings are
// unusable — err says why, and the local handle is still returned).
// closeReplica ends the replica's shared ssh connection; it is never nil.
func Configured(cfg *config.Config, log *slog.Logger) (local, replica *ZFS, closeReplica func() error, err error) {
	closeReplica = func() error { return nil }
	opts := Options{Binary: cfg.ZFS.Binary, CommandTimeout: cfg.ZFS.CommandTimeout, StreamTimeout: cfg.ZFS.SendTimeout, Logger: log}
	local = New(&runner.Local{Logger: log}, opts)
	rc := cfg.Replica
	if rc == nil {
		return local, nil, closeReplica, nil
	}
	opts.CommandTimeout = rc.CommandTimeout
	if rc.Target.Local {
		return local, New(&runner.Local{Logger: log}, opts), closeReplica, nil
	}
	r, err := runner.NewSSH(runner.SSHConfig{User: rc.Target.User, Host: rc.Target.Host, Port: rc.Target.Port,
		IdentityFile: rc.IdentityFile, KnownHostsFile: rc.KnownHosts, ConnectTimeout: rc.ConnectTimeout,
		ControlPersist: replicaControlPersist})
	if err != nil {
		return local, nil, closeReplica, err
	}
	r.Logger = log
	return local, New(r, opts), r.Close, nil
}

// CheckDatasets looks up each configured dataset on this host, for "config
// check": one problem, at the dataset's line, per dataset that does not
// exist. err is set when zfs cannot be asked at all (not installed, its
// daemon down); then nothing is known about the datasets.
func CheckDatasets(ctx context.Context, cfg *config.Config, notes *config.Notes, log *slog.Logger) ([]config.FieldError, error) {
	local := New(&runner.Local{Logger: log}, Options{Binary: cfg.ZFS.Binary, CommandTimeout: cfg.ZFS.CommandTimeout, Logger: log})
	var problems []config.FieldError
	for i, ds := range cfg.Datasets {
		ok, err := local.Exists(ctx, ds.Name)
		if err != nil {
			return nil, err
		}
		if !ok {
			problems = append(problems, notes.Problem(notes.DatasetKey(i), ds.Name,
				"does not exist on this host (zfs list shows the datasets there); fix the name or create the dataset"))
		}
	}
	return problems, nil
}
